"""Per-sample gradient moments of the *training* batches, from the user's own backward.

:class:`TrainingMoments` hooks the model's ``nn.Linear``/``nn.Conv1d``/``2d``/``3d`` layers
(the modules of ``_torch_fast.fast_modules``) and, during the user's ordinary
``loss.backward()``, keeps each call's input rows :math:`a` (forward hook) and output
gradient :math:`\\delta^{hook}` (tensor hook on the output). No extra forward or backward
is run: the per-sample moments come at the cost of the products alone.

Scaling. The backward sees the gradient of the user's loss :math:`L`. With
``reduction="mean"``, :math:`L = s \\cdot \\frac{1}{B}\\sum_i \\ell_i` (``s = loss_scale``,
e.g. ``1/accumulation steps``; ``B`` the batch's first dimension), so sample ``i``'s own
output gradient is :math:`\\delta_i = c\\,\\delta^{hook}_i` with :math:`c = B / s`; with
``reduction="sum"`` :math:`c = 1 / s`; a number ``reduction=c`` gives ``c`` itself. The
per-sample gradient of a ``Linear`` on ``(B, in)`` is then :math:`g_i = \\delta_i a_i^\\top`
(bias :math:`\\delta_i`), the gradient of sample ``i``'s own loss, never scaled by 1/B.

Moments per batch, exact. For a ``Linear`` on ``(B, in)`` called once:
:math:`\\sum_i g_i = c\\,\\delta^{hook\\top} a` is the weight gradient autograd computes
anyway (taken from the layer's own backward node, free), and
:math:`\\sum_i g_i^2 = c^2 (\\delta^{hook\\,2})^\\top (a^2)` is one extra GEMM in the model's
dtype. Their closed form :math:`M2 = \\sum g^2 - (\\sum g)^2/n` is computed in float64
(``gsnr_stats.kernels.merge_closed_form``, one pass that also Chan-merges the batch) and
kept for an element only where its error bound :math:`3 (n + 3) u \\sum g^2` (``u`` the
unit round-off of the GEMM dtype: products of rounded squares, any summation order) is at
most ``tol · M2``; ``tol`` defaults to 1e-12 for a float64 model and 1e-4 for a float32
one (float32 GEMMs cannot promise more than ~``n u``). Every other element (high GSNR,
where the closed form cancels) is recomputed by the two-pass formula on its materialised
float64 products (``_torch_fast.linear_weight_moments`` on the flagged rows or columns),
so no element is worse than ``tol`` whatever its GSNR. Biases always use the two-pass
formula on :math:`\\delta` (float64). ``Conv``, a ``Linear`` on ``(B, T, in)`` and layers
called several times per forward materialise their per-sample gradients
(``_torch_fast.module_moments``: a grouped convolution, one ``einsum``) and reduce them
with the float64 two-pass formula. Batches are Chan-merged (exact) in float64.

What is not covered. Parameters of other modules (BatchNorm and LayerNorm affine,
Embedding, grouped convolutions, weights shared between modules, ...) have no per-sample
gradient in the hooks: they are left out of the record with a warning (the writer's
layout is :meth:`TrainingMoments.layout`). A covered parameter that reaches the loss also
outside its module's forward (a penalty ``c * w.sum()``, tied use) is found exactly --
autograd's total gradient of the parameter is not the tensor its own backward node
produced -- and refused (:class:`~gsnr_stats.errors.AdapterError` from ``backward``).
BatchNorm with batch statistics (train mode) couples the samples: :math:`\\delta_i a_i^\\top`
is then sample ``i``'s share of the batch gradient, not the gradient of its own loss, so
it is refused unless ``batchnorm="contributions"`` records those shares (documented in
the record's meta). Autocast (the layer's output dtype is not its weight's) is refused.
Dropout is fine: each sample's gradient under the mask it drew in the step.

Forwards without grad, and forwards through ``torch.func.functional_call`` (the
``Recorder``'s own passes: the module's parameters are swapped then), are ignored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from gsnr_stats import kernels
from gsnr_stats.errors import AdapterError, NonFiniteError

from ._common import RecordSummary, check_layout_matches
from ._torch_engine import ParamFilter, _selected
from ._torch_fast import fast_modules, linear_weight_moments, module_moments
from ._torch_loop import StepCounter, optimizer_meta, record_lr

__all__ = ["TrainingMoments"]

_WHERE = "torch TrainingMoments"
_TOL = {torch.float64: 1e-12, torch.float32: 1e-4}
_U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24}
_BN = (nn.modules.batchnorm._BatchNorm,)


def _pnames(mname: str, m: nn.Module) -> list[tuple[str, str]]:
    """``[(attribute, full name)]`` of a module's own parameters."""
    return [(k, f"{mname}.{k}" if mname else k) for k, _ in m.named_parameters(recurse=False)]


