"""Framework-free helpers for recording less than every per-sample gradient.

Three ways to keep a record small when the model is too big to dump ``(N, P)`` gradients:

* **Moments only** (``keep="moments"``): each batch of per-sample gradients is reduced on the
  fly to ``(count, mean, M2)`` in float64 by the same two-pass kernel as ``reduce``
  (:func:`gsnr_stats.kernels.moments_block`), batches are Chan-merged into *blocks* of at
  least ``block_size`` samples (default: one block per batch), and each block is written
  with ``GradientWriter.write_moments``. A record costs ``O(blocks · P)`` instead of
  ``O(N · P)``; ``reduce`` merges the blocks and keeps them as jackknife blocks.
* **Parameter subsampling** (``params_subset=k``): a seeded subset of ``k`` flat parameter
  indices, stratified over tensors (:class:`ParamSubset`). The layout names tensor
  ``t``'s share ``"t[sub]"`` with shape ``(k_t,)``; the chosen indices are stored in the
  writer's user attributes so results map back to the full model.
* **Johnson–Lindenstrauss projection** (``project=k``): per-sample gradients multiplied by a
  seeded ``(P, k)`` Gaussian matrix ``R / sqrt(k)`` (:class:`JLProjection`), generated in row
  blocks so that it is never held whole for big ``P``. Inner products are preserved in
  expectation, :math:`E[\\langle Rg, Rh\\rangle] = g \\cdot h`, with variance
  :math:`(|g|^2|h|^2 + (g\\cdot h)^2)/k`; the first-order OSGR
  (``gsnr_stats.osgr_first_order``) needs only such inner products.

Nothing here imports torch or jax.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gsnr_stats import kernels
from gsnr_stats.errors import AdapterError, NonFiniteError
from gsnr_stats.projection import GaussianRows

__all__ = [
    "JLProjection",
    "MomentsBlocks",
    "ParamSubset",
    "Transform",
    "check_keep",
    "make_transform",
]

KEEP = ("grads", "moments")
_COL_STEP = 4096  # columns per kernel task (the arithmetic does not depend on it)


def check_keep(keep: str, where: str) -> str:
    """Validate ``keep`` (``"grads"`` or ``"moments"``)."""
    if keep not in KEEP:
        raise AdapterError(
            f"{where}: keep must be 'grads' (per-sample gradients) or 'moments' (count, mean, "
            f"M2 per block), got {keep!r}"
        )
    return keep


def _norm_layout(layout: Sequence[Any]) -> list[tuple[str, tuple[int, ...], str]]:
    out = []
    for p in layout:
        name, shape = str(p[0]), tuple(int(s) for s in (p[1] if not isinstance(p[1], int)
                                                          else (p[1],)))
        layer = str(p[2]) if len(p) > 2 else (name.rsplit(".", 1)[0] if "." in name else name)
        out.append((name, shape, layer))
    return out


def _layout_hash(layout: Sequence[tuple[str, tuple[int, ...], str]]) -> str:
    from gsnr_stats.store import Layout

    return Layout.from_params(list(layout)).hash


# --------------------------------------------------------------------------------------
# Parameter subsampling
# --------------------------------------------------------------------------------------


@dataclass
class ParamSubset:
    """A seeded subset of flat parameter indices, stratified over tensors.

    Tensor ``t`` of size ``P_t`` gets :math:`k_t \\approx k P_t / P` indices (largest
    remainder, so :math:`\\sum_t k_t = k`), drawn without replacement and sorted; tensors
    with :math:`k_t = 0` are left out of the layout. The recorded layout has one tensor
    ``"<name>[sub]"`` of shape ``(k_t,)`` per kept tensor (same layer name).

    Attributes
    ----------
    source : list of (name, shape, layer)
        The full layout the indices refer to.
    k, seed : int
        Subset size and the seed of the draw (``numpy.random.default_rng(seed)``).
    local : dict name -> int64 array
        Chosen indices into each tensor's flattened (C-order) values.
    """

    source: list[tuple[str, tuple[int, ...], str]]
    k: int
    seed: int
    local: dict[str, np.ndarray] = field(repr=False)

    @classmethod
    def choose(cls, layout: Sequence[Any], k: int | float, seed: int = 0) -> ParamSubset:
        """Draw the subset: ``k`` indices (an int) or a fraction ``0 < k < 1`` of ``P``."""
        src = _norm_layout(layout)
        sizes = np.array([math.prod(s) for _, s, _ in src], dtype=np.int64)
        P = int(sizes.sum())
        if isinstance(k, bool) or not isinstance(k, int | float | np.integer | np.floating):
            raise AdapterError(f"params_subset must be an int or a fraction, got {k!r}")
        if isinstance(k, float | np.floating) and not float(k).is_integer():
            if not 0.0 < float(k) < 1.0:
                raise AdapterError(f"params_subset fraction must lie in (0, 1), got {k!r}")
            kk = max(1, int(round(float(k) * P)))
        else:
            kk = int(k)
        if not 1 <= kk <= P:
            raise AdapterError(
                f"params_subset={k!r}: need 1 <= k <= P = {P} parameters of the layout"
            )
        quota = kk * sizes / P
        kt = np.floor(quota).astype(np.int64)
        rest = kk - int(kt.sum())
        if rest > 0:
            order = np.argsort(-(quota - kt), kind="stable")
            kt[order[:rest]] += 1
        rng = np.random.default_rng(int(seed))
        local = {}
        for (name, _, _), n_t, z in zip(src, kt, sizes, strict=True):
            if n_t == 0:
                continue
            local[name] = np.sort(rng.choice(int(z), size=int(n_t), replace=False)).astype(np.int64)
        return cls(src, kk, int(seed), local)

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``[(name + "[sub]", (k_t,), layer), ...]`` in the source order."""
        return [(f"{n}[sub]", (int(self.local[n].size),), lay)
                for n, _, lay in self.source if n in self.local]

    @property
    def indices(self) -> np.ndarray:
        """Chosen global flat indices into the full layout, sorted, int64, shape ``(k,)``."""
        offs = np.concatenate([[0], np.cumsum([math.prod(s) for _, s, _ in self.source])])
        return np.concatenate([offs[i] + self.local[n] for i, (n, _, _) in enumerate(self.source)
                               if n in self.local]).astype(np.int64)

    def select(self, G: np.ndarray) -> np.ndarray:
        """Columns of ``G`` ``(n, P)`` (full layout) kept by the subset, ``(n, k)``."""
        return np.ascontiguousarray(np.asarray(G)[:, self.indices])

    def attrs(self) -> dict[str, Any]:
        """JSON-safe description stored in the writer's user attributes (``param_subset``)."""
        return {"param_subset": {
            "k": self.k, "seed": self.seed, "method": "stratified-uniform",
            "source_layout_hash": _layout_hash(self.source),
            "source_layout": [[n, list(s), lay] for n, s, lay in self.source],
            "indices": {n: self.local[n].tolist() for n in self.local},
        }}

    @classmethod
    def from_attrs(cls, user_attrs: dict[str, Any]) -> ParamSubset:
        """Rebuild the subset from a store's ``user_attrs`` (``open_store(p).attrs``)."""
        d = user_attrs.get("param_subset")
        if not isinstance(d, dict):
            raise AdapterError("store has no param_subset user attribute (not subsampled)")
        src = _norm_layout(d["source_layout"])
        local = {n: np.asarray(v, dtype=np.int64) for n, v in d["indices"].items()}
        return cls(src, int(d["k"]), int(d["seed"]), local)


