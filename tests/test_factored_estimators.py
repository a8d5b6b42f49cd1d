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


@pytest.mark.parametrize("method", ["sums", "gram", "auto"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_factored_subset_sums_equal_materialised(T, seed, method):
    rng = np.random.default_rng(seed)
    meta, _ = _model(rng, T)
    pa, fa = _record(rng, meta, 61, T, shift=0.2)
    pb, fb = _record(rng, meta, 47, T, shift=0.2)
    Ga, Gb = _materialise(meta, pa, fa), _materialise(meta, pb, fb)
    sa, sb = est._draw_subsets(np.random.default_rng(3), 61, 47, 9, 7)
    num, den = est._first_order_core(_chunks(pa, fa, 13), _chunks(pb, fb, 20), (61, 47), meta,
                                     sa, sb, method=method)
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
    num, den = est._first_order_core(_chunks(pa, fa, 8), None, (61, None), meta, sa, sb,
                                     method=method)
    rn, rd = _bf(Ga, Ga, sa, sb)
    np.testing.assert_allclose(num, rn, rtol=1e-12, atol=1e-12 * np.abs(rn).max())
    np.testing.assert_allclose(den, rd, rtol=1e-12)


def test_gram_choice_follows_the_operation_count():
    """Gram for few rows against wide layers, subset sums for many rows; memory caps Gram."""
    f = _FI("w", None, 512, 784, 1, 0, None)
    meta = pj.RecordMeta(512 * 784, np.zeros(0, dtype=np.int64), (f,))
    # K = 16 pairs of n = 64 from pools of 256: Gram 256²(1296 + 32) < 2048·401408
    assert est._gram_choice(meta, (1024, 1024), (256, 256), 16, "auto", 1 << 30) == {"w"}
    # it holds 512 rows of 1296 float64 values (5.3 MB)
    assert est._gram_choice(meta, (1024, 1024), (256, 256), 16, "auto", 6 << 20) == {"w"}
    assert est._gram_choice(meta, (1024, 1024), (256, 256), 16, "auto", 5 << 20) == set()
    assert est._gram_choice(meta, (1024, 1024), (256, 256), 16, "sums", 1 << 30) == set()
    # 2·512² (1296 + 32) = 7.0e8 < 8.2e8: Gram; subsets spread over 60,000 rows: sums
    assert est._gram_choice(meta, (1024, 1024), (512, 512), 16, "auto", 1 << 40) == {"w"}
    assert est._gram_choice(meta, (1024, 1024), (600, 600), 16, "auto", 1 << 40) == set()
    assert est._gram_choice(meta, (1024, 1024), (60000, 60000), 16, "auto", 1 << 40) == set()
    f2 = _FI("w", None, 4, 3, 1, 0, None)  # a narrow layer: sums
    meta2 = pj.RecordMeta(12, np.zeros(0, dtype=np.int64), (f2,))
    assert est._gram_choice(meta2, (64, 64), (64, 64), 8, "auto", 1 << 30) == set()
    assert est._gram_choice(meta2, (64, 64), (64, 64), 8, "gram", 1) == {"w"}


def test_gram_blocks_equal_one_block():
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(37, 2, 5)), rng.normal(size=(37, 2, 4)))
    Y = (rng.normal(size=(23, 2, 5)), rng.normal(size=(23, 2, 4)))
    V = (rng.random((6, 23)) < 0.3).astype(np.float64)
    full = est._cross_gram(X, Y) @ V.T
    np.testing.assert_allclose(est._gram_times(X, Y, V, block_bytes=8 * 23 * 5), full,
                               rtol=1e-14, atol=1e-14 * np.abs(full).max())
    # the Gram entries are the per-sample gradients' inner products
    g = np.einsum("nto,nti->noi", X[1], X[0]).reshape(37, -1)
    h = np.einsum("nto,nti->noi", Y[1], Y[0]).reshape(23, -1)
    np.testing.assert_allclose(est._cross_gram(X, Y), g @ h.T, rtol=1e-12, atol=1e-12)


