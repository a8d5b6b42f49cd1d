"""Dask backend of :func:`gsnr_stats.reduce`: shards × records × column blocks on a cluster.

The work is split into tasks ``(shard, record, column block)``. Each task opens its own
HDF5 handle on the worker (only the path, the record key and the column range travel),
runs the same Numba kernel as the in-process path (:func:`gsnr_stats.reduce.record_partial`)
and returns a :class:`~gsnr_stats.reduce.Partial` — float64 ``count, mean, M2`` per
jackknife block over the column block. The partials of one ``(record, column block)`` from
the shards merge in a binary tree of Chan merges on the workers,

.. math::

    n = n_a + n_b,\\quad \\delta = \\bar x_b - \\bar x_a,\\quad
    \\bar x = \\bar x_a + \\delta \\frac{n_b}{n},\\quad
    M_2 = M_{2,a} + M_{2,b} + \\delta^2 \\frac{n_a n_b}{n},

adjacent shards merged first so the order matches the in-process left-to-right merge; the
merged column blocks are concatenated on the client and assembled by
:func:`~gsnr_stats.reduce.build_dataset`. Results equal the in-process path to rounding
(≤ 1e-12 relative), whatever the number of workers, shards or column blocks.

Threading rule: Numba's parallel kernels and Dask's worker threads must not nest. Run
workers as processes with one thread each (:func:`local_client` does); in a worker with
more threads, kernels run one at a time per process with as many Numba threads as the
worker has Dask threads.

Faults: tasks are pure functions of files on disk, so a worker that dies mid-task is
harmless: Dask reschedules its tasks (and recomputes partials that were held only in its
memory) on the surviving or restarted workers, and the result is unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import GSNRError, LayoutMismatchError, StoreError
from .reduce import (
    Partial,
    SkippedShardWarning,
    build_dataset,
    check_shard,
    filter_keys,
    numba_threads,
    record_partial,
)
from .store import Layout, open_store

#: Default target width (parameters) of a column block, rounded up to the chunk widths.
DEFAULT_COLUMNS = 1 << 16

_KERNEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class ShardInfo:
    """What the client needs to plan the tasks of one shard (inspected on a worker)."""

    path: str
    layout_json: str = ""
    layout_hash: str = ""
    chunk_cols: int = 1
    itemsize: int = 4
    records: tuple[tuple[int, str, int], ...] = ()
    run_id: str = ""
    framework: str = ""
    warnings: tuple[tuple[type[Warning], str], ...] = ()
    error: str | None = None
    error_type: type[Exception] | None = None


def local_client(n_workers: int, *, memory_limit: str | int = "auto", **cluster_kwargs: Any) -> Any:
    """A Dask ``Client`` on a new ``LocalCluster`` of ``n_workers`` single-threaded processes.

    Parameters
    ----------
    n_workers : int
        Worker processes, one thread each (the Numba/Dask threading rule).
    memory_limit : str or int
        Per-worker memory limit passed to ``LocalCluster``.
    **cluster_kwargs
        Further ``LocalCluster`` arguments.

    Returns
    -------
    distributed.Client
        Close it and its ``client.cluster`` when done.
    """
    import logging

    from distributed import Client, LocalCluster

    n = int(n_workers)
    if n < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers!r}")
    # ":0": a free port for the scheduler's HTTP server (None still binds the default 8787)
    kw: dict[str, Any] = {"dashboard_address": ":0", "silence_logs": logging.ERROR}
    kw.update(cluster_kwargs)
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, memory_limit=memory_limit, **kw
    )
    try:
        return Client(cluster)
    except BaseException:
        cluster.close()
        raise


@contextlib.contextmanager
def _client_for(scheduler: object) -> Iterator[Any]:
    """Resolve ``scheduler`` to a Client; close what this function created."""
    from distributed import Client

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if isinstance(scheduler, str) and scheduler == "processes":
        client = local_client(os.cpu_count() or 1)
        try:
            yield client
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
        return
    if isinstance(scheduler, str) or hasattr(scheduler, "scheduler_address"):
        try:
            client = Client(scheduler)  # timeout: dask config distributed.comm.timeouts.connect
        except (OSError, TimeoutError) as e:
            raise GSNRError(f"cannot connect to the Dask scheduler at {scheduler!r} ({e})") from e
        try:
            yield client
        finally:
            client.close()
        return
    raise ValueError(
        "scheduler must be None, 'processes', a dask.distributed Client, a cluster object or "
        f"a scheduler address such as 'tcp://host:8786', got {scheduler!r}"
    )


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(getattr(get_worker().state, "nthreads", 1)))
    except (ImportError, ValueError, AttributeError):
        return 1


def inspect_shard(path: str) -> ShardInfo:
    """Open and validate one shard (on a worker); errors come back as data for ``skip_bad``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            store = open_store(path)
        except StoreError as e:
            return ShardInfo(path, error=str(e), error_type=type(e))
    try:
        check_shard(store)
        ds = store.grads_dataset
        return ShardInfo(
            path,
            layout_json=store.layout.to_json(),
            layout_hash=store.layout.hash,
            chunk_cols=int(ds.chunks[1]) if ds.chunks else 1,
            itemsize=int(ds.dtype.itemsize),
            records=tuple((r.step, r.split, r.n_samples) for r in store.records),
            run_id=str(store.attrs["run_id"]),
            framework=str(store.attrs["framework"]),
            warnings=tuple((w.category, str(w.message)) for w in caught),
        )
    except StoreError as e:
        return ShardInfo(path, error=str(e), error_type=type(e))
    finally:
        store.close()


