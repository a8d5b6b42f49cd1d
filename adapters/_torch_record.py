"""The torch :class:`Recorder`: per-sample gradient records written batch by batch.

Owns the training-loop side of the torch adapter: iterating a ``DataLoader`` (or sliced
arrays), computing each batch through the engine (``_torch_engine.py``) or the Linear/Conv
fast path (``_torch_fast.py``), and overlapping host copies and HDF5 writes with the next
batch; ``keep="moments"``, parameter subsets and JL projections go through
``_moments.py``; the training-loop side (mode, random state, optimizer step count and
hyper-parameters) is ``_torch_loop.py``. Re-exported by ``adapters/torch.py``, which it
never imports.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import (
    AsyncWriter,
    BufferPool,
    RecordSummary,
    Unpack,
    WriteBlocks,
    abort_record,
    as_float,
    check_factored_writer,
    check_layout_matches,
    iter_data,
    limited_batches,
    plain_offsets,
    preserved_host_rng,
    progress_bar,
)
from ._torch_engine import (
    ParamFilter,
    _batch_len,
    _check_module,
    _Engine,
    _restricted,
    _to_numpy,
)
from ._torch_fast import FastPath, fast_modules
from ._torch_loop import (
    StepCounter,
    actual_mode,
    check_params_usable,
    grad_context,
    model_mode,
    optimizer_meta,
    record_lr,
    resolve_mode,
    torch_rng_savers,
)


def _labels(y: Any, n: int) -> np.ndarray | None:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if isinstance(y, torch.Tensor) and y.ndim == 1 and y.shape[0] == n and not y.is_complex():
        return y.detach().reshape(n).to("cpu", torch.float64).numpy()
    return None


def _current_lr(optimizer: Any, params: Any = None) -> float:
    """The optimizer's learning rate for a record (see ``_torch_loop.record_lr``)."""
    return record_lr(optimizer, params)


def _limited(batches: Iterable[Any], max_samples: int | None, where: str,
             unpack: Unpack | None = None) -> Iterator[tuple[Any, Any, Any, int]]:
    """``(x, y, sample_id, n)`` of each non-empty batch, the last cut at ``max_samples``."""

    def cut(x: Any, y: Any, sid: Any, n: int) -> tuple[Any, Any, Any]:
        return tree_map(lambda a: a[:n] if isinstance(a, torch.Tensor | np.ndarray) else a,
                        (x, y, sid))

    return limited_batches(batches, max_samples, where, _batch_len, cut, unpack)


def _host(ts: list[torch.Tensor]) -> list[np.ndarray]:
    """Host copies of ``ts``; from a GPU, one device-to-host copy per dtype (a batch's
    factors are a few small tensors: a copy each would wait on the device that often)."""
    if all(t.device.type == "cpu" for t in ts):
        return [_to_numpy(t) for t in ts]
    out: list[Any] = [None] * len(ts)
    for dt in {t.dtype for t in ts}:
        idx = [i for i, t in enumerate(ts) if t.dtype == dt]
        flat = torch.cat([ts[i].detach().reshape(-1) for i in idx]).cpu().numpy()
        off = 0
        for i in idx:
            out[i] = flat[off:off + ts[i].numel()].reshape(ts[i].shape)
            off += ts[i].numel()
    return out


def factored_modules(model: nn.Module, names: list[str],
                     facs: list[tuple[str, str | None, int]], where: str,
                     ) -> dict[str, tuple[int, bool]]:
    """``{module name: (rows, bias tied)}`` of a writer's factors ``(weight, bias, rows)``:
    each weight must be the ``weight`` of an ``nn.Linear`` the fast path handles
    (``_torch_fast.fast_modules``) and its bias, if tied, that layer's ``bias``."""
    fast = fast_modules(model, names)
    out: dict[str, tuple[int, bool]] = {}
    for w, b, rows in facs:
        mname = w[:-len(".weight")] if w.endswith(".weight") else (
            "" if w == "weight" else None)
        m = fast.get(mname) if mname is not None else None
        if not isinstance(m, nn.Linear):
            lin = sorted(k for k, v in fast.items() if isinstance(v, nn.Linear))
            raise AdapterError(
                f"{where}: the writer's factor {w!r} is not the weight of an nn.Linear of "
                f"{type(model).__name__} whose parameters are all recorded and not shared; "
                f"supported: the weights of such nn.Linear layers ({lin})")
        bias = f"{mname}.bias" if mname else "bias"
        if b is not None and (m.bias is None or b != bias):
            raise AdapterError(f"{where}: factor {w!r} ties bias {b!r}; the layer's bias is "
                               f"{bias if m.bias is not None else None!r}")
        out[mname] = (rows, b is not None)
    return out


