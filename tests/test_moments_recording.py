"""Moments-only recording, the torch Linear/Conv fast path, parameter subsets, JL projections.

Independent routes: float64 two-pass NumPy moments of ``torch.func``/``jax``/analytic
per-sample gradients (``conftest.two_pass``), the per-sample records' own ``reduce``, the
explicit projection matrix, and exact inner products.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from conftest import U32, U64, assert_within, f32_chain_bound, moments_shift_bound, two_pass

torch = pytest.importorskip("torch")
from gsnr_stats.adapters import _moments  # noqa: E402
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError, NonFiniteError  # noqa: E402

LF = nn.CrossEntropyLoss(reduction="none")
EPS32 = 2.0 ** -24  # float32 unit roundoff
# Terms along the longest float32 chain ending in a gradient entry or loss of the float32
# MLPs below (forward 12 + 16 + 8 or 20 + 24, logsumexp 5; backward 5 + 5 + 8, ReLU/tanh'
# and products: ~65), about twice that; the linear softmax model of the JAX test has ~15.
MLP_K32, LIN_K32 = 128, 32


def _close(got_m, got_v, ref_m, ref_v, rtol):
    """|Δmean| ≤ rtol (|m| + s) and |Δvar| ≤ rtol var, elementwise."""
    s = np.sqrt(ref_v)
    assert np.all(np.abs(got_m - ref_m) <= rtol * (np.abs(ref_m) + s) + 1e-300), \
        np.max(np.abs(got_m - ref_m) / (np.abs(ref_m) + s + 1e-300))
    assert np.all(np.abs(got_v - ref_v) <= rtol * ref_v + 1e-300), \
        np.nanmax(np.abs(got_v - ref_v) / np.where(ref_v > 0, ref_v, 1))


def _data(n, shape, classes=5, seed=0, dtype=torch.float64, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype) + shift
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


class SeqNet(nn.Module):
    """Embedding + LayerNorm (vmap fallback), a Linear on (B, T, d) (materialised fast path),
    a Linear called twice, and a head tied to nothing."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 6)
        self.twice = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, tok):
        h = self.norm(self.emb(tok))             # (B, T, 6)
        h = torch.tanh(self.proj(h)).mean(1)     # Linear on (B, T, d)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(h)


class Tied(nn.Module):
    """The output layer's weight is the input layer's, transposed via a parameter share."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7, bias=False)
        self.b = nn.Linear(7, 5, bias=False)
        self.c = nn.Linear(7, 5)
        self.c.weight = self.b.weight  # tied: both uses must be counted

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + self.c(h)


class OutsideUse(nn.Module):
    """A Linear whose weight is also used outside its forward (the first-batch check)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(x) + 0.3 * torch.tanh(x @ self.fc.weight.T)


