"""JAX adapter from where users train: flax NNX / linen, equinox, optax (issue 12).

Each observation of the issue is reproduced first (what the adapter did before) and then
checked against an independent route: ``jax.grad`` of ONE example's loss in a Python loop
over samples, with the framework's own parameter split (``nnx.split``, linen's
``variables["params"]``, ``eqx.filter_grad``), matched to the layout by name. float32
tolerances: two float32 routes through the same small MLPs (matmuls of <= 8 terms, tanh,
BatchNorm's scale, log-softmax; forward and backward about 30 terms along the longest
chain), each within K u colmax of the exact gradient, K = 64 (about twice that).
"""

from __future__ import annotations

import functools
import random
import warnings

import numpy as np
import pytest
from conftest import U32, assert_within, f32_chain_bound

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from gsnr_stats.adapters import jax as gj  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError  # noqa: E402

K32 = 64


def ce(logits, y):
    """Softmax cross-entropy of one example (logits (C,), y an integer class)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def loss_module(model, x, y):
    """loss_fn(model, x, y) of ONE example, as flax/equinox users write it."""
    return ce(model(x), y)


def data(n=16, d=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n).astype(np.int32)


def val(v):
    """The array of an NNX Variable (``.value`` is deprecated in flax 0.12)."""
    return np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)


def stack(rows, lay):
    """Rows of per-tensor dicts {name: array} -> (n, P) in the layout's order."""
    return np.stack([np.concatenate([np.asarray(r[name], np.float64).ravel()
                                     for name, _ in lay]) for r in rows])


def bound(G):
    return 2 * f32_chain_bound(G, K32)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    """3 linear layers, BatchNorm after the first, Dropout before the last. Attribute order
    l1, bn1, l2, drop, l3 is not alphabetical (bn1 < drop < l1)."""

    def __init__(self, rngs, d=4, h=6, c=3, rate=0.0):
        self.l1 = nnx.Linear(d, h, rngs=rngs)
        self.bn1 = nnx.BatchNorm(h, rngs=rngs)
        self.l2 = nnx.Linear(h, h, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.l3 = nnx.Linear(h, c, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.bn1(self.l1(x)))
        return self.l3(self.drop(jnp.tanh(self.l2(h))))


def nnx_model(seed=0, rate=0.0, stats=True):
    m = NnxMLP(nnx.Rngs(seed), rate=rate)
    if stats:  # running statistics away from (0, 1), so that holding them fixed matters
        rng = np.random.default_rng(seed + 100)
        m.bn1.mean.set_value(jnp.asarray(rng.normal(size=6), jnp.float32) * 0.3)
        m.bn1.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size=6), jnp.float32))
    return m


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_grad1(loss, graphdef, params, rest, xi, yi):
    return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), xi, yi))(params)


def nnx_reference(model, loss, x, y, lay, wrt=None):
    """Per-sample jax.grad in a Python loop, eval mode, through nnx.split / nnx.merge."""
    wrt = nnx.Param if wrt is None else wrt
    flags = (model.bn1.use_running_average, model.drop.deterministic)
    model.eval()
    gd, params, rest = nnx.split(model, wrt, ...)
    model.bn1.use_running_average, model.drop.deterministic = flags
    rows = []
    for i in range(len(x)):
        g = _nnx_grad1(loss, gd, params, rest, x[i], y[i])
        rows.append({".".join(map(str, k)): val(v) for k, v in nnx.to_flat_state(g)})
    return stack(rows, lay)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6, name="hidden")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(3, name="head")(jnp.tanh(x))


def linen_model(seed=0):
    mod = LinenMLP()
    v = mod.init(jax.random.key(seed), jnp.ones((2, 4)), train=False)
    rng = np.random.default_rng(seed + 7)
    v["batch_stats"]["bn"]["mean"] = jnp.asarray(rng.normal(size=6) * 0.3, jnp.float32)
    v["batch_stats"]["bn"]["var"] = jnp.asarray(rng.uniform(0.5, 2, size=6), jnp.float32)
    return mod, v


