"""scikit-learn adapter: analytic per-sample gradients against independent routes.

Every loss here is re-implemented from the estimator's *public* predictions
(``predict_proba``, ``decision_function``, ``predict``) on a copy whose parameters are set
from a flat vector, so finite differences test the adapter's backprop, not itself. The full
objectives (with penalty) are written out in sklearn's own scaling.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from adapter_contract import ALL_CHECKS, FACTORED_CHECKS, AdapterCase
from conftest import U32, U64, assert_within
from gsnr_stats.adapters import sklearn as gk
from sklearn import __version__ as SKLEARN_VERSION
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    LogisticRegressionCV,
    Ridge,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import gsnr_stats as gs
from gsnr_stats.errors import AdapterError

SKLEARN = tuple(int(p) for p in SKLEARN_VERSION.split(".")[:2])


def f32_stored_bound(ref: np.ndarray) -> np.ndarray:
    """|float32 store of a float64 route's rows - another float64 route's rows| (batches vs
    one call): one rounding to float32 (u |g|) plus both float64 routes' error, 64 terms'
    worth of u64 each times the column's largest |g| (cancellation)."""
    return U32 * np.abs(ref) + 2 * 64 * U64 * np.abs(ref).max(axis=0)

# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

_rng = np.random.default_rng(7)
D = 4
X_TR = _rng.normal(size=(80, D))
X_HO = _rng.normal(size=(23, D))  # held out: no sample sits on a hinge/ReLU kink
W_TRUE = _rng.normal(size=(3, D))


