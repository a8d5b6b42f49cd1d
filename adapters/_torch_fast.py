"""Per-sample gradients of ``Linear``/``Conv`` layers and their moments, without ``vmap``.

For a layer ``y = W a + b`` (``nn.Linear`` on ``(B, in)`` inputs) and the summed per-sample
loss :math:`L = \\sum_i \\ell_i`, the output gradient :math:`\\delta_i = \\partial L / \\partial
y_i = \\partial \\ell_i / \\partial y_i` of sample ``i`` gives its own gradient
:math:`g_i = \\delta_i a_i^\\top`, so, per weight element,

.. math:: \\sum_i g_i = \\delta^\\top a, \\qquad \\sum_i g_i^{\\odot 2} = (\\delta^{\\odot 2})^\\top
          (a^{\\odot 2}),

(the identity behind BackPACK's ``SumGradSquared``) and for the bias
:math:`\\sum_i \\delta_i`, :math:`\\sum_i \\delta_i^2`. Both are computed in float64 from the
layer's inputs and output gradients of one ordinary forward/backward, and
:math:`M2 = \\sum_i g_i^2 - (\\sum_i g_i)^2 / n` per batch; batches are Chan-merged.

Exactness at any GSNR. ``a`` and ``δ`` are cast to float64 before the products, so every
product is exact to one float64 rounding (exact for a float32 model) and each sum carries an
error of at most :math:`\\gamma = 3 (n + 2) u` times :math:`\\sum_i g_i^2` (``u = 2^{-53}``; by
Cauchy-Schwarz the :math:`(\\sum g)^2/n` term is bounded by the same sum). The closed form
:math:`\\widehat{M2} = \\sum g^2 - (\\sum g)^2/n` is kept for an element only where this bound
makes its relative error at most ``_EXACT_TOL`` (1e-10), i.e. where
:math:`\\widehat{M2} \\ge \\sum g^2 \\gamma / \\mathrm{tol}` (``sum g^2 / M2 = 1 + m^2/s^2``
grows with the GSNR; with ``n = 256`` this holds up to a GSNR of about 1e3, which covers most
weights of a network). The other elements (a bias or input feature with a large offset) are
recomputed exactly: their per-sample products :math:`\\delta_{ij} a_{ik}` are materialised in
float64 for those elements only (in blocks of bounded memory) and reduced with the two-pass
formula; biases always use the two-pass formula on ``δ`` (``O(n · out)``). Shifting the sums
by a constant ``K`` would not help: :math:`(\\delta^2)^\\top(a^2) - 2K \\circ
(\\delta^\\top a) + n K^2` still forms the large terms before subtracting. Batches are
Chan-merged (exact). Cost: the closed form is two matmuls; an element recomputed costs
``O(n)`` (whole output rows by broadcasting when a quarter of a row or more is flagged,
else gathers). A layer whose every element has GSNR above ~1e3 costs ~20x the closed
form (a two-pass over the materialised per-sample products, like ``vmap``'s moments).

Where the square identity does not hold (the per-sample gradient is a sum over positions:
``Linear`` on ``(B, T, in)``, ``Conv1d``/``2d``/``3d``, a layer called more than once per
forward), the per-sample gradients *of that layer only* are materialised with one batched
``einsum`` (one grouped convolution for ``Conv``) in the layer's dtype (as ``vmap``
computes them; in sample chunks of bounded memory) and reduced in float64 with the exact
two-pass formula. Every other selected parameter (LayerNorm, Embedding, BatchNorm in eval
mode, tied weights, …) falls back to ``torch.func.vmap`` for those parameters only. On the
first batch the autograd graph is inspected: a fast layer whose parameter reaches the loss
through any node outside the layer's own forward (e.g. ``c * layer.weight.sum()`` added to a
logit, however small ``c``) is moved to the fallback with a warning; the fast layers are
also checked against ``vmap`` on two samples (rows that are not the batch's samples).

Full dumps (``keep="grads"``) use the same backward: :math:`g_i = \\delta_i a_i^\\top` is written
straight into the writer's chunk-ready buffer (no ``vmap`` intermediates, no concatenation),
so computing costs about one backward plus writing ``n x P`` floats once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gsnr_stats.errors import AdapterError

from ._torch_engine import _batch_len, _call, _to, check_loss_shape, fail

_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHUNK_BYTES = 64 << 20
_EXACT_TOL = 1e-10  # guaranteed relative error of a fast-path M2 element (see the docstring)
_U64 = 2.0 ** -53


def _conv_padding(m: nn.Module) -> tuple[int, ...] | None:
    """Symmetric integer padding of a conv module, or None if there is none (e.g. an odd
    total of ``padding="same"``, or a non-zero padding mode)."""
    if m.padding_mode != "zeros":
        return None
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * len(m.kernel_size)
        out = []
        for k, d in zip(m.kernel_size, m.dilation, strict=True):
            tot = d * (k - 1)
            if tot % 2:
                return None
            out.append(tot // 2)
        return tuple(out)
    return tuple(int(p) for p in pad)


def fast_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Modules whose selected parameters can take the fast path: ``{module name: module}``.

    Exact types ``nn.Linear``, ``nn.Conv1d``/``2d``/``3d`` (``groups == 1``, symmetric zero
    padding), whose parameters are not shared with another module.
    """
    sel = set(names)
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        if type(m) not in _FAST_TYPES or id(m) in seen:
            continue
        seen.add(id(m))
        if not isinstance(m, nn.Linear) and (m.groups != 1 or _conv_padding(m) is None):
            continue
        pnames = [f"{mname}.{k}" if mname else k for k, _ in m.named_parameters(recurse=False)]
        if not pnames or not all(n in sel for n in pnames):
            continue
        if any(owners[id(p)] > 1 for p in m.parameters(recurse=False)):
            continue
        out[mname] = m
    return out


