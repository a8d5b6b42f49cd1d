"""First-order OSGR and JL projections on factored records (issue 15) equal the same
estimators on the materialised products.

References are independent: per-sample gradients materialised here in float64 by an
explicit sum over the T rows (``_materialise``), subset sums by a plain loop, projections
by the adapters' ``JLProjection`` matrix (``adapters/_moments.py``) times those rows.

Kronecker JL variance (the bound in ``gsnr_stats/projection.py``'s ``project_record``):
with ``z = vec(R1ᵀ G R2)/√k``, ``X_ab = (r1_aᵀ G r2_b)²``, ``F = |G|_F²``,
``S = ‖GᵀG‖_F² = Σσ⁴``: ``E X_ab = F``; ``Var X_ab = 2F² + 6S`` (condition on r2:
``X = |G r2|² χ²₁``, ``E(r2ᵀMr2)² = (tr M)² + 2 tr M²``); ``Cov(X_ab, X_ab') =
Cov(X_ab, X_a'b) = 2S`` (condition on the shared column); other pairs independent. So
``Var|z|² = (k(2F² + 6S) + k(k1 + k2 − 2)·2S)/k² = (2F² + 2S(k1 + k2 + 1))/k``. Parts
(dense rows, each weight's Kronecker pair) are independent, zero mean, with covariance
``(F_p/k) I``, so cross terms add ``4 Σ_{p<q} F_p F_q / k`` and
``Var|z|² = 2|g|⁴/k + Σ_W 2 S_W (k1 + k2 + 1)/k``; the Monte Carlo test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from gsnr_stats import estimators as est
from gsnr_stats import projection as pj


@dataclass(frozen=True)
class _FI:  # the reader's FactorInfo fields that the estimators use
    weight: str
    bias: str | None
    out: int
    in_: int
    rows: int
    w_offset: int
    b_offset: int | None


def _model(rng, T):
    """A layout with plain tensors around two factored weights (one with a tied bias)."""
    o1, i1, o2 = (int(x) for x in rng.integers(2, 9, size=3))
    params = [("conv", (3, 4)), ("fc1.weight", (o1, i1)), ("fc1.bias", (o1,)),
              ("norm", (5,)), ("fc2.weight", (o2, o1))]
    sizes = [int(np.prod(s)) for _, s in params]
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    names = [n for n, _ in params]
    facs = (_FI("fc1.weight", "fc1.bias", o1, i1, T, int(offs[1]), int(offs[2])),
            _FI("fc2.weight", None, o2, o1, T, int(offs[4]), None))
    P = int(sum(sizes))
    plain = np.concatenate([np.arange(offs[0], offs[0] + 12), np.arange(offs[3], offs[3] + 5)])
    meta = pj.RecordMeta(P, plain.astype(np.int64), facs, tuple(names),
                         tuple(int(o) for o in offs), tuple(s for _, s in params))
    return meta, params


def _record(rng, meta, N, T, shift=0.0):
    """Random factored rows; sequences shorter than T are zero-padded (exact)."""
    plain = (rng.normal(size=(N, meta.plain_index.size)) + shift).astype(np.float32)
    fac = {}
    for f in meta.factors:
        A = (rng.normal(size=(N, T, f.in_)) + shift).astype(np.float32)
        D = rng.normal(size=(N, T, f.out)).astype(np.float32)
        if T > 1:
            L = rng.integers(1, T + 1, size=N)
            pad = np.arange(T)[None, :] >= L[:, None]
            A[pad] = 0.0
            D[pad] = 0.0
        fac[f.weight] = (A, D)
    return plain, fac


def _materialise(meta, plain, fac):
    """Full (N, P) float64 rows by explicit sums over t (the reference)."""
    N = plain.shape[0]
    G = np.zeros((N, meta.n_params))
    G[:, meta.plain_index] = plain
    for f in meta.factors:
        A, D = (x.astype(np.float64) for x in fac[f.weight])
        W = np.zeros((N, f.out, f.in_))
        for t in range(A.shape[1]):
            W += D[:, t, :, None] * A[:, t, None, :]
        G[:, f.w_offset:f.w_offset + f.out * f.in_] = W.reshape(N, -1)
        if f.bias is not None:
            G[:, f.b_offset:f.b_offset + f.out] = D.sum(axis=1)
    return G


def _chunks(plain, fac, r):
    N = plain.shape[0]
    return lambda: ((plain[i:i + r], {w: (A[i:i + r], D[i:i + r]) for w, (A, D) in
                                      fac.items()}) for i in range(0, N, r))


def _dense_chunks(G, r):
    return lambda: ((G[i:i + r], {}) for i in range(0, G.shape[0], r))


def _bf(Ga, Gb, sa, sb):
    num = [Gb[b].sum(0) @ Ga[a].sum(0) for a, b in zip(sa, sb, strict=True)]
    den = [Ga[a].sum(0) @ Ga[a].sum(0) for a in sa]
    return np.array(num), np.array(den)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_factored_subset_sums_equal_materialised(T, seed):
    rng = np.random.default_rng(seed)
    meta, _ = _model(rng, T)
    pa, fa = _record(rng, meta, 61, T, shift=0.2)
    pb, fb = _record(rng, meta, 47, T, shift=0.2)
    Ga, Gb = _materialise(meta, pa, fa), _materialise(meta, pb, fb)
    sa, sb = est._draw_subsets(np.random.default_rng(3), 61, 47, 9, 7)
    num, den = est._first_order_core(_chunks(pa, fa, 13), _chunks(pb, fb, 20), (61, 47), meta,
                                     sa, sb)
    rn, rd = _bf(Ga, Gb, sa, sb)
    np.testing.assert_allclose(num, rn, rtol=1e-12, atol=1e-12 * np.abs(rn).max())
    np.testing.assert_allclose(den, rd, rtol=1e-12)
    # the materialised path on the same rows gives the same numbers
    n2, d2 = est._first_order_core(_dense_chunks(Ga, 16), _dense_chunks(Gb, 16), (61, 47),
                                   meta.n_params, sa, sb)
    np.testing.assert_allclose(num, n2, rtol=1e-12, atol=1e-12 * np.abs(rn).max())
    np.testing.assert_allclose(den, d2, rtol=1e-12)
    # one pool: disjoint halves, one pass
    sa, sb = est._draw_subsets(np.random.default_rng(4), 61, None, 12, 5)
    num, den = est._first_order_core(_chunks(pa, fa, 8), None, (61, None), meta, sa, sb)
    rn, rd = _bf(Ga, Ga, sa, sb)
    np.testing.assert_allclose(num, rn, rtol=1e-12, atol=1e-12 * np.abs(rn).max())
    np.testing.assert_allclose(den, rd, rtol=1e-12)


def test_factored_subset_sums_no_plain_columns():
    """P_plain = 0 (every tensor factored): no plain accumulator at all."""
    rng = np.random.default_rng(7)
    f = _FI("w", "b", 4, 6, 2, 0, 24)
    meta = pj.RecordMeta(28, np.zeros(0, dtype=np.int64), (f,), ("w", "b"), (0, 24),
                         ((4, 6), (4,)))
    plain, fac = _record(rng, meta, 30, 2)
    G = _materialise(meta, plain, fac)
    sa, sb = est._draw_subsets(np.random.default_rng(1), 30, None, 6, 4)
    num, den = est._first_order_core(_chunks(plain, fac, 7), None, (30, None), meta, sa, sb)
    rn, rd = _bf(G, G, sa, sb)
    np.testing.assert_allclose(num, rn, rtol=1e-12, atol=1e-12 * np.abs(rn).max())
    np.testing.assert_allclose(den, rd, rtol=1e-12)


@pytest.mark.parametrize("T", [1, 4])
def test_dense_projection_of_factors_is_the_recorders_jl(T):
    """Same seed, same matrix as adapters' JLProjection: factored == materialised rows."""
    from gsnr_stats.adapters._moments import JLProjection

    rng = np.random.default_rng(11 + T)
    meta, _ = _model(rng, T)
    plain, fac = _record(rng, meta, 23, T)
    G = _materialise(meta, plain, fac)
    k = 17
    # small blocks: a block boundary falls inside a factored weight
    ref = G @ JLProjection(meta.n_params, k, seed=5, block_rows=19).matrix()
    z = pj.project_chunks(_chunks(plain, fac, 6), meta, k, 5, block_rows=19)
    np.testing.assert_allclose(z, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    zm = pj.project_chunks(_dense_chunks(G, 9), pj.RecordMeta(
        meta.n_params, np.arange(meta.n_params)), k, 5, block_rows=19)
    np.testing.assert_allclose(zm, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def _kron_ref(meta, G, k, seed, kron, weights, block_rows):
    """z from an explicit (P, k) matrix: dense rows off the weights, R1 ⊗ R2 on them."""
    R = pj.GaussianRows(meta.n_params, k, seed, block_rows)
    nb = -(-meta.n_params // block_rows)
    Rm = np.concatenate([R.block(b) for b in range(nb)], axis=0)
    for w in weights:
        j = meta.names.index(w)
        o, i = meta.shapes[j]
        R1, R2 = pj.kron_factors(seed, j, o, i, *kron)
        Rm[meta.offsets[j]:meta.offsets[j] + o * i] = np.kron(R1, R2) / np.sqrt(k)
    return G @ Rm


@pytest.mark.parametrize("T", [1, 3])
def test_kron_projection_factored_equals_materialised(T):
    rng = np.random.default_rng(21 + T)
    meta, _ = _model(rng, T)
    plain, fac = _record(rng, meta, 19, T)
    G = _materialise(meta, plain, fac)
    kron, k = (3, 4), 12
    ws = ["fc1.weight", "fc2.weight"]
    ref = _kron_ref(meta, G, k, 2, kron, ws, 7)
    z = pj.project_chunks(_chunks(plain, fac, 5), meta, k, 2, kron, None, block_rows=7)
    np.testing.assert_allclose(z, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    dm = pj.RecordMeta(meta.n_params, np.arange(meta.n_params), (), meta.names, meta.offsets,
                       meta.shapes)
    zm = pj.project_chunks(_dense_chunks(G, 4), dm, k, 2, kron, ws, block_rows=7)
    np.testing.assert_allclose(zm, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    # one weight Kronecker-projected, the other (factored) through its dense rows
    ref1 = _kron_ref(meta, G, k, 2, kron, ["fc2.weight"], 7)
    z1 = pj.project_chunks(_chunks(plain, fac, 5), meta, k, 2, kron, ["fc2.weight"],
                           block_rows=7)
    np.testing.assert_allclose(z1, ref1, rtol=1e-12, atol=1e-12 * np.abs(ref1).max())


def test_kron_projection_norm_is_unbiased_with_the_stated_variance():
    """E|z|² = |g|² and Var|z|² = 2|g|⁴/k + Σ_W 2 S_W (k1 + k2 + 1)/k over seeds."""
    rng = np.random.default_rng(0)
    T = 2
    meta, _ = _model(rng, T)
    plain, fac = _record(rng, meta, 1, T)
    G = _materialise(meta, plain, fac)[0]
    kron = (3, 5)
    k = 15
    g2 = G @ G
    S = 0.0
    for f in meta.factors:
        W = G[f.w_offset:f.w_offset + f.out * f.in_].reshape(f.out, f.in_)
        S += np.sum((W.T @ W) ** 2)
    var = 2 * g2 ** 2 / k + 2 * S * (kron[0] + kron[1] + 1) / k
    assert var <= 2 * g2 ** 2 * (kron[0] + kron[1] + 2) / k  # the docstring's bound
    n_seeds = 4000
    z2 = np.array([np.sum(pj.project_chunks(_chunks(plain, fac, 1), meta, k, s, kron) ** 2)
                   for s in range(n_seeds)])
    assert abs(z2.mean() - g2) < 5 * np.sqrt(var / n_seeds)
    # sample variance: 4000 draws of a heavy-tailed |z|^2 give ~8 % relative SE; 30 % is 4 SE
    assert abs(z2.var(ddof=1) / var - 1) < 0.3
    # and the dense projection's variance is the smaller 2|g|^4/k
    zd = np.array([np.sum(pj.project_chunks(_chunks(plain, fac, 1), meta, k, s) ** 2)
                   for s in range(n_seeds)])
    assert abs(zd.mean() - g2) < 5 * np.sqrt(2 * g2 ** 2 / k / n_seeds)
    assert abs(zd.var(ddof=1) / (2 * g2 ** 2 / k) - 1) < 0.3