def test_factored_subset_sums_no_plain_columns():
    """P_plain = 0 (every tensor factored): no plain accumulator at all."""
    rng = np.random.default_rng(7)
    f = _FI("w", "b", 4, 6, 2, 0, 24)
    meta = pj.RecordMeta(28, np.zeros(0, dtype=np.int64), (f,), ("w", "b"), (0, 24),
                         ((4, 6), (4,)))
    plain, fac = _record(rng, meta, 30, 2)
    G = _materialise(meta, plain, fac)
    sa, sb = est._draw_subsets(np.random.default_rng(1), 30, None, 6, 4)
    rn, rd = _bf(G, G, sa, sb)
    for method in ("sums", "gram"):
        num, den = est._first_order_core(_chunks(plain, fac, 7), None, (30, None), meta, sa,
                                         sb, method=method)
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
    # a plain 2-D tensor of a factored record ("conv", stored as columns) Kronecker-projected
    ref2 = _kron_ref(meta, G, k, 2, kron, ["conv", "fc1.weight"], 7)
    z2 = pj.project_chunks(_chunks(plain, fac, 5), meta, k, 2, kron, ["conv", "fc1.weight"],
                           block_rows=7)
    np.testing.assert_allclose(z2, ref2, rtol=1e-12, atol=1e-12 * np.abs(ref2).max())


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


# -- on stores: a factored store and the materialised (v3) store of the same data ----------

U = 2.0 ** -24  # float32 unit roundoff: one rounding of each materialised product


