r"""Per-sample gradients of fitted scikit-learn estimators, computed analytically in numpy.

``per_sample_gradients(estimator, X, y)`` returns an ``(n, P)`` float64 array whose row ``i``
is the gradient of sample ``i``'s own loss :math:`\ell_i(\theta)` with respect to the
estimator's flattened parameters, evaluated at the fitted parameters. The sum over rows is
the gradient of :math:`\sum_i \ell_i` (never a mean: ``docs/theory.md``).

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

Not supported (``AdapterError`` says so): other estimators, unfitted estimators (except in
:func:`record_trajectory`, which fits them, and :func:`open_writer` given the data),
``class_weight``, ``LinearSVC(multi_class="crammer_singer")``, ``LogisticRegressionCV``.
``sample_weight`` passed to ``fit`` cannot be seen on a fitted estimator: the per-sample
losses here are unweighted. A ``Pipeline`` is accepted when its last step is supported: the
earlier (fitted) steps transform ``X`` and only the last step's parameters are
differentiated.

This module is the public API (layout, gradients, losses, records, trajectories, the
probe); the :class:`Recorder` and the trajectory driver live in
``adapters/_sklearn_record.py``, the model families and their maths in
``adapters/_sklearn_models.py``. ``docs/adapters.md`` shows the calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import sklearn

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import ProbeResult, RecordSummary, run_probe
from ._moments import JLProjection, ParamSubset
from ._sklearn_models import SUPPORTED, _build, _dense, _prepare, _resolve
from ._sklearn_record import (
    Recorder,
    factor_specs,
    initialised,
    is_fitted,
    sgd_lr,
    trajectory_args,
)
from ._sklearn_record import record_trajectory as _record_trajectory

__all__ = [
    "SUPPORTED",
    "JLProjection",
    "ParamSubset",
    "Recorder",
    "flat_params",
    "layout",
    "open_writer",
    "per_sample_factors",
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


def per_sample_factors(estimator: Any, X: Any, y: Any, *, factors: Any = "auto",
                       ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    r"""Per-sample gradients with the outer-product tensors as their exact factors.

    A linear model's ``coef_`` ``(K, d)``: :math:`g_i = \delta_i x_i^\top` with
    :math:`\delta_i = \partial \ell_i / \partial f_i` (multinomial: :math:`p_i - y_i`),
    its intercept :math:`\delta_i` (tied). An MLP's ``coefs_l`` ``(in, out)``:
    :math:`g_i = a_{il} \delta_{il}^\top` (layer input times output-gradient; factor
    ``A = δ``, ``D = a``), intercepts plain. No penalty share (it is no outer product).

    Parameters
    ----------
    estimator, X, y :
        As in :func:`per_sample_gradients`.
    factors : "auto", True or list
        Which tensors (``_sklearn_record.factor_specs``): ``"auto"`` those with fewer
        factor numbers than gradient numbers, ``True`` every factorable one.

    Returns
    -------
    plain : ndarray (n, P_plain), float64
        The other tensors' per-sample gradients, layout order.
    factors : dict name -> (A (n, in), D (n, out)), float64
        For an ``(out, in)`` tensor, :math:`g_i = D_i A_i^\top`.
    """
    model, Xd, Y = _prepare(estimator, X, y)
    specs = factor_specs(model, factors, "sklearn per_sample_factors")
    _, G, facs = model.loss_factors(model.theta, Xd, Y, {w for w, _, _ in specs})
    return G, facs


def per_sample_loss(estimator: Any, X: Any, y: Any) -> np.ndarray:
    """Each sample's loss :math:`\\ell_i` (the data term of the module table), shape ``(n,)``.

    The mean over a data set is the estimator's mean data loss; for ``LogisticRegression``
    and ``MLPClassifier`` it is ``sklearn.metrics.log_loss`` up to probability clipping.
    """
    model, Xd, Y = _prepare(estimator, X, y)
    return model.loss(model.theta, Xd, Y)


def open_writer(path: Any, estimator: Any, *, X: Any = None, y: Any = None,
                classes: Any = None, **kwargs: Any) -> Any:
    """A :class:`gsnr_stats.GradientWriter` for ``estimator``'s layout (with layers).

    ``framework="sklearn"``, its version and the estimator's class name and parameters
    (``get_params(deep=False)``, JSON-safe values only) are stored as attributes; ``kwargs``
    go to ``GradientWriter`` (``attrs`` are merged). ``params_subset``, ``project`` and
    ``seed`` (as in :func:`record`) give the writer the subsampled or projected layout.

    ``factors`` (``"auto"``, ``True`` or a list of tensor names, see
    :func:`per_sample_factors`) opens a factored store for ``Recorder(..., keep="factors")``
    (factors stored in float64 unless ``factor_dtype="float32"``).

    An unfitted estimator has no parameters yet: pass the training data ``X``, ``y`` (and
    ``classes`` if ``y`` lacks some) and the layout is that of its initialisation, as
    :func:`record_trajectory` will fit it (the estimator itself is not touched).
    """
    from gsnr_stats import GradientWriter

    if X is not None and y is not None and not is_fitted(estimator):
        final, (Xt,) = _resolve(estimator, X)
        final = initialised(final, Xt, y, classes)
    else:
        final = _resolve(estimator)[0]
    tf = _moments.make_transform(layout(final, with_layers=True),
                                 kwargs.pop("params_subset", None), kwargs.pop("project", None),
                                 kwargs.pop("seed", 0))
    factors = kwargs.pop("factors", None)
    if factors is not None:  # a factored store (docs/adapters.md, "Factored records")
        import gsnr_stats as gs

        if tf.active:
            raise AdapterError("sklearn open_writer: factors= stores whole tensors' factors; "
                               "params_subset/project do not apply")
        kwargs["factors"] = [gs.FactorSpec(w, bias=b, rows=r) for w, b, r in
                             factor_specs(_build(final), factors, "sklearn open_writer")]
        kwargs.setdefault("factor_dtype", "float64")  # sklearn computes in float64
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
    store_labels: bool = True,
    max_samples: int | None = None,
    optimizer_step: int | None = None,
    meta: Any = None,
) -> RecordSummary:
    """Write one complete record ``(step, split)``: gradients, losses, ids and labels.

    ``Recorder(writer, estimator, ...).record((X, y), step, split, ...)`` in one call (see
    :class:`Recorder` for the options). Computes :func:`per_sample_gradients` and
    :func:`per_sample_loss` ``batch_size`` rows at a time, ``writer.write``\\ s each batch,
    then ``writer.end_record(step, split)``. Labels are the class index into ``classes_``
    (classifiers) or the target (single-target regressors); none for multilabel/multi-target
    ``y``. With ``include_penalty`` the penalty share uses ``N = len(X)``, the whole record.

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
    rec = Recorder(writer, estimator, batch_size=batch_size, progress=progress,
                   include_penalty=include_penalty, keep=keep, params_subset=params_subset,
                   project=project, seed=seed, block_size=block_size,
                   store_labels=store_labels)
    return rec.record((X, y), step, split, lr=lr, epoch=epoch, max_samples=max_samples,
                      sample_id=sample_id, optimizer_step=optimizer_step, meta=meta)


