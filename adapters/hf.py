"""Hugging Face ``transformers.Trainer``: record per-sample gradients with one callback.

.. code-block:: python

    from gsnr_stats.adapters.hf import GradientCallback, eval_loaders

    trainer = Trainer(model, args, train_dataset=train, eval_dataset={"dev": dev, "ood": ood})
    cb = GradientCallback("run.h5", train_data=DataLoader(train, batch_size=64,
                                                          collate_fn=collator),
                          eval_data=eval_loaders(trainer))     # splits "train", "dev", "ood"
    trainer.add_callback(cb)
    with cb:                      # closes the store also if training raises
        trainer.train()

Install with the ``hf`` extra (``transformers`` and ``accelerate``); importing this module
imports ``transformers``, nothing else of the package does. Records go through the torch
:class:`~gsnr_stats.adapters.torch.Recorder` (eval mode for the record, modes restored,
global random state untouched, the optimizer's hyper-parameters in the record's meta).
Dict batches are read by :func:`unpack_labels`; the default loss is
:func:`cross_entropy` (``docs/adapters.md``, "Hugging Face Trainer").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import transformers
from torch.nn import functional as F  # noqa: N812

from gsnr_stats.errors import AdapterError

from ._callbacks import RecordingSession, check_reiterable, named_splits
from ._common import RecordSummary, Unpack

__all__ = ["GradientCallback", "cross_entropy", "eval_loaders", "unpack_labels"]

_WHERE = "hf GradientCallback"
IGNORE_INDEX = -100  # transformers' label for tokens without a loss (padding, sub-words)


def unpack_labels(label_key: str = "labels") -> Unpack:
    """The batch rule for Trainer-style dict batches: ``(inputs, targets)`` where
    ``targets = batch[label_key]`` and ``inputs`` is a plain dict of every other key
    (``input_ids``, ``attention_mask``, ``pixel_values``, ...), passed to the model as
    keyword arguments -- so the model computes no loss of its own.

    A batch that is not a mapping, or has no ``label_key``, is an :class:`AdapterError`.
    """

    def unpack(batch: Any) -> tuple[dict[str, Any], Any]:
        if not isinstance(batch, Mapping):
            raise AdapterError(
                f"{_WHERE}: batches must be dicts (as the Trainer's collators make them), got "
                f"{type(batch).__name__}; pass unpack=lambda batch: (inputs, targets)")
        if label_key not in batch:
            raise AdapterError(
                f"{_WHERE}: batch with keys {sorted(map(str, batch))} has no {label_key!r}; "
                "per-sample gradients need the labels: pass label_key= or unpack=")
        return {str(k): v for k, v in batch.items() if k != label_key}, batch[label_key]

    return unpack


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    lg = getattr(outputs, "logits", None)
    if isinstance(lg, torch.Tensor):
        return lg
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise AdapterError(f"{_WHERE}: the model's outputs ({type(outputs).__name__}) have no "
                       "'logits'; pass loss_fn=(outputs, labels) -> per-sample losses")


def cross_entropy(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Default per-sample loss: cross-entropy of the model's logits.

    .. math:: \\ell_i = -\\log \\operatorname{softmax}(z_i)_{y_i}
              \\quad\\text{or}\\quad
              \\ell_i = \\frac{1}{|T_i|}\\sum_{t \\in T_i} -\\log
              \\operatorname{softmax}(z_{it})_{y_{it}}

    Logits ``z`` are ``outputs.logits`` (``outputs["logits"]``, the first element of a
    tuple, or the tensor itself). Sequence classification: logits ``(n, C)``, ``C >= 2``,
    integer labels ``(n,)``. Token classification: logits ``(n, T, C)``, integer labels
    ``(n, T)``; ``T_i`` are the tokens of sample ``i`` whose label is not -100, so
    :math:`\\ell_i` is the loss the model reports for sample ``i`` alone (0 if it has no
    such token). Anything else (regression, multi-label, causal LM with shifted labels) is
    an :class:`AdapterError`: pass your own ``loss_fn``.
    """
    z = _logits(outputs)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() \
            or labels.is_complex():
        raise AdapterError(
            f"{_WHERE}: the default loss (cross_entropy) needs integer class labels, got "
            f"{getattr(labels, 'dtype', type(labels).__name__)}; for regression or multi-label "
            "targets pass loss_fn=(outputs, labels) -> per-sample losses")
    if z.ndim == 2 and labels.ndim == 1 and z.shape[0] == labels.shape[0] and z.shape[1] >= 2:
        return F.cross_entropy(z, labels, reduction="none")
    if z.ndim == 3 and labels.shape == z.shape[:2] and z.shape[2] >= 2:
        tok = F.cross_entropy(z.transpose(1, 2), labels, reduction="none",
                              ignore_index=IGNORE_INDEX)  # (n, T), 0 where ignored
        count = (labels != IGNORE_INDEX).sum(dim=1)
        return tok.sum(dim=1) / count.clamp(min=1).to(tok.dtype)
    raise AdapterError(
        f"{_WHERE}: the default loss (cross_entropy) takes logits (n, C>=2) with labels (n,) "
        f"or logits (n, T, C) with labels (n, T); got logits {tuple(z.shape)} and labels "
        f"{tuple(labels.shape)}; pass loss_fn=(outputs, labels) -> per-sample losses")


