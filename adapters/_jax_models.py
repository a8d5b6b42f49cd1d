"""What the JAX adapter differentiates: params pytrees, flax NNX / linen and equinox models.

:func:`describe` turns a model into a :class:`ModelDesc`: one pytree whose array leaves are
the candidates, a name and a network-order rank per leaf, which leaves are trainable by
default, and how to rebuild from the leaves the object that ``loss_fn`` receives.

========================  ==========================  =====================  ==================
model                     trainable by default        names, order           loss_fn receives
========================  ==========================  =====================  ==================
params pytree             every float leaf (a linen   key paths, jax         the pytree
                          ``variables`` dict: its     ``tree_flatten``
                          ``params`` collection)      order
``nnx.Module``            ``nnx.Param`` variables     ``l1.kernel``;         the module,
                                                      attribute insertion    ``nnx.merge``\\ d
                                                      (definition) order
``(linen module,          the ``params`` collection   ``Dense_0.kernel``;    ``module.bind(
variables)``                                          dict insertion (call)  variables)``
                                                      order
``eqx.Module``            ``eqx.is_inexact_array``    field paths            the module
                          leaves                      (``layers.0.weight``),
                                                      field order
========================  ==========================  =====================  ==================

``collections=`` widens or narrows the default: ``"all"`` (every float leaf), an NNX filter
(``(nnx.Param, nnx.BatchStat)``) or linen collection names (``("params", "batch_stats")``).
Float leaves not selected are traced but held fixed (BatchNorm statistics are passed to the
forward unchanged).

Mode. An NNX model in training mode (BatchNorm using batch statistics, active Dropout)
or an equinox model with ``inference=False`` layers has no per-sample gradient in the
usual sense. ``mode="eval"`` (the default, as in the torch adapter) differentiates the
model as in eval mode -- NNX: ``use_running_average``/``deterministic`` are set for the
split and restored at once, so the caller's model is left in the mode it was in; equinox:
``eqx.nn.inference_mode`` on a copy. ``mode="as_is"`` uses the model as it is and raises
:class:`AdapterError` if it is in training mode.

flax and equinox are never imported here: an object can only be one of their modules if
the user imported them already (``sys.modules``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import (
    DictKey,
    FlattenedIndexKey,
    GetAttrKey,
    SequenceKey,
    tree_flatten_with_path,
)

from gsnr_stats.errors import AdapterError

# linen collections besides "params": a dict with "params" and only these keys is a linen
# ``variables`` dict, whose statistics must not be differentiated by default
LINEN_COLLECTIONS = frozenset({"batch_stats", "cache", "intermediates", "losses",
                               "perturbations", "spectral_norm_stats", "constants"})
MODES = ("eval", "as_is")


# --------------------------------------------------------------------------------------
# Which framework an object belongs to (never importing one)
# --------------------------------------------------------------------------------------


def _nnx() -> Any:
    mod = sys.modules.get("flax.nnx")
    return mod if mod is not None and hasattr(mod, "Module") else None


def _linen() -> Any:
    mod = sys.modules.get("flax.linen")
    return mod if mod is not None and hasattr(mod, "Module") else None


def _eqx() -> Any:
    mod = sys.modules.get("equinox")
    return mod if mod is not None and hasattr(mod, "Module") else None


def is_nnx_module(obj: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(obj, nnx.Module)


def is_linen_module(obj: Any) -> bool:
    nn = _linen()
    return nn is not None and isinstance(obj, nn.Module)


def is_eqx_module(obj: Any) -> bool:
    eqx = _eqx()
    return eqx is not None and isinstance(obj, eqx.Module)


def is_linen_pair(obj: Any) -> bool:
    return (isinstance(obj, tuple) and len(obj) == 2 and is_linen_module(obj[0])
            and isinstance(obj[1], Mapping))


def is_model(obj: Any) -> bool:
    """A module (NNX, linen, equinox) or a linen pair: never a loss function."""
    return is_nnx_module(obj) or is_linen_module(obj) or is_eqx_module(obj) \
        or is_linen_pair(obj)


def is_loss(obj: Any) -> bool:
    """A plain callable (function, partial, callable object) that is not a model."""
    return callable(obj) and not is_model(obj)


def model_and_loss(a: Any, b: Any, where: str, new: str, old: str) -> tuple[Any, Any]:
    """``(model, loss_fn)`` from the two arguments in either order.

    The new order is ``(model, loss_fn)``; the old one ``(loss_fn, params)`` is detected
    when only the first is a plain callable, and accepted with a ``DeprecationWarning``
    (to be removed in the next release). Both plain callables, or neither, is an error.
    """
    fa, fb = is_loss(a), is_loss(b)
    if fb and not fa:
        return a, b
    if fa and not fb:
        warnings.warn(
            f"{where}: the argument order {old} is deprecated and will be removed in the "
            f"next release; use {new} (the same order as the torch and sklearn adapters)",
            DeprecationWarning, stacklevel=3)
        return b, a
    if fa and fb:
        raise AdapterError(
            f"{where}: both {type(a).__name__} and {type(b).__name__} are plain callables; "
            f"cannot tell the model from the loss function. Use {new} with a params pytree, "
            "an nnx.Module, an equinox Module or a (linen module, variables) pair as model"
        )
    raise AdapterError(
        f"{where}: no loss function: neither {type(a).__name__} nor {type(b).__name__} is "
        f"callable; use {new}"
    )


# --------------------------------------------------------------------------------------
# Names
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


def is_float_array(leaf: Any) -> bool:
    dt = getattr(leaf, "dtype", None)
    return (dt is not None and hasattr(leaf, "shape")
            and bool(jnp.issubdtype(dt, jnp.inexact)))


def is_array(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and hasattr(leaf, "shape")


# --------------------------------------------------------------------------------------
# The description
# --------------------------------------------------------------------------------------


@dataclass
class ModelDesc:
    """A model as flat leaves, with names, network order, default selection and rebuild.

    Attributes
    ----------
    kind : {"pytree", "nnx", "linen", "equinox"}
    leaves, treedef : list, PyTreeDef
        ``tree_flatten`` of the candidate pytree (the model, an NNX state, linen variables).
    names : list of str
        Dotted name of each leaf.
    rank : list of int
        Network-order rank of each leaf (columns are laid out by rank).
    trainable : list of bool
        Selected by default (``collections``).
    post : callable
        Pytree → the object ``loss_fn`` receives (``nnx.merge``, ``module.bind``, identity).
    post_key : hashable
        Identity of ``post`` for the compile cache (``None``: do not cache).
    trace_ints : bool
        Non-float array leaves (NNX RNG keys and counts) are traced arguments, not baked
        into the compiled function, so that they may change between records.
    """

    kind: str
    leaves: list[Any]
    treedef: Any
    names: list[str]
    rank: list[int]
    trainable: list[bool]
    post: Callable[[Any], Any]
    post_key: Any
    trace_ints: bool = False


def _identity(t: Any) -> Any:
    return t


def _flatten(tree: Any, where: str, supported: str) -> tuple[list[Any], list[Any], Any]:
    try:
        flat, treedef = tree_flatten_with_path(tree)
    except Exception as e:  # noqa: BLE001 - any failure to flatten is unsupported input
        raise AdapterError(f"{where}: cannot flatten the model ({e}); supported: "
                           f"{supported}") from e
    return [p for p, _ in flat], [leaf for _, leaf in flat], treedef


def _is_linen_variables(tree: Any) -> bool:
    if not isinstance(tree, Mapping) or "params" not in tree:
        return False
    return all(k == "params" or k in LINEN_COLLECTIONS for k in tree)


def _collection_names(collections: Any, where: str) -> frozenset[str] | None:
    """linen/pytree collections: ``None`` (``params``), ``"all"`` or names."""
    if collections is None:
        return frozenset({"params"})
    if isinstance(collections, str):
        return None if collections == "all" else frozenset({collections})
    if isinstance(collections, Sequence | frozenset | set) and all(
            isinstance(c, str) for c in collections):
        return frozenset(collections)
    raise AdapterError(
        f"{where}: collections={collections!r}: for a linen model or variables dict use "
        "'all', a collection name or a tuple of them, e.g. ('params', 'batch_stats')")


def _insertion_rank(tree: Any) -> dict[tuple[str, ...], int]:
    """Rank of each leaf path of nested mappings by insertion order (linen: call order)."""
    out: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        else:
            out.setdefault(path, len(out))

    walk(tree, ())
    return out


def describe(model: Any, *, collections: Any = None, mode: str = "eval",
             where: str = "jax adapter", supported: str = "") -> ModelDesc:
    """The :class:`ModelDesc` of a params pytree, NNX/equinox module or linen pair."""
    if mode not in MODES:
        raise AdapterError(
            f"{where}: mode={mode!r}; expected one of {MODES} ('train', as in the torch "
            "adapter, has no JAX counterpart: a train-mode BatchNorm mixes the samples of "
            "a batch and NNX/equinox Dropout needs a key per sample)")
    if is_nnx_module(model):
        return _describe_nnx(model, collections, mode, where, supported)
    if is_linen_pair(model):
        return _describe_linen(model[0], model[1], collections, where, supported)
    if is_linen_module(model) and getattr(model, "scope", None) is not None:
        mod, variables = model.unbind()  # a bound module: net.bind(variables)
        return _describe_linen(mod, variables, collections, where, supported)
    if is_linen_module(model):
        raise AdapterError(
            f"{where}: a linen module holds no parameters; pass (module, variables), e.g. "
            "(model, model.init(key, x)), or the variables dict with a loss_fn that calls "
            "model.apply")
    if is_eqx_module(model):
        return _describe_eqx(model, collections, mode, where, supported)
    nnx = _nnx()
    if nnx is not None and isinstance(model, getattr(nnx, "State", ())):
        # nnx.split's state with a loss that merges it itself: clean names, Params only
        return _nnx_state_desc(model, collections, {}, where, supported)
    paths, leaves, treedef = _flatten(model, where, supported)
    trainable = [True] * len(leaves)
    if _is_linen_variables(model) or (collections is not None and isinstance(model, Mapping)):
        keep = _collection_names(collections, where)
        if keep is not None:
            trainable = [bool(p) and _key_str(p[0]) in keep for p in paths]
    elif collections not in (None, "all"):
        raise AdapterError(
            f"{where}: collections={collections!r} applies to flax/linen variables and NNX "
            "modules; for another pytree use param_filter=(name, leaf) -> bool")
    return ModelDesc("pytree", leaves, treedef, [path_name(p) for p in paths],
                     list(range(len(leaves))), trainable, _identity, "pytree")


def _describe_linen(module: Any, variables: Mapping[str, Any], collections: Any, where: str,
                    supported: str) -> ModelDesc:
    keep = _collection_names(collections, where)
    paths, leaves, treedef = _flatten(dict(variables), where, supported)
    order = _insertion_rank(variables)
    keys = [tuple(_key_str(k) for k in p) for p in paths]
    # "params" is implied: Dense_0.kernel (layer Dense_0); other collections keep their name
    names = [".".join(k[1:]) if k and k[0] == "params" else ".".join(k) for k in keys]
    rank = [order.get(k, len(order) + i) for i, k in enumerate(keys)]
    trainable = [keep is None or (bool(k) and k[0] in keep) for k in keys]
    try:
        hash(module)
        key: Any = ("linen", module)
    except TypeError:
        key = None

    def post(v: Any) -> Any:
        return module.bind(v)

    return ModelDesc("linen", leaves, treedef, names, rank, trainable, post, key)


# --------------------------------------------------------------------------------------
# flax NNX
# --------------------------------------------------------------------------------------


def _nnx_train_flags(model: Any) -> list[tuple[str, Any, str]]:
    """``(path, module, attribute)`` of each layer running in training mode."""
    nnx = _nnx()
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for attr in ("use_running_average", "deterministic"):
            if getattr(node, attr, None) is False and getattr(node, "rate", 1) != 0:
                out.append((".".join(str(p) for p in path) or "model", node, attr))
    return out


def _train_error(where: str, layers: list[str], fix: str) -> AdapterError:
    return AdapterError(
        f"{where}: the model is in training mode ({', '.join(layers[:4])}"
        f"{' ...' if len(layers) > 4 else ''}): BatchNorm with batch statistics mixes the "
        f"samples of a batch and active Dropout is random, so there is no per-sample "
        f"gradient. {fix}, or leave mode='eval' (the default) to record as in eval "
        "mode without changing the model")


def _nnx_network_rank(model: Any) -> dict[tuple[str, ...], int]:
    """Rank of each variable path in attribute definition order (``_pytree__nodes``, else
    insertion order of the instance's attributes)."""
    nnx = _nnx()
    bases = tuple(c for c in (getattr(nnx, "Pytree", None), getattr(nnx, "Object", None),
                              nnx.Module) if isinstance(c, type))
    out: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()

    def walk(obj: Any, path: tuple[str, ...]) -> None:
        if isinstance(obj, nnx.Variable):
            out.setdefault(path, len(out))
            return
        if isinstance(obj, bases):
            if id(obj) in seen:  # shared submodule: its first path
                return
            seen.add(id(obj))
            attrs = vars(obj)
            # flax >= 0.11 keeps the definition order in the node table even after
            # nnx.jit / nnx.update re-set the attributes (in sorted order)
            nodes = getattr(obj, "_pytree__nodes", None)
            keys = [k for k in nodes if k in attrs] if isinstance(nodes, Mapping) else []
            keys += [k for k in attrs if k not in keys]
            for k in keys:
                if not str(k).startswith(("_pytree__", "_object__")):  # NNX bookkeeping
                    walk(attrs[k], (*path, str(k)))
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, (*path, str(i)))
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, (*path, str(k)))

    walk(model, ())
    return out


