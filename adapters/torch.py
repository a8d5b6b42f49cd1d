"""PyTorch adapter: per-sample gradients of any ``nn.Module`` with ``torch.func``.

.. math:: g_i = \\nabla_\\theta\\, \\ell\\big(y_i, f(x_i; \\theta)\\big) \\in \\mathbb{R}^P

the gradient of each sample's *own* loss (never scaled by ``1/batch``), computed as
``vmap(grad(loss_i))`` over the batch with ``torch.func.functional_call``, flattened in the
order of ``model.named_parameters()`` (frozen parameters excluded by default).

The :class:`Recorder` (and ``per_sample_gradients(fast=True)``) computes the gradients of
``nn.Linear``/``nn.Conv1d``/``2d``/``3d`` layers instead from the layer inputs :math:`a_i`
and output gradients :math:`\\delta_i` of one ordinary backward of :math:`\\sum_i \\ell_i`,
:math:`g_i = \\delta_i a_i^\\top` (a grouped convolution for ``Conv``), written straight into
the writer's chunk-aligned buffer; every other parameter still goes through ``vmap``. Each
such layer is checked against ``vmap`` on the first batch and left to ``vmap`` if they
disagree (``adapters/_torch_fast.py``). Both routes agree to float32 rounding.

Entry points
------------
:func:`layout`                ``[(name, shape), ...]`` for ``GradientWriter``
:func:`per_sample_gradients`  ``(n, P)`` numpy array (and per-sample losses on request)
:class:`Recorder` / :func:`record`  write records ``(step, split)`` batch by batch from a
                              ``DataLoader``; host copies and HDF5 writes overlap computing
:func:`open_writer`           a ``GradientWriter`` with this model's layout and provenance
:func:`mean_loss`, :func:`record_trajectory`  loss trajectories around real optimizer steps
:func:`probe_osgr`            the OSGR probe (virtual steps on disjoint draws)

Train-mode layers. BatchNorm in training mode (or without running statistics) mixes the
samples of a batch, and so has no per-sample gradient in the usual sense; Dropout in
training mode is random. Both are refused with :class:`~gsnr_stats.errors.AdapterError`
unless you opt in:

* ``train_batchnorm="batch"``: :math:`g_i = \\nabla_\\theta \\ell_i(\\theta; B)` where the
  BatchNorm statistics come from the whole batch ``B`` (and are differentiated through), so
  that :math:`\\sum_i g_i` is the gradient of the summed batch loss. Computed as rows of the
  Jacobian of the ``(n,)`` loss vector (one vmapped backward per sample); results depend on
  the batch composition. Running statistics are never updated.
* ``dropout="different"``: every sample draws its own dropout mask (``vmap(...,
  randomness="different")``), like an ordinary training forward pass; ``"same"`` shares one
  mask across the batch. Results are random; the recorded loss uses the same masks.
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
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import (
    AsyncWriter,
    BufferPool,
    ProbeResult,
    RecordSummary,
    abort_record,
    as_float,
    check_layout_matches,
    iter_data,
    limited_batches,
    progress_bar,
    run_probe,
    split_batch,
)
from ._moments import JLProjection, ParamSubset

__all__ = [
    "SUPPORTED",
    "JLProjection",
    "ParamSubset",
    "ProbeResult",
    "RecordSummary",
    "Recorder",
    "layout",
    "mean_loss",
    "open_writer",
    "per_sample_gradients",
    "probe_osgr",
    "record",
    "record_trajectory",
]

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
# Parameters and layout
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


def layout(
    model: nn.Module,
    *,
    include_frozen: bool = False,
    param_filter: ParamFilter | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter layout of ``model``: ``[(name, shape), ...]`` in flat order.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; names come from ``model.named_parameters()``.
    include_frozen : bool
        Include parameters with ``requires_grad=False`` (excluded by default).
    param_filter : callable (name, parameter) -> bool, optional
        Keep only the parameters for which it returns True.

    Returns
    -------
    list of (str, tuple of int)
        What ``GradientWriter(path, params=...)`` takes; the columns of
        :func:`per_sample_gradients` follow this order.
    """
    return [(n, tuple(p.shape)) for n, p in _selected(model, include_frozen, param_filter)]


