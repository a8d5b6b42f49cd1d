"""Small private helpers shared by the analytics modules (Datasets in, arrays out).

Reading the moments Dataset of :func:`gsnr_stats.reduce` (``ddof``, split selection,
per-parameter sample counts, the signal ``G_j`` and noise ``V_j`` of ``docs/theory.md``) and
building the coordinates every output shares (``step``, ``split``, ``n``), and the checks
at the top of every public entry point (:func:`require_stats`, :func:`require_paths`,
:func:`require_int`): a wrong kind of argument fails there, saying what was expected and
what came, not deep inside. The lowest of :mod:`.theory`, :mod:`.groups`,
:mod:`.uncertainty` and :mod:`.estimators`: it imports none of them, nor the store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import ArgumentTypeError, MissingSplitError, UsageError

_ONE = {"units": "1"}

#: What every analytics function reads from the moments Dataset.
MOMENTS = ("mean", "var", "count")


def describe(obj: Any) -> str:
    """A short account of what an argument is, for error messages: ``str 'store.h5'``."""
    kind = type(obj).__name__
    if isinstance(obj, xr.Dataset):
        names = sorted(str(v) for v in obj.data_vars)
        return f"a Dataset with variables {names[:8]}{' ...' if len(names) > 8 else ''}"
    if isinstance(obj, xr.DataArray):
        return f"a DataArray {obj.name!r} (one variable, not the Dataset)"
    if isinstance(obj, str | bytes | os.PathLike | int | float | bool) or obj is None:
        return f"{kind} {obj!r}" if obj is not None else "None"
    text = repr(obj)
    return f"{kind} {text[:60] + '...' if len(text) > 60 else text}"


def require_stats(
    obj: Any, where: str, *, need: Sequence[str] = MOMENTS, what: str = "stats"
) -> xr.Dataset:
    """``obj`` if it is the moments Dataset of :func:`gsnr_stats.reduce`, else a clear error.

    Parameters
    ----------
    obj : any
        The argument to check.
    where : str
        The public function, as the user called it (``"gs.osgr"``).
    need : sequence of str
        Variables the function reads.
    what : str
        The argument's name in the message.

    Raises
    ------
    ArgumentTypeError
        ``obj`` is not an ``xarray.Dataset`` (a path, a store, a DataArray ...); a path gets
        the call that would have worked.
    UsageError
        A Dataset without the variables in ``need``.
    """
    if isinstance(obj, xr.Dataset):
        missing = [v for v in need if v not in obj.variables]
        if missing:
            raise UsageError(
                f"{where}: {what} lacks {missing}; expected the Dataset of gs.reduce(...) or "
                f"gs.gsnr(...), got {describe(obj)}")
        return obj
    hint = ""
    if isinstance(obj, str | os.PathLike):
        path = os.fspath(obj)
        hint = (f" — did you mean xr.load_dataset({path!r}) first?" if str(path).endswith(".nc")
                else f" — did you mean gs.reduce({path!r}) first?")
    elif hasattr(obj, "read_grads") and hasattr(obj, "path"):
        hint = f" (an open store) — did you mean gs.reduce({str(obj.path)!r}) first?"
    elif isinstance(obj, xr.DataArray):
        hint = " — pass the whole Dataset"
    raise ArgumentTypeError(
        f"{where}: {what} must be an xarray.Dataset from gs.reduce(...), got {describe(obj)}"
        f"{hint}")


def require_paths(obj: Any, where: str, what: str = "paths") -> None:
    """Raise :class:`ArgumentTypeError` unless ``obj`` is a path, a glob, or a list of them."""
    items = [obj] if isinstance(obj, str | os.PathLike) else obj
    if isinstance(obj, xr.Dataset):
        raise ArgumentTypeError(
            f"{where}: {what} must be store paths (HDF5 files or globs), got {describe(obj)} — "
            "it is already reduced; pass it to gs.osgr / gs.aggregate / ... directly")
    if not isinstance(items, Sequence) or isinstance(items, bytes) or not all(
            isinstance(p, str | os.PathLike) for p in items):
        raise ArgumentTypeError(
            f"{where}: {what} must be a store path, a glob or a list of them, got "
            f"{describe(obj)}")


def require_int(value: Any, name: str, where: str, *, minimum: int | None = None,
                none: bool = False) -> int | None:
    """``value`` as an int (``None`` passes if ``none``); :class:`UsageError` otherwise."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ArgumentTypeError(f"{where}: {name} must be an integer"
                                + (" or None" if none else "") + f", got {describe(value)}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{where}: {name} must be >= {minimum}, got {int(value)}")
    return int(value)


