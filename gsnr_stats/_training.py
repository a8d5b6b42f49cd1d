"""What the training loop did, as the moments Dataset records it: optimizer and learning rate.

The optimizer step of every checkpoint (:func:`step_spacing`: the ``optimizer_step``
coordinate, else ``steps_per_checkpoint=``, else the ``step`` labels with a
:class:`~.errors.StepSpacingWarning`), the learning rate per checkpoint, the optimizer of
``attrs["optimizer"]`` and which λ the theory's gap uses under it (``docs/theory.md``,
"Which λ"). Datasets only; imports nothing of ours but the errors.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .errors import StepSpacingWarning

__all__ = ["LR_RULES", "step_spacing"]


def _lr_by_step(stats: xr.Dataset) -> np.ndarray:
    """Learning rate per step: the ``train`` record's, else the first finite one."""
    if "lr" not in stats:
        return np.full(stats.sizes["step"], np.nan)
    lr = stats["lr"].transpose("step", "split").values.astype(np.float64)
    splits = [str(s) for s in stats["split"].values]
    order = sorted(range(len(splits)), key=lambda i: splits[i] != "train")
    out = np.full(lr.shape[0], np.nan)
    for i in order:
        out = np.where(np.isnan(out), lr[:, i], out)
    return out


_ADAPTIVE = ("adam", "rmsprop", "adagrad", "adadelta", "adafactor", "lamb", "lion", "lars",
             "yogi", "novograd", "sophia", "shampoo")


def _optimizer(stats: xr.Dataset | dict[str, Any]) -> dict[str, Any] | None:
    """``attrs["optimizer"]`` read into one shape, whichever recorder wrote it.

    The stores hold it as a JSON string (``""`` when the recorder did not know the
    optimizer; a dict is taken as is). Returns None if absent or unreadable, else
    ``{"class": label, "kind": "sgd" | "adaptive" | "other", "groups": [{"lr", "momentum",
    "dampening", "weight_decay", "betas", ...}], "raw": the recorded dict}`` from

    * torch: ``{"class": "SGD", "groups": [param_group hyper-parameters]}``;
    * scikit-learn: ``{"class": "MLPClassifier", "solver": "sgd" | "adam" | ..., "momentum",
      "learning_rate_init" | "eta0", "alpha"}`` (the solver is the update rule; ``alpha``
      is a penalty, i.e. weight decay);
    * optax: ``{"class": "optax", "states": [...], "hyperparams": {...}}`` (Adam-like
      states make it adaptive; a ``TraceState`` is momentum).
    """
    attrs = stats.attrs if isinstance(stats, xr.Dataset) else stats
    raw = attrs.get("optimizer", "")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        if not raw.strip():
            return None
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, dict) or not raw.get("class"):
        return None
    cls = str(raw["class"])
    if isinstance(raw.get("groups"), list):  # torch-like: one dict per parameter group
        groups = [g for g in raw["groups"] if isinstance(g, dict)]
        name = cls.lower()
        label = cls
    elif "solver" in raw:  # scikit-learn: the solver is the update rule
        solver = str(raw["solver"])
        name = solver.lower()
        g = {"lr": raw.get("learning_rate_init", raw.get("eta0")), "weight_decay": raw.get("alpha")}
        if name == "sgd":
            g["momentum"] = raw.get("momentum", 0.0) if "momentum" in raw else 0.0
        if name == "adam":
            g["betas"] = [raw.get("beta_1"), raw.get("beta_2")]
        groups = [g]
        label = f"{cls} (solver {solver!r})"
    else:  # optax: chain of states and injected hyper-parameters
        hp = raw.get("hyperparams") if isinstance(raw.get("hyperparams"), dict) else {}
        states = [str(x) for x in raw.get("states", []) if x]
        name = " ".join([cls, *states]).lower()
        g = {"lr": hp.get("learning_rate"), "momentum": hp.get("momentum"),
             "weight_decay": hp.get("weight_decay")}
        if "trace" in name and g["momentum"] is None:
            g["momentum_unknown"] = True
        if "trace" in name or cls.lower() == "sgd":
            name += " sgd"
        groups = [g]
        label = cls + (f" ({', '.join(states)})" if states else "")
    if any(k in name for k in _ADAPTIVE) or any(g.get("betas") for g in groups):
        kind = "adaptive"
    elif "sgd" in name:
        kind = "sgd"
    else:
        kind = "other"
    return {"class": label, "kind": kind, "groups": groups, "raw": raw}


