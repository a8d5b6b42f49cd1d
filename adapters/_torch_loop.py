"""What the torch :class:`~adapters._torch_record.Recorder` needs to sit inside a training loop.

Owns the parts that touch the user's training state rather than the gradients: the model's
mode for the duration of a record (:func:`model_mode`), the grad / inference-mode context
(:func:`grad_context`), torch's random generators (:func:`torch_rng_savers`, used with
``_common.preserved_host_rng``), and the optimizer -- its learning rate per parameter group
(:func:`record_lr`), its class and hyper-parameters (:func:`optimizer_meta`) and its step
count (:class:`StepCounter`). See ``docs/adapters.md``, "Recording from a training loop
(PyTorch)". Imports only the engine-free helpers; never imported by the engine.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gsnr_stats.errors import AdapterError

MODES = ("eval", "train", "as_is")


# --------------------------------------------------------------------------------------
# Mode and grad context
# --------------------------------------------------------------------------------------


def resolve_mode(mode: str | None, train_batchnorm: str, dropout: str) -> str:
    """The recorder's mode: ``mode`` if given, else ``"eval"`` -- or ``"as_is"`` when
    ``train_batchnorm`` / ``dropout`` opt into train-mode semantics (as before ``mode``)."""
    if mode is None:
        return "as_is" if (train_batchnorm != "error" or dropout != "error") else "eval"
    if mode not in MODES:
        raise AdapterError(
            f"torch Recorder: mode must be one of {MODES} (or None), got {mode!r}: 'eval' "
            "switches the model to eval mode for each record and restores every submodule's "
            "mode afterwards; 'train' does the same with train mode (needs "
            "train_batchnorm='batch' for BatchNorm, dropout='different' for Dropout); "
            "'as_is' uses the modes the model has when record() is called")
    return mode


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Switch ``model`` to eval (``"eval"``) or train (``"train"``) mode inside the block;
    restore each submodule's own ``training`` flag afterwards, also on exception.

    Flags are restored one by one (not with ``model.train(flag)``, which would overwrite
    a submodule the user keeps in eval inside a training model, e.g. frozen BatchNorm).
    """
    if mode == "as_is":
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def actual_mode(model: nn.Module) -> str:
    """``"train"`` if any submodule is in training mode, else ``"eval"`` (stored in meta)."""
    return "train" if any(m.training for m in model.modules()) else "eval"


def check_params_usable(params: Sequence[tuple[str, torch.Tensor]], where: str) -> None:
    """Parameters created under ``torch.inference_mode()`` can never get gradients."""
    bad = [n for n, p in params if p.is_inference()]
    if bad:
        raise AdapterError(
            f"{where}: parameters {bad[:3]} are inference tensors (the model was created or "
            "loaded under torch.inference_mode()), which can never get gradients; build or "
            "load the model outside torch.inference_mode() (torch.no_grad() is fine)")


