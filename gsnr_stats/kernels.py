"""Numba kernels for streaming per-parameter moments. Arrays in, arrays out: no h5py, no xarray.

Every kernel updates running accumulators ``count``, ``mean``, ``m2`` (float64, shape
``(P,)``) in place, where for parameter ``j``

.. math::

    \\mathrm{mean}_j = \\frac{1}{n_j}\\sum_i g_{ij}, \\qquad
    \\mathrm{M2}_j = \\sum_i (g_{ij} - \\mathrm{mean}_j)^2 .

Why two passes per chunk and Chan's merge across chunks: a chunk (≈2 MiB) is still in
cache for the second pass, so the exact two-pass form costs little more than one pass, and
it keeps float32 inputs with ``|mean| ≫ std`` accurate to float64 round-off, where the
one-pass ``E[g²] − E[g]²`` loses every digit. Chan et al.'s pairwise update then merges
chunks, threads, files and workers without loss:

.. math::

    n = n_a + n_b,\\quad \\delta = \\bar g_b - \\bar g_a,\\quad
    \\bar g = \\bar g_a + \\delta\\,\\frac{n_b}{n},\\quad
    M2 = M2_a + M2_b + \\delta^2\\,\\frac{n_a n_b}{n}.

Parallelism is over column chunks only, and each column is always reduced in row order, so
results are bit-identical for any thread count.

:func:`subset_sums` adds chunk rows into the per-subset gradient sums of the first-order
OSGR estimator (:mod:`gsnr_stats.estimators`), under the same rules.
:func:`factored_moments` gives the same moments for a factored weight straight from its
factors ``A``, ``Δ`` (per-sample gradient ``Σ_t δ_t a_tᵀ``), two-pass per block of samples.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from numba import njit, prange


def _loaded_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime already loaded in this process (torch's, MKL's), if any.

    Opened with ``RTLD_NOLOAD``: never loads a runtime that is not there.
    """
    names: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            names = sorted({line.split()[-1] for line in f
                            if any(k in line for k in ("libgomp", "libiomp5", "libomp."))})
    except OSError:  # not Linux
        names = ["libgomp.so.1", "libiomp5.so", "libomp.dylib", "libiomp5.dylib"]
    for name in names:
        try:
            lib = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
            lib.omp_get_max_threads.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _launch_threads_keeping_host_openmp() -> None:
    """Start Numba's threading layer now, leaving the host's OpenMP thread count as it was.

    Numba's ``omp`` layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` once, when it
    starts, in the calling thread; torch (and anything else on the same libgomp) reads that
    value as its own thread count, so a ``torch.set_num_threads(1)`` before the first reduce
    came back as 2 (issue 12). Starting the layer here, at import, and restoring the OpenMP
    value afterwards means no later kernel call touches it (``numba.set_num_threads`` only
    changes Numba's own per-thread limit).
    """
    omp = _loaded_openmp()
    before = omp.omp_get_max_threads() if omp is not None else None
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()
    except Exception:  # no layer available: the kernels fail later with Numba's own message
        return
    if before is not None and omp.omp_get_max_threads() != before:
        omp.omp_set_num_threads(before)


_launch_threads_keeping_host_openmp()


@njit(nogil=True, cache=True)
def _merge_col(count, mean, m2, j, nb, mb, m2b):
    na = count[j]
    if nb == 0.0:
        return
    if na == 0.0:
        count[j] = nb
        mean[j] = mb
        m2[j] = m2b
        return
    n = na + nb
    delta = mb - mean[j]
    mean[j] = mean[j] + delta * (nb / n)
    m2[j] = m2[j] + m2b + delta * delta * (na * nb / n)
    count[j] = n


@njit(nogil=True, cache=True)
def _masked_col(x, r_lo, r_hi, jj):
    """Two-pass moments of the finite values of column ``jj`` (the rare, slow path)."""
    n = 0.0
    s = 0.0
    for r in range(r_lo, r_hi):
        v = np.float64(x[r, jj])
        if np.isfinite(v):
            s += v
            n += 1.0
    if n == 0.0:
        return 0.0, 0.0, 0.0
    mu = s / n
    q = 0.0
    for r in range(r_lo, r_hi):
        v = np.float64(x[r, jj])
        if np.isfinite(v):
            d = v - mu
            q += d * d
    return n, mu, q


