"""Factored records (format 4): per-sample gradients of Linear-like tensors as their factors.

For a weight ``W`` of shape ``(out, in)`` whose input rows are the samples, sample ``i``'s
gradient is exactly ``g_W,i = Σ_t δ_it a_itᵀ`` (``t`` over ``T`` factor rows: 1 for an MLP
input, the sequence length for ``(B, T, in)`` inputs; zero rows pad shorter sequences
exactly), and the gradient of a bias tied to it is ``Σ_t δ_it``. A factored store keeps
``A (n, T, in)`` and ``Δ (n, T, out)`` per factored tensor in ``factors/<k>/a`` and
``factors/<k>/delta`` and only the other tensors (the *plain* columns) in ``grads``
(``docs/format.md``, "Format 4: factored records"). This module owns the declarations
(:class:`FactorSpec`, :class:`FactorInfo`), the writer's checks of what it is handed, the
reader's validation of a factored file and its verified reads, and :func:`materialize`,
which turns factors back into full gradient rows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..errors import SchemaError, StoreError
from ._inputs import check_grads
from .layout import Layout
from .schema import bytes_crc, data_checksum

if TYPE_CHECKING:
    from ._records import Segment
    from .reader import GradientStore
    from .writer import GradientWriter

FACTOR_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_MAX_FACTORS_JSON = 16 << 20
_TMP_BYTES = 64 << 20  # float64 scratch of one materialised product block
_CHUNK_BYTES = 256 << 10  # target bytes of one factor dataset chunk (stored whole: small)
_LOCK = threading.Lock()  # one verification of a segment's factors at a time (Dask threads)
_MASK = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class FactorSpec:
    """A factored tensor declared to :class:`~gsnr_stats.GradientWriter` (``factors=``).

    Parameters
    ----------
    weight : str
        Name of a 2-D layout tensor ``(out, in)``; its per-sample gradient is
        ``Σ_t δ_t a_tᵀ``.
    bias : str, optional
        Name of a 1-D layout tensor ``(out,)`` whose per-sample gradient is ``Σ_t δ_t``.
    rows : int
        ``T``, the factor rows stored per sample (1 for plain MLP inputs, the longest
        sequence for ``(B, T, in)`` inputs; shorter ones are zero-padded).
    """

    weight: str
    bias: str | None = None
    rows: int = 1


@dataclass(frozen=True)
class FactorInfo:
    """A factored tensor of a store: names, sizes, stored dtype and flat offsets.

    ``w_offset`` is the flat offset of the weight in the layout (``out·in`` values, row-major
    ``(out, in)``), ``b_offset`` that of the bias (``out`` values) or ``None``.
    """

    weight: str
    bias: str | None
    out: int
    in_: int
    rows: int
    dtype: np.dtype
    w_offset: int
    b_offset: int | None

    @property
    def stored_per_sample(self) -> int:
        """Values stored per sample: ``rows·(in + out)``."""
        return self.rows * (self.in_ + self.out)

    @property
    def materialised_per_sample(self) -> int:
        """Values of the materialised gradient per sample: ``out·in`` (+ ``out``)."""
        return self.out * self.in_ + (self.out if self.bias is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        """The entry of the root ``factors`` attribute."""
        return {"weight": self.weight, "bias": self.bias, "out": self.out, "in": self.in_,
                "rows": self.rows, "dtype": str(self.dtype.name)}


# -- declarations -------------------------------------------------------------------------

def _as_spec(x: Any, i: int) -> FactorSpec:
    if isinstance(x, FactorSpec):
        return x
    if isinstance(x, str):
        return FactorSpec(x)
    if isinstance(x, Sequence) and len(x) in (2, 3) and isinstance(x[0], str):
        return FactorSpec(x[0], x[1], *(x[2:]))
    raise SchemaError(f"factors[{i}]: expected a FactorSpec, a weight name or a (weight, bias) "
                      f"tuple, got {x!r}")


def resolve(layout: Layout, specs: Sequence[Any], dtype: Any, where: str) -> list[FactorInfo]:
    """Check factor declarations against ``layout``: :class:`FactorInfo` per factor.

    Rules: the weight is a 2-D layout tensor ``(out, in)`` with ``out, in ≥ 1``; the bias,
    if any, a 1-D tensor of shape ``(out,)``; no tensor is named twice; ``rows ≥ 1``.
    """
    dt = FACTOR_DTYPES.get(str(dtype)) or FACTOR_DTYPES.get(str(np.dtype(dtype))
                                                            if _is_dtype(dtype) else "")
    if dt is None:
        raise SchemaError(f"{where}: factor dtype must be float32 or float64, got {dtype!r}")
    index = {n: t for t, n in enumerate(layout.names)}
    used: set[str] = set()
    out: list[FactorInfo] = []
    for i, raw in enumerate(specs):
        s = _as_spec(raw, i)
        what = f"{where}: factor {s.weight!r}"
        if s.weight not in index:
            raise SchemaError(f"{what}: no such tensor in the layout")
        shape = layout.shapes[index[s.weight]]
        if len(shape) != 2 or min(shape) < 1:
            raise SchemaError(f"{what}: a factored weight must be 2-D (out, in), shape is {shape}")
        if isinstance(s.rows, bool) or not isinstance(s.rows, int | np.integer) or s.rows < 1:
            raise SchemaError(f"{what}: rows must be an integer >= 1, got {s.rows!r}")
        b_off = None
        if s.bias is not None:
            if not isinstance(s.bias, str) or s.bias not in index:
                raise SchemaError(f"{what}: bias {s.bias!r} is not a tensor of the layout")
            if layout.shapes[index[s.bias]] != (shape[0],):
                raise SchemaError(f"{what}: bias {s.bias!r} has shape "
                                  f"{layout.shapes[index[s.bias]]}, expected ({shape[0]},)")
            b_off = layout.offsets[index[s.bias]]
        for name in (s.weight, s.bias):
            if name is not None and name in used:
                raise SchemaError(f"{what}: tensor {name!r} is named by two factors")
            if name is not None:
                used.add(name)
        out.append(FactorInfo(s.weight, s.bias, int(shape[0]), int(shape[1]), int(s.rows), dt,
                              layout.offsets[index[s.weight]], b_off))
    return out


def _is_dtype(x: Any) -> bool:
    try:
        np.dtype(x)
    except TypeError:
        return False
    return True


def plain_space(layout: Layout, factors: Sequence[FactorInfo]) -> tuple[np.ndarray, Layout]:
    """Flat indices (into P) of the plain columns, and the layout of the plain tensors."""
    named = {f.weight for f in factors} | {f.bias for f in factors if f.bias is not None}
    keep = [t for t, n in enumerate(layout.names) if n not in named]
    idx = (np.concatenate([np.arange(layout.offsets[t], layout.offsets[t] + layout.sizes[t])
                           for t in keep]).astype(np.int64) if keep else np.zeros(0, np.int64))
    sub = Layout(tuple(layout.names[t] for t in keep), tuple(layout.shapes[t] for t in keep),
                 tuple(layout.layers[t] for t in keep))
    return idx, sub


def to_json(factors: Sequence[FactorInfo]) -> str:
    """The root ``factors`` attribute: a JSON list of :meth:`FactorInfo.to_dict`."""
    return json.dumps([f.to_dict() for f in factors], separators=(",", ":"))


def from_json(text: str, layout: Layout, path: Any) -> list[FactorInfo]:
    """Parse and check the root ``factors`` attribute of a format 4 file (SchemaError)."""
    if len(text) > _MAX_FACTORS_JSON:
        raise SchemaError(f"{path}: factors attribute is implausibly large")
    try:
        items = json.loads(text)
    except ValueError as e:
        raise SchemaError(f"{path}: factors attribute is not valid JSON ({e})") from e
    if not isinstance(items, list) or not items:
        raise SchemaError(f"{path}: factors attribute must be a non-empty JSON list")
    specs, dtypes = [], set()
    for k, it in enumerate(items):
        if not isinstance(it, dict) or not {"weight", "bias", "out", "in", "rows", "dtype"} <= set(it):
            raise SchemaError(f"{path}: factors entry #{k} lacks weight/bias/out/in/rows/dtype")
        if not isinstance(it["weight"], str) or it["dtype"] not in FACTOR_DTYPES:
            raise SchemaError(f"{path}: factors entry #{k} has a bad weight name or dtype "
                              f"({it['weight']!r}, {it['dtype']!r})")
        specs.append(FactorSpec(it["weight"], it["bias"], it["rows"]))
        dtypes.add(it["dtype"])
    if len(dtypes) != 1:
        raise SchemaError(f"{path}: factors mix dtypes {sorted(dtypes)}")
    infos = resolve(layout, specs, dtypes.pop(), str(path))
    for k, (fi, it) in enumerate(zip(infos, items, strict=True)):
        if (it["out"], it["in"]) != (fi.out, fi.in_):
            raise SchemaError(
                f"{path}: factor {k} ({fi.weight!r}) says out/in {it['out']}/{it['in']}, the "
                f"layout's tensor has shape ({fi.out}, {fi.in_})")
    return infos


def dataset_names(factors: Sequence[FactorInfo]) -> list[str]:
    """``factors/<k>/a``, ``factors/<k>/delta`` for every factor, in checksum order."""
    return [f"factors/{k}/{n}" for k in range(len(factors)) for n in ("a", "delta")]


def _widths(fi: FactorInfo) -> tuple[int, int]:
    return fi.in_, fi.out


# -- writer -------------------------------------------------------------------------------

def create_datasets(f: h5py.File, factors: Sequence[FactorInfo]) -> None:
    """The empty ``factors/<k>/a`` ``(0, rows, in)`` and ``delta`` ``(0, rows, out)`` datasets."""
    grp = f.create_group("factors")
    grp.attrs["long_name"] = "factored tensors: per-sample input rows a and output-gradient rows delta"
    for k, fi in enumerate(factors):
        g = grp.create_group(str(k))
        g.attrs["weight"] = fi.weight
        g.attrs["bias"] = fi.bias or ""
        for name, width in zip(("a", "delta"), _widths(fi), strict=True):
            row = fi.rows * width * fi.dtype.itemsize
            rc = int(max(1, min(4096, _CHUNK_BYTES // max(1, row))))
            g.create_dataset(name, (0, fi.rows, width), maxshape=(None, fi.rows, width),
                             dtype=fi.dtype, chunks=(rc, fi.rows, width))


def _factor_array(x: Any, fi: FactorInfo, which: str, width: int, where: str) -> np.ndarray:
    what = f"{where}: factor {fi.weight!r} {which}"
    a = np.asarray(x)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.floating)
                                   or np.issubdtype(a.dtype, np.integer)):
        raise SchemaError(f"{what} dtype {a.dtype} is not a real number type")
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[2] != width:
        raise SchemaError(f"{what} has shape {np.shape(x)}, expected (n, {width}) or "
                          f"(n, T, {width}) with T <= {fi.rows}")
    if a.shape[1] > fi.rows:
        raise SchemaError(f"{what} has T = {a.shape[1]} rows per sample, the store was declared "
                          f"with rows={fi.rows}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = a.astype(fi.dtype)
    if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize > fi.dtype.itemsize:
        over = np.isinf(cast) & np.isfinite(a)
        if over.any():
            r = int(np.nonzero(over)[0][0])
            raise StoreError(f"{what}: a value of sample row {r} overflows {fi.dtype.name} "
                             f"(use factor_dtype='float64' or rescale the loss)")
    out = np.zeros((a.shape[0], fi.rows, width), fi.dtype)
    out[:, : a.shape[1]] = cast
    return out


def check_write(w: GradientWriter, grads: Any, factors: Any,
                where: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """What ``write`` was handed for a factored store: ``(G_plain, [A_0, Δ_0, A_1, ...])``.

    Every declared factor must be given (``{weight: (A, Δ)}``), ``A``/``Δ`` ``(n, in)`` /
    ``(n, out)`` or ``(n, T, ·)`` with ``T ≤ rows`` (zero-padded to ``rows`` here) in the
    factor dtype. Non-finite values are stored as given, as for ``grads``.
    """
    P_plain = w._plain.n_params
    if not w.factors:
        raise SchemaError(f"{where}: factors= given, but the writer was created without "
                          "factors (pass factors=[...] to GradientWriter)")
    names = [f.weight for f in w.factors]
    if factors is None:
        shape = np.shape(grads) if grads is not None else None
        raise SchemaError(
            f"{where}: this store holds factored tensors {names}: pass their factors with "
            f"factors={{weight: (A, delta)}} and grads of the {P_plain} plain columns "
            f"(got grads of shape {shape})")
    if not isinstance(factors, Mapping):
        raise SchemaError(f"{where}: factors must be a mapping weight -> (A, delta)")
    extra = sorted(set(factors) - set(names), key=str)
    if extra:
        raise SchemaError(f"{where}: factors {extra} were not declared to the writer ({names})")
    arrays: list[np.ndarray] = []
    n: int | None = None
    for fi in w.factors:
        if fi.weight not in factors:
            raise SchemaError(f"{where}: factor {fi.weight!r} is missing (every declared factor "
                              "must be given in each write)")
        pair = factors[fi.weight]
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise SchemaError(f"{where}: factor {fi.weight!r} must be a pair (A, delta)")
        a = _factor_array(pair[0], fi, "A", fi.in_, where)
        d = _factor_array(pair[1], fi, "delta", fi.out, where)
        if a.shape[0] != d.shape[0] or np.shape(pair[0])[1:-1] != np.shape(pair[1])[1:-1]:
            raise SchemaError(f"{where}: factor {fi.weight!r}: A {np.shape(pair[0])} and delta "
                              f"{np.shape(pair[1])} disagree on samples or T")
        if n is not None and a.shape[0] != n:
            raise SchemaError(f"{where}: factor {fi.weight!r} has {a.shape[0]} samples, "
                              f"others have {n}")
        n = a.shape[0]
        arrays += [a, d]
    if grads is None:
        if P_plain:
            raise SchemaError(f"{where}: grads of the {P_plain} plain columns are missing")
        grads = np.zeros((n or 0, 0), np.float32)
    g = check_grads(grads, P_plain, where)
    if g.shape[0] != n:
        raise SchemaError(f"{where}: grads has {g.shape[0]} rows, the factors {n} samples")
    return g, arrays


# -- reader -------------------------------------------------------------------------------

def load(store: GradientStore) -> None:
    """Set ``factors``, ``plain_index``, ``n_plain`` of ``store``; validate v4 datasets."""
    path, layout = store.path, store.layout
    store._factor_ds = []
    if store.version < 4:
        store.factors = []
        store.plain_index = np.arange(layout.n_params, dtype=np.int64)
        store.n_plain = layout.n_params
        return
    from ._open import _attr_str

    store.factors = from_json(_attr_str(store._f, "factors", path), layout, path)
    store.plain_index, _ = plain_space(layout, store.factors)
    store.n_plain = int(store.plain_index.size)
    n_plain = store._f.attrs.get("n_plain")
    if not isinstance(n_plain, int | np.integer) or int(n_plain) != store.n_plain:
        shown = int(n_plain) if isinstance(n_plain, int | np.integer) else repr(n_plain)
        raise SchemaError(f"{path}: n_plain attribute {shown} does not match the layout and "
                          f"factors ({store.n_plain} plain columns)")
    grp = store._obj("factors")
    if not isinstance(grp, h5py.Group):
        raise SchemaError(f"{path}: group 'factors' is missing")
    want = {str(k) for k in range(len(store.factors))}
    if set(grp) != want:
        raise SchemaError(f"{path}: group 'factors' holds {sorted(grp)}, expected the factors "
                          f"{sorted(want, key=int)}")
    for k, fi in enumerate(store.factors):
        for name, width in zip(("a", "delta"), _widths(fi), strict=True):
            full = f"factors/{k}/{name}"
            ds = store._obj(full)
            what = f"{path}: factor {k} ({fi.weight!r}) dataset {full!r}"
            if not isinstance(ds, h5py.Dataset):
                raise SchemaError(f"{what} is missing")
            if ds.ndim != 3 or tuple(ds.shape[1:]) != (fi.rows, width):
                raise SchemaError(f"{what} has shape {ds.shape}, expected (n, {fi.rows}, {width})")
            if ds.dtype != fi.dtype:
                raise SchemaError(f"{what} has dtype {ds.dtype}, expected {fi.dtype}")
            store._factor_ds.append(full)


def check_backing(store: GradientStore, size: int, slack: bool) -> None:
    """Refuse factor datasets claiming more rows than their bytes hold (memory bombs).

    The least a record of a factored store stores per sample is its plain columns (float16
    at the best filter ratio) and its factor rows; a file smaller than one sample's worth
    holds no data, whatever P its layout claims.
    """
    from ._open import _backed_rows
    from .schema import MAX_FILTER_RATIO

    path = store.path
    need = store.n_plain * 2 + sum(f.stored_per_sample * f.dtype.itemsize for f in store.factors)
    if store.records and need > size * MAX_FILTER_RATIO:
        raise SchemaError(f"{path}: layout and factors claim {need} bytes per sample, more than "
                          f"the file's {size} bytes could hold (a crafted file?)")
    stop = store._grads_stop
    for k, fi in enumerate(store.factors):
        for name, width in zip(("a", "delta"), _widths(fi), strict=True):
            full = f"factors/{k}/{name}"
            row = fi.rows * width * fi.dtype.itemsize
            if stop and stop > _backed_rows(store._obj(full), row, slack):
                raise SchemaError(f"{path}: records claim {stop} rows of {factor_label(store, full)}, "
                                  "more than its stored bytes can hold")


def factor_label(store: GradientStore, name: str) -> str:
    """``factor k ('fc1.weight') dataset 'factors/k/a'`` for messages."""
    k = int(name.split("/")[1])
    return f"factor {k} ({store.factors[k].weight!r}) dataset {name!r}"


def raw_rows(store: GradientStore, lo: int, hi: int, where: str) -> list[np.ndarray]:
    """Stored factor rows ``[lo, hi)`` of every factor dataset (checksum order)."""
    return [store._read(n, np.s_[lo:hi], where) for n in store._factor_ds]


def _segment(store: GradientStore, key: tuple[int, str], i: int, seg: Segment, lo: int, hi: int,
             where: str) -> list[np.ndarray]:
    """Factor rows ``[lo, hi)`` (dataset rows) of segment ``i``, its aux CRC checked once."""
    done = store._fverified
    if seg.aux_crc is None or (key, i) in done:
        return raw_rows(store, lo, hi, where)
    with _LOCK:
        vals = [store._read(n, slice(seg.start, seg.stop), where)
                for n in ("loss", "sample_id", "label")]
        fac = raw_rows(store, seg.start, seg.stop, where)
        if bytes_crc(*vals, *fac) != seg.aux_crc:
            raise store._damaged(where, "loss/sample_id/label/factors", seg)
        done.add((key, i))
    return [x[lo - seg.start : hi - seg.start] for x in fac]


def _pieces(store: GradientStore, step: int, split: str, start: int, stop: int | None
            ) -> Iterator[tuple[int, Segment, int, int, int]]:
    """``(segment index, segment, dataset lo, hi, record position of lo)`` over ``[start, stop)``."""
    rec = store.record(step, split)
    where = store._where(step, split)
    if rec.kind != "gradients":
        raise StoreError(f"{where} holds moments only; per-sample factors were not stored")
    stop = rec.n_samples if stop is None else int(stop)
    start = int(start)
    if not 0 <= start <= stop <= rec.n_samples:
        raise StoreError(f"{where}: rows [{start}, {stop}) outside the record's "
                         f"{rec.n_samples} rows")
    pos = 0
    for i, seg in enumerate(store._segments[(int(step), split)]):
        a, b = max(start, pos), min(stop, pos + seg.stop - seg.start)
        if a < b:
            yield i, seg, seg.start + a - pos, seg.start + b - pos, a
        pos += seg.stop - seg.start
        if pos >= stop:
            break


def read_factors(store: GradientStore, step: int, split: str, start: int = 0,
                 stop: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Factor rows ``[start, stop)`` of a record: ``weight -> (A (m, rows, in), Δ (m, rows, out))``."""
    where = store._where(step, split)
    if not store.factors:
        raise StoreError(f"{where}: the store has no factored tensors")
    key = (int(step), split)
    parts: list[list[np.ndarray]] = [[] for _ in store._factor_ds]
    for i, seg, lo, hi, _ in _pieces(store, step, split, start, stop):
        for p, x in zip(parts, _segment(store, key, i, seg, lo, hi, where), strict=True):
            p.append(x)
    out = {}
    for k, fi in enumerate(store.factors):
        ab = []
        for j, width in zip((2 * k, 2 * k + 1), _widths(fi), strict=True):
            ps = parts[j]
            ab.append(np.concatenate(ps) if len(ps) > 1 else ps[0] if ps
                      else np.zeros((0, fi.rows, width), fi.dtype))
        out[fi.weight] = (ab[0], ab[1])
    return out