class EqxNet(eqx.Module):
    mlp: eqx.nn.MLP
    drop: eqx.nn.Dropout
    scale: jax.Array
    seen: jax.Array  # an integer array: not a parameter

    def __init__(self, key, p=0.0):
        self.mlp = eqx.nn.MLP(4, 3, 6, depth=2, activation=jnp.tanh, key=key)
        self.drop = eqx.nn.Dropout(p)
        self.scale = jnp.asarray(1.3, jnp.float32)
        self.seen = jnp.asarray(5, jnp.int32)

    def __call__(self, x, key=None):
        return self.drop(self.mlp(x) * self.scale, key=key)


@eqx.filter_jit
def _eqx_grad1(model, loss, xi, yi):
    return eqx.filter_grad(lambda m: loss(m, xi, yi))(model)


def eqx_reference(model, loss, x, y, lay):
    model = eqx.nn.inference_mode(model)
    rows = []
    for i in range(len(x)):
        flat, _ = jax.tree_util.tree_flatten_with_path(_eqx_grad1(model, loss, x[i], y[i]))
        rows.append({gj.path_name(p): a for p, a in flat})
    return stack(rows, lay)


# ---------------------------------------------------------------------------------------
# 1. Only trainable parameters by default
# ---------------------------------------------------------------------------------------


def test_nnx_default_is_params_not_batch_stats():
    model = nnx_model()
    x, y = data()
    lay = gj.layout(model)
    names = [n for n, _ in lay]
    # before: bn1.mean.value and bn1.var.value were "parameters"
    assert not any(n.endswith(("mean", "var", ".value")) for n in names), names
    n_param = sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert sum(int(np.prod(s)) for _, s in lay) == n_param
    G = gj.per_sample_gradients(model, loss_module, x, y)
    R = nnx_reference(model, loss_module, x, y, lay)
    assert_within(G, R, bound(R), "nnx params")
    # the option for others: BatchStat too, in the module's own attribute order
    wide = gj.layout(model, collections=(nnx.Param, nnx.BatchStat))
    assert [n for n, _ in wide][:6] == ["l1.kernel", "l1.bias", "bn1.mean", "bn1.var",
                                        "bn1.scale", "bn1.bias"]
    with pytest.raises(AdapterError, match="NNX filter"):
        gj.layout(model, collections=object())


def test_linen_variables_params_collection_only():
    mod, v = linen_model()
    x, y = data()
    bs = v["batch_stats"]

    def loss_vars(variables, xi, yi):  # a plain variables dict, loss calls apply itself
        return ce(mod.apply(variables, xi), yi)

    # before: the plain dict's batch_stats.bn.mean / var were differentiated
    lay_dict = gj.layout(v)
    assert [n for n, _ in lay_dict] == ["params.bn.bias", "params.bn.scale",
                                        "params.head.bias", "params.head.kernel",
                                        "params.hidden.bias", "params.hidden.kernel"]
    lay = gj.layout((mod, v))
    g1 = jax.jit(jax.grad(lambda p, xi, yi: ce(mod.apply({"params": p, "batch_stats": bs},
                                                          xi), yi)))
    rows = []
    for i in range(len(x)):
        g = g1(v["params"], x[i], y[i])
        rows.append({f"{layer}.{k}": a for layer, d in g.items() for k, a in d.items()})
    R = stack(rows, lay)
    G = gj.per_sample_gradients((mod, v), loss_module, x, y)
    assert_within(G, R, bound(R), "linen pair")
    Gd = gj.per_sample_gradients(v, loss_vars, x, y)
    Rd = stack([{"params." + k: r[k] for k in r} for r in rows], lay_dict)
    assert_within(Gd, Rd, bound(Rd), "linen variables dict")
    assert gj.layout(mod.bind(v)) == lay  # a bound module is its (module, variables) pair
    wide = gj.layout((mod, v), collections=("params", "batch_stats"))
    assert [n for n, _ in wide][-2:] == ["batch_stats.bn.mean", "batch_stats.bn.var"]
    with pytest.raises(AdapterError, match=r"\(module, variables\)"):
        gj.layout(mod)


