"""The same MLP in PyTorch, JAX and scikit-learn gives the same per-sample gradients.

One network ``4 -tanh-> 5 -> 3`` (softmax cross-entropy, float64), weights copied into each
framework. Three independent implementations (torch autograd, JAX autodiff, the sklearn
adapter's hand-written backprop) must agree tensor by tensor, up to layout order and the
transposed torch ``Linear.weight`` ``(out, in)`` versus sklearn's ``coefs_`` ``(in, out)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from gsnr_stats.adapters import jax as gj  # noqa: E402
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402

N, D, H, K = 9, 4, 5, 3


@pytest.fixture
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    W = [rng.normal(size=(D, H)) * 0.8, rng.normal(size=(H, K)) * 0.8]  # sklearn (in, out)
    b = [rng.normal(size=H) * 0.2, rng.normal(size=K) * 0.2]
    X = rng.normal(size=(N, D))
    y = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0])
    return W, b, X, y


def by_name(G: np.ndarray, lay) -> dict[str, np.ndarray]:
    """Split an (n, P) array into {name: (n, *shape)} using the layout."""
    out, off = {}, 0
    for name, shape in lay:
        size = math.prod(shape)
        out[name] = G[:, off:off + size].reshape(G.shape[0], *shape)
        off += size
    assert off == G.shape[1]
    return out


def torch_grads(W, b, X, y):
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, K)).double()
    with torch.no_grad():
        for lin, w, bb in zip((model[0], model[2]), W, b, strict=True):
            lin.weight.copy_(torch.from_numpy(w.T))  # torch stores (out, in)
            lin.bias.copy_(torch.from_numpy(bb))
    ce = nn.CrossEntropyLoss(reduction="none")
    G, L = gt.per_sample_gradients(model, ce, torch.from_numpy(X), torch.from_numpy(y),
                                   return_loss=True)
    g = by_name(G, gt.layout(model))
    named = {
        "coefs_0": g["0.weight"].transpose(0, 2, 1), "intercepts_0": g["0.bias"],
        "coefs_1": g["2.weight"].transpose(0, 2, 1), "intercepts_1": g["2.bias"],
    }
    return named, L


def jax_grads(W, b, X, y):
    params = {"coefs_0": W[0], "intercepts_0": b[0], "coefs_1": W[1], "intercepts_1": b[1]}

    def loss_one(p, x, t):
        h = jnp.tanh(x @ p["coefs_0"] + p["intercepts_0"])
        z = h @ p["coefs_1"] + p["intercepts_1"]
        return jax.nn.logsumexp(z) - z[t]

    G, L = gj.per_sample_gradients(loss_one, params, X, y, return_loss=True)
    lay = gj.layout(params)
    assert [n for n, _ in lay] == ["coefs_0", "coefs_1", "intercepts_0", "intercepts_1"]
    return by_name(G, lay), L


def test_torch_equals_jax(problem, x64):
    W, b, X, y = problem
    gt_, lt = torch_grads(W, b, X, y)
    gj_, lj = jax_grads(W, b, X, y)
    np.testing.assert_allclose(lt, lj, rtol=1e-12)
    for name in gj_:
        np.testing.assert_allclose(gt_[name], gj_[name], rtol=1e-10, atol=1e-13, err_msg=name)
    # and the per-sample loss is softmax cross-entropy, computed here by hand
    h = np.tanh(X @ W[0] + b[0])
    z = h @ W[1] + b[1]
    ref = np.log(np.exp(z).sum(1)) - z[np.arange(N), y]
    np.testing.assert_allclose(lt, ref, rtol=1e-12)


def test_sklearn_equals_torch_and_jax(problem, x64):
    try:
        from gsnr_stats.adapters import sklearn as gk
    except ImportError as e:  # written by another part of the project
        pytest.skip(f"gsnr_stats.adapters.sklearn not importable yet: {e}")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    W, b, X, y = problem
    est = MLPClassifier(hidden_layer_sizes=(H,), activation="tanh", alpha=0.0, max_iter=1,
                        random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    est.coefs_ = [w.copy() for w in W]
    est.intercepts_ = [bb.copy() for bb in b]
    G = np.asarray(gk.per_sample_gradients(est, X, y))
    lay = [(entry[0], tuple(entry[1])) for entry in gk.layout(est)]
    assert [n for n, _ in lay] == ["coefs_0", "intercepts_0", "coefs_1", "intercepts_1"]
    gs_ = by_name(G, lay)
    gt_, lt = torch_grads(W, b, X, y)
    gj_, _ = jax_grads(W, b, X, y)
    for name in gs_:
        np.testing.assert_allclose(gs_[name], gt_[name], rtol=1e-10, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(gs_[name], gj_[name], rtol=1e-10, atol=1e-13, err_msg=name)
    if hasattr(gk, "per_sample_loss"):
        np.testing.assert_allclose(gk.per_sample_loss(est, X, y), lt, rtol=1e-10)