def resolve_factors(model: nn.Module, fast: FastPath, factors: Any, example: Any,
                    where: str) -> list[tuple[str, str | None, int]]:
    """The factors ``[(weight, bias or None, rows), ...]`` meant by ``factors``.

    ``"auto"``: every fast ``nn.Linear`` whose input rows are the samples of ``example``
    ``(inputs, targets)`` (one batch; it runs the first-batch checks, so a layer used
    outside its forward is left out) and whose ``T`` factor rows per sample are fewer
    numbers than its gradient, :math:`T (in + out) < in \\cdot out`
    (``_torch_fast.auto_factored``), bias tied. A list: ``FactorSpec``-like objects (taken
    as they are), module or weight names (bias tied when the layer has one), ``(weight,
    bias)`` pairs; ``rows`` from ``example`` when given, else 1.
    """
    info: dict[str, tuple[int, int, int]] = {}
    if example is not None:
        if not isinstance(example, tuple | list) or len(example) != 2:
            raise AdapterError(f"{where}: example must be one batch (inputs, targets), got "
                               f"{type(example).__name__}")
        x, y = example
        info = fast.factor_rows(x, y, _batch_len(x))
    if isinstance(factors, str) and factors == "auto":
        if example is None:
            raise AdapterError(
                f"{where}: factors='auto' needs example=(inputs, targets), one batch, to see "
                "which Linear layers take the samples' rows (and how many per sample); or "
                "list the layers: factors=['fc1', ...]")
        from ._torch_fast import auto_factored

        mods = dict(model.named_modules())
        return [(f"{k}.weight" if k else "weight",
                 (f"{k}.bias" if k else "bias") if mods[k].bias is not None else None, t)
                for k, t in auto_factored(info).items()]
    if isinstance(factors, str) or not isinstance(factors, Sequence):
        raise AdapterError(f"{where}: factors must be 'auto' or a list of layer names, weight "
                           f"names, (weight, bias) pairs or FactorSpecs, got {factors!r}")
    mods = dict(model.named_modules())
    out = []
    for f in factors:
        if hasattr(f, "weight") and hasattr(f, "rows"):
            out.append((str(f.weight), None if f.bias is None else str(f.bias), int(f.rows)))
            continue
        w, b = (f, "tie") if isinstance(f, str) else (tuple(f) + (None,))[:2]
        mname = w.removesuffix(".weight") if w not in mods else w
        m = mods.get(mname)
        if not isinstance(m, nn.Linear):
            raise AdapterError(f"{where}: factor {f!r} names no nn.Linear of "
                               f"{type(model).__name__}; supported: nn.Linear layers")
        wn = f"{mname}.weight" if mname else "weight"
        if b == "tie":
            b = ((f"{mname}.bias" if mname else "bias") if m.bias is not None else None)
        out.append((wn, b, info.get(mname, (1, 0, 0))[0]))
    return out