def test_equinox_inexact_arrays_as_partition():
    model = EqxNet(jax.random.key(0))
    x, y = data()
    lay = gj.layout(model)
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    assert lay == [(gj.path_name(p), tuple(a.shape)) for p, a in flat]
    assert "seen" not in [n for n, _ in lay] and lay[-1] == ("scale", ())
    G = gj.per_sample_gradients(model, loss_module, x, y)
    R = eqx_reference(model, loss_module, x, y, lay)
    assert_within(G, R, bound(R), "equinox")


# ---------------------------------------------------------------------------------------
# 2. Clean names, network order, layers
# ---------------------------------------------------------------------------------------


def test_names_and_network_order(tmp_path):
    model = nnx_model()
    lay = gj.layout(model)
    # before: sorted and with ".value": bn1.bias.value, bn1.mean.value, ..., l1.bias.value
    assert lay == [("l1.kernel", (4, 6)), ("l1.bias", (6,)), ("bn1.scale", (6,)),
                   ("bn1.bias", (6,)), ("l2.kernel", (6, 6)), ("l2.bias", (6,)),
                   ("l3.kernel", (6, 3)), ("l3.bias", (3,))]
    assert gs.Layout.from_params(lay).layers == ("l1", "l1", "bn1", "bn1", "l2", "l2", "l3",
                                                 "l3")
    mod, v = linen_model()
    assert [n for n, _ in gj.layout((mod, v))] == [
        "hidden.kernel", "hidden.bias", "bn.scale", "bn.bias", "head.kernel", "head.bias"]
    e = eqx.nn.MLP(4, 3, 6, depth=2, key=jax.random.key(1))
    assert [n for n, _ in gj.layout(e)] == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
        "layers.2.weight", "layers.2.bias"]
    # a store of the NNX model groups by layer l1, bn1, l2, l3 (not per tensor)
    x, y = data()
    with gj.open_writer(tmp_path / "n.h5", model) as w:
        gj.Recorder(w, model, loss_module).record((x, y), 0, "train", batch_size=8)
    agg = gs.aggregate(gs.reduce(tmp_path / "n.h5"), by="layer")
    assert list(agg["group"].values) == ["l1", "bn1", "l2", "l3"]
    assert agg["n_params"].sum().item() + agg["n_dead"].sum().item() \
        + agg["n_inf"].sum().item() == sum(int(np.prod(s)) for _, s in lay)


def test_nnx_list_order_beyond_nine_layers():
    class Deep(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(11)])

        def __call__(self, x):
            for b in self.blocks:
                x = jnp.tanh(b(x))
            return x

    names = [n for n, _ in gj.layout(Deep(nnx.Rngs(0)))]
    want = [f"blocks.{i}.{t}" for i in range(11) for t in ("kernel", "bias")]
    assert names == want  # not blocks.0, blocks.1, blocks.10, blocks.2, ...


# ---------------------------------------------------------------------------------------
# 3. Train mode
# ---------------------------------------------------------------------------------------