def _describe_nnx(model: Any, collections: Any, mode: str, where: str,
                  supported: str) -> ModelDesc:
    nnx = _nnx()
    flags = _nnx_train_flags(model)
    if flags and mode == "as_is":
        raise _train_error(where, [f"{p}.{a}=False" for p, _, a in flags],
                           "Call model.eval() before recording (model.train() after)")
    try:
        for _, node, attr in flags:  # eval for the split only: the graphdef keeps it
            setattr(node, attr, True)
        graphdef, state = nnx.split(model)
    finally:
        for _, node, attr in flags:
            setattr(node, attr, False)
    desc = _nnx_state_desc(state, collections, _nnx_network_rank(model), where, supported)

    def post(s: Any) -> Any:
        return nnx.merge(graphdef, s)

    try:
        hash(graphdef)
        key: Any = ("nnx", graphdef)
    except TypeError:
        key = None
    desc.post, desc.post_key = post, key
    return desc


def _nnx_state_desc(state: Any, collections: Any, order: dict[tuple[str, ...], int],
                    where: str, supported: str) -> ModelDesc:
    """Names (without the Variables' ``.value``), ranks and trainable flags of an NNX state."""
    nnx = _nnx()
    if collections is None:
        collections = nnx.Param
    # flax < 0.11 keeps VariableState objects in a State (0.12 warns on the alias)
    var_types = tuple(c for c in (nnx.Variable, vars(nnx).get("VariableState"))
                      if isinstance(c, type))
    try:
        pred = (None if collections == "all"
                else nnx.filterlib.to_predicate(collections))
    except Exception as e:  # noqa: BLE001 - NNX's own filter validation
        raise AdapterError(
            f"{where}: collections={collections!r} is not an NNX filter ({e}); use e.g. "
            "nnx.Param, (nnx.Param, nnx.BatchStat) or 'all'") from e
    variables, _ = tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, var_types))
    paths, leaves, treedef = _flatten(state, where, supported)
    names, rank, trainable = [], [], []
    j = 0
    for vpath, var in variables:
        vkey = tuple(_key_str(k) for k in vpath)
        n_leaves = len(jax.tree_util.tree_leaves(var))
        chosen = pred is None or bool(pred(tuple(getattr(k, "key", k) for k in vpath), var))
        for _ in range(n_leaves):
            # the Variable's own ".value" is not part of the name: l1.kernel, not
            # l1.kernel.value (layer l1)
            sub = [k for k in paths[j][len(vpath):]
                   if not (isinstance(k, GetAttrKey) and k.name == "value")]
            names.append(".".join((*vkey, *(_key_str(k) for k in sub))))
            rank.append(order.get(vkey, len(order) + j))
            trainable.append(chosen)
            j += 1
    if j != len(leaves):  # a state layout this code does not know: plain key paths
        names = [path_name(p) for p in paths]
        rank, trainable = list(range(len(leaves))), [True] * len(leaves)

    return ModelDesc("nnx", leaves, treedef, names, rank, trainable, _identity, "nnx-state",
                     trace_ints=True)


