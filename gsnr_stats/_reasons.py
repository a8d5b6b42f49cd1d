"""Why an analytics output is negative or NaN, carried with the output.

Every output of :mod:`.theory`, :mod:`.groups`, :mod:`.uncertainty` and :mod:`.estimators`
that can come out negative or NaN for a known reason gets ``attrs["reason"]`` on that
variable (one clause per cause, with how many values and which steps/splits it hit) and the
Dataset a summary ``attrs["note"]``; the report prints them. The common case, a debiased
signal below the noise, also raises :class:`~.errors.SignalBelowNoiseWarning`
(``docs/theory.md``, "Negative and NaN outputs"). Arrays and Datasets only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .errors import SignalBelowNoiseWarning

# The clauses the outputs carry; tests and the report refer to them by these names.
BELOW_NOISE_TRAIN = ("debiased signal below noise: the training split is fitted (its per-sample "
                     "gradients sum to ~0 at an optimum), so sum_j (m_j^2 - s_j^2/N) < 0; use a "
                     "held-out split")
BELOW_NOISE = ("debiased signal below noise: sum_j (m_j^2 - s_j^2/N) < 0, the mean gradient is "
               "smaller than N samples resolve; use more samples or debias=False")
NO_PARAMS = "no parameter with finite moments (record absent, or every sample omitted)"

_LIST = 6  # labels listed before "..." in a where-clause


def _labels(values: Sequence[Any]) -> str:
    vals = [repr(str(v)) if isinstance(v, str | np.str_) else str(int(v))
            if isinstance(v, int | np.integer) else str(v) for v in values]
    return ", ".join(vals[:_LIST]) + (", ..." if len(vals) > _LIST else "")


def where(mask: np.ndarray, dims: Sequence[str], coords: dict[str, Any]) -> str:
    """``"split 'train', step 0, 10"``: the labels of ``dims`` along which ``mask`` holds.

    Only dims with coordinates in ``coords`` (``split``, ``step``, ``group``, ``n``) are
    named; the others are summed over.
    """
    mask = np.asarray(mask, dtype=bool)
    parts = []
    for ax, d in enumerate(dims):
        if d not in coords or d == "param":
            continue
        other = tuple(i for i in range(mask.ndim) if i != ax)
        hit = mask.any(axis=other) if other else mask
        c = coords[d]
        c = c[1] if isinstance(c, tuple) else getattr(c, "values", c)
        vals = np.asarray(c)[hit]
        if 0 < hit.sum() < hit.size or d in ("split", "step"):
            parts.append(f"{d} {_labels(list(vals))}")
    return ", ".join(parts)


class Reasons:
    """Collects the causes of negative / NaN values per output variable."""

    def __init__(self, dims: dict[str, Sequence[str]] | None = None,
                 coords: dict[str, Any] | None = None) -> None:
        self._dims = dims or {}
        self._coords = coords or {}
        self.by_var: dict[str, list[str]] = {}

    def add(self, var: str, mask: np.ndarray | bool, text: str, *, detail: bool = True) -> bool:
        """Record ``text`` for ``var`` if ``mask`` holds anywhere (with counts and labels)."""
        m = np.asarray(mask, dtype=bool)
        if not m.any():
            return False
        clause = text
        if detail and m.ndim:
            loc = where(m, self._dims.get(var, ()), self._coords) if var in self._dims else ""
            clause += f" [{int(m.sum())} of {m.size} values" + (f"; {loc}" if loc else "") + "]"
        self.by_var.setdefault(var, [])
        if clause not in self.by_var[var]:
            self.by_var[var].append(clause)
        return True

    def add_below_noise(self, var: str, mask: np.ndarray, splits: Sequence[str]) -> None:
        """The below-noise clause for ``mask`` (split on axis 1): the fitted-training one on
        ``train``, the generic one elsewhere."""
        m = np.asarray(mask, dtype=bool)
        for j, sp in enumerate(splits):
            one = np.zeros_like(m)
            one[:, j] = m[:, j]
            self.add(var, one, BELOW_NOISE_TRAIN if str(sp) == "train" else BELOW_NOISE)

    def attach(self, ds: xr.Dataset) -> xr.Dataset:
        """Write ``attrs["reason"]`` per variable and the summary ``attrs["note"]`` (in place)."""
        for var, texts in self.by_var.items():
            ds[var].attrs["reason"] = "; ".join(texts)
        notes = [f"{v}: {'; '.join(t)}" for v, t in self.by_var.items()]
        if notes:
            ds.attrs["note"] = " | ".join(notes)
        return ds


def warn_below_noise(ds: xr.Dataset, var: str, what: str, *, stacklevel: int = 3) -> None:
    """:class:`SignalBelowNoiseWarning` naming the splits and steps where ``ds.signal < 0``."""
    if "signal" not in ds or "split" not in ds["signal"].dims:
        return
    sig = ds["signal"].transpose("step", "split", ...)
    vals = sig.values.reshape(sig.sizes["step"], sig.sizes["split"], -1)
    with np.errstate(invalid="ignore"):
        neg = (vals < 0).any(axis=-1)
    for j, sp in enumerate(str(s) for s in ds["split"].values):
        if not neg[:, j].any():
            continue
        steps = _labels(list(ds["step"].values[neg[:, j]]))
        head = (f"{what}: debiased signal below noise on split {sp!r} at step {steps}, so "
                f"{var} < 0 there (NaN where n > N)")
        if sp == "train":
            msg = (f"{head}: the training split is fitted (its per-sample gradients sum to ~0 at "
                   "an optimum); use a held-out split (e.g. split='test')")
        else:
            msg = (f"{head}: sum_j (m_j^2 - s_j^2/N) < 0, the mean gradient is smaller than the "
                   "record's N samples resolve; use more samples or debias=False")
        warnings.warn(msg, SignalBelowNoiseWarning, stacklevel=stacklevel)
