"""What the Lightning and Hugging Face callbacks share: when to record, what, and into what.

Both callbacks (``adapters/lightning.py``, ``adapters/hf.py``) are thin translations of
their framework's hooks into calls of one :class:`RecordingSession`: it validates the
configuration when the callback is built, opens the writer (a path) and builds one torch
:class:`~gsnr_stats.adapters.torch.Recorder` on the process that records, decides which
optimizer steps / epochs are due, writes one record per split through the Recorder's
public API, and closes everything on teardown or error (``docs/adapters.md``, "Lightning"
and "Hugging Face Trainer"). Imports the torch adapter only; never a training framework.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from gsnr_stats.errors import AdapterError

from ._common import RecordSummary, Unpack

#: Keyword arguments of ``Recorder`` that also shape the writer's layout (``open_writer``).
_LAYOUT_KW = ("include_frozen", "param_filter", "params_subset", "project", "seed")
#: Keyword arguments the callbacks set themselves (not accepted in ``recorder_kwargs``).
_OWN_KW = ("optimizer", "keep", "unpack")


def _check_every(every_n_epochs: int | None, every_n_steps: int | None,
                 where: str) -> tuple[int | None, int | None]:
    if every_n_epochs is not None and every_n_steps is not None:
        raise AdapterError(f"{where}: give every_n_epochs or every_n_steps, not both")
    if every_n_epochs is None and every_n_steps is None:
        every_n_epochs = 1
    for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise AdapterError(f"{where}: {name} must be a positive int, got {v!r}")
    return every_n_epochs, every_n_steps


def check_reiterable(data: Any, name: str, where: str) -> None:
    """``data`` is read once per record: an iterator would be empty after the first."""
    if data is None:
        return
    # checked on the type, never by calling iter(): that would start a DataLoader's workers
    if not isinstance(data, Iterable):
        raise AdapterError(f"{where}: {name} must be a DataLoader or another iterable of "
                           f"batches, got {type(data).__name__}")
    if isinstance(data, Iterator):
        raise AdapterError(
            f"{where}: {name} is an iterator ({type(data).__name__}); it is read once per "
            "record and would be empty after the first. Pass a DataLoader or a list of batches")


def named_splits(data: Any, names: Sequence[str] | None, default: str, what: str,
                 where: str) -> list[tuple[str, Any]]:
    """``[(split, loader), ...]`` from one loader, a sequence or a ``{name: loader}`` mapping.

    Names: the mapping's keys, else ``names``, else ``default`` for one loader and
    ``default, default_1, default_2, ...`` for several.
    """
    if data is None:
        return []
    if isinstance(data, Mapping):
        if names is not None:
            raise AdapterError(f"{where}: {what} is a mapping; its keys are the split names, "
                               "so leave the names argument out")
        out = [(str(k), v) for k, v in data.items()]
    else:
        loaders = list(data) if isinstance(data, list | tuple) else [data]
        if names is None:
            names = [default if i == 0 else f"{default}_{i}" for i in range(len(loaders))]
        names = list(names)
        if len(names) != len(loaders):
            raise AdapterError(f"{where}: {len(loaders)} {what} loader(s) but {len(names)} "
                               f"split name(s) {names}; give one name per loader")
        out = list(zip((str(n) for n in names), loaders, strict=True))
    return out


class RecordingSession:
    """One recording run of a callback: schedule, writer, Recorder, records.

    Parameters
    ----------
    writer : path-like or GradientWriter
        A path: the session opens ``adapters.torch.open_writer(path, model, ...)`` on the
        recording process when training starts (``writer_kwargs`` go to it) and closes it
        at the end, also on error (an incomplete record is left incomplete). An open
        writer is used as is and stays open: its owner closes it.
    loss_fn : callable (outputs, targets) -> Tensor (n,)
        Per-sample losses (``reduction="none"``), as for the torch ``Recorder``.
    where : str
        The callback's name, for messages.
    every_n_epochs, every_n_steps, record_at_start, keep, max_samples, batch_size, unpack,
    writer_kwargs, recorder_kwargs :
        See the callbacks.
    attrs : dict
        Extra store attributes (which callback wrote the store).
    """

    def __init__(
        self,
        writer: Any,
        loss_fn: Callable[[Any, Any], Any],
        *,
        where: str,
        every_n_epochs: int | None,
        every_n_steps: int | None,
        record_at_start: bool,
        keep: str,
        max_samples: int | None,
        batch_size: int | None,
        unpack: Unpack | None,
        writer_kwargs: Mapping[str, Any] | None,
        recorder_kwargs: Mapping[str, Any],
        attrs: Mapping[str, Any],
    ) -> None:
        self.where = where
        if not callable(loss_fn):
            raise AdapterError(f"{where}: loss_fn must be callable (outputs, targets) -> "
                               "per-sample losses (reduction='none')")
        if keep not in ("grads", "moments"):
            raise AdapterError(f"{where}: keep must be 'grads' or 'moments', got {keep!r}")
        if max_samples is not None and (isinstance(max_samples, bool)
                                        or not isinstance(max_samples, int) or max_samples < 1):
            raise AdapterError(f"{where}: max_samples must be a positive int, got {max_samples!r}")
        bad = sorted(set(recorder_kwargs) & set(_OWN_KW))
        if bad:
            raise AdapterError(f"{where}: {bad} are set by the callback (the trainer's "
                               "optimizer; keep= and unpack= are its own arguments)")
        self.every_n_epochs, self.every_n_steps = _check_every(every_n_epochs, every_n_steps,
                                                               where)
        self.record_at_start = bool(record_at_start)
        self.loss_fn = loss_fn
        self.keep = keep
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.unpack = unpack
        self.recorder_kwargs = dict(recorder_kwargs)
        self.writer_kwargs = dict(writer_kwargs or {})
        self.attrs = dict(attrs)
        self._target = writer
        self._owns_writer = isinstance(writer, str | os.PathLike)
        if not self._owns_writer and not hasattr(writer, "end_record"):
            raise AdapterError(f"{where}: writer must be a path or an open GradientWriter, got "
                               f"{type(writer).__name__}")
        if not self._owns_writer and self.writer_kwargs:
            raise AdapterError(f"{where}: writer_kwargs only apply when writer is a path")
        self.writer: Any = None if self._owns_writer else writer
        self.recorder: Any = None
        self.records: list[RecordSummary] = []
        self._done: set[int] = set()

    # -- schedule ----------------------------------------------------------------------

    def due_epoch(self, epochs_done: int) -> bool:
        """After ``epochs_done`` completed epochs (1, 2, ...): is a record due?"""
        return self.every_n_epochs is not None and epochs_done % self.every_n_epochs == 0

    def due_step(self, step: int) -> bool:
        """After optimizer step ``step``: is a record due?"""
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    def recorded(self, step: int) -> bool:
        """Was optimizer step ``step`` recorded already (an epoch end right after a due
        step, a repeated hook under gradient accumulation)?"""
        return int(step) in self._done

    # -- lifetime ----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.recorder is not None

    def start(self, model: Any, optimizer: Any) -> None:
        """Open the writer (a path) and build the Recorder; idempotent."""
        if self.recorder is not None:
            return
        from . import torch as gt

        rk = self.recorder_kwargs
        if self.writer is None:
            lay = {k: rk[k] for k in _LAYOUT_KW if k in rk}
            self.writer = gt.open_writer(self._target, model, attrs=self.attrs, **lay,
                                         **self.writer_kwargs)
        try:
            with warnings.catch_warnings():
                # The optimizer may have stepped already (resumed training) and SGD keeps no
                # count; the callbacks pass the trainer's own step count to every record, so
                # the Recorder's "counts from 0" warning does not apply.
                warnings.filterwarnings("ignore", message=r".*has already taken steps.*",
                                        category=UserWarning)
                self.recorder = gt.Recorder(self.writer, model, self.loss_fn,
                                            optimizer=optimizer, keep=self.keep,
                                            unpack=self.unpack, **rk)
        except BaseException as e:
            self.close(e)
            raise

    def record(self, step: int, epoch: float, splits: Iterable[tuple[str, Any]]) -> None:
        """One record per ``(split, data)`` at optimizer step ``step`` (stored as both the
        record's ``step`` and its ``optimizer_step``)."""
        step = int(step)
        if step in self._done:
            return
        self._done.add(step)
        for split, data in splits:
            s = self.recorder.record(data, step, split, batch_size=self.batch_size,
                                     epoch=float(epoch), max_samples=self.max_samples,
                                     optimizer_step=step)
            self.records.append(s)

    def close(self, exc: BaseException | None = None) -> None:
        """Remove the Recorder's optimizer hook and close a writer the session opened.

        With ``exc`` (training failed) the writer is closed as a context manager closes
        on an exception: records still open are left incomplete, never completed.
        Idempotent.
        """
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close()
        w = self.writer
        if w is not None and self._owns_writer:
            self.writer = None
            if exc is None:
                w.close()
            else:
                w.__exit__(type(exc), exc, exc.__traceback__)