@contextlib.contextmanager
def grad_context() -> Iterator[None]:
    """Gradients on, inference mode off, inside a record.

    ``record()`` works under a caller's ``torch.no_grad()`` (``enable_grad``) and
    ``torch.inference_mode()`` (``inference_mode(False)``; input tensors created in
    inference mode are cloned into normal tensors by ``_torch_engine._to``). Only
    parameters created in inference mode cannot be used (:func:`check_params_usable`).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


# --------------------------------------------------------------------------------------
# Random state
# --------------------------------------------------------------------------------------


def _torch_global() -> Callable[[], None]:
    cpu = torch.get_rng_state()
    # only CUDA generators that exist: querying them would initialise CUDA
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None)

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore


def _generator_saver(g: torch.Generator) -> Callable[[], Callable[[], None]]:
    def save() -> Callable[[], None]:
        state = g.get_state()
        return lambda: g.set_state(state)

    return save


def torch_rng_savers(data: Any) -> list[Callable[[], Callable[[], None]]]:
    """Savers (for ``_common.preserved_host_rng``) of torch's global CPU and CUDA
    generators and of the ``torch.Generator`` objects a ``DataLoader`` ``data`` shuffles
    with (``DataLoader(generator=...)``, its sampler's), which iterating it advances."""
    gens: dict[int, torch.Generator] = {}
    holders = [data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
               getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    for h in holders:
        g = getattr(h, "generator", None)
        if isinstance(g, torch.Generator):
            gens[id(g)] = g
    return [_torch_global, *(_generator_saver(g) for g in gens.values())]


# --------------------------------------------------------------------------------------
# Optimizer: learning rate, hyper-parameters, step count
# --------------------------------------------------------------------------------------


def _groups_with(optimizer: Any, params: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the optimizer's parameter groups that hold any of ``params``."""
    ids = {id(p) for p in params}
    return [i for i, g in enumerate(optimizer.param_groups)
            if any(id(p) in ids for p in g["params"])]


def record_lr(optimizer: Any, params: Sequence[torch.Tensor] | None = None) -> float:
    """The learning rate to store with a record: NaN without an optimizer.

    The common ``lr`` of the parameter groups that hold the recorded ``params`` (all
    groups if none does, or ``params`` is None). When they differ (a per-layer schedule,
    no weight decay on biases at another rate), no single number is right: NaN and a
    warning naming the groups (every group's lr is in the record's meta); pass ``lr=``.
    """
    if optimizer is None:
        return math.nan
    groups = optimizer.param_groups
    idx = _groups_with(optimizer, params) if params is not None else []
    idx = idx or list(range(len(groups)))
    lrs = {i: float(groups[i]["lr"]) for i in idx}
    if len(set(lrs.values())) == 1:
        return next(iter(lrs.values()))
    warnings.warn(
        f"torch Recorder: the optimizer's parameter groups {idx} that hold recorded "
        f"parameters have different learning rates ({lrs}); the record's lr is NaN (each "
        "group's lr is stored in the record's meta). Pass lr= to record() to store the rate "
        "the analytics should use", UserWarning, stacklevel=4)
    return math.nan


_SKIP = object()


def _json_safe(v: Any) -> Any:
    """A hyper-parameter as JSON (numbers, bools, str, None, lists); ``_SKIP`` otherwise."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return _SKIP
        v = v.item()
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)  # the store refuses NaN/Inf numbers
    if isinstance(v, tuple | list):
        out = [_json_safe(a) for a in v]
        return _SKIP if any(a is _SKIP for a in out) else out
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return _SKIP


def optimizer_meta(optimizer: Any, names: dict[int, str]) -> dict[str, Any]:
    """``{"class", "module", "groups": [{hyper-parameters..., "params": [names]}]}``.

    Every scalar / bool / tuple entry of each parameter group (``lr``, ``momentum``,
    ``dampening``, ``weight_decay``, ``nesterov``, ``betas``, ``eps``, ``amsgrad``, a
    scheduler's ``initial_lr``, ...) as JSON; ``params`` lists the recorded parameters
    of the group by name (``names``: ``id(parameter) -> name``).
    """
    groups = []
    for g in optimizer.param_groups:
        d: dict[str, Any] = {}
        for k, v in g.items():
            if k == "params":
                continue
            j = _json_safe(v)
            if j is not _SKIP:
                d[str(k)] = j
        d["params"] = [names[id(p)] for p in g["params"] if id(p) in names]
        groups.append(d)
    cls = type(optimizer)
    return {"class": cls.__name__, "module": cls.__module__, "groups": groups}


def _state_step(optimizer: Any, params: Sequence[torch.Tensor]) -> int | None:
    """The largest ``state[p]["step"]`` (Adam-like optimizers count their updates)."""
    steps = []
    for p in params:
        st = optimizer.state.get(p, {}) if hasattr(optimizer, "state") else {}
        s = st.get("step") if isinstance(st, dict) else None
        if s is not None:
            steps.append(int(s.item() if isinstance(s, torch.Tensor) else s))
    return max(steps) if steps else None


class StepCounter:
    """Counts ``optimizer.step()`` calls from construction on, plus the steps before.

    A step post-hook (``Optimizer.register_step_post_hook``, torch >= 2.0) adds one per
    completed step (a step a ``GradScaler`` skips is not counted: no update happened).
    The start is ``state[p]["step"]`` of Adam-like optimizers; optimizers that keep no
    count (SGD) start at 0, with a warning when their state shows earlier steps (momentum
    buffers). The hook holds this small object only, never the recorder; :meth:`remove`
    detaches it.
    """

    def __init__(self, optimizer: Any, params: Sequence[torch.Tensor]) -> None:
        start = _state_step(optimizer, params)
        if start is None:
            start = 0
            if any(optimizer.state.get(p) for p in params):
                warnings.warn(
                    f"torch Recorder: {type(optimizer).__name__} has already taken steps "
                    "(its state is not empty) but does not count them; the recorded "
                    "optimizer_step counts from 0 now. Build the Recorder before training, "
                    "or pass optimizer_step= to record()", UserWarning, stacklevel=4)
        self.count = int(start)
        hook = getattr(optimizer, "register_step_post_hook", None)
        if hook is None:
            raise AdapterError(
                f"torch Recorder: {type(optimizer).__name__} has no register_step_post_hook "
                "(torch >= 2.0 optimizers have it), so its steps cannot be counted; pass "
                "optimizer_step= to record() and leave optimizer= out, passing lr=")
        self._handle: Any = hook(self._hook)

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        """Stop counting (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
