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
            "running stats), which mix the samples of a batch. Call model.eval(), or pass "
            "train_batchnorm='batch' for gradients of each sample's loss under its batch's "
            f"statistics; supported: {SUPPORTED}"
        )
    drop = _active_dropout(model)
    if drop and dropout == "error":
        raise AdapterError(
            f"torch adapter: Dropout layers {drop} are in training mode (random). Call "
            "model.eval(), or pass dropout='different' (each sample its own mask, like a "
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
        if isinstance(a, torch.Tensor) and a.device != device:
            return a.to(device, non_blocking=True)
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
        self.route, self.randomness = _plan(model, train_batchnorm, dropout)
        self.chunk_size = chunk_size
        p0 = sel[0][1]
        self.device, self.dtype = p0.device, p0.dtype
        self.P = sum(math.prod(s) for s in self.shapes)
        self._checked_loss = False

    def state(self) -> tuple[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], ...]]:
        """(selected params, (other params, buffer copies)), all detached."""
        sel = set(self.names)
        params, rest = {}, {}
        for n, p in self.model.named_parameters():
            (params if n in sel else rest)[n] = p.detach()
        # copies: train-mode BatchNorm updates running stats in place; the model must not change
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return params, (rest, buffers)

    def _fail(self, e: Exception) -> AdapterError:
        hint = ""
        msg = str(e)
        if "random" in msg and "vmap" in msg:
            hint = " (a random operation in forward: pass dropout='different' or call eval())"
        elif ".item()" in msg or "data-dependent" in msg:
            hint = " (data-dependent Python control flow or .item() in forward/loss)"
        elif "setup_context" in msg:
            hint = " (a custom autograd.Function without setup_context/vmap support)"
        return AdapterError(
            f"torch adapter: torch.func could not compute per-sample gradients of "
            f"{type(self.model).__name__}{hint}: {type(e).__name__}: {msg.splitlines()[0]}; "
            f"supported: {SUPPORTED}"
        )

    def check_loss(self, x: Any, y: Any, frozen: tuple[dict[str, Any], ...],
                   params: dict[str, Any]) -> None:
        """``loss_fn`` must return one loss per sample (catches reduction='mean')."""
        if self._checked_loss:
            return
        n = _batch_len(x)
        m = min(n, 2)
        head = tree_map(lambda a: a[:m] if isinstance(a, torch.Tensor) else a, (x, y))
        try:
            with torch.no_grad():
                out = _call(self.model, (params, *frozen), head[0])
                loss = self.loss_fn(out, head[1])
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            raise self._fail(e) from e
        if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (m,):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise AdapterError(
                f"torch adapter: loss_fn returned {shape} for a batch of {m} samples; it must "
                f"return per-sample losses of shape ({m},), e.g. nn.CrossEntropyLoss("
                "reduction='none'); a mean-reduced loss would scale gradients by 1/batch. "
                f"Supported: {SUPPORTED}"
            )
        self._checked_loss = True

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


def _restricted(eng: _Engine, kw: dict[str, Any], names: set[str]) -> _Engine:
    """A vmap engine like ``eng`` (built with ``kw``) over the parameters in ``names`` only."""
    kw = dict(kw)
    base = kw.pop("param_filter")
    kw["param_filter"] = lambda n, p: n in names and (base is None or base(n, p))
    return _Engine(eng.model, eng.loss_fn, **kw)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
