"""A record's per-sample gradients as plain columns + factors, and their JL projections.

A gradient record is read in row chunks ``(plain, factors)``: ``plain`` the ``(m, P_plain)``
stored columns (every column for a store without factors), ``factors`` a dict weight name ->
``(A (m, T, in), Δ (m, T, out))`` (format v4, ``docs/format.md``), so that sample i's
gradient of a factored weight is ``Σ_t δ_it a_itᵀ`` (its tied bias ``Σ_t δ_it``) without
forming the P-vector. :func:`project_record` projects a record on a seeded Gaussian
matrix, the one of ``adapters/_moments.py``'s ``JLProjection`` (same seed, same numbers on
a materialised and a factored store), optionally Kronecker-structured on the factored
weights. Reads only through the public :class:`~.store.GradientStore` API.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._dsutil import describe, require_int, require_paths
from .engine import check_shard_set, same_files
from .errors import ArgumentTypeError, MissingSplitError, UsageError
from .store import check_same_layout, expand_paths, open_store

__all__ = ["project_record"]

# SeedSequence pads a short entropy list with zeros, so [seed, b] and [seed, b, 0] would
# be one stream: the Kronecker factors use a 4-word key with a nonzero tag and side
_KRON_TAG = 0x4B524F4E  # "KRON"

Chunk = tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class RecordMeta:
    """Where a record's stored numbers sit on the flat parameter axis.

    Attributes
    ----------
    n_params : int
        P, the full model.
    plain_index : (P_plain,) int64
        Flat indices of the stored plain columns, ascending.
    factors : tuple
        The store's ``FactorInfo`` objects (``weight, bias, out, in_, rows, w_offset,
        b_offset``), empty for a store without factors.
    names, offsets, shapes : tuple
        The layout's tensors (to find weights named by ``factors=`` among plain columns).
    """

    n_params: int
    plain_index: np.ndarray
    factors: tuple[Any, ...] = ()
    names: tuple[str, ...] = ()
    offsets: tuple[int, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    by_weight: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_weight", {f.weight: f for f in self.factors})


def record_meta(store: Any) -> RecordMeta:
    """:class:`RecordMeta` of an open store (factored or not)."""
    lay = store.layout
    facs = tuple(getattr(store, "factors", ()) or ())
    P = int(lay.n_params)
    pidx = (np.asarray(store.plain_index, dtype=np.int64) if facs
            else np.arange(P, dtype=np.int64))
    return RecordMeta(P, pidx, facs, tuple(lay.names), tuple(lay.offsets), tuple(lay.shapes))


def _factor_key(f: Any) -> tuple[Any, ...]:
    return (f.weight, f.bias, int(f.out), int(f.in_), int(f.w_offset),
            None if f.b_offset is None else int(f.b_offset))


def same_factors(stores: Sequence[Any]) -> bool:
    """True when every store is factored with the same factors (then factored math applies)."""
    keys = [tuple(_factor_key(f) for f in (getattr(st, "factored", False) and st.factors or ()))
            for st in stores]
    return bool(keys) and bool(keys[0]) and all(k == keys[0] for k in keys)


def record_chunks(parts: Sequence[Any], step: int, split: str, chunk_rows: int,
                  factored: bool) -> Callable[[], Iterator[Chunk]]:
    """Factory of ``(plain, factors)`` chunks of one record over the shards ``parts``.

    ``factored=False``: ``iter_grads`` (materialised full rows on a factored store) with
    ``factors = {}``; ``True``: ``read_plain_rows`` / ``read_factors`` (verified reads).
    """
    def it() -> Iterator[Chunk]:
        for st in parts:
            if not factored:
                for x in st.iter_grads(step, split, chunk_rows):
                    yield x, {}
                continue
            N = st.record(step, split).n_samples
            n_plain = int(np.asarray(st.plain_index).size)
            for lo in range(0, N, chunk_rows):
                hi = min(N, lo + chunk_rows)
                fac = st.read_factors(step, split, lo, hi)
                plain = (st.read_plain_rows(step, split, lo, hi) if n_plain
                         else np.zeros((hi - lo, 0)))
                yield plain, fac

    return it


def open_sources(source: Any, where: str, allow_mixed_runs: bool = False
                 ) -> tuple[list[Any], list[Any]]:
    """``(stores, opened)``: an open store, or the shards of one run opened from paths."""
    if hasattr(source, "read_grads"):
        return [source], []
    require_paths(source, where, "source")
    files = expand_paths(source)
    same_files(files)
    opened = [open_store(p) for p in files]
    try:
        check_same_layout(opened)
        check_shard_set(opened, allow_mixed_runs=allow_mixed_runs)
    except BaseException:
        for st in opened:
            st.close()
        raise
    return opened, opened


def parts_of(stores: Sequence[Any], step: int, split: str) -> list[Any]:
    """The shards holding a gradient record (step, split), in order."""
    return [st for st in stores if any(r.step == step and r.split == split
                                       and r.kind == "gradients" for r in st.records)]


def columns(chunk: Chunk, meta: RecordMeta, lo: int, hi: int) -> np.ndarray:
    """Full-gradient columns ``[lo, hi)`` of a chunk, float64 ``(m, hi - lo)``.

    Factor products are formed in float64 (exact for float32 factors) and summed over the
    T rows in float64: a block of columns, never the whole P-vector of a sample.
    """
    plain, fac = chunk
    m = plain.shape[0] if not fac else next(iter(fac.values()))[0].shape[0]
    out = np.zeros((m, hi - lo))
    pi = meta.plain_index
    a, b = np.searchsorted(pi, [lo, hi])
    if b > a:
        out[:, pi[a:b] - lo] = plain[:, a:b]
    for f in meta.factors:
        A, D = fac[f.weight]
        w0, w1 = f.w_offset, f.w_offset + f.out * f.in_
        s, e = max(lo, w0), min(hi, w1)
        if s < e:
            o0, o1 = (s - w0) // f.in_, (e - 1 - w0) // f.in_ + 1
            Dt = np.asarray(D[:, :, o0:o1], dtype=np.float64).transpose(0, 2, 1)
            prod = (Dt @ np.asarray(A, dtype=np.float64)).reshape(m, -1)
            base = w0 + o0 * f.in_
            out[:, s - lo:e - lo] = prod[:, s - base:e - base]
        if f.bias is not None:
            s, e = max(lo, f.b_offset), min(hi, f.b_offset + f.out)
            if s < e:
                bsum = np.asarray(D, dtype=np.float64).sum(axis=1)
                out[:, s - lo:e - lo] = bsum[:, s - f.b_offset:e - f.b_offset]
    return out


# -- the seeded Gaussian matrix ------------------------------------------------------------

class GaussianRows:
    """Rows of ``R / sqrt(k)``, ``R`` ``(P, k)`` i.i.d. N(0, 1), row block ``b`` drawn from
    ``numpy.random.default_rng([seed, b])`` (``block_rows`` rows each).

    The matrix of ``adapters/_moments.py``'s ``JLProjection`` (its base class; same ``seed``, ``k``,
    ``block_rows``: the same matrix), kept here because the core never imports an adapter.
    At most ``cache_bytes`` of generated blocks are kept.
    """

    def __init__(self, P: int, k: int, seed: int, block_rows: int = 8192,
                 cache_bytes: int = 256 << 20) -> None:
        self.P, self.k, self.seed = int(P), int(k), int(seed)
        self.block_rows, self.cache_bytes = max(1, int(block_rows)), int(cache_bytes)
        self._cache: dict[int, np.ndarray] = {}
        self._cached = 0

    def block(self, b: int) -> np.ndarray:
        """Rows ``[b·block_rows, (b+1)·block_rows)`` of ``R / sqrt(k)``, float64."""
        got = self._cache.get(b)
        if got is not None:
            return got
        rows = min(self.block_rows, self.P - b * self.block_rows)
        rb = np.random.default_rng([self.seed, b]).standard_normal((rows, self.k))
        rb *= 1.0 / math.sqrt(self.k)
        if self._cached + rb.nbytes <= self.cache_bytes:
            self._cache[b] = rb
            self._cached += rb.nbytes
        return rb


def kron_factors(seed: int, tensor_index: int, out: int, in_: int, k1: int, k2: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``R1 (out, k1)``, ``R2 (in, k2)`` i.i.d. N(0, 1) of the layout tensor ``tensor_index``,
    from ``default_rng([seed, 0x4B524F4E, tensor_index, 1])`` and ``[..., 2]`` (independent of
    every block of :class:`GaussianRows`)."""
    r1 = np.random.default_rng([seed, _KRON_TAG, tensor_index, 1]).standard_normal((out, k1))
    r2 = np.random.default_rng([seed, _KRON_TAG, tensor_index, 2]).standard_normal((in_, k2))
    return r1, r2


