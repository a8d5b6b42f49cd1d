"""The JAX :class:`Recorder`: per-sample gradient records written batch by batch.

Owns the training-loop side of the JAX adapter: reading the model's current parameters at
each record (``_jax_models.py``), iterating the data, dispatching the jitted
``vmap(grad)`` (``_jax_engine.py``) asynchronously while a background thread writes the
previous batch, the optimizer's update count and description (``_jax_optax.py``), and
``keep="moments"`` / parameter subsets / JL projections (``_moments.py``). Re-exported by
``adapters/jax.py``, which it never imports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import (
    AsyncWriter,
    RecordSummary,
    abort_record,
    as_float,
    check_factored_writer,
    check_layout_matches,
    iter_data,
    limited_batches,
    preserved_host_rng,
    progress_bar,
    writer_factors,
)
from ._jax_engine import (
    SUPPORTED,
    ParamFilter,
    _batch_len,
    _build,
    _fail,
    _labels,
    _pad,
    _Split,
    _take,
    caught,
)
from ._jax_models import describe, model_and_loss, with_params
from ._jax_optax import optimizer_info

JAX_NO_FACTORS = (
    "jax adapter: no factored records here (keep='factors' / open_writer(factors=...)): "
    "no kernel of this model is used once per example in one dot_general with its layer's "
    "input (adapters/_jax_factors.py), or the writer was opened without factors; full "
    "per-sample gradients are written instead (the same numbers, materialised; "
    "docs/adapters.md, 'Factored records')")


def _resolve_lr(lr: float | Callable[[int], Any] | None, step: int) -> float:
    if lr is None:
        return math.nan
    if callable(lr):  # e.g. an optax schedule
        return float(np.asarray(lr(step)))
    return float(lr)


def _limited(batches: Iterable[Any], max_samples: int | None, where: str,
             unpack: Callable[[Any], Any] | None = None
             ) -> Iterator[tuple[Any, Any, Any, int]]:
    """``(x, y, sample_id, n)`` of each non-empty batch, the last cut at ``max_samples``."""

    def cut(x: Any, y: Any, sid: Any, n: int) -> tuple[Any, Any, Any]:
        return (_take(x, slice(0, n)), _take(y, slice(0, n)),
                None if sid is None else sid[:n])

    return limited_batches(batches, max_samples, where, _batch_len, cut, unpack=unpack)


def _summary(step: Any, split: str, n: int, mean: float, lr: float, epoch: float,
             optimizer_step: int | None) -> RecordSummary:
    s = RecordSummary(int(step), split, n, mean, lr, epoch)
    if hasattr(s, "optimizer_step"):  # RecordSummary.optimizer_step (issue 12)
        s.optimizer_step = optimizer_step
    return s


_NEW = "Recorder(writer, model, loss_fn)"
_OLD = "Recorder(writer, loss_fn, params)"


class Recorder:
    """Write per-sample gradient records of a JAX model, batch by batch.

    JAX dispatches asynchronously: the next batch is dispatched while a background thread
    waits for the previous one, copies it to host and writes it. A ragged last batch is
    padded to the first batch's size, so the jitted function compiles once per record.

    Parameters
    ----------
    writer : GradientWriter
        Open writer whose layout is :func:`layout` of the model (same filter and
        collections), e.g. from :func:`open_writer`.
    model : pytree, nnx.Module, equinox Module or (linen module, variables)
        What to differentiate (``adapters/_jax_models.py`` has the table): a params pytree
        (every float leaf), an NNX module (``nnx.Param`` variables; read at each record,
        so the recorder follows training), an equinox module (inexact array leaves), or a
        linen module with its ``variables`` (the ``params`` collection; ``batch_stats``
        held fixed). A pytree or equinox/linen model is replaced at a record with
        ``params=``.
    loss_fn : callable (model, x, y) -> scalar
        Loss of ONE example, ``x`` and ``y`` without the batch axis (vmapped over axis 0;
        add one with ``x[None]`` if a layer needs it). ``model`` is what you passed, rebuilt
        from the parameters being differentiated: the pytree, the NNX or equinox module
        (call it: ``model(x)``), or the linen module bound to its variables
        (``model(x)`` is ``module.apply(variables, x)``).
    optimizer : nnx.Optimizer or object with ``opt_state`` (and ``step``), optional
        Read at each record for the update count and a description stored with the record
        (``optimizer_step``, ``meta``); an optax state changes at every step, so pass it
        to :meth:`record` as ``opt_state=`` instead.
    param_filter : callable (name, leaf) -> bool, optional
        Keep only these leaves (names as in :func:`layout`); the others are held fixed.
    collections : "all", NNX filter or linen collection names, optional
        Which variables are parameters (default: trainable ones only, see ``model``).
    mode : {"eval", "as_is"}
        The model's mode during each record, as in the torch adapter. ``"eval"`` (the
        default; what a training loop wants): a model in training mode (NNX BatchNorm with
        batch statistics, active Dropout; equinox ``inference=False``) is recorded as in
        eval mode, and its own mode is left as it was. ``"as_is"``: the model as it is,
        checked at every record; a model in training mode raises :class:`AdapterError`
        (there is no per-sample gradient of a train-mode BatchNorm).
    chunk_size : int, optional
        Samples per step of a ``lax.map``; bounds peak memory.
    lr : float or callable (step) -> float, optional
        Learning rate stored with each record; a schedule (optax) is evaluated at the
        optimizer's update count when known, else at the record's ``step``. Default: the
        optimizer's injected ``learning_rate`` (``optax.inject_hyperparams``) if any.
    progress : bool or dict
        Show a tqdm progress bar (a dict is passed to tqdm).
    max_pending : int
        Batches queued for the writer thread; 0 writes synchronously.
    store_labels : bool
        Store 1-D targets as labels.
    keep : {"grads", "moments", "factors"}
        ``"moments"``: store ``(count, mean, M2)`` blocks (float64), reduced on the fly with
        the two-pass kernel, instead of per-sample gradients (no per-sample losses).
        ``"factors"``: a factored record for a writer opened with ``open_writer(...,
        factors=...)`` (kernels found on the per-example loss's jaxpr,
        ``adapters/_jax_factors.py``); with a writer without factors, ``"grads"`` and a
        warning (:data:`JAX_NO_FACTORS`).
    params_subset, project, seed, block_size :
        Parameter subsampling, JL projection and moments blocks, as in the torch
        ``Recorder`` (``adapters/_moments.py``); create the writer with the same options.
    unpack : callable batch -> (inputs, targets[, sample_id]), optional
        How to unpack each batch instead of the default rule: ``(inputs, targets)``;
        ``(inputs, targets, sample_id)`` only when the third element is a 1-D integer
        array of ids; a dict with ``inputs``/``x``, ``targets``/``y``/``labels`` and
        optionally ``sample_id``; anything else is an :class:`AdapterError` (never a
        silent cast of, say, per-sample weights to ids). With ``batch_size``, ``data`` may
        then be any tuple of aligned arrays.

    Notes
    -----
    ``Recorder(writer, loss_fn, params)`` (the order of earlier releases) is accepted, with a
    ``DeprecationWarning``: the second argument is a plain function and the third is not.
    """

    def __init__(
        self,
        writer: Any,
        model: Any = None,
        loss_fn: Callable[..., Any] | None = None,
        *,
        params: Any = None,
        optimizer: Any = None,
        param_filter: ParamFilter | None = None,
        collections: Any = None,
        mode: str = "eval",
        chunk_size: int | None = None,
        lr: float | Callable[[int], Any] | None = None,
        progress: bool | dict[str, Any] = False,
        max_pending: int = 2,
        store_labels: bool = True,
        keep: str = "grads",
        params_subset: Any = None,
        project: Any = None,
        seed: int = 0,
        block_size: int | None = None,
        unpack: Callable[[Any], Any] | None = None,
    ) -> None:
        where = "jax Recorder"
        if params is not None:  # the old keyword: Recorder(writer, loss_fn, params=...)
            given = [a for a in (model, loss_fn) if a is not None]
            if len(given) != 1 or not callable(given[0]):
                raise AdapterError(f"{where}: with params= pass exactly one loss function; "
                                   f"use {_NEW}")
            warnings.warn(f"{where}: params= is deprecated; use {_NEW}", DeprecationWarning,
                          stacklevel=2)
            model, loss_fn = params, given[0]
        elif model is None or loss_fn is None:
            raise AdapterError(f"{where}: needs a model and a loss function: {_NEW}")
        else:
            model, loss_fn = model_and_loss(model, loss_fn, where, _NEW, _OLD)
        self.writer = writer
        self._model = model
        self._loss_fn, self._chunk_size = loss_fn, chunk_size
        self._param_filter = param_filter
        self._collections, self._mode = collections, mode
        self._split = self._split_of(model, where)
        self._facs: list[tuple[str, str | None, int]] = []
        self._jf: Any = None  # _jax_factors.JaxFactors, built at the first batch
        if keep == "factors" and not writer_factors(writer):
            warnings.warn(JAX_NO_FACTORS, UserWarning, stacklevel=2)
            keep = "grads"
        if keep != "moments":  # a writer opened with factors= cannot take full rows
            self._facs = check_factored_writer(writer, keep, where)
        self._keep = keep if keep == "factors" else _moments.check_keep(keep, where)
        if self._facs and (params_subset is not None or project is not None):
            raise AdapterError(f"{where}: keep='factors' stores whole tensors' factors; "
                               "params_subset/project do not apply")
        self._tf = _moments.make_transform(self._split.layout, params_subset, project, seed)
        self._block_size = block_size
        check_layout_matches(writer, [(n, s) for n, s, _ in self._tf.layout], where)
        _moments.check_writer(writer, self._tf, where)
        self._fn = _build(self._split, loss_fn, chunk_size)
        self.optimizer = optimizer
        self.lr = lr
        self.progress = progress
        self.max_pending = int(max_pending)
        self.store_labels = store_labels
        self.unpack = unpack
        self._closed = False

    def close(self) -> None:
        """End recording (idempotent; the writer stays open). Nothing to release in JAX:
        for symmetry with the torch ``Recorder``, whose ``close`` removes a hook."""
        self._closed = True

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _split_of(self, model: Any, where: str, order: Sequence[str] | None = None
                  ) -> _Split:
        desc = describe(model, collections=self._collections, mode=self._mode,
                        where=where, supported=SUPPORTED)
        return _Split(desc, self._param_filter, where, order)

    def _refresh(self, params: Any, where: str) -> None:
        """Read the model's current leaves; recompile only if its structure changed."""
        new = self._split_of(with_params(self._model, params, where), where,
                             self._split.names)
        if new.layout != self._split.layout:
            diff = [(a, b) for a, b in zip(self._split.layout, new.layout, strict=False)
                    if a != b][:3]
            raise AdapterError(
                f"{where}: the model's parameters changed since the recorder was made "
                f"({len(new.layout)} tensors now, {len(self._split.layout)} in the writer's "
                f"layout; first differences (then, now): {diff}); a recorder (and a store) "
                "holds one layout: make a new writer for the new model")
        if not self._split.compatible(new):  # e.g. a baked-in integer leaf changed
            self._fn = _build(new, self._loss_fn, self._chunk_size)
            self._jf = None
        self._split = new

    def _factored_fn(self, x: Any, y: Any, where: str) -> Any:
        """The jitted factored computation for the writer's factors (built once)."""
        if self._jf is None:
            from ._jax_factors import JaxFactors

            first = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a)[0], (x, y))
            jf = JaxFactors(self._split, self._loss_fn, *first,
                            names={w for w, _, _ in self._facs})
            missing = sorted({w for w, _, _ in self._facs} - jf.names)
            if missing or any(b is not None for _, b, _ in self._facs):
                raise AdapterError(
                    f"{where}: the writer's factors {missing or self._facs} cannot be "
                    "written: a factored kernel must be used once per example, in one "
                    "dot_general with the layer's input (adapters/_jax_factors.py), and its "
                    f"bias is a plain column; factorable here: {sorted(jf.names)}")
            self._jf = jf
        return self._jf.fn

    def record(
        self,
        *args: Any,
        step: int | None = None,
        split: str | None = None,
        params: Any = None,
        batch_size: int | None = None,
        lr: float | None = None,
        epoch: float | None = None,
        max_samples: int | None = None,
        optimizer_step: int | None = None,
        opt_state: Any = None,
        unpack: Callable[[Any], Any] | None = None,
    ) -> RecordSummary:
        """``record(data, step, split, *, params=None, ...)``: write and complete one record.

        Parameters
        ----------
        data : iterable of batches or tuple of arrays
            Batches ``(inputs, targets[, sample_id])`` (any iterator, e.g. a
            ``tf.data``/``grain`` numpy iterator), or with ``batch_size`` a tuple of arrays.
        step, split : int, str
            The record's key (positional or keyword).
        params : optional
            The model at this checkpoint, same kind as the recorder's ``model`` (a params
            pytree, an equinox module, a linen ``variables`` dict). Default: the model as
            it is now (an NNX module is read here, so it never needs this).
        batch_size : int, optional
            See ``data``.
        lr, epoch : float, optional
            Stored with the record; ``lr`` defaults to the recorder's ``lr``.
        max_samples : int, optional
            Stop after this many samples.
        optimizer_step : int, optional
            The number of optimizer updates so far (stored as the record's
            ``optimizer_step``; analytics use the spacing of checkpoints in updates).
        opt_state : optax state, nnx.Optimizer or TrainState, optional
            Read for the update count (``ScaleByAdamState``/``ScaleBySchedule``/
            ``InjectHyperparamsState`` ``count``, or ``.step``) when ``optimizer_step`` is
            not given, and described in the record's ``meta``.

        Returns
        -------
        RecordSummary

        Notes
        -----
        The old form ``record(params, data, step, split)`` is accepted with a
        ``DeprecationWarning``. numpy's and Python's global random state are restored
        afterwards, so recording from an iterator that draws from them does not change the
        training run.
        """
        where = "jax Recorder.record"
        if self._closed:
            raise AdapterError(f"{where}: the recorder is closed; make a new one")
        data, step, split, params = self._args(args, step, split, params, where)
        with preserved_host_rng():
            return self._record(data, step, split, params, batch_size, lr, epoch,
                                max_samples, optimizer_step, opt_state,
                                self.unpack if unpack is None else unpack, where)

    def _args(self, args: tuple[Any, ...], step: Any, split: Any, params: Any, where: str
              ) -> tuple[Any, int, str, Any]:
        given = len(args) + (step is not None) + (split is not None)
        rest = list(args)
        if given == 4 and len(args) >= 2:
            if params is not None:
                raise AdapterError(f"{where}: params given twice (first argument and params=)")
            warnings.warn(
                f"{where}: record(params, data, step, split) is deprecated and will be removed "
                "in the next release; use record(data, step, split, params=params)",
                DeprecationWarning, stacklevel=3)
            params = rest.pop(0)
        elif given != 3 or not args:
            raise AdapterError(
                f"{where}: expected record(data, step, split, *, params=None, ...), got "
                f"{len(args)} positional argument(s)"
                f"{' and step=' if step is not None else ''}"
                f"{' and split=' if split is not None else ''}")
        data = rest.pop(0)
        if step is None:
            step = rest.pop(0)
        if split is None:
            split = rest.pop(0)
        if not isinstance(split, str):
            raise AdapterError(f"{where}: split must be a str such as 'train', got "
                               f"{type(split).__name__} (order: data, step, split)")
        return data, step, split, params

    def _record(self, data: Any, step: Any, split: str, params: Any, batch_size: int | None,
                lr: float | None, epoch: float | None, max_samples: int | None,
                optimizer_step: int | None, opt_state: Any, unpack: Callable[[Any], Any] | None,
                where: str) -> RecordSummary:
        self._refresh(params, where)
        opt = optimizer_info(optimizer_step=optimizer_step, opt_state=opt_state,
                             optimizer=self.optimizer, where=where)
        extra: dict[str, Any] = {}
        if opt.step is not None:
            extra["optimizer_step"] = opt.step
        if opt.meta is not None:
            extra["meta"] = opt.meta
        sel, frozen = self._split.selected(), self._split.frozen()
        batches, total = iter_data(data, batch_size, where, unpack)
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        if lr is not None:
            lr_v = as_float(lr)
        elif self.lr is not None:
            lr_v = _resolve_lr(self.lr, int(step if opt.step is None else opt.step))
        else:
            lr_v = as_float(opt.lr)
        ep = as_float(epoch)
        if self._keep == "moments" or self._tf.active:
            return self._record_small(sel, frozen, batches, total, step, split, lr_v, ep,
                                      max_samples, extra, unpack)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        rows, seen = 0, 0
        loss_parts: list[np.ndarray] = []
        errors = caught()
        try:
            with AsyncWriter(self.writer, self.max_pending) as aw:
                for x, y, sid, n in _limited(batches, max_samples, where, unpack):
                    rows = max(rows, n)
                    if n < rows:
                        x, y = _pad(x, n, rows), _pad(y, n, rows)
                    facs = None
                    try:
                        if self._facs:
                            G, facs, loss = self._factored_fn(x, y, where)(sel, frozen, x, y)
                        else:
                            G, loss = self._fn(sel, frozen, x, y)  # asynchronous dispatch
                    except errors as e:
                        raise _fail(e, where) from e

                    def grads_np(G: jax.Array = G, n: int = n) -> np.ndarray:
                        return np.asarray(G)[:n]

                    def facs_np(facs: Any = facs, n: int = n) -> Any:
                        return {k: (np.asarray(a)[:n], np.asarray(d)[:n])
                                for k, (a, d) in facs.items()}

                    def loss_np(loss: jax.Array = loss, n: int = n) -> np.ndarray:
                        a = np.asarray(loss, dtype=np.float64)[:n]
                        loss_parts.append(a)
                        return a

                    label = _labels(y, rows) if self.store_labels else None
                    if facs is not None:
                        kw: dict[str, Any] = {"factors": facs_np}
                        if G.shape[1] == 0:
                            kw["grads"] = None
                    else:
                        kw = {}
                    aw.write(step, split, **{"grads": grads_np, **kw}, loss=loss_np,
                             sample_id=None if sid is None else np.asarray(sid, np.int64),
                             label=None if label is None else label[:n], lr=lr_v, epoch=ep)
                    seen += n
                    bar.update(n)
                if seen == 0:
                    raise AdapterError(
                        f"{where}: no samples in data for record (step={step}, "
                        f"split={split!r})"
                    )
                aw.end_record(step, split, **extra)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        mean = float(np.concatenate(loss_parts).mean())
        return _summary(step, split, seen, mean, lr_v, ep, extra.get("optimizer_step"))

    def _record_small(self, sel: list[Any], frozen: list[Any], batches: Any, total: int | None,
                      step: int, split: str, lr_v: float, ep: float, max_samples: int | None,
                      extra: dict[str, Any], unpack: Callable[[Any], Any] | None
                      ) -> RecordSummary:
        """:meth:`record` for ``keep="moments"`` and/or ``params_subset``/``project``:
        per-sample gradients of each batch, transformed, then reduced to a moments block
        (``adapters/_moments.py``) or written; synchronous.
        """
        where = "jax Recorder.record"
        tf = self._tf
        P_out = sum(math.prod(s) for _, s, _ in tf.layout)
        mom = (_moments.MomentsBlocks(self.writer, step, split, P_out, self._block_size,
                                      lr=lr_v, epoch=ep, names=tf.layout)
               if self._keep == "moments" else None)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        rows, seen, loss_sum = 0, 0, 0.0
        errors = caught()
        try:
            for x, y, sid, n in _limited(batches, max_samples, where, unpack):
                rows = max(rows, n)
                label = _labels(y, n) if self.store_labels else None
                if n < rows:
                    x, y = _pad(x, n, rows), _pad(y, n, rows)
                try:
                    G, loss = self._fn(sel, frozen, x, y)
                except errors as e:
                    raise _fail(e, where) from e
                G = tf.apply(np.asarray(G)[:n])
                loss = np.asarray(loss, dtype=np.float64)[:n]
                if mom is not None:
                    mom.add_samples(G)
                else:
                    self.writer.write(step, split, G, loss=loss,
                                      sample_id=None if sid is None else np.asarray(sid, np.int64),
                                      label=label, lr=lr_v, epoch=ep)
                loss_sum += float(loss.sum())
                seen += n
                bar.update(n)
            if seen == 0:
                raise AdapterError(
                    f"{where}: no samples in data for record (step={step}, split={split!r})"
                )
            if mom is not None:
                mom.flush()  # MomentsBlocks.finish without its end_record: ours carries extra
            self.writer.end_record(step, split, **extra)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        return _summary(step, split, seen, loss_sum / seen, lr_v, ep,
                        extra.get("optimizer_step"))
