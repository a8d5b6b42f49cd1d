"""``gsnr-stats report``: a one-page Markdown summary of a run, with its PNG figures.

:func:`write_report` reduces the stores (or loads a stats netCDF), computes the headline
numbers with :mod:`gsnr_stats.theory` and writes ``report.md`` next to the figures of
:func:`gsnr_stats.plot.save_all` and the reduced ``stats.nc``. Every number on the page
is printed from those functions' outputs (6 significant digits).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import estimators, groups, plot, theory, uncertainty
from ._dsutil import (
    MOMENTS,
    _n_grid,
    default_n,
    held_out_split,
    output_dir,
    require_int,
    require_paths,
    require_stats,
)
from .errors import MissingSplitError, SignalBelowNoiseWarning, StoreError, UsageError

__all__ = ["fmt", "report_numbers", "write_report"]


def fmt(x: Any) -> str:
    """How every number is printed on the page: 6 significant digits, ``nan``/``inf`` as is."""
    if isinstance(x, str):
        return x
    if isinstance(x, int | np.integer):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _load(stores: Any, blocks: int | None,
          allow_mixed_runs: bool = False) -> tuple[xr.Dataset, list[Path], dict[str, Any]]:
    """Stats and the store paths behind them (none for a netCDF input)."""
    from .reduce import reduce
    from .store import expand_paths, open_store

    if isinstance(stores, xr.Dataset):  # already reduced (gs.reduce, gs.gsnr)
        return require_stats(stores, "gs.write_report"), [], {"source": "a Dataset in memory"}
    require_paths(stores, "gs.write_report", "stores")
    items = [stores] if isinstance(stores, str | os.PathLike) else list(stores)
    if not items:
        raise StoreError("report: no input given; pass store files (HDF5) or one stats netCDF")
    if len(items) == 1 and Path(items[0]).is_dir():  # a report directory: its saved moments
        if not (Path(items[0]) / "stats.nc").is_file():
            raise UsageError(f"report: {items[0]} is a directory without stats.nc; pass store "
                             "files, a stats netCDF or a report directory")
        items = [Path(items[0]) / "stats.nc"]
    if len(items) == 1 and str(items[0]).endswith(".nc"):
        p = Path(items[0])
        if not p.is_file():
            raise FileNotFoundError(f"report: stats file {p} does not exist")
        try:
            stats = xr.load_dataset(p)
        except (OSError, ValueError) as e:
            raise StoreError(f"report: {p} is not a readable netCDF stats file: {e}") from e
        need = set(MOMENTS) - set(stats.data_vars)
        if need:
            raise StoreError(f"report: {p} lacks {sorted(need)}; pass the netCDF written by "
                             "`gsnr-stats reduce`")
        return stats, [], {"source": str(p)}
    paths = expand_paths(items)
    stats = reduce(paths, blocks=blocks, allow_mixed_runs=allow_mixed_runs)
    attrs: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_store(paths[0]) as s:
            attrs = dict(s.attrs)
    return stats, paths, attrs


_LR_HINT = "pass lr= (CLI: --lr)"


def _gap_missing(stats: xr.Dataset) -> str | None:
    """Why the gap section cannot be computed at all (None when it can)."""
    splits = {str(s) for s in stats["split"].values}
    if not {"train", "test"} <= splits:
        return ("generalization gap: not computed — needs a 'train' and a 'test' split "
                f"(splits here: {', '.join(sorted(splits))})")
    if "loss_mean" not in stats or not np.isfinite(stats["loss_mean"]).any():
        return ("generalization gap: not computed — the records hold no per-sample losses "
                "(moments-only records, keep='moments', or written without loss=)")
    return None


def report_numbers(
    stats: xr.Dataset,
    n: Sequence[int],
    *,
    split: str | None = None,
    by: str = "layer",
    lr: float | None = None,
    lr_rule: str = "nominal",
    steps_per_checkpoint: int | Sequence[int] | None = None,
) -> dict[str, xr.Dataset]:
    """The Datasets behind the page (exposed so that tests and scripts can check it).

    Parameters
    ----------
    stats, n, split, by
        As in :func:`write_report`.
    lr, lr_rule, steps_per_checkpoint
        For the gap, as in :func:`gsnr_stats.theory.accumulated_gap`.

    Returns
    -------
    dict
        ``aggregate`` (:func:`theory.aggregate` by ``by``, every split), ``osgr``
        (:func:`theory.osgr_ci` on ``split`` when per-block moments exist, else
        :func:`theory.osgr`), ``noise_scale`` (every split), and when ``train``/``test``
        losses exist ``gap`` (:func:`theory.accumulated_gap` at the largest ``n``, V from
        ``split``; without a learning rate the measured gap alone, whose
        ``attrs["theory_missing"]`` says why).
    """
    splits = [str(s) for s in stats["split"].values]
    split = split or held_out_split(splits)
    out: dict[str, xr.Dataset] = {
        "aggregate": groups.aggregate(stats, by=by, quantiles=(0.5,)),
        "noise_scale": theory.noise_scale(stats),
    }
    if "block_mean" in stats:
        out["osgr"] = uncertainty.osgr_ci(stats, list(n), split=split)
    else:
        out["osgr"] = theory.osgr(stats, list(n), split=split)
    if _gap_missing(stats) is None:
        out["gap"] = plot.gap_or_reason(stats, max(n), split=split, lr=lr, lr_rule=lr_rule,
                                        steps_per_checkpoint=steps_per_checkpoint,
                                        hint=_LR_HINT)
    return out


def _why(ds: xr.Dataset, names: Sequence[str]) -> list[str]:
    """The page's line per variable that carries a reason for negative / NaN values."""
    out = []
    for v in names:
        r = ds[v].attrs.get("reason") if v in ds else None
        if r:
            out += [f"Why some `{v}` values are negative or NaN: {r}.", ""]
    return out


