"""Factored per-sample gradients of JAX models, found on the per-example loss's jaxpr.

A dense layer's kernel ``W`` used once per example, in one ``dot_general`` with the
layer's input ``X`` (``(in,)``, or ``(T, in)`` for sequences) and no batch dimensions,
has the per-sample gradient :math:`\\sum_t a_t \\delta_t^\\top` (flax's ``(in, out)``
kernels, ``x @ W``) or :math:`\\sum_t \\delta_t a_t^\\top` (equinox's ``(out, in)`` weights,
``W @ x``), with :math:`a_t` the input rows and :math:`\\delta_t` the loss's gradient with
respect to the product's output rows. The per-example loss is traced to a jaxpr once per
input shape (``jax.make_jaxpr``); such kernels are found there whatever the library (flax
NNX, linen, equinox, a params pytree), and any other use of the kernel (a second call, a
transpose, a penalty term, a dtype conversion, a use inside ``scan``/``cond``) leaves it a
plain per-sample column. The jaxpr is then evaluated with a zero array added to each
tapped product's output; differentiating with respect to those zeros gives
:math:`\\delta`, and the evaluation returns :math:`a`. Every other selected leaf's
per-sample gradient is computed as usual in the same pass. Biases are plain columns.

Used by ``adapters/jax.py`` (``per_sample_factors``, ``open_writer(factors=)``) and the
recorder (``adapters/_jax_record.py``, ``keep="factors"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from ._jax_engine import _one_loss, _Split

_CALLS = ("pjit", "jit", "closed_call", "core_call")


@dataclass(frozen=True)
class Tap:
    """A factorable kernel: selected leaf ``k`` (layout ``name``, shape ``(r0, r1)``) is
    operand ``pos`` of ``eqn``; ``contract`` its contracted dimension; ``T`` input rows."""

    k: int
    name: str
    eqn: Any
    pos: int
    contract: int
    T: int
    shape: tuple[int, int]

    @property
    def spec_in(self) -> int:
        """Columns of the factor's ``A`` (the store's ``in``)."""
        return self.shape[1]


def _uses(jaxpr: Any, leaf_of: dict[Any, int], out: dict[int, list[Any]]) -> None:
    """Every use of a selected leaf's variable: ``(eqn, operand position)`` in ``out[k]``,
    through nested jit calls; ``(None, -1)`` for any use that cannot be tapped."""
    for eqn in jaxpr.eqns:
        sub = eqn.params.get("jaxpr") if eqn.primitive.name in _CALLS else None
        inner: dict[Any, int] = {}
        for pos, v in enumerate(eqn.invars):
            if isinstance(v, jcore.Var) and v in leaf_of:
                if sub is not None:
                    inner[sub.jaxpr.invars[pos]] = leaf_of[v]
                else:
                    out.setdefault(leaf_of[v], []).append((eqn, pos))
        if inner:
            _uses(sub.jaxpr, inner, out)
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var) and v in leaf_of:
            out.setdefault(leaf_of[v], []).append((None, -1))


def find_taps(closed: Any, split: _Split) -> list[Tap]:
    """The factorable kernels of a per-example loss's jaxpr (leaf order)."""
    n_sel = len(split.idx)
    jaxpr = closed.jaxpr
    leaf_of = {v: k for k, v in enumerate(jaxpr.invars[:n_sel])}
    uses: dict[int, list[Any]] = {}
    _uses(jaxpr, leaf_of, uses)
    taps = []
    for k, us in uses.items():
        shape = split.shapes[k]
        if len(us) != 1 or len(shape) != 2 or us[0][0] is None:
            continue
        eqn, pos = us[0]
        if eqn.primitive.name != "dot_general" or pos not in (0, 1):
            continue
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb or len(lc) != 1:
            continue
        cw, cx = (lc[0], rc[0]) if pos == 0 else (rc[0], lc[0])
        x = eqn.invars[1 - pos].aval
        if len(x.shape) not in (1, 2) or cx != len(x.shape) - 1:
            continue
        T = 1 if len(x.shape) == 1 else int(x.shape[0])
        taps.append(Tap(k, split.names[k], eqn, pos, int(cw), T, (int(shape[0]),
                                                                  int(shape[1]))))
    return taps


