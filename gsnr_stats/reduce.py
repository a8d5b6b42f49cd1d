"""``gs.reduce``: per-parameter moments and GSNR of stored records, in-process or on Dask.

This module is the front door only: it expands paths and either runs the engine
(:mod:`gsnr_stats.engine`: store views through the kernels, Chan merges, the Dataset) in
this process, or hands the call to the Dask backend (:mod:`gsnr_stats.distributed`),
which uses the same engine on its workers. Arrows point one way: reduce → distributed →
engine → store, kernels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import xarray as xr

from . import _cf, distributed
from ._dsutil import describe, require_int, require_paths
from .engine import (  # noqa: F401 - names of the single-module reduce (v1 code, tests)
    Partial,
    SkippedShardWarning,
    _block_bounds,
    _has,
    build_dataset,
    check_shard,
    check_shard_set,
    filter_keys,
    numba_threads,
    open_shards,
    record_nbytes,
    record_partial,
    same_files,
    select_keys,
)
from .errors import ArgumentTypeError, BlocksError, StoreError, UsageError
from .store import check_same_layout, expand_paths, open_store


def reduce(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    steps: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
    ddof: int = 1,
    nonfinite: str = "raise",
    blocks: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    scheduler: object | None = None,
    skip_bad: bool = False,
    allow_mixed_runs: bool = False,
) -> xr.Dataset:
    """Per-parameter gradient moments and GSNR of every record, as a labelled Dataset.

    For parameter ``j`` of a record with N samples:

    .. math::

        m_j = \\frac1N \\sum_i g_{ij},\\quad
        s_j^2 = \\frac{1}{N - \\mathrm{ddof}} \\sum_i (g_{ij} - m_j)^2,\\quad
        r_j = \\frac{m_j^2}{s_j^2},\\quad \\hat r_j = r_j - \\frac1N .

    ``s²=0, m≠0`` gives ``r=+inf`` (counted in ``n_inf``), ``s²=0, m=0`` gives NaN (a dead
    parameter, counted in ``n_dead``); ``N ≤ ddof`` gives NaN variance.

    Parameters
    ----------
    paths : path, glob or list of them
        Store files; shards with the same layout merge record by record (Chan merge).
    steps, splits : sequence, optional
        Select records; default all.
    ddof : {1, 0}
        Delta degrees of freedom of the variance (0 matches cockpit/BackPACK).
    nonfinite : {"raise", "omit"}
        NaN/Inf gradients raise :class:`NonFiniteError` naming file, record, parameter and
        sample, or are dropped per parameter and counted in ``n_omitted``.
    blocks : int, optional
        Keep moments of K contiguous sample blocks (``block_count``, ``block_mean``,
        ``block_m2``) for jackknife confidence intervals.
    threads : int, optional
        Numba threads; results do not depend on it.
    progress : bool
        Show a progress bar (tqdm) over bytes.
    scheduler : None, "processes", dask Client, cluster or address, optional
        Run on Dask (see :func:`gsnr_stats.distributed.reduce_distributed`): ``"processes"``
        starts a temporary local cluster of ``os.cpu_count()`` single-threaded worker
        processes; a ``Client`` is used as is; a cluster object or an address such as
        ``"tcp://host:8786"`` is connected to. ``None`` reduces in-process.
    skip_bad : bool
        A shard that fails validation (:class:`StoreError`: unreadable, truncated, foreign or
        schema-violating file) raises by default; with ``skip_bad`` it is skipped with a
        :class:`SkippedShardWarning` naming the file and the reason. Layout mismatches between
        valid shards always raise.
    allow_mixed_runs : bool
        Shards of different runs (``run_id``) are refused by default: a glob that catches a
        second run would silently pool it. ``True`` pools them anyway.

    Raises
    ------
    ShardSetError
        A file given twice (by path or through a link), two shards with the same content
        (a copy: same run, records and data checksums), or several runs without
        ``allow_mixed_runs``: their samples would be counted twice or mixed.
    UsageError, ArgumentTypeError
        An argument of the wrong kind or out of range, named.

    Returns
    -------
    xarray.Dataset
        Dims ``step``, ``split``, ``param`` (and ``block``); see ``docs/format.md``.

    Notes
    -----
    Factored records (format 4: a Linear's per-sample gradient ``Σ_t δ_t a_tᵀ`` kept as
    its factors) give the same Dataset as the materialised products, computed from the
    factors exactly (float64 products and two-pass moments, never an ``n × P`` array;
    :mod:`gsnr_stats._factored_engine`). The only difference from reducing a materialised
    float32 store is that store's float32 rounding of each product. With
    ``nonfinite="omit"`` a sample is dropped from exactly the entries whose product is
    NaN/Inf (as in the materialised rows).
    """
    require_paths(paths, "gs.reduce")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise UsageError(f"gs.reduce: ddof must be 0 or 1, got {describe(ddof)}")
    if nonfinite not in ("raise", "omit"):
        raise UsageError(f"gs.reduce: nonfinite must be 'raise' or 'omit', got {nonfinite!r}")
    require_int(blocks, "blocks", "gs.reduce", minimum=0, none=True)
    require_int(threads, "threads", "gs.reduce", minimum=1, none=True)
    for name, sel in (("steps", steps), ("splits", splits)):
        if sel is not None and (isinstance(sel, str | bytes) or not hasattr(sel, "__iter__")):
            raise ArgumentTypeError(f"gs.reduce: {name} must be a list (or None), got "
                                    f"{describe(sel)}")
    files = expand_paths(paths)
    if scheduler is not None:
        _precheck_shards(files, allow_mixed_runs)
        return distributed.reduce_distributed(
            files, steps=steps, splits=splits, ddof=ddof, nonfinite=nonfinite, blocks=blocks,
            scheduler=scheduler, progress=progress, skip_bad=skip_bad,
            allow_mixed_runs=allow_mixed_runs,
        )
    stores = open_shards(files, skip_bad=skip_bad, allow_mixed_runs=allow_mixed_runs)
    try:
        layout = check_same_layout(stores)
        keys = select_keys(stores, steps, splits)
        K = int(blocks) if blocks else 1
        if blocks:  # each jackknife block needs a sample: more blocks than samples is a typo
            for key in keys:
                n = sum(s.record(*key).n_samples for s in stores if _has(s, key))
                if n and K > n:
                    raise BlocksError(
                        f"gs.reduce: blocks={K} is more than the {n} samples of record "
                        f"(step={key[0]}, split={key[1]!r}); give at most {n} blocks (or 0)"
                    )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(record_nbytes(s, k) for k in keys for s in stores if _has(s, k))
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="reduce")
        parts: dict[tuple[int, str], Partial] = {}
        with numba_threads(threads):
            for key in keys:
                for s in stores:
                    if not _has(s, key):
                        continue
                    p = record_partial(
                        s, key[0], key[1], blocks=K, nonfinite=nonfinite,
                        progress=bar.update if bar is not None else None,
                    )
                    parts[key] = parts[key].merge(p) if key in parts else p
        if bar is not None:
            bar.close()
        attrs = {
            "run_id": ",".join(sorted({s.attrs["run_id"] for s in stores})),
            "framework": ",".join(sorted({s.attrs["framework"] for s in stores})),
            "sources": ",".join(str(s.path) for s in stores),
            **_cf.provenance(stores),
        }
        return build_dataset(parts, layout, ddof=ddof, blocks=blocks, nonfinite=nonfinite,
                             attrs=attrs)
    finally:
        for s in stores:
            s.close()




def _precheck_shards(files: Sequence[os.PathLike[str]], allow_mixed_runs: bool) -> None:
    """The shard-set rules of :func:`open_shards` before a Dask run, from this process.

    The workers inspect the shards themselves; here the client opens those it can read (a
    shared file system) to refuse copies and mixed runs before any task is sent. A file this
    process cannot open is left to the workers' validation (and ``skip_bad``).
    """
    same_files(files)
    stores = []
    try:
        for p in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the workers report them
                    stores.append(open_store(p))
            except StoreError:
                continue
        check_shard_set(stores, allow_mixed_runs=allow_mixed_runs)
    finally:
        for s in stores:
            s.close()
