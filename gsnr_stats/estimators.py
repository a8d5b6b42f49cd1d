"""Measured OSGR, next to the theory: trajectory, virtual-step probes, first order, pools.

:func:`osgr_trajectory` (loss decreases along recorded optimizer steps), :func:`osgr_probe`
(virtual-step probes), :func:`osgr_first_order` (``Σ g_{D'}·g_D / Σ |g_D|²`` from stored
per-sample gradients, one streaming pass per record through :func:`.kernels.subset_sums`;
factored weights of format v4 records through ``Δ_Dᵀ A_D`` or sample Gram matrices)
and :func:`osgr_pools` (their expectation given the two finite pools); each attaches the
theoretical :func:`~.theory.osgr` and a jackknife SE over draws (``docs/theory.md``). With
:mod:`.projection` (record chunks, JL projections) the analytics that read stores, through
the public :class:`~.store.GradientStore` API (``open_store``, ``records``, ``record``,
``iter_grads``, ``read_factors``, ``read_plain_rows``), never h5py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import _reasons
from ._dsutil import (
    _ONE,
    _n_coord,
    _n_grid,
    _select_splits,
    describe,
    require_int,
    require_paths,
    require_stats,
)
from .errors import ArgumentTypeError, MissingSplitError, UsageError
from .kernels import subset_sums
from .projection import (
    Chunk,
    RecordMeta,
    open_sources,
    parts_of,
    record_chunks,
    record_meta,
    same_factors,
)
from .theory import osgr
from .uncertainty import _ratio_jackknife

__all__ = ["osgr_first_order", "osgr_pools", "osgr_probe", "osgr_trajectory"]


def _theory_at(
    stats: xr.Dataset | None, steps: np.ndarray, ns: np.ndarray, split: str, debias: bool,
    method: str | None,
) -> xr.DataArray | None:
    """Theoretical R at ``steps`` × ``ns``: exact step match or latest checkpoint (ffill)."""
    if stats is None:
        return None
    R = osgr(stats, np.unique(ns), split=split, debias=debias)["osgr"].sel(split=split)
    R = R.sortby("step")
    us = np.unique(steps)
    R = R.reindex(step=us, method=method)
    return R


def _theory_reasons(why: _reasons.Reasons, T: np.ndarray, nan_reason: str) -> None:
    """Reasons for the attached theory column (negative: below noise; NaN: ``nan_reason``)."""
    with np.errstate(invalid="ignore"):
        why.add("osgr_theory", T < 0, _reasons.BELOW_NOISE + " (on the theory split; a fitted "
                                      "training split: use a held-out one)", detail=False)
    why.add("osgr_theory", np.isnan(T), nan_reason, detail=False)


def _require_rows(obj: Any, where: str, what: str, source: str, keys: Sequence[str]) -> None:
    """Table rows (a mapping of columns, e.g. ``store.probes()``) with ``keys``, else a clear
    error naming what came instead."""
    if not isinstance(obj, Mapping):
        raise ArgumentTypeError(f"{where}: {what} must be the mapping of {source}, got "
                                f"{describe(obj)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UsageError(f"{where}: {what} lacks columns {missing}; pass {source} (got "
                         f"{describe(obj)})")


def osgr_trajectory(
    traj: Mapping[str, np.ndarray],
    stats: xr.Dataset | None = None,
    *,
    n: int | Sequence[int] | None = None,
    split: str = "test",
    debias: bool = True,
    window: int = 1,
) -> xr.Dataset:
    """Measured OSGR along recorded optimizer steps, next to the theory.

    .. math::

        R_t = \\frac{L_{\\mathrm{test}}(\\theta_t) - L_{\\mathrm{test}}(\\theta_{t+w})}
                    {L_{\\mathrm{train}}(\\theta_t) - L_{\\mathrm{train}}(\\theta_{t+w})}

    over consecutive trajectory rows (``w = window`` rows; a row gap of several optimizer
    steps makes it a multi-step ratio, see ``n_steps``). Noisy where the training loss
    barely moves.

    Parameters
    ----------
    traj : mapping
        ``store.trajectory()``: 1-D arrays ``step``, ``lr``, ``train_loss``, ``test_loss``.
    stats : xarray.Dataset, optional
        Moments: adds ``osgr_theory`` (step, n) from the latest checkpoint at or before
        each step (NaN before the first).
    n : int or sequence of int
        Training-set (batch) size for the theory; required with ``stats``.
    split : str
        Split whose moments feed the theory.
    debias : bool
        As in :func:`osgr`.
    window : int
        Rows per ratio.

    Returns
    -------
    xarray.Dataset
        ``osgr_measured``, ``delta_train``, ``delta_test``, ``n_steps``, ``lr`` (step)
        [, ``osgr_theory`` (step, n)].
    """
    _require_rows(traj, "gs.osgr_trajectory", "traj", "store.trajectory()",
                  ("step", "train_loss", "test_loss"))
    w = int(window)
    if w < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    order = np.argsort(np.asarray(traj["step"]), kind="stable")
    step = np.asarray(traj["step"], dtype=np.int64)[order]
    tr = np.asarray(traj["train_loss"], dtype=np.float64)[order]
    te = np.asarray(traj["test_loss"], dtype=np.float64)[order]
    lr = np.asarray(traj.get("lr", np.full(step.size, np.nan)), dtype=np.float64)[order]
    m = max(step.size - w, 0)
    dtr = tr[:m] - tr[w:w + m]
    dte = te[:m] - te[w:w + m]
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.where(dtr != 0, dte / np.where(dtr != 0, dtr, 1.0), np.nan)
    data: dict[str, Any] = {
        "osgr_measured": ("step", R, {"long_name": "measured OSGR dL_test / dL_train over the "
                                                   "step", **_ONE}),
        "delta_train": ("step", dtr, {"long_name": "train loss decrease", **_ONE}),
        "delta_test": ("step", dte, {"long_name": "test loss decrease", **_ONE}),
        "n_steps": ("step", step[w:w + m] - step[:m],
                    {"long_name": "optimizer steps per ratio", **_ONE}),
        "lr": ("step", lr[:m], {"long_name": "learning rate", **_ONE}),
    }
    coords: dict[str, Any] = {"step": ("step", step[:m], {"long_name": "optimizer step"})}
    if stats is not None:
        require_stats(stats, "gs.osgr_trajectory")
        if n is None:
            raise UsageError("osgr_trajectory: pass n (training-set size) with stats")
        ns = _n_grid(n)
        th = _theory_at(stats, step[:m], ns, split, debias, "ffill")
        data["osgr_theory"] = (("step", "n"), th.sel(step=step[:m]).values,
                               {"long_name": f"theoretical OSGR R(n) on {split!r} at the "
                                             "latest checkpoint", **_ONE})
        coords["n"] = _n_coord(ns)
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"title": "measured OSGR along the training trajectory", "window": w,
                     "theory_split": split, "debias": int(debias)})
    why = _reasons.Reasons({"osgr_measured": ("step",)}, {"step": step[:m]})
    with np.errstate(invalid="ignore"):
        why.add("osgr_measured", R < 0, "the held-out and the training loss moved in opposite "
                                        "directions over the step (a memorising step, or "
                                        "loss noise where the change is small)")
        why.add("osgr_measured", np.isnan(R) & (dtr == 0), "training loss unchanged over the "
                                                           "step (0/0)")
        why.add("osgr_measured", np.isnan(R) & np.isnan(dtr - dte), "loss missing (NaN) in a "
                                                                    "trajectory row")
    if "osgr_theory" in data:
        _theory_reasons(why, data["osgr_theory"][1], "before the first checkpoint")
    return why.attach(ds)


def osgr_probe(
    probes: Mapping[str, np.ndarray],
    stats: xr.Dataset | None = None,
    *,
    split: str = "test",
    debias: bool = True,
) -> xr.Dataset:
    """OSGR by its definition, from virtual-step probe rows, next to the theory.

    .. math::

        \\hat R = \\frac{\\sum_k \\Delta L[D'_k]}{\\sum_k \\Delta L[D_k]},\\qquad
        \\Delta L[D] = L[D](\\theta) - L[D](\\theta - \\lambda \\nabla L[D_k]),

    per ``(step, n, lr)``, with a delete-one-probe jackknife SE over ``k``. As λ → 0 it
    should approach :func:`osgr` at that ``n`` (moments of a held-out split).

    Parameters
    ----------
    probes : mapping
        ``store.probes()``: ``step, n, lr, k, train_before, train_after, test_before,
        test_after``.
    stats : xarray.Dataset, optional
        Adds ``osgr_theory`` at the exact probe step (NaN if no checkpoint there).
    split, debias
        For the theory.

    Returns
    -------
    xarray.Dataset
        Dim ``probe`` (one per ``(step, n, lr)``, coords ``step``, ``n``, ``lr``):
        ``osgr_measured``, ``osgr_se``, ``n_probes``, ``delta_train``, ``delta_test`` (means
        over k) [, ``osgr_theory``]. ``ds.set_index(probe=["step", "n", "lr"]).unstack()``
        gives a grid.
    """
    _require_rows(probes, "gs.osgr_probe", "probes", "store.probes()",
                  ("step", "n", "lr", "train_before", "train_after", "test_before", "test_after"))
    if stats is not None:
        require_stats(stats, "gs.osgr_probe")
    step = np.asarray(probes["step"], dtype=np.int64)
    nn = np.asarray(probes["n"], dtype=np.int64)
    lr = np.asarray(probes["lr"], dtype=np.float64)
    dtr = np.asarray(probes["train_before"], float) - np.asarray(probes["train_after"], float)
    dte = np.asarray(probes["test_before"], float) - np.asarray(probes["test_after"], float)
    keys = np.stack([step.astype(np.float64), nn.astype(np.float64), lr], axis=1)
    uk, inv = (np.unique(keys, axis=0, return_inverse=True) if step.size
               else (np.zeros((0, 3)), np.zeros(0, dtype=np.int64)))
    inv = inv.reshape(-1)
    G = uk.shape[0]
    R, se, cnt = np.full(G, np.nan), np.full(G, np.nan), np.zeros(G, dtype=np.int64)
    mtr, mte = np.full(G, np.nan), np.full(G, np.nan)
    for g in range(G):
        sel = inv == g
        R[g], se[g] = _ratio_jackknife(dte[sel], dtr[sel])
        cnt[g] = int(sel.sum())
        mtr[g], mte[g] = dtr[sel].mean(), dte[sel].mean()
    ps = uk[:, 0].astype(np.int64)
    pn = uk[:, 1].astype(np.int64)
    data: dict[str, Any] = {
        "osgr_measured": ("probe", R, {"long_name": "measured OSGR sum dL[D'] / sum dL[D] "
                                                    "(probe)", **_ONE}),
        "osgr_se": ("probe", se, {"long_name": "jackknife standard error over probes k",
                                  **_ONE}),
        "n_probes": ("probe", cnt, {"long_name": "probes K", **_ONE}),
        "delta_train": ("probe", mtr, {"long_name": "mean loss decrease on D_k", **_ONE}),
        "delta_test": ("probe", mte, {"long_name": "mean loss decrease on D'_k", **_ONE}),
    }
    if stats is not None and G:
        th = _theory_at(stats, ps, pn, split, debias, None)
        data["osgr_theory"] = ("probe", th.sel(step=xr.DataArray(ps, dims="probe"),
                                               n=xr.DataArray(pn, dims="probe")).values,
                               {"long_name": f"theoretical OSGR R(n) on {split!r}", **_ONE})
    coords = {
        "step": ("probe", ps, {"long_name": "optimizer step"}),
        "n": ("probe", pn, {"long_name": "probe subset size n", **_ONE}),
        "lr": ("probe", uk[:, 2], {"long_name": "virtual-step learning rate", **_ONE}),
    }
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"title": "measured OSGR from virtual-step probes", "theory_split": split,
                     "debias": int(debias)})
    why = _reasons.Reasons({"osgr_measured": ("probe",)}, {})
    with np.errstate(invalid="ignore"):
        why.add("osgr_measured", R < 0, "sum_k dL[D'_k] < 0: the held-out loss rose after the "
                                        "virtual steps (a memorised training set, or lr too "
                                        "large for first order)")
        why.add("osgr_measured", np.isnan(R), "sum_k dL[D_k] = 0: the virtual step did not "
                                              "change the training loss")
        why.add("osgr_se", np.isnan(se) & (cnt < 2), "a single probe: no jackknife over k")
    if "osgr_theory" in data:
        _theory_reasons(why, data["osgr_theory"][1], "no checkpoint at the probe's step")
    return why.attach(ds)


# -- first-order OSGR from stored gradients ------------------------------------------------

def _membership(rows: Sequence[np.ndarray], ids: Sequence[int], N: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """CSR row -> subset ids for subsets ``ids[i]`` holding record rows ``rows[i]``."""
    if rows:
        r = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows])
        k = np.concatenate([np.full(len(x), i, dtype=np.int64) for x, i in zip(rows, ids,
                                                                               strict=True)])
    else:
        r = np.zeros(0, dtype=np.int64)
        k = np.zeros(0, dtype=np.int64)
    order = np.argsort(r, kind="stable")
    members = k[order]
    row_ptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=N), out=row_ptr[1:])
    return row_ptr, members


def _draw_subsets(
    rng: np.random.Generator, n_a: int, n_b: int | None, n: int, K: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """K pairs (D_k, D'_k) of size n; ``n_b=None``: both from one pool of ``n_a`` rows, disjoint."""
    A, B = [], []
    for _ in range(K):
        if n_b is None:
            perm = rng.choice(n_a, 2 * n, replace=False)
            A.append(np.sort(perm[:n]))
            B.append(np.sort(perm[n:]))
        else:
            A.append(np.sort(rng.choice(n_a, n, replace=False)))
            B.append(np.sort(rng.choice(n_b, n, replace=False)))
    return A, B


def _factor_subset_sums(
    fac: Mapping[str, tuple[np.ndarray, np.ndarray]], meta: RecordMeta, row0: int, m: int,
    row_ptr: np.ndarray, members: np.ndarray, acc_w: dict[str, np.ndarray],
    acc_b: dict[str, np.ndarray], gram: frozenset[str] = frozenset(),
) -> None:
    """Add a chunk's factored rows into the subset sums, in place (weights in ``gram``:
    their bias only).

    .. math::

        S_{k,W} \\mathrel{+}= \\sum_{i \\in D_k} \\sum_t \\delta_{it} a_{it}^\\top
        = \\Delta_{D_k}^\\top A_{D_k}, \\qquad s_{k,b} \\mathrel{+}= \\sum_{i\\in D_k}\\sum_t \\delta_{it}

    (the ``T`` rows of a sample flattened into the GEMM), in float64: the products of
    float32 factors are exact, so only the sums round.
    """
    lo, hi = int(row_ptr[row0]), int(row_ptr[row0 + m])
    if lo == hi:
        return
    mem = members[lo:hi]
    rloc = np.repeat(np.arange(m), np.diff(row_ptr[row0:row0 + m + 1]))
    order = np.argsort(mem, kind="stable")
    mem, rloc = mem[order], rloc[order]
    ks, starts = np.unique(mem, return_index=True)
    ends = np.append(starts[1:], mem.size)
    for f in meta.factors:
        A, D = fac[f.weight]
        if A.shape[0] != m or D.shape[0] != m or A.shape[2] != f.in_ or D.shape[2] != f.out:
            raise ValueError(f"factor {f.weight!r}: chunk of shapes {A.shape}, {D.shape}, "
                             f"expected ({m}, T, {f.in_}) and ({m}, T, {f.out})")
        A64 = np.asarray(A, dtype=np.float64)
        D64 = np.asarray(D, dtype=np.float64)
        aw, ab = acc_w.get(f.weight), acc_b.get(f.weight)
        for kk, s, e in zip(ks, starts, ends, strict=True):
            r = rloc[s:e]
            Dk = D64[r].reshape(-1, f.out)
            if f.weight not in gram:
                aw[kk] += Dk.T @ A64[r].reshape(-1, f.in_)
            if ab is not None:
                ab[kk] += Dk.sum(axis=0)


def _cross_gram(X: tuple[np.ndarray, np.ndarray], Y: tuple[np.ndarray, np.ndarray]
                ) -> np.ndarray:
    """``H_ij = g_{X,i}·g_{Y,j} = Σ_{t,s} (δ_it·δ_js)(a_it·a_js)`` of one factored weight,
    float64 ``(u_X, u_Y)``, never forming an ``(out, in)`` gradient."""
    (AX, DX), (AY, DY) = X, Y
    H = np.zeros((AX.shape[0], AY.shape[0]))
    for t in range(AX.shape[1]):
        for u in range(AY.shape[1]):
            H += (AX[:, t] @ AY[:, u].T) * (DX[:, t] @ DY[:, u].T)
    return H


def _gram_times(X: tuple[np.ndarray, np.ndarray], Y: tuple[np.ndarray, np.ndarray],
                V: np.ndarray, block_bytes: int = 64 << 20) -> np.ndarray:
    """``H_XY Vᵀ`` ``(u_X, M)`` with ``H`` (:func:`_cross_gram`) formed in row blocks of at
    most ``block_bytes``: memory O(u_Y) per row, never the whole ``u_X × u_Y``."""
    b = max(1, block_bytes // (8 * max(1, Y[0].shape[0])))
    out = np.empty((X[0].shape[0], V.shape[0]))
    for r in range(0, X[0].shape[0], b):
        out[r:r + b] = _cross_gram((X[0][r:r + b], X[1][r:r + b]), Y) @ V.T
    return out


def _indicator(subsets: Sequence[np.ndarray], keep: np.ndarray) -> np.ndarray:
    """``V (M, |keep|)``: ``V[k, j] = 1`` where row ``keep[j]`` is in subset k."""
    V = np.zeros((len(subsets), keep.size))
    for k, sub in enumerate(subsets):
        V[k, np.searchsorted(keep, sub)] = 1.0
    return V


def _gram_choice(meta: RecordMeta, sizes: tuple[int, int], u: tuple[int, int], M: int,
                 method: str, max_bytes: int) -> frozenset[str]:
    """Weights whose inner products go through sample Gram matrices (``method="auto"``: those
    where it takes fewer multiply-adds than the subset sums and the rows it holds fit
    max_bytes).

    Subset sums: ``(Σ|D_k| + Σ|D'_k|)·T·out·in``; Gram: ``(u_A² + u_B u_A)·(T²(in+out) + 2M)``
    with ``u`` the rows any subset holds (``u_B = 0`` for one pool), holding
    ``(u_A + u_B)·T·(in + out)`` float64 factor values (``H`` is formed in 64 MiB blocks).
    """
    if method == "sums":
        return frozenset()
    out = set()
    for f in meta.factors:
        cells = u[0] * u[0] + u[1] * u[0]
        gram = cells * (f.rows ** 2 * (f.in_ + f.out) + 2 * M)
        sums = (sizes[0] + sizes[1]) * f.rows * f.out * f.in_
        mem = 8 * (u[0] + u[1]) * f.rows * (f.in_ + f.out)
        if method == "gram" or (gram < sums and mem <= max_bytes):
            out.add(f.weight)
    return frozenset(out)


def _first_order_core(
    chunks_a: Callable[[], Iterator[Chunk]],
    chunks_b: Callable[[], Iterator[Chunk]] | None,
    n_rows: tuple[int, int | None],
    meta: RecordMeta | int,
    subsets_a: Sequence[np.ndarray],
    subsets_b: Sequence[np.ndarray],
    col_block: int = 2048,
    method: str = "sums",
    max_bytes: int = 1 << 30,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-subset ``g_{D'_k}·g_{D_k}`` and ``|g_{D_k}|²`` of subset *sums*, in one pass each.

    ``chunks_b=None``: both subset families index the same record (read once). Plain
    columns go through :func:`.kernels.subset_sums`; factored weights through
    :func:`_factor_subset_sums` (a P-vector per subset, never per sample) or, as
    :func:`_gram_choice` says for ``method``, through Gram matrices
    (:func:`_cross_gram` over the rows the subsets hold: ``g_{D'}·g_D = 1_{D'}ᵀ H 1_D``).
    ``meta`` an int P and chunks of bare ``(rows, P)`` arrays: a record without factors.
    """
    if not isinstance(meta, RecordMeta):
        meta = RecordMeta(int(meta), np.arange(int(meta), dtype=np.int64))
    M = len(subsets_a)
    Pp = int(meta.plain_index.size)
    one = chunks_b is None
    keeps = ([np.unique(np.concatenate([*subsets_a, *subsets_b]))] if one else
             [np.unique(np.concatenate(list(x))) for x in (subsets_a, subsets_b)])
    gram = _gram_choice(meta, (sum(map(len, subsets_a)), sum(map(len, subsets_b))),
                        (keeps[0].size, 0 if one else keeps[1].size), M, method, max_bytes)
    acc = np.zeros((2 * M, Pp))
    acc_w = {f.weight: np.zeros((2 * M, f.out, f.in_)) for f in meta.factors
             if f.weight not in gram}
    acc_b = {f.weight: np.zeros((2 * M, f.out)) for f in meta.factors if f.bias is not None}
    held: list[dict[str, list[list[np.ndarray]]]] = []  # Gram weights' rows, per pass
    ids_a, ids_b = list(range(M)), list(range(M, 2 * M))
    if one:
        passes = [(chunks_a, n_rows[0], list(subsets_a) + list(subsets_b), ids_a + ids_b)]
    else:
        passes = [(chunks_a, n_rows[0], list(subsets_a), ids_a),
                  (chunks_b, n_rows[1], list(subsets_b), ids_b)]
    for (chunks, N, rows, ids), keep in zip(passes, keeps, strict=True):
        row_ptr, members = _membership(rows, ids, int(N))
        held.append({w: [[], []] for w in gram})
        row0 = 0
        for item in chunks():
            x, fac = item if isinstance(item, tuple) else (item, {})
            x = np.ascontiguousarray(x)
            m = next(iter(fac.values()))[0].shape[0] if fac else x.shape[0]
            if x.ndim != 2 or x.shape != (m, Pp):
                raise ValueError(f"gradient chunk of shape {x.shape}, expected ({m}, {Pp})")
            if row0 + m > N:
                raise ValueError(f"read more than {N} gradient rows")
            if Pp:
                subset_sums(x, row0, row_ptr, members, acc, col_block)
            if meta.factors:
                _factor_subset_sums(fac, meta, row0, m, row_ptr, members, acc_w, acc_b, gram)
            if gram:
                sel = keep[(keep >= row0) & (keep < row0 + m)] - row0
                for w, (la, ld) in held[-1].items():
                    la.append(np.asarray(fac[w][0][sel], dtype=np.float64))
                    ld.append(np.asarray(fac[w][1][sel], dtype=np.float64))
            row0 += m
        if row0 != N:
            raise ValueError(f"read {row0} gradient rows, expected {N}")
    a, b = acc[:M], acc[M:]
    num, den = np.einsum("kp,kp->k", b, a), np.einsum("kp,kp->k", a, a)
    if gram:
        Va = _indicator(subsets_a, keeps[0])
        Vb = _indicator(subsets_b, keeps[0 if one else 1])
    for w in sorted(gram):
        X = [tuple(np.concatenate(x) for x in h[w]) for h in held]
        HVa = _gram_times(X[0], X[0], Va)
        den += np.einsum("ku,uk->k", Va, HVa)
        num += np.einsum("ku,uk->k", Vb, HVa if one else _gram_times(X[1], X[0], Va))
    for part in (*acc_w.values(), *acc_b.values()):
        pa = part[:M].reshape(M, -1)
        pb = part[M:].reshape(M, -1)
        num += np.einsum("kp,kp->k", pb, pa)
        den += np.einsum("kp,kp->k", pa, pa)
    return num, den


def _record_reader(
    source: Any, step: int, split: str, chunk_rows: int, factored: bool
) -> tuple[Callable[[], Iterator[Chunk]], int, int]:
    """``(chunk iterator factory, N, P)`` for one record of a store or a mapping."""
    if isinstance(source, Mapping):
        arr = np.asarray(source[(step, split)])

        def it_arr() -> Iterator[Chunk]:
            for i in range(0, arr.shape[0], chunk_rows):
                yield arr[i:i + chunk_rows], {}

        return it_arr, int(arr.shape[0]), int(arr.shape[1])
    # shards of one run: the record's rows are those of every shard holding it, in order
    parts = parts_of(source, step, split)
    N = sum(st.record(step, split).n_samples for st in parts)
    P = source[0].layout.n_params
    return record_chunks(parts, step, split, chunk_rows, factored), int(N), int(P)


def osgr_first_order(
    source: Any,
    steps: int | Sequence[int] | None = None,
    *,
    n: int | Sequence[int],
    splits: tuple[str, str] = ("train", "test"),
    n_subsets: int = 64,
    seed: int | np.random.Generator | None = 0,
    stats: xr.Dataset | None = None,
    theory_split: str | None = None,
    debias: bool = True,
    chunk_rows: int = 4096,
    max_bytes: int = 1 << 30,
    allow_mixed_runs: bool = False,
    factored: str = "auto",
) -> xr.Dataset:
    """First-order OSGR from stored per-sample gradients: one streaming pass per record.

    .. math::

        \\hat R_1 = \\frac{\\sum_k g_{D'_k} \\cdot g_{D_k}}{\\sum_k \\lVert g_{D_k}\\rVert^2},

    ``D_k`` (size n) drawn from split ``splits[0]``, ``D'_k`` (size n) from ``splits[1]``
    (disjoint halves of one draw when both name the same split). Its expectation is
    :math:`\\sum_j \\tilde g_j^2 / \\sum_j (\\tilde g_j^2 + \\rho_j^2/n)`, the theory of
    :func:`osgr` with the moments of ``splits[0]``, to first order in λ: the ratio of
    :math:`\\Delta L[D'] \\approx \\lambda g_{D'}\\cdot g_D` to
    :math:`\\Delta L[D] \\approx \\lambda \\lVert g_D\\rVert^2`. Standard error: delete-one
    jackknife over k.

    Subset sums are accumulated in float64, ``2 · K · P`` numbers per ``n`` value (``n``
    values are split into passes so that this stays under ``max_bytes``).

    Parameters
    ----------
    source : path, glob, list of paths, GradientStore or mapping
        A store (path or open), the shards of one run (their rows of a record are pooled;
        layouts must match), or a mapping ``{(step, split): (N, P) array}``. Gradients are
        streamed ``chunk_rows`` rows at a time.
    steps : int or sequence, optional
        Checkpoints; default every step holding both splits.
    n : int or sequence of int
        Subset size(s).
    splits : (str, str)
        Pools of ``D_k`` and ``D'_k``.
    n_subsets : int
        K pairs per (step, n).
    seed : int or Generator
        Subset draws are reproducible.
    stats : xarray.Dataset, optional
        Adds ``osgr_theory`` (step, n) from ``theory_split`` (default ``splits[0]``).
    debias : bool
        For the theory.
    chunk_rows : int
        Rows per chunk handed to the kernel.
    allow_mixed_runs : bool
        Pool shards of different runs (refused by default, as in :func:`gsnr_stats.reduce`;
        a shard given twice or a copy of one is always refused).
    factored : {"auto", "sums", "gram"}
        How a factored weight (format v4 records, ``docs/format.md``) enters, never through
        a P-vector per sample: ``"sums"`` forms each subset's sum
        :math:`\\sum_{i\\in D}\\sum_t \\delta_{it} a_{it}^\\top = \\Delta_D^\\top A_D` (a
        P-vector per subset, float64 GEMMs); ``"gram"`` the sample Gram matrix
        :math:`H_{ij} = \\sum_{t,s} (\\delta_{it}\\cdot\\delta_{js})(a_{it}\\cdot a_{js})` over
        the rows the subsets hold, ``g_{D'}·g_D = 1_{D'}ᵀ H 1_D`` (no P-vector at all);
        ``"auto"`` the one with fewer multiply-adds, Gram only when its blocks fit
        ``max_bytes``. Plain columns always take the subset sums. Same draws, same numbers
        (float64 rounding) either way.

    Returns
    -------
    xarray.Dataset
        ``osgr_first_order``, ``osgr_se``, ``dot_mean`` (mean ``g_{D'}·g_D``), ``sqnorm_mean``
        (mean ``|g_D|²``) (step, n) [, ``osgr_theory``].
    """
    where = "gs.osgr_first_order"
    if not isinstance(source, Mapping) and not hasattr(source, "read_grads"):
        require_paths(source, where, "source")
    if stats is not None:
        require_stats(stats, where)
    if not (isinstance(splits, tuple | list) and len(splits) == 2
            and all(isinstance(x, str) for x in splits)):
        raise ArgumentTypeError(f"{where}: splits must be two split names (pool of D, pool of "
                                f"D'), got {describe(splits)}")
    ns = _n_grid(n)
    K = require_int(n_subsets, "n_subsets", where, minimum=1)
    require_int(chunk_rows, "chunk_rows", where, minimum=1)
    if factored not in ("auto", "sums", "gram"):
        raise UsageError(f"{where}: factored must be 'auto', 'sums' or 'gram', got "
                         f"{describe(factored)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sa, sb = splits
    opened: list[Any] = []
    try:
        if isinstance(source, Mapping):
            have = {(int(k[0]), str(k[1])) for k in source}
        else:
            source, opened = open_sources(source, where, allow_mixed_runs)
            have = {(int(r.step), str(r.split)) for st in source for r in st.records
                    if r.kind == "gradients"}
        if steps is None:
            st_list = sorted({s for s, _ in have if (s, sa) in have and (s, sb) in have})
            if not st_list:
                raise MissingSplitError(
                    f"{where}: no step holds per-sample gradient records of both {sa!r} and "
                    f"{sb!r} (splits with gradient records: "
                    f"{sorted({sp for _, sp in have})}); pass splits= (CLI: --pools) naming two")
        else:
            st_list = [int(s) for s in np.atleast_1d(steps)]
        for s in st_list:
            for sp in (sa, sb):
                if (s, sp) not in have:
                    raise MissingSplitError(f"no per-sample gradient record (step={s}, "
                                            f"split={sp!r})")
        S = len(st_list)
        R = np.full((S, ns.size), np.nan)
        se = np.full((S, ns.size), np.nan)
        dot = np.full((S, ns.size), np.nan)
        sq = np.full((S, ns.size), np.nan)
        for i, s in enumerate(st_list):
            if isinstance(source, Mapping):
                fact = False
            else:  # factored math when every shard of both records has the same factors
                fact = same_factors(parts_of(source, s, sa) + parts_of(source, s, sb))
            it_a, Na, P = _record_reader(source, s, sa, chunk_rows, fact)
            it_b, Nb, Pb = _record_reader(source, s, sb, chunk_rows, fact)
            if P != Pb:
                raise ValueError(f"step {s}: splits have {P} and {Pb} parameters")
            meta = (record_meta(parts_of(source, s, sa)[0]) if fact
                    else RecordMeta(int(P), np.arange(int(P), dtype=np.int64)))
            same = sa == sb
            per_pass = max(1, int(max_bytes // max(1, 2 * K * P * 8)))
            for c0 in range(0, ns.size, per_pass):
                sub_a: list[np.ndarray] = []
                sub_b: list[np.ndarray] = []
                for nv in ns[c0:c0 + per_pass]:
                    need = 2 * nv if same else nv
                    if need > Na or (not same and nv > Nb):
                        raise UsageError(
                            f"step {s}: subsets of size n={nv} need {need} rows of {sa!r} "
                            f"({Na} stored)" + ("" if same else f" and {nv} of {sb!r} ({Nb})"))
                    A, B = _draw_subsets(rng, Na, None if same else Nb, int(nv), K)
                    sub_a += A
                    sub_b += B
                num, den = _first_order_core(it_a, None if same else it_b, (Na, Nb), meta,
                                             sub_a, sub_b, method=factored,
                                             max_bytes=int(max_bytes))
                for jj, nv in enumerate(ns[c0:c0 + per_pass]):
                    sl = slice(jj * K, (jj + 1) * K)
                    R[i, c0 + jj], se[i, c0 + jj] = _ratio_jackknife(num[sl], den[sl])
                    dot[i, c0 + jj] = num[sl].mean() / float(nv) ** 2
                    sq[i, c0 + jj] = den[sl].mean() / float(nv) ** 2
    finally:
        for st in opened:
            st.close()
    data: dict[str, Any] = {
        "osgr_first_order": (("step", "n"), R, {"long_name": "first-order OSGR sum g_D'.g_D / "
                                                             "sum |g_D|^2", **_ONE}),
        "osgr_se": (("step", "n"), se, {"long_name": "jackknife standard error over subsets",
                                        **_ONE}),
        "dot_mean": (("step", "n"), dot, {"long_name": "mean g_D'.g_D over subsets"}),
        "sqnorm_mean": (("step", "n"), sq, {"long_name": "mean |g_D|^2 over subsets"}),
    }
    coords = {"step": ("step", np.asarray(st_list, dtype=np.int64), {"long_name":
                                                                     "optimizer step"}),
              "n": _n_coord(ns)}
    tsplit = theory_split or sa
    if stats is not None and S:
        th = _theory_at(stats, np.asarray(st_list), ns, tsplit, debias, None)
        data["osgr_theory"] = (("step", "n"), th.sel(n=ns).values,
                               {"long_name": f"theoretical OSGR R(n) on {tsplit!r}", **_ONE})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"title": "first-order OSGR from stored per-sample gradients",
                     "splits": f"{sa},{sb}", "n_subsets": K, "theory_split": tsplit,
                     "debias": int(debias)})
    why = _reasons.Reasons({v: ("step", "n") for v in ("osgr_first_order", "osgr_se")},
                           {"step": np.asarray(st_list), "n": ns})
    with np.errstate(invalid="ignore"):
        why.add("osgr_first_order", R < 0, f"sum_k g_D'.g_D < 0: the {sb!r} subsets' gradient "
                                           f"points against the {sa!r} subsets' (a memorised "
                                           "training set)")
        why.add("osgr_first_order", np.isnan(R), "sum_k |g_D|^2 = 0 (all-zero gradients)")
        why.add("osgr_se", np.isnan(se) & (K < 2), "n_subsets = 1: no jackknife over subsets")
    if "osgr_theory" in data:
        _theory_reasons(why, data["osgr_theory"][1], "no checkpoint at the step")
    return why.attach(ds)


# -- expectation of the measured estimators, given the two finite pools ---------------------


def osgr_pools(
    stats: xr.Dataset,
    n: int | Sequence[int],
    *,
    splits: tuple[str, str] = ("train", "test"),
) -> xr.Dataset:
    """First-order expectation of the probe and first-order OSGR, given their two pools.

    The probe (:func:`osgr_probe`) and :func:`osgr_first_order` draw ``D_k`` (``n`` rows,
    without replacement) from a *finite* pool A of ``N_A`` samples and ``D'_k`` from a
    disjoint finite pool B. With pool means ``m_A``, ``m_B`` and pool-A variance
    ``s_A²`` (ddof 1), ``E[g_{D'}·g_D] = m_B·m_A`` and
    ``E|g_D|² = |m_A|² + (1/n − 1/N_A) Σ_j s_Aj²``, so, to first order in λ and up to the
    O(1/K) bias of a ratio of sums,

    .. math::

        \\mathbb E[\\hat R \\mid A, B] = \\frac{\\sum_j m_{Aj} m_{Bj}}
        {\\sum_j \\left(m_{Aj}^2 + (1/n - 1/N_A)\\, s_{Aj}^2\\right)} .

    The theory :func:`osgr` on pool A has the same denominator (debiased ``G``) but the
    numerator ``Σ_j (m_Aj² − s_Aj²/N_A)``: both estimate ``Σ_j g̃_j²``, but they differ by
    the sampling noise of the *pools*, ``m_A·(m_B − m_A) + Σ s_A²/N_A``, which neither the
    probes' jackknife over k nor :func:`osgr_ci` (pool A only, and nearly cancelling
    between numerator and denominator when R → 1) contains. Compare a measured OSGR with
    the theory using ``SE² = SE_measured² + SE_pools²``, where ``SE_pools`` is the
    jackknife SE of ``osgr_pools − osgr`` (variable ``pool_minus_theory``):
    ``jackknife(stats, lambda s: osgr_pools(s, n, splits=(a, b)))``.

    Parameters
    ----------
    stats : xarray.Dataset
        Moments with both ``splits`` (``mean``, ``var``, ``count``).
    n : int or sequence of int
        Draw size(s).
    splits : (str, str)
        Pools A (``D_k``) and B (``D'_k``).

    Returns
    -------
    xarray.Dataset
        ``osgr_pools`` (step, n): the expectation above; ``osgr_theory`` (step, n): :func:`osgr`
        on pool A (debiased); ``pool_minus_theory`` their difference.
    """
    require_stats(stats, "gs.osgr_pools")
    if not (isinstance(splits, tuple | list) and len(splits) == 2
            and all(isinstance(x, str) for x in splits)):
        raise ArgumentTypeError(f"gs.osgr_pools: splits must be two split names (pools A, B), "
                                f"got {describe(splits)}")
    a, b = splits
    st = _select_splits(stats, [a, b])
    ns = _n_grid(n)
    ma = st["mean"].sel(split=a).transpose("step", "param").values
    mb = st["mean"].sel(split=b).transpose("step", "param").values
    va = st["var"].sel(split=a).transpose("step", "param").values
    Na = st["count"].sel(split=a).values.astype(np.float64)
    ok = np.isfinite(ma) & np.isfinite(mb) & np.isfinite(va)
    num = np.where(ok, ma * mb, 0.0).sum(-1)
    m2 = np.where(ok, ma * ma, 0.0).sum(-1)
    sv = np.where(ok, va, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        den = m2[:, None] + (1.0 / ns[None, :] - 1.0 / Na[:, None]) * sv[:, None]
        E = np.where((den > 0) & ok.any(-1)[:, None], num[:, None] / den, np.nan)
    T = osgr(stats, ns, split=a)["osgr"].sel(split=a).transpose("step", "n").values
    coords = {"step": st["step"], "n": _n_coord(ns)}
    ds = xr.Dataset(
        {
            "osgr_pools": (("step", "n"), E, {"long_name": "first-order expectation of the "
                                                          "measured OSGR given pools A, B",
                                              **_ONE}),
            "osgr_theory": (("step", "n"), T, {"long_name": f"theoretical OSGR R(n) on {a!r}",
                                               **_ONE}),
            "pool_minus_theory": (("step", "n"), E - T,
                                  {"long_name": "osgr_pools - osgr_theory", **_ONE}),
        },
        coords=coords,
    )
    ds.attrs.update({"title": "expected measured OSGR given finite pools", "splits": f"{a},{b}"})
    why = _reasons.Reasons({v: ("step", "n") for v in ("osgr_pools", "pool_minus_theory")},
                           {"step": st["step"].values, "n": ns})
    with np.errstate(invalid="ignore"):
        for v in ("osgr_pools", "pool_minus_theory"):
            why.add(v, np.broadcast_to(ns[None, :] > Na[:, None], E.shape),
                    f"n larger than pool {a!r} (N_A): no draw of n rows without replacement, "
                    "1/n - 1/N_A < 0 extrapolates")
            why.add(v, np.isnan(E) & ok.any(-1)[:, None],
                    "denominator sum (m_A^2 + (1/n - 1/N_A) s_A^2) <= 0")
            why.add(v, np.isnan(E) & ~ok.any(-1)[:, None], _reasons.NO_PARAMS)
        why.add("osgr_pools", E < 0, f"sum_j m_A m_B < 0: pool {b!r}'s mean gradient points "
                                     f"against pool {a!r}'s")
    _theory_reasons(why, T, "see osgr()")
    return why.attach(ds)