# --------------------------------------------------------------------------------------
# Johnson–Lindenstrauss projection
# --------------------------------------------------------------------------------------


class JLProjection(GaussianRows):
    """Seeded Gaussian random projection :math:`z_i = R^\\top g_i / \\sqrt{k}`, ``R`` ``(P, k)``.

    ``R`` has i.i.d. standard normal entries, generated in row blocks of ``block_rows``
    parameters, block ``b`` from ``numpy.random.default_rng([seed, b])``
    (:class:`gsnr_stats.projection.GaussianRows`, which ``gs.project_record`` reads stores
    with, so a record projected while recording and one projected later agree): the matrix is the
    same whatever the batching, and at most ``cache_bytes`` of it are kept between batches
    (the rest is regenerated per batch). For any fixed ``g, h``:

    .. math:: E[z_g \\cdot z_h] = g \\cdot h, \\qquad
              \\mathrm{Var}[z_g \\cdot z_h] = \\frac{|g|^2 |h|^2 + (g \\cdot h)^2}{k}.

    Parameters
    ----------
    n_params : int
        P, the length of the (possibly subsampled) gradient.
    k : int
        Projected dimension, ``1 <= k``.
    seed : int
        Seed of ``R``.
    block_rows : int
        Rows of ``R`` generated at a time.
    cache_bytes : int
        Generated blocks kept for the next batches (float32).
    """

    def __init__(self, n_params: int, k: int, seed: int = 0, *, block_rows: int = 8192,
                 cache_bytes: int = 256 << 20) -> None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
            raise AdapterError(f"project must be a positive int (projected dimension), got {k!r}")
        super().__init__(int(n_params), int(k), int(seed), block_rows, cache_bytes)

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``[("jl", (k,), "jl")]``."""
        return [("jl", (self.k,), "jl")]

    def matrix(self) -> np.ndarray:
        """The whole ``(P, k)`` matrix ``R / sqrt(k)`` (for checks on small P)."""
        nb = -(-self.P // self.block_rows)
        return np.concatenate([self.block(b) for b in range(nb)], axis=0)

    def project(self, G: np.ndarray) -> np.ndarray:
        """``G @ R / sqrt(k)`` for ``G`` ``(n, P)``, accumulated in float64, ``(n, k)``."""
        G = np.asarray(G)
        if G.ndim != 2 or G.shape[1] != self.P:
            raise AdapterError(f"JL projection: gradients of shape {G.shape}, expected (n, {self.P})")
        out = np.zeros((G.shape[0], self.k))
        for b, lo in enumerate(range(0, self.P, self.block_rows)):
            hi = min(self.P, lo + self.block_rows)
            out += G[:, lo:hi].astype(np.float64, copy=False) @ self.block(b)
        return out

    def attrs(self) -> dict[str, Any]:
        """JSON-safe description stored in the writer's user attributes (``jl_projection``)."""
        return {"jl_projection": {"k": self.k, "seed": self.seed, "n_params": self.P,
                                  "method": "gaussian", "block_rows": self.block_rows,
                                  "rng": "numpy.random.default_rng([seed, block])"}}

    @classmethod
    def from_attrs(cls, user_attrs: dict[str, Any]) -> JLProjection:
        """Rebuild the projection from a store's ``user_attrs``."""
        d = user_attrs.get("jl_projection")
        if not isinstance(d, dict):
            raise AdapterError("store has no jl_projection user attribute (not projected)")
        return cls(int(d["n_params"]), int(d["k"]), int(d["seed"]), block_rows=int(d["block_rows"]))


