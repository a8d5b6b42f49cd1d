"""``gsnr-stats report``: a one-page summary of a run for someone who did not record it.

:func:`write_report` reduces the stores (or loads a stats netCDF), computes the headline
numbers with :mod:`gsnr_stats.theory` and writes ``report.md`` and ``report.html`` next to
the figures of :func:`gsnr_stats.plot.save_all` and the reduced ``stats.nc``. Both pages
are written from one structure (:mod:`gsnr_stats._report_doc`); the HTML file is
self-contained (figures embedded), so it can be sent on its own. Each formula comes with
its meaning in plain words, the tables are long (one row per step, split and group, at
most eight columns), every number has 4 significant figures, and the provenance (library
version, stores, run ids, layout hash, framework, model, dates) is read from the Dataset's
attributes, so a page built from a stats ``.nc`` says what one built from the stores says.
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
from ._report_doc import Doc, Figure, Formula, Heading, Items, Para, Table, fmt, to_html, to_markdown
from ._version import __version__
from .errors import MissingSplitError, SignalBelowNoiseWarning, StoreError, UsageError

__all__ = ["CITATION", "fmt", "provenance", "report_numbers", "write_report"]


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


def _why(ds: xr.Dataset, names: Sequence[str]) -> list[Para]:
    """The page's line per variable that carries a reason for negative / NaN values."""
    out = []
    for v in names:
        r = ds[v].attrs.get("reason") if v in ds else None
        if r:
            out.append(Para(f"Why some `{v}` values are negative or NaN: {r}."))
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



#: the paper the quantities come from, cited on the page (a recipient has no repository)
CITATION = ("Liu, J., Jiang, G., Bai, Y., Chen, T., Wang, H. (2020). Understanding Why Neural "
            "Networks Generalize Well Through GSNR of Parameters. ICLR 2020. arXiv:2001.07384")
NOISE_CITATION = ("McCandlish, S., Kaplan, J., Amodei, D. et al. (2018). An Empirical Model of "
                  "Large-Batch Training. arXiv:1812.06162")

#: provenance rows of the page: (label, attribute keys of the stats Dataset, first found)
_PROVENANCE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reduced by gsnr-stats", ("library_version",)),
    ("store files", ("sources",)),
    ("run id", ("run_id",)),
    ("parameter layout hash", ("layout_hash",)),
    ("framework", ("framework",)),
    ("framework version", ("framework_version",)),
    ("model", ("model", "estimator", "recorded_by")),
    ("stores written", ("store_created_at",)),
    ("stores written by gsnr-stats", ("store_library_version",)),
    ("history", ("history",)),
)


def provenance(stats: xr.Dataset) -> list[tuple[str, str]]:
    """Where the numbers come from, as (label, value) rows, from ``stats.attrs`` alone.

    Read from the Dataset's attributes only (those :func:`gsnr_stats.reduce` sets: library
    version, the store files, run ids, layout hash, framework and, where recorded, its
    version, the model and the stores' dates), so a page built from the stats ``.nc`` shows
    the same rows as one built from the stores. Attributes that are absent or empty give
    no row; the optimizer class, the number of parameters and ``ddof`` are added.
    """
    a = stats.attrs
    rows: list[tuple[str, str]] = []
    for label, keys in _PROVENANCE:
        for k in keys:
            v = a.get(k)
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            if v is not None and str(v).strip():
                rows.append((label, str(v).replace(",", ", ")
                             if k in ("sources", "run_id") else str(v)))
                break
    opt = theory._optimizer(stats)
    if opt:
        rows.append(("optimizer", str(opt["class"])))
    rows.append(("parameters", str(int(a.get("n_params", stats.sizes["param"])))))
    rows.append(("variance ddof", str(int(a.get("ddof", 1)))))
    return rows


_FIGURE_CAPTIONS = {
    "gsnr_trajectories": "GSNR of each {by} over training, per split: the higher, the more "
                         "the examples agree on the direction of the step.",
    "gsnr_histogram": "How the GSNR is spread over the individual parameters.",
    "osgr": "Theoretical OSGR R(n) over training on split `{split}`{band}. 1: the training "
            "steps help unseen data as much as the training data; 0: they only fit the "
            "training data.",
    "train_vs_test_gsnr": "GSNR on the training split against the held-out split. Points "
                          "below the diagonal (right): parameters whose training signal "
                          "outgrows the held-out one, a sign of memorisation.",
    "gap": "Generalization gap over training: measured (test minus train loss) and the "
           "theory's prediction.",
    "osgr_scatter": "OSGR measured by probes against the theory (on the diagonal: they agree).",
}


