"""JAX adapter: per-sample gradients of params pytrees, flax and equinox models.

.. math:: g_i = \\nabla_\\theta\\, \\ell(\\theta, x_i, y_i) \\in \\mathbb{R}^P

computed as ``jax.jit(jax.vmap(jax.value_and_grad(loss)))`` over the samples and flattened
inside the jitted function. ``loss_fn(model, x, y)`` returns the scalar loss of ONE
example (``x``, ``y`` without the batch axis), so each gradient is that sample's own,
never scaled by ``1/batch``.

Models. The same calls take a params pytree, an ``nnx.Module``, an equinox ``Module`` or
a ``(linen module, variables)`` pair; ``loss_fn`` receives the model rebuilt from the
parameters being differentiated (the pytree, the NNX/equinox module, the linen module
bound to its variables), so it reads as in the flax and equinox tutorials::

    def loss_fn(model, x, y):          # one example
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

Only trainable parameters are differentiated by default (``nnx.Param``; linen's
``params`` collection; equinox's inexact arrays; every float leaf of a pytree), the rest
is held fixed; ``collections=`` and ``param_filter=`` choose others. Names are clean
(``l1.kernel``, layer ``l1``) and in network order where the library exposes one (NNX:
attribute definition order; linen: call order; equinox: field order; a pytree: key paths
in ``jax.tree_util`` order, ``"layer1.w"``, ``"0.w"``). A model in training mode is
recorded as in eval mode unless ``mode="as_is"``. ``adapters/_jax_models.py`` has
the table; ``docs/adapters.md`` the differences to the torch and sklearn adapters.

Argument order (the same as the torch adapter): ``per_sample_gradients(model, loss_fn,
inputs, targets)``, ``Recorder(writer, model, loss_fn)``, ``record(data, step, split)``.
The order of earlier releases (``loss_fn, params``) is still accepted, with a
``DeprecationWarning``, for one release.

Entry points
------------
:func:`layout`, :func:`per_sample_gradients`, :class:`Recorder` / :func:`record`,
:func:`open_writer`, :func:`mean_loss`, :func:`record_trajectory`, :func:`probe_osgr`,
:func:`per_sample_factors` (factored records, ``keep="factors"``).
This module is the public API; the model handling is ``_jax_models.py``, the jitted
engine ``_jax_engine.py``, the recorder ``_jax_record.py``, the optimizer's update count
``_jax_optax.py``, the factored kernels ``_jax_factors.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsnr_stats.errors import AdapterError

from . import _moments
from ._common import ProbeResult, RecordSummary, Unpack, iter_data, run_probe, split_batch
from ._jax_engine import (
    SUPPORTED,
    ParamFilter,
    _batch_len,
    _build,
    _build_losses,
    _fail,
    _one_loss,
    _Split,
    _take,
    caught,
)
from ._jax_models import describe, is_linen_pair, is_model, model_and_loss, path_name
from ._jax_record import JAX_NO_FACTORS, Recorder, _resolve_lr
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
    "path_name",
    "per_sample_factors",
    "per_sample_gradients",
    "probe_osgr",
    "record",
    "record_trajectory",
]


def _split(model: Any, param_filter: ParamFilter | None, collections: Any = None,
           mode: str = "eval", where: str = "jax adapter") -> _Split:
    desc = describe(model, collections=collections, mode=mode, where=where,
                    supported=SUPPORTED)
    return _Split(desc, param_filter, where)


def layout(model: Any, *, param_filter: ParamFilter | None = None,
           collections: Any = None) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter layout of a model: ``[(name, shape), ...]`` in flat order.

    Parameters
    ----------
    model : pytree, nnx.Module, equinox Module or (linen module, variables)
        See the module docstring: trainable parameters by default, clean names, network
        order where the library exposes one.
    param_filter : callable (name, leaf) -> bool, optional
        Keep only the leaves for which it returns True.
    collections : "all", NNX filter or linen collection names, optional
        Which variables count as parameters (default: the trainable ones).

    Returns
    -------
    list of (str, tuple of int)
        What ``GradientWriter(path, params=...)`` takes; the columns of
        :func:`per_sample_gradients` follow this order.
    """
    return _split(model, param_filter, collections, where="jax layout").layout


