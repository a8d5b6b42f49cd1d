"""The parameter layout: ordered tensors on the flat parameter axis, their names and hash."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LayoutMismatchError, SchemaError

_TARGET_CHUNK_BYTES = 2 << 20
_MAX_CHUNK_COLS = 8192
_ALIGN = 4096  # O_DIRECT alignment of DirectChunks
_ALIGNED_PAD = 0.02  # padding worth paying for 4096-byte column widths (the bound is 5 %)


@dataclass(frozen=True)
class Layout:
    """Ordered parameter tensors and their place on the flat parameter axis.

    Attributes
    ----------
    names, shapes, layers : tuple
        Tensor names, shapes and layer names, in flat order.
    offsets, sizes : tuple of int
        Start of each tensor on the flat axis and its number of elements.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layers: tuple[str, ...]
    offsets: tuple[int, ...] = field(init=False)
    sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(math.prod(s)) for s in self.shapes)
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]])) if sizes else ()
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def from_params(cls, params: Sequence[Any]) -> Layout:
        """Build a layout from ``(name, shape)`` or ``(name, shape, layer)`` tuples.

        The layer defaults to the name without its last dotted component
        (``"fc1.weight"`` → ``"fc1"``).
        """
        if isinstance(params, Layout):
            return params
        names, shapes, layers = [], [], []
        for i, p in enumerate(params):
            if not isinstance(p, Sequence) or isinstance(p, str) or len(p) not in (2, 3):
                raise SchemaError(
                    f"parameter #{i}: expected (name, shape) or (name, shape, layer), got {p!r}"
                )
            name, shape = p[0], p[1]
            if not isinstance(name, str) or not name:
                raise SchemaError(f"parameter #{i}: name must be a non-empty string, got {name!r}")
            if "\x00" in name:
                # netCDF and C readers cut names at NUL: two tensors could merge silently
                raise SchemaError(f"parameter #{i}: name {name!r} contains a NUL character")
            if isinstance(shape, int | np.integer):
                shape = (int(shape),)
            try:
                shape = tuple(int(s) for s in shape)
            except TypeError as e:
                raise SchemaError(f"parameter {name!r}: shape {shape!r} is not a tuple of ints") from e
            if any(s < 0 for s in shape):
                raise SchemaError(f"parameter {name!r}: negative dimension in shape {shape}")
            layer = p[2] if len(p) == 3 else (name.rsplit(".", 1)[0] if "." in name else name)
            if "\x00" in str(layer):
                raise SchemaError(f"parameter {name!r}: layer name {layer!r} contains a NUL character")
            names.append(name)
            shapes.append(shape)
            layers.append(str(layer))
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise SchemaError(f"duplicate parameter names in layout: {dup}")
        if not names:
            raise SchemaError("layout has no parameters")
        return cls(tuple(names), tuple(shapes), tuple(layers))

    @property
    def n_params(self) -> int:
        """Length of the flat parameter axis, P."""
        return int(sum(self.sizes))

    def to_json(self) -> str:
        """Canonical JSON used in the file and for the layout hash."""
        return json.dumps(
            [
                {"name": n, "shape": list(s), "layer": lay, "offset": o, "size": z}
                for n, s, lay, o, z in zip(
                    self.names, self.shapes, self.layers, self.offsets, self.sizes, strict=True
                )
            ],
            separators=(",", ":"),
        )

    @property
    def hash(self) -> str:
        """SHA-256 of names, shapes and layers: shards merge only when hashes match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def tensor_of_param(self) -> np.ndarray:
        """Tensor name of each flat parameter, shape ``(P,)``."""
        # a fixed-width str array repeated directly: an object array then .astype(str) cost
        # ~10 ms per call at P = 262,144 (a third of a reduce's time outside the kernel)
        return np.repeat(np.array(self.names, dtype=str), self.sizes)

    def layer_of_param(self) -> np.ndarray:
        """Layer name of each flat parameter, shape ``(P,)``."""
        return np.repeat(np.array(self.layers, dtype=str), self.sizes)

    @classmethod
    def from_json(cls, text: str, where: str) -> Layout:
        """Parse and validate the layout JSON stored in a file."""
        try:
            items = json.loads(text)
        except (ValueError, TypeError) as e:
            raise SchemaError(f"{where}: layout attribute is not valid JSON ({e})") from e
        if not isinstance(items, list):
            raise SchemaError(f"{where}: layout must be a JSON list")
        params = []
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not {"name", "shape", "layer"} <= set(it):
                raise SchemaError(f"{where}: layout entry #{i} lacks name/shape/layer")
            params.append((it["name"], it["shape"], it["layer"]))
        try:
            lay = cls.from_params(params)
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from e
        for i, it in enumerate(items):
            if it.get("offset") != lay.offsets[i] or it.get("size") != lay.sizes[i]:
                raise SchemaError(
                    f"{where}: layout entry {lay.names[i]!r} has offset/size "
                    f"{it.get('offset')}/{it.get('size')}, expected {lay.offsets[i]}/{lay.sizes[i]}"
                )
        return lay



def balanced_width(n: int, max_width: int) -> int:
    """Width of the fewest chunks of at most ``max_width`` that cover ``n``, as equal as can be.

    ``k = ceil(n / max_width)`` chunks of width ``ceil(n / k)``: the last one overhangs ``n``
    by fewer than ``k`` elements (a fixed ``max_width`` would overhang by up to
    ``max_width − 1``, which HDF5 stores in full).
    """
    n, max_width = max(1, int(n)), max(1, int(max_width))
    k = -(-n // max_width)
    return -(-n // k)


def chunk_cols(n_params: int, itemsize: int, max_cols: int = _MAX_CHUNK_COLS) -> int:
    """Column width of the ``grads`` chunks: at most ``max_cols``, padding ``≤ 5 %`` of P.

    HDF5 stores every chunk at full size, so the columns past ``P`` in the last column chunk
    cost file space: ``padding = ceil(P / w)·w − P``. Widths that are a multiple of 4096
    bytes let :class:`~gsnr_stats.store._chunkio.DirectChunks` use ``O_DIRECT``; the widest
    such width from ``max_cols`` down to ``max_cols / 2`` is taken if its padding is
    ``≤ 2 %`` of ``P``, otherwise :func:`balanced_width` (padding below ``ceil(P / max_cols)``
    columns, width above ``max_cols / 2``). A model with ``P ≤ max_cols`` gets one column
    chunk of width ``P`` (no padding).
    """
    P = max(1, int(n_params))
    if P <= max_cols:
        return P
    unit = _ALIGN // itemsize if _ALIGN % itemsize == 0 else 0
    if unit:
        # widest first, and never below max_cols / 2: a narrower chunk has more rows, and
        # one chunk row (what the last, partial one wastes at most) would grow with them
        for k in range(max_cols // unit, 0, -1):
            w = k * unit
            if 2 * w < max_cols:
                break
            if -(-P // w) * w - P <= _ALIGNED_PAD * P:
                return w
    return balanced_width(P, max_cols)


def auto_chunks(n_params: int, itemsize: int) -> tuple[int, int]:
    """Chunk shape ``(rows, cols)`` of about 2 MiB for a ``(N, P)`` gradient dataset.

    Columns (:func:`chunk_cols`) are capped at 8192 so that one chunk row of a wide model
    still holds several samples (the two-pass kernel runs per chunk) and chosen so that the
    last column chunk pads the file by at most 5 % of ``P``; rows fill the rest of the 2 MiB.
    """
    cols = chunk_cols(n_params, itemsize)
    rows = max(1, min(65536, _TARGET_CHUNK_BYTES // (cols * itemsize)))
    return int(rows), int(cols)



def check_same_layout(stores: Sequence[Any]) -> Layout:
    """The common layout of several shards; :class:`LayoutMismatchError` naming both files."""
    first = stores[0]
    for s in stores[1:]:
        if s.layout.hash != first.layout.hash:
            raise LayoutMismatchError(
                f"parameter layouts differ: {first.path} ({first.layout.n_params} params, "
                f"hash {first.layout.hash[:12]}) vs {s.path} ({s.layout.n_params} params, "
                f"hash {s.layout.hash[:12]}); shards of one run must share a layout"
            )
    return first.layout