def _caption(stem: str, by: str, split: str, band: bool) -> str:
    key = "osgr_scatter" if stem.startswith("osgr_scatter") else stem
    return _FIGURE_CAPTIONS.get(key, "").format(
        by=by, split=split, band=", with its 95 % jackknife band" if band else "")


def _intro(doc: Doc) -> None:
    doc.add(Para(
        "This page summarises how the per-example gradients of a model behaved during "
        "training and what they predict about generalization, i.e. how well what the model "
        "learns from its training examples carries over to examples it has not seen. The "
        f"quantities follow {CITATION}."))


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
    """Write a one-page report of a run (Markdown and self-contained HTML) with figures.

    The page holds: what the page is about and the paper (Liu et al., ICLR 2020); the
    provenance (:func:`provenance`); the records (step, split, N, learning rate, epoch,
    mean loss); the median GSNR ``r_j = m_j²/s_j²`` per ``by`` group and split at every
    step; the theoretical OSGR ``R(n) = ΣG/Σ(G + V/n)`` (``G = m² − s²/N``, ``V = s²``) on
    the held-out split with its jackknife SE when per-block moments exist; the measured
    gap (mean test − train loss) next to the accumulated theoretical gap ``Σ λ ΣV / n``;
    the noise scale ``B_simple = Σs²/ΣG``; measured OSGR from stored probe rows; and the
    figures of :func:`gsnr_stats.plot.save_all` (the OSGR figure redrawn from the page's
    OSGR, so with its confidence band when there are blocks). Each formula is followed by
    its meaning in plain words; tables are long (at most 8 columns); numbers have 4
    significant figures (:func:`gsnr_stats._report_doc.fmt`).

    Parameters
    ----------
    stores : path, glob, list of them, or Dataset
        HDF5 store files (shards of one run), a single stats netCDF (``.nc``) written by
        ``gsnr-stats reduce``, a report directory (its ``stats.nc``), or the Dataset of
        :func:`gsnr_stats.reduce` itself.
    outdir : path
        Created if missing; receives ``report.md``, ``report.html`` (one file, figures
        embedded), the PNGs and ``stats.nc``.
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
        The ``report.md`` written (``report.html`` is beside it).
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
        # the OSGR figure of the page's numbers: split `split`, with osgr_lo/osgr_hi (the
        # confidence band) when there are per-block moments
        fig = plot.osgr_plot(nums["osgr"])
        fig.savefig(out / "osgr.png", dpi=dpi)
        if out / "osgr.png" not in figs:
            figs.append(out / "osgr.png")

    doc = Doc(title or "gsnr-stats report")
    _intro(doc)
    src = ", ".join(str(p) for p in paths) if paths else attrs.get("source", "")
    steps = [int(s) for s in stats["step"].values]
    doc.add(Items([
        f"Built from: `{src}`",
        f"Written: {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} by gsnr-stats "
        f"{__version__}",
        f"{stats.sizes['param']} parameters, {len(steps)} checkpoints, splits "
        f"{', '.join(splits)}; OSGR and gap from split `{split}`; training-set size "
        f"n = {', '.join(map(str, ns))}.",
    ]))
    doc.add(Heading("Provenance"),
            Table(["what", "value"], provenance(stats),
                  caption="From the attributes of the moments (`stats.nc`), so the same "
                          "whether this page was built from the stores or from the stats file."))
    if paths and (attrs.get("created_at") or attrs.get("user_attrs")):
        # kept by the stores only (not in a stats .nc): shown beside the table, not in it
        user = attrs.get("user_attrs")
        doc.add(Para("From the first store (a stats file does not keep these): "
                     + (f"written {attrs['created_at']}" if attrs.get("created_at") else "")
                     + ("; " if attrs.get("created_at") and user else "")
                     + (f"attributes recorded with it `{json.dumps(user, default=str)}`"
                        if user else "") + "."))
    _records(doc, stats, steps, splits)
    _gsnr_section(doc, nums["aggregate"], steps, splits, by)
    _osgr_section(doc, nums["osgr"], steps, ns, split)
    _gap_section(doc, stats, nums, steps, ns, split)
    _noise_section(doc, nums["noise_scale"], steps, splits)
    _probe_section(doc, probe_ds, paths, split)
    has_band = "osgr_lo" in nums["osgr"]
    doc.add(Heading("Figures"))
    doc.add(*[Figure(f, _caption(f.stem, by, split, has_band)) for f in figs])
    doc.add(Heading("Files"),
            Para(f"The moments behind every number here are in `{stats_nc.name}` (netCDF, "
                 "beside this page); `report.md` and `report.html` hold the same page."))
    page = out / "report.md"
    page.write_text(to_markdown(doc), encoding="utf-8")
    (out / "report.html").write_text(to_html(doc), encoding="utf-8")
    return page


def _records(doc: Doc, stats: xr.Dataset, steps: list[int], splits: list[str]) -> None:
    doc.add(Heading("Records"),
            Para("One row per checkpoint (step) and split: N per-example gradients were "
                 "recorded there, with the learning rate, the epoch and the mean loss."))
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
    doc.add(Table(["step", *(["optimizer step"] if has_opt else []), "split", "N", "lr",
                   "epoch", "mean loss"], rows))


def _gsnr_section(doc: Doc, ag: xr.Dataset, steps: list[int], splits: list[str],
                  by: str) -> None:
    doc.add(Heading(f"Median GSNR per {by}"),
            Formula("r_j = m_j^2 / s_j^2",
                    "the gradient signal-to-noise ratio (GSNR) of parameter j: the squared "
                    "mean of its per-example gradients (m_j) over their variance (s_j^2). It "
                    "says how much the examples agree on which way to move the parameter: "
                    "well above 1, they mostly agree; well below 1, the step is mostly noise "
                    "from which examples happen to be in the batch. A high GSNR is what lets "
                    "a step learned on the training examples help on unseen ones."),
            Para(f"`median`: the median of `r_j` over the parameters of each {by} (parameters "
                 "with zero variance left out); `pooled`: `sum m_j^2 / sum s_j^2` over the "
                 f"{by}, the GSNR of the {by} as a whole."))
    rows = []
    for st in steps:
        for sp in splits:
            a = ag.sel(step=st, split=sp)
            rows += [[st, sp, str(g), float(a["gsnr_median"].sel(group=g)),
                      float(a["gsnr_pooled"].sel(group=g))] for g in ag["group"].values]
    doc.add(Table(["step", "split", by, "median GSNR", "pooled GSNR"], rows))
    doc.add(*_why(ag, ["gsnr_median", "gsnr_pooled"]))


def _osgr_section(doc: Doc, R: xr.Dataset, steps: list[int], ns: list[int], split: str) -> None:
    has_ci = "osgr_se" in R
    doc.add(Heading("OSGR, theory"),
            Formula("R(n) = sum_j G_j / sum_j (G_j + V_j / n),  G_j = m_j^2 - s_j^2 / N,  "
                    "V_j = s_j^2",
                    "the one-step generalization ratio (OSGR) for a training set of n "
                    "examples: of the decrease in training loss that one small gradient step "
                    "brings, the fraction expected to show up as a decrease in the loss on "
                    "unseen examples too. R = 1: the step helps unseen data fully; R near 0: "
                    "it only fits the training examples; negative: it is expected to hurt "
                    "unseen data. G_j is the part of the gradient the examples share (the "
                    "signal), V_j / n the noise a training set of n examples adds to it."),
            Para(f"Moments of split `{split}`"
                 + (f"; SE: jackknife standard error over {R.attrs.get('jackknife_blocks')} "
                    "blocks of examples; lo, hi: the 95 % interval." if has_ci
                    else "; no per-block moments, so no interval (reduce with blocks to get "
                         "one).")))
    rows = []
    for st in steps:
        for nv in ns:
            r = R.sel(step=st, split=split, n=nv)
            row: list[Any] = [st, nv, float(r["osgr"])]
            if has_ci:
                row += [float(r["osgr_se"]), float(r["osgr_lo"]), float(r["osgr_hi"])]
            rows.append(row)
    doc.add(Table(["step", "n", "R(n)"] + (["SE", "lo", "hi"] if has_ci else []), rows))
    doc.add(*_why(R, ["osgr", "osgr_se", "osgr_lo"]))


def _gap_section(doc: Doc, stats: xr.Dataset, nums: dict[str, xr.Dataset], steps: list[int],
                 ns: list[int], split: str) -> None:
    doc.add(Heading("Generalization gap"))
    if "gap" not in nums:
        doc.add(Para(str(_gap_missing(stats)) + "."))
        return
    gp = nums["gap"]
    th_ok = "gap_theory" in gp
    doc.add(Formula("gap = mean test loss - mean train loss;  theory: sum_u lambda_u sum_j "
                    "V_j(u) / n",
                    "the generalization gap is how much worse the model does on unseen "
                    "examples than on its training examples. The theory adds up, over the "
                    "training steps u with learning rate lambda_u, the gradient noise V a "
                    "training set of n examples lets the model fit: that is how much the gap "
                    "is expected to grow."),
            Para(f"Theory at n = {max(ns)}, V from split `{split}`, plus the measured gap at "
                 "the first checkpoint. It is first order in the learning rate, and it "
                 "over-predicts the gap of a fixed training set once that set is fitted."))
    if th_ok:
        doc.add(Para(gp.attrs.get("lambda_note", "")), Para(_spacing_sentence(gp)))
    else:
        cls = theory._optimizer(stats)
        doc.add(Para(gp.attrs["theory_missing"] + " ("
                     + (f"optimizer: {cls['class']}" if cls else "optimizer unknown") + ")."))
    rows = []
    for st in steps:
        g = gp.sel(step=st)
        rows.append([st, float(g["gap_measured"]),
                     float(g["gap_theory_offset"].sel(n=max(ns))) if th_ok else "—"])
    doc.add(Table(["step", "measured gap", "theory gap"], rows))
    doc.add(*_why(gp, ["gap_measured", "gap_theory_offset"]))


def _noise_section(doc: Doc, B: xr.Dataset, steps: list[int], splits: list[str]) -> None:
    doc.add(Heading("Gradient noise scale"),
            Formula("B_simple = sum_j s_j^2 / sum_j G_j",
                    "the batch size at which the noise of a mini-batch gradient is about as "
                    "large as its signal: batches much smaller than B_simple give noisy steps, "
                    "much larger ones cost more computation for little gain (McCandlish et "
                    "al., 2018). Negative where the signal, after removing its noise bias, is "
                    "below the noise."))
    rows = [[st, sp, float(B["b_simple"].sel(step=st, split=sp))] for st in steps
            for sp in splits]
    doc.add(Table(["step", "split", "B_simple (examples)"], rows))
    doc.add(*_why(B, ["b_simple"]))


def _probe_section(doc: Doc, probe_ds: xr.Dataset | None, paths: list[Path],
                   split: str) -> None:
    doc.add(Heading("OSGR, measured by probes"))
    if probe_ds is None:
        doc.add(Para("Measured OSGR by probes: not computed — "
                     + ("the input is a stats netCDF, which holds no probe rows; pass the "
                        "stores." if not paths else "the stores hold no probe rows (record "
                        "them with the adapters' probe_osgr).")))
        return
    doc.add(Formula("R = sum dL[D'] / sum dL[D]",
                    "the OSGR measured directly: a small step is taken on a training subset "
                    "D of n examples, and the loss change it causes on other examples D' is "
                    "divided by the loss change on D, each summed over the probes (several "
                    "subsets D) first; SE: jackknife over the probes. The theory column is "
                    f"R(n) on split `{split}`: the two should agree for small steps."))
    rows = [[int(probe_ds["step"][i]), int(probe_ds["n"][i]), float(probe_ds["lr"][i]),
             float(probe_ds["osgr_measured"][i]), float(probe_ds["osgr_se"][i]),
             float(probe_ds["osgr_theory"][i]) if "osgr_theory" in probe_ds else math.nan]
            for i in range(probe_ds.sizes["probe"])]
    doc.add(Table(["step", "n", "lr", "R measured", "SE", "R theory"], rows))
    doc.add(*_why(probe_ds, ["osgr_measured", "osgr_theory"]))
