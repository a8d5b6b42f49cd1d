"""reduce() against a float64 two-pass reference, edge cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import two_pass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gsnr_stats as gs


def write(path, g, chunks=None, params=None, run_id=None, **kw):
    P = g.shape[1]
    with gs.GradientWriter(path, params or [("w", (P,))], chunks=chunks, overwrite=True,
                           run_id=run_id) as w:
        w.write(0, "train", g, **kw)
    return path


def test_matches_two_pass_reference(small_store):
    path, _, data = small_store
    st_ = gs.reduce(path)
    assert st_.sizes == {"step": 2, "split": 2, "param": 16}
    for (step, split), (g, loss) in data.items():
        sel = st_.sel(step=step, split=split)
        m, v = two_pass(g)
        np.testing.assert_allclose(sel["mean"].values, m, rtol=1e-12)
        np.testing.assert_allclose(sel["var"].values, v, rtol=1e-12)
        np.testing.assert_allclose(sel["gsnr"].values, m**2 / v, rtol=1e-11)
        np.testing.assert_allclose(sel["gsnr_debiased"].values, m**2 / v - 1 / len(g), rtol=1e-11)
        assert int(sel["count"]) == len(g)
        assert sel["loss_mean"].item() == pytest.approx(loss.mean(), rel=1e-13)
        assert sel["loss_var"].item() == pytest.approx(loss.var(ddof=1), rel=1e-12)
        assert sel["lr"].item() == 0.1
    assert list(st_["tensor"].values[:13]) == ["fc.weight"] * 12 + ["fc.bias"]
    assert st_["gsnr"].attrs["units"] == "1" and "long_name" in st_["var"].attrs


def test_ddof0_matches_biased_variance(small_store):
    path, _, data = small_store
    st_ = gs.reduce(path, ddof=0, steps=[0], splits=["train"])
    g = data[(0, "train")][0]
    np.testing.assert_allclose(st_["var"].values[0, 0], two_pass(g, ddof=0)[1], rtol=1e-12)
    assert st_.attrs["ddof"] == 0


def test_large_mean_small_std_accuracy(tmp_path, rng):
    """|mean| = 1e4 x std: the one-pass E[g^2]-E[g]^2 form loses every digit, ours 1e-10."""
    g = (1e4 + rng.standard_normal((5000, 40))).astype(np.float32)
    g[:, 0] = np.float32(3.0)  # constant column: variance exactly 0, GSNR inf
    g[:, 1] = np.float32(1e4) + np.float32(1e-3) * (np.arange(5000) % 2)  # tiny variance
    write(tmp_path / "a.h5", g, chunks=(64, 16))
    st_ = gs.reduce(tmp_path / "a.h5")
    m, v = two_pass(g)
    np.testing.assert_allclose(st_["mean"].values[0, 0], m, rtol=1e-12)
    np.testing.assert_allclose(st_["var"].values[0, 0, 1:], v[1:], rtol=1e-10)
    assert st_["var"].values[0, 0, 0] == 0.0
    assert np.isinf(st_["gsnr"].values[0, 0, 0])
    assert int(st_["n_inf"].values[0, 0]) == 1 and int(st_["n_dead"].values[0, 0]) == 0


def test_dead_parameters_counted(tmp_path):
    g = np.zeros((10, 3), np.float32)
    g[:, 1] = np.arange(10)
    st_ = gs.reduce(write(tmp_path / "d.h5", g))
    assert int(st_["n_dead"].values[0, 0]) == 2
    assert np.isnan(st_["gsnr"].values[0, 0, 0])


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_n_and_p1(tmp_path, n):
    g = np.arange(n, dtype=np.float32).reshape(n, 1) + 1
    st_ = gs.reduce(write(tmp_path / "t.h5", g))
    assert st_.sizes["param"] == 1
    if n == 1:  # ddof=1 with one sample: variance undefined, reported as NaN
        assert np.isnan(st_["var"].values[0, 0, 0])
        assert st_["mean"].values[0, 0, 0] == 1.0
        st0 = gs.reduce(tmp_path / "t.h5", ddof=0)
        assert st0["var"].values[0, 0, 0] == 0.0
    else:
        assert st_["var"].values[0, 0, 0] == pytest.approx(0.5)


def test_empty_record_and_missing_split(tmp_path):
    path = tmp_path / "e.h5"
    with gs.GradientWriter(path, [("w", (2,))]) as w:
        w.write(0, "train", np.ones((3, 2)))
        w.write(0, "test", np.zeros((0, 2)))
    st_ = gs.reduce(path)
    assert int(st_["count"].sel(split="test").item()) == 0
    assert np.isnan(st_["mean"].sel(split="test").values).all()
    with pytest.raises(gs.StoreError, match="valid"):
        gs.reduce(path, splits=["valid"])
    with pytest.raises(gs.StoreError, match=r"steps \[7\]"):
        gs.reduce(path, steps=[7])


def test_nonfinite_raise_names_record_parameter_sample(tmp_path, rng):
    g = rng.normal(size=(50, 12)).astype(np.float32)
    g[17, 9] = np.nan
    path = write(tmp_path / "n.h5", g, params=[("a.w", (2, 3)), ("b.w", (6,))],
                 sample_id=np.arange(50) + 100)
    with pytest.raises(gs.NonFiniteError) as ei:
        gs.reduce(path)
    msg = str(ei.value)
    assert "n.h5" in msg and "step=0" in msg and "'train'" in msg
    assert "b.w[3]" in msg and "sample_id 117" in msg and "NaN" in msg


def test_nonfinite_omit_drops_per_parameter(tmp_path, rng):
    g = rng.normal(size=(60, 5)).astype(np.float32)
    g[3, 1] = np.inf
    g[[4, 40], 2] = np.nan
    st_ = gs.reduce(write(tmp_path / "o.h5", g, chunks=(16, 2)), nonfinite="omit")
    np.testing.assert_array_equal(st_["n_omitted"].values[0, 0], [0, 1, 2, 0, 0])
    for j in range(5):
        col = g[:, j][np.isfinite(g[:, j])]
        assert st_["var"].values[0, 0, j] == pytest.approx(col.astype(float).var(ddof=1), rel=1e-12)
        assert st_["mean"].values[0, 0, j] == pytest.approx(col.astype(float).mean(), rel=1e-12)


def test_netcdf_roundtrip(small_store, tmp_path):
    st_ = gs.reduce(small_store[0], blocks=3)
    out = tmp_path / "s.nc"
    st_.to_netcdf(out)
    back = xr.load_dataset(out)
    xr.testing.assert_identical(back, st_)


def test_blocks_merge_to_total(small_store):
    st_ = gs.reduce(small_store[0], blocks=4)
    from gsnr_stats.kernels import merge_moments

    c, m, q = (st_[v].values[0, 0] for v in ("block_count", "block_mean", "block_m2"))
    acc = (np.zeros(16), np.zeros(16), np.zeros(16))
    for b in range(4):
        acc = merge_moments(acc, (np.full(16, c[b]), m[b], q[b]))
    np.testing.assert_allclose(acc[1], st_["mean"].values[0, 0], rtol=1e-13)
    np.testing.assert_allclose(acc[2], st_["m2"].values[0, 0], rtol=1e-12)
    assert c.sum() == 37


def test_thread_count_does_not_change_results(tmp_path, rng):
    g = (rng.normal(size=(700, 300)) + 5).astype(np.float32)
    path = write(tmp_path / "th.h5", g, chunks=(50, 32))
    a = gs.reduce(path, threads=1)
    b = gs.reduce(path, threads=2)
    np.testing.assert_array_equal(a["var"].values, b["var"].values)  # bitwise


def test_shards_merge(tmp_path, rng):
    g = (rng.normal(size=(200, 9)) * 2 + 1).astype(np.float32)
    paths = []
    for i, part in enumerate(np.array_split(g, 3)):
        paths.append(write(tmp_path / f"shard{i}.h5", part, chunks=(7, 4), run_id="run"))
    st_ = gs.reduce(str(tmp_path / "shard*.h5"))
    m, v = two_pass(g)
    np.testing.assert_allclose(st_["mean"].values[0, 0], m, rtol=1e-12)
    np.testing.assert_allclose(st_["var"].values[0, 0], v, rtol=1e-12)
    assert int(st_["count"].values[0, 0]) == 200
    other = tmp_path / "other.h5"
    with gs.GradientWriter(other, [("v", (9,))]) as w:
        w.write(0, "train", g[:5])
    with pytest.raises(gs.LayoutMismatchError, match="shard0.h5.*other.h5"):
        gs.reduce([paths[0], other])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 120),
    p=st.integers(1, 40),
    rows_c=st.integers(1, 64),
    cols_c=st.integers(1, 48),
    cuts=st.lists(st.integers(0, 120), max_size=5),
    shift=st.sampled_from([0.0, 1.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_independent_of_chunks_and_write_split(tmp_path_factory, n, p, rows_c, cols_c,
                                                        cuts, shift, seed):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((n, p)) + shift).astype(np.float32)
    d = tmp_path_factory.mktemp("prop")
    a = write(d / "a.h5", g)
    b = d / "b.h5"
    edges = sorted({0, n, *[c for c in cuts if c <= n]})
    with gs.GradientWriter(b, [("w", (p,))], chunks=(rows_c, cols_c)) as w:
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            w.write(0, "train", g[lo:hi])
    ra, rb = gs.reduce(a), gs.reduce(b, threads=1)
    m, v = two_pass(g)
    for r in (ra, rb):
        np.testing.assert_allclose(r["mean"].values[0, 0], m, rtol=1e-10, atol=1e-12)
        if n > 1:
            np.testing.assert_allclose(r["var"].values[0, 0], v, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(ra["var"].values, rb["var"].values, rtol=1e-12, atol=1e-300)


def test_column_block_looks_up_only_its_chunks_and_agrees_with_the_index_scan(tmp_path):
    """A Dask task (record_partial with cols) locates its chunks one by one; the offsets and
    the result equal those of the full chunk-index scan the in-process path caches."""
    from gsnr_stats.reduce import record_partial

    rng = np.random.default_rng(4)
    P = 1000
    p = tmp_path / "s.h5"
    data = {}
    with gs.GradientWriter(p, [("w", (P,))], chunks=(8, 128)) as w:
        for step in range(3):
            g = rng.normal(size=(21, P)).astype(np.float32)
            data[step] = g
            w.write(step, "train", g[:13])
            w.write(step, "train", g[13:])
    with gs.open_store(p) as s, s.view(0, "train") as v:
        full = v.offsets.copy()
    for step in range(3):
        for c0, c1 in ((0, 256), (384, 1000)):
            with gs.open_store(p) as s:  # fresh handle, like a task: nothing cached
                ranges = s.row_ranges(step, "train")
                crows = sorted({r for a, b in ranges for r in range(a // 8, -(-b // 8))})
                with s.view(step, "train", cols=(c0, c1)) as v:
                    part = v.offsets
                got = record_partial(s, step, "train", cols=(c0, c1))
            sel = np.zeros_like(full, dtype=bool)
            sel[np.ix_(crows, range(c0 // 128, -(-c1 // 128)))] = True
            np.testing.assert_array_equal(part[sel], full[sel])
            assert (part[sel] != -1).all() and (part[~sel] == -1).all()  # -2: via h5py
            m, _ = two_pass(data[step][:, c0:c1].astype(np.float64))
            np.testing.assert_allclose(got.total()[1], m, rtol=1e-12, atol=1e-15)