def out_dtype(store: GradientStore) -> np.dtype:
    """dtype of materialised rows: the store's, at least float32 (float16 plain columns)."""
    return np.result_type(store.grads_dtype, np.float32)


def iter_grads(store: GradientStore, step: int, split: str, rows: int) -> Iterator[np.ndarray]:
    """Materialised ``(m, P)`` blocks of a record (see ``GradientStore.iter_grads``)."""
    where = store._where(step, split)
    key = (int(step), split)
    Pp, P = store.n_plain, store.layout.n_params
    dt = out_dtype(store)
    for i, seg, lo, hi, _ in _pieces(store, step, split, 0, None):
        fac = _segment(store, key, i, seg, lo, hi, where)
        s1 = s2 = 0
        for r in range(lo, hi, rows):
            j = min(r + rows, hi)
            plain = store._read("grads", np.s_[r:j], where)
            if seg.sum1 is not None:
                a, b = data_checksum(plain, (r - seg.start) * Pp, Pp)
                s1, s2 = (s1 + a) & _MASK, (s2 + b) & _MASK
                if j == hi and (s1, s2) != (seg.sum1, seg.sum2):
                    raise store._damaged(where, "gradients", seg)
            fr = {fi.weight: (fac[2 * k][r - lo : j - lo], fac[2 * k + 1][r - lo : j - lo])
                  for k, fi in enumerate(store.factors)}
            yield materialize(store.factors, store.plain_index, P, plain, fr, dt)


