"""Closed forms on moments: theoretical OSGR, generalization gaps and the noise scale.

Pure functions on the moments Dataset built by :func:`gsnr_stats.reduce` (dims ``step``,
``split``, ``param`` and, with ``reduce(blocks=K)``, ``block``): they never read a store.
Group aggregates live in :mod:`.groups`, jackknife intervals in :mod:`.uncertainty`, and
the measured OSGR estimators (the only analytics that read stores) in :mod:`.estimators`.

Notation (``docs/theory.md``, section 1). Per parameter ``j`` of a record of ``N``
samples: mean ``m_j``, variance ``s_j²`` (``ddof`` from ``stats.attrs``), and

.. math::

    G_j = m_j^2 - s_j^2/N \\;(\\text{debiased, default}) \\text{ or } m_j^2,
    \\qquad V_j = s_j^2,

estimates of the squared expected gradient :math:`\\tilde g_j^2` and of the per-sample
gradient variance :math:`\\rho_j^2`. ``n`` is always the size of the training set (or
batch) of the optimizer step being modelled, never ``N``.

Parameters with non-finite moments (``s²=0, m=0`` dead parameters come out as ``G=V=0``;
records or parameters without data as NaN) are excluded from sums and counted in the
outputs (``n_used``, ``n_excluded``, ``n_dead``, ``n_inf``); nothing is dropped silently.

The gaps count optimizer steps between checkpoints (:func:`step_spacing`: the recorded
``optimizer_step``, else ``steps_per_checkpoint=``, else the ``step`` labels with a
:class:`~gsnr_stats.errors.StepSpacingWarning`) and say which λ they use for the recorded
optimizer (``attrs["lambda_note"]``). Every output that can be negative or NaN for a known
reason carries it in ``attrs["reason"]`` (``docs/theory.md``, "Negative and NaN outputs").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import _reasons
from ._dsutil import (
    _ONE,
    _base_coords,
    _ddof,
    _n_coord,
    _n_grid,
    _select_splits,
    _signal_noise,
    require_stats,
)
from ._training import LR_RULES, _lambda_rule, _lr_by_step, _lr_problem, _optimizer, step_spacing
from .groups import GroupBy, _Groups, _with_groups

__all__ = [
    "accumulated_gap",
    "measured_gap",
    "noise_scale",
    "one_step_gap",
    "osgr",
    "osgr_param",
    "step_spacing",
    "LR_RULES",
]

# Compatibility shim (PEP 562): names that lived in this module before the split (issue 11)
# resolve lazily from their new home on first attribute access, so `theory.osgr_first_order`
# and `from gsnr_stats.theory import jackknife` keep working while this module imports
# none of estimators/uncertainty (they import it) and stays free of the store.
_MOVED: dict[str, tuple[str, str]] = {
    **{name: ("groups", name) for name in ("aggregate",)},
    **{name: ("uncertainty", name) for name in (
        "aggregate_ci", "jackknife", "leave_one_block_out", "osgr_ci", "_chan", "_loo_dataset",
        "_ratio_jackknife")},
    **{name: ("estimators", name) for name in (
        "osgr_first_order", "osgr_pools", "osgr_probe", "osgr_trajectory", "_draw_subsets",
        "_first_order_core", "_membership", "_record_reader", "_theory_at")},
    "_count_per_param": ("_dsutil", "_count_per_param"),
    "_finalize_moments": ("kernels", "finalize_moments"),
    "_subset_sums": ("kernels", "subset_sums"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _MOVED[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(f".{module}", __package__), attr)


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED})


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _resolve_lr(
    stats: xr.Dataset, lr: float | Callable[[np.ndarray], Any] | None, steps: np.ndarray
) -> np.ndarray:
    if lr is None:
        out = _lr_by_step(stats)
        problem = _lr_problem(stats)
        if problem is not None:
            raise ValueError(f"theoretical gap: {problem}")
        return out
    if callable(lr):
        return _call_schedule(lr, steps)
    return np.full(steps.shape, float(lr))


def _call_schedule(lr: Callable[[np.ndarray], Any], u: np.ndarray) -> np.ndarray:
    """Evaluate a schedule ``lr(step)`` on an int array; falls back to one call per step."""
    try:
        out = np.asarray(lr(u), dtype=np.float64)
        if out.shape == u.shape:
            return out
    except (TypeError, ValueError):
        pass
    return np.array([float(lr(int(x))) for x in u], dtype=np.float64)


# --------------------------------------------------------------------------------------
# OSGR theory
# --------------------------------------------------------------------------------------


def osgr(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    split: str | Sequence[str] | None = None,
    debias: bool = True,
    by: GroupBy = None,
) -> xr.Dataset:
    """Theoretical one-step generalization ratio R(n) (Liu et al. 2020, eq. 19).

    .. math::

        R(n) = \\frac{\\sum_j G_j}{\\sum_j \\left(G_j + V_j/n\\right)}
             = 1 - \\frac1n \\sum_j \\frac{W_j}{r_j + 1/n},\\qquad
        G_j = m_j^2 - \\frac{s_j^2}{N},\\; V_j = s_j^2,\\; r_j = G_j/V_j .

    All ``r_j = r`` gives ``R = n r/(n r + 1)``; ``n → ∞`` gives ``R → 1``.

    Parameters
    ----------
    stats : xarray.Dataset
        Moments from :func:`gsnr_stats.reduce` (``mean``, ``var``, ``count``).
    n : int or sequence of int
        Training-set (batch) sizes of the modelled step; becomes the ``n`` dimension.
    split : str or list of str, optional
        Splits whose moments estimate ``G``, ``V``; default all. Use a held-out split when
        the training split is overfit (its mean gradient shrinks below the noise).
    debias : bool
        ``G_j = m_j² − s_j²/N`` (unbiased for the squared expected gradient) or ``m_j²``.
    by : {None, "model", "tensor", "layer"} or a param coordinate name
        Restrict the sums to groups of parameters (adds a ``group`` dimension).

    Returns
    -------
    xarray.Dataset
        ``osgr`` (step, split, n[, group]); ``signal`` ΣG, ``noise`` ΣV, ``n_used``,
        ``n_excluded`` (non-finite moments), ``n_dead`` (``m=s²=0``), dims (step, split[, group]).
        ``osgr`` is NaN where the denominator ΣG + ΣV/n ≤ 0 (possible only with
        ``debias=True`` and ``n > N``: the estimate of E|g_D|² itself failed) or no parameter
        is usable. A negative value (ΣG < 0 after debiasing) is reported as is. Why any
        value is negative or NaN is in ``ds["osgr"].attrs["reason"]`` (and ``ds.attrs["note"]``);
        a negative ΣG also raises :class:`~gsnr_stats.errors.SignalBelowNoiseWarning` (on a
        fitted training split: use a held-out split).

    Examples
    --------
    >>> R = osgr(stats, n=[64, 1024], split="test")      # doctest: +SKIP
    >>> R["osgr"].sel(n=64)                              # doctest: +SKIP
    """
    ds = _osgr(require_stats(stats, "gs.osgr"), n, split=split, debias=debias, by=by)
    _reasons.warn_below_noise(ds, "osgr", "osgr")
    return ds


def _osgr(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    split: str | Sequence[str] | None = None,
    debias: bool = True,
    by: GroupBy = None,
) -> xr.Dataset:
    """:func:`osgr` without the warning (for callers that warn once, e.g. the jackknife)."""
    st = _select_splits(stats, split)
    ns = _n_grid(n)
    G, V, valid = _signal_noise(st, debias)
    mean = st["mean"].transpose("step", "split", "param").values
    groups = _Groups(st, by)
    sG, sV = groups.sum(G), groups.sum(V)
    used = groups.sum(valid.astype(np.float64)).astype(np.int64)
    with np.errstate(invalid="ignore"):
        dead = valid & (V == 0) & (mean == 0)
    n_dead = groups.sum(dead.astype(np.float64)).astype(np.int64)
    excluded = groups.sum((~valid).astype(np.float64)).astype(np.int64)
    den = sG[:, :, None, :] + sV[:, :, None, :] / ns[None, None, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.where((den > 0) & (used[:, :, None, :] > 0), sG[:, :, None, :] / den, np.nan)
        neg_R, neg_G = R < 0, sG < 0
    failed = np.isnan(R) & (used[:, :, None, :] > 0)
    empty = np.isnan(R) & (used[:, :, None, :] == 0)
    g = groups if by is not None else None
    d3, R = _with_groups(R, g, ("step", "split", "n"))
    d2 = ("step", "split") if g is None else ("step", "split", "group")
    if g is None:
        sG, sV, used, excluded, n_dead, neg_G = (
            a[..., 0] for a in (sG, sV, used, excluded, n_dead, neg_G))
        neg_R, failed, empty = (a[..., 0] for a in (neg_R, failed, empty))
    coords = {**_base_coords(st), "n": _n_coord(ns)}
    if g is not None:
        coords["group"] = g.coord()
    kind = "debiased m^2 - s^2/N" if debias else "m^2"
    splits = [str(s) for s in st["split"].values]
    why = _reasons.Reasons({"osgr": d3, "signal": d2}, {**coords, "n": ns})
    why.add_below_noise("osgr", neg_R, splits)
    why.add_below_noise("signal", neg_G, splits)
    why.add("osgr", failed, "sum G + sum V/n <= 0: n exceeds the record's N while the debiased "
                            "signal is negative, so the estimate of E|g_D|^2 itself failed")
    why.add("osgr", empty, _reasons.NO_PARAMS)
    ds = xr.Dataset(
        {
            "osgr": (d3, R, {"long_name": "one-step generalization ratio R(n), theory", **_ONE}),
            "signal": (d2, sG, {"long_name": f"sum_j G_j, squared mean gradient ({kind})"}),
            "noise": (d2, sV, {"long_name": "sum_j V_j = sum_j s_j^2, per-sample gradient "
                                            "variance"}),
            "n_used": (d2, used, {"long_name": "parameters with finite moments", **_ONE}),
            "n_excluded": (d2, excluded, {"long_name": "parameters excluded (non-finite "
                                                       "moments)", **_ONE}),
            "n_dead": (d2, n_dead, {"long_name": "dead parameters (m = s^2 = 0)", **_ONE}),
        },
        coords=coords,
    )
    ds.attrs.update({"title": "theoretical OSGR (Liu et al. 2020, eq. 19)",
                     "debias": int(debias), "ddof": _ddof(stats), "group_by": str(by)})
    return why.attach(ds)


def osgr_param(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    split: str | Sequence[str] | None = None,
    debias: bool = True,
    by: GroupBy = None,
) -> xr.Dataset:
    """Per-parameter OSGR ``R_j`` and the weights ``W_j`` that average them into R(n).

    .. math::

        R_j = \\frac{r_j}{r_j + 1/n} = \\frac{G_j}{G_j + V_j/n},\\qquad
        W_j = \\frac{G_j + V_j/n}{\\sum_k (G_k + V_k/n)},\\qquad
        R(n) = \\sum_j W_j R_j .

    Parameters
    ----------
    stats, n, split, debias
        As in :func:`osgr`.
    by : {None, "model", "tensor", "layer"}
        The sum in ``W_j`` runs over the parameter's group (default: the whole model).

    Returns
    -------
    xarray.Dataset
        ``osgr`` R_j and ``weight`` W_j (step, split, n, param), ``gsnr`` ``r_j = G_j/V_j``
        (step, split, param). Dead parameters (``G = V = 0``) give ``R_j`` NaN and weight 0;
        ``s² = 0, m ≠ 0`` gives ``r_j = +inf``, ``R_j = 1``. ``R_j`` is NaN where
        ``G_j + V_j/n ≤ 0``. Each variable's ``attrs["reason"]`` says why any of its values
        is negative or NaN (no warning: negative ``R_j`` of noisy parameters are routine).
    """
    st = _select_splits(require_stats(stats, "gs.osgr_param"), split)
    ns = _n_grid(n)
    G, V, _ = _signal_noise(st, debias)
    groups = _Groups(st, by)
    den = G[:, :, None, :] + V[:, :, None, :] / ns[None, None, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        Rj = np.where(den > 0, G[:, :, None, :] / np.where(den > 0, den, 1.0), np.nan)
        Rj = np.where(np.isnan(den), np.nan, Rj)
        tot = groups.sum(den)[..., groups.codes]
        W = np.where(np.isnan(den), np.nan, den / tot)
        r = np.where(V > 0, G / np.where(V > 0, V, 1.0),
                     np.where(V == 0, np.where(G > 0, np.inf, np.nan), np.nan))
    coords = {**_base_coords(st), "n": _n_coord(ns), "param": st["param"]}
    for c in ("tensor", "layer"):
        if c in st.coords:
            coords[c] = st[c]
    d4 = ("step", "split", "n", "param")
    why = _reasons.Reasons({"osgr": d4, "weight": d4, "gsnr": ("step", "split", "param")},
                           {**coords, "n": ns})
    with np.errstate(invalid="ignore"):
        nonfin = ~np.isfinite(G) | ~np.isfinite(V)
        dead = (G == 0) & (V == 0)
        negj = ("G_j = m_j^2 - s_j^2/N < 0: the parameter's mean gradient is below what N samples "
                "resolve (routine for noise-dominated parameters; R(n) sums over them)")
        why.add("osgr", Rj < 0, negj)
        why.add("gsnr", r < 0, negj)
        why.add("osgr", np.isnan(Rj) & (dead & ~nonfin)[:, :, None, :],
                "dead parameter (m = s^2 = 0), weight 0")
        why.add("gsnr", np.isnan(r) & dead & ~nonfin, "dead parameter (m = s^2 = 0)")
        why.add("osgr", np.isnan(Rj) & (den < 0), "G_j + V_j/n < 0 (n > N and G_j < 0)")
        why.add("weight", W < 0, "G_j + V_j/n < 0 (n > N and G_j < 0)")
        for v in ("osgr", "weight", "gsnr"):
            why.add(v, nonfin if v == "gsnr" else np.broadcast_to(nonfin[:, :, None, :], den.shape),
                    "non-finite moments (record absent, or every sample omitted)")
    ds = xr.Dataset(
        {
            "osgr": (d4, Rj, {"long_name": "per-parameter OSGR R_j = r_j/(r_j + 1/n)", **_ONE}),
            "weight": (d4, W, {"long_name": "weight W_j of R_j in R(n)", **_ONE}),
            "gsnr": (("step", "split", "param"), r,
                     {"long_name": "GSNR r_j = G_j/V_j" + (" (debiased)" if debias else ""),
                      **_ONE}),
        },
        coords=coords,
    )
    ds.attrs.update({"title": "per-parameter theoretical OSGR", "debias": int(debias),
                     "ddof": _ddof(stats), "group_by": str(by)})
    return why.attach(ds)


# --------------------------------------------------------------------------------------
# Gaps
# --------------------------------------------------------------------------------------


def _lr_reasons(why: _reasons.Reasons, var: str, mask: np.ndarray, stats: xr.Dataset,
                lr: Any) -> None:
    """Why λ is NaN at some checkpoints (``mask``), for the gap variables."""
    if lr is not None:
        why.add(var, mask, "the given lr= is NaN there")
        return
    problem = _lr_problem(stats)
    why.add(var, mask, f"no learning rate at the checkpoint: {problem or 'not recorded there'}")


def _loss_reason(stats: xr.Dataset, split: str) -> str:
    if "loss_mean" not in stats:
        return "no per-sample losses in the data (moments-only records, keep='moments')"
    return (f"no mean loss for the {split!r} record (absent, moments-only keep='moments', or "
            "written without loss=)")


def measured_gap(stats: xr.Dataset, *, train: str = "train", test: str = "test") -> xr.Dataset:
    """Measured generalization gap per checkpoint from the stored per-sample losses.

    .. math::

        \\mathrm{gap}(t) = \\bar L_{\\mathrm{test}}(\\theta_t)
                          - \\bar L_{\\mathrm{train}}(\\theta_t)

    Returns
    -------
    xarray.Dataset
        ``gap_measured``, ``loss_train``, ``loss_test`` (step); NaN where a loss is missing
        (said in ``attrs["reason"]``). Negative where the held-out loss is the lower one.
    """
    st = _select_splits(require_stats(stats, "gs.measured_gap", need=("count",)), [train, test])
    if "loss_mean" in st:
        lt = st["loss_mean"].sel(split=train, drop=True)
        le = st["loss_mean"].sel(split=test, drop=True)
    else:
        lt = le = xr.DataArray(np.full(st.sizes["step"], np.nan), dims="step")
    coords = {"step": ("step", st["step"].values, st["step"].attrs)}
    lt, le = (xr.DataArray(a.values, dims="step", coords=coords) for a in (lt, le))
    why = _reasons.Reasons()
    for sp, a in ((train, lt), (test, le)):
        why.add("gap_measured", np.isnan(a.values), _loss_reason(st, sp), detail=False)
        why.add(f"loss_{'train' if sp == train else 'test'}", np.isnan(a.values),
                _loss_reason(st, sp), detail=False)
    ds = xr.Dataset(
        {
            "gap_measured": (le - lt).assign_attrs(
                long_name=f"measured gap: mean {test} loss - mean {train} loss", units="1"),
            "loss_train": lt.assign_attrs(long_name=f"mean {train} loss", units="1"),
            "loss_test": le.assign_attrs(long_name=f"mean {test} loss", units="1"),
        }
    )
    ds.attrs["title"] = "measured generalization gap"
    return why.attach(ds)


def _gap_attrs(stats: xr.Dataset, lr_rule: str, factor: float, note: str, src: str | None,
               lr: Any) -> dict[str, Any]:
    """Provenance of λ and of the step spacing, for the report and the reader."""
    opt = _optimizer(stats)
    lr_src = ("lr= given" if lr is not None else "recorded learning rate (stats['lr'])")
    out = {"lr_rule": lr_rule, "lambda_factor": factor, "lambda_note": note,
           "lr_source": lr_src, "optimizer_class": opt["class"] if opt else "unknown"}
    if src is not None:
        out["step_spacing"] = src
    return out


def one_step_gap(
    stats: xr.Dataset,
    n: int | Sequence[int],
    lr: float | Callable[[np.ndarray], Any] | None = None,
    *,
    split: str | Sequence[str] | None = None,
    lr_rule: str = "nominal",
    steps_per_checkpoint: int | Sequence[int] | None = None,
) -> xr.Dataset:
    """Expected one-step gap growth (Liu et al. 2020, eq. 14), next to the measured one.

    .. math::

        \\mathbb E\\left[\\Delta L[D] - \\Delta L[D']\\right] \\approx
        \\frac{\\lambda}{n} \\sum_j V_j ,\\qquad V_j = s_j^2 .

    Parameters
    ----------
    stats : xarray.Dataset
        Moments (``var``, ``lr``, ``loss_mean``).
    n : int or sequence of int
        Training-set (batch) size.
    lr : float, callable or None
        Learning rate; ``None`` uses ``stats['lr']`` (the ``train`` record's, else any);
        a callable is evaluated at each checkpoint's optimizer step (:func:`step_spacing`).
    split : str or list, optional
        Splits whose ``V`` is used (default all).
    lr_rule : {"nominal", "momentum"}
        λ = the learning rate (default), or SGD momentum's effective long-run step
        ``lr (1 − dampening)/(1 − μ)`` from ``attrs["optimizer"]`` (``docs/theory.md``,
        "Which λ").
    steps_per_checkpoint : int or sequence of int, optional
        Optimizer steps between checkpoints when ``optimizer_step`` is not recorded; see
        :func:`step_spacing` (the recorded ``optimizer_step`` wins over the ``step`` labels).

    Returns
    -------
    xarray.Dataset
        ``gap_theory`` (step, split, n); ``gap_measured`` (step): the measured gap's growth
        per optimizer step over the interval starting at each checkpoint,
        ``(gap(t_{k+1}) − gap(t_k)) / (t_{k+1} − t_k)`` in optimizer steps (NaN at the last
        checkpoint or without ``train``/``test`` losses); ``lr`` (step), the nominal rate.
        ``attrs``: ``lambda_note`` (the λ used, in words), ``lr_rule``, ``lambda_factor``,
        ``optimizer_class``, ``step_spacing``; ``attrs["reason"]`` where NaN.
    """
    st = _select_splits(require_stats(stats, "gs.one_step_gap", need=("var", "count")), split)
    ns = _n_grid(n)
    steps = st["step"].values.astype(np.int64)
    factor, note = _lambda_rule(stats, lr_rule)
    has_loss = "loss_mean" in stats and {"train", "test"} <= {str(s) for s in stats["split"].values}
    need = steps.size > 1 and (has_loss or callable(lr))
    pos, src = step_spacing(st, steps_per_checkpoint, warn=need, what="one_step_gap",
                            stacklevel=3)
    lam = _resolve_lr(stats, lr, pos)
    _, V, _ = _signal_noise(st, False)
    sV = np.nansum(V, axis=-1)
    sV = np.where(np.isfinite(V).any(axis=-1), sV, np.nan)
    gap = factor * lam[:, None, None] * sV[:, :, None] / ns[None, None, :]
    meas = np.full(steps.shape, np.nan)
    if has_loss:
        g = measured_gap(stats.sel(step=st["step"]))["gap_measured"].values
        if steps.size > 1:
            meas[:-1] = np.diff(g) / np.diff(pos)
    coords = {"step": ("step", steps, st["step"].attrs), "split": st["split"],
              "n": _n_coord(ns)}
    why = _reasons.Reasons({"gap_theory": ("step", "split", "n"), "gap_measured": ("step",),
                            "lr": ("step",)}, {**coords, "step": steps, "n": ns})
    _lr_reasons(why, "gap_theory", np.broadcast_to(np.isnan(lam)[:, None, None], gap.shape),
                stats, lr)
    _lr_reasons(why, "lr", np.isnan(lam), stats, lr)
    why.add("gap_theory", np.broadcast_to(np.isnan(sV)[:, :, None], gap.shape),
            "no finite variance in the record (absent, or every sample omitted)")
    last = np.zeros(steps.shape, dtype=bool)
    last[-1:] = True
    why.add("gap_measured", last, "growth over the interval from this checkpoint to the next: "
                                  "none after the last")
    if not has_loss:
        why.add("gap_measured", ~last, "needs the mean losses of 'train' and 'test' records")
    ds = xr.Dataset(
        {
            "gap_theory": (("step", "split", "n"), gap,
                           {"long_name": "one-step gap lambda * sum_j V_j / n, theory", **_ONE}),
            "gap_measured": ("step", meas,
                             {"long_name": "measured gap growth per optimizer step", **_ONE}),
            "lr": ("step", lam, {"long_name": "learning rate (nominal)", **_ONE}),
        },
        coords=coords,
    )
    ds.attrs["title"] = "one-step generalization gap (Liu et al. 2020, eq. 14)"
    ds.attrs.update(_gap_attrs(stats, lr_rule, factor, note, src, lr))
    return why.attach(ds)


def accumulated_gap(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    split: str = "test",
    method: str = "piecewise",
    lr: float | Callable[[np.ndarray], Any] | None = None,
    steps_per_checkpoint: int | Sequence[int] | None = None,
    lr_rule: str = "nominal",
) -> xr.Dataset:
    """Accumulated theoretical gap over training, next to the measured gap.

    .. math::

        \\mathrm{gap}(T) \\approx \\sum_{t_0 \\le u < T} \\frac{\\lambda_u}{n}
        \\sum_j V_j(u),

    where ``u`` counts optimizer steps and ``V(u)`` between checkpoints ``t_k ≤ u < t_{k+1}``
    is held at ``V(t_k)`` (``method="piecewise"``) or interpolated linearly and evaluated at
    the middle of each step, ``u + 1/2`` (``method="trapezoid"``: with constant λ an interval
    contributes ``λ Δ (V_k + V_{k+1}) / (2n)``). ``gap(t_0) = 0``: the gap before the first
    checkpoint is unknown; compare increments with the measured gap, whose value at ``t_0``
    is added as ``gap_theory_offset`` for plots. First order in λ; see ``docs/theory.md`` for
    why it over-predicts a fixed training set's gap.

    The optimizer steps Δ between checkpoints come from :func:`step_spacing`: the
    ``optimizer_step`` coordinate when every checkpoint has one (it wins when it disagrees
    with the ``step`` labels), else ``steps_per_checkpoint``, else the ``step`` labels with
    a :class:`~gsnr_stats.errors.StepSpacingWarning` (epoch labels would make the gap
    ``steps per epoch`` times too small).

    Parameters
    ----------
    stats : xarray.Dataset
        Moments with ``var`` (and ``lr``, ``loss_mean`` for defaults and the measured gap;
        ``optimizer_step`` and ``attrs["optimizer"]`` when recorded).
    n : int or sequence of int
        Training-set size (the ``n`` of the per-step formula).
    split : str
        Split whose ``V_j = s_j²`` estimates the per-sample noise ρ². Default ``"test"``: a
        held-out split is unbiased for ρ² of the data distribution, while the training
        split's variance shrinks as the model memorises it.
    method : {"piecewise", "trapezoid"}
        How ``V`` varies between checkpoints.
    lr : float, callable or None
        ``None``: the recorded learning rate at each checkpoint, held until the next;
        a float: constant; a callable: the schedule ``lr(u)``, evaluated at every optimizer
        step ``u`` (the ``optimizer_step`` values, or ``step[0]`` + cumulative steps).
    steps_per_checkpoint : int or sequence of int, optional
        Optimizer steps between consecutive checkpoints when ``optimizer_step`` is not
        recorded: an int for every interval, or one value per interval (length S − 1).
    lr_rule : {"nominal", "momentum"}
        λ = the (nominal) learning rate, the default; or, for SGD with momentum μ and
        dampening d (from ``attrs["optimizer"]``), the effective long-run step
        ``lr (1 − d)/(1 − μ)``. Adam and other adaptive optimizers: nominal only (no scalar
        λ exists; ``attrs["lambda_note"]`` says so).

    Returns
    -------
    xarray.Dataset
        ``gap_theory`` (step, n), ``gap_measured`` (step) (NaN without train/test losses),
        ``gap_theory_offset`` = ``gap_theory`` + measured gap at the first checkpoint,
        ``noise`` ΣV (step), ``lr`` (step, nominal); coordinate ``optimizer_step`` (the
        optimizer step used for each checkpoint). Checkpoints where ``V`` is missing are
        skipped (the previous ``V`` is held across them) and get NaN. ``attrs``:
        ``lambda_note`` (which λ, in words, naming the optimizer), ``lr_rule``,
        ``lambda_factor``, ``optimizer_class``, ``step_spacing``; each variable's
        ``attrs["reason"]`` says why any value is NaN.
    """
    require_stats(stats, "gs.accumulated_gap", need=("var", "count"))
    if method not in ("piecewise", "trapezoid"):
        raise ValueError(f"method must be 'piecewise' or 'trapezoid', got {method!r}")
    ns = _n_grid(n)
    st = _select_splits(stats, [split])
    steps = stats["step"].values.astype(np.int64)
    S = steps.size
    factor, note = _lambda_rule(stats, lr_rule)
    _, V, _ = _signal_noise(st, False)
    sV = np.where(np.isfinite(V[:, 0]).any(axis=-1), np.nansum(V[:, 0], axis=-1), np.nan)
    opt_step, src = step_spacing(stats, steps_per_checkpoint, what="accumulated_gap",
                                 stacklevel=3)
    pos = opt_step - opt_step[0] if S else opt_step
    if callable(lr):
        lam_ck = _call_schedule(lr, opt_step)
    else:
        lam_ck = _resolve_lr(stats, lr, steps)
    ok = np.flatnonzero(np.isfinite(sV))
    acc = np.full(S, np.nan)
    if ok.size:
        acc[ok[0]] = 0.0
        total = 0.0
        for a, b in zip(ok[:-1], ok[1:], strict=True):
            p0, p1 = int(pos[a]), int(pos[b])
            u = np.arange(p0, p1, dtype=np.int64)
            lam = (_call_schedule(lr, opt_step[0] + u) if callable(lr)
                   else np.full(u.size, lam_ck[a]))
            if method == "piecewise":
                v = np.full(u.size, sV[a])
            else:
                v = sV[a] + (sV[b] - sV[a]) * (u - p0 + 0.5) / (p1 - p0)
            total += factor * float(np.sum(lam * v))
            acc[b] = total
    gap = acc[:, None] / ns[None, :]
    meas = np.full(S, np.nan)
    has_loss = "loss_mean" in stats and {"train", "test"} <= {str(s) for s in stats["split"].values}
    if has_loss:
        meas = measured_gap(stats)["gap_measured"].values
    first = meas[ok[0]] if ok.size else np.nan
    why = _reasons.Reasons({v: ("step", "n") for v in ("gap_theory", "gap_theory_offset")},
                           {"step": steps, "n": ns})
    for v in ("gap_theory", "gap_theory_offset"):
        why.add(v, np.broadcast_to(np.isnan(sV)[:, None], gap.shape),
                f"no finite variance on {split!r} at the checkpoint (record absent)")
        bad_lr = np.zeros(S, dtype=bool)
        if not callable(lr) and ok.size:
            starts = ok[:-1][np.isnan(lam_ck[ok[:-1]])]
            if starts.size:
                bad_lr[ok[ok > starts[0]]] = True  # NaN from the first interval without λ on
        _lr_reasons(why, v, np.broadcast_to(bad_lr[:, None], gap.shape), stats, lr)
    why.add("gap_theory_offset", np.broadcast_to(np.isnan(first), gap.shape),
            "no measured gap at the first checkpoint to start from")
    why.add("gap_measured", np.isnan(meas),
            _loss_reason(stats, "train/test") if has_loss
            else "needs the mean losses of 'train' and 'test' records", detail=False)
    ds = xr.Dataset(
        {
            "gap_theory": (("step", "n"), gap,
                           {"long_name": f"accumulated gap sum_u lambda_u sum_j V_j(u)/n, "
                                         f"theory (V from {split!r}, {method})", **_ONE}),
            "gap_measured": ("step", meas,
                             {"long_name": "measured gap: mean test loss - mean train loss",
                              **_ONE}),
            "gap_theory_offset": (("step", "n"), gap + first,
                                  {"long_name": "theory gap + measured gap at the first "
                                                "checkpoint", **_ONE}),
            "noise": ("step", sV, {"long_name": f"sum_j V_j on {split!r}"}),
            "lr": ("step", lam_ck, {"long_name": "learning rate at the checkpoint (nominal)",
                                    **_ONE}),
        },
        coords={"step": ("step", steps, stats["step"].attrs),
                "optimizer_step": ("step", opt_step,
                                   {"long_name": f"optimizer step of the checkpoint (from {src})"}),
                "n": _n_coord(ns)},
    )
    ds.attrs.update({"title": "accumulated theoretical vs measured generalization gap",
                     "v_split": split, "method": method})
    ds.attrs.update(_gap_attrs(stats, lr_rule, factor, note, src, lr))
    return why.attach(ds)


# --------------------------------------------------------------------------------------
# Noise scale
# --------------------------------------------------------------------------------------


def noise_scale(
    stats: xr.Dataset, *, split: str | Sequence[str] | None = None, by: GroupBy = None
) -> xr.Dataset:
    """Simple gradient noise scale (McCandlish et al. 2018).

    .. math::

        B_{\\mathrm{simple}} = \\frac{\\sum_j s_j^2}{\\sum_j G_j},\\qquad
        G_j = m_j^2 - s_j^2/N .

    Returns
    -------
    xarray.Dataset
        ``b_simple`` (step, split[, group]), in samples; negative or huge where the
        debiased signal ΣG is at or below its noise (an overfit or converged split; a
        :class:`~gsnr_stats.errors.SignalBelowNoiseWarning` and ``attrs["reason"]`` say
        so), NaN where ΣG = 0. Also ``signal`` ΣG and ``noise`` ΣV.
    """
    R = _osgr(require_stats(stats, "gs.noise_scale"), 1, split=split, debias=True, by=by)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = xr.where(R["signal"] != 0, R["noise"] / R["signal"], np.nan)
    b = b.where(R["n_used"] > 0)
    ds = R[["signal", "noise", "n_used", "n_excluded"]].assign(
        b_simple=b.assign_attrs(long_name="simple gradient noise scale B_simple = "
                                          "sum s^2 / sum G", units="1"))
    ds.attrs.update({"title": "gradient noise scale", "ddof": _ddof(stats), "group_by": str(by)})
    sig = R["signal"].transpose("step", "split", ...).values
    used = R["n_used"].transpose("step", "split", ...).values
    splits = [str(s) for s in R["split"].values]
    dims = tuple(R["signal"].transpose("step", "split", ...).dims)
    why = _reasons.Reasons({"b_simple": dims, "signal": dims},
                           {"step": R["step"].values, "split": R["split"].values,
                            **({"group": R["group"].values} if "group" in R.dims else {})})
    with np.errstate(invalid="ignore"):
        why.add_below_noise("b_simple", sig < 0, splits)
        why.add_below_noise("signal", sig < 0, splits)
        why.add("b_simple", (sig == 0) & (used > 0), "debiased signal exactly 0")
    why.add("b_simple", used == 0, _reasons.NO_PARAMS)
    ds["b_simple"] = ds["b_simple"].transpose(*dims)
    _reasons.warn_below_noise(R, "b_simple", "noise_scale")
    return why.attach(ds)
