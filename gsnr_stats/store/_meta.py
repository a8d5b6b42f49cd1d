"""Per-record metadata (store v3): validated JSON objects, encoded and decoded safely.

A record's ``meta`` is a JSON object of at most :data:`~.schema.META_MAX_BYTES` UTF-8
bytes (the optimizer's class and hyper-parameters, the framework...). Writers refuse what
strict JSON cannot hold losslessly (non-string keys, NaN/Inf, arbitrary objects) instead of
coercing it; readers trust nothing: extents, CRC, UTF-8, JSON, top-level type and nesting
depth are all checked. ``docs/format.md`` states the rules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SchemaError, StoreError
from .schema import META_MAX_BYTES, NO_OPTIMIZER_STEP, _as_int64, bytes_crc

MAX_DEPTH = 32  # nesting of lists/objects: deeper JSON would risk Python's recursion limit


def _norm(v: Any, path: str, where: str, depth: int) -> Any:
    """``v`` as plain JSON values (numpy scalars and tuples converted), or SchemaError."""
    if depth > MAX_DEPTH:
        raise SchemaError(f"{where}: meta{path} is nested deeper than {MAX_DEPTH} levels "
                          "(a reference cycle?)")
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        f = float(v)
        if not math.isfinite(f):
            # refused, not stored as null: a silently dropped hyper-parameter is worse
            raise SchemaError(f"{where}: meta{path} is {f}; JSON metadata holds finite numbers "
                              "only (store it as a string, e.g. 'inf', or leave it out)")
        return f
    if isinstance(v, Mapping):
        out: dict[str, Any] = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise SchemaError(f"{where}: meta{path} has key {k!r} of type "
                                  f"{type(k).__name__}; JSON object keys must be str")
            out[k] = _norm(x, f"{path}[{k!r}]", where, depth + 1)
        return out
    if isinstance(v, list | tuple):
        return [_norm(x, f"{path}[{i}]", where, depth + 1) for i, x in enumerate(v)]
    raise SchemaError(
        f"{where}: meta{path} = {v!r:.80} of type {type(v).__name__} is not JSON "
        "(use str, int, finite float, bool, None, list or dict; convert tensors with .item())"
    )


def encode_meta(meta: Mapping[str, Any], where: str) -> bytes:
    """UTF-8 JSON bytes of a record's ``meta`` mapping; :class:`SchemaError` if not storable.

    Keys keep their order; numpy scalars become numbers and tuples lists. At most
    ``META_MAX_BYTES`` (64 KiB) encoded.
    """
    if not isinstance(meta, Mapping):
        raise SchemaError(f"{where}: meta must be a mapping (dict), got {type(meta).__name__}")
    plain = _norm(meta, "", where, 0)
    raw = json.dumps(plain, ensure_ascii=False, allow_nan=False,
                     separators=(",", ":")).encode("utf-8")
    if len(raw) > META_MAX_BYTES:
        raise SchemaError(f"{where}: meta is {len(raw)} bytes as JSON, more than the "
                          f"{META_MAX_BYTES} a record holds (store large data as datasets)")
    return raw


def check_optimizer_step(x: Any, where: str) -> int:
    """``x`` as a non-negative int64 optimizer step; :class:`SchemaError` otherwise."""
    if isinstance(x, bool | np.bool_):  # int(True) == 1: a flag passed by mistake
        raise SchemaError(f"{where}: optimizer_step {x!r} is a bool, not an update count")
    v = _as_int64(x, "optimizer_step", where)
    if v < 0:
        raise SchemaError(f"{where}: optimizer_step {v} is negative; pass the optimizer's "
                          "update count (>= 0) or None")
    return v


def _finite(s: str) -> float:
    f = float(s)
    if not math.isfinite(f):
        raise ValueError(f"number {s} overflows float64")
    return f


def _no_constant(s: str) -> Any:
    raise ValueError(f"{s} is not JSON")


def decode_meta(raw: bytes, crc: int, where: str) -> dict[str, Any]:
    """The record's metadata object from its stored bytes.

    Raises
    ------
    StoreError
        The bytes fail their CRC (damaged file).
    SchemaError
        Oversize, not UTF-8, not strict JSON, not an object, or nested too deep.
    """
    if len(raw) > META_MAX_BYTES:
        raise SchemaError(f"{where}: metadata is {len(raw)} bytes, more than {META_MAX_BYTES}")
    if bytes_crc(np.frombuffer(raw, np.uint8)) != int(crc):
        raise StoreError(f"{where}: metadata bytes fail their checksum: the file is damaged")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SchemaError(f"{where}: metadata is not UTF-8 JSON ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: metadata is a JSON {type(obj).__name__}, not an object")
    depth, stack = 0, [(obj, 1)]
    while stack:  # iterative: a crafted deep nesting must not recurse here either
        v, d = stack.pop()
        depth = max(depth, d)
        if depth > MAX_DEPTH + 1:
            raise SchemaError(f"{where}: metadata is nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return obj


def decode_optimizer_step(v: int, where: str) -> int | None:
    """The stored ``optimizer_step`` column value as ``int`` or ``None`` (-1)."""
    v = int(v)
    if v == NO_OPTIMIZER_STEP:
        return None
    if v < 0:
        raise SchemaError(f"{where}: stored optimizer_step {v} is negative (damaged file)")
    return v


def meta_extents(recs: Mapping[str, np.ndarray], keys: list[tuple[int, str]], n_bytes: int,
                 path: Any) -> dict[tuple[int, str], tuple[int, int, int]]:
    """``(start, stop, crc)`` of each completed record's metadata bytes, validated.

    ``recs`` are the valid rows of a v3 ``records`` table, ``keys`` their ``(step, split)``
    and ``n_bytes`` the length of ``record_meta``. Extents must lie in ``[0, n_bytes]``,
    hold at most ``META_MAX_BYTES`` and not overlap: :class:`SchemaError` otherwise.
    """
    out: dict[tuple[int, str], tuple[int, int, int]] = {}
    for i, key in enumerate(keys):
        a, b = int(recs["meta_start"][i]), int(recs["meta_stop"][i])
        where = f"{path}: record (step={key[0]}, split={key[1]!r})"
        if not 0 <= a <= b <= n_bytes:
            raise SchemaError(f"{where}: metadata bytes [{a}, {b}) outside the {n_bytes} bytes "
                              "of record_meta (truncated or damaged file)")
        if b - a > META_MAX_BYTES:
            raise SchemaError(f"{where}: metadata of {b - a} bytes is larger than the "
                              f"{META_MAX_BYTES} a record may hold (damaged file)")
        out[key] = (a, b, int(recs["meta_crc"][i]))
    spans = sorted((a, b, k) for k, (a, b, _) in out.items() if b > a)
    for (_, b0, k0), (a1, _, k1) in zip(spans, spans[1:], strict=False):
        if a1 < b0:
            raise SchemaError(f"{path}: records (step={k0[0]}, split={k0[1]!r}) and "
                              f"(step={k1[0]}, split={k1[1]!r}) claim the same metadata bytes "
                              "(damaged file)")
    return out


def json_default(o: Any) -> Any:
    """``json.dumps(default=)`` for the writer's user attributes: numpy scalars and arrays,
    paths; anything else is refused (no pickle, no repr)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
