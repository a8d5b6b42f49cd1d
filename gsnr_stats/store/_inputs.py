"""What a writer is handed, checked before anything is written: gradients, per-sample
vectors, moments blocks. Every refusal is a :class:`SchemaError` (or :class:`StoreError`
for an overflow) naming the record and, where there is one, the parameter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import SchemaError, StoreError
from .layout import Layout
from .schema import INT64_MAX, INT64_MIN


def param_name(layout: Layout, col: int) -> str:
    """``parameter NAME[i, j]`` of flat column ``col``."""
    t = int(np.searchsorted(np.array(layout.offsets), col, side="right") - 1)
    idx = np.unravel_index(col - layout.offsets[t], layout.shapes[t]) if layout.shapes[t] else ()
    return f"parameter {layout.names[t]}[{', '.join(str(int(i)) for i in idx)}]"


def check_grads(grads: Any, n_params: int, where: str) -> np.ndarray:
    """``grads`` as a real ``(n, P)`` array (a ``(n,)`` vector when ``P == 1``)."""
    g = np.asarray(grads)
    if g.ndim == 1 and n_params == 1:
        g = g[:, None]
    if g.ndim != 2 or g.shape[1] != n_params:
        raise SchemaError(f"{where}: grads has shape {g.shape}, expected (n, {n_params})")
    if g.dtype == np.bool_ or not (
        np.issubdtype(g.dtype, np.floating) or np.issubdtype(g.dtype, np.integer)
    ):
        raise SchemaError(f"{where}: grads dtype {g.dtype} is not a real number type")
    return g


def as_vector(x: Any, name: str, dt: str, n: int, default: np.ndarray, where: str) -> np.ndarray:
    """Per-sample values ``x`` (``n`` of them) as dtype ``dt``; ``default`` if None.

    int64 columns refuse non-integral, non-finite and out-of-range values instead of
    casting them.
    """
    if x is None:
        return default
    try:
        raw = np.asarray(x)
        if dt == "<i8":
            if raw.dtype.kind == "f":
                if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
                    raise ValueError("non-integer values")
            elif raw.dtype.kind not in "iub":
                raise ValueError(f"dtype {raw.dtype}")
            if raw.size and raw.dtype.kind in "iuf" and (
                raw.max() > INT64_MAX or raw.min() < INT64_MIN
            ):
                raise OverflowError("beyond int64")
        a = np.asarray(raw, dtype=dt).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:
        raise SchemaError(f"{where}: {name} cannot be stored as {np.dtype(dt)} ({e})") from e
    if a.shape[0] != n:
        raise SchemaError(f"{where}: {name} has {a.shape[0]} values, grads has {n} rows")
    return a


def to_store_dtype(g: np.ndarray, dtype: np.dtype, layout: Layout, where: str) -> np.ndarray:
    """``g`` in the store dtype, refusing finite values that would overflow to inf."""
    if g.dtype == dtype:
        return g
    with np.errstate(over="ignore", invalid="ignore"):
        out = g.astype(dtype)
    if np.issubdtype(g.dtype, np.floating) and g.dtype.itemsize <= dtype.itemsize:
        return out
    inf = np.isinf(out)
    if inf.any():
        over = inf & np.isfinite(g)
        if over.any():
            r, c = (int(v[0]) for v in np.nonzero(over))
            raise StoreError(
                f"{where}: gradient {g[r, c]:.6g} (row {r}, {param_name(layout, c)}) "
                f"overflows {dtype.name} (max {float(np.finfo(dtype).max):.6g}); "
                + ("use dtype='float32'" if dtype == np.float16 else "rescale the loss")
            )
    return out


def check_moments(count: Any, mean: Any, m2: Any, layout: Layout,
                  where: str) -> tuple[float, np.ndarray, np.ndarray]:
    """A moments block as ``(count, mean (P,), m2 (P,))`` float64; count in ``[0, 2**53]``."""
    P = layout.n_params
    try:
        mean = np.asarray(mean, dtype="<f8").reshape(-1)
        m2 = np.asarray(m2, dtype="<f8").reshape(-1)
        count = float(count)
    except (TypeError, ValueError, OverflowError) as e:
        raise SchemaError(f"{where}: moments are not numbers ({e})") from e
    if mean.shape != (P,) or m2.shape != (P,):
        raise SchemaError(f"{where}: mean/m2 shapes {mean.shape}/{m2.shape}, expected ({P},)")
    if not (math.isfinite(count) and 0 <= count <= 2.0**53):
        raise SchemaError(f"{where}: count {count} must be finite and in [0, 2**53]")
    with np.errstate(invalid="ignore"):
        neg = m2 < 0
    if neg.any():
        c = int(np.flatnonzero(neg)[0])
        raise SchemaError(f"{where}: M2 {m2[c]:.6g} < 0 for {param_name(layout, c)}")
    return count, mean, m2
