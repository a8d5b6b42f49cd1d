"""JAX adapter: the contract suite plus JAX-specific behaviour.

Independent routes: ``jax.grad`` of the summed batch loss, central finite differences in
float64 (x64 enabled only inside a fixture that restores it), and a NumPy re-implementation
of the model's forward pass for the probe.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import U32, assert_within, f32_chain_bound

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from adapter_contract import ALL_CHECKS, FACTORED_CHECKS, AdapterCase  # noqa: E402
from gsnr_stats.adapters import jax as gj  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError  # noqa: E402

# Terms along the longest float32 chain ending in a gradient entry or loss of the MLP
# (x@W 4, h@W 5, logsumexp 3; backward 3 + 5, tanh' and products: ~30); about twice that.
K32 = 64


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the global flag afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def init_params(seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "layer1": {"w": rng.normal(size=(4, 5)).astype(dtype) * 0.7,
                   "b": rng.normal(size=5).astype(dtype) * 0.1},
        "layer2": {"w": rng.normal(size=(5, 3)).astype(dtype) * 0.7,
                   "b": rng.normal(size=3).astype(dtype) * 0.1},
    }


def forward(params, x):
    h = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
    return h @ params["layer2"]["w"] + params["layer2"]["b"]


def loss_one(params, x, y):
    """Softmax cross-entropy of ONE example (y an integer class)."""
    logits = forward(params, x)
    return jax.nn.logsumexp(logits) - logits[y]


def np_loss(params, x, y):
    """NumPy route: per-sample cross-entropy (n,), float64."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = np.tanh(x @ p["layer1"]["w"] + p["layer1"]["b"])
    z = h @ p["layer2"]["w"] + p["layer2"]["b"]
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return lse - z[np.arange(len(y)), y]


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel()
                           for a in jax.tree_util.tree_leaves(tree)])


def unflat(theta: np.ndarray, like) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, off = [], 0
    for a in leaves:
        out.append(theta[off:off + a.size].reshape(a.shape))
        off += a.size
    return jax.tree_util.tree_unflatten(treedef, out)


def make_case() -> AdapterCase:
    params = init_params()
    rng = np.random.default_rng(1)
    n = 7
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    params64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    vloss = jax.vmap(loss_one, in_axes=(None, 0, 0))

    def batch_gradient():
        g = jax.grad(lambda p: jnp.sum(vloss(p, x, y)))(params)
        return flat(g)

    def losses_at(theta):
        return np.asarray(vloss(unflat(theta, params64), x.astype(np.float64), y), np.float64)

    def write_batches(w, step, split, batch_size):
        gj.Recorder(w, loss_one, params).record(params, (x, y), step, split,
                                                batch_size=batch_size)

    return AdapterCase(
        name="jax-mlp",
        framework="jax",
        layout=gj.layout(params),
        per_sample_gradients=lambda: gj.per_sample_gradients(loss_one, params, x, y),
        batch_gradient=batch_gradient,
        flat_params=lambda: flat(params),
        per_sample_losses=losses_at,
        per_sample_gradients_fd=lambda: gj.per_sample_gradients(
            loss_one, params64, x.astype(np.float64), y),
        losses=lambda: gj.per_sample_gradients(loss_one, params, x, y, return_loss=True)[1],
        write_batches=write_batches,
        unsupported=UNSUPPORTED,
        fd_max_coords=None,
        # x @ W kernels (in, out): factored with D = a, A = delta; biases plain columns
        factors=[("layer1.w", None, 1), ("layer2.w", None, 1)],
        per_sample_factors=lambda: gj.per_sample_factors(params, loss_one, x, y),
        write_batches_factored=lambda w, step, split, bs: gj.Recorder(
            w, params, loss_one, keep="factors").record((x, y), step, split, batch_size=bs),
    )


def _bad(loss_fn, params=None):
    params = init_params() if params is None else params
    x, y = np.ones((3, 4), np.float32), np.array([0, 1, 2])
    return lambda: gj.per_sample_gradients(loss_fn, params, x, y)


def _branchy(params, x, y):
    loss = loss_one(params, x, y)
    if loss > 1.0:  # Python control flow on a traced value
        return loss
    return 2 * loss


