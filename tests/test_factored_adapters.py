"""Factored records from the adapters (issue 15): the factors ``(A, D)`` the adapters extract
equal the per-sample gradients of an independent route once materialised.

Sample ``i``'s gradient of a factored weight is :math:`\\sum_t \\delta_{it} a_{it}^\\top`, its
tied bias :math:`\\sum_t \\delta_{it}`; here the products are formed in float64 from the
stored factors (:func:`materialise`, written for these tests, independent of the store's
``materialize``) and compared with ``torch.func`` ``vmap(grad)`` (``per_sample_gradients``,
``fast=False``) or sklearn's closed-form per-sample gradients. float64 models: <= 1e-12
relative; float32 models: within the float32 chain bound of ``conftest`` (both routes round
the same forward/backward, the reference once more in its float32 products).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import U32, assert_within, f32_chain_bound

torch = pytest.importorskip("torch")
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402

from gsnr_stats.errors import AdapterError  # noqa: E402

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss(reduction="none")
K32 = 128  # terms along the longest float32 chain of these models (see test_adapter_torch)


def materialise(plain: np.ndarray, facs: dict, layout, ties: dict[str, str]) -> np.ndarray:
    """Full ``(n, P)`` rows in float64: factored weights as :math:`\\sum_t \\delta_t a_t^\\top`,
    tied biases (``ties``: bias -> weight) as :math:`\\sum_t \\delta_t`, the rest from
    ``plain`` in layout order."""
    n = plain.shape[0]
    cols, pos = [], 0
    for name, shape in layout:
        size = math.prod(shape)
        if name in facs:
            a, d = (np.asarray(v, np.float64) for v in facs[name])
            a, d = a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])
            cols.append(np.einsum("nto,nti->noi", d, a).reshape(n, size))
        elif name in ties:
            d = np.asarray(facs[ties[name]][1], np.float64)
            cols.append(d.reshape(n, -1, d.shape[-1]).sum(1))
        else:
            cols.append(plain[:, pos:pos + size].astype(np.float64))
            pos += size
    assert pos == plain.shape[1], "plain columns left over"
    return np.concatenate(cols, axis=1)


def _ties(model: nn.Module, facs: dict) -> dict[str, str]:
    mods = dict(model.named_modules())
    return {f"{w[:-7]}.bias": w for w in facs if mods[w[:-7]].bias is not None}


class Seq(nn.Module):
    """A Linear on (B, T, in), pooled over positions, then a Linear head."""

    def __init__(self, d_in: int = 6, h: int = 8, k: int = 3) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(d_in, h), nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(1))


class Outside(nn.Module):
    """``fc``'s weight also reaches the loss outside its forward (a tiny penalty-like term)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x))) + 1e-3 * self.fc.weight.sum()


def models(kind: str, dtype: torch.dtype):
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    n = 7
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
        x = torch.randn(n, 6, generator=gen)
        want = {"0.weight", "2.weight", "4.weight"}
    elif kind == "cnn":
        m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3))
        with torch.no_grad():
            m[1].running_mean.uniform_(-0.5, 0.5)
            m[1].running_var.uniform_(0.5, 2.0)
        x = torch.randn(n, 2, 6, 6, generator=gen)
        want = {"5.weight", "7.weight"}  # the convs and BatchNorm stay per-sample columns
    elif kind == "bn":
        m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        with torch.no_grad():
            m[1].running_mean.uniform_(-0.5, 0.5)
            m[1].running_var.uniform_(0.5, 2.0)
        x = torch.randn(n, 6, generator=gen)
        want = {"0.weight", "3.weight"}
    elif kind == "seq":  # T (in + out) = 3 * 14 < 48: proj factored with T = 3 rows
        m, x = Seq(), torch.randn(n, 3, 6, generator=gen)
        want = {"proj.weight", "head.weight"}
    elif kind == "seq-long":  # 5 * 14 >= 48: proj stays a product (plain columns)
        m, x = Seq(), torch.randn(n, 5, 6, generator=gen)
        want = {"head.weight"}
    else:
        raise ValueError(kind)
    m = m.to(dtype).eval()
    return m, x.to(dtype), torch.randint(0, 3, (n,), generator=gen), want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "bn", "seq", "seq-long"])