# --------------------------------------------------------------------------------------
# equinox
# --------------------------------------------------------------------------------------


def _describe_eqx(model: Any, collections: Any, mode: str, where: str,
                  supported: str) -> ModelDesc:
    eqx = _eqx()
    if collections not in (None, "all"):
        raise AdapterError(
            f"{where}: collections={collections!r}: an equinox model's parameters are its "
            "inexact array leaves (eqx.is_inexact_array); select others with "
            "param_filter=(name, leaf) -> bool")
    layers = [n for n in jax.tree_util.tree_leaves(
        model, is_leaf=lambda x: x is not model and isinstance(x, eqx.Module)
        and hasattr(x, "inference")) if getattr(n, "inference", None) is False
        and getattr(n, "p", 1) != 0]
    if layers:
        if mode == "as_is":
            raise _train_error(where, [f"{type(n).__name__}(inference=False)" for n in layers],
                               "Use eqx.nn.inference_mode(model) for recording")
        model = eqx.nn.inference_mode(model, value=True)  # a copy; the caller's is unchanged
    paths, leaves, treedef = _flatten(model, where, supported)
    return ModelDesc("equinox", leaves, treedef, [path_name(p) for p in paths],
                     list(range(len(leaves))), [eqx.is_inexact_array(x) for x in leaves],
                     _identity, "equinox")


def with_params(model: Any, params: Any, where: str) -> Any:
    """The model at ``params`` (``record(..., params=)``): same kind as ``model``."""
    if params is None:
        return model
    if is_linen_pair(model):
        if is_linen_pair(params):
            return params
        if isinstance(params, Mapping):
            return (model[0], params)
    elif is_nnx_module(model) or is_eqx_module(model):
        if type(params) is type(model):
            return params
        raise AdapterError(
            f"{where}: params= must be a {type(model).__name__} like the recorder's model "
            f"(got {type(params).__name__}); an NNX module is read at each record anyway")
    else:
        return params
    raise AdapterError(f"{where}: params= must be the variables dict of the linen model, got "
                       f"{type(params).__name__}")