def open_writer(path: Any, model: Any, *, param_filter: ParamFilter | None = None,
                collections: Any = None, attrs: dict[str, Any] | None = None,
                params_subset: Any = None, project: Any = None, seed: int = 0,
                factors: Any = None, loss_fn: Callable[..., Any] | None = None,
                example: Any = None, **writer_kwargs: Any) -> Any:
    """A ``gsnr_stats.GradientWriter`` for ``model``'s layout with JAX provenance attrs.

    ``params_subset``/``project``/``seed`` as in :class:`Recorder`: the writer gets the
    subsampled or projected layout and its description in the user attributes.

    ``factors`` opens a factored store for ``Recorder(..., keep="factors")``: ``"auto"``
    (needs ``loss_fn`` and ``example=(inputs, targets)``, one batch) takes every kernel used
    once per example in one ``dot_general`` with its layer's input whose ``T`` factor rows
    are fewer numbers than its gradient, :math:`T (r_0 + r_1) < r_0 r_1`
    (``adapters/_jax_factors.py``); a list names the kernels. Biases stay plain columns.
    When no kernel qualifies, a writer of full gradients and a warning.
    """
    import gsnr_stats as gs

    a: dict[str, Any] = {"framework": "jax", "framework_version": jax.__version__}
    if is_model(model):
        a["model"] = type(model[0] if is_linen_pair(model) else model).__name__
    a.update(attrs or {})
    lay = layout(model, param_filter=param_filter, collections=collections)
    tf = _moments.make_transform(lay, params_subset, project, seed)
    if factors is not None:
        if tf.active:
            raise AdapterError("jax open_writer: factors= stores whole tensors' factors; "
                               "params_subset/project do not apply")
        taps = _taps(model, loss_fn, factors, example, param_filter, collections,
                     "jax open_writer")
        if taps:
            writer_kwargs["factors"] = [gs.FactorSpec(t.name, rows=t.T) for t in taps]
            leaf = _split(model, param_filter, collections).selected()[taps[0].k]
            writer_kwargs.setdefault("factor_dtype", str(np.dtype(leaf.dtype)))
        else:
            warnings.warn(JAX_NO_FACTORS, UserWarning, stacklevel=2)
    return gs.GradientWriter(path, tf.layout, attrs=_moments.writer_attrs(tf, a),
                             **writer_kwargs)


def _taps(model: Any, loss_fn: Any, factors: Any, example: Any,
          param_filter: ParamFilter | None, collections: Any, where: str) -> list[Any]:
    """The kernels meant by ``factors`` (``"auto"`` or names), found on ``example``."""
    from ._jax_factors import JaxFactors, auto_taps

    if loss_fn is None or example is None:
        raise AdapterError(f"{where}: factors= needs loss_fn= and example=(inputs, targets), "
                           "one batch: the kernels are found on the per-example loss")
    split = _split(model, param_filter, collections, where=where)
    first = jax.tree_util.tree_map(lambda v: jnp.asarray(v)[0], tuple(example))
    taps = JaxFactors(split, loss_fn, *first).taps
    if isinstance(factors, str) and factors == "auto":
        return auto_taps(taps)
    if isinstance(factors, str) or not isinstance(factors, Sequence):
        raise AdapterError(f"{where}: factors must be 'auto' or a list of kernel names, got "
                           f"{factors!r}")
    names = [str(getattr(f, "weight", f)) for f in factors]
    bad = [n for n in names if n not in {t.name for t in taps}]
    if bad:
        raise AdapterError(f"{where}: {bad} cannot be factored (supported: kernels used once "
                           f"per example in one dot_general with the layer's input: "
                           f"{[t.name for t in taps]})")
    return [t for t in taps if t.name in names]