def read_rows(store: GradientStore, step: int, split: str, start: int, stop: int,
              cols: tuple[int, int] | None, verify: bool) -> np.ndarray:
    """Materialised rows ``[start, stop)`` over flat columns ``cols`` of a factored record."""
    from . import _rows

    P = store.layout.n_params
    c0, c1 = (0, P) if cols is None else (int(cols[0]), int(cols[1]))
    if not 0 <= c0 <= c1 <= P:
        raise StoreError(f"{store._where(step, split)}: columns [{c0}, {c1}) outside the "
                         f"record's {P} parameters")
    plain = _rows.read_rows(store, step, split, start, stop, None, verify)
    fac = read_factors(store, step, split, start, stop)
    return materialize(store.factors, store.plain_index, P, plain, fac, out_dtype(store),
                       cols=(c0, c1))


def materialize(factors: Sequence[FactorInfo], plain_index: np.ndarray, P: int,
                plain_rows: np.ndarray | None,
                factor_rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
                dtype: Any = np.float32, *, cols: tuple[int, int] | None = None) -> np.ndarray:
    """Full per-sample gradient rows ``(m, P)`` (layout order) from plain columns and factors.

    ``g_W,i = Σ_t δ_it a_itᵀ`` (row-major ``(out, in)`` at ``w_offset``) and, for a tied bias,
    ``g_b,i = Σ_t δ_it`` (at ``b_offset``); every other flat column ``plain_index[j]`` is
    ``plain_rows[:, j]``. Products are formed and summed over ``t`` in float64 (exact for
    float32 factors with ``T = 1``), then cast once to ``dtype``. ``cols = (c0, c1)`` returns
    only those flat columns, ``(m, c1 - c0)``. Scratch memory is bounded (64 MiB of float64).

    Parameters
    ----------
    factors : sequence of FactorInfo
        The store's factors (``store.factors``).
    plain_index : (P_plain,) int64 ndarray
        Flat indices of the plain columns (``store.plain_index``).
    P : int
        Parameters of the full layout.
    plain_rows : (m, P_plain) ndarray or None
        Plain columns (None when ``P_plain == 0``).
    factor_rows : mapping
        ``weight -> (A (m, [T,] in), Δ (m, [T,] out))``.
    dtype : dtype
        dtype of the result.
    """
    c0, c1 = (0, int(P)) if cols is None else (int(cols[0]), int(cols[1]))
    plain_index = np.asarray(plain_index, np.int64)
    m = None if plain_rows is None else int(plain_rows.shape[0])
    if m is None:
        m = int(np.shape(next(iter(factor_rows.values()))[0])[0]) if factor_rows else 0
    out = np.zeros((m, c1 - c0), dtype)
    if plain_index.size:
        sel = (plain_index >= c0) & (plain_index < c1)
        if sel.any():
            out[:, plain_index[sel] - c0] = np.asarray(plain_rows)[:, sel]
    for fi in factors:
        A, D = factor_rows[fi.weight]
        A, D = np.asarray(A), np.asarray(D)
        if A.ndim == 2:
            A, D = A[:, None, :], D[:, None, :]
        w0, w1 = fi.w_offset, fi.w_offset + fi.out * fi.in_
        if (A.shape[1] == 1 and A.dtype == D.dtype == out.dtype == np.float32
                and c0 <= w0 and w1 <= c1):
            # one float32 product, correctly rounded: what float64 then one cast gives, bit
            # for bit, without the float64 scratch (the common case: an MLP, read whole)
            dst = out[:, w0 - c0 : w1 - c0]
            dst.shape = (m, fi.out, fi.in_)  # a view of out's columns (never a copy)
            np.multiply(D[:, 0, :, None], A[:, 0, None, :], out=dst)
        elif max(w0, c0) < min(w1, c1):
            # rows o of W holding columns [c0, c1): only those products are formed
            o0, o1 = (max(w0, c0) - w0) // fi.in_, -(-(min(w1, c1) - w0) // fi.in_)
            lo, hi = w0 + o0 * fi.in_, w0 + o1 * fi.in_
            a, b = max(lo, c0), min(hi, c1)
            step = max(1, _TMP_BYTES // (8 * (o1 - o0) * fi.in_ * max(1, A.shape[1])))
            for r in range(0, m, step):
                s = slice(r, min(m, r + step))
                d64 = np.asarray(D[s, :, o0:o1], np.float64).transpose(0, 2, 1)
                prod = np.matmul(d64, np.asarray(A[s], np.float64)).reshape(d64.shape[0], -1)
                out[s, a - c0 : b - c0] = prod[:, a - lo : b - lo]
        if fi.b_offset is not None and max(fi.b_offset, c0) < min(fi.b_offset + fi.out, c1):
            a, b = max(fi.b_offset, c0), min(fi.b_offset + fi.out, c1)
            bsum = np.asarray(D, np.float64).sum(axis=1)
            out[:, a - c0 : b - c0] = bsum[:, a - fi.b_offset : b - fi.b_offset]
    return out


def factor_bytes(store: GradientStore) -> tuple[int, int]:
    """``(stored, materialised)`` bytes of the per-sample values of the completed records."""
    n = sum(r.n_samples for r in store.records if r.kind == "gradients")
    item = out_dtype(store).itemsize
    stored = n * (store.n_plain * store.grads_dtype.itemsize
                  + sum(f.stored_per_sample * f.dtype.itemsize for f in store.factors))
    return int(stored), int(n * store.layout.n_params * item)


def summary_lines(store: GradientStore) -> list[str]:
    """What ``gsnr-stats info`` prints about a factored store (``[]`` for other stores):
    the factored tensors, values stored per sample vs materialised, and the bytes saved."""
    if not store.factors:
        return []
    from ._space import _fmt

    P = store.layout.n_params
    out = [f"  factored tensors (format 4): {len(store.factors)}, factor dtype "
           f"{store.factors[0].dtype.name}; grads holds the P_plain={store.n_plain} plain columns "
           f"of P={P}"]
    for fi in store.factors:
        bias = f" + bias {fi.bias}" if fi.bias else ""
        out.append(f"    {fi.weight}{bias}  ({fi.out}, {fi.in_}), rows T={fi.rows}: "
                   f"{fi.stored_per_sample} values a sample instead of {fi.materialised_per_sample}")
    stored, full = factor_bytes(store)
    ratio = f" ({full / stored:.1f}x smaller)" if stored else ""
    out.append(f"  per-sample values of the records: {_fmt(stored)} stored, {_fmt(full)} "
               f"materialised{ratio}")
    return out
