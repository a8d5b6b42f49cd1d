"""Read-only views of one record's gradient chunk rows: where the bytes are, and nothing else.

The reduce engine consumes a record as a sequence of :class:`ChunkRows`, each the rows
``[lo, hi)`` of one chunk row over a column range. Uncompressed little-endian float32
chunks are *mapped*: the view carries the whole file as a read-only float32 array (one
``mmap``) plus the element offset of each chunk, so a kernel reads the page cache with no
copy. Compressed, float16 or odd-sized chunks are *copied*: the view carries the rows read
through h5py, the next copied stripe read on a helper thread while the consumer works on
the current one (h5py and the kernels release the GIL).

Everything about byte offsets lives here: the chunk index is scanned once per open store
and validated against the file size (a chunk past the end is a truncated copy), the size
is checked again before each mapped chunk row is handed out (a file truncated while it is
read would otherwise be a SIGBUS), and the pages of a consumed row are released
(``MADV_DONTNEED``) so peak RSS does not grow with N.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SchemaError, StoreError

if TYPE_CHECKING:
    from .reader import GradientStore, RecordInfo, Segment

#: Offset markers in the chunk index: a chunk never written, a chunk that cannot be mapped.
ABSENT, UNMAPPABLE = -1, -2


@dataclass
class ChunkRows:
    """Rows ``[lo, hi)`` of chunk row ``chunk_row`` of a record, over the view's columns.

    Exactly one of ``offsets`` (mapped) and ``array`` (copied) is set.

    Attributes
    ----------
    segment : int
        Index of the record segment (one ``write`` call) row ``lo`` belongs to.
    record_pos : int
        Position of row ``lo`` within the record (0 = its first sample).
    check_pos : int
        Element position of ``(lo, c0)`` within the segment, for its data checksum
        (``docs/format.md``: element ``k`` of a segment is row ``k // P``, column ``k % P``).
    offsets : ndarray or None
        Element offset in :attr:`RecordView.buf` of each column chunk of this chunk row.
    array : ndarray or None
        ``(hi - lo, c1 - c0)`` rows in the stored dtype, read through HDF5.
    row_seg, row_pos : (hi - lo,) int64 ndarray or None
        Segment index and checksum position (as ``check_pos``) of each row: a piece may
        span several consecutive segments (:meth:`RecordView.plan` coalesces them).
    """

    segment: int
    chunk_row: int
    lo: int
    hi: int
    record_pos: int
    check_pos: int
    offsets: np.ndarray | None = None
    array: np.ndarray | None = None
    row_seg: np.ndarray | None = None
    row_pos: np.ndarray | None = None

    @property
    def mapped(self) -> bool:
        """Whether the rows are read in place from the file's mapping."""
        return self.offsets is not None


def chunk_index(
    store: GradientStore,
    n_rows: int,
    n_cols: int,
    mappable: bool,
    only: tuple[Sequence[int], tuple[int, int]] | None = None,
) -> np.ndarray:
    """Element offsets of the ``grads`` chunks (:data:`ABSENT`, :data:`UNMAPPABLE`), validated.

    One scan of the chunk index per open store (cached on it): a reduce over R records
    would otherwise visit every chunk of the file R times. ``only=(chunk_rows, (cc0, cc1))``
    looks up just those chunks (a Dask task opens its own handle and needs a few of them).
    """
    ds = store._f["grads"]
    key = (ds.shape, ds.chunks)
    cached = store._chunk_index
    if only is None and cached is not None and cached[0] == key:
        return cached[1]
    rows_c, cols_c = ds.chunks
    itemsize = ds.dtype.itemsize
    offsets = np.full((n_rows, n_cols), ABSENT, dtype=np.int64)
    if mappable and ds.shape[0]:
        size = store.file_size()
        want = rows_c * cols_c * itemsize
        path = store.path

        def visit(info: object) -> None:
            r0, c0 = info.chunk_offset  # type: ignore[attr-defined]
            r, c = r0 // rows_c, c0 // cols_c
            if r >= n_rows or c >= n_cols:
                return
            off, nbytes = info.byte_offset, info.size  # type: ignore[attr-defined]
            if off is None or off + nbytes > size:
                raise SchemaError(
                    f"{path}: gradient chunk at rows {r0}.. columns {c0}.. lies beyond the end "
                    f"of the file ({size} bytes): truncated file"
                )
            if nbytes != want or off % itemsize:
                offsets[r, c] = UNMAPPABLE  # read through h5py
            else:
                offsets[r, c] = off // itemsize

        try:
            if only is None:
                ds.id.chunk_iter(visit)
            else:
                crows, (cc0, cc1) = only
                for r in crows:
                    for c in range(cc0, min(cc1, n_cols)):
                        info = ds.id.get_chunk_info_by_coord((r * rows_c, c * cols_c))
                        if info.byte_offset is not None:  # None: never written
                            visit(info)
        except SchemaError:
            raise
        except Exception as e:  # noqa: BLE001 - any HDF5 failure here means a damaged index
            raise StoreError(f"{path}: cannot read the chunk index of grads ({e})") from e
    if only is not None:
        return offsets  # partial: not cached
    offsets.setflags(write=False)
    store._chunk_index = (key, offsets)
    return offsets


class RecordView:
    """One record of one shard, over columns ``[c0, c1)``: its metadata and chunk-row views.

    Made by :meth:`GradientStore.view`; a context manager (it holds a mapping of the file
    and a descriptor). Iterating yields :class:`ChunkRows` in record order, cut at chunk-row
    boundaries (and, with :meth:`iter_rows`, at record positions such as jackknife block
    bounds, so no piece straddles one). A mapped view is valid until the next one is requested: its pages are
    released then.
    """

    def __init__(self, store: GradientStore, step: int, split: str,
                 cols: tuple[int, int] | None = None) -> None:
        self.store = store
        self.path = store.path
        self.step, self.split = int(step), split
        self.info: RecordInfo = store.record(step, split)
        self.segments: list[Segment] = store.segments(step, split)
        self.layout = store.layout
        P = store.n_plain  # format 4: a view spans the plain columns only
        self.c0, self.c1 = cols if cols is not None else (0, P)
        self.checksummed = bool(self.segments) and self.segments[0].sum1 is not None
        self.buf: np.ndarray | None = None
        self.ubuf: np.ndarray | None = None
        self._mm: mmap.mmap | None = None
        self._fh = None
        if self.info.kind != "gradients":
            self.chunk_shape = (1, max(1, P))
            return
        ds = store._f["grads"]
        self._ds = ds
        self.dtype = ds.dtype
        self.chunk_shape = (int(ds.chunks[0]), int(ds.chunks[1]))
        rc, cc = self.chunk_shape
        if self.c0 % cc:
            raise ValueError(f"column start {self.c0} is not a multiple of the chunk width {cc}")
        self._cc0, self._cc1 = self.c0 // cc, -(-self.c1 // cc)
        self.offsets, mappable = _chunk_offsets(store, cols, self.segments)
        if mappable and store.grads_rows:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept for the size checks
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            raw = np.frombuffer(self._mm, dtype=np.uint8)
            self.buf = raw[: (raw.shape[0] // 4) * 4].view(np.float32)
            self.ubuf = self.buf.view(np.uint32)

    # -- per-sample values beside the gradients ---------------------------------------------

    def loss(self) -> np.ndarray:
        """Per-sample losses, ``(n,)`` float64 (verified)."""
        return self.store.read_loss(self.step, self.split)

    def sample_id(self) -> np.ndarray:
        """Sample ids, ``(n,)`` int64 (verified)."""
        return self.store.read_sample_id(self.step, self.split)

    def meta(self) -> dict[str, Any]:
        """The record's JSON metadata (see :meth:`GradientStore.record_meta`; ``{}`` if none)."""
        return self.store.record_meta(self.step, self.split)

    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored moment blocks of a moments-only record (see :meth:`GradientStore.read_moments`)."""
        return self.store.read_moments(self.step, self.split)

    def column(self, col: int) -> np.ndarray:
        """All values of flat parameter ``col`` in the record, ``(n,)`` (for error reports)."""
        where = self.store._where(self.step, self.split)
        parts = [self.store._read("grads", np.s_[a:b, col], where) for a, b in
                 ((s.start, s.stop) for s in self.segments)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    # -- chunk rows -------------------------------------------------------------------------

    def plan(self, cuts: Sequence[int] = ()) -> list[ChunkRows]:
        """The chunk-row pieces of the record in order, cut at record positions ``cuts``.

        Consecutive segments (``write`` calls) stored in adjacent rows of one chunk row are
        coalesced into one piece, so the number of pieces grows with the rows read, not with
        the number of writes; :attr:`ChunkRows.row_seg` and :attr:`ChunkRows.row_pos` keep
        each row's segment and checksum position so every segment is still verified.
        No data attached: :meth:`iter_rows` attaches it one piece at a time.
        """
        rc = self.chunk_shape[0]
        P = self.store.n_plain
        segs = self.segments
        if not segs:
            return []
        start = np.array([s.start for s in segs], dtype=np.int64)
        length = np.array([s.stop - s.start for s in segs], dtype=np.int64)
        n = int(length.sum())
        if n == 0:
            return []
        seg = np.repeat(np.arange(len(segs), dtype=np.int64), length)
        first = np.cumsum(length) - length  # record position of each segment's first row
        within = np.arange(n, dtype=np.int64) - first[seg]
        row = start[seg] + within  # dataset row of each record position
        brk = np.zeros(n, dtype=bool)
        brk[0] = True
        brk[1:] = (row[1:] != row[:-1] + 1) | (row[1:] % rc == 0)
        c = np.array(sorted({int(x) for x in cuts if 0 < int(x) < n}), dtype=np.int64)
        brk[c] = True
        a = np.flatnonzero(brk)
        b = np.append(a[1:], n)
        pos = within * P + self.c0
        out: list[ChunkRows] = []
        for lo_p, hi_p in zip(a.tolist(), b.tolist(), strict=True):
            crow = int(row[lo_p]) // rc
            lo = int(row[lo_p]) - crow * rc
            out.append(ChunkRows(int(seg[lo_p]), crow, lo, lo + hi_p - lo_p, lo_p,
                                 int(pos[lo_p]), row_seg=seg[lo_p:hi_p],
                                 row_pos=pos[lo_p:hi_p]))
        return out

    def _mappable(self, item: ChunkRows) -> bool:
        if self.buf is None:
            return False
        offs = self.offsets[item.chunk_row, self._cc0:self._cc1]
        if (offs == ABSENT).any():
            raise SchemaError(
                f"{self.path}: record (step={self.step}, split={self.split!r}): gradient chunk "
                f"row {item.chunk_row} is missing from the file (damaged store)"
            )
        return bool((offs >= 0).all())

    def _copy(self, item: ChunkRows) -> np.ndarray:
        rc = self.chunk_shape[0]
        a, b = item.chunk_row * rc + item.lo, item.chunk_row * rc + item.hi
        try:
            return self._ds[a:b, self.c0:self.c1]
        except Exception as e:  # noqa: BLE001 - any h5py failure: damaged file
            raise StoreError(
                f"{self.path}: record (step={self.step}, split={self.split!r}): cannot read "
                f"gradient rows {a}..{b} ({type(e).__name__}: {e}); file damaged or truncated?"
            ) from e

    def _guard(self, offsets: np.ndarray) -> None:
        """Refuse to hand out mapped chunks that the file no longer holds (no SIGBUS)."""
        rc, cc = self.chunk_shape
        end = (int(offsets.max()) + rc * cc) * 4
        size = os.fstat(self._fh.fileno()).st_size  # type: ignore[union-attr]
        if end > size:
            raise StoreError(
                f"{self.path}: the file shrank to {size} bytes while it was being read "
                f"(gradient chunk ends at byte {end}): truncated or replaced during the reduce"
            )

    def _release(self, offsets: np.ndarray) -> None:
        """Drop the mapped pages of consumed chunks from this process (they stay cached)."""
        rc, cc = self.chunk_shape
        nbytes = rc * cc * 4
        page = mmap.PAGESIZE
        # one madvise per run of chunks lying back to back in the file (a chunk row usually
        # is one run): a system call per chunk cost ~25 ms of a 1 GiB reduce
        starts = np.sort(np.asarray(offsets, dtype=np.int64)) * 4
        if starts.size == 0:
            return
        breaks = np.flatnonzero(starts[1:] > starts[:-1] + nbytes) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, starts.size], strict=True):
            a = (int(starts[lo]) // page) * page
            self._mm.madvise(mmap.MADV_DONTNEED, a, int(starts[hi - 1]) + nbytes - a)  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[ChunkRows]:
        return self.iter_rows()

    def iter_rows(self, cuts: Sequence[int] = ()) -> Iterator[ChunkRows]:
        """Yield the record's pieces (:meth:`plan`) with their data: mapped or copied.

        A mapped piece's pages are released when the next piece is requested; a copied
        piece's array is dropped then (the next one was read meanwhile).
        """
        if self.info.kind != "gradients":
            raise StoreError(f"{self.path}: record (step={self.step}, split={self.split!r}) "
                             "holds moments only; per-sample gradients were not stored")
        work = self.plan(cuts)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            pending: concurrent.futures.Future[np.ndarray] | None = None
            for i, item in enumerate(work):
                if self._mappable(item):
                    offs = self.offsets[item.chunk_row, self._cc0:self._cc1]
                    self._guard(offs)
                    item.offsets = offs
                    yield item
                    self._release(offs)
                else:
                    item.array = pending.result() if pending is not None else self._copy(item)
                    pending = None
                    if i + 1 < len(work) and not self._mappable(work[i + 1]):
                        pending = pool.submit(self._copy, work[i + 1])
                    yield item
                    item.array = None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Unmap the file and close its descriptor.

        Without this every record reduced left an open file and a mapping of the whole file
        behind until garbage collection; a shard replaced meanwhile stayed mapped.
        """
        self.buf = self.ubuf = None  # drop the exported views first, or mmap.close refuses
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive elsewhere: GC closes it
                self._mm.close()
            self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RecordView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunk_offsets(store: GradientStore, cols: tuple[int, int] | None,
                   segments: Sequence[Segment] | None) -> tuple[np.ndarray, bool]:
    """The chunk index a view needs (all of it, or for one column block just its chunks),
    and whether the chunks can be mapped (uncompressed little-endian float32)."""
    ds = store._f["grads"]
    rc, cc = ds.chunks
    # only rows that completed records cover: chunks past them are a writer's debris
    # (allocated, maybe never written), not a reason to refuse the file
    rows, P = store.grads_rows, ds.shape[1]
    n_rows, n_cols = -(-rows // rc), -(-P // cc)
    plist = ds.id.get_create_plist()
    mappable = ds.dtype == np.dtype("<f4") and plist.get_nfilters() == 0 and P > 0
    only = None
    if cols is not None and segments is not None:  # a Dask task: look up only its chunks
        c0, c1 = cols
        crows = sorted({r for s in segments for r in range(s.start // rc, -(-s.stop // rc))})
        only = (crows, (c0 // cc, -(-c1 // cc)))
    return chunk_index(store, n_rows, n_cols, mappable, only), mappable


def check_chunk_index(store: GradientStore) -> None:
    """Validate the whole chunk index of ``grads`` against the file size (see :func:`chunk_index`)."""
    _chunk_offsets(store, None, None)