def test_factors_equal_vmap(kind, dtype):
    model, x, y, want = models(kind, dtype)
    plain, facs, loss = gt.per_sample_factors(model, CE, x, y, return_loss=True)
    assert set(facs) == want
    for w, (a, d) in facs.items():
        lin = dict(model.named_modules())[w[:-7]]
        assert a.shape[0] == d.shape[0] == x.shape[0]
        assert a.shape[-1] == lin.in_features and d.shape[-1] == lin.out_features
        assert a.dtype == d.dtype == torch.empty(0, dtype=dtype).numpy().dtype
    if kind == "seq":
        assert facs["proj.weight"][0].shape == (7, 3, 6)
    lay = gt.layout(model)
    got = materialise(plain, facs, lay, _ties(model, facs))
    ref32, ref_loss = gt.per_sample_gradients(model, CE, x, y, return_loss=True)  # vmap
    ref = ref32.astype(np.float64)
    if dtype == torch.float64:
        scale = np.abs(ref).max(axis=0, keepdims=True)
        assert_within(got, ref, 1e-12 * np.maximum(scale, 1e-300), f"{kind} factors vs vmap")
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    else:
        layers = np.repeat([n.rpartition(".")[0] for n, _ in lay], [math.prod(s) for _, s in lay])
        bound = 2 * f32_chain_bound(ref, K32, layers) + 2 * U32 * np.abs(ref)
        assert_within(got, ref, bound, f"{kind} float32 factors vs vmap")
        np.testing.assert_allclose(loss, ref_loss, rtol=K32 * U32)


def test_outside_use_is_not_factored():
    torch.manual_seed(0)
    model = Outside().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.warns(UserWarning, match="outside"):
        plain, facs = gt.per_sample_factors(model, CE, x, y)
    assert set(facs) == {"out.weight"}
    got = materialise(plain, facs, gt.layout(model), _ties(model, facs))
    ref = gt.per_sample_gradients(model, CE, x, y)
    assert_within(got, ref, 1e-12 * np.abs(ref).max(), "outside-use model vs vmap")
    with pytest.warns(UserWarning, match="outside"), \
            pytest.raises(AdapterError, match=r"fc.*outside the layer's forward"):
        gt.per_sample_factors(model, CE, x, y, factors=["fc", "out"])


def test_explicit_factors_and_untied_bias():
    model, x, y, _ = models("mlp", torch.float64)
    plain, facs = gt.per_sample_factors(model, CE, x, y, factors=[("2.weight", None), "4"])
    assert set(facs) == {"2.weight", "4.weight"}
    lay = gt.layout(model)
    # 2.bias is a plain column now (untied): 0.weight, 0.bias, 2.bias
    assert plain.shape[1] == 48 + 8 + 5
    got = materialise(plain, facs, lay, {"4.bias": "4.weight"})
    ref = gt.per_sample_gradients(model, CE, x, y)
    assert_within(got, ref, 1e-12 * np.abs(ref).max(), "explicit factors vs vmap")
    with pytest.raises(AdapterError, match="names no nn.Linear"):
        gt.per_sample_factors(model, CE, x, y, factors=["1"])


def test_train_mode_batchnorm_refused():
    model, x, y, _ = models("bn", torch.float64)
    model.train()
    with pytest.raises(AdapterError, match="BatchNorm"):
        gt.per_sample_factors(model, CE, x, y)


