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

from . import _cf
from . import _factored_engine as _fe
from .engine import (
    Partial,
    SkippedShardWarning,
    build_dataset,
    check_shard,
    filter_keys,
    identity_problems,
    numba_threads,
    record_partial,
    shard_identity,
)
from .errors import (
    GSNRError,
    LayoutMismatchError,
    MissingDependencyError,
    ShardSetError,
    StoreError,
)
from .store import Layout, open_store

#: Default target width (parameters) of a column block, rounded up to the chunk widths.
DEFAULT_COLUMNS = 1 << 16

_KERNEL_LOCK = threading.Lock()


#: What to install for the Dask backend (the ``distributed`` extra of pyproject.toml).
INSTALL_HINT = 'pip install "gsnr-stats[distributed]"'


def require_dask(what: str = "a Dask scheduler (scheduler=, CLI --workers/--scheduler)") -> None:
    """Raise :class:`MissingDependencyError` naming the extra unless Dask's distributed
    scheduler can be imported (it is an optional extra)."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"{what} needs Dask's distributed scheduler, which is not installed here "
            f"({e}); install it with: {INSTALL_HINT}") from e


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
    identity: tuple[object, ...] = ()  # engine.shard_identity: equal for copies of a shard
    # format 4: the stored plain columns and the factors (_factored_engine.spans); the
    # tasks of a factored shard cover storage positions, not flat parameters
    n_plain: int = -1
    spans: tuple[tuple[int, int, int, int], ...] = ()
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

    require_dask("local_client (CLI --workers)")
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


#: Environment variable: seconds a scheduler address gets to answer as a Dask scheduler.
SCHEDULER_TIMEOUT_ENV = "GSNR_SCHEDULER_TIMEOUT"

#: Schemes whose addresses are ``host:port``.
_HOST_PORT_SCHEMES = ("tcp", "tls", "ws", "wss")

#: What an address that connects but is not a scheduler is told to check.
_NOT_A_SCHEDULER_HINT = (
    "give the scheduler's own address (default port 8786), not its dashboard (8787), a "
    "worker or another service"
)


def scheduler_timeout(timeout: float | str | None = None) -> float:
    """Seconds a scheduler address gets to accept the connection and answer as a scheduler.

    Parameters
    ----------
    timeout : float or str, optional
        Used if given; else the environment variable ``GSNR_SCHEDULER_TIMEOUT``; else Dask's
        ``distributed.comm.timeouts.connect`` (30 s unless configured). Numbers are seconds;
        strings such as ``"10s"`` or ``"2 minutes"`` are parsed by Dask.

    Returns
    -------
    float
        Seconds, > 0.

    Raises
    ------
    GSNRError
        The value is not a positive duration.
    """
    import dask
    from dask.utils import parse_timedelta

    if timeout is not None:
        value: object = timeout
        where = "connect_timeout"
    elif os.environ.get(SCHEDULER_TIMEOUT_ENV, "").strip():
        value = os.environ[SCHEDULER_TIMEOUT_ENV].strip()
        where = SCHEDULER_TIMEOUT_ENV
    else:
        value = dask.config.get("distributed.comm.timeouts.connect")
        where = "dask config distributed.comm.timeouts.connect"
    try:
        seconds = parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError):
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise GSNRError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(seconds)


def _scheduler_address(address: str) -> str:
    """``address`` with its scheme (``tcp://`` by default), checked before any connection."""
    require_dask()
    from distributed.comm import get_address_host_port, normalize_address
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    expected = "expected a Dask scheduler address such as 'tcp://host:8786'"
    try:
        addr = normalize_address(address.strip())
        scheme, _ = parse_address(addr)
        get_backend(scheme)
        if scheme in _HOST_PORT_SCHEMES:
            port = get_address_host_port(addr, strict=True)[1]
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range 1-65535")
    except (ValueError, TypeError) as e:
        raise GSNRError(f"bad scheduler address {address!r}: {e}; {expected}") from e
    return addr


def _describe(e: BaseException) -> str:
    text = str(e) or "no message"
    return f"{type(e).__name__}: {text[:200]}"


async def _identify(address: str, timeout: float, connection_args: dict[str, Any]) -> dict:
    """Connect to ``address``, do the Dask handshake and ask ``identity``, within ``timeout``.

    :func:`distributed.comm.connect` bounds only the TCP connect (its ``timeout`` and
    ``distributed.comm.timeouts.connect``); ``distributed.comm.timeouts.tcp`` only sets TCP
    keep-alive, which a live peer satisfies. So a peer that accepts the connection and then
    stays silent leaves the handshake read, and ``distributed.Client(address, timeout=...)``
    with it, waiting forever (dask/distributed#8071). Here the TCP connect is retried until
    the deadline (a scheduler that is still starting is waited for), then the handshake and
    one ``identity`` request run under ``asyncio.wait_for`` with the time left.
    """
    import asyncio

    from distributed.comm import connect
    from distributed.comm.addressing import parse_address
    from distributed.comm.core import FatalCommClosedError
    from distributed.comm.registry import get_backend

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    scheme, loc = parse_address(address)
    connector = get_backend(scheme).get_connector()
    delay = 0.01
    last: BaseException | None = None
    while True:
        try:
            raw = await asyncio.wait_for(
                connector.connect(loc, deserialize=False, **connection_args),
                max(0.0, deadline - loop.time()),
            )
            break
        except FatalCommClosedError as e:  # TLS misconfiguration: retrying cannot help
            raise GSNRError(
                f"cannot connect to the Dask scheduler at {address} ({_describe(e)})"
            ) from e
        except OSError as e:  # refused, unreachable, DNS (TimeoutError included): retried
            if last is None or not isinstance(e, TimeoutError):
                last = e  # report why the last real attempt failed, not the final timeout
            left = deadline - loop.time()
            if left <= 0:
                raise GSNRError(
                    f"cannot connect to the Dask scheduler at {address} within {timeout:g} s "
                    f"({_describe(last)})"
                ) from last
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, 1.0)
        except Exception as e:  # e.g. a port out of range: not worth retrying
            raise GSNRError(
                f"cannot connect to the Dask scheduler at {address} ({_describe(e)})"
            ) from e
    raw.abort()  # the port is open; now does a scheduler answer on it?

    async def ask() -> dict:
        comm = await connect(address, timeout=timeout, **connection_args)
        try:
            await comm.write({"op": "identity", "reply": True})
            reply = await comm.read()
        except BaseException:
            comm.abort()
            raise
        await comm.close()
        return reply

    try:
        reply = await asyncio.wait_for(ask(), max(0.5, deadline - loop.time()))
    except TimeoutError as e:
        raise GSNRError(
            f"{address} accepts connections but is not answering as a Dask scheduler: no "
            f"reply to the Dask handshake within {timeout:g} s; {_NOT_A_SCHEDULER_HINT}"
        ) from e
    except Exception as e:  # garbage bytes, closed connection, foreign protocol
        raise GSNRError(
            f"{address} accepts connections but is not answering as a Dask scheduler: the Dask "
            f"handshake failed ({_describe(e)}); {_NOT_A_SCHEDULER_HINT}"
        ) from e
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind in ("Worker", "Nanny") or not isinstance(kind, str):
        what = f"a Dask {kind}" if isinstance(kind, str) else "not a Dask scheduler"
        raise GSNRError(
            f"{address} answers the Dask protocol but is {what}: its identity reply is "
            f"{str(reply)[:200]}; {_NOT_A_SCHEDULER_HINT}"
        )
    return reply


