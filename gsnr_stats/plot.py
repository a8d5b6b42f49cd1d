"""Figures of GSNR, OSGR and generalization gaps from the Datasets of :mod:`gsnr_stats.theory`.

Every function builds a :class:`matplotlib.figure.Figure` directly (no ``pyplot``: no global
figure registry, no GUI backend, safe in threads and batch jobs) and returns it; save it
with ``fig.savefig(path)``. :func:`save_all` writes the standard set as PNG files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from . import groups, theory
from ._dsutil import default_n, output_dir, require_stats
from ._training import _lambda_rule, _lr_problem

__all__ = [
    "gap_plot",
    "gsnr_histogram",
    "gsnr_trajectories",
    "osgr_plot",
    "osgr_scatter",
    "gap_or_reason",
    "save_all",
    "train_vs_test_gsnr",
]


def _figure(
    ncols: int = 1, *, width: float = 5.5, height: float = 4.0
) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _colors(k: int) -> list[Any]:
    """``k`` distinct colours: matplotlib's default cycle up to 10 (today's look), else
    evenly spaced samples of a continuous colour map (no two groups share a colour)."""
    if k <= 10:
        return [f"C{i}" for i in range(k)]
    from matplotlib import colormaps

    return [colormaps["turbo"](x) for x in np.linspace(0.03, 0.97, k)]


def _legend(ax: Axes, k: int) -> None:
    """Inside the axes for up to 12 entries, else outside on the right, in columns of 20."""
    if k <= 12:
        ax.legend(fontsize="small")
    else:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, ncol=int(np.ceil(k / 20)))


def _splits(stats: xr.Dataset, split: str | Sequence[str] | None) -> list[str]:
    if split is None:
        return [str(s) for s in stats["split"].values]
    return [split] if isinstance(split, str) else list(split)


def _positive(x: np.ndarray) -> np.ndarray:
    """Values a log axis can show (others become NaN, i.e. gaps in the line)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x) & (x > 0), x, np.nan)


def gsnr_trajectories(
    stats: xr.Dataset,
    by: str = "layer",
    *,
    split: str | Sequence[str] | None = "train",
    band: tuple[float, float] = (0.25, 0.75),
    debias: bool = False,
) -> Figure:
    """Median GSNR of each group over training, with a quantile band; log y axis.

    Parameters
    ----------
    stats : xarray.Dataset
        Moments from :func:`gsnr_stats.reduce`.
    by : {"layer", "tensor", "model"}
        One line per group.
    split : str, list or None
        One panel per split (``None``: all).
    band : (float, float)
        Quantile levels of the shaded band.
    debias : bool
        Plot ``r − 1/N`` (non-positive values are not drawn on the log axis).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per split, one line (and band) per group.
    """
    names = _splits(stats, split)
    ag = groups.aggregate(stats, by=by, quantiles=band, split=names, debias=debias)
    fig, axes = _figure(len(names))
    steps = ag["step"].values
    for ax, sp in zip(axes, names, strict=True):
        a = ag.sel(split=sp)
        cols = _colors(a.sizes["group"])
        for g, col in zip(a["group"].values, cols, strict=True):
            med = _positive(a["gsnr_median"].sel(group=g).values)
            (line,) = ax.plot(steps, med, marker="o", ms=3, label=str(g), color=col)
            lo = _positive(a["gsnr_quantile"].sel(group=g).isel(quantile=0).values)
            hi = _positive(a["gsnr_quantile"].sel(group=g).isel(quantile=-1).values)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("GSNR r - 1/N" if debias else "GSNR r")
        ax.set_title(f"median GSNR by {by} ({sp}), band {band[0]:g}-{band[1]:g}")
        _legend(ax, a.sizes["group"])
    return fig


