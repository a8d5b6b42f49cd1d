"""Benchmark: ``reduce`` of sharded stores on Dask worker processes vs the in-process path.

Run: ``.venv/bin/python bench/scale.py`` (``--quick`` for a small smoke run).

One run measures, on the same shards (``--shards`` files of ``--rows`` × ``--params``
float32, uncompressed, read from the page cache after a warm-up):

* the in-process path with 1 Numba thread (the per-core baseline) and with Numba's default
  thread count;
* the Dask path on a fresh ``LocalCluster`` of 1, 2, ... single-threaded worker processes
  (``--workers``), after one warm-up reduce on that cluster (worker start and JIT-cache load
  excluded; the start time is reported separately);
* the peak RSS of each worker process (``ru_maxrss`` at the end, so it includes the
  interpreter, numpy, numba, h5py and dask themselves);
* the projection of a reduce of a large store on a cluster from the measured per-core
  throughput (``--project-*``; see ``docs/cluster.md``).

Every throughput is the best of ``--repeat``; ratios are against the in-process baseline of
the same run (the machine is shared and noisy). The moments-only benchmark of
``bench/moments.py`` runs at the end when that file exists (hook marked below).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np

import gsnr_stats as gs


def make_shards(tmp: Path, shards: int, rows: int, params: int) -> list[Path]:
    """``shards`` stores of one record ``(0, "train")`` with ``rows`` samples each."""
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((256, params), dtype=np.float32) * 0.1 + 1.0).astype(np.float32)
    files = []
    for s in range(shards):
        p = tmp / f"shard-{s}.h5"
        with gs.GradientWriter(p, [("w", (params,))], overwrite=True, run_id="bench") as w:
            for i in range(0, rows, 256):
                m = min(256, rows - i)
                w.write(0, "train", block[:m] + np.float32((i + s) % 7))
        files.append(p)
    return files


def make_tiny(tmp: Path, shards: int) -> list[Path]:
    """Small shards with narrow chunks: many tiny tasks, to time the per-task overhead."""
    rng = np.random.default_rng(1)
    files = []
    for s in range(shards):
        p = tmp / f"tiny-{s}.h5"
        with gs.GradientWriter(p, [("w", (4096,))], overwrite=True, chunks=(64, 64)) as w:
            w.write(0, "train", rng.standard_normal((64, 4096), dtype=np.float32))
        files.append(p)
    return files


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_rate(nbytes: int, repeat: int, cpu_seconds: float) -> float:
    """GB per CPU-second: bytes reduced over CPU time spent, robust to other load on the box."""
    return nbytes * repeat / cpu_seconds / 1e9


def project(per_core_gbps: float, *, nodes: int, cores: int, tb: float, fs_gbps: float,
            nic_gbps: float) -> dict[str, Any]:
    """Time to reduce ``tb`` TB on ``nodes × cores`` single-threaded workers.

    The rate is the least of the compute rate ``nodes·cores·per_core``, the per-node network
    ``nodes·nic`` and the parallel file system's aggregate bandwidth ``fs``:
    ``t = tb·1e12 / min(...)``.
    """
    compute = nodes * cores * per_core_gbps
    nic = nodes * nic_gbps
    rate = min(compute, nic, fs_gbps)
    bound = "compute" if rate == compute else "per-node network" if rate == nic else "file system"
    return {"compute_GBps": compute, "nic_GBps": nic, "fs_GBps": fs_gbps, "rate_GBps": rate,
            "seconds": tb * 1e12 / (rate * 1e9), "bound": bound}


# ----------------------------------------------------------------------------------------
# HOOK for the lead: moments-only vs full dumps (storage and time) live in bench/moments.py,
# written separately. When that file exists its ``main(argv)`` (or ``run()``) is called
# here with the command-line arguments this script does not know (plus --quick), and what
# it returns is stored under "moments" in the JSON output. Skip with --no-moments.
# ----------------------------------------------------------------------------------------
def run_moments_bench(argv: Sequence[str]) -> Any:
    path = Path(__file__).with_name("moments.py")
    if not path.exists():
        print("bench/moments.py not found: moments-only benchmark skipped")
        return None
    spec = importlib.util.spec_from_file_location("bench_moments", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    if hasattr(mod, "main"):
        return mod.main(list(argv))
    return mod.run()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=None, help="samples per shard")
    ap.add_argument("--params", type=int, default=None)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the generated shards")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--project-nodes", type=int, default=100)
    ap.add_argument("--project-cores", type=int, default=64, help="cores per node")
    ap.add_argument("--project-tb", type=float, default=10.0)
    ap.add_argument("--project-fs-GBps", type=float, default=200.0,
                    help="aggregate parallel-file-system read bandwidth")
    ap.add_argument("--project-nic-GBps", type=float, default=12.5,
                    help="per-node network bandwidth (100 Gb/s = 12.5 GB/s)")
    ap.add_argument("--no-moments", action="store_true", help="skip the bench/moments.py hook")
    args, rest = ap.parse_known_args(argv)
    rows = args.rows or (512 if args.quick else 2048)
    params = args.params or (16384 if args.quick else 65536)
    workers = [int(w) for w in args.workers.split(",") if w]
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="gsnr-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    files = make_shards(tmp, args.shards, rows, params)
    tiny = make_tiny(tmp, args.shards)
    n_tiny = args.shards * 64 + (args.shards - 1) * 64  # partial tasks + tree merges
    nbytes = args.shards * rows * params * 4
    gbs = lambda t: nbytes / t / 1e9  # noqa: E731

    from gsnr_stats.distributed import local_client, reduce_distributed

    ref = gs.reduce(files, threads=1)  # JIT compile + warm page cache
    res: dict[str, Any] = {
        "shards": args.shards, "rows_per_shard": rows, "params": params, "bytes": nbytes,
        "cpu_count": os.cpu_count(),
    }
    c0 = _cpu_s()
    res["inproc_1thread_GBps"] = gbs(best(lambda: gs.reduce(files, threads=1), args.repeat))
    res["inproc_1thread_GB_per_cpu_s"] = cpu_rate(nbytes, args.repeat, _cpu_s() - c0)
    res["inproc_default_threads"] = int(numba.get_num_threads())
    res["inproc_GBps"] = gbs(best(lambda: gs.reduce(files), args.repeat))
    res["dask"] = {}
    for n in workers:
        t0 = time.perf_counter()
        client = local_client(n)
        start = time.perf_counter() - t0
        try:
            out = gs.reduce(files, scheduler=client)  # warm-up: imports + JIT cache load
            err = float(np.nanmax(np.abs(out["var"].values - ref["var"].values)
                                  / np.abs(ref["var"].values)))
            cpu0 = sum(client.run(_cpu_s).values())
            t = best(lambda c=client: gs.reduce(files, scheduler=c), args.repeat)
            cpu = sum(client.run(_cpu_s).values()) - cpu0
            rss = sorted(client.run(_maxrss_mib).values())
            reduce_distributed(tiny, scheduler=client, columns=64)  # warm-up
            t_tiny = best(lambda c=client: reduce_distributed(tiny, scheduler=c, columns=64),
                          args.repeat)
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
        res["dask"][n] = {"GBps": gbs(t), "cluster_start_s": start, "worker_peak_rss_MiB": rss,
                          "GB_per_worker_cpu_s": cpu_rate(nbytes, args.repeat, cpu),
                          "ms_per_task": 1e3 * t_tiny / n_tiny,
                          "max_rel_err_var_vs_inproc": err}
    base = res["inproc_1thread_GBps"]
    print(f"{args.shards} shards x {rows} x {params} float32 ({nbytes / 2**30:.2f} GiB), page cache, "
          f"best of {args.repeat}, {os.cpu_count()} cores")
    print("| path | GB/s (wall) | vs in-process 1 thread | GB per CPU-second | peak RSS per worker |")
    print("|---|---:|---:|---:|---:|")
    print(f"| in-process, 1 Numba thread | {base:.2f} | 1.00x | "
          f"{res['inproc_1thread_GB_per_cpu_s']:.2f} | |")
    print(f"| in-process, {res['inproc_default_threads']} Numba threads | {res['inproc_GBps']:.2f} | "
          f"{res['inproc_GBps'] / base:.2f}x | | |")
    for n, d in res["dask"].items():
        rss = ", ".join(f"{r:.0f}" for r in d["worker_peak_rss_MiB"])
        print(f"| Dask, {n} worker process{'es' if n > 1 else ''} x 1 thread | {d['GBps']:.2f} | "
              f"{d['GBps'] / base:.2f}x | {d['GB_per_worker_cpu_s']:.2f} | {rss} MiB |")
    if 1 in res["dask"] and len(res["dask"]) > 1:
        top = max(res["dask"])
        res["dask_speedup"] = res["dask"][top]["GBps"] / res["dask"][1]["GBps"]
        print(f"Dask {top} workers / 1 worker: {res['dask_speedup']:.2f}x (ceiling {top}x on "
              f"{min(top, os.cpu_count() or 1)} free cores)")
    for n, d in res["dask"].items():
        print(f"Dask {n} worker(s): cluster start {d['cluster_start_s']:.1f} s, "
              f"{d['ms_per_task']:.1f} ms per tiny task ({n_tiny} tasks), max relative "
              f"difference of var vs in-process {d['max_rel_err_var_vs_inproc']:.1e}")
    # Per-core rate for the projection: bytes per worker CPU-second (a core fully given to a
    # worker), which other load on a shared machine does not distort the way wall time is.
    per_core = (min(d["GB_per_worker_cpu_s"] for d in res["dask"].values()) if res["dask"]
                else res["inproc_1thread_GB_per_cpu_s"])
    res["per_core_GBps"] = per_core
    pj = project(per_core, nodes=args.project_nodes, cores=args.project_cores,
                 tb=args.project_tb, fs_gbps=args.project_fs_GBps,
                 nic_gbps=args.project_nic_GBps)
    res["projection"] = {**pj, "nodes": args.project_nodes, "cores": args.project_cores,
                         "TB": args.project_tb}
    print(f"projection: {args.project_tb:g} TB on {args.project_nodes} nodes x "
          f"{args.project_cores} cores at {per_core:.2f} GB/s per worker CPU-second: compute "
          f"{pj['compute_GBps']:.0f} GB/s, network {pj['nic_GBps']:.0f} GB/s, file system "
          f"{pj['fs_GBps']:.0f} GB/s -> {pj['rate_GBps']:.0f} GB/s ({pj['bound']}-bound), "
          f"{pj['seconds'] / 60:.1f} min")
    for f in files + tiny:
        os.unlink(f)
    if not args.no_moments:
        # HOOK: see run_moments_bench; --quick is passed on, other unknown options too
        res["moments"] = run_moments_bench([*rest, *(["--quick"] if args.quick else [])])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
