"""The reduce engine: partial moments of one record from the store's views, merged by Chan.

:func:`record_partial` asks the store for a record's view (:meth:`GradientStore.view`) and
streams its chunk rows through the kernels: mapped rows straight from the page cache
(:func:`gsnr_stats.kernels.moments_chunks`, checksums fused into its first pass), copied
rows from h5py (:func:`gsnr_stats.kernels.moments_block`). It never sees an HDF5 byte
offset. :class:`Partial` merges across shards, blocks and Dask tasks;
:func:`build_dataset` assembles the labelled Dataset. Used in-process by
:func:`gsnr_stats.reduce.reduce` and on workers by :mod:`gsnr_stats.distributed`.
Memory is O(P) plus a few chunk rows, whatever N. Records of factored stores (format 4)
take the same path for their plain columns and :mod:`gsnr_stats._factored_engine` for
their factored weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import xarray as xr

from . import _cf, kernels
from . import _factored_engine as _fe
from ._version import __version__
from .errors import LayoutMismatchError, NonFiniteError, ShardSetError, StoreError
from .store import GradientStore, Layout, check_same_layout, open_store
from .store.schema import BITS_DTYPES
from .store.views import RecordView


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
    # the optimizer's update count at the checkpoint (-1: not recorded), the JSON of the
    # record's meta["optimizer"] ("" if none), and which record of which shard they are from
    optimizer_step: int = -1
    optimizer: str = ""
    source: str = ""

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
        a, b = self.optimizer_step, other.optimizer_step
        if a >= 0 and b >= 0 and a != b:
            raise StoreError(f"{self.source} has optimizer_step {a}, {other.source} has {b}: "
                             "shards of one record must come from the same checkpoint")
        return Partial(
            c, m, q, self.n_omit + other.n_omit, self.n_samples + other.n_samples,
            (float(lc), float(lm), float(lq)),
            self.lr if not math.isnan(self.lr) else other.lr,
            self.epoch if not math.isnan(self.epoch) else other.epoch,
            {**(self.checks or {}), **(other.checks or {})} or None,
            a if a >= 0 else b, self.optimizer or other.optimizer, self.source or other.source,
        )

    def reorder(self, order: np.ndarray) -> Partial:
        """The partial with column ``k`` moved to ``order[k]`` (storage to layout order)."""
        def put(x: np.ndarray) -> np.ndarray:
            out = np.empty_like(x)
            out[..., order] = x
            return out

        return Partial(put(self.count), put(self.mean), put(self.m2), put(self.n_omit),
                       self.n_samples, self.loss, self.lr, self.epoch, self.checks,
                       self.optimizer_step, self.optimizer, self.source)

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



def _param_name(layout: Layout, flat: int) -> str:
    """``name[i, j]`` of flat parameter ``flat``."""
    t = int(np.searchsorted(np.array(layout.offsets), flat, side="right") - 1)
    local = flat - layout.offsets[t]
    shape = layout.shapes[t]
    idx = np.unravel_index(local, shape) if shape else ()
    return f"{layout.names[t]}[{', '.join(str(int(i)) for i in idx)}]"


def _nonfinite_message(where: str, pname: str, flat: int, v: np.ndarray, row0: int,
                       sample_id: Callable[[], np.ndarray], what: str = "") -> NonFiniteError:
    """The error for values ``v`` of one parameter at record samples ``row0 ..``."""
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        i = row0 + int(bad[0])
        sid = int(sample_id()[i])
        kind = "NaN" if np.isnan(v[bad[0]]) else "Inf"
        return NonFiniteError(
            f"{where}: {kind} gradient for parameter {pname} (flat index {flat}{what}) at "
            f"sample {i} (sample_id {sid}); {bad.size} non-finite value(s) in this "
            f"{'record' if row0 == 0 and not what else 'block of rows'}. "
            "Pass nonfinite='omit' to drop such samples per parameter."
        )
    return NonFiniteError(f"{where}: non-finite gradient for parameter {pname} (flat index {flat})")


def _nonfinite_error(view: RecordView, col: int, flat: int | None = None) -> NonFiniteError:
    """``col`` is the column of the stored ``grads`` (a plain column of a factored store,
    flat parameter ``flat``)."""
    flat = col if flat is None else flat
    where = f"{view.path}: record (step={view.step}, split={view.split!r})"
    return _nonfinite_message(where, _param_name(view.layout, flat), flat, view.column(col), 0,
                              view.sample_id)


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
        In a factored store (format 4) columns are storage positions: the plain columns,
        then each factor's weight entries (row-major) and bias
        (:func:`gsnr_stats._factored_engine.storage_order` maps them to flat parameters;
        without ``cols`` the result is in layout order, as for any store).
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
    K = max(1, int(blocks))
    if getattr(store, "factors", None):  # format 4 (an attribute: no I/O for other stores)
        rec = store.record(step, split)
        part = _factored_partial(store, step, split, cols, K, nonfinite, progress)
        return _finish(part, store, step, split, rec.optimizer_step,
                       store.record_meta(step, split).get("optimizer"))
    # the store's one door for this record: metadata, per-sample values, chunk-row views
    with store.view(step, split, cols=cols) as view:
        if view.info.kind == "moments":
            part = _moments_partial(view, K, nonfinite)
        else:
            part = _gradients_partial(view, K, nonfinite, progress)
        ostep, opt = view.info.optimizer_step, view.meta().get("optimizer")
    return _finish(part, store, step, split, ostep, opt)


def record_nbytes(store: GradientStore, key: tuple[int, str]) -> int:
    """Bytes of per-sample values :func:`record_partial` reads for record ``key``: the
    stored columns and, in a factored store, the factor rows (for progress bars)."""
    n = store.record(*key).n_samples
    per = int(getattr(store, "n_plain", store.layout.n_params)) * store.grads_dtype.itemsize
    per += sum(f.rows * (f.in_ + f.out) * f.dtype.itemsize
               for f in getattr(store, "factors", None) or ())
    return n * per


def _factored_partial(store: GradientStore, step: int, split: str,
                      cols: tuple[int, int] | None, K: int, nonfinite: str,
                      progress: Callable[[int], None] | None) -> Partial:
    """Partial of a record of a factored store (:mod:`gsnr_stats._factored_engine`).

    ``cols`` are storage positions (plain columns, then the factors' entries); ``None``
    reduces them all and returns the columns in layout order, like any other record.
    """
    P = store.layout.n_params
    order = _fe.storage_order(P, _fe.spans(store.factors))
    c0, c1 = (0, P) if cols is None else (int(cols[0]), int(cols[1]))
    rec = store.record(step, split)
    if rec.kind == "moments":
        with store.view(step, split, cols=(0, P)) as view:
            part = _moments_partial(view, K, nonfinite, order[c0:c1])
    else:
        part = _factored_gradients(store, step, split, c0, c1, K, nonfinite, progress)
    if cols is None:
        part = part.reorder(order)
    return part


def _factored_gradients(store: GradientStore, step: int, split: str, c0: int, c1: int,
                        K: int, nonfinite: str,
                        progress: Callable[[int], None] | None) -> Partial:
    """Storage columns ``[c0, c1)`` of a factored gradients record: the plain ones through
    the view and the kernels of any record, the factored ones from the factors."""
    P, Pp = store.layout.n_params, int(store.n_plain)
    rec = store.record(step, split)
    w = c1 - c0
    count, mean, m2 = np.zeros((K, w)), np.zeros((K, w)), np.zeros((K, w))
    n_omit = np.zeros(w)
    bounds = _block_bounds(rec.n_samples, K)
    p1 = min(c1, Pp)
    checks = None
    if c0 < p1:
        with store.view(step, split, cols=(c0, p1)) as view:
            pp = _gradients_partial(view, K, nonfinite, progress, flat=store.plain_index)
        count[:, : p1 - c0], mean[:, : p1 - c0], m2[:, : p1 - c0] = pp.count, pp.mean, pp.m2
        n_omit[: p1 - c0] = pp.n_omit
        loss, checks = pp.loss, pp.checks
    else:
        loss = _loss_moments(store.read_loss(step, split))
        segs = store.segments(step, split)
        if Pp and segs and segs[0].sum1 is not None:  # nothing of the plain sums seen here
            want = np.array([[sg.sum1, sg.sum2] for sg in segs], dtype=np.uint64)
            what = [f"record (step={step}, split={split!r}) rows [{sg.start}, {sg.stop})"
                    for sg in segs]
            checks = {str(store.path): (np.zeros_like(want), want, 0, what)}
    if checks is not None:
        # the plain columns' checksums complete once the shard's tasks cover all P storage
        # columns: count this task's factor columns too (Partial.verify)
        checks = {k: (g, wt, wd + (c1 - max(c0, p1)), wh) for k, (g, wt, wd, wh)
                  in checks.items()}
    where = f"{store.path}: record (step={step}, split={split!r})"

    def error(flat: int, v: np.ndarray, row0: int) -> NonFiniteError:
        return _nonfinite_message(where, _param_name(store.layout, flat), flat, v, row0,
                                  lambda: store.read_sample_id(step, split), ", factored")

    a0 = max(c0, Pp)
    if a0 < c1:
        fc, fm, fq, fo = _fe.factor_moments(store, step, split, a0, c1, bounds, nonfinite,
                                            error, progress)
        count[:, a0 - c0:], mean[:, a0 - c0:], m2[:, a0 - c0:] = fc, fm, fq
        n_omit[a0 - c0:] = fo
    with np.errstate(invalid="ignore"):
        mean = np.where(count > 0, mean, np.nan)
        m2 = np.where(count > 0, m2, np.nan)
    part = Partial(count, mean, m2, n_omit, rec.n_samples, loss, rec.lr, rec.epoch, checks)
    part.verify(P)  # a task covering every column: the plain checksums are complete now
    if checks is not None and next(iter(checks.values()))[2] == P:
        part.checks = None
    return part


def _finish(part: Partial, store: GradientStore, step: int, split: str, ostep: int | None,
            opt: object) -> Partial:
    """Attach the record's checkpoint and provenance to its partial."""
    part.optimizer_step = -1 if ostep is None else int(ostep)
    part.optimizer = "" if opt is None else json.dumps(opt, sort_keys=True)
    part.source = f"{store.path}: record (step={step}, split={split!r})"
    return part


def _moments_partial(view: RecordView, K: int, nonfinite: str,
                     idx: np.ndarray | None = None) -> Partial:
    """Partial of a moments-only record: its stored blocks grouped into K jackknife blocks.

    Columns ``[view.c0, view.c1)``, or the flat parameters ``idx`` (a factored store's
    column order, :mod:`gsnr_stats._factored_engine`).
    """
    rec = view.info
    sel = np.arange(view.c0, view.c1) if idx is None else np.asarray(idx, np.int64)
    c0 = int(sel[0]) if sel.size else 0
    contiguous = sel.size == 0 or bool((np.diff(sel) == 1).all())
    c1 = c0 + sel.size
    w = sel.size
    count, mean, m2 = np.zeros((K, w)), np.zeros((K, w)), np.zeros((K, w))
    cnt, mu, q = view.moments()
    nb = cnt.shape[0]
    # fewer jackknife blocks if fewer were stored
    groups = _block_bounds(nb, K) if nb >= K else np.arange(nb + 1)
    for b in range(len(groups) - 1):
        acc = (np.zeros(w), np.zeros(w), np.zeros(w))
        for i in range(groups[b], groups[b + 1]):
            mi, qi = (mu[i, c0:c1], q[i, c0:c1]) if contiguous else (mu[i, sel], q[i, sel])
            acc = kernels.merge_moments(acc, (np.full(w, cnt[i]), mi, qi))
        count[b], mean[b], m2[b] = acc
    if nonfinite == "raise":
        bad = ~np.isfinite(mean) | ~np.isfinite(m2)
        bad &= count > 0
        if bad.any():
            col = int(sel[int(np.flatnonzero(bad.any(axis=0))[0])])
            raise NonFiniteError(
                f"{view.path}: record (step={view.step}, split={view.split!r}): non-finite "
                f"stored moments for parameter flat index {col}"
            )
    return Partial(count, np.where(count > 0, mean, np.nan), np.where(count > 0, m2, np.nan),
                   np.zeros(w), rec.n_samples, (0.0, math.nan, math.nan), rec.lr, rec.epoch)


def _gradients_partial(view: RecordView, K: int, nonfinite: str,
                       progress: Callable[[int], None] | None,
                       flat: np.ndarray | None = None) -> Partial:
    """Partial of a per-sample-gradient record: stream its chunk rows through the kernels.

    ``flat`` maps the stored columns to flat parameters (a factored store's
    ``plain_index``; only for error messages).
    """
    rec, c0, c1 = view.info, view.c0, view.c1
    # the stored row width: P, or P_plain of a factored store (its view spans those only)
    P = int(getattr(view.store, "n_plain", view.layout.n_params))
    w = c1 - c0
    count, mean, m2 = np.zeros((K, w)), np.zeros((K, w)), np.zeros((K, w))
    n_omit = np.zeros(w)
    loss = _loss_moments(view)
    omit = nonfinite == "omit"
    bad = np.zeros(w, dtype=np.int64)
    bounds = _block_bounds(rec.n_samples, K)
    rc, cc = view.chunk_shape
    itemsize = view.dtype.itemsize
    segs = view.segments
    checked = view.checksummed
    sums = np.zeros((len(segs), 2), dtype=np.uint64)
    n_chunks = max(1, -(-c1 // cc) - c0 // cc)
    bits = BITS_DTYPES[view.dtype]
    # cut at the jackknife block bounds, so each piece belongs to one block; a piece may
    # span many consecutive segments (one kernel call per chunk row, not per write call)
    for rows in view.iter_rows(cuts=bounds[1:-1]):
        blk = min(int(np.searchsorted(bounds, rows.record_pos, side="right") - 1), K - 1)
        s0 = rows.segment
        local = rows.row_seg - s0
        n_seg = int(local[-1]) + 1
        if rows.mapped:
            offs = rows.offsets
            csums = np.zeros((n_chunks, n_seg, 2), dtype=np.uint64)
            kernels.moments_chunks(
                view.buf, offs, rc, cc, w, rows.lo, rows.hi,
                count[blk], mean[blk], m2[blk], omit, n_omit, bad,
                view.ubuf, np.stack((rows.row_pos, local)), P, csums,
            )
            sums[s0:s0 + n_seg] += csums[: offs.shape[0]].sum(axis=0, dtype=np.uint64)
        else:
            raw = rows.array
            if checked:
                u = np.ascontiguousarray(raw).view(bits)
                sums[s0:s0 + n_seg] += kernels.checksum_rows_segmented(
                    u, rows.row_pos, local, n_seg, P)
            x = np.ascontiguousarray(raw, dtype=np.float32)
            kernels.moments_block(x, cc, 0, count[blk], mean[blk], m2[blk], omit, n_omit, bad)
        if bad.any():
            col = c0 + int(np.flatnonzero(bad)[0])
            raise _nonfinite_error(view, col, None if flat is None else int(flat[col]))
        if progress is not None:
            progress((rows.hi - rows.lo) * w * itemsize)
    with np.errstate(invalid="ignore"):
        mean = np.where(count > 0, mean, np.nan)
        m2 = np.where(count > 0, m2, np.nan)
    checks = None
    if checked:
        want = np.array([[sg.sum1, sg.sum2] for sg in segs], dtype=np.uint64)
        what = [f"record (step={view.step}, split={view.split!r}) rows [{sg.start}, {sg.stop})"
                for sg in segs]
        checks = {str(view.path): (sums, want, w, what)}
    part = Partial(count, mean, m2, n_omit, rec.n_samples, loss, rec.lr, rec.epoch, checks)
    if w == P:
        part.verify(P)  # the whole record was read: fail now, not after other records
        part.checks = None
    return part


def _loss_moments(view: RecordView | np.ndarray) -> tuple[float, float, float]:
    """``(count, mean, M2)`` of the finite per-sample losses of a view (or an array)."""
    v = view if isinstance(view, np.ndarray) else view.loss()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, math.nan, math.nan)
    mu = float(v.mean())
    return (float(v.size), mu, float(((v - mu) ** 2).sum()))


class SkippedShardWarning(UserWarning):
    """A shard failed validation and was skipped (``skip_bad=True``)."""


def check_shard(store: GradientStore) -> None:
    """Validation beyond :func:`open_store`: :meth:`GradientStore.check_chunks`."""
    store.check_chunks()


def _file_id(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file: the same for a path, a link or a hard link."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # opening it will say why
    return (st.st_dev, st.st_ino)


def same_files(files: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse a file listed twice, by its path or through a (symbolic or hard) link.

    Raises
    ------
    ShardSetError
        Naming both entries: the second would count its samples a second time.
    """
    seen: dict[tuple[int, int], str] = {}
    for p in files:
        fid = _file_id(p)
        if fid is None:
            continue
        if fid in seen:
            how = "listed twice" if os.path.abspath(p) == os.path.abspath(seen[fid]) else \
                "the same file through a link"
            raise ShardSetError(
                f"{p} is {seen[fid]} again ({how}): its samples would be counted twice; "
                "list each shard once")
        seen[fid] = str(p)


def shard_identity(store: GradientStore) -> tuple[object, ...]:
    """What a copy of a shard shares with it: run id, creation time, every record and the
    checksums of its data (format 2+; format 1 has none, so its losses and sample ids)."""
    a = store.attrs
    recs: list[tuple[object, ...]] = []
    for r in store.records:
        segs = store.segments(r.step, r.split)
        # repr: NaN (no lr recorded) must equal itself here
        key: list[object] = [r.step, r.split, r.kind, r.n_samples, repr(r.lr), repr(r.epoch),
                             r.optimizer_step]
        key += [(sg.stop - sg.start, sg.sum1, sg.sum2, sg.aux_crc) for sg in segs]
        if r.kind == "gradients" and segs and segs[0].sum1 is None:
            key += [store.read_loss(r.step, r.split).tobytes(),
                    store.read_sample_id(r.step, r.split).tobytes()]
        recs.append(tuple(key))
    return (a["run_id"], a["created_at"], a["layout_hash"], tuple(recs))


def shard_set_problems(
    stores: Sequence[GradientStore], *, allow_mixed_runs: bool = False
) -> list[str]:
    """Why these (open, distinct) shards must not be pooled: copies of one shard, or several
    runs without ``allow_mixed_runs``; ``[]`` when they may."""
    return identity_problems(
        [(str(s.path), shard_identity(s), str(s.attrs["run_id"])) for s in stores],
        allow_mixed_runs=allow_mixed_runs)


def identity_problems(
    shards: Sequence[tuple[str, tuple[object, ...], str]], *, allow_mixed_runs: bool = False
) -> list[str]:
    """:func:`shard_set_problems` on ``(path, shard_identity, run_id)`` triples: the rules
    (a shard listed twice or copied, several run ids) and their messages, also for shards
    only Dask workers could open (:mod:`gsnr_stats.distributed`)."""
    out: list[str] = []
    if len(shards) < 2:
        return out
    ids: dict[tuple[object, ...], str] = {}
    for path, ident, run_id in shards:
        if ident in ids:
            first = ids[ident]
            if os.path.abspath(first) == os.path.abspath(path):
                out.append(f"{path} is {first} again (listed twice): its samples would be "
                           "counted twice; list each shard once")
            else:
                out.append(f"{path} holds the same records as {first} (run {run_id!r}, "
                           "identical data checksums): a copy of one shard, whose samples "
                           "would be counted twice; list only one of them")
        ids.setdefault(ident, path)
    runs: dict[str, list[str]] = {}
    for path, _, run_id in shards:
        runs.setdefault(run_id, []).append(path)
    if len(runs) > 1 and not allow_mixed_runs:
        parts = "; ".join(f"run_id {r!r}: {', '.join(ps[:3])}{' ...' if len(ps) > 3 else ''}"
                          for r, ps in runs.items())
        out.append(f"shards of {len(runs)} different runs ({parts}); the shards of one run "
                   "share a run_id (GradientWriter(run_id=...)); to pool different runs "
                   "anyway pass allow_mixed_runs=True (CLI: --allow-mixed-runs)")
    return out


def check_shard_set(stores: Sequence[GradientStore], *, allow_mixed_runs: bool = False) -> None:
    """:class:`ShardSetError` with the first of :func:`shard_set_problems`, if any (after
    :class:`LayoutMismatchError` for shards whose layouts differ: the deeper mismatch)."""
    if len(stores) < 2:
        return
    check_same_layout(stores)
    problems = shard_set_problems(stores, allow_mixed_runs=allow_mixed_runs)
    if problems:
        raise ShardSetError(problems[0])


def open_shards(
    files: Sequence[str | os.PathLike[str]], *, skip_bad: bool = False,
    allow_mixed_runs: bool = False,
) -> list[GradientStore]:
    """Open and validate shards (:func:`open_store` + :func:`check_shard`).

    A shard raising :class:`StoreError` fails the call, or with ``skip_bad`` is skipped with a
    :class:`SkippedShardWarning` naming it; :class:`StoreError` if no shard is left. Shards
    that would count samples twice or mix runs are refused (:func:`same_files`,
    :func:`check_shard_set`), whatever ``skip_bad``.
    """
    same_files(files)
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
        if not stores:
            raise StoreError(f"no valid shard among {len(files)} file(s): " + "; ".join(bad))
        check_shard_set(stores, allow_mixed_runs=allow_mixed_runs)
    except BaseException:
        for s in stores:
            s.close()
        raise
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


def _optimizer_coords(parts: dict[tuple[int, str], Partial], steps: list[int],
                      splits: list[str]) -> tuple[np.ndarray, str]:
    """``optimizer_step`` per step (-1: none) and the JSON of the last step's optimizer.

    Records of one step (its splits) must agree on the optimizer step: :class:`StoreError`
    naming both otherwise. The optimizer is ``meta["optimizer"]`` of the last step that
    has one (its first split that has one), ``""`` if no record has one.
    """
    out = np.full(len(steps), -1, dtype=np.int64)
    optimizer = ""
    for i, st in enumerate(steps):
        here = [parts[(st, sp)] for sp in splits if (st, sp) in parts]
        optimizer = next((p.optimizer for p in here if p.optimizer), optimizer)
        known = [p for p in here if p.optimizer_step >= 0]
        for p in known[1:]:
            if p.optimizer_step != known[0].optimizer_step:
                raise StoreError(
                    f"{known[0].source} has optimizer_step {known[0].optimizer_step}, "
                    f"{p.source} has {p.optimizer_step}: records of one step must share the "
                    "checkpoint (record every split at the same optimizer step)"
                )
        if known:
            out[i] = known[0].optimizer_step
    return out, optimizer


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
    opt_step, optimizer = _optimizer_coords(parts, steps, split_names)
    fin = kernels.finalize_moments(cnt_p, mean, m2, ddof)
    one = {"units": "1"}
    coords = {
        "step": ("step", np.array(steps, dtype=np.int64), {"long_name": "optimizer step"}),
        "optimizer_step": ("step", opt_step,
                           {"long_name": "optimizer update count at the checkpoint (-1: not "
                                         "recorded)"}),
        "split": ("split", np.array(split_names, dtype=str), {"long_name": "data split"}),
        "param": ("param", np.arange(P, dtype=np.int64),
                  {"long_name": "flat parameter index"}),
        "tensor": ("param", layout.tensor_of_param(),
                   {"long_name": "parameter tensor"}),
        "layer": ("param", layout.layer_of_param(), {"long_name": "layer"}),
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
            "optimizer": optimizer,
            **(attrs or {}),
        }
    )
    return _cf.annotate(ds)  # units, definitions, references, block coordinate