def _group_values(opt: dict[str, Any] | None, key: str) -> list[Any]:
    """Distinct values of hyper-parameter ``key`` over the optimizer's parameter groups."""
    if opt is None:
        return []
    out: list[Any] = []
    for g in opt["groups"]:
        v = g.get(key)
        if v is not None and v not in out:
            out.append(v)
    return out


def _numbers(opt: dict[str, Any] | None, key: str) -> list[float]:
    """The numeric distinct values of ``key`` over the groups (bools and strings left out)."""
    return [float(v) for v in _group_values(opt, key)
            if isinstance(v, int | float) and not isinstance(v, bool)]


def _kind(opt: dict[str, Any] | None) -> str:
    """``"unknown"``, ``"sgd"``, ``"adaptive"`` (Adam and kin: per-parameter steps) or ``"other"``."""
    return "unknown" if opt is None else str(opt["kind"])


LR_RULES = ("nominal", "momentum")


def _lr_problem(stats: xr.Dataset, hint: str = "pass lr=") -> str | None:
    """Why ``stats['lr']`` gives no learning rate at any checkpoint (None when one is recorded);
    ``hint`` says how to give one."""
    if np.isfinite(_lr_by_step(stats)).any():
        return None
    opt = _optimizer(stats)
    lrs = _numbers(opt, "lr")
    if opt is not None and len(lrs) > 1:
        return (f"the optimizer ({opt['class']}) has {len(opt['groups'])} parameter groups with "
                f"different learning rates ({', '.join(f'{v:g}' for v in lrs)}), so no single "
                f"learning rate was recorded; {hint} with the λ to use")
    return f"no learning rate recorded; record with lr= or {hint}"


def _lambda_rule(stats: xr.Dataset, lr_rule: str) -> tuple[float, str]:
    """The factor from the nominal learning rate to the λ used, and the sentence saying so."""
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {LR_RULES}, got {lr_rule!r}")
    opt = _optimizer(stats)
    kind = _kind(opt)
    mus = _numbers(opt, "momentum")
    damp = _numbers(opt, "dampening") or [0.0]
    wd = [v for v in _numbers(opt, "weight_decay") if v != 0.0]
    cls = opt["class"] if opt else ""
    wd_note = (f" Weight decay / penalty ({', '.join(f'{v:g}' for v in wd)}) adds a "
               "deterministic shrink with no noise, so it is not in the gap's variance term."
               if wd else "")
    if lr_rule == "momentum":
        if kind != "sgd":
            what = ("the optimizer is unknown (no attrs['optimizer'] recorded)" if opt is None
                    else f"{cls} is not SGD with momentum")
            raise ValueError(f"lr_rule='momentum' needs SGD's momentum, but {what}; use "
                             "lr_rule='nominal' (see docs/theory.md, 'Which λ')")
        if len(mus) > 1 or len(damp) > 1:
            raise ValueError(f"lr_rule='momentum': the {cls} parameter groups differ in momentum "
                             f"{mus} / dampening {damp}; no single effective λ, use "
                             "lr_rule='nominal' or pass lr=")
        if _group_values(opt, "momentum_unknown"):
            raise ValueError(f"lr_rule='momentum': {cls} has momentum but its decay μ was not "
                             "recorded; use lr_rule='nominal' or pass lr= with λ_eff")
        mu = mus[0] if mus else 0.0
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"lr_rule='momentum': momentum {mu} is outside [0, 1)")
        f = (1.0 - damp[0]) / (1.0 - mu)
        return f, (f"λ = effective step lr·(1 − dampening)/(1 − μ) = {f:.4g} × lr of {cls} "
                   f"(momentum μ = {mu:g}; lr_rule='momentum').{wd_note}")
    if kind == "unknown":
        return 1.0, "λ = the nominal learning rate (optimizer unknown: none recorded)."
    if kind == "sgd":
        mu = max(mus, default=0.0)
        if _group_values(opt, "momentum_unknown"):
            note = (f"λ = the nominal learning rate of {cls} with momentum (μ not recorded; "
                    "the effective long-run step lr/(1 − μ) is larger).")
        elif mu > 0:
            note = (f"λ = the nominal learning rate of {cls} with momentum {mu:g}; its effective "
                    f"long-run step lr/(1 − μ) would give a {1.0 / (1.0 - mu):.4g}× larger gap "
                    "(lr_rule='momentum').")
        else:
            note = f"λ = the nominal learning rate of {cls} (plain SGD: λ is its step size)."
        return 1.0, note + wd_note
    if kind == "adaptive":
        return 1.0, (f"λ = the nominal learning rate of {cls}: its per-parameter step "
                     "≈ lr/(sqrt(v) + eps) has no single λ, so the scalar-λ gap formula does not "
                     f"apply exactly (indicative only).{wd_note}")
    return 1.0, (f"λ = the nominal learning rate of {cls} (the formula's λ is the step of plain "
                 f"SGD; indicative only for {cls}).{wd_note}")