def _eval(jaxpr: Any, consts: list[Any], args: list[Any], taps: dict[int, Tap],
          eps: dict[int, Any], rec: dict[int, Any]) -> list[Any]:
    """``jax.core.eval_jaxpr`` that adds ``eps[k]`` to each tapped product's output and
    keeps its other operand in ``rec[k]`` (nested jit calls are evaluated inline)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, a in zip(jaxpr.constvars, consts, strict=True):
        env[v] = a
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        tap = taps.get(id(eqn))
        if eqn.primitive.name in _CALLS and "jaxpr" in eqn.params:
            sub = eqn.params["jaxpr"]
            outs = _eval(sub.jaxpr, list(sub.consts), vals, taps, eps, rec)
        elif tap is not None:
            rec[tap.k] = vals[1 - tap.pos]
            outs = [eqn.primitive.bind(*vals, **eqn.params) + eps[tap.k]]
        else:
            bp = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bp if isinstance(bp, tuple) else ([], bp)  # older jax: a pair
            ans = eqn.primitive.bind(*subfuns, *vals, **params)
            outs = ans if eqn.primitive.multiple_results else [ans]
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _factor_pair(tap: Tap, a: Any, out_grad: Any) -> tuple[Any, Any]:
    """``(A (T, r1), D (T, r0))`` of one example for the store's ``(out, in) = (r0, r1)``
    weight: :math:`g = \\sum_t D_t A_t^\\top`."""
    free = tap.shape[1 - tap.contract]
    a = a.reshape(-1, a.shape[-1])
    d = out_grad.reshape(-1, free) if tap.pos == 1 else out_grad.reshape(free, -1).T
    # contract 0: W (in, out), g = sum_t a_t d_t^T -> D = a, A = d; contract 1: D = d, A = a
    return (d, a) if tap.contract == 0 else (a, d)


class JaxFactors:
    """The jitted ``(selected, frozen, x, y) -> (plain (n, P_plain), {name: (A, D)},
    losses (n,))`` of one model split and loss, for the ``taps`` chosen (by name)."""

    def __init__(self, split: _Split, loss_fn: Callable[..., Any], x0: Any, y0: Any,
                 names: set[str] | None = None) -> None:
        self.split = split
        self._one = _one_loss(split, loss_fn)
        closed = jax.make_jaxpr(self._one)(split.selected(), split.frozen(), x0, y0)
        self.taps = [t for t in find_taps(closed, split) if names is None or t.name in names]
        self.names = {t.name for t in self.taps}
        self.fn = jax.jit(jax.vmap(self._example, in_axes=(None, None, 0, 0)))

    def _example(self, sel: list[Any], frozen: list[Any], xi: Any, yi: Any
                 ) -> tuple[Any, dict[str, Any], Any]:
        closed = jax.make_jaxpr(self._one)(sel, frozen, xi, yi)  # this example's shapes
        found = {t.name: t for t in find_taps(closed, self.split)}
        taps = [found[t.name] for t in self.taps if t.name in found]
        by_eqn = {id(t.eqn): t for t in taps}
        fk = {t.k for t in taps}
        plain_k = [k for k in range(len(sel)) if k not in fk]

        def f(plain: list[Any], eps: dict[int, Any]) -> tuple[Any, dict[int, Any]]:
            full = list(sel)
            for k, v in zip(plain_k, plain, strict=True):
                full[k] = v
            rec: dict[int, Any] = {}
            args = jax.tree_util.tree_leaves((full, frozen, xi, yi))
            out = _eval(closed.jaxpr, list(closed.consts), args, by_eqn, eps, rec)
            return jnp.asarray(out[0]).reshape(()), rec

        eps = {t.k: jnp.zeros(t.eqn.outvars[0].aval.shape, t.eqn.outvars[0].aval.dtype)
               for t in taps}
        (loss, rec), (gp, ge) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            [sel[k] for k in plain_k], eps)
        plain = (jnp.concatenate([g.reshape(-1) for g in gp]) if gp
                 else jnp.zeros((0,), loss.dtype))
        facs = {t.name: _factor_pair(t, rec[t.k], ge[t.k]) for t in taps}
        return plain, facs, loss


def auto_taps(taps: list[Tap]) -> list[Tap]:
    """The taps worth factoring: :math:`T (r_0 + r_1) < r_0 r_1`."""
    return [t for t in taps if t.T * sum(t.shape) < math.prod(t.shape)]