def _spacing_sentence(gp: xr.Dataset) -> str:
    src = gp.attrs.get("step_spacing")
    if src == "optimizer_step":
        return ("Optimizer steps between checkpoints: from the recorded `optimizer_step` "
                f"({', '.join(str(int(v)) for v in gp['optimizer_step'].values)}).")
    if src == "steps_per_checkpoint":
        return "Optimizer steps between checkpoints: from steps_per_checkpoint given."
    return ("Optimizer steps between checkpoints: unknown, so the step labels are taken as "
            "optimizer steps — if they count epochs, the theory is too small by the steps per "
            "epoch; record `optimizer_step` or pass steps_per_checkpoint "
            "(CLI: --steps-per-checkpoint).")


def write_report(
    stores: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    n: int | Sequence[int] | None = None,
    *,
    blocks: int | None = 8,
    split: str | None = None,
    by: str = "layer",
    title: str | None = None,
    dpi: int = 100,
    lr: float | None = None,
    lr_rule: str = "nominal",
    steps_per_checkpoint: int | Sequence[int] | None = None,
    allow_mixed_runs: bool = False,
) -> Path:
    """Write a one-page Markdown report of a run: tables of the headline numbers and figures.

    The page holds: run attributes; the records (step, split, N, learning rate, epoch, mean
    loss); the median GSNR ``r_j = m_j²/s_j²`` per ``by`` group and split at every step; the
    theoretical OSGR ``R(n) = ΣG/Σ(G + V/n)`` (``G = m² − s²/N``, ``V = s²``) on the
    held-out split with its jackknife SE when per-block moments exist; the measured gap
    (mean test − train loss) next to the accumulated theoretical gap ``Σ λ ΣV / n``; the
    noise scale ``B_simple = Σs²/ΣG``; measured OSGR from stored probe rows; and the PNG
    figures of :func:`gsnr_stats.plot.save_all`.

    Parameters
    ----------
    stores : path, glob, list of them, or Dataset
        HDF5 store files (shards of one run), a single stats netCDF (``.nc``) written by
        ``gsnr-stats reduce``, a report directory (its ``stats.nc``), or the Dataset of
        :func:`gsnr_stats.reduce` itself.
    outdir : path
        Created if missing; receives ``report.md``, the PNGs and ``stats.nc``.
    n : int or sequence of int, optional
        Training-set sizes for the OSGR and the gap; default the largest ``train`` count.
    blocks : int or None
        Per-block moments for jackknife intervals when reducing stores (None: no CIs).
    split : str, optional
        Split whose moments feed OSGR and gap (default ``test``, else a non-train split).
    by : str
        Grouping of the GSNR table and trajectory figure (``layer``, ``tensor``, ``model``).
    title : str, optional
    dpi : int
    lr : float, optional
        λ for the theoretical gap when none is recorded (or to override the recorded one).
    lr_rule : {"nominal", "momentum"}
        Which λ the gap uses (:func:`gsnr_stats.theory.accumulated_gap`); the page names
        the optimizer (``attrs["optimizer"]``) and the λ next to the gap.
    steps_per_checkpoint : int or sequence of int, optional
        Optimizer steps between checkpoints when the stores hold no ``optimizer_step``
        (which wins when present); without either the ``step`` labels are taken as
        optimizer steps, with a :class:`~gsnr_stats.errors.StepSpacingWarning` and a line
        on the page.
    allow_mixed_runs : bool
        Pool stores of different runs (refused by default, as in :func:`gsnr_stats.reduce`).

    Sections that cannot be computed (the theoretical gap without a learning rate, the gap
    without losses or a test split, probes never recorded) are replaced by one sentence
    saying why; values that are negative or NaN for a known reason get a line saying it.

    Returns
    -------
    pathlib.Path
        The ``report.md`` written.
    """
    # the arguments first: a mistake must not cost a reduce
    if n is not None:
        _n_grid(n)
    if blocks is not None and blocks != 0:
        require_int(blocks, "blocks", "gs.write_report", minimum=2)
    for name, v in (("split", split), ("by", by), ("title", title)):
        if v is not None and not isinstance(v, str):
            raise UsageError(f"gs.write_report: {name} must be a string, got {v!r}")
    if isinstance(stores, xr.Dataset):
        require_stats(stores, "gs.write_report", what="stores")
    else:
        require_paths(stores, "gs.write_report", "stores")
    output_dir(outdir, "gs.write_report: outdir", create=False)
    stats, paths, attrs = _load(stores, blocks or None, allow_mixed_runs)
    splits = [str(s) for s in stats["split"].values]
    split = split or held_out_split(splits)
    if split not in splits:
        raise MissingSplitError(f"report: split {split!r} is not in the data (splits: {splits})")
    if by not in ("model", "tensor", "layer") and by not in stats["param"].coords:
        raise UsageError(f"report: cannot group by {by!r}; supported: model, tensor, layer")
    out = output_dir(outdir, "gs.write_report: outdir")
    if n is None:
        n = [default_n(stats)]
    ns = [int(v) for v in np.atleast_1d(n)]
    if "optimizer" not in stats.attrs and attrs.get("optimizer"):
        stats.attrs["optimizer"] = attrs["optimizer"]  # stores older than the reduce attrs
    nums = report_numbers(stats, ns, split=split, by=by, lr=lr, lr_rule=lr_rule,
                          steps_per_checkpoint=steps_per_checkpoint)
    stats_nc = out / "stats.nc"
    stats.to_netcdf(stats_nc)

    measured: list[xr.Dataset] = []
    probe_ds = None
    if paths:
        from .store import open_store

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_store(paths[0]) as s:
                pr = s.probes()
        if len(pr["step"]):
            probe_ds = estimators.osgr_probe(pr, stats, split=split)
            measured.append(probe_ds)
    with warnings.catch_warnings():
        # said once already (noise scale, OSGR) and on the page: the figures repeat the numbers
        warnings.simplefilter("ignore", SignalBelowNoiseWarning)
        figs = plot.save_all(stats, out, n=ns, by=by, gap=nums.get("gap"),
                             measured=measured or None, dpi=dpi)  # the page's gap: same λ, Δ

    steps = [int(s) for s in stats["step"].values]
    L: list[str] = [f"# {title or 'gsnr-stats report'}", ""]
    src = ", ".join(str(p) for p in paths) if paths else attrs.get("source", "")
    L += [f"Source: `{src}`  ", f"Written: {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}"
          f" by gsnr-stats {stats.attrs.get('library_version', '')}  ",
          f"Parameters P = {stats.sizes['param']}, steps {len(steps)}, splits {', '.join(splits)};"
          f" ddof {stats.attrs.get('ddof', 1)}; moments for OSGR/gap from split `{split}`; "
          f"n = {', '.join(map(str, ns))}.", ""]
    if attrs:
        keep = {k: v for k, v in attrs.items() if k in ("framework", "framework_version",
                                                        "created_at", "run_id", "user_attrs")}
        L += ["## Run", ""]
        L += [f"- {k}: `{json.dumps(v, default=str) if not isinstance(v, str) else v}`"
              for k, v in keep.items()]
        L += [""]

    L += ["## Records", ""]
    rows = []
    has_opt = ("optimizer_step" in stats.variables and stats["optimizer_step"].dims == ("step",)
               and bool((stats["optimizer_step"].values >= 0).any()))
    for st in steps:
        for sp in splits:
            c = int(stats["count"].sel(step=st, split=sp))
            if c == 0:
                continue
            g = stats.sel(step=st, split=sp)
            rows.append([st, *([int(g["optimizer_step"])] if has_opt else []), sp, c,
                         float(g["lr"]) if "lr" in g else math.nan,
                         float(g["epoch"]) if "epoch" in g else math.nan,
                         float(g["loss_mean"]) if "loss_mean" in g else math.nan])
    L += [_table(["step", *(["optimizer step"] if has_opt else []), "split", "N", "lr", "epoch",
                  "mean loss"], rows), ""]

    ag = nums["aggregate"]
    L += [f"## Median GSNR per {by}", "",
          "Median over the group's parameters of `r_j = m_j^2 / s_j^2` (dead and infinite "
          "parameters excluded); pooled `sum m^2 / sum s^2` in the last columns.", ""]
    groups = [str(g) for g in ag["group"].values]
    hdr = ["step", "split"] + [f"median {g}" for g in groups] + [f"pooled {g}" for g in groups]
    rows = []
    for st in steps:
        for sp in splits:
            a = ag.sel(step=st, split=sp)
            rows.append([st, sp, *[float(a["gsnr_median"].sel(group=g)) for g in groups],
                         *[float(a["gsnr_pooled"].sel(group=g)) for g in groups]])
    L += [_table(hdr, rows), ""]
    L += _why(ag, ["gsnr_median", "gsnr_pooled"])

    R = nums["osgr"]
    has_ci = "osgr_se" in R
    L += ["## OSGR, theory", "",
          f"`R(n) = sum G / sum (G + V/n)`, `G = m^2 - s^2/N`, `V = s^2`, moments of `{split}`"
          + (f"; jackknife SE over {R.attrs.get('jackknife_blocks')} sample blocks, 95 % "
             "interval." if has_ci else "; no per-block moments, so no interval."), ""]
    rows = []
    for st in steps:
        for nv in ns:
            r = R.sel(step=st, split=split, n=nv)
            row: list[Any] = [st, nv, float(r["osgr"])]
            if has_ci:
                row += [float(r["osgr_se"]), float(r["osgr_lo"]), float(r["osgr_hi"])]
            rows.append(row)
    L += [_table(["step", "n", "R(n)"] + (["SE", "lo", "hi"] if has_ci else []), rows), ""]
    L += _why(R, ["osgr", "osgr_se", "osgr_lo"])

    L += ["## Generalization gap", ""]
    if "gap" not in nums:
        L += [_gap_missing(stats) + ".", ""]
    else:
        gp = nums["gap"]
        th_ok = "gap_theory" in gp
        L += ["Measured: mean test loss - mean train loss. Theory: accumulated "
              f"`sum_u lambda_u sum_j V_j(u) / n` at n = {max(ns)}, V from `{split}`, plus the "
              "measured gap at the first checkpoint (first order; the theory over-predicts "
              "a fixed training set's gap as it is fitted).", ""]
        if th_ok:
            L += [gp.attrs.get("lambda_note", ""), "", _spacing_sentence(gp), ""]
        else:
            cls = theory._optimizer(stats)
            L += [gp.attrs["theory_missing"] + " ("
                  + (f"optimizer: {cls['class']}" if cls else "optimizer unknown") + ").", ""]
        rows = []
        for st in steps:
            g = gp.sel(step=st)
            rows.append([st, float(g["gap_measured"]),
                         float(g["gap_theory_offset"].sel(n=max(ns))) if th_ok else "—"])
        L += [_table(["step", "measured gap", "theory gap"], rows), ""]
        L += _why(gp, ["gap_measured", "gap_theory_offset"])

    B = nums["noise_scale"]
    L += ["## Gradient noise scale", "", "`B_simple = sum s^2 / sum G` (samples; negative "
          "where the debiased signal is below the noise).", ""]
    rows = [[st, *[float(B["b_simple"].sel(step=st, split=sp)) for sp in splits]] for st in steps]
    L += [_table(["step", *[f"B_simple {sp}" for sp in splits]], rows), ""]
    L += _why(B, ["b_simple"])

    if probe_ds is None:
        L += ["## OSGR, measured by probes", "",
              "Measured OSGR by probes: not computed — "
              + ("the input is a stats netCDF, which holds no probe rows; pass the stores."
                 if not paths else "the stores hold no probe rows (record them with the "
                 "adapters' probe_osgr)."), ""]
    else:
        L += ["## OSGR, measured by probes", "",
              "`R = sum dL[D'] / sum dL[D]` over virtual steps, jackknife SE over probes; "
              f"theory on `{split}`.", ""]
        rows = [[int(probe_ds["step"][i]), int(probe_ds["n"][i]), float(probe_ds["lr"][i]),
                 float(probe_ds["osgr_measured"][i]), float(probe_ds["osgr_se"][i]),
                 float(probe_ds["osgr_theory"][i]) if "osgr_theory" in probe_ds else math.nan]
                for i in range(probe_ds.sizes["probe"])]
        L += [_table(["step", "n", "lr", "R measured", "SE", "R theory"], rows), ""]
        L += _why(probe_ds, ["osgr_measured", "osgr_theory"])

    L += ["## Figures", ""]
    for f in figs:
        L += [f"![{f.stem}]({f.name})", ""]
    L += [f"Moments: [`{stats_nc.name}`]({stats_nc.name}).", ""]
    page = out / "report.md"
    page.write_text("\n".join(L))
    return page
