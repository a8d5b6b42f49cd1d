"""Reduce of factored records (format 4): moments of factored weights from their factors.

A factored store keeps, per sample, the plain columns (every tensor not factored) in
``grads`` and for each factored weight ``W (out, in)`` the rows ``A (T, in)`` and
``Δ (T, out)`` whose product ``Σ_t δ_t a_tᵀ`` is the sample's gradient of ``W`` (and
``Σ_t δ_t`` that of its bias). The engine (:func:`gsnr_stats.engine.record_partial`) reads
the plain columns through the store's views as for any record and hands the factors to
this module, which streams them through :func:`gsnr_stats.kernels.factored_moments`
(exact float64 two-pass per block of samples, Chan merge): no ``n × P`` array is formed.

Column order. The partial of a factored record is computed in *storage order*: the
``P_plain`` plain columns first, then for each factor its ``out·in`` weight entries
(row-major) and its ``out`` bias entries. :func:`storage_order` maps storage positions to
flat parameters; a task of the Dask plan covers a range of storage positions (plain column
blocks aligned to the ``grads`` chunks, then blocks of whole weight rows of each factor),
and the client puts the concatenated blocks back in layout order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numba
import numpy as np

from . import kernels

if TYPE_CHECKING:
    from .store import FactorInfo, GradientStore

#: Bytes of factor rows read per piece of a record (all factors together).
PIECE_BYTES = 64 << 20

#: A factor as the plan sees it: (w_offset, out, in, b_offset or -1).
Span = tuple[int, int, int, int]


def spans(factors: Sequence[FactorInfo]) -> tuple[Span, ...]:
    """The factors' flat positions, as :class:`Span` tuples (what a Dask plan ships)."""
    return tuple((int(f.w_offset), int(f.out), int(f.in_),
                  -1 if f.b_offset is None else int(f.b_offset)) for f in factors)


def span_size(s: Span) -> int:
    """Storage columns of a factor: ``out·in`` weight entries plus ``out`` bias entries."""
    w_off, out, n_in, b_off = s
    return out * n_in + (out if b_off >= 0 else 0)


def storage_order(n_params: int, sp: Sequence[Span]) -> np.ndarray:
    """Flat parameter of each storage position: plain columns (layout order), then each
    factor's weight (row-major) and bias. A permutation of ``range(n_params)``."""
    factored = np.zeros(n_params, dtype=bool)
    parts: list[np.ndarray] = []
    for w_off, out, n_in, b_off in sp:
        parts.append(np.arange(w_off, w_off + out * n_in, dtype=np.int64))
        factored[w_off:w_off + out * n_in] = True
        if b_off >= 0:
            parts.append(np.arange(b_off, b_off + out, dtype=np.int64))
            factored[b_off:b_off + out] = True
    return np.concatenate([np.flatnonzero(~factored).astype(np.int64), *parts])