def per_sample_factors(
    model: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    inputs: Any,
    targets: Any,
    *,
    factors: Any = "auto",
    param_filter: ParamFilter | None = None,
    collections: Any = None,
    return_loss: bool = False,
) -> tuple[Any, ...]:
    """Per-sample gradients with the dense kernels as their exact factors.

    A kernel ``W`` ``(r0, r1)`` used once per example in one ``dot_general`` with its
    layer's input rows :math:`a_t` has :math:`\\nabla_W \\ell_i = \\sum_t D_{it}
    A_{it}^\\top`: for flax's ``(in, out)`` kernels ``D = a``, ``A = \\delta``, for
    equinox's ``(out, in)`` weights ``D = \\delta``, ``A = a``, with :math:`\\delta_t` the
    gradient of the example's loss with respect to the product's output
    (``adapters/_jax_factors.py``).

    Returns
    -------
    plain : ndarray (n, P_plain)
        The other leaves' per-sample gradients, :func:`layout` order.
    factors : dict name -> (A (n, T, r1), D (n, T, r0))
    """
    taps = _taps(model, loss_fn, factors, (inputs, targets), param_filter, collections,
                 "jax per_sample_factors")
    from ._jax_factors import JaxFactors

    split = _split(model, param_filter, collections, where="jax per_sample_factors")
    first = jax.tree_util.tree_map(lambda v: jnp.asarray(v)[0], (inputs, targets))
    jf = JaxFactors(split, loss_fn, *first, names={t.name for t in taps})
    try:
        G, facs, loss = jf.fn(split.selected(), split.frozen(), inputs, targets)
    except caught() as e:
        raise _fail(e, "jax per_sample_factors") from e
    out: tuple[Any, ...] = (np.asarray(G), {k: (np.asarray(a), np.asarray(d))
                                            for k, (a, d) in facs.items()})
    if return_loss:
        out += (np.asarray(loss, dtype=np.float64),)
    return out