def eval_loaders(trainer: Any) -> dict[str, Any]:
    """``{split: DataLoader}`` of the trainer's ``eval_dataset``, built by the trainer itself
    (``trainer.get_eval_dataloader``: its collator, batch size, removed columns).

    One dataset gives ``{"eval": loader}``; a dict of datasets its keys. Call it on the
    process that records, before ``train()``. Single-process only: under multi-process
    training the trainer's loaders are sharded per process, so build plain loaders instead.
    """
    ds = getattr(trainer, "eval_dataset", None)
    if ds is None:
        raise AdapterError(f"{_WHERE}: eval_loaders: the trainer has no eval_dataset")
    if isinstance(ds, Mapping):
        return {str(k): trainer.get_eval_dataloader(k) for k in ds}
    return {"eval": trainer.get_eval_dataloader()}


def _unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which the Trainer
    passes to callbacks): its parameter groups are the ones that step."""
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


class GradientCallback(transformers.TrainerCallback):
    """Record per-sample gradients of the training and held-out splits during ``train()``.

    At each due checkpoint the callback writes one record per split with
    ``step = state.global_step`` (optimizer updates so far; also the record's
    ``optimizer_step``) and ``epoch = state.epoch`` (epochs completed, fractional; 0 before
    training).

    Parameters
    ----------
    writer : path-like or GradientWriter
        A path: the store is opened on the world's process zero at ``on_train_begin``
        (``adapters.torch.open_writer(path, model, ...)``, ``writer_kwargs`` passed on) and
        closed at ``on_train_end``. The Trainer has no exception event: use the callback
        as a context manager around ``trainer.train()`` (or call :meth:`close`) so that a
        failure closes the store with any interrupted record incomplete; without it the
        records completed before the failure are in the file all the same
        (``docs/format.md``). An open writer is used as is and left open.
    loss_fn : callable (outputs, labels) -> Tensor (n,), optional
        Per-sample losses of the model's outputs. Default :func:`cross_entropy`
        (classification: sequence or token level).
    train_data : DataLoader or iterable of dict batches, optional
        The training set without augmentation or shuffling, recorded as ``"train"``
        (e.g. ``DataLoader(train_dataset, batch_size=64, collate_fn=collator)``). The
        Trainer's own training loader is never used: it shuffles, and iterating it moves
        accelerate's epoch state.
    eval_data : a loader, a list of loaders or ``{split: loader}``, optional
        Held-out splits (:func:`eval_loaders` builds them from the trainer). Names as for
        ``eval_names``; one loader alone is ``"eval"``, several ``"eval", "eval_1", ...``.
    eval_names : sequence of str, optional
        Split names for a loader or list of loaders.
    every_n_epochs, every_n_steps : int, optional
        Record at every n-th epoch end (``on_epoch_end``; an epoch cut short by
        ``max_steps`` counts) or every n-th optimizer step (``on_step_end``; with gradient
        accumulation an optimizer update, not a batch). One of them; default
        ``every_n_epochs=1``. A step is never recorded twice.
    record_at_start : bool
        Also record once at ``on_train_begin`` (step ``state.global_step``, 0 unless
        resuming).
    keep, max_samples, batch_size, writer_kwargs, **recorder_kwargs :
        As for the Lightning callback (``adapters/lightning.py``): ``Recorder`` options.
    unpack : callable batch -> (inputs, targets[, sample_id]), optional
        Default :func:`unpack_labels` with ``label_key``.
    label_key : str
        The labels' key in dict batches (default ``"labels"``).

    Notes
    -----
    The model is ``kwargs["model"]`` of the Trainer's events (the unwrapped model); the
    optimizer ``kwargs["optimizer"]`` (accelerate's wrapper unwrapped), whose learning
    rate and hyper-parameters are stored with each record; the rate is read when the
    record is taken, after the scheduler stepped (the next update's). Only process zero
    records (``state.is_world_process_zero``); see the Lightning callback's notes on
    multi-process training, which apply here too.
    """

    def __init__(
        self,
        writer: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        *,
        train_data: Any = None,
        eval_data: Any = None,
        eval_names: Sequence[str] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        record_at_start: bool = False,
        keep: str = "grads",
        max_samples: int | None = None,
        batch_size: int | None = None,
        unpack: Unpack | None = None,
        label_key: str = "labels",
        writer_kwargs: Mapping[str, Any] | None = None,
        **recorder_kwargs: Any,
    ) -> None:
        self._session = RecordingSession(
            writer, cross_entropy if loss_fn is None else loss_fn, where=_WHERE,
            every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
            record_at_start=record_at_start, keep=keep, max_samples=max_samples,
            batch_size=batch_size, unpack=unpack if unpack is not None else unpack_labels(label_key),
            writer_kwargs=writer_kwargs, recorder_kwargs=recorder_kwargs,
            attrs={"recorded_by": "gsnr_stats.adapters.hf.GradientCallback",
                   "transformers_version": transformers.__version__})
        splits = ([("train", train_data)] if train_data is not None else []) + named_splits(
            eval_data, eval_names, "eval", "eval_data", _WHERE)
        if not splits:
            raise AdapterError(
                f"{_WHERE}: nothing to record: pass train_data= (an un-augmented, unshuffled "
                "loader of the training set) and/or eval_data= (e.g. eval_loaders(trainer))")
        names = [n for n, _ in splits]
        if len(set(names)) != len(names):
            raise AdapterError(f"{_WHERE}: split names {names} repeat; give distinct eval_names")
        if batch_size is None:
            for n, d in splits:
                check_reiterable(d, f"the data of split {n!r}", _WHERE)
        self._splits = splits

    @property
    def records(self) -> list[RecordSummary]:
        """What was written, in order."""
        return self._session.records

    def close(self, exc: BaseException | None = None) -> None:
        """Close the store (if opened from a path) and the Recorder; idempotent. With
        ``exc``, a record still open stays incomplete."""
        self._session.close(exc)

    def __enter__(self) -> GradientCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def _record(self, state: Any, epoch: float) -> None:
        s = self._session
        if not state.is_world_process_zero or not s.started or s.recorded(state.global_step):
            return
        s.record(state.global_step, epoch, self._splits)

    # -- Trainer events ----------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        model = kwargs.get("model")
        if model is None:
            raise AdapterError(f"{_WHERE}: the Trainer passed no model to on_train_begin")
        self._session.start(model, _unwrap_optimizer(kwargs.get("optimizer")))
        if self._session.record_at_start:
            self._record(state, float(state.epoch or 0.0))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._session.due_step(state.global_step):
            self._record(state, float(state.epoch or 0.0))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ep = float(state.epoch or 0.0)
        # the k-th epoch end has state.epoch == k, or k - 1 < epoch < k when max_steps cut it
        if self._session.due_epoch(max(1, math.ceil(ep - 1e-6))):
            self._record(state, ep)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.close()