def test_nnx_mode_eval_for_the_record_and_restored(tmp_path):
    model = nnx_model(rate=0.5)  # BatchNorm batch statistics, active Dropout: train mode
    x, y = data()
    stats = (val(model.bn1.mean).copy(), val(model.bn1.var).copy())

    def closure_loss(m, xi, yi):  # uses the outer (train-mode) module, not the one given
        return ce(model(xi[None])[0], yi)

    # before: flax's raw TraceContextError
    with pytest.raises(AdapterError, match=r"(?s)model\.eval\(\).*TraceContextError"):
        gj.per_sample_gradients(model, closure_loss, x, y)
    with pytest.raises(AdapterError, match=r"training mode.*model\.eval\(\)"):
        gj.per_sample_gradients(model, loss_module, x, y, mode="as_is")
    with pytest.raises(AdapterError, match="no JAX counterpart"):
        gj.per_sample_gradients(model, loss_module, x, y, mode="train")
    lay = gj.layout(model)
    G = gj.per_sample_gradients(model, loss_module, x, y)
    assert model.bn1.use_running_average is False and model.drop.deterministic is False
    np.testing.assert_array_equal(val(model.bn1.mean), stats[0])
    np.testing.assert_array_equal(val(model.bn1.var), stats[1])
    R = nnx_reference(model, loss_module, x, y, lay)
    assert_within(G, R, bound(R), "train-mode model recorded as in eval mode")
    # the Recorder: built in eval mode, the model back in train mode at record time
    model.eval()
    with gj.open_writer(tmp_path / "t.h5", model) as w:
        rec = gj.Recorder(w, model, loss_module)
        model.train()
        rec.record((x, y), 0, "train", batch_size=5)
    assert model.bn1.use_running_average is False
    with gs.open_store(tmp_path / "t.h5") as s:
        assert_within(s.read_grads(0, "train"), R, bound(R), "recorder, train mode")


def test_equinox_dropout_mode():
    model = EqxNet(jax.random.key(2), p=0.5)
    x, y = data()
    assert model.drop.inference is False
    with pytest.raises(AdapterError, match=r"inference_mode"):
        gj.per_sample_gradients(model, loss_module, x, y, mode="as_is")
    G = gj.per_sample_gradients(model, loss_module, x, y)
    assert model.drop.inference is False
    R = eqx_reference(model, loss_module, x, y, gj.layout(model))
    assert_within(G, R, bound(R), "equinox in inference mode")


# ---------------------------------------------------------------------------------------
# 4. One API: argument order, params=, old order deprecated
# ---------------------------------------------------------------------------------------


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"layer1": {"w": rng.normal(size=(4, 5)).astype(np.float32) * 0.7,
                       "b": rng.normal(size=5).astype(np.float32) * 0.1},
            "layer2": {"w": rng.normal(size=(5, 3)).astype(np.float32) * 0.7,
                       "b": rng.normal(size=3).astype(np.float32) * 0.1}}


def loss_params(p, x, y):
    h = jnp.tanh(x @ p["layer1"]["w"] + p["layer1"]["b"])
    return ce(h @ p["layer2"]["w"] + p["layer2"]["b"], y)


_pytree_grad1 = jax.jit(jax.grad(loss_params))


def pytree_reference(params, x, y):
    g1 = _pytree_grad1
    rows = []
    for i in range(len(x)):
        g = g1(params, x[i], y[i])
        rows.append({f"{a}.{b}": v for a, d in g.items() for b, v in d.items()})
    return stack(rows, gj.layout(params))


