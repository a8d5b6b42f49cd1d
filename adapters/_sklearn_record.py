r"""Recording from scikit-learn: the :class:`Recorder` and training trajectories.

Behind ``adapters/sklearn.py`` (which re-exports everything public here): the recorder that
writes records ``(step, split)`` of a (possibly still training) estimator, the trajectory
driver that trains an estimator epoch by epoch and records it, the estimator's state at
initialisation (:func:`initialised`: step 0 of a trajectory, and the layout of an unfitted
estimator), and the optimizer metadata stored with each trajectory record. The gradient
maths lives in ``adapters/_sklearn_models.py``; ``docs/adapters.md`` shows the calls.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
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
from ._common import (
    RecordSummary,
    abort_record,
    check_factored_writer,
    check_layout_matches,
    preserved_host_rng,
    progress_bar,
    writer_factors,
)
from ._sklearn_models import _build, _prepare, _resolve, _where

# The smallest positive float: an MLP epoch at this learning rate moves no weight (every
# update is below half an ulp of the weight it is added to), so the copy that ran it holds
# sklearn's initial weights exactly (see initialised()).
_TINY_LR = float(np.nextafter(0.0, 1.0))


def is_fitted(estimator: Any) -> bool:
    """Whether the estimator (a Pipeline's last step) has fitted parameters."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    try:
        check_is_fitted(final)
    except (NotFittedError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------


class _WithRecordAttrs:
    """A writer whose ``write_moments`` also passes ``optimizer_step``/``meta`` (the moments
    blocks of ``adapters/_moments.py`` pass lr and epoch only)."""

    def __init__(self, writer: Any, extra: dict[str, Any]) -> None:
        self._w, self._extra = writer, extra

    def write_moments(self, *args: Any, **kw: Any) -> None:
        self._w.write_moments(*args, **kw, **self._extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._w, name)


def _rows(a: Any, m: int) -> Any:
    """The first ``m`` rows of an array, sparse matrix, DataFrame or list."""
    return a.iloc[:m] if hasattr(a, "iloc") else a[:m]


def _unpack(data: Any, sample_id: Any, where: str) -> tuple[Any, Any, Any]:
    """``(X, y, sample_id)`` from ``data`` = ``(X, y)`` or ``(X, y, sample_id)``."""
    if not isinstance(data, tuple | list) or len(data) not in (2, 3):
        raise AdapterError(
            f"{where}: data must be a tuple (X, y) or (X, y, sample_id), got "
            f"{type(data).__name__}" + (f" of length {len(data)}" if hasattr(data, "__len__")
                                       else "") + "; the estimator supplies the loss"
        )
    if len(data) == 3:
        if sample_id is not None:
            raise AdapterError(f"{where}: sample ids given twice (data[2] and sample_id=); "
                               "pass one of them")
        sample_id = data[2]
    return data[0], data[1], sample_id


def _sample_ids(sid: Any, n: int, where: str) -> np.ndarray | None:
    """``sid`` as int64 ids of ``n`` samples; floats are refused, never cast to int."""
    if sid is None:
        return None
    a = np.asarray(sid)
    if a.dtype.kind not in "iu" or a.ndim != 1 or a.shape[0] != n:
        raise AdapterError(
            f"{where}: sample_id ({a.dtype}, shape {a.shape}) must be 1-D integers, one per "
            f"row of X ({n}); floats are never cast to int"
        )
    return a.astype(np.int64)


def factor_specs(model: Any, factors: Any, where: str) -> list[tuple[str, str | None, int]]:
    """The factors ``[(weight, bias or None, rows=1)]`` meant by ``factors`` for a model.

    ``"auto"``: each factorable tensor (``_Model.factorable``) of shape ``(r, c)`` with
    :math:`r + c < r c` (fewer numbers than its gradient); ``True``: all factorable tensors;
    a list of tensor names (bias tied where the model has one), ``(weight, bias)`` pairs or
    ``FactorSpec``-like objects (checked against the model).
    """
    able = dict(model.factorable())
    shapes = dict(model.layout)
    if factors is True or (isinstance(factors, str) and factors in ("auto", "all")):
        auto = factors == "auto"
        out = [(w, b, 1) for w, b in able.items()
               if not auto or sum(shapes[w]) < math.prod(shapes[w])]
    elif isinstance(factors, list | tuple):
        out = []
        for f in factors:
            if hasattr(f, "weight") and hasattr(f, "rows"):
                w, b, r = str(f.weight), None if f.bias is None else str(f.bias), int(f.rows)
            elif isinstance(f, str):
                w, b, r = f, able.get(f), 1
            else:
                w, b, r = str(f[0]), None if f[1] is None else str(f[1]), 1
            if w not in able or (b is not None and b != able[w]):
                raise AdapterError(
                    f"{where}: {model.name} cannot store {f!r} as a factor; supported: "
                    f"{sorted(able.items())} (weight, tied bias)")
            out.append((w, b, r))
    else:
        raise AdapterError(f"{where}: factors must be 'auto', True or a list of tensor names, "
                           f"got {factors!r}")
    if not out:
        raise AdapterError(
            f"{where}: {model.name} has no tensor worth factoring (layout {model.layout}); "
            f"supported: 2-D weights whose gradient is delta_i a_i^T ({sorted(able)}), "
            "factors=True to factor them however small; else write full gradients")
    return out


class Recorder:
    """Write per-sample gradient records of a scikit-learn estimator into a writer.

    The sklearn counterpart of the torch adapter's ``Recorder(writer, model, loss_fn)``:
    no ``loss_fn`` (the estimator defines its loss, see ``adapters/sklearn.py``), and the
    estimator may keep training between records (``partial_fit``, warm starts): each
    :meth:`record` reads its current parameters.

    Parameters
    ----------
    writer : GradientWriter
        Open writer with the estimator's layout (:func:`open_writer`, or
        ``GradientWriter(path, layout(estimator))``); checked at construction when the
        estimator is fitted, else at the first record.
    estimator : estimator or Pipeline
        One of ``SUPPORTED``; fitted by the time :meth:`record` is called.
    batch_size : int
        Rows computed and written at a time.
    progress : bool or dict
        A tqdm progress bar per record (a dict: tqdm keyword arguments).
    include_penalty : bool
        Add each sample's share ``∇Ω / N`` of the penalty gradient (``N`` the record size).
    keep : {"grads", "moments", "factors"}
        ``"moments"`` writes ``(count, mean, M2)`` blocks (float64) instead of gradients
        (no per-sample losses, ids or labels then). ``"factors"``: exact factored records
        for a writer opened with ``open_writer(..., factors=...)``: each factored weight
        as :math:`A_i = x_i` (or the layer's output gradient for an MLP's ``coefs_l``)
        and :math:`D_i = \\partial \\ell_i / \\partial f` (or the layer's input), the
        other tensors as per-sample columns (``docs/adapters.md``, "Factored records").
    params_subset, project, seed :
        A seeded parameter subset / JL projection (``adapters/_moments.py``); the writer
        must come from ``open_writer`` with the same.
    block_size : int, optional
        With ``keep="moments"``: samples per stored block (default: one per batch).
    store_labels : bool
        Store the class index (classifiers) or the 1-D target (regressors) as labels.
    """

    def __init__(
        self,
        writer: Any,
        estimator: Any,
        *,
        batch_size: int = 1024,
        progress: bool | dict[str, Any] = False,
        include_penalty: bool = False,
        keep: str = "grads",
        params_subset: Any = None,
        project: Any = None,
        seed: int = 0,
        block_size: int | None = None,
        store_labels: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
                or batch_size < 1:
            raise AdapterError(f"sklearn Recorder: batch_size must be an int >= 1, got "
                               f"{batch_size!r}")
        if hasattr(writer, "fit") and not hasattr(writer, "end_record"):
            raise AdapterError("sklearn Recorder: the writer comes first: "
                               "Recorder(writer, estimator, ...)")
        self.writer, self.estimator = writer, estimator
        self.batch_size, self.progress = int(batch_size), progress
        self.include_penalty, self.store_labels = include_penalty, store_labels
        self._keep = keep if keep == "factors" else _moments.check_keep(keep, "sklearn Recorder")
        self._facs = (check_factored_writer(writer, keep, "sklearn Recorder")
                      if keep != "moments" else [])
        if self._facs and include_penalty:
            raise AdapterError(
                "sklearn Recorder: keep='factors' with include_penalty=True: the penalty share "
                "adds the same vector to every sample, which is no outer product; record "
                "without the penalty (reduce's mean plus grad Omega / N is the same)")
        self._tf_args = (params_subset, project, seed)
        self._block_size = block_size
        self._tf: Any = None
        self._tf_src: list[Any] | None = None
        if is_fitted(estimator):
            self._transform(_build(_resolve(estimator)[0]), "sklearn Recorder")

    def _transform(self, model: Any, where: str) -> Any:
        """The subset/projection of the model's layout, checked against the writer once."""
        src = [(n, s, lay) for (n, s), lay in zip(model.layout, model.layers, strict=True)]
        if self._tf is None or src != self._tf_src:
            tf = _moments.make_transform(src, *self._tf_args)
            check_layout_matches(self.writer, [(n, s) for n, s, _ in tf.layout], where)
            _moments.check_writer(self.writer, tf, where)
            if self._facs:
                if tf.active:
                    raise AdapterError(f"{where}: keep='factors' stores whole tensors' "
                                       "factors; params_subset/project do not apply")
                factor_specs(model, list(self._facs), where)  # the writer's, checked
            self._tf, self._tf_src = tf, src
        return self._tf

    def record(
        self,
        data: Any,
        step: int,
        split: str,
        *,
        lr: float | None = None,
        epoch: float | None = None,
        max_samples: int | None = None,
        sample_id: Any = None,
        optimizer_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> RecordSummary:
        """Compute and write the complete record ``(step, split)`` of ``data``.

        Parameters
        ----------
        data : tuple
            ``(X, y)`` or ``(X, y, sample_id)``: inputs (transformed by a Pipeline's earlier
            steps), labels or targets, optional integer ids.
        step, split : int, str
            The record's key.
        lr, epoch : float, optional
            Stored with the record.
        max_samples : int, optional
            Record only the first ``max_samples`` rows.
        sample_id : array_like of int, optional
            Ids of the rows (default: their index); floats are refused.
        optimizer_step, meta : int, mapping, optional
            The optimizer's update count at this checkpoint and JSON metadata (optimizer
            class and hyper-parameters), stored with the record (``docs/format.md``).

        Returns
        -------
        RecordSummary
            Step, split, number of samples, mean per-sample loss, lr, epoch and
            optimizer_step.
        """
        where = f"sklearn Recorder.record(step={step}, split={split!r})"
        X, y, sid = _unpack(data, sample_id, where)
        if max_samples is not None:
            if int(max_samples) < 1:
                raise AdapterError(f"{where}: max_samples must be >= 1, got {max_samples}")
            X, y = _rows(X, int(max_samples)), _rows(y, int(max_samples))
            sid = None if sid is None else _rows(np.asarray(sid), int(max_samples))
        if not is_fitted(self.estimator):
            raise AdapterError(
                f"{where}: {_where(_resolve(self.estimator)[0])} is not fitted; record after "
                "fit/partial_fit (record_trajectory fits an unfitted estimator itself)")
        model, Xd, Y = _prepare(self.estimator, X, y)
        tf = self._transform(model, where)
        N = Xd.shape[0]
        if N == 0:
            raise AdapterError(f"{where}: {model.name} got no samples")
        labels = model.labels(y) if self.store_labels else None
        ids = _sample_ids(sid, N, where)
        share = model.penalty_share(model.theta, N) if self.include_penalty else None
        extra = {k: v for k, v in (("optimizer_step", optimizer_step), ("meta", meta))
                 if v is not None}
        w = self.writer
        bs = self.batch_size
        mom = (_moments.MomentsBlocks(_WithRecordAttrs(w, extra) if extra else w, step, split,
                                      sum(math.prod(s) for _, s, _ in tf.layout),
                                      self._block_size, lr=lr, epoch=epoch, names=tf.layout)
               if self._keep == "moments" else None)
        bar = progress_bar(self.progress, N, f"{split} @ step {step}")
        total = 0.0
        try:
            for start in range(0, N, bs):
                sl = slice(start, start + bs)
                facs = None
                if self._facs:
                    loss, G, facs = model.loss_factors(model.theta, Xd[sl], Y[sl], {
                        f[0] for f in self._facs})
                    G = G if G.shape[1] else None
                else:
                    loss, G = model.loss_grads(model.theta, Xd[sl], Y[sl])
                if share is not None:
                    G += share
                if tf.active:
                    G = tf.apply(G)
                if mom is not None:
                    mom.add_samples(G)
                else:
                    w.write(step, split, G, loss=loss, **({"factors": facs} if facs else {}),
                            sample_id=None if ids is None else ids[sl],
                            label=None if labels is None else labels[sl], lr=lr, epoch=epoch,
                            **extra)
                total += float(loss.sum())
                bar.update(loss.size)
            if mom is not None:
                mom.finish()
            else:
                w.end_record(step, split)
        except BaseException:
            abort_record(w, step, split)
            raise
        finally:
            bar.close()
        return RecordSummary(step=int(step), split=split, n_samples=N, mean_loss=total / N,
                             lr=math.nan if lr is None else float(lr),
                             epoch=math.nan if epoch is None else float(epoch),
                             optimizer_step=None if optimizer_step is None
                             else int(optimizer_step))


# --------------------------------------------------------------------------------------
# Initialisation and optimizer metadata
# --------------------------------------------------------------------------------------


def _classes(classes: Any, y_train: Any, y_test: Any) -> np.ndarray:
    """``classes`` for a first ``partial_fit``: given, indicator columns, or all labels seen."""
    if classes is not None:
        return np.asarray(classes)
    yt = np.asarray(y_train)
    if yt.ndim == 2:  # multilabel indicator matrix
        return np.arange(yt.shape[1])
    return np.unique(np.concatenate([yt, np.asarray(y_test)])) if y_test is not None \
        else np.unique(yt)


def _mode(final: Any) -> str:
    """How record_trajectory trains ``final``: "sgd", "mlp" (partial_fit) or "lr" (warm start)."""
    if isinstance(final, SGDClassifier | SGDRegressor):
        return "sgd"
    if isinstance(final, MLPClassifier | MLPRegressor):
        if final.solver not in ("sgd", "adam"):
            raise AdapterError(
                f"{_where(final)}(solver={final.solver!r}) cannot train incrementally; "
                "supported: solver='sgd' or 'adam'"
            )
        return "mlp"
    if isinstance(final, LogisticRegression) and not isinstance(final, LogisticRegressionCV):
        if final.solver == "liblinear":
            raise AdapterError(
                "LogisticRegression(solver='liblinear') has no warm start; supported: "
                "lbfgs, newton-cg, newton-cholesky, sag, saga"
            )
        return "lr"
    raise AdapterError(
        f"record_trajectory: {_where(final)} does not train incrementally; supported: "
        "SGDClassifier, SGDRegressor, MLPClassifier, MLPRegressor (partial_fit), "
        "LogisticRegression (warm start, not liblinear)"
    )


def initialised(final: Any, X: Any, y: Any, classes: Any = None) -> Any:
    """A copy of the unfitted ``final`` holding the parameters its training starts from.

    * ``SGDClassifier``/``SGDRegressor`` and ``LogisticRegression`` start from
      :math:`\\theta_0 = 0` (``coef_`` and ``intercept_`` zero: sklearn's initialisation
      when no ``coef_init`` is given, and the warm-start solvers' first iterate). The copy
      runs one ``partial_fit`` / one iteration for its shapes and ``classes_``, then its
      parameters are set to zero.
    * ``MLPClassifier``/``MLPRegressor`` start from sklearn's Glorot-uniform draw from
      ``random_state``. The copy runs its first ``partial_fit`` at the smallest positive
      learning rate, which initialises the weights and leaves them bit for bit unchanged.

    The host's global random state is restored afterwards (Python's and numpy's), so the
    estimator itself, trained next, draws the same initialisation and shuffles as it would
    have without the copy (``random_state=None`` included).
    """
    mode = _mode(final)
    probe = copy.deepcopy(final)
    with preserved_host_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if mode == "lr":
            probe.set_params(warm_start=False, max_iter=1)
            probe.fit(X, y)
        else:
            if mode == "mlp":
                probe.set_params(learning_rate_init=_TINY_LR)
            if isinstance(probe, SGDClassifier | MLPClassifier):
                probe.partial_fit(X, y, classes=_classes(classes, y, None))
            else:
                probe.partial_fit(X, y)
    if mode == "mlp":
        probe.set_params(learning_rate_init=final.learning_rate_init)
    else:
        probe.coef_ = np.zeros_like(np.asarray(probe.coef_, dtype=np.float64))
        probe.intercept_ = np.zeros_like(np.asarray(probe.intercept_, dtype=np.float64))
    return probe


def _json_value(v: Any) -> Any:
    """A JSON-safe hyper-parameter: numbers, strings, bools, None; non-finite as strings."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, tuple | list) and all(isinstance(x, int | float | str) for x in v):
        return [_json_value(x) for x in v]
    return repr(v)


def mlp_batch_size(est: Any, n: int) -> int:
    """The minibatch size sklearn's MLP uses on ``n`` samples."""
    return min(200, n) if est.batch_size == "auto" else int(np.clip(est.batch_size, 1, n))


def optimizer_meta(final: Any, n: int) -> dict[str, Any]:
    """Record metadata of a trajectory: the update rule's class and hyper-parameters.

    ``{"optimizer": {"class", "module", "solver", "batch_size", ...}, "framework":
    "scikit-learn <version>"}`` with the parameters that define one update: SGD's ``loss``,
    ``penalty``, ``alpha``, ``l1_ratio``, ``learning_rate`` schedule, ``eta0`` (not under
    ``"optimal"``, which ignores it), ``power_t`` (``"invscaling"`` only), ``average`` (one
    sample per update); the MLP's ``learning_rate``, ``learning_rate_init``, ``power_t``,
    ``momentum``, ``nesterovs_momentum`` (sgd) or ``beta_1``, ``beta_2``, ``epsilon``
    (adam), ``alpha`` and minibatch size; LogisticRegression's ``solver``, ``C``,
    ``l1_ratio`` (full batch: one solver iteration per update). The per-record learning
    rate actually used is the record's ``lr``.
    """
    mode = _mode(final)
    p = final.get_params(deep=False)
    # only the parameters the update uses: sklearn ignores eta0 under the "optimal"
    # schedule and power_t outside "invscaling" (a stored eta0 would read as the rate)
    sched = {"optimal": (), "invscaling": ("eta0", "power_t")}.get(p.get("learning_rate"),
                                                                   ("eta0",))
    if mode == "sgd":
        keys = ("loss", "penalty", "alpha", "l1_ratio", "learning_rate", *sched, "average",
                "fit_intercept")
        opt: dict[str, Any] = {"solver": "sgd", "batch_size": 1}
    elif mode == "mlp":
        keys = ("learning_rate", "learning_rate_init",
                *(("power_t",) if "power_t" in sched else ()), "momentum",
                "nesterovs_momentum", "alpha", "shuffle")
        if final.solver == "adam":
            keys = ("learning_rate_init", "beta_1", "beta_2", "epsilon", "alpha", "shuffle")
        opt = {"solver": final.solver, "batch_size": mlp_batch_size(final, n)}
    else:
        keys = ("C", "l1_ratio", "penalty", "fit_intercept", "tol")
        opt = {"solver": final.solver, "batch_size": int(n)}
    opt.update({k: _json_value(p[k]) for k in keys if k in p})
    return {"optimizer": {"class": type(final).__name__, "module": type(final).__module__,
                          **opt},
            "framework": f"scikit-learn {sklearn.__version__}"}


# --------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------


def sgd_lr(est: Any, n_updates: int) -> float:
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


def _is_writer(w: Any) -> bool:
    from gsnr_stats import GradientWriter

    return isinstance(w, GradientWriter) or (hasattr(w, "write") and hasattr(w, "end_record"))


def trajectory_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``(writer, estimator, X_train, y_train, X_test, y_test)`` in the current order.

    The order before issue 12, ``(estimator, X_train, y_train, X_test, y_test, writer)``,
    is recognised by its first argument (an estimator: it has ``fit``, a writer never
    does) and works for one release with a :class:`DeprecationWarning`.
    """
    if len(args) != 6:
        raise AdapterError(
            f"record_trajectory takes 6 positional arguments (writer, estimator, X_train, "
            f"y_train, X_test, y_test), got {len(args)}")
    if _is_writer(args[0]):
        return args
    if hasattr(args[0], "fit") and (args[5] is None or _is_writer(args[5])):
        warnings.warn(
            "record_trajectory(estimator, X_train, y_train, X_test, y_test, writer) is "
            "deprecated: the writer comes first, as in every recording function: "
            "record_trajectory(writer, estimator, X_train, y_train, X_test, y_test, ...)",
            DeprecationWarning, stacklevel=3)
        return (args[5], *args[:5])
    raise AdapterError(
        "record_trajectory(writer, estimator, X_train, y_train, X_test, y_test): the first "
        f"argument ({type(args[0]).__name__}) is not a writer (needs write and end_record)")


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
    """See :func:`gsnr_stats.adapters.sklearn.record_trajectory` (the public docstring)."""
    if epochs < 1 or every < 1:
        raise AdapterError(f"epochs and every must be >= 1, got {epochs}, {every}")
    final, (Xtr, Xte) = _resolve(estimator, X_train, X_test)
    mode = _mode(final)
    n = len(y_train)
    fresh = not is_fitted(final)
    # a writer opened with factors= gets factored records (open_writer(..., factors=))
    keep = "factors" if writer_factors(writer) else "grads"
    rec = Recorder(writer, final, batch_size=batch_size, progress=progress,
                   include_penalty=include_penalty, keep=keep)

    def current_lr(e: int, est: Any) -> float:
        if lr is not None:
            return float(lr(e)) if callable(lr) else float(lr)
        if mode == "sgd":
            return sgd_lr(est, n)
        if mode == "mlp" and est.solver == "sgd":
            opt = getattr(est, "_optimizer", None)
            return float(getattr(opt, "learning_rate", est.learning_rate_init))
        return math.nan

    rows: dict[str, list[Any]] = {k: [] for k in
                                  ("epoch", "step", "lr", "train_loss", "test_loss", "recorded")}
    step = int(start_step)

    def checkpoint(e: int, grads: bool, est: Any) -> None:
        # lr and hyper-parameters from the estimator being trained, also at step 0 (the
        # initialised copy's counters and learning rate are not the training's)
        lr_e = current_lr(e, final)
        if grads:
            r = rec if est is final else Recorder(writer, est, batch_size=batch_size,
                                                  progress=progress,
                                                  include_penalty=include_penalty, keep=keep)
            kw = {"lr": lr_e, "epoch": e, "optimizer_step": step,
                  "meta": optimizer_meta(final, n)}
            tr = r.record((Xtr, y_train), step, "train", **kw).mean_loss
            te = r.record((Xte, y_test), step, "test", **kw).mean_loss
        else:
            tr = float(_mean_loss(est, Xtr, y_train))
            te = float(_mean_loss(est, Xte, y_test))
        writer.write_trajectory(step, lr_e, tr, te, epoch=e)
        for k, v in zip(rows, (e, step, lr_e, tr, te, grads), strict=True):
            rows[k].append(v)

    # step 0: the initialisation of an unfitted estimator (see initialised()), else the
    # parameters as they are
    checkpoint(0, True, initialised(final, Xtr, y_train, _classes(classes, y_train, y_test))
               if fresh else final)
    saved = (final.warm_start, final.max_iter) if mode == "lr" else None
    try:
        if mode == "lr":
            final.set_params(warm_start=True, max_iter=1)
        for e in range(1, epochs + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                if mode == "lr":
                    final.fit(Xtr, y_train)
                    step += int(np.max(final.n_iter_))
                else:
                    if isinstance(final, SGDClassifier | MLPClassifier) and not is_fitted(final):
                        final.partial_fit(Xtr, y_train,
                                          classes=_classes(classes, y_train, y_test))
                    else:
                        final.partial_fit(Xtr, y_train)
                    step += n if mode == "sgd" else math.ceil(n / mlp_batch_size(final, n))
            checkpoint(e, e % every == 0 or e == epochs, final)
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


def _mean_loss(est: Any, X: Any, y: Any) -> float:
    model, Xd, Y = _prepare(est, X, y)
    return float(model.loss(model.theta, Xd, Y).mean())
