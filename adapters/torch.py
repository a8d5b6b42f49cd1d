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

This module is the public API. The engine (parameter selection, train-mode policy, the
``vmap``/Jacobian routes) is ``adapters/_torch_engine.py``, the :class:`Recorder`
``adapters/_torch_record.py``, the Linear/Conv route ``adapters/_torch_fast.py``.

Modes. The :class:`Recorder` switches the model to eval mode for each record by default
(``mode="eval"``) and restores every submodule's mode afterwards, so it can be called
from inside a training loop; its records also leave the global random state untouched
and store the optimizer's step count and hyper-parameters (``docs/adapters.md``,
"Recording from a training loop (PyTorch)"). The other functions take the model's modes
as they are.

Train-mode layers. BatchNorm in training mode (or without running statistics) mixes the
samples of a batch, and so has no per-sample gradient in the usual sense; Dropout in
training mode is random. Both are refused with :class:`~gsnr_stats.errors.AdapterError`
unless you opt in (with the Recorder: ``mode="train"`` or ``"as_is"``):

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

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import (
    ProbeResult,
    RecordSummary,
    Unpack,
    as_float,
    iter_data,
    run_probe,
    split_batch,
)
from ._common import plain_offsets as _plain_offsets
from ._moments import JLProjection, ParamSubset
from ._torch_engine import (
    SUPPORTED,
    ParamFilter,
    _batch_len,
    _call,
    _check_module,
    _Engine,
    _plan,
    _restricted,
    _selected,
    _to,
    _to_numpy,
)
from ._torch_fast import FastPath
from ._torch_hooks import TrainingMoments
from ._torch_record import Recorder, _current_lr, factored_modules, resolve_factors

__all__ = [
    "SUPPORTED",
    "JLProjection",
    "ParamSubset",
    "ProbeResult",
    "RecordSummary",
    "Recorder",
    "TrainingMoments",
    "layout",
    "mean_loss",
    "open_writer",
    "per_sample_factors",
    "per_sample_gradients",
    "probe_osgr",
    "record",
    "record_trajectory",
]


# --------------------------------------------------------------------------------------
# Parameters and layout
# --------------------------------------------------------------------------------------


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
    factors: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    example: Any = None,
    **writer_kwargs: Any,
) -> Any:
    """A ``gsnr_stats.GradientWriter`` for ``model``'s layout with torch provenance attrs.

    ``writer_kwargs`` go to ``GradientWriter`` (``dtype``, ``chunks``, ``compression``,
    ``overwrite``, ``factor_dtype``, ...). With ``params_subset``/``project``/``seed`` (as
    in :class:`Recorder`) the writer gets the subsampled or projected layout, and the
    chosen indices / projection seed are stored in its user attributes
    (``docs/format.md``).

    ``factors`` opens a factored store (record with ``Recorder(..., keep="factors")``):
    ``"auto"`` (needs ``loss_fn`` and ``example=(inputs, targets)``, one batch) picks every
    ``nn.Linear`` whose input rows are the samples and whose ``T`` factor rows per sample
    are fewer numbers than its gradient, :math:`T (in + out) < in \\cdot out`, leaving out
    layers used outside their own forward; or a list of layer names, weight names,
    ``(weight, bias)`` pairs or ``gs.FactorSpec`` (``_torch_record.resolve_factors``).
    ``factor_dtype`` defaults to the model's dtype.
    """
    import gsnr_stats as gs

    a = {"framework": "torch", "framework_version": torch.__version__,
         "model": type(model).__name__}
    a.update(attrs or {})
    lay = layout(model, include_frozen=include_frozen, param_filter=param_filter)
    tf = _moments.make_transform(lay, params_subset, project, seed)
    if factors is not None:
        if tf.active:
            raise AdapterError("torch open_writer: factors= stores whole tensors' factors; "
                               "params_subset/project do not apply")
        specs = _factors(model, loss_fn, factors, example, include_frozen, param_filter,
                         "torch open_writer")[0]
        writer_kwargs["factors"] = [gs.FactorSpec(w, bias=b, rows=r) for w, b, r in specs]
        dt = next(p for n, p in model.named_parameters() if n == lay[0][0]).dtype
        writer_kwargs.setdefault("factor_dtype",
                                 "float64" if dt == torch.float64 else "float32")
    return gs.GradientWriter(path, tf.layout, attrs=_moments.writer_attrs(tf, a),
                             **writer_kwargs)


def _factors(model: nn.Module, loss_fn: Any, factors: Any, example: Any,
             include_frozen: bool, param_filter: ParamFilter | None, where: str,
             chunk_size: int | None = None) -> tuple[list[Any], FastPath]:
    """The resolved factors ``[(weight, bias, rows)]`` and the fast path that checked them."""
    if loss_fn is None and (example is not None or factors == "auto"):
        raise AdapterError(f"{where}: factors from an example batch need loss_fn=")
    kw = {"include_frozen": include_frozen, "param_filter": param_filter,
          "chunk_size": chunk_size, "train_batchnorm": "error", "dropout": "error"}
    eng = _Engine(model, loss_fn, **kw)
    fast = FastPath(eng, lambda names: _restricted(eng, kw, names))
    specs = resolve_factors(model, fast, factors, example, where)
    if not specs:
        raise AdapterError(f"{where}: no layer to factor in {type(model).__name__}; "
                           "supported: nn.Linear layers whose input rows are the samples")
    factored_modules(model, eng.names, specs, where)
    return specs, fast



