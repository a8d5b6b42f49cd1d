"""The model families behind ``adapters/sklearn.py``: fitted estimator -> pure numpy maths.

Owns what the public module only calls: the per-sample losses as functions of the margin or
residual, the ``_Model`` families (``_Linear``: linear models with margin, multinomial or
residual losses; ``_MLP``: multilayer perceptrons, backprop per sample) with their loss,
per-sample gradients and penalty at any flat ``theta``, and the translation of a fitted
estimator (or a ``Pipeline``'s last step) into one of them (``_build``, ``_resolve``,
``_prepare``). The objectives and conventions implemented here are tabled in the docstring
of ``adapters/sklearn.py``. Imports no other adapter module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import expit, logsumexp, softmax, xlogy
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    LogisticRegressionCV,
    Ridge,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted

from gsnr_stats.errors import AdapterError

SUPPORTED: tuple[str, ...] = (
    "LogisticRegression (binary sigmoid or multinomial softmax; any solver)",
    "LinearSVC (hinge, squared_hinge; binary or one-vs-rest)",
    "SGDClassifier (log_loss, hinge, modified_huber, squared_hinge, perceptron)",
    "SGDRegressor (squared_error, huber, epsilon_insensitive, squared_epsilon_insensitive)",
    "LinearRegression",
    "Ridge",
    "MLPClassifier (log_loss; activation relu, tanh, logistic, identity)",
    "MLPRegressor (squared_error, poisson)",
    "Pipeline ending in one of these (earlier steps only transform X)",
)

_SUPPORTED_MSG = "supported estimators: " + "; ".join(SUPPORTED)

Layout = list[tuple[str, tuple[int, ...]]]

# --------------------------------------------------------------------------------------
# Losses as functions of the margin z = y * f (classification) or residual r = f - y
# --------------------------------------------------------------------------------------


def _log_margin(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # log(1 + exp(-z)) without overflow; d/dz = -sigmoid(-z)
    return np.logaddexp(0.0, -z), -expit(-z)


def _hinge_margin(threshold: float) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def f(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        active = z <= threshold  # sklearn's SGD convention at the kink
        return np.where(active, threshold - z, 0.0), np.where(active, -1.0, 0.0)

    return f


def _squared_hinge_margin(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.maximum(0.0, 1.0 - z)
    return m * m, -2.0 * m


def _modified_huber_margin(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    quad = z >= -1.0
    m = np.maximum(0.0, 1.0 - z)
    return np.where(quad, m * m, -4.0 * z), np.where(quad, -2.0 * m, -4.0)


_MARGIN_LOSSES: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "log_loss": _log_margin,
    "hinge": _hinge_margin(1.0),
    "perceptron": _hinge_margin(0.0),
    "squared_hinge": _squared_hinge_margin,
    "modified_huber": _modified_huber_margin,
}


def _residual_loss(name: str, eps: float) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loss of the residual ``r = f - y`` and its derivative ``dl/dr``."""
    if name == "squared":  # LinearRegression / Ridge: sklearn's objective has no 1/2
        return lambda r: (r * r, 2.0 * r)
    if name == "squared_error":  # SGDRegressor: half squared error
        return lambda r: (0.5 * r * r, r)
    if name == "huber":
        def huber(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            a = np.abs(r)
            small = a <= eps
            return (np.where(small, 0.5 * r * r, eps * (a - 0.5 * eps)),
                    np.where(small, r, eps * np.sign(r)))
        return huber
    if name == "epsilon_insensitive":
        def eps_ins(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            m = np.abs(r) - eps
            return np.maximum(m, 0.0), np.where(m > 0, np.sign(r), 0.0)
        return eps_ins
    if name == "squared_epsilon_insensitive":
        def sq_eps_ins(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            m = np.maximum(np.abs(r) - eps, 0.0)
            return m * m, 2.0 * np.sign(r) * m
        return sq_eps_ins
    raise AssertionError(name)  # pragma: no cover


# --------------------------------------------------------------------------------------
# Models: parameters, loss and per-sample gradients at an arbitrary flat theta
# --------------------------------------------------------------------------------------


def _where(est: Any) -> str:
    return type(est).__name__


class _Model:
    """An estimator's objective as pure functions of a flat parameter vector ``theta``."""

    name: str
    layout: Layout
    layers: list[str]
    theta: np.ndarray
    n_features: int
    classes: np.ndarray | None
    # penalty: Omega = 1/2 sum a_w |W|^2 + 1/2 a_b |b|^2 (times N when per_n); l1 -> error
    pen_w: Any = 0.0
    pen_b: float = 0.0
    pen_per_n: bool = False
    pen_nonsmooth: str | None = None

    # -- targets ---------------------------------------------------------------------

    def _class_index(self, y: Any) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1:
            raise AdapterError(
                f"{self.name}: y must be 1-D class labels, got shape {y.shape}; supported: "
                "1-D labels from classes_ (multilabel indicators only for MLPClassifier)"
            )
        classes = self.classes
        assert classes is not None
        try:
            idx = np.clip(np.searchsorted(classes, y), 0, classes.size - 1)
            bad = np.asarray(classes[idx] != y, dtype=bool)
        except (TypeError, ValueError):  # e.g. integer labels for string classes
            raise AdapterError(
                f"{self.name}: labels of dtype {y.dtype} cannot be compared with classes_ "
                f"{classes.tolist()}; supported: labels the estimator was fitted on"
            ) from None
        if np.any(bad):
            raise AdapterError(
                f"{self.name}: labels {np.unique(y[bad])[:5].tolist()} are not in classes_ "
                f"{classes.tolist()}; supported: labels the estimator was fitted on"
            )
        return idx

    def encode(self, y: Any) -> np.ndarray:
        raise NotImplementedError

    def labels(self, y: Any) -> np.ndarray | None:
        """What the recorder stores as labels: class index, or the target if 1-D."""
        if self.classes is not None:
            y = np.asarray(y)
            return self._class_index(y).astype(np.float64) if y.ndim == 1 else None
        y = np.asarray(y, dtype=np.float64)
        return y if y.ndim == 1 else None

    # -- maths -----------------------------------------------------------------------

    def loss(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def loss_grads(self, theta: np.ndarray, X: np.ndarray,
                   Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _weight_mask(self) -> np.ndarray:
        raise NotImplementedError

    # -- factored records ------------------------------------------------------------

    def factorable(self) -> list[tuple[str, str | None]]:
        """``(weight, tied bias or None)`` of every 2-D tensor whose per-sample gradient is
        one outer product :math:`g_i = \\delta_i a_i^\\top` (``docs/format.md``, factored
        records); a tied bias's per-sample gradient is that :math:`\\delta_i`."""
        raise NotImplementedError

    def _parts(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray
               ) -> tuple[np.ndarray, dict[str, Any]]:
        """Per-sample loss and each tensor's per-sample gradient: ``(left (n, r), right
        (n, c))`` for an ``(r, c)`` outer product ``left_i right_i^T``, else a block
        ``(n, size)``."""
        raise NotImplementedError

    def loss_factors(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray,
                     factored: set[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Per-sample loss ``(n,)``, plain gradients ``(n, P_plain)`` of the tensors not in
        ``factored`` (neither a factored weight nor its tied bias; layout order) and
        ``{weight: (A (n, in), D (n, out))}`` of the factored ones: for an ``(out, in)``
        weight :math:`g_i = D_i A_i^\\top`."""
        loss, parts = self._parts(theta, X, Y)
        tied = {b for w, b in self.factorable() if w in factored and b is not None}
        n = X.shape[0]
        plain, facs = [], {}
        for name, _ in self.layout:
            v = parts[name]
            if name in factored:
                facs[name] = (v[1], v[0])
            elif name not in tied:
                plain.append((v[0][:, :, None] * v[1][:, None, :]).reshape(n, -1)
                             if isinstance(v, tuple) else v)
        G = np.concatenate(plain, axis=1) if plain else np.empty((n, 0))
        return loss, G, facs

    def penalty_share(self, theta: np.ndarray, n_total: int) -> np.ndarray:
        """``∇Ω / N``: each sample's share of the penalty gradient, shape (P,)."""
        if self.pen_nonsmooth:
            raise AdapterError(
                f"{self.name}: include_penalty=True with {self.pen_nonsmooth}: the L1 term is "
                "not differentiable; supported: L2 penalties (or include_penalty=False)"
            )
        if n_total < 1:
            raise AdapterError(f"{self.name}: n_samples must be >= 1, got {n_total}")
        return self._penalty_grad(theta) * ((n_total if self.pen_per_n else 1) / n_total)

    def _penalty_grad(self, theta: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _Linear(_Model):
    """``f = X W^T + b`` with a margin, multinomial or residual loss."""

    def __init__(self, est: Any, *, kind: str, loss: str, classes: np.ndarray | None,
                 fit_intercept: bool, eps: float = 0.0) -> None:
        self.name = _where(est)
        coef = np.asarray(est.coef_, dtype=np.float64)
        self.coef_shape = tuple(coef.shape)
        self.K = 1 if coef.ndim == 1 else coef.shape[0]
        self.n_features = coef.shape[-1]
        self.fit_intercept = bool(fit_intercept)
        parts = [coef.ravel()]
        self.layout = [("coef", self.coef_shape)]
        if self.fit_intercept:
            b = np.asarray(est.intercept_, dtype=np.float64)
            self.intercept_shape = tuple(b.shape)
            self.layout.append(("intercept", self.intercept_shape))
            parts.append(b.ravel())
        self.layers = ["linear"] * len(self.layout)
        self.theta = np.concatenate(parts)
        self.kind = kind
        self.loss_name = loss
        self.classes = classes
        if kind == "margin":
            self._fn = _MARGIN_LOSSES[loss]
        elif kind == "regression":
            self._fn = _residual_loss(loss, eps)
        self.n_out_1d = coef.ndim == 1

    def _wb(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kd = self.K * self.n_features
        W = theta[:kd].reshape(self.K, self.n_features)
        b = theta[kd:kd + self.K] if self.fit_intercept else np.zeros(self.K)
        return W, b

    def encode(self, y: Any) -> np.ndarray:
        if self.kind == "multinomial":
            return self._class_index(y)
        if self.kind == "margin":
            idx = self._class_index(y)
            if self.K == 1:  # binary: classes_[1] is the positive class
                return np.where(idx == 1, 1.0, -1.0)[:, None]
            Y = -np.ones((idx.size, self.K))
            Y[np.arange(idx.size), idx] = 1.0
            return Y
        Y = np.asarray(y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2 or Y.shape[1] != self.K:
            raise AdapterError(
                f"{self.name}: y has shape {np.shape(y)}, the estimator has {self.K} target(s); "
                "supported: y shaped like the targets it was fitted on"
            )
        return Y

    def _pieces(self, theta: np.ndarray, X: np.ndarray,
                Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample loss (n,) and dl/df (n, K)."""
        W, b = self._wb(theta)
        F = X @ W.T + b
        if self.kind == "multinomial":
            n = F.shape[0]
            loss = logsumexp(F, axis=1) - F[np.arange(n), Y]
            D = softmax(F, axis=1)
            D[np.arange(n), Y] -= 1.0
            return loss, D
        if self.kind == "margin":
            ell, dz = self._fn(Y * F)
            return ell.sum(axis=1), Y * dz
        ell, dr = self._fn(F - Y)
        return ell.sum(axis=1), dr

    def loss(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return self._pieces(theta, X, Y)[0]

    def loss_grads(self, theta: np.ndarray, X: np.ndarray,
                   Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loss, D = self._pieces(theta, X, Y)
        n, K, d = X.shape[0], self.K, self.n_features
        G = np.empty((n, theta.size))
        # coef_ (K, d) flattened row-major: g[k*d + j] = dl/df_k * x_j
        G[:, :K * d] = (D[:, :, None] * X[:, None, :]).reshape(n, K * d)
        if self.fit_intercept:
            G[:, K * d:] = D
        return loss, G

    def factorable(self) -> list[tuple[str, str | None]]:
        if len(self.coef_shape) != 2:  # a 1-D coef_ (single-target regressor) is no matrix
            return []
        return [("coef", "intercept" if self.fit_intercept else None)]

    def _parts(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray
               ) -> tuple[np.ndarray, dict[str, Any]]:
        loss, D = self._pieces(theta, X, Y)
        out: dict[str, Any] = {"coef": (D, X)}  # coef_ (K, d): g = dl/df x^T
        if self.fit_intercept:
            out["intercept"] = D
        return loss, out

    def _penalty_grad(self, theta: np.ndarray) -> np.ndarray:
        W, b = self._wb(theta)
        out = np.zeros_like(theta)
        kd = self.K * self.n_features
        out[:kd] = (np.broadcast_to(np.asarray(self.pen_w, dtype=np.float64).reshape(-1, 1),
                                    (self.K, 1)) * W).ravel()
        if self.fit_intercept:
            out[kd:] = self.pen_b * b
        return out


_HIDDEN = {
    "identity": (lambda z: z, lambda a: np.ones_like(a)),
    "logistic": (expit, lambda a: a * (1.0 - a)),
    "tanh": (np.tanh, lambda a: 1.0 - a * a),
    "relu": (lambda z: np.maximum(z, 0.0), lambda a: (a > 0).astype(a.dtype)),
}


class _MLP(_Model):
    """sklearn's MLP forward pass and backprop, kept per sample."""

    def __init__(self, est: Any, *, classes: np.ndarray | None) -> None:
        self.name = _where(est)
        if est.activation not in _HIDDEN:
            raise AdapterError(
                f"{self.name}: activation {est.activation!r} is not supported; supported: "
                f"{sorted(_HIDDEN)}"
            )
        self.act, self.dact = _HIDDEN[est.activation]
        self.out = est.out_activation_
        if self.out not in ("logistic", "softmax", "identity", "exp"):
            raise AdapterError(
                f"{self.name}: output activation {self.out!r} is not supported; supported: "
                "logistic, softmax (log_loss), identity (squared_error), exp (poisson)"
            )
        self.classes = classes
        self.multilabel = self.out == "logistic" and int(est.n_outputs_) > 1
        coefs = [np.asarray(c, dtype=np.float64) for c in est.coefs_]
        ints = [np.asarray(b, dtype=np.float64) for b in est.intercepts_]
        self.n_features = coefs[0].shape[0]
        self.layout, self.layers, parts = [], [], []
        self.slices: list[tuple[slice, tuple[int, ...], slice, tuple[int, ...]]] = []
        off = 0
        for i, (c, b) in enumerate(zip(coefs, ints, strict=True)):
            self.layout += [(f"coefs_{i}", tuple(c.shape)), (f"intercepts_{i}", tuple(b.shape))]
            self.layers += [f"layer_{i}", f"layer_{i}"]
            sc = slice(off, off + c.size)
            sb = slice(off + c.size, off + c.size + b.size)
            self.slices.append((sc, tuple(c.shape), sb, tuple(b.shape)))
            off = sb.stop
            parts += [c.ravel(), b.ravel()]
        self.theta = np.concatenate(parts)
        self.n_out = coefs[-1].shape[1]
        self.pen_w = float(est.alpha)

    def encode(self, y: Any) -> np.ndarray:
        if self.classes is None:
            Y = np.asarray(y, dtype=np.float64)
            if Y.ndim == 1:
                Y = Y[:, None]
            if Y.ndim != 2 or Y.shape[1] != self.n_out:
                raise AdapterError(
                    f"{self.name}: y has shape {np.shape(y)}, the network has {self.n_out} "
                    "output(s); supported: y shaped like the targets it was fitted on"
                )
            if self.out == "exp" and np.any(Y < 0):
                raise AdapterError(f"{self.name}: poisson loss needs y >= 0")
            return Y
        if self.multilabel:
            Y = np.asarray(y, dtype=np.float64)
            if Y.shape[1:] != (self.n_out,) or not np.all((Y == 0) | (Y == 1)):
                raise AdapterError(
                    f"{self.name}: multilabel y must be a 0/1 indicator matrix with "
                    f"{self.n_out} columns; supported: the indicator format it was fitted on"
                )
            return Y
        idx = self._class_index(y)
        if self.out == "logistic":  # binary: one output unit, classes_[1] positive
            return (idx == 1).astype(np.float64)[:, None]
        Y = np.zeros((idx.size, self.n_out))
        Y[np.arange(idx.size), idx] = 1.0
        return Y

    def labels(self, y: Any) -> np.ndarray | None:
        if self.multilabel:
            return None
        return super().labels(y)

    def _unpack(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(theta[sc].reshape(shc), theta[sb].reshape(shb))
                for sc, shc, sb, shb in self.slices]

    def _forward(self, theta: np.ndarray, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        acts = [X]
        params = self._unpack(theta)
        for i, (W, b) in enumerate(params):
            z = acts[-1] @ W + b
            if i < len(params) - 1:
                acts.append(self.act(z))
            else:
                return acts, z
        raise AssertionError  # pragma: no cover

    def _out(self, z: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample loss (n,) and dl/dz of the output pre-activation (canonical links)."""
        if self.out == "logistic":
            return (np.logaddexp(0.0, z) - Y * z).sum(axis=1), expit(z) - Y
        if self.out == "softmax":
            return logsumexp(z, axis=1) - (Y * z).sum(axis=1), softmax(z, axis=1) - Y
        if self.out == "identity":
            r = z - Y
            return 0.5 * (r * r).sum(axis=1), r
        ez = np.exp(z)  # poisson deviance / 2 with sklearn's constant terms
        return (ez - Y * z + xlogy(Y, Y) - Y).sum(axis=1), ez - Y

    def loss(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        _, z = self._forward(theta, X)
        return self._out(z, Y)[0]

    def loss_grads(self, theta: np.ndarray, X: np.ndarray,
                   Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acts, z = self._forward(theta, X)
        loss, delta = self._out(z, Y)
        n = X.shape[0]
        G = np.empty((n, theta.size))
        params = self._unpack(theta)
        for i in range(len(params) - 1, -1, -1):
            sc, _, sb, _ = self.slices[i]
            a = acts[i]
            G[:, sc] = (a[:, :, None] * delta[:, None, :]).reshape(n, -1)
            G[:, sb] = delta
            if i > 0:
                delta = (delta @ params[i][0].T) * self.dact(a)
        return loss, G

    def factorable(self) -> list[tuple[str, str | None]]:
        # coefs_l is (in, out): g = a delta^T, the factor's "out" side is the layer's input,
        # so intercepts_l (the delta side) cannot be the factor's bias and stays plain
        return [(f"coefs_{i}", None) for i in range(len(self.slices))]

    def _parts(self, theta: np.ndarray, X: np.ndarray, Y: np.ndarray
               ) -> tuple[np.ndarray, dict[str, Any]]:
        acts, z = self._forward(theta, X)
        loss, delta = self._out(z, Y)
        params = self._unpack(theta)
        out: dict[str, Any] = {}
        for i in range(len(params) - 1, -1, -1):
            out[f"coefs_{i}"] = (acts[i], delta)
            out[f"intercepts_{i}"] = delta
            if i > 0:
                delta = (delta @ params[i][0].T) * self.dact(acts[i])
        return loss, out

    def _penalty_grad(self, theta: np.ndarray) -> np.ndarray:
        out = np.zeros_like(theta)
        for sc, _, _, _ in self.slices:
            out[sc] = self.pen_w * theta[sc]
        return out


# --------------------------------------------------------------------------------------
# Estimator -> model
# --------------------------------------------------------------------------------------


def _reject(est: Any, what: str) -> AdapterError:
    return AdapterError(f"{_where(est)}: {what} is not supported; {_SUPPORTED_MSG}")


def _check_fitted(est: Any) -> None:
    try:
        check_is_fitted(est)
    except NotFittedError:
        raise AdapterError(
            f"{_where(est)} is not fitted; per-sample gradients need fitted parameters "
            f"(call fit or partial_fit first). {_SUPPORTED_MSG}"
        ) from None


def _no_class_weight(est: Any) -> None:
    if getattr(est, "class_weight", None) is not None:
        raise _reject(est, f"class_weight={est.class_weight!r} (weighted losses)")


def _logreg_l2(est: Any) -> tuple[float, float]:
    """(l2 strength on the summed-loss scale, l1 ratio) of a LogisticRegression."""
    C = float(est.C)
    pen = getattr(est, "penalty", "l2")
    l1r = getattr(est, "l1_ratio", None)
    if pen == "deprecated":  # sklearn >= 1.8: l1_ratio and C=inf define the penalty
        if not math.isfinite(C):
            return 0.0, 0.0
        l1r = 0.0 if l1r is None else float(l1r)
        return (1.0 - l1r) / C, l1r
    if pen is None or pen == "none":
        return 0.0, 0.0
    if pen == "l2":
        return 1.0 / C, 0.0
    if pen == "l1":
        return 0.0, 1.0
    l1r = float(l1r or 0.0)  # elasticnet
    return (1.0 - l1r) / C, l1r


def _build(estimator: Any) -> _Model:
    """The model of a fitted supported estimator (not a Pipeline)."""
    est = estimator
    if isinstance(est, LogisticRegressionCV):
        raise _reject(est, "LogisticRegressionCV (refit it as LogisticRegression(C=C_))")
    supported = (LogisticRegression, LinearSVC, SGDClassifier, SGDRegressor, LinearRegression,
                 Ridge, MLPClassifier, MLPRegressor)
    if not isinstance(est, supported):
        raise AdapterError(f"{_where(est)} is not supported; {_SUPPORTED_MSG}")
    _check_fitted(est)

    if isinstance(est, LogisticRegression):
        _no_class_weight(est)
        classes = np.asarray(est.classes_)
        K = np.asarray(est.coef_).shape[0]
        ovr = (getattr(est, "multi_class", "auto") == "ovr"
               or (est.solver == "liblinear" and classes.size > 2))
        if K == 1 or ovr:
            m: _Model = _Linear(est, kind="margin", loss="log_loss", classes=classes,
                                fit_intercept=est.fit_intercept)
        else:
            m = _Linear(est, kind="multinomial", loss="log_loss", classes=classes,
                        fit_intercept=est.fit_intercept)
        a, l1r = _logreg_l2(est)
        m.pen_w = a
        if est.solver == "liblinear" and est.fit_intercept:
            m.pen_b = (1.0 / float(est.C)) / float(est.intercept_scaling) ** 2
        if l1r > 0 and math.isfinite(float(est.C)):
            m.pen_nonsmooth = f"an L1 penalty (l1_ratio={l1r})"
        return m

    if isinstance(est, LinearSVC):
        _no_class_weight(est)
        if est.multi_class != "ovr":
            raise _reject(est, f"multi_class={est.multi_class!r}")
        if est.loss not in ("hinge", "squared_hinge"):
            raise _reject(est, f"loss={est.loss!r}")
        m = _Linear(est, kind="margin", loss=est.loss, classes=np.asarray(est.classes_),
                    fit_intercept=est.fit_intercept)
        C = float(est.C)
        if est.penalty == "l1":
            m.pen_nonsmooth = "penalty='l1'"
        else:
            m.pen_w = 1.0 / C
        if est.fit_intercept:  # liblinear penalises the synthetic intercept feature
            m.pen_b = (1.0 / C) / float(est.intercept_scaling) ** 2
        return m

    if isinstance(est, SGDClassifier | SGDRegressor):
        is_clf = isinstance(est, SGDClassifier)
        if is_clf:
            _no_class_weight(est)
            if est.loss not in _MARGIN_LOSSES:
                raise _reject(est, f"loss={est.loss!r}")
            m = _Linear(est, kind="margin", loss=est.loss, classes=np.asarray(est.classes_),
                        fit_intercept=est.fit_intercept)
        else:
            losses = ("squared_error", "huber", "epsilon_insensitive",
                      "squared_epsilon_insensitive")
            if est.loss not in losses:
                raise _reject(est, f"loss={est.loss!r}")
            m = _Linear(est, kind="regression", loss=est.loss, classes=None,
                        fit_intercept=est.fit_intercept, eps=float(est.epsilon))
        alpha = float(est.alpha)
        l1r = {"l2": 0.0, "l1": 1.0, None: 0.0}.get(est.penalty, float(est.l1_ratio))
        m.pen_w = 0.0 if est.penalty is None else alpha * (1.0 - l1r)
        m.pen_per_n = True  # Omega = N * alpha * R(W) on the summed-loss scale
        if est.penalty is not None and l1r > 0:
            m.pen_nonsmooth = f"penalty={est.penalty!r}"
        return m

    if isinstance(est, LinearRegression | Ridge):
        m = _Linear(est, kind="regression", loss="squared", classes=None,
                    fit_intercept=est.fit_intercept)
        if isinstance(est, Ridge):
            alpha = np.asarray(est.alpha, dtype=np.float64).ravel()
            m.pen_w = 2.0 * (alpha if alpha.size > 1 else float(alpha[0]))
        return m

    if isinstance(est, MLPClassifier):
        if getattr(est, "loss", "log_loss") != "log_loss":
            raise _reject(est, f"loss={est.loss!r}")
        return _MLP(est, classes=np.asarray(est.classes_))
    return _MLP(est, classes=None)


def _resolve(estimator: Any, *Xs: Any) -> tuple[Any, list[Any]]:
    """Final estimator of a Pipeline and the inputs transformed by its earlier steps."""
    if isinstance(estimator, Pipeline):
        final = estimator.steps[-1][1]
        if final is None or final == "passthrough":
            raise AdapterError(f"Pipeline without a final estimator; {_SUPPORTED_MSG}")
        prefix = estimator[:-1]
        try:
            Xs = tuple(prefix.transform(X) if len(prefix.steps) else X for X in Xs)
        except NotFittedError:
            raise AdapterError(
                f"Pipeline ending in {_where(final)} is not fitted; {_SUPPORTED_MSG}"
            ) from None
        return final, list(Xs)
    return estimator, list(Xs)


def _dense(model: _Model, X: Any) -> np.ndarray:
    if hasattr(X, "toarray"):  # scipy.sparse: gradients are dense anyway
        X = X.toarray()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != model.n_features:
        raise AdapterError(
            f"{model.name}: X has shape {X.shape}, expected (n, {model.n_features}); "
            "supported: 2-D arrays with the fitted number of features"
        )
    return X


def _prepare(estimator: Any, X: Any, y: Any) -> tuple[_Model, np.ndarray, np.ndarray]:
    final, (Xt,) = _resolve(estimator, X)
    model = _build(final)
    Xd = _dense(model, Xt)
    Y = model.encode(y)
    if len(Y) != Xd.shape[0]:
        raise AdapterError(
            f"{model.name}: X has {Xd.shape[0]} rows, y has {len(Y)}; supported: one target "
            "per row"
        )
    return model, Xd, Y