UNSUPPORTED = [
    (_bad(lambda p, x, y: forward(p, x)), r"scalar"),
    (_bad(_branchy), r"(?i)tracer|concret"),
    (_bad(lambda p, x, y: jnp.asarray(np.tanh(np.asarray(forward(p, x)))).sum()),
     r"(?i)tracer"),
    (_bad(loss_one, {"steps": np.arange(3)}), r"no selected floating-point"),
]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(check, tmp_path, x64):
    check(make_case(), tmp_path)


@pytest.mark.parametrize("check", FACTORED_CHECKS, ids=lambda c: c.__name__)
def test_contract_factored(check, tmp_path):
    check(make_case(), tmp_path)


# ---------------------------------------------------------------------------------------
# JAX specifics
# ---------------------------------------------------------------------------------------


def test_names_from_key_paths_and_int_leaves():
    params = {
        "params": {"Dense_0": {"kernel": np.zeros((2, 3), np.float32),
                               "bias": np.zeros(3, np.float32)}},
        "blocks": [{"w": np.zeros((3,), np.float32)}, (np.zeros((1, 1), np.float32),)],
        "step": np.int32(4),
        "ids": np.arange(3),
    }
    lay = gj.layout(params)
    assert lay == [
        ("blocks.0.w", (3,)), ("blocks.1.0", (1, 1)),
        ("params.Dense_0.bias", (3,)), ("params.Dense_0.kernel", (2, 3)),
    ]
    filt = gj.layout(params, param_filter=lambda name, leaf: name.startswith("params."))
    assert [n for n, _ in filt] == ["params.Dense_0.bias", "params.Dense_0.kernel"]
    assert gj.layout(np.zeros(3, np.float32)) == [("params", (3,))]
    store_layout = gs.Layout.from_params(lay)
    assert store_layout.layers[2] == "params.Dense_0"


def test_filter_int_leaf_and_chunk_size():
    params = dict(init_params(), scale=np.int32(2))

    def loss(p, x, y):
        return p["scale"] * loss_one(p, x, y)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, 10)
    G = gj.per_sample_gradients(loss, params, x, y)
    G1 = gj.per_sample_gradients(loss_one, init_params(), x, y)
    # separately compiled programs (scale 2 vs none, chunks of 3 vs 10, layer1 frozen):
    # different float32 routes, each within K u colmax of the exact gradients
    assert_within(G, 2 * G1, 2 * f32_chain_bound(G, K32), "scale")
    Gc = gj.per_sample_gradients(loss, params, x, y, chunk_size=3)
    assert_within(Gc, G, 2 * f32_chain_bound(G, K32), "chunked")
    # filter: layer2 only; layer1 held fixed (frozen) -> the matching columns
    G2 = gj.per_sample_gradients(loss, params, x, y,
                                 param_filter=lambda n, leaf: n.startswith("layer2"))
    assert_within(G2, G[:, -18:], 2 * f32_chain_bound(G[:, -18:], K32), "filter")


def test_recorder_iterator_schedule_padding(tmp_path):
    params = init_params()
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(11, 4)).astype(np.float32), rng.integers(0, 3, 11)
    ids = np.arange(50, 61)
    batches = [(x[i:i + 4], y[i:i + 4], ids[i:i + 4]) for i in range(0, 11, 4)]
    path = tmp_path / "j.h5"
    with gj.open_writer(path, params) as w:
        rec = gj.Recorder(w, loss_one, params, lr=lambda step: 0.1 / (1 + step),
                          progress={"disable": True})
        summ = rec.record(params, iter(batches), step=3, split="train", epoch=1)
        params2 = jax.tree_util.tree_map(lambda a: a * 0.5, params)
        rec.record(params2, (x, y), step=4, split="train", batch_size=5, max_samples=9)
    G, L = gj.per_sample_gradients(loss_one, params, x, y, return_loss=True)
    G2 = gj.per_sample_gradients(loss_one, params2, x, y)
    # float32 losses vs NumPy's float64 on the same float32 inputs: K u max |loss|
    assert_within(L, np_loss(params, x, y), K32 * U32 * np.abs(L).max(), "losses")
    # recorder batches of 4 vs one call of 11: two float32 routes, each mean of n float32
    # losses within gamma_n max |L| more
    assert summ.n_samples == 11
    assert abs(summ.mean_loss - L.mean()) <= (2 * K32 + 2 * len(L)) * U32 * np.abs(L).max()
    with gs.open_store(path) as s:
        assert s.attrs["framework"] == "jax"
        assert_within(s.read_grads(3, "train"), G, 2 * f32_chain_bound(G, K32), "step 3")
        np.testing.assert_array_equal(s.read_sample_id(3, "train"), ids)
        np.testing.assert_array_equal(s.read_label(3, "train"), y.astype(float))
        assert_within(s.read_grads(4, "train"), G2[:9], 2 * f32_chain_bound(G2[:9], K32),
                      "step 4")
        info = {(r.step, r.split): r for r in s.records}
        assert info[(3, "train")].lr == pytest.approx(0.1 / 4)
        assert info[(4, "train")].lr == pytest.approx(0.1 / 5)
        assert info[(3, "train")].epoch == 1


