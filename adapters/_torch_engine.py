"""The functional per-sample-gradient engine of the torch adapter (``adapters/torch.py``).

Owns what every torch route shares: which parameters are selected (:func:`_selected`), the
train-mode BatchNorm / Dropout policy (:func:`_plan`), the pytree helpers that move, call
and measure batches (``_to``, ``_call``, ``_batch_len``), and :class:`_Engine`, the
``vmap(grad)`` / batched-Jacobian computation of per-sample gradients for one model. The
public module, the recorder (``_torch_record.py``) and the Linear/Conv fast path
(``_torch_fast.py``) build on it; it imports no other adapter module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from gsnr_stats.errors import AdapterError

SUPPORTED = (
    "any torch.nn.Module whose forward uses operators that torch.func.vmap and grad support, "
    "one sample independent of the others: Linear, Bilinear, Conv1d/2d/3d, ConvTranspose, "
    "Embedding (sparse=False), LSTM, MultiheadAttention/Transformer layers, LayerNorm, "
    "GroupNorm, BatchNorm in eval mode with running statistics, pooling, activations, "
    "Flatten, Dropout in eval mode; train-mode BatchNorm with train_batchnorm='batch', "
    "train-mode Dropout with dropout='different'. loss_fn(outputs, targets) must return "
    "per-sample losses of shape (n,) (reduction='none')"
)

ParamFilter = Callable[[str, nn.Parameter], bool]


# --------------------------------------------------------------------------------------
# Parameter selection
# --------------------------------------------------------------------------------------


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise AdapterError(
            f"torch adapter: expected a torch.nn.Module, got {type(model).__name__}; "
            f"supported: {SUPPORTED}"
        )


def _selected(
    model: nn.Module, include_frozen: bool, param_filter: ParamFilter | None
) -> list[tuple[str, nn.Parameter]]:
    _check_module(model)
    out = []
    for name, p in model.named_parameters():
        if not include_frozen and not p.requires_grad:
            continue
        if param_filter is not None and not param_filter(name, p):
            continue
        if not p.is_floating_point():
            continue
        out.append((name, p))
    if not out:
        raise AdapterError(
            f"torch adapter: {type(model).__name__} has no selected floating-point parameters "
            "(frozen ones are excluded unless include_frozen=True; check param_filter); "
            f"supported: {SUPPORTED}"
        )
    return out


# --------------------------------------------------------------------------------------
# Modes: BatchNorm / Dropout
# --------------------------------------------------------------------------------------


def _mixing_batchnorm(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # in eval mode without running stats, BatchNorm still uses batch statistics
            if m.training or m.running_mean is None:
                out.append(name or type(m).__name__)
    return out


def _active_dropout(model: nn.Module) -> list[str]:
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]


def _unsupported_layers(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse:
            out.append(f"{name or type(m).__name__} (sparse=True embedding)")
        elif isinstance(m, nn.RNN | nn.GRU):
            out.append(f"{name or type(m).__name__} ({type(m).__name__}: no vmap support)")
    return out


def _plan(model: nn.Module, train_batchnorm: str, dropout: str) -> tuple[str, str]:
    """Validate modes; returns (route, randomness)."""
    if train_batchnorm not in ("error", "batch"):
        raise AdapterError(f"train_batchnorm must be 'error' or 'batch', got {train_batchnorm!r}")
    if dropout not in ("error", "different", "same"):
        raise AdapterError(f"dropout must be 'error', 'different' or 'same', got {dropout!r}")
    bad = _unsupported_layers(model)
    if bad:
        raise AdapterError(
            f"torch adapter: {type(model).__name__} contains layers without per-sample "
            f"gradient support: {', '.join(bad)}; supported: {SUPPORTED}"
        )
    bn = _mixing_batchnorm(model)
    if bn and train_batchnorm == "error":
        raise AdapterError(
            f"torch adapter: BatchNorm layers {bn} use batch statistics (training mode or no "
            "running stats), which mix the samples of a batch. Call model.eval() (a Recorder "
            "with mode='eval', its default, does so for each record), or pass "
            "train_batchnorm='batch' for gradients of each sample's loss under its batch's "
            f"statistics; supported: {SUPPORTED}"
        )
    drop = _active_dropout(model)
    if drop and dropout == "error":
        raise AdapterError(
            f"torch adapter: Dropout layers {drop} are in training mode (random). Call "
            "model.eval() (a Recorder with mode='eval' does so for each record), or pass "
            "dropout='different' (each sample its own mask, like a "
            f"training step); supported: {SUPPORTED}"
        )
    return ("batch" if bn else "vmap"), ("error" if not drop else dropout)


# --------------------------------------------------------------------------------------
# Core computation
# --------------------------------------------------------------------------------------


def _unsqueeze(t: Any) -> Any:
    return tree_map(lambda a: a.unsqueeze(0) if isinstance(a, torch.Tensor) else a, t)


def _to(t: Any, device: torch.device) -> Any:
    def move(a: Any) -> Any:
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a)
        if isinstance(a, torch.Tensor):
            if a.device != device:
                a = a.to(device, non_blocking=True)
            if a.is_inference():  # made under a caller's inference_mode: autograd refuses it
                a = a.clone()
        return a

    return tree_map(move, t)


def _batch_len(x: Any) -> int:
    leaves = [a for a in _leaves(x) if isinstance(a, torch.Tensor | np.ndarray)]
    if not leaves:
        raise AdapterError("inputs contain no tensor; supported: a tensor or a tuple of tensors")
    return int(leaves[0].shape[0])


def _leaves(x: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(x)


def _call(model: nn.Module, state: tuple[dict[str, Any], ...], x: Any) -> Any:
    if isinstance(x, tuple):
        return functional_call(model, state, x)
    if isinstance(x, dict):  # keyword inputs, e.g. model(input_ids=..., attention_mask=...)
        return functional_call(model, state, (), x)
    return functional_call(model, state, (x,))


class _Engine:
    """Everything fixed for one model: selected names, route, frozen state, the vmapped fn."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        include_frozen: bool,
        param_filter: ParamFilter | None,
        chunk_size: int | None,
        train_batchnorm: str,
        dropout: str,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        sel = _selected(model, include_frozen, param_filter)
        self.names = [n for n, _ in sel]
        self.shapes = [tuple(p.shape) for _, p in sel]
        self._policy = (train_batchnorm, dropout)
        self.route, self.randomness = _plan(model, train_batchnorm, dropout)
        self.chunk_size = chunk_size
        p0 = sel[0][1]
        self.device, self.dtype = p0.device, p0.dtype
        self.P = sum(math.prod(s) for s in self.shapes)
        self._checked_loss = False

    def replan(self) -> bool:
        """Re-check the model's modes (they change in a training loop); True if the route
        or randomness changed. Raises :class:`AdapterError` for a mode the policy refuses."""
        plan = _plan(self.model, *self._policy)
        changed = plan != (self.route, self.randomness)
        self.route, self.randomness = plan
        return changed

    def state(self) -> tuple[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], ...]]:
        """(selected params, (other params, buffer copies)), all detached."""
        sel = set(self.names)
        params, rest = {}, {}
        for n, p in self.model.named_parameters():
            (params if n in sel else rest)[n] = p.detach()
        # copies: train-mode BatchNorm updates running stats in place; the model must not change
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return params, (rest, buffers)

    def _fail(self, e: Exception, what: str = "per-sample gradients") -> AdapterError:
        return fail(e, self.model, self.device, what)

    def check_loss(self, x: Any, y: Any, frozen: tuple[dict[str, Any], ...],
                   params: dict[str, Any]) -> None:
        """On the first batch: ``loss_fn`` must return one loss per sample (catches
        ``reduction='mean'``), and forward and loss must run (errors say which failed)."""
        if self._checked_loss:
            return
        n = _batch_len(x)
        m = min(n, 2)  # two samples: a mean over them is () and cannot pass for (m,)
        head = tree_map(lambda a: a[:m] if isinstance(a, torch.Tensor) else a, (x, y))
        try:
            with torch.no_grad():
                out = _call(self.model, (params, *frozen), head[0])
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as e:
            raise self._fail(e, "the forward pass") from e
        try:
            with torch.no_grad():
                loss = self.loss_fn(out, head[1])
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as e:
            hint = _hint(str(e), self.device) if "device" in str(e) else (
                " Check the targets' shape/dtype, or pass unpack= if the batch is not "
                "(inputs, targets)")
            raise AdapterError(
                f"torch adapter: loss_fn(outputs, targets) failed on the first batch with "
                f"outputs {_shape_of(out)} and targets {_shape_of(head[1])} ({m} samples): "
                f"{type(e).__name__}: {str(e).splitlines()[0]}. loss_fn takes the model's "
                f"outputs and the batch's targets and returns per-sample losses of shape (n,)."
                f"{hint}") from e
        check_loss_shape(loss, m, n)
        self._checked_loss = True

    def check_first(self, x: Any, y: Any) -> None:
        """:meth:`check_loss` on a whole (first) batch, before any route touches it."""
        if not self._checked_loss:
            params, frozen = self.state()
            self.check_loss(_to(x, self.device), _to(y, self.device), frozen, params)

    def compute(self, x: Any, y: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients ``{name: (n, *shape)}`` and losses ``(n,)`` on the device."""
        x, y = _to(x, self.device), _to(y, self.device)
        params, frozen = self.state()
        self.check_loss(x, y, frozen, params)
        model, loss_fn = self.model, self.loss_fn
        try:
            if self.route == "vmap":

                def one(p: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
                    out = _call(model, (p, *frozen), _unsqueeze(xi))
                    return loss_fn(out, _unsqueeze(yi)).sum()

                f = vmap(grad_and_value(one), in_dims=(None, 0, 0),
                         randomness=self.randomness, chunk_size=self.chunk_size)
                grads, losses = f(params, x, y)
            else:  # rows of the Jacobian of the (n,) loss vector, batch statistics shared

                # plain autograd (BatchNorm updates its buffer copies in place, which
                # torch.func transforms refuse); batched backward over one-hot cotangents
                leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                with torch.enable_grad():
                    losses = loss_fn(_call(model, (leaves, *frozen), x), y)
                    n = losses.shape[0]
                    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
                    step = self.chunk_size or n
                    parts = []
                    for s in range(0, n, step):
                        parts.append(torch.autograd.grad(
                            losses, list(leaves.values()), grad_outputs=eye[s:s + step],
                            is_grads_batched=True, retain_graph=s + step < n,
                            allow_unused=True))
                sizes = [min(step, n - s) for s in range(0, n, step)]
                grads = {
                    k: torch.cat([pt[j] if pt[j] is not None
                                  else torch.zeros((m, *leaves[k].shape),
                                                   dtype=self.dtype, device=self.device)
                                  for pt, m in zip(parts, sizes, strict=True)])
                    for j, k in enumerate(leaves)
                }
                losses = losses.detach()
        except (RuntimeError, NotImplementedError, ValueError) as e:
            raise self._fail(e) from e
        return grads, losses

    def flatten(self, grads: dict[str, torch.Tensor], out: torch.Tensor | None = None
                ) -> torch.Tensor:
        n = next(iter(grads.values())).shape[0]
        parts = [grads[k].reshape(n, -1) for k in self.names]
        if out is None:
            return torch.cat(parts, dim=1)
        return torch.cat(parts, dim=1, out=out)


def _shape_of(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    leaves = [a for a in _leaves(t) if isinstance(a, torch.Tensor)]
    return f"{type(t).__name__} of {[tuple(a.shape) for a in leaves][:4]}"


def check_loss_shape(loss: Any, m: int, n: int) -> None:
    """``loss`` (computed for ``m`` samples of a first batch of ``n``) must be ``(m,)``."""
    if isinstance(loss, torch.Tensor) and tuple(loss.shape) == (m,):
        return
    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
    of = f"the first {m} samples of the first batch ({n} samples)" if m < n else \
        f"the first batch ({n} samples)"
    hint = ("a scalar: the loss is mean- or sum-reduced; use reduction='none', e.g. "
            "nn.CrossEntropyLoss(reduction='none')") if shape == () else (
            "reduce the other dimensions per sample, e.g. loss.reshape(n, -1).mean(1)")
    raise AdapterError(
        f"torch adapter: loss_fn returned shape {shape} for {of}; it must return "
        f"per-sample losses of shape ({m},) here: loss_fn(outputs, targets) returns shape "
        f"(n,), one loss per sample, not reduced over the batch (a mean would scale every "
        f"gradient by 1/n). It returned {hint}. Supported: {SUPPORTED}")


def fail(e: Exception, model: nn.Module, device: torch.device,
         what: str = "per-sample gradients") -> AdapterError:
    """A torch error of computing ``what`` as an :class:`AdapterError` that says what to do."""
    msg = str(e)
    return AdapterError(
        f"torch adapter: could not compute {what} of {type(model).__name__}"
        f"{_hint(msg, device)}: {type(e).__name__}: {msg.splitlines()[0] if msg else ''}; "
        f"supported: {SUPPORTED}"
    )


def _hint(msg: str, device: torch.device) -> str:
    """What to do about a foreseeable torch error message (empty if none is known)."""
    hint = ""
    if "captured" in msg and ("in-place" in msg or "inplace" in msg):
        hint = (" (the forward changes a tensor in place, e.g. a train-mode BatchNorm "
                "updating its running statistics or a module writing to a buffer; record "
                "with mode='eval' (the default), or pass train_batchnorm='batch' for "
                "train-mode BatchNorm)")
    elif "Inference tensors" in msg or "inference tensor" in msg:
        hint = (" (tensors created under torch.inference_mode() cannot get gradients: call "
                "record() outside torch.inference_mode(), and build or load the model "
                "outside it)")
    elif "does not require grad" in msg:
        hint = (" (no gradient reaches the loss: forward or loss_fn detaches its result "
                "(.detach(), torch.no_grad() inside forward), or the recorded parameters "
                "were set requires_grad=False after the Recorder was built; record() itself "
                "turns gradients on, also under torch.no_grad()/inference_mode())")
    elif "same device" in msg or "expected device" in msg or (
            "device" in msg and "Expected" in msg):
        hint = (f" (tensors on different devices: inputs and targets are moved to the "
                f"parameters' device {device}; keep the whole model and any tensor held by "
                "loss_fn, e.g. a class weight, on that device)")
    elif "random" in msg and "vmap" in msg:
        hint = " (a random operation in forward: pass dropout='different' or call eval())"
    elif ".item()" in msg or "data-dependent" in msg:
        hint = " (data-dependent Python control flow or .item() in forward/loss)"
    elif "setup_context" in msg:
        hint = " (a custom autograd.Function without setup_context/vmap support)"
    elif "shape" in msg or "size" in msg:
        hint = (" (a shape mismatch: check that each batch is (inputs, targets) with the "
                "batch in the first dimension, or pass unpack=)")
    return hint


def _restricted(eng: _Engine, kw: dict[str, Any], names: set[str]) -> _Engine:
    """A vmap engine like ``eng`` (built with ``kw``) over the parameters in ``names`` only."""
    kw = dict(kw)
    base = kw.pop("param_filter")
    kw["param_filter"] = lambda n, p: n in names and (base is None or base(n, p))
    return _Engine(eng.model, eng.loss_fn, **kw)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
