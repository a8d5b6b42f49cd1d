"""The JAX adapter's engine: parameter selection and the jitted ``vmap(grad)``.

:class:`_Split` cuts a :class:`~._jax_models.ModelDesc` into the selected leaves
(differentiated, laid out in network order), the frozen leaves (traced, held fixed) and
the baked-in rest; :func:`_build` compiles ``(selected, frozen, x, y) -> (G (n, P), loss)``
once per loss function and structure. Used by ``adapters/jax.py`` (the public API) and
``adapters/_jax_record.py`` (the :class:`Recorder`); imports neither.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsnr_stats.errors import AdapterError

from ._jax_models import ModelDesc, is_array, is_float_array

SUPPORTED = (
    "loss_fn(model, x, y) returning the scalar loss of ONE example (x, y without the batch "
    "axis), written with jax.numpy/lax so that jit, vmap and grad can trace it (no Python "
    "control flow on values, no NumPy calls on traced arrays); model a params pytree "
    "(dicts, lists, tuples, registered dataclasses) whose floating-point array leaves are "
    "the parameters, an nnx.Module, an equinox Module or a (linen module, variables) pair; "
    "inputs and targets arrays (or pytrees of arrays) with the samples on axis 0"
)

ParamFilter = Callable[[str, Any], bool]

_TRACE_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(jax.errors, n) for n in (
        "ConcretizationTypeError", "TracerArrayConversionError", "TracerBoolConversionError",
        "TracerIntegerConversionError", "UnexpectedTracerError", "NonConcreteBooleanIndexError",
    ) if hasattr(jax.errors, n)
)


def caught() -> tuple[type[BaseException], ...]:
    """Errors of a user's loss that the adapter turns into :class:`AdapterError`."""
    extra: tuple[type[BaseException], ...] = ()
    fe = sys.modules.get("flax.errors")
    if fe is not None and isinstance(getattr(fe, "FlaxError", None), type):
        extra = (fe.FlaxError,)
    return (TypeError, ValueError, *_TRACE_ERRORS, *extra)


def _fail(e: BaseException, where: str = "jax adapter") -> AdapterError:
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    hint = ""
    name = type(e).__name__
    if "scalar-output" in text:
        hint = " (loss_fn must return ONE example's scalar loss; it is vmapped over samples)"
    elif name == "TraceContextError":
        hint = (" (a flax variable was changed inside the gradient trace: a model in "
                "training mode, or a loss that uses a module from an enclosing scope. Call "
                "model.eval() before recording, and use the model that loss_fn receives)")
    elif name == "ModifyScopeVariableError":
        hint = (" (linen collections are read-only here: call the module in eval mode, "
                "e.g. model(x, train=False) / BatchNorm(use_running_average=True))")
    return AdapterError(
        f"{where}: cannot compute per-sample gradients{hint}: {name}: {msg}; "
        f"supported: {SUPPORTED}"
    )


class _Split:
    """A model's leaves split into the selected (differentiated), frozen and baked-in ones.

    Selected leaves: float arrays that are trainable (``collections``) and pass
    ``param_filter``, in network order; their columns make the layout. Frozen: the other
    float arrays (and, for NNX, every other array: RNG keys and counts), traced arguments
    held fixed. Baked: the rest (Python scalars, functions, integer leaves of plain
    pytrees), constants of the compiled function.
    """

    def __init__(self, desc: ModelDesc, param_filter: ParamFilter | None,
                 where: str = "jax adapter", order: Sequence[str] | None = None) -> None:
        self.desc = desc
        self.treedef = desc.treedef
        self.leaves = list(desc.leaves)
        names = desc.names
        rank = list(desc.rank)
        if order is not None:  # keep an earlier layout's order (a recorder's writer)
            pos = {n: k for k, n in enumerate(order)}
            rank = [pos.get(n, len(pos) + r) for n, r in zip(names, rank, strict=True)]
        order = sorted(range(len(self.leaves)), key=lambda i: (rank[i], i))
        self.idx = [
            i for i in order
            if is_float_array(self.leaves[i]) and desc.trainable[i]
            and (param_filter is None or param_filter(names[i], self.leaves[i]))
        ]
        if not self.idx:
            raise AdapterError(
                f"{where}: the {desc.kind} model has no selected floating-point array leaves "
                "(check param_filter and collections); supported: " + SUPPORTED
            )
        self.names = [names[i] for i in self.idx]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise AdapterError(
                f"{where}: parameter names {dup} are not unique after joining key paths "
                f"with '.'; rename the keys; supported: {SUPPORTED}"
            )
        self.shapes = [tuple(int(s) for s in self.leaves[i].shape) for i in self.idx]
        self.P = sum(math.prod(s) for s in self.shapes)
        chosen = set(self.idx)
        traced = is_array if desc.trace_ints else is_float_array
        self.fidx = [i for i, leaf in enumerate(self.leaves) if i not in chosen and traced(leaf)]
        frozen = set(self.fidx)
        self.sidx = [i for i in range(len(self.leaves)) if i not in chosen and i not in frozen]

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(zip(self.names, self.shapes, strict=True))

    def selected(self) -> list[Any]:
        return [self.leaves[i] for i in self.idx]

    def frozen(self) -> list[Any]:
        return [self.leaves[i] for i in self.fidx]

    def tree(self, sel: Sequence[Any], frozen: Sequence[Any] | None = None) -> Any:
        leaves = list(self.leaves)
        for i, v in zip(self.idx, sel, strict=True):
            leaves[i] = v
        if frozen is not None:
            for i, v in zip(self.fidx, frozen, strict=True):
                leaves[i] = v
        return self.treedef.unflatten(leaves)

    def obj(self, sel: Sequence[Any], frozen: Sequence[Any] | None = None) -> Any:
        """What ``loss_fn`` receives: the model rebuilt with these leaves."""
        return self.desc.post(self.tree(sel, frozen))

    def compatible(self, other: _Split) -> bool:
        """Whether a function compiled for ``self`` computes ``other`` (new values only)."""
        if (other.treedef != self.treedef or other.idx != self.idx or other.fidx != self.fidx
                or self.desc.post_key is None or other.desc.post_key != self.desc.post_key):
            return False
        for i in self.sidx:
            a, b = self.leaves[i], other.leaves[i]
            if a is b:
                continue
            try:
                if not bool(np.array_equal(np.asarray(a), np.asarray(b))):
                    return False
            except (TypeError, ValueError):
                return False
        return True