class FlatBatch(nn.Module):
    """A Linear applied to (B*T, d): its rows are not samples (the check demotes it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 5, 5)

    def forward(self, x):
        b = x.shape[0]
        return self.head(torch.tanh(self.fc(x.reshape(b * 5, 3))).reshape(b, 20))


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(inplace=True),
                        nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, stride=2, padding="valid", bias=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6, 5))
    c1d = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same", dilation=2), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 9, 5))
    return {
        "mlp": (mlp, lambda n, s: _data(n, (12,), seed=s, shift=0.7)),
        "cnn": (cnn, lambda n, s: _data(n, (3, 8, 8), seed=s)),
        "conv1d": (c1d, lambda n, s: _data(n, (2, 9), seed=s)),
        "seq": (SeqNet(), lambda n, s: (torch.randint(0, 11, (n, 4),
                                                      generator=torch.Generator().manual_seed(s)),
                                        torch.randint(0, 5, (n,)))),
        "tied": (Tied(), lambda n, s: _data(n, (5,), seed=s)),
        "outside": (OutsideUse(), lambda n, s: _data(n, (4,), seed=s)),
        "nofast": (nn.Sequential(nn.LayerNorm(5), nn.Tanh()), lambda n, s: _data(n, (5,), seed=s)),
        "flatbatch": (FlatBatch(), lambda n, s: _data(n, (5, 3), seed=s)),
        "conv3d": (nn.Sequential(nn.Conv3d(2, 3, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1),
                                           dilation=(1, 2, 1)), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(108, 5)),
                   lambda n, s: _data(n, (2, 5, 6, 5), seed=s)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "seq", "tied", "outside", "nofast",
                                  "flatbatch", "conv3d"])
def test_fast_path_matches_float64_reference(name, tmp_path):
    model, make = models()[name]
    model = model.double().eval()
    x, y = make(96, 1)
    G = gt.per_sample_gradients(model, LF, x, y)  # vmap, float64
    ref_m, ref_v = two_pass(G)
    path = tmp_path / "m.h5"
    with gt.open_writer(path, model) as w:
        with (pytest.warns(UserWarning, match="do not match")
              if name in ("outside", "flatbatch") else _noop()):
            s = gt.record(w, model, LF, (x, y), 0, "train", batch_size=32, keep="moments")
    st = gs.reduce(path)
    assert int(st["count"][0, 0]) == 96
    _close(st["mean"].values[0, 0], st["var"].values[0, 0], ref_m, ref_v, 1e-9)
    with torch.no_grad():
        assert s.mean_loss == pytest.approx(float(LF(model(x), y).mean()), rel=1e-12)
    assert math.isnan(float(st["loss_mean"][0, 0]))  # moments-only records carry no losses


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "seq", "tied", "outside", "nofast",
                                  "flatbatch", "conv3d"])
def test_fast_path_dump_equals_float64_vmap(name, tmp_path):
    """keep="grads" through the fast path (per-sample rows written straight into the chunk
    buffer) equals torch.func's float64 per-sample gradients row by row, with chunk widths
    that do not divide P (padded, strided buffer rows) and a truncated last batch."""
    model, make = models()[name]
    model = model.double().eval()
    x, y = make(70, 2)
    G, L = gt.per_sample_gradients(model, LF, x, y, return_loss=True)  # vmap, float64
    path = tmp_path / "g.h5"
    P = G.shape[1]
    with gt.open_writer(path, model, chunks=(16, max(1, P // 3 + 1))) as w:
        rec = gt.Recorder(w, model, LF)
        demoted = name in ("outside", "flatbatch")
        with pytest.warns(UserWarning, match="do not match") if demoted else _noop():
            s = rec.record((x, y), 0, "train", batch_size=32, max_samples=67)
    fast_layers = {"mlp": 3, "cnn": 3, "conv1d": 2, "seq": 3, "tied": 1, "outside": 0,
                   "nofast": 0, "flatbatch": 1, "conv3d": 2}[name]
    assert len(rec._fast.modules) == fast_layers  # the fast path did the work
    with gs.GradientStore(path) as st:
        got, loss = st.read_grads(0, "train"), st.read_loss(0, "train")
    scale = np.abs(G).max(axis=0) + 1e-300
    # the store holds float32: one rounding (u |g|) of float64 rows within 1e-12 scale of G
    assert_within(got, G[:67], U32 * np.abs(G[:67]) + 2e-12 * scale, "float32 dump")
    np.testing.assert_allclose(loss, L[:67], rtol=1e-13)
    assert s.n_samples == 67
    # in float64 itself, into a strided (padded-row) buffer
    buf = torch.full((70, P + 5), np.nan, dtype=torch.float64)
    losses = rec._fast.grads_into(x, y, 70, buf[:, :P])
    assert np.all(np.abs(buf[:, :P].numpy() - G) <= 1e-12 * scale)
    assert torch.isnan(buf[:, P:]).all()  # nothing written outside the view
    np.testing.assert_allclose(losses.numpy(), L, rtol=1e-13)


def test_fast_path_dump_float32_and_partial_layers(tmp_path):
    """float32: fast dump equals the vmap dump (fast=False) to float32 rounding; a filter that
    keeps a Linear's weight but not its bias sends that layer to vmap, others stay fast."""
    model, make = models()["mlp"]
    model = model.eval()
    x, y = make(50, 3)
    x = x.float()
    keep = lambda n, p: n != "3.bias"  # noqa: E731
    out = {}
    for fast in (True, False):
        path = tmp_path / f"{fast}.h5"
        with gt.open_writer(path, model, param_filter=keep) as w:
            rec = gt.Recorder(w, model, LF, fast=fast, param_filter=keep)
            rec.record((x, y), 4, "test", batch_size=16)
        if fast:
            assert set(rec._fast.modules) == {"1", "5"}
        else:
            assert rec._fast is None
        with gs.GradientStore(path) as st:
            out[fast] = st.read_grads(4, "test"), st.read_loss(4, "test")
    ref = gt.per_sample_gradients(model, LF, x, y, param_filter=keep)
    for g, _ in out.values():  # fast or vmap in batches of 16 vs one vmap call of 50
        assert g.shape == ref.shape
        assert_within(g, ref, 2 * f32_chain_bound(ref, MLP_K32), "float32 dump")
    loss = out[False][1]  # one batched forward vs vmap's: K u max |loss| each
    assert_within(out[True][1], loss, 2 * MLP_K32 * U32 * np.abs(loss).max(), "losses")


