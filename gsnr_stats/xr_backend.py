"""xarray backend: ``xr.open_dataset(path, engine="gsnr_stats")`` reads a store's completed records.

The raw netCDF view of a store (``engine="netcdf4"`` or ``"h5netcdf"``) shows every row in
the file, including rows of incomplete records and a killed writer's debris, and the
record index as tables. This backend goes through :class:`gsnr_stats.GradientStore`
instead: only completed records, in ``(step, split)`` order, every read checked against the
store's checksums, nothing read before it is asked for. ``docs/format.md`` ("Opening a
store with xarray / netCDF4") describes the Dataset.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from ._version import __version__
from .errors import StoreError
from .store import GradientStore, IncompleteRecordWarning, is_store, open_store
from .store._netcdf import CONVENTIONS, REFERENCES

ONE = {"units": "1"}


class _Source:
    """The open store behind the lazy arrays; reopened by path after pickling (Dask workers)."""

    def __init__(self, path: str, verify: bool, store: GradientStore | None = None) -> None:
        self.path, self.verify, self._store = path, verify, store
        self._lock = threading.Lock()

    @property
    def store(self) -> GradientStore:
        with self._lock:
            if self._store is None:
                with warnings.catch_warnings():  # told once, when the Dataset was opened
                    warnings.simplefilter("ignore", IncompleteRecordWarning)
                    self._store = open_store(self.path)
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "verify": self.verify}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["verify"])  # type: ignore[misc]


class _LazyArray(BackendArray):
    """An array read by ``fetch(ranges)``: one ``(start, stop)`` per axis, a dense block back.

    Basic indexing only (xarray turns other indexers into a basic read and a numpy step).
    A strided selection along axis 0 reads its span in blocks (or row by row for steps over
    16); along other axes, the span.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any,
                 fetch: Callable[[list[tuple[int, int]]], np.ndarray]) -> None:
        self.shape, self.dtype, self._fetch = tuple(shape), np.dtype(dtype), fetch

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._raw)

    def _raw(self, key: tuple[Any, ...]) -> np.ndarray:
        # xarray hands basic keys only: ints and slices with a positive step
        spans, steps, squeeze = [], [], []
        for ax, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, int | np.integer):
                k = int(k) + (n if k < 0 else 0)
                spans.append((k, k + 1))
                steps.append(1)
                squeeze.append(ax)
            else:
                a, b, st = k.indices(n)
                spans.append((a, max(a, b)))
                steps.append(st)
        if steps and steps[0] > 1:
            # rows with a step: the span could be far larger than the selection, so read it
            # in blocks of <= 64 MiB (small steps) or the selected rows one by one
            (a, b), rest, st = spans[0], spans[1:], steps[0]
            row = self.dtype.itemsize * int(np.prod([y - x for x, y in rest], dtype=np.int64))
            block = st * max(1, (64 << 20) // max(1, row * st)) if st <= 16 else st
            rows = [self._fetch([(r, min(b, r + (block if st <= 16 else 1))), *rest])[::st]
                    for r in range(a, b, block)]
            out = (np.concatenate(rows, axis=0) if rows
                   else np.empty((0, *(y - x for x, y in rest)), self.dtype))
            steps[0] = 1
        else:
            out = self._fetch(spans)
        out = out[tuple(slice(None, None, st) for st in steps)]
        return np.squeeze(out, axis=tuple(squeeze)) if squeeze else out


def _pieces(starts: np.ndarray, a: int, b: int) -> Iterable[tuple[int, int, int]]:
    """``(record, lo, hi)``: rows ``[a, b)`` of the concatenation split into its records."""
    r = int(np.searchsorted(starts, a, side="right")) - 1
    while a < b:
        hi = min(b, int(starts[r + 1]))
        if hi > a:
            yield r, a - int(starts[r]), hi - int(starts[r])
        a, r = max(a, hi), r + 1


class _Reader:
    """Fetch functions of the lazy variables, over the completed records of one store."""

    def __init__(self, src: _Source, grad_keys: list[tuple[int, str]], grad_starts: np.ndarray,
                 mom_keys: list[tuple[int, str]], mom_starts: np.ndarray) -> None:
        self.src, self.gk, self.gs, self.mk, self.ms = (src, grad_keys, grad_starts, mom_keys,
                                                        mom_starts)
        self._cache: dict[tuple[str, int], Any] = {}  # the last records' loss/ids/labels, moments

    def _cached(self, kind: str, r: int, read: Callable[[], Any]) -> Any:
        # a few records only: dask chunks of one record ask for the same arrays in turn
        key = (kind, r)
        hit = self._cache.get(key)
        if hit is None:
            hit = read()
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)), None)
            self._cache[key] = hit
        return hit

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def grads(self, spans: list[tuple[int, int]]) -> np.ndarray:
        (a, b), (c0, c1) = spans
        st = self.src.store
        parts = [st.read_grads_rows(*self.gk[r], lo, hi, (c0, c1), verify=self.src.verify)
                 for r, lo, hi in _pieces(self.gs, a, b)]
        return (np.concatenate(parts, axis=0) if parts
                else np.empty((0, c1 - c0), _grads_dtype(st)))

    def _aux(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        st, k = self.src.store, self.gk[r]
        return self._cached("aux", r, lambda: (st.read_loss(*k), st.read_sample_id(*k),
                                               st.read_label(*k)))

    def aux(self, which: int, dtype: str, spans: list[tuple[int, int]]) -> np.ndarray:
        (a, b), = spans
        parts = [self._aux(r)[which][lo:hi] for r, lo, hi in _pieces(self.gs, a, b)]
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    def _moments(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._cached("moments", r, lambda: self.src.store.read_moments(*self.mk[r]))

    def moments(self, which: int, spans: list[tuple[int, int]]) -> np.ndarray:
        (a, b), *cols = spans
        sel = (slice(None), *(slice(c0, c1) for c0, c1 in cols))
        parts = [self._moments(r)[which][lo:hi][sel] for r, lo, hi in _pieces(self.ms, a, b)]
        if parts:
            return np.concatenate(parts, axis=0)
        return np.empty((0, *(c1 - c0 for c0, c1 in cols)), np.float64)

    def meta(self, keys: list[tuple[int, str]], spans: list[tuple[int, int]]) -> np.ndarray:
        (a, b), = spans
        st = self.src.store
        return np.array([json.dumps(st.record_meta(*keys[i])) for i in range(a, b)], dtype=object)


class _PerParam:
    """Fetch of a ``(param,)`` label: the tensor (or layer) name of each column."""

    def __init__(self, offsets: np.ndarray, names: tuple[str, ...]) -> None:
        self.offsets, self.names = offsets, np.array(names, dtype=str)
        self.dtype = self.names.dtype

    def __call__(self, spans: list[tuple[int, int]]) -> np.ndarray:
        (a, b), = spans
        return self.names[np.searchsorted(self.offsets, np.arange(a, b), side="right") - 1]


def _grads_dtype(store: GradientStore) -> np.dtype:
    """dtype of the rows ``read_grads_rows`` returns: factored stores materialise them in
    float32 at least (``gsnr_stats/store/_factored.py``)."""
    return np.result_type(store.grads_dtype, np.float32) if store.factored else store.grads_dtype


def _lazy(dims: tuple[str, ...], shape: tuple[int, ...], dtype: Any, fetch: Callable,
          attrs: dict[str, Any], chunks: dict[str, int] | None = None) -> xr.Variable:
    data = indexing.LazilyIndexedArray(_LazyArray(shape, dtype, fetch))
    enc = {"preferred_chunks": chunks} if chunks else {}
    return xr.Variable(dims, data, attrs, encoding=enc)


def open_store_dataset(path: str | os.PathLike[str], *, verify: bool = True,
                       drop_variables: str | Iterable[str] | None = None) -> xr.Dataset:
    """The completed records of one store as a lazily read Dataset.

    Parameters
    ----------
    path : str or Path
        A store file (one shard).
    verify : bool
        Check every gradient segment a read touches against its checksum (the first read of
        a segment then reads it whole, in bounded blocks); ``False`` reads only the
        selection.
    drop_variables : str or iterable of str, optional
        Variables (or coordinates) to leave out.

    Returns
    -------
    xarray.Dataset
        Dims ``sample`` (the samples of all per-sample records, concatenated in
        ``(step, split)`` order), ``param``, ``record``, ``moment_block``, ``layout``,
        ``trajectory_row``, ``probes_row``. ``grads(sample, param)``, ``loss``, ``label``
        and ``moments_*`` are read when indexed or loaded (dask arrays with ``chunks=``).

    Raises
    ------
    StoreError, SchemaError
        Not a readable gsnr-stats store (the message names the file).
    """
    if not isinstance(path, str | os.PathLike):
        raise StoreError(f"engine='gsnr_stats' reads a store file given by its path, got "
                         f"{type(path).__name__}")
    path = os.fspath(path)
    store = open_store(path)
    drop = [drop_variables] if isinstance(drop_variables, str) else list(drop_variables or ())
    try:
        return _build(store, path, verify, drop)
    except BaseException:
        store.close()
        raise


def _build(store: GradientStore, path: str, verify: bool, drop: list[str]) -> xr.Dataset:
    src = _Source(path, verify, store)
    lay, P = store.layout, store.layout.n_params
    recs = store.records
    grad = [r for r in recs if r.kind == "gradients"]
    mom = [r for r in recs if r.kind == "moments"]
    gn = np.array([r.n_samples for r in grad], np.int64)
    mn = np.array([sum(b - a for a, b in store.row_ranges(r.step, r.split)) for r in mom],
                  np.int64)
    gs_, ms_ = (np.concatenate([[0], np.cumsum(x)]).astype(np.int64) for x in (gn, mn))
    N, K = int(gs_[-1]), int(ms_[-1])
    rd = _Reader(src, [(r.step, r.split) for r in grad], gs_,
                 [(r.step, r.split) for r in mom], ms_)
    rc, cc = store.grads_chunks
    if store.factored:
        # materialised rows: every column window reads its rows' plain columns and factors,
        # so a chunk spans all of P and about 32 MiB of rows
        rc, cc = max(1, (32 << 20) // (4 * max(1, P))), max(1, P)
    offsets = np.array(lay.offsets, np.int64)
    coords: dict[str, Any] = {
        "step": ("sample", np.repeat([r.step for r in grad], gn).astype(np.int64),
                 {"long_name": "checkpoint step of the sample's record"}),
        "split": ("sample", np.repeat(np.array([r.split for r in grad], dtype=str), gn),
                  {"long_name": "data split of the sample's record"}),
        "sample_id": _lazy(("sample",), (N,), "<i8", partial(rd.aux, 1, "<i8"),
                           {"long_name": "sample identifier"}),
        "tensor": _lazy(("param",), (P,), (t := _PerParam(offsets, lay.names)).dtype, t,
                        {"long_name": "parameter tensor"}),
        "layer": _lazy(("param",), (P,), (y := _PerParam(offsets, lay.layers)).dtype, y,
                       {"long_name": "layer"}),
        "layout": ("layout", np.array(lay.names, dtype=str),
                   {"long_name": "parameter tensor, in flat order"}),
        "layout_layer": ("layout", np.array(lay.layers, dtype=str), {"long_name": "layer"}),
        "layout_shape": ("layout", np.array([json.dumps(list(s)) for s in lay.shapes], dtype=str),
                         {"long_name": "shape of the tensor (JSON list)"}),
        "layout_offset": ("layout", offsets, {"long_name": "first column of the tensor in param"}),
        "layout_size": ("layout", np.array(lay.sizes, np.int64),
                        {"long_name": "number of parameters of the tensor", **ONE}),
        "moments_step": ("moment_block", np.repeat([r.step for r in mom], mn).astype(np.int64),
                         {"long_name": "checkpoint step of the block's record"}),
        "moments_split": ("moment_block", np.repeat(np.array([r.split for r in mom], dtype=str),
                                                    mn), {"long_name": "data split of the block"}),
    }
    # the record index: one row per completed record, both kinds, in (step, split) order
    starts = {(r.step, r.split): (int(a), int(b)) for r, a, b in zip(grad, gs_[:-1], gs_[1:], strict=True)}
    starts.update({(r.step, r.split): (int(a), int(b))
                   for r, a, b in zip(mom, ms_[:-1], ms_[1:], strict=True)})
    span = np.array([starts[(r.step, r.split)] for r in recs], np.int64).reshape(-1, 2)
    rec_cols = {
        "record_step": ([r.step for r in recs], "<i8", {"long_name": "checkpoint step"}),
        "record_split": ([r.split for r in recs], str, {"long_name": "data split"}),
        "record_kind": ([r.kind for r in recs], str,
                        {"long_name": "gradients (per-sample rows) or moments (blocks only)"}),
        "record_n_samples": ([r.n_samples for r in recs], "<i8",
                             {"long_name": "number of samples", **ONE}),
        "record_lr": ([r.lr for r in recs], "<f8", {"long_name": "learning rate", **ONE}),
        "record_epoch": ([r.epoch for r in recs], "<f8", {"long_name": "epoch", **ONE}),
        "record_optimizer_step": (
            [-1 if r.optimizer_step is None else r.optimizer_step for r in recs], "<i8",
            {"long_name": "optimizer update count at the checkpoint (-1: not recorded)"}),
        "record_start": (span[:, 0], "<i8", {"long_name": "first sample (gradients) or "
                                                          "moment_block (moments) of the record"}),
        "record_stop": (span[:, 1], "<i8", {"long_name": "sample or moment_block past the "
                                                         "record's last"}),
    }
    for name, (vals, dt, attrs) in rec_cols.items():
        coords[name] = ("record", np.array(vals, dtype=dt).reshape(len(recs)), attrs)
    grads_attrs = {"long_name": "per-sample gradient of each sample's own loss", **ONE}
    if store.factored:
        grads_attrs["comment"] = ("materialised from the factored records on read: "
                                  "g_W,i = sum_t delta_it a_it^T for the tensors in "
                                  "attribute factors")
    data: dict[str, Any] = {
        "grads": _lazy(("sample", "param"), (N, P), _grads_dtype(store), rd.grads, grads_attrs,
                       {"sample": rc, "param": cc}),
        "loss": _lazy(("sample",), (N,), "<f8", partial(rd.aux, 0, "<f8"),
                      {"long_name": "per-sample loss (NaN where not written)", **ONE}),
        "label": _lazy(("sample",), (N,), "<f8", partial(rd.aux, 2, "<f8"),
                       {"long_name": "label or target (NaN where not written)"}),
        "record_meta": _lazy(("record",), (len(recs),), object,
                             partial(rd.meta, [(r.step, r.split) for r in recs]),
                             {"long_name": "the record's JSON metadata object"}),
        "moments_count": _lazy(("moment_block",), (K,), "<f8", partial(rd.moments, 0),
                               {"long_name": "number of samples of the block", **ONE}),
        "moments_mean": _lazy(("moment_block", "param"), (K, P), "<f8", partial(rd.moments, 1),
                              {"long_name": "mean per-sample gradient of the block", **ONE}),
        "moments_m2": _lazy(("moment_block", "param"), (K, P), "<f8", partial(rd.moments, 2),
                            {"long_name": "sum of squared deviations of the block", **ONE}),
    }
    for table, rows in (("trajectory", store.trajectory()), ("probes", store.probes())):
        for col, vals in rows.items():
            data[f"{table}_{col}"] = (f"{table}_row", vals, {"long_name": f"{table} {col}"})
    a = store.attrs
    attrs = {k: a[k] for k in ("format", "format_version", "library_version", "framework",
                               "framework_version", "created_at", "run_id", "layout_hash")}
    attrs.update({
        "user_attrs": json.dumps(a["user_attrs"]),
        "layout": lay.to_json(), "n_params": int(P),
        **({"factors": json.dumps([f.to_dict() for f in store.factors]),
            "n_plain": int(store.n_plain)} if store.factored else {}),
        "Conventions": CONVENTIONS,
        "title": "completed records of a gsnr-stats gradient store",
        "source": os.path.abspath(path),
        "history": f"read by gsnr-stats {__version__} (xarray engine 'gsnr_stats')",
        "references": REFERENCES,
    })
    ds = xr.Dataset(data, coords=coords, attrs=attrs).drop_vars(drop, errors="ignore")
    ds.set_close(src.close)
    return ds


class GSNRBackend(BackendEntrypoint):
    """``xr.open_dataset(path, engine="gsnr_stats")``: a store's completed records, lazily.

    See :func:`open_store_dataset` for the Dataset and the ``verify`` option.
    """

    description = "Completed records of a gsnr-stats gradient store (.h5), read lazily"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "verify")

    def open_dataset(  # type: ignore[override]
        self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None,
        verify: bool = True,
    ) -> xr.Dataset:
        """Open a store; ``drop_variables`` names variables to leave out."""
        return open_store_dataset(filename_or_obj, verify=verify, drop_variables=drop_variables)

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Whether ``filename_or_obj`` is a path to a gsnr-stats store (root ``format``)."""
        if not isinstance(filename_or_obj, str | os.PathLike):
            return False
        return is_store(filename_or_obj)
