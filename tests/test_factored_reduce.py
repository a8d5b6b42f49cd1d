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


@pytest.mark.parametrize("nonfinite", [False, True])
def test_kernel_sparse_inputs(nonfinite):
    """One-hot-like inputs (at most 1/32 nonzero: the kernel's sparse path, zero products
    counted, not formed) give the same moments; a non-finite δ or a next to zeros makes
    exactly the materialised product's entries non-finite there too."""
    rng = np.random.default_rng(12)
    n, n_in, n_out = 150, 64, 7  # one nonzero in 64
    a = np.zeros((n, 1, n_in), np.float32)
    a[np.arange(n), 0, rng.integers(0, n_in, n)] = rng.standard_normal(n) + 3.0
    d = rng.standard_normal((n, 1, n_out)).astype(np.float32)
    d[rng.random((n, 1, n_out)) < 0.3] = 0
    if nonfinite:
        d[5, 0, 2] = np.inf  # 0·inf: NaN wherever a_5 is 0
        a[70, 0, 3] = np.nan
        d[70, 0, :] = 0.0
    with np.errstate(invalid="ignore"):
        g = products(a, d)
    acc, n_omit, bad, bacc, *_ = run_kernel(a, d, row_block=50, omit=nonfinite)
    assert not bad.any()
    if not nonfinite:
        assert_moments(acc, g)
        return
    nonfin = ~np.isfinite(g)
    np.testing.assert_array_equal(n_omit, nonfin.sum(axis=0))
    for j in range(g.shape[1]):
        col = g[~nonfin[:, j], j]
        m, q = ref_moments(col[:, None])
        np.testing.assert_allclose([acc[1][j], acc[2][j]], [m[0], q[0]], rtol=1e-12,
                                   atol=1e-14)


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



# -- gs.reduce on factored stores ----------------------------------------------------------

import h5py  # noqa: E402
from conftest import U32, assert_within, moments_shift_bound  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import NonFiniteError, StoreError  # noqa: E402
from gsnr_stats.reduce import record_partial  # noqa: E402


def model(rng, plain=True, bias=True, T=1):
    """A layout with plain tensors around two factored Linears (the second on sequences)."""
    i1, o1, o2 = (int(x) for x in rng.integers(2, 9, size=3))
    params = ([("conv", (3, 4))] if plain else []) + [("fc1.weight", (o1, i1))]
    params += [("fc1.bias", (o1,))] if bias else []
    params += ([("norm", (5,))] if plain else []) + [("fc2.weight", (o2, o1)), ("fc2.bias", (o2,))]
    specs = [gs.FactorSpec("fc1.weight", "fc1.bias" if bias else None),
             gs.FactorSpec("fc2.weight", "fc2.bias", rows=T)]
    return params, specs


def batch(rng, params, n, T, loc=0.0):
    shapes = dict(params)
    o1, i1 = shapes["fc1.weight"]
    o2 = shapes["fc2.weight"][0]
    n_plain = sum(int(np.prod(s)) for k, s in params if not k.startswith("fc"))
    a1 = (loc + rng.standard_normal((n, i1))).astype(np.float32)
    d1 = (loc + rng.standard_normal((n, o1)) * (rng.random((n, o1)) > 0.3)).astype(np.float32)
    t = int(rng.integers(1, T + 1))  # a shorter sequence: zero-padded to T rows
    a2 = (loc + rng.standard_normal((n, t, o1))).astype(np.float32)
    d2 = (loc + rng.standard_normal((n, t, o2))).astype(np.float32)
    g = (loc + rng.standard_normal((n, n_plain))).astype(np.float32) if n_plain else None
    return g, {"fc1.weight": (a1, d1), "fc2.weight": (a2, d2)}


def write_pair(tmp, rng, *, plain=True, bias=True, T=1, sizes=(17, 1, 30), chunks=(8, 4),
               loc=0.0, run_id="r", name="f", nan=False):
    """The same data as a factored store and as its materialised (v3, float32) store, and
    the float64 products (exact: float64 products of float32 factors, summed over t)."""
    params, specs = model(rng, plain, bias, T)
    fpath, mpath = tmp / f"{name}.h5", tmp / f"{name}_mat.h5"
    batches = []
    with gs.GradientWriter(fpath, params, factors=specs, chunks=chunks if plain else None,
                           run_id=run_id, overwrite=True) as wf:
        for n in sizes:
            g, fac = batch(rng, params, n, T, loc)
            if nan and len(batches) == 1:
                fac["fc1.weight"][0][0, 1] = np.nan  # record sample sizes[0]: 2nd write, row 0
            loss = rng.standard_normal(n)
            wf.write(0, "train", grads=g, factors=fac, loss=loss, lr=0.1)
            batches.append((g, fac, loss))
    with gs.open_store(fpath) as s:
        factors, plain_index, P = s.factors, s.plain_index, s.layout.n_params
    with np.errstate(invalid="ignore"):
        full64 = np.concatenate([gs.store.materialize(factors, plain_index, P, g, fac,
                                                      np.float64) for g, fac, _ in batches])
    with gs.GradientWriter(mpath, params, chunks=(8, 8), run_id=run_id, overwrite=True) as wm:
        for g, fac, loss in batches:
            with np.errstate(invalid="ignore"):
                rows = gs.store.materialize(factors, plain_index, P, g, fac, np.float32)
            wm.write(0, "train", rows, loss=loss, lr=0.1)
    return fpath, mpath, full64