def per_sample_gradients(
    model: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    inputs: Any,
    targets: Any,
    *,
    param_filter: ParamFilter | None = None,
    collections: Any = None,
    mode: str = "eval",
    chunk_size: int | None = None,
    return_loss: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients of each example's own loss, as an ``(n, P)`` array.

    .. math:: G_{i,:} = \\nabla_\\theta\\, \\texttt{loss\\_fn}(\\theta, x_i, y_i)

    Not scaled by ``1/n``: :math:`\\sum_i G_{i,:}` is the gradient of the summed loss.

    Parameters
    ----------
    model : pytree, nnx.Module, equinox Module or (linen module, variables)
        Trainable parameters are differentiated (see :func:`layout`), the rest held fixed.
    loss_fn : callable (model, x, y) -> scalar
        Loss of ONE example (vmapped over axis 0 of ``inputs`` and ``targets``); receives
        the model rebuilt from the parameters (the module itself for NNX/equinox, the bound
        module for linen, the pytree otherwise).
    inputs, targets : array or pytree of arrays
        Samples on axis 0.
    param_filter : callable (name, leaf) -> bool, optional
        Differentiate only these leaves; the others are held fixed.
    collections : "all", NNX filter or linen collection names, optional
        Which variables count as parameters (default: the trainable ones).
    mode : {"eval", "as_is"}
        A model in training mode is differentiated as in eval mode (default; the model is
        left in its mode) or, with ``"as_is"``, refused.
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
        No float leaves, non-scalar loss, a loss that JAX cannot trace, a model in
        training mode with ``mode="as_is"``.

    Notes
    -----
    ``per_sample_gradients(loss_fn, params, inputs, targets)`` (earlier releases) is
    accepted with a ``DeprecationWarning``.
    """
    model, loss_fn = model_and_loss(model, loss_fn, "jax per_sample_gradients",
                                    "per_sample_gradients(model, loss_fn, inputs, targets)",
                                    "per_sample_gradients(loss_fn, params, inputs, targets)")
    split = _split(model, param_filter, collections, mode, "jax per_sample_gradients")
    fn = _build(split, loss_fn, chunk_size)
    try:
        G, loss = fn(split.selected(), split.frozen(), inputs, targets)
        G = np.asarray(G)
    except caught() as e:
        raise _fail(e, "jax per_sample_gradients") from e
    if return_loss:
        return G, np.asarray(loss, dtype=np.float64)
    return G


def record(
    writer: Any,
    model: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    data: Iterable[Any] | Sequence[Any],
    step: int,
    split: str,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    epoch: float | None = None,
    max_samples: int | None = None,
    optimizer_step: int | None = None,
    opt_state: Any = None,
    unpack: Unpack | None = None,
    **recorder_kwargs: Any,
) -> RecordSummary:
    """One record ``(step, split)`` through a fresh :class:`Recorder` (see there).

    ``record(writer, loss_fn, params, data, step, split)`` (earlier releases) is accepted
    with a ``DeprecationWarning``.
    """
    model, loss_fn = model_and_loss(model, loss_fn, "jax record",
                                    "record(writer, model, loss_fn, data, step, split)",
                                    "record(writer, loss_fn, params, data, step, split)")
    return Recorder(writer, model, loss_fn, **recorder_kwargs).record(
        data, step, split, batch_size=batch_size, lr=lr, epoch=epoch,
        max_samples=max_samples, optimizer_step=optimizer_step, opt_state=opt_state,
        unpack=unpack)


# --------------------------------------------------------------------------------------
# Loss trajectories and the OSGR probe
# --------------------------------------------------------------------------------------


def _mean_loss(split: _Split, loss_fn: Callable[..., Any], data: Any,
               batch_size: int | None, where: str, unpack: Unpack | None = None) -> float:
    f = _build_losses(split, loss_fn)
    sel, frozen = split.selected(), split.frozen()
    batches, _ = iter_data(data, batch_size, where, unpack)
    total, count = 0.0, 0
    for batch in batches:
        x, y, _ = split_batch(batch, where, unpack)
        try:
            loss = np.asarray(f(sel, frozen, x, y), dtype=np.float64)
        except caught() as e:
            raise _fail(e, where) from e
        total += float(loss.sum())
        count += loss.shape[0]
    if count == 0:
        raise AdapterError(f"{where}: data has no samples")
    return total / count


def mean_loss(
    model: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    data: Iterable[Any] | Sequence[Any],
    *,
    batch_size: int | None = None,
    mode: str = "eval",
    unpack: Unpack | None = None,
) -> float:
    """Mean per-example loss :math:`\\frac{1}{N}\\sum_i \\ell(\\theta, x_i, y_i)` over ``data``.

    ``model``/``loss_fn`` as in :func:`per_sample_gradients` (old order accepted with a
    ``DeprecationWarning``); ``data`` and ``unpack`` as in :meth:`Recorder.record`.
    """
    model, loss_fn = model_and_loss(model, loss_fn, "jax mean_loss",
                                    "mean_loss(model, loss_fn, data)",
                                    "mean_loss(loss_fn, params, data)")
    split = _split(model, None, "all", mode, "jax mean_loss")
    return _mean_loss(split, loss_fn, data, batch_size, "jax mean_loss", unpack)


def record_trajectory(
    writer: Any,
    model: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
    train_data: Iterable[Any] | Sequence[Any],
    test_data: Iterable[Any] | Sequence[Any],
    *,
    step: int,
    lr: float | Callable[[int], Any] | None = None,
    epoch: float = math.nan,
    batch_size: int | None = None,
    mode: str = "eval",
    unpack: Unpack | None = None,
) -> tuple[float, float]:
    """Write one loss-trajectory row: mean train and test loss at :math:`\\theta_t`.

    Call it before each real optimizer step ``t`` (and once after the last):

    .. math:: R_t = \\frac{L_{test}(\\theta_t) - L_{test}(\\theta_{t+1})}
                         {L_{train}(\\theta_t) - L_{train}(\\theta_{t+1})}.

    ``lr`` (float or schedule) is the rate of the step from θ_t. The old order
    ``(writer, loss_fn, params, ...)`` is accepted with a ``DeprecationWarning``.
    """
    model, loss_fn = model_and_loss(
        model, loss_fn, "jax record_trajectory",
        "record_trajectory(writer, model, loss_fn, train_data, test_data)",
        "record_trajectory(writer, loss_fn, params, train_data, test_data)")
    split = _split(model, None, "all", mode, "jax record_trajectory")
    tr = _mean_loss(split, loss_fn, train_data, batch_size, "jax record_trajectory", unpack)
    te = _mean_loss(split, loss_fn, test_data, batch_size, "jax record_trajectory", unpack)
    writer.write_trajectory(int(step), _resolve_lr(lr, int(step)), tr, te, epoch=float(epoch))
    return tr, te


def probe_osgr(
    model: Any,
    loss_fn: Callable[[Any, Any, Any], Any],
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
    collections: Any = None,
    mode: str = "eval",
) -> ProbeResult:
    """Measure the one-step generalization ratio by virtual gradient steps.

    For :math:`k = 1..K`: draw :math:`D_k` (``n`` samples of pool A) and :math:`D'_k`
    (``n`` samples of the disjoint pool B), step :math:`\\theta' = \\theta - \\lambda
    \\nabla L[D_k]` with :math:`L[D] = \\frac{1}{|D|} \\sum_{i \\in D} \\ell_i`, and

    .. math:: R = \\frac{\\sum_k L_{D'_k}(\\theta) - L_{D'_k}(\\theta')}
                        {\\sum_k L_{D_k}(\\theta) - L_{D_k}(\\theta')}

    (``ProbeResult.ratio``); it approaches the theoretical ``R(n)`` as λ → 0. The model is
    not modified (JAX arrays are immutable); only selected parameters move.

    Parameters
    ----------
    model, loss_fn :
        As in :func:`per_sample_gradients` (old order ``(loss_fn, params)`` accepted with
        a ``DeprecationWarning``).
    pool_a, pool_b : (inputs, targets)
        Disjoint pools of the same distribution, samples on axis 0.
    n, lr, K, step : int, float, int, int
        Draw size, virtual learning rate λ, number of draws, checkpoint label.
    writer : GradientWriter, optional
        Receives ``K`` ``write_probe`` rows.
    seed : int or numpy Generator, optional
        Randomness of the draws.
    param_filter, collections, mode :
        Which parameters move in the virtual step, as in :func:`per_sample_gradients`.

    Returns
    -------
    ProbeResult
    """
    where = "jax probe_osgr"
    model, loss_fn = model_and_loss(model, loss_fn, where,
                                    "probe_osgr(model, loss_fn, pool_a, pool_b)",
                                    "probe_osgr(loss_fn, params, pool_a, pool_b)")
    split = _split(model, param_filter, collections, mode, where)
    one = jax.vmap(_one_loss(split, loss_fn), in_axes=(None, None, 0, 0))

    def mean_f(sel: list[Any], frozen: list[Any], x: Any, y: Any) -> jax.Array:
        return jnp.mean(one(sel, frozen, x, y))

    mean_j = jax.jit(mean_f)
    grad_j = jax.jit(jax.grad(mean_f))
    pools = {"a": tuple(pool_a[:2]), "b": tuple(pool_b[:2])}
    theta, frozen = split.selected(), split.frozen()
    errors = caught()

    def mean_at(sel: list[Any], which: str, idx: np.ndarray) -> float:
        x, y = pools[which]
        try:
            return float(mean_j(sel, frozen, _take(x, idx), _take(y, idx)))
        except errors as e:
            raise _fail(e, where) from e

    def virtual(idx: np.ndarray) -> list[Any]:
        x, y = pools["a"]
        g = grad_j(theta, frozen, _take(x, idx), _take(y, idx))
        return [t - lr * gi for t, gi in zip(theta, g, strict=True)]

    return run_probe(size_a=_batch_len(pools["a"][0]), size_b=_batch_len(pools["b"][0]),
                     n=n, K=K, lr=lr, step=step, seed=seed, mean_loss=mean_at,
                     virtual_step=virtual, theta=theta, writer=writer)
