"""OSGR, generalization gaps, noise scale, group aggregates and jackknife intervals.

Pure functions on the moments Dataset built by :func:`gsnr_stats.reduce` (dims ``step``,
``split``, ``param`` and, with ``reduce(blocks=K)``, ``block``): they never read a store,
except the first-order OSGR estimator, which streams stored per-sample gradients once.

Notation (``docs/theory.md``, DESIGN §1). Per parameter ``j`` of a record of ``N``
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
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from numba import njit, prange

from .kernels import finalize_moments

__all__ = [
    "accumulated_gap",
    "aggregate",
    "aggregate_ci",
    "jackknife",
    "leave_one_block_out",
    "measured_gap",
    "noise_scale",
    "one_step_gap",
    "osgr",
    "osgr_ci",
    "osgr_first_order",
    "osgr_param",
    "osgr_pools",
    "osgr_probe",
    "osgr_trajectory",
]

_ONE = {"units": "1"}
GroupBy = str | None


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _ddof(stats: xr.Dataset) -> int:
    return int(stats.attrs.get("ddof", 1))


def _select_splits(stats: xr.Dataset, split: str | Sequence[str] | None) -> xr.Dataset:
    """Restrict to ``split`` (a name or a list), keeping the ``split`` dimension."""
    if split is None:
        return stats
    want = [split] if isinstance(split, str) else list(split)
    have = [str(s) for s in stats["split"].values]
    missing = [s for s in want if s not in have]
    if missing:
        raise KeyError(f"split(s) {missing} not in the Dataset (splits: {have})")
    return stats.sel(split=want)


def _n_grid(n: int | Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(n))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"n must be a positive integer or a 1-D sequence of them, got {n!r}")
    if not np.issubdtype(arr.dtype, np.number) or np.any(arr <= 0) or np.any(arr != np.round(arr)):
        raise ValueError(f"n must hold positive integers (training-set / batch sizes), got {n!r}")
    return arr.astype(np.int64)


def _n_coord(ns: np.ndarray) -> tuple[str, np.ndarray, dict[str, str]]:
    return ("n", ns, {"long_name": "training-set (batch) size n of the modelled step", **_ONE})


def _count_per_param(stats: xr.Dataset) -> np.ndarray:
    """Samples behind each parameter's moments, ``(step, split, param)`` float."""
    N = stats["count"].values.astype(np.float64)[..., None]
    if "n_omitted" in stats:
        return N - stats["n_omitted"].transpose("step", "split", "param").values
    return np.broadcast_to(N, stats["mean"].shape)


