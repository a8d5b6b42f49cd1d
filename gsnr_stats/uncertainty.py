"""Uncertainty of any statistic of the moments: delete-one-block jackknife and intervals.

From the per-block moments of ``reduce(..., blocks=K)``: :func:`leave_one_block_out`
rebuilds the moments without each block (exact Chan merges of prefix and suffix, no
subtraction), :func:`jackknife` turns any Dataset function of the moments into standard
errors and normal intervals, :func:`osgr_ci` and :func:`aggregate_ci` apply it to
:func:`~.theory.osgr` and :func:`~.groups.aggregate`, and :func:`_ratio_jackknife` is the
delete-one jackknife of a ratio of sums used by the measured estimators (``docs/theory.md``).
Datasets only: never reads a store.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import _reasons
from ._dsutil import _ddof, describe, require_stats
from .errors import ArgumentTypeError, UsageError
from .groups import aggregate
from .kernels import finalize_moments
from .theory import _osgr

__all__ = ["aggregate_ci", "jackknife", "leave_one_block_out", "osgr_ci"]


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
    fin = finalize_moments(count, mean, m2, ddof)
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

    _check_jackknife(stats, func, level, "gs.jackknife")
    est = as_ds(func(stats))
    names = [v for v in est.data_vars if np.issubdtype(est[v].dtype, np.floating)] \
        if variables is None else list(variables)
    reps = [as_ds(func(s))[names] for _, s in leave_one_block_out(stats)]
    K = len(reps)
    if K < 2:
        raise UsageError(f"jackknife needs at least 2 non-empty blocks, got {K}: reduce with "
                         "more blocks (blocks=K, CLI --blocks K) or records of more samples")
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
    return _se_reasons(out, est, stack, names, stats)


def _check_jackknife(stats: Any, func: Any, level: Any, where: str) -> None:
    """The arguments of :func:`jackknife`, checked before any replicate is computed."""
    require_stats(stats, where)
    if not {"block_count", "block_mean", "block_m2"} <= set(stats.data_vars):
        raise UsageError(f"{where}: stats has no per-block moments; reduce with blocks=K "
                         "(K >= 2), e.g. gs.reduce(path, blocks=8) (CLI: --blocks 8)")
    if not callable(func):
        raise ArgumentTypeError(f"{where}: func must be a callable Dataset -> Dataset, got "
                                f"{describe(func)}")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int | float)
                              or not 0 < level < 1):
        raise UsageError(f"{where}: level must be a probability in (0, 1), e.g. 0.95, got "
                         f"{describe(level)}")


def _se_reasons(out: xr.Dataset, est: xr.Dataset, stack: xr.Dataset, names: Sequence[str],
                stats: xr.Dataset) -> xr.Dataset:
    """``attrs["reason"]`` on ``<v>_se`` (and the bounds) where they are NaN."""
    bc = stats["block_count"].values
    per = bc[bc > 0]
    small = (f" (records hold {int(stats['count'].values.min())}..."
             f"{int(stats['count'].values.max())} samples in {bc.shape[-1]} blocks, "
             f"{int(per.min()) if per.size else 0} in the smallest non-empty one: too few to "
             "drop a block)")
    for v in names:
        e = np.isnan(est[v].values)
        rep = stack[v].isnull().any("_jk").transpose(*est[v].dims).values & ~e
        for suffix in ("_se", "_lo", "_hi"):
            if f"{v}{suffix}" not in out:
                continue
            why = _reasons.Reasons()
            why.add(f"{v}{suffix}", e, f"{v} itself is NaN there (see its reason)")
            why.add(f"{v}{suffix}", rep,
                    "NaN in at least one leave-one-block-out replicate" + small)
            for var, texts in why.by_var.items():
                out[var].attrs["reason"] = "; ".join(texts)
    return out


def osgr_ci(
    stats: xr.Dataset, n: int | Sequence[int], *, level: float = 0.95, **kw: Any
) -> xr.Dataset:
    """:func:`osgr` with jackknife ``osgr_se``, ``osgr_lo``, ``osgr_hi`` over blocks.

    Keyword arguments go to :func:`osgr`. Needs ``reduce(..., blocks=K)``. Warns once (not
    per replicate) when the debiased signal is below the noise; ``osgr_se``/``osgr_lo``
    carry ``attrs["reason"]`` where they are NaN or the lower bound is negative for a
    positive R (an SE large beside R: few samples per block).
    """
    _check_jackknife(stats, _osgr, level, "gs.osgr_ci")
    out = jackknife(stats, lambda s: _osgr(s, n, **kw), variables=["osgr"], level=level)
    _reasons.warn_below_noise(out, "osgr", "osgr_ci")
    with np.errstate(invalid="ignore"):
        wide = (out["osgr_lo"].values < 0) & (out["osgr"].values > 0)
    if wide.any():
        bc = stats["block_count"].values
        per = bc[bc > 0]
        dims = out["osgr_lo"].dims
        loc = _reasons.where(wide, dims, {d: out[d].values for d in dims if d in out.coords})
        clause = ("normal interval R - z SE reaches below 0 for a positive R: the jackknife SE "
                  f"is large beside R (smallest non-empty block: {int(per.min())} samples; more "
                  f"samples per block narrow it) [{int(wide.sum())} of {wide.size} values; {loc}]")
        prev = out["osgr_lo"].attrs.get("reason")
        out["osgr_lo"].attrs["reason"] = f"{prev}; {clause}" if prev else clause
    return out


def aggregate_ci(
    stats: xr.Dataset, by: str = "tensor", *, level: float = 0.95, **kw: Any
) -> xr.Dataset:
    """:func:`aggregate` with jackknife errors on mean, median, quantiles and pooled GSNR."""
    _check_jackknife(stats, aggregate, level, "gs.aggregate_ci")
    return jackknife(
        stats, lambda s: aggregate(s, by, **kw),
        variables=["gsnr_mean", "gsnr_median", "gsnr_quantile", "gsnr_pooled"], level=level,
    )


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