# -- training trajectories ---------------------------------------------------------------


def _sgd_lr(est: Any, n_updates: int) -> float:
    """Mean per-update learning rate of sklearn's SGD (see ``_sklearn_record.sgd_lr``)."""
    return sgd_lr(est, n_updates)


def record_trajectory(
    writer: Any,
    estimator: Any,
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
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
    """Train ``epochs`` epochs, recording gradients every ``every`` epochs.

    The writer comes first, as in every recording function. The order before issue 12,
    ``record_trajectory(estimator, X_train, y_train, X_test, y_test, writer, ...)``, still
    works for one release with a :class:`DeprecationWarning`.

    Training is incremental: one ``partial_fit`` call per epoch (``SGDClassifier``,
    ``SGDRegressor``, ``MLPClassifier``/``MLPRegressor`` with solver sgd or adam), or one
    L-BFGS/Newton iteration per epoch for ``LogisticRegression`` (``warm_start=True,
    max_iter=1``, restored afterwards; its ``ConvergenceWarning`` is silenced).

    An **unfitted** estimator is fitted here from its initialisation, and step
    ``start_step`` (epoch 0) is that initialisation :math:`\\theta_0`:

    * SGD models and ``LogisticRegression``: :math:`\\theta_0 = 0` (``coef_`` and
      ``intercept_`` zero, what sklearn starts from without ``coef_init``);
    * MLPs: sklearn's Glorot-uniform weights drawn from ``random_state`` -- exactly those
      the first ``partial_fit`` starts from.

    It is taken from a copy (``_sklearn_record.initialised``); the host's global random
    state is restored, so the estimator trains exactly as it would unrecorded. A **fitted**
    estimator continues training, and epoch 0 is its current parameters. ``classes``
    (default: every label of ``y_train`` and ``y_test``) is passed to the first
    ``partial_fit`` of a classifier.

    After epoch 0 and every epoch ``e`` one trajectory row
    ``writer.write_trajectory(step, lr, train_loss, test_loss, epoch=e)`` is written (mean
    data losses at θ_step); when ``e % every == 0``, ``e == epochs`` or ``e == 0``, full
    gradient records ``(step, "train")`` and ``(step, "test")`` are written through
    :class:`Recorder`, each with ``optimizer_step=step`` and ``meta`` = the update rule's
    class and hyper-parameters (``_sklearn_record.optimizer_meta``) and
    ``"framework": "scikit-learn <version>"``.

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
    args = trajectory_args((writer, estimator, X_train, y_train, X_test, y_test))
    return _record_trajectory(*args, epochs=epochs, every=every, batch_size=batch_size,
                              lr=lr, include_penalty=include_penalty, classes=classes,
                              start_step=start_step, progress=progress)


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
