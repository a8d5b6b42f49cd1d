r"""``gs.compare``: several models side by side -- GSNR, OSGR and the generalization gap.

One call, ``{name: model}`` in, one tidy table out (a pandas DataFrame, one row per
model), plus :func:`compare_figure` for the table. Each model goes through
:func:`gsnr_stats.gsnr` on the training and test split (the same Dataset ``reduce`` would
return for their stores), and every number in the table comes from the existing analytics
on that Dataset, never re-derived here:

* ``gsnr_mean_*``, ``gsnr_median_*``: :func:`gsnr_stats.aggregate` over the whole model,
  :math:`\frac1P \sum_j r_j` and the median of :math:`r_j = m_j^2 / s_j^2`;
* ``osgr_*``: the theoretical OSGR :func:`gsnr_stats.osgr` at ``n`` (default the training
  set size), :math:`R(n) = \sum_j G_j / \sum_j (G_j + V_j/n)` from that split's moments;
* ``loss_*``, ``gap_measured``: :func:`gsnr_stats.measured_gap`, mean test loss minus mean
  train loss (each model's own per-sample loss);
* ``gap_theory_step``: :func:`gsnr_stats.one_step_gap` with ``V`` from the test split,
  :math:`\lambda \sum_j V_j / n`, the expected gap growth of one optimizer step of learning
  rate :math:`\lambda` (given as ``lr``); ``gap_theory`` = ``steps`` times that, the
  accumulated gap with ``V`` held at the fitted model's value (first order: it
  over-predicts a fixed training set's gap, ``docs/theory.md``).

Scikit-learn and torch models are told apart by their classes' modules: the core imports
no framework (the adapters are imported by :mod:`gsnr_stats.inmemory`, lazily).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._dsutil import describe, require_int
from .errors import AdapterError, ArgumentTypeError, SignalBelowNoiseWarning
from .groups import aggregate
from .inmemory import gsnr, is_sklearn, is_torch_module, sklearn_fitted, torch_ready
from .theory import measured_gap, one_step_gap, osgr

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COLUMNS", "compare", "compare_figure"]

COLUMNS: tuple[str, ...] = (
    "framework", "estimator", "fitted_here", "n_params", "n_train", "n_test",
    "gsnr_mean_train", "gsnr_median_train", "gsnr_mean_test", "gsnr_median_test",
    "osgr_train", "osgr_test", "loss_train", "loss_test", "gap_measured",
    "accuracy_train", "accuracy_test", "lr", "gap_theory_step", "steps", "gap_theory", "note",
)


def _per_model(value: Any, name: str) -> Any:
    """``value[name]`` for a per-model mapping, else ``value`` itself (shared)."""
    return value.get(name) if isinstance(value, Mapping) else value


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _accuracy(model: Any, X: Any, y: Any) -> float:
    """Fraction of correct predictions of a classifier, NaN for a regressor.

    scikit-learn: ``predict`` against ``y`` when the final step has ``classes_``. torch:
    the model's outputs in eval mode (restored afterwards): ``argmax`` over two or more
    output columns against integer targets, ``output > 0`` for one output and 0/1 targets.
    """
    yt = _as_numpy(y)
    if is_sklearn(model):
        final = model.steps[-1][1] if hasattr(model, "steps") else model
        if not hasattr(final, "classes_") or yt.ndim != 1:
            return math.nan
        return float(np.mean(np.asarray(model.predict(X)) == yt))
    p = next(iter(model.parameters()))
    x = torch_ready(model, X)
    x = p.new_tensor(x) if isinstance(x, np.ndarray) else x.to(p.device)
    was = model.training
    model.eval()
    try:
        out = _as_numpy(model(x)).astype(np.float64)
    finally:
        model.train(was)
    if yt.dtype.kind not in "iub" or yt.ndim != 1:
        return math.nan
    if out.ndim == 2 and out.shape[1] >= 2:
        return float(np.mean(out.argmax(axis=1) == yt))
    if out.reshape(len(yt), -1).shape[1] == 1 and set(np.unique(yt)) <= {0, 1}:
        return float(np.mean((out.reshape(-1) > 0) == (yt == 1)))
    return math.nan


def _reason(ds: Any, var: str) -> str:
    return str(ds[var].attrs.get("reason", "")).strip()


def compare(
    models: Mapping[str, Any],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    loss_fn: Any = None,
    lr: float | Mapping[str, float] | None = None,
    steps: int | Mapping[str, int] | None = None,
    n: int | None = None,
    batch_size: int | None = None,
    ddof: int = 1,
    debias: bool = True,
    fit: bool = True,
) -> pd.DataFrame:
    """GSNR, theoretical OSGR and measured / theoretical gap of several models, side by side.

    Parameters
    ----------
    models : mapping of str to model
        Fitted (or, with ``fit``, unfitted) scikit-learn estimators or Pipelines, and torch
        ``nn.Module`` (trained by you; they need ``loss_fn``).
    train, test : (X, y)
        The training and the held-out split, shared by all models (numpy arrays are cast
        to a torch model's parameter dtype).
    loss_fn : callable or mapping of str to callable, optional
        Per-sample loss of the torch models (``reduction="none"``).
    lr : float or mapping of str to float, optional
        Learning rate :math:`\\lambda` of one optimizer step on the mean loss, per model or
        shared; gives ``gap_theory_step``. Unknown (NaN) otherwise.
    steps : int or mapping of str to int, optional
        Optimizer steps the model was trained for; with ``lr`` gives ``gap_theory``.
    n : int, optional
        The training-set (batch) size of the modelled step in :math:`R(n)` and the gap
        (default: the number of training samples).
    batch_size : int, optional
        Samples per batch of the adapters.
    ddof, debias :
        As in :func:`gsnr_stats.reduce` and :func:`gsnr_stats.osgr`.
    fit : bool
        Fit an unfitted scikit-learn estimator on ``train`` first (in place; the
        ``fitted_here`` column says which were). ``False``: an unfitted one is an error.

    Returns
    -------
    pandas.DataFrame
        Index ``model``; columns :data:`COLUMNS` (see the module docstring):
        ``framework``, ``estimator`` (class), ``fitted_here``, ``n_params``, ``n_train``,
        ``n_test``, ``gsnr_mean_train`` ... ``gap_theory``; ``accuracy_*`` NaN for
        regressors; ``note``: why an OSGR is negative or NaN (the analytics'
        ``attrs["reason"]``), e.g. a fitted training split whose debiased signal is below
        its noise. The warning those raise is gathered into ``note`` instead.
    """
    if not isinstance(models, Mapping) or not models:
        raise AdapterError("compare: models must be a non-empty {name: model} mapping")
    for what, d in (("train", train), ("test", test)):
        if not isinstance(d, tuple | list) or len(d) != 2:
            raise AdapterError(f"compare: {what} must be a tuple (X, y)")
    require_int(n, "n", "gs.compare", minimum=1, none=True)
    for what, v in (("lr", lr), ("steps", steps)):
        vals = v.values() if isinstance(v, Mapping) else [v]
        if any(x is not None and (isinstance(x, bool) or not isinstance(x, int | float | np.number))
               for x in vals):
            raise ArgumentTypeError(f"gs.compare: {what} must be a number or a {{model name: "
                                    f"number}} mapping, got {describe(v)}")
    rows = []
    for name, model in models.items():
        fitted_here = False
        if is_sklearn(model):
            framework = "sklearn"
            if not sklearn_fitted(model):
                if not fit:
                    raise AdapterError(f"compare: model {name!r} ({type(model).__name__}) is "
                                       "not fitted; fit it or pass fit=True")
                model.fit(*train)
                fitted_here = True
        elif is_torch_module(model):
            framework = "torch"
            if _per_model(loss_fn, name) is None:
                raise AdapterError(f"compare: torch model {name!r} needs loss_fn= (per-sample "
                                   "losses, e.g. nn.CrossEntropyLoss(reduction='none'))")
        else:
            raise AdapterError(f"compare: model {name!r} is a {type(model).__name__}; "
                               "supported: scikit-learn estimators and torch nn.Module")
        stats = gsnr(model, {"train": tuple(train), "test": tuple(test)},
                     loss_fn=_per_model(loss_fn, name) if framework == "torch" else None,
                     batch_size=batch_size, ddof=ddof)
        rows.append(_row(name, model, framework, fitted_here, stats, train, test,
                         n, _per_model(lr, name), _per_model(steps, name), debias))
    table = pd.DataFrame(rows).set_index("model")
    return table[list(COLUMNS)]


def _row(name: str, model: Any, framework: str, fitted_here: bool, stats: Any,
         train: Any, test: Any, n: int | None, lr: Any, steps: Any,
         debias: bool) -> dict[str, Any]:
    s0 = {"step": stats["step"].values[0]}
    count = stats["count"].sel(**s0)
    n_train, n_test = int(count.sel(split="train")), int(count.sel(split="test"))
    n_model = int(n) if n is not None else n_train
    agg = aggregate(stats, by="model", quantiles=()).sel(**s0).isel(group=0)
    R, notes = {}, []
    for sp in ("train", "test"):
        # one split at a time, so that a reason names that split only; the warning a
        # negative value raises goes into the note instead
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SignalBelowNoiseWarning)
            ds = osgr(stats, n_model, split=sp, debias=debias)
        R[sp] = float(ds["osgr"].sel(**s0, split=sp, n=n_model))
        if not R[sp] >= 0:
            why = _reason(ds, "osgr") or "; ".join(str(c.message) for c in caught)
            notes.append(f"osgr_{sp} = {R[sp]:.3g}" + (f": {why}" if why else ""))
    gap = measured_gap(stats).sel(**s0)
    step_gap = theory_gap = math.nan
    if lr is not None:
        og = one_step_gap(stats, n_model, lr=float(lr), split="test")
        step_gap = float(og["gap_theory"].sel(**s0, split="test", n=n_model))
        if steps is not None:
            theory_gap = float(steps) * step_gap
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    return {
        "model": name, "framework": framework, "estimator": type(final).__name__,
        "fitted_here": fitted_here, "n_params": int(stats.attrs["n_params"]),
        "n_train": n_train, "n_test": n_test,
        "gsnr_mean_train": float(agg["gsnr_mean"].sel(split="train")),
        "gsnr_median_train": float(agg["gsnr_median"].sel(split="train")),
        "gsnr_mean_test": float(agg["gsnr_mean"].sel(split="test")),
        "gsnr_median_test": float(agg["gsnr_median"].sel(split="test")),
        "osgr_train": R["train"], "osgr_test": R["test"],
        "loss_train": float(gap["loss_train"]), "loss_test": float(gap["loss_test"]),
        "gap_measured": float(gap["gap_measured"]),
        "accuracy_train": _accuracy(model, *train), "accuracy_test": _accuracy(model, *test),
        "lr": math.nan if lr is None else float(lr), "gap_theory_step": step_gap,
        "steps": math.nan if steps is None else float(steps), "gap_theory": theory_gap,
        "note": "; ".join(notes),
    }


def compare_figure(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """One figure of a :func:`compare` table: GSNR, OSGR and gap per model.

    Left: mean and median GSNR ``r_j`` on the training split (log axis; a non-positive
    value is left out). Middle: the theoretical OSGR ``R(n)`` from the train and the test
    split's moments, with 0 and 1 marked (a negative train OSGR is the fitted-training-split
    effect the table's ``note`` names). Right: the measured gap (test - train loss) and,
    where ``lr`` and ``steps`` were known, the theoretical gap.

    Returns
    -------
    matplotlib.figure.Figure
        Built directly (no pyplot); save it with ``fig.savefig(path)``.
    """
    from matplotlib.figure import Figure  # only when drawing: `import gsnr_stats` stays light

    missing = [c for c in ("gsnr_mean_train", "gsnr_median_train", "osgr_train", "osgr_test",
                           "gap_measured", "gap_theory") if c not in table.columns]
    if missing:
        raise ValueError(f"compare_figure: the table lacks columns {missing}; pass the "
                         "DataFrame gs.compare returns")
    names = [str(i) for i in table.index]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(10.0, 3.3 * len(names)), 4.0), layout="constrained")
    ax_g, ax_r, ax_d = fig.subplots(1, 3)
    w = 0.38

    def pos(v: Any) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)

    ax_g.bar(x - w / 2, pos(table["gsnr_mean_train"]), w, label="mean")
    ax_g.bar(x + w / 2, pos(table["gsnr_median_train"]), w, label="median")
    ax_g.set_yscale("log")
    ax_g.set_title("GSNR $r_j$ (train)")
    lo, hi = -1.0, 1.1  # R <= 1; far negative values are clipped and labelled instead
    for dx, col, lab in ((-w / 2, "osgr_train", "from train"), (w / 2, "osgr_test", "from test")):
        v = table[col].to_numpy(float)
        ax_r.bar(x + dx, np.clip(v, lo, hi), w, label=lab)
        for xi, vi in zip(x + dx, v, strict=True):
            if not np.isfinite(vi) or vi < lo:
                ax_r.annotate(f"{vi:.3g}", (xi, lo if np.isfinite(vi) else 0.0),
                              ha="center", va="bottom", fontsize="x-small", rotation=90)
    for level in (0.0, 1.0):
        ax_r.axhline(level, color="0.5", lw=0.8, ls="--" if level else "-")
    ax_r.set_ylim(lo - 0.05, hi)
    ax_r.set_title("theoretical OSGR $R(n)$ (see the table's note)")
    ax_d.bar(x - w / 2, table["gap_measured"].to_numpy(float), w, label="measured")
    theory = table["gap_theory"].to_numpy(float)
    if np.isfinite(theory).any():
        ax_d.bar(x + w / 2, theory, w, label="theory (lr, steps)")
    ax_d.axhline(0.0, color="0.5", lw=0.8)
    ax_d.set_title("generalization gap (test - train loss)")
    for ax in (ax_g, ax_r, ax_d):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