def _kron_targets(meta: RecordMeta, names: Sequence[str] | None) -> list[tuple[str, int, int,
                                                                             int, int]]:
    """``(weight, tensor index, offset, out, in)`` of the Kronecker-projected weights."""
    if names is None:
        names = [f.weight for f in meta.factors]
    out = []
    for w in names:
        if not isinstance(w, str) or w not in meta.names:
            raise UsageError(f"gs.project_record: factors names {w!r}, not a tensor of the "
                             f"layout ({len(meta.names)} tensors)")
        j = meta.names.index(w)
        shp = meta.shapes[j]
        if len(shp) != 2:
            raise UsageError(f"gs.project_record: Kronecker factor {w!r} has shape {shp}; "
                             "only 2-D (out, in) weights can be")
        out.append((w, j, int(meta.offsets[j]), int(shp[0]), int(shp[1])))
    if len({t[0] for t in out}) != len(out):
        raise UsageError(f"gs.project_record: factors names a tensor twice: {list(names)}")
    return out


def project_chunks(chunks: Callable[[], Iterator[Chunk]], meta: RecordMeta, k: int, seed: int,
                   kron: tuple[int, int] | None = None, kron_weights: Sequence[str] | None = None,
                   block_rows: int = 8192, cache_bytes: int = 256 << 20) -> np.ndarray:
    """``Z (N, k)`` float64 of :func:`project_record` from ``(plain, factors)`` chunks."""
    P = meta.n_params
    rows = GaussianRows(P, k, seed, block_rows, cache_bytes)
    targets = _kron_targets(meta, kron_weights) if kron is not None else []
    skip = sorted((o, o + a * b) for _, _, o, a, b in targets)
    mats = {w: kron_factors(seed, j, a, b, *kron) for w, j, _, a, b in targets}
    nb = -(-P // rows.block_rows)
    # a dense block fully inside Kronecker-projected weights is never drawn
    blocks = [b for b in range(nb)
              if not any(s <= b * rows.block_rows and min(P, (b + 1) * rows.block_rows) <= e
                         for s, e in skip)]
    out: list[np.ndarray] = []
    scale = 1.0 / math.sqrt(k)
    for ch in chunks():
        plain, fac = ch
        m = plain.shape[0] if not fac else next(iter(fac.values()))[0].shape[0]
        z = np.zeros((m, k))
        for b in blocks:
            lo = b * rows.block_rows
            hi = min(P, lo + rows.block_rows)
            X = columns(ch, meta, lo, hi)
            for s, e in skip:
                if s < hi and e > lo:
                    X[:, max(s, lo) - lo:min(e, hi) - lo] = 0.0
            z += X @ rows.block(b)
        for w, _, off, o, i in targets:
            R1, R2 = mats[w]
            f = meta.by_weight.get(w)
            if f is not None:
                U = np.asarray(fac[w][1], dtype=np.float64) @ R1  # (m, T, k1)
                V = np.asarray(fac[w][0], dtype=np.float64) @ R2  # (m, T, k2)
                zk = np.einsum("mta,mtb->mab", U, V)
            else:
                c0 = int(np.searchsorted(meta.plain_index, off))
                G = np.asarray(plain[:, c0:c0 + o * i], dtype=np.float64).reshape(m, o, i)
                zk = np.einsum("oa,moi->mai", R1, G) @ R2
            z += zk.reshape(m, k) * scale
        out.append(z)
    return np.concatenate(out, axis=0) if out else np.zeros((0, k))


def project_record(
    source: Any,
    step: int,
    split: str,
    k: int,
    *,
    seed: int = 0,
    kron: tuple[int, int] | None = None,
    factors: Sequence[str] | None = None,
    chunk_rows: int = 1024,
    block_rows: int = 8192,
    cache_bytes: int = 256 << 20,
    allow_mixed_runs: bool = False,
) -> np.ndarray:
    """Johnson–Lindenstrauss projection of a record's per-sample gradients, ``(N, k)``.

    Dense (``kron=None``): :math:`z_i = R^\\top g_i / \\sqrt{k}`, ``R`` ``(P, k)`` i.i.d.
    N(0, 1) drawn as in ``adapters/_moments.py``'s ``JLProjection(P, k, seed)`` (row block
    ``b`` of ``block_rows`` rows from ``default_rng([seed, b])``): a materialised store, a
    factored store of the same data and a recorder's ``project=k`` give the same numbers
    (the factored products formed in float64, a block of columns at a time). For fixed
    ``g, h``: :math:`E[z_g\\cdot z_h] = g\\cdot h`,
    :math:`\\mathrm{Var}[z_g\\cdot z_h] = (|g|^2|h|^2 + (g\\cdot h)^2)/k`.

    Kronecker (``kron=(k1, k2)``, ``k = k1·k2``): each weight W (out, in) named by
    ``factors`` (default: the store's factored weights) is projected by
    :math:`R_1 \\otimes R_2` (``R1 (out, k1)``, ``R2 (in, k2)`` i.i.d. N(0, 1), from
    :func:`kron_factors`, never forming an ``(out·in, k)`` matrix):
    :math:`z_{W,i} = \\mathrm{vec}(R_1^\\top G_{W,i} R_2)/\\sqrt{k}
    = \\sum_t (R_1^\\top\\delta_{it}) \\otimes (R_2^\\top a_{it}) / \\sqrt{k}`, costing
    ``T(out·k1 + in·k2 + k)`` per sample instead of ``T·out·in·k``; every other coordinate
    (plain columns, biases) keeps its dense rows of ``R``, and the parts add into one
    k-vector. Unbiased: :math:`E|z_i|^2 = |g_i|^2` (all parts independent, zero mean,
    covariance :math:`(|g_p|^2/k) I`). Variance (proved in the tests' docstring,
    ``tests/test_factored_estimators.py``, and checked there by Monte Carlo):

    .. math::

        \\mathrm{Var}|z|^2 = \\frac{2|g|^4}{k}
        + \\sum_W \\frac{2(k_1 + k_2 + 1)}{k}\\lVert G_W^\\top G_W\\rVert_F^2
        \\le \\frac{2|g|^4}{k}\\,(k_1 + k_2 + 2),

    with :math:`\\lVert G^\\top G\\rVert_F^2 = \\sum_j \\sigma_j^4 \\le |G|_F^4` (equality
    for a rank-one ``G = δaᵀ``, a single sample with T = 1, where
    :math:`|z_W|^2 = |R_1^\\top\\delta|^2|R_2^\\top a|^2/k` and the relative variance is
    :math:`2(k_1+k_2+2)/(k_1k_2)`, against ``2/k`` for the dense projection).

    Parameters
    ----------
    source : path, glob, list of shard paths or GradientStore
        The record's rows are those of every shard holding it, in order.
    step, split : int, str
        The record.
    k : int
        Projected dimension (``k1·k2`` with ``kron``).
    seed : int
        Seed of ``R`` (and of ``R1``, ``R2``).
    kron : (int, int), optional
        Kronecker shape ``(k1, k2)`` on the 2-D weights ``factors``.
    factors : sequence of str, optional
        Weights given the Kronecker structure; on a materialised store name them here
        (their stored columns are reshaped to (out, in)), so both stores give equal numbers.
    chunk_rows, block_rows, cache_bytes : int
        Rows per read; rows of ``R`` per block (part of its definition); generated blocks
        kept between chunks.
    allow_mixed_runs : bool
        As in :func:`gsnr_stats.reduce`.

    Returns
    -------
    numpy.ndarray
        ``(N, k)`` float64, accumulated in float64.
    """
    where = "gs.project_record"
    kk = require_int(k, "k", where, minimum=1)
    require_int(seed, "seed", where, minimum=0)
    require_int(chunk_rows, "chunk_rows", where, minimum=1)
    require_int(block_rows, "block_rows", where, minimum=1)
    if kron is not None:
        if not (isinstance(kron, tuple | list) and len(kron) == 2):
            raise ArgumentTypeError(f"{where}: kron must be (k1, k2), got {describe(kron)}")
        k1 = require_int(kron[0], "kron[0]", where, minimum=1)
        k2 = require_int(kron[1], "kron[1]", where, minimum=1)
        if k1 * k2 != kk:
            raise UsageError(f"{where}: kron=({k1}, {k2}) gives k1*k2 = {k1 * k2}, not k={kk}")
        kron = (k1, k2)
    elif factors is not None:
        raise UsageError(f"{where}: factors= names Kronecker-projected weights; pass kron=(k1, "
                         "k2) with it")
    stores, opened = open_sources(source, where, allow_mixed_runs)
    try:
        parts = parts_of(stores, int(step), str(split))
        if not parts:
            raise MissingSplitError(f"{where}: no per-sample gradient record (step={step}, "
                                    f"split={split!r}) in {[str(st.path) for st in stores]}")
        fact = same_factors(parts)
        meta = record_meta(parts[0]) if fact else RecordMeta(
            int(parts[0].layout.n_params),
            np.arange(int(parts[0].layout.n_params), dtype=np.int64), (),
            tuple(parts[0].layout.names), tuple(parts[0].layout.offsets),
            tuple(parts[0].layout.shapes))
        it = record_chunks(parts, int(step), str(split), int(chunk_rows), fact)
        return project_chunks(it, meta, kk, int(seed), kron, factors, int(block_rows),
                              int(cache_bytes))
    finally:
        for st in opened:
            st.close()
