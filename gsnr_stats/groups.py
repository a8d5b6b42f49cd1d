"""Parameter groups: the partition of the ``param`` axis and GSNR aggregates per group.

:class:`_Groups` splits the parameters by a ``param`` coordinate (``tensor``, ``layer``) or
into one ``model`` group, in layout order, and sums arrays per group; the closed forms of
:mod:`.theory` use it for their ``by=`` argument. :func:`aggregate` summarises the GSNR
``r_j`` of each group (mean, median, quantiles, pooled ratio; notation of
``docs/theory.md``). Datasets only: imports neither the store nor :mod:`.theory`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import xarray as xr

from . import _reasons
from ._dsutil import _ONE, _base_coords, _count_per_param, _ddof, _select_splits, describe, require_stats
from .errors import ArgumentTypeError

__all__ = ["aggregate"]

GroupBy = str | None


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
    st = _select_splits(require_stats(stats, "gs.aggregate"), split)
    if not isinstance(by, str):
        raise ArgumentTypeError(f"gs.aggregate: by must be 'model', 'tensor', 'layer' or a param "
                                f"coordinate name, got {describe(by)}")
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
    why = _reasons.Reasons({v: d for v in ("gsnr_mean", "gsnr_median", "gsnr_pooled")},
                           {"step": st["step"].values, "split": st["split"].values,
                            "group": groups.labels})
    none = ~np.isfinite(med_r)
    with np.errstate(invalid="ignore"):
        for v in ("gsnr_mean", "gsnr_median", "gsnr_quantile"):
            why.add(v, none, "no parameter of the group has a finite GSNR (all dead, s^2 = 0, "
                             "or without data)", detail=v != "gsnr_quantile")
            if debias:
                why.add(v, ds[v].values < 0, "debiased r_j - 1/N < 0: the parameters' mean "
                                             "gradient is below what N samples resolve",
                        detail=v != "gsnr_quantile")
        why.add("gsnr_pooled", np.isnan(pooled) & (n_ok > 0),
                "sum m^2 = 0 and sum s^2 = 0 (all parameters dead)")
        why.add("gsnr_pooled", n_ok == 0, _reasons.NO_PARAMS)
        if debias:
            why.add_below_noise("gsnr_pooled", pooled < 0, [str(s) for s in st["split"].values])
    return why.attach(ds)