# --------------------------------------------------------------------------------------
# Per-sample gradients
# --------------------------------------------------------------------------------------


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



def per_sample_factors(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    factors: Any = "auto",
    chunk_size: int | None = None,
    include_frozen: bool = False,
    param_filter: ParamFilter | None = None,
    return_loss: bool = False,
) -> tuple[Any, ...]:
    """Per-sample gradients with the ``nn.Linear`` ones as their exact factors.

    .. math:: \\nabla_W \\ell_i = \\sum_t \\delta_{it} a_{it}^\\top, \\qquad
              \\nabla_b \\ell_i = \\sum_t \\delta_{it}

    with :math:`a_{it}` the layer's input rows of sample ``i`` (``T = 1`` for ``(n, in)``
    inputs, the positions of ``(n, T, in)`` inputs) and :math:`\\delta_{it}` the gradient
    of :math:`\\sum_j \\ell_j` with respect to the layer's outputs (sample ``i``'s own:
    the losses are per sample, never mean-reduced), from one forward/backward.

    Parameters
    ----------
    model, loss_fn, inputs, targets, chunk_size, include_frozen, param_filter :
        As in :func:`per_sample_gradients` (eval-mode BatchNorm, no active Dropout).
    factors : "auto" or list
        Which layers (see :func:`open_writer`); ``"auto"`` decides on this batch.
    return_loss : bool
        Also return the ``(n,)`` per-sample losses (float64).

    Returns
    -------
    plain : ndarray (n, P_plain)
        Per-sample gradients of every selected tensor that is not a factor (neither a
        factored weight nor its tied bias), in :func:`layout` order.
    factors : dict weight name -> (A, D)
        ``A`` ``(n, in)`` or ``(n, T, in)``, ``D`` ``(n, out)`` or ``(n, T, out)``, the
        parameters' dtype.
    """
    specs, fast = _factors(model, loss_fn, factors, (inputs, targets) if factors == "auto"
                           else None, include_frozen, param_filter, "torch per_sample_factors",
                           chunk_size)
    eng = fast.eng
    fac = factored_modules(model, eng.names, specs, "torch per_sample_factors")
    fac = {k: (max(r, 1 << 30), t) for k, (r, t) in fac.items()}  # any number of positions
    done = {n for w, b, _ in specs for n in (w, b) if n is not None}
    offs = _plain_offsets(list(zip(eng.names, eng.shapes, strict=True)), done)
    n = _batch_len(inputs)
    plain = torch.empty((n, max((e for _, e in offs.values()), default=0)), dtype=eng.dtype,
                        device=eng.device)
    facs, losses = fast.factors_into(inputs, targets, n, plain, fac, offs)
    out: tuple[Any, ...] = (_to_numpy(plain),
                            {k: (_to_numpy(a), _to_numpy(d)) for k, (a, d) in facs.items()})
    if return_loss:
        out += (_to_numpy(losses).astype(np.float64),)
    return out


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


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
    unpack: Unpack | None = None,
    optimizer_step: int | None = None,
    **recorder_kwargs: Any,
) -> RecordSummary:
    """One record ``(step, split)`` through a fresh :class:`Recorder` (see there).

    In a training loop keep one :class:`Recorder` instead: a fresh one given
    ``optimizer=`` counts optimizer steps only from its construction (Adam-like
    optimizers excepted), so pass ``optimizer_step=`` here.
    """
    with Recorder(writer, model, loss_fn, **recorder_kwargs) as rec:
        return rec.record(data, step, split, batch_size=batch_size, lr=lr, epoch=epoch,
                          max_samples=max_samples, unpack=unpack,
                          optimizer_step=optimizer_step)


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
    unpack: Unpack | None = None,
) -> float:
    """Mean per-sample loss :math:`\\frac{1}{N}\\sum_i \\ell_i(\\theta)` over ``data``.

    Runs without gradients on copies of the buffers (running statistics never change); the
    model's train/eval mode is used as is. ``data`` and ``unpack`` as in
    :meth:`Recorder.record`.
    """
    _check_module(model)
    device = next(model.parameters()).device
    state = _eval_state(model)
    batches, _ = iter_data(data, batch_size, "torch mean_loss", unpack)
    total, count = 0.0, 0
    for batch in batches:
        x, y, _ = split_batch(batch, "torch mean_loss", unpack, _batch_len)
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
    rows give the trajectory OSGR (docs/theory.md, "Measured OSGR", 1),

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