def factor_blocks(n_plain: int, sp: Sequence[Span], width: int) -> list[tuple[int, int]]:
    """Storage ranges of the factors' tasks: whole weight rows, about ``width`` entries each,
    the bias with the last rows (a range cut inside a row would compute the row twice)."""
    out_blocks: list[tuple[int, int]] = []
    pos = n_plain
    for s in sp:
        _, out, n_in, _ = s
        rows = max(1, int(width) // max(1, n_in))
        end = pos + span_size(s)
        for o in range(0, out, rows):
            lo = pos + o * n_in
            out_blocks.append((lo, end if o + rows >= out else pos + (o + rows) * n_in))
        pos = end
    return out_blocks


def _pieces(n: int, bounds: np.ndarray, rows: int) -> list[tuple[int, int, int]]:
    """``(block, lo, hi)`` sample ranges of at most ``rows`` rows, cut at the block bounds."""
    out = []
    for b in range(len(bounds) - 1):
        for lo in range(int(bounds[b]), int(bounds[b + 1]), rows):
            out.append((b, lo, min(int(bounds[b + 1]), lo + rows)))
    return out


def factor_moments(
    store: GradientStore, step: int, split: str, c0: int, c1: int, bounds: np.ndarray,
    nonfinite: str, error: Callable[[int, np.ndarray, int], Exception],
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``count, mean, m2`` ``(K, c1 − c0)`` and ``n_omit`` ``(c1 − c0,)`` of the storage
    columns ``[c0, c1)`` of a factored record, all inside its factors' region
    (``c0 ≥ P_plain``), per jackknife block ``bounds`` (``K + 1`` sample positions).

    For weight entry ``(o, j)`` of sample ``i``, ``g = Σ_t δ_ito a_itj``, and bias entry
    ``o``, ``Σ_t δ_ito``, the moments are :func:`gsnr_stats.kernels.factored_moments`'s: a
    float64 two-pass per block of samples that stay in cache, Chan-merged in sample order.
    Only the weight rows that the range touches are computed.

    ``error(flat, values, row0)`` builds the exception raised (``nonfinite="raise"``) when
    a product entry is NaN/Inf: flat parameter ``flat`` has ``values`` at samples
    ``row0, row0 + 1, ..`` (the engine names file, record, parameter and sample).
    """
    P_plain = int(store.n_plain)
    K = len(bounds) - 1
    w = c1 - c0
    count, mean, m2 = np.zeros((K, w)), np.zeros((K, w)), np.zeros((K, w))
    n_omit = np.zeros(w)
    omit = nonfinite == "omit"
    jobs = []  # (factor, first weight row, end row, bias?, storage position of row o0)
    pos = P_plain
    for fi, s in zip(store.factors, spans(store.factors), strict=True):
        size = span_size(s)
        lo, hi = max(c0, pos), min(c1, pos + size)
        if lo < hi:
            nw = fi.out * fi.in_
            o0 = min(fi.out, (lo - pos) // fi.in_)
            o1 = min(fi.out, -(-(hi - pos) // fi.in_))
            bias = fi.b_offset is not None and hi > pos + nw
            if lo < pos + nw and o0 < o1:
                jobs.append((fi, o0, o1, False, pos))
            if bias:  # a job of its own: the kernel's row loop has nothing to do there
                jobs.append((fi, 0, fi.out, True, pos))
        pos += size
    if not jobs:
        return count, mean, m2, n_omit
    n = int(store.record(step, split).n_samples)
    per = sum(fi.rows * (fi.in_ + fi.out) * fi.dtype.itemsize for fi in store.factors)
    rows = max(1, PIECE_BYTES // max(1, per))
    accs = [_Acc(K, j) for j in jobs]
    for blk, lo, hi in _pieces(n, bounds, rows):
        fac = store.read_factors(step, split, lo, hi)
        for acc in accs:
            acc.add(fac[acc.fi.weight], blk, omit, lo, error)
        if progress is not None:
            progress((hi - lo) * per)
    for acc in accs:
        a0 = acc.pos + (acc.fi.out * acc.fi.in_ if acc.bias else acc.o0 * acc.fi.in_)
        a, b = max(c0, a0), min(c1, a0 + acc.width)
        if a < b:
            dst, src = slice(a - c0, b - c0), slice(a - a0, b - a0)
            count[:, dst], mean[:, dst], m2[:, dst] = (acc.count[:, src], acc.mean[:, src],
                                                     acc.m2[:, src])
            n_omit[dst] = acc.n_omit[src]
    return count, mean, m2, n_omit


class _Acc:
    """Accumulators of one kernel job: weight rows ``[o0, o1)`` of a factor, or its bias."""

    def __init__(self, K: int, job: tuple[FactorInfo, int, int, bool, int]) -> None:
        self.fi, self.o0, self.o1, self.bias, self.pos = job
        self.width = self.fi.out if self.bias else (self.o1 - self.o0) * self.fi.in_
        self.count, self.mean, self.m2 = (np.zeros((K, self.width)) for _ in range(3))
        self.n_omit = np.zeros(self.width)
        self.bad = np.zeros(self.width, np.int64)
        self._none = (np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))

    def add(self, ad: tuple[np.ndarray, np.ndarray], blk: int, omit: bool, row0: int,
            error: Callable[[int, np.ndarray, int], Exception]) -> None:
        """Add samples ``row0 ..`` (factor rows ``ad``) to jackknife block ``blk``."""
        a, d = ad
        fi = self.fi
        if self.bias:  # a with no columns: the kernel's weight loop is empty
            a = a[:, :, :0]
        elif (self.o0, self.o1) != (0, fi.out):
            d = np.ascontiguousarray(d[:, :, self.o0:self.o1])
        rb = kernels.factored_row_block(fi.rows, a.shape[2], a.dtype.itemsize)
        c, m, q = self.count[blk], self.mean[blk], self.m2[blk]
        # groups of output rows handed out one at a time (dynamic): with static shares a
        # thread the OS deschedules (a shared machine) holds up the whole call
        with numba.parallel_chunksize(1):
            if self.bias:
                kernels.factored_moments(a, d, 0, a.shape[0], rb, *self._none[:3], omit,
                                         *self._none[3:], c, m, q, self.n_omit, self.bad)
            else:
                kernels.factored_moments(a, d, 0, a.shape[0], rb, c, m, q, omit, self.n_omit,
                                         self.bad, *self._none)
        if self.bad.any():
            flat, v = self._error(int(np.flatnonzero(self.bad)[0]), a, d)
            raise error(flat, v, row0)

    def _error(self, k: int, a: np.ndarray, d: np.ndarray) -> tuple[int, np.ndarray]:
        """Flat index and per-sample values (this piece) of job entry ``k``."""
        fi = self.fi
        with np.errstate(invalid="ignore", over="ignore"):
            if self.bias:
                return int(fi.b_offset) + k, d[:, :, k].astype(np.float64).sum(axis=1)
            o, j = divmod(k, fi.in_)
            v = (d[:, :, o].astype(np.float64) * a[:, :, j].astype(np.float64)).sum(axis=1)
        return fi.w_offset + (self.o0 + o) * fi.in_ + j, v
