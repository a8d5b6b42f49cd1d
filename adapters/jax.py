"""JAX adapter: per-sample gradients of any parameter pytree with ``vmap(grad)``.

.. math:: g_i = \\nabla_\\theta\\, \\ell(\\theta, x_i, y_i) \\in \\mathbb{R}^P

computed as ``jax.jit(jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0)))`` and
flattened (inside the jitted function) in the order of
``jax.tree_util.tree_flatten_with_path(params)``. ``loss_fn(params, x, y)`` returns the
scalar loss of ONE example, so each gradient is that sample's own, never scaled by
``1/batch``.

Names come from key paths joined by dots: ``{"layer1": {"w": ...}}`` → ``"layer1.w"``,
``[{"w": ...}, ...]`` → ``"0.w"``, flax ``{"params": {"Dense_0": {"kernel"}}}`` →
``"params.Dense_0.kernel"`` (layer ``"params.Dense_0"``). Only floating-point array leaves
are parameters; integer leaves (step counters, indices) and non-array leaves are passed
through unchanged and excluded from the layout.

Entry points
------------
:func:`layout`, :func:`per_sample_gradients`, :class:`Recorder` / :func:`record`,
:func:`open_writer`, :func:`mean_loss`, :func:`record_trajectory`, :func:`probe_osgr`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import (
    DictKey,
    FlattenedIndexKey,
    GetAttrKey,
    SequenceKey,
    tree_flatten_with_path,
)

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import (
    AsyncWriter,
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
    "loss_fn(params, x, y) returning the scalar loss of ONE example, written with "
    "jax.numpy/lax so that jit, vmap and grad can trace it (no Python control flow on "
    "values, no NumPy calls on traced arrays); params any pytree (dicts, lists, tuples, "
    "registered dataclasses, flax/haiku/equinox parameters) whose floating-point array "
    "leaves are the parameters; inputs and targets arrays (or pytrees of arrays) with the "
    "samples on axis 0"
)

ParamFilter = Callable[[str, Any], bool]

_TRACE_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(jax.errors, n) for n in (
        "ConcretizationTypeError", "TracerArrayConversionError", "TracerBoolConversionError",
        "TracerIntegerConversionError", "UnexpectedTracerError", "NonConcreteBooleanIndexError",
    ) if hasattr(jax.errors, n)
)


# --------------------------------------------------------------------------------------
# Names and selection
# --------------------------------------------------------------------------------------


def _key_str(k: Any) -> str:
    if isinstance(k, DictKey):
        return str(k.key)
    if isinstance(k, GetAttrKey):
        return str(k.name)
    if isinstance(k, SequenceKey):
        return str(k.idx)
    if isinstance(k, FlattenedIndexKey):
        return str(k.key)
    return str(k).strip(".[]'\"")


def path_name(path: Sequence[Any]) -> str:
    """Dotted name of a pytree key path: ``(DictKey('a'), SequenceKey(0))`` → ``"a.0"``."""
    return ".".join(_key_str(k) for k in path) or "params"


def _is_param(leaf: Any) -> bool:
    dt = getattr(leaf, "dtype", None)
    return (dt is not None and hasattr(leaf, "shape")
            and bool(jnp.issubdtype(dt, jnp.inexact)))


class _Split:
    """A params pytree split into the selected leaves (differentiated) and the rest."""

    def __init__(self, params: Any, param_filter: ParamFilter | None) -> None:
        try:
            flat, self.treedef = tree_flatten_with_path(params)
        except Exception as e:  # noqa: BLE001 - any failure to flatten is unsupported input
            raise AdapterError(f"jax adapter: cannot flatten params ({e}); supported: "
                               f"{SUPPORTED}") from e
        self.leaves = [leaf for _, leaf in flat]
        names = [path_name(p) for p, _ in flat]
        self.idx = [
            i for i, leaf in enumerate(self.leaves)
            if _is_param(leaf) and (param_filter is None or param_filter(names[i], leaf))
        ]
        if not self.idx:
            raise AdapterError(
                "jax adapter: params have no selected floating-point array leaves (check "
                f"param_filter); supported: {SUPPORTED}"
            )
        self.names = [names[i] for i in self.idx]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise AdapterError(
                f"jax adapter: parameter names {dup} are not unique after joining key paths "
                f"with '.'; rename the keys; supported: {SUPPORTED}"
            )
        self.shapes = [tuple(int(s) for s in self.leaves[i].shape) for i in self.idx]
        self.P = sum(math.prod(s) for s in self.shapes)
        # unselected float arrays are traced arguments (frozen parameters); everything else
        # (integer arrays, Python scalars, strings) is baked into the traced function
        chosen = set(self.idx)
        self.fidx = [i for i, leaf in enumerate(self.leaves) if i not in chosen and _is_param(leaf)]
        self.sidx = [i for i in range(len(self.leaves)) if i not in chosen and i not in self.fidx]

    def selected(self, leaves: Sequence[Any] | None = None) -> list[Any]:
        src = self.leaves if leaves is None else leaves
        return [src[i] for i in self.idx]

    def frozen(self, leaves: Sequence[Any] | None = None) -> list[Any]:
        src = self.leaves if leaves is None else leaves
        return [src[i] for i in self.fidx]

    def merge(self, sel: Sequence[Any], frozen: Sequence[Any] | None = None) -> Any:
        leaves = list(self.leaves)
        for i, v in zip(self.idx, sel, strict=True):
            leaves[i] = v
        if frozen is not None:
            for i, v in zip(self.fidx, frozen, strict=True):
                leaves[i] = v
        return self.treedef.unflatten(leaves)

    def static_changed(self, leaves: Sequence[Any]) -> bool:
        """Whether non-parameter leaves differ from those baked into the traced function."""
        for i in self.sidx:
            a, b = self.leaves[i], leaves[i]
            if a is b:
                continue
            try:
                if not bool(np.array_equal(np.asarray(a), np.asarray(b))):
                    return True
            except (TypeError, ValueError):
                return True
        return False

    def same_structure(self, params: Any) -> list[Any]:
        """Leaves of ``params`` (same tree structure as at construction)."""
        flat, treedef = tree_flatten_with_path(params)
        if treedef != self.treedef:
            raise AdapterError(
                "jax adapter: params changed structure since the layout was made; supported: "
                "the same pytree structure at every record"
            )
        return [leaf for _, leaf in flat]


def layout(params: Any, *, param_filter: ParamFilter | None = None
           ) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter layout of a params pytree: ``[(name, shape), ...]`` in flat order.

    Parameters
    ----------
    params : pytree
        Parameters; floating-point array leaves are included, named by their key paths.
    param_filter : callable (name, leaf) -> bool, optional
        Keep only the leaves for which it returns True.

    Returns
    -------
    list of (str, tuple of int)
        What ``GradientWriter(path, params=...)`` takes; the columns of
        :func:`per_sample_gradients` follow this order.
    """
    s = _Split(params, param_filter)
    return list(zip(s.names, s.shapes, strict=True))