def open_writer(
    path: Any,
    model: nn.Module,
    *,
    include_frozen: bool = False,
    param_filter: ParamFilter | None = None,
    attrs: dict[str, Any] | None = None,
    params_subset: Any = None,
    project: Any = None,
    seed: int = 0,
    **writer_kwargs: Any,
) -> Any:
    """A ``gsnr_stats.GradientWriter`` for ``model``'s layout with torch provenance attrs.

    ``writer_kwargs`` go to ``GradientWriter`` (``dtype``, ``chunks``, ``compression``,
    ``overwrite``, ...). With ``params_subset``/``project``/``seed`` (as in
    :class:`Recorder`) the writer gets the subsampled or projected layout, and the chosen
    indices / projection seed are stored in its user attributes (``docs/format.md``).
    """
    import gsnr_stats as gs

    a = {"framework": "torch", "framework_version": torch.__version__,
         "model": type(model).__name__}
    a.update(attrs or {})
    lay = layout(model, include_frozen=include_frozen, param_filter=param_filter)
    tf = _moments.make_transform(lay, params_subset, project, seed)
    return gs.GradientWriter(path, tf.layout, attrs=_moments.writer_attrs(tf, a),
                             **writer_kwargs)


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


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    chunk_size: int | None = None,
    include_frozen: bool = False,
    param_filter: ParamFilter | None = None,
    train_batchnorm: str = "error",
    dropout: str = "error",
    return_loss: bool = False,
    fast: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients of each sample's own loss, as an ``(n, P)`` array.

    .. math:: G_{i,:} = \\nabla_\\theta\\, \\ell_i(\\theta), \\qquad
              \\ell_i = \\texttt{loss\\_fn}(f(x_i;\\theta), y_i)

    Not scaled by ``1/n``: :math:`\\sum_i G_{i,:}` is the gradient of the *summed* loss.

    Parameters
    ----------
    model : torch.nn.Module
        Any module (CPU or CUDA); the parameters are read, never modified.
    loss_fn : callable (outputs, targets) -> Tensor (n,)
        Per-sample losses, ``reduction="none"`` style. A scalar (mean-reduced) loss is
        refused because it would scale gradients by ``1/n``.
    inputs : Tensor, tuple of Tensors or dict of Tensors
        Batch of ``n`` inputs (a tuple is passed as positional arguments to ``forward``, a
        dict as keyword arguments); moved to the model's device.
    targets : Tensor (or pytree of Tensors)
        Batch of ``n`` targets.
    chunk_size : int, optional
        Samples per vmap chunk; bounds peak memory (default: the whole batch at once).
    include_frozen : bool
        Include parameters with ``requires_grad=False``.
    param_filter : callable (name, parameter) -> bool, optional
        Keep only the parameters for which it returns True.
    train_batchnorm : {"error", "batch"}
        Policy for BatchNorm that uses batch statistics (see module docstring).
    dropout : {"error", "different", "same"}
        Policy for Dropout in training mode (see module docstring).
    return_loss : bool
        Also return the ``(n,)`` per-sample losses (float64).
    fast : bool
        Compute ``nn.Linear``/``nn.Conv1d``/``2d``/``3d`` gradients from one ordinary
        backward, :math:`g_i = \\delta_i a_i^\\top` (as :class:`Recorder` does by default;
        several times faster than ``vmap`` for MLPs), the rest with ``vmap``. Default False:
        this function is the plain ``torch.func`` route, the reference the recorder is
        tested against. Ignored with train-mode BatchNorm or Dropout.
    out : ndarray (n, P), optional
        Write the gradients into this array (dtype of the parameters; rows may be strided,
        e.g. ``GradientWriter.alloc_rows``) and return it. In a loop this saves faulting in
        ``n x P`` fresh pages per call, which costs as much as computing an MLP's gradients.

    Returns
    -------
    ndarray, shape (n, P)
        In :func:`layout` order, dtype of the parameters (float32 usually); with
        ``return_loss``, ``(gradients, losses)``.

    Raises
    ------
    AdapterError
        Not a module, unsupported layers or modes, loss not per-sample, or a forward that
        ``torch.func`` cannot transform; the message lists what is supported.
    """
    kw = {"include_frozen": include_frozen, "param_filter": param_filter,
          "chunk_size": chunk_size, "train_batchnorm": train_batchnorm, "dropout": dropout}
    eng = _Engine(model, loss_fn, **kw)
    n = _batch_len(inputs)
    dest = None
    if out is not None:
        if (not isinstance(out, np.ndarray) or out.shape != (n, eng.P)
                or out.dtype != torch.empty(0, dtype=eng.dtype).numpy().dtype):
            raise AdapterError(
                f"torch per_sample_gradients: out must be an ndarray of shape {(n, eng.P)} "
                f"and the parameters' dtype {eng.dtype}, got "
                f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}")
        dest = torch.from_numpy(out)
    on_host = dest is not None and eng.device.type == "cpu"
    if fast and eng.route == "vmap" and eng.randomness == "error":
        from ._torch_fast import FastPath

        flat = dest if on_host else torch.empty((n, eng.P), dtype=eng.dtype, device=eng.device)
        losses = FastPath(eng, lambda names: _restricted(eng, kw, names)).grads_into(
            inputs, targets, n, flat)
    else:
        grads, losses = eng.compute(inputs, targets)
        flat = eng.flatten(grads, out=dest if on_host else None)
        del grads
    if dest is not None:
        if not on_host:
            dest.copy_(flat)
        G = out
    else:
        G = _to_numpy(flat)
    if return_loss:
        return G, _to_numpy(losses).astype(np.float64)
    return G


# --------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------


def _labels(y: Any, n: int) -> np.ndarray | None:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if isinstance(y, torch.Tensor) and y.ndim == 1 and y.shape[0] == n and not y.is_complex():
        return y.detach().reshape(n).to("cpu", torch.float64).numpy()
    return None


def _current_lr(optimizer: Any) -> float:
    if optimizer is None:
        return math.nan
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    return float(optimizer.param_groups[0]["lr"]) if len(lrs) >= 1 else math.nan


def _limited(batches: Iterable[Any], max_samples: int | None,
             where: str) -> Iterator[tuple[Any, Any, Any, int]]:
    """``(x, y, sample_id, n)`` of each non-empty batch, the last cut at ``max_samples``."""

    def cut(x: Any, y: Any, sid: Any, n: int) -> tuple[Any, Any, Any]:
        return tree_map(lambda a: a[:n] if isinstance(a, torch.Tensor | np.ndarray) else a,
                        (x, y, sid))

    return limited_batches(batches, max_samples, where, _batch_len, cut)


class Recorder:
    """Write per-sample gradient records of a model, batch by batch, into a ``GradientWriter``.

    Writing overlaps computing: each batch's gradients are flattened into one of a few
    reusable host buffers (pinned memory for CUDA, copied on a side stream), and a
    background thread writes them while the next batch is computed.

    Parameters
    ----------
    writer : GradientWriter
        Open writer whose layout is :func:`layout` of the model (same filter).
    model, loss_fn :
        As in :func:`per_sample_gradients`.
    optimizer : torch.optim.Optimizer, optional
        When given, the learning rate of its first parameter group is stored with each
        record (unless ``lr`` is passed to :meth:`record`).
    chunk_size, include_frozen, param_filter, train_batchnorm, dropout :
        As in :func:`per_sample_gradients`.
    progress : bool or dict
        Show a tqdm progress bar (a dict is passed to tqdm as keyword arguments).
    max_pending : int
        Batches queued for the writer thread; 0 writes synchronously.
    store_labels : bool
        Store 1-D targets (class labels, scalar regression targets) as labels.
    keep : {"grads", "moments"}
        ``"moments"``: store per-parameter ``(count, mean, M2)`` blocks (float64) instead of
        per-sample gradients -- O(P) per block, for models too big to dump. Each block is a
        jackknife block of ``reduce(..., blocks=K)``. Per-sample losses are not stored
        (``RecordSummary.mean_loss`` has their mean).
    fast : bool, optional
        Default True. ``nn.Linear``/``nn.Conv1d``/``2d``/``3d`` gradients come from the
        layer inputs :math:`a` and output gradients :math:`\\delta` of one ordinary backward
        instead of ``vmap``: with ``keep="grads"`` the per-sample :math:`g_i = \\delta_i
        a_i^\\top` is written straight into the writer's buffer (a grouped convolution for
        ``Conv``); with ``keep="moments"``, :math:`\\sum_i g_i = \\delta^\\top a`,
        :math:`\\sum_i g_i^2 = (\\delta^2)^\\top a^2` in float64 for ``Linear`` (see
        ``_torch_fast.py``). Other parameters use ``vmap``; each fast layer is checked
        against ``vmap`` on the first batch. Not used with ``params_subset``/``project`` on
        full dumps, ``project`` on moments, train-mode BatchNorm or Dropout (everything goes
        through ``vmap`` then). ``fast=False`` is the plain ``vmap`` route.
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
        self.writer = writer
        self.optimizer = optimizer
        self.progress = progress
        self.max_pending = int(max_pending)
        self.store_labels = store_labels
        self._eng = _Engine(model, loss_fn, include_frozen=include_frozen,
                            param_filter=param_filter, chunk_size=chunk_size,
                            train_batchnorm=train_batchnorm, dropout=dropout)
        # keep="moments", params_subset, project: see _record_small and adapters/_moments.py
        self._keep = _moments.check_keep(keep, "torch Recorder")
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
        self._cuda = self._eng.device.type == "cuda"
        self._buffers: BufferPool | None = None
        self._host: dict[int, np.ndarray] = {}  # data_ptr -> writer.alloc_rows buffer
        self._rows = 0
        self._copy_stream = torch.cuda.Stream(self._eng.device) if self._cuda else None

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
            from ._torch_fast import FastPath

            self._fast = FastPath(self._eng, self._sub_engine)
        return self._fast

    def _record_small(self, data: Any, step: int, split: str, *, batch_size: int | None,
                      lr: float | None, epoch: float | None, max_samples: int | None
                      ) -> RecordSummary:
        """:meth:`record` for ``keep="moments"`` and/or ``params_subset``/``project``.

        Per batch: moments from the Linear/Conv fast path (``adapters/_torch_fast.py``) or
        per-sample gradients from ``vmap``, then the subset / projection
        (``adapters/_moments.py``), then either a moments block (Chan-merged, float64) or the
        transformed rows, written synchronously.
        """
        eng, tf = self._eng, self._tf
        where = "torch Recorder.record"
        batches, total = iter_data(data, batch_size, where)
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        lr_v = as_float(lr) if lr is not None else _current_lr(self.optimizer)
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
            for x, y, sid, n in _limited(batches, max_samples, where):
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
                mom.finish()
            else:
                self.writer.end_record(step, split)
        except BaseException:
            if pending is not None:  # let the worker finish before marking the record aborted
                with contextlib.suppress(BaseException):
                    pending.result()
            abort_record(self.writer, step, split)
            raise
        finally:
            bg.shutdown(wait=True)
            bar.close()
        return RecordSummary(int(step), split, seen, loss_sum / seen, lr_v, ep)

    def _pool(self, rows: int) -> BufferPool:
        P, dtype = self._eng.P, self._eng.dtype
        alloc = getattr(self.writer, "alloc_rows", None)
        self._host.clear()  # the old pool's buffers live on only in queued writes
        same = dtype == torch.float32 and getattr(self.writer, "dtype", None) == np.float32

        def make() -> torch.Tensor:
            if alloc is not None and same and not self._cuda:
                # rows laid out as the store's chunks: written without a copy (store.py)
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
    ) -> RecordSummary:
        """Compute and write the record ``(step, split)`` from ``data``; complete it.

        Parameters
        ----------
        data : DataLoader, iterable of batches, or tuple of arrays
            Batches ``(inputs, targets)`` or ``(inputs, targets, sample_id)``. With
            ``batch_size``, a tuple ``(inputs, targets[, sample_id])`` of tensors/arrays that
            is sliced into batches.
        step, split : int, str
            The record's key.
        batch_size : int, optional
            See ``data``.
        lr, epoch : float, optional
            Stored with the record; ``lr`` defaults to the optimizer's.
        max_samples : int, optional
            Stop after this many samples (the last batch is truncated).

        Returns
        -------
        RecordSummary
        """
        if self._keep == "moments" or self._tf.active:
            return self._record_small(data, step, split, batch_size=batch_size, lr=lr,
                                      epoch=epoch, max_samples=max_samples)
        eng = self._eng
        batches, total = iter_data(data, batch_size, "torch Recorder.record")
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        lr_v = as_float(lr) if lr is not None else _current_lr(self.optimizer)
        ep = as_float(epoch)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        seen = 0
        loss_sum: Any = 0.0  # a device tensor once batches arrive: no sync per batch
        aw = AsyncWriter(self.writer, self.max_pending)
        fast = self._fast_path() if self._uses_fast() else None
        try:
            with aw:
                for x, y, sid, n in _limited(batches, max_samples, "torch Recorder.record"):
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
                aw.end_record(step, split)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        return RecordSummary(int(step), split, seen, float(loss_sum) / seen, lr_v, ep)


