"""Shared fixtures: small stores written through the public writer."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

# Keep the suite within 2 cores and deterministic.
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message=".*os.fork.*")

import gsnr_stats as gs  # noqa: E402


def two_pass(g: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Float64 two-pass reference: mean and variance per column."""
    g = np.asarray(g, dtype=np.float64)
    m = g.sum(axis=0) / g.shape[0]
    v = ((g - m) ** 2).sum(axis=0) / (g.shape[0] - ddof)
    return m, v


# float32 error bounds (issue 10): two different float32 computations (kernels, batch
# shapes, summation orders, fast path vs vmap, framework vs ours) are never compared for
# equality nor at a float64 tolerance, only within a bound derived from these.
U32 = 2.0 ** -24  # float32 unit roundoff: fl(x) = x (1 + d), |d| <= U32 (round to nearest)
U64 = 2.0 ** -53  # float64 unit roundoff


def assert_within(got, want, bound, what: str = "") -> None:
    """``|got - want| <= bound`` elementwise (``bound`` broadcasts; a NaN fails)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    err = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    bad = ~(err <= bound)
    if bad.any():
        ratio = np.where(bad, err, 0.0) / np.maximum(bound, np.finfo(np.float64).tiny)
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.size} entries exceed their "
                             f"float32 error bound; worst |diff| / bound = {np.nanmax(ratio):.3g}")


def f32_chain_bound(G, terms: int, groups=None) -> np.ndarray:
    """Per-column bound on one float32 route's rounding error in per-sample rows ``G`` (n, P).

    Each entry ends a chain of float32 dot products and elementwise ops (forward, loss,
    backward) with ``terms`` terms in all; gamma_K ~ K u per dot product, summed along the
    chain, bounds the error by ``terms * u`` times the magnitude of the terms, taken as the
    column's largest |g| (not |g_ij|: the chain can cancel). With ``groups`` (a label per
    column, e.g. its layer, whose columns share one backward vector) the group's largest |g|:
    that also covers a column that cancels for every sample (a bias before train-mode
    BatchNorm has gradient exactly 0, its float32 value is rounding of the layer's terms).
    """
    mag = np.abs(np.asarray(G, dtype=np.float64)).max(axis=0)
    if groups is not None:
        groups = np.asarray(groups)
        for g in set(groups.tolist()):
            mag[groups == g] = mag[groups == g].max()
    return terms * U32 * mag


def f32_batch_sum_bound(G, terms: int, groups=None) -> np.ndarray:
    """Bound on |sum_i g_i - (float32 gradient of the summed loss)| per column, for ``G`` the
    (n, P) rows of one float32 route summed in float64: each row is off by <= K u colmax on
    either route (``f32_chain_bound``), and the batch gradient sums n terms in float32
    (gamma_n sum_i |g_ij| <= n u * n colmax): n (2K + n) u colmax in all."""
    n = np.shape(G)[0]
    return n * f32_chain_bound(G, 2 * terms + n, groups)


def moments_shift_bound(b, var, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on |Δmean| and |Δvar| (ddof=1) when each of ``n`` samples moves by <= ``b``:
    the mean by <= b; by Cauchy-Schwarz the variance by <= 2 sqrt(f var) b + f b², f = n/(n-1)."""
    b, f = np.asarray(b, dtype=np.float64), n / (n - 1)
    return b, 2 * np.sqrt(f * np.asarray(var, dtype=np.float64)) * b + f * b * b


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def small_store(tmp_path, rng):
    """A store with two steps x (train, test), P = 3*4 + 4 = 16."""
    path = tmp_path / "small.h5"
    params = [("fc.weight", (3, 4)), ("fc.bias", (4,))]
    data = {}
    with gs.GradientWriter(path, params, attrs={"framework": "numpy", "note": "fixture"}) as w:
        for step in (0, 10):
            for split, n in (("train", 37), ("test", 23)):
                g = rng.normal(loc=0.5, scale=1.0 + step / 10, size=(n, 16)).astype(np.float32)
                loss = rng.random(n)
                w.write(step, split, g, loss=loss, lr=0.1, epoch=step / 10)
                data[(step, split)] = (g, loss)
    return path, params, data