def _own_nodes(out: torch.Tensor, inp: torch.Tensor, params: dict[int, str]
               ) -> list[tuple[Any, int, str]]:
    """``(node, input index, parameter)`` of the edges into each parameter's
    ``AccumulateGrad`` within the layer's own backward graph (from the output's
    ``grad_fn`` down to, not past, the input's)."""
    stop = inp.grad_fn
    start = out.grad_fn
    found: list[tuple[Any, int, str]] = []
    if start is None:
        return found
    todo, seen = [start], {id(start)}
    keep = [start]  # holds the nodes so that their ids stay unique
    while todo:
        f = todo.pop()
        for i, (nxt, _) in enumerate(f.next_functions):
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in params:
                    found.append((f, i, params[id(var)]))
                continue
            if nxt is stop or id(nxt) in seen:
                continue
            seen.add(id(nxt))
            keep.append(nxt)
            todo.append(nxt)
    return found


class _Call:
    """One call of a hooked layer in a forward: input rows, output gradient, and the
    gradient its own backward nodes sent to each parameter."""

    __slots__ = ("a", "d", "done", "n", "own")

    def __init__(self, a: torch.Tensor) -> None:
        self.a: torch.Tensor | None = a
        self.n = int(a.shape[0]) if a.ndim else 0
        self.d: torch.Tensor | None = None
        self.done = False  # merged during the backward (the Linear closed form)
        self.own: dict[str, list[torch.Tensor]] = {}


