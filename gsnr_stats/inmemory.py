r"""``gs.gsnr``: from a model or an array of per-sample gradients to the moments Dataset, no file.

:func:`gsnr` returns the Dataset :func:`gsnr_stats.reduce` returns for the same gradients
written to a store -- same variables, coordinates, attributes and dtypes -- without an HDF5
file. The route is the store's, minus the bytes:

1. the adapters' own recorders (``sklearn.Recorder``, ``torch.Recorder``) write into a
   :class:`MemoryWriter`, which has the recording interface of
   :class:`~gsnr_stats.store.GradientWriter` (``write``, ``write_moments``, ``end_record``,
   ``abort_record``, ``write_trajectory``, ``write_probe``) but keeps moments, not rows;
2. each ``write`` goes through the engine's kernel
   (:func:`gsnr_stats.kernels.moments_block`: two passes per batch, float64 accumulators,
   Chan merge across batches) into the engine's :class:`~gsnr_stats.engine.Partial` of
   the record, the object ``reduce`` builds per record from a store's chunk rows;
3. :func:`gsnr_stats.engine.build_dataset` assembles the Dataset, as in ``reduce``.

Per parameter ``j`` of a record of ``N`` samples (``docs/theory.md``):

.. math::

    m_j = \frac1N \sum_i g_{ij},\qquad
    s_j^2 = \frac{1}{N-\mathrm{ddof}} \sum_i (g_{ij}-m_j)^2,\qquad
    r_j = m_j^2 / s_j^2 .

Precision: a store holds float32 (or float16) gradients; here the rows keep the precision
the adapter computed them in (float64 for scikit-learn, the parameters' dtype for torch)
unless ``dtype="float32"`` rounds them as a store would. The Dataset then differs from
``reduce`` of the store by the store's rounding only (and summation order, at float64
round-off).

Adapters are imported inside the functions that need them: the core never imports a
framework (``tests/test_architecture.py``).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import _cf, kernels
from ._dsutil import describe, require_int
from .engine import Partial, _block_bounds, build_dataset
from .errors import AdapterError, ArgumentTypeError, NonFiniteError, SchemaError, StoreError
from .store import Layout, auto_chunks
from .store._meta import encode_meta

__all__ = ["MemoryWriter", "gsnr"]

_DTYPES = {"float32": np.float32, "float16": np.float16}


class _Acc:
    """One open record: running moments (or buffered rows for jackknife blocks)."""

    def __init__(self, kind: str, P: int) -> None:
        self.kind = kind
        self.n = 0
        self.count, self.mean, self.m2 = np.zeros(P), np.zeros(P), np.zeros(P)
        self.n_omit = np.zeros(P)
        self.rows: list[np.ndarray] = []
        self.loss: list[np.ndarray] = []
        self.blocks: list[tuple[float, np.ndarray, np.ndarray]] = []
        self.attrs: dict[str, Any] = {"lr": math.nan, "epoch": math.nan,
                                      "optimizer_step": None, "meta": None}


class MemoryWriter:
    """A writer that keeps each record's moments in memory instead of writing a file.

    Same recording interface as :class:`~gsnr_stats.store.GradientWriter`, so any
    adapter's recorder writes into it; :meth:`dataset` returns what ``gs.reduce`` returns
    for a store with those records. Memory: O(P) per open record (plus the per-sample
    losses), or the rows themselves with ``blocks`` (jackknife blocks are cut at sample
    positions known only once the record is complete).

    Parameters
    ----------
    params : sequence of (name, shape[, layer]) or Layout
        The parameter layout, as for ``GradientWriter``.
    framework : str
        Stored in the Dataset's ``framework`` attribute.
    dtype : {None, "float32", "float16"}
        ``None`` reduces the rows in the precision they come in; otherwise each row is
        first rounded to that dtype, as a store of that dtype would.
    blocks : int, optional
        Keep the moments of K contiguous sample blocks (as ``reduce(blocks=K)``).
    nonfinite : {"raise", "omit"}
        NaN/Inf gradients raise :class:`NonFiniteError`, or are dropped per parameter.
    provenance : dict, optional
        Shaped like ``GradientStore.attrs`` (``framework_version``, ``user_attrs`` with
        ``model``/``estimator``): kept in the Dataset's attributes as ``reduce`` keeps a
        store's.
    """

    path = "memory"

    def __init__(self, params: Any, *, framework: str = "numpy", dtype: str | None = None,
                 blocks: int | None = None, nonfinite: str = "raise",
                 provenance: dict[str, Any] | None = None) -> None:
        if nonfinite not in ("raise", "omit"):
            raise ValueError(f"nonfinite must be 'raise' or 'omit', got {nonfinite!r}")
        if dtype is not None and str(np.dtype(dtype)) not in _DTYPES:
            raise ValueError(f"dtype must be None, 'float32' or 'float16', got {dtype!r}")
        self.layout = Layout.from_params(params)
        self.framework = framework
        self.provenance = dict(provenance or {})  # as GradientStore.attrs (_cf.provenance)
        self.run_id = uuid.uuid4().hex
        self._round = None if dtype is None else _DTYPES[str(np.dtype(dtype))]
        self.blocks = int(blocks) if blocks else None
        self.nonfinite = nonfinite
        # column groups of a default store's chunk width: same arithmetic per column
        self._col_step = auto_chunks(self.layout.n_params, 4)[1]
        self._open: dict[tuple[int, str], _Acc] = {}
        self._parts: dict[tuple[int, str], Partial] = {}
        self._attrs: dict[tuple[int, str], dict[str, Any]] = {}
        self.trajectory_rows: list[tuple[int, float, float, float, float]] = []
        self.probe_rows: list[tuple[Any, ...]] = []

    # -- the writer interface -------------------------------------------------------------

    def _where(self, step: int, split: str) -> str:
        return f"{self.path}: record (step={step}, split={split!r})"

    def _acc(self, step: Any, split: str, kind: str) -> tuple[tuple[int, str], _Acc]:
        if not isinstance(split, str) or not split:
            raise SchemaError(f"{self.path}: split must be a non-empty str, got {split!r}")
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise SchemaError(f"{self.path}: step must be an int, got {step!r}")
        key = (int(step), split)
        if key in self._parts:
            raise StoreError(f"{self._where(*key)} was already completed")
        acc = self._open.setdefault(key, _Acc(kind, self.layout.n_params))
        if acc.kind != kind:
            raise StoreError(f"{self._where(*key)}: cannot mix per-sample gradients and moments")
        return key, acc

    def _attrs_update(self, key: tuple[int, str], lr: Any, epoch: Any, optimizer_step: Any,
                      meta: Any) -> dict[str, Any]:
        """Validated record attributes given (None: not given), applied once the call
        succeeds; the last value given wins (as in the store)."""
        where = self._where(*key)
        upd: dict[str, Any] = {}
        for k, v in (("lr", lr), ("epoch", epoch)):
            if v is not None:
                upd[k] = float(v)
        if optimizer_step is not None:
            if isinstance(optimizer_step, bool) or int(optimizer_step) != optimizer_step \
                    or optimizer_step < 0:
                raise SchemaError(f"{where}: optimizer_step must be an int >= 0, got "
                                  f"{optimizer_step!r}")
            upd["optimizer_step"] = int(optimizer_step)
        if meta is not None:
            # the store's own validation and JSON form: the same object reads back
            upd["meta"] = json.loads(encode_meta(meta, where))
        return upd

    def write(
        self,
        step: int,
        split: str,
        grads: Any,
        loss: Any = None,
        sample_id: Any = None,
        label: Any = None,
        lr: float | None = None,
        epoch: float | None = None,
        optimizer_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Reduce per-sample gradients ``grads`` ``(n, P)`` into record ``(step, split)``.

        Arguments as :meth:`GradientWriter.write`; ``label`` is accepted and not kept
        (``reduce`` does not use labels).
        """
        key, acc = self._acc(step, split, "grads")
        where = self._where(*key)
        P = self.layout.n_params
        g = np.asarray(grads)
        if g.ndim == 1 and P == 1:
            g = g[:, None]
        if g.ndim != 2 or g.shape[1] != P:
            raise SchemaError(f"{where}: grads has shape {g.shape}, expected (n, {P})")
        if g.dtype.kind not in "fiu":
            raise SchemaError(f"{where}: grads dtype {g.dtype} is not a real number type")
        n = g.shape[0]
        upd = self._attrs_update(key, lr, epoch, optimizer_step, meta)
        if self._round is not None:
            g = g.astype(self._round)
        if g.dtype not in (np.float32, np.float64):
            g = g.astype(np.float64)
        g = np.ascontiguousarray(g)
        lv = np.full(n, np.nan) if loss is None else np.asarray(loss, dtype=np.float64).ravel()
        if lv.shape != (n,):
            raise SchemaError(f"{where}: loss has {lv.size} values, grads has {n} rows")
        if self.blocks:
            self._check_finite(g, where, acc.n, sample_id)
            acc.rows.append(g.copy())
        else:
            bad = np.zeros(P, dtype=np.int64)
            kernels.moments_block(g, self._col_step, 0, acc.count, acc.mean, acc.m2,
                                  self.nonfinite == "omit", acc.n_omit, bad)
            if bad.any():
                raise self._nonfinite(g, int(np.flatnonzero(bad)[0]), where, acc.n, sample_id)
        acc.loss.append(lv)
        acc.n += n
        acc.attrs.update(upd)

    def _check_finite(self, g: np.ndarray, where: str, n0: int, sample_id: Any) -> None:
        if self.nonfinite == "raise" and not np.isfinite(g).all():
            col = int(np.flatnonzero(~np.isfinite(g).all(axis=0))[0])
            raise self._nonfinite(g, col, where, n0, sample_id)

    def _nonfinite(self, g: np.ndarray, col: int, where: str, n0: int,
                   sample_id: Any) -> NonFiniteError:
        lay = self.layout
        t = int(np.searchsorted(np.array(lay.offsets), col, side="right") - 1)
        idx = np.unravel_index(col - lay.offsets[t], lay.shapes[t]) if lay.shapes[t] else ()
        pname = f"{lay.names[t]}[{', '.join(str(int(i)) for i in idx)}]"
        row = int(np.flatnonzero(~np.isfinite(g[:, col]))[0])
        sid = n0 + row if sample_id is None else int(np.asarray(sample_id).ravel()[row])
        kind = "NaN" if np.isnan(g[row, col]) else "Inf"
        return NonFiniteError(
            f"{where}: {kind} gradient for parameter {pname} (flat index {col}) at sample "
            f"{n0 + row} (sample_id {sid}). Pass nonfinite='omit' to drop such samples per "
            "parameter.")

    def write_moments(
        self,
        step: int,
        split: str,
        count: float,
        mean: Any,
        m2: Any,
        lr: float | None = None,
        epoch: float | None = None,
        optimizer_step: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one block ``(count, mean, M2)`` to a moments-only record (as the store)."""
        key, acc = self._acc(step, split, "moments")
        upd = self._attrs_update(key, lr, epoch, optimizer_step, meta)
        P = self.layout.n_params
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        m2 = np.asarray(m2, dtype=np.float64).reshape(-1)
        if mean.shape != (P,) or m2.shape != (P,):
            raise SchemaError(f"{self._where(*key)}: mean/m2 shapes {mean.shape}/{m2.shape}, "
                              f"expected ({P},)")
        acc.blocks.append((float(count), mean.copy(), m2.copy()))
        acc.n += int(round(float(count)))
        acc.attrs.update(upd)

    def end_record(self, step: int, split: str, **attrs: Any) -> None:
        """Complete record ``(step, split)``: its moments become the engine's Partial."""
        key = (int(step), split)
        acc = self._open.get(key)
        if acc is None:
            if key in self._parts:
                return
            raise StoreError(f"{self._where(*key)} has no data to complete")
        acc.attrs.update(self._attrs_update(key, attrs.get("lr"), attrs.get("epoch"),
                                            attrs.get("optimizer_step"), attrs.get("meta")))
        del self._open[key]
        K = self.blocks or 1
        if acc.kind == "moments":
            part = self._moments_partial(acc, K, key)
        else:
            part = self._grads_partial(acc, K)
        # what the engine's record_partial reads from a v3 store's record
        ostep, meta = acc.attrs["optimizer_step"], acc.attrs["meta"] or {}
        part.optimizer_step = -1 if ostep is None else ostep
        part.optimizer = ("" if meta.get("optimizer") is None
                          else json.dumps(meta["optimizer"], sort_keys=True))
        part.source = self._where(*key)
        self._parts[key] = part
        self._attrs[key] = acc.attrs

    def abort_record(self, step: int, split: str) -> None:
        """Forget the open record ``(step, split)`` (a failed recording)."""
        self._open.pop((int(step), split), None)

    def write_trajectory(self, step: int, lr: float, train_loss: float, test_loss: float,
                         epoch: float = math.nan) -> None:
        """Keep a loss-trajectory row (``trajectory_rows``)."""
        self.trajectory_rows.append((int(step), float(lr), float(epoch), float(train_loss),
                                     float(test_loss)))

    def write_probe(self, *row: Any) -> None:
        """Keep an OSGR probe row (``probe_rows``)."""
        self.probe_rows.append(row)

    def flush(self, fsync: bool | None = None) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close (records left open stay incomplete)."""

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- partials -------------------------------------------------------------------------

    @staticmethod
    def _loss(acc: _Acc) -> tuple[float, float, float]:
        """``(count, mean, M2)`` of the finite per-sample losses (as the engine's)."""
        v = np.concatenate(acc.loss) if acc.loss else np.zeros(0)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return (0.0, math.nan, math.nan)
        mu = float(v.mean())
        return (float(v.size), mu, float(((v - mu) ** 2).sum()))

    def _grads_partial(self, acc: _Acc, K: int) -> Partial:
        P = self.layout.n_params
        count, mean, m2 = np.zeros((K, P)), np.zeros((K, P)), np.zeros((K, P))
        n_omit = acc.n_omit
        if self.blocks:
            G = np.concatenate(acc.rows) if acc.rows else np.zeros((0, P))
            bounds = _block_bounds(acc.n, K)
            bad = np.zeros(P, dtype=np.int64)
            for b in range(K):
                kernels.moments_block(np.ascontiguousarray(G[bounds[b]:bounds[b + 1]]),
                                      self._col_step, 0, count[b], mean[b], m2[b],
                                      self.nonfinite == "omit", n_omit, bad)
        else:
            count[0], mean[0], m2[0] = acc.count, acc.mean, acc.m2
        with np.errstate(invalid="ignore"):
            mean = np.where(count > 0, mean, np.nan)
            m2 = np.where(count > 0, m2, np.nan)
        return Partial(count, mean, m2, n_omit, acc.n, self._loss(acc), acc.attrs["lr"],
                       acc.attrs["epoch"])

    def _moments_partial(self, acc: _Acc, K: int, key: tuple[int, str]) -> Partial:
        """The stored blocks grouped into K jackknife blocks (the engine's rule)."""
        P = self.layout.n_params
        count, mean, m2 = np.zeros((K, P)), np.zeros((K, P)), np.zeros((K, P))
        nb = len(acc.blocks)
        groups = _block_bounds(nb, K) if nb >= K else np.arange(nb + 1)
        for b in range(len(groups) - 1):
            tot = (np.zeros(P), np.zeros(P), np.zeros(P))
            for i in range(groups[b], groups[b + 1]):
                c, mu, q = acc.blocks[i]
                tot = kernels.merge_moments(tot, (np.full(P, c), mu, q))
            count[b], mean[b], m2[b] = tot
        if self.nonfinite == "raise":
            bad = (~np.isfinite(mean) | ~np.isfinite(m2)) & (count > 0)
            if bad.any():
                col = int(np.flatnonzero(bad.any(axis=0))[0])
                raise NonFiniteError(f"{self._where(*key)}: non-finite moments for parameter "
                                     f"flat index {col}")
        return Partial(count, np.where(count > 0, mean, np.nan),
                       np.where(count > 0, m2, np.nan), np.zeros(P), acc.n,
                       (0.0, math.nan, math.nan), acc.attrs["lr"], acc.attrs["epoch"])

    # -- results --------------------------------------------------------------------------

    def record_meta(self, step: int, split: str) -> dict[str, Any]:
        """``meta`` given for completed record ``(step, split)`` (``{}`` if none)."""
        return dict(self._attrs[(int(step), split)]["meta"] or {})

    def optimizer_step(self, step: int, split: str) -> int | None:
        """``optimizer_step`` given for completed record ``(step, split)``."""
        return self._attrs[(int(step), split)]["optimizer_step"]

    def dataset(self, *, ddof: int = 1) -> xr.Dataset:
        """The moments Dataset of the completed records: what ``gs.reduce`` returns."""
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        if not self._parts:
            raise StoreError(f"{self.path}: no completed record"
                             + (f" ({len(self._open)} left open)" if self._open else ""))
        attrs = {"run_id": self.run_id, "framework": self.framework, "sources": self.path,
                 **_cf.provenance([self.provenance])}
        return build_dataset(dict(self._parts), self.layout, ddof=ddof, blocks=self.blocks,
                             nonfinite=self.nonfinite, attrs=attrs)


# --------------------------------------------------------------------------------------
# gs.gsnr
# --------------------------------------------------------------------------------------


def _mro_modules(obj: Any) -> list[str]:
    return [c.__module__ for c in type(obj).__mro__]


def is_sklearn(obj: Any) -> bool:
    """A scikit-learn estimator or Pipeline (told by its classes' modules: no import)."""
    return any(m.startswith("sklearn.") for m in _mro_modules(obj))


def sklearn_fitted(estimator: Any) -> bool:
    """Whether a scikit-learn estimator (a Pipeline's last step) is fitted."""
    from .adapters import sklearn as gk

    return gk.is_fitted(estimator)


def is_torch_module(obj: Any) -> bool:
    """A ``torch.nn.Module`` (told by its classes' modules: the core never imports torch)."""
    return any(m.startswith("torch.nn") for m in _mro_modules(obj)) and hasattr(obj, "parameters")


def _split_data(X: Any, y: Any, split: str) -> dict[str, Any]:
    """``{split: data}``: a mapping of splits as given, or ``X, y`` under ``split``."""
    if isinstance(X, Mapping):
        if y is not None:
            raise AdapterError("gsnr: with a {split: data} mapping as X, leave y out (each "
                               "split's data is (X, y) or a DataLoader)")
        if not X:
            raise AdapterError("gsnr: the {split: data} mapping is empty")
        return dict(X)
    if X is None:
        raise AdapterError("gsnr: a model needs data: gsnr(model, X, y) or "
                           "gsnr(model, {'train': (X, y), 'test': (X_test, y_test)})")
    return {split: X if y is None else (X, y)}


def torch_ready(model: Any, a: Any) -> Any:
    """Floating numpy inputs in the dtype of the model's parameters (torch takes no mix)."""
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        p = next(iter(model.parameters()), None)
        name = str(getattr(p, "dtype", "")).removeprefix("torch.")
        if name in ("float32", "float64", "float16"):
            return a.astype(name, copy=False)
    return a


def _names_layout(names: Any, P: int) -> Any:
    if names is None:
        return [("theta", (P,))]
    names = list(names)
    if names and all(isinstance(s, str) for s in names):
        if len(names) != P:
            raise AdapterError(f"gsnr: {len(names)} names for {P} gradient columns")
        return [(s, ()) for s in names]
    return names


def _gsnr_arrays(data: dict[str, Any], names: Any, loss: Any, mw_kw: dict[str, Any],
                 step: int, lr: Any, epoch: Any) -> MemoryWriter:
    arrays = {sp: np.asarray(G) for sp, G in data.items()}
    for sp, G in arrays.items():
        if G.ndim != 2 or G.dtype.kind not in "fiu":
            raise AdapterError(f"gsnr: per-sample gradients of split {sp!r} must be a real "
                               f"(n, P) array, got {G.dtype} {G.shape}")
    Ps = {G.shape[1] for G in arrays.values()}
    if len(Ps) != 1:
        raise AdapterError(f"gsnr: splits have different numbers of parameters {sorted(Ps)}")
    mw = MemoryWriter(_names_layout(names, Ps.pop()), **mw_kw)
    losses = loss if isinstance(loss, Mapping) else {sp: loss for sp in arrays}
    for sp, G in arrays.items():
        if G.shape[0] == 0:
            raise AdapterError(f"gsnr: split {sp!r} has no samples")
        mw.write(step, sp, G, loss=losses.get(sp), lr=lr, epoch=epoch)
        mw.end_record(step, sp)
    return mw


def gsnr(
    obj: Any,
    X: Any = None,
    y: Any = None,
    *,
    loss_fn: Any = None,
    split: str = "train",
    step: int = 0,
    ddof: int = 1,
    blocks: int | None = None,
    nonfinite: str = "raise",
    dtype: str | None = None,
    batch_size: int | None = None,
    names: Sequence[Any] | None = None,
    loss: Any = None,
    lr: float | None = None,
    epoch: float | None = None,
    **adapter_kwargs: Any,
) -> xr.Dataset:
    """Per-parameter gradient moments and GSNR in one call, without a file.

    Returns exactly what :func:`gsnr_stats.reduce` returns for the same per-sample
    gradients written to a store (variables ``count``, ``mean``, ``m2``, ``var``, ``gsnr``,
    ``gsnr_debiased``, ``n_dead``, ``n_inf``, ``lr``, ``epoch``, ``loss_mean``,
    ``loss_var``, dims ``step``, ``split``, ``param``; see ``docs/format.md``), so every
    analytics function (``gs.osgr``, ``gs.aggregate``, ``gs.measured_gap`` ...) takes it.
    The route is described in the module docstring of ``gsnr_stats/inmemory.py``.

    Parameters
    ----------
    obj : estimator, torch.nn.Module, or array (n, P)
        * a fitted scikit-learn estimator or Pipeline (one of
          ``gsnr_stats.adapters.sklearn.SUPPORTED``) with ``X``, ``y``;
        * a ``torch.nn.Module`` with ``loss_fn`` (per-sample losses,
          ``reduction="none"``) and ``X``, ``y`` (tensors or numpy arrays, sliced into
          batches of ``batch_size``, default 256) or ``X`` = a ``DataLoader``;
        * per-sample gradients, an ``(n, P)`` array (a row per sample: each sample's own
          loss gradient, not scaled by ``1/n``), or ``{split: array}``.
    X, y : data, optional
        The samples. ``X`` may be ``{split: (X, y)}`` (or ``{split: DataLoader}``) for
        several splits in one Dataset.
    loss_fn : callable, optional
        torch only: ``loss_fn(outputs, targets)`` -> per-sample losses.
    split, step : str, int
        The record's key when one split is given.
    ddof, blocks, nonfinite :
        As in :func:`gsnr_stats.reduce`.
    dtype : {None, "float32", "float16"}
        Round the gradients to a store's dtype first (``None``: keep their precision).
    batch_size : int, optional
        Samples per batch of the adapter (sklearn default 1024, torch 256).
    names : sequence, optional
        Arrays only: the layout, ``[(name, shape[, layer]), ...]``, or one name per column
        (default one tensor ``"theta"`` of shape ``(P,)``).
    loss : array (n,) or {split: array}, optional
        Arrays only: per-sample losses (``loss_mean``, ``loss_var``).
    lr, epoch : float, optional
        Stored with the records (``lr``, ``epoch`` variables).
    **adapter_kwargs
        Passed to the adapter's ``Recorder`` (e.g. ``include_penalty``, ``keep``,
        ``params_subset``, ``project``, ``seed`` for sklearn; ``include_frozen``,
        ``param_filter``, ``train_batchnorm`` for torch).

    Returns
    -------
    xarray.Dataset

    Examples
    --------
    >>> stats = gs.gsnr(LogisticRegression().fit(X, y), X, y)          # doctest: +SKIP
    >>> stats = gs.gsnr(clf, {"train": (X, y), "test": (Xt, yt)})       # doctest: +SKIP
    >>> stats = gs.gsnr(net, X, y, loss_fn=nn.CrossEntropyLoss(reduction="none"))  # doctest: +SKIP
    >>> stats = gs.gsnr(G)                                             # doctest: +SKIP
    """
    if isinstance(obj, str | bytes) or hasattr(obj, "__fspath__"):
        raise ArgumentTypeError(
            f"gs.gsnr: expected a model, an estimator or an (n, P) gradient array, got "
            f"{describe(obj)} — for a store file use gs.reduce({obj!r})")
    if isinstance(obj, xr.Dataset):
        raise ArgumentTypeError(
            f"gs.gsnr: expected a model, an estimator or an (n, P) gradient array, got "
            f"{describe(obj)} — moments already: pass it to gs.osgr / gs.aggregate directly")
    require_int(blocks, "blocks", "gs.gsnr", minimum=0, none=True)
    require_int(step, "step", "gs.gsnr")
    if not isinstance(split, str):
        raise ArgumentTypeError(f"gs.gsnr: split must be a split name, got {describe(split)}")
    mw_kw = {"dtype": dtype, "blocks": blocks, "nonfinite": nonfinite}
    if is_sklearn(obj):
        _no(loss_fn, "loss_fn", "a scikit-learn estimator defines its own loss")
        _no(names, "names", "the layout is the estimator's")
        _no(loss, "loss", "the estimator's per-sample losses are computed")
        from .adapters import _moments
        from .adapters import sklearn as gk

        tf = _moments.make_transform(gk.layout(obj, with_layers=True),
                                     adapter_kwargs.get("params_subset"),
                                     adapter_kwargs.get("project"), adapter_kwargs.get("seed", 0))
        mw = MemoryWriter(tf.layout, framework="sklearn", **mw_kw, provenance={
            "framework_version": gk.sklearn.__version__,
            "user_attrs": {"estimator": type(gk._resolve(obj)[0]).__name__}})
        rec = gk.Recorder(mw, obj, batch_size=batch_size or 1024, **adapter_kwargs)
        for sp, data in _split_data(X, y, split).items():
            rec.record(data, step, sp, lr=lr, epoch=epoch)
        return mw.dataset(ddof=ddof)
    if is_torch_module(obj):
        if loss_fn is None:
            raise AdapterError("gsnr: a torch model needs loss_fn=, per-sample losses such as "
                               "nn.CrossEntropyLoss(reduction='none')")
        _no(names, "names", "the layout is the model's named_parameters()")
        _no(loss, "loss", "the per-sample losses come from loss_fn")
        from .adapters import _moments
        from .adapters import torch as gt

        lay = gt.layout(obj, include_frozen=adapter_kwargs.get("include_frozen", False),
                        param_filter=adapter_kwargs.get("param_filter"))
        tf = _moments.make_transform(lay, adapter_kwargs.get("params_subset"),
                                     adapter_kwargs.get("project"), adapter_kwargs.get("seed", 0))
        mw = MemoryWriter(tf.layout, framework="torch", **mw_kw, provenance={
            "framework_version": gt.torch.__version__, "user_attrs": {"model": type(obj).__name__}})
        rec = gt.Recorder(mw, obj, loss_fn, **adapter_kwargs)
        for sp, data in _split_data(X, y, split).items():
            if isinstance(data, tuple | list):  # arrays: sliced into batches
                data = tuple(torch_ready(obj, a) for a in data)
                rec.record(data, step, sp, batch_size=batch_size or 256, lr=lr, epoch=epoch)
            else:  # a DataLoader or any iterable of batches
                rec.record(data, step, sp, lr=lr, epoch=epoch)
        return mw.dataset(ddof=ddof)
    if adapter_kwargs:
        raise AdapterError(f"gsnr: options {sorted(adapter_kwargs)} are for models; an array "
                           "of per-sample gradients takes names=, loss=, lr=, epoch=")
    _no(loss_fn, "loss_fn", "an array already holds the gradients")
    if isinstance(obj, Mapping):
        if X is not None or y is not None:
            raise AdapterError("gsnr({split: gradients}) takes no X, y")
        data = dict(obj)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        if X is not None or y is not None:
            raise AdapterError("gsnr(gradients) takes no X, y: the array is the per-sample "
                               "gradients; for a model pass the model")
        data = {split: obj}
    else:
        raise AdapterError(
            f"gsnr: {type(obj).__name__} is not supported; supported: a fitted scikit-learn "
            "estimator (+ X, y), a torch.nn.Module (+ loss_fn and X, y or a DataLoader), or an "
            "(n, P) array of per-sample gradients (or {split: array})")
    mw = _gsnr_arrays(data, names, loss, mw_kw, step, lr, epoch)
    return mw.dataset(ddof=ddof)


def _no(value: Any, name: str, why: str) -> None:
    if value is not None:
        raise AdapterError(f"gsnr: {name}= is not used here ({why}); leave it out")
