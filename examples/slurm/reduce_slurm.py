"""Reduce the shards of a run on a Dask cluster of SLURM jobs (``dask-jobqueue``).

The cluster comes from a JSON config (keys of :data:`DEFAULT_CONFIG`)::

    {"kind": "slurm", "jobs": 8, "cores": 32, "memory": "128GB", "walltime": "01:00:00",
     "queue": "compute", "account": "proj42", "python": "/path/to/.venv/bin/python",
     "prologue": ["module load hdf5"]}

``kind: "slurm"`` submits ``jobs`` worker jobs, each running ``cores`` single-threaded
Dask worker processes (the Numba/Dask threading rule: one thread per worker process,
``NUMBA_NUM_THREADS=1``); ``kind: "local"`` runs ``workers`` processes on this machine
(``LocalCluster``), the same code path without SLURM. Usage::

    python examples/slurm/reduce_slurm.py 'run42/shard-*.h5' --config cluster.json -o stats.nc
    python examples/slurm/reduce_slurm.py --config cluster.json --print-job-script

Run it on a login node or inside a small job: the Dask scheduler runs in this process and
the worker jobs connect to it. ``interface`` (e.g. ``"ib0"``) is the workers' network on the
compute nodes; the scheduler listens on ``scheduler_interface``, by default the same
interface where this host has one of that name and Dask's default address where it has
not (a login node without InfiniBand, or a laptop checking ``--print-job-script``).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_CONFIG: dict[str, Any] = {
    "kind": "slurm",          # "slurm" or "local"
    "workers": 2,             # local: worker processes
    "jobs": 4,                # slurm: worker jobs (nodes) to submit
    "cores": 16,              # slurm: cores per job = single-threaded worker processes per job
    "memory": "64GB",         # slurm: memory per job
    "walltime": "01:00:00",
    "queue": None,
    "account": None,
    "python": None,           # interpreter on the compute nodes (default: this one)
    "prologue": [],           # shell lines before the workers start (module load ...)
    "extra_directives": [],   # further #SBATCH lines, e.g. ["--exclusive"]
    "interface": None,        # workers' network interface on the compute nodes, e.g. "ib0"
    "scheduler_interface": "auto",  # this host's interface for the scheduler; "auto": the
                                    # same as "interface" where this host has it, else
                                    # Dask's default address
    "local_directory": None,  # worker spill directory, e.g. "$TMPDIR"
    "dashboard_address": ":8787",  # scheduler dashboard; ":0" picks a free port
    "wait_workers": 1,        # start reducing once this many workers have connected
    "wait_timeout": 600,      # seconds
}


def load_config(path: str | Path | None) -> dict[str, Any]:
    """:data:`DEFAULT_CONFIG` updated with a JSON file; unknown keys are refused."""
    cfg = dict(DEFAULT_CONFIG)
    if path is not None:
        user = json.loads(Path(path).read_text())
        unknown = set(user) - set(cfg)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        cfg.update(user)
    return cfg


def host_interfaces() -> set[str]:
    """Names of this host's network interfaces (``socket.if_nameindex``; empty if unknown)."""
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()


def scheduler_interface(cfg: dict[str, Any]) -> str | None:
    """The interface the scheduler binds on this host: ``cfg["scheduler_interface"]``, or for
    ``"auto"`` ``cfg["interface"]`` where this host has it, else ``None`` (Dask's default).

    Raises
    ------
    ValueError
        An explicit ``scheduler_interface`` this host does not have (names the ones it has).
    """
    want = cfg.get("scheduler_interface", "auto")
    have = host_interfaces()
    if want == "auto":
        iface = cfg.get("interface")
        if iface and have and iface not in have:
            warnings.warn(f"interface {iface!r} is not on this host ({', '.join(sorted(have))}): "
                          "the workers use it, the scheduler listens on Dask's default address; "
                          "set scheduler_interface to choose", stacklevel=2)
            return None
        return iface or None
    if want and have and want not in have:
        raise ValueError(f"scheduler_interface {want!r} is not an interface of this host "
                         f"(it has {', '.join(sorted(have))}); use one of those or \"auto\"")
    return want or None