def _store_pair(tmp_path, seed, T, n_rows=(37, 29), all_factored=False, tag="",
                data_seed=None, run_id=None, factor_dtype="float32"):
    """A factored store and the float32 materialised store of the same rows, steps (0, 3) ×
    (train, test), each record in two writes (two segments); returns the float64 rows.
    ``seed`` draws the layout, ``data_seed`` (default ``seed``) the rows."""
    import gsnr_stats as gs
    from gsnr_stats.store import materialize

    rng = np.random.default_rng(seed)
    o1, i1, o2 = (int(x) for x in rng.integers(2, 9, size=3))
    if all_factored:
        params = [("fc1.weight", (o1, i1)), ("fc1.bias", (o1,)), ("fc2.weight", (o2, o1)),
                  ("fc2.bias", (o2,))]
        fdecl = [("fc1.weight", "fc1.bias"), ("fc2.weight", "fc2.bias")]
    else:
        params = [("conv", (3, 4)), ("fc1.weight", (o1, i1)), ("fc1.bias", (o1,)),
                  ("norm", (5,)), ("fc2.weight", (o2, o1))]
        fdecl = [("fc1.weight", "fc1.bias"), ("fc2.weight", None)]
    lay = gs.Layout.from_params(params)
    off = dict(zip(lay.names, lay.offsets, strict=True))
    shp = dict(zip(lay.names, lay.shapes, strict=True))
    facs = tuple(_FI(w, b, shp[w][0], shp[w][1], T, off[w], None if b is None else off[b])
                 for w, b in fdecl)
    named = {n for f in facs for n in (f.weight, f.bias) if n}
    plain_idx = np.concatenate([np.arange(o, o + z) for n, o, z in
                                zip(lay.names, lay.offsets, lay.sizes, strict=True)
                                if n not in named] or [np.zeros(0, np.int64)]).astype(np.int64)
    meta = pj.RecordMeta(lay.n_params, plain_idx, facs, lay.names, lay.offsets, lay.shapes)
    pf, pm = tmp_path / f"fact{seed}{tag}.h5", tmp_path / f"mat{seed}{tag}.h5"
    full: dict[tuple[int, str], np.ndarray] = {}
    specs = [gs.FactorSpec(w, b, T) for w, b in fdecl]
    if data_seed is not None:
        rng = np.random.default_rng(data_seed)
    fdt = np.dtype(factor_dtype)
    with gs.GradientWriter(pf, params, factors=specs, run_id=run_id,
                           factor_dtype=factor_dtype) as wf, \
            gs.GradientWriter(pm, params, run_id=run_id) as wm:
        for step in (0, 3):
            for split, N in zip(("train", "test"), n_rows, strict=True):
                plain, fac = _record(rng, meta, N, T, shift=0.3 if split == "train" else 0.1)
                fac = {w: (A.astype(fdt), D.astype(fdt)) for w, (A, D) in fac.items()}
                full[(step, split)] = _materialise(meta, plain, fac)
                for lo, hi in ((0, N // 3), (N // 3, N)):
                    fr = {w: (A[lo:hi], D[lo:hi]) for w, (A, D) in fac.items()}
                    g = plain[lo:hi] if plain.shape[1] else None
                    wf.write(step, split, grads=g, factors=fr, loss=np.zeros(hi - lo))
                    wm.write(step, split, materialize(facs, plain_idx, lay.n_params, g, fr,
                                                      np.float32), loss=np.zeros(hi - lo))
    return pf, pm, full, meta


def _first_order_ref(full, steps, ns, K, seed, splits):
    """float64 num/den per (step, n) from the same draws, and their float32 error bounds."""
    rng = np.random.default_rng(seed)
    out = {}
    same = splits[0] == splits[1]
    for s in steps:
        Ga, Gb = full[(s, splits[0])], full[(s, splits[1])]
        for nv in ns:
            sa, sb = est._draw_subsets(rng, Ga.shape[0], None if same else Gb.shape[0], nv, K)
            num, den = _bf(Ga, Gb, sa, sb)
            # each stored product rounded once (relative U): |Δ g_D| <= U Σ_{i∈D} |g_i|
            ea = [U * np.abs(Ga[a]).sum(0) for a in sa]
            eb = [U * np.abs(Gb[b]).sum(0) for b in sb]
            ga = [Ga[a].sum(0) for a in sa]
            gb = [Gb[b].sum(0) for b in sb]
            bn = [np.abs(gb_) @ x + np.abs(ga_) @ z + x @ z
                  for x, z, ga_, gb_ in zip(ea, eb, ga, gb, strict=True)]
            bd = [2 * np.abs(ga_) @ x + x @ x for x, ga_ in zip(ea, ga, strict=True)]
            out[(s, nv)] = (num, den, np.array(bn), np.array(bd))
    return out


@pytest.mark.parametrize(("T", "seed", "all_factored", "method"),
                         [(1, 0, False, "sums"), (1, 0, False, "gram"), (3, 1, False, "sums"),
                          (3, 1, False, "gram"), (2, 2, True, "auto")])
def test_first_order_on_a_factored_store_equals_the_materialised(tmp_path, monkeypatch, T,
                                                                  seed, all_factored, method):
    import gsnr_stats as gs

    pf, pm, full, _ = _store_pair(tmp_path, seed, T, all_factored=all_factored)
    ns, K = [4, 9], 6
    kw = dict(n=ns, n_subsets=K, seed=11, chunk_rows=7)
    kwf = dict(kw, factored=method)

    def no_materialising(*a, **k):
        raise AssertionError("the factored path materialised rows")

    monkeypatch.setattr(gs.GradientStore, "iter_grads", no_materialising)
    rf = gs.osgr_first_order(pf, **kwf)
    monkeypatch.undo()
    rm = gs.osgr_first_order(pm, **kw)
    ref = _first_order_ref(full, [0, 3], ns, K, 11, ("train", "test"))
    for i, s in enumerate((0, 3)):
        for j, nv in enumerate(ns):
            num, den, bn, bd = ref[(s, nv)]
            # factored: float64 from exact products, against the float64 reference
            np.testing.assert_allclose(rf["dot_mean"].values[i, j], num.mean() / nv ** 2,
                                       rtol=1e-12, atol=1e-13 * np.abs(num).max() / nv ** 2)
            np.testing.assert_allclose(rf["sqnorm_mean"].values[i, j], den.mean() / nv ** 2,
                                       rtol=1e-12)
            np.testing.assert_allclose(rf["osgr_first_order"].values[i, j],
                                       num.sum() / den.sum(), rtol=1e-11,
                                       atol=1e-13 * np.abs(num).sum() / den.sum())
            # materialised float32 store: within the rounding of its stored products
            dm = rm["dot_mean"].values[i, j] - rf["dot_mean"].values[i, j]
            assert abs(dm) <= 1.01 * bn.mean() / nv ** 2 + 1e-14, (dm, bn.mean() / nv ** 2)
            dd = rm["sqnorm_mean"].values[i, j] - rf["sqnorm_mean"].values[i, j]
            assert abs(dd) <= 1.01 * bd.mean() / nv ** 2 + 1e-14, (dd, bd.mean() / nv ** 2)
    np.testing.assert_allclose(rf["osgr_first_order"], rm["osgr_first_order"], rtol=1e-4)
    # one split for both pools (disjoint halves), and a Generator seed
    r1 = gs.osgr_first_order(pf, n=5, n_subsets=4, seed=np.random.default_rng(2),
                             splits=("test", "test"), factored=method)
    ref1 = _first_order_ref(full, [0, 3], [5], 4, 2, ("test", "test"))
    for i, s in enumerate((0, 3)):
        num, den, _, _ = ref1[(s, 5)]
        np.testing.assert_allclose(r1["osgr_first_order"].values[i, 0], num.sum() / den.sum(),
                                   rtol=1e-11, atol=1e-13 * np.abs(num).sum() / den.sum())


@pytest.mark.parametrize("T", [1, 3])
def test_project_record_factored_equals_materialised(tmp_path, T):
    import gsnr_stats as gs

    pf, pm, full, meta = _store_pair(tmp_path, 5 + T, T)
    G = full[(3, "test")]
    k = 13
    R = np.concatenate([pj.GaussianRows(meta.n_params, k, 4, 16).block(b)
                        for b in range(-(-meta.n_params // 16))], axis=0)
    ref = G @ R
    zf = gs.project_record(pf, 3, "test", k, seed=4, block_rows=16, chunk_rows=6)
    np.testing.assert_allclose(zf, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    zm = gs.project_record(pm, 3, "test", k, seed=4, block_rows=16)
    bound = U * np.abs(G) @ np.abs(R)  # one rounding per stored product
    assert np.all(np.abs(zm - zf) <= 1.01 * bound + 1e-300)
    with gs.open_store(pf) as st:  # an open store works too
        np.testing.assert_array_equal(gs.project_record(st, 3, "test", k, seed=4,
                                                        block_rows=16, chunk_rows=6), zf)
    # Kronecker: factored store (its factors) == materialised store naming the weights
    ws = ["fc1.weight", "fc2.weight"]
    kr = _kron_ref(meta, G, 12, 4, (3, 4), ws, 16)
    zk = gs.project_record(pf, 3, "test", 12, seed=4, kron=(3, 4), block_rows=16)
    np.testing.assert_allclose(zk, kr, rtol=1e-12, atol=1e-12 * np.abs(kr).max())
    zkm = gs.project_record(pm, 3, "test", 12, seed=4, kron=(3, 4), factors=ws, block_rows=16)
    np.testing.assert_allclose(zkm, kr, rtol=1e-5, atol=1e-6 * np.abs(kr).max())


def test_project_record_refuses_bad_arguments(tmp_path):
    import gsnr_stats as gs
    from gsnr_stats.errors import ArgumentTypeError, MissingSplitError, UsageError

    pf, pm, _, _ = _store_pair(tmp_path, 9, 1)
    with pytest.raises(UsageError, match="k1\\*k2"):
        gs.project_record(pf, 0, "test", 7, kron=(2, 3))
    with pytest.raises(UsageError, match="kron"):
        gs.project_record(pm, 0, "test", 6, factors=["fc1.weight"])
    with pytest.raises(UsageError, match="only 2-D"):
        gs.project_record(pm, 0, "test", 6, kron=(2, 3), factors=["fc1.bias"])
    with pytest.raises(UsageError, match="not a tensor"):
        gs.project_record(pm, 0, "test", 6, kron=(2, 3), factors=["nope"])
    with pytest.raises(MissingSplitError, match="step=1"):
        gs.project_record(pf, 1, "test", 6)
    with pytest.raises(ArgumentTypeError, match="kron"):
        gs.project_record(pf, 0, "test", 6, kron=6)
    with pytest.raises(UsageError, match="k must be >= 1"):
        gs.project_record(pf, 0, "test", 0)


def test_first_order_and_projection_pool_factored_shards(tmp_path):
    """Two factored shards of one run: their rows of a record are pooled, in order."""
    import gsnr_stats as gs

    a = _store_pair(tmp_path, 4, 2, n_rows=(20, 17), tag="a", data_seed=40, run_id="R")
    b = _store_pair(tmp_path, 4, 2, n_rows=(15, 22), tag="b", data_seed=41, run_id="R")
    full = {k: np.concatenate([a[2][k], b[2][k]]) for k in a[2]}
    r = gs.osgr_first_order([a[0], b[0]], n=[6], n_subsets=5, seed=3, chunk_rows=4)
    ref = _first_order_ref(full, [0, 3], [6], 5, 3, ("train", "test"))
    for i, s in enumerate((0, 3)):
        num, den, _, _ = ref[(s, 6)]
        np.testing.assert_allclose(r["osgr_first_order"].values[i, 0], num.sum() / den.sum(),
                                   rtol=1e-11, atol=1e-13 * np.abs(num).sum() / den.sum())
    z = gs.project_record([a[0], b[0]], 0, "train", 5, seed=1)
    R = pj.GaussianRows(a[3].n_params, 5, 1).block(0)
    np.testing.assert_allclose(z, full[(0, "train")] @ R, rtol=1e-12,
                               atol=1e-12 * np.abs(z).max())


def test_float64_factors(tmp_path):
    """factor_dtype='float64': the products round once in float64, still ~1e-16."""
    import gsnr_stats as gs

    pf, _, full, _ = _store_pair(tmp_path, 6, 2, factor_dtype="float64")
    r = gs.osgr_first_order(pf, n=[5], n_subsets=4, seed=8)
    ref = _first_order_ref(full, [0, 3], [5], 4, 8, ("train", "test"))
    for i, s in enumerate((0, 3)):
        num, den, _, _ = ref[(s, 5)]
        np.testing.assert_allclose(r["osgr_first_order"].values[i, 0], num.sum() / den.sum(),
                                   rtol=1e-11, atol=1e-13 * np.abs(num).sum() / den.sum())


def test_damaged_factor_bytes_are_reported_not_used(tmp_path):
    """A flipped factor value: the segment's checksum fails, our error names the file."""
    import h5py

    import gsnr_stats as gs
    from gsnr_stats.errors import StoreError

    pf, _, _, _ = _store_pair(tmp_path, 7, 1)
    with h5py.File(pf, "r+") as f:
        d = f["factors/0/a"]
        d[2] = d[2] + 1.0
    with pytest.raises(StoreError, match=str(pf.name)):
        gs.osgr_first_order(pf, n=[3], n_subsets=2)
    with pytest.raises(StoreError, match=str(pf.name)):
        gs.project_record(pf, 0, "train", 4)


@pytest.mark.filterwarnings("ignore::gsnr_stats.SignalBelowNoiseWarning")
def test_cli_first_order_on_a_factored_store(tmp_path, capsys):
    """`gsnr-stats osgr STATS --first-order STORE` on a factored store: the materialised
    store's numbers (same seed, same draws) within float32 rounding."""
    import xarray as xr

    from gsnr_stats import cli

    pf, pm, _, _ = _store_pair(tmp_path, 12, 2)
    out = {}
    for name, p in (("f", pf), ("m", pm)):
        nc, res = tmp_path / f"{name}.nc", tmp_path / f"{name}_osgr.nc"
        assert cli.main(["reduce", str(p), "-o", str(nc), "-q"]) == 0
        assert cli.main(["osgr", str(nc), "--first-order", str(p), "-n", "4", "--subsets", "8",
                         "-o", str(res)]) == 0
        with xr.open_dataset(res) as ds:
            out[name] = ds["osgr_first_order"].values.copy()
    assert "first-order OSGR" in capsys.readouterr().out
    assert np.all(np.isfinite(out["f"]))
    np.testing.assert_allclose(out["f"], out["m"], rtol=1e-4)


def test_other_per_sample_readers_see_materialised_rows(tmp_path):
    """The xarray engine and read_grads on a factored store: the materialised store's rows
    (float64 products cast once to float32, so equal bit for bit at T = 1)."""
    import xarray as xr

    import gsnr_stats as gs

    pf, pm, full, _ = _store_pair(tmp_path, 13, 1)
    with xr.open_dataset(pf, engine="gsnr_stats") as a, \
            xr.open_dataset(pm, engine="gsnr_stats") as b:
        np.testing.assert_array_equal(a["grads"].values, b["grads"].values)
    with gs.open_store(pf) as st:
        np.testing.assert_array_equal(st.read_grads(3, "test"),
                                      full[(3, "test")].astype(np.float32))


def test_a_factored_and_a_materialised_shard_of_one_run_pool(tmp_path):
    """Shards of one run, one factored and one not: the materialising route, same numbers."""
    import gsnr_stats as gs

    a = _store_pair(tmp_path, 4, 1, n_rows=(20, 17), tag="a", data_seed=50, run_id="R")
    b = _store_pair(tmp_path, 4, 1, n_rows=(15, 22), tag="b", data_seed=51, run_id="R")
    full = {k: np.concatenate([a[2][k], b[2][k]]) for k in a[2]}
    r = gs.osgr_first_order([a[0], b[1]], n=[6], n_subsets=5, seed=3)
    ref = _first_order_ref(full, [0, 3], [6], 5, 3, ("train", "test"))
    for i, s in enumerate((0, 3)):
        num, den, bn, bd = ref[(s, 6)]
        assert abs(r["dot_mean"].values[i, 0] - num.mean() / 36) <= 1.01 * bn.mean() / 36
        assert abs(r["sqnorm_mean"].values[i, 0] - den.mean() / 36) <= 1.01 * bd.mean() / 36
    z = gs.project_record([a[0], b[1]], 0, "train", 5, seed=1)
    R = pj.GaussianRows(a[3].n_params, 5, 1).block(0)
    G = full[(0, "train")]
    assert np.all(np.abs(z - G @ R) <= 1.01 * U * np.abs(G) @ np.abs(R) + 1e-300)
