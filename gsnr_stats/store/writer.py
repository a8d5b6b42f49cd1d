"""GradientWriter: append records to one store file (a shard), crash-safe.

Crash model (``docs/format.md`` states it for readers): the rows of the ``records`` table
are the only source of truth. A record row is written last, after its data is flushed, and
names the extents it covers in every dataset (``seg_stop``, ``grads_stop``,
``moments_stop``, and ``meta_start``/``meta_stop`` of its JSON metadata in ``record_meta``);
every table row carries a checksum written after its other columns.
Anything beyond the extents of the last valid record row is debris that readers ignore.
A record is completed only by :meth:`GradientWriter.end_record`, a clean exit of its
:meth:`GradientWriter.record` block, or :meth:`GradientWriter.close` on a clean exit; an
exception leaves it incomplete. A write rejected by validation appends nothing; a write that
fails in the middle (disk full, I/O error) stops the writer, which then closes cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._version import __version__
from ..errors import GSNRError, SchemaError, StoreError
from . import _factored, _faults
from ._chunkio import DirectChunks
from ._inputs import as_vector, check_grads, check_moments, to_store_dtype
from ._meta import check_optimizer_step, encode_meta, json_default
from ._netcdf import LIBVER, add_netcdf_view, global_attrs
from ._process import _tmp_name, cleanup_stale_tmp, defer_sigint, holds_sigint, temp_files  # noqa: F401
from ._space import SpaceCheck
from .layout import Layout, auto_chunks, balanced_width
from .schema import (
    CRC_COL,
    FACTORED_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    GRAD_DTYPES,
    KIND_GRADIENTS,
    KIND_MOMENTS,
    NO_OPTIMIZER_STEP,
    TABLE_LONG_NAMES,
    TABLES,
    _as_float,
    _as_int64,
    bytes_crc,
    check_split,
    data_checksum,
    encode_split,
    row_crc,
)


def _library_version() -> str:
    return __version__


class _RecordHandle:
    """What ``with writer.record(step, split) as r`` yields: ``r.write``/``r.write_moments``
    forward every keyword (``lr``, ``epoch``, ``optimizer_step``, ``meta``...) to the writer."""

    def __init__(self, writer: GradientWriter, step: int, split: str) -> None:
        self._w, self.step, self.split = writer, step, split

    def write(self, grads: Any, **kw: Any) -> None:
        self._w.write(self.step, self.split, grads, **kw)

    def write_moments(self, count: float, mean: Any, m2: Any, **kw: Any) -> None:
        self._w.write_moments(self.step, self.split, count, mean, m2, **kw)


class GradientWriter:
    """Write per-sample gradients (or their moments) of a run into one HDF5 shard.

    Parameters
    ----------
    path : str or Path
        Target file. It appears under this name only once its schema is complete; until
        then it is written under a hidden temporary name next to it. Exactly one writer
        creates a path: a second writer (another process or thread) gets :class:`StoreError`
        unless ``overwrite``.
    params : sequence of (name, shape) or (name, shape, layer)
        Parameter tensors in the order of the flat gradient vector.
    attrs : dict, optional
        Provenance. ``framework`` and ``framework_version`` are stored as such; every other
        key is stored as user JSON (never pickle).
    dtype : {"float32", "float16"}
        Storage dtype of gradients. Finite values beyond its range are refused (never stored
        as ``inf``).
    chunks : (int, int), optional
        Chunk shape ``(rows, cols)``; default about 2 MiB, the last column chunk padding the
        file by at most 5 % of P (:func:`auto_chunks`).
    compression : {None, "lzf", "gzip"}
        HDF5 filter for gradients; uncompressed stores are read fastest (memory-mapped).
    run_id : str, optional
        Identifier shared by the shards of a run; a random UUID by default.
    overwrite : bool
        Replace an existing file instead of refusing.
    fast_write : bool
        Write whole chunks of uncompressed gradients with ``pwritev`` at their file offsets
        (:class:`gsnr_stats.store._chunkio.DirectChunks`), which releases the GIL so that a
        background writer thread overlaps a framework computing in Python; ``False`` writes
        through h5py only. Both produce the same bytes; compressed stores always use h5py.
    direct_io : bool or "auto"
        With ``fast_write``: write whole chunks from 4096-byte aligned memory (rows of
        :meth:`alloc_rows`) with ``O_DIRECT``, bypassing the page cache, when the file
        system allows it. ``"auto"`` (default): through the page cache for the first
        ``GradientWriter.DIRECT_AFTER`` bytes (1 GiB; a reduce right after a small dump
        reads from memory), ``O_DIRECT`` after that.
    fsync : bool
        Also ``fsync`` the file whenever a record is completed (and on :meth:`flush`), so
        that completed records survive a power loss or kernel crash, not only a killed
        process. Default ``False``: a flush hands the data to the operating system, which is
        enough for any kill of the writer (SIGKILL, OOM killer, a cancelled job).
    expected_rows, expected_blocks : int, optional
        Per-sample rows / moment blocks planned for this shard (all records): warned about
        before the file is created, and at each new chunk row, when their bytes
        (:meth:`estimate_bytes`) exceed the free space of the store's directory. Without
        them each new chunk row of file space is checked alone. :class:`DiskSpaceWarning`.
    factors : sequence of FactorSpec, str or (weight, bias), optional
        Factored tensors (format 4, ``docs/format.md``): :meth:`write` takes their factors
        ``(A, Δ)``, ``g_W,i = Σ_t δ_it a_itᵀ`` (a tied bias: ``Σ_t δ_it``); ``grads`` holds
        the other (plain) columns in layout order. Without factors the store is format 3.
    factor_dtype : {"float32", "float64"}
        Storage dtype of the factors.

    Notes
    -----
    Records are keyed by ``(step, split)``. ``write`` appends samples to a record and may be
    called once per batch. A record is completed by ``end_record``, by a clean exit of its
    ``record(...)`` block, or by ``close`` (or a clean exit of the writer's ``with`` block),
    which completes the records still open. An exception propagating out of ``record(...)``
    or out of the writer's ``with`` block leaves the open records incomplete: readers skip
    them with a warning, as after a kill. A write rejected by validation appends nothing and
    the writer stays usable; a write failing half-way (disk full, I/O error) raises
    :class:`StoreError` and stops the writer: later writes raise, ``close`` closes without
    completing anything more. Ctrl-C during a write takes effect when that write is done.
    """

    DIRECT_AFTER = 1 << 30  # bytes written through the page cache under direct_io="auto"

    def __init__(
        self,
        path: str | os.PathLike[str],
        params: Sequence[Any],
        *,
        attrs: dict[str, Any] | None = None,
        dtype: str = "float32",
        chunks: tuple[int, int] | None = None,
        compression: str | None = None,
        compression_opts: Any = None,
        run_id: str | None = None,
        overwrite: bool = False,
        fast_write: bool = True,
        direct_io: bool | str = "auto",
        fsync: bool = False,
        expected_rows: int | None = None,
        expected_blocks: int | None = None,
        factors: Sequence[Any] | None = None,
        factor_dtype: str = "float32",
    ) -> None:
        self.path = Path(path)
        self._closed = True  # until the file is open: close() and __del__ do nothing
        self._failed: str | None = None
        self.layout = Layout.from_params(params)
        if str(np.dtype(dtype)) not in GRAD_DTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        self.dtype = GRAD_DTYPES[str(np.dtype(dtype))]
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        if direct_io not in (True, False, "auto"):
            raise ValueError(f"direct_io must be True, False or 'auto', got {direct_io!r}")
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path}: file exists (pass overwrite=True to replace it)")
        self.factors = _factored.resolve(self.layout, factors or (), factor_dtype, str(self.path))
        self.plain_index, self._plain = _factored.plain_space(self.layout, self.factors)
        P = self._plain.n_params  # the columns of grads: the plain ones (all without factors)
        fast_write = fast_write and P > 0
        if chunks is None:
            chunks = auto_chunks(P, self.dtype.itemsize)
        chunks = (int(chunks[0]), min(int(chunks[1]), max(1, P)))
        if chunks[0] < 1 or chunks[1] < 1:
            raise ValueError(f"chunks must be positive, got {chunks}")
        self.chunks = chunks
        self.fsync = bool(fsync)
        attrs = dict(attrs or {})
        framework = str(attrs.pop("framework", "none"))
        framework_version = str(attrs.pop("framework_version", ""))
        try:
            user_json = json.dumps(attrs, default=json_default)
        except (TypeError, ValueError) as e:
            raise ValueError(f"attrs must be JSON-serialisable: {e}") from e
        self.run_id = run_id or uuid.uuid4().hex
        self._space = SpaceCheck(self.path, self.layout, self.dtype, chunks, expected_rows,
                                 expected_blocks, self._plain, self.factors)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._space.at_create()
        cleanup_stale_tmp(self.path)
        tmp = _tmp_name(self.path)
        # Chunk cache holds one full chunk row so that batches not aligned to chunk rows
        # do not cause read-modify-write of partially filled chunks.
        row_bytes = chunks[0] * P * self.dtype.itemsize
        cache = int(min(max(2 * row_bytes, 16 << 20), 512 << 20))
        with defer_sigint():
            try:
                f = h5py.File(
                    tmp, "w", libver=LIBVER, rdcc_nbytes=cache, rdcc_nslots=100003,
                    locking=False, alignment_threshold=64 << 10, alignment_interval=4096,
                )
            except OSError as e:
                raise StoreError(f"{self.path}: cannot create store ({e})") from e
            try:
                self._create_schema(f, framework, framework_version, user_json, compression,
                                    compression_opts, fast_write)
                f.flush()
                f.swmr_mode = True
                self._publish(tmp, overwrite)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    f.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if isinstance(e, OSError):
                    raise StoreError(f"{self.path}: cannot create store ({e})") from e
                raise
        self._f = f
        self._dsets: dict[str, h5py.Dataset] = {}
        self._closed = False
        self._direct = DirectChunks.open(f, self.path, bool(direct_io)) if fast_write else None
        if self._direct is not None and direct_io == "auto":
            self._direct.direct_after = self.DIRECT_AFTER
        self._stage: np.ndarray | None = None  # aligned staging rows for O_DIRECT
        self._open: dict[tuple[int, str], dict[str, Any]] = {}
        # lr/epoch/optimizer_step/meta given to record(), for the record's state once opened
        self._pending: dict[tuple[int, str], dict[str, Any]] = {}
        self._done: set[tuple[int, str]] = set()

    # -- creation --------------------------------------------------------------------------

    def _create_schema(self, f: h5py.File, framework: str, framework_version: str,
                       user_json: str, compression: str | None, compression_opts: Any,
                       fast_write: bool) -> None:
        P = self._plain.n_params
        chunks = self.chunks
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["library"] = "gsnr-stats"
        f.attrs["library_version"] = _library_version()
        f.attrs["framework"] = framework
        f.attrs["framework_version"] = framework_version
        f.attrs["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        f.attrs["run_id"] = self.run_id
        f.attrs["user_attrs"] = user_json
        f.attrs["layout"] = self.layout.to_json()
        f.attrs["layout_hash"] = self.layout.hash
        f.attrs["n_params"] = self.layout.n_params
        f.attrs.update(global_attrs(_library_version(), framework, framework_version,
                                    str(f.attrs["created_at"])))
        comp: dict[str, Any] = {}
        if compression is not None:
            comp = {"compression": compression, "compression_opts": compression_opts}
        if compression is None and fast_write and hasattr(os, "pwritev"):
            # Direct writes (see DirectChunks): every chunk gets its file space when the
            # dataset grows, and HDF5 never writes fill values into it.
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            comp = {"dcpl": dcpl, "fill_time": "never"}
        f.create_dataset(
            "grads", shape=(0, P), maxshape=(None, P or None), dtype=self.dtype, chunks=chunks,
            **comp,  # P = 0 (every tensor factored): a (n, 0) dataset keeps the row count
        )
        if self.factors:
            f.attrs["format_version"] = FACTORED_VERSION
            f.attrs["factors"] = _factored.to_json(self.factors)
            f.attrs["n_plain"] = P
            _factored.create_datasets(f, self.factors)
        vec_chunk = (max(4096, chunks[0]),)
        for name, dt in (("loss", "<f8"), ("sample_id", "<i8"), ("label", "<f8")):
            f.create_dataset(name, (0,), maxshape=(None,), dtype=dt, chunks=vec_chunk)
        f.create_dataset("record_meta", (0,), maxshape=(None,), dtype="u1", chunks=(4096,))
        mom = f.create_group("moments")
        mcols = balanced_width(P, 1 << 17)  # no near-empty last chunk (stored whole)
        mom.create_dataset("count", (0,), maxshape=(None,), dtype="<f8", chunks=(256,))
        P = self.layout.n_params  # moments are full P, factored store or not
        mom.create_dataset("mean", (0, P), maxshape=(None, P), dtype="<f8", chunks=(1, mcols))
        mom.create_dataset("m2", (0, P), maxshape=(None, P), dtype="<f8", chunks=(1, mcols))
        for tname, cols in TABLES.items():
            grp = f.create_group(tname)
            grp.attrs["long_name"] = TABLE_LONG_NAMES[tname]
            for cname, dt, shape in (*cols, (CRC_COL, np.dtype("<u8"), ())):
                grp.create_dataset(cname, (0, *shape), maxshape=(None, *shape), dtype=dt,
                                   chunks=(256, *shape))
        # dimension scales and CF attributes for netCDF readers: no data, nothing to append
        add_netcdf_view(f, self.layout, self.factors)

    def _publish(self, tmp: Path, overwrite: bool) -> None:
        """Give the finished temp file its name; refuse if another writer took it first."""
        if overwrite:
            os.replace(tmp, self.path)
            return
        try:
            # link(2) fails if the name exists, atomically, also on NFS: exactly one of two
            # writers racing for a new path wins, the other is told (an exists() check
            # followed by rename would let the second silently replace the first)
            os.link(tmp, self.path)
        except FileExistsError as e:
            raise StoreError(
                f"{self.path}: another writer created this file first (one writer per file)"
            ) from e
        except OSError:
            # a file system without hard links: exclusive check, then rename (racy there)
            if self.path.exists():
                raise StoreError(
                    f"{self.path}: another writer created this file first (one writer per file)"
                ) from None
            os.rename(tmp, self.path)
            return
        os.unlink(tmp)

    # -- low-level steps -------------------------------------------------------------------

    def _where(self, step: int, split: str) -> str:
        return f"{self.path}: record (step={step}, split={split!r})"

    @contextlib.contextmanager
    def _step(self, where: str) -> Iterator[None]:
        """One write step: SIGINT deferred; a failure inside stops the writer."""
        self._check_open()
        with defer_sigint():
            try:
                yield
            except BaseException as e:
                self._failed = f"{type(e).__name__}: {e}"
                self._quarantine()
                if isinstance(e, GSNRError | MemoryError) or not isinstance(e, Exception):
                    raise
                raise StoreError(
                    f"{where}: write failed ({type(e).__name__}: {e}); the writer has stopped, "
                    "records completed before are intact"
                ) from e

    def _ds(self, name: str) -> h5py.Dataset:
        """The open handle of dataset ``name``, kept for the writer's life.

        Why: closing a dataset handle flushes its chunk cache; a handle dropped by the
        garbage collector would flush outside any write step, where a failure (disk full)
        is only printed as "Exception ignored" and leaves HDF5 in a state that can crash it.
        """
        ds = self._dsets.get(name)
        if ds is None:
            ds = self._dsets[name] = self._f[name]
        return ds

    def _quarantine(self) -> None:
        """After a failed write, let no further byte reach the file.

        Why: HDF5 retries its dirty cache on close; after a failed write (disk full, EFBIG)
        that retry can overwrite good metadata with half-updated state, and HDF5 1.14 may
        crash the interpreter (SIGSEGV seen with a full tmpfs). Pointing the file's
        descriptor at /dev/null keeps the file exactly as it was when the write failed
        (every completed record was flushed before) and lets close() finish quietly.
        """
        with contextlib.suppress(Exception):
            fd = self._f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        if self._direct is not None:
            with contextlib.suppress(OSError):
                self._direct.close()
            self._direct = None

    def _append(self, name: str, values: np.ndarray) -> tuple[int, int]:
        ds = self._ds(name)
        n0 = ds.shape[0]
        n1 = n0 + values.shape[0]
        _faults.point(f"{name}.resize")
        ds.resize(n1, axis=0)
        if values.shape[0]:
            _faults.point(f"{name}.write")
            ds[n0:n1] = values
        return n0, n1

    def _append_row(self, table: str, values: Sequence[Any]) -> int:
        """Append one table row, column by column, its checksum column last."""
        cols = TABLES[table]
        crc = row_crc(table, values)
        n0 = self._ds(f"{table}/{CRC_COL}").shape[0]
        for (cname, dt, shape), v in zip(cols, values, strict=True):
            self._append(f"{table}/{cname}", np.asarray(v, dtype=dt).reshape((1, *shape)))
        self._append(f"{table}/{CRC_COL}", np.array([crc], dtype="<u8"))
        return n0

    def _flush(self, fsync: bool | None = None) -> None:
        _faults.point("flush")
        self._f.flush()
        if self.fsync if fsync is None else fsync:
            _faults.point("fsync")
            os.fsync(self._f.id.get_vfd_handle())

    def _append_grads(self, g: np.ndarray) -> tuple[int, int]:
        """Append rows ``g`` (store dtype) to ``grads``: whole chunk rows directly, rest via h5py.

        The rows ``[n0, n1)`` split into a head ``[n0, a)`` that completes a chunk row begun
        by an earlier write, whole chunk rows ``[a, b)`` that nothing has touched yet, and a
        tail ``[b, n1)``. Head and tail go through h5py (its chunk cache owns those chunks);
        the whole chunk rows are written by :class:`DirectChunks` without holding the GIL.
        """
        ds = self._ds("grads")
        n0 = ds.shape[0]
        n1 = n0 + g.shape[0]
        _faults.point("grads.resize")
        ds.resize(n1, axis=0)
        if n1 == n0:
            return n0, n1
        rc = self.chunks[0]
        a, b = -(-n0 // rc) * rc, (n1 // rc) * rc
        if self._direct is None or a >= b:
            _faults.point("grads.write")
            ds[n0:n1] = g
            return n0, n1
        if n0 < a:
            _faults.point("grads.write")
            ds[n0:a] = g[: a - n0]
        body = g[a - n0 : b - n0]
        if body.strides[1] != body.dtype.itemsize or (
            body.strides[0] < body.shape[1] * body.dtype.itemsize
        ):
            body = np.ascontiguousarray(body)  # numpy copies without the GIL
        if self._direct.wants_staging(body, self.chunks):
            # O_DIRECT needs aligned memory: one copy into a reused aligned buffer costs
            # less CPU than the page-cache copy it replaces (numpy copies without the GIL)
            if self._stage is None or self._stage.shape[0] < body.shape[0]:
                self._stage = None
                self._stage = self.alloc_rows(body.shape[0])
            stage = self._stage[: body.shape[0]]
            np.copyto(stage, body)
            body = stage
        self._direct.write_rows(ds, a, body)
        if b < n1:
            _faults.point("grads.write")
            ds[b:n1] = g[b - n0 :]
        return n0, n1

    def estimate_bytes(self, n_rows: int = 0, n_blocks: int = 0, n_records: int = 1) -> int:
        """File size of this shard with ``n_rows`` gradient rows and ``n_blocks`` moment
        blocks in all (:func:`gsnr_stats.estimate_store_bytes` with its layout, dtype, chunks)."""
        return self._space.estimate(n_rows, n_blocks, n_records)

    def alloc_rows(self, rows: int) -> np.ndarray:
        """A reusable host buffer ``(rows, P)`` for gradients, laid out as the chunks are.

        Each row is padded to a whole number of chunk columns and the buffer starts on a
        page boundary, so that whole chunk rows of ``buf[:n]`` are written without any copy
        (and with ``O_DIRECT`` under ``direct_io=True``). Fill ``buf[:n]`` and pass it to
        :meth:`write`; any other array works too, at the cost of a copy.

        Returns
        -------
        ndarray, shape (rows, P)
            A view of a zero-initialised, page-aligned ``(rows, P_padded)`` array of the
            store dtype.
        """
        if int(rows) < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        P = self._plain.n_params
        cc = self.chunks[1]
        padded = -(-P // cc) * cc
        n = max(1, int(rows))
        nbytes = n * padded * self.dtype.itemsize
        mm = mmap.mmap(-1, max(nbytes, 1))  # anonymous: page-aligned and zeroed
        full = np.frombuffer(mm, dtype=self.dtype, count=n * padded).reshape(n, padded)
        return full[: int(rows), :P]

    def _check_key(self, step: Any, split: str) -> tuple[int, str]:
        try:
            check_split(split)
        except ValueError as e:
            raise SchemaError(f"{self.path}: {e}") from e
        key = (_as_int64(step, "step", f"{self.path}: record (split={split!r})"), split)
        if key in self._done:
            raise StoreError(f"{self._where(*key)} was already completed in this shard")
        return key

    def _state(self, key: tuple[int, str], kind: int) -> dict[str, Any] | None:
        st = self._open.get(key)
        if st is not None and st["kind"] != kind:
            raise StoreError(f"{self._where(*key)}: cannot mix per-sample gradients and moments")
        return st

    def _commit_state(self, key: tuple[int, str], kind: int, n: int,
                      attrs: dict[str, Any]) -> None:
        """Count ``n`` samples into the record's state; ``attrs`` not None replace the old."""
        st = self._open.get(key)
        if st is None:
            st = {"kind": kind, "n": 0, "lr": math.nan, "epoch": math.nan,
                  "optimizer_step": NO_OPTIMIZER_STEP, "meta": b""}
            st.update(self._pending.get(key, {}))
            self._open[key] = st
        st["n"] += n
        st.update({k: v for k, v in attrs.items() if v is not None})

    def _record_attrs(self, where: str, lr: Any, epoch: Any, optimizer_step: Any,
                      meta: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validated record attributes as stored (None: not given); SchemaError otherwise."""
        return {
            "lr": None if lr is None else _as_float(lr, "lr", where),
            "epoch": None if epoch is None else _as_float(epoch, "epoch", where),
            "optimizer_step": (None if optimizer_step is None
                               else check_optimizer_step(optimizer_step, where)),
            "meta": None if meta is None else encode_meta(meta, where),
        }

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")
        if self._failed is not None:
            raise StoreError(
                f"{self.path}: writer stopped after an earlier failure ({self._failed}); "
                "records completed before it are intact"
            )

    # -- public ----------------------------------------------------------------------------

    @holds_sigint
    def write(
        self,
        step: int,
        split: str,
        grads: Any = None,
        loss: Any = None,
        sample_id: Any = None,
        label: Any = None,
        lr: float | None = None,
        epoch: float | None = None,
        optimizer_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
        factors: Mapping[str, Any] | None = None,
    ) -> None:
        """Append per-sample gradients ``grads`` ``(n, P)`` to record ``(step, split)``.

        Every argument is validated before anything is written: a rejected call appends
        nothing and the writer stays usable.

        Parameters
        ----------
        step : int
            Optimizer step of the checkpoint (int64).
        split : str
            Data split (``"train"``, ``"test"``, ...), at most 64 UTF-8 bytes.
        grads : array_like, shape (n, P)
            Gradient of each sample's own loss (not scaled by 1/batch size).
        loss : array_like, shape (n,), optional
            Per-sample loss, stored as float64 (NaN where not given).
        sample_id : array_like of int, shape (n,), optional
            Sample identifiers (int64); default: running index within the record.
        label : array_like, shape (n,), optional
            Labels or targets, stored as float64.
        lr, epoch : float, optional
            Learning rate and epoch of the checkpoint (record attributes).
        optimizer_step : int, optional
            The optimizer's update count at the checkpoint (int64, >= 0), whatever ``step``
            counts: the analytics take the number of updates between checkpoints from it.
        meta : mapping, optional
            JSON metadata of the record, e.g. ``{"optimizer": {"class": "SGD", "groups":
            [{"lr": 0.1, "momentum": 0.9, ...}]}, "framework": "torch 2.13.0"}``: str keys;
            str, int, finite float, bool, None, list/tuple, dict values (numpy scalars are
            converted; NaN/Inf are refused with :class:`SchemaError`); at most 64 KiB as
            JSON. Read back by :meth:`GradientStore.record_meta`.
        factors : mapping, optional
            ``{weight: (A, Δ)}`` for every factored tensor of a writer made with ``factors=``:
            ``A`` ``(n, [T,] in)``, ``Δ`` ``(n, [T,] out)``, ``T ≤ rows``; ``grads`` is then
            ``(n, P_plain)`` (None if ``P_plain = 0``); full ``(n, P)`` rows are refused.

        Notes
        -----
        ``lr``, ``epoch``, ``optimizer_step`` and ``meta`` are record attributes: the last
        value given (not None) for the record, by any ``write`` or by ``record()``, is
        stored when the record is completed (``meta`` is replaced, not merged).
        """
        self._check_open()
        key = self._check_key(step, split)
        where = self._where(*key)
        g, fac = (_factored.check_write(self, grads, factors, where) if self.factors or factors
                  is not None else (check_grads(grads, self.layout.n_params, where), []))
        st = self._state(key, KIND_GRADIENTS)
        n = g.shape[0]
        rattrs = self._record_attrs(where, lr, epoch, optimizer_step, meta)
        n0 = st["n"] if st is not None else 0
        loss_a = as_vector(loss, "loss", "<f8", n, np.full(n, np.nan), where)
        sid = as_vector(sample_id, "sample_id", "<i8", n, np.arange(n0, n0 + n, dtype="<i8"),
                        where)
        lab = as_vector(label, "label", "<f8", n, np.full(n, np.nan), where)
        gs_ = to_store_dtype(g, self.dtype, self._plain, where)
        s1, s2 = data_checksum(gs_)
        aux = bytes_crc(loss_a, sid, lab, *fac)  # v4: the factors' bytes too, in order
        n_rows = self._ds("grads").shape[0]
        self._space.before_grads(n_rows, n_rows + n)  # may warn: nothing written yet
        with self._step(where):
            start, stop = self._append_grads(gs_)
            self._append("loss", loss_a)
            self._append("sample_id", sid)
            self._append("label", lab)
            for name, x in zip(_factored.dataset_names(self.factors), fac, strict=True):
                self._append(name, x)
            self._append_row("segments", (key[0], encode_split(split), KIND_GRADIENTS, start,
                                          stop, s1, s2, aux))
        self._commit_state(key, KIND_GRADIENTS, n, rattrs)

    @holds_sigint
    def write_moments(
        self,
        step: int,
        split: str,
        count: float,
        mean: Any,
        m2: Any,
        lr: float | None = None,
        epoch: float | None = None,
        optimizer_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one block of moments ``(count, mean, M2)`` to a moments-only record.

        ``M2 = Σ_i (g_i − mean)²`` per parameter, float64. Blocks of a record are merged with
        Chan's formula on read and kept separately for jackknife confidence intervals.
        ``count`` must be finite and in ``[0, 2**53]``; ``M2`` must not be negative.
        ``lr``, ``epoch``, ``optimizer_step``, ``meta``: record attributes, as in :meth:`write`.
        """
        self._check_open()
        key = self._check_key(step, split)
        where = self._where(*key)
        count, mean, m2 = check_moments(count, mean, m2, self.layout, where)
        self._state(key, KIND_MOMENTS)
        rattrs = self._record_attrs(where, lr, epoch, optimizer_step, meta)
        cnt = np.array([count])
        aux = bytes_crc(cnt, mean, m2)
        self._space.before_moments(self._ds("moments/count").shape[0])
        with self._step(where):
            start, stop = self._append("moments/count", cnt)
            self._append("moments/mean", mean[None, :])
            self._append("moments/m2", m2[None, :])
            self._append_row("segments", (key[0], encode_split(split), KIND_MOMENTS, start,
                                          stop, 0, 0, aux))
        self._commit_state(key, KIND_MOMENTS, int(round(count)), rattrs)

    @holds_sigint
    def end_record(
        self, step: int, split: str, *, optimizer_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Complete record ``(step, split)``: flush its data, then write the completion marker.

        ``optimizer_step`` and ``meta`` (see :meth:`write`), if given, replace the record's.
        The metadata bytes are appended and flushed with the data, before the marker.
        """
        self._check_open()
        check_split(split)
        key = (_as_int64(step, "step", str(self.path)), split)
        st = self._open.get(key)
        if st is None:
            if key in self._done:
                return
            raise StoreError(f"{self._where(*key)} has no data to complete")
        where = self._where(*key)
        st.update({k: v for k, v in self._record_attrs(where, None, None, optimizer_step,
                                                       meta).items() if v is not None})
        with self._step(where):
            # Data first, marker last: a kill between the two leaves an incomplete record.
            meta_b = np.frombuffer(st["meta"], np.uint8)
            m0 = m1 = self._ds("record_meta").shape[0]
            if meta_b.size:
                m0, m1 = self._append("record_meta", meta_b)
            self._flush()
            self._append_row("records", (
                key[0], encode_split(split), st["kind"], st["n"], st["lr"], st["epoch"],
                self._ds("segments/crc").shape[0], self._ds("grads").shape[0],
                self._ds("moments/count").shape[0], st["optimizer_step"], m0, m1,
                bytes_crc(meta_b),
            ))
            self._flush()
        self._open.pop(key, None)
        self._done.add(key)

    @holds_sigint
    def abort_record(self, step: int, split: str) -> None:
        """Leave record ``(step, split)`` incomplete: no completion marker is written.

        Its rows stay in the file but every reader skips it (and ``info`` lists it), as if
        the writer had been killed. Use it when producing the record failed half-way.
        """
        self._check_open()
        key = (int(step), split)
        self._open.pop(key, None)
        self._pending.pop(key, None)
        with self._step(self._where(*key)):
            self._flush()

    @contextlib.contextmanager
    def record(
        self, step: int, split: str, *, lr: float | None = None, epoch: float | None = None,
        optimizer_step: int | None = None, meta: Mapping[str, Any] | None = None,
    ) -> Iterator[_RecordHandle]:
        """Context manager writing one record batch by batch.

        A clean exit completes the record (if anything was written to it); an exception
        leaves it incomplete and propagates. ``lr``, ``epoch``, ``optimizer_step``, ``meta``
        are record attributes (see :meth:`write`); a value given to a later ``write`` of the
        block wins.
        """
        self._check_open()
        key = self._check_key(step, split)
        where = self._where(*key)
        pend = {k: v for k, v in self._record_attrs(where, lr, epoch, optimizer_step,
                                                    meta).items() if v is not None}
        st = self._open.get(key)
        if st is not None:
            st.update(pend)
        self._pending[key] = pend
        try:
            yield _RecordHandle(self, *key)
        except BaseException:
            self._open.pop(key, None)
            self._pending.pop(key, None)
            raise
        self._pending.pop(key, None)
        if key in self._open:
            self.end_record(*key)

    @holds_sigint
    def write_trajectory(
        self,
        step: int,
        lr: float,
        train_loss: float,
        test_loss: float,
        epoch: float = math.nan,
    ) -> None:
        """Append a loss-trajectory row: mean train and test loss at θ_step, and the lr used."""
        self._check_open()
        where = f"{self.path}: trajectory row (step={step})"
        row = (_as_int64(step, "step", where), _as_float(lr, "lr", where),
               _as_float(epoch, "epoch", where), _as_float(train_loss, "train_loss", where),
               _as_float(test_loss, "test_loss", where))
        with self._step(where):
            self._append_row("trajectory", row)

    @holds_sigint
    def write_probe(
        self,
        step: int,
        n: int,
        lr: float,
        k: int,
        train_before: float,
        train_after: float,
        test_before: float,
        test_after: float,
    ) -> None:
        """Append one OSGR probe row: mean losses on D_k and D'_k before/after a virtual step."""
        self._check_open()
        where = f"{self.path}: probe row (step={step}, n={n}, k={k})"
        row = (_as_int64(step, "step", where), _as_int64(n, "n", where),
               _as_float(lr, "lr", where), _as_int64(k, "k", where),
               *(_as_float(v, name, where) for v, name in (
                   (train_before, "train_before"), (train_after, "train_after"),
                   (test_before, "test_before"), (test_after, "test_after"))))
        with self._step(where):
            self._append_row("probes", row)

    @holds_sigint
    def flush(self, fsync: bool | None = None) -> None:
        """Hand everything written so far to the operating system.

        Completed records then survive any kill of this process. With ``fsync=True`` (or the
        writer's ``fsync`` setting) the file is also synced to the device, so they survive a
        power loss too. Records still open stay incomplete until completed.
        """
        with self._step(str(self.path)):
            self._flush(fsync)

    def close(self) -> None:
        """Complete every open record and close the file.

        After a failed write (the writer stopped), nothing more is completed: the file is
        closed as it is, which keeps every record completed before the failure.
        """
        if self._closed:
            return
        first: BaseException | None = None
        try:
            if self._failed is None:
                try:
                    for key in list(self._open):
                        self.end_record(*key)
                    with self._step(str(self.path)):
                        self._flush()
                except Exception as e:  # the writer is stopped now; close the file anyway
                    first = e
        finally:
            self._close_file()
        if first is not None:
            raise first

    def _close_file(self) -> None:
        with defer_sigint():
            self._closed = True
            self._open.clear()
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - closing after a failure: the records are safe
                pass
            if self._direct is not None:
                with contextlib.suppress(OSError):
                    self._direct.close()

    def __enter__(self) -> GradientWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception is propagating: the open records are not finished, so they must not
        # be completed; close quietly so that the original exception is what the user sees.
        self._open.clear()
        self._pending.clear()
        if not self._closed:
            with contextlib.suppress(Exception):
                self._close_file()

    def __del__(self) -> None:
        # a writer dropped without close(): close the handle, complete nothing
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self._close_file()
