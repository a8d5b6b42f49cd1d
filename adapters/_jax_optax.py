"""What a JAX recorder can know about the optimizer: its update count and description.

optax keeps no hyper-parameters in its state, but several of its states count updates:
``ScaleByAdamState.count`` (adam, adamw, ...), ``ScaleByScheduleState.count`` (a schedule
as learning rate), ``InjectHyperparamsState.count`` (``optax.inject_hyperparams``, which
also holds the hyper-parameters). flax's ``nnx.Optimizer`` and ``TrainState`` count their
updates in ``.step``. :func:`optimizer_info` reads whichever is there; plain
``optax.sgd(lr, momentum)`` has no count: pass ``optimizer_step=`` then (or wrap the
optimizer in ``optax.inject_hyperparams``). Imports neither optax nor flax.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from gsnr_stats.errors import AdapterError


@dataclass
class OptimizerInfo:
    """``optimizer_step`` (update count), ``lr`` and ``meta`` for a record, where known."""

    step: int | None = None
    lr: float | None = None
    meta: dict[str, Any] | None = None
    sources: list[str] = field(default_factory=list)


def _value(v: Any) -> Any:
    """The array inside a flax Variable (``nnx.OptState``, ``OptArray``), or ``v``."""
    get = getattr(v, "get_value", None)
    if callable(get):
        try:
            return get()
        except TypeError:
            pass
    if hasattr(v, "value") and not hasattr(v, "dtype"):
        return v.value
    return v


def _int_scalar(v: Any) -> int | None:
    v = _value(v)
    try:
        a = np.asarray(v)
    except (TypeError, ValueError):
        return None
    if a.shape != () or not np.issubdtype(a.dtype, np.integer):
        return None
    return int(a)


def _finite_scalar(v: Any) -> float | None:
    v = _value(v)
    try:
        a = np.asarray(v)
    except (TypeError, ValueError):
        return None
    if a.shape != () or not np.issubdtype(a.dtype, np.number):
        return None
    f = float(a)
    return f if math.isfinite(f) else None


def _walk(state: Any, states: list[str], counts: list[tuple[str, int]],
          hyper: dict[str, float], depth: int = 0) -> None:
    """Collect state class names, ``count`` fields and injected hyper-parameters."""
    if depth > 64:
        return
    fields = getattr(type(state), "_fields", None)
    if isinstance(state, tuple) and fields is not None:  # an optax state (NamedTuple)
        states.append(type(state).__name__)
        if "count" in fields:
            c = _int_scalar(state.count)
            if c is not None:
                counts.append((f"{type(state).__name__}.count", c))
        hp = getattr(state, "hyperparams", None)
        if isinstance(hp, Mapping):
            for k, v in hp.items():
                f = _finite_scalar(v)
                if f is not None:
                    hyper.setdefault(str(k), f)
        for name in fields:
            if name not in ("count", "hyperparams"):
                _walk(getattr(state, name), states, counts, hyper, depth + 1)
    elif isinstance(state, list | tuple):
        for s in state:
            _walk(s, states, counts, hyper, depth + 1)
    elif isinstance(state, Mapping) and depth == 0:
        for s in state.values():
            _walk(s, states, counts, hyper, depth + 1)


def optimizer_info(*, optimizer_step: int | None = None, opt_state: Any = None,
                   optimizer: Any = None, where: str = "jax Recorder.record") -> OptimizerInfo:
    """The optimizer's update count, learning rate and metadata, from what is given.

    Parameters
    ----------
    optimizer_step : int, optional
        Explicit update count; wins over any count read from a state.
    opt_state : optax state, ``nnx.Optimizer`` or ``TrainState``, optional
        Read for ``count`` leaves (or ``.step``) and injected hyper-parameters.
    optimizer : ``nnx.Optimizer`` or an object with ``opt_state`` (and ``step``), optional
        The recorder's optimizer, read at each record like ``opt_state``.

    Returns
    -------
    OptimizerInfo
        ``meta = {"optimizer": {"class": "optax", "states": [...], "hyperparams": {...},
        "step_source": ...}, "framework": "jax <version>"}`` when an optimizer state is
        known, else ``None``.
    """
    info = OptimizerInfo()
    if optimizer_step is not None:
        s = _int_scalar(optimizer_step)
        if s is None or s < 0:
            raise AdapterError(f"{where}: optimizer_step must be a non-negative integer, got "
                               f"{optimizer_step!r}")
        info.step = s
        info.sources.append("argument")
    src = opt_state if opt_state is not None else optimizer
    if src is None:
        return info
    desc: dict[str, Any] = {"class": "optax"}
    wrapper_step = None
    inner = src
    if hasattr(src, "opt_state") and not isinstance(src, tuple):
        # nnx.Optimizer / flax.training TrainState: the state and its own update counter
        desc["wrapper"] = f"{type(src).__module__.split('.')[0]}.{type(src).__qualname__}"
        inner = src.opt_state
        if hasattr(src, "step"):
            wrapper_step = _int_scalar(src.step)
    states: list[str] = []
    counts: list[tuple[str, int]] = []
    hyper: dict[str, float] = {}
    try:
        _walk(inner, states, counts, hyper)
    except Exception as e:  # noqa: BLE001 - an unknown state must not stop recording
        warnings.warn(f"{where}: could not read the optimizer state ({e})", stacklevel=3)
    if states:
        desc["states"] = states
    if hyper:
        desc["hyperparams"] = hyper
        if "learning_rate" in hyper:
            info.lr = hyper["learning_rate"]
    found: tuple[str, int] | None = None
    if wrapper_step is not None:
        found = (f"{desc['wrapper']}.step", wrapper_step)
    elif counts:
        values = {c for _, c in counts}
        if len(values) == 1:
            found = counts[0]
        else:
            warnings.warn(
                f"{where}: the optimizer state holds different update counts "
                f"({', '.join(f'{n}={c}' for n, c in counts)}); pass optimizer_step= to "
                "record the right one", stacklevel=3)
    if info.step is not None:
        desc["step_source"] = "argument"
    elif found is not None:
        info.step = found[1]
        info.sources.append(found[0])
        desc["step_source"] = found[0]
    else:
        desc["step_source"] = "unknown"
    info.meta = {"optimizer": desc, "framework": f"jax {jax.__version__}"}
    return info