# --------------------------------------------------------------------------------------
# Subset, then projection
# --------------------------------------------------------------------------------------


class Transform:
    """What a recorder applies to each ``(n, P)`` batch before storing: subset, then projection.

    ``layout`` is the layout the writer must have; ``attrs`` what ``open_writer`` stores.
    """

    def __init__(self, layout: Sequence[Any], subset: ParamSubset | None,
                 projection: JLProjection | None) -> None:
        self.source = _norm_layout(layout)
        self.subset, self.projection = subset, projection

    @property
    def active(self) -> bool:
        """True when a subset or a projection is applied."""
        return self.subset is not None or self.projection is not None

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Layout of the stored vectors."""
        if self.projection is not None:
            return self.projection.layout
        if self.subset is not None:
            return self.subset.layout
        return self.source

    def apply(self, G: np.ndarray) -> np.ndarray:
        """Transform per-sample gradients ``(n, P_full)`` into stored vectors."""
        if self.subset is not None:
            G = self.subset.select(G)
        if self.projection is not None:
            G = self.projection.project(G)
        return G

    def attrs(self) -> dict[str, Any]:
        """User attributes describing the transform (with the source layout hash)."""
        out: dict[str, Any] = {}
        if self.subset is not None:
            out.update(self.subset.attrs())
        if self.projection is not None:
            out.update(self.projection.attrs())
            out["jl_projection"]["source_layout_hash"] = _layout_hash(
                self.subset.layout if self.subset is not None else self.source)
            out["jl_projection"]["full_layout_hash"] = _layout_hash(self.source)
        return out


def make_transform(layout: Sequence[Any], params_subset: Any = None, project: Any = None,
                   seed: int = 0) -> Transform:
    """Build the :class:`Transform` of the recorder options.

    Parameters
    ----------
    layout : sequence of (name, shape[, layer])
        The full layout (the adapter's ``layout(...)``).
    params_subset : None, int, float in (0, 1) or ParamSubset
        Seeded subset of ``k`` flat parameters (or a fraction of P).
    project : None, int or JLProjection
        Projected dimension ``k`` of the JL projection (applied after the subset).
    seed : int
        Seed of the subset draw and of the projection matrix.
    """
    if isinstance(params_subset, ParamSubset):
        if _layout_hash(params_subset.source) != _layout_hash(_norm_layout(layout)):
            raise AdapterError("params_subset was drawn for a different layout than the model's")
        sub = params_subset
    elif params_subset is None:
        sub = None
    else:
        sub = ParamSubset.choose(layout, params_subset, seed)
    P = sub.k if sub is not None else sum(math.prod(s) for _, s, _ in _norm_layout(layout))
    if isinstance(project, JLProjection):
        if project.P != P:
            raise AdapterError(f"project: JLProjection for P={project.P}, the gradients have P={P}")
        proj = project
    elif project is None:
        proj = None
    else:
        proj = JLProjection(P, project, seed)
    return Transform(layout, sub, proj)


def check_writer(writer: Any, tf: Transform, where: str) -> None:
    """The writer's stored subset indices / projection seed must be the recorder's.

    Layout names and shapes are checked by ``check_layout_matches``; two draws of the same
    size have the same layout, so the stored description (``open_writer``) is compared too
    when the writer has one.
    """
    raw = None
    f = getattr(writer, "_f", None)  # GradientWriter's open file (read only here)
    if f is not None:
        try:
            raw = f.attrs.get("user_attrs")
        except Exception:  # noqa: BLE001 - not a GradientWriter: nothing to compare
            raw = None
    if raw is None:
        return
    try:
        ua = json.loads(raw if isinstance(raw, str) else raw.decode())
    except (ValueError, AttributeError):
        return
    mine = json.loads(json.dumps(tf.attrs()))
    for key in ("param_subset", "jl_projection"):
        have, want = ua.get(key), mine.get(key)
        if have is not None and want is not None and have != want:
            raise AdapterError(
                f"{where}: the writer's {key} (seed {have.get('seed')}, k {have.get('k')}) "
                f"differs from the recorder's (seed {want.get('seed')}, k {want.get('k')}): pass "
                "the same params_subset/project and seed to open_writer and the recorder"
            )


def writer_attrs(tf: Transform, attrs: dict[str, Any] | None) -> dict[str, Any]:
    """``attrs`` plus the transform's description (JSON-safe)."""
    out = dict(attrs or {})
    out.update(json.loads(json.dumps(tf.attrs())))
    return out


# --------------------------------------------------------------------------------------
# Moments blocks
# --------------------------------------------------------------------------------------


class MomentsBlocks:
    """Running ``(count, mean, M2)`` of one record, written as blocks of >= ``block_size``.

    :meth:`add_samples` reduces an ``(n, P)`` batch with the two-pass kernel
    (:func:`gsnr_stats.kernels.moments_block`, float64 accumulators) and Chan-merges it;
    :meth:`add_moments` merges moments computed elsewhere (the torch fast path). When the
    block holds at least ``block_size`` samples (``None``: after every batch) it is written
    with ``writer.write_moments`` and a new block starts; :meth:`finish` writes the rest.
    Non-finite gradients raise :class:`NonFiniteError` naming the record and parameter.
    """

    def __init__(self, writer: Any, step: int, split: str, n_params: int,
                 block_size: int | None, *, lr: float | None = None,
                 epoch: float | None = None, names: Sequence[Any] | None = None) -> None:
        if block_size is not None and int(block_size) < 1:
            raise AdapterError(f"block_size must be >= 1 or None, got {block_size!r}")
        self.w, self.step, self.split, self.P = writer, int(step), split, int(n_params)
        self.block_size = None if block_size is None else int(block_size)
        self.lr = None if lr is None or math.isnan(lr) else float(lr)
        self.epoch = None if epoch is None or math.isnan(epoch) else float(epoch)
        self.names = names
        self.n_blocks = 0
        self.n_samples = 0
        self._reset()

    def _reset(self) -> None:
        self.count = np.zeros(self.P)
        self.mean = np.zeros(self.P)
        self.m2 = np.zeros(self.P)

    def _param(self, j: int) -> str:
        if not self.names:
            return f"flat index {j}"
        off = 0
        for p in self.names:
            z = math.prod(p[1]) if not isinstance(p[1], int) else int(p[1])
            if j < off + z:
                return f"{p[0]} (flat index {j}, element {j - off})"
            off += z
        return f"flat index {j}"

    def _bad(self, j: int) -> NonFiniteError:
        return NonFiniteError(
            f"{getattr(self.w, 'path', 'writer')}: record (step={self.step}, "
            f"split={self.split!r}): non-finite gradient for parameter {self._param(j)}"
        )

    def add_samples(self, G: np.ndarray | Sequence[np.ndarray]) -> None:
        """Reduce an ``(n, P)`` batch of per-sample gradients into the current block.

        ``G`` may also be a list of ``(n, P_t)`` column blocks in layout order (e.g. one
        per tensor, views of the framework's arrays), which avoids concatenating them.
        """
        parts = [G] if isinstance(G, np.ndarray) else list(G)
        n_omit = np.zeros(self.P)
        bad = np.zeros(self.P, dtype=np.int64)
        col, n = 0, None
        for x in parts:
            x = np.ascontiguousarray(x)
            if x.dtype not in (np.float32, np.float64):
                x = x.astype(np.float64)
            if x.ndim != 2 or (n is not None and x.shape[0] != n):
                raise AdapterError(f"moments: batch block of shape {x.shape}, expected (n, w)")
            n = x.shape[0]
            if col + x.shape[1] > self.P:
                break
            kernels.moments_block(x, _COL_STEP, col, self.count, self.mean, self.m2, False,
                                  n_omit, bad)
            col += x.shape[1]
        if col != self.P:
            raise AdapterError(f"moments: batch has {col}+ columns, expected {self.P}")
        if bad.any():
            raise self._bad(int(np.flatnonzero(bad)[0]))
        self._after(int(n))

    def add_moments(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan-merge a batch's ``(count, mean, M2)`` (float64, ``(P,)``) into the block."""
        ok = np.isfinite(mean) & np.isfinite(m2)
        if not ok.all():
            raise self._bad(int(np.flatnonzero(~ok)[0]))
        if self.count[0] == 0:  # empty block (the default: one block per batch)
            self.count = np.full(self.P, float(count))
            self.mean = np.array(mean, dtype=np.float64)
            self.m2 = np.array(m2, dtype=np.float64)
        else:
            self.count, self.mean, self.m2 = kernels.merge_moments(
                (self.count, self.mean, self.m2), (np.full(self.P, float(count)), mean, m2))
        self._after(int(count))

    def _after(self, n: int) -> None:
        self.n_samples += n
        if self.block_size is None or self.count[0] >= self.block_size:
            self.flush()

    def flush(self) -> None:
        """Write the current block (if it holds samples) and start a new one."""
        if self.P == 0 or self.count[0] == 0:
            return
        self.w.write_moments(self.step, self.split, float(self.count[0]), self.mean, self.m2,
                             lr=self.lr, epoch=self.epoch)
        self.n_blocks += 1
        self._reset()

    def finish(self) -> None:
        """Write the last block and complete the record (``end_record``)."""
        self.flush()
        self.w.end_record(self.step, self.split)