def test_recorder_sequences_padded_and_refused(tmp_path):
    """A Linear on (B, T, in) recorded with rows=4: T=3 batches are zero-padded (the sums are
    unchanged), the record materialises to vmap's gradients; T=5 > rows is refused."""
    import gsnr_stats as gs

    torch.manual_seed(5)
    model = Seq(6, 16).double().eval()  # T (in + out) = 4 * 22 < 96
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 3, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    ex = (torch.randn(2, 4, 6, dtype=torch.float64), y[:2])  # an example with T = 4
    with gt.open_writer(tmp_path / "s.h5", model, factors="auto", loss_fn=CE,
                        example=ex) as w:
        assert [(f.weight, f.bias, f.rows) for f in w.factors] == [
            ("proj.weight", "proj.bias", 4), ("head.weight", "head.bias", 1)]
        gt.Recorder(w, model, CE, keep="factors").record((x, y), 0, "train", batch_size=4)
        rec = gt.Recorder(w, model, CE, keep="factors")
        with pytest.raises(AdapterError, match=r"'proj' has 5 positions.*holds 4"):
            rec.record([(torch.randn(3, 5, 6, dtype=torch.float64), y[:3])], 1, "train")
    with gs.open_store(tmp_path / "s.h5") as s:
        assert s.factored and [r.step for r in s.records] == [0]
        a, d = s.read_factors(0, "train")["proj.weight"]
        assert a.shape == (7, 4, 6) and d.shape == (7, 4, 16)
        assert not a[:, 3].any() and not d[:, 3].any()  # the padding row
        got = s.read_grads(0, "train")
    ref = gt.per_sample_gradients(model, CE, x, y)
    assert_within(got, ref, 2 * U32 * np.abs(ref), "padded sequence record vs vmap")


def test_writer_and_keep_must_agree(tmp_path):
    model, x, y, _ = models("mlp", torch.float32)
    with pytest.raises(AdapterError, match="needs example"):
        gt.open_writer(tmp_path / "a.h5", model, factors="auto", loss_fn=CE)
    with gt.open_writer(tmp_path / "f.h5", model, factors=["0", "2"]) as w:
        with pytest.raises(AdapterError, match="record with keep='factors'"):
            gt.Recorder(w, model, CE)
        rec = gt.Recorder(w, model, CE, keep="factors", fast=False)
        with pytest.raises(AdapterError, match="needs the fast path"):
            rec.record((x, y), 0, "train")
    with gt.open_writer(tmp_path / "g.h5", model) as w, \
            pytest.raises(AdapterError, match="needs a writer opened with factors="):
        gt.Recorder(w, model, CE, keep="factors")


# ---------------------------------------------------------------------------------------
# scikit-learn: factored by nature
# ---------------------------------------------------------------------------------------