def _pnames(mname: str, m: nn.Module) -> list[str]:
    return [f"{mname}.{k}" if mname else k for k, _ in m.named_parameters(recurse=False)]


def _moments_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass mean and M2 over axis 0 (float64)."""
    mu = g.mean(0)
    return mu, ((g - mu) ** 2).sum(0)


def linear_weight_moments(a: torch.Tensor, d: torch.Tensor, n: int,
                          tol: float = _EXACT_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and M2 ``(out, in)`` of the per-sample weight gradients :math:`g_i = \\delta_i
    a_i^\\top` of a ``Linear`` on ``(n, in)`` inputs, float64, relative error <= ``tol``.

    Closed form :math:`\\sum_i g_i = \\delta^\\top a`, :math:`\\sum_i g_i^2 =
    (\\delta^2)^\\top (a^2)`, :math:`\\widehat{M2} = \\sum g^2 - (\\sum g)^2 / n`, whose error
    is at most :math:`3 (n + 2) u \\sum g^2`; elements where that bound exceeds ``tol``
    :math:`\\widehat{M2}` (high GSNR) are recomputed by the two-pass formula on their
    materialised products.

    Parameters
    ----------
    a, d : torch.Tensor
        Layer inputs ``(n, in)`` and output gradients ``(n, out)``, float64.
    n : int
        Samples (rows).
    tol : float
        Relative error allowed to a closed-form element.
    """
    s1 = d.T @ a
    s2 = (d * d).T @ (a * a)
    mean = s1 / n
    m2 = s2 - s1 * s1 / n
    bad = ~(m2 * tol >= s2 * (3.0 * (n + 2) * _U64))  # NaN-safe: a non-finite sum is redone
    idx = torch.nonzero(bad.reshape(-1)).reshape(-1)
    if not idx.numel():
        return mean, m2.clamp_min_(0.0)
    cols = a.shape[1]
    rows = torch.unique(idx // cols)
    if idx.numel() * 4 >= rows.numel() * cols:
        # many elements: whole output rows, products by broadcasting (no gathers)
        step = max(1, _CHUNK_BYTES // max(1, 8 * n * cols))
        for lo in range(0, rows.numel(), step):
            rj = rows[lo:lo + step]
            mu, q = _moments_rows(d[:, rj, None] * a[:, None, :])
            mean[rj], m2[rj] = mu, q
        return mean, m2.clamp_min_(0.0)
    mf, qf = mean.reshape(-1), m2.reshape(-1)
    step = max(1, _CHUNK_BYTES // max(1, 8 * n))
    for lo in range(0, idx.numel(), step):
        ix = idx[lo:lo + step]
        mu, q = _moments_rows(d[:, ix // cols] * a[:, ix % cols])  # (n, k) products
        mf[ix], qf[ix] = mu, q
    return mean, m2.clamp_min_(0.0)


def _chan(acc: list[Any] | None, n: float, mu: torch.Tensor, q: torch.Tensor) -> list[Any]:
    if acc is None:
        return [n, mu, q]
    na, ma, qa = acc
    tot = na + n
    d = mu - ma
    return [tot, ma + d * (n / tot), qa + q + d * d * (na * n / tot)]


def _conv_weight_per_sample(a: torch.Tensor, d: torch.Tensor, ks: tuple[int, ...],
                            dil: tuple[int, ...], pad: tuple[int, ...], st: tuple[int, ...],
                            ) -> torch.Tensor:
    """Per-sample weight gradients ``(b, Cout, Cin * prod(kernel))`` of a 1/2/3-D convolution.

    One grouped convolution (Rochette et al. 2019, as in Opacus): samples become the groups,
    input channels the batch, and each sample's output gradient the kernel, with stride and
    dilation swapped; ~1.4x faster on CPU than ``unfold`` + ``einsum`` for small kernels.
    """
    b, cin = a.shape[:2]
    cout = d.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(ks) - 1]
    kern = d.reshape(b * cout, 1, *d.shape[2:])
    r = conv(a.transpose(0, 1), kern, None, stride=dil, padding=pad, dilation=st, groups=b)
    # a stride that does not divide the input leaves extra positions beyond the kernel
    r = r[(slice(None), slice(None), *(slice(0, k) for k in ks))]
    return r.reshape(cin, b, cout, math.prod(ks)).permute(1, 2, 0, 3).reshape(b, cout, -1)


def _per_sample(m: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], lo: int, hi: int,
                ) -> list[torch.Tensor]:
    """Materialised per-sample gradients of samples ``lo:hi`` for each parameter of ``m``."""
    gw = gb = None
    for a, d in calls:
        # products in the layer's dtype, like vmap's per-sample gradients; moments in float64
        a = a[lo:hi]
        d = d[lo:hi].to(a.dtype)
        b = a.shape[0]
        if isinstance(m, nn.Linear):
            a2 = a.reshape(b, -1, a.shape[-1])
            d2 = d.reshape(b, -1, d.shape[-1])
            w = torch.einsum("bto,bti->boi", d2, a2)
            bias = d2.sum(1)
        else:
            w = _conv_weight_per_sample(a, d, m.kernel_size, m.dilation, _conv_padding(m),
                                        m.stride)
            bias = d.reshape(b, d.shape[1], -1).sum(2)
        gw = w if gw is None else gw + w
        if m.bias is not None:
            gb = bias if gb is None else gb + bias
    out = [gw.reshape(gw.shape[0], *m.weight.shape)]
    if m.bias is not None:
        out.append(gb)
    return out


def module_moments(m: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], n: int,
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(mean, M2)]`` (float64, parameter-shaped) of the per-sample gradients of ``m``'s
    parameters (weight, then bias) over a batch of ``n`` samples.

    ``calls`` holds ``(input, output gradient)`` of each call of ``m`` in the forward.
    """
    shapes = [p.shape for _, p in m.named_parameters(recurse=False)]
    if not calls:  # never called: zero gradients
        return [(torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64))
                for s in shapes]
    if isinstance(m, nn.Linear) and len(calls) == 1 and calls[0][0].ndim == 2:
        a = calls[0][0].to(torch.float64)
        d = calls[0][1].to(torch.float64)
        out = [linear_weight_moments(a, d, n)]
        if m.bias is not None:
            out.append(_moments_rows(d))
        return out
    per = sum(math.prod(s) for s in shapes) * 8
    step = max(1, _CHUNK_BYTES // max(1, per))
    accs: list[Any] = [None] * len(shapes)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        for i, g in enumerate(_per_sample(m, calls, lo, hi)):
            mu, q = _moments_rows(g.to(torch.float64))
            accs[i] = _chan(accs[i], float(hi - lo), mu, q)
    return [(acc[1], acc[2]) for acc in accs]


def _check_rows(calls: dict[str, list[Any]], n: int) -> None:
    """Refuse a layer whose input rows are not the batch's samples (``fast=False`` then)."""
    for mname, cs in calls.items():
        if any(a.shape[0] != n or d.shape[0] != n for a, d in cs):
            raise AdapterError(
                f"torch fast path: layer {mname!r} saw inputs of "
                f"{[tuple(a.shape) for a, _ in cs]} for a batch of {n} samples (its rows "
                "are not the batch's samples); pass fast=False")


def outside_uses(losses: torch.Tensor, io: dict[str, list[Any]],
                 params: dict[str, dict[int, str]]) -> dict[str, list[str]]:
    """Parameters of each fast layer that reach ``losses`` through a node outside the
    layer's own forward: ``{layer name: [parameter names]}``.

    The layer's own nodes are those reachable from each call's output ``grad_fn`` without
    passing its input's ``grad_fn``. A parameter is used outside when the whole graph from
    ``losses`` has more edges into its ``AccumulateGrad`` node than the layer's own nodes
    (exact: no tolerance, whatever the size of the outside use).

    Parameters
    ----------
    losses : torch.Tensor
        Per-sample losses, graph alive.
    io : dict layer name -> list of (input grad_fn, output grad_fn)
        One pair per call of the layer in the forward.
    params : dict layer name -> {id(leaf tensor): parameter name}
        The layer's parameter leaves.
    """
    def edges(starts: list[Any], stop: set[int]) -> dict[int, int]:
        count: dict[int, int] = {}
        todo = [f for f in starts if f is not None]
        seen = {id(f) for f in todo}
        keep = list(todo)  # holds the nodes so that their ids stay unique
        while todo:
            f = todo.pop()
            for nxt, _ in f.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    count[id(var)] = count.get(id(var), 0) + 1
                if id(nxt) in seen or id(nxt) in stop:
                    continue
                seen.add(id(nxt))
                keep.append(nxt)
                todo.append(nxt)
        del keep
        return count

    total = edges([losses.grad_fn], set())
    out: dict[str, list[str]] = {}
    for mname, pairs in io.items():
        stop = {id(i) for i, _ in pairs if i is not None}
        own = edges([o for _, o in pairs], stop)
        ps = [name for pid, name in params[mname].items() if total.get(pid, 0) > own.get(pid, 0)]
        if ps:
            out[mname] = ps
    return out


def linear_factors(m: nn.Linear, calls: list[tuple[torch.Tensor, torch.Tensor]], n: int,
                   rows: int, mname: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, D)`` of a Linear over a batch of ``n``: inputs ``(n, T, in)`` and output
    gradients ``(n, T, out)`` of all its calls, positions concatenated (``T`` = the sum of
    each call's positions; ``(n, in)``, ``(n, out)`` for one call on ``(n, in)``), so that
    sample ``i``'s weight gradient is :math:`\\sum_t \\delta_{it} a_{it}^\\top` and its bias
    gradient :math:`\\sum_t \\delta_{it}`. Never called: one zero row."""
    if len(calls) == 1 and calls[0][0].ndim == 2:
        a, d = calls[0]
        return a, d.to(a.dtype)
    if not calls:
        w = m.weight
        return (torch.zeros((n, m.in_features), dtype=w.dtype, device=w.device),
                torch.zeros((n, m.out_features), dtype=w.dtype, device=w.device))
    a = torch.cat([c[0].reshape(n, -1, m.in_features) for c in calls], dim=1)
    d = torch.cat([c[1].reshape(n, -1, m.out_features) for c in calls], dim=1).to(a.dtype)
    if a.shape[1] > rows:
        raise AdapterError(
            f"torch factored record: layer {mname!r} has {a.shape[1]} positions per sample "
            f"in this batch (inputs {[tuple(c[0].shape) for c in calls]}), the writer holds "
            f"{rows} factor rows for it; open the writer with rows >= the longest sequence")
    return a, d


def auto_factored(info: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """The layers worth factoring, ``{module name: T}``: those whose ``T`` factor rows per
    sample are fewer numbers than the product, :math:`T (in + out) < in \\cdot out`."""
    return {k: t for k, (t, i, o) in info.items() if t * (i + o) < i * o}


class FastPath:
    """Per-batch moments (:meth:`moments`) or per-sample gradients (:meth:`grads_into`) of the
    selected parameters: Linear/Conv from one backward, the rest from ``vmap`` over those
    parameters only.

    Parameters
    ----------
    eng : adapters._torch_engine._Engine
        The recorder's engine (model, loss, selected names, state).
    make_engine : callable (set of names) -> _Engine
        Builds the vmap engine restricted to the given parameter names.
    """

    def __init__(self, eng: Any, make_engine: Callable[[set[str]], Any]) -> None:
        self.eng = eng
        self.make_engine = make_engine
        self.modules = fast_modules(eng.model, eng.names)
        ends = np.cumsum([math.prod(s) for s in eng.shapes]).tolist()
        self._offsets = {name: (e - math.prod(s), e)  # columns of each parameter
                         for name, s, e in zip(eng.names, eng.shapes, ends, strict=True)}
        self._checked = False
        self.outside: dict[str, list[str]] = {}  # set by the first-batch check
        self._rebuild()

    def _rebuild(self) -> None:
        self.fast_names = {n for mname, m in self.modules.items() for n in _pnames(mname, m)}
        rest = {n for n in self.eng.names if n not in self.fast_names}
        self.fallback = self.make_engine(rest) if rest else None

    def _forward(self, x: Any, y: Any, inspect: bool = False
                 ) -> tuple[dict[str, list[Any]], torch.Tensor]:
        """Inputs and output gradients of each call of each fast layer; the losses. With
        ``inspect``, ``self.outside`` is set to the parameters used outside their layer."""
        eng = self.eng
        x, y = _to(x, eng.device), _to(y, eng.device)
        params, frozen = eng.state()
        eng.check_loss(x, y, frozen, params)
        calls: dict[str, list[Any]] = {k: [] for k in self.modules}
        seen_io: dict[str, list[Any]] = {k: [] for k in self.modules}
        handles = []

        def make_hook(mname: str) -> Callable[..., Any]:
            def hook(mod: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
                if not inp or not isinstance(out, torch.Tensor):
                    raise AdapterError(f"torch fast path: layer {mname!r} was called "
                                       "without a positional input; pass fast=False")
                calls[mname].append([inp[0].detach(), out])
                if inspect:
                    seen_io[mname].append((inp[0].grad_fn, out.grad_fn))
                # a clone goes downstream, so in-place ops after the layer cannot rebase `out`
                return out.clone()
            return hook

        for mname, m in self.modules.items():
            handles.append(m.register_forward_hook(make_hook(mname)))
        try:
            leaves = {k: (v.detach().requires_grad_(True) if k in self.fast_names else v)
                      for k, v in params.items()}
            with torch.enable_grad():
                losses = eng.loss_fn(_call(eng.model, (leaves, *frozen), x), y)
                nx = _batch_len(x)
                check_loss_shape(losses, nx, nx)  # the whole batch, not only the checked head
                outs = [c[1] for cs in calls.values() for c in cs]
                if inspect:
                    self.outside = outside_uses(losses, seen_io, {
                        mname: {id(leaves[n]): n for n in _pnames(mname, m)}
                        for mname, m in self.modules.items()})
                if outs:
                    gs = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
                else:
                    gs = []
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as e:
            raise fail(e, eng.model, eng.device) from e
        finally:
            for h in handles:
                h.remove()
        i = 0
        for cs in calls.values():
            for c in cs:
                c[1] = torch.zeros_like(c[1]) if gs[i] is None else gs[i].detach()
                i += 1
        return calls, losses.detach()

    def _fast_part(self, x: Any, y: Any, n: int
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        calls, losses = self._forward(x, y)
        _check_rows(calls, n)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for mname, m in self.modules.items():
            for name, mom in zip(_pnames(mname, m), module_moments(m, calls[mname], n),
                                 strict=True):
                out[name] = mom
        return out, losses

    def _check(self, x: Any, y: Any) -> None:
        """Compare each fast layer's per-sample gradients with vmap's on two samples; demote
        layers that disagree."""
        from torch.utils._pytree import tree_map

        self._checked = True
        if not self.modules:
            return
        m = min(2, _batch_len(x))
        head = tree_map(lambda a: a[:m] if isinstance(a, torch.Tensor | np.ndarray) else a, (x, y))
        calls, _ = self._forward(head[0], head[1], inspect=True)
        ref = self.make_engine(set(self.fast_names))
        grads, _ = ref.compute(*head)
        bad = {mname: f"{', '.join(ps)} also used outside the layer's forward"
               for mname, ps in self.outside.items()}
        for mname, mod in self.modules.items():
            if mname in bad:
                continue
            cs = calls[mname]
            got = (_per_sample(mod, cs, 0, m) if cs else
                   [torch.zeros((m, *q.shape)) for q in mod.parameters(recurse=False)])
            for name, gf in zip(_pnames(mname, mod), got, strict=True):
                g = grads[name].reshape(m, -1)
                scale = float(g.abs().max()) or 1.0
                # rows that are not the samples give O(1) differences; rounding is far below
                if float((gf.reshape(m, -1).to(g) - g).abs().max()) > 1e-4 * scale:
                    bad[mname] = f"{name} differs on two samples"
                    break
        if bad:
            warnings.warn(
                f"torch fast path: layers {list(bad)} do not match torch.func "
                f"({'; '.join(bad.values())}: a weight used outside the layer's forward, or "
                "the batch is not the first dimension); they use vmap instead", stacklevel=4)
            for b in bad:
                del self.modules[b]
            self._rebuild()

    def grads_into(self, x: Any, y: Any, n: int, out: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients of one batch written into ``out`` ``(n, P)``; the losses.

        ``out`` may be a strided view (rows padded to whole chunk columns, see
        ``GradientWriter.alloc_rows``). A ``Linear`` on ``(B, in)`` called once writes its
        outer products :math:`\\delta_i a_i^\\top` straight into its columns, one float
        multiply per element like ``vmap``'s; other fast layers are materialised in sample
        chunks and copied; the rest come from ``vmap`` over those parameters only.
        """
        return self._fill(x, y, n, out, self._offsets, {})[1]

    def check_first(self, x: Any, y: Any) -> None:
        """The first-batch checks (loss contract, outside uses, two samples vs ``vmap``)."""
        if not self._checked:
            self.eng.check_first(x, y)  # the loss contract on the whole first batch
            self._check(x, y)

    def factor_rows(self, x: Any, y: Any, n: int) -> dict[str, tuple[int, int, int]]:
        """``{module name: (T, in, out)}`` of every fast ``nn.Linear`` whose input rows are the
        batch's samples: ``T`` factor rows per sample (the positions of all its calls)."""
        self.check_first(x, y)
        lin = {k: m for k, m in self.modules.items() if isinstance(m, nn.Linear)}
        if not lin:
            return {}
        calls, _ = self._forward(x, y)
        out = {}
        for mname, m in lin.items():
            cs = calls[mname]
            if cs and all(a.shape[0] == n and d.shape[0] == n for a, d in cs):
                t = sum(math.prod(a.shape[1:-1]) for a, _ in cs)
                out[mname] = (t, m.in_features, m.out_features)
        return out

    def factors_into(self, x: Any, y: Any, n: int, out: torch.Tensor,
                     factored: dict[str, tuple[int, bool]],
                     offsets: dict[str, tuple[int, int]],
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Factors of the ``factored`` Linears and per-sample gradients of the rest.

        Sample ``i``'s weight gradient of a factored layer is :math:`\\sum_t \\delta_{it}
        a_{it}^\\top` over its ``T`` positions (all its calls): ``A (n, T, in)``, ``D (n, T,
        out)`` are returned instead (``(n, in)``, ``(n, out)`` when ``T = 1``), in the
        layer's dtype, with ``D`` the output gradient of the summed per-sample loss (each
        sample's own). Every other selected tensor is written into ``out`` at ``offsets``
        (the plain columns), as :meth:`grads_into` does.

        Parameters
        ----------
        factored : dict module name -> (rows, bias tied)
            ``rows``: the most factor rows the writer holds per sample; ``bias tied``: the
            bias gradient :math:`\\sum_t \\delta_{it}` is the factor's (else a plain column).
        offsets : dict tensor name -> (start, stop)
            Plain columns of each tensor that is not a factor.
        """
        self.check_first(x, y)
        gone = [k for k in factored if k not in self.modules]
        if gone:
            why = "; ".join(f"{k}: {', '.join(self.outside.get(k, ['differs from vmap']))}"
                            + (" also used outside the layer's forward" if k in self.outside
                               else "") for k in gone)
            raise AdapterError(
                f"torch factored record: layers {gone} cannot be factored ({why}); their "
                "per-sample gradients are not delta_i a_i^T. Open the writer without them "
                "(open_writer(..., factors='auto', example=...) leaves them out)")
        calls, losses = self._fill(x, y, n, out, offsets, factored)
        facs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for mname, (rows, tied) in factored.items():
            m = self.modules[mname]
            a, d = linear_factors(m, calls[mname], n, rows, mname)
            facs[_pnames(mname, m)[0]] = (a, d)
            if m.bias is not None and not tied:
                dsum = d if d.ndim == 2 else d.sum(1)
                out[:, slice(*offsets[_pnames(mname, m)[1]])].copy_(dsum)
        return facs, losses

    def _fill(self, x: Any, y: Any, n: int, out: torch.Tensor,
              offs: dict[str, tuple[int, int]], skip: dict[str, Any],
              ) -> tuple[dict[str, list[Any]], torch.Tensor]:
        """Per-sample gradients of every selected tensor outside the ``skip`` layers written
        into ``out`` at ``offs``; the fast layers' calls and the losses."""
        self.check_first(x, y)
        losses = None
        calls: dict[str, list[Any]] = {}
        if self.modules:
            calls, losses = self._forward(x, y)
            _check_rows(calls, n)
            for mname, m in self.modules.items():
                if mname in skip:
                    continue
                names = _pnames(mname, m)
                cs = calls[mname]
                if not cs:  # never called: zero gradients
                    for name in names:
                        out[:, slice(*offs[name])].zero_()
                    continue
                if isinstance(m, nn.Linear) and len(cs) == 1 and cs[0][0].ndim == 2:
                    a = cs[0][0]
                    d = cs[0][1].to(a.dtype)
                    lo, hi = offs[names[0]]
                    torch.mul(d[:, :, None], a[:, None, :],
                              out=out[:, lo:hi].view(n, *m.weight.shape))
                    if m.bias is not None:
                        out[:, slice(*offs[names[1]])].copy_(d)
                    continue
                per = sum(p.numel() for p in m.parameters(recurse=False)) * out.element_size()
                step = max(1, _CHUNK_BYTES // max(1, per))
                for s in range(0, n, step):
                    e = min(n, s + step)
                    for name, g in zip(names, _per_sample(m, cs, s, e), strict=True):
                        out[s:e, slice(*offs[name])].copy_(g.reshape(e - s, -1))
        if self.fallback is not None:
            grads, fl = self.fallback.compute(x, y)
            if losses is None:
                losses = fl
            for name, g in grads.items():
                out[:, slice(*offs[name])].copy_(g.reshape(n, -1))
        assert losses is not None
        return calls, losses

    def moments(self, x: Any, y: Any, n: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """``(mean (P,), M2 (P,), losses (n,))`` of one batch, float64, in layout order."""
        self.check_first(x, y)
        parts, losses = self._fast_part(x, y, n) if self.modules else ({}, None)
        if self.fallback is not None:
            grads, fl = self.fallback.compute(x, y)
            if losses is None:
                losses = fl
            for name, g in grads.items():
                g = g.detach().to(torch.float64)
                parts[name] = _moments_rows(g)
        means = [parts[k][0].reshape(-1).cpu() for k in self.eng.names]
        m2s = [parts[k][1].reshape(-1).cpu() for k in self.eng.names]
        return torch.cat(means).numpy(), torch.cat(m2s).numpy(), losses
