r"""Per-sample gradients of fitted scikit-learn estimators, computed analytically in numpy.

``per_sample_gradients(estimator, X, y)`` returns an ``(n, P)`` float64 array whose row ``i``
is the gradient of sample ``i``'s own loss :math:`\ell_i(\theta)` with respect to the
estimator's flattened parameters, evaluated at the fitted parameters. The sum over rows is
the gradient of :math:`\sum_i \ell_i` (never a mean: DESIGN.md section 1).

Parameter layout (``layout(estimator)``), always in this order:

* linear models: ``"coef"`` with sklearn's ``coef_`` shape (``(1, d)`` for a binary
  classifier, ``(K, d)`` for ``K`` classes or targets, ``(d,)`` for a single-target
  regressor), then ``"intercept"`` with ``intercept_``'s shape when ``fit_intercept`` (``()``
  for a single-target ``LinearRegression``/``Ridge``, ``(1,)`` or ``(K,)`` otherwise);
* MLPs: ``"coefs_0", "intercepts_0", "coefs_1", "intercepts_1", ...`` with the shapes of
  ``coefs_[l]`` ``(fan_in, fan_out)`` and ``intercepts_[l]`` ``(fan_out,)``.

Every tensor is flattened in C order, exactly like ``coef_.ravel()``.

Objectives, per-sample losses and the penalty
----------------------------------------------
``f(x)`` is the decision function (``decision_function`` for linear models, the output
layer's pre-activation ``z`` for MLPs); for a binary or one-vs-rest (OvR) output ``y = +1``
for the positive class (``classes_[1]`` in the binary case, class ``k`` for OvR output
``k``) and ``-1`` otherwise. Each estimator's objective ``J`` is written as
``J = s * (sum_i l_i + Omega)``, ``s`` the loss scaling, ``Omega`` the regularisation
expressed on the scale of the summed loss:

LogisticRegression (``s = C``)
    ``J = C Σ l_i + (1-ρ)/2 |W|² + ρ |W|₁``; liblinear adds ``½ (b/s_b)²``.
    Binary (``coef_`` ``(1, d)``): ``l_i = log(1 + exp(-y f))``, the sigmoid log-loss.
    Multiclass (``coef_`` ``(K, d)``): ``l_i = -log softmax(f)_{y_i}``, cross-entropy.
LinearSVC (``s = C``)
    ``J = C Σ l_i + ½ |W|² + ½ (b/s_b)²`` (``penalty="l1"``: ``|W|₁`` instead of ``½ |W|²``).
    ``hinge``: ``l_i = max(0, 1 - y f)``; ``squared_hinge``: ``l_i = max(0, 1 - y f)²``.
SGDClassifier (``s = 1/n``)
    ``J = (1/n) Σ l_i + α R(W)``, ``R = (1-ρ)/2 |W|² + ρ |W|₁`` (intercept unpenalised).
    ``log_loss`` ``log(1 + exp(-y f))``, ``hinge`` ``max(0, 1 - y f)``, ``perceptron``
    ``max(0, -y f)``, ``squared_hinge`` ``max(0, 1 - y f)²``, ``modified_huber``
    ``(max(0, 1 - y f))²`` for ``y f >= -1`` else ``-4 y f``.
SGDRegressor (``s = 1/n``)
    ``J`` as SGDClassifier. ``squared_error`` ``½ r²``; ``huber`` ``½ r²`` for ``|r| <= ε``
    else ``ε (|r| - ε/2)``; ``epsilon_insensitive`` ``max(0, |r| - ε)``;
    ``squared_epsilon_insensitive`` ``max(0, |r| - ε)²``.
LinearRegression (``s = 1``)
    ``J = Σ_i Σ_k r_ik²``, ``l_i = Σ_k r_ik²`` -- no ½ factor, exactly sklearn's objective.
Ridge (``s = 1``)
    ``J = Σ_i Σ_k r_ik² + Σ_k α_k |W_k|²``, ``l_i = Σ_k r_ik²`` (no ½; intercept unpenalised).
MLPClassifier (``s = 1/n``)
    ``J = (1/n) Σ l_i + α/(2n) Σ_l |coefs_l|²`` (intercepts unpenalised). Logistic output
    (binary, multilabel): ``l_i = -Σ_k [y log p + (1-y) log(1-p)]``; softmax output
    (multiclass): ``l_i = -log p_{y_i}``.
MLPRegressor (``s = 1/n``)
    ``J`` as MLPClassifier. ``squared_error``: ``l_i = ½ Σ_k r_ik²``; ``poisson``
    (``exp`` output): ``l_i = Σ_k (e^z - y z + y log y - y)``.

``r = f - y`` (regression residual), ``W`` the coefficients without the intercept ``b``,
``s_b`` = ``intercept_scaling``, ``ρ`` = ``l1_ratio``. One-vs-rest multiclass models
(``LinearSVC``, ``SGDClassifier``) fit ``K`` separate binary problems; their per-sample loss
here is the **sum over the ``K`` binary losses**, so that ``Σ_i g_i`` is the gradient of the
sum of the ``K`` objectives (each OvR row of ``coef_`` only sees its own binary loss).

Notes on the table:

* liblinear (``LinearSVC``, ``LogisticRegression(solver="liblinear")``) fits the intercept
  as the weight ``b/s_b`` of a synthetic feature of constant value ``s_b`` and
  **penalises it** like any other weight: ``½ (b/s_b)²``.
* ``MLPRegressor`` with several outputs reports ``loss_`` with a mean over outputs, but its
  backprop (and so the fitted weights) follows ``½ Σ_k r_k²``; we use the latter.
  sklearn clips probabilities to ``[eps, 1 - eps]`` in the MLP's reported ``loss_``; we use
  the exact log-likelihood computed from the logits, whose gradient is what sklearn's
  backprop uses.
* Kinks: ``hinge``/``perceptron`` take the slope ``-y`` when ``y f`` equals the threshold
  (sklearn's SGD convention, ``z <= threshold`` is active), ``epsilon_insensitive`` takes
  slope ``0`` at ``|r| = ε`` and ReLU takes ``0`` at ``0`` (sklearn's backprop convention).
  These are subgradients; finite differences only agree away from the kinks.

``include_penalty`` (default ``False``: data term only, ``g_i = ∇ l_i``). With ``True``
each row gets an equal share of the penalty gradient, ``g_i = ∇ l_i + ∇Ω / N``, so that
``Σ_i g_i = ∇(Σ_i l_i + Ω) = ∇J / s`` on a data set of ``N`` samples (``N`` = ``len(X)``,
or ``n_samples=`` when ``X`` is one batch of a larger set; the recorder passes the full
size). Concretely the share is ``(1-ρ) W / (C N)`` (+ ``b / (C s_b² N)`` for liblinear)
for LogisticRegression, ``W / (C N)`` and ``b / (C s_b² N)`` for LinearSVC, ``α W`` for
SGD (``penalty="l2"``), ``2 α W / N`` for Ridge and ``α coefs_l / N`` for MLPs. L1 and
elastic-net penalties are not differentiable at zero: ``include_penalty=True`` with them
raises :class:`~gsnr_stats.errors.AdapterError`.

Not supported (``AdapterError`` says so): other estimators, unfitted estimators,
``class_weight``, ``LinearSVC(multi_class="crammer_singer")``, ``LogisticRegressionCV``.
``sample_weight`` passed to ``fit`` cannot be seen on a fitted estimator: the per-sample
losses here are unweighted. A ``Pipeline`` is accepted when its last step is supported: the
earlier (fitted) steps transform ``X`` and only the last step's parameters are
differentiated.

This module is the public API (layout, gradients, losses, records, trajectories, the
probe); the model families and their maths live in ``adapters/_sklearn_models.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import sklearn
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import (
    LogisticRegression,
    LogisticRegressionCV,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.utils.validation import check_is_fitted

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import ProbeResult, RecordSummary, check_layout_matches, progress_bar, run_probe
from ._moments import JLProjection, ParamSubset
from ._sklearn_models import SUPPORTED, _build, _dense, _prepare, _resolve, _where

__all__ = [
    "SUPPORTED",
    "JLProjection",
    "ParamSubset",
    "flat_params",
    "layout",
    "open_writer",
    "per_sample_gradients",
    "per_sample_loss",
    "probe_osgr",
    "record",
    "record_trajectory",
]


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def layout(estimator: Any, *, with_layers: bool = False) -> list[tuple[Any, ...]]:
    """Parameter tensors of a fitted estimator, in the flat order of the gradients.

    Parameters
    ----------
    estimator : fitted estimator or Pipeline
        One of :data:`SUPPORTED`.
    with_layers : bool
        Return ``(name, shape, layer)`` triples (``"linear"`` for linear models,
        ``"layer_<l>"`` for MLPs) instead of ``(name, shape)`` pairs.

    Returns
    -------
    list of tuple
        ``[("coef", coef_.shape), ("intercept", intercept_.shape)]`` for linear models,
        ``[("coefs_0", ...), ("intercepts_0", ...), ("coefs_1", ...), ...]`` for MLPs.
    """
    final, _ = _resolve(estimator)
    model = _build(final)
    if with_layers:
        return [(n, s, lay) for (n, s), lay in zip(model.layout, model.layers, strict=True)]
    return list(model.layout)


def flat_params(estimator: Any) -> np.ndarray:
    """The fitted parameters flattened in :func:`layout` order, float64, shape ``(P,)``."""
    final, _ = _resolve(estimator)
    return _build(final).theta.copy()


def per_sample_gradients(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    include_penalty: bool = False,
    n_samples: int | None = None,
) -> np.ndarray:
    r"""Gradient of each sample's own loss at the fitted parameters.

    .. math:: g_i = \nabla_\theta\, \ell(y_i, f(x_i; \theta))
              \;\Big[ + \frac{1}{N} \nabla_\theta \Omega(\theta) \Big]

    with :math:`\ell` and :math:`\Omega` the estimator's own loss and penalty on the
    summed-loss scale (module docstring table), so that
    :math:`\sum_i g_i = \nabla (\sum_i \ell_i [+ \Omega])`; no ``1/n`` factor.

    Parameters
    ----------
    estimator : fitted estimator or Pipeline
        One of :data:`SUPPORTED`. Not modified.
    X : array_like or sparse matrix, shape (n, d)
        Inputs (transformed by the Pipeline's earlier steps if a Pipeline).
    y : array_like, shape (n,) or (n, K)
        Labels from ``classes_`` (classifiers), targets (regressors), or the multilabel
        indicator matrix (``MLPClassifier``).
    include_penalty : bool
        Add each sample's share :math:`\nabla\Omega / N` of the regularisation gradient.
        Raises ``AdapterError`` for L1/elastic-net penalties.
    n_samples : int, optional
        ``N`` of the share above: the size of the whole data set when ``X`` is one batch of
        it (default ``len(X)``).

    Returns
    -------
    ndarray, shape (n, P), float64
        Rows in sample order, columns in :func:`layout` order.
    """
    model, Xd, Y = _prepare(estimator, X, y)
    _, G = model.loss_grads(model.theta, Xd, Y)
    if include_penalty:
        G += model.penalty_share(model.theta, Xd.shape[0] if n_samples is None else n_samples)
    return G


def per_sample_loss(estimator: Any, X: Any, y: Any) -> np.ndarray:
    """Each sample's loss :math:`\\ell_i` (the data term of the module table), shape ``(n,)``.

    The mean over a data set is the estimator's mean data loss; for ``LogisticRegression``
    and ``MLPClassifier`` it is ``sklearn.metrics.log_loss`` up to probability clipping.
    """
    model, Xd, Y = _prepare(estimator, X, y)
    return model.loss(model.theta, Xd, Y)


def open_writer(path: Any, estimator: Any, **kwargs: Any) -> Any:
    """A :class:`gsnr_stats.GradientWriter` for ``estimator``'s layout (with layers).

    ``framework="sklearn"``, its version and the estimator's class name and parameters
    (``get_params(deep=False)``, JSON-safe values only) are stored as attributes; ``kwargs``
    go to ``GradientWriter`` (``attrs`` are merged). ``params_subset``, ``project`` and
    ``seed`` (as in :func:`record`) give the writer the subsampled or projected layout.
    """
    from gsnr_stats import GradientWriter

    tf = _moments.make_transform(layout(estimator, with_layers=True),
                                 kwargs.pop("params_subset", None), kwargs.pop("project", None),
                                 kwargs.pop("seed", 0))

    final, _ = _resolve(estimator)
    params = {}
    for k, v in final.get_params(deep=False).items():
        if v is None or isinstance(v, bool | int | float | str):
            params[k] = v
        elif isinstance(v, tuple | list) and all(isinstance(x, int | float | str) for x in v):
            params[k] = list(v)
    attrs = {"framework": "sklearn", "framework_version": sklearn.__version__,
             "estimator": type(final).__name__, "estimator_params": params}
    attrs.update(kwargs.pop("attrs", None) or {})
    return GradientWriter(path, tf.layout, attrs=_moments.writer_attrs(tf, attrs), **kwargs)


def record(
    writer: Any,
    estimator: Any,
    X: Any,
    y: Any,
    *,
    step: int,
    split: str,
    batch_size: int = 1024,
    progress: bool | dict[str, Any] = False,
    lr: float | None = None,
    epoch: float | None = None,
    include_penalty: bool = False,
    sample_id: Any = None,
    keep: str = "grads",
    params_subset: Any = None,
    project: Any = None,
    seed: int = 0,
    block_size: int | None = None,
) -> RecordSummary:
    """Write one complete record ``(step, split)``: gradients, losses, ids and labels.

    Computes :func:`per_sample_gradients` and :func:`per_sample_loss` ``batch_size`` rows at
    a time, ``writer.write``\\ s each batch, then ``writer.end_record(step, split)``.
    Labels are the class index into ``classes_`` (classifiers) or the target (single-target
    regressors); none for multilabel/multi-target ``y``. With ``include_penalty`` the
    penalty share uses ``N = len(X)``, the whole record.

    ``keep="moments"`` writes ``(count, mean, M2)`` blocks (float64, one per batch or per
    ``block_size`` samples) reduced on the fly by the two-pass kernel, instead of the
    gradients (no per-sample losses, ids or labels then). ``params_subset``, ``project``
    and ``seed`` record a seeded parameter subset or JL projections (see
    ``adapters/_moments.py``); the writer must come from :func:`open_writer` with the same.

    Returns
    -------
    RecordSummary
        Step, split, number of samples and mean per-sample loss of the record.
    """
    model, Xd, Y = _prepare(estimator, X, y)
    keep = _moments.check_keep(keep, f"{model.name}: record")
    tf = _moments.make_transform(
        [(n, s, lay) for (n, s), lay in zip(model.layout, model.layers, strict=True)],
        params_subset, project, seed)
    check_layout_matches(writer, [(n, s) for n, s, _ in tf.layout],
                         f"record(step={step}, split={split!r})")
    _moments.check_writer(writer, tf, f"record(step={step}, split={split!r})")
    N = Xd.shape[0]
    if N == 0:
        raise AdapterError(f"{model.name}: record(step={step}, split={split!r}) has no samples")
    if batch_size < 1:
        raise AdapterError(f"batch_size must be >= 1, got {batch_size}")
    labels = model.labels(y)
    ids = None if sample_id is None else np.asarray(sample_id, dtype=np.int64).reshape(-1)
    if ids is not None and ids.size != N:
        raise AdapterError(f"{model.name}: sample_id has {ids.size} values, X has {N} rows")
    share = model.penalty_share(model.theta, N) if include_penalty else None
    bar = progress_bar(progress, N, f"{split} @ step {step}")
    total = 0.0
    mom = (_moments.MomentsBlocks(writer, step, split, sum(math.prod(s) for _, s, _ in tf.layout),
                                  block_size, lr=lr, epoch=epoch, names=tf.layout)
           if keep == "moments" else None)
    try:
        for start in range(0, N, batch_size):
            sl = slice(start, start + batch_size)
            loss, G = model.loss_grads(model.theta, Xd[sl], Y[sl])
            if share is not None:
                G += share
            if tf.active:
                G = tf.apply(G)
            if mom is not None:
                mom.add_samples(G)
            else:
                writer.write(step, split, G, loss=loss,
                             sample_id=None if ids is None else ids[sl],
                             label=None if labels is None else labels[sl], lr=lr, epoch=epoch)
            total += float(loss.sum())
            bar.update(loss.size)
    finally:
        bar.close()
    if mom is not None:
        mom.flush()
    writer.end_record(step, split)
    return RecordSummary(step=int(step), split=split, n_samples=N, mean_loss=total / N,
                         lr=math.nan if lr is None else float(lr),
                         epoch=math.nan if epoch is None else float(epoch))


# -- training trajectories ---------------------------------------------------------------


def _sgd_lr(est: Any, n_updates: int) -> float:
    """Mean per-update learning rate of sklearn's SGD over its next ``n_updates`` updates.

    Mirrors ``sklearn/linear_model/_sgd_fast.pyx``: ``optimal`` uses
    ``eta = 1 / (alpha (t0 + t - 1))`` with ``t0 = 1 / (typw alpha)``,
    ``typw = alpha^(-1/4)`` (every supported loss has a negative slope at the probe point,
    so sklearn's ``initial_eta0 = typw``); ``invscaling`` uses ``eta0 / t^power_t``;
    ``constant``/``adaptive`` use ``eta0`` (partial_fit never adapts it).
    """
    t = float(getattr(est, "t_", 1.0)) + np.arange(max(n_updates, 1))
    sched = est.learning_rate
    if sched == "optimal":
        alpha = float(est.alpha)
        typw = math.sqrt(1.0 / math.sqrt(alpha))
        t0 = 1.0 / (typw * alpha)
        return float(np.mean(1.0 / (alpha * (t0 + t - 1.0))))
    if sched == "invscaling":
        return float(np.mean(float(est.eta0) / t ** float(est.power_t)))
    if sched in ("constant", "adaptive"):
        return float(est.eta0)
    return math.nan


def _classes(classes: Any, y_train: Any, y_test: Any) -> np.ndarray:
    """``classes`` for a first ``partial_fit``: given, indicator columns, or all labels seen."""
    if classes is not None:
        return np.asarray(classes)
    yt = np.asarray(y_train)
    if yt.ndim == 2:  # multilabel indicator matrix
        return np.arange(yt.shape[1])
    return np.unique(np.concatenate([yt, np.asarray(y_test)]))


def _mlp_batches(est: Any, n: int) -> int:
    bs = min(200, n) if est.batch_size == "auto" else int(np.clip(est.batch_size, 1, n))
    return math.ceil(n / bs)


def record_trajectory(
    estimator: Any,
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    writer: Any,
    *,
    epochs: int,
    every: int = 1,
    batch_size: int = 1024,
    lr: float | Callable[[int], float] | None = None,
    include_penalty: bool = False,
    classes: Any = None,
    start_step: int = 0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Train ``epochs`` more epochs, recording gradients every ``every`` epochs.

    Training is incremental: one ``partial_fit`` call per epoch (``SGDClassifier``,
    ``SGDRegressor``, ``MLPClassifier``/``MLPRegressor`` with solver sgd or adam), or one
    L-BFGS/Newton iteration per epoch for ``LogisticRegression`` (``warm_start=True,
    max_iter=1``, restored afterwards; its ``ConvergenceWarning`` is silenced).

    After every epoch ``e`` (and before the first if the estimator is already fitted) one
    trajectory row ``writer.write_trajectory(step, lr, train_loss, test_loss, epoch=e)`` is
    written (mean data losses at θ_step); when ``e % every == 0`` or ``e == epochs`` (and at
    ``e = 0``), full gradient records ``(step, "train")`` and ``(step, "test")`` are written
    through :func:`record`.

    ``step`` counts parameter updates from ``start_step``: ``n`` per epoch for SGD (one
    sample per update), ``ceil(n / batch_size)`` for MLPs, the solver's iterations for
    ``LogisticRegression``. ``lr`` in each row is the per-update learning rate (on the
    gradient of the mean minibatch loss) used by the updates that *follow* θ_step:
    SGD's schedule averaged over the next epoch, the MLP ``sgd`` solver's current rate
    (nominal; with momentum μ the long-run step is about ``lr / (1 - μ)``), NaN for adam
    and L-BFGS (no single rate). Pass ``lr`` (a float or ``epoch -> float``) to override.

    Returns
    -------
    dict of ndarray
        ``epoch``, ``step``, ``lr``, ``train_loss``, ``test_loss``, ``recorded`` (bool: a
        gradient record was written), one entry per row written.
    """
    if epochs < 1 or every < 1:
        raise AdapterError(f"epochs and every must be >= 1, got {epochs}, {every}")
    final, (Xtr, Xte) = _resolve(estimator, X_train, X_test)
    n = len(y_train)
    if isinstance(final, SGDClassifier | SGDRegressor):
        mode = "sgd"
    elif isinstance(final, MLPClassifier | MLPRegressor):
        if final.solver not in ("sgd", "adam"):
            raise AdapterError(
                f"{_where(final)}(solver={final.solver!r}) cannot train incrementally; "
                "supported: solver='sgd' or 'adam'"
            )
        mode = "mlp"
    elif isinstance(final, LogisticRegression) and not isinstance(final, LogisticRegressionCV):
        if final.solver == "liblinear":
            raise AdapterError(
                "LogisticRegression(solver='liblinear') has no warm start; supported: "
                "lbfgs, newton-cg, newton-cholesky, sag, saga"
            )
        mode = "lr"
    else:
        raise AdapterError(
            f"record_trajectory: {_where(final)} does not train incrementally; supported: "
            "SGDClassifier, SGDRegressor, MLPClassifier, MLPRegressor (partial_fit), "
            "LogisticRegression (warm start, not liblinear)"
        )
    def fitted() -> bool:
        try:
            check_is_fitted(final)
        except NotFittedError:
            return False
        return True

    def current_lr(e: int) -> float:
        if lr is not None:
            return float(lr(e)) if callable(lr) else float(lr)
        if mode == "sgd":
            return _sgd_lr(final, n)
        if mode == "mlp" and final.solver == "sgd":
            opt = getattr(final, "_optimizer", None)
            return float(getattr(opt, "learning_rate", final.learning_rate_init))
        return math.nan

    rows: dict[str, list[Any]] = {k: [] for k in
                                  ("epoch", "step", "lr", "train_loss", "test_loss", "recorded")}
    step = int(start_step)

    def checkpoint(e: int, grads: bool) -> None:
        lr_e = current_lr(e)
        if grads:
            kw = dict(batch_size=batch_size, lr=lr_e, epoch=e, include_penalty=include_penalty,
                      progress=progress)
            tr = record(writer, final, Xtr, y_train, step=step, split="train", **kw).mean_loss
            te = record(writer, final, Xte, y_test, step=step, split="test", **kw).mean_loss
        else:
            tr = float(per_sample_loss(final, Xtr, y_train).mean())
            te = float(per_sample_loss(final, Xte, y_test).mean())
        writer.write_trajectory(step, lr_e, tr, te, epoch=e)
        for k, v in zip(rows, (e, step, lr_e, tr, te, grads), strict=True):
            rows[k].append(v)

    if fitted():
        checkpoint(0, True)
    saved = (final.warm_start, final.max_iter) if mode == "lr" else None
    try:
        if mode == "lr":
            final.set_params(warm_start=True, max_iter=1)
        for e in range(1, epochs + 1):
            if mode == "lr":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    final.fit(Xtr, y_train)
                step += int(np.max(final.n_iter_))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    if isinstance(final, SGDClassifier | MLPClassifier) and not fitted():
                        final.partial_fit(Xtr, y_train, classes=_classes(classes, y_train,
                                                                         y_test))
                    else:
                        final.partial_fit(Xtr, y_train)
                step += n if mode == "sgd" else _mlp_batches(final, n)
            checkpoint(e, e % every == 0 or e == epochs)
    finally:
        if saved is not None:
            final.set_params(warm_start=saved[0], max_iter=saved[1])
    return {
        "epoch": np.asarray(rows["epoch"], dtype=np.int64),
        "step": np.asarray(rows["step"], dtype=np.int64),
        "lr": np.asarray(rows["lr"], dtype=np.float64),
        "train_loss": np.asarray(rows["train_loss"], dtype=np.float64),
        "test_loss": np.asarray(rows["test_loss"], dtype=np.float64),
        "recorded": np.asarray(rows["recorded"], dtype=bool),
    }


# -- OSGR probe ----------------------------------------------------------------------------


def probe_osgr(
    estimator: Any,
    X_pool_a: Any,
    y_pool_a: Any,
    X_pool_b: Any,
    y_pool_b: Any,
    *,
    n: int,
    lr: float,
    k: int = 16,
    rng: int | np.random.Generator | None = 0,
    writer: Any = None,
    step: int = 0,
    include_penalty: bool = False,
) -> ProbeResult:
    r"""Measure the one-step generalization ratio with virtual gradient steps.

    For draws :math:`k = 1..K`: :math:`D_k` (``n`` samples of pool A) and :math:`D'_k`
    (``n`` samples of the disjoint pool B), the virtual step
    :math:`\theta' = \theta - \lambda \nabla L[D_k]` on the **mean** data loss
    :math:`L[D] = \frac{1}{n}\sum_{i \in D} \ell_i` (plus the penalty share with
    ``include_penalty``), and

    .. math:: R = \frac{\sum_k L[D'_k](\theta) - L[D'_k](\theta')}
                       {\sum_k L[D_k](\theta) - L[D_k](\theta')}
              \;\xrightarrow{\lambda \to 0}\;
              R_1 = \frac{\sum_k g_{D'_k} \cdot g_{D_k}}{\sum_k |g_{D_k}|^2}

    with :math:`g_D` the mean per-sample gradient over :math:`D`. The estimator is not
    modified (the step is taken on a copy of the flat parameters).

    Parameters
    ----------
    estimator : fitted estimator or Pipeline
        One of :data:`SUPPORTED`.
    X_pool_a, y_pool_a, X_pool_b, y_pool_b : array_like
        The two pools (same distribution, disjoint samples), e.g. held-out train and test.
    n, lr, k : int, float, int
        Draw size (``<=`` each pool's size), virtual learning rate :math:`\lambda`, number
        of draws ``K``.
    rng : int, Generator or None
        Randomness of the draws (default seed 0, reproducible).
    writer : GradientWriter, optional
        Receives one ``write_probe`` row per draw.
    step : int
        Checkpoint stored with the rows.

    Returns
    -------
    ProbeResult
        Per-draw mean losses before/after; ``.ratio`` is :math:`R`;
        ``extra["first_order"]`` is :math:`R_1`, ``extra["dot"]`` and ``extra["sqnorm"]``
        its per-draw terms :math:`g_{D'_k}\cdot g_{D_k}` and :math:`|g_{D_k}|^2`.
    """
    final, (Xa, Xb) = _resolve(estimator, X_pool_a, X_pool_b)
    if X_pool_a is X_pool_b:
        raise AdapterError("probe_osgr: pools A and B are the same array; supported: disjoint "
                           "pools of the same distribution")
    model = _build(final)
    Xa, Xb = _dense(model, Xa), _dense(model, Xb)
    Ya, Yb = model.encode(y_pool_a), model.encode(y_pool_b)
    theta0 = model.theta.copy()
    pools = {"a": (Xa, Ya), "b": (Xb, Yb)}
    draws: dict[str, list[np.ndarray]] = {"a": [], "b": []}

    def mean_grad(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        _, G = model.loss_grads(theta0, X, Y)
        g = G.mean(axis=0)
        if include_penalty:
            g += model.penalty_share(theta0, X.shape[0])
        return g

    def virtual_step(idx: np.ndarray) -> np.ndarray:
        draws["a"].append(idx)
        return theta0 - float(lr) * mean_grad(Xa[idx], Ya[idx])

    def mean_loss(theta: np.ndarray, pool: str, idx: np.ndarray) -> float:
        X, Y = pools[pool]
        if pool == "b" and theta is theta0:  # once per draw: remember D'_k for R_1
            draws["b"].append(idx)
        return float(model.loss(theta, X[idx], Y[idx]).mean())

    res = run_probe(size_a=Xa.shape[0], size_b=Xb.shape[0], n=n, K=k, lr=lr, step=step,
                    seed=rng, mean_loss=mean_loss, virtual_step=virtual_step, theta=theta0,
                    writer=writer)
    dot, sq = [], []
    for ia, ib in zip(draws["a"], draws["b"], strict=True):
        ga, gb = mean_grad(Xa[ia], Ya[ia]), mean_grad(Xb[ib], Yb[ib])
        dot.append(float(gb @ ga))
        sq.append(float(ga @ ga))
    dot_a, sq_a = np.asarray(dot), np.asarray(sq)
    res.extra.update(dot=dot_a, sqnorm=sq_a, first_order=(
        float(dot_a.sum() / sq_a.sum()) if sq_a.sum() > 0 else math.nan))
    return res
