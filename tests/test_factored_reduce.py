"""Moments of factored weights (issue 15): the kernel on the factors against a float64
two-pass over the products materialised in float64 (``np.einsum``), then ``gs.reduce`` of
factored stores against the same reference and against the materialised store."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsnr_stats import kernels


def products(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per-sample weight gradients ``Σ_t δ_t a_tᵀ`` in float64, ``(n, out·in)`` row-major."""
    g = np.einsum("nto,nti->noi", d.astype(np.float64), a.astype(np.float64))
    return g.reshape(g.shape[0], -1)


def ref_moments(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 two-pass: mean and M2 per column."""
    g = np.asarray(g, dtype=np.float64)
    m = g.sum(axis=0) / g.shape[0]
    return m, ((g - m) ** 2).sum(axis=0)


def run_kernel(a, d, *, segments=None, row_block=16, omit=False, bias=True):
    """The kernel over consecutive sample segments, Chan-merged (as the engine calls it)."""
    n, _, n_in = a.shape
    n_out = d.shape[2]
    P = n_out * n_in
    acc = [np.zeros(P) for _ in range(3)]
    n_omit, bad = np.zeros(P), np.zeros(P, np.int64)
    nb = n_out if bias else 0
    bacc = [np.zeros(nb) for _ in range(3)]
    b_omit, b_bad = np.zeros(nb), np.zeros(nb, np.int64)
    cuts = [0, *(segments or []), n]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        kernels.factored_moments(a, d, lo, hi, row_block, *acc, omit, n_omit, bad,
                                 *bacc, b_omit, b_bad)
    return acc, n_omit, bad, bacc, b_omit, b_bad


def factors(rng, n, T, n_in, n_out, dtype=np.float32, loc=0.0, scale=1.0, zero_frac=0.3):
    a = (loc + scale * rng.standard_normal((n, T, n_in))).astype(dtype)
    d = (loc + scale * rng.standard_normal((n, T, n_out))).astype(dtype)
    d[rng.random((n, T, n_out)) < zero_frac] = 0  # dead ReLU units: the zero-row path
    return a, d


def assert_moments(acc, g, rtol=1e-12):
    m, q = ref_moments(g)
    count, mean, m2 = acc
    assert (count == g.shape[0]).all()
    scale_m = np.abs(g).max(axis=0) + 1e-300  # entries whose mean cancels to ~0
    np.testing.assert_array_less(np.abs(mean - m), rtol * scale_m + 1e-300)
    np.testing.assert_allclose(m2, q, rtol=rtol, atol=1e-300)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 70), T=st.integers(1, 4), n_in=st.integers(1, 19),
       n_out=st.integers(1, 9), dtype=st.sampled_from([np.float32, np.float64]),
       row_block=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_kernel_matches_float64_two_pass_of_products(n, T, n_in, n_out, dtype, row_block, seed):
    rng = np.random.default_rng(seed)
    a, d = factors(rng, n, T, n_in, n_out, dtype)
    acc, n_omit, bad, bacc, _, b_bad = run_kernel(a, d, row_block=row_block)
    assert not bad.any() and not b_bad.any() and not n_omit.any()
    assert_moments(acc, products(a, d))
    assert_moments(bacc, d.astype(np.float64).sum(axis=1))


@pytest.mark.parametrize("T", [1, 5])
def test_kernel_large_mean_small_std(T):
    """|mean| = 1e4·std: the Gram form (Δ∘Δ)ᵀ(A∘A) − n m² would lose every digit."""
    rng = np.random.default_rng(3)
    n, n_in, n_out = 3000, 11, 6
    a = (1.0 + 1e-4 * rng.standard_normal((n, T, n_in))).astype(np.float32)
    d = (1e2 * (1.0 + 1e-4 * rng.standard_normal((n, T, n_out)))).astype(np.float32)
    a[:, :, 0] = 2.0  # with d constant too: entries (2, 0) constant, variance exactly 0
    d[:, :, 2] = np.float32(0.3)
    g = products(a, d)
    m, q = ref_moments(g)
    std = np.sqrt(q / (n - 1))
    ok = std > 0
    assert np.median(np.abs(m[ok]) / std[ok]) > 5e3  # the regime the test is about
    acc, *_ = run_kernel(a, d, row_block=64, bias=False)
    assert_moments(acc, g)
    const = 2 * n_in + 0
    assert acc[2][const] == 0.0 and q[const] == 0.0  # as the materialised store gives
    one_pass = (g * g).sum(axis=0) - n * m * m
    assert np.abs(one_pass[ok] - q[ok]).max() / q[ok].min() > 1e-6  # why two passes


def test_kernel_independent_of_segmenting_and_row_block():
    rng = np.random.default_rng(5)
    a, d = factors(rng, 211, 2, 17, 8, loc=3.0)
    g = products(a, d)
    for segs, rb in (([], 300), ([1, 2, 100], 7), (list(range(5, 211, 5)), 1), ([210], 64)):
        acc, *_, bacc, _, _ = run_kernel(a, d, segments=segs, row_block=rb)
        assert_moments(acc, g)
        assert_moments(bacc, d.astype(np.float64).sum(axis=1))


def test_kernel_same_bits_for_any_thread_count():
    import numba

    rng = np.random.default_rng(6)
    a, d = factors(rng, 120, 1, 33, 40)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, *_ = run_kernel(a, d)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many, *_ = run_kernel(a, d)
    finally:
        numba.set_num_threads(old)
    for x, y in zip(one, many, strict=True):
        assert np.array_equal(x, y)


def test_kernel_nonfinite_flags_or_omits_exactly_the_materialised_entries():
    """A non-finite factor value makes exactly the product entries it touches non-finite
    (``0·inf`` is NaN too); 'omit' drops those samples from those entries only, like the
    plain kernel on the materialised rows."""
    rng = np.random.default_rng(7)
    n, T, n_in, n_out = 40, 2, 6, 5
    a, d = factors(rng, n, T, n_in, n_out, np.float64)
    a[3, 1, 2] = np.nan
    d[10, 0, 4] = np.inf
    d[11, :, 1] = 0.0
    a[11, 0, 5] = np.inf  # 0·inf: NaN in the product, not a zero row
    with np.errstate(invalid="ignore"):
        g = products(a, d)
    nonfin = ~np.isfinite(g)
    acc, n_omit, bad, bacc, b_omit, b_bad = run_kernel(a, d, omit=False)
    assert set(np.flatnonzero(bad)) == set(np.flatnonzero(nonfin.any(axis=0)))
    assert list(np.flatnonzero(b_bad)) == [4]
    acc, n_omit, bad, bacc, b_omit, b_bad = run_kernel(a, d, omit=True)
    assert not bad.any() and not b_bad.any()
    np.testing.assert_array_equal(n_omit, nonfin.sum(axis=0))
    for j in range(g.shape[1]):
        col = g[np.isfinite(g[:, j]), j]
        m, q = ref_moments(col[:, None])
        assert acc[0][j] == col.size
        np.testing.assert_allclose([acc[1][j], acc[2][j]], [m[0], q[0]], rtol=1e-12, atol=1e-14)
    bsum = d.sum(axis=1)
    assert b_omit.tolist() == [0, 0, 0, 0, 1]
    col = bsum[np.isfinite(bsum[:, 4]), 4]
    np.testing.assert_allclose(bacc[1][4], col.mean(), rtol=1e-12)