@njit(nogil=True, cache=True)
def _chunk_update(x, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad):
    """Two-pass moments of ``x[r_lo:r_hi, :ncols]`` merged into columns ``col0:col0+ncols``."""
    if r_hi <= r_lo:
        return
    s = np.zeros(ncols, dtype=np.float64)
    for r in range(r_lo, r_hi):
        for j in range(ncols):
            s[j] += x[r, j]
    _chunk_finish(x, s, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad)


@njit(nogil=True, cache=True)
def _chunk_finish(x, s, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad):
    """Second pass and merge of :func:`_chunk_update`, given the column sums ``s``."""
    nb = np.float64(r_hi - r_lo)
    mu = s / nb
    q = np.zeros(ncols, dtype=np.float64)
    for r in range(r_lo, r_hi):
        for j in range(ncols):
            d = x[r, j] - mu[j]
            q[j] += d * d
    for j in range(ncols):
        if np.isfinite(s[j]) and np.isfinite(q[j]):
            _merge_col(count, mean, m2, col0 + j, nb, mu[j], q[j])
        elif omit:
            n, m, qq = _masked_col(x, r_lo, r_hi, j)
            n_omit[col0 + j] += nb - n
            _merge_col(count, mean, m2, col0 + j, n, m, qq)
        else:
            bad[col0 + j] = 1


@njit(parallel=True, nogil=True, cache=True)
def moments_chunks(
    buf, offsets, rows_c, cols_c, n_params, r_lo, r_hi, count, mean, m2, omit, n_omit, bad,
    ubuf, row_info, p_total, sums,
):
    """Update moments from rows of one row of chunks mapped straight from the file.

    One call per chunk row (rows of many consecutive ``write`` calls together), so reduce
    costs what its bytes cost, not what its number of writes costs.

    Parameters
    ----------
    buf : 1-D float32 array
        The whole file (a memory map), viewed as float32 elements.
    offsets : 1-D int64 array
        Element offset in ``buf`` of each column chunk of this chunk row.
    rows_c, cols_c : int
        Chunk shape; every stored chunk holds ``rows_c * cols_c`` elements, row-major.
    n_params : int
        P; the last column chunk holds ``P - c * cols_c`` valid columns.
    r_lo, r_hi : int
        Rows of the chunk row that belong to the record.
    count, mean, m2 : (P,) float64
        Running accumulators, updated in place.
    omit : bool
        Drop non-finite values per parameter (counted in ``n_omit``) instead of flagging
        the column in ``bad``.
    ubuf : 1-D uint32 array
        ``buf`` viewed as raw bits, for the segment checksum (:func:`checksum_rows`).
    row_info : (2, r_hi - r_lo) int64
        Per row: ``row_info[0]`` the checksum position of element ``(r, 0)`` of the first
        chunk in its segment, ``row_info[1]`` its segment's local index (nondecreasing,
        from 0). Rows may belong to several segments; each segment is checksummed apart.
    p_total : int
        The record's full width P (a column block of a Dask task is narrower).
    sums : (n_chunks, n_segments, 2) uint64
        Checksum sums of each chunk's rows per segment, accumulated (zero them first).
        Computed while the chunk is still in cache from the two passes, so verifying costs
        no extra trip to memory.
    """
    for c in prange(offsets.shape[0]):
        col0 = c * cols_c
        ncols = min(cols_c, n_params - col0)
        o = offsets[c]
        x = buf[o : o + rows_c * cols_c].reshape((rows_c, cols_c))
        u = ubuf[o : o + rows_c * cols_c].reshape((rows_c, cols_c))
        _chunk_update_rows(x, u, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad,
                           row_info[0], row_info[1], sums, c)


_MASK32 = np.uint64(0xFFFFFFFF)


@njit(nogil=True, cache=True)
def _checksum_block(u, r_lo, r_hi, ncols, pos0, p_total):
    """Checksum sums of ``u[r_lo:r_hi, :ncols]``; element ``(r, j)`` sits at position
    ``pos0 + (r - r_lo) * p_total + j`` of its segment."""
    s1 = np.uint64(0)
    t = np.uint64(0)
    for r in range(r_lo, r_hi):
        base = np.uint64(pos0 + (r - r_lo) * p_total)
        for j in range(ncols):
            v = np.uint64(u[r, j])
            s1 += v
            # (w + 1) v summed as Σ w v + Σ v: w and v both fit in 32 bits, so the product
            # is one 32x32->64 multiply, which vectorises (a full 64-bit one does not)
            t += ((base + np.uint64(j)) & _MASK32) * v
    return s1, t + s1