def held_out_split(splits: Sequence[str]) -> str:
    """The split whose moments feed OSGR and gap by default: ``test``, else a non-train one."""
    if "test" in splits:
        return "test"
    others = [s for s in splits if s != "train"]
    return others[0] if others else splits[0]


def default_n(stats: xr.Dataset) -> int:
    """Default training-set size: the largest sample count of ``train`` (else the first split)."""
    splits = [str(s) for s in stats["split"].values]
    sp = "train" if "train" in splits else splits[0]
    return max(int(stats["count"].sel(split=sp).max()), 1)


def _ddof(stats: xr.Dataset) -> int:
    return int(stats.attrs.get("ddof", 1))


def _select_splits(stats: xr.Dataset, split: str | Sequence[str] | None) -> xr.Dataset:
    """Restrict to ``split`` (a name or a list), keeping the ``split`` dimension."""
    if split is None:
        return stats
    if not isinstance(split, str) and not (isinstance(split, Sequence) and all(
            isinstance(s, str) for s in split)):
        raise ArgumentTypeError(f"split must be a split name or a list of them, got "
                                f"{describe(split)}")
    want = [split] if isinstance(split, str) else list(split)
    have = [str(s) for s in stats["split"].values]
    missing = [s for s in want if s not in have]
    if missing:
        raise MissingSplitError(f"split(s) {missing} not in the Dataset (splits: {have})")
    return stats.sel(split=want)


def _n_grid(n: int | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(n, xr.Dataset | xr.DataArray | str | bytes | bool):
        raise ArgumentTypeError(f"n must be a positive integer or a 1-D sequence of them, got "
                                f"{describe(n)}")
    try:
        arr = np.atleast_1d(np.asarray(n))
    except (TypeError, ValueError) as e:  # ragged lists and the like
        raise ArgumentTypeError(f"n must be a positive integer or a 1-D sequence of them, got "
                                f"{describe(n)}") from e
    if arr.ndim != 1 or arr.size == 0:
        raise UsageError(f"n must be a positive integer or a 1-D sequence of them, got {n!r}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_) \
            or np.any(arr <= 0) or np.any(arr != np.round(arr)):
        raise UsageError(f"n must hold positive integers (training-set / batch sizes), got {n!r}")
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


# -- outputs: refuse what cannot be written before any work, with the reason -------------------


def _writable_ancestor(p: Path, where: str) -> Path:
    """The nearest existing ancestor of ``p`` (a directory we may create entries in)."""
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{where}: {p} is inside {anc}, which is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: cannot write {p}: {anc} is not writable (permission denied)")
    return anc


def _as_path(path: Any, where: str) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise ArgumentTypeError(f"{where}: expected an output path, got {describe(path)}")
    return Path(path)


def output_dir(path: Any, where: str, *, create: bool = True) -> Path:
    """Create the output directory ``path`` (and its parents), or say why it cannot be;
    ``create=False`` only checks (before work that could fail for another reason).

    Raises
    ------
    UsageError
        ``path`` is an existing file, lies inside a file, or is not writable.
    """
    p = _as_path(path, where)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{where}: {p} is an existing file, not a directory; give a directory "
                         "(created if missing)")
    if not p.exists():
        _writable_ancestor(p, where)
        if not create:
            return p
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{where}: cannot create the directory {p}: {e.strerror or e}") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: cannot write into {p}: not writable (permission denied)")
    return p


def output_file(path: Any, where: str, example: str = "stats.nc") -> Path:
    """Check that the file ``path`` can be written (its missing parents are created).

    Raises
    ------
    UsageError
        ``path`` is a directory, lies inside a file, or its place is not writable.
    """
    p = _as_path(path, where)
    if p.is_dir():
        raise UsageError(f"{where}: {p} is a directory; give a file name such as {p / example}")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise UsageError(f"{where}: {p} exists and is read-only (permission denied)")
    _writable_ancestor(p, where)
    if not p.parent.exists():
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{where}: cannot create the directory {p.parent}: "
                             f"{e.strerror or e}") from e
    return p