def test_recorder_layout_mismatch(tmp_path):
    params = init_params()
    with gj.open_writer(tmp_path / "m.h5", params,
                        param_filter=lambda n, leaf: n.startswith("layer1")) as w:
        with pytest.raises(AdapterError, match="layout"):
            gj.Recorder(w, loss_one, params)


def test_trajectory_and_probe(tmp_path, x64):
    params = init_params(dtype=np.float64)
    rng = np.random.default_rng(4)
    xa, ya = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    xb, yb = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    lr, n, K = 0.1, 8, 4
    with gj.open_writer(tmp_path / "p.h5", params) as w:
        tr, te = gj.record_trajectory(w, loss_one, params, (xa, ya), (xb, yb), step=0, lr=lr,
                                      batch_size=7)
        res = gj.probe_osgr(loss_one, params, (xa, ya), (xb, yb), n=n, lr=lr, K=K, step=0,
                            writer=w, seed=3)
    assert tr == pytest.approx(np_loss(params, xa, ya).mean(), rel=1e-10)
    assert te == pytest.approx(np_loss(params, xb, yb).mean(), rel=1e-10)
    rng = np.random.default_rng(3)
    for k in range(K):
        ia = np.sort(rng.choice(30, n, replace=False))
        ib = np.sort(rng.choice(30, n, replace=False))
        # independent: mean of per-sample gradients, NumPy forward
        g = gj.per_sample_gradients(loss_one, params, xa[ia], ya[ia]).mean(axis=0)
        after = unflat(flat(params) - lr * g, params)
        np.testing.assert_allclose(
            [res.train_before[k], res.train_after[k], res.test_before[k], res.test_after[k]],
            [np_loss(params, xa[ia], ya[ia]).mean(), np_loss(after, xa[ia], ya[ia]).mean(),
             np_loss(params, xb[ib], yb[ib]).mean(), np_loss(after, xb[ib], yb[ib]).mean()],
            rtol=1e-10)
    with gs.open_store(tmp_path / "p.h5") as s:
        pr, traj = s.probes(), s.trajectory()
    for key, arr in res.as_dict().items():
        np.testing.assert_allclose(pr[key], arr, rtol=1e-12, err_msg=key)
    np.testing.assert_allclose([traj["train_loss"][0], traj["test_loss"][0]], [tr, te])
    # small lr: first-order ratio from per-sample gradients
    small = gj.probe_osgr(loss_one, params, (xa, ya), (xb, yb), n=n, lr=1e-6, K=K, seed=5)
    rng = np.random.default_rng(5)
    num = den = 0.0
    for _ in range(K):
        ia = np.sort(rng.choice(30, n, replace=False))
        ib = np.sort(rng.choice(30, n, replace=False))
        ga = gj.per_sample_gradients(loss_one, params, xa[ia], ya[ia]).mean(0)
        gb = gj.per_sample_gradients(loss_one, params, xb[ib], yb[ib]).mean(0)
        num, den = num + gb @ ga, den + ga @ ga
    assert small.ratio == pytest.approx(num / den, rel=1e-4)
