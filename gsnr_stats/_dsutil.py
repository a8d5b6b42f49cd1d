"""Small private helpers shared by the analytics modules (Datasets in, arrays out).

Reading the moments Dataset of :func:`gsnr_stats.reduce` (``ddof``, split selection,
per-parameter sample counts, the signal ``G_j`` and noise ``V_j`` of ``docs/theory.md``) and
building the coordinates every output shares (``step``, ``split``, ``n``). The lowest of
:mod:`.theory`, :mod:`.groups`, :mod:`.uncertainty` and :mod:`.estimators`: it imports none
of them, nor the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

_ONE = {"units": "1"}


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


def _base_coords(stats: xr.Dataset) -> dict[str, Any]:
    return {"step": stats["step"], "split": stats["split"]}
