"""Benchmark: ``gs.reduce`` vs a plain sequential h5py read, numpy float64 and xarray+dask.

Run: ``.venv/bin/python bench/reduce.py`` (``--quick`` for a small smoke run).

All ratios come from one run on one machine (it is shared and noisy): each contender is
timed ``--repeat`` times and the best time is kept. The store is generated uncompressed
(and, separately, lzf-compressed), read from the page cache after a warm-up read. Peak
RSS is measured in a fresh subprocess per size (``ru_maxrss`` of the child), so the
numbers do not include this script's own arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numba
import numpy as np

import gsnr_stats as gs


def make_store(path: Path, n: int, p: int, compression: str | None = None) -> None:
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((256, p), dtype=np.float32) * 0.1 + 1.0).astype(np.float32)
    with gs.GradientWriter(path, [("w", (p,))], overwrite=True, compression=compression) as w:
        for i in range(0, n, 256):
            m = min(256, n - i)
            w.write(0, "train", block[:m] + np.float32(i % 7))


def many_writes(tmp: Path, n: int, p: int, repeat: int) -> tuple[float, float]:
    """Best reduce times of the same ``(n, p)`` rows written in n one-row writes and in one.

    Reduce used to cost a kernel call per ``write`` segment (20,000 one-row writes of 1.3 MB
    took 22-37 s against 0.03 s); it now coalesces consecutive segments per chunk row.
    """
    g = (np.random.default_rng(1).standard_normal((n, p)) * 0.1 + 1.0).astype(np.float32)
    one, many = tmp / "one_write.h5", tmp / "many_writes.h5"
    with gs.GradientWriter(one, [("w", (p,))], overwrite=True) as w:
        w.write(0, "train", g)
    with gs.GradientWriter(many, [("w", (p,))], overwrite=True) as w:
        for i in range(n):
            w.write(0, "train", g[i : i + 1])
    gs.reduce(one), gs.reduce(many)  # compile + page cache
    t1, tm = best(lambda: gs.reduce(one), repeat), best(lambda: gs.reduce(many), repeat)
    os.unlink(one), os.unlink(many)
    return t1, tm


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def h5py_read(path: Path) -> None:
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        ds = f["grads"]
        rc = ds.chunks[0]
        buf = np.empty((rc, ds.shape[1]), dtype=ds.dtype)
        for r in range(0, ds.shape[0], rc):
            m = min(rc, ds.shape[0] - r)
            ds.read_direct(buf, np.s_[r : r + m, :], np.s_[0:m, :])


def numpy_meanvar(path: Path, rows: int) -> None:
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        x = f["grads"][:rows].astype(np.float64)
    x.mean(axis=0)
    x.var(axis=0, ddof=1)


def dask_var(path: Path, rows: int) -> None:
    import dask
    import dask.array as da
    import xarray as xr

    with h5py.File(path, "r", swmr=True, locking=False) as f:
        ds = f["grads"]
        arr = da.from_array(ds, chunks=(ds.chunks[0] * 4, ds.chunks[1] * 8))[:rows]
        xa = xr.DataArray(arr, dims=("sample", "param")).astype(np.float64)
        with dask.config.set(scheduler="threads"):
            xa.mean("sample").compute()
            xa.var("sample", ddof=1).compute()


def rss_of_reduce(path: Path) -> float:
    code = (
        "import resource, sys, gsnr_stats as gs; gs.reduce(sys.argv[1]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the generated stores")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    n, p = (256, 16384) if args.quick else (2048, 262144)
    sub = 64 if args.quick else 256  # rows for the slow numpy / dask contenders
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="gsnr-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    small, large, comp = tmp / "n1.h5", tmp / "n4.h5", tmp / "lzf.h5"
    make_store(small, n, p)
    make_store(large, 4 * n, p)
    make_store(comp, n, p, compression="lzf")
    nbytes = n * p * 4
    gs.reduce(small)  # compile + warm page cache
    h5py_read(small)
    h5py_read(comp)
    t_h5 = best(lambda: h5py_read(small), args.repeat)
    t_red = best(lambda: gs.reduce(small), args.repeat)
    t_red1 = best(lambda: gs.reduce(small, threads=1), args.repeat)
    t_np = best(lambda: numpy_meanvar(small, sub), 1) * n / sub
    t_dask = best(lambda: dask_var(small, sub), 1) * n / sub
    t_h5c = best(lambda: h5py_read(comp), args.repeat)
    t_redc = best(lambda: gs.reduce(comp), args.repeat)
    rss1, rss4 = rss_of_reduce(small), rss_of_reduce(large)
    n_w, p_w = (2000, 16) if args.quick else (20000, 16)
    t_one, t_many = many_writes(tmp, n_w, p_w, args.repeat)
    gbs = lambda t: nbytes / t / 1e9  # noqa: E731
    res = {
        "n": n, "p": p, "bytes": nbytes, "threads": numba.get_num_threads(),
        "h5py_read_GBps": gbs(t_h5), "reduce_GBps": gbs(t_red), "reduce_1thread_GBps": gbs(t_red1),
        "numpy_GBps": gbs(t_np), "dask_GBps": gbs(t_dask),
        "lzf_h5py_read_GBps": gbs(t_h5c), "lzf_reduce_GBps": gbs(t_redc),
        "rss_MiB_N": rss1, "rss_MiB_4N": rss4,
        "many_writes": n_w, "many_writes_s": t_many, "one_write_s": t_one,
    }
    print(f"store {n} x {p} float32 ({nbytes / 2**30:.2f} GiB), page cache, best of {args.repeat}")
    print("| path | GB/s | reduce / path |")
    print("|---|---:|---:|")
    for name, key in [("gs.reduce", "reduce_GBps"), ("gs.reduce, 1 thread", "reduce_1thread_GBps"),
                      ("plain h5py sequential read", "h5py_read_GBps"),
                      ("numpy float64 mean+var", "numpy_GBps"),
                      ("xarray+dask mean+var", "dask_GBps")]:
        print(f"| {name} | {res[key]:.2f} | {res['reduce_GBps'] / res[key]:.2f}x |")
    print(f"| lzf store: gs.reduce | {res['lzf_reduce_GBps']:.2f} | "
          f"{res['lzf_reduce_GBps'] / res['lzf_h5py_read_GBps']:.2f}x of lzf h5py read |")
    print(f"| lzf store: h5py read | {res['lzf_h5py_read_GBps']:.2f} | |")
    print(f"peak RSS of reduce: N={n}: {rss1:.0f} MiB, N={4 * n}: {rss4:.0f} MiB")
    print(f"| {n_w} one-row writes ({n_w * p_w * 4 / 1e6:.2f} MB) vs one write | "
          f"{t_many * 1e3:.1f} ms vs {t_one * 1e3:.1f} ms | {t_many / t_one:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    for f in (small, large, comp):
        os.unlink(f)
    _ = resource


if __name__ == "__main__":
    main()