@njit(nogil=True, cache=True)
def _chunk_update_rows(x, u, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad,
                       row_pos, row_seg, sums, c):
    """:func:`_chunk_update` that also adds the checksum sums of the rows' raw bits ``u``
    to ``sums[c, row_seg[r - r_lo]]``; row ``r`` has checksum position
    ``row_pos[r - r_lo] + col0`` in its segment (local index ``row_seg``, nondecreasing).

    Each row is checksummed right after the first pass has summed it, while it is in L1
    (a separate pass over a 2 MiB chunk afterwards came from L3 and cost ~15 % of reduce).
    """
    if r_hi <= r_lo:
        return
    s = np.zeros(ncols, dtype=np.float64)
    s1 = np.uint64(0)
    t = np.uint64(0)
    cur = row_seg[0]
    for r in range(r_lo, r_hi):
        k = row_seg[r - r_lo]
        if k != cur:  # flush the finished segment's sums
            sums[c, cur, 0] += s1
            sums[c, cur, 1] += t + s1
            s1 = np.uint64(0)
            t = np.uint64(0)
            cur = k
        for j in range(ncols):
            s[j] += x[r, j]
        base = np.uint64(row_pos[r - r_lo] + col0)
        for j in range(ncols):
            v = np.uint64(u[r, j])
            s1 += v
            t += ((base + np.uint64(j)) & _MASK32) * v  # see _checksum_block
    sums[c, cur, 0] += s1
    sums[c, cur, 1] += t + s1
    _chunk_finish(x, s, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad)


@njit(nogil=True, cache=True)
def checksum_rows_segmented(u, row_pos, row_seg, n_seg, p_total):
    """Checksum sums ``(n_seg, 2)`` of rows ``u`` ``(n, w)`` that belong to consecutive
    segments: row ``r`` starts at position ``row_pos[r]`` of segment ``row_seg[r]``
    (local index). Same sums as :func:`checksum_rows` per segment."""
    out = np.zeros((n_seg, 2), dtype=np.uint64)
    for r in range(u.shape[0]):
        s1, s2 = _checksum_block(u, r, r + 1, u.shape[1], row_pos[r], p_total)
        k = row_seg[r]
        out[k, 0] += s1
        out[k, 1] += s2
    return out


@njit(nogil=True, cache=True)
def checksum_rows_serial(u, pos0, p_total):
    """:func:`checksum_rows` on the calling thread (no Numba thread pool)."""
    return _checksum_block(u, 0, u.shape[0], u.shape[1], pos0, p_total)


@njit(parallel=True, nogil=True, cache=True)
def checksum_rows(u, pos0, p_total):
    """Segment checksum of the raw bits ``u`` ``(n, w)`` (uint32 for float32, uint16 for float16).

    With ``p_k`` the position of value ``k`` in its segment (row-major over ``(n, P)``) and
    ``u_k`` its bits,

    .. math::

        S_1 = \\sum_k u_k \\bmod 2^{64}, \\qquad
        S_2 = \\sum_k \\big((p_k \\bmod 2^{32}) + 1\\big)\\, u_k \\bmod 2^{64}.

    Why this sum and not a CRC: it is additive over any partition of the segment into rows,
    chunks, column blocks and threads, so the reduce kernel computes it on the chunks it
    maps, in any order, at memory speed; any change of one value changes ``S_1``, and moving
    values changes ``S_2``. It detects damage, not tampering. ``pos0`` is the position of
    ``u[0, 0]``, ``p_total`` the segment's row width P.

    Returns
    -------
    (uint64, uint64)
    """
    n = u.shape[0]
    w = u.shape[1]
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    for r in prange(n):
        a, b = _checksum_block(u[r : r + 1], 0, 1, w, pos0 + r * p_total, p_total)
        s1 += a
        s2 += b
    return s1, s2


@njit(parallel=True, nogil=True, cache=True)
def moments_block(x, col_step, col0, count, mean, m2, omit, n_omit, bad):
    """Update moments of columns ``col0 : col0 + x.shape[1]`` from an in-memory block.

    The block is cut into column groups of ``col_step`` (the store's chunk width), so the
    arithmetic is the same as :func:`moments_chunks` on the same rows.
    """
    ncol = x.shape[1]
    ngroups = (ncol + col_step - 1) // col_step
    for g in prange(ngroups):
        a = g * col_step
        b = min(ncol, a + col_step)
        _chunk_update(x[:, a:b], 0, x.shape[0], b - a, col0 + a, count, mean, m2, omit, n_omit,
                      bad)