def sk_cases():
    """``(name, fitted estimator, X, y)``: every factorable family, small."""
    from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    y3 = rng.integers(0, 3, 40)
    y2 = (X[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(int)
    Y2 = np.c_[X @ rng.normal(size=5), X @ rng.normal(size=5)] + rng.normal(size=(40, 2))
    return [
        ("logreg-binary", LogisticRegression().fit(X, y2), X, y2),
        ("logreg-multinomial", LogisticRegression().fit(X, y3), X, y3),
        ("linearsvc", LinearSVC().fit(X, y3), X, y3),
        ("sgd", SGDClassifier(loss="log_loss", random_state=0).fit(X, y3), X, y3),
        ("ridge-2d", Ridge(alpha=0.5).fit(X, Y2), X, Y2),
        ("mlp", MLPClassifier(hidden_layer_sizes=(6,), max_iter=50, random_state=0)
         .fit(X, y3), X, y3),
    ]


SK_NAMES = ["logreg-binary", "logreg-multinomial", "linearsvc", "sgd", "ridge-2d", "mlp"]


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
@pytest.mark.parametrize("name", SK_NAMES)
def test_sklearn_factors_equal_gradients(name):
    from gsnr_stats.adapters import sklearn as gsk

    _, est, X, y = next(c for c in sk_cases() if c[0] == name)
    plain, facs = gsk.per_sample_factors(est, X, y, factors=True)
    lay = gsk.layout(est)
    ties = {"intercept": "coef"} if "coef" in facs and dict(lay).get("intercept") else {}
    got = materialise(plain, facs, lay, ties)
    ref = gsk.per_sample_gradients(est, X, y)
    # the same float64 products (linear) or the same backprop (MLP): equal to rounding
    assert_within(got, ref, 1e-13 * np.abs(ref).max(axis=0), f"{name} factors")
    if name == "mlp":
        assert set(facs) == {"coefs_0", "coefs_1"} and plain.shape[1] == 6 + 3
        assert facs["coefs_0"][1].shape == (40, 5)  # D: the layer's input rows
    else:
        assert set(facs) == {"coef"} and plain.shape[1] == 0
        if name == "logreg-multinomial":  # delta_i = p_i - y_i, a_i = x_i
            p = est.predict_proba(X)
            p[np.arange(len(y)), y] -= 1.0
            np.testing.assert_allclose(facs["coef"][1], p, rtol=1e-10, atol=1e-14)
            np.testing.assert_array_equal(facs["coef"][0], X)


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
def test_sklearn_factor_choice_and_errors():
    from gsnr_stats.adapters import sklearn as gsk
    from sklearn.linear_model import Ridge

    cases = {c[0]: c for c in sk_cases()}
    _, est, X, y = cases["logreg-binary"]
    with pytest.raises(AdapterError, match="no tensor worth factoring"):
        gsk.per_sample_factors(est, X, y)  # coef (1, 5): 6 factor numbers > 5
    _, est, X, y = cases["logreg-multinomial"]
    assert set(gsk.per_sample_factors(est, X, y)[1]) == {"coef"}
    one = Ridge().fit(X, X[:, 0])  # a 1-D coef_ is no matrix
    with pytest.raises(AdapterError, match="no tensor worth factoring"):
        gsk.per_sample_factors(one, X, X[:, 0], factors=True)
    with pytest.raises(AdapterError, match="cannot store 'intercept'"):
        gsk.per_sample_factors(est, X, y, factors=["intercept"])


# ---------------------------------------------------------------------------------------
# JAX: kernels found on the per-example loss's jaxpr (adapters/_jax_factors.py)
# ---------------------------------------------------------------------------------------


def jax_models(kind: str):
    """``(model, loss_fn, x, y, factored names)``: flax NNX, linen, equinox, pytrees."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = rng.integers(0, 3, 6)

    def xent(logits, yi):
        return jax.nn.logsumexp(logits) - logits[yi]

    if kind == "nnx":
        nnx = pytest.importorskip("flax.nnx")

        class M(nnx.Module):
            def __init__(self, rngs):
                self.l1, self.l2 = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

            def __call__(self, v):
                return self.l2(jnp.tanh(self.l1(v)))

        return M(nnx.Rngs(0)), lambda m, v, t: xent(m(v), t), x, y, {"l1.kernel", "l2.kernel"}
    if kind == "linen":
        nn = pytest.importorskip("flax.linen")

        class L(nn.Module):
            @nn.compact
            def __call__(self, v):
                return nn.Dense(3)(jnp.tanh(nn.Dense(8)(v)))

        mod = L()
        pair = (mod, mod.init(jax.random.PRNGKey(0), x[0]))
        return pair, lambda m, v, t: xent(m(v), t), x, y, {"Dense_0.kernel", "Dense_1.kernel"}
    if kind == "eqx":
        eqx = pytest.importorskip("equinox")
        m = eqx.nn.MLP(5, 3, 8, 1, key=jax.random.PRNGKey(0))
        return m, lambda m, v, t: xent(m(v), t), x, y, {"layers.0.weight", "layers.1.weight"}
    if kind == "seq":  # a kernel on (T, in) per example, pooled; T (in + out) = 3 * 13 < 40
        p = {"w": rng.normal(size=(5, 8)).astype(np.float32),
             "v": rng.normal(size=(8, 3)).astype(np.float32)}
        xs = rng.normal(size=(6, 3, 5)).astype(np.float32)
        return p, lambda q, v, t: xent(jnp.tanh(v @ q["w"]).mean(0) @ q["v"], t), xs, y, \
            {"w", "v"}
    if kind == "outside":  # w also in a penalty-like term: a second use, not factored
        p = {"w": rng.normal(size=(5, 8)).astype(np.float32),
             "v": rng.normal(size=(8, 3)).astype(np.float32)}
        return p, lambda q, v, t: xent(jnp.tanh(v @ q["w"]) @ q["v"], t) \
            + 1e-3 * q["w"].sum(), x, y, {"v"}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["nnx", "linen", "eqx", "seq", "outside"])
def test_jax_factors_equal_vmap(kind):
    from gsnr_stats.adapters import jax as gj

    model, loss, x, y, want = jax_models(kind)
    plain, facs = gj.per_sample_factors(model, loss, x, y)
    assert set(facs) == want
    if kind == "seq":
        assert facs["w"][0].shape == (6, 3, 8) and facs["w"][1].shape == (6, 3, 5)
    lay = gj.layout(model)
    got = materialise(plain, facs, lay, {})
    ref = gj.per_sample_gradients(model, loss, x, y).astype(np.float64)
    layers = np.repeat([n for n, _ in lay], [math.prod(s) for _, s in lay])
    bound = 2 * f32_chain_bound(ref, K32, layers) + 2 * U32 * np.abs(ref)
    assert_within(got, ref, bound, f"jax {kind} factors vs vmap(grad)")


def test_jax_recorder_factored_and_fallback(tmp_path):
    from gsnr_stats.adapters import jax as gj

    import gsnr_stats as gs

    model, loss, x, y, want = jax_models("nnx")
    with gj.open_writer(tmp_path / "j.h5", model, factors="auto", loss_fn=loss,
                        example=(x, y)) as w:
        assert {f.weight for f in w.factors} == want
        gj.Recorder(w, model, loss, keep="factors").record((x, y), 0, "train", batch_size=4)
    with gs.open_store(tmp_path / "j.h5") as s:
        assert s.factored
        got = s.read_grads(0, "train").astype(np.float64)
    ref = gj.per_sample_gradients(model, loss, x, y).astype(np.float64)
    assert_within(got, ref, 2 * f32_chain_bound(ref, K32) + 2 * U32 * np.abs(ref),
                  "jax factored record vs vmap(grad)")
    with pytest.raises(AdapterError, match="cannot be factored"):
        gj.per_sample_factors(model, loss, x, y, factors=["l1.bias"])
    # nothing factorable (a bias-only model): full gradients, with a warning
    params = {"b": np.zeros(3, np.float32)}

    def bias_loss(p, v, t):
        return ((p["b"] - v[:3]) ** 2).sum()

    with pytest.warns(UserWarning, match="full per-sample gradients"):
        w = gj.open_writer(tmp_path / "b.h5", params, factors="auto", loss_fn=bias_loss,
                           example=(x, y))
    with w, pytest.warns(UserWarning, match="full per-sample gradients"):
        gj.Recorder(w, params, bias_loss, keep="factors").record((x, y), 0, "train",
                                                                  batch_size=3)
    with gs.open_store(tmp_path / "b.h5") as s:
        assert not s.factored
        np.testing.assert_array_equal(s.read_grads(0, "train"),
                                      gj.per_sample_gradients(params, bias_loss, x, y))


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
def test_sklearn_trajectory_into_a_factored_writer(tmp_path):
    """record_trajectory with a writer from open_writer(factors=...) (an unfitted MLP:
    the layout of its initialisation) writes factored records equal to the same trajectory
    written full."""
    from gsnr_stats.adapters import sklearn as gsk
    from sklearn.neural_network import MLPClassifier

    import gsnr_stats as gs

    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    Xt, yt = rng.normal(size=(12, 4)), rng.integers(0, 3, 12)
    stores = {}
    for kind in ("full", "factored"):
        est = MLPClassifier(hidden_layer_sizes=(6,), solver="sgd", random_state=0)
        extra = {"factors": "auto"} if kind == "factored" else {}
        with gsk.open_writer(tmp_path / f"{kind}.h5", est, X=X, y=y, **extra) as w:
            gsk.record_trajectory(w, est, X, y, Xt, yt, epochs=2)
        stores[kind] = tmp_path / f"{kind}.h5"
    with gs.open_store(stores["full"]) as a, gs.open_store(stores["factored"]) as b:
        assert b.factored and {f.weight for f in b.factors} == {"coefs_0", "coefs_1"}
        assert [(r.step, r.split) for r in b.records] == [(r.step, r.split) for r in a.records]
        for r in a.records:
            ga = a.read_grads(r.step, r.split).astype(np.float64)
            # float64 factors, products in float64, rounded to float32 once: as the full rows
            assert_within(b.read_grads(r.step, r.split), ga, U32 * np.abs(ga),
                          f"trajectory record {r.step} {r.split}")