def open_writer(path: Any, params: Any, *, param_filter: ParamFilter | None = None,
                attrs: dict[str, Any] | None = None, params_subset: Any = None,
                project: Any = None, seed: int = 0, **writer_kwargs: Any) -> Any:
    """A ``gsnr_stats.GradientWriter`` for ``params``' layout with JAX provenance attrs.

    ``params_subset``/``project``/``seed`` as in :class:`Recorder`: the writer gets the
    subsampled or projected layout and its description in the user attributes.
    """
    import gsnr_stats as gs

    a = {"framework": "jax", "framework_version": jax.__version__}
    a.update(attrs or {})
    tf = _moments.make_transform(layout(params, param_filter=param_filter), params_subset,
                                 project, seed)
    return gs.GradientWriter(path, tf.layout, attrs=_moments.writer_attrs(tf, a),
                             **writer_kwargs)


# --------------------------------------------------------------------------------------
# Core computation
# --------------------------------------------------------------------------------------


def _fail(e: BaseException) -> AdapterError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ""
    if "scalar-output" in str(e):
        hint = " (loss_fn must return ONE example's scalar loss; it is vmapped over samples)"
    return AdapterError(
        f"jax adapter: cannot compute per-sample gradients{hint}: {type(e).__name__}: {msg}; "
        f"supported: {SUPPORTED}"
    )


def _batch_len(x: Any) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or not hasattr(leaves[0], "shape") or not leaves[0].shape:
        raise AdapterError(f"jax adapter: inputs have no batch axis; supported: {SUPPORTED}")
    return int(leaves[0].shape[0])


def _take(t: Any, idx: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[idx], t)


_BUILD_CACHE: OrderedDict[Any, Callable[..., Any]] = OrderedDict()
_BUILD_CACHE_SIZE = 32