def _labels(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    logits = X @ W_TRUE[:k].T + 0.8 * r.normal(size=(X.shape[0], k))
    if k == 1:
        return (logits[:, 0] > 0).astype(int)
    return logits.argmax(axis=1)


Y2_TR, Y2_HO = _labels(X_TR, 1, 1), _labels(X_HO, 1, 2)
Y3_TR, Y3_HO = _labels(X_TR, 3, 3), _labels(X_HO, 3, 4)
YS3_TR = np.array(["ant", "bee", "cat"])[Y3_TR]  # string labels
YS3_HO = np.array(["ant", "bee", "cat"])[Y3_HO]
YML_TR = (X_TR[:, :3] + 0.5 * _rng.normal(size=(80, 3)) > 0).astype(int)  # multilabel
YML_HO = (X_HO[:, :3] + 0.5 * _rng.normal(size=(23, 3)) > 0).astype(int)
YR_TR = X_TR @ W_TRUE[0] + 0.3 * _rng.normal(size=80)
YR_HO = X_HO @ W_TRUE[0] + 0.3 * _rng.normal(size=23)
YR2_TR = X_TR @ W_TRUE[:2].T + 0.3 * _rng.normal(size=(80, 2))
YR2_HO = X_HO @ W_TRUE[:2].T + 0.3 * _rng.normal(size=(23, 2))
YP_TR = _rng.poisson(np.exp(0.3 * X_TR[:, :2])).astype(float)  # 2 count outputs
YP_HO = _rng.poisson(np.exp(0.3 * X_HO[:, :2])).astype(float)


def _fit(est: Any, X: np.ndarray, y: np.ndarray) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


# --------------------------------------------------------------------------------------
# Independent route: parameters from a flat vector, losses from public predictions
# --------------------------------------------------------------------------------------


def _with_theta(est: Any, theta: np.ndarray) -> Any:
    """A copy of ``est`` whose coef_/intercept_ (or coefs_/intercepts_) come from theta."""
    e = copy.deepcopy(est)
    off = 0

    def take(like: Any) -> np.ndarray:
        nonlocal off
        shape = np.shape(like)
        size = int(np.prod(shape))
        out = theta[off:off + size].reshape(shape).copy()
        off += size
        return out

    if hasattr(e, "coefs_"):
        for i in range(len(e.coefs_)):
            e.coefs_[i] = take(e.coefs_[i])
            e.intercepts_[i] = take(e.intercepts_[i])
    else:
        e.coef_ = take(e.coef_)
        if e.fit_intercept:
            b = take(e.intercept_)
            e.intercept_ = float(b) if b.ndim == 0 else b
    assert off == theta.size
    return e


def _pm(est: Any, y: np.ndarray) -> np.ndarray:
    """+-1 targets, (n, 1) binary or (n, K) one-vs-rest."""
    classes = list(est.classes_)
    idx = np.array([classes.index(v) for v in y])
    if len(classes) == 2:
        return np.where(idx == 1, 1.0, -1.0)[:, None]
    return np.where(idx[:, None] == np.arange(len(classes)), 1.0, -1.0)


def _margin_loss(name: str, z: np.ndarray) -> np.ndarray:
    if name == "log_loss":
        return np.log1p(np.exp(-z))
    if name == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if name == "perceptron":
        return np.maximum(0.0, -z)
    if name == "squared_hinge":
        return np.maximum(0.0, 1.0 - z) ** 2
    if name == "modified_huber":
        return np.where(z >= -1, np.maximum(0.0, 1.0 - z) ** 2, -4.0 * z)
    raise AssertionError(name)


def _residual_loss(est: Any, r: np.ndarray) -> np.ndarray:
    if isinstance(est, LinearRegression | Ridge):
        return r ** 2
    eps, a = getattr(est, "epsilon", 0.0), np.abs(r)
    return {
        "squared_error": 0.5 * r ** 2,
        "huber": np.where(a <= eps, 0.5 * r ** 2, eps * a - 0.5 * eps ** 2),
        "epsilon_insensitive": np.maximum(0.0, a - eps),
        "squared_epsilon_insensitive": np.maximum(0.0, a - eps) ** 2,
    }[est.loss]


def ref_losses(est: Any, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each sample's loss, from the estimator's public predictions only."""
    if isinstance(est, LogisticRegression):
        P = est.predict_proba(X)
        return -np.log(P[np.arange(len(y)), np.searchsorted(est.classes_, y)])
    if isinstance(est, LinearSVC | SGDClassifier):
        F = est.decision_function(X).reshape(len(y), -1)
        return _margin_loss(est.loss, _pm(est, y) * F).sum(axis=1)
    if isinstance(est, LinearRegression | Ridge | SGDRegressor):
        R = est.predict(X).reshape(len(y), -1) - np.reshape(y, (len(y), -1))
        return _residual_loss(est, R).sum(axis=1)
    if isinstance(est, MLPClassifier):
        P = est.predict_proba(X)
        if np.ndim(y) == 2:  # multilabel: independent sigmoids
            return -(y * np.log(P) + (1 - y) * np.log(1 - P)).sum(axis=1)
        return -np.log(P[np.arange(len(y)), np.searchsorted(est.classes_, y)])
    if isinstance(est, MLPRegressor):
        F = est.predict(X).reshape(len(y), -1)
        Y = np.reshape(y, (len(y), -1))
        if est.loss == "poisson":
            return (F - Y * np.log(F) + np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1)), 0)
                    - Y).sum(axis=1)
        return 0.5 * ((F - Y) ** 2).sum(axis=1)
    raise AssertionError(type(est))


def ref_objective(est: Any, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(sklearn's full objective J on (X, y), its loss scaling s), written out by hand."""
    ell = ref_losses(est, X, y)
    n = len(y)
    if isinstance(est, MLPClassifier | MLPRegressor):
        sq = sum(float((c ** 2).sum()) for c in est.coefs_)
        return ell.mean() + est.alpha / (2 * n) * sq, 1.0 / n
    W = np.asarray(est.coef_)
    b = np.asarray(getattr(est, "intercept_", 0.0))
    if isinstance(est, LogisticRegression):
        J = est.C * ell.sum() + 0.5 * (W ** 2).sum()
        if est.solver == "liblinear" and est.fit_intercept:
            J += 0.5 * ((b / est.intercept_scaling) ** 2).sum()
        return J, est.C
    if isinstance(est, LinearSVC):
        J = est.C * ell.sum() + 0.5 * (W ** 2).sum()
        if est.fit_intercept:
            J += 0.5 * ((b / est.intercept_scaling) ** 2).sum()
        return J, est.C
    if isinstance(est, SGDClassifier | SGDRegressor):
        return ell.mean() + est.alpha * 0.5 * (W ** 2).sum(), 1.0 / n
    if isinstance(est, Ridge):
        alpha = np.broadcast_to(np.asarray(est.alpha, float).reshape(-1, 1), W.reshape(-1, D).shape)
        return ell.sum() + (alpha * W.reshape(-1, D) ** 2).sum(), 1.0
    return ell.sum(), 1.0  # LinearRegression


def _fd(f: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of f (scalar or vector valued) in every coordinate."""
    cols = []
    t = theta.copy()
    for j in range(t.size):
        old = t[j]
        t[j] = old + eps
        up = np.asarray(f(t), dtype=np.float64)
        t[j] = old - eps
        down = np.asarray(f(t), dtype=np.float64)
        t[j] = old
        cols.append((up - down) / (2 * eps))
    return np.stack(cols, axis=-1)


# --------------------------------------------------------------------------------------
# The estimators under test
# --------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    make: Callable[[], Any]
    y_tr: np.ndarray
    y_ho: np.ndarray


def _mlp_c(act: str, hidden: tuple[int, ...] = (5,), **kw: Any) -> Callable[[], Any]:
    return lambda: MLPClassifier(hidden_layer_sizes=hidden, activation=act, max_iter=60,
                                 alpha=1e-2,
                                 learning_rate_init=0.01, random_state=0, **kw)


SPECS = [
    Spec("logreg-binary", lambda: LogisticRegression(C=0.7), Y2_TR, Y2_HO),
    Spec("logreg-multinomial", lambda: LogisticRegression(C=0.7), YS3_TR, YS3_HO),
    Spec("logreg-liblinear", lambda: LogisticRegression(C=0.5, solver="liblinear",
                                                        intercept_scaling=2.0), Y2_TR, Y2_HO),
    Spec("logreg-nointercept", lambda: LogisticRegression(fit_intercept=False), Y3_TR, Y3_HO),
    Spec("linearsvc-hinge-binary", lambda: LinearSVC(loss="hinge", C=0.3), Y2_TR, Y2_HO),
    Spec("linearsvc-sqhinge-ovr", lambda: LinearSVC(C=0.3, intercept_scaling=3.0), Y3_TR,
         Y3_HO),
    *[Spec(f"sgd-{loss}-{k}", (lambda loss=loss: SGDClassifier(
        loss=loss, alpha=1e-2, max_iter=5, tol=None, learning_rate="constant", eta0=0.01,
        random_state=0)), ytr, yho)
      for loss in ("log_loss", "hinge", "modified_huber", "squared_hinge", "perceptron")
      for k, ytr, yho in (("binary", Y2_TR, Y2_HO), ("ovr", Y3_TR, Y3_HO))],
    *[Spec(f"sgdreg-{loss}", (lambda loss=loss: SGDRegressor(
        loss=loss, alpha=1e-2, epsilon=0.2, max_iter=5, tol=None, learning_rate="constant",
        eta0=0.01, random_state=0)), YR_TR, YR_HO)
      for loss in ("squared_error", "huber", "epsilon_insensitive",
                   "squared_epsilon_insensitive")],
    Spec("linreg-1d", LinearRegression, YR_TR, YR_HO),
    Spec("linreg-2d", LinearRegression, YR2_TR, YR2_HO),
    Spec("ridge-1d", lambda: Ridge(alpha=3.0), YR_TR, YR_HO),
    Spec("ridge-2d-alphas", lambda: Ridge(alpha=np.array([0.5, 4.0])), YR2_TR, YR2_HO),
    *[Spec(f"mlp-{act}-multiclass", _mlp_c(act), Y3_TR, Y3_HO)
      for act in ("relu", "tanh", "logistic", "identity")],
    Spec("mlp-tanh-binary", _mlp_c("tanh", (6, 3)), Y2_TR, Y2_HO),
    Spec("mlp-relu-multilabel", _mlp_c("relu"), YML_TR, YML_HO),
    Spec("mlpreg-squared-2out", lambda: MLPRegressor(
        hidden_layer_sizes=(5,), activation="tanh", max_iter=60, alpha=0.1, random_state=0),
        YR2_TR, YR2_HO),
    *([Spec("mlpreg-poisson", lambda: MLPRegressor(
        hidden_layer_sizes=(4,), activation="tanh", loss="poisson", max_iter=60, alpha=0.1,
        random_state=0), YP_TR, YP_HO)] if "loss" in MLPRegressor().get_params() else []),
]

_FITTED: dict[str, Any] = {}


def fitted(spec: Spec) -> Any:
    if spec.name not in _FITTED:
        _FITTED[spec.name] = _fit(spec.make(), X_TR, spec.y_tr)
    return _FITTED[spec.name]


def make_case(spec: Spec) -> AdapterCase:
    est = fitted(spec)
    X, y = X_HO, spec.y_ho

    def losses_at(theta: np.ndarray) -> np.ndarray:
        return ref_losses(_with_theta(est, theta), X, y)

    theta0 = gk.flat_params(est)
    return AdapterCase(
        name=f"sklearn-{spec.name}",
        framework="sklearn",
        layout=gk.layout(est),
        per_sample_gradients=lambda: gk.per_sample_gradients(est, X, y),
        batch_gradient=lambda: _fd(lambda t: losses_at(t).sum(), theta0),
        flat_params=lambda: theta0,
        per_sample_losses=losses_at,
        losses=lambda: losses_at(theta0),
        write_batches=lambda w, step, split, bs: gk.record(w, est, X, y, step=step,
                                                           split=split, batch_size=bs),
        unsupported=[
            (lambda: gk.per_sample_gradients(KNeighborsClassifier().fit(X_TR, Y2_TR), X, y),
             r"KNeighborsClassifier"),
            (lambda: gk.per_sample_gradients(spec.make(), X, y), r"not fitted"),
        ],
        fd_max_coords=None,
        batch_size=5,
        factors=[(w, "intercept" if w == "coef" and "intercept" in dict(gk.layout(est))
                  else None, 1) for w in gk.per_sample_factors(est, X, y, factors=True)[1]]
        if spec.name in FACTORED else None,
        per_sample_factors=lambda: gk.per_sample_factors(est, X, y, factors=True),
        write_batches_factored=lambda w, step, split, bs: gk.record(
            w, est, X, y, step=step, split=split, batch_size=bs, keep="factors"),
        factor_dtype="float64",
    )


# the factored record checks on one estimator of each factorable family
FACTORED = ["logreg-binary", "logreg-multinomial", "logreg-nointercept",
            "linearsvc-sqhinge-ovr", "sgd-log_loss-ovr", "ridge-2d-alphas", "mlp-tanh-binary"]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_contract(spec: Spec, check: Callable[..., None], tmp_path) -> None:
    check(make_case(spec), tmp_path)


@pytest.mark.parametrize("check", FACTORED_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", FACTORED)
def test_contract_factored(name: str, check: Callable[..., None], tmp_path) -> None:
    check(make_case(next(s for s in SPECS if s.name == name)), tmp_path)


# --------------------------------------------------------------------------------------
# Penalty, scaling and optimality
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_sum_with_penalty_is_objective_gradient(spec: Spec) -> None:
    """s * sum_i g_i(include_penalty) == grad of sklearn's full objective J (FD)."""
    est = fitted(spec)
    X, y = X_HO, spec.y_ho
    theta0 = gk.flat_params(est)
    _, scale = ref_objective(est, X, y)
    ref = _fd(lambda t: ref_objective(_with_theta(est, t), X, y)[0], theta0)
    G = gk.per_sample_gradients(est, X, y, include_penalty=True)
    np.testing.assert_allclose(scale * G.sum(axis=0), ref, rtol=1e-5,
                               atol=1e-7 * max(np.abs(ref).max(), 1e-3))
    # the penalty is one equal share per row on top of the data term
    G0 = gk.per_sample_gradients(est, X, y)
    np.testing.assert_allclose(G - G0, np.broadcast_to((G - G0)[:1], G.shape), atol=1e-12)


def test_penalty_share_uses_n_samples() -> None:
    est = fitted(SPECS[0])
    full = gk.per_sample_gradients(est, X_HO, Y2_HO, include_penalty=True)
    part = gk.per_sample_gradients(est, X_HO[:5], Y2_HO[:5], include_penalty=True,
                                   n_samples=len(X_HO))
    np.testing.assert_allclose(part, full[:5], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("multiclass", [False, True])
def test_logistic_regression_optimum(multiclass: bool) -> None:
    """At a converged lbfgs fit, C * sum_i g_i + [W, 0] = 0 (sklearn's own scaling)."""
    y = Y3_TR if multiclass else Y2_TR
    est = LogisticRegression(C=0.8, tol=1e-12, max_iter=10_000).fit(X_TR, y)
    G = gk.per_sample_gradients(est, X_TR, y)
    pen = np.concatenate([est.coef_.ravel(), np.zeros(est.intercept_.size)])
    scale = np.abs(est.C * G).sum(axis=0).max()
    np.testing.assert_allclose(est.C * G.sum(axis=0) + pen, 0.0, atol=1e-6 * scale)
    Gp = gk.per_sample_gradients(est, X_TR, y, include_penalty=True)
    np.testing.assert_allclose(Gp.sum(axis=0), 0.0, atol=1e-6 * scale / est.C)


def test_liblinear_penalises_the_intercept() -> None:
    """liblinear's optimum includes b / s^2: only the documented penalty makes sum_i g = 0."""
    s = 2.0
    for est in (LogisticRegression(C=0.5, solver="liblinear", intercept_scaling=s, tol=1e-10,
                                   max_iter=10_000),
                LinearSVC(C=0.5, dual=False, intercept_scaling=s, tol=1e-10, max_iter=100_000)):
        est.fit(X_TR, Y2_TR)
        G = gk.per_sample_gradients(est, X_TR, Y2_TR, include_penalty=True)
        scale = np.abs(gk.per_sample_gradients(est, X_TR, Y2_TR)).sum(axis=0).max()
        np.testing.assert_allclose(G.sum(axis=0), 0.0, atol=1e-5 * scale)
        b = est.intercept_[0]
        assert abs(b) > 1e-3  # the intercept term is really exercised
        # without the intercept penalty the intercept gradient would be off by b/(C s^2)
        no_b = G[:, -1].sum() - b / (est.C * s ** 2)
        assert abs(no_b) > 100 * 1e-5 * scale


@pytest.mark.parametrize("est,y", [
    (LinearRegression(), YR2_TR), (Ridge(alpha=2.0), YR_TR),
    (Ridge(alpha=np.array([0.5, 4.0])), YR2_TR),
], ids=["linreg", "ridge", "ridge-alphas"])
def test_least_squares_optimum(est: Any, y: np.ndarray) -> None:
    est.fit(X_TR, y)
    G = gk.per_sample_gradients(est, X_TR, y, include_penalty=True)
    np.testing.assert_allclose(G.sum(axis=0), 0.0, atol=1e-9 * np.abs(G).sum(axis=0).max())


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name.startswith("mlp")],
                         ids=lambda s: s.name)
def test_mlp_matches_sklearn_backprop(spec: Spec) -> None:
    """n * (sklearn's own _backprop gradient) == sum_i g_i with the penalty (private API)."""
    est = fitted(spec)
    if not hasattr(est, "_backprop"):
        pytest.skip("sklearn's private MLP _backprop is gone")
    X, y = X_TR, spec.y_tr
    if isinstance(est, MLPClassifier):
        Yb = est._label_binarizer.transform(y)
    else:
        Yb = np.reshape(y, (len(y), -1))
    L = len(est.coefs_)
    cg = [np.empty_like(c) for c in est.coefs_]
    ig = [np.empty_like(b) for b in est.intercepts_]
    _, cg, ig = est._backprop(X, Yb, None, [X] + [None] * L, [None] * L, cg, ig)
    ref = np.concatenate([a.ravel() for pair in zip(cg, ig, strict=True) for a in pair])
    G = gk.per_sample_gradients(est, X, y, include_penalty=True)
    np.testing.assert_allclose(G.sum(axis=0), len(X) * ref, rtol=1e-9,
                               atol=1e-12 * np.abs(ref).max() * len(X))


def test_losses_match_sklearn_metrics() -> None:
    from sklearn.metrics import log_loss

    est = fitted(SPECS[1])
    ell = gk.per_sample_loss(est, X_HO, YS3_HO)
    assert math.isclose(ell.mean(), log_loss(YS3_HO, est.predict_proba(X_HO)), rel_tol=1e-10)


# --------------------------------------------------------------------------------------
# Layout, inputs
# --------------------------------------------------------------------------------------


def test_layouts() -> None:
    named = {s.name: s for s in SPECS}
    assert gk.layout(fitted(named["logreg-binary"])) == [("coef", (1, D)), ("intercept", (1,))]
    assert gk.layout(fitted(named["logreg-nointercept"])) == [("coef", (3, D))]
    assert gk.layout(fitted(named["linreg-1d"])) == [("coef", (D,)), ("intercept", ())]
    assert gk.layout(fitted(named["mlp-tanh-binary"])) == [
        ("coefs_0", (D, 6)), ("intercepts_0", (6,)), ("coefs_1", (6, 3)),
        ("intercepts_1", (3,)), ("coefs_2", (3, 1)), ("intercepts_2", (1,))]
    lay = gk.layout(fitted(named["mlp-relu-multiclass"]), with_layers=True)
    assert [t[2] for t in lay] == ["layer_0", "layer_0", "layer_1", "layer_1"]
    est = fitted(named["linearsvc-sqhinge-ovr"])
    theta = gk.flat_params(est)
    np.testing.assert_array_equal(theta, np.concatenate([est.coef_.ravel(), est.intercept_]))


def test_pipeline_and_sparse_inputs() -> None:
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X_TR, Y3_TR)
    Xt = pipe[:-1].transform(X_HO)
    np.testing.assert_array_equal(gk.per_sample_gradients(pipe, X_HO, Y3_HO),
                                  gk.per_sample_gradients(pipe[-1], Xt, Y3_HO))
    est = fitted(SPECS[0])
    np.testing.assert_allclose(gk.per_sample_gradients(est, sp.csr_matrix(X_HO), Y2_HO),
                               gk.per_sample_gradients(est, X_HO, Y2_HO), rtol=0, atol=0)


def _l1_logreg() -> LogisticRegression:
    """An L1 LogisticRegression in this sklearn's spelling (``penalty`` is gone in 1.10)."""
    if "penalty" in LogisticRegression().get_params() and SKLEARN < (1, 8):
        return LogisticRegression(penalty="l1", solver="saga")
    return LogisticRegression(l1_ratio=1.0, solver="saga")


@pytest.mark.parametrize("call,pattern", [
    (lambda: gk.per_sample_gradients(KNeighborsClassifier().fit(X_TR, Y2_TR), X_HO, Y2_HO),
     r"KNeighborsClassifier is not supported"),
    (lambda: gk.per_sample_gradients(LogisticRegression(), X_HO, Y2_HO), r"not fitted"),
    (lambda: gk.per_sample_gradients(
        LogisticRegression(class_weight="balanced").fit(X_TR, Y2_TR), X_HO, Y2_HO),
     r"class_weight"),
    (lambda: gk.per_sample_gradients(
        _l1_logreg().fit(X_TR, Y2_TR), X_HO, Y2_HO, include_penalty=True), r"L1"),
    (lambda: gk.per_sample_gradients(
        SGDClassifier(penalty="elasticnet", max_iter=5, tol=None).fit(X_TR, Y2_TR), X_HO,
        Y2_HO, include_penalty=True), r"elasticnet"),
    (lambda: gk.per_sample_gradients(
        LinearSVC(multi_class="crammer_singer").fit(X_TR, Y3_TR), X_HO, Y3_HO),
     r"crammer_singer"),
    (lambda: gk.per_sample_gradients(
        SGDClassifier(loss="squared_error", max_iter=5, tol=None).fit(X_TR, Y2_TR), X_HO,
        Y2_HO), r"loss='squared_error'"),
    (lambda: gk.per_sample_gradients(LogisticRegressionCV(Cs=2, cv=2).fit(X_TR, Y2_TR), X_HO,
                                     Y2_HO), r"LogisticRegressionCV"),
    (lambda: gk.per_sample_gradients(fitted(SPECS[0]), X_HO, Y2_HO + 5), r"not in classes_"),
    (lambda: gk.per_sample_gradients(fitted(SPECS[0]), X_HO[:, :2], Y2_HO), r"expected"),
    (lambda: gk.record_trajectory(fitted(SPECS[5]), X_TR, Y3_TR, X_HO, Y3_HO, None, epochs=1),
     r"does not train incrementally"),
    (lambda: gk.probe_osgr(fitted(SPECS[0]), X_HO, Y2_HO, X_HO, Y2_HO, n=3, lr=0.1, k=2),
     r"disjoint"),
    (lambda: gk.probe_osgr(fitted(SPECS[0]), X_TR, Y2_TR, X_HO, Y2_HO, n=30, lr=0.1, k=2),
     r"exceeds pool"),
], ids=["estimator", "unfitted", "class_weight", "l1", "elasticnet", "crammer", "sgd-loss",
        "lrcv", "label", "features", "trajectory", "probe-same-pool", "probe-n"])
def test_unsupported(call: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(AdapterError, match=pattern) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    assert "support" in str(info.value).lower()


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


def test_record_writes_labels_ids_and_attrs(tmp_path) -> None:
    est = fitted(SPECS[1])  # string labels
    path = tmp_path / "rec.h5"
    with gk.open_writer(path, est) as w:
        summary = gk.record(w, est, X_HO, YS3_HO, step=4, split="test", batch_size=7, lr=0.5,
                            epoch=2.0, sample_id=np.arange(100, 100 + len(X_HO)))
    with gs.open_store(path) as store:
        assert store.attrs["framework"] == "sklearn"
        assert list(store.layout.layers) == ["linear", "linear"]
        np.testing.assert_array_equal(store.read_label(4, "test"),
                                      np.searchsorted(est.classes_, YS3_HO))
        np.testing.assert_array_equal(store.read_sample_id(4, "test"),
                                      np.arange(100, 100 + len(X_HO)))
        rec = store.records[0]
        assert (rec.lr, rec.epoch, rec.n_samples) == (0.5, 2.0, len(X_HO))
        ref = gk.per_sample_gradients(est, X_HO, YS3_HO)
        assert_within(store.read_grads(4, "test"), ref, f32_stored_bound(ref), "stored grads")
    assert math.isclose(summary.mean_loss, gk.per_sample_loss(est, X_HO, YS3_HO).mean())


def test_record_penalty_share_is_per_record(tmp_path) -> None:
    est = fitted(SPECS[0])
    path = tmp_path / "pen.h5"
    with gk.open_writer(path, est, dtype="float32") as w:
        gk.record(w, est, X_HO, Y2_HO, step=0, split="train", batch_size=4,
                  include_penalty=True)
    with gs.open_store(path) as store:
        G = store.read_grads(0, "train").astype(np.float64)
    ref = gk.per_sample_gradients(est, X_HO, Y2_HO, include_penalty=True)
    assert_within(G, ref, f32_stored_bound(ref), "stored grads with penalty")


def test_trajectory_sgd(tmp_path) -> None:
    est = SGDClassifier(loss="log_loss", alpha=1e-3, random_state=0)
    path = tmp_path / "traj.h5"
    with gs.GradientWriter(path, [("coef", (3, D)), ("intercept", (3,))]) as w:
        out = gk.record_trajectory(w, est, X_TR, Y3_TR, X_HO, Y3_HO, epochs=3, every=2)
    n = len(X_TR)
    # issue 12: an unfitted estimator is recorded at its initialisation (step 0) too
    np.testing.assert_array_equal(out["epoch"], [0, 1, 2, 3])
    np.testing.assert_array_equal(out["step"], [0, n, 2 * n, 3 * n])
    np.testing.assert_array_equal(out["recorded"], [True, False, True, True])
    assert est.t_ - 1 == 3 * n  # step counts sklearn's own updates
    assert np.all(np.isfinite(out["lr"])) and np.all(np.diff(out["lr"]) < 0)  # 'optimal' decays
    assert math.isclose(out["train_loss"][-1], gk.per_sample_loss(est, X_TR, Y3_TR).mean())
    with gs.open_store(path) as store:
        assert sorted((r.step, r.split) for r in store.records) == [
            (0, "test"), (0, "train"), (2 * n, "test"), (2 * n, "train"), (3 * n, "test"),
            (3 * n, "train")]
        traj = store.trajectory()
        np.testing.assert_array_equal(traj["step"], out["step"])
        np.testing.assert_allclose(traj["test_loss"], out["test_loss"])
        ref = gk.per_sample_gradients(est, X_TR, Y3_TR)
        assert_within(store.read_grads(3 * n, "train"), ref, f32_stored_bound(ref), "stored")


@pytest.mark.parametrize("schedule", ["optimal", "invscaling", "constant"])
def test_sgd_learning_rate_matches_sklearn(schedule: str) -> None:
    """The lr we report is the step sklearn takes: one hinge update from w = 0 is eta*y*x."""
    x, alpha = 0.1 * np.array([[0.5, -1.0, 2.0, 0.3]]), 1e-3
    est = SGDClassifier(loss="hinge", alpha=alpha, learning_rate=schedule, eta0=0.05,
                        power_t=0.5, fit_intercept=False, random_state=0)
    est.partial_fit(np.vstack([x, -x]), [1, 0], classes=[0, 1])  # 2 updates, t_ = 3
    w_before = est.coef_.copy()
    eta = gk._sgd_lr(est, 1)
    z = float(x[0] @ w_before.ravel())
    assert z <= 1  # the hinge is active: the update is eta * y * x, not only the decay
    est.partial_fit(x, [1])
    expected = w_before * (1 - eta * alpha) + eta * x
    np.testing.assert_allclose(est.coef_, expected, rtol=1e-12)


def test_trajectory_mlp_and_logreg(tmp_path) -> None:
    mlp = MLPClassifier(hidden_layer_sizes=(4,), solver="sgd", learning_rate_init=0.1,
                        batch_size=30, random_state=0)
    with gs.GradientWriter(tmp_path / "m.h5", [("coefs_0", (D, 4)), ("intercepts_0", (4,)),
                                               ("coefs_1", (4, 3)), ("intercepts_1", (3,))]) as w:
        with pytest.warns(DeprecationWarning, match="writer comes first"):  # the old order
            out = gk.record_trajectory(mlp, X_TR, Y3_TR, X_HO, Y3_HO, w, epochs=2)
    # ceil(80 / 30) updates per epoch; step 0 is the initialisation (issue 12)
    np.testing.assert_array_equal(out["step"], [0, 3, 6])
    np.testing.assert_allclose(out["lr"], 0.1)

    lr = _fit(LogisticRegression(max_iter=2), X_TR, Y3_TR)
    with gk.open_writer(tmp_path / "l.h5", lr) as w:
        out = gk.record_trajectory(w, lr, X_TR, Y3_TR, X_HO, Y3_HO, epochs=3, every=3)
    np.testing.assert_array_equal(out["epoch"], [0, 1, 2, 3])
    np.testing.assert_array_equal(out["recorded"], [True, False, False, True])
    assert np.all(np.diff(out["step"]) >= 0) and np.all(np.isnan(out["lr"]))
    assert out["train_loss"][-1] < out["train_loss"][0]
    assert (lr.warm_start, lr.max_iter) == (False, 2)  # restored
    with gs.open_store(tmp_path / "l.h5") as store:
        assert len(store.records) == 4


# --------------------------------------------------------------------------------------
# OSGR probe
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["logreg-multinomial", "mlp-tanh-binary", "ridge-1d"])
def test_probe_first_order_limit(name: str) -> None:
    """K = 1 with pools of size n: R -> g_B . g_A / |g_A|^2 as lr -> 0, estimator unchanged."""
    spec = next(s for s in SPECS if s.name == name)
    est = fitted(spec)
    before = copy.deepcopy(est)
    Xa, ya, Xb, yb = X_TR[:23], spec.y_tr[:23], X_HO, spec.y_ho
    gA = gk.per_sample_gradients(est, Xa, ya).mean(axis=0)
    gB = gk.per_sample_gradients(est, Xb, yb).mean(axis=0)
    r1 = float(gB @ gA / (gA @ gA))
    res = gk.probe_osgr(est, Xa, ya, Xb, yb, n=23, lr=1e-6, k=1, rng=0)
    assert math.isclose(res.extra["first_order"], r1, rel_tol=1e-10)
    assert abs(res.ratio - r1) < 1e-3 * max(1.0, abs(r1))
    for a, b in ((est.coef_, before.coef_) if hasattr(est, "coef_") else
                 (est.coefs_[0], before.coefs_[0]),):
        np.testing.assert_array_equal(a, b)
    assert gk.flat_params(est).tobytes() == gk.flat_params(before).tobytes()


def test_probe_rows_written(tmp_path) -> None:
    est = fitted(SPECS[0])
    path = tmp_path / "probe.h5"
    with gk.open_writer(path, est) as w:
        res = gk.probe_osgr(est, X_TR, Y2_TR, X_HO, Y2_HO, n=10, lr=1e-5, k=6, rng=3, writer=w,
                            step=7)
    assert res.k.size == 6 and np.all(res.train_before > res.train_after)
    assert abs(res.ratio - res.extra["first_order"]) < 1e-2 * abs(res.extra["first_order"]) + 1e-3
    with gs.open_store(path) as store:
        rows = store.probes()
    assert rows["step"].tolist() == [7] * 6 and rows["n"].tolist() == [10] * 6
    np.testing.assert_allclose(rows["test_after"], res.test_after)
    # a large step is no longer first order
    big = gk.probe_osgr(est, X_TR, Y2_TR, X_HO, Y2_HO, n=10, lr=50.0, k=6, rng=3)
    assert not math.isclose(big.ratio, res.ratio, rel_tol=1e-3)