def _batch_len(x: Any) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or not hasattr(leaves[0], "shape") or not leaves[0].shape:
        raise AdapterError(f"jax adapter: inputs have no batch axis; supported: {SUPPORTED}")
    return int(leaves[0].shape[0])


def _take(t: Any, idx: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[idx], t)


def _pad(t: Any, n: int, rows: int) -> Any:
    """Pad axis 0 from n to rows by repeating the last sample (no recompilation)."""
    def pad(a: Any) -> Any:
        a = jnp.asarray(a)
        return jnp.concatenate([a, jnp.repeat(a[-1:], rows - n, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, t)


def _labels(y: Any, n: int) -> np.ndarray | None:
    if hasattr(y, "shape") and hasattr(y, "dtype") and len(y.shape) == 1 and y.shape[0] == n:
        if jnp.issubdtype(y.dtype, jnp.integer) or jnp.issubdtype(y.dtype, jnp.floating):
            return np.asarray(y, dtype=np.float64)
    return None


_BUILD_CACHE: OrderedDict[Any, Callable[..., Any]] = OrderedDict()
_BUILD_CACHE_SIZE = 32


def _cache_key(split: _Split, loss_fn: Callable[..., Any], chunk_size: int | None) -> Any:
    if split.desc.post_key is None:
        return None
    static = tuple(split.leaves[i] for i in split.sidx)
    key = (loss_fn, split.treedef, tuple(split.idx), tuple(split.fidx), chunk_size,
           split.desc.post_key, static)
    try:
        hash(key)
    except TypeError:  # unhashable loss_fn or baked-in arrays
        return None
    return key


def _one_loss(split: _Split, loss_fn: Callable[..., Any]
              ) -> Callable[[list[Any], list[Any], Any, Any], jax.Array]:
    """``(selected, frozen, x_i, y_i) -> loss_fn(model rebuilt from the leaves, x_i, y_i)``."""
    # the closure keeps only baked-in leaves, never parameter arrays
    template = [leaf if i in split.sidx else None for i, leaf in enumerate(split.leaves)]
    treedef, idx, fidx, post = split.treedef, list(split.idx), list(split.fidx), split.desc.post

    def merge(sel: list[Any], frozen: list[Any]) -> Any:
        leaves = list(template)
        for i, v in zip(idx, sel, strict=True):
            leaves[i] = v
        for i, v in zip(fidx, frozen, strict=True):
            leaves[i] = v
        return post(treedef.unflatten(leaves))

    def one(sel: list[Any], frozen: list[Any], xi: Any, yi: Any) -> jax.Array:
        return jnp.asarray(loss_fn(merge(sel, frozen), xi, yi))

    return one


def _build_losses(split: _Split, loss_fn: Callable[..., Any]
                  ) -> Callable[..., jax.Array]:
    """jit(vmap(loss)): (selected, frozen, x, y) -> per-sample losses (n,), no gradients."""
    return jax.jit(jax.vmap(_one_loss(split, loss_fn), in_axes=(None, None, 0, 0)))


def _build(split: _Split, loss_fn: Callable[..., Any], chunk_size: int | None
           ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """jit(vmap(value_and_grad)): (selected leaves, frozen leaves, x, y) -> (G (n, P), loss).

    Cached (LRU) per loss function, tree structure, selection, rebuild (NNX graph, linen
    module) and hashable baked-in leaves, so repeated calls do not recompile.
    """
    key = _cache_key(split, loss_fn, chunk_size)
    if key is not None:
        hit = _BUILD_CACHE.get(key)
        if hit is not None:
            _BUILD_CACHE.move_to_end(key)
            return hit
    one = _one_loss(split, loss_fn)
    vg = jax.vmap(jax.value_and_grad(one), in_axes=(None, None, 0, 0))

    def flat(sel: list[Any], frozen: list[Any], x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
        if chunk_size is None:
            loss, g = vg(sel, frozen, x, y)
        else:  # bounded memory: lax.map over chunks of chunk_size samples
            def per(xy: tuple[Any, Any]) -> tuple[jax.Array, list[jax.Array]]:
                return jax.value_and_grad(one)(sel, frozen, *xy)

            loss, g = jax.lax.map(per, (x, y), batch_size=int(chunk_size))
        n = loss.shape[0]
        G = jnp.concatenate([gi.reshape(n, -1) for gi in g], axis=1)
        return G, loss

    fn = jax.jit(flat)
    if key is not None:
        _BUILD_CACHE[key] = fn
        while len(_BUILD_CACHE) > _BUILD_CACHE_SIZE:
            _BUILD_CACHE.popitem(last=False)
    return fn