def test_one_argument_order_and_the_old_one(tmp_path):
    params, params2 = init_params(0), init_params(1)
    x, y = data(12)
    R, R2 = pytree_reference(params, x, y), pytree_reference(params2, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new order never warns
        with gj.open_writer(tmp_path / "new.h5", params) as w:
            rec = gj.Recorder(w, params, loss_params)
            rec.record((x, y), 0, "train", batch_size=5)
            rec.record((x, y), step=1, split="train", batch_size=5)
            rec.record((x, y), 2, split="test", batch_size=5, params=params2)
            gj.record(w, params, loss_params, (x, y), 3, "train", batch_size=12)
        G = gj.per_sample_gradients(params, loss_params, x, y)
    assert_within(G, R, bound(R), "per_sample_gradients(model, loss_fn, ...)")
    with gs.open_store(tmp_path / "new.h5") as s:
        for step, split, ref in ((0, "train", R), (1, "train", R), (2, "test", R2),
                                 (3, "train", R)):
            assert_within(s.read_grads(step, split), ref, bound(ref), f"{step} {split}")
    with gj.open_writer(tmp_path / "old.h5", params) as w:
        with pytest.warns(DeprecationWarning, match=r"Recorder\(writer, model, loss_fn\)"):
            rec = gj.Recorder(w, loss_params, params)
        with pytest.warns(DeprecationWarning, match=r"record\(data, step, split"):
            rec.record(params2, (x, y), 0, "train", batch_size=5)
        with pytest.warns(DeprecationWarning):
            rec.record(params, (x, y), step=1, split="train", batch_size=5)
        with pytest.warns(DeprecationWarning, match="loss_fn, params"):
            gj.record(w, loss_params, params, (x, y), 2, "train", batch_size=5)
    with gs.open_store(tmp_path / "old.h5") as s:
        assert_within(s.read_grads(0, "train"), R2, bound(R2), "old record(params, ...)")
        assert_within(s.read_grads(1, "train"), R, bound(R), "old, step/split keywords")
        assert_within(s.read_grads(2, "train"), R, bound(R), "old module-level record")
    with pytest.warns(DeprecationWarning):
        Gold = gj.per_sample_gradients(loss_params, params, x, y)
    np.testing.assert_array_equal(Gold, G)  # the same compiled function, argument order only
    with pytest.warns(DeprecationWarning):
        m_old = gj.mean_loss(loss_params, params, (x, y), batch_size=5)
    assert m_old == pytest.approx(gj.mean_loss(params, loss_params, (x, y), batch_size=5))
    with pytest.raises(AdapterError, match="cannot tell the model"):
        gj.Recorder(None, loss_params, loss_params)
    with pytest.raises(AdapterError, match=r"record\(data, step, split"):
        rec.record((x, y), 0)
    with pytest.raises(AdapterError, match="split must be a str"):
        rec.record((x, y), "train", 0)
    with gj.Recorder(None, params, loss_params) as closed:
        pass
    with pytest.raises(AdapterError, match="closed"):
        closed.record((x, y), 0, "train", batch_size=4)


def test_nnx_model_is_read_at_each_record(tmp_path):
    model = nnx_model()
    x, y = data(10)
    lay = gj.layout(model)
    with gj.open_writer(tmp_path / "r.h5", model) as w:
        rec = gj.Recorder(w, model, loss_module)
        rec.record((x, y), 0, "train", batch_size=4)
        R0 = nnx_reference(model, loss_module, x, y, lay)
        model.l1.kernel.set_value(val(model.l1.kernel) * 0.5)  # the model moves on
        rec.record((x, y), 1, "train", batch_size=4)
        R1 = nnx_reference(model, loss_module, x, y, lay)
    assert np.abs(R1 - R0).max() > 1e-3
    # mean_loss of the module (eval mode) vs the loss of each example, one by one
    model.eval()
    want = np.mean([float(loss_module(model, x[i], y[i])) for i in range(len(x))])
    model.train()
    got = gj.mean_loss(model, loss_module, (x, y), batch_size=4)
    assert abs(got - want) <= 2 * K32 * U32 * max(1.0, abs(want))  # two float32 routes
    with gs.open_store(tmp_path / "r.h5") as s:
        assert_within(s.read_grads(0, "train"), R0, bound(R0), "record 0")
        assert_within(s.read_grads(1, "train"), R1, bound(R1), "record 1")


# ---------------------------------------------------------------------------------------
# 5. optax: the optimizer's update count and description
# ---------------------------------------------------------------------------------------


def _steps(tx, params, x, y, k):
    """``k`` optax updates of the mean loss over (x, y): the parameters and optimizer state."""
    @jax.jit
    def step(params, state):
        g = jax.grad(lambda p: jax.vmap(loss_params, in_axes=(None, 0, 0))(p, x, y).mean())(
            params)
        upd, state = tx.update(g, state, params)
        return optax.apply_updates(params, upd), state

    state = tx.init(params)
    for _ in range(k):
        params, state = step(params, state)
    return params, state


def test_optimizer_step_from_optax_state(tmp_path):
    params0 = init_params()
    x, y = data(8)
    adam_p, adam_s = _steps(optax.adam(1e-2), params0, x, y, 3)
    sgd_p, sgd_s = _steps(optax.sgd(0.1, momentum=0.9), params0, x, y, 2)
    inj = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9)
    inj_p, inj_s = _steps(inj, params0, x, y, 4)
    with gj.open_writer(tmp_path / "o.h5", params0) as w:
        rec = gj.Recorder(w, params0, loss_params)
        r = rec.record((x, y), 0, "adam", batch_size=8, params=adam_p, opt_state=adam_s)
        rec.record((x, y), 0, "adam_explicit", batch_size=8, params=adam_p,
                   opt_state=adam_s, optimizer_step=30)
        rec.record((x, y), 0, "sgd", batch_size=8, params=sgd_p, opt_state=sgd_s)
        rec.record((x, y), 0, "sgd_explicit", batch_size=8, params=sgd_p, optimizer_step=2)
        rec.record((x, y), 0, "inject", batch_size=8, params=inj_p, opt_state=inj_s)
        rec.record((x, y), 0, "none", batch_size=8)
        gm = gj.Recorder(w, params0, loss_params, keep="moments")
        gm.record((x, y), 1, "adam", batch_size=4, params=adam_p, opt_state=adam_s)
    if hasattr(r, "optimizer_step"):
        assert r.optimizer_step == 3
    with gs.open_store(tmp_path / "o.h5") as s:
        info = {(i.step, i.split): i for i in s.records}
        assert info[(0, "adam")].optimizer_step == 3  # ScaleByAdamState.count
        assert info[(0, "adam_explicit")].optimizer_step == 30
        assert info[(0, "sgd")].optimizer_step is None  # sgd keeps no count
        assert info[(0, "sgd_explicit")].optimizer_step == 2
        assert info[(0, "inject")].optimizer_step == 4
        assert info[(0, "inject")].lr == pytest.approx(0.05)  # the injected learning rate
        assert info[(0, "none")].optimizer_step is None
        assert info[(1, "adam")].optimizer_step == 3  # moments records too
        meta = s.record_meta(0, "adam")
        assert meta["framework"] == f"jax {jax.__version__}"
        assert meta["optimizer"]["class"] == "optax"
        assert meta["optimizer"]["states"][0] == "ScaleByAdamState"
        assert meta["optimizer"]["step_source"] == "ScaleByAdamState.count"
        assert s.record_meta(0, "sgd")["optimizer"]["step_source"] == "unknown"
        assert s.record_meta(0, "sgd")["optimizer"]["states"] == ["TraceState", "EmptyState"]
        hp = s.record_meta(0, "inject")["optimizer"]["hyperparams"]
        assert hp == pytest.approx({"learning_rate": 0.05, "momentum": 0.9})
        assert s.record_meta(0, "none") == {} and s.record_meta(0, "sgd_explicit") == {}
    with pytest.raises(AdapterError, match="optimizer_step"):
        rec.record((x, y), 9, "bad", batch_size=8, optimizer_step=-1)