class Recorder:
    """Write per-sample gradient records of a model, batch by batch, into a ``GradientWriter``.

    Made to be called from a training loop (``docs/adapters.md``, "Recording from a
    training loop (PyTorch)")::

        rec = Recorder(writer, model, nn.CrossEntropyLoss(reduction="none"), optimizer=opt)
        for epoch in range(E):
            for x, y in train_loader:            # model.train() as usual
                ...; opt.step()
            rec.record(eval_train_loader, step=epoch, split="train", epoch=epoch)
            rec.record(test_loader, step=epoch, split="test", epoch=epoch)
        rec.close()

    Each :meth:`record` (by default) switches the model to eval mode and restores every
    submodule's mode afterwards, leaves torch's, numpy's and Python's global random state
    as it found it (so the training run is the same with or without recording), and
    stores the optimizer's step count, learning rate and hyper-parameters with the record.
    Record ``"train"`` from an un-augmented loader of the training set: gradients of
    augmented samples are not the training set's.

    Writing overlaps computing: each batch's gradients are flattened into one of a few
    reusable host buffers (pinned memory for CUDA, copied on a side stream), and a
    background thread writes them while the next batch is computed.

    Parameters
    ----------
    writer : GradientWriter
        Open writer whose layout is :func:`layout` of the model (same filter).
    model, loss_fn :
        As in :func:`per_sample_gradients`; the model may be in train or eval mode (see
        ``mode``).
    optimizer : torch.optim.Optimizer, optional
        The training optimizer. Each record then stores: ``optimizer_step``, the number of
        ``optimizer.step()`` calls so far (counted by a step post-hook registered here, plus
        ``state[p]["step"]`` of Adam-like optimizers at construction; an SGD that already
        stepped starts at 0 with a warning -- build the Recorder before training); the
        learning rate (the common ``lr`` of the parameter groups holding the recorded
        parameters; NaN and a warning if they differ: pass ``lr=``); and in the record's
        meta ``{"optimizer": {"class", "module", "groups": [{lr, momentum, weight_decay,
        betas, ..., "params": [names]}]}, "framework": "torch <version>", "mode":
        "eval"|"train"}`` (read back with ``GradientStore.record_meta``). Call
        :meth:`close` (or use the Recorder as a context manager) to remove the hook.
    chunk_size, include_frozen, param_filter, train_batchnorm, dropout :
        As in :func:`per_sample_gradients`.
    mode : {"eval", "train", "as_is"}, optional
        The model's mode during each :meth:`record`. ``"eval"`` (the default; what a
        training loop wants: BatchNorm with its running statistics, no Dropout, per-sample
        gradients of the model as it predicts): the model is switched to eval mode for the
        record and each submodule's ``training`` flag is restored afterwards, also on
        error; BatchNorm statistics and ``.grad`` are never changed. ``"train"``: the same
        with train mode, for gradients under training-time semantics (needs
        ``train_batchnorm="batch"`` with BatchNorm, ``dropout="different"``/``"same"``
        with Dropout). ``"as_is"``: the modes the model has when :meth:`record` is
        called, checked at every call. Default: ``"eval"``, or ``"as_is"`` when
        ``train_batchnorm``/``dropout`` opt into train-mode semantics.
    unpack : callable batch -> (inputs, targets) or (inputs, targets, sample_id), optional
        How to read a batch; default rule: ``_common.split_batch`` (a 2-sequence is
        ``(inputs, targets)``; a 3-sequence only if its third element is 1-D integer
        sample ids; a dict with keys ``inputs``/``x``, ``targets``/``y``/``labels``
        ``[, sample_id]``; anything else is an error). :meth:`record` takes it too.
    progress : bool or dict
        Show a tqdm progress bar (a dict is passed to tqdm as keyword arguments).
    max_pending : int
        Batches queued for the writer thread; 0 writes synchronously.
    store_labels : bool
        Store 1-D targets (class labels, scalar regression targets) as labels.
    keep : {"grads", "moments", "factors"}
        ``"moments"``: store per-parameter ``(count, mean, M2)`` blocks (float64) instead of
        per-sample gradients -- O(P) per block, for models too big to dump. Each block is a
        jackknife block of ``reduce(..., blocks=K)``. Per-sample losses are not stored
        (``RecordSummary.mean_loss`` has their mean). ``"factors"``: exact factored
        records (``docs/adapters.md``, "Factored records"): for each ``nn.Linear`` the
        writer was opened with (``open_writer(..., factors=...)``), the inputs
        :math:`a_{it}` and output gradients :math:`\\delta_{it}` of each sample instead of
        its gradient :math:`\\sum_t \\delta_{it} a_{it}^\\top` (and bias :math:`\\sum_t
        \\delta_{it}`); every other tensor as per-sample columns. Needs the fast path
        (eval-mode BatchNorm, no active Dropout); a factored layer used outside its own
        forward is refused.
    fast : bool, optional
        Default True. ``nn.Linear``/``nn.Conv1d``/``2d``/``3d`` gradients come from the
        layer inputs :math:`a` and output gradients :math:`\\delta` of one ordinary backward
        instead of ``vmap``: with ``keep="grads"`` the per-sample :math:`g_i = \\delta_i
        a_i^\\top` is written straight into the writer's buffer (a grouped convolution for
        ``Conv``); with ``keep="moments"``, :math:`\\sum_i g_i = \\delta^\\top a`,
        :math:`\\sum_i g_i^2 = (\\delta^2)^\\top a^2` in float64 for ``Linear`` (see
        ``_torch_fast.py``; elements of high GSNR are recomputed by two-pass, so the
        moments are exact at any GSNR). Other parameters use ``vmap``; on the first batch a
        fast layer whose parameter is also used outside its forward (autograd graph), or
        that disagrees with ``vmap`` on two samples, goes to ``vmap``. Not used with
        ``params_subset``/``project`` on full dumps, ``project`` on moments, train-mode
        BatchNorm or Dropout (everything goes through ``vmap`` then). ``fast=False`` is the
        plain ``vmap`` route.
    params_subset : int, float in (0, 1) or ParamSubset, optional
        Record a seeded subset of ``k`` flat parameters (stratified over tensors); the
        writer must have the subset layout (``open_writer(..., params_subset=k, seed=s)``).
    project : int or JLProjection, optional
        Store Johnson-Lindenstrauss projections :math:`R^\\top g_i/\\sqrt{k}` (``k``
        values per sample, layout ``[("jl", (k,))]``) instead of gradients; inner products
        (and ``gsnr_stats.osgr_first_order``) are preserved within JL error.
    seed : int
        Seed of the subset and of the projection (must match ``open_writer``'s).
    block_size : int, optional
        With ``keep="moments"``: samples per stored block (batches are merged until at
        least this many; default one block per batch).
    """

    def __init__(
        self,
        writer: Any,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        optimizer: Any = None,
        chunk_size: int | None = None,
        include_frozen: bool = False,
        param_filter: ParamFilter | None = None,
        train_batchnorm: str = "error",
        dropout: str = "error",
        mode: str | None = None,
        unpack: Unpack | None = None,
        progress: bool | dict[str, Any] = False,
        max_pending: int = 2,
        store_labels: bool = True,
        keep: str = "grads",
        fast: bool | None = None,
        params_subset: Any = None,
        project: Any = None,
        seed: int = 0,
        block_size: int | None = None,
    ) -> None:
        self._steps: StepCounter | None = None  # first: __del__ may run after a failed init
        self._closed = False
        self.writer = writer
        self.optimizer = optimizer
        self.progress = progress
        self.max_pending = int(max_pending)
        self.store_labels = store_labels
        self.unpack = unpack
        self.mode = resolve_mode(mode, train_batchnorm, dropout)
        _check_module(model)
        # Built in the mode of the records ("as_is": eval, checked again at each record), so
        # that a model in train mode inside its loop is accepted here.
        with model_mode(model, "train" if self.mode == "train" else "eval"):
            self._eng = _Engine(model, loss_fn, include_frozen=include_frozen,
                                param_filter=param_filter, chunk_size=chunk_size,
                                train_batchnorm=train_batchnorm, dropout=dropout)
        named = dict(model.named_parameters())
        self._params = [named[k] for k in self._eng.names]
        check_params_usable(list(zip(self._eng.names, self._params, strict=True)),
                            "torch Recorder")
        self._names = {id(p): k for k, p in zip(self._eng.names, self._params, strict=True)}
        # keep="moments", params_subset, project: see _record_small and adapters/_moments.py
        # keep="factors": see _record_factors
        self._keep = keep if keep == "factors" else _moments.check_keep(keep, "torch Recorder")
        self._tf = _moments.make_transform(
            list(zip(self._eng.names, self._eng.shapes, strict=True)), params_subset, project, seed)
        self._block_size = block_size
        self._fast_opt = fast
        self._fast: Any = None
        self._engine_kw = {"include_frozen": include_frozen, "param_filter": param_filter,
                           "chunk_size": chunk_size, "train_batchnorm": train_batchnorm,
                           "dropout": dropout}
        check_layout_matches(writer, [(n, s) for n, s, _ in self._tf.layout], "torch Recorder")
        _moments.check_writer(writer, self._tf, "torch Recorder")
        self._factored: dict[str, tuple[int, bool]] = {}
        self._plain: dict[str, tuple[int, int]] = {}
        if keep != "moments":
            facs = check_factored_writer(writer, keep, "torch Recorder")
            if facs:
                if self._tf.active:
                    raise AdapterError("torch Recorder: keep='factors' stores whole tensors' "
                                       "factors; params_subset/project do not apply")
                self._factored = factored_modules(model, self._eng.names, facs,
                                                  "torch Recorder")
                done = {n for w, b, _ in facs for n in (w, b) if n is not None}
                self._plain = plain_offsets(list(zip(self._eng.names, self._eng.shapes,
                                                     strict=True)), done)
        self._cuda = self._eng.device.type == "cuda"
        self._buffers: BufferPool | None = None
        self._host: dict[int, np.ndarray] = {}  # data_ptr -> writer.alloc_rows buffer
        self._rows = 0
        self._copy_stream = torch.cuda.Stream(self._eng.device) if self._cuda else None
        if optimizer is not None:
            self._steps = StepCounter(optimizer, self._params)

    # -- lifetime: the optimizer hook --------------------------------------------------

    @property
    def optimizer_step(self) -> int | None:
        """``optimizer.step()`` calls counted so far (None without an optimizer)."""
        return None if self._steps is None else self._steps.count

    def close(self) -> None:
        """Remove the optimizer step hook (idempotent); the writer stays open. A closed
        Recorder records no more."""
        self._closed = True
        if self._steps is not None:
            self._steps.remove()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _sub_engine(self, names: set[str]) -> _Engine:
        """A vmap engine over the selected parameters in ``names`` only."""
        return _restricted(self._eng, self._engine_kw, names)

    def _uses_fast(self) -> bool:
        eng = self._eng
        want = True if self._fast_opt is None else bool(self._fast_opt)
        return (want and (self._keep == "moments" or not self._tf.active)
                and self._tf.projection is None
                and eng.route == "vmap" and eng.randomness == "error")

    def _fast_path(self) -> Any:
        if self._fast is None:
            self._fast = FastPath(self._eng, self._sub_engine)
        return self._fast

    def _record_small(self, data: Any, step: int, split: str, *, batch_size: int | None,
                      lr_v: float, epoch: float | None, max_samples: int | None,
                      unpack: Unpack | None, attrs: dict[str, Any]) -> RecordSummary:
        """:meth:`record` for ``keep="moments"`` and/or ``params_subset``/``project``.

        Per batch: moments from the Linear/Conv fast path (``adapters/_torch_fast.py``) or
        per-sample gradients from ``vmap``, then the subset / projection
        (``adapters/_moments.py``), then either a moments block (Chan-merged, float64) or the
        transformed rows, written synchronously.
        """
        eng, tf = self._eng, self._tf
        where = "torch Recorder.record"
        batches, total = iter_data(data, batch_size, where, unpack)
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        ep = as_float(epoch)
        fast = self._fast_path() if self._uses_fast() and self._keep == "moments" else None
        out_layout = tf.layout
        P_out = sum(math.prod(s) for _, s, _ in out_layout)
        mom = (_moments.MomentsBlocks(self.writer, step, split, P_out, self._block_size,
                                      lr=lr_v, epoch=ep, names=out_layout)
               if self._keep == "moments" else None)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        seen, loss_sum = 0, 0.0
        bg = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        pending: concurrent.futures.Future[Any] | None = None
        try:
            for x, y, sid, n in _limited(batches, max_samples, where, unpack):
                if fast is not None:
                    mean, m2, losses = fast.moments(x, y, n)
                    if tf.subset is not None:
                        idx = tf.subset.indices
                        mean, m2 = mean[idx], m2[idx]
                    mom.add_moments(n, mean, m2)
                else:
                    grads, losses = eng.compute(x, y)
                    if tf.projection is None:  # per-tensor column blocks: no concatenation
                        sub = tf.subset.local if tf.subset is not None else None
                        G = [_to_numpy(grads[k].reshape(n, -1)) for k in eng.names
                             if sub is None or k in sub]
                        if sub is not None:
                            G = [g[:, sub[k]] for g, k in
                                 zip(G, [k for k in eng.names if k in sub], strict=True)]
                    else:
                        G = tf.apply(_to_numpy(eng.flatten(grads)))
                    del grads
                    if mom is not None:
                        work = functools.partial(mom.add_samples, G)
                    else:
                        G = G if isinstance(G, np.ndarray) else np.concatenate(G, axis=1)
                        ids = None if sid is None else np.asarray(
                            sid.cpu() if isinstance(sid, torch.Tensor) else sid, dtype=np.int64)
                        kw = {"loss": _to_numpy(losses).astype(np.float64), "sample_id": ids,
                              "label": _labels(y, n) if self.store_labels else None,
                              "lr": lr_v, "epoch": ep}
                        work = functools.partial(self.writer.write, step, split, G, **kw)
                    # reduce/write batch b on a worker thread (the kernel and h5py release
                    # the GIL) while batch b+1 is computed; batches stay in order
                    if pending is not None:
                        pending.result()
                    pending = bg.submit(work)
                loss_sum += float(losses.detach().to(torch.float64).sum())
                seen += n
                bar.update(n)
            if pending is not None:
                pending.result()
                pending = None
            if seen == 0:
                raise AdapterError(
                    f"{where}: no samples in data for record (step={step}, split={split!r})")
            if mom is not None:
                mom.flush()  # the last block; then complete with the record's attributes
            self.writer.end_record(step, split, **attrs)
        except BaseException:
            if pending is not None:  # let the worker finish before marking the record aborted
                with contextlib.suppress(BaseException):
                    pending.result()
            abort_record(self.writer, step, split)
            raise
        finally:
            bg.shutdown(wait=True)
            bar.close()
        return RecordSummary(int(step), split, seen, loss_sum / seen, lr_v, ep,
                             attrs.get("optimizer_step"))

    def _pool(self, rows: int) -> BufferPool:
        P, dtype = self._eng.P, self._eng.dtype
        alloc = getattr(self.writer, "alloc_rows", None)
        self._host.clear()  # the old pool's buffers live on only in queued writes
        same = dtype == torch.float32 and getattr(self.writer, "dtype", None) == np.float32

        def make() -> torch.Tensor:
            if alloc is not None and same and not self._cuda:
                # rows laid out as the store's chunks: written without a copy
                # (GradientWriter.alloc_rows, gsnr_stats/store/writer.py)
                host = alloc(rows)
                t = torch.from_numpy(host)
                self._host[t.data_ptr()] = host
                return t
            return torch.empty((rows, P), dtype=dtype, pin_memory=self._cuda)

        return BufferPool(make, self.max_pending + 1)

    def record(
        self,
        data: Iterable[Any] | Sequence[Any],
        step: int,
        split: str,
        *,
        batch_size: int | None = None,
        lr: float | None = None,
        epoch: float | None = None,
        max_samples: int | None = None,
        unpack: Unpack | None = None,
        optimizer_step: int | None = None,
    ) -> RecordSummary:
        """Compute and write the record ``(step, split)`` from ``data``; complete it.

        The training run is left as it was: parameters, buffers and ``.grad`` are never
        changed; the model's modes (see ``mode``) and the global random state of torch
        (CPU, and CUDA where initialised), numpy and Python's ``random``, plus a
        ``DataLoader``'s own ``generator``, are restored when the record ends, also on
        error. Works under ``torch.no_grad()`` and ``torch.inference_mode()`` (gradients
        are enabled inside).

        Parameters
        ----------
        data : DataLoader, iterable of batches, or tuple of arrays
            Batches, unpacked by ``unpack`` or the default rule (see the class): ``(inputs,
            targets)``, or ``(inputs, targets, sample_id)`` with integer ids. With
            ``batch_size``, a tuple ``(inputs, targets[, sample_id])`` of tensors/arrays of
            the whole set, sliced into batches. Record ``"train"`` from an un-augmented
            loader of the training set.
        step, split : int, str
            The record's key (keywords or positional). ``step`` may be the epoch: the
            spacing in optimizer updates is stored separately (``optimizer_step``).
        batch_size : int, optional
            See ``data``.
        lr, epoch : float, optional
            Stored with the record; ``lr`` defaults to the optimizer's (see the class).
        max_samples : int, optional
            Stop after this many samples (the last batch is truncated).
        unpack : callable, optional
            Overrides the Recorder's ``unpack`` for this record.
        optimizer_step : int, optional
            The optimizer's update count to store; default: the Recorder's count (None
            without an optimizer).

        Returns
        -------
        RecordSummary
        """
        if self._closed:
            raise AdapterError("torch Recorder.record: the Recorder is closed (its optimizer "
                               "step hook is removed); make a new Recorder")
        unpack = unpack if unpack is not None else self.unpack
        model = self._eng.model
        check_params_usable(list(zip(self._eng.names, self._params, strict=True)),
                            "torch Recorder.record")
        with (preserved_host_rng(*torch_rng_savers(data)), model_mode(model, self.mode),
              grad_context()):
            if self._eng.replan():  # the model's modes changed since the last record
                self._fast = None
            lr_v = as_float(lr) if lr is not None else record_lr(self.optimizer, self._params)
            attrs = self._attrs(optimizer_step, actual_mode(model))
            kw = {"batch_size": batch_size, "lr_v": lr_v, "epoch": epoch,
                  "max_samples": max_samples, "unpack": unpack, "attrs": attrs}
            if self._keep == "moments" or self._tf.active:
                return self._record_small(data, step, split, **kw)
            if self._keep == "factors":
                return self._record_factors(data, step, split, **kw)
            return self._record_full(data, step, split, **kw)

    def _attrs(self, optimizer_step: int | None, mode: str) -> dict[str, Any]:
        """``end_record`` keyword arguments: ``optimizer_step`` (if known) and ``meta``."""
        meta: dict[str, Any] = {}
        if self.optimizer is not None:
            meta["optimizer"] = optimizer_meta(self.optimizer, self._names)
        meta["framework"] = f"torch {torch.__version__}"
        meta["mode"] = mode
        out: dict[str, Any] = {"meta": meta}
        o_step = optimizer_step if optimizer_step is not None else self.optimizer_step
        if o_step is not None:
            out["optimizer_step"] = int(o_step)
        return out

    def _record_full(self, data: Any, step: int, split: str, *, batch_size: int | None,
                     lr_v: float, epoch: float | None, max_samples: int | None,
                     unpack: Unpack | None, attrs: dict[str, Any]) -> RecordSummary:
        """:meth:`record` of full per-sample gradient dumps (fast path or ``vmap``)."""
        eng = self._eng
        batches, total = iter_data(data, batch_size, "torch Recorder.record", unpack)
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        ep = as_float(epoch)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        seen = 0
        loss_sum: Any = 0.0  # a device tensor once batches arrive: no sync per batch
        aw = AsyncWriter(self.writer, self.max_pending)
        fast = self._fast_path() if self._uses_fast() else None
        try:
            with aw:
                for x, y, sid, n in _limited(batches, max_samples, "torch Recorder.record",
                                             unpack):
                    grads: dict[str, torch.Tensor] | None = None
                    if fast is None:
                        grads, losses = eng.compute(x, y)
                    if self._buffers is None or n > self._rows:
                        # buffers live as long as the recorder: no fresh pages per record
                        self._rows = max(self._rows, n)
                        self._buffers = self._pool(self._rows)
                    pool = self._buffers
                    buf = pool.acquire()
                    view = buf[:n]
                    ready: Callable[[], Any] | None = None
                    if self._cuda:
                        if fast is not None:
                            flat = torch.empty((n, eng.P), dtype=eng.dtype, device=eng.device)
                            losses = fast.grads_into(x, y, n, flat)
                        else:
                            flat = eng.flatten(grads)
                        stream = self._copy_stream
                        stream.wait_stream(torch.cuda.current_stream(eng.device))
                        with torch.cuda.stream(stream):
                            view.copy_(flat, non_blocking=True)
                            loss_h = losses.to("cpu", non_blocking=True)
                            flat.record_stream(stream)  # keep memory until the copies end
                            losses.record_stream(stream)
                            ev = torch.cuda.Event()
                            ev.record(stream)
                        ready = ev.synchronize
                    elif fast is not None:  # straight into the chunk-ready buffer
                        losses = fast.grads_into(x, y, n, view)
                        loss_h = losses
                    else:
                        eng.flatten(grads, out=view)
                        loss_h = losses
                    del grads
                    loss_sum = loss_sum + losses.detach().to(torch.float64).sum()
                    label = _labels(y, n) if self.store_labels else None
                    ids = None if sid is None else np.asarray(
                        sid.cpu() if isinstance(sid, torch.Tensor) else sid, dtype=np.int64)

                    host = self._host.get(buf.data_ptr())

                    def grads_np(view: torch.Tensor = view, ready: Any = ready,
                                 host: Any = host) -> np.ndarray:
                        if ready is not None:
                            ready()
                        return view.numpy() if host is None else host[: view.shape[0]]

                    def loss_np(loss_h: torch.Tensor = loss_h, ready: Any = ready) -> np.ndarray:
                        if ready is not None:
                            ready()
                        return loss_h.detach().to(torch.float64).numpy()

                    aw.write(step, split, grads=grads_np, loss=loss_np, sample_id=ids,
                             label=label, lr=lr_v, epoch=ep,
                             release=(lambda b=buf, p=pool: p.release(b)))
                    seen += n
                    bar.update(n)
                if seen == 0:
                    raise AdapterError(
                        f"torch Recorder.record: no samples in data for record "
                        f"(step={step}, split={split!r})"
                    )
                aw.end_record(step, split, **attrs)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        return RecordSummary(int(step), split, seen, float(loss_sum) / seen, lr_v, ep,
                             attrs.get("optimizer_step"))

    def _record_factors(self, data: Any, step: int, split: str, *, batch_size: int | None,
                        lr_v: float, epoch: float | None, max_samples: int | None,
                        unpack: Unpack | None, attrs: dict[str, Any]) -> RecordSummary:
        """:meth:`record` of factored records: per batch, one forward/backward gives each
        factored Linear's inputs ``A`` and output gradients ``D``
        (``FastPath.factors_into``); the other tensors' per-sample gradients are the plain
        columns. Both are written through the writer thread."""
        eng = self._eng
        where = "torch Recorder.record"
        if not self._uses_fast():
            raise AdapterError(
                f"{where}: keep='factors' needs the fast path (fast=True, the default) and a "
                f"model without train-mode BatchNorm or Dropout: sample i's Linear gradient is "
                f"delta_i a_i^T only when each sample's loss depends on its own rows; record "
                f"in eval mode or with a writer without factors")
        batches, total = iter_data(data, batch_size, where, unpack)
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        ep = as_float(epoch)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        P_plain = max((e for _, e in self._plain.values()), default=0)
        seen = 0
        loss_sum: Any = 0.0
        aw = AsyncWriter(self.writer, self.max_pending)
        fast = self._fast_path()
        # small factored batches are merged into blocks of ~4096 rows: fewer fixed-cost writes
        blocks = WriteBlocks(aw, step, split, lr=lr_v, epoch=ep)
        try:
            with aw:
                for x, y, sid, n in _limited(batches, max_samples, where, unpack):
                    plain = torch.empty((n, P_plain), dtype=eng.dtype, device=eng.device)
                    facs, losses = fast.factors_into(x, y, n, plain, self._factored,
                                                     self._plain)
                    loss_sum = loss_sum + losses.detach().to(torch.float64).sum()
                    ids = None if sid is None else np.asarray(
                        sid.cpu() if isinstance(sid, torch.Tensor) else sid, dtype=np.int64)
                    host = _host([plain, losses, *(t for ad in facs.values() for t in ad)])
                    blocks.add(n, grads=host[0] if P_plain else None,
                               factors={k: (host[2 + 2 * i], host[3 + 2 * i])
                                        for i, k in enumerate(facs)},
                               loss=host[1].astype(np.float64), sample_id=ids,
                               label=_labels(y, n) if self.store_labels else None)
                    seen += n
                    bar.update(n)
                if seen == 0:
                    raise AdapterError(
                        f"{where}: no samples in data for record (step={step}, split={split!r})")
                blocks.flush()
                aw.end_record(step, split, **attrs)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        return RecordSummary(int(step), split, seen, float(loss_sum) / seen, lr_v, ep,
                             attrs.get("optimizer_step"))