def check_scheduler(address: str, timeout: float | str | None = None) -> str:
    """Check, within a bounded time, that ``address`` is a running Dask scheduler.

    Parameters
    ----------
    address : str
        Scheduler address, ``"tcp://host:8786"`` (``tcp://`` is assumed when no scheme).
    timeout : float or str, optional
        Seconds (see :func:`scheduler_timeout`) for the connection, the Dask handshake and
        the scheduler's ``identity`` reply together.

    Returns
    -------
    str
        The address with its scheme.

    Raises
    ------
    GSNRError
        The address does not parse, nothing accepts connections there within ``timeout``,
        or what does is not a Dask scheduler (silent, sends foreign bytes, closes the
        connection, or is a Dask worker).
    """
    import asyncio

    require_dask()
    from distributed.security import Security

    t = scheduler_timeout(timeout)
    addr = _scheduler_address(address)
    if addr.startswith("inproc://"):
        return addr  # a scheduler in this process: Client(addr) needs no network check
    connection_args = Security().get_connection_args("client")  # as Client(address) uses
    box: dict[str, Any] = {}

    def probe() -> None:
        # its own thread and event loop: the caller may be inside one (Jupyter)
        try:
            box["reply"] = asyncio.run(_identify(addr, t, connection_args))
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=probe, name="gsnr-scheduler-check", daemon=True)
    thread.start()
    thread.join(2 * t + 5)  # _identify bounds itself; this is the guard
    if "error" in box:
        raise box["error"]
    if "reply" not in box:
        raise GSNRError(
            f"{addr} is not answering as a Dask scheduler within {t:g} s; "
            f"{_NOT_A_SCHEDULER_HINT}"
        )
    return addr