# ---------------------------------------------------------------------------------------
# 6. Batch unpacking, host random state
# ---------------------------------------------------------------------------------------


def test_unpack_rule_and_unpack_fn(tmp_path):
    params = init_params()
    x, y = data(9)
    weights = np.linspace(0.1, 0.9, 9).astype(np.float32)
    R = pytree_reference(params, x, y)
    with gj.open_writer(tmp_path / "u.h5", params) as w:
        rec = gj.Recorder(w, params, loss_params)
        # before: a float third element became sample ids (all 0)
        with pytest.raises(AdapterError, match="unpack="):
            rec.record([(x, y, weights)], 0, "train")
        batches = [{"img": x[i:i + 4], "lbl": y[i:i + 4], "w": weights[i:i + 4]}
                   for i in range(0, 9, 4)]
        gj.Recorder(w, params, loss_params, unpack=lambda b: (b["img"], b["lbl"])).record(
            batches, 1, "train")
    with gs.open_store(tmp_path / "u.h5") as s:
        assert [(r.step, r.split) for r in s.records] == [(1, "train")]
        assert_within(s.read_grads(1, "train"), R, bound(R), "unpack=")
        np.testing.assert_array_equal(s.read_sample_id(1, "train"), np.arange(9))


def test_record_leaves_host_rng_alone(tmp_path):
    params = init_params()
    x, y = data(12)

    def shuffled():  # a loader that shuffles with the global generators
        idx = np.random.permutation(12)  # noqa: NPY002
        random.random()
        for i in range(0, 12, 4):
            yield x[idx[i:i + 4]], y[idx[i:i + 4]]

    np.random.seed(3)  # noqa: NPY002
    random.seed(3)
    want = (np.random.random(), random.random())  # noqa: NPY002
    np.random.seed(3)  # noqa: NPY002
    random.seed(3)
    with gj.open_writer(tmp_path / "g.h5", params) as w:
        gj.Recorder(w, params, loss_params).record(shuffled(), 0, "train")
    assert (np.random.random(), random.random()) == want  # noqa: NPY002