def _signal_noise(stats: xr.Dataset, debias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``G``, ``V`` (NaN where excluded) and the validity mask, all ``(step, split, param)``."""
    m = stats["mean"].transpose("step", "split", "param").values
    V = stats["var"].transpose("step", "split", "param").values
    with np.errstate(invalid="ignore", divide="ignore"):
        G = m * m
        if debias:
            G = G - V / _count_per_param(stats)
    valid = np.isfinite(G) & np.isfinite(V)
    return np.where(valid, G, np.nan), np.where(valid, V, np.nan), valid


class _Groups:
    """Partition of the parameter axis: ``labels`` (G,), ``codes`` (P,) into them."""

    def __init__(self, stats: xr.Dataset, by: GroupBy) -> None:
        P = stats.sizes["param"]
        self.by = "model" if by is None else str(by)
        if self.by == "model":
            self.labels = np.array(["model"])
            self.codes = np.zeros(P, dtype=np.int64)
        else:
            if self.by not in stats.coords or stats[self.by].dims != ("param",):
                raise ValueError(
                    f"by={by!r}: expected 'model', 'tensor', 'layer' or another coordinate on "
                    "the param dimension"
                )
            lab = np.asarray(stats[self.by].values).astype(str)
            # Groups in layout order (first appearance), not sorted: layers read top-down.
            uniq, first, codes = np.unique(lab, return_index=True, return_inverse=True)
            order = np.argsort(first)
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            self.labels = uniq[order]
            self.codes = rank[codes.reshape(-1)].astype(np.int64)
        self._sorted = bool(np.all(np.diff(self.codes) >= 0))
        self._perm = None if self._sorted else np.argsort(self.codes, kind="stable")
        sc = self.codes if self._sorted else self.codes[self._perm]
        self._starts = np.searchsorted(sc, np.arange(self.labels.size))

    @property
    def size(self) -> int:
        return int(self.labels.size)

    def sum(self, x: np.ndarray) -> np.ndarray:
        """NaN-skipping sums over the last (param) axis per group -> ``(..., G)``."""
        x = np.where(np.isnan(x), 0.0, x)
        if x.shape[-1] == 0:
            return np.zeros((*x.shape[:-1], self.size))
        if self._perm is not None:
            x = x[..., self._perm]
        return np.add.reduceat(x, self._starts, axis=-1)

    def members(self) -> Iterator[np.ndarray]:
        """Parameter indices of each group, in group order."""
        perm = np.arange(self.codes.size) if self._perm is None else self._perm
        ends = [*self._starts[1:], self.codes.size]
        for a, b in zip(self._starts, ends, strict=True):
            yield perm[a:b]

    def coord(self) -> tuple[str, np.ndarray, dict[str, str]]:
        return ("group", self.labels.astype(str), {"long_name": f"parameter group ({self.by})"})


def _with_groups(
    arr: np.ndarray, groups: _Groups | None, dims: tuple[str, ...]
) -> tuple[tuple[str, ...], np.ndarray]:
    """Drop the trailing group axis when no grouping was asked for."""
    if groups is None:
        return dims, arr[..., 0]
    return (*dims, "group"), arr


def _base_coords(stats: xr.Dataset) -> dict[str, Any]:
    return {"step": stats["step"], "split": stats["split"]}


def _lr_by_step(stats: xr.Dataset) -> np.ndarray:
    """Learning rate per step: the ``train`` record's, else the first finite one."""
    lr = stats["lr"].transpose("step", "split").values.astype(np.float64)
    splits = [str(s) for s in stats["split"].values]
    order = sorted(range(len(splits)), key=lambda i: splits[i] != "train")
    out = np.full(lr.shape[0], np.nan)
    for i in order:
        out = np.where(np.isnan(out), lr[:, i], out)
    return out


def _resolve_lr(
    stats: xr.Dataset, lr: float | Callable[[np.ndarray], Any] | None, steps: np.ndarray
) -> np.ndarray:
    if lr is None:
        out = _lr_by_step(stats)
        if not np.any(np.isfinite(out)):
            raise ValueError("no learning rate recorded in stats['lr']; pass lr=")
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


_finalize_moments = finalize_moments


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
        is usable. A negative value (ΣG < 0 after debiasing) is reported as is.

    Examples
    --------
    >>> R = osgr(stats, n=[64, 1024], split="test")      # doctest: +SKIP
    >>> R["osgr"].sel(n=64)                              # doctest: +SKIP
    """
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
    g = groups if by is not None else None
    d3, R = _with_groups(R, g, ("step", "split", "n"))
    d2 = ("step", "split") if g is None else ("step", "split", "group")
    if g is None:
        sG, sV, used, excluded, n_dead = (a[..., 0] for a in (sG, sV, used, excluded, n_dead))
    coords = {**_base_coords(st), "n": _n_coord(ns)}
    if g is not None:
        coords["group"] = g.coord()
    kind = "debiased m^2 - s^2/N" if debias else "m^2"
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
    return ds


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
        ``G_j + V_j/n ≤ 0``.
    """
    st = _select_splits(stats, split)
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
    return ds


# --------------------------------------------------------------------------------------
# Gaps
# --------------------------------------------------------------------------------------


def measured_gap(stats: xr.Dataset, *, train: str = "train", test: str = "test") -> xr.Dataset:
    """Measured generalization gap per checkpoint from the stored per-sample losses.

    .. math::

        \\mathrm{gap}(t) = \\bar L_{\\mathrm{test}}(\\theta_t)
                          - \\bar L_{\\mathrm{train}}(\\theta_t)

    Returns
    -------
    xarray.Dataset
        ``gap_measured``, ``loss_train``, ``loss_test`` (step); NaN where a loss is missing.
    """
    st = _select_splits(stats, [train, test])
    lt = st["loss_mean"].sel(split=train, drop=True)
    le = st["loss_mean"].sel(split=test, drop=True)
    ds = xr.Dataset(
        {
            "gap_measured": (le - lt).assign_attrs(
                long_name=f"measured gap: mean {test} loss - mean {train} loss", units="1"),
            "loss_train": lt.assign_attrs(long_name=f"mean {train} loss", units="1"),
            "loss_test": le.assign_attrs(long_name=f"mean {test} loss", units="1"),
        }
    )
    ds.attrs["title"] = "measured generalization gap"
    return ds


def one_step_gap(
    stats: xr.Dataset,
    n: int | Sequence[int],
    lr: float | Callable[[np.ndarray], Any] | None = None,
    *,
    split: str | Sequence[str] | None = None,
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
        a callable is evaluated at each checkpoint step.
    split : str or list, optional
        Splits whose ``V`` is used (default all).

    Returns
    -------
    xarray.Dataset
        ``gap_theory`` (step, split, n); ``gap_measured`` (step): the measured gap's growth
        per optimizer step over the interval starting at each checkpoint,
        ``(gap(t_{k+1}) − gap(t_k)) / (t_{k+1} − t_k)`` (NaN at the last checkpoint or
        without ``train``/``test`` losses); ``lr`` (step).
    """
    st = _select_splits(stats, split)
    ns = _n_grid(n)
    steps = st["step"].values.astype(np.int64)
    lam = _resolve_lr(stats, lr, steps)
    _, V, _ = _signal_noise(st, False)
    sV = np.nansum(V, axis=-1)
    sV = np.where(np.isfinite(V).any(axis=-1), sV, np.nan)
    gap = lam[:, None, None] * sV[:, :, None] / ns[None, None, :]
    meas = np.full(steps.shape, np.nan)
    if "loss_mean" in stats and {"train", "test"} <= {str(s) for s in stats["split"].values}:
        g = measured_gap(stats.sel(step=st["step"]))["gap_measured"].values
        if steps.size > 1:
            meas[:-1] = np.diff(g) / np.diff(steps)
    ds = xr.Dataset(
        {
            "gap_theory": (("step", "split", "n"), gap,
                           {"long_name": "one-step gap lr * sum_j V_j / n, theory", **_ONE}),
            "gap_measured": ("step", meas,
                             {"long_name": "measured gap growth per optimizer step", **_ONE}),
            "lr": ("step", lam, {"long_name": "learning rate", **_ONE}),
        },
        coords={**_base_coords(st), "n": _n_coord(ns)},
    )
    ds.attrs["title"] = "one-step generalization gap (Liu et al. 2020, eq. 14)"
    return ds


def accumulated_gap(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    split: str = "test",
    method: str = "piecewise",
    lr: float | Callable[[np.ndarray], Any] | None = None,
    steps_per_checkpoint: int | Sequence[int] | None = None,
) -> xr.Dataset:
    """Accumulated theoretical gap over training, next to the measured gap.

    .. math::

        \\mathrm{gap}(T) \\approx \\sum_{t_0 \\le u < T} \\frac{\\lambda_u}{n}
        \\sum_j V_j(u),

    where ``V(u)`` between checkpoints ``t_k ≤ u < t_{k+1}`` is held at ``V(t_k)``
    (``method="piecewise"``) or interpolated linearly and evaluated at the middle of each
    step, ``u + 1/2`` (``method="trapezoid"``: with constant λ an interval contributes
    ``λ Δ (V_k + V_{k+1}) / (2n)``). ``gap(t_0) = 0``: the gap before the first checkpoint
    is unknown; compare increments with the measured gap, whose value at ``t_0`` is added
    as ``gap_theory_offset`` for plots. First order in λ; see ``docs/theory.md`` for why it
    over-predicts a fixed training set's gap.

    Parameters
    ----------
    stats : xarray.Dataset
        Moments with ``var`` (and ``lr``, ``loss_mean`` for defaults and the measured gap).
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
        a float: constant; a callable: the schedule ``lr(step)``, evaluated at every step.
    steps_per_checkpoint : int or sequence of int, optional
        Optimizer steps between consecutive checkpoints. Default: the differences of the
        ``step`` coordinate (which then must count optimizer steps). An int means every
        interval; a sequence gives one value per interval (length S − 1). With a callable
        ``lr``, the schedule is evaluated at ``t_0 + cumulative steps``.

    Returns
    -------
    xarray.Dataset
        ``gap_theory`` (step, n), ``gap_measured`` (step) (NaN without train/test losses),
        ``gap_theory_offset`` = ``gap_theory`` + measured gap at the first checkpoint,
        ``noise`` ΣV (step), ``lr`` (step). Checkpoints where ``V`` is missing are skipped
        (the previous ``V`` is held across them) and get NaN.
    """
    if method not in ("piecewise", "trapezoid"):
        raise ValueError(f"method must be 'piecewise' or 'trapezoid', got {method!r}")
    ns = _n_grid(n)
    st = _select_splits(stats, [split])
    steps = stats["step"].values.astype(np.int64)
    S = steps.size
    _, V, _ = _signal_noise(st, False)
    sV = np.where(np.isfinite(V[:, 0]).any(axis=-1), np.nansum(V[:, 0], axis=-1), np.nan)
    if steps_per_checkpoint is None:
        pos = steps - steps[0]
    else:
        spc = np.broadcast_to(np.asarray(steps_per_checkpoint, dtype=np.int64), (max(S - 1, 0),))
        pos = np.concatenate([[0], np.cumsum(spc)])
    if S > 1 and np.any(np.diff(pos) <= 0):
        raise ValueError("checkpoints must be strictly increasing in optimizer steps")
    if callable(lr):
        lam_ck = _call_schedule(lr, steps[0] + pos)
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
            lam = _call_schedule(lr, steps[0] + u) if callable(lr) else np.full(u.size, lam_ck[a])
            if method == "piecewise":
                v = np.full(u.size, sV[a])
            else:
                v = sV[a] + (sV[b] - sV[a]) * (u - p0 + 0.5) / (p1 - p0)
            total += float(np.sum(lam * v))
            acc[b] = total
    gap = acc[:, None] / ns[None, :]
    meas = np.full(S, np.nan)
    if "loss_mean" in stats and {"train", "test"} <= {str(s) for s in stats["split"].values}:
        meas = measured_gap(stats)["gap_measured"].values
    first = meas[ok[0]] if ok.size else np.nan
    ds = xr.Dataset(
        {
            "gap_theory": (("step", "n"), gap,
                           {"long_name": f"accumulated gap sum_u lr_u sum_j V_j(u)/n, theory "
                                         f"(V from {split!r}, {method})", **_ONE}),
            "gap_measured": ("step", meas,
                             {"long_name": "measured gap: mean test loss - mean train loss",
                              **_ONE}),
            "gap_theory_offset": (("step", "n"), gap + first,
                                  {"long_name": "theory gap + measured gap at the first "
                                                "checkpoint", **_ONE}),
            "noise": ("step", sV, {"long_name": f"sum_j V_j on {split!r}"}),
            "lr": ("step", lam_ck, {"long_name": "learning rate at the checkpoint", **_ONE}),
        },
        coords={"step": stats["step"], "n": _n_coord(ns)},
    )
    ds.attrs.update({"title": "accumulated theoretical vs measured generalization gap",
                     "v_split": split, "method": method})
    return ds


# --------------------------------------------------------------------------------------
# Noise scale and group aggregates
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
        debiased signal ΣG is at or below its noise (an overfit or converged split),
        NaN where ΣG = 0. Also ``signal`` ΣG and ``noise`` ΣV.
    """
    R = osgr(stats, 1, split=split, debias=True, by=by)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = xr.where(R["signal"] != 0, R["noise"] / R["signal"], np.nan)
    b = b.where(R["n_used"] > 0)
    ds = R[["signal", "noise", "n_used", "n_excluded"]].assign(
        b_simple=b.assign_attrs(long_name="simple gradient noise scale B_simple = "
                                          "sum s^2 / sum G", units="1"))
    ds.attrs.update({"title": "gradient noise scale", "ddof": _ddof(stats), "group_by": str(by)})
    return ds


def aggregate(
    stats: xr.Dataset,
    by: str = "tensor",
    quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
    *,
    split: str | Sequence[str] | None = None,
    debias: bool = False,
) -> xr.Dataset:
    """GSNR summaries per group of parameters (a tensor, a layer, the whole model).

    .. math::

        \\bar r_S = \\frac{1}{|S|}\\sum_{j\\in S} r_j,\\qquad
        r^{\\mathrm{pooled}}_S = \\frac{\\sum_{j\\in S} m_j^2}{\\sum_{j\\in S} s_j^2}
        \\;\\left(\\text{debiased: } \\frac{\\sum_S (m_j^2 - s_j^2/N)}{\\sum_S s_j^2}\\right).

    Mean, median and quantiles run over parameters with finite ``r_j``; dead parameters
    (``m = s² = 0``, ``r`` NaN) and ``s² = 0, m ≠ 0`` parameters (``r = +inf``) are left out
    of them and counted in ``n_dead`` / ``n_inf``; the pooled ratio includes the latter's
    ``m²`` (their ``s²`` is 0).

    Parameters
    ----------
    stats : xarray.Dataset
        Moments (``mean``, ``var``, ``count``).
    by : {"tensor", "layer", "model"} or a param coordinate name
    quantiles : sequence of float
        Quantile levels in [0, 1].
    split : str or list, optional
    debias : bool
        Summarise ``r_j − 1/N`` instead of ``r_j``.

    Returns
    -------
    xarray.Dataset
        Dims (step, split, group[, quantile]): ``gsnr_mean``, ``gsnr_median``,
        ``gsnr_quantile``, ``gsnr_pooled``, ``n_params`` (finite r), ``n_dead``, ``n_inf``,
        ``n_excluded`` (non-finite moments, e.g. no data).
    """
    st = _select_splits(stats, split)
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or np.any((q < 0) | (q > 1)):
        raise ValueError(f"quantiles must be a 1-D sequence in [0, 1], got {quantiles!r}")
    groups = _Groups(st, None if by == "model" else by)
    m = st["mean"].transpose("step", "split", "param").values
    V = st["var"].transpose("step", "split", "param").values
    N = _count_per_param(st)
    with np.errstate(invalid="ignore", divide="ignore"):
        msq = m * m
        num = msq - V / N if debias else msq
        moments_ok = np.isfinite(num) & np.isfinite(V)
        r = np.where(V > 0, num / np.where(V > 0, V, 1.0), np.nan)
        dead = moments_ok & (V == 0) & (msq == 0)
        inf = moments_ok & (V == 0) & (msq > 0)
    fin = np.isfinite(r)
    S, T = m.shape[:2]
    Gn = groups.size
    mean_r = np.full((S, T, Gn), np.nan)
    med_r = np.full((S, T, Gn), np.nan)
    qs = np.full((S, T, Gn, q.size), np.nan)
    rf = np.where(fin, r, np.nan)
    for g, idx in enumerate(groups.members()):
        x = rf[..., idx]
        has = np.isfinite(x).any(axis=-1)
        if not has.any():
            continue
        xs = x[has]
        mean_r[has, g] = np.nanmean(xs, axis=-1)
        med_r[has, g] = np.nanmedian(xs, axis=-1)
        if q.size:
            qs[has, g] = np.moveaxis(np.nanquantile(xs, q, axis=-1), 0, -1)
    sn = groups.sum(np.where(moments_ok, num, np.nan))
    sd = groups.sum(np.where(moments_ok, V, np.nan))
    n_ok = groups.sum(moments_ok.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(sd > 0, sn / np.where(sd > 0, sd, 1.0),
                          np.where(sn > 0, np.inf, np.nan))
    pooled = np.where(n_ok > 0, pooled, np.nan)
    d = ("step", "split", "group")
    lab = "r_j - 1/N" if debias else "r_j"
    coords = {**_base_coords(st), "group": groups.coord(),
              "quantile": ("quantile", q, {"long_name": "quantile level", **_ONE})}
    ds = xr.Dataset(
        {
            "gsnr_mean": (d, mean_r, {"long_name": f"mean of GSNR {lab} over the group", **_ONE}),
            "gsnr_median": (d, med_r, {"long_name": f"median of GSNR {lab}", **_ONE}),
            "gsnr_quantile": ((*d, "quantile"), qs, {"long_name": f"quantiles of GSNR {lab}",
                                                     **_ONE}),
            "gsnr_pooled": (d, pooled, {"long_name": "pooled GSNR sum m^2 / sum s^2"
                                        + (" (debiased)" if debias else ""), **_ONE}),
            "n_params": (d, groups.sum(fin.astype(np.float64)),
                         {"long_name": "parameters with finite GSNR", **_ONE}),
            "n_dead": (d, groups.sum(dead.astype(np.float64)),
                       {"long_name": "dead parameters (m = s^2 = 0, GSNR NaN)", **_ONE}),
            "n_inf": (d, groups.sum(inf.astype(np.float64)),
                      {"long_name": "parameters with s^2 = 0, m != 0 (GSNR +inf)", **_ONE}),
            "n_excluded": (d, groups.sum((~moments_ok).astype(np.float64)),
                           {"long_name": "parameters with non-finite moments", **_ONE}),
        },
        coords=coords,
    )
    for v in ("n_params", "n_dead", "n_inf", "n_excluded"):
        ds[v] = ds[v].astype(np.int64)
    ds.attrs.update({"title": f"GSNR aggregates by {by}", "debias": int(debias),
                     "ddof": _ddof(stats), "group_by": by})
    return ds


# --------------------------------------------------------------------------------------
# Jackknife over blocks
# --------------------------------------------------------------------------------------


def _chan(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al. merge of ``(count, mean, m2)``; empty sides (count 0, NaN moments) neutral."""
    na, ma, qa = a
    nb, mb, qb = b
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        ma0 = np.where(na > 0, ma, 0.0)
        mb0 = np.where(nb > 0, mb, 0.0)
        delta = mb0 - ma0
        wb = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
        mean = ma0 + delta * wb
        m2 = (np.where(na > 0, qa, 0.0) + np.where(nb > 0, qb, 0.0) + delta * delta * na * wb)
    return n, np.where(n > 0, mean, np.nan), np.where(n > 0, m2, np.nan)


def _loo_dataset(
    stats: xr.Dataset, count: np.ndarray, mean: np.ndarray, m2: np.ndarray
) -> xr.Dataset:
    """``stats`` with its moments replaced (block variables dropped, derived ones rebuilt)."""
    sp3 = ("step", "split", "param")
    drop = [v for v in ("block_count", "block_mean", "block_m2", "n_omitted") if v in stats]
    out = stats.drop_vars(drop)
    if "block" in out.dims:
        out = out.drop_dims("block")
    ddof = _ddof(stats)
    cnt = count[..., :1] if count.shape[-1] else np.zeros((*count.shape[:-1], 1))
    fin = _finalize_moments(count, mean, m2, ddof)
    out["count"] = (("step", "split"), cnt[..., 0].astype(np.int64), stats["count"].attrs)
    for name, arr in (("mean", mean), ("m2", m2), *fin.items()):
        attrs = stats[name].attrs if name in stats else {}
        out[name] = (sp3, arr, attrs)
    with np.errstate(invalid="ignore"):
        if "n_dead" in stats:
            out["n_dead"] = (("step", "split"),
                             ((fin["var"] == 0) & (mean == 0)).sum(-1).astype(np.int64),
                             stats["n_dead"].attrs)
        if "n_inf" in stats:
            out["n_inf"] = (("step", "split"),
                            ((fin["var"] == 0) & (mean != 0)).sum(-1).astype(np.int64),
                            stats["n_inf"].attrs)
    return out


def leave_one_block_out(stats: xr.Dataset) -> Iterator[tuple[int, xr.Dataset]]:
    """Yield ``(i, stats_without_block_i)`` for every block non-empty in some record.

    The moments of all blocks but ``i`` are the Chan merge of a prefix (blocks < i) and a
    suffix (blocks > i) merge: exact, and free of the cancellation that subtracting a
    block from the total (``M2 − M2_i − …``) suffers when ``|m| ≫ s``. Memory: K prefix
    copies of the moments. Block ``i`` is removed from every record at once (a
    delete-a-group jackknife; records should hold the same number of blocks).

    Parameters
    ----------
    stats : xarray.Dataset
        From ``reduce(..., blocks=K)`` (``block_count``, ``block_mean``, ``block_m2``).
    """
    if not {"block_count", "block_mean", "block_m2"} <= set(stats.data_vars):
        raise ValueError("stats has no per-block moments: reduce(..., blocks=K) with K >= 2")
    bc = stats["block_count"].transpose("step", "split", "block").values.astype(np.float64)
    bm = stats["block_mean"].transpose("step", "split", "block", "param").values
    bq = stats["block_m2"].transpose("step", "split", "block", "param").values
    K = bc.shape[-1]
    P = bm.shape[-1]

    def blk(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.broadcast_to(bc[:, :, i, None], (*bc.shape[:2], P))
        return c, bm[:, :, i], bq[:, :, i]

    zero = (np.zeros((*bc.shape[:2], P)), np.full((*bc.shape[:2], P), np.nan),
            np.full((*bc.shape[:2], P), np.nan))
    prefix = [zero]
    for i in range(K - 1):
        prefix.append(_chan(prefix[-1], blk(i)))
    suffix = zero
    out: list[tuple[int, xr.Dataset]] = []
    for i in range(K - 1, -1, -1):
        if np.any(bc[:, :, i] > 0):
            c, m, q = _chan(prefix[i], suffix)
            out.append((i, _loo_dataset(stats, c, m, q)))
        suffix = _chan(blk(i), suffix)
    yield from reversed(out)


def jackknife(
    stats: xr.Dataset,
    func: Callable[[xr.Dataset], xr.Dataset | xr.DataArray],
    *,
    variables: Sequence[str] | None = None,
    level: float | None = None,
) -> xr.Dataset:
    """Delete-one-block jackknife standard errors of any statistic of the moments.

    .. math::

        \\mathrm{SE} = \\sqrt{\\frac{K-1}{K}\\sum_{i=1}^{K}
        \\left(\\hat\\theta_{(i)} - \\bar\\theta\\right)^2},\\qquad
        \\bar\\theta = \\frac1K\\sum_i \\hat\\theta_{(i)},

    with :math:`\\hat\\theta_{(i)} = \\mathrm{func}(\\text{stats without block } i)`, from the
    per-block moments (no extra pass over the data).

    Parameters
    ----------
    stats : xarray.Dataset
        From ``reduce(..., blocks=K)``.
    func : callable
        Dataset -> Dataset or DataArray, e.g. ``lambda s: osgr(s, n=64)``. Quantities
        not built from gradient moments (``loss_mean``, ``lr``) are the same in every
        replicate, so their jackknife SE is 0.
    variables : list of str, optional
        Result variables to attach errors to; default every floating-point one.
    level : float, optional
        Also add the normal interval ``θ̂ ∓ z SE`` at this level as ``<v>_lo``/``<v>_hi``.

    Returns
    -------
    xarray.Dataset
        ``func(stats)`` plus ``<v>_se`` (and ``<v>_lo``, ``<v>_hi``) per variable;
        ``attrs['jackknife_blocks']`` = K.
    """
    def as_ds(x: xr.Dataset | xr.DataArray) -> xr.Dataset:
        if isinstance(x, xr.DataArray):
            return x.to_dataset(name=x.name if x.name is not None else "value")
        return x

    est = as_ds(func(stats))
    names = [v for v in est.data_vars if np.issubdtype(est[v].dtype, np.floating)] \
        if variables is None else list(variables)
    reps = [as_ds(func(s))[names] for _, s in leave_one_block_out(stats)]
    K = len(reps)
    if K < 2:
        raise ValueError(f"jackknife needs at least 2 non-empty blocks, got {K}")
    stack = xr.concat(reps, dim="_jk", coords="minimal", compat="override")
    dev = stack - stack.mean("_jk", skipna=False)
    se = np.sqrt((K - 1) / K * (dev**2).sum("_jk", skipna=False))
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2) if level is not None else None
    out = est.copy()
    for v in names:
        ln = est[v].attrs.get("long_name", v)
        units = {"units": est[v].attrs["units"]} if "units" in est[v].attrs else {}
        out[f"{v}_se"] = se[v].assign_attrs(long_name=f"jackknife standard error of {ln}",
                                            **units)
        if z is not None:
            out[f"{v}_lo"] = (est[v] - z * se[v]).assign_attrs(
                long_name=f"{level:g} normal lower bound of {ln}", **units)
            out[f"{v}_hi"] = (est[v] + z * se[v]).assign_attrs(
                long_name=f"{level:g} normal upper bound of {ln}", **units)
    out.attrs["jackknife_blocks"] = K
    if level is not None:
        out.attrs["ci_level"] = level
    return out


def osgr_ci(
    stats: xr.Dataset, n: int | Sequence[int], *, level: float = 0.95, **kw: Any
) -> xr.Dataset:
    """:func:`osgr` with jackknife ``osgr_se``, ``osgr_lo``, ``osgr_hi`` over blocks.

    Keyword arguments go to :func:`osgr`. Needs ``reduce(..., blocks=K)``.
    """
    return jackknife(stats, lambda s: osgr(s, n, **kw), variables=["osgr"], level=level)


def aggregate_ci(
    stats: xr.Dataset, by: str = "tensor", *, level: float = 0.95, **kw: Any
) -> xr.Dataset:
    """:func:`aggregate` with jackknife errors on mean, median, quantiles and pooled GSNR."""
    return jackknife(
        stats, lambda s: aggregate(s, by, **kw),
        variables=["gsnr_mean", "gsnr_median", "gsnr_quantile", "gsnr_pooled"], level=level,
    )


# --------------------------------------------------------------------------------------
# Measured OSGR
# --------------------------------------------------------------------------------------


def _ratio_jackknife(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """``Σnum/Σden`` and its delete-one jackknife SE over the entries."""
    K = num.size
    R = float(num.sum() / den.sum()) if K and den.sum() != 0 else math.nan
    if K < 2:
        return R, math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        th = (num.sum() - num) / (den.sum() - den)
    se = math.sqrt((K - 1) / K * float(np.sum((th - th.mean()) ** 2)))
    return R, se


def _theory_at(
    stats: xr.Dataset | None, steps: np.ndarray, ns: np.ndarray, split: str, debias: bool,
    method: str | None,
) -> xr.DataArray | None:
    """Theoretical R at ``steps`` × ``ns``: exact step match or latest checkpoint (ffill)."""
    if stats is None:
        return None
    R = osgr(stats, np.unique(ns), split=split, debias=debias)["osgr"].sel(split=split)
    R = R.sortby("step")
    us = np.unique(steps)
    R = R.reindex(step=us, method=method)
    return R


def osgr_trajectory(
    traj: Mapping[str, np.ndarray],
    stats: xr.Dataset | None = None,
    *,
    n: int | Sequence[int] | None = None,
    split: str = "test",
    debias: bool = True,
    window: int = 1,
) -> xr.Dataset:
    """Measured OSGR along recorded optimizer steps, next to the theory.

    .. math::

        R_t = \\frac{L_{\\mathrm{test}}(\\theta_t) - L_{\\mathrm{test}}(\\theta_{t+w})}
                    {L_{\\mathrm{train}}(\\theta_t) - L_{\\mathrm{train}}(\\theta_{t+w})}

    over consecutive trajectory rows (``w = window`` rows; a row gap of several optimizer
    steps makes it a multi-step ratio, see ``n_steps``). Noisy where the training loss
    barely moves.

    Parameters
    ----------
    traj : mapping
        ``store.trajectory()``: 1-D arrays ``step``, ``lr``, ``train_loss``, ``test_loss``.
    stats : xarray.Dataset, optional
        Moments: adds ``osgr_theory`` (step, n) from the latest checkpoint at or before
        each step (NaN before the first).
    n : int or sequence of int
        Training-set (batch) size for the theory; required with ``stats``.
    split : str
        Split whose moments feed the theory.
    debias : bool
        As in :func:`osgr`.
    window : int
        Rows per ratio.

    Returns
    -------
    xarray.Dataset
        ``osgr_measured``, ``delta_train``, ``delta_test``, ``n_steps``, ``lr`` (step)
        [, ``osgr_theory`` (step, n)].
    """
    w = int(window)
    if w < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    order = np.argsort(np.asarray(traj["step"]), kind="stable")
    step = np.asarray(traj["step"], dtype=np.int64)[order]
    tr = np.asarray(traj["train_loss"], dtype=np.float64)[order]
    te = np.asarray(traj["test_loss"], dtype=np.float64)[order]
    lr = np.asarray(traj.get("lr", np.full(step.size, np.nan)), dtype=np.float64)[order]
    m = max(step.size - w, 0)
    dtr = tr[:m] - tr[w:w + m]
    dte = te[:m] - te[w:w + m]
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.where(dtr != 0, dte / np.where(dtr != 0, dtr, 1.0), np.nan)
    data: dict[str, Any] = {
        "osgr_measured": ("step", R, {"long_name": "measured OSGR dL_test / dL_train over the "
                                                   "step", **_ONE}),
        "delta_train": ("step", dtr, {"long_name": "train loss decrease", **_ONE}),
        "delta_test": ("step", dte, {"long_name": "test loss decrease", **_ONE}),
        "n_steps": ("step", step[w:w + m] - step[:m],
                    {"long_name": "optimizer steps per ratio", **_ONE}),
        "lr": ("step", lr[:m], {"long_name": "learning rate", **_ONE}),
    }
    coords: dict[str, Any] = {"step": ("step", step[:m], {"long_name": "optimizer step"})}
    if stats is not None:
        if n is None:
            raise ValueError("osgr_trajectory: pass n (training-set size) with stats")
        ns = _n_grid(n)
        th = _theory_at(stats, step[:m], ns, split, debias, "ffill")
        data["osgr_theory"] = (("step", "n"), th.sel(step=step[:m]).values,
                               {"long_name": f"theoretical OSGR R(n) on {split!r} at the "
                                             "latest checkpoint", **_ONE})
        coords["n"] = _n_coord(ns)
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"title": "measured OSGR along the training trajectory", "window": w,
                     "theory_split": split, "debias": int(debias)})
    return ds


def osgr_probe(
    probes: Mapping[str, np.ndarray],
    stats: xr.Dataset | None = None,
    *,
    split: str = "test",
    debias: bool = True,
) -> xr.Dataset:
    """OSGR by its definition, from virtual-step probe rows, next to the theory.

    .. math::

        \\hat R = \\frac{\\sum_k \\Delta L[D'_k]}{\\sum_k \\Delta L[D_k]},\\qquad
        \\Delta L[D] = L[D](\\theta) - L[D](\\theta - \\lambda \\nabla L[D_k]),

    per ``(step, n, lr)``, with a delete-one-probe jackknife SE over ``k``. As λ → 0 it
    should approach :func:`osgr` at that ``n`` (moments of a held-out split).

    Parameters
    ----------
    probes : mapping
        ``store.probes()``: ``step, n, lr, k, train_before, train_after, test_before,
        test_after``.
    stats : xarray.Dataset, optional
        Adds ``osgr_theory`` at the exact probe step (NaN if no checkpoint there).
    split, debias
        For the theory.

    Returns
    -------
    xarray.Dataset
        Dim ``probe`` (one per ``(step, n, lr)``, coords ``step``, ``n``, ``lr``):
        ``osgr_measured``, ``osgr_se``, ``n_probes``, ``delta_train``, ``delta_test`` (means
        over k) [, ``osgr_theory``]. ``ds.set_index(probe=["step", "n", "lr"]).unstack()``
        gives a grid.
    """
    step = np.asarray(probes["step"], dtype=np.int64)
    nn = np.asarray(probes["n"], dtype=np.int64)
    lr = np.asarray(probes["lr"], dtype=np.float64)
    dtr = np.asarray(probes["train_before"], float) - np.asarray(probes["train_after"], float)
    dte = np.asarray(probes["test_before"], float) - np.asarray(probes["test_after"], float)
    keys = np.stack([step.astype(np.float64), nn.astype(np.float64), lr], axis=1)
    uk, inv = (np.unique(keys, axis=0, return_inverse=True) if step.size
               else (np.zeros((0, 3)), np.zeros(0, dtype=np.int64)))
    inv = inv.reshape(-1)
    G = uk.shape[0]
    R, se, cnt = np.full(G, np.nan), np.full(G, np.nan), np.zeros(G, dtype=np.int64)
    mtr, mte = np.full(G, np.nan), np.full(G, np.nan)
    for g in range(G):
        sel = inv == g
        R[g], se[g] = _ratio_jackknife(dte[sel], dtr[sel])
        cnt[g] = int(sel.sum())
        mtr[g], mte[g] = dtr[sel].mean(), dte[sel].mean()
    ps = uk[:, 0].astype(np.int64)
    pn = uk[:, 1].astype(np.int64)
    data: dict[str, Any] = {
        "osgr_measured": ("probe", R, {"long_name": "measured OSGR sum dL[D'] / sum dL[D] "
                                                    "(probe)", **_ONE}),
        "osgr_se": ("probe", se, {"long_name": "jackknife standard error over probes k",
                                  **_ONE}),
        "n_probes": ("probe", cnt, {"long_name": "probes K", **_ONE}),
        "delta_train": ("probe", mtr, {"long_name": "mean loss decrease on D_k", **_ONE}),
        "delta_test": ("probe", mte, {"long_name": "mean loss decrease on D'_k", **_ONE}),
    }
    if stats is not None and G:
        th = _theory_at(stats, ps, pn, split, debias, None)
        data["osgr_theory"] = ("probe", th.sel(step=xr.DataArray(ps, dims="probe"),
                                               n=xr.DataArray(pn, dims="probe")).values,
                               {"long_name": f"theoretical OSGR R(n) on {split!r}", **_ONE})
    coords = {
        "step": ("probe", ps, {"long_name": "optimizer step"}),
        "n": ("probe", pn, {"long_name": "probe subset size n", **_ONE}),
        "lr": ("probe", uk[:, 2], {"long_name": "virtual-step learning rate", **_ONE}),
    }
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"title": "measured OSGR from virtual-step probes", "theory_split": split,
                     "debias": int(debias)})
    return ds


# -- first-order OSGR from stored gradients ------------------------------------------------


@njit(parallel=True, nogil=True, cache=True)
def _subset_sums(x, row0, row_ptr, members, acc, col_block):  # pragma: no cover - numba
    """Add rows of chunk ``x`` into the subset sums they belong to.

    ``x`` holds record rows ``row0 .. row0 + len(x)``; record row ``i`` belongs to subsets
    ``members[row_ptr[i]:row_ptr[i+1]]``; ``acc`` is ``(n_subsets, P)`` float64. Parallel
    over column blocks (a block of all subsets' sums, ``K · col_block`` doubles, stays in
    cache), each column accumulated in row order, so the result does not depend on the
    thread count.
    """
    n_rows, P = x.shape
    nb = (P + col_block - 1) // col_block
    for b in prange(nb):
        a = b * col_block
        e = min(P, a + col_block)
        w = e - a
        for r in range(n_rows):
            lo = row_ptr[row0 + r]
            hi = row_ptr[row0 + r + 1]
            if lo == hi:
                continue
            xr = x[r, a:e]
            for idx in range(lo, hi):
                # a 1-D slice per subset lets LLVM vectorize the add (4x faster than acc[k, j])
                ak = acc[members[idx], a:e]
                for j in range(w):
                    ak[j] += xr[j]


def _membership(rows: Sequence[np.ndarray], ids: Sequence[int], N: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """CSR row -> subset ids for subsets ``ids[i]`` holding record rows ``rows[i]``."""
    if rows:
        r = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows])
        k = np.concatenate([np.full(len(x), i, dtype=np.int64) for x, i in zip(rows, ids,
                                                                               strict=True)])
    else:
        r = np.zeros(0, dtype=np.int64)
        k = np.zeros(0, dtype=np.int64)
    order = np.argsort(r, kind="stable")
    members = k[order]
    row_ptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=N), out=row_ptr[1:])
    return row_ptr, members


def _draw_subsets(
    rng: np.random.Generator, n_a: int, n_b: int | None, n: int, K: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """K pairs (D_k, D'_k) of size n; ``n_b=None``: both from one pool of ``n_a`` rows, disjoint."""
    A, B = [], []
    for _ in range(K):
        if n_b is None:
            perm = rng.choice(n_a, 2 * n, replace=False)
            A.append(np.sort(perm[:n]))
            B.append(np.sort(perm[n:]))
        else:
            A.append(np.sort(rng.choice(n_a, n, replace=False)))
            B.append(np.sort(rng.choice(n_b, n, replace=False)))
    return A, B


def _first_order_core(
    chunks_a: Callable[[], Iterator[np.ndarray]],
    chunks_b: Callable[[], Iterator[np.ndarray]] | None,
    n_rows: tuple[int, int | None],
    P: int,
    subsets_a: Sequence[np.ndarray],
    subsets_b: Sequence[np.ndarray],
    col_block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-subset ``g_{D'_k}·g_{D_k}`` and ``|g_{D_k}|²`` of subset *sums*, in one pass each.

    ``chunks_b=None``: both subset families index the same record (read once).
    """
    M = len(subsets_a)
    acc = np.zeros((2 * M, P))
    ids_a, ids_b = list(range(M)), list(range(M, 2 * M))
    if chunks_b is None:
        passes = [(chunks_a, n_rows[0], list(subsets_a) + list(subsets_b), ids_a + ids_b)]
    else:
        passes = [(chunks_a, n_rows[0], list(subsets_a), ids_a),
                  (chunks_b, n_rows[1], list(subsets_b), ids_b)]
    for chunks, N, rows, ids in passes:
        row_ptr, members = _membership(rows, ids, int(N))
        row0 = 0
        for x in chunks():
            x = np.ascontiguousarray(x)
            if x.ndim != 2 or x.shape[1] != P:
                raise ValueError(f"gradient chunk of shape {x.shape}, expected (rows, {P})")
            _subset_sums(x, row0, row_ptr, members, acc, col_block)
            row0 += x.shape[0]
        if row0 != N:
            raise ValueError(f"read {row0} gradient rows, expected {N}")
    a, b = acc[:M], acc[M:]
    return np.einsum("kp,kp->k", b, a), np.einsum("kp,kp->k", a, a)


def _record_reader(
    source: Any, step: int, split: str, chunk_rows: int
) -> tuple[Callable[[], Iterator[np.ndarray]], int, int]:
    """``(chunk iterator factory, N, P)`` for one record of a store or a mapping."""
    if isinstance(source, Mapping):
        arr = np.asarray(source[(step, split)])

        def it_arr() -> Iterator[np.ndarray]:
            for i in range(0, arr.shape[0], chunk_rows):
                yield arr[i:i + chunk_rows]

        return it_arr, int(arr.shape[0]), int(arr.shape[1])
    # shards of one run: the record's rows are those of every shard holding it, in order
    parts = [st for st in source if any(r.step == step and r.split == split
                                        and r.kind == "gradients" for r in st.records)]
    N = sum(st.record(step, split).n_samples for st in parts)
    P = source[0].layout.n_params

    def it_store() -> Iterator[np.ndarray]:
        for st in parts:
            yield from st.iter_grads(step, split, chunk_rows)

    return it_store, int(N), int(P)


def osgr_first_order(
    source: Any,
    steps: int | Sequence[int] | None = None,
    *,
    n: int | Sequence[int],
    splits: tuple[str, str] = ("train", "test"),
    n_subsets: int = 64,
    seed: int | np.random.Generator | None = 0,
    stats: xr.Dataset | None = None,
    theory_split: str | None = None,
    debias: bool = True,
    chunk_rows: int = 4096,
    max_bytes: int = 1 << 30,
) -> xr.Dataset:
    """First-order OSGR from stored per-sample gradients: one streaming pass per record.

    .. math::

        \\hat R_1 = \\frac{\\sum_k g_{D'_k} \\cdot g_{D_k}}{\\sum_k \\lVert g_{D_k}\\rVert^2},

    ``D_k`` (size n) drawn from split ``splits[0]``, ``D'_k`` (size n) from ``splits[1]``
    (disjoint halves of one draw when both name the same split). Its expectation is
    :math:`\\sum_j \\tilde g_j^2 / \\sum_j (\\tilde g_j^2 + \\rho_j^2/n)`, the theory of
    :func:`osgr` with the moments of ``splits[0]``, to first order in λ: the ratio of
    :math:`\\Delta L[D'] \\approx \\lambda g_{D'}\\cdot g_D` to
    :math:`\\Delta L[D] \\approx \\lambda \\lVert g_D\\rVert^2`. Standard error: delete-one
    jackknife over k.

    Subset sums are accumulated in float64, ``2 · K · P`` numbers per ``n`` value (``n``
    values are split into passes so that this stays under ``max_bytes``).

    Parameters
    ----------
    source : path, glob, list of paths, GradientStore or mapping
        A store (path or open), the shards of one run (their rows of a record are pooled;
        layouts must match), or a mapping ``{(step, split): (N, P) array}``. Gradients are
        streamed ``chunk_rows`` rows at a time.
    steps : int or sequence, optional
        Checkpoints; default every step holding both splits.
    n : int or sequence of int
        Subset size(s).
    splits : (str, str)
        Pools of ``D_k`` and ``D'_k``.
    n_subsets : int
        K pairs per (step, n).
    seed : int or Generator
        Subset draws are reproducible.
    stats : xarray.Dataset, optional
        Adds ``osgr_theory`` (step, n) from ``theory_split`` (default ``splits[0]``).
    debias : bool
        For the theory.
    chunk_rows : int
        Rows per chunk handed to the kernel.

    Returns
    -------
    xarray.Dataset
        ``osgr_first_order``, ``osgr_se``, ``dot_mean`` (mean ``g_{D'}·g_D``), ``sqnorm_mean``
        (mean ``|g_D|²``) (step, n) [, ``osgr_theory``].
    """
    ns = _n_grid(n)
    K = int(n_subsets)
    if K < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sa, sb = splits
    opened: list[Any] = []
    try:
        if isinstance(source, Mapping):
            have = {(int(k[0]), str(k[1])) for k in source}
        else:
            if hasattr(source, "read_grads"):
                source = [source]
            else:
                from .store import check_same_layout, expand_paths, open_store

                for path in expand_paths(source):
                    opened.append(open_store(path))
                check_same_layout(opened)
                source = opened
            have = {(int(r.step), str(r.split)) for st in source for r in st.records
                    if r.kind == "gradients"}
        if steps is None:
            st_list = sorted({s for s, _ in have if (s, sa) in have and (s, sb) in have})
        else:
            st_list = [int(s) for s in np.atleast_1d(steps)]
        for s in st_list:
            for sp in (sa, sb):
                if (s, sp) not in have:
                    raise KeyError(f"no per-sample gradient record (step={s}, split={sp!r})")
        S = len(st_list)
        R = np.full((S, ns.size), np.nan)
        se = np.full((S, ns.size), np.nan)
        dot = np.full((S, ns.size), np.nan)
        sq = np.full((S, ns.size), np.nan)
        for i, s in enumerate(st_list):
            it_a, Na, P = _record_reader(source, s, sa, chunk_rows)
            it_b, Nb, Pb = _record_reader(source, s, sb, chunk_rows)
            if P != Pb:
                raise ValueError(f"step {s}: splits have {P} and {Pb} parameters")
            same = sa == sb
            per_pass = max(1, int(max_bytes // max(1, 2 * K * P * 8)))
            for c0 in range(0, ns.size, per_pass):
                sub_a: list[np.ndarray] = []
                sub_b: list[np.ndarray] = []
                for nv in ns[c0:c0 + per_pass]:
                    need = 2 * nv if same else nv
                    if need > Na or (not same and nv > Nb):
                        raise ValueError(
                            f"step {s}: subsets of size n={nv} need {need} rows of {sa!r} "
                            f"({Na} stored)" + ("" if same else f" and {nv} of {sb!r} ({Nb})"))
                    A, B = _draw_subsets(rng, Na, None if same else Nb, int(nv), K)
                    sub_a += A
                    sub_b += B
                num, den = _first_order_core(it_a, None if same else it_b, (Na, Nb), P,
                                             sub_a, sub_b)
                for jj, nv in enumerate(ns[c0:c0 + per_pass]):
                    sl = slice(jj * K, (jj + 1) * K)
                    R[i, c0 + jj], se[i, c0 + jj] = _ratio_jackknife(num[sl], den[sl])
                    dot[i, c0 + jj] = num[sl].mean() / float(nv) ** 2
                    sq[i, c0 + jj] = den[sl].mean() / float(nv) ** 2
    finally:
        for st in opened:
            st.close()
    data: dict[str, Any] = {
        "osgr_first_order": (("step", "n"), R, {"long_name": "first-order OSGR sum g_D'.g_D / "
                                                             "sum |g_D|^2", **_ONE}),
        "osgr_se": (("step", "n"), se, {"long_name": "jackknife standard error over subsets",
                                        **_ONE}),
        "dot_mean": (("step", "n"), dot, {"long_name": "mean g_D'.g_D over subsets"}),
        "sqnorm_mean": (("step", "n"), sq, {"long_name": "mean |g_D|^2 over subsets"}),
    }
    coords = {"step": ("step", np.asarray(st_list, dtype=np.int64), {"long_name":
                                                                     "optimizer step"}),
              "n": _n_coord(ns)}
    tsplit = theory_split or sa
    if stats is not None and S:
        th = _theory_at(stats, np.asarray(st_list), ns, tsplit, debias, None)
        data["osgr_theory"] = (("step", "n"), th.sel(n=ns).values,
                               {"long_name": f"theoretical OSGR R(n) on {tsplit!r}", **_ONE})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"title": "first-order OSGR from stored per-sample gradients",
                     "splits": f"{sa},{sb}", "n_subsets": K, "theory_split": tsplit,
                     "debias": int(debias)})
    return ds


# -- expectation of the measured estimators, given the two finite pools ---------------------


def osgr_pools(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    splits: tuple[str, str] = ("train", "test"),
) -> xr.Dataset:
    """First-order expectation of the probe and first-order OSGR, given their two pools.

    The probe (:func:`osgr_probe`) and :func:`osgr_first_order` draw ``D_k`` (``n`` rows,
    without replacement) from a *finite* pool A of ``N_A`` samples and ``D'_k`` from a
    disjoint finite pool B. With pool means ``m_A``, ``m_B`` and pool-A variance
    ``s_A²`` (ddof 1), ``E[g_{D'}·g_D] = m_B·m_A`` and
    ``E|g_D|² = |m_A|² + (1/n − 1/N_A) Σ_j s_Aj²``, so, to first order in λ and up to the
    O(1/K) bias of a ratio of sums,

    .. math::

        \\mathbb E[\\hat R \\mid A, B] = \\frac{\\sum_j m_{Aj} m_{Bj}}
        {\\sum_j \\left(m_{Aj}^2 + (1/n - 1/N_A)\\, s_{Aj}^2\\right)} .

    The theory :func:`osgr` on pool A has the same denominator (debiased ``G``) but the
    numerator ``Σ_j (m_Aj² − s_Aj²/N_A)``: both estimate ``Σ_j g̃_j²``, but they differ by
    the sampling noise of the *pools*, ``m_A·(m_B − m_A) + Σ s_A²/N_A``, which neither the
    probes' jackknife over k nor :func:`osgr_ci` (pool A only, and nearly cancelling
    between numerator and denominator when R → 1) contains. Compare a measured OSGR with
    the theory using ``SE² = SE_measured² + SE_pools²``, where ``SE_pools`` is the
    jackknife SE of ``osgr_pools − osgr`` (variable ``pool_minus_theory``):
    ``jackknife(stats, lambda s: osgr_pools(s, n, splits=(a, b)))``.

    Parameters
    ----------
    stats : xarray.Dataset
        Moments with both ``splits`` (``mean``, ``var``, ``count``).
    n : int or sequence of int
        Draw size(s).
    splits : (str, str)
        Pools A (``D_k``) and B (``D'_k``).

    Returns
    -------
    xarray.Dataset
        ``osgr_pools`` (step, n): the expectation above; ``osgr_theory`` (step, n): :func:`osgr`
        on pool A (debiased); ``pool_minus_theory`` their difference.
    """
    a, b = splits
    st = _select_splits(stats, [a, b])
    ns = _n_grid(n)
    ma = st["mean"].sel(split=a).transpose("step", "param").values
    mb = st["mean"].sel(split=b).transpose("step", "param").values
    va = st["var"].sel(split=a).transpose("step", "param").values
    Na = st["count"].sel(split=a).values.astype(np.float64)
    ok = np.isfinite(ma) & np.isfinite(mb) & np.isfinite(va)
    num = np.where(ok, ma * mb, 0.0).sum(-1)
    m2 = np.where(ok, ma * ma, 0.0).sum(-1)
    sv = np.where(ok, va, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        den = m2[:, None] + (1.0 / ns[None, :] - 1.0 / Na[:, None]) * sv[:, None]
        E = np.where((den > 0) & ok.any(-1)[:, None], num[:, None] / den, np.nan)
    T = osgr(stats, ns, split=a)["osgr"].sel(split=a).transpose("step", "n").values
    coords = {"step": st["step"], "n": _n_coord(ns)}
    ds = xr.Dataset(
        {
            "osgr_pools": (("step", "n"), E, {"long_name": "first-order expectation of the "
                                                          "measured OSGR given pools A, B",
                                              **_ONE}),
            "osgr_theory": (("step", "n"), T, {"long_name": f"theoretical OSGR R(n) on {a!r}",
                                               **_ONE}),
            "pool_minus_theory": (("step", "n"), E - T,
                                  {"long_name": "osgr_pools - osgr_theory", **_ONE}),
        },
        coords=coords,
    )
    ds.attrs.update({"title": "expected measured OSGR given finite pools", "splits": f"{a},{b}"})
    return ds