def record(
    writer: Any,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Iterable[Any] | Sequence[Any],
    step: int,
    split: str,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    epoch: float | None = None,
    max_samples: int | None = None,
    **recorder_kwargs: Any,
) -> RecordSummary:
    """One record ``(step, split)`` through a fresh :class:`Recorder` (see there)."""
    return Recorder(writer, model, loss_fn, **recorder_kwargs).record(
        data, step, split, batch_size=batch_size, lr=lr, epoch=epoch, max_samples=max_samples)


# --------------------------------------------------------------------------------------
# Loss trajectories and the OSGR probe
# --------------------------------------------------------------------------------------


def _eval_losses(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 state: tuple[dict[str, Any], ...], x: Any, y: Any) -> torch.Tensor:
    with torch.no_grad():
        out = _call(model, state, x)
        loss = loss_fn(out, y)
    n = _batch_len(x)
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (n,):
        raise AdapterError(
            f"torch adapter: loss_fn must return per-sample losses of shape ({n},), got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}; "
            f"supported: {SUPPORTED}"
        )
    return loss


def _eval_state(model: nn.Module) -> tuple[dict[str, Any], ...]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return params, buffers


def mean_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Iterable[Any] | Sequence[Any],
    *,
    batch_size: int | None = None,
) -> float:
    """Mean per-sample loss :math:`\\frac{1}{N}\\sum_i \\ell_i(\\theta)` over ``data``.

    Runs without gradients on copies of the buffers (running statistics never change); the
    model's train/eval mode is used as is. ``data`` as in :meth:`Recorder.record`.
    """
    _check_module(model)
    device = next(model.parameters()).device
    state = _eval_state(model)
    batches, _ = iter_data(data, batch_size, "torch mean_loss")
    total, count = 0.0, 0
    for batch in batches:
        x, y, _ = split_batch(batch, "torch mean_loss")
        x, y = _to(x, device), _to(y, device)
        loss = _eval_losses(model, loss_fn, state, x, y)
        total += float(loss.double().sum())
        count += loss.shape[0]
    if count == 0:
        raise AdapterError("torch mean_loss: data has no samples")
    return total / count