@contextlib.contextmanager
def _client_for(scheduler: object, connect_timeout: float | str | None = None) -> Iterator[Any]:
    """Resolve ``scheduler`` to a Client; close what this function created."""
    require_dask()
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
        t = scheduler_timeout(connect_timeout)
        target: Any = check_scheduler(scheduler, t) if isinstance(scheduler, str) else scheduler
        try:
            client = Client(target, timeout=t)
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
        return ShardInfo(
            path,
            layout_json=store.layout.to_json(),
            layout_hash=store.layout.hash,
            chunk_cols=store.grads_chunks[1],
            itemsize=int(store.grads_dtype.itemsize),
            records=tuple((r.step, r.split, r.n_samples) for r in store.records),
            run_id=str(store.attrs["run_id"]),
            framework=str(store.attrs["framework"]),
            identity=shard_identity(store),
            n_plain=int(getattr(store, "n_plain", store.layout.n_params)),
            spans=_fe.spans(getattr(store, "factors", None) or ()),
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
    """One task: moments of record ``(step, split)`` of shard ``path`` over columns ``[c0, c1)``
    (storage positions of a factored shard: :func:`_column_groups`).

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
        _sum_checks(parts), p0.optimizer_step, p0.optimizer, p0.source,
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


def _column_groups(
    shards: Sequence[ShardInfo], n_params: int, columns: int | None
) -> list[tuple[list[int], list[tuple[int, int]], np.ndarray | None]]:
    """Shards that share a column space, with its task ranges and its layout permutation.

    Unfactored shards reduce flat parameters in column blocks aligned to every shard's
    chunk width (:func:`column_blocks`). Factored shards (format 4) reduce storage
    positions (:mod:`gsnr_stats._factored_engine`): the plain columns in blocks aligned to
    the ``grads`` chunks, then blocks of whole weight rows of each factor; their merged
    blocks are put back in layout order with the permutation. Shards with different
    factors form different groups, merged on the client.
    """
    by: dict[tuple[int, tuple[tuple[int, int, int, int], ...]], list[int]] = {}
    for i, s in enumerate(shards):
        sp = tuple(s.spans)
        by.setdefault((s.n_plain if sp else n_params, sp), []).append(i)
    out: list[tuple[list[int], list[tuple[int, int]], np.ndarray | None]] = []
    for (n_plain, sp), members in by.items():
        widths = [shards[i].chunk_cols for i in members]
        if not sp:
            out.append((members, column_blocks(n_params, widths, columns), None))
            continue
        cols = column_blocks(n_plain, widths, columns) if n_plain else []
        cols += _fe.factor_blocks(n_plain, sp, DEFAULT_COLUMNS if columns is None
                                  else max(1, int(columns)))
        out.append((members, cols, _fe.storage_order(n_params, sp)))
    return out


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
    client: Any, files: Sequence[Path], skip_bad: bool, allow_mixed_runs: bool = False
) -> tuple[list[ShardInfo], Layout]:
    """Inspect the shards on the workers; refuse what :func:`gsnr_stats.engine.open_shards`
    refuses (bad shards unless ``skip_bad``, layout mismatch, then the shard-set rules)."""
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
    # The client's pre-check (gsnr_stats.reduce) sees only the shards it can open; the
    # workers' view covers the rest (a file system mounted on the workers only).
    problems = identity_problems([(s.path, s.identity, s.run_id) for s in good],
                                 allow_mixed_runs=allow_mixed_runs)
    if problems:
        raise ShardSetError(problems[0])
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
    connect_timeout: float | str | None = None,
    allow_mixed_runs: bool = False,
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
        (``"tcp://host:8786"``; ``tcp://`` is assumed without a scheme) gets a ``Client``
        that is closed afterwards. An address must accept the connection and answer the
        Dask handshake as a scheduler within ``connect_timeout``, else :class:`GSNRError`
        names it (a port that accepts TCP but speaks another protocol or nothing at all,
        such as the dashboard, fails instead of hanging); an address that does not parse
        raises :class:`GSNRError` at once.
    progress : bool
        Progress bar (tqdm) over bytes of finished tasks.
    skip_bad : bool
        Skip shards that fail validation with a :class:`SkippedShardWarning` naming the file
        and reason, instead of raising the validation error.
    columns : int, optional
        Target width of a column block (rounded up to a multiple of every shard's chunk
        width); default :data:`DEFAULT_COLUMNS`.
    connect_timeout : float or str, optional
        Seconds an address or cluster gets to connect and answer as a scheduler. Default:
        the environment variable ``GSNR_SCHEDULER_TIMEOUT`` (how the CLI and
        :func:`gsnr_stats.reduce` set it), else Dask's ``distributed.comm.timeouts.connect``
        (30 s unless configured). See :func:`scheduler_timeout`.
    allow_mixed_runs : bool
        Pool shards of different ``run_id`` s (as :func:`gsnr_stats.reduce`). Whatever its
        value, a shard given twice or a copy of one is refused.
    _task_delay : float
        Testing only: seconds each reduce task sleeps first.

    Returns
    -------
    xarray.Dataset
        As :func:`gsnr_stats.reduce`.

    Raises
    ------
    GSNRError
        The scheduler address does not parse, cannot be connected to, or is not answering as
        a Dask scheduler within ``connect_timeout``; and the errors of :func:`gsnr_stats.reduce`.
    ShardSetError
        As :func:`gsnr_stats.reduce`, checked on the workers' view of the shards: the same
        shard twice (by path or content identity), or several runs without
        ``allow_mixed_runs``.
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if nonfinite not in ("raise", "omit"):
        raise ValueError(f"nonfinite must be 'raise' or 'omit', got {nonfinite!r}")
    K = int(blocks) if blocks else 1
    with _client_for(scheduler, connect_timeout) as client:
        shards, layout = _plan(client, [Path(f) for f in files], skip_bad, allow_mixed_runs)
        keys = _select(shards, steps, splits)
        groups = _column_groups(shards, layout.n_params, columns)
        tag = f"gsnr-{uuid.uuid4().hex[:12]}"
        leaves: list[Any] = []
        nbytes: dict[str, int] = {}
        finals: list[tuple[tuple[int, str], int, Any]] = []
        for key in keys:
            for g, (members, cols, _) in enumerate(groups):
                for c0, c1 in cols:
                    futs = []
                    for i in members:
                        s = shards[i]
                        n = next((r[2] for r in s.records if (r[0], r[1]) == key), None)
                        if n is None:
                            continue
                        f = client.submit(
                            partial_task, s.path, key[0], key[1], c0, c1, K, nonfinite,
                            _task_delay, key=f"{tag}-partial-{len(leaves)}-s{i}", pure=False,
                        )
                        leaves.append(f)
                        nbytes[f.key] = n * (c1 - c0) * s.itemsize
                        futs.append(f)
                    if futs:
                        finals.append((key, g, _tree(client, futs, f"{tag}-{len(finals)}")))
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
    by_key: dict[tuple[tuple[int, str], int], list[Partial]] = {}
    for (key, g), p in zip(order, results, strict=True):
        by_key.setdefault((key, g), []).append(p)
    parts: dict[tuple[int, str], Partial] = {}
    for (key, g), ps in by_key.items():  # column blocks in order, groups in shard order
        p = concat_columns(ps)
        perm = groups[g][2]
        if perm is not None:  # storage order of factored shards -> layout order
            p = p.reorder(perm)
        parts[key] = parts[key].merge(p) if key in parts else p
    attrs = {
        "run_id": ",".join(sorted({s.run_id for s in shards})),
        "framework": ",".join(sorted({s.framework for s in shards})),
        "sources": ",".join(s.path for s in shards),
        **_cf.provenance(s.path for s in shards),  # the shards this process can open
    }
    return build_dataset(parts, layout, ddof=ddof, blocks=blocks, nonfinite=nonfinite, attrs=attrs)
