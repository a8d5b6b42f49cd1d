"""The gradient store: a versioned, crash-safe HDF5 schema for per-sample gradients.

The schema is documented in ``docs/format.md``. In short, one file (a *shard*) per writer:

* root attributes: format name and integer version, provenance, the parameter layout as JSON;
* ``grads`` ``(rows, P)``: per-sample gradients of every record, appended row-wise, chunked
  rows x columns; ``loss``, ``sample_id``, ``label`` ``(rows,)`` aligned with it;
* ``segments``: one row per ``write`` call, mapping a row range to its record ``(step, split)``;
* ``records``: one row per *completed* record, the completion marker, written last;
* ``moments/{count,mean,m2}``: moments-only blocks, indexed by segments of kind ``moments``;
* ``trajectory`` and ``probes``: loss trajectories and OSGR probe rows.

Why a single append-only layout: the writer runs in HDF5's single-writer/multiple-reader
(SWMR) mode, in which HDF5 keeps the file consistent after every flush, so a writer killed
with SIGKILL never costs data flushed before the kill. SWMR forbids creating objects after it
starts, hence every dataset exists from the start and grows by appending.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import LayoutMismatchError, SchemaError, StoreError

FORMAT_NAME = "gsnr-stats"
FORMAT_VERSION = 1
SPLIT_MAX_BYTES = 64

KIND_GRADIENTS = 0
KIND_MOMENTS = 1
KIND_NAMES = {KIND_GRADIENTS: "gradients", KIND_MOMENTS: "moments"}

SEGMENT_DTYPE = np.dtype(
    [("step", "<i8"), ("split", f"S{SPLIT_MAX_BYTES}"), ("kind", "u1"),
     ("start", "<i8"), ("stop", "<i8")]
)
RECORD_DTYPE = np.dtype(
    [("step", "<i8"), ("split", f"S{SPLIT_MAX_BYTES}"), ("kind", "u1"),
     ("n_samples", "<i8"), ("lr", "<f8"), ("epoch", "<f8")]
)
TRAJECTORY_DTYPE = np.dtype(
    [("step", "<i8"), ("lr", "<f8"), ("epoch", "<f8"), ("train_loss", "<f8"),
     ("test_loss", "<f8")]
)
PROBE_DTYPE = np.dtype(
    [("step", "<i8"), ("n", "<i8"), ("lr", "<f8"), ("k", "<i8"), ("train_before", "<f8"),
     ("train_after", "<f8"), ("test_before", "<f8"), ("test_after", "<f8")]
)
_TABLES = {
    "segments": SEGMENT_DTYPE,
    "records": RECORD_DTYPE,
    "trajectory": TRAJECTORY_DTYPE,
    "probes": PROBE_DTYPE,
}
_GRAD_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_TARGET_CHUNK_BYTES = 2 << 20
_MAX_CHUNK_COLS = 8192
_MAX_LAYOUT_JSON = 64 << 20


def _library_version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Ordered parameter tensors and their place on the flat parameter axis.

    Attributes
    ----------
    names, shapes, layers : tuple
        Tensor names, shapes and layer names, in flat order.
    offsets, sizes : tuple of int
        Start of each tensor on the flat axis and its number of elements.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layers: tuple[str, ...]
    offsets: tuple[int, ...] = field(init=False)
    sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(math.prod(s)) for s in self.shapes)
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]])) if sizes else ()
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def from_params(cls, params: Sequence[Any]) -> Layout:
        """Build a layout from ``(name, shape)`` or ``(name, shape, layer)`` tuples.

        The layer defaults to the name without its last dotted component
        (``"fc1.weight"`` → ``"fc1"``).
        """
        if isinstance(params, Layout):
            return params
        names, shapes, layers = [], [], []
        for i, p in enumerate(params):
            if not isinstance(p, Sequence) or isinstance(p, str) or len(p) not in (2, 3):
                raise SchemaError(
                    f"parameter #{i}: expected (name, shape) or (name, shape, layer), got {p!r}"
                )
            name, shape = p[0], p[1]
            if not isinstance(name, str) or not name:
                raise SchemaError(f"parameter #{i}: name must be a non-empty string, got {name!r}")
            if isinstance(shape, int | np.integer):
                shape = (int(shape),)
            try:
                shape = tuple(int(s) for s in shape)
            except TypeError as e:
                raise SchemaError(f"parameter {name!r}: shape {shape!r} is not a tuple of ints") from e
            if any(s < 0 for s in shape):
                raise SchemaError(f"parameter {name!r}: negative dimension in shape {shape}")
            layer = p[2] if len(p) == 3 else (name.rsplit(".", 1)[0] if "." in name else name)
            names.append(name)
            shapes.append(shape)
            layers.append(str(layer))
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise SchemaError(f"duplicate parameter names in layout: {dup}")
        if not names:
            raise SchemaError("layout has no parameters")
        return cls(tuple(names), tuple(shapes), tuple(layers))

    @property
    def n_params(self) -> int:
        """Length of the flat parameter axis, P."""
        return int(sum(self.sizes))

    def to_json(self) -> str:
        """Canonical JSON used in the file and for the layout hash."""
        return json.dumps(
            [
                {"name": n, "shape": list(s), "layer": lay, "offset": o, "size": z}
                for n, s, lay, o, z in zip(
                    self.names, self.shapes, self.layers, self.offsets, self.sizes, strict=True
                )
            ],
            separators=(",", ":"),
        )

    @property
    def hash(self) -> str:
        """SHA-256 of names, shapes and layers: shards merge only when hashes match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def tensor_of_param(self) -> np.ndarray:
        """Tensor name of each flat parameter, shape ``(P,)``."""
        return np.repeat(np.array(self.names, dtype=object), self.sizes)

    def layer_of_param(self) -> np.ndarray:
        """Layer name of each flat parameter, shape ``(P,)``."""
        return np.repeat(np.array(self.layers, dtype=object), self.sizes)

    @classmethod
    def from_json(cls, text: str, where: str) -> Layout:
        """Parse and validate the layout JSON stored in a file."""
        try:
            items = json.loads(text)
        except (ValueError, TypeError) as e:
            raise SchemaError(f"{where}: layout attribute is not valid JSON ({e})") from e
        if not isinstance(items, list):
            raise SchemaError(f"{where}: layout must be a JSON list")
        params = []
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not {"name", "shape", "layer"} <= set(it):
                raise SchemaError(f"{where}: layout entry #{i} lacks name/shape/layer")
            params.append((it["name"], it["shape"], it["layer"]))
        try:
            lay = cls.from_params(params)
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from e
        for i, it in enumerate(items):
            if it.get("offset") != lay.offsets[i] or it.get("size") != lay.sizes[i]:
                raise SchemaError(
                    f"{where}: layout entry {lay.names[i]!r} has offset/size "
                    f"{it.get('offset')}/{it.get('size')}, expected {lay.offsets[i]}/{lay.sizes[i]}"
                )
        return lay