def merge_moments(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan merge of two partial moments ``(count, mean, m2)``; arrays broadcast.

    Empty partials (count 0) are neutral, whatever their mean holds.
    """
    na, ma, qa = (np.asarray(v, dtype=np.float64) for v in a)
    nb, mb, qb = (np.asarray(v, dtype=np.float64) for v in b)
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(nb > 0, mb, 0.0) - np.where(na > 0, ma, 0.0)
        wb = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
        mean = np.where(na > 0, ma, 0.0) + delta * wb
        m2 = (np.where(na > 0, qa, 0.0) + np.where(nb > 0, qb, 0.0)
              + delta * delta * na * wb)
    mean = np.where(n > 0, mean, np.nan)
    m2 = np.where(n > 0, m2, np.nan)
    return n, mean, m2


def finalize_moments(
    count: np.ndarray, mean: np.ndarray, m2: np.ndarray, ddof: int
) -> dict[str, np.ndarray]:
    """Variance, GSNR and debiased GSNR from moments (the DESIGN §1 table)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = count - ddof
        var = np.where(dof > 0, m2 / np.where(dof > 0, dof, 1.0), np.nan)
        # M2 of a constant column may come out as a tiny positive round-off; it is exact zero
        # when every sample is equal, which the two-pass kernel reproduces exactly.
        msq = mean * mean
        gsnr = np.where(var > 0, msq / np.where(var > 0, var, 1.0),
                        np.where(var == 0, np.where(msq > 0, np.inf, np.nan), np.nan))
        gsnr_deb = gsnr - 1.0 / np.where(count > 0, count, np.nan)
    return {"var": var, "gsnr": gsnr, "gsnr_debiased": gsnr_deb}


# -- subset sums of the first-order OSGR estimator ------------------------------------


@njit(parallel=True, nogil=True, cache=True)
def subset_sums(x, row0, row_ptr, members, acc, col_block):  # pragma: no cover - numba
    """Add the rows of chunk ``x`` into the sums of the subsets holding them, in place.

    .. math::

        \\mathrm{acc}_{kj} \\mathrel{+}= \\sum_{r:\\; k \\in M(\\mathrm{row0} + r)} x_{rj},
        \\qquad M(i) = \\mathrm{members}[\\mathrm{row\\_ptr}_i : \\mathrm{row\\_ptr}_{i+1}] .

    Parameters
    ----------
    x : (n_rows, P) float array
        Record rows ``row0 .. row0 + n_rows``.
    row0 : int
        Record row of ``x[0]``.
    row_ptr, members : int64 arrays
        CSR map: record row ``i`` belongs to subsets ``members[row_ptr[i]:row_ptr[i+1]]``.
    acc : (n_subsets, P) float64 array
        Subset sums, updated in place.
    col_block : int
        Columns per parallel task.

    Notes
    -----
    Parallel over column blocks (a block of all subsets' sums, ``K · col_block`` doubles,
    stays in cache), each column accumulated in row order, so the result does not depend
    on the thread count.
    """
    n_rows, P = x.shape
    nb = (P + col_block - 1) // col_block
    for b in prange(nb):
        a = b * col_block
        e = min(P, a + col_block)
        w = e - a
        for r in range(n_rows):
            lo = row_ptr[row0 + r]
            hi = row_ptr[row0 + r + 1]
            if lo == hi:
                continue
            xr = x[r, a:e]
            for idx in range(lo, hi):
                # a 1-D slice per subset lets LLVM vectorize the add (4x faster than acc[k, j])
                ak = acc[members[idx], a:e]
                for j in range(w):
                    ak[j] += xr[j]


# -- factored weights: moments of g_i = Σ_t δ_it a_itᵀ from the factors ----------------


@njit(nogil=True, cache=True)
def _fac_zero(d, fin, i, o, T):
    """Whether sample ``i``'s row ``o`` is exactly zero: every ``d[i, t, o]`` is 0 and its
    ``a`` rows are finite (``0 · inf`` is NaN in the materialised product, so not zero)."""
    if not fin[i]:
        return False
    for t in range(T):
        if d[i, t, o] != 0.0:
            return False
    return True


@njit(nogil=True, cache=True)
def _fac_masked(a, d, b0, b1, o, j, T):
    """Two-pass moments of the finite values of entry ``(o, j)`` over rows ``[b0, b1)``
    (the rare, slow path; ``j < 0``: the bias ``Σ_t d[i, t, o]``)."""
    n = 0.0
    s = 0.0
    for i in range(b0, b1):
        v = 0.0
        for t in range(T):
            v += np.float64(d[i, t, o]) * (np.float64(a[i, t, j]) if j >= 0 else 1.0)
        if np.isfinite(v):
            s += v
            n += 1.0
    if n == 0.0:
        return 0.0, 0.0, 0.0
    mu = s / n
    q = 0.0
    for i in range(b0, b1):
        v = 0.0
        for t in range(T):
            v += np.float64(d[i, t, o]) * (np.float64(a[i, t, j]) if j >= 0 else 1.0)
        if np.isfinite(v):
            e = v - mu
            q += e * e
    return n, mu, q


@njit(nogil=True, cache=True)
def _fac_constant(a, d, b0, b1, o, j, T):
    """Whether entry ``(o, j)`` of every sample in ``[b0, b1)`` equals the first's, exactly."""
    g0 = 0.0
    for t in range(T):
        g0 += np.float64(d[b0, t, o]) * a[b0, t, j]
    for i in range(b0 + 1, b1):
        v = 0.0
        for t in range(T):
            v += np.float64(d[i, t, o]) * a[i, t, j]
        if v != g0:
            return False
    return True


@njit(nogil=True, cache=True, fastmath={"contract"})
def _fac_weight_row(a, d, fin, b0, b1, o, n_in, T, count, mean, m2, omit, n_omit, bad,
                    ptr, idx, sparse):
    """Two-pass moments of row ``o`` (entries ``o·in .. o·in + in``) over rows ``[b0, b1)``,
    Chan-merged into the accumulators.

    Compiled with ``fastmath={"contract"}`` only: ``d·a − mean`` and ``q + e·e`` become
    fused multiply-adds (one rounding instead of two: as exact or more), no reassociation.

    Exactly-zero products are counted, not formed: a sample whose ``δ_i·o`` is 0 (a dead
    ReLU unit, with a finite ``a_i``) and, with ``sparse`` (T = 1, ``ptr``/``idx`` the
    nonzero columns of each ``a_i``), every ``a_ij = 0``. Each deviates by ``−mean``
    exactly, so ``M2`` gains ``(n_b − c_j)·mean_j²`` for the ``c_j`` products formed.
    """
    nb = np.float64(b1 - b0)
    # fresh scratch rows, not arguments: LLVM vectorises the loops only when it knows
    # they alias nothing (passed in, the dense path ran 3x slower)
    s = np.zeros(n_in)
    q = np.zeros(n_in)
    cnt = np.zeros(n_in)
    if sparse:
        for i in range(b0, b1):
            if not np.isfinite(d[i, 0, o]):
                sparse = False  # 0·inf is NaN in the product: the dense path forms it
                break
    if sparse:
        for i in range(b0, b1):
            dv = np.float64(d[i, 0, o])
            if dv == 0.0 and fin[i]:
                continue
            ai = a[i, 0]
            for k in range(ptr[i], ptr[i + 1]):
                j = idx[k]
                s[j] += dv * ai[j]
                cnt[j] += 1.0
        for j in range(n_in):
            s[j] /= nb  # the mean, from here on
        for i in range(b0, b1):
            dv = np.float64(d[i, 0, o])
            if dv == 0.0 and fin[i]:
                continue
            ai = a[i, 0]
            for k in range(ptr[i], ptr[i + 1]):
                j = idx[k]
                e = dv * ai[j] - s[j]
                q[j] += e * e
    elif T == 1:  # the common MLP case: rows taken 4 at a time, a quarter of the s/q traffic
        live = np.empty(b1 - b0, dtype=np.int64)  # the samples whose product is not zero
        m = 0
        for i in range(b0, b1):
            if not _fac_zero(d, fin, i, o, 1):
                live[m] = i
                m += 1
        # 1-D row views, not a[i, 0, j]: with 3-D indexing the loops did not vectorise (3x)
        k = 0
        while k + 4 <= m:
            i0, i1, i2, i3 = live[k], live[k + 1], live[k + 2], live[k + 3]
            d0, d1 = np.float64(d[i0, 0, o]), np.float64(d[i1, 0, o])
            d2, d3 = np.float64(d[i2, 0, o]), np.float64(d[i3, 0, o])
            a0, a1, a2, a3 = a[i0, 0], a[i1, 0], a[i2, 0], a[i3, 0]
            for j in range(n_in):
                s[j] += (d0 * a0[j] + d1 * a1[j]) + (d2 * a2[j] + d3 * a3[j])
            k += 4
        for kk in range(k, m):
            dv = np.float64(d[live[kk], 0, o])
            a0 = a[live[kk], 0]
            for j in range(n_in):
                s[j] += dv * a0[j]
        for j in range(n_in):
            s[j] /= nb
            cnt[j] = m
        k = 0
        while k + 4 <= m:
            i0, i1, i2, i3 = live[k], live[k + 1], live[k + 2], live[k + 3]
            d0, d1 = np.float64(d[i0, 0, o]), np.float64(d[i1, 0, o])
            d2, d3 = np.float64(d[i2, 0, o]), np.float64(d[i3, 0, o])
            a0, a1, a2, a3 = a[i0, 0], a[i1, 0], a[i2, 0], a[i3, 0]
            for j in range(n_in):
                mu = s[j]
                e0 = d0 * a0[j] - mu
                e1 = d1 * a1[j] - mu
                e2 = d2 * a2[j] - mu
                e3 = d3 * a3[j] - mu
                q[j] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
            k += 4
        for kk in range(k, m):
            dv = np.float64(d[live[kk], 0, o])
            a0 = a[live[kk], 0]
            for j in range(n_in):
                e = dv * a0[j] - s[j]
                q[j] += e * e
    else:
        nz = 0.0
        g = np.empty(n_in)
        for i in range(b0, b1):
            if _fac_zero(d, fin, i, o, T):
                nz += 1.0
                continue
            # g_i first, then into the sum: the same rounding of Σ_t (t in order) as the
            # second pass's; the scratch row is this function's own (through a helper,
            # LLVM could not rule out aliasing: 1.7x slower)
            for j in range(n_in):
                g[j] = 0.0
            for t in range(T):
                dv = np.float64(d[i, t, o])
                at = a[i, t]
                for j in range(n_in):
                    g[j] += dv * at[j]
            for j in range(n_in):
                s[j] += g[j]
        for j in range(n_in):
            s[j] /= nb
            cnt[j] = nb - nz
        for i in range(b0, b1):
            if _fac_zero(d, fin, i, o, T):
                continue
            for j in range(n_in):
                g[j] = 0.0
            for t in range(T):
                dv = np.float64(d[i, t, o])
                at = a[i, t]
                for j in range(n_in):
                    g[j] += dv * at[j]
            for j in range(n_in):
                e = g[j] - s[j]
                q[j] += e * e
    base = o * n_in
    # a sum of nb exact products rounds (|s/nb − g| ≤ nb·eps·|g| when every g is equal),
    # so a constant entry would get M2 ~ nb³eps²g² instead of the materialised store's 0
    tiny = 4.0 * nb * nb * nb * 1.3e-32  # 4 nb³ eps², eps = 2^-53
    for j in range(n_in):
        mj = s[j]
        qj = q[j] + (nb - cnt[j]) * (mj * mj)  # the zero products: each deviates by -mean
        if 0.0 < qj <= tiny * mj * mj and _fac_constant(a, d, b0, b1, o, j, T):
            g0 = 0.0
            for t in range(T):
                g0 += np.float64(d[b0, t, o]) * a[b0, t, j]
            mj = g0
            qj = 0.0
        if np.isfinite(mj) and np.isfinite(qj):
            _merge_col(count, mean, m2, base + j, nb, mj, qj)
        elif omit:
            n, m, qq = _fac_masked(a, d, b0, b1, o, j, T)
            n_omit[base + j] += nb - n
            _merge_col(count, mean, m2, base + j, n, m, qq)
        else:
            bad[base + j] = 1


@njit(nogil=True, cache=True)
def _fac_bias(d, b0, b1, o, T, count, mean, m2, omit, n_omit, bad):
    """Two-pass moments of bias entry ``o``, ``Σ_t d[i, t, o]``, over rows ``[b0, b1)``."""
    nb = np.float64(b1 - b0)
    s = 0.0
    for i in range(b0, b1):
        for t in range(T):
            s += np.float64(d[i, t, o])
    mu = s / nb
    q = 0.0
    for i in range(b0, b1):
        v = 0.0
        for t in range(T):
            v += np.float64(d[i, t, o])
        e = v - mu
        q += e * e
    if np.isfinite(s) and np.isfinite(q):
        _merge_col(count, mean, m2, o, nb, mu, q)
    elif omit:
        n, m, qq = _fac_masked(d, d, b0, b1, o, -1, T)
        n_omit[o] += nb - n
        _merge_col(count, mean, m2, o, n, m, qq)
    else:
        bad[o] = 1


@njit(nogil=True, cache=True)
def _rows_finite(a, b0, b1, fin):
    for i in range(b0, b1):
        ok = True
        for t in range(a.shape[1]):
            for j in range(a.shape[2]):
                if not np.isfinite(a[i, t, j]):
                    ok = False
        fin[i] = ok


@njit(nogil=True, cache=True)
def _nonzeros(a, r_lo, r_hi):
    """CSR of the nonzero columns of rows ``a[i, 0, :]``, ``i`` in ``[r_lo, r_hi)``
    (``ptr`` indexed by ``i``; rows outside the range are empty)."""
    n_in = a.shape[2]
    ptr = np.zeros(a.shape[0] + 1, dtype=np.int64)
    for i in range(r_lo, r_hi):
        c = 0
        for j in range(n_in):
            if a[i, 0, j] != 0:
                c += 1
        ptr[i + 1] = c
    for i in range(a.shape[0]):
        ptr[i + 1] += ptr[i]
    idx = np.empty(ptr[-1], dtype=np.int64)
    for i in range(r_lo, r_hi):
        k = ptr[i]
        for j in range(n_in):
            if a[i, 0, j] != 0:
                idx[k] = j
                k += 1
    return ptr, idx


@njit(parallel=True, nogil=True, cache=True)
def factored_moments(
    a, d, r_lo, r_hi, row_block, count, mean, m2, omit, n_omit, bad,
    bcount, bmean, bm2, bn_omit, bbad,
):
    """Update the moments of a factored weight (and its bias) from its factors, exactly.

    Sample ``i``'s gradient of a weight ``W`` ``(out, in)`` is
    ``g_i = Σ_t δ_it a_itᵀ`` and of its bias ``b_i = Σ_t δ_it``; for entry ``(o, j)``

    .. math::

        \\bar g_{oj} = \\frac{1}{n_b}\\sum_{i \\in b} \\sum_t \\delta_{ito} a_{itj}, \\qquad
        \\mathrm{M2}_{oj} = \\sum_{i \\in b} \\Big(\\sum_t \\delta_{ito} a_{itj}
                            - \\bar g_{oj}\\Big)^2

    per row block ``b`` of ``row_block`` samples, in float64 (a product of float32 factors
    is exact in float64), then Chan-merged into the accumulators like
    :func:`moments_chunks`. Why two passes and not the Gram form
    ``(Δ∘Δ)ᵀ(A∘A) − n m²``: that is the one-pass formula, which loses every digit when
    ``|mean| ≫ std``; recomputing ``g_i`` costs a few flops per entry on factors that stay
    in cache, which is still less than reading the materialised float32 product. No
    ``n × P`` array is ever formed.

    Parameters
    ----------
    a : (n, T, in) float32 or float64
        Input factor rows (zero rows pad shorter sequences exactly).
    d : (n, T, out) float32 or float64
        Output-gradient factor rows.
    r_lo, r_hi : int
        Samples ``[r_lo, r_hi)`` of ``a``/``d`` to add.
    row_block : int
        Samples per two-pass block: ``row_block · T · in`` values of ``a`` should fit in L2.
    count, mean, m2 : (out · in,) float64
        Accumulators of the weight entries, row-major ``(out, in)``, updated in place.
    omit : bool
        Non-finite ``g_ioj`` are dropped per entry and counted in ``n_omit`` (exactly the
        plain kernel's per-parameter rule applied to the materialised product), instead of
        setting ``bad``.
    n_omit, bad : (out · in,) float64, int64
        As in :func:`moments_chunks`.
    bcount, bmean, bm2, bn_omit, bbad : (out,) or (0,) arrays
        The same for the bias ``Σ_t δ_it``; empty arrays: no bias.

    Notes
    -----
    Parallel over groups of output rows (one parallel region per call: a region per row
    block waited, at every block, for a thread the OS had descheduled); a group walks the
    row blocks and reuses each block's ``a`` rows from cache for all its rows ``o``. Each
    entry is reduced in sample order, so results do not depend on the thread count.
    Exactly-zero products (a dead ReLU unit's ``δ_io = 0``; with ``T = 1``, zero inputs
    ``a_ij`` in blocks where at most 1/32 of ``a`` is nonzero: one-hot inputs) are counted
    instead of formed (:func:`_fac_weight_row`); which blocks take the sparse path depends
    on the data only.
    """
    T = a.shape[1]
    n_in = a.shape[2]
    n_out = d.shape[2]
    with_bias = bcount.shape[0] > 0
    step = max(1, row_block)
    fin = np.ones(a.shape[0], dtype=np.bool_)
    _rows_finite(a, r_lo, r_hi, fin)
    n_blk = max(0, -(-(r_hi - r_lo) // step))
    sparse = np.zeros(n_blk, dtype=np.bool_)
    if T == 1 and n_in > 0:
        ptr, idx = _nonzeros(a, r_lo, r_hi)
        for b in range(n_blk):
            b0 = r_lo + b * step
            b1 = min(r_hi, b0 + step)
            # a scattered add costs ~16-32x a vectorised one: worth it below 1/32 nonzero
            sparse[b] = 32 * (ptr[b1] - ptr[b0]) <= (b1 - b0) * n_in
    else:
        ptr, idx = np.zeros(a.shape[0] + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    group = 8
    n_grp = -(-n_out // group)
    for gi in prange(n_grp):
        for b in range(n_blk):
            b0 = r_lo + b * step
            b1 = min(r_hi, b0 + step)
            for o in range(gi * group, min(n_out, (gi + 1) * group)):
                _fac_weight_row(a, d, fin, b0, b1, o, n_in, T, count, mean, m2, omit, n_omit,
                                bad, ptr, idx, sparse[b])
                if with_bias:
                    _fac_bias(d, b0, b1, o, T, bcount, bmean, bm2, omit, bn_omit, bbad)


def factored_row_block(t: int, n_in: int, itemsize: int, cache_bytes: int = 1 << 22) -> int:
    """Samples per two-pass block of :func:`factored_moments`: the block's ``a`` rows
    (``rows · t · in · itemsize`` bytes) fill about ``cache_bytes``, at most 1024 rows.

    Why this large (L3, not L2): each ``(row o, block)`` pays a fixed cost (scratch rows,
    the Chan merge of ``in`` entries) that at 83 rows (L2-sized) made the MLP reduce 1.6x
    slower, while the block's rows stream from L3 at a fraction of the arithmetic's time.
    """
    per = max(1, int(t) * int(n_in) * int(itemsize))
    return int(min(1024, max(8, cache_bytes // per)))


# -- in-training moments from a batch's closed-form sums -------------------------------


@njit(nogil=True, cache=True, error_model="numpy")  # no per-element zero-division check
def merge_closed_form(s1, s2, n, scale, na, bound, mean, m2, bad):  # pragma: no cover - numba
    """Merge one batch's closed-form moments into running ones; flag the unsafe elements.

    ``s1`` and ``s2`` (1-D, contiguous, float32 or float64) are ``Σ_i g_i / c`` and
    ``Σ_i g_i² / c²`` of a batch of ``n`` samples (``c = scale``, the per-sample factor of
    a mean-reduced loss). Per element, in float64:

    .. math:: \\bar g_b = c\\,s_1/n,\\quad M2_b = c^2 (s_2 - s_1^2/n),

    kept only where ``s_2 - s_1^2/n >= bound · s_2`` (``bound`` = the closed form's relative
    error bound over the tolerance, see ``adapters/_torch_hooks.py``), then Chan-merged into
    ``mean``/``m2`` (float64, running count ``na``). Other elements (high GSNR) are left
    untouched (a zero update) with ``bad`` set: the caller recomputes them exactly; a
    non-finite sum is flagged too (and leaves its element non-finite: the caller raises).
    One pass, serial (the training step owns the threads), branch-free so that it
    vectorises. Returns the number flagged.
    """
    tot = na + n
    w = n / tot
    naw = na * w
    sc2 = scale * scale
    inv = 1.0 / n
    cinv = scale * inv
    nbad = 0
    for j in range(s1.shape[0]):
        a = np.float64(s1[j])
        b = np.float64(s2[j])
        q = b - a * a * inv
        ok = q >= b * bound  # NaN-safe: a non-finite sum is flagged
        bad[j] = not ok
        nbad += np.int64(not ok)
        mj = mean[j]
        d = a * cinv - mj
        okf = 1.0 if ok else 0.0
        mean[j] = mj + okf * (d * w)
        m2[j] = m2[j] + okf * (max(q, 0.0) * sc2 + d * d * naw)
    return nbad
