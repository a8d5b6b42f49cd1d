"""PyTorch Lightning: record per-sample gradients from ``Trainer.fit`` with one callback.

.. code-block:: python

    from gsnr_stats.adapters.lightning import GradientCallback

    cb = GradientCallback("run.h5", nn.CrossEntropyLoss(reduction="none"),
                          train_data=eval_train_loader)      # un-augmented, not shuffled
    trainer = L.Trainer(max_epochs=20, callbacks=[cb])
    trainer.fit(model, train_loader, [val_loader, ood_loader])
    stats = gs.reduce("run.h5")          # splits "train", "val", "val_1"

Install with the ``lightning`` extra (``pip install gsnr-stats[lightning]``); importing this
module imports ``lightning``, nothing else of the package does. Each record goes through the
torch :class:`~gsnr_stats.adapters.torch.Recorder` (eval mode for the record and every
submodule's mode restored afterwards, global random state untouched, the optimizer's
hyper-parameters in the record's meta). What is recorded when, and the rules under DDP,
are in :class:`GradientCallback` and ``docs/adapters.md`` ("Lightning").

:class:`TrainingMomentsCallback` records instead the per-sample gradient moments of the
*training* batches from Lightning's own backward (``adapters/_torch_hooks.py``, no extra
forward or backward): ``callbacks=[TrainingMomentsCallback("run.h5", every_n_epochs=1)]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from gsnr_stats.errors import AdapterError

from ._callbacks import RecordingSession, _check_every, check_reiterable, named_splits
from ._common import RecordSummary, Unpack

__all__ = ["GradientCallback", "TrainingMomentsCallback"]

_WHERE = "lightning GradientCallback"


def _has_distributed_sampler(loader: Any) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    bs = getattr(loader, "batch_sampler", None)
    return any(isinstance(s, DistributedSampler)
               for s in (getattr(loader, "sampler", None), getattr(bs, "sampler", None)))


class GradientCallback(pl.Callback):
    """Record per-sample gradients of the training and held-out splits during ``fit``.

    At each due checkpoint the callback writes one record per split, with
    ``step = trainer.global_step`` (the optimizer update count, also stored as the record's
    ``optimizer_step``: the analytics' step spacing) and ``epoch`` = the number of epochs
    completed (0 before training; fractional with ``every_n_steps`` and for an epoch cut
    short by ``max_steps``).

    Parameters
    ----------
    writer : path-like or GradientWriter
        A path: the store is opened on global rank zero when fitting starts
        (``adapters.torch.open_writer(path, model, ...)``, ``writer_kwargs`` passed on) and
        closed on ``teardown``, and on an exception (``on_exception``) closed so that an
        interrupted record stays incomplete (readers skip it; ``docs/format.md``). An open
        writer is used as is and left open (its owner closes it).
    loss_fn : callable (outputs, targets) -> Tensor (n,)
        Per-sample losses of the LightningModule's ``forward`` outputs,
        ``reduction="none"`` style (e.g. ``nn.CrossEntropyLoss(reduction="none")``).
    train_data : DataLoader or iterable of batches, optional
        The training set without augmentation and without shuffling, recorded as split
        ``"train"``. Default None: no training split -- the trainer's own training loader
        usually augments and shuffles, so it is never used (augmented samples are not the
        training set's gradients).
    val_data : None, False, a loader, a list of loaders or ``{split: loader}``
        Held-out splits. None (default): the trainer's validation dataloaders, as they are
        when the record is taken (``trainer.val_dataloaders``; loaded if validation has not
        run yet), every batch of them (``limit_val_batches`` does not apply). False: no
        held-out split. Loaders given here are used instead.
    val_names : sequence of str, optional
        Split names of the held-out loaders, one per loader. Default: ``"val"`` for one
        loader; ``"val", "val_1", "val_2", ...`` for several (a mapping's keys for a dict
        of loaders).
    every_n_epochs, every_n_steps : int, optional
        Record after every n-th epoch (``on_train_epoch_end``; an epoch cut short by
        ``max_steps`` counts) or after every n-th optimizer step (``on_train_batch_end``
        once ``trainer.global_step`` reaches a multiple of n; with gradient accumulation a
        step is an optimizer update, not a batch). One of them; default
        ``every_n_epochs=1``. A step is never recorded twice.
    record_at_start : bool
        Also record once before the first update (``on_train_start``, after the sanity
        check; step ``trainer.global_step``, 0 unless resuming).
    keep : {"grads", "moments"}
        Full per-sample gradients or per-parameter moments (``Recorder(keep=)``).
    max_samples : int, optional
        At most this many samples per split and record.
    batch_size : int, optional
        Only for data given as whole-set ``(inputs, targets)`` tensors (``Recorder.record``).
    unpack : callable batch -> (inputs, targets[, sample_id]), optional
        How to read a batch (``Recorder(unpack=)``; default: its documented rule).
    writer_kwargs : dict, optional
        ``GradientWriter`` options (``overwrite``, ``dtype``, ``chunks``, ...) when
        ``writer`` is a path.
    **recorder_kwargs :
        Other :class:`~gsnr_stats.adapters.torch.Recorder` options (``mode``, ``fast``,
        ``progress``, ``params_subset``, ``project``, ``seed``, ``param_filter``,
        ``include_frozen``, ``chunk_size``, ``block_size``, ...); the layout options also
        shape the writer opened from a path.

    Notes
    -----
    * Never records during the sanity check (``trainer.sanity_checking``), nor in
      ``validate``/``test``/``predict``.
    * The optimizer: with one optimizer (``trainer.optimizers``) its learning rate and
      hyper-parameters are stored with each record (``Recorder(optimizer=)``); the rate is
      the one in its parameter groups when the record is taken (the next update's, once
      a scheduler has stepped). With several optimizers none is passed: lr is NaN.
    * DDP and other multi-process strategies: only global rank zero records (and opens
      the store); the other ranks do nothing and wait at their next collective, so a
      long record counts against the process group's timeout. Under DDP the trainer's
      validation loaders carry a ``DistributedSampler``: rank zero would record only its
      shard, so a warning says so -- pass ``val_data=`` with plain loaders to record whole
      splits. Strategies that shard parameters (FSDP, DeepSpeed stage 3) are not
      supported: the Recorder needs the whole model on rank zero.
    * The model is the LightningModule itself (its ``forward``); it stays on its device
      and batches are moved there.

    Attributes
    ----------
    records : list of RecordSummary
        What was written, in order.
    """

    def __init__(
        self,
        writer: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        train_data: Any = None,
        val_data: Any = None,
        val_names: Sequence[str] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        record_at_start: bool = False,
        keep: str = "grads",
        max_samples: int | None = None,
        batch_size: int | None = None,
        unpack: Unpack | None = None,
        writer_kwargs: Mapping[str, Any] | None = None,
        **recorder_kwargs: Any,
    ) -> None:
        super().__init__()
        self._session = RecordingSession(
            writer, loss_fn, where=_WHERE, every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps, record_at_start=record_at_start, keep=keep,
            max_samples=max_samples, batch_size=batch_size, unpack=unpack,
            writer_kwargs=writer_kwargs, recorder_kwargs=recorder_kwargs,
            attrs={"recorded_by": "gsnr_stats.adapters.lightning.GradientCallback",
                   "lightning_version": pl.__version__})
        if batch_size is None:
            check_reiterable(train_data, "train_data", _WHERE)
        self.train_data = train_data
        if val_data is not None and val_data is not False:
            # the given loaders: checked and named now, not at the first record
            for _, d in named_splits(val_data, val_names, "val", "val_data", _WHERE):
                check_reiterable(d, "val_data", _WHERE)
        self.val_data = val_data
        self.val_names = None if val_names is None else [str(n) for n in val_names]
        self._warned_sharded = False
        self._batches = 0  # batches run in the current epoch (for the epoch label)

    @property
    def records(self) -> list[RecordSummary]:
        return self._session.records

    # -- what to record ----------------------------------------------------------------

    def _held_out(self, trainer: pl.Trainer) -> list[tuple[str, Any]]:
        if self.val_data is False:
            return []
        if self.val_data is not None:
            return named_splits(self.val_data, self.val_names, "val", "val_data", _WHERE)
        loaders = trainer.val_dataloaders
        if loaders is None:
            # validation has not run yet (no sanity check): load the loaders as the
            # validation loop would; nothing to load without validation_step
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        if loaders is None:
            return []
        if isinstance(loaders, Mapping) and self.val_names is not None:
            loaders = list(loaders.values())
        out = named_splits(loaders, self.val_names, "val", "the trainer's validation", _WHERE)
        if (trainer.world_size > 1 and not self._warned_sharded
                and any(_has_distributed_sampler(d) for _, d in out)):
            self._warned_sharded = True
            warnings.warn(
                f"{_WHERE}: the trainer's validation loaders use a DistributedSampler, so "
                f"rank zero records only its 1/{trainer.world_size} of each held-out split; "
                "pass val_data= with non-distributed loaders to record whole splits",
                UserWarning, stacklevel=3)
        return out

    def _splits(self, trainer: pl.Trainer) -> list[tuple[str, Any]]:
        out = [("train", self.train_data)] if self.train_data is not None else []
        out += self._held_out(trainer)
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            raise AdapterError(f"{_WHERE}: split names {names} repeat; give distinct val_names")
        if not out:
            raise AdapterError(
                f"{_WHERE}: nothing to record: no train_data and no held-out split (the "
                "trainer has no validation dataloader, or val_data=False); pass train_data= "
                "(an un-augmented loader of the training set) and/or val_data=")
        return out

    def _record(self, trainer: pl.Trainer, epoch: float) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        s = self._session
        if not s.started or s.recorded(trainer.global_step):
            return
        s.record(trainer.global_step, epoch, self._splits(trainer))

    # -- Lightning hooks ---------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # before restore_training_state: a resumed SGD's state is not yet loaded
        opts = list(trainer.optimizers)
        self._session.start(pl_module, opts[0] if len(opts) == 1 else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._splits(trainer)  # configuration errors now, not after the first epoch
        if self._session.record_at_start:
            self._record(trainer, float(trainer.current_epoch))

    def _epoch(self, trainer: pl.Trainer, at_end: bool) -> float:
        """Epochs completed: the current one counts by its share of batches run (an
        epoch cut short by ``max_steps`` is a fraction); of unknown length, it counts
        whole at its end and not at all before."""
        nb = trainer.num_training_batches
        if isinstance(nb, int | float) and math.isfinite(nb) and nb > 0:
            return trainer.current_epoch + min(self._batches / nb, 1.0)
        return float(trainer.current_epoch + int(at_end))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches = batch_idx + 1
        if self._session.due_step(trainer.global_step):
            self._record(trainer, self._epoch(trainer, at_end=False))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the k-th epoch end; current_epoch (k - 1) advances only after this hook
        if self._session.due_epoch(trainer.current_epoch + 1):
            self._record(trainer, self._epoch(trainer, at_end=True))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._session.close(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._session.close()


class TrainingMomentsCallback(pl.Callback):
    """Per-sample gradient moments of the training batches, from the trainer's own backward.

    A :class:`~gsnr_stats.adapters.torch.TrainingMoments` is attached to the
    LightningModule when fitting starts (on global rank zero) and writes one moments record
    per window, ``step = trainer.global_step`` (also its ``optimizer_step``), ``epoch`` =
    epochs completed: the batches of every ``every_n_epochs``-th epoch, or of every
    ``every_n_steps`` optimizer steps (a window cut by the end of fitting is written at
    ``teardown``).

    Parameters
    ----------
    writer : path-like or GradientWriter
        A path: opened with ``TrainingMoments.layout(module)`` when fitting starts
        (``writer_kwargs`` go to ``GradientWriter``), closed on ``teardown``. An open writer
        must have that layout and stays open.
    split : str
        The records' split.
    every_n_epochs, every_n_steps : int, optional
        One of them; default ``every_n_epochs=1``.
    reduction : "mean", "sum" or float
        How ``training_step``'s loss combines the per-sample losses (``"mean"``:
        ``F.cross_entropy(...)`` as usual). Lightning divides the loss by
        ``accumulate_grad_batches`` before ``backward``: that factor is undone too.
    writer_kwargs : dict, optional
        ``GradientWriter`` options when ``writer`` is a path.
    **moments_kwargs :
        Other ``TrainingMoments`` options (``batchnorm``, ``tol``, ``block_size``,
        ``param_filter``, ``include_frozen``).

    Notes
    -----
    Manual optimization, mixed precision (autocast is refused by the hooks) and sharded
    strategies are not supported. Under DDP only global rank zero records, and so only its
    share of each batch (a warning says so).
    """

    def __init__(self, writer: Any, *, split: str = "train", every_n_epochs: int | None = None,
                 every_n_steps: int | None = None, reduction: str | float = "mean",
                 writer_kwargs: Mapping[str, Any] | None = None, **moments_kwargs: Any) -> None:
        super().__init__()
        where = "lightning TrainingMomentsCallback"
        self.every_n_epochs, self.every_n_steps = _check_every(every_n_epochs, every_n_steps,
                                                               where)
        bad = sorted(set(moments_kwargs) & {"every", "optimizer", "loss_scale", "model"})
        if bad:
            raise AdapterError(f"{where}: {bad} are set by the callback")
        self._target, self.split, self.reduction = writer, str(split), reduction
        self._writer_kwargs = dict(writer_kwargs or {})
        self._kw = dict(moments_kwargs)
        self.tm: Any = None
        self._done: set[int] = set()
        self._records: list[RecordSummary] = []

    @property
    def records(self) -> list[RecordSummary]:
        return self._records if self.tm is None else self.tm.records

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.tm is not None:
            return
        from .torch import TrainingMoments

        if trainer.world_size > 1:
            warnings.warn("lightning TrainingMomentsCallback: rank zero records the moments "
                          f"of its own 1/{trainer.world_size} of each batch only",
                          UserWarning, stacklevel=2)
        opts = list(trainer.optimizers)
        kw: dict[str, Any] = dict(self._kw)
        if self._writer_kwargs:
            kw["writer_kwargs"] = self._writer_kwargs
        if not hasattr(self._target, "write_moments"):
            kw["attrs"] = {"recorded_by": "gsnr_stats.adapters.lightning."
                                          "TrainingMomentsCallback",
                           "lightning_version": pl.__version__}
        self.tm = TrainingMoments(
            self._target, pl_module, split=self.split, every=None, reduction=self.reduction,
            loss_scale=1.0 / trainer.accumulate_grad_batches,
            optimizer=opts[0] if len(opts) == 1 else None, **kw)
        self.tm.attach()

    def _flush(self, trainer: pl.Trainer, epoch: float) -> None:
        step = int(trainer.global_step)
        if self.tm is None or step in self._done or not self.tm.pending_samples:
            return
        self._done.add(step)
        self.tm.flush(step, epoch=epoch, optimizer_step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        k = self.every_n_steps
        if k is not None and trainer.global_step > 0 and trainer.global_step % k == 0:
            nb = trainer.num_training_batches
            frac = (batch_idx + 1) / nb if isinstance(nb, int) and nb > 0 else 0.0
            self._flush(trainer, trainer.current_epoch + min(frac, 1.0))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = self.every_n_epochs
        if e is not None and (trainer.current_epoch + 1) % e == 0:
            self._flush(trainer, float(trainer.current_epoch + 1))

    def _close(self) -> None:
        tm, self.tm = self.tm, None
        if tm is not None:
            self._records = tm.records
            tm.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()  # the window in progress is not written

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tm is not None and stage == "fit":
            self._flush(trainer, float(trainer.current_epoch))
        self._close()