def partial_task(
    path: str,
    step: int,
    split: str,
    c0: int,
    c1: int,
    blocks: int,
    nonfinite: str,
    delay: float = 0.0,
) -> Partial:
    """One task: moments of record ``(step, split)`` of shard ``path`` over columns ``[c0, c1)``.

    ``delay`` (seconds slept first) is for tests only: it keeps tasks running long enough to
    kill a worker mid-reduce.
    """
    if delay:
        time.sleep(delay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already reported by inspect_shard
        store = open_store(path)
    with store, _KERNEL_LOCK, numba_threads(_worker_threads()):
        return record_partial(store, step, split, cols=(c0, c1), blocks=blocks, nonfinite=nonfinite)


def merge_task(a: Partial, b: Partial) -> Partial:
    """Chan merge of two partials of the same record and column block (``a`` first)."""
    return a.merge(b)


def concat_columns(parts: Sequence[Partial]) -> Partial:
    """Concatenate partials of consecutive column blocks of one record along the columns."""
    p0 = parts[0]
    if len(parts) == 1:
        return p0
    return Partial(
        np.concatenate([p.count for p in parts], axis=1),
        np.concatenate([p.mean for p in parts], axis=1),
        np.concatenate([p.m2 for p in parts], axis=1),
        np.concatenate([p.n_omit for p in parts]),
        p0.n_samples, p0.loss, p0.lr, p0.epoch,
        _sum_checks(parts),
    )


def _sum_checks(parts: Sequence[Partial]) -> dict[str, tuple[Any, Any, int, Any]] | None:
    """Checksum sums of one shard's column blocks add up (the sums are additive)."""
    out: dict[str, tuple[Any, Any, int, Any]] = {}
    for p in parts:
        for where, (got, want, width, what) in (p.checks or {}).items():
            if where in out:
                g0, _, w0, _ = out[where]
                out[where] = (g0 + got, want, w0 + width, what)
            else:
                out[where] = (got.copy(), want, width, what)
    return out or None


def column_blocks(n_params: int, chunk_widths: Sequence[int], columns: int | None) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` whose starts are multiples of every shard's chunk width.

    The width is ``columns`` (default :data:`DEFAULT_COLUMNS`) rounded up to the least common
    multiple of the chunk widths, so each task reads whole chunks in every shard.
    """
    if n_params <= 0:
        return [(0, 0)]
    unit = 1
    for w in chunk_widths:
        unit = math.lcm(unit, max(1, int(w)))
    want = DEFAULT_COLUMNS if columns is None else int(columns)
    if want < 1:
        raise ValueError(f"columns must be >= 1, got {columns!r}")
    width = -(-want // unit) * unit
    return [(c, min(n_params, c + width)) for c in range(0, n_params, width)]


def _tree(client: Any, futs: list[Any], tag: str) -> Any:
    level = 0
    while len(futs) > 1:
        nxt = [
            client.submit(merge_task, futs[i], futs[i + 1], key=f"{tag}-merge-{level}-{i}")
            for i in range(0, len(futs) - 1, 2)
        ]
        if len(futs) % 2:
            nxt.append(futs[-1])
        futs = nxt
        level += 1
    return futs[0]


def _plan(
    client: Any, files: Sequence[Path], skip_bad: bool
) -> tuple[list[ShardInfo], Layout]:
    paths = [str(p) for p in files]
    infos: list[ShardInfo] = client.gather(
        [client.submit(inspect_shard, p, key=f"gsnr-inspect-{uuid.uuid4().hex}") for p in paths]
    )
    good: list[ShardInfo] = []
    bad: list[str] = []
    for info in infos:
        for cat, msg in info.warnings:
            warnings.warn(msg, cat, stacklevel=4)
        if info.error is None:
            good.append(info)
            continue
        etype = info.error_type or StoreError
        if not skip_bad:
            raise etype(info.error)
        warnings.warn(f"{info.path}: skipping bad shard: {info.error}", SkippedShardWarning,
                      stacklevel=4)
        bad.append(f"{info.path}: {info.error}")
    if not good:
        raise StoreError(f"no valid shard among {len(paths)} file(s): " + "; ".join(bad))
    first = good[0]
    layout = Layout.from_json(first.layout_json, first.path)
    for s in good[1:]:
        if s.layout_hash != first.layout_hash:
            other = Layout.from_json(s.layout_json, s.path)
            raise LayoutMismatchError(
                f"parameter layouts differ: {first.path} ({layout.n_params} params, "
                f"hash {first.layout_hash[:12]}) vs {s.path} ({other.n_params} params, "
                f"hash {s.layout_hash[:12]}); shards of one run must share a layout"
            )
    return good, layout


def _select(
    shards: Sequence[ShardInfo], steps: Sequence[int] | None, splits: Sequence[str] | None
) -> list[tuple[int, str]]:
    keys = {(r[0], r[1]) for s in shards for r in s.records}
    return filter_keys(keys, [s.path for s in shards], steps, splits)


def reduce_distributed(
    files: Sequence[str | os.PathLike[str]],
    *,
    steps: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
    ddof: int = 1,
    nonfinite: str = "raise",
    blocks: int | None = None,
    scheduler: object = "processes",
    progress: bool = False,
    skip_bad: bool = False,
    columns: int | None = None,
    _task_delay: float = 0.0,
) -> xr.Dataset:
    """:func:`gsnr_stats.reduce` on a Dask cluster; same arguments, same Dataset.

    For parameter ``j`` of a record with N samples over all shards,
    ``m_j = (1/N) Σ_i g_ij``, ``s_j² = Σ_i (g_ij − m_j)² / (N − ddof)``, ``r_j = m_j²/s_j²``;
    the shards' partial moments combine by the Chan merge (module docstring).

    Parameters
    ----------
    files : sequence of path
        Shard files (globs already expanded).
    steps, splits, ddof, nonfinite, blocks
        As in :func:`gsnr_stats.reduce`.
    scheduler : "processes", distributed.Client, cluster object or address
        ``"processes"``: a temporary ``LocalCluster`` of ``os.cpu_count()`` single-threaded
        worker processes, closed afterwards. A ``Client`` is used as is (left open). A
        cluster object (``LocalCluster``, ``dask_jobqueue.SLURMCluster``) or an address
        (``"tcp://host:8786"``) gets a ``Client`` that is closed afterwards.
    progress : bool
        Progress bar (tqdm) over bytes of finished tasks.
    skip_bad : bool
        Skip shards that fail validation with a :class:`SkippedShardWarning` naming the file
        and reason, instead of raising the validation error.
    columns : int, optional
        Target width of a column block (rounded up to a multiple of every shard's chunk
        width); default :data:`DEFAULT_COLUMNS`.
    _task_delay : float
        Testing only: seconds each reduce task sleeps first.

    Returns
    -------
    xarray.Dataset
        As :func:`gsnr_stats.reduce`.
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if nonfinite not in ("raise", "omit"):
        raise ValueError(f"nonfinite must be 'raise' or 'omit', got {nonfinite!r}")
    K = int(blocks) if blocks else 1
    with _client_for(scheduler) as client:
        shards, layout = _plan(client, [Path(f) for f in files], skip_bad)
        keys = _select(shards, steps, splits)
        cols = column_blocks(layout.n_params, [s.chunk_cols for s in shards], columns)
        tag = f"gsnr-{uuid.uuid4().hex[:12]}"
        leaves: list[Any] = []
        nbytes: dict[str, int] = {}
        finals: list[tuple[tuple[int, str], int, Any]] = []
        for key in keys:
            for b, (c0, c1) in enumerate(cols):
                futs = []
                for i, s in enumerate(shards):
                    n = next((r[2] for r in s.records if (r[0], r[1]) == key), None)
                    if n is None:
                        continue
                    f = client.submit(
                        partial_task, s.path, key[0], key[1], c0, c1, K, nonfinite, _task_delay,
                        key=f"{tag}-partial-{len(leaves)}-s{i}", pure=False,
                    )
                    leaves.append(f)
                    nbytes[f.key] = n * (c1 - c0) * s.itemsize
                    futs.append(f)
                finals.append((key, b, _tree(client, futs, f"{tag}-{len(finals)}")))
        try:
            if progress:
                from distributed import as_completed
                from tqdm.auto import tqdm

                with tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True,
                          desc="reduce") as bar:
                    for f in as_completed(leaves):
                        if f.status == "error":
                            break
                        bar.update(nbytes[f.key])
            order = [(key, b) for key, b, _ in finals]
            results = client.gather([f for _, _, f in finals])
        except BaseException:
            # Stop the remaining tasks of a failed run (each key once).
            client.cancel(list({f.key: f for f in leaves + [f for _, _, f in finals]}.values()))
            raise
        del leaves, finals[:]
    by_key: dict[tuple[int, str], list[Partial]] = {}
    for (key, _b), p in zip(order, results, strict=True):
        by_key.setdefault(key, []).append(p)
    parts = {key: concat_columns(ps) for key, ps in by_key.items()}
    attrs = {
        "run_id": ",".join(sorted({s.run_id for s in shards})),
        "framework": ",".join(sorted({s.framework for s in shards})),
        "sources": ",".join(s.path for s in shards),
    }
    return build_dataset(parts, layout, ddof=ddof, blocks=blocks, nonfinite=nonfinite, attrs=attrs)