def test_fast_path_modules_plan():
    from gsnr_stats.adapters._torch_fast import fast_modules

    m = models()
    names = lambda mod: [n for n, _ in mod.named_parameters()]  # noqa: E731
    seq = m["seq"][0]
    assert set(fast_modules(seq, names(seq))) == {"proj", "twice", "head"}
    tied = m["tied"][0]
    assert set(fast_modules(tied, names(tied))) == {"a"}  # b and c share a weight
    cnn = m["cnn"][0]
    assert set(fast_modules(cnn, names(cnn))) == {"0", "3", "6"}


def test_float32_moments_equal_per_sample_records(tmp_path):
    """keep="moments" (fast and vmap) against keep="grads" + reduce on a float32 MLP with
    |mean|/std typical of training: agreement to float32 rounding of the stored gradients."""
    model, make = models()["mlp"]
    model = model.float().eval()
    x, y = make(128, 2)
    x = x.float()
    out = {}
    for tag, kw in (("grads", {}), ("fast", {"keep": "moments"}),
                    ("vmap", {"keep": "moments", "fast": False})):
        p = tmp_path / f"{tag}.h5"
        with gt.open_writer(p, model) as w:
            gt.record(w, model, LF, (x, y), 3, "train", batch_size=64, **kw)
        out[tag] = gs.reduce(p)
    ref = out["grads"]
    r = (ref["mean"] ** 2 / ref["var"]).values
    assert np.nanmedian(r) < 10  # realistic GSNR, so float32 agreement is meaningful
    with gs.open_store(tmp_path / "grads.h5") as s:
        G = s.read_grads(3, "train")
    # each route's rows are within K u colmax of the exact ones (the fast moments sum exact
    # float64 products of float32 δ and a), any two within 2 K u colmax; float64 sums 1e-10
    rm, rv = ref["mean"].values, ref["var"].values
    bm, bv = moments_shift_bound(2 * f32_chain_bound(G, MLP_K32), rv, G.shape[0])
    for tag in ("fast", "vmap"):
        assert_within(out[tag]["mean"].values, rm, bm + 1e-10 * np.abs(rm), f"{tag} mean")
        assert_within(out[tag]["var"].values, rv, bv + 1e-10 * rv, f"{tag} var")
        np.testing.assert_array_equal(out[tag]["count"].values, ref["count"].values)