def _build(split: _Split, loss_fn: Callable[..., Any], chunk_size: int | None
           ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """jit(vmap(value_and_grad)): (selected leaves, frozen leaves, x, y) -> (G (n, P), loss).

    Cached (LRU) per loss function, tree structure and selection when the tree has no
    baked-in (non-float) leaves, so repeated calls do not recompile.
    """
    key = None
    if not split.sidx:
        key = (loss_fn, split.treedef, tuple(split.idx), tuple(split.fidx), chunk_size)
        try:
            hit = _BUILD_CACHE.get(key)
        except TypeError:  # unhashable loss_fn
            key, hit = None, None
        if hit is not None:
            _BUILD_CACHE.move_to_end(key)
            return hit
    # the closure keeps only baked-in leaves, never parameter arrays
    template = [leaf if i in split.sidx else None for i, leaf in enumerate(split.leaves)]
    treedef, idx, fidx = split.treedef, list(split.idx), list(split.fidx)

    def merge(sel: list[Any], frozen: list[Any]) -> Any:
        leaves = list(template)
        for i, v in zip(idx, sel, strict=True):
            leaves[i] = v
        for i, v in zip(fidx, frozen, strict=True):
            leaves[i] = v
        return treedef.unflatten(leaves)

    def one(sel: list[Any], frozen: list[Any], xi: Any, yi: Any) -> jax.Array:
        return jnp.asarray(loss_fn(merge(sel, frozen), xi, yi))

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


def per_sample_gradients(
    loss_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    inputs: Any,
    targets: Any,
    *,
    param_filter: ParamFilter | None = None,
    chunk_size: int | None = None,
    return_loss: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients of each example's own loss, as an ``(n, P)`` array.

    .. math:: G_{i,:} = \\nabla_\\theta\\, \\texttt{loss\\_fn}(\\theta, x_i, y_i)

    Not scaled by ``1/n``: :math:`\\sum_i G_{i,:}` is the gradient of the summed loss.

    Parameters
    ----------
    loss_fn : callable (params, x, y) -> scalar
        Loss of ONE example (it is vmapped over axis 0 of ``inputs`` and ``targets``).
    params : pytree
        Parameters; floating-point array leaves are differentiated (see :func:`layout`).
    inputs, targets : array or pytree of arrays
        Samples on axis 0.
    param_filter : callable (name, leaf) -> bool, optional
        Differentiate only these leaves; the others are held fixed.
    chunk_size : int, optional
        Samples per step of a ``lax.map``; bounds peak memory.
    return_loss : bool
        Also return the ``(n,)`` per-sample losses (float64).

    Returns
    -------
    ndarray, shape (n, P)
        In :func:`layout` order; with ``return_loss``, ``(gradients, losses)``.

    Raises
    ------
    AdapterError
        No float leaves, non-scalar loss, or a loss that JAX cannot trace.
    """
    split = _Split(params, param_filter)
    fn = _build(split, loss_fn, chunk_size)
    try:
        G, loss = fn(split.selected(), split.frozen(), inputs, targets)
        G = np.asarray(G)
    except (TypeError, ValueError, *_TRACE_ERRORS) as e:
        raise _fail(e) from e
    if return_loss:
        return G, np.asarray(loss, dtype=np.float64)
    return G


# --------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------


def _resolve_lr(lr: float | Callable[[int], Any] | None, step: int) -> float:
    if lr is None:
        return math.nan
    if callable(lr):  # e.g. an optax schedule
        return float(np.asarray(lr(step)))
    return float(lr)


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


def _limited(batches: Iterable[Any], max_samples: int | None,
             where: str) -> Iterator[tuple[Any, Any, Any, int]]:
    """``(x, y, sample_id, n)`` of each non-empty batch, the last cut at ``max_samples``."""

    def cut(x: Any, y: Any, sid: Any, n: int) -> tuple[Any, Any, Any]:
        return (_take(x, slice(0, n)), _take(y, slice(0, n)),
                None if sid is None else sid[:n])

    return limited_batches(batches, max_samples, where, _batch_len, cut)


class Recorder:
    """Write per-sample gradient records of a JAX model, batch by batch.

    JAX dispatches asynchronously: the next batch is dispatched while a background thread
    waits for the previous one, copies it to host and writes it. A ragged last batch is
    padded to the first batch's size, so the jitted function compiles once per record.

    Parameters
    ----------
    writer : GradientWriter
        Open writer whose layout is :func:`layout` of the params (same filter).
    loss_fn : callable (params, x, y) -> scalar
        As in :func:`per_sample_gradients`.
    params : pytree
        Parameters giving the structure (values are passed to :meth:`record`).
    param_filter, chunk_size :
        As in :func:`per_sample_gradients`.
    lr : float or callable (step) -> float, optional
        Learning rate stored with each record (an optax schedule works).
    progress : bool or dict
        Show a tqdm progress bar (a dict is passed to tqdm).
    max_pending : int
        Batches queued for the writer thread; 0 writes synchronously.
    store_labels : bool
        Store 1-D targets as labels.
    keep : {"grads", "moments"}
        ``"moments"``: store ``(count, mean, M2)`` blocks (float64), reduced on the fly with
        the two-pass kernel, instead of per-sample gradients (no per-sample losses).
    params_subset, project, seed, block_size :
        Parameter subsampling, JL projection and moments blocks, as in the torch
        ``Recorder`` (``adapters/_moments.py``); create the writer with the same options.
    """

    def __init__(
        self,
        writer: Any,
        loss_fn: Callable[[Any, Any, Any], Any],
        params: Any,
        *,
        param_filter: ParamFilter | None = None,
        chunk_size: int | None = None,
        lr: float | Callable[[int], Any] | None = None,
        progress: bool | dict[str, Any] = False,
        max_pending: int = 2,
        store_labels: bool = True,
        keep: str = "grads",
        params_subset: Any = None,
        project: Any = None,
        seed: int = 0,
        block_size: int | None = None,
    ) -> None:
        self.writer = writer
        self._param_filter = param_filter
        self._split = _Split(params, param_filter)
        self._keep = _moments.check_keep(keep, "jax Recorder")
        self._tf = _moments.make_transform(
            list(zip(self._split.names, self._split.shapes, strict=True)), params_subset,
            project, seed)
        self._block_size = block_size
        check_layout_matches(writer, [(n, s) for n, s, _ in self._tf.layout], "jax Recorder")
        _moments.check_writer(writer, self._tf, "jax Recorder")
        self._loss_fn, self._chunk_size = loss_fn, chunk_size
        self._fn = _build(self._split, loss_fn, chunk_size)
        self.lr = lr
        self.progress = progress
        self.max_pending = int(max_pending)
        self.store_labels = store_labels

    def record(
        self,
        params: Any,
        data: Iterable[Any] | Sequence[Any],
        step: int,
        split: str,
        *,
        batch_size: int | None = None,
        lr: float | None = None,
        epoch: float | None = None,
        max_samples: int | None = None,
    ) -> RecordSummary:
        """Compute and write the record ``(step, split)`` at ``params``; complete it.

        Parameters
        ----------
        params : pytree
            Parameters at this checkpoint (same structure as at construction).
        data : iterable of batches or tuple of arrays
            Batches ``(inputs, targets[, sample_id])`` (any iterator, e.g. a
            ``tf.data``/``grain`` numpy iterator), or with ``batch_size`` a tuple of arrays.
        step, split : int, str
            The record's key.
        batch_size : int, optional
            See ``data``.
        lr, epoch : float, optional
            Stored with the record; ``lr`` defaults to the recorder's ``lr`` at ``step``.
        max_samples : int, optional
            Stop after this many samples.

        Returns
        -------
        RecordSummary
        """
        leaves = self._split.same_structure(params)
        if self._split.static_changed(leaves):  # e.g. an integer leaf: retrace with new value
            self._split = _Split(params, self._param_filter)
            self._fn = _build(self._split, self._loss_fn, self._chunk_size)
        sel, frozen = self._split.selected(leaves), self._split.frozen(leaves)
        batches, total = iter_data(data, batch_size, "jax Recorder.record")
        if max_samples is not None:
            total = max_samples if total is None else min(total, max_samples)
        lr_v = as_float(lr) if lr is not None else _resolve_lr(self.lr, int(step))
        ep = as_float(epoch)
        if self._keep == "moments" or self._tf.active:
            return self._record_small(sel, frozen, batches, total, step, split, lr_v, ep,
                                      max_samples)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        rows, seen = 0, 0
        loss_parts: list[np.ndarray] = []
        try:
            with AsyncWriter(self.writer, self.max_pending) as aw:
                for x, y, sid, n in _limited(batches, max_samples, "jax Recorder.record"):
                    rows = max(rows, n)
                    if n < rows:
                        x, y = _pad(x, n, rows), _pad(y, n, rows)
                    try:
                        G, loss = self._fn(sel, frozen, x, y)  # asynchronous dispatch
                    except (TypeError, ValueError, *_TRACE_ERRORS) as e:
                        raise _fail(e) from e

                    def grads_np(G: jax.Array = G, n: int = n) -> np.ndarray:
                        return np.asarray(G)[:n]

                    def loss_np(loss: jax.Array = loss, n: int = n) -> np.ndarray:
                        a = np.asarray(loss, dtype=np.float64)[:n]
                        loss_parts.append(a)
                        return a

                    label = _labels(y, rows) if self.store_labels else None
                    aw.write(step, split, grads=grads_np, loss=loss_np,
                             sample_id=None if sid is None else np.asarray(sid, np.int64),
                             label=None if label is None else label[:n], lr=lr_v, epoch=ep)
                    seen += n
                    bar.update(n)
                if seen == 0:
                    raise AdapterError(
                        f"jax Recorder.record: no samples in data for record (step={step}, "
                        f"split={split!r})"
                    )
                aw.end_record(step, split)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        mean = float(np.concatenate(loss_parts).mean())
        return RecordSummary(int(step), split, seen, mean, lr_v, ep)


    def _record_small(self, sel: list[Any], frozen: list[Any], batches: Any, total: int | None,
                      step: int, split: str, lr_v: float, ep: float, max_samples: int | None
                      ) -> RecordSummary:
        """:meth:`record` for ``keep="moments"`` and/or ``params_subset``/``project``:
        per-sample gradients of each batch, transformed, then reduced to a moments block
        (``adapters/_moments.py``) or written; synchronous.
        """
        tf = self._tf
        P_out = sum(math.prod(s) for _, s, _ in tf.layout)
        mom = (_moments.MomentsBlocks(self.writer, step, split, P_out, self._block_size,
                                      lr=lr_v, epoch=ep, names=tf.layout)
               if self._keep == "moments" else None)
        bar = progress_bar(self.progress, total, f"step {step} {split}")
        rows, seen, loss_sum = 0, 0, 0.0
        try:
            for x, y, sid, n in _limited(batches, max_samples, "jax Recorder.record"):
                rows = max(rows, n)
                label = _labels(y, n) if self.store_labels else None
                if n < rows:
                    x, y = _pad(x, n, rows), _pad(y, n, rows)
                try:
                    G, loss = self._fn(sel, frozen, x, y)
                except (TypeError, ValueError, *_TRACE_ERRORS) as e:
                    raise _fail(e) from e
                G = tf.apply(np.asarray(G)[:n])
                loss = np.asarray(loss, dtype=np.float64)[:n]
                if mom is not None:
                    mom.add_samples(G)
                else:
                    self.writer.write(step, split, G, loss=loss,
                                      sample_id=None if sid is None else np.asarray(sid, np.int64),
                                      label=label, lr=lr_v, epoch=ep)
                loss_sum += float(loss.sum())
                seen += n
                bar.update(n)
            if seen == 0:
                raise AdapterError(
                    f"jax Recorder.record: no samples in data for record (step={step}, "
                    f"split={split!r})"
                )
            if mom is not None:
                mom.finish()
            else:
                self.writer.end_record(step, split)
        except BaseException:
            abort_record(self.writer, step, split)
            raise
        finally:
            bar.close()
        return RecordSummary(int(step), split, seen, loss_sum / seen, lr_v, ep)


def record(
    writer: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    params: Any,
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
    return Recorder(writer, loss_fn, params, **recorder_kwargs).record(
        params, data, step, split, batch_size=batch_size, lr=lr, epoch=epoch,
        max_samples=max_samples)


# --------------------------------------------------------------------------------------
# Loss trajectories and the OSGR probe
# --------------------------------------------------------------------------------------


def _mean_loss_fn(loss_fn: Callable[..., Any]) -> Callable[..., jax.Array]:
    def f(params: Any, x: Any, y: Any) -> jax.Array:
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, x, y))

    return f


def mean_loss(
    loss_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    data: Iterable[Any] | Sequence[Any],
    *,
    batch_size: int | None = None,
) -> float:
    """Mean per-example loss :math:`\\frac{1}{N}\\sum_i \\ell(\\theta, x_i, y_i)` over ``data``."""
    f = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0, 0)))
    batches, _ = iter_data(data, batch_size, "jax mean_loss")
    total, count = 0.0, 0
    for batch in batches:
        x, y, _ = split_batch(batch, "jax mean_loss")
        try:
            loss = np.asarray(f(params, x, y), dtype=np.float64)
        except (TypeError, ValueError, *_TRACE_ERRORS) as e:
            raise _fail(e) from e
        total += float(loss.sum())
        count += loss.shape[0]
    if count == 0:
        raise AdapterError("jax mean_loss: data has no samples")
    return total / count


def record_trajectory(
    writer: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    train_data: Iterable[Any] | Sequence[Any],
    test_data: Iterable[Any] | Sequence[Any],
    *,
    step: int,
    lr: float | Callable[[int], Any] | None = None,
    epoch: float = math.nan,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Write one loss-trajectory row: mean train and test loss at :math:`\\theta_t`.

    Call it before each real optimizer step ``t`` (and once after the last):

    .. math:: R_t = \\frac{L_{test}(\\theta_t) - L_{test}(\\theta_{t+1})}
                         {L_{train}(\\theta_t) - L_{train}(\\theta_{t+1})}.

    ``lr`` (float or schedule) is the rate of the step from θ_t.
    """
    tr = mean_loss(loss_fn, params, train_data, batch_size=batch_size)
    te = mean_loss(loss_fn, params, test_data, batch_size=batch_size)
    writer.write_trajectory(int(step), _resolve_lr(lr, int(step)), tr, te, epoch=float(epoch))
    return tr, te


def probe_osgr(
    loss_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    pool_a: Sequence[Any],
    pool_b: Sequence[Any],
    *,
    n: int,
    lr: float,
    K: int = 16,
    step: int = 0,
    writer: Any = None,
    seed: int | np.random.Generator | None = 0,
    param_filter: ParamFilter | None = None,
) -> ProbeResult:
    """Measure the one-step generalization ratio by virtual gradient steps.

    For :math:`k = 1..K`: draw :math:`D_k` (``n`` samples of pool A) and :math:`D'_k`
    (``n`` samples of the disjoint pool B), step :math:`\\theta' = \\theta - \\lambda
    \\nabla L[D_k]` with :math:`L[D] = \\frac{1}{|D|} \\sum_{i \\in D} \\ell_i`, and

    .. math:: R = \\frac{\\sum_k L_{D'_k}(\\theta) - L_{D'_k}(\\theta')}
                        {\\sum_k L_{D_k}(\\theta) - L_{D_k}(\\theta')}

    (``ProbeResult.ratio``); it approaches the theoretical ``R(n)`` as λ → 0. ``params``
    are not modified (JAX arrays are immutable); only selected leaves move.

    Parameters
    ----------
    loss_fn : callable (params, x, y) -> scalar
        Loss of ONE example.
    params : pytree
        Parameters θ.
    pool_a, pool_b : (inputs, targets)
        Disjoint pools of the same distribution, samples on axis 0.
    n, lr, K, step : int, float, int, int
        Draw size, virtual learning rate λ, number of draws, checkpoint label.
    writer : GradientWriter, optional
        Receives ``K`` ``write_probe`` rows.
    seed : int or numpy Generator, optional
        Randomness of the draws.
    param_filter : callable (name, leaf) -> bool, optional
        Move only these leaves in the virtual step.

    Returns
    -------
    ProbeResult
    """
    split = _Split(params, param_filter)
    mean_f = _mean_loss_fn(loss_fn)
    mean_j = jax.jit(mean_f)

    def sel_loss(sel: list[Any], x: Any, y: Any) -> jax.Array:
        return mean_f(split.merge(sel), x, y)

    grad_j = jax.jit(jax.grad(sel_loss))
    pools = {"a": tuple(pool_a[:2]), "b": tuple(pool_b[:2])}
    theta = split.selected()

    def mean_at(sel: list[Any], which: str, idx: np.ndarray) -> float:
        x, y = pools[which]
        try:
            return float(mean_j(split.merge(sel), _take(x, idx), _take(y, idx)))
        except (TypeError, ValueError, *_TRACE_ERRORS) as e:
            raise _fail(e) from e

    def virtual(idx: np.ndarray) -> list[Any]:
        x, y = pools["a"]
        g = grad_j(theta, _take(x, idx), _take(y, idx))
        return [t - lr * gi for t, gi in zip(theta, g, strict=True)]

    return run_probe(size_a=_batch_len(pools["a"][0]), size_b=_batch_len(pools["b"][0]),
                     n=n, K=K, lr=lr, step=step, seed=seed, mean_loss=mean_at,
                     virtual_step=virtual, theta=theta, writer=writer)