def block_ref(g, K):
    """Float64 two-pass mean and M2 of K contiguous sample blocks (the engine's bounds)."""
    n = g.shape[0]
    b = [(k * n) // K for k in range(K + 1)]
    return [ref_moments(g[b[k]:b[k + 1]]) for k in range(K)]


def f32_bounds(full64, var):
    """|Δmean|, |Δvar| allowed between reduce of the factored store (exact products) and of
    the materialised float32 store: each value moves by <= U32 |g| when rounded."""
    b = U32 * np.abs(full64).max(axis=0)
    return moments_shift_bound(b, var, full64.shape[0])


@pytest.mark.parametrize("plain,bias,T,loc", [(True, True, 1, 0.0), (True, False, 3, 0.0),
                                              (False, True, 2, 0.0), (True, True, 1, 30.0)])
def test_reduce_factored_equals_products_and_materialised_store(tmp_path, plain, bias, T, loc):
    rng = np.random.default_rng(11 + T)
    fpath, mpath, full64 = write_pair(tmp_path, rng, plain=plain, bias=bias, T=T, loc=loc)
    K = 3
    ds = gs.reduce(fpath, blocks=K)
    m, q = ref_moments(full64)
    n = full64.shape[0]
    scale = np.abs(full64).max(axis=0) + 1e-300
    assert int(ds["count"].values[0, 0]) == n
    got_m, got_q = ds["mean"].values[0, 0], ds["m2"].values[0, 0]
    assert_within(got_m, m, 1e-12 * scale, "mean")
    np.testing.assert_allclose(got_q, q, rtol=1e-12, atol=1e-300)
    for k, (bm, bq) in enumerate(block_ref(full64, K)):
        assert_within(ds["block_mean"].values[0, 0, k], bm, 1e-12 * scale, "block mean")
        np.testing.assert_allclose(ds["block_m2"].values[0, 0, k], bq, rtol=1e-12)
    mat = gs.reduce(mpath, blocks=K)
    dm, dv = f32_bounds(full64, q / (n - 1))
    assert_within(mat["mean"].values[0, 0], got_m, dm * 1.01 + 1e-300, "mean vs materialised")
    assert_within(mat["var"].values[0, 0], ds["var"].values[0, 0], dv * 1.01 + 1e-300,
                  "var vs materialised")
    for v in ("count", "n_dead", "n_inf", "block_count", "loss_mean", "loss_var", "lr"):
        np.testing.assert_array_equal(ds[v].values, mat[v].values, err_msg=v)
    for c in ("param", "tensor", "layer"):
        assert (ds[c].values == mat[c].values).all()


def test_storage_column_ranges_cover_the_record(tmp_path):
    """Any partition of the storage positions (what Dask tasks cover: plain blocks aligned
    to the chunks, factor ranges even cut inside a weight row) gives the same moments, and
    the plain checksums are verified once the ranges add up."""
    from gsnr_stats import _factored_engine as fe
    from gsnr_stats.distributed import concat_columns

    rng = np.random.default_rng(2)
    fpath, _, full64 = write_pair(tmp_path, rng, T=2)
    with gs.open_store(fpath) as s:
        P, Pp = s.layout.n_params, s.n_plain
        order = fe.storage_order(P, fe.spans(s.factors))
        assert sorted(order.tolist()) == list(range(P))
        assert (order[:Pp] == s.plain_index).all()
        whole = record_partial(s, 0, "train", blocks=2)
        cuts = sorted({0, 4, 8, Pp, Pp + 3, Pp + 7, P - 2, P})
        for ranges in ([(0, P)], list(zip(cuts[:-1], cuts[1:], strict=True)),
                       [(0, 8), (8, Pp)] + fe.factor_blocks(Pp, fe.spans(s.factors), 5)):
            parts = [record_partial(s, 0, "train", cols=r, blocks=2) for r in ranges]
            p = concat_columns(parts).reorder(order)
            p.verify(P)
            for x, y in ((p.count, whole.count), (p.mean, whole.mean), (p.m2, whole.m2)):
                np.testing.assert_array_equal(x, y)
    m, q = ref_moments(full64)
    np.testing.assert_allclose(whole.total()[2], q, rtol=1e-12)


def _poke(path, name, index):
    with h5py.File(path, "r+") as f:
        f[name][index] = -f[name][index] - 1


@pytest.mark.parametrize("where", ["grads", "factors/0/a", "factors/1/delta"])
def test_damaged_factored_store_is_refused(tmp_path, where):
    rng = np.random.default_rng(4)
    fpath, _, _ = write_pair(tmp_path, rng)
    _poke(fpath, where, (20, 3) if where == "grads" else (20, 0, 1))
    with pytest.raises(StoreError, match=r"f\.h5"):
        gs.reduce(fpath)


def test_nonfinite_factor_named_or_omitted_like_the_materialised_store(tmp_path):
    rng = np.random.default_rng(5)
    fpath, mpath, full64 = write_pair(tmp_path, rng, nan=True)
    with pytest.raises(NonFiniteError, match=r"fc1\.weight\[\d+, 1\].*sample 17 "):
        gs.reduce(fpath)
    ds, mat = gs.reduce(fpath, nonfinite="omit"), gs.reduce(mpath, nonfinite="omit")
    nonfin = ~np.isfinite(full64)
    assert nonfin.any()
    np.testing.assert_array_equal(ds["n_omitted"].values[0, 0], nonfin.sum(axis=0))
    np.testing.assert_array_equal(ds["n_omitted"].values, mat["n_omitted"].values)
    for j in np.flatnonzero(nonfin.any(axis=0)):
        col = full64[np.isfinite(full64[:, j]), j]
        np.testing.assert_allclose(ds["mean"].values[0, 0, j], col.mean(), rtol=1e-12,
                                   atol=1e-15)


def test_moments_records_in_a_factored_store(tmp_path):
    rng = np.random.default_rng(6)
    params, specs = model(rng)
    P = sum(int(np.prod(s)) for _, s in params)
    mu, m2 = rng.standard_normal(P), rng.random(P)
    with gs.GradientWriter(tmp_path / "m.h5", params, factors=specs) as w:
        w.write_moments(0, "train", 10, mu, m2)
        g, fac = batch(rng, params, 12, 1)
        w.write(1, "train", grads=g, factors=fac)
    ds = gs.reduce(tmp_path / "m.h5")
    np.testing.assert_allclose(ds["mean"].values[0, 0], mu, rtol=1e-15)
    np.testing.assert_allclose(ds["m2"].values[0, 0], m2, rtol=1e-15)
    with gs.open_store(tmp_path / "m.h5") as s:
        full = s.read_grads(1, "train")  # materialised float32 rows: a bound, not 1e-12
    m, _ = ref_moments(full)
    assert_within(ds["mean"].values[1, 0], m, 4 * U32 * np.abs(full).max(axis=0) + 1e-30,
                  "mean")


def test_factored_and_materialised_shards_pool(tmp_path):
    """Shards of one run, one factored and one materialised (same layout): one record."""
    rng = np.random.default_rng(8)
    fpath, mpath, full64 = write_pair(tmp_path, rng, sizes=(9, 14))
    ds = gs.reduce([fpath, mpath])
    assert int(ds["count"].values[0, 0]) == 2 * full64.shape[0]
    both = np.concatenate([full64, full64.astype(np.float32).astype(np.float64)])
    m, q = ref_moments(both)
    dm, _ = f32_bounds(full64, q)
    assert_within(ds["mean"].values[0, 0], m, dm + 1e-12 * np.abs(both).max(0), "mean")


def test_dask_reduce_of_factored_shards_equals_in_process(tmp_path):
    """LocalCluster of single-threaded processes; factored shards (plain blocks and factor
    row blocks in separate tasks) pooled with a materialised shard of the same run."""
    pytest.importorskip("distributed")
    from gsnr_stats.distributed import local_client

    rng = np.random.default_rng(9)
    f1, m1, _ = write_pair(tmp_path, rng, T=2, sizes=(13, 20), name="a")
    # the same seed draws the same layout; other sizes make other records
    f2, _, _ = write_pair(tmp_path, np.random.default_rng(9), T=2, sizes=(7,), name="b")
    with gs.open_store(f1) as s1, gs.open_store(f2) as s2:
        assert s1.layout.hash == s2.layout.hash
    files = [f1, f2, m1]
    ref = gs.reduce(files, blocks=2)
    client = local_client(2)
    try:
        for columns in (None, 5):
            got = gs.distributed.reduce_distributed(files, blocks=2, scheduler=client,
                                                    columns=columns)
            for v in ref.data_vars:
                a, b = got[v].values, ref[v].values
                if b.dtype.kind == "f":
                    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, equal_nan=True,
                                               err_msg=v)
                else:
                    np.testing.assert_array_equal(a, b, err_msg=v)
        _poke(f2, "grads", (3, 2))  # a damaged plain column: found across column blocks
        with pytest.raises(StoreError, match=r"b\.h5.*checksum"):
            gs.distributed.reduce_distributed(files, scheduler=client, columns=5)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