def gsnr_histogram(
    stats: xr.Dataset,
    steps: Sequence[int] | None = None,
    *,
    split: str = "train",
    bins: int = 50,
    debias: bool = False,
) -> Figure:
    """Histogram of log10 per-parameter GSNR at a few checkpoints.

    Parameters
    ----------
    stats : xarray.Dataset
    steps : list of int, optional
        Checkpoints; default first, middle and last.
    split : str
    bins : int
    debias : bool
        Use ``r − 1/N``; non-positive and non-finite values are counted in the legend.

    Returns
    -------
    matplotlib.figure.Figure
        One axes, one step-histogram per checkpoint.
    """
    all_steps = stats["step"].values
    if steps is None:
        steps = list(dict.fromkeys(int(all_steps[i]) for i in (0, len(all_steps) // 2, -1)))
    var = "gsnr_debiased" if debias else "gsnr"
    r = stats[var].sel(split=split)
    vals = {int(s): r.sel(step=s).values for s in steps}
    logs = {s: np.log10(v[np.isfinite(v) & (v > 0)]) for s, v in vals.items()}
    nonempty = [x for x in logs.values() if x.size]
    edges = np.histogram_bin_edges(np.concatenate(nonempty) if nonempty else [0.0, 1.0], bins=bins)
    fig, (ax,) = _figure()
    for (s, x), col in zip(logs.items(), _colors(len(logs)), strict=True):
        left = vals[s].size - x.size
        ax.hist(x, bins=edges, histtype="step", color=col,
                label=f"step {s}" + (f" ({left} not > 0 / finite)" if left else ""))
    ax.set_xlabel("log10 GSNR" + (" (debiased)" if debias else ""))
    ax.set_ylabel("parameters")
    ax.set_title(f"per-parameter GSNR ({split})")
    _legend(ax, len(logs))
    return fig


def _measured_var(ds: xr.Dataset, var: str | None) -> str:
    if var is not None:
        return var
    for v in ("osgr_measured", "osgr_first_order", "osgr"):
        if v in ds:
            return v
    raise ValueError("no measured OSGR variable found; pass var=")


def osgr_scatter(
    measured: xr.Dataset,
    predicted: xr.DataArray | xr.Dataset | None = None,
    *,
    var: str | None = None,
    se: str | None = "osgr_se",
    color_by: str | None = "n",
    stats: xr.Dataset | None = None,
) -> Figure:
    """Measured OSGR against the theoretical prediction, with error bars and ``y = x``.

    Parameters
    ----------
    measured : xarray.Dataset
        From :func:`~gsnr_stats.theory.osgr_probe`, :func:`~gsnr_stats.theory.osgr_first_order`
        or :func:`~gsnr_stats.theory.osgr_trajectory`.
    predicted : DataArray or Dataset, optional
        Theory broadcastable against ``measured[var]``; default ``measured["osgr_theory"]``
        (present when the estimator was given ``stats``). A Dataset: its ``osgr_theory`` or
        ``osgr``.
    var : str, optional
        Measured variable (default ``osgr_measured``, else ``osgr_first_order``).
    se : str or None
        Standard-error variable for vertical error bars when ``stats`` is not given (the
        estimator's own error only: the y label says so).
    stats : xarray.Dataset, optional
        Moments of both pools with blocks: the error bars are then the pool-aware
        ``se_total`` of :func:`gsnr_stats.osgr_agreement` (a first-order measurement).
    color_by : str or None
        Coordinate whose values get separate colours (default ``n``).

    Returns
    -------
    matplotlib.figure.Figure
        One axes: one error-bar series per ``color_by`` value and the diagonal.
    """
    v = _measured_var(measured, var)
    y = measured[v]
    if predicted is None:
        if "osgr_theory" not in measured:
            raise ValueError("measured has no osgr_theory: pass predicted= or stats to the "
                             "estimator")
        x = measured["osgr_theory"]
    elif isinstance(predicted, xr.Dataset):
        x = predicted["osgr_theory" if "osgr_theory" in predicted else "osgr"]
    else:
        x = predicted
    if stats is not None:
        from .agreement import osgr_agreement

        e = osgr_agreement(measured, stats, var=v)["se_total"]
        err_text = "± pool-aware SE_total"
    elif se is not None and se in measured:
        e = measured[se]
        err_text = f"± {se} (estimator only, no pool error: pass stats=)"
    else:
        e = xr.zeros_like(y)
        err_text = "no error bars"
    x, y, e = xr.broadcast(x, y, e)
    c = None
    if color_by is not None and color_by in y.coords:
        c = xr.broadcast(y[color_by], y)[0].values.ravel()
    xv, yv, ev = (a.values.ravel() for a in (x, y, e))
    ok = np.isfinite(xv) & np.isfinite(yv)
    fig, (ax,) = _figure(height=5.0, width=5.0)
    groups = [None] if c is None else list(dict.fromkeys(c[ok].tolist()))
    for g in groups:
        sel = ok if g is None else ok & (c == g)
        ax.errorbar(xv[sel], yv[sel], yerr=np.where(np.isfinite(ev[sel]), ev[sel], 0.0),
                    fmt="o", ms=4, capsize=2,
                    label=v if g is None else f"{color_by} = {g}")
    lim = [np.nanmin(np.r_[xv[ok], yv[ok], 0.0]), np.nanmax(np.r_[xv[ok], yv[ok], 1.0])]
    ax.plot(lim, lim, color="0.4", ls="--", lw=1, label="y = x")
    ax.set_xlabel("OSGR, theory")
    ax.set_ylabel(f"OSGR, measured ({v})\n{err_text}", fontsize="small")
    ax.set_title("measured vs predicted OSGR")
    ax.legend(fontsize="small")
    return fig


def _lines_over_step(ax: Axes, da: xr.DataArray, label: str, **kw: Any) -> list[Any]:
    """One line over ``step`` for every combination of the other dims."""
    other = [d for d in da.dims if d != "step"]
    stacked = da.transpose("step", *other).values.reshape(da.sizes["step"], -1)
    if other:
        idx = da.isel(step=0, drop=True).stack(_l=other)["_l"].values
    else:
        idx = [None]
    lines = []
    cols = _colors(len(idx))
    for i, key in enumerate(idx):
        suffix = "" if key is None else " (" + ", ".join(
            f"{d}={k}" for d, k in zip(other, key if isinstance(key, tuple) else (key,),
                                       strict=True)) + ")"
        lines += ax.plot(da["step"].values, stacked[:, i], label=label + suffix,
                         **({"color": cols[i]} | kw))
    return lines


def gap_plot(gap_ds: xr.Dataset, *, offset: bool = True) -> Figure:
    """Theoretical vs measured generalization gap over training.

    Parameters
    ----------
    gap_ds : xarray.Dataset
        From :func:`~gsnr_stats.theory.accumulated_gap` (or
        :func:`~gsnr_stats.theory.one_step_gap`), optionally through
        :func:`~gsnr_stats.theory.jackknife` (``gap_theory_se`` is drawn as a band).
    offset : bool
        Start the theory at the measured gap of the first checkpoint
        (``gap_theory_offset``), so that both curves share the origin.

    Returns
    -------
    matplotlib.figure.Figure
        One axes: a line per ``n`` (and split) for the theory, one for the measurement.
        A Dataset without a theory (:func:`~gsnr_stats.theory.measured_gap`, e.g. when no
        learning rate is recorded) draws the measurement alone and says why in the title.
    """
    tv = "gap_theory_offset" if offset and "gap_theory_offset" in gap_ds else "gap_theory"
    fig, (ax,) = _figure()
    lines = _lines_over_step(ax, gap_ds[tv], "theory") if tv in gap_ds else []
    if tv in gap_ds and "gap_theory_se" in gap_ds:
        se = gap_ds["gap_theory_se"].transpose(*gap_ds[tv].dims)
        mid = gap_ds[tv]
        lo = (mid - 2 * se).transpose("step", ...).values.reshape(mid.sizes["step"], -1)
        hi = (mid + 2 * se).transpose("step", ...).values.reshape(mid.sizes["step"], -1)
        for i, line in enumerate(lines):
            ax.fill_between(gap_ds["step"].values, lo[:, i], hi[:, i], color=line.get_color(),
                            alpha=0.2, linewidth=0)
    if "gap_measured" in gap_ds and np.isfinite(gap_ds["gap_measured"]).any():
        ax.plot(gap_ds["step"].values, gap_ds["gap_measured"].values, color="k", marker="o",
                ms=3, label="measured")
    ax.set_xlabel("step")
    ax.set_ylabel("generalization gap (loss)")
    split = gap_ds.attrs.get("v_split")
    title = "generalization gap" + (f", V from {split!r}" if split else "")
    if tv not in gap_ds:
        title += "\n" + gap_ds.attrs.get("theory_missing", "theory not computed")
    ax.set_title(title, fontsize="medium")
    if ax.get_lines():
        ax.legend(fontsize="small")
    return fig


def osgr_plot(osgr_ds: xr.Dataset) -> Figure:
    """Theoretical OSGR R(n) over training, one line per split and n (:func:`theory.osgr`);
    with ``osgr_lo``/``osgr_hi`` (:func:`~gsnr_stats.uncertainty.osgr_ci`) a shaded band."""
    fig, (ax,) = _figure()
    da = osgr_ds["osgr"]
    if "group" in da.dims:
        da = da.isel(group=0)
    lines = _lines_over_step(ax, da, "R")
    if {"osgr_lo", "osgr_hi"} <= set(osgr_ds.data_vars):  # from osgr_ci: its band
        lo, hi = (osgr_ds[v].isel(group=0) if "group" in osgr_ds[v].dims else osgr_ds[v]
                  for v in ("osgr_lo", "osgr_hi"))
        lo = lo.transpose(*da.dims).transpose("step", ...).values.reshape(da.sizes["step"], -1)
        hi = hi.transpose(*da.dims).transpose("step", ...).values.reshape(da.sizes["step"], -1)
        level = osgr_ds.attrs.get("ci_level")
        for i, line in enumerate(lines):
            ax.fill_between(da["step"].values, lo[:, i], hi[:, i], color=line.get_color(),
                            alpha=0.2, linewidth=0,
                            label=f"{level:g} interval (osgr_ci)" if level and i == 0 else None)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("OSGR R(n), theory")
    ax.set_title("one-step generalization ratio")
    ax.legend(fontsize="small")
    return fig


def train_vs_test_gsnr(
    stats: xr.Dataset,
    *,
    train: str = "train",
    test: str = "test",
    by: str = "model",
    step: int | None = None,
) -> Figure:
    """GSNR on the training vs a held-out split.

    Left: pooled GSNR ``Σm²/Σs²`` per group over steps, solid for ``train``, dashed for
    ``test`` (log y). Right: per-parameter ``r_train`` vs ``r_test`` at ``step`` (default
    the last) on log-log axes with ``y = x``; points below the diagonal are parameters
    whose training signal outgrows the held-out one (memorisation).

    Returns
    -------
    matplotlib.figure.Figure
        Two axes.
    """
    ag = groups.aggregate(stats, by=by, quantiles=(), split=[train, test])
    fig, (ax, ax2) = _figure(2)
    steps = ag["step"].values
    cols = _colors(ag.sizes["group"])
    for g, col in zip(ag["group"].values, cols, strict=True):
        (line,) = ax.plot(steps, _positive(ag["gsnr_pooled"].sel(split=train, group=g).values),
                          label=f"{g} {train}", color=col)
        ax.plot(steps, _positive(ag["gsnr_pooled"].sel(split=test, group=g).values), ls="--",
                color=line.get_color(), label=f"{g} {test}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("pooled GSNR sum m^2 / sum s^2")
    ax.set_title(f"pooled GSNR by {by}")
    _legend(ax, 2 * ag.sizes["group"])
    st = int(steps[-1]) if step is None else int(step)
    rt = _positive(stats["gsnr"].sel(split=train, step=st).values)
    re = _positive(stats["gsnr"].sel(split=test, step=st).values)
    ok = np.isfinite(rt) & np.isfinite(re)
    ax2.scatter(re[ok], rt[ok], s=4, alpha=0.5)
    if ok.any():
        lim = [min(rt[ok].min(), re[ok].min()), max(rt[ok].max(), re[ok].max())]
        ax2.plot(lim, lim, color="0.4", ls="--", lw=1)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
    ax2.set_xlabel(f"GSNR on {test}")
    ax2.set_ylabel(f"GSNR on {train}")
    ax2.set_title(f"per-parameter GSNR at step {st} ({int(ok.sum())} params)")
    return fig


def gap_or_reason(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    split: str = "test",
    steps_per_checkpoint: int | Sequence[int] | None = None,
    lr: float | None = None,
    lr_rule: str = "nominal",
    hint: str = "pass lr=",
) -> xr.Dataset:
    """:func:`~gsnr_stats.theory.accumulated_gap`, or the measured gap alone with
    ``attrs["theory_missing"]`` saying why the theory cannot be computed (no learning rate:
    not recorded, or several optimizer groups with different ones)."""
    problem = _lr_problem(stats, hint) if lr is None else None
    if problem is None:
        try:
            return theory.accumulated_gap(stats, n, split=split, lr=lr, lr_rule=lr_rule,
                                          steps_per_checkpoint=steps_per_checkpoint)
        except ValueError as e:  # e.g. lr_rule="momentum" for Adam: a sentence, not a crash
            problem = str(e)
    gap = theory.measured_gap(stats)
    gap.attrs["theory_missing"] = f"theoretical gap: not computed — {problem}"
    gap.attrs["lambda_note"] = _lambda_rule(stats, "nominal")[1]
    return gap


def save_all(
    stats: xr.Dataset,
    outdir: str | os.PathLike[str],
    *,
    n: int | Sequence[int] | None = None,
    by: str = "layer",
    gap: xr.Dataset | None = None,
    measured: xr.Dataset | Sequence[xr.Dataset] | None = None,
    dpi: int = 110,
    steps_per_checkpoint: int | Sequence[int] | None = None,
    lr: float | None = None,
    lr_rule: str = "nominal",
) -> list[Path]:
    """Write the standard figures as PNG files into ``outdir``.

    Written when the data allow: ``gsnr_trajectories.png``, ``gsnr_histogram.png``,
    ``osgr.png``, ``train_vs_test_gsnr.png`` (``train`` and ``test`` splits),
    ``gap.png`` (``gap`` given, or computed by
    :func:`~gsnr_stats.theory.accumulated_gap` when ``train``/``test`` losses are recorded;
    the measured gap alone, saying why, without a learning rate), ``osgr_scatter[_i].png``
    (one per ``measured``).

    Parameters
    ----------
    stats : xarray.Dataset
    outdir : path
        Created if missing.
    n : int or sequence, optional
        Training-set size(s) for the theory; default the largest sample count of the
        ``train`` split (the training-set size when the whole set was dumped).
    by : str
        Grouping of the trajectory figure.
    gap : xarray.Dataset, optional
    measured : Dataset or list of them, optional
        Measured-OSGR Datasets carrying ``osgr_theory``.
    dpi : int
    steps_per_checkpoint, lr, lr_rule
        For the computed gap, as in :func:`~gsnr_stats.theory.accumulated_gap`: the
        optimizer steps between checkpoints come from the ``optimizer_step`` coordinate,
        else ``steps_per_checkpoint``, else the ``step`` labels (with a
        :class:`~gsnr_stats.errors.StepSpacingWarning`).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    require_stats(stats, "gs.plot.save_all")
    out = output_dir(outdir, "gs.plot.save_all: outdir")
    splits = [str(s) for s in stats["split"].values]
    if n is None:
        n = default_n(stats)
    figs: list[tuple[str, Figure]] = [
        ("gsnr_trajectories", gsnr_trajectories(stats, by=by, split=None)),
        ("gsnr_histogram", gsnr_histogram(stats, split="train" if "train" in splits
                                          else splits[0])),
        ("osgr", osgr_plot(theory.osgr(stats, n))),
    ]
    both = {"train", "test"} <= set(splits)
    if both:
        figs.append(("train_vs_test_gsnr", train_vs_test_gsnr(stats)))
    if gap is None and both and "loss_mean" in stats and np.isfinite(stats["loss_mean"]).any():
        gap = gap_or_reason(stats, n, steps_per_checkpoint=steps_per_checkpoint, lr=lr,
                            lr_rule=lr_rule)
    if gap is not None and ("gap_theory" in gap or np.isfinite(gap["gap_measured"]).any()):
        figs.append(("gap", gap_plot(gap)))
    if measured is not None:
        ms = [measured] if isinstance(measured, xr.Dataset) else list(measured)
        for i, m in enumerate(ms):
            figs.append((f"osgr_scatter_{i}" if len(ms) > 1 else "osgr_scatter", osgr_scatter(m)))
    paths = []
    for name, fig in figs:
        p = out / f"{name}.png"
        fig.savefig(p, dpi=dpi)
        paths.append(p)
    return paths
