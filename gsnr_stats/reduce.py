"""Stream stored per-sample gradients through the kernels and build the labelled Dataset.

Uncompressed float32 stores are read by mapping their chunks straight from the file
(``DatasetID.chunk_iter`` → byte offsets → one ``np.memmap``), offsets and sizes validated
against the file size, so the kernel reads the page cache with no copy. Compressed,
float16 or unaligned chunks go through h5py in row stripes, the next stripe read while the
kernel (which releases the GIL) works on the current one. Memory is O(P) plus a few chunk
rows, whatever N.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import mmap
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import xarray as xr

from . import kernels
from .errors import LayoutMismatchError, NonFiniteError, SchemaError, StoreError
from .store import GradientStore, Layout, check_same_layout, expand_paths, open_store
from .store.schema import data_checksum

_STRIPE_BYTES = 32 << 20


@dataclass
class Partial:
    """Partial moments of one record over a column range, per jackknife block.

    ``count``, ``mean``, ``m2`` have shape ``(K, w)``; ``n_omit`` ``(w,)`` counts values
    dropped by ``nonfinite="omit"``; ``loss`` is ``(count, mean, m2)`` of the per-sample loss.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    n_omit: np.ndarray
    n_samples: int
    loss: tuple[float, float, float]
    lr: float
    epoch: float
    # Data checksums still to verify, per shard: (sums over the columns seen, expected sums,
    # number of columns seen). Set when a task covered only a column block (Dask); verified
    # once the blocks of a shard add up to all P columns (:meth:`verify`).
    checks: dict[str, tuple[np.ndarray, np.ndarray, int, str]] | None = None

    def verify(self, n_params: int) -> None:
        """Raise :class:`StoreError` if a shard's data failed its checksums."""
        for where, (got, want, width, what) in (self.checks or {}).items():
            if width == n_params:
                bad = np.flatnonzero((got != want).any(axis=1))
                if bad.size:
                    raise StoreError(f"{where}: gradients of {what[int(bad[0])]} fail their "
                                     "checksum: the file is damaged")

    def merge(self, other: Partial) -> Partial:
        """Chan merge with the same record from another shard (blocks merged pairwise)."""
        c, m, q = kernels.merge_moments(
            (self.count, self.mean, self.m2), (other.count, other.mean, other.m2)
        )
        lc, lm, lq = kernels.merge_moments(self.loss, other.loss)
        return Partial(
            c, m, q, self.n_omit + other.n_omit, self.n_samples + other.n_samples,
            (float(lc), float(lm), float(lq)),
            self.lr if not math.isnan(self.lr) else other.lr,
            self.epoch if not math.isnan(self.epoch) else other.epoch,
            {**(self.checks or {}), **(other.checks or {})} or None,
        )

    def total(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Moments over all blocks."""
        acc = (self.count[0], self.mean[0], self.m2[0])
        for b in range(1, self.count.shape[0]):
            acc = kernels.merge_moments(acc, (self.count[b], self.mean[b], self.m2[b]))
        return acc


@contextlib.contextmanager
def numba_threads(n: int | None) -> Iterator[None]:
    """Run the kernels with ``n`` threads (``None``: Numba's default)."""
    if n is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _chunk_offsets(
    store: GradientStore,
    n_rows: int,
    n_cols: int,
    mappable: bool,
    only: tuple[Sequence[int], tuple[int, int]] | None = None,
) -> np.ndarray:
    """Element offsets of the ``grads`` chunks (-1 absent, -2 unmappable), validated.

    One scan of the chunk index per open store (cached on it): a reduce over R records
    would otherwise visit every chunk of the file R times. ``only=(chunk_rows, (cc0, cc1))``
    looks up just those chunks (a Dask task opens its own handle and needs a few of them).
    """
    ds = store.grads_dataset
    key = (ds.shape, ds.chunks)
    cached = getattr(store, "_gs_chunk_offsets", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    rows_c, cols_c = ds.chunks
    itemsize = ds.dtype.itemsize
    offsets = np.full((n_rows, n_cols), -1, dtype=np.int64)
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
                offsets[r, c] = -2  # unmappable: read through h5py
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
    store._gs_chunk_offsets = (key, offsets)  # type: ignore[attr-defined]
    return offsets


class _ChunkMap:
    """Byte offsets of the stored chunks of ``grads``, validated against the file."""

    def __init__(self, store: GradientStore,
                 only: tuple[Sequence[int], tuple[int, int]] | None = None) -> None:
        ds = store.grads_dataset
        self.rows_c, self.cols_c = ds.chunks
        self.itemsize = ds.dtype.itemsize
        # only rows that completed records cover: chunks past them are a writer's debris
        # (allocated, maybe never written), not a reason to refuse the file
        rows, P = store.grads_rows, ds.shape[1]
        self.n_rows = -(-rows // self.rows_c)
        self.n_cols = -(-P // self.cols_c)
        self.buf: np.ndarray | None = None
        self._mm: mmap.mmap | None = None
        plist = ds.id.get_create_plist()
        self.mappable = ds.dtype == np.dtype("<f4") and plist.get_nfilters() == 0
        self.offsets = _chunk_offsets(store, self.n_rows, self.n_cols, self.mappable, only)
        if not self.mappable or rows == 0:
            return
        path = store.path
        self._fh = open(path, "rb")  # noqa: SIM115 - kept for the size checks of guard()
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(self._mm, dtype=np.uint8)
        self.buf = raw[: (raw.shape[0] // 4) * 4].view(np.float32)
        self.ubuf = self.buf.view(np.uint32)
        self.path = path

    def guard(self, offsets: np.ndarray) -> None:
        """Refuse to touch mapped chunks that the file no longer holds.

        A file truncated after it was validated (re-copied while a reduce runs) would make
        the kernel's next read of the mapping a SIGBUS that kills the interpreter; checking
        the size before each chunk row leaves only a window of microseconds.
        """
        end = (int(offsets.max()) + self.rows_c * self.cols_c) * self.itemsize
        size = os.fstat(self._fh.fileno()).st_size
        if end > size:
            raise StoreError(
                f"{self.path}: the file shrank to {size} bytes while it was being read "
                f"(gradient chunk ends at byte {end}): truncated or replaced during the reduce"
            )

    def close(self) -> None:
        """Unmap the file and close its descriptor.

        Without this every record reduced (and every ``check_shard``) left an open file and
        a mapping of the whole file behind until garbage collection (``ResourceWarning:
        unclosed file``); a shard replaced meanwhile stayed mapped.
        """
        self.buf = self.ubuf = None  # drop the exported views first, or mmap.close refuses
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive elsewhere: GC closes it
                self._mm.close()
            self._mm = None
            self._fh.close()

    def release(self, offsets: np.ndarray) -> None:
        """Drop the mapped pages of processed chunks from this process.

        Mapped file pages count in RSS; dropping them after use keeps peak RSS independent
        of N (the data stays in the page cache).
        """
        nbytes = self.rows_c * self.cols_c * self.itemsize
        page = mmap.PAGESIZE
        for o in offsets:
            a = (int(o) * self.itemsize // page) * page
            b = int(o) * self.itemsize + nbytes
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)


def _nonfinite_error(
    store: GradientStore, step: int, split: str, ranges: list[tuple[int, int]], col: int
) -> NonFiniteError:
    ds = store.grads_dataset
    tensors = store.layout.names
    t = int(np.searchsorted(np.array(store.layout.offsets), col, side="right") - 1)
    local = col - store.layout.offsets[t]
    shape = store.layout.shapes[t]
    idx = np.unravel_index(local, shape) if shape else ()
    pname = f"{tensors[t]}[{', '.join(str(int(i)) for i in idx)}]"
    pos = 0
    sids = store.read_sample_id(step, split)
    for a, b in ranges:
        v = ds[a:b, col]
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            sid = int(sids[pos + int(bad[0])])
            kind = "NaN" if np.isnan(v[bad[0]]) else "Inf"
            return NonFiniteError(
                f"{store.path}: record (step={step}, split={split!r}): {kind} gradient for "
                f"parameter {pname} (flat index {col}) at sample {pos + int(bad[0])} "
                f"(sample_id {sid}); {int(np.sum(~np.isfinite(v)))} non-finite value(s) in this "
                "segment. Pass nonfinite='omit' to drop such samples per parameter."
            )
        pos += b - a
    return NonFiniteError(
        f"{store.path}: record (step={step}, split={split!r}): non-finite gradient for "
        f"parameter {pname} (flat index {col})"
    )


def _block_bounds(n: int, k: int) -> np.ndarray:
    return np.array([(b * n) // k for b in range(k + 1)], dtype=np.int64)


def record_partial(
    store: GradientStore,
    step: int,
    split: str,
    *,
    cols: tuple[int, int] | None = None,
    blocks: int = 1,
    nonfinite: str = "raise",
    progress: Callable[[int], None] | None = None,
) -> Partial:
    """Moments of record ``(step, split)`` of one shard over columns ``cols``.

    Parameters
    ----------
    store : GradientStore
        An open shard.
    step, split : int, str
        The record.
    cols : (int, int), optional
        Column range ``[c0, c1)``; ``c0`` must be a multiple of the chunk width. Default: all.
    blocks : int
        Number K of contiguous sample blocks whose moments are kept apart (jackknife).
    nonfinite : {"raise", "omit"}
        NaN/Inf policy.
    progress : callable, optional
        Called with the number of bytes processed.

    Returns
    -------
    Partial
    """
    if nonfinite not in ("raise", "omit"):
        raise ValueError(f"nonfinite must be 'raise' or 'omit', got {nonfinite!r}")
    rec = store.record(step, split)
    P = store.layout.n_params
    c0, c1 = cols if cols is not None else (0, P)
    K = max(1, int(blocks))
    w = c1 - c0
    count = np.zeros((K, w))
    mean = np.zeros((K, w))
    m2 = np.zeros((K, w))
    n_omit = np.zeros(w)
    ranges = store.row_ranges(step, split)
    loss = _loss_moments(store, step, split, rec.kind)
    if rec.kind == "moments":
        cnt, mu, q = store.read_moments(step, split)
        nb = cnt.shape[0]
        # Stored blocks are grouped into K jackknife blocks (fewer if fewer were stored).
        groups = _block_bounds(nb, K) if nb >= K else np.arange(nb + 1)
        for b in range(len(groups) - 1):
            acc = (np.zeros(w), np.zeros(w), np.zeros(w))
            for i in range(groups[b], groups[b + 1]):
                acc = kernels.merge_moments(
                    acc, (np.full(w, cnt[i]), mu[i, c0:c1], q[i, c0:c1])
                )
            count[b], mean[b], m2[b] = acc
        if nonfinite == "raise":
            bad = ~np.isfinite(mean) | ~np.isfinite(m2)
            bad &= count > 0
            if bad.any():
                col = c0 + int(np.flatnonzero(bad.any(axis=0))[0])
                raise NonFiniteError(
                    f"{store.path}: record (step={step}, split={split!r}): non-finite stored "
                    f"moments for parameter flat index {col}"
                )
        return Partial(count, np.where(count > 0, mean, np.nan), np.where(count > 0, m2, np.nan),
                       n_omit, rec.n_samples, loss, rec.lr, rec.epoch)

    ds = store.grads_dataset
    only = None
    if cols is not None:  # one column block (a Dask task): look up only its chunks
        rc, cc = ds.chunks
        crows = sorted({r for a, b in ranges for r in range(a // rc, -(-b // rc))})
        only = (crows, (c0 // cc, -(-c1 // cc)))
    cmap = _ChunkMap(store, only)
    rc, cc = cmap.rows_c, cmap.cols_c
    if c0 % cc and c0 != 0:
        raise ValueError(f"column start {c0} is not a multiple of the chunk width {cc}")
    cc0, cc1 = c0 // cc, -(-c1 // cc)
    omit = nonfinite == "omit"
    bad = np.zeros(w, dtype=np.int64)
    bounds = _block_bounds(rec.n_samples, K)
    itemsize = ds.dtype.itemsize

    segs = store.segments(step, split)
    checked = segs[0].sum1 is not None if segs else False
    sums = np.zeros((len(segs), 2), dtype=np.uint64)
    csums = np.zeros((max(1, cc1 - cc0), 2), dtype=np.uint64)
    seg_of: list[int] = []
    # Work list of (chunk row, row lo, row hi, block) in record order.
    work: list[tuple[int, int, int, int]] = []
    pos = 0
    for si, (a, b) in enumerate(ranges):
        r = a
        while r < b:
            crow = r // rc
            hi = min(b, (crow + 1) * rc)
            # cut at jackknife block boundaries
            p_lo = pos + (r - a)
            blk = int(np.searchsorted(bounds, p_lo, side="right") - 1)
            blk = min(blk, K - 1)
            hi = min(hi, a + int(bounds[blk + 1]) - pos) if blk + 1 < len(bounds) else hi
            hi = max(hi, r + 1)
            work.append((crow, r - crow * rc, hi - crow * rc, blk))
            seg_of.append(si)
            r = hi
        pos += b - a

    def read_stripe(item: tuple[int, int, int, int]) -> np.ndarray:
        crow, lo, hi, _ = item
        try:
            return ds[crow * rc + lo : crow * rc + hi, c0:c1]
        except Exception as e:  # noqa: BLE001 - any h5py failure: damaged file
            raise StoreError(
                f"{store.path}: record (step={step}, split={split!r}): cannot read gradient "
                f"rows {crow * rc + lo}..{crow * rc + hi} ({type(e).__name__}: {e}); file "
                "damaged or truncated?"
            ) from e

    def mappable(item: tuple[int, int, int, int]) -> bool:
        if cmap.buf is None:
            return False
        offs = cmap.offsets[item[0], cc0:cc1]
        if (offs == -1).any():
            raise SchemaError(
                f"{store.path}: record (step={step}, split={split!r}): gradient chunk row "
                f"{item[0]} is missing from the file (damaged store)"
            )
        return bool((offs >= 0).all())

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pending: concurrent.futures.Future[np.ndarray] | None = None
        for i, item in enumerate(work):
            crow, lo, hi, blk = item
            si = seg_of[i]
            pos0 = (crow * rc + lo - ranges[si][0]) * P + c0  # checksum position of (lo, c0)
            if mappable(item):
                offs = cmap.offsets[crow, cc0:cc1]
                cmap.guard(offs)
                kernels.moments_chunks(
                    cmap.buf, offs, rc, cc, w, lo, hi,
                    count[blk], mean[blk], m2[blk], omit, n_omit, bad,
                    cmap.ubuf, pos0, P, csums,
                )
                sums[si] += csums[: offs.shape[0]].sum(axis=0, dtype=np.uint64)
                cmap.release(offs)
            else:
                raw = pending.result() if pending is not None else read_stripe(item)
                pending = None
                # Prefetch the next unmappable stripe while the kernel runs on this one.
                if i + 1 < len(work) and not mappable(work[i + 1]):
                    pending = pool.submit(read_stripe, work[i + 1])
                if checked:
                    sums[si] += np.array(data_checksum(raw, pos0, P, parallel=True), dtype=np.uint64)
                x = np.ascontiguousarray(raw, dtype=np.float32)
                kernels.moments_block(x, cc, 0, count[blk], mean[blk], m2[blk], omit, n_omit,
                                      bad)
            if bad.any():
                raise _nonfinite_error(store, step, split, ranges, c0 + int(np.flatnonzero(bad)[0]))
            if progress is not None:
                progress((hi - lo) * w * itemsize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        cmap.close()
    with np.errstate(invalid="ignore"):
        mean = np.where(count > 0, mean, np.nan)
        m2 = np.where(count > 0, m2, np.nan)
    checks = None
    if checked:
        want = np.array([[sg.sum1, sg.sum2] for sg in segs], dtype=np.uint64)
        what = [f"record (step={step}, split={split!r}) rows [{a}, {b})" for a, b in ranges]
        checks = {str(store.path): (sums, want, w, what)}
    part = Partial(count, mean, m2, n_omit, rec.n_samples, loss, rec.lr, rec.epoch, checks)
    if w == P:
        part.verify(P)  # the whole record was read: fail now, not after other records
        part.checks = None
    return part


def _loss_moments(store: GradientStore, step: int, split: str, kind: str
                  ) -> tuple[float, float, float]:
    if kind != "gradients":
        return (0.0, math.nan, math.nan)
    v = store.read_loss(step, split)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, math.nan, math.nan)
    mu = float(v.mean())
    return (float(v.size), mu, float(((v - mu) ** 2).sum()))


def reduce(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    steps: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
    ddof: int = 1,
    nonfinite: str = "raise",
    blocks: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    scheduler: object | None = None,
    skip_bad: bool = False,
) -> xr.Dataset:
    """Per-parameter gradient moments and GSNR of every record, as a labelled Dataset.

    For parameter ``j`` of a record with N samples:

    .. math::

        m_j = \\frac1N \\sum_i g_{ij},\\quad
        s_j^2 = \\frac{1}{N - \\mathrm{ddof}} \\sum_i (g_{ij} - m_j)^2,\\quad
        r_j = \\frac{m_j^2}{s_j^2},\\quad \\hat r_j = r_j - \\frac1N .

    ``s²=0, m≠0`` gives ``r=+inf`` (counted in ``n_inf``), ``s²=0, m=0`` gives NaN (a dead
    parameter, counted in ``n_dead``); ``N ≤ ddof`` gives NaN variance.

    Parameters
    ----------
    paths : path, glob or list of them
        Store files; shards with the same layout merge record by record (Chan merge).
    steps, splits : sequence, optional
        Select records; default all.
    ddof : {1, 0}
        Delta degrees of freedom of the variance (0 matches cockpit/BackPACK).
    nonfinite : {"raise", "omit"}
        NaN/Inf gradients raise :class:`NonFiniteError` naming file, record, parameter and
        sample, or are dropped per parameter and counted in ``n_omitted``.
    blocks : int, optional
        Keep moments of K contiguous sample blocks (``block_count``, ``block_mean``,
        ``block_m2``) for jackknife confidence intervals.
    threads : int, optional
        Numba threads; results do not depend on it.
    progress : bool
        Show a progress bar (tqdm) over bytes.
    scheduler : None, "processes", dask Client, cluster or address, optional
        Run on Dask (see :func:`gsnr_stats.distributed.reduce_distributed`): ``"processes"``
        starts a temporary local cluster of ``os.cpu_count()`` single-threaded worker
        processes; a ``Client`` is used as is; a cluster object or an address such as
        ``"tcp://host:8786"`` is connected to. ``None`` reduces in-process.
    skip_bad : bool
        A shard that fails validation (:class:`StoreError`: unreadable, truncated, foreign or
        schema-violating file) raises by default; with ``skip_bad`` it is skipped with a
        :class:`SkippedShardWarning` naming the file and the reason. Layout mismatches between
        valid shards always raise.

    Returns
    -------
    xarray.Dataset
        Dims ``step``, ``split``, ``param`` (and ``block``); see ``docs/format.md``.
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if nonfinite not in ("raise", "omit"):
        raise ValueError(f"nonfinite must be 'raise' or 'omit', got {nonfinite!r}")
    files = expand_paths(paths)
    if scheduler is not None:
        from .distributed import reduce_distributed

        return reduce_distributed(
            files, steps=steps, splits=splits, ddof=ddof, nonfinite=nonfinite, blocks=blocks,
            scheduler=scheduler, progress=progress, skip_bad=skip_bad,
        )
    stores = open_shards(files, skip_bad=skip_bad)
    try:
        layout = check_same_layout(stores)
        keys = select_keys(stores, steps, splits)
        K = int(blocks) if blocks else 1
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(
                s.record(*k).n_samples * layout.n_params * s.grads_dataset.dtype.itemsize
                for k in keys for s in stores if _has(s, k)
            )
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="reduce")
        parts: dict[tuple[int, str], Partial] = {}
        with numba_threads(threads):
            for key in keys:
                for s in stores:
                    if not _has(s, key):
                        continue
                    p = record_partial(
                        s, key[0], key[1], blocks=K, nonfinite=nonfinite,
                        progress=bar.update if bar is not None else None,
                    )
                    parts[key] = parts[key].merge(p) if key in parts else p
        if bar is not None:
            bar.close()
        attrs = {
            "run_id": ",".join(sorted({s.attrs["run_id"] for s in stores})),
            "framework": ",".join(sorted({s.attrs["framework"] for s in stores})),
            "sources": ",".join(str(s.path) for s in stores),
        }
        return build_dataset(parts, layout, ddof=ddof, blocks=blocks, nonfinite=nonfinite,
                             attrs=attrs)
    finally:
        for s in stores:
            s.close()


class SkippedShardWarning(UserWarning):
    """A shard failed validation and was skipped (``skip_bad=True``)."""


def check_shard(store: GradientStore) -> None:
    """Validation beyond :func:`open_store`: the chunk index of ``grads`` lies within the file.

    Raises
    ------
    SchemaError
        A gradient chunk points beyond the end of the file (truncated copy).
    StoreError
        The chunk index cannot be read.
    """
    _ChunkMap(store).close()


def open_shards(
    files: Sequence[str | os.PathLike[str]], *, skip_bad: bool = False
) -> list[GradientStore]:
    """Open and validate shards (:func:`open_store` + :func:`check_shard`).

    A shard raising :class:`StoreError` fails the call, or with ``skip_bad`` is skipped with a
    :class:`SkippedShardWarning` naming it; :class:`StoreError` if no shard is left.
    """
    stores: list[GradientStore] = []
    bad: list[str] = []
    try:
        for p in files:
            try:
                s = open_store(p)
            except StoreError as e:
                if not skip_bad or isinstance(e, LayoutMismatchError):
                    raise
                warnings.warn(f"{p}: skipping bad shard: {e}", SkippedShardWarning, stacklevel=3)
                bad.append(f"{p}: {e}")
                continue
            try:
                check_shard(s)
            except StoreError as e:
                s.close()
                if not skip_bad:
                    raise
                warnings.warn(f"{p}: skipping bad shard: {e}", SkippedShardWarning, stacklevel=3)
                bad.append(f"{p}: {e}")
                continue
            stores.append(s)
    except BaseException:
        for s in stores:
            s.close()
        raise
    if not stores:
        raise StoreError(f"no valid shard among {len(files)} file(s): " + "; ".join(bad))
    return stores


def _has(store: GradientStore, key: tuple[int, str]) -> bool:
    return store.has(*key)


def select_keys(
    stores: Sequence[GradientStore],
    steps: Sequence[int] | None,
    splits: Sequence[str] | None,
) -> list[tuple[int, str]]:
    """Sorted ``(step, split)`` keys present in any shard, filtered by ``steps``/``splits``."""
    keys = {(r.step, r.split) for s in stores for r in s.records}
    return filter_keys(keys, [str(s.path) for s in stores], steps, splits)


def filter_keys(
    keys: set[tuple[int, str]],
    names: Sequence[str],
    steps: Sequence[int] | None,
    splits: Sequence[str] | None,
) -> list[tuple[int, str]]:
    """Sorted record keys filtered by ``steps``/``splits``; a missing one names the shards."""
    if steps is not None:
        want = {int(x) for x in steps}
        missing = want - {k[0] for k in keys}
        if missing:
            raise StoreError(f"steps {sorted(missing)} are in none of {list(names)}")
        keys = {k for k in keys if k[0] in want}
    if splits is not None:
        want_s = set(splits)
        missing_s = want_s - {k[1] for k in keys}
        if missing_s:
            raise StoreError(f"splits {sorted(missing_s)} are in none of the selected records")
        keys = {k for k in keys if k[1] in want_s}
    if not keys:
        raise StoreError(f"no completed record to reduce in {list(names)}")
    return sorted(keys)


def build_dataset(
    parts: dict[tuple[int, str], Partial],
    layout: Layout,
    *,
    ddof: int,
    blocks: int | None,
    nonfinite: str,
    attrs: dict[str, str] | None = None,
) -> xr.Dataset:
    """Assemble merged partial moments into the output Dataset (``docs/format.md``)."""
    from . import __version__

    steps = sorted({k[0] for k in parts})
    split_names = list(dict.fromkeys(k[1] for k in sorted(parts, key=lambda k: k[1] != "train")))
    S, T, P = len(steps), len(split_names), layout.n_params
    K = int(blocks) if blocks else 1
    count = np.zeros((S, T), dtype=np.int64)
    mean = np.full((S, T, P), np.nan)
    m2 = np.full((S, T, P), np.nan)
    cnt_p = np.zeros((S, T, P))
    n_omit = np.zeros((S, T, P), dtype=np.int64)
    lr = np.full((S, T), np.nan)
    epoch = np.full((S, T), np.nan)
    loss_mean = np.full((S, T), np.nan)
    loss_var = np.full((S, T), np.nan)
    b_count = np.zeros((S, T, K))
    b_mean = np.full((S, T, K, P), np.nan) if blocks else None
    b_m2 = np.full((S, T, K, P), np.nan) if blocks else None
    for p in parts.values():
        p.verify(P)  # column blocks of Dask tasks: every shard's checksums, now complete
    for (st, sp), p in parts.items():
        i, j = steps.index(st), split_names.index(sp)
        c, m, q = p.total()
        count[i, j] = p.n_samples
        cnt_p[i, j] = c
        mean[i, j] = m
        m2[i, j] = q
        n_omit[i, j] = p.n_omit.astype(np.int64)
        lr[i, j], epoch[i, j] = p.lr, p.epoch
        lc, lm, lq = p.loss
        if lc > 0:
            loss_mean[i, j] = lm
            loss_var[i, j] = lq / (lc - ddof) if lc > ddof else np.nan
        if blocks:
            b_count[i, j] = p.count[:, 0] if P else 0
            b_mean[i, j] = p.mean
            b_m2[i, j] = p.m2
    fin = kernels.finalize_moments(cnt_p, mean, m2, ddof)
    one = {"units": "1"}
    coords = {
        "step": ("step", np.array(steps, dtype=np.int64), {"long_name": "optimizer step"}),
        "split": ("split", np.array(split_names, dtype=str), {"long_name": "data split"}),
        "param": ("param", np.arange(P, dtype=np.int64),
                  {"long_name": "flat parameter index"}),
        "tensor": ("param", layout.tensor_of_param().astype(str),
                   {"long_name": "parameter tensor"}),
        "layer": ("param", layout.layer_of_param().astype(str), {"long_name": "layer"}),
    }
    sp3 = ("step", "split", "param")
    with np.errstate(invalid="ignore"):
        dead = (fin["var"] == 0) & (mean == 0)
        inf = (fin["var"] == 0) & (mean != 0)
    data = {
        "count": (("step", "split"), count, {"long_name": "number of samples N", **one}),
        "mean": (sp3, mean, {"long_name": "mean per-sample gradient m_j"}),
        "m2": (sp3, m2, {"long_name": "sum of squared deviations M2_j"}),
        "var": (sp3, fin["var"], {"long_name": f"per-sample gradient variance s_j^2 (ddof={ddof})"}),
        "gsnr": (sp3, fin["gsnr"], {"long_name": "gradient signal-to-noise ratio m^2/s^2", **one}),
        "gsnr_debiased": (sp3, fin["gsnr_debiased"],
                          {"long_name": "debiased GSNR m^2/s^2 - 1/N", **one}),
        "n_dead": (("step", "split"), dead.sum(axis=-1).astype(np.int64),
                   {"long_name": "parameters with s^2=0 and m=0 (GSNR NaN)", **one}),
        "n_inf": (("step", "split"), inf.sum(axis=-1).astype(np.int64),
                  {"long_name": "parameters with s^2=0 and m!=0 (GSNR +inf)", **one}),
        "lr": (("step", "split"), lr, {"long_name": "learning rate recorded with the record"}),
        "epoch": (("step", "split"), epoch, {"long_name": "epoch"}),
        "loss_mean": (("step", "split"), loss_mean, {"long_name": "mean per-sample loss"}),
        "loss_var": (("step", "split"), loss_var, {"long_name": "variance of per-sample loss"}),
    }
    if nonfinite == "omit":
        data["n_omitted"] = (sp3, n_omit,
                             {"long_name": "non-finite samples dropped per parameter", **one})
    if blocks:
        data["block_count"] = (("step", "split", "block"), b_count,
                               {"long_name": "samples per jackknife block", **one})
        data["block_mean"] = (("step", "split", "block", "param"), b_mean,
                              {"long_name": "block mean gradient"})
        data["block_m2"] = (("step", "split", "block", "param"), b_m2,
                            {"long_name": "block sum of squared deviations"})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(
        {
            "title": "per-parameter gradient moments and GSNR",
            "ddof": int(ddof),
            "n_params": int(P),
            "layout_hash": layout.hash,
            "layout": layout.to_json(),
            "nonfinite": nonfinite,
            "library": "gsnr-stats",
            "library_version": __version__,
            "Conventions": "CF-1.8",
            **(attrs or {}),
        }
    )
    return ds