class TrainingMoments:
    """Moments of the per-sample gradients of the training batches, from the user's backward.

    Usage (``docs/adapters.md``, "In-training moments (PyTorch)")::

        tm = gt.TrainingMoments("run.h5", model, optimizer=opt, every=100)
        with tm:                                  # attach() ... close()
            for epoch in range(E):
                for x, y in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()   # mean over the batch
                    opt.step()
                    tm.step()                     # a record every 100 optimizer steps
        stats = gs.reduce("run.h5")               # split "train", one record per window

    Every backward through the model (with grad enabled, outside ``functional_call``) adds
    its batch: each hooked layer's per-sample gradients :math:`g_i` (module docstring: the
    scaling, the exact closed form, what is not covered) are reduced to ``(count, mean,
    M2)`` in float64 and Chan-merged over the batches of the window. :meth:`flush` writes
    the window as a moments record (``GradientWriter.write_moments``, completed with
    ``optimizer_step`` and meta like the ``Recorder``'s) and starts a new one.

    Parameters
    ----------
    writer : path-like or GradientWriter
        A path: a writer with :meth:`layout` is opened there (``writer_kwargs`` go to
        ``GradientWriter``) and closed by :meth:`close`. An open writer must have that
        layout; it stays open.
    model : torch.nn.Module
        The model the training step runs.
    split : str
        The records' split.
    every : int, "epoch" or None
        ``k``: :meth:`step` flushes after every ``k``-th call (call it once per optimizer
        step). ``"epoch"`` or None: records are written by :meth:`flush` (at each epoch
        end); :meth:`step` only counts.
    reduction : "mean", "sum" or float
        How the loss the backward sees combines the per-sample losses (module docstring).
    loss_scale : float
        Factor the loss was multiplied by before ``backward`` (``1/k`` under gradient
        accumulation over ``k`` micro-batches).
    optimizer : torch.optim.Optimizer, optional
        Its update count is each record's step and ``optimizer_step``; its learning rate
        and hyper-parameters go into the record (as with ``Recorder(optimizer=)``).
    include_frozen, param_filter :
        Parameter selection, as in ``layout``; uncovered ones are left out with a warning.
    batchnorm : {"error", "contributions"}
        What to do when a BatchNorm runs on batch statistics with grad enabled.
    tol : float, optional
        Guaranteed relative error of each batch's closed-form M2 element (default by dtype,
        see the module docstring; elements beyond it are recomputed exactly).
    block_size : int, optional
        Samples per stored moments block (jackknife blocks of ``reduce(blocks=)``); default
        one block per record.
    overlap : bool
        True: merge the Linear closed forms on one background thread (the kernel releases
        the GIL), overlapping the rest of the training step where a core is free; the same
        results (merges keep their order), but an error (non-finite gradient) surfaces at a
        later step or :meth:`flush`. False (default): merged inside the backward.
    attrs, writer_kwargs : dict, optional
        Store attributes and ``GradientWriter`` options when ``writer`` is a path.

    Attributes
    ----------
    records : list of RecordSummary
        What was written (``mean_loss`` is NaN: the loss is the user's).
    uncovered : list of str
        Selected parameters the hooks do not cover (left out of the records).
    """

    def __init__(
        self,
        writer: Any,
        model: nn.Module,
        *,
        split: str = "train",
        every: int | str | None = "epoch",
        reduction: str | float = "mean",
        loss_scale: float = 1.0,
        optimizer: Any = None,
        include_frozen: bool = False,
        param_filter: ParamFilter | None = None,
        batchnorm: str = "error",
        tol: float | None = None,
        block_size: int | None = None,
        attrs: dict[str, Any] | None = None,
        writer_kwargs: dict[str, Any] | None = None,
        overlap: bool = False,
    ) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._handles: list[Any] = []
        self._counter: StepCounter | None = None
        self._owns_writer = False
        self.writer: Any = None
        if not isinstance(model, nn.Module):
            raise AdapterError(f"{_WHERE}: model must be a torch.nn.Module, got "
                               f"{type(model).__name__}")
        if every is not None and every != "epoch" and (
                isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise AdapterError(f"{_WHERE}: every must be a positive int, 'epoch' or None, "
                               f"got {every!r}")
        if isinstance(reduction, str):
            if reduction not in ("mean", "sum"):
                raise AdapterError(f"{_WHERE}: reduction must be 'mean', 'sum' or a number, "
                                   f"got {reduction!r}")
        elif isinstance(reduction, bool) or not isinstance(reduction, int | float) or not (
                math.isfinite(reduction) and reduction > 0):
            raise AdapterError(f"{_WHERE}: reduction must be 'mean', 'sum' or a positive "
                               f"number, got {reduction!r}")
        if not (isinstance(loss_scale, int | float) and math.isfinite(loss_scale)
                and loss_scale > 0):
            raise AdapterError(f"{_WHERE}: loss_scale must be a positive number, got "
                               f"{loss_scale!r}")
        if batchnorm not in ("error", "contributions"):
            raise AdapterError(f"{_WHERE}: batchnorm must be 'error' or 'contributions', got "
                               f"{batchnorm!r}")
        if block_size is not None and (isinstance(block_size, bool)
                                       or not isinstance(block_size, int) or block_size < 1):
            raise AdapterError(f"{_WHERE}: block_size must be a positive int, got "
                               f"{block_size!r}")
        self.model, self.split, self.every = model, str(split), every
        self.reduction, self.loss_scale = reduction, float(loss_scale)
        self.batchnorm, self.block_size = batchnorm, block_size
        self.optimizer = optimizer
        sel = _selected(model, include_frozen, param_filter)
        self._modules = fast_modules(model, [n for n, _ in sel])
        covered = {full for mname, m in self._modules.items() for _, full in _pnames(mname, m)}
        self._lay = [(n, tuple(p.shape)) for n, p in sel if n in covered]
        self.uncovered = [n for n, _ in sel if n not in covered]
        if not self._lay:
            raise AdapterError(
                f"{_WHERE}: no selected parameter belongs to an nn.Linear/Conv1d/2d/3d layer "
                f"(groups=1, symmetric zero padding, not shared); {self.uncovered} cannot be "
                "recorded from the training backward -- use the Recorder (its own forward)")
        if self.uncovered:
            warnings.warn(
                f"{_WHERE}: {self.uncovered} are not Linear/Conv parameters the hooks cover "
                "(BatchNorm/LayerNorm affine, Embedding, grouped conv, shared weights): left "
                "out of the records (the writer's layout is TrainingMoments.layout(model))",
                UserWarning, stacklevel=2)
        named = dict(sel)
        self._params = {n: named[n] for n, _ in self._lay}
        self._dtype = next(iter(self._params.values())).dtype
        if self._dtype not in _U:
            raise AdapterError(f"{_WHERE}: parameters of dtype {self._dtype}; float32 or "
                               "float64 models only")
        self.tol = float(tol) if tol is not None else _TOL[self._dtype]
        if not 0.0 < self.tol < 1.0:
            raise AdapterError(f"{_WHERE}: tol must lie in (0, 1), got {tol!r}")
        sizes = [math.prod(s) for _, s in self._lay]
        ends = np.cumsum(sizes).tolist()
        self._off = {n: (e - z, e) for (n, _), z, e in zip(self._lay, sizes, ends, strict=True)}
        self.P = int(ends[-1])
        self._open_writer(writer, attrs, writer_kwargs)
        if optimizer is not None:
            self._counter = StepCounter(optimizer, list(self._params.values()))
        self.records: list[RecordSummary] = []
        self._steps = 0
        self._batches = 0  # batches in the window since the last flush
        self._blocks: list[tuple[float, np.ndarray, np.ndarray]] = []
        self._bad: dict[tuple[int, ...], np.ndarray] = {}
        self._reset()
        self._calls: dict[str, list[_Call]] = {k: [] for k in self._modules}
        self._total: dict[str, torch.Tensor] = {}
        self._queued = False
        self._bn_seen = False
        # the outside-use check holds the gradients it compares (autograd then copies
        # them instead of moving them into .grad): on the first backward of each window
        self._check_due = True
        self._bufs: dict[tuple[Any, ...], torch.Tensor] = {}
        # the merge kernel releases the GIL: on one worker thread it overlaps the rest of
        # the step (merges stay in submission order; flush waits for them)
        if overlap:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="gsnr-training-moments")
        self._inflight: dict[str, concurrent.futures.Future[Any]] = {}
        self._parity: dict[str, int] = {}

    # -- layout and writer ----------------------------------------------------------------

    @staticmethod
    def layout(model: nn.Module, *, include_frozen: bool = False,
               param_filter: ParamFilter | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """The parameters the hooks cover, ``[(name, shape)]`` in ``named_parameters`` order:
        the layout of a writer for :class:`TrainingMoments`."""
        sel = _selected(model, include_frozen, param_filter)
        mods = fast_modules(model, [n for n, _ in sel])
        cov = {full for mname, m in mods.items() for _, full in _pnames(mname, m)}
        return [(n, tuple(p.shape)) for n, p in sel if n in cov]

    def _open_writer(self, writer: Any, attrs: dict[str, Any] | None,
                     writer_kwargs: dict[str, Any] | None) -> None:
        if isinstance(writer, str | os.PathLike):
            import gsnr_stats as gs

            a = {"framework": "torch", "framework_version": torch.__version__,
                 "model": type(self.model).__name__,
                 "recorded_by": "gsnr_stats.adapters.torch.TrainingMoments"}
            a.update(attrs or {})
            self.writer = gs.GradientWriter(writer, params=self._lay, attrs=a,
                                            **(writer_kwargs or {}))
            self._owns_writer = True
            return
        if writer_kwargs or attrs:
            raise AdapterError(f"{_WHERE}: attrs/writer_kwargs only apply when writer is a path")
        if not hasattr(writer, "write_moments"):
            raise AdapterError(f"{_WHERE}: writer must be a path or an open GradientWriter, "
                               f"got {type(writer).__name__}")
        wl = getattr(writer, "layout", None)
        if wl is not None and self.uncovered and set(self.uncovered) & set(wl.names):
            raise AdapterError(
                f"{_WHERE}: the writer's layout holds {sorted(set(self.uncovered) & set(wl.names))}"
                ", which the hooks cannot cover; open the writer with "
                "params=TrainingMoments.layout(model) (or pass a path)")
        check_layout_matches(writer, self._lay, _WHERE)
        self.writer = writer

    # -- hooks ----------------------------------------------------------------------------

    def attach(self) -> TrainingMoments:
        """Register the hooks (idempotent); returns ``self``."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._root_hook))
        for mname, m in self._modules.items():
            self._handles.append(m.register_forward_hook(self._forward_hook(mname, m)))
        for _, m in self.model.named_modules():
            if isinstance(m, _BN):
                self._handles.append(m.register_forward_pre_hook(self._bn_hook))
        for name, p in self._params.items():
            self._handles.append(p.register_hook(self._total_hook(name)))
        return self

    def detach(self) -> None:
        """Remove the hooks (idempotent); accumulated batches stay until :meth:`flush`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for cs in self._calls.values():
            cs.clear()

    def _root_hook(self, m: nn.Module, inp: Any) -> None:
        """A new forward of the model: drop the calls of forwards never backpropagated
        (grad-enabled evaluation), so that each backward sees its own forward only."""
        if not self._queued:
            for cs in self._calls.values():
                cs[:] = [c for c in cs if c.d is not None]

    def _bn_hook(self, m: nn.Module, inp: Any) -> None:
        batch_stats = m.training or m.running_mean is None
        if not (batch_stats and torch.is_grad_enabled()):
            return
        if self.batchnorm == "error":
            raise AdapterError(
                f"{_WHERE}: {type(m).__name__} runs on batch statistics (train mode), which "
                "couples the samples of a batch: delta_i a_i^T is then sample i's share of the "
                "batch gradient, not the gradient of its own loss. Pass "
                "batchnorm='contributions' to record those shares, or use the Recorder "
                "(eval-mode BatchNorm, its own forward)")
        self._bn_seen = True

    def _total_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            if self._queued and self._check_due:  # a checked backward of a hooked layer
                self._total[name] = g
        return hook

    def _forward_hook(self, mname: str, m: nn.Module) -> Callable[..., None]:
        names = _pnames(mname, m)
        mine = {attr: self._params[full] for attr, full in names}

        def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor) \
                    or not out.requires_grad:
                return
            if any(getattr(mod, attr) is not p for attr, p in mine.items()):
                return  # functional_call / torch.func: not the training step's parameters
            if not inp or not isinstance(inp[0], torch.Tensor):
                raise AdapterError(f"{_WHERE}: layer {mname!r} was called without a "
                                   "positional tensor input")
            if out.dtype != mod.weight.dtype:
                raise AdapterError(
                    f"{_WHERE}: layer {mname!r} computed in {out.dtype} for {mod.weight.dtype} "
                    "weights (autocast?): the products' error bounds do not hold; train "
                    "without autocast or use the Recorder")
            call = _Call(inp[0].detach())
            self._calls[mname].append(call)

            def grad_hook(g: torch.Tensor) -> None:
                call.d = g
                if not self._queued:
                    self._queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._finish)

            out.register_hook(grad_hook)
            ids = {id(p): full for (attr, full), p in zip(names, mine.values(), strict=True)}
            wname = names[0][1]
            for node, i, full in _own_nodes(out, inp[0], ids):
                call.own.setdefault(full, [])

                def node_hook(gi: Any, go: Any, i: int = i, full: str = full) -> None:
                    g = gi[i]
                    if g is None:
                        return
                    if full == wname and self._fast_now(mname, mod, call):
                        # the weight's own gradient: merge now, so that autograd can move
                        # it into .grad and the layer's tensors are freed as usual
                        try:
                            self._linear(mname, mod, call, g)
                        except BaseException:
                            self._drop_window()
                            raise
                        if self._check_due:
                            call.own[full].append(g)
                        else:
                            call.own.clear()
                        call.a = call.d = None
                        call.done = True
                        return
                    call.own[full].append(g)

                node.register_hook(node_hook)

        return hook

    # -- one backward ---------------------------------------------------------------------

    def _factor(self, n: int) -> float:
        if self.reduction == "mean":
            return n / self.loss_scale
        if self.reduction == "sum":
            return 1.0 / self.loss_scale
        return float(self.reduction)

    def _finish(self) -> None:
        """End of a backward (autograd's queued callback): reduce the rest of its batch."""
        self._queued = False
        calls = {k: [c for c in cs if c.d is not None or c.done]
                 for k, cs in self._calls.items()}
        total, self._total = self._total, {}
        for cs in self._calls.values():
            cs.clear()
        try:
            self._finish_batch(calls, total)
            self._sync(done_only=True)
        except BaseException:
            self._drop_window()
            raise

    def _sync(self, done_only: bool = False) -> None:
        """Wait for the queued merges (only the finished ones: ``done_only``); raise the
        first one's error."""
        err = None
        for tag, f in list(self._inflight.items()):
            if done_only and not f.done():
                continue
            del self._inflight[tag]
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                err = err if err is not None else e
        if err is not None:
            raise err

    def _drop_window(self) -> None:
        """A failed backward leaves the window's moments unusable: start a new window."""
        with contextlib.suppress(BaseException):
            self._sync()
        self._blocks = []
        self._reset()
        self._batches = 0
        self._check_due = True

    def _fast_now(self, mname: str, m: nn.Module, call: _Call) -> bool:
        """A Linear on (B, in) called once in this forward: closed form in the backward."""
        return (isinstance(m, nn.Linear) and len(self._calls[mname]) == 1
                and call.a is not None and call.a.ndim == 2 and call.d is not None
                and self._gemm_safe(call.a))

    def _finish_batch(self, calls: dict[str, list[_Call]],
                      total: dict[str, torch.Tensor]) -> None:
        rows = {c.n for cs in calls.values() for c in cs}
        if not rows:
            return
        if len(rows) != 1:
            raise AdapterError(
                f"{_WHERE}: the hooked layers saw inputs with {sorted(rows)} rows in one "
                "backward; their first dimension must be the batch's samples")
        n = rows.pop()
        if self._check_due:
            self._check_outside(calls, total)
            self._check_due = False
        c = self._factor(n)
        na = float(self._count)
        for mname, m in self._modules.items():
            cs = calls[mname]
            if not cs:  # not part of this backward's graph: zero gradients
                for _, full in _pnames(mname, m):
                    self._merge(full, na, n, torch.zeros(self._params[full].shape,
                                                         dtype=torch.float64),
                                torch.zeros(self._params[full].shape, dtype=torch.float64))
                continue
            if all(cl.done for cl in cs):
                continue
            pairs = [(cl.a, cl.d * c) for cl in cs]
            for (_, full), (mu, q) in zip(_pnames(mname, m), module_moments(m, pairs, n),
                                          strict=True):
                self._merge(full, na, n, mu, q)
        self._count += n
        self._batches += 1
        if self.block_size is not None and self._count >= self.block_size:
            self._push_block()

    def _gemm_safe(self, a: torch.Tensor) -> bool:
        """Float32 GEMMs round at float32 only at "highest" matmul precision (no TF32/bf16)."""
        if a.dtype != torch.float32:
            return True
        if a.is_cuda and torch.backends.cuda.matmul.allow_tf32:
            return False
        return torch.get_float32_matmul_precision() == "highest"

    def _check_outside(self, calls: dict[str, list[_Call]],
                       total: dict[str, torch.Tensor]) -> None:
        """Refuse a parameter whose gradient in this backward is not its layer's own."""
        bad = []
        for mname, m in self._modules.items():
            for _, full in _pnames(mname, m):
                owns = [g for cl in calls[mname] for g in cl.own.get(full, ())]
                tot = total.get(full)
                if tot is None:
                    continue
                if not owns:
                    bad.append(full)
                elif len(owns) == 1:
                    o = owns[0]
                    if o.data_ptr() != tot.data_ptr() and not torch.equal(o, tot):
                        bad.append(full)
                else:  # several calls: autograd sums them in its own order
                    s = torch.stack(owns).to(torch.float64)
                    err = (s.sum(0) - tot.to(torch.float64)).abs()
                    lim = 4 * len(owns) * _U[self._dtype] * s.abs().sum(0)
                    if bool((err > lim).any()):
                        bad.append(full)
        if bad:
            raise AdapterError(
                f"{_WHERE}: {bad} also reach the loss outside their layer's forward (a "
                "penalty on the weights, a tied use): their per-sample gradients are not the "
                "layer's delta_i a_i^T. Leave them out (param_filter=) or use the Recorder")

    def _buf(self, key: str, shape: Any, like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor reused across batches (fresh pages per batch cost page faults)."""
        k = (key, tuple(shape), like.dtype, like.device)
        b = self._bufs.get(k)
        if b is None:
            b = self._bufs[k] = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
        return b

    def _linear(self, mname: str, m: nn.Module, call: _Call, gw: torch.Tensor) -> None:
        """Weight and bias by the closed form, flagged elements exactly (module docstring);
        ``gw`` is autograd's own weight gradient of this call (``sum g / c``)."""
        names = _pnames(mname, m)
        wname = names[0][1]
        a = call.a
        dh = call.d.to(a.dtype)
        n = call.n
        c = self._factor(n)
        na = float(self._count)
        tag = mname
        if self._pool is not None:  # double buffers: the worker may still read the last
            p = self._parity[mname] = self._parity.get(mname, 1) ^ 1
            tag = f"{mname}:{p}"
            prev = self._inflight.pop(tag, None)
            if prev is not None:
                prev.result()
        d2 = torch.mul(dh, dh, out=self._buf(mname + ":d2", dh.shape, dh))
        a2 = torch.mul(a, a, out=self._buf(mname + ":a2", a.shape, a))
        s2 = torch.mm(d2.t(), a2, out=self._buf(tag + ":s2", m.weight.shape, a))
        bound = 3.0 * (n + 3) * _U[self._dtype] / self.tol
        jobs = []
        if self._pool is not None:  # autograd moves gw into .grad: the worker gets a copy
            gw = self._buf(tag + ":s1", gw.shape, gw).copy_(gw)
        jobs.append((wname, gw, s2, lambda tol: self._exact_weight(a, dh, c, n, tol)))
        if m.bias is not None:
            bname = names[1][1]
            own = call.own.get(bname, ())
            s1 = own[0] if len(own) == 1 else dh.sum(0)
            s2b = torch.sum(d2, 0, out=self._buf(tag + ":s2b", m.bias.shape, a))
            if self._pool is not None:
                s1 = self._buf(tag + ":s1b", s1.shape, s1).copy_(s1)
            jobs.append((bname, s1, s2b, lambda tol: self._exact_bias(dh, c)))
        arrays = (self._mean, self._m2)  # this window's, whenever the worker runs

        def run() -> None:
            for name, s1_, s2_, exact in jobs:
                self._closed(name, s1_, s2_, n, c, na, bound, exact, arrays)

        if self._pool is None:
            run()
        else:
            self._inflight[tag] = self._pool.submit(run)

    def _closed(self, name: str, s1: torch.Tensor, s2: torch.Tensor, n: int, c: float,
                na: float, bound: float, exact: Callable[[float], Any],
                arrays: tuple[np.ndarray, np.ndarray]) -> None:
        """Merge one parameter's closed-form batch moments (``merge_closed_form``) into
        ``arrays`` (the window's mean, M2); the flagged elements from ``exact(tol)``, a
        callable giving their float64 (mean, M2) for the flagged index arrays."""
        lo, hi = self._off[name]
        shape = tuple(self._params[name].shape)
        mean = arrays[0][lo:hi].reshape(shape)
        m2 = arrays[1][lo:hi].reshape(shape)
        bad = self._bad_buffer(shape)
        nbad = kernels.merge_closed_form(
            s1.detach().contiguous().cpu().numpy().reshape(-1),
            s2.detach().contiguous().cpu().numpy().reshape(-1),
            float(n), c, na, bound, mean.reshape(-1), m2.reshape(-1), bad.reshape(-1))
        if not nbad:
            return
        idx = np.nonzero(bad)
        mb, qb = exact(self.tol)(idx)
        if not (np.isfinite(mb).all() and np.isfinite(qb).all()):
            # the kernel left these elements non-finite: the caller drops the window
            j = int(np.flatnonzero(~(np.isfinite(mb) & np.isfinite(qb)))[0])
            raise NonFiniteError(f"{_WHERE}: non-finite gradient for parameter {name} "
                                 f"(element {tuple(int(v[j]) for v in idx)})")
        tot = na + n
        d = mb - mean[idx]
        mean[idx] += d * (n / tot)
        m2[idx] += qb + d * d * (na * n / tot)

    @staticmethod
    def _exact_bias(dh: torch.Tensor, c: float) -> Callable[[Any], tuple[Any, Any]]:
        """Two-pass moments of the flagged bias elements: their columns of delta."""
        def get(idx: Any) -> tuple[np.ndarray, np.ndarray]:
            (k,) = idx
            d64 = dh[:, torch.from_numpy(k)].to("cpu", torch.float64) * c
            mu = d64.mean(0)
            return mu.numpy(), ((d64 - mu) ** 2).sum(0).numpy()
        return get

    @staticmethod
    def _exact_weight(a: torch.Tensor, dh: torch.Tensor, c: float, n: int, tol: float
                      ) -> Callable[[Any], tuple[Any, Any]]:
        """Flagged weight elements: ``linear_weight_moments`` (float64 products, two-pass
        where its bound asks) on the flagged output rows or input columns, whichever is
        less work."""
        def get(idx: Any) -> tuple[np.ndarray, np.ndarray]:
            r, k = idx
            rows, cols = np.unique(r), np.unique(k)
            a64 = a.detach().to("cpu", torch.float64)
            d64 = dh.detach().to("cpu", torch.float64) * c
            if rows.size * a64.shape[1] <= cols.size * d64.shape[1]:
                mu, q = linear_weight_moments(
                    a64, d64[:, torch.from_numpy(rows)].contiguous(), n, tol)
                sub = (np.searchsorted(rows, r), k)
            else:
                mu, q = linear_weight_moments(
                    a64[:, torch.from_numpy(cols)].contiguous(), d64, n, tol)
                sub = (r, np.searchsorted(cols, k))
            return mu.numpy()[sub], q.numpy()[sub]
        return get

    def _bad_buffer(self, shape: Any) -> np.ndarray:
        """A reusable flag array of ``shape`` (the kernel writes every element)."""
        key = tuple(shape)
        if key not in self._bad:
            self._bad[key] = np.zeros(key, dtype=np.bool_)
        return self._bad[key]

    def _merge(self, name: str, na: float, n: int, mu: torch.Tensor, q: torch.Tensor) -> None:
        """Chan-merge a parameter's batch moments (float64) into the running ones."""
        lo, hi = self._off[name]
        mb = mu.detach().reshape(-1).to("cpu", torch.float64).numpy()
        qb = q.detach().reshape(-1).to("cpu", torch.float64).numpy()
        ok = np.isfinite(mb) & np.isfinite(qb)
        if not ok.all():
            j = int(np.flatnonzero(~ok)[0])
            raise NonFiniteError(f"{_WHERE}: non-finite gradient for parameter {name} "
                                 f"(flat element {j})")
        tot = na + n
        d = mb - self._mean[lo:hi]
        self._mean[lo:hi] += d * (n / tot)
        self._m2[lo:hi] += qb + d * d * (na * n / tot)

    # -- records --------------------------------------------------------------------------

    def _reset(self) -> None:
        """A new block: zero count and moments."""
        self._count = 0
        self._mean = np.zeros(self.P)
        self._m2 = np.zeros(self.P)

    def _push_block(self) -> None:
        self._sync()
        self._blocks.append((float(self._count), self._mean, self._m2))
        self._reset()

    @property
    def pending_samples(self) -> int:
        """Samples accumulated since the last :meth:`flush`."""
        return int(self._count) + sum(int(b[0]) for b in self._blocks)

    @property
    def optimizer_step(self) -> int | None:
        """``optimizer.step()`` calls counted (None without an optimizer)."""
        return None if self._counter is None else self._counter.count

    def step(self) -> RecordSummary | None:
        """Count one training step (call after ``optimizer.step()``); with ``every=k``
        flush after every ``k``-th call. Returns the record written, if any."""
        self._steps += 1
        if isinstance(self.every, int) and self._steps % self.every == 0:
            return self.flush()
        return None

    def flush(self, step: int | None = None, *, epoch: float | None = None,
              lr: float | None = None, optimizer_step: int | None = None
              ) -> RecordSummary | None:
        """Write the batches since the last flush as record ``(step, split)``; None if empty.

        ``step`` defaults to the optimizer's update count (``optimizer=``), else the number
        of :meth:`step` calls; ``optimizer_step`` defaults to the optimizer's count (or
        ``step`` without an optimizer); ``lr`` to the optimizer's (see ``Recorder``).
        """
        try:
            self._sync()
        except BaseException:
            self._drop_window()
            raise
        if self._count == 0 and not self._blocks:
            return None
        o_step = optimizer_step if optimizer_step is not None else (
            self.optimizer_step if self.optimizer_step is not None else step)
        key = int(step if step is not None else (o_step if o_step is not None else self._steps))
        if o_step is None:
            o_step = key
        lr_v = float(lr) if lr is not None else record_lr(self.optimizer,
                                                          list(self._params.values()))
        ep = None if epoch is None else float(epoch)
        blocks = list(self._blocks)
        if self._count:
            blocks.append((float(self._count), self._mean, self._m2))
        n_all = int(sum(b[0] for b in blocks))
        meta: dict[str, Any] = {
            "framework": f"torch {torch.__version__}", "mode": "train",
            "source": "training_moments", "reduction": self.reduction,
            "loss_scale": self.loss_scale, "batches": self._batches,
            "uncovered": list(self.uncovered)}
        if self._bn_seen:
            meta["batchnorm"] = "contributions: per-sample shares of the batch gradient"
        if self.optimizer is not None:
            meta["optimizer"] = optimizer_meta(self.optimizer,
                                               {id(p): k for k, p in self._params.items()})
        w = self.writer
        try:
            for cnt, mu, q in blocks:
                w.write_moments(key, self.split, cnt, mu, np.maximum(q, 0.0),
                                lr=None if math.isnan(lr_v) else lr_v, epoch=ep)
            w.end_record(key, self.split, optimizer_step=int(o_step), meta=meta)
        except BaseException:
            abort = getattr(w, "abort_record", None)
            if abort is not None:
                abort(key, self.split)
            raise
        finally:
            self._blocks = []
            self._reset()
            self._batches = 0
            self._bn_seen = False
            self._check_due = True
        s = RecordSummary(key, self.split, n_all, math.nan, lr_v,
                          math.nan if ep is None else ep, int(o_step))
        self.records.append(s)
        return s

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the hooks and the optimizer hook; close a writer opened from a path
        (pending batches are not written: :meth:`flush` first). Idempotent."""
        self.detach()
        if self._pool is not None:
            with contextlib.suppress(BaseException):
                self._sync()
            self._pool.shutdown(wait=True)
        if self._counter is not None:
            self._counter.remove()
        if self._owns_writer and self.writer is not None:
            w, self.writer = self.writer, None
            w.close()

    def __enter__(self) -> TrainingMoments:
        return self.attach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Flush pending batches on a clean exit, then :meth:`close`."""
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