def test_moments_blocks_are_jackknife_blocks(tmp_path):
    model, make = models()["mlp"]
    model = model.double().eval()
    x, y = make(64, 3)
    pg, pm, pb = tmp_path / "g.h5", tmp_path / "m.h5", tmp_path / "b.h5"
    with gt.open_writer(pg, model) as w:
        gt.record(w, model, LF, (x, y), 0, "train", batch_size=16)
    with gt.open_writer(pm, model) as w:
        gt.record(w, model, LF, (x, y), 0, "train", batch_size=16, keep="moments")
    with gt.open_writer(pb, model) as w:  # 8-sample batches merged into 32-sample blocks
        gt.record(w, model, LF, (x, y), 0, "train", batch_size=8, keep="moments", block_size=32)
    with gs.open_store(pm) as s:
        assert s.read_moments(0, "train")[0].tolist() == [16.0] * 4
    with gs.open_store(pb) as s:
        assert s.read_moments(0, "train")[0].tolist() == [32.0, 32.0]
    G = gt.per_sample_gradients(model, LF, x, y)
    for K in (2, 4):
        a = gs.reduce(pg, blocks=K)
        b = gs.reduce(pm, blocks=K)
        np.testing.assert_array_equal(a["block_count"].values, b["block_count"].values)
        for k in range(K):
            rm, rv = two_pass(G[k * 64 // K:(k + 1) * 64 // K])
            _close(b["block_mean"].values[0, 0, k], b["block_m2"].values[0, 0, k] /
                   (64 // K - 1), rm, rv, 1e-9)
        # stored float32 gradients vs float64 moments: float32 rounding only, each entry by
        # <= u |g| <= b = u colmax (float64 sums: 1e-12)
        b32 = U32 * np.abs(G).max(axis=0)
        assert_within(b["block_mean"].values, a["block_mean"].values,
                      b32 + 1e-12 * np.abs(G).max(axis=0), "block means")
        ja = gs.jackknife(a, lambda s: s[["var"]], variables=["var"])
        jb = gs.jackknife(b, lambda s: s[["var"]], variables=["var"])
        # se = sqrt((K-1)/K) |C θ| (C centres, |C| = 1) moves by <= sqrt(K-1) max_k |Δθ_k|;
        # θ_k, the variance of N' = N - N/K samples, has s_k^2 <= (N-1)/(N'-1) var
        N1 = 64 - 64 // K
        _, dv = moments_shift_bound(b32, two_pass(G)[1] * 63 / (N1 - 1), N1)
        se = ja["var_se"].values
        assert_within(jb["var_se"].values, se, math.sqrt(K - 1) * dv + 1e-10 * se, "var_se")
    c, d = gs.reduce(pb, blocks=2), gs.reduce(pm, blocks=2)
    np.testing.assert_allclose(c["block_mean"].values, d["block_mean"].values, rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(c["block_m2"].values, d["block_m2"].values, rtol=1e-10)


def test_subset_columns_and_seeds(tmp_path):
    model, make = models()["cnn"]
    model = model.float().eval()
    x, y = make(40, 4)
    x = x.float()
    full = tmp_path / "full.h5"
    with gt.open_writer(full, model) as w:
        gt.record(w, model, LF, (x, y), 0, "train", batch_size=20)
    ref = gs.reduce(full)
    # Each route (fast path for the full dump, vmap for the subset dump, float64 moments of
    # float32 rows for keep="moments") is compared with a float64 reference, never with each
    # other: two float32 routes round differently on other CPUs / thread counts. Every
    # stored entry ends a chain of float32 dot products (conv 27 and 36 terms, head 6,
    # backward sums over <= 64 positions); gamma_K ~ K u per product summed along the chain
    # bounds |dg_ij| by ~(sum K) u = ~200 u times the terms' magnitude: take 256 u times the
    # column's largest |g| (measured <= 12 u on this CPU).
    G64 = gt.per_sample_gradients(copy.deepcopy(model).double(), LF, x.double(), y)
    m64, v64 = two_pass(G64)
    N = G64.shape[0]
    B = 256 * EPS32 * np.abs(G64).max(axis=0)

    def near_f64(st, cols):
        """A mean of N entries each off by <= b is off by <= b; by Cauchy-Schwarz the
        variance is off by <= 2 sqrt(N/(N-1)) s b + N/(N-1) b^2 (float64 reduce: 1e-10)."""
        b, m, v = B[cols], m64[cols], v64[cols]
        dm = np.abs(st["mean"].values[0, 0] - m)
        dv = np.abs(st["var"].values[0, 0] - v)
        assert np.all(dm <= b + 1e-10 * np.abs(m)), np.max(dm / b)
        f = N / (N - 1)
        assert np.all(dv <= 2 * math.sqrt(f) * np.sqrt(v) * b + f * b * b + 1e-10 * v), \
            np.max(dv / (2 * np.sqrt(v) * b + 1e-300))

    near_f64(ref, slice(None))
    with gs.open_store(full) as s:
        assert np.all(np.abs(s.read_grads(0, "train") - G64) <= B)
    for keep in ("grads", "moments"):
        p = tmp_path / f"sub_{keep}.h5"
        with gt.open_writer(p, model, params_subset=50, seed=7) as w:
            gt.record(w, model, LF, (x, y), 0, "train", batch_size=20, keep=keep,
                      params_subset=50, seed=7)
        st = gs.reduce(p)
        with gs.open_store(p) as s:
            sub = _moments.ParamSubset.from_attrs(s.attrs["user_attrs"])
            names = list(s.layout.names)
        assert sub.k == 50 and sub.seed == 7
        assert all(n.endswith("[sub]") for n in names)
        assert names == [f"{n}[sub]" for n, _ in gt.layout(model) if n in sub.local]
        idx = sub.indices
        assert idx.size == 50 and np.all(np.diff(idx) > 0)
        # stratified: each tensor's share is within one of k * P_t / P
        P = ref.sizes["param"]
        for n, shape in gt.layout(model):
            want = 50 * math.prod(shape) / P
            assert abs(sub.local.get(n, np.zeros(0)).size - want) < 1
        # the subset's columns are the full layout's columns idx, to float32 rounding
        near_f64(st, idx)
        if keep == "grads":
            with gs.open_store(p) as s:
                assert np.all(np.abs(s.read_grads(0, "train") - G64[:, idx]) <= B[idx])
        assert list(st["tensor"].values) == list(np.repeat(
            names, [sub.local[n.removesuffix("[sub]")].size for n in names]))
    lay = gt.layout(model)
    a = _moments.ParamSubset.choose(lay, 0.1, seed=3)
    b = _moments.ParamSubset.choose(lay, 0.1, seed=3)
    c = _moments.ParamSubset.choose(lay, 0.1, seed=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert a.k == round(0.1 * sum(math.prod(s) for _, s in lay))


def test_projection_inner_products_and_reproducibility():
    rng = np.random.default_rng(0)
    P, k = 3000, 2048
    G = rng.normal(size=(12, P)) + 0.5 * rng.normal(size=P)
    proj = _moments.JLProjection(P, k, seed=5, block_rows=700)
    Z = proj.project(G)
    R = proj.matrix()
    assert R.shape == (P, k)
    np.testing.assert_allclose(Z, G @ R, rtol=1e-12, atol=1e-12)
    # the same matrix whatever the batching or caching (BLAS round-off aside)
    np.testing.assert_allclose(np.vstack([proj.project(G[:5]), proj.project(G[5:])]), Z,
                               rtol=1e-12, atol=1e-12)
    again = _moments.JLProjection(P, k, seed=5, block_rows=700, cache_bytes=0)
    np.testing.assert_array_equal(again.matrix(), R)
    other = _moments.JLProjection(P, k, seed=6, block_rows=700)
    assert not np.allclose(other.project(G), Z)
    exact = G @ G.T
    approx = Z @ Z.T
    nrm = np.sqrt(np.diag(exact))
    sd = np.sqrt((np.outer(nrm, nrm) ** 2 + exact ** 2) / k)  # JL: Var[z_g.z_h]
    assert np.all(np.abs(approx - exact) <= 5 * sd)


def test_projection_preserves_first_order_osgr(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5)).float().eval()
    P = sum(p.numel() for p in model.parameters())
    k = 4096
    data = {sp: _data(160, (20,), seed=s, dtype=torch.float32, shift=0.4)
            for sp, s in (("train", 10), ("test", 11))}
    full, proj = tmp_path / "full.h5", tmp_path / "jl.h5"
    with gt.open_writer(full, model) as w:
        for sp, d in data.items():
            gt.record(w, model, LF, d, 0, sp, batch_size=80)
    with gt.open_writer(proj, model, project=k, seed=2) as w:
        for sp, d in data.items():
            gt.record(w, model, LF, d, 0, sp, batch_size=80, project=k, seed=2)
    with gs.open_store(proj) as s:
        assert list(s.layout.names) == ["jl"] and s.layout.n_params == k
        ua = s.attrs["user_attrs"]["jl_projection"]
        assert ua["k"] == k and ua["seed"] == 2 and ua["n_params"] == P
        Zs = s.read_grads(0, "train")
    with gs.open_store(full) as s:
        Gs = s.read_grads(0, "train")
    R = _moments.JLProjection.from_attrs({"jl_projection": ua}).matrix()
    # Zs: float32 rounding (u |Z|) of vmap rows projected in float64; Gs: the fast path's
    # float32 rows. The rows differ by <= 2 K u colmax, mapped through |R|, and each float64
    # projection accumulates P terms (P u64 (|G| @ |R|))
    bound = U32 * np.abs(Zs) + (2 * f32_chain_bound(Gs, MLP_K32)
                                + 2 * P * U64 * np.abs(Gs)) @ np.abs(R)
    assert_within(Zs, Gs.astype(np.float64) @ R, bound, "projected rows")
    n = 16
    a = gs.osgr_first_order(full, n=n, n_subsets=32, seed=0)
    b = gs.osgr_first_order(proj, n=n, n_subsets=32, seed=0)
    Ra = float(a["osgr_first_order"].values.ravel()[0])
    Rb = float(b["osgr_first_order"].values.ravel()[0])
    # JL bound: each subset inner product has sd <= sqrt(2/k) |u||v|, so
    # |ΔR| <= 4 sqrt(2/k) (sqrt(S_test S_train) + |R| S_train) / S_train, with S the
    # expected |g_D|^2 = n^2 |m|^2 + n tr(Σ) of each split.
    S = {}
    with gs.open_store(full) as s:
        for sp in ("train", "test"):
            m, v = two_pass(s.read_grads(0, sp))
            S[sp] = n * n * float(m @ m) + n * float(v.sum())
    tol = 4 * math.sqrt(2 / k) * (math.sqrt(S["test"] * S["train"]) + abs(Ra) * S["train"]) \
        / S["train"]
    assert tol < 0.3
    assert abs(Rb - Ra) <= tol, (Ra, Rb, tol)


def test_jax_and_sklearn_keep_moments(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from gsnr_stats.adapters import jax as gj
    from gsnr_stats.adapters import sklearn as gk
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(6, 3)).astype(np.float32) * 0.5,
              "b": np.zeros(3, np.float32)}

    def loss_one(p, x, y):
        z = x @ p["w"] + p["b"]
        return jax.nn.logsumexp(z) - z[y]

    X = rng.normal(size=(72, 6)).astype(np.float32) + 0.3
    Y = rng.integers(0, 3, 72)
    out = {}
    for keep in ("grads", "moments"):
        p = tmp_path / f"jax_{keep}.h5"
        with gj.open_writer(p, params) as w:
            gj.record(w, loss_one, params, (X, Y), 0, "train", batch_size=24, keep=keep)
        out[keep] = gs.reduce(p, blocks=3)
    for v in ("mean", "var", "gsnr", "block_mean", "block_m2"):
        np.testing.assert_allclose(out["moments"][v].values, out["grads"][v].values, rtol=1e-10,
                                   atol=0)
    # the independent route: float64 two-pass of jax's per-sample gradients
    G = gj.per_sample_gradients(loss_one, params, jnp.asarray(X), jnp.asarray(Y))
    m, v = two_pass(G)
    # one call of 72 vs the recorder's batches of 24 (separately compiled): two float32
    # routes, rows within 2 K u colmax of each other; float64 sums 1e-10
    bm, bv = moments_shift_bound(2 * f32_chain_bound(G, LIN_K32), v, G.shape[0])
    assert_within(out["moments"]["mean"].values[0, 0], m, bm + 1e-10 * np.abs(m), "jax mean")
    assert_within(out["moments"]["var"].values[0, 0], v, bv + 1e-10 * v, "jax var")

    est = LogisticRegression(max_iter=500).fit(X.astype(np.float64), Y)
    Xd = X.astype(np.float64)
    Gs = gk.per_sample_gradients(est, Xd, Y)  # float64, analytic
    m, v = two_pass(Gs)
    res = {}
    for keep in ("grads", "moments"):
        p = tmp_path / f"sk_{keep}.h5"
        with gk.open_writer(p, est) as w:
            gk.record(w, est, Xd, Y, step=0, split="train", batch_size=25, keep=keep)
        res[keep] = gs.reduce(p)
    # moments keep float64 gradients: float64 agreement with the analytic reference
    _close(res["moments"]["mean"].values[0, 0], res["moments"]["var"].values[0, 0], m, v, 1e-10)
    # the per-sample record stores float32: each entry rounded once, by <= u colmax
    gm, gv = res["grads"]["mean"].values, res["grads"]["var"].values
    bm, bv = moments_shift_bound(U32 * np.abs(Gs).max(axis=0), gv, Gs.shape[0])
    assert_within(res["moments"]["mean"].values, gm, bm + 1e-10 * np.abs(gm), "sklearn mean")
    assert_within(res["moments"]["var"].values, gv, bv + 1e-10 * gv, "sklearn var")
    # subset + projection through sklearn and JAX writers
    p = tmp_path / "sk_sub.h5"
    with gk.open_writer(p, est, params_subset=7, seed=1) as w:
        gk.record(w, est, Xd, Y, step=0, split="train", params_subset=7, seed=1, keep="moments")
    with gs.open_store(p) as s:
        idx = _moments.ParamSubset.from_attrs(s.attrs["user_attrs"]).indices
    sub = gs.reduce(p)
    _close(sub["mean"].values[0, 0], sub["var"].values[0, 0], m[idx], v[idx], 1e-10)
    p = tmp_path / "jax_jl.h5"
    with gj.open_writer(p, params, project=8, seed=3) as w:
        gj.record(w, loss_one, params, (X, Y), 0, "train", batch_size=32, project=8, seed=3)
    with gs.open_store(p) as s:
        Z = s.read_grads(0, "train")
    # Z: float32 rounding of the recorder's rows (batches of 32) projected in float64; G: one
    # call of 72. Rows within 2 K u colmax of each other, through |R|; P u64 per accumulation
    R = _moments.JLProjection(21, 8, 3).matrix()
    bound = U32 * np.abs(Z) + (2 * f32_chain_bound(G, LIN_K32) + 2 * 21 * U64 * np.abs(G)) @ np.abs(R)
    assert_within(Z, G.astype(np.float64) @ R, bound, "JAX projected rows")


def test_errors(tmp_path):
    model, make = models()["mlp"]
    x, y = make(8, 0)
    model = model.double()
    with gt.open_writer(tmp_path / "a.h5", model) as w:
        with pytest.raises(AdapterError, match="keep must be"):
            gt.Recorder(w, model, LF, keep="mean")
        with pytest.raises(AdapterError, match="1 <= k <= P"):
            gt.Recorder(w, model, LF, params_subset=10 ** 6)
        with pytest.raises(AdapterError, match="1 <= k <= P"):
            gt.Recorder(w, model, LF, params_subset=0)
        with pytest.raises(AdapterError, match="fraction"):
            gt.Recorder(w, model, LF, params_subset=1.5)
        with pytest.raises(AdapterError, match="positive int"):
            gt.Recorder(w, model, LF, project=0)
        with pytest.raises(AdapterError, match="layout"):  # writer has the full layout
            gt.Recorder(w, model, LF, params_subset=10)
        with pytest.raises(AdapterError, match="block_size"):
            gt.record(w, model, LF, (x, y), 0, "train", batch_size=4, keep="moments",
                      block_size=0)
    with gt.open_writer(tmp_path / "b.h5", model, params_subset=10, seed=1) as w:
        with pytest.raises(AdapterError, match="param_subset.*seed 1.*seed 2"):  # other draw
            gt.Recorder(w, model, LF, params_subset=10, seed=2)
    with pytest.raises(AdapterError, match="different layout"):
        _moments.make_transform([("a", (3,))], _moments.ParamSubset.choose([("b", (3,))], 2))
    bad = x.clone()
    bad[6, 0] = float("nan")  # in the second batch
    for fast in (True, False):
        p = tmp_path / f"c{fast}.h5"
        with gt.open_writer(p, model) as w:
            with pytest.raises(NonFiniteError,
                               match=r"record \(step=0, split='train'\).*1\.weight"):
                gt.record(w, model, LF, (bad, y), 0, "train", batch_size=4, keep="moments",
                          fast=fast)
            gt.record(w, model, LF, (x, y), 0, "test", batch_size=4, keep="moments", fast=fast)
        with pytest.warns(gs.IncompleteRecordWarning):  # batch 0 of "train" was written
            with gs.open_store(p) as s:
                assert [(r.step, r.split) for r in s.records] == [(0, "test")]


class FirstOnly(nn.Module):
    """Linear on the first two samples only: passes the two-sample check, then sees fewer
    rows than the batch has samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.fc(x[:2])
        return torch.cat([h, h.new_zeros(max(x.shape[0] - 2, 0), 5)])


def test_fast_path_refuses_rows_that_are_not_samples(tmp_path):
    model = FirstOnly().eval()
    x, y = _data(6, (4,), dtype=torch.float32)
    with pytest.raises(AdapterError, match=r"layer 'fc' saw inputs of \[\(2, 4\)\] for a batch "
                                           r"of 6 samples.*fast=False"):
        gt.per_sample_gradients(model, LF, x, y, fast=True)
    with gt.open_writer(tmp_path / "m.h5", model) as w, pytest.raises(AdapterError,
                                                                     match="layer 'fc' saw"):
        gt.record(w, model, LF, (x, y), 0, "train", batch_size=6, keep="moments")
    G = gt.per_sample_gradients(model, LF, x, y, fast=False)  # the vmap route is defined
    assert G.shape == (6, 25)