def step_spacing(
    stats: xr.Dataset,
    steps_per_checkpoint: int | Sequence[int] | None = None,
    *,
    warn: bool = True,
    what: str = "gsnr_stats",
    stacklevel: int = 3,
) -> tuple[np.ndarray, str]:
    """Optimizer step of every checkpoint, and where it came from.

    In order: the ``optimizer_step`` coordinate when every checkpoint has one (``>= 0``;
    it wins over the ``step`` labels and over ``steps_per_checkpoint`` when they disagree);
    else ``steps_per_checkpoint``; else the ``step`` labels themselves, with a
    :class:`~gsnr_stats.errors.StepSpacingWarning` (labels that count epochs make every
    gap ``steps per epoch`` times too small).

    Parameters
    ----------
    stats : xarray.Dataset
        Moments (``step`` dimension, optionally ``optimizer_step`` on it).
    steps_per_checkpoint : int or sequence of int, optional
        Optimizer steps between consecutive checkpoints: one int for every interval or one
        per interval (length S − 1). Used when ``optimizer_step`` is missing or has a ``-1``.
    warn : bool
        Warn when the step labels have to be taken as optimizer steps (S > 1).
    what : str
        The caller's name, for the warning.

    Returns
    -------
    (numpy.ndarray, str)
        Optimizer step at each checkpoint, shape (S,), int64 strictly increasing (relative to
        ``step[0]`` with ``steps_per_checkpoint``); the source: ``"optimizer_step"``,
        ``"steps_per_checkpoint"`` or ``"step labels"``.
    """
    steps = stats["step"].values.astype(np.int64)
    S = steps.size
    opt = None
    if "optimizer_step" in stats.variables:
        o = stats["optimizer_step"]
        if "step" in o.dims:
            o = o.transpose("step", ...)
            opt = np.asarray(o.values, dtype=np.int64).reshape(S, -1).max(axis=1)
    spc = None
    if steps_per_checkpoint is not None:
        try:
            spc = np.broadcast_to(np.asarray(steps_per_checkpoint, dtype=np.int64),
                                  (max(S - 1, 0),))
        except ValueError:
            raise ValueError(f"steps_per_checkpoint: one int or {max(S - 1, 0)} values (one per "
                             f"interval between the {S} checkpoints), got "
                             f"{steps_per_checkpoint!r}") from None
    if opt is not None and np.all(opt >= 0):
        pos, src = opt, "optimizer_step"
        if spc is not None and S > 1 and not np.array_equal(np.diff(opt), spc):
            warnings.warn(f"{what}: steps_per_checkpoint={steps_per_checkpoint!r} ignored: the "
                          f"recorded optimizer_step {opt.tolist()} gives "
                          f"{np.diff(opt).tolist()} steps between checkpoints and wins "
                          "(drop the coordinate to override it: "
                          "stats.drop_vars('optimizer_step'))", StepSpacingWarning,
                          stacklevel=stacklevel)
    elif spc is not None:
        pos, src = steps[0] + np.concatenate([[0], np.cumsum(spc)]), "steps_per_checkpoint"
    else:
        pos, src = steps, "step labels"
        if warn and S > 1:
            partial = (" (no optimizer_step recorded)" if opt is None or np.all(opt < 0) else
                       " (optimizer_step is -1, unknown, at step "
                       f"{[int(s) for s in steps[opt < 0]][:6]})")
            warnings.warn(
                f"{what}: optimizer steps between checkpoints unknown{partial}: the step labels "
                f"{steps.tolist()[:6]}{' ...' if S > 6 else ''} are taken as optimizer steps. If "
                "they count epochs (or anything but optimizer updates) the theoretical gap is off "
                "by the updates per label (~20x too small at 20 steps per epoch). Record the "
                "optimizer step with each record (the `optimizer_step` coordinate) or pass "
                "steps_per_checkpoint=.", StepSpacingWarning, stacklevel=stacklevel)
    pos = np.asarray(pos, dtype=np.int64)
    if S > 1 and np.any(np.diff(pos) <= 0):
        raise ValueError(f"checkpoints must be strictly increasing in optimizer steps ({src}: "
                         f"{pos.tolist()})")
    return pos, src