# ---------------------------------------------------------------------------------------
# 7. Training loops: flax NNX + SGD-momentum, equinox + adam
# ---------------------------------------------------------------------------------------


def test_nnx_batchnorm_sgd_momentum_loop(tmp_path):
    model = NnxMLP(nnx.Rngs(0), rate=0.2)
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    x, y = data(24, seed=1)
    xt, yt = data(10, seed=2)

    @nnx.jit
    def train_step(model, opt, xb, yb):
        def batch_loss(m):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(xb), yb))

        loss, grads = nnx.value_and_grad(batch_loss)(model)
        opt.update(model, grads)
        return loss

    path = tmp_path / "nnx.h5"
    updates, refs = 0, {}
    with gj.open_writer(path, model) as w:
        rec = gj.Recorder(w, model, loss_module, optimizer=opt)
        for epoch in range(3):
            model.train()
            for i in range(0, 24, 8):
                train_step(model, opt, x[i:i + 8], y[i:i + 8])
                updates += 1
            # recorded while the model is in train mode: eval for the record, restored
            rec.record((x, y), epoch, "train", batch_size=8, epoch=epoch)
            rec.record((xt, yt), epoch, "test", batch_size=8, epoch=epoch)
            assert model.bn1.use_running_average is False
            lay = gj.layout(model)
            refs[epoch] = (nnx_reference(model, loss_module, x, y, lay),
                           nnx_reference(model, loss_module, xt, yt, lay), updates)
    with gs.open_store(path) as s:
        info = {(r.step, r.split): r for r in s.records}
        for epoch, (R, Rt, n_updates) in refs.items():
            assert_within(s.read_grads(epoch, "train"), R, bound(R), f"train {epoch}")
            assert_within(s.read_grads(epoch, "test"), Rt, bound(Rt), f"test {epoch}")
            assert info[(epoch, "train")].optimizer_step == n_updates == 3 * (epoch + 1)
            assert info[(epoch, "test")].optimizer_step == n_updates
        meta = s.record_meta(2, "train")["optimizer"]
        assert meta["step_source"].endswith("Optimizer.step")
        assert meta["states"] == ["TraceState", "EmptyState"]
    assert not np.allclose(refs[0][0], refs[2][0])  # it trained