def record_trajectory(
    writer: Any,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    train_data: Iterable[Any] | Sequence[Any],
    test_data: Iterable[Any] | Sequence[Any],
    *,
    step: int,
    lr: float | None = None,
    optimizer: Any = None,
    epoch: float = math.nan,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Write one loss-trajectory row: mean train and test loss at :math:`\\theta_t`.

    Call it before each real optimizer step ``t`` (and once after the last): the stored
    rows give the trajectory OSGR of DESIGN.md,

    .. math:: R_t = \\frac{L_{test}(\\theta_t) - L_{test}(\\theta_{t+1})}
                         {L_{train}(\\theta_t) - L_{train}(\\theta_{t+1})}.

    ``lr`` (default: the optimizer's first group) is the rate of the step *from* θ_t.

    Returns
    -------
    (float, float)
        Mean train loss and mean test loss.
    """
    tr = mean_loss(model, loss_fn, train_data, batch_size=batch_size)
    te = mean_loss(model, loss_fn, test_data, batch_size=batch_size)
    lr_v = as_float(lr) if lr is not None else _current_lr(optimizer)
    writer.write_trajectory(int(step), lr_v, tr, te, epoch=float(epoch))
    return tr, te


def probe_osgr(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    pool_a: Sequence[Any],
    pool_b: Sequence[Any],
    *,
    n: int,
    lr: float,
    K: int = 16,
    step: int = 0,
    writer: Any = None,
    seed: int | np.random.Generator | None = 0,
    include_frozen: bool = False,
    param_filter: ParamFilter | None = None,
    train_batchnorm: str = "error",
    dropout: str = "error",
) -> ProbeResult:
    """Measure the one-step generalization ratio by virtual gradient steps.

    For :math:`k = 1..K`, draw :math:`D_k` (``n`` samples of pool A) and :math:`D'_k`
    (``n`` samples of the disjoint pool B), take :math:`\\theta' = \\theta - \\lambda
    \\nabla L[D_k]` with :math:`L[D] = \\frac{1}{|D|}\\sum_{i \\in D} \\ell_i`, and evaluate

    .. math:: R = \\frac{\\sum_k L_{D'_k}(\\theta) - L_{D'_k}(\\theta')}
                        {\\sum_k L_{D_k}(\\theta) - L_{D_k}(\\theta')}

    (``ProbeResult.ratio``). As :math:`\\lambda \\to 0` it approaches the theoretical
    ``R(n)`` of Liu et al. (eq. 19). The model (parameters, buffers, ``.grad``) is left
    unchanged; only the selected parameters move in the virtual step.

    Parameters
    ----------
    model, loss_fn :
        As in :func:`per_sample_gradients`.
    pool_a, pool_b : (inputs, targets)
        Two disjoint pools of the same distribution (tensors with one row per sample).
    n : int
        Size of each draw (without replacement), at most each pool's size.
    lr : float
        Virtual learning rate :math:`\\lambda`.
    K : int
        Number of draws.
    step : int
        Checkpoint label for the written rows.
    writer : GradientWriter, optional
        Receives ``K`` rows ``write_probe(step, n, lr, k, train_before, train_after,
        test_before, test_after)``.
    seed : int or numpy Generator, optional
        Randomness of the draws.
    include_frozen, param_filter, train_batchnorm, dropout :
        As in :func:`per_sample_gradients`; ``train_batchnorm='batch'`` evaluates
        BatchNorm with the statistics of each evaluated set.

    Returns
    -------
    ProbeResult
        Arrays ``k, train_before, train_after, test_before, test_after`` and ``.ratio``.
    """
    sel = _selected(model, include_frozen, param_filter)
    _plan(model, train_batchnorm, dropout)
    device = sel[0][1].device
    names = [nm for nm, _ in sel]
    (xa, ya), (xb, yb) = (tuple(_to(t, device) for t in pool[:2]) for pool in (pool_a, pool_b))
    base, buffers = _eval_state(model)
    theta = {k: base[k] for k in names}
    rest = {k: v for k, v in base.items() if k not in theta}

    def take(t: Any, idx: torch.Tensor) -> Any:
        return tree_map(lambda a: a[idx] if isinstance(a, torch.Tensor) else a, t)

    pools = {"a": (xa, ya), "b": (xb, yb)}

    def mean_at(th: dict[str, torch.Tensor], which: str, idx: np.ndarray) -> float:
        x, y = pools[which]
        i = torch.as_tensor(idx, device=device)
        loss = _eval_losses(model, loss_fn, (th, rest, buffers), take(x, i), take(y, i))
        return float(loss.double().mean())

    def virtual(idx: np.ndarray) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, device=device)
        x, y = take(xa, i), take(ya, i)

        def f(th: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(_call(model, (th, rest, buffers), x), y).mean()

        from torch.func import grad

        g = grad(f)(theta)
        return {k: theta[k] - lr * g[k] for k in names}

    return run_probe(size_a=_batch_len(xa), size_b=_batch_len(xb), n=n, K=K, lr=lr,
                     step=step, seed=seed, mean_loss=mean_at, virtual_step=virtual,
                     theta=theta, writer=writer)
