"""GradientStore: open, validate and read one store file (a shard); v1 and v2 schemas.

Readers trust nothing in a file: the superblock's end-of-file address is checked before
HDF5 parses anything, metadata reads of a file left open by a writer are retried a bounded
number of times (HDF5's default retry loop sleeps for minutes on one damaged checksum),
every table row's checksum is verified, completed records name the extents they cover so
that debris beyond them is ignored, data is verified against per-segment checksums when
read, and no read allocates more than what the file's size can back. Every failure becomes
:class:`StoreError` naming the file.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import SchemaError, StoreError
from . import _factored, _rows
from ._legacy import load_index_v1
from ._meta import decode_meta, decode_optimizer_step, meta_extents
from ._open import (
    _attr_str,
    _backed_rows,
    _check_links,
    _decode_split,
    _open_h5,
    _superblock,  # noqa: F401 - imported from here by tests
)
from ._records import IncompleteRecordWarning, RecordInfo, Segment
from .layout import Layout
from .schema import (
    CRC_COL,
    FORMAT_NAME,
    KIND_GRADIENTS,
    KIND_MOMENTS,
    KIND_NAMES,
    MAX_FILTER_RATIO,
    READABLE_VERSIONS,
    TABLES,
    bytes_crc,
    data_checksum,
    tables,
)
from .views import RecordView, check_chunk_index

_MAX_LAYOUT_JSON = 64 << 20
_NEWER_HINT = "upgrade gsnr-stats to read it"


class GradientStore:
    """Read-only view of one store file (a shard), validated on open.

    Use :func:`open_store`. Completed records are listed in :attr:`records`; records whose
    completion marker is missing (writer killed, or still writing) are in
    :attr:`incomplete` and skipped by every reader with a warning. :attr:`debris` counts
    rows past the last completed record (left by a killed or failed writer), which readers
    ignore.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._chunk_index: tuple[object, np.ndarray] | None = None  # cache of views.chunk_index
        self._verified: set[tuple[tuple[int, str], int]] = set()  # segments read_grads_rows checked
        self._fverified: set[tuple[tuple[int, str], int]] = set()  # segments' factors checked
        self._f, self._left_open = _open_h5(self.path)
        try:
            self._validate()
        except (SchemaError, StoreError):
            self._f.close()
            raise
        except Exception as e:
            self._f.close()
            raise StoreError(f"{self.path}: unreadable store ({type(e).__name__}: {e})") from e

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        f, path = self._f, self.path
        fmt = _attr_str(f, "format", path, required=False)
        if fmt != FORMAT_NAME:
            raise SchemaError(
                f"{path}: not a gsnr-stats store (format attribute {fmt or 'missing'!r}); "
                "a foreign HDF5 file?"
            )
        ver = f.attrs.get("format_version")
        if not isinstance(ver, int | np.integer):
            raise SchemaError(f"{path}: format_version {ver!r} is not an integer")
        if int(ver) > max(READABLE_VERSIONS):
            raise SchemaError(
                f"{path}: store format version {int(ver)} is newer than this gsnr-stats "
                f"reads (version {max(READABLE_VERSIONS)}); {_NEWER_HINT}"
            )
        if int(ver) not in READABLE_VERSIONS:
            raise SchemaError(f"{path}: invalid format version {int(ver)}")
        self.version = int(ver)
        groups = {"moments"} | (set(TABLES) if self.version >= 2 else set()) | (
            {"factors"} if self.version >= 4 else set())
        objs = _check_links(f, path, groups)
        # A file its writer has open keeps growing: h5py caches a dataset's shape per object
        # in read-only mode, and SWMR extents of an open dataset are not reloaded, so reuse
        # the objects only of a closed file. A live one is looked up afresh after the record
        # table was read, which is what makes the rest cover what the records name.
        self._objs = None if self._left_open else objs
        del objs
        text = _attr_str(f, "layout", path)
        if len(text) > _MAX_LAYOUT_JSON:
            raise SchemaError(f"{path}: layout attribute is implausibly large")
        self.layout = Layout.from_json(text, str(path))
        stored_hash = _attr_str(f, "layout_hash", path)
        if stored_hash != self.layout.hash:
            raise SchemaError(f"{path}: layout_hash does not match the stored layout")
        P = self.layout.n_params
        _factored.load(self)  # factors, plain_index, n_plain (all of P before format 4)
        self._check_ds("grads", 2, (np.dtype("<f4"), np.dtype("<f2")))
        if self._obj("grads").shape[1] != self.n_plain:
            what = "plain columns (format 4)" if self.factors else "parameters"
            raise SchemaError(
                f"{path}: grads has {f['grads'].shape[1]} columns, layout has {self.n_plain} {what}"
            )
        for name, dt in (("loss", "<f8"), ("sample_id", "<i8"), ("label", "<f8")):
            self._check_ds(name, 1, (np.dtype(dt),))
        for name in ("moments/count", "moments/mean", "moments/m2"):
            self._check_ds(name, 1 if name.endswith("count") else 2, (np.dtype("<f8"),))
        if self.version >= 3:
            self._check_ds("record_meta", 1, (np.dtype("u1"),))
        for name in ("moments/mean", "moments/m2"):
            if self._obj(name).shape[1] != P:
                raise SchemaError(f"{path}: {name} has shape {self._obj(name).shape}, inconsistent")
        self.debris: dict[str, int] = {}
        if self.version == 1:
            load_index_v1(self)
        else:
            self._load_index_v2()
        self._check_backing()
        self.records.sort(key=lambda r: (r.step, r.split))
        self._by_key = {(r.step, r.split): r for r in self.records}
        if self.incomplete:
            names = ", ".join(f"(step={r.step}, split={r.split!r})" for r in self.incomplete)
            warnings.warn(
                f"{path}: skipping {len(self.incomplete)} incomplete record(s) {names} "
                "(writer killed, failed or still writing)",
                IncompleteRecordWarning,
                stacklevel=4,
            )

    def _obj(self, name: str) -> Any:
        """The object at ``name`` (None if absent), from the objects :func:`_check_links` saw."""
        objs = getattr(self, "_objs", None)
        if objs is not None and name in objs:
            return objs[name]
        return self._f.get(name)

    def _check_ds(
        self, name: str, ndim: int, dtypes: tuple[np.dtype, ...], compound: bool = False,
        trailing: tuple[int, ...] | None = None,
    ) -> h5py.Dataset:
        path = self.path
        ds = self._obj(name)
        if ds is None:
            raise SchemaError(f"{path}: dataset {name!r} is missing")
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
        if trailing is not None and tuple(ds.shape[1:]) != trailing:
            raise SchemaError(f"{path}: dataset {name!r} has shape {ds.shape}, expected (n, {trailing})")
        return ds

    def _read_table_v2(self, table: str) -> dict[str, np.ndarray]:
        """Valid rows of a v2 table: the prefix whose checksums match; the rest is debris."""
        path = self.path
        if not isinstance(self._obj(table), h5py.Group):
            raise SchemaError(f"{path}: dataset {table!r} is missing (a table group)")
        cols = (*tables(self.version)[table], (CRC_COL, np.dtype("<u8"), ()))
        dss = []
        for cname, dt, shape in cols:
            ds = self._check_ds(f"{table}/{cname}", 1 + len(shape), (dt,), trailing=shape)
            dss.append(ds)
        total = max(ds.shape[0] for ds in dss)
        n = min(ds.shape[0] for ds in dss)
        for ds, (_, dt, shape) in zip(dss, cols, strict=True):
            n = min(n, _backed_rows(ds, dt.itemsize * int(np.prod(shape, dtype=np.int64))))
        if self._left_open:
            self._check_table_chunks(table, dss, cols, n)
        data = {cname: ds[:n] for ds, (cname, _, _) in zip(dss, cols, strict=True)}
        rows = np.concatenate(
            [np.ascontiguousarray(data[c]).reshape(n, -1).view(np.uint8) for c, _, _ in cols[:-1]],
            axis=1,
        ) if n else np.zeros((0, 0), np.uint8)
        seed = zlib.crc32(table.encode())
        ok = np.array([(zlib.crc32(rows[i].tobytes(), seed) | (1 << 32)) == int(data[CRC_COL][i])
                       for i in range(n)], dtype=bool)
        good = int(np.argmin(ok)) if not ok.all() else n
        if ok[good:].any():
            bad = good
            raise SchemaError(
                f"{path}: table {table!r} row {bad} fails its checksum but later rows are "
                "valid: the file is damaged"
            )
        if (not self._left_open and table != "segments" and good < n
                and int(data[CRC_COL][good]) != 0):
            # A cleanly closed file has no torn row: a writer that failed mid-row never wrote
            # its checksum (the column stays 0, HDF5's fill value), and only a killed writer
            # leaves rows whose columns reached the file in any order. So a written checksum
            # that fails here is damage; skipping the row as debris would silently drop a
            # completed record (reported as merely "incomplete") or a trajectory/probe row.
            # (segments: the extents of the completed records decide, see _load_index_v2;
            # a segment of an incomplete record is debris either way.)
            raise SchemaError(
                f"{path}: table {table!r} row {good} fails its checksum in a cleanly closed "
                "file: the file is damaged"
            )
        if total > good:
            self.debris[table] = total - good
        return {c: v[:good] for c, v in data.items()}

    def _check_table_chunks(self, table: str, dss: list[h5py.Dataset], cols: Any, n: int) -> None:
        """Refuse table chunks lying past the end of a file left open by its writer.

        The superblock's end-of-file check cannot be made there (space is legitimately
        allocated ahead of the data), and HDF5 reads bytes past the end of a file as zeros:
        a truncated copy's table rows would read as never-written rows (checksum 0), i.e.
        as debris, and trajectory/probe rows would vanish silently. A table chunk is only
        put in the chunk index after its bytes were written (tables are allocated on
        write), so one ending past the file's size means the file was truncated.
        """
        size = self.path.stat().st_size
        for ds, (cname, _, shape) in zip(dss, cols, strict=True):
            if not ds.chunks:  # contiguous (not ours, but valid HDF5): one extent
                off = ds.id.get_offset()
                ends = [(0, off + ds.id.get_storage_size())] if off is not None and n else []
            else:
                ends = []
                for r in range(0, n, ds.chunks[0]):
                    info = ds.id.get_chunk_info_by_coord((r, *(0 for _ in shape)))
                    if info.byte_offset is not None:
                        ends.append((r, info.byte_offset + info.size))
            for r, end in ends:
                if end > size:
                    raise StoreError(
                        f"{self.path}: table {table!r} column {cname!r} rows {r}.. lie "
                        f"beyond the end of the file ({size} bytes): truncated file"
                    )

    def _load_index_v2(self) -> None:
        path = self.path
        # Records first: everything a record names was flushed before its row was written,
        # so whatever is read after it (a live writer keeps appending) covers it.
        recs = self._read_table_v2("records")
        segs = self._read_table_v2("segments")
        self.trajectory_rows = self._read_table_v2("trajectory")
        self.probe_rows = self._read_table_v2("probes")
        nseg = len(segs["step"])
        seg_stop = int(recs["seg_stop"].max(initial=0))
        g_stop = int(recs["grads_stop"].max(initial=0))
        m_stop = int(recs["moments_stop"].max(initial=0))
        if seg_stop > nseg:
            raise SchemaError(
                f"{path}: completed records cover {seg_stop} segment rows, only {nseg} are "
                "valid: the file is damaged"
            )
        for name, stop in (("grads", g_stop), ("loss", g_stop), ("sample_id", g_stop),
                           ("label", g_stop), ("moments/count", m_stop),
                           ("moments/mean", m_stop), ("moments/m2", m_stop),
                           *((n, g_stop) for n in self._factor_ds)):
            ds = self._obj(name)
            if ds.shape[0] < stop and self._left_open:
                # SWMR: HDF5's metadata cache can hold an object header read before the
                # record table (the validation's first look): reload it before judging
                ds.refresh()
            if ds.shape[0] < stop:
                raise SchemaError(
                    f"{path}: completed records cover {stop} rows of {name}, the file holds "
                    f"{self._obj(name).shape[0]} (truncated or damaged file)"
                )
        self._grads_stop, self._moments_stop = g_stop, m_stop
        if self._obj("grads").shape[0] > g_stop:
            self.debris["grads rows"] = self._obj("grads").shape[0] - g_stop
        keys = [(int(s), _decode_split(sp, path)) for s, sp in zip(segs["step"], segs["split"],
                                                                      strict=True)]
        self._segments: dict[tuple[int, str], list[Segment]] = {}
        self.records: list[RecordInfo] = []
        done: dict[tuple[int, str], int] = {}
        for i in range(len(recs["step"])):
            split = _decode_split(recs["split"][i], path)
            key = (int(recs["step"][i]), split)
            where = f"{path}: record (step={key[0]}, split={split!r})"
            if key in done:
                raise SchemaError(f"{where} is completed twice")
            kind = int(recs["kind"][i])
            if kind not in KIND_NAMES:
                raise SchemaError(f"{where}: bad kind {kind}")
            stop_seg = int(recs["seg_stop"][i])
            limit = int(recs["grads_stop"][i] if kind == KIND_GRADIENTS else recs["moments_stop"][i])
            if stop_seg < 0 or limit < 0:
                raise SchemaError(f"{where}: negative extents in the record row")
            done[key] = stop_seg
            segl: list[Segment] = []
            total = 0
            for j in range(stop_seg):
                if keys[j] != key:
                    continue
                if int(segs["kind"][j]) != kind:
                    raise SchemaError(f"{where}: mixes gradient and moments segments")
                a, b = int(segs["start"][j]), int(segs["stop"][j])
                if not (0 <= a <= b <= limit):
                    raise SchemaError(
                        f"{where}: segment rows [{a}, {b}) outside the {limit} rows the record "
                        "covers (damaged file)"
                    )
                segl.append(Segment(a, b, int(segs["sum1"][j]), int(segs["sum2"][j]),
                                    int(segs["aux_crc"][j])))
                total += b - a
            n = int(recs["n_samples"][i])
            if kind == KIND_GRADIENTS and total != n:
                raise SchemaError(f"{where}: segments hold {total} samples, record says {n}")
            if not segl:
                raise SchemaError(f"{where}: completed record has no segment")
            self._segments[key] = segl
            ostep = (decode_optimizer_step(recs["optimizer_step"][i], where)
                     if self.version >= 3 else None)
            self.records.append(RecordInfo(key[0], split, KIND_NAMES[kind], n,
                                           float(recs["lr"][i]), float(recs["epoch"][i]), ostep))
        self._meta: dict[tuple[int, str], tuple[int, int, int]] = {}
        if self.version >= 3:
            n_meta = self._obj("record_meta").shape[0]
            self._meta = meta_extents(recs, [(r.step, r.split) for r in self.records], n_meta,
                                      path)
            meta_stop = int(recs["meta_stop"].max(initial=0))
            if n_meta > meta_stop:
                self.debris["record_meta bytes"] = n_meta - meta_stop
        # no two segments of completed records may share rows of the same dataset
        kind_of = {(r.step, r.split): (KIND_GRADIENTS if r.kind == "gradients" else KIND_MOMENTS)
                   for r in self.records}
        for kind in (KIND_GRADIENTS, KIND_MOMENTS):
            spans = sorted((s.start, s.stop, k) for k, sl in self._segments.items()
                           for s in sl if kind_of[k] == kind and s.stop > s.start)
            for (_a0, b0, k0), (a1, _b1, k1) in zip(spans, spans[1:], strict=False):
                if a1 < b0:
                    raise SchemaError(
                        f"{path}: records (step={k0[0]}, split={k0[1]!r}) and (step={k1[0]}, "
                        f"split={k1[1]!r}) claim the same {KIND_NAMES[kind]} rows "
                        f"[{a1}, {min(b0, _b1)}): damaged file"
                    )
        self.incomplete: list[RecordInfo] = []
        seen: dict[tuple[int, str], list[int]] = {}
        for j, key in enumerate(keys):
            if key in done and j < done[key]:
                continue
            seen.setdefault(key, []).append(j)
        for key, js in seen.items():
            if key in done:
                continue
            kind = int(segs["kind"][js[0]])
            n = sum(int(segs["stop"][j]) - int(segs["start"][j]) for j in js) \
                if kind == KIND_GRADIENTS else 0
            self.incomplete.append(RecordInfo(key[0], key[1], KIND_NAMES.get(kind, "?"), n))

    def _check_backing(self) -> None:
        """Refuse a file that claims more data than its size can hold (a memory bomb)."""
        path = self.path
        P = self.layout.n_params
        # Every completed record was flushed before its completion row, so in v2 its data is
        # stored, whole chunks: no slack. A slack of a chunk row is a memory bomb when rows
        # are huge (a crafted layout of 2**33 parameters claiming one unstored row had
        # reduce allocate 64 GiB). v1 bounds the whole dataset, a writer's unstored rows too.
        slack = self.version == 1
        size = path.stat().st_size
        if self.factors:
            _factored.check_backing(self, size, slack)
        if self.records and P * 2 > size * MAX_FILTER_RATIO:
            # Any record holding data stores at least P float16 values at the best filter
            # ratio; a smaller file can only hold empty records, and their O(P) reduce
            # output (gigabytes for a crafted layout) would be all NaN.
            raise SchemaError(
                f"{path}: layout claims {P} parameters, more than the file's {size} bytes "
                "could hold one gradient row of (a crafted file?)"
            )
        g = self._obj("grads")
        Pp = self.n_plain
        if self._grads_stop and Pp and self._grads_stop > _backed_rows(g, Pp * g.dtype.itemsize,
                                                                       slack):
            raise SchemaError(
                f"{path}: records claim {self._grads_stop} gradient rows of {P} parameters, "
                f"more than the {g.id.get_storage_size()} stored bytes can hold"
            )
        if self._grads_stop and g.chunks:
            n_chunks = -(-self._grads_stop // g.chunks[0]) * -(-Pp // g.chunks[1])
            if n_chunks > max(1, size):
                raise SchemaError(f"{path}: grads chunk shape {g.chunks} implies more chunks "
                                  "than the file has bytes")
        for name in ("moments/mean", "moments/m2"):
            ds = self._obj(name)
            if self._moments_stop and self._moments_stop > _backed_rows(ds, P * 8, slack):
                raise SchemaError(
                    f"{path}: records claim {self._moments_stop} moment rows of {P} "
                    f"parameters, more than {name}'s stored bytes can hold"
                )

    # -- reading helpers -------------------------------------------------------------------

    def _read(self, name: str, sel: Any, where: str) -> np.ndarray:
        try:
            return self._obj(name)[sel]
        except Exception as e:  # noqa: BLE001 - any h5py failure here is a damaged file
            raise StoreError(f"{where}: cannot read {name} ({type(e).__name__}: {e}); file "
                             "damaged or truncated?") from e

    def _where(self, step: int, split: str) -> str:
        return f"{self.path}: record (step={step}, split={split!r})"

    def _damaged(self, where: str, what: str, seg: Segment) -> StoreError:
        return StoreError(
            f"{where}: {what} of rows [{seg.start}, {seg.stop}) fail their checksum: the file "
            "is damaged (these bytes changed after they were written)"
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
        """The underlying ``grads`` dataset (kept for old callers; use :meth:`view`)."""
        return self._obj("grads")

    @property
    def grads_dtype(self) -> np.dtype:
        """Stored dtype of the per-sample gradients (float32 or float16)."""
        return self._obj("grads").dtype

    @property
    def grads_chunks(self) -> tuple[int, int]:
        """Chunk shape ``(rows, columns)`` of the per-sample gradients."""
        c = self._obj("grads").chunks
        return (int(c[0]), int(c[1])) if c else (1, max(1, self.layout.n_params))

    @property
    def grads_compression(self) -> str | None:
        """Compression filter of the per-sample gradients (``None``: uncompressed)."""
        return self._obj("grads").compression

    def view(self, step: int, split: str, *, cols: tuple[int, int] | None = None) -> RecordView:
        """Read-only chunk-row views of record ``(step, split)`` over columns ``cols``.

        The one door through which the reduce engine reads a record: see
        :class:`gsnr_stats.store.views.RecordView` (chunk rows mapped where uncompressed,
        copied where compressed; loss, sample ids, moments). Use it as a context manager.
        """
        return RecordView(self, step, split, cols)

    def check_chunks(self) -> None:
        """Validate the chunk index of the gradients against the file size.

        Raises
        ------
        SchemaError
            A gradient chunk points beyond the end of the file (truncated copy).
        StoreError
            The chunk index cannot be read.
        """
        check_chunk_index(self)

    @property
    def grads_rows(self) -> int:
        """Rows of ``grads`` covered by completed records; rows past them are debris."""
        return int(self._grads_stop)

    @property
    def checksummed(self) -> bool:
        """Whether data carries checksums (schema version 2)."""
        return self.version >= 2

    def has(self, step: int, split: str) -> bool:
        """Whether the completed record ``(step, split)`` is in this shard."""
        return (int(step), split) in self._by_key

    def record(self, step: int, split: str) -> RecordInfo:
        """The completed record ``(step, split)``; :class:`StoreError` if absent."""
        r = self._by_key.get((int(step), split))
        if r is not None:
            return r
        extra = ""
        if any(r.step == int(step) and r.split == split for r in self.incomplete):
            extra = " (it is incomplete: the writer never finished it)"
        raise StoreError(f"{self.path}: no record (step={step}, split={split!r}){extra}")

    def record_meta(self, step: int, split: str) -> dict[str, Any]:
        """The JSON metadata object of record ``(step, split)``; ``{}`` if it has none.

        Format 3 stores write it with the record (``GradientWriter.write(..., meta=)``):
        e.g. ``{"optimizer": {"class": "SGD", "groups": [...]}, "framework": ...}``.

        Raises
        ------
        StoreError
            No such completed record, or its metadata bytes fail their checksum.
        SchemaError
            The bytes are not UTF-8 JSON of an object (or nested deeper than 32 levels).
        """
        self.record(step, split)
        ext = self._meta.get((int(step), split)) if self.version >= 3 else None
        if ext is None or ext[0] == ext[1]:
            return {}
        where = self._where(step, split)
        raw = self._read("record_meta", slice(ext[0], ext[1]), where)
        return decode_meta(np.ascontiguousarray(raw, np.uint8).tobytes(), ext[2], where)

    def row_ranges(self, step: int, split: str) -> list[tuple[int, int]]:
        """Row ranges of record ``(step, split)`` in ``grads`` (or in ``moments/*``)."""
        self.record(step, split)
        return [(s.start, s.stop) for s in self._segments[(int(step), split)]]

    def segments(self, step: int, split: str) -> list[Segment]:
        """Segments of record ``(step, split)`` with their checksums (``None`` in v1)."""
        self.record(step, split)
        return list(self._segments[(int(step), split)])

    def _aux(self, step: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rec = self.record(step, split)
        where = self._where(step, split)
        if rec.kind != "gradients":
            raise StoreError(f"{where} holds moments only; per-sample values were not stored")
        out: list[list[np.ndarray]] = [[], [], []]
        for seg in self._segments[(int(step), split)]:
            vals = [self._read(n, slice(seg.start, seg.stop), where)
                    for n in ("loss", "sample_id", "label")]
            # format 4: the CRC covers the factors' bytes too (_factored.raw_rows)
            fac = _factored.raw_rows(self, seg.start, seg.stop, where) if self.factors else []
            if seg.aux_crc is not None and bytes_crc(*vals, *fac) != seg.aux_crc:
                raise self._damaged(where, "loss/sample_id/label" + "/factors" * bool(fac), seg)
            for o, v in zip(out, vals, strict=True):
                o.append(v)
        return tuple(np.concatenate(o) if o else np.zeros(0, d)  # type: ignore[return-value]
                     for o, d in zip(out, ("<f8", "<i8", "<f8"), strict=True))

    @property
    def factored(self) -> bool:
        """Whether the store holds factored tensors (format 4; :attr:`factors`)."""
        return bool(self.factors)

    def describe_factors(self) -> list[str]:
        """Lines for ``gsnr-stats info``: factored tensors and bytes saved (``[]``: none)."""
        return _factored.summary_lines(self)

    def read_factors(self, step: int, split: str, start: int = 0, stop: int | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Factors of rows ``[start, stop)`` of a record (format 4), verified.

        Returns ``weight -> (A (m, rows, in), Δ (m, rows, out))`` in the stored dtype; the
        sample's gradient of ``weight`` is ``Σ_t Δ[i, t] A[i, t]ᵀ`` (zero rows pad).
        """
        return _factored.read_factors(self, step, split, start, stop)

    def read_plain_rows(self, step: int, split: str, start: int = 0,
                        stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the plain columns ``(m, P_plain)`` (:attr:`plain_index`)."""
        stop = self.record(step, split).n_samples if stop is None else stop
        return _rows.read_rows(self, step, split, start, stop, None, True)

    def iter_grads(self, step: int, split: str, rows: int = 4096) -> Iterator[np.ndarray]:
        """Per-sample gradients of a record in blocks of at most ``rows`` rows (stored dtype).

        Streams: memory is O(rows · P) whatever the record's size. Each segment's checksum is
        verified before its last block is handed out, so a consumer never finishes on
        damaged data. Factored stores yield materialised rows (:func:`_factored.materialize`).
        """
        rec = self.record(step, split)
        where = self._where(step, split)
        if rec.kind != "gradients":
            raise StoreError(f"{where} holds moments only; per-sample grads were not stored")
        rows = max(1, int(rows))
        if self.factors:
            yield from _factored.iter_grads(self, step, split, rows)
            return
        P = self.layout.n_params
        for seg in self._segments[(int(step), split)]:
            s1 = s2 = 0
            for i in range(seg.start, seg.stop, rows):
                j = min(i + rows, seg.stop)
                block = self._read("grads", np.s_[i:j], where)
                if seg.sum1 is not None:
                    a, b = data_checksum(block, (i - seg.start) * P, P)
                    s1, s2 = (s1 + a) & 0xFFFFFFFFFFFFFFFF, (s2 + b) & 0xFFFFFFFFFFFFFFFF
                    if j == seg.stop and (s1, s2) != (seg.sum1, seg.sum2):
                        raise self._damaged(where, "gradients", seg)
                yield block

    def read_grads_rows(self, step: int, split: str, start: int, stop: int,
                        cols: tuple[int, int] | None = None, *, verify: bool = True) -> np.ndarray:
        """Rows ``[start, stop)`` of a record's gradients over columns ``cols = (c0, c1)``.

        Positions count within the record (0: its first sample); stored dtype. With
        ``verify``, the first read touching a segment reads it whole (in bounded row blocks)
        and checks its checksum, once per open store; ``verify=False`` reads only the block.
        """
        if self.factors:  # materialised (m, c1 - c0) rows of a format 4 store
            return _factored.read_rows(self, step, split, start, stop, cols, verify)
        return _rows.read_rows(self, step, split, start, stop, cols, verify)

    def read_grads(self, step: int, split: str) -> np.ndarray:
        """Per-sample gradients of a record, ``(n, P)`` in the stored dtype (float32)."""
        parts = list(self.iter_grads(step, split, rows=1 << 30))
        if not parts:
            return np.empty((0, self.layout.n_params), _factored.out_dtype(self))
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def read_loss(self, step: int, split: str) -> np.ndarray:
        """Per-sample losses of a record, ``(n,)`` float64 (NaN where not written)."""
        return self._aux(step, split)[0]

    def read_sample_id(self, step: int, split: str) -> np.ndarray:
        """Sample ids of a record, ``(n,)`` int64."""
        return self._aux(step, split)[1]

    def read_label(self, step: int, split: str) -> np.ndarray:
        """Labels of a record, ``(n,)`` float64 (NaN where not written)."""
        return self._aux(step, split)[2]

    def read_moments(self, step: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Blocks ``(count (K,), mean (K, P), m2 (K, P))`` of a moments-only record.

        Counts must be finite and non-negative and M2 non-negative, else :class:`SchemaError`.
        """
        rec = self.record(step, split)
        where = self._where(step, split)
        if rec.kind != "moments":
            raise StoreError(f"{where} holds per-sample gradients")
        cs, ms, m2s = [], [], []
        for seg in self._segments[(int(step), split)]:
            c = self._read("moments/count", slice(seg.start, seg.stop), where)
            m = self._read("moments/mean", np.s_[seg.start:seg.stop], where)
            q = self._read("moments/m2", np.s_[seg.start:seg.stop], where)
            if seg.aux_crc is not None and bytes_crc(c, m, q) != seg.aux_crc:
                raise self._damaged(where, "moments", seg)
            cs.append(c)
            ms.append(m)
            m2s.append(q)
        P = self.layout.n_params
        if not cs:
            return np.zeros(0), np.zeros((0, P)), np.zeros((0, P))
        count, mean, m2 = np.concatenate(cs), np.concatenate(ms), np.concatenate(m2s)
        if not np.all(np.isfinite(count) & (count >= 0)):
            raise SchemaError(f"{where}: stored moment counts {count[~(count >= 0)][:3]} are "
                              "not finite non-negative numbers")
        with np.errstate(invalid="ignore"):
            neg = m2 < 0
        if neg.any():
            col = int(np.flatnonzero(neg.any(axis=0))[0])
            raise SchemaError(f"{where}: stored M2 < 0 (a negative variance) for parameter flat "
                              f"index {col}")
        return count, mean, m2

    def _table(self, rows: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        order = np.argsort(rows["step"], kind="stable")
        return {k: np.asarray(rows[k][order]) for k in names}

    def trajectory(self) -> dict[str, np.ndarray]:
        """Loss trajectory rows sorted by step: step, lr, epoch, train_loss, test_loss."""
        return self._table(self.trajectory_rows, [c for c, _, _ in TABLES["trajectory"]])

    def probes(self) -> dict[str, np.ndarray]:
        """OSGR probe rows: step, n, lr, k, train_before, train_after, test_before, test_after."""
        return self._table(self.probe_rows, [c for c, _, _ in TABLES["probes"]])

    def file_size(self) -> int:
        """Size of the file in bytes."""
        return self.path.stat().st_size

    def close(self) -> None:
        """Close the HDF5 handle."""
        with contextlib.suppress(Exception):
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
    """Expand a path, a glob pattern or a list of them into a list of files.

    A ``pathlib.Path`` and a string naming an existing file are taken literally, even when
    they contain ``[``, ``*`` or ``?``; only other strings with those characters are globs
    (sorted matches).
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[Path] = []
    for it in items:
        s = os.fspath(it)
        if isinstance(it, str) and any(ch in s for ch in "*?[") and not os.path.lexists(s):
            hits = sorted(_glob.glob(s))
            if not hits:
                raise StoreError(f"{s}: glob pattern matches no file")
            out.extend(Path(h) for h in hits)
        else:
            out.append(Path(s))
    if not out:
        raise StoreError("no store file given")
    return out
