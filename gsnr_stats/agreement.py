"""Measured OSGR against the theory with the pool-aware error (``docs/theory.md``).

:func:`osgr_agreement` puts a first-order (or probe) measurement next to the theory and
divides their difference by ``SE_total = sqrt(SE_measured² + SE_pools²)``: the estimator's
own jackknife over draws plus the sampling error of the two finite pools (block jackknife
of ``osgr_pools − osgr``). :func:`~.uncertainty.osgr_ci`'s SE leaves the pools out and is
not the error of this comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ._dsutil import _ONE, require_stats
from .errors import UsageError
from .estimators import osgr_pools
from .uncertainty import jackknife, osgr_ci

__all__ = ["osgr_agreement"]

ERROR_SHOWN = "se_total = sqrt(se_measured^2 + se_pools^2) (pool-aware)"


def _pools(measured: xr.Dataset, stats: xr.Dataset,
           splits: Sequence[str] | None) -> tuple[str, str]:
    if splits is not None:
        a, b = splits
        return str(a), str(b)
    if "splits" in measured.attrs:  # osgr_first_order records its pools
        a, b = str(measured.attrs["splits"]).split(",")
        return a, b
    a = measured.attrs.get("theory_split")
    others = [str(s) for s in stats["split"].values if str(s) != a]
    if a is not None and len(others) == 1:  # a probe: pool B is the one other split
        return str(a), others[0]
    raise UsageError("gs.osgr_agreement: cannot tell the two pools of the measurement; pass "
                     "splits=(pool of D, pool of D'), e.g. splits=('train', 'test')")


def osgr_agreement(
    measured: xr.Dataset,
    stats: xr.Dataset,
    *,
    splits: Sequence[str] | None = None,
    var: str | None = None,
) -> xr.Dataset:
    """Measured OSGR vs theory, with the pool-aware standard error and z-scores.

    .. math::

        z = \\frac{R_\\mathrm{measured} - R}{\\mathrm{SE_{total}}},\\qquad
        \\mathrm{SE_{total}}^2 = \\mathrm{SE_{measured}}^2 + \\mathrm{SE_{pools}}^2,

    ``SE_pools`` the block jackknife SE of ``osgr_pools − osgr`` (variable
    ``pool_minus_theory`` of :func:`~.estimators.osgr_pools`).

    Parameters
    ----------
    measured : xarray.Dataset
        From :func:`~.estimators.osgr_first_order` (dims ``step``, ``n``) with
        ``osgr_se``.
    stats : xarray.Dataset
        Moments of both pools from ``reduce(..., blocks=K)``.
    splits : (str, str), optional
        Pools A (``D_k``) and B (``D'_k``); default ``measured.attrs["splits"]``.
    var : str, optional
        Measured variable (default ``osgr_first_order``, else ``osgr_measured``).

    Returns
    -------
    xarray.Dataset
        ``osgr_measured``, ``osgr_theory``, ``se_measured``, ``se_pools``, ``se_total``,
        ``z`` (step, n), and ``se_theory_only`` (:func:`osgr_ci`'s SE, *not* the
        comparison's error); ``attrs["error_shown"]`` names the error of ``z``.
    """
    require_stats(stats, "gs.osgr_agreement")
    if not isinstance(measured, xr.Dataset):
        raise UsageError("gs.osgr_agreement: measured must be an osgr_first_order Dataset")
    v = var or next((x for x in ("osgr_first_order", "osgr_measured") if x in measured), None)
    if v is None or "osgr_se" not in measured or not {"step", "n"} <= set(measured.dims):
        raise UsageError("gs.osgr_agreement: measured must be an osgr_first_order Dataset "
                         "(dims step, n; osgr_first_order and osgr_se)")
    a, b = _pools(measured, stats, splits)
    ns = [int(x) for x in measured["n"].values]
    steps = measured["step"].values
    jk = jackknife(stats, lambda s: osgr_pools(s, ns, splits=(a, b)),
                   variables=["pool_minus_theory"])
    ci = osgr_ci(stats, ns, split=a)
    theory = jk["osgr_theory"].sel(step=steps, n=ns)
    se_p = jk["pool_minus_theory_se"].sel(step=steps, n=ns)
    se_t = ci["osgr_se"].sel(split=a, drop=True).sel(step=steps, n=ns)
    y = measured[v].transpose("step", "n")
    se_m = measured["osgr_se"].transpose("step", "n")
    tot = np.hypot(se_m, se_p)
    out = xr.Dataset({
        "osgr_measured": y.assign_attrs(long_name=f"measured OSGR ({v})", **_ONE),
        "osgr_theory": theory.assign_attrs(long_name=f"theoretical OSGR R(n) on {a!r}", **_ONE),
        "se_measured": se_m.assign_attrs(long_name="estimator's jackknife SE over draws",
                                         **_ONE),
        "se_pools": se_p.assign_attrs(long_name="block jackknife SE of osgr_pools - osgr",
                                      **_ONE),
        "se_total": tot.assign_attrs(long_name=ERROR_SHOWN, **_ONE),
        "z": ((y - theory) / tot).assign_attrs(long_name="(measured - theory) / se_total",
                                               **_ONE),
        "se_theory_only": se_t.assign_attrs(long_name="osgr_ci SE of the theory alone (pool A;"
                                                      " not the comparison's error)", **_ONE),
    })
    out.attrs.update({"title": "measured vs theoretical OSGR, pool-aware error",
                      "error_shown": ERROR_SHOWN, "splits": f"{a},{b}", "measured_var": v})
    return out
