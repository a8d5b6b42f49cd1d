"""Factored records (format 4, issue 15): writer and reader round trips.

The reference for every materialised row is an independent float64 ``einsum`` of the
factors (``g_W,i = Σ_t δ_it a_itᵀ``, ``g_b,i = Σ_t δ_it``), cast once to float32. With
``T = 1`` and float32 factors each product is exact in float64, so the store's rows must
equal it bit for bit; with ``T > 1`` the two float64 sums may differ in order, so the bound
is one float32 rounding of the result plus the float64 summation error.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import U32, U64, assert_within

import gsnr_stats as gs
from gsnr_stats.errors import SchemaError, StoreError
from gsnr_stats.store import FACTORED_VERSION, FORMAT_VERSION, materialize


def _model(rng, n_layers=2, bias=(True, False), extra=True):
    """Random MLP-like layout: Linear layers (weight, maybe bias) and a plain tensor."""
    params, factors = [], []
    dims = [int(d) for d in rng.integers(1, 9, n_layers + 1)]
    for k in range(n_layers):
        w = f"fc{k}.weight"
        params.append((w, (dims[k + 1], dims[k])))
        b = None
        if bias[k % len(bias)]:
            b = f"fc{k}.bias"
            params.append((b, (dims[k + 1],)))
        factors.append((w, b, dims[k + 1], dims[k]))
        if extra and k == 0:
            params.append(("norm.scale", (int(rng.integers(1, 5)),)))  # plain, in between
    if extra:
        params.append(("head.conv", (2, 3)))
    return params, factors


def _reference(params, factors, plain, fac, T_used):
    """Full rows ``(n, P)`` float64, independently: einsum per factor, plain columns."""
    lay = gs.Layout.from_params(params)
    n = plain.shape[0]
    out = np.zeros((n, lay.n_params))
    terms = np.zeros((n, lay.n_params))  # Σ_t |δ a|: the float64 summation error scale
    named = {}
    for w, b, _o, _i in factors:
        A, D = (np.asarray(x, np.float64) for x in fac[w])
        if A.ndim == 2:
            A, D = A[:, None], D[:, None]
        named[w] = (np.einsum("nto,nti->noi", D, A).reshape(n, -1),
                    np.einsum("nto,nti->noi", np.abs(D), np.abs(A)).reshape(n, -1))
        if b is not None:
            named[b] = (D.sum(axis=1), np.abs(D).sum(axis=1))
    j = 0
    for name, off, size in zip(lay.names, lay.offsets, lay.sizes, strict=True):
        if name in named:
            out[:, off:off + size], terms[:, off:off + size] = named[name]
        else:
            out[:, off:off + size] = plain[:, j:j + size]
            j += size
    return out, terms


def _write(path, rng, params, factors, *, rows=1, T=1, dtype="float32", records=2, writes=3,
           **kw):
    """Write ``records`` records of ``writes`` batches; return {(step, split): (plain, fac)}."""
    specs = [gs.FactorSpec(w, b, rows) for w, b, _, _ in factors]
    lay = gs.Layout.from_params(params)
    named = {w for w, *_ in factors} | {b for _, b, _, _ in factors if b}
    P_plain = sum(s for nm, s in zip(lay.names, lay.sizes, strict=True) if nm not in named)
    data = {}
    with gs.GradientWriter(path, params, factors=specs, factor_dtype=dtype, **kw) as w:
        for r in range(records):
            key = (10 * r, "train" if r % 2 == 0 else "test")
            plains, facs = [], {f[0]: ([], []) for f in factors}
            for _ in range(writes):
                n = int(rng.integers(1, 6))
                G = rng.normal(size=(n, P_plain)).astype(np.float32)
                fac = {}
                for wn, _, o, i in factors:
                    shp = (n, T) if T > 1 else (n,)
                    A, D = rng.normal(size=(*shp, i)), rng.normal(size=(*shp, o))
                    if T > 1:  # zero padding beyond each sample's own length
                        lens = rng.integers(1, T + 1, n)
                        mask = np.arange(T)[None, :] < lens[:, None]
                        A, D = A * mask[..., None], D * mask[..., None]
                    fac[wn] = (A.astype(dtype), D.astype(dtype))
                    facs[wn][0].append(fac[wn][0])
                    facs[wn][1].append(fac[wn][1])
                w.write(*key, G if P_plain else None, factors=fac,
                        loss=rng.normal(size=n), label=rng.integers(0, 3, n))
                plains.append(G)
            data[key] = (np.concatenate(plains),
                         {k: (np.concatenate(a), np.concatenate(d)) for k, (a, d) in facs.items()})
    return data


@pytest.mark.parametrize("T, rows", [(1, 1), (3, 4), (2, 2)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_materialised_rows_equal_an_independent_einsum(tmp_path, T, rows, dtype, seed):
    rng = np.random.default_rng(seed * 7 + T)
    params, factors = _model(rng, n_layers=int(rng.integers(1, 4)),
                             bias=(True, False) if seed else (False, True))
    path = tmp_path / "f.h5"
    data = _write(path, rng, params, factors, rows=rows, T=T, dtype=dtype)
    with gs.open_store(path) as s:
        assert s.version == FACTORED_VERSION and s.factored
        assert [f.weight for f in s.factors] == [f[0] for f in factors]
        assert all(f.dtype == np.dtype(dtype) and f.rows == rows for f in s.factors)
        P = s.layout.n_params
        assert s.n_plain == s.plain_index.size == s.grads_dataset.shape[1]
        for key, (plain, fac) in data.items():
            ref, terms = _reference(params, factors, plain, fac, T)
            got = s.read_grads(*key)
            assert got.shape == (plain.shape[0], P) and got.dtype == np.float32
            if T == 1 and dtype == "float32":
                np.testing.assert_array_equal(got, ref.astype(np.float32))
            else:
                assert_within(got, ref, U32 * np.abs(ref) + 4 * T * U64 * terms
                              + (U32 * terms if dtype == "float32" else 0), "materialised")
            # blocks, row/column windows and the plain columns agree with the whole record
            np.testing.assert_array_equal(np.concatenate(list(s.iter_grads(*key, rows=2))), got)
            n = got.shape[0]
            for a, b, c0, c1 in ((0, n, 0, P), (1, n - 1, 1, P - 1), (n // 2, n, P // 3, P)):
                np.testing.assert_array_equal(s.read_grads_rows(*key, a, b, (c0, c1)),
                                              got[a:b, c0:c1])
            np.testing.assert_array_equal(s.read_plain_rows(*key), plain)
            np.testing.assert_array_equal(got[:, s.plain_index], plain)
            f = s.read_factors(*key, 1, n)
            for wn, (A, D) in fac.items():  # noqa: B007 - D checked via read_grads
                A3 = A if A.ndim == 3 else A[:, None]
                assert f[wn][0].shape == (n - 1, rows, A3.shape[2])
                np.testing.assert_array_equal(f[wn][0][:, :A3.shape[1]], A3[1:])
                assert not f[wn][0][:, A3.shape[1]:].any()  # the padding rows are zeros
            m = materialize(s.factors, s.plain_index, P, plain, fac, np.float32)
            np.testing.assert_array_equal(m, got)


def test_every_tensor_factored_stores_no_plain_columns(tmp_path, rng):
    params = [("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 3)), ("b.bias", (2,))]
    factors = [("a.weight", "a.bias", 3, 4), ("b.weight", "b.bias", 2, 3)]
    path = tmp_path / "mlp.h5"
    data = _write(path, rng, params, factors, records=2, writes=2)
    with gs.open_store(path) as s:
        assert s.n_plain == 0 and s.plain_index.size == 0 and s.grads_dataset.shape[1] == 0
        for key, (plain, fac) in data.items():
            ref, _ = _reference(params, factors, plain, fac, 1)
            np.testing.assert_array_equal(s.read_grads(*key), ref.astype(np.float32))
            assert s.read_plain_rows(*key).shape == (plain.shape[0], 0)
            assert s.read_loss(*key).shape == (plain.shape[0],)
            with s.view(*key) as v:
                assert sum(it.hi - it.lo for it in v) == plain.shape[0]


def test_stores_without_factors_stay_format_3(tmp_path, rng):
    p = tmp_path / "plain.h5"
    g = rng.normal(size=(4, 5)).astype(np.float32)
    with gs.GradientWriter(p, [("w", (5,))]) as w:
        w.write(0, "train", g)
    with h5py.File(p, "r") as f:
        assert int(f.attrs["format_version"]) == FORMAT_VERSION == 3
        assert "factors" not in f and "factors" not in f.attrs
    with gs.open_store(p) as s:
        assert not s.factored and s.factors == []
        np.testing.assert_array_equal(s.plain_index, np.arange(5))
        np.testing.assert_array_equal(s.read_grads(0, "train"), g)
        with pytest.raises(StoreError, match="no factored tensors"):
            s.read_factors(0, "train")


def test_view_spans_the_plain_columns(tmp_path, rng):
    params, factors = _model(rng, n_layers=2)
    path = tmp_path / "v.h5"
    data = _write(path, rng, params, factors, compression="lzf", chunks=(3, 4))
    with gs.open_store(path) as s:
        for key, (plain, _) in data.items():
            with s.view(*key) as v:
                assert (v.c0, v.c1) == (0, s.n_plain)
                rows = np.concatenate([it.array for it in v])
            np.testing.assert_array_equal(rows, plain)


def test_write_moments_and_factors_in_one_store(tmp_path, rng):
    params = [("w", (2, 3)), ("b", (2,)), ("c", (4,))]
    p = tmp_path / "m.h5"
    mean, m2 = rng.normal(size=12), rng.random(12)
    with gs.GradientWriter(p, params, factors=[("w", "b")]) as w:
        w.write_moments(0, "test", 5, mean, m2)
        w.write(0, "train", rng.normal(size=(2, 4)),
                factors={"w": (rng.normal(size=(2, 3)), rng.normal(size=(2, 2)))})
    with gs.open_store(p) as s:
        c, m, q = s.read_moments(0, "test")
        np.testing.assert_array_equal(m[0], mean)
        assert s.read_grads(0, "train").shape == (2, 12)


def _writer(tmp_path, **kw):
    params = [("w", (2, 3)), ("b", (2,)), ("c", (4,))]
    return gs.GradientWriter(tmp_path / "x.h5", params, **kw)


@pytest.mark.parametrize("factors, match", [
    (["nope"], "no such tensor"),
    (["c"], "must be 2-D"),
    ([("w", "c")], "bias 'c' has shape"),
    ([("w", "zz")], "not a tensor"),
    (["w", "w"], "named by two factors"),
    ([gs.FactorSpec("w", rows=0)], "rows must be an integer"),
    ([42], "expected a FactorSpec"),
])
def test_bad_declarations_are_refused(tmp_path, factors, match):
    with pytest.raises(SchemaError, match=match):
        _writer(tmp_path, factors=factors)
    assert not (tmp_path / "x.h5").exists()


def test_bad_factor_dtype_is_refused(tmp_path):
    with pytest.raises(SchemaError, match="float32 or float64"):
        _writer(tmp_path, factors=["w"], factor_dtype="float16")


def test_bad_writes_append_nothing(tmp_path, rng):
    A, D = rng.normal(size=(3, 3)), rng.normal(size=(3, 2))
    G = rng.normal(size=(3, 4))
    with _writer(tmp_path, factors=[gs.FactorSpec("w", "b", rows=2)]) as w:
        cases = [
            (dict(grads=rng.normal(size=(3, 12))), "pass their factors"),
            (dict(grads=G, factors={}), "'w' is missing"),
            (dict(grads=G, factors={"w": (A, D), "c": (A, D)}), "not declared"),
            (dict(grads=G, factors={"w": (A, D[:, :1])}), r"delta has shape"),
            (dict(grads=G, factors={"w": (A, D[:2])}), "disagree"),
            (dict(grads=G, factors={"w": (np.zeros((3, 3, 3)), np.zeros((3, 3, 2)))}), "T = 3"),
            (dict(grads=G[:2], factors={"w": (A, D)}), "grads has 2 rows"),
            (dict(grads=None, factors={"w": (A, D)}), "plain columns are missing"),
            (dict(grads=G, factors={"w": A}), "pair"),
            (dict(grads=G, factors={"w": (A.astype(bool), D)}), "not a real number"),
        ]
        for kw, match in cases:
            with pytest.raises(SchemaError, match=match):
                w.write(0, "train", **kw)
        with pytest.raises(StoreError, match="overflows float32"):
            w.write(0, "train", G, factors={"w": (A * 1e300, D)})
        w.write(0, "train", G, factors={"w": (A, D)})
    with gs.open_store(tmp_path / "x.h5") as s:
        assert s.record(0, "train").n_samples == 3
    with _writer(tmp_path, overwrite=True) as w, pytest.raises(SchemaError, match="without factors"):
        w.write(0, "train", rng.normal(size=(3, 12)), factors={"w": (A, D)})


def _chunk_addr(path, name, row=0):
    with h5py.File(path, "r") as f:
        ds = f[name]
        info = ds.id.get_chunk_info_by_coord((row, 0, 0))
        return info.byte_offset


@pytest.mark.parametrize("name", ["factors/0/a", "factors/1/delta"])
def test_damaged_factor_bytes_are_detected(tmp_path, rng, name):
    params, factors = _model(rng, n_layers=2)
    path = tmp_path / "d.h5"
    data = _write(path, rng, params, factors, records=1, writes=1)
    key = next(iter(data))
    off = _chunk_addr(path, name)
    with open(path, "r+b") as fh:
        fh.seek(off + 1)
        b = fh.read(1)
        fh.seek(off + 1)
        fh.write(bytes([b[0] ^ 0x40]))
    with gs.open_store(path) as s:
        for read in (lambda: s.read_factors(*key), lambda: s.read_grads(*key),
                     lambda: s.read_loss(*key), lambda: s.read_grads_rows(*key, 0, 1)):
            with pytest.raises(StoreError, match=r"record \(step=0, split='train'\).*factors"):
                read()


@pytest.mark.parametrize("all_factored", [False, True])
def test_xarray_views_of_a_factored_store(tmp_path, rng, all_factored):
    xr = pytest.importorskip("xarray")
    if all_factored:
        params = [("a.weight", (3, 4)), ("a.bias", (3,))]
        factors = [("a.weight", "a.bias", 3, 4)]
    else:
        params, factors = _model(rng, n_layers=2)
    path = tmp_path / "x.h5"
    data = _write(path, rng, params, factors, rows=2, T=2)
    with gs.open_store(path) as s:
        want = np.concatenate([s.read_grads(*k) for k in sorted(data)])
        n_plain = s.n_plain
    with xr.open_dataset(path, engine="gsnr_stats") as ds:
        assert ds["grads"].dtype == np.float32 and ds.attrs["n_plain"] == n_plain
        np.testing.assert_array_equal(ds["grads"].values, want)
        np.testing.assert_array_equal(ds["grads"][1:5, 2:7].values, want[1:5, 2:7])
    engines = [e for e in ("netcdf4", "h5netcdf") if e in xr.backends.list_engines()]
    for engine in engines:  # the raw netCDF face: every dataset, with named dimensions
        with xr.open_dataset(path, engine=engine) as raw:
            assert raw["grads"].dims == ("sample", "plain_param")
            assert raw.sizes["plain_param"] == n_plain and raw.sizes["sample"] == want.shape[0]
        with xr.open_dataset(path, engine=engine, group="factors/0") as g0:
            assert g0["a"].dims == ("sample", "t", "in") and g0["delta"].dims[2] == "out"
            assert g0["a"].shape == (want.shape[0], 2, factors[0][3])


def test_info_shows_the_factored_tensors_and_the_saving(tmp_path, rng, capsys):
    from gsnr_stats.cli import main as cli_main

    params = [("fc.weight", (30, 20)), ("fc.bias", (30,)), ("norm", (7,)),
              ("seq.weight", (10, 40))]
    factors = [("fc.weight", "fc.bias", 30, 20), ("seq.weight", None, 10, 40)]
    path = tmp_path / "i.h5"
    data = _write(path, rng, params, factors, rows=2, T=2, records=1, writes=2)
    n = sum(p.shape[0] for p, _ in data.values())
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format gsnr-stats v4" in out
    assert "factored tensors (format 4): 2, factor dtype float32; grads holds the P_plain=7 " \
           "plain columns of P=1037" in out
    assert "fc.weight + bias fc.bias  (30, 20), rows T=2: 100 values a sample instead of 630" in out
    assert "seq.weight  (10, 40), rows T=2: 100 values a sample instead of 400" in out
    stored, full = n * 4 * (7 + 100 + 100), n * 4 * 1037
    with gs.open_store(path) as s:
        assert s.describe_factors()[-1].endswith(f"materialised ({full / stored:.1f}x smaller)")
        assert f"{stored} bytes stored" in out or f"{stored / 1e3:.1f} kB stored" in out


def test_factored_estimate_bounds_the_file_size(tmp_path, rng):
    params = [("fc.weight", (64, 100)), ("fc.bias", (64,)), ("norm", (5,))]
    p = tmp_path / "e.h5"
    n = 300
    with gs.GradientWriter(p, params, factors=[("fc.weight", "fc.bias")], chunks=(16, 5)) as w:
        est = w.estimate_bytes(n)
        G = rng.normal(size=(n, 5)).astype(np.float32)
        for lo in range(0, n, 50):  # whole chunk rows of the plain columns go through pwritev
            w.write(0, "train", G[lo:lo + 50],
                    factors={"fc.weight": (rng.normal(size=(50, 100)), rng.normal(size=(50, 64)))})
    size = p.stat().st_size
    full = gs.estimate_store_bytes(params, n)
    assert size <= est < full / 5, (size, est, full)
    with gs.open_store(p) as s:
        assert s.read_grads(0, "train").shape == (n, 6469)
        np.testing.assert_array_equal(s.read_plain_rows(0, "train"), G)