@dataclass(frozen=True)
class RecordInfo:
    """One record: a checkpoint ``step`` × a ``split`` of per-sample gradients or moments."""

    step: int
    split: str
    kind: str
    n_samples: int
    lr: float = math.nan
    epoch: float = math.nan


def _check_split(split: str) -> bytes:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    b = split.encode("utf-8")
    if len(b) > SPLIT_MAX_BYTES or "\x00" in split:
        raise ValueError(f"split name {split!r} is longer than {SPLIT_MAX_BYTES} bytes or has NUL")
    return b


def auto_chunks(n_params: int, itemsize: int) -> tuple[int, int]:
    """Chunk shape ``(rows, cols)`` of about 2 MiB for a ``(N, P)`` gradient dataset.

    Columns are capped at 8192 so that one chunk row of a wide model still holds several
    samples (the two-pass kernel runs per chunk), rows fill the rest of the 2 MiB.
    """
    cols = max(1, min(n_params, _MAX_CHUNK_COLS))
    rows = max(1, min(65536, _TARGET_CHUNK_BYTES // (cols * itemsize)))
    return int(rows), int(cols)


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


class _RecordHandle:
    def __init__(self, writer: GradientWriter, step: int, split: str) -> None:
        self._w, self.step, self.split = writer, step, split

    def write(self, grads: Any, **kw: Any) -> None:
        self._w.write(self.step, self.split, grads, **kw)

    def write_moments(self, count: float, mean: Any, m2: Any) -> None:
        self._w.write_moments(self.step, self.split, count, mean, m2)


class GradientWriter:
    """Write per-sample gradients (or their moments) of a run into one HDF5 shard.

    Parameters
    ----------
    path : str or Path
        Target file. It appears under this name only once its schema is complete; until
        then it is written under a hidden temporary name next to it.
    params : sequence of (name, shape) or (name, shape, layer)
        Parameter tensors in the order of the flat gradient vector.
    attrs : dict, optional
        Provenance. ``framework`` and ``framework_version`` are stored as such; every other
        key is stored as user JSON (never pickle).
    dtype : {"float32", "float16"}
        Storage dtype of gradients. ``float16`` refuses values beyond its range.
    chunks : (int, int), optional
        Chunk shape ``(rows, cols)``; default about 2 MiB (:func:`auto_chunks`).
    compression : {None, "lzf", "gzip"}
        HDF5 filter for gradients; uncompressed stores are read fastest (memory-mapped).
    run_id : str, optional
        Identifier shared by the shards of a run; a random UUID by default.
    overwrite : bool
        Replace an existing file instead of refusing.
    fast_write : bool
        Write whole chunks of uncompressed gradients with ``pwritev`` at their file offsets
        (:class:`_DirectChunks`), which releases the GIL so that a background writer thread
        overlaps a framework computing in Python; ``False`` writes through h5py only. Both
        produce the same bytes; compressed stores always use h5py.
    direct_io : bool or "auto"
        With ``fast_write``: write whole chunks from 4096-byte aligned memory (rows of
        :meth:`alloc_rows`) with ``O_DIRECT``, bypassing the page cache, when the file
        system allows it. Saves the CPU time of copying into the page cache (which competes
        with computing on few cores) and the kernel's dirty-page throttling, which slows a
        long buffered dump to well below the disk's speed; the data is then read back from
        the device, not from memory. Falls back to ordinary writes where ``O_DIRECT`` is
        refused. ``"auto"`` (default): through the page cache for the first
        ``GradientWriter.DIRECT_AFTER`` bytes (1 GiB; a reduce right after a small dump
        reads from memory), ``O_DIRECT`` after that.

    Notes
    -----
    Records are keyed by ``(step, split)``. ``write`` appends samples to a record and may be
    called once per batch; ``end_record`` (or leaving ``record(...)``, or ``close``) writes the
    completion marker. ``flush`` makes everything written so far durable: a writer killed
    afterwards keeps every completed record; readers skip unfinished ones with a warning.
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
    ) -> None:
        self.path = Path(path)
        self.layout = Layout.from_params(params)
        if str(np.dtype(dtype)) not in _GRAD_DTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        self.dtype = _GRAD_DTYPES[str(np.dtype(dtype))]
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path}: file exists (pass overwrite=True to replace it)")
        P = self.layout.n_params
        if chunks is None:
            chunks = auto_chunks(P, self.dtype.itemsize)
        chunks = (int(chunks[0]), min(int(chunks[1]), P))
        if chunks[0] < 1 or chunks[1] < 1:
            raise ValueError(f"chunks must be positive, got {chunks}")
        self.chunks = chunks
        attrs = dict(attrs or {})
        framework = str(attrs.pop("framework", "none"))
        framework_version = str(attrs.pop("framework_version", ""))
        try:
            user_json = json.dumps(attrs, default=_json_default)
        except (TypeError, ValueError) as e:
            raise ValueError(f"attrs must be JSON-serialisable: {e}") from e
        self.run_id = run_id or uuid.uuid4().hex

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Chunk cache holds one full chunk row so that batches not aligned to chunk rows
        # do not cause read-modify-write of partially filled chunks.
        row_bytes = chunks[0] * P * self.dtype.itemsize
        cache = int(min(max(2 * row_bytes, 16 << 20), 512 << 20))
        try:
            f = h5py.File(
                tmp, "w", libver="latest", rdcc_nbytes=cache, rdcc_nslots=100003, locking=False,
                alignment_threshold=64 << 10, alignment_interval=4096,
            )
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create store ({e})") from e
        try:
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
            f.attrs["n_params"] = P
            comp = {}
            if compression is not None:
                comp = {"compression": compression, "compression_opts": compression_opts}
            if compression is None and fast_write and hasattr(os, "pwritev"):
                # Direct writes (see _DirectChunks): every chunk gets its file space when the
                # dataset grows, and HDF5 never writes fill values into it.
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                comp = {"dcpl": dcpl, "fill_time": "never"}
            f.create_dataset(
                "grads", shape=(0, P), maxshape=(None, P), dtype=self.dtype, chunks=chunks,
                **comp,
            )
            vec_chunk = (max(4096, chunks[0]),)
            f.create_dataset("loss", (0,), maxshape=(None,), dtype="<f8", chunks=vec_chunk)
            f.create_dataset("sample_id", (0,), maxshape=(None,), dtype="<i8", chunks=vec_chunk)
            f.create_dataset("label", (0,), maxshape=(None,), dtype="<f8", chunks=vec_chunk)
            mom = f.create_group("moments")
            mcols = min(P, 1 << 17)
            mom.create_dataset("count", (0,), maxshape=(None,), dtype="<f8", chunks=(256,))
            mom.create_dataset("mean", (0, P), maxshape=(None, P), dtype="<f8", chunks=(1, mcols))
            mom.create_dataset("m2", (0, P), maxshape=(None, P), dtype="<f8", chunks=(1, mcols))
            for name, dt in _TABLES.items():
                f.create_dataset(name, (0,), maxshape=(None,), dtype=dt, chunks=(256,))
            f.flush()
            f.swmr_mode = True
            # Atomic publish: a kill before this line leaves only the hidden temp file.
            os.replace(tmp, self.path)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._f = f
        self._direct = _DirectChunks.open(f, self.path, bool(direct_io)) if fast_write else None
        if self._direct is not None and direct_io == "auto":
            self._direct.direct_after = self.DIRECT_AFTER
        self._stage: np.ndarray | None = None  # aligned staging rows for O_DIRECT
        self._open: dict[tuple[int, str], dict[str, Any]] = {}
        self._done: set[tuple[int, str]] = set()
        self._closed = False

    # -- helpers ---------------------------------------------------------------------------

    def _where(self, step: int, split: str) -> str:
        return f"{self.path}: record (step={step}, split={split!r})"

    def _append(self, name: str, values: np.ndarray) -> tuple[int, int]:
        ds = self._f[name]
        n0 = ds.shape[0]
        n1 = n0 + values.shape[0]
        ds.resize(n1, axis=0)
        if values.shape[0]:
            ds[n0:n1] = values
        return n0, n1

    def _append_grads(self, g: np.ndarray) -> tuple[int, int]:
        """Append rows ``g`` to ``grads``: whole chunk rows directly, partial ones via h5py.

        The rows ``[n0, n1)`` split into a head ``[n0, a)`` that completes a chunk row begun
        by an earlier write, whole chunk rows ``[a, b)`` that nothing has touched yet, and a
        tail ``[b, n1)``. Head and tail go through h5py (its chunk cache owns those chunks);
        the whole chunk rows are written by :class:`_DirectChunks` without holding the GIL.
        """
        ds = self._f["grads"]
        n0 = ds.shape[0]
        n1 = n0 + g.shape[0]
        ds.resize(n1, axis=0)
        if n1 == n0:
            return n0, n1
        rc = self.chunks[0]
        a, b = -(-n0 // rc) * rc, (n1 // rc) * rc
        if self._direct is None or a >= b:
            ds[n0:n1] = g.astype(self.dtype, copy=False)
            return n0, n1
        if n0 < a:
            ds[n0:a] = g[: a - n0].astype(self.dtype, copy=False)
        body = g[a - n0 : b - n0]
        if body.dtype != self.dtype or body.strides[1] != body.dtype.itemsize or (
            body.strides[0] < body.shape[1] * body.dtype.itemsize
        ):
            # contiguous rows in the store dtype; numpy casts and copies without the GIL
            body = np.ascontiguousarray(body, dtype=self.dtype)
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
            ds[b:n1] = g[b - n0 :].astype(self.dtype, copy=False)
        return n0, n1

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
        P = self.layout.n_params
        cc = self.chunks[1]
        padded = -(-P // cc) * cc
        n = max(1, int(rows))
        nbytes = n * padded * self.dtype.itemsize
        mm = mmap.mmap(-1, max(nbytes, 1))  # anonymous: page-aligned and zeroed
        full = np.frombuffer(mm, dtype=self.dtype, count=n * padded).reshape(n, padded)
        return full[: int(rows), :P]

    def _record_state(self, step: int, split: str, kind: int) -> dict[str, Any]:
        key = (int(step), split)
        _check_split(split)
        if key in self._done:
            raise StoreError(f"{self._where(step, split)} was already completed in this shard")
        st = self._open.get(key)
        if st is None:
            st = {"kind": kind, "n": 0, "lr": math.nan, "epoch": math.nan}
            self._open[key] = st
        elif st["kind"] != kind:
            raise StoreError(
                f"{self._where(step, split)}: cannot mix per-sample gradients and moments"
            )
        return st

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")

    # -- public ----------------------------------------------------------------------------

    def write(
        self,
        step: int,
        split: str,
        grads: Any,
        loss: Any = None,
        sample_id: Any = None,
        label: Any = None,
        lr: float | None = None,
        epoch: float | None = None,
    ) -> None:
        """Append per-sample gradients ``grads`` ``(n, P)`` to record ``(step, split)``.

        Parameters
        ----------
        step : int
            Optimizer step of the checkpoint.
        split : str
            Data split (``"train"``, ``"test"``, ...), at most 64 UTF-8 bytes.
        grads : array_like, shape (n, P)
            Gradient of each sample's own loss (not scaled by 1/batch size).
        loss : array_like, shape (n,), optional
            Per-sample loss, stored as float64 (NaN where not given).
        sample_id : array_like of int, shape (n,), optional
            Sample identifiers; default: running index within the record.
        label : array_like, shape (n,), optional
            Labels or targets, stored as float64.
        lr, epoch : float, optional
            Learning rate and epoch of the checkpoint (record attributes).
        """
        self._check_open()
        step = int(step)
        P = self.layout.n_params
        g = np.asarray(grads)
        if g.ndim == 1 and P == 1:
            g = g[:, None]
        if g.ndim != 2 or g.shape[1] != P:
            raise SchemaError(
                f"{self._where(step, split)}: grads has shape {g.shape}, expected (n, {P})"
            )
        if not np.issubdtype(g.dtype, np.floating) and not np.issubdtype(g.dtype, np.integer):
            raise SchemaError(f"{self._where(step, split)}: grads dtype {g.dtype} is not numeric")
        n = g.shape[0]
        if self.dtype == np.float16:
            big = np.abs(g[np.isfinite(g)]).max(initial=0.0)
            if big > np.finfo(np.float16).max:
                raise StoreError(
                    f"{self._where(step, split)}: |gradient| up to {big:.3g} overflows float16 "
                    f"(max {np.finfo(np.float16).max}); use dtype='float32'"
                )
        st = self._record_state(step, split, KIND_GRADIENTS)

        def vec(x: Any, name: str, dt: str, default: np.ndarray) -> np.ndarray:
            if x is None:
                return default
            a = np.asarray(x, dtype=dt).reshape(-1)
            if a.shape[0] != n:
                raise SchemaError(
                    f"{self._where(step, split)}: {name} has {a.shape[0]} values, grads has {n} rows"
                )
            return a

        loss_a = vec(loss, "loss", "<f8", np.full(n, np.nan))
        sid = vec(sample_id, "sample_id", "<i8", np.arange(st["n"], st["n"] + n, dtype="<i8"))
        lab = vec(label, "label", "<f8", np.full(n, np.nan))
        start, stop = self._append_grads(g)
        self._append("loss", loss_a)
        self._append("sample_id", sid)
        self._append("label", lab)
        seg = np.zeros(1, SEGMENT_DTYPE)
        seg[0] = (step, split.encode(), KIND_GRADIENTS, start, stop)
        self._append("segments", seg)
        st["n"] += n
        if lr is not None:
            st["lr"] = float(lr)
        if epoch is not None:
            st["epoch"] = float(epoch)

    def write_moments(
        self,
        step: int,
        split: str,
        count: float,
        mean: Any,
        m2: Any,
        lr: float | None = None,
        epoch: float | None = None,
    ) -> None:
        """Append one block of moments ``(count, mean, M2)`` to a moments-only record.

        ``M2 = Σ_i (g_i − mean)²`` per parameter, float64. Blocks of a record are merged with
        Chan's formula on read and kept separately for jackknife confidence intervals.
        """
        self._check_open()
        step = int(step)
        P = self.layout.n_params
        mean = np.asarray(mean, dtype="<f8").reshape(-1)
        m2 = np.asarray(m2, dtype="<f8").reshape(-1)
        if mean.shape != (P,) or m2.shape != (P,):
            raise SchemaError(
                f"{self._where(step, split)}: mean/m2 shapes {mean.shape}/{m2.shape}, "
                f"expected ({P},)"
            )
        count = float(count)
        if not count >= 0:
            raise SchemaError(f"{self._where(step, split)}: count {count} must be >= 0")
        st = self._record_state(step, split, KIND_MOMENTS)
        start, stop = self._append("moments/count", np.array([count]))
        self._append("moments/mean", mean[None, :])
        self._append("moments/m2", m2[None, :])
        seg = np.zeros(1, SEGMENT_DTYPE)
        seg[0] = (step, split.encode(), KIND_MOMENTS, start, stop)
        self._append("segments", seg)
        st["n"] += int(round(count))
        if lr is not None:
            st["lr"] = float(lr)
        if epoch is not None:
            st["epoch"] = float(epoch)

    def end_record(self, step: int, split: str) -> None:
        """Complete record ``(step, split)``: flush its data, then write the completion marker."""
        self._check_open()
        key = (int(step), split)
        st = self._open.pop(key, None)
        if st is None:
            if key in self._done:
                return
            raise StoreError(f"{self._where(step, split)} has no data to complete")
        # Data first, marker last: a kill between the two leaves an incomplete record.
        self._f.flush()
        rec = np.zeros(1, RECORD_DTYPE)
        rec[0] = (key[0], split.encode(), st["kind"], st["n"], st["lr"], st["epoch"])
        self._append("records", rec)
        self._f.flush()
        self._done.add(key)

    def abort_record(self, step: int, split: str) -> None:
        """Leave record ``(step, split)`` incomplete: no completion marker is written.

        Its rows stay in the file but every reader skips it (and ``info`` lists it), as if
        the writer had been killed. Use it when producing the record failed half-way.
        """
        self._check_open()
        self._open.pop((int(step), split), None)
        self._f.flush()

    @contextlib.contextmanager
    def record(
        self, step: int, split: str, *, lr: float | None = None, epoch: float | None = None
    ) -> Iterator[_RecordHandle]:
        """Context manager writing one record batch by batch; completes it on exit."""
        st = self._record_state(int(step), split, KIND_GRADIENTS)
        if lr is not None:
            st["lr"] = float(lr)
        if epoch is not None:
            st["epoch"] = float(epoch)
        handle = _RecordHandle(self, int(step), split)
        yield handle
        if (int(step), split) in self._open:
            self.end_record(step, split)

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
        row = np.zeros(1, TRAJECTORY_DTYPE)
        row[0] = (int(step), float(lr), float(epoch), float(train_loss), float(test_loss))
        self._append("trajectory", row)

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
        row = np.zeros(1, PROBE_DTYPE)
        row[0] = (int(step), int(n), float(lr), int(k), float(train_before), float(train_after),
                  float(test_before), float(test_after))
        self._append("probes", row)

    def flush(self) -> None:
        """Make everything written so far durable (completed records survive a kill)."""
        self._check_open()
        self._f.flush()

    def close(self) -> None:
        """Complete every open record and close the file."""
        if self._closed:
            return
        try:
            for step, split in list(self._open):
                self.end_record(step, split)
            self._f.flush()
        finally:
            self._f.close()
            self._closed = True
            if self._direct is not None:
                self._direct.close()

    def __enter__(self) -> GradientWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DirectChunks:
    """Write whole chunks of the uncompressed ``grads`` dataset with ``os.pwritev``.

    Why: h5py holds the GIL for the whole of a dataset write (hundreds of MB per batch for
    a large model), so a background writer thread stalls a framework that dispatches its
    work from Python. ``pwritev`` releases the GIL. The dataset is created with early
    allocation and no fill (``H5D_ALLOC_TIME_EARLY``, ``H5D_FILL_TIME_NEVER``): growing it
    gives every new chunk its file space at once, without writing anything. HDF5 reports
    each chunk's byte offset, and the chunk's bytes (row-major, ``rows x cols`` of the
    chunk shape; an edge chunk is stored at full size, its columns beyond ``P`` unused) are
    written there. HDF5 never caches or rewrites these chunks: only chunk rows that no
    earlier write touched are written this way, and the writer never reads ``grads``.

    With ``direct_io``, chunks whose memory and file offsets are 4096-byte aligned (rows
    from :meth:`GradientWriter.alloc_rows`) are written with ``O_DIRECT``: no page-cache
    copy, so the writer thread costs almost no CPU. Anything else, or a file system that
    refuses ``O_DIRECT``, is written through the page cache.

    Crash safety is unchanged: the bytes reach the file before ``end_record`` flushes and
    writes the completion marker, and a file written this way is an ordinary HDF5 file for
    every reader.
    """

    ALIGN = 4096

    def __init__(self, fd: int, owned: bool, dfd: int | None = None) -> None:
        self._fd, self._owned, self._dfd = fd, owned, dfd
        self._iov_max = 1024
        with contextlib.suppress(ValueError, OSError, AttributeError):
            self._iov_max = max(16, min(int(os.sysconf("SC_IOV_MAX")), 1 << 16))
        self._zeros: memoryview | None = None
        self.bytes_direct = 0  # written with O_DIRECT (for tests and benchmarks)
        self.direct_after = 0  # bytes through the page cache before O_DIRECT is used
        self.direct_error = ""  # why O_DIRECT was given up, if it was
        self.bytes_buffered = 0

    @classmethod
    def open(cls, f: h5py.File, path: Path, direct_io: bool = False) -> _DirectChunks | None:
        """The direct writer of ``f["grads"]``, or ``None`` when the dataset does not qualify."""
        ds = f["grads"]
        plist = ds.id.get_create_plist()
        if (
            not hasattr(os, "pwritev")
            or plist.get_nfilters() != 0
            or plist.get_alloc_time() != h5py.h5d.ALLOC_TIME_EARLY
            or plist.get_fill_time() != h5py.h5d.FILL_TIME_NEVER
            or f.driver != "sec2"
        ):
            return None
        dfd = None
        if direct_io and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # e.g. a file system without O_DIRECT
                dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        try:
            return cls(int(f.id.get_vfd_handle()), owned=False, dfd=dfd)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        try:
            return cls(os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), owned=True,
                       dfd=dfd)
        except OSError:
            if dfd is not None:
                os.close(dfd)
            return None

    def close(self) -> None:
        """Close the file descriptors this object opened."""
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None
        self._fd = -1

    def _pad(self, nbytes: int) -> memoryview:
        if self._zeros is None or len(self._zeros) < nbytes:
            self._zeros = memoryview(bytes(nbytes))
        return self._zeros[:nbytes]

    def _layout(self, body: np.ndarray, chunks: tuple[int, int]) -> tuple[Any, ...]:
        rc, cc = chunks
        n, P = body.shape
        item = body.dtype.itemsize
        n_ccols = -(-P // cc)
        raw, start, stride, padded = _row_bytes_view(body, n_ccols * cc * item)
        contiguous_chunk = n_ccols == 1 and stride == P * item  # a chunk is one memory run
        A = self.ALIGN
        alignable = (rc * cc * item) % A == 0 and (
            contiguous_chunk or (cc * item) % A == 0)
        aligned = alignable and (raw.ctypes.data + start) % A == 0 and (
            contiguous_chunk or (padded and stride % A == 0))
        return raw, start, stride, padded, contiguous_chunk, alignable, aligned

    def wants_staging(self, body: np.ndarray, chunks: tuple[int, int]) -> bool:
        """Whether ``O_DIRECT`` is on and only a copy of ``body`` could use it."""
        if self._dfd is None or self.bytes_direct + self.bytes_buffered < self.direct_after:
            return False
        *_, alignable, aligned = self._layout(body, chunks)
        return alignable and not aligned

    def write_rows(self, ds: h5py.Dataset, r0: int, body: np.ndarray) -> None:
        """Write ``body`` ``(n, P)`` (store dtype, rows contiguous) as rows ``r0..`` of grads.

        ``r0`` and ``n`` are multiples of the chunk rows, and these chunks are allocated
        (the dataset was resized) but were never written. When the memory after each row
        of ``body`` belongs to the same buffer up to a whole number of chunks (a padded row
        stride, as from :meth:`GradientWriter.alloc_rows`), edge chunks are written from it
        as they are; otherwise zeros fill the columns beyond ``P``.
        """
        rc, cc = ds.chunks
        n, P = body.shape
        item = body.dtype.itemsize
        chunk_bytes = rc * cc * item
        n_ccols = -(-P // cc)
        raw, start, stride, padded, contiguous_chunk, _, aligned = self._layout(body, (rc, cc))
        mv = memoryview(raw)
        A = self.ALIGN
        w_full = cc * item
        for r in range(0, n, rc):
            for c in range(n_ccols):
                info = ds.id.get_chunk_info_by_coord((r0 + r, c * cc))
                off = info.byte_offset
                if off is None or info.size != chunk_bytes or info.filter_mask:
                    raise StoreError(
                        f"{ds.file.filename}: grads chunk at row {r0 + r}, column {c * cc} is "
                        f"not allocated as an uncompressed {chunk_bytes}-byte chunk ({info})"
                    )
                base = start + r * stride + c * w_full
                if contiguous_chunk:
                    bufs = [mv[base : base + rc * stride]]
                else:
                    w = min(cc, P - c * cc) * item
                    pad = None
                    if padded:
                        w = w_full
                    elif w < w_full:
                        pad = self._pad(w_full - w)
                    bufs = []
                    for i in range(rc):
                        s = base + i * stride
                        bufs.append(mv[s : s + w])
                        if pad is not None:
                            bufs.append(pad)
                dfd = self._dfd  # None once O_DIRECT was refused
                if self.bytes_direct + self.bytes_buffered < self.direct_after:
                    dfd = None
                if aligned and dfd is not None and off % A == 0 and self._pwritev_all(
                    dfd, bufs, off
                ):
                    self.bytes_direct += chunk_bytes
                    continue
                self._pwritev_all(self._fd, bufs, off)
                self.bytes_buffered += chunk_bytes

    def _pwritev_all(self, fd: int | None, bufs: list[memoryview], off: int) -> bool:
        """Write ``bufs`` back to back at ``off``; ``False`` if ``O_DIRECT`` was refused."""
        done = 0
        for i in range(0, len(bufs), self._iov_max):
            group = bufs[i : i + self._iov_max]
            want = sum(len(b) for b in group)
            try:
                got = os.pwritev(fd, group, off + done)
            except OSError as e:
                if fd == self._dfd and fd is not None and done == 0:
                    # O_DIRECT refused by this file system (EINVAL for alignment, ...): stop
                    # trying; the caller rewrites the chunk through the page cache, and a
                    # genuine I/O error shows up there
                    os.close(fd)
                    self._dfd = None
                    self.direct_error = f"{errno.errorcode.get(e.errno, e.errno)}: {e}"
                    return False
                raise StoreError(f"cannot write gradient chunk at byte {off + done}: {e}") from e
            if got != want:  # a short write: finish it through the page cache
                rest = b"".join(bytes(b) for b in group)[got:]
                while rest:
                    k = os.pwrite(self._fd, rest, off + done + got)
                    if k <= 0:
                        raise StoreError(f"cannot write gradient chunk at byte {off + done}")
                    got += k
                    rest = rest[k:]
            done += want
        return True


def _row_bytes_view(a: np.ndarray, padded_row_bytes: int) -> tuple[np.ndarray, int, int, bool]:
    """Bytes under the rows of ``a`` ``(n, P)`` (rows contiguous, any row stride).

    Returns ``(raw, start, stride, padded)``: a 1-D ``uint8`` array over the memory, the byte
    offset of row 0 in it, the row stride in bytes, and whether every row is followed by
    memory of the same buffer up to ``padded_row_bytes`` (so it may be written as is).
    """
    n, P = a.shape
    item = a.dtype.itemsize
    if a.flags.c_contiguous:
        raw = a.reshape(-1).view(np.uint8)
        stride = P * item
        return raw, 0, stride, padded_row_bytes == stride
    b = a
    while isinstance(b.base, np.ndarray):
        b = b.base
    stride = a.strides[0]
    if b is not a and b.flags.c_contiguous:
        braw = b.reshape(-1).view(np.uint8)
        start = a.ctypes.data - braw.ctypes.data
        end = start + (n - 1) * stride + padded_row_bytes
        if 0 <= start and stride >= padded_row_bytes and end <= braw.nbytes:
            return braw, start, stride, True
        last = start + (n - 1) * stride + P * item
        if 0 <= start and last <= braw.nbytes:
            return braw, start, stride, False
    c = np.ascontiguousarray(a)
    return c.reshape(-1).view(np.uint8), 0, P * item, padded_row_bytes == P * item


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------

_ALLOWED_ROOT = {"grads", "loss", "sample_id", "label", "moments", *_TABLES}
_NEWER_HINT = "upgrade gsnr-stats to read it"


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, not a store file")
    try:
        ok = h5py.is_hdf5(path)
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e})") from e
    if not ok:
        raise StoreError(f"{path}: not an HDF5 file (no HDF5 signature)")
    _check_superblock_eof(path)
    last: Exception | None = None
    for swmr in (False, True):
        try:
            # A writer killed in SWMR mode leaves the superblock marked "open for write";
            # a SWMR read open accepts that and sees the last flushed, consistent state.
            return h5py.File(path, "r", swmr=swmr, locking=False)
        except OSError as e:
            last = e
    raise StoreError(f"{path}: HDF5 file cannot be opened, corrupt or truncated? ({last})")


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_superblock_eof(path: Path) -> None:
    """Refuse a file shorter than its superblock's end-of-file address (truncated).

    Why: HDF5 may loop for ever reading structures that point past the end of a truncated
    file, so the size is checked before HDF5 parses anything. Only superblock versions 2
    and 3 (what our writer produces) are parsed; older ones are left to HDF5.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        base = 0
        while base + 48 <= size:
            fh.seek(base)
            head = fh.read(48)
            if head[:8] == _SIGNATURE:
                break
            base = 512 if base == 0 else base * 2
        else:
            return
    version, off_size = head[8], head[9]
    if version not in (2, 3) or off_size not in (4, 8):
        return
    pos = 12 + 2 * off_size
    eof = int.from_bytes(head[pos : pos + off_size], "little")
    if base + eof > size:
        raise StoreError(
            f"{path}: truncated file: {size} bytes on disk, the HDF5 superblock records "
            f"{base + eof} bytes"
        )


def _check_links(f: h5py.File, path: Path) -> None:
    """Refuse external links, soft links, virtual datasets and external raw storage."""

    def check_group(g: h5py.Group, prefix: str) -> None:
        for name in g:
            link = g.get(name, getlink=True)
            full = f"{prefix}/{name}"
            if isinstance(link, h5py.ExternalLink):
                raise SchemaError(
                    f"{path}: {full} is an external link to {link.filename}:{link.path}; "
                    "refused (stores must be self-contained)"
                )
            if isinstance(link, h5py.SoftLink):
                raise SchemaError(f"{path}: {full} is a soft link to {link.path}; refused")
            if not isinstance(link, h5py.HardLink):
                raise SchemaError(f"{path}: {full} is a user-defined link; refused")
            obj = g[name]
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    raise SchemaError(f"{path}: {full} is a virtual dataset; refused")
                if obj.external:
                    raise SchemaError(f"{path}: {full} stores its data in external files; refused")
            elif isinstance(obj, h5py.Group) and prefix == "" and name == "moments":
                check_group(obj, full)

    check_group(f, "")


def _attr_str(f: h5py.File, name: str, path: Path, required: bool = True) -> str:
    if name not in f.attrs:
        if required:
            raise SchemaError(f"{path}: root attribute {name!r} is missing")
        return ""
    v = f.attrs[name]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        raise SchemaError(f"{path}: root attribute {name!r} is not a string")
    return v


class GradientStore:
    """Read-only view of one store file (a shard), validated on open.

    Use :func:`open_store`. Completed records are listed in :attr:`records`; records whose
    completion marker is missing (writer killed, or still writing) are in
    :attr:`incomplete` and skipped by every reader with a warning.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._f = _open_h5(self.path)
        try:
            self._validate()
        except Exception:
            self._f.close()
            raise

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        f, path = self._f, self.path
        try:
            fmt = _attr_str(f, "format", path, required=False)
            if fmt != FORMAT_NAME:
                raise SchemaError(
                    f"{path}: not a gsnr-stats store (format attribute {fmt or 'missing'!r}); "
                    "a foreign HDF5 file?"
                )
            ver = f.attrs.get("format_version")
            if not isinstance(ver, int | np.integer):
                raise SchemaError(f"{path}: format_version {ver!r} is not an integer")
            if int(ver) > FORMAT_VERSION:
                raise SchemaError(
                    f"{path}: store format version {int(ver)} is newer than this gsnr-stats "
                    f"reads (version {FORMAT_VERSION}); {_NEWER_HINT}"
                )
            if int(ver) < 1:
                raise SchemaError(f"{path}: invalid format version {int(ver)}")
            _check_links(f, path)
            text = _attr_str(f, "layout", path)
            if len(text) > _MAX_LAYOUT_JSON:
                raise SchemaError(f"{path}: layout attribute is implausibly large")
            self.layout = Layout.from_json(text, str(path))
            stored_hash = _attr_str(f, "layout_hash", path)
            if stored_hash != self.layout.hash:
                raise SchemaError(f"{path}: layout_hash does not match the stored layout")
            P = self.layout.n_params
            self._check_ds("grads", 2, (np.dtype("<f4"), np.dtype("<f2")))
            if f["grads"].shape[1] != P:
                raise SchemaError(
                    f"{path}: grads has {f['grads'].shape[1]} columns, layout has {P} parameters"
                )
            rows = f["grads"].shape[0]
            for name, dt in (("loss", "<f8"), ("sample_id", "<i8"), ("label", "<f8")):
                self._check_ds(name, 1, (np.dtype(dt),))
                if f[name].shape[0] < rows:
                    raise SchemaError(
                        f"{path}: {name} has {f[name].shape[0]} rows, fewer than grads ({rows})"
                    )
            for name in ("moments/count", "moments/mean", "moments/m2"):
                self._check_ds(name, 1 if name.endswith("count") else 2, (np.dtype("<f8"),))
            mrows = f["moments/count"].shape[0]
            for name in ("moments/mean", "moments/m2"):
                if f[name].shape[1] != P or f[name].shape[0] < mrows:
                    raise SchemaError(f"{path}: {name} has shape {f[name].shape}, inconsistent")
            for name, dt in _TABLES.items():
                self._check_ds(name, 1, (dt,), compound=True)
            self._load_index(rows, mrows)
        except (SchemaError, StoreError):
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise StoreError(f"{path}: unreadable store ({type(e).__name__}: {e})") from e

    def _check_ds(
        self, name: str, ndim: int, dtypes: tuple[np.dtype, ...], compound: bool = False
    ) -> None:
        f, path = self._f, self.path
        if name not in f:
            raise SchemaError(f"{path}: dataset {name!r} is missing")
        ds = f[name]
        if not isinstance(ds, h5py.Dataset):
            raise SchemaError(f"{path}: {name!r} is not a dataset")
        if ds.ndim != ndim:
            raise SchemaError(f"{path}: dataset {name!r} has {ds.ndim} dims, expected {ndim}")
        if compound:
            want = dtypes[0]
            got = ds.dtype
            if got.names is None or any(
                n not in got.names or got[n].kind != want[n].kind for n in want.names
            ):
                raise SchemaError(
                    f"{path}: table {name!r} has fields {got.names}, expected {want.names}"
                )
        elif ds.dtype not in dtypes:
            raise SchemaError(
                f"{path}: dataset {name!r} has dtype {ds.dtype}, expected "
                f"{' or '.join(str(d) for d in dtypes)}"
            )

    def _load_index(self, rows: int, mrows: int) -> None:
        path = self.path
        segs = self._f["segments"][()]
        recs = self._f["records"][()]
        by_key: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
        for s in segs:
            split = _decode_split(s["split"], path)
            key = (int(s["step"]), split)
            start, stop, kind = int(s["start"]), int(s["stop"]), int(s["kind"])
            if kind not in KIND_NAMES:
                raise SchemaError(f"{path}: record (step={key[0]}, split={split!r}): bad kind {kind}")
            by_key.setdefault(key, []).append((kind, start, stop))
        self._segments: dict[tuple[int, str], list[tuple[int, int]]] = {}
        self.records: list[RecordInfo] = []
        done: set[tuple[int, str]] = set()
        for r in recs:
            split = _decode_split(r["split"], path)
            key = (int(r["step"]), split)
            where = f"{path}: record (step={key[0]}, split={split!r})"
            if key in done:
                raise SchemaError(f"{where} is completed twice")
            done.add(key)
            kind = int(r["kind"])
            if kind not in KIND_NAMES:
                raise SchemaError(f"{where}: bad kind {kind}")
            segl = by_key.get(key, [])
            limit = rows if kind == KIND_GRADIENTS else mrows
            total = 0
            ranges = []
            for skind, start, stop in segl:
                if skind != kind:
                    raise SchemaError(f"{where}: mixes gradient and moments segments")
                if not (0 <= start <= stop <= limit):
                    raise SchemaError(
                        f"{where}: segment rows [{start}, {stop}) outside the stored "
                        f"{limit} rows (truncated file?)"
                    )
                ranges.append((start, stop))
                total += stop - start
            n = int(r["n_samples"])
            if kind == KIND_GRADIENTS and total != n:
                raise SchemaError(f"{where}: segments hold {total} samples, record says {n}")
            self._segments[key] = ranges
            self.records.append(
                RecordInfo(key[0], split, KIND_NAMES[kind], n, float(r["lr"]), float(r["epoch"]))
            )
        self.incomplete: list[RecordInfo] = []
        for key, segl in by_key.items():
            if key not in done:
                kind = segl[0][0]
                n = sum(b - a for _, a, b in segl) if kind == KIND_GRADIENTS else 0
                self.incomplete.append(RecordInfo(key[0], key[1], KIND_NAMES[kind], n))
        self.records.sort(key=lambda r: (r.step, r.split))
        if self.incomplete:
            names = ", ".join(f"(step={r.step}, split={r.split!r})" for r in self.incomplete)
            warnings.warn(
                f"{path}: skipping {len(self.incomplete)} incomplete record(s) {names} "
                "(writer killed or still writing)",
                IncompleteRecordWarning,
                stacklevel=4,
            )

    # -- public ----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes; ``user_attrs`` parsed from JSON."""
        out: dict[str, Any] = {}
        for k in ("format", "library_version", "framework", "framework_version", "created_at",
                  "run_id", "layout_hash"):
            out[k] = _attr_str(self._f, k, self.path, required=False)
        out["format_version"] = int(self._f.attrs["format_version"])
        try:
            out["user_attrs"] = json.loads(_attr_str(self._f, "user_attrs", self.path, False) or "{}")
        except ValueError as e:
            raise SchemaError(f"{self.path}: user_attrs is not valid JSON ({e})") from e
        return out

    @property
    def steps(self) -> list[int]:
        """Sorted steps with at least one completed record."""
        return sorted({r.step for r in self.records})

    @property
    def splits(self) -> list[str]:
        """Splits with at least one completed record, in order of first appearance."""
        return list(dict.fromkeys(r.split for r in self.records))

    @property
    def grads_dataset(self) -> h5py.Dataset:
        """The underlying ``grads`` dataset (for the reduce engine)."""
        return self._f["grads"]

    def record(self, step: int, split: str) -> RecordInfo:
        """The completed record ``(step, split)``; :class:`StoreError` if absent."""
        for r in self.records:
            if r.step == int(step) and r.split == split:
                return r
        extra = ""
        if any(r.step == int(step) and r.split == split for r in self.incomplete):
            extra = " (it is incomplete: the writer never finished it)"
        raise StoreError(f"{self.path}: no record (step={step}, split={split!r}){extra}")

    def row_ranges(self, step: int, split: str) -> list[tuple[int, int]]:
        """Row ranges of record ``(step, split)`` in ``grads`` (or in ``moments/*``)."""
        self.record(step, split)
        return list(self._segments[(int(step), split)])

    def _read_rows(self, name: str, step: int, split: str) -> np.ndarray:
        rec = self.record(step, split)
        if rec.kind != "gradients" and name != "moments":
            raise StoreError(
                f"{self.path}: record (step={step}, split={split!r}) holds moments only; "
                f"per-sample {name} was not stored"
            )
        parts = []
        try:
            ds = self._f[name]
            for a, b in self._segments[(int(step), split)]:
                parts.append(ds[a:b])
        except (OSError, ValueError) as e:
            raise StoreError(
                f"{self.path}: record (step={step}, split={split!r}): cannot read {name} ({e})"
            ) from e
        if not parts:
            shape = (0,) + ds.shape[1:]
            return np.empty(shape, ds.dtype)
        return np.concatenate(parts, axis=0)

    def iter_grads(self, step: int, split: str, rows: int = 4096) -> Iterator[np.ndarray]:
        """Per-sample gradients of a record in blocks of at most ``rows`` rows (stored dtype).

        Streams: memory is O(rows · P) whatever the record's size.
        """
        rec = self.record(step, split)
        if rec.kind != "gradients":
            raise StoreError(
                f"{self.path}: record (step={step}, split={split!r}) holds moments only; "
                f"per-sample grads were not stored"
            )
        rows = max(1, int(rows))
        ds = self._f["grads"]
        for a, b in self._segments[(int(step), split)]:
            for i in range(a, b, rows):
                try:
                    block = ds[i:min(i + rows, b)]
                except (OSError, ValueError) as e:
                    raise StoreError(
                        f"{self.path}: record (step={step}, split={split!r}): cannot read grads "
                        f"rows {i}..{min(i + rows, b)} ({e})"
                    ) from e
                yield block

    def read_grads(self, step: int, split: str) -> np.ndarray:
        """Per-sample gradients of a record, ``(n, P)`` in the stored dtype (float32)."""
        return self._read_rows("grads", step, split)

    def read_loss(self, step: int, split: str) -> np.ndarray:
        """Per-sample losses of a record, ``(n,)`` float64 (NaN where not written)."""
        return self._read_rows("loss", step, split)

    def read_sample_id(self, step: int, split: str) -> np.ndarray:
        """Sample ids of a record, ``(n,)`` int64."""
        return self._read_rows("sample_id", step, split)

    def read_label(self, step: int, split: str) -> np.ndarray:
        """Labels of a record, ``(n,)`` float64 (NaN where not written)."""
        return self._read_rows("label", step, split)

    def read_moments(self, step: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Blocks ``(count (K,), mean (K, P), m2 (K, P))`` of a moments-only record."""
        rec = self.record(step, split)
        if rec.kind != "moments":
            raise StoreError(
                f"{self.path}: record (step={step}, split={split!r}) holds per-sample gradients"
            )
        cs, ms, m2s = [], [], []
        for a, b in self._segments[(int(step), split)]:
            cs.append(self._f["moments/count"][a:b])
            ms.append(self._f["moments/mean"][a:b])
            m2s.append(self._f["moments/m2"][a:b])
        P = self.layout.n_params
        if not cs:
            return np.zeros(0), np.zeros((0, P)), np.zeros((0, P))
        return np.concatenate(cs), np.concatenate(ms), np.concatenate(m2s)

    def _table(self, name: str) -> dict[str, np.ndarray]:
        t = self._f[name][()]
        order = np.argsort(t["step"], kind="stable")
        return {k: np.asarray(t[k][order]) for k in t.dtype.names}

    def trajectory(self) -> dict[str, np.ndarray]:
        """Loss trajectory rows sorted by step: step, lr, epoch, train_loss, test_loss."""
        return self._table("trajectory")

    def probes(self) -> dict[str, np.ndarray]:
        """OSGR probe rows: step, n, lr, k, train_before, train_after, test_before, test_after."""
        return self._table("probes")

    def file_size(self) -> int:
        """Size of the file in bytes."""
        return self.path.stat().st_size

    def close(self) -> None:
        """Close the HDF5 handle."""
        self._f.close()

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.path)!r}, P={self.layout.n_params}, "
            f"records={len(self.records)}, incomplete={len(self.incomplete)})"
        )


class IncompleteRecordWarning(UserWarning):
    """A store holds records whose writer never completed them; they are skipped."""


_SPLIT_RE = re.compile(r"^[^\x00]+$")


def _decode_split(raw: bytes, path: Path) -> str:
    try:
        s = bytes(raw).rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: split name {raw!r} is not UTF-8") from e
    if not _SPLIT_RE.match(s):
        raise SchemaError(f"{path}: empty split name in the record index")
    return s


def open_store(path: str | os.PathLike[str]) -> GradientStore:
    """Open and validate one store file.

    Raises
    ------
    StoreError
        Missing, unreadable, truncated or non-HDF5 file.
    SchemaError
        A foreign HDF5 file, a newer format version, missing or mistyped datasets, links
        or virtual datasets outside the schema, inconsistent record index.
    """
    return GradientStore(path)


def expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand a path, a glob pattern or a list of them into a sorted list of files."""
    import glob

    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[Path] = []
    for it in items:
        s = os.fspath(it)
        if any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise StoreError(f"{s}: glob pattern matches no file")
            out.extend(Path(h) for h in hits)
        else:
            out.append(Path(s))
    if not out:
        raise StoreError("no store file given")
    return out


def check_same_layout(stores: Sequence[GradientStore]) -> Layout:
    """The common layout of several shards; :class:`LayoutMismatchError` naming both files."""
    first = stores[0]
    for s in stores[1:]:
        if s.layout.hash != first.layout.hash:
            raise LayoutMismatchError(
                f"parameter layouts differ: {first.path} ({first.layout.n_params} params, "
                f"hash {first.layout.hash[:12]}) vs {s.path} ({s.layout.n_params} params, "
                f"hash {s.layout.hash[:12]}); shards of one run must share a layout"
            )
    return first.layout