def make_cluster(cfg: dict[str, Any]) -> Any:
    """A ``LocalCluster`` (``kind="local"``) or a ``dask_jobqueue.SLURMCluster`` from ``cfg``.

    SLURM workers: ``processes = cores`` so each worker process has one thread, and Numba
    and BLAS are pinned to one thread per process by the job prologue.
    """
    kind = cfg.get("kind", "slurm")
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster(n_workers=int(cfg["workers"]), threads_per_worker=1, processes=True,
                            dashboard_address=cfg["dashboard_address"])
    if kind != "slurm":
        raise ValueError(f"config kind must be 'slurm' or 'local', got {kind!r}")
    from dask_jobqueue import SLURMCluster

    cores = int(cfg["cores"])
    kw: dict[str, Any] = {
        "cores": cores,
        "processes": cores,
        "memory": cfg["memory"],
        "walltime": cfg["walltime"],
        "job_name": "gsnr-reduce",
        "python": cfg["python"] or sys.executable,
        "job_script_prologue": [
            *cfg["prologue"],
            "export NUMBA_NUM_THREADS=1",
            "export OMP_NUM_THREADS=1",
        ],
        "job_extra_directives": list(cfg["extra_directives"]),
        "scheduler_options": {"dashboard_address": cfg["dashboard_address"]},
    }
    for key in ("queue", "account", "local_directory"):
        if cfg.get(key):
            kw[key] = cfg[key]
    # Not dask-jobqueue's interface=, which binds this process's scheduler to it as well and
    # fails on a host without it: the workers get --interface, the scheduler its own choice.
    if cfg.get("interface"):
        kw["worker_extra_args"] = ["--interface", str(cfg["interface"])]
    sched_iface = scheduler_interface(cfg)
    if sched_iface:
        kw["scheduler_options"]["interface"] = sched_iface
    return SLURMCluster(**kw)


def run(stores: Sequence[str], cfg: dict[str, Any], output: str | Path, **reduce_kw: Any) -> Any:
    """Start the cluster, reduce ``stores`` on it, write ``output`` (netCDF), stop the cluster."""
    from distributed import Client

    import gsnr_stats as gs

    cluster = make_cluster(cfg)
    try:
        if cfg.get("kind", "slurm") == "slurm":
            cluster.scale(jobs=int(cfg["jobs"]))
        with Client(cluster) as client:
            client.wait_for_workers(int(cfg["wait_workers"]), timeout=float(cfg["wait_timeout"]))
            stats = gs.reduce(list(stores), scheduler=client, **reduce_kw)
    finally:
        cluster.close()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.to_netcdf(out)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the recipe; returns the exit status."""
    ap = argparse.ArgumentParser(description="Reduce gsnr-stats shards on a SLURM Dask cluster")
    ap.add_argument("stores", nargs="*", help="shard files or glob patterns")
    ap.add_argument("--config", default=None, help="JSON cluster config (see DEFAULT_CONFIG)")
    ap.add_argument("-o", "--output", default="stats.nc")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--ddof", type=int, choices=(0, 1), default=1)
    ap.add_argument("--nonfinite", choices=("raise", "omit"), default="raise")
    ap.add_argument("--skip-bad", action="store_true")
    ap.add_argument("--print-job-script", action="store_true",
                    help="print the SLURM worker job script and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError) as e:  # a missing, unreadable or invalid config file
        ap.error(f"--config: {e}")
    if args.print_job_script:
        try:
            cluster = make_cluster({**cfg, "kind": "slurm"})
        except ValueError as e:
            ap.error(f"--config: {e}")
        try:
            print(cluster.job_script())
        finally:
            cluster.close()
        return 0
    if not args.stores:
        ap.error("no shard files given")
    stats = run(args.stores, cfg, args.output, blocks=args.blocks, ddof=args.ddof,
                nonfinite=args.nonfinite, skip_bad=args.skip_bad)
    print(f"wrote {args.output}: {stats.sizes['step']} steps x {stats.sizes['split']} splits x "
          f"{stats.sizes['param']} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