def test_equinox_adam_loop(tmp_path):
    model = EqxNet(jax.random.key(3), p=0.1)
    tx = optax.adam(3e-2)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = data(20, seed=4)
    xt, yt = data(8, seed=5)

    @eqx.filter_jit
    def train_step(model, opt_state, xb, yb, key):
        def batch_loss(m):
            keys = jax.random.split(key, xb.shape[0])
            logits = jax.vmap(lambda xi, k: m(xi, key=k))(xb, keys)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        upd, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, upd), opt_state, loss

    path = tmp_path / "eqx.h5"
    key, updates, refs = jax.random.key(0), 0, {}
    with gj.open_writer(path, model) as w:
        rec = gj.Recorder(w, model, loss_module)
        for epoch in range(3):
            for i in range(0, 20, 5):
                key, sub = jax.random.split(key)
                model, opt_state, _ = train_step(model, opt_state, x[i:i + 5], y[i:i + 5],
                                                 sub)
                updates += 1
            for split, (xs, ys) in (("train", (x, y)), ("test", (xt, yt))):
                rec.record((xs, ys), epoch, split, batch_size=8, params=model,
                           opt_state=opt_state, epoch=epoch)
            lay = gj.layout(model)
            refs[epoch] = (eqx_reference(model, loss_module, x, y, lay),
                           eqx_reference(model, loss_module, xt, yt, lay), updates)
    with gs.open_store(path) as s:
        info = {(r.step, r.split): r for r in s.records}
        for epoch, (R, Rt, n_updates) in refs.items():
            assert_within(s.read_grads(epoch, "train"), R, bound(R), f"train {epoch}")
            assert_within(s.read_grads(epoch, "test"), Rt, bound(Rt), f"test {epoch}")
            assert info[(epoch, "train")].optimizer_step == n_updates == 4 * (epoch + 1)
            assert info[(epoch, "test")].optimizer_step == n_updates
        assert s.record_meta(1, "test")["optimizer"]["step_source"] == "ScaleByAdamState.count"
    assert not np.allclose(refs[0][0], refs[2][0])


# ---------------------------------------------------------------------------------------
# 8. docs/adapters.md
# ---------------------------------------------------------------------------------------


@pytest.mark.slow  # end to end: trains the docs' three small models
def test_the_jax_section_of_docs_adapters_runs(tmp_path, monkeypatch):
    """docs/adapters.md's JAX examples run as printed and say what they do."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/adapters.md").read_text()
    section = text[text.index("\n## JAX (flax NNX / linen / equinox + optax)"):]
    section = section[: section.find("\n## ", 5)] if "\n## " in section[5:] else section
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if not b.lstrip().startswith("{")]  # the meta example is a value, not code
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for b in blocks:
        exec(compile(b, "docs/adapters.md", "exec"), ns)  # noqa: S102 - our own docs
    with gs.open_store(tmp_path / "nnx.h5") as s:
        assert [r.optimizer_step for r in s.records] == [3, 3, 6, 6, 9, 9]
        assert s.layout.names == ("l1.kernel", "l1.bias", "bn.scale", "bn.bias", "l2.kernel",
                                  "l2.bias")
        meta = s.record_meta(2, "train")
    shown = re.search(r'\{"optimizer".*?"framework": "jax [\d.]+"\}', section, re.S).group(0)
    want = dict(meta, framework="jax 0.10.2")  # the docs show one version
    assert eval(shown) == want  # noqa: S307 - our own docs
    with gs.open_store(tmp_path / "eqx.h5") as s:
        assert [r.optimizer_step for r in s.records] == [3, 3, 6, 6, 9, 9]
    assert ns["names"] == ["Dense_0.kernel", "Dense_0.bias", "BatchNorm_0.scale",
                           "BatchNorm_0.bias", "Dense_1.kernel", "Dense_1.bias"]
    assert ns["G"].shape == (96, sum(int(np.prod(s)) for _, s in gj.layout(
        (ns["net"], ns["variables"]))))
