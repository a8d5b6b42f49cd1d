"""Benchmark: ``gs.reduce`` vs a plain sequential h5py read, numpy float64 and xarray+dask.

Run: ``.venv/bin/python bench/reduce.py`` (``--quick`` for a small smoke run,
``--targets-only`` for the 1 GiB / 4 GiB rows against a plain h5py read, both thread counts,
``--factored-only`` for just the factored-record row: one record of the MLP
784-512-256-10 stored factored vs the same record stored materialised, issue 15).

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


MLP = ((784, 512), (512, 256), (256, 10))  # (in, out) of the Linears of an MNIST MLP


def mlp_factors(rng: np.random.Generator, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Factors shaped like a ReLU MLP's: inputs mostly zero (MNIST borders), hidden
    activations and their output gradients zero where the unit is off, dense logits' δ."""
    out = {}
    for k, (i, o) in enumerate(MLP):
        a = rng.random((n, i), dtype=np.float32)
        a[rng.random((n, i)) < (0.8 if k == 0 else 0.5)] = 0
        d = rng.standard_normal((n, o), dtype=np.float32) * np.float32(1e-2)
        if k < len(MLP) - 1:
            d[rng.random((n, o)) < 0.5] = 0  # dead ReLU units pass no gradient back
        out[f"fc{k + 1}.weight"] = (a, d)
    return out


def factored_vs_materialised(tmp: Path, n: int, repeat: int) -> dict[str, float]:
    """Best reduce times of one record of the MLP 784-512-256-10 stored factored (float32
    factors, all weights and biases factored) and stored materialised (v3, float32)."""
    params, specs = [], []
    for k, (i, o) in enumerate(MLP):
        params += [(f"fc{k + 1}.weight", (o, i)), (f"fc{k + 1}.bias", (o,))]
        specs.append(gs.FactorSpec(f"fc{k + 1}.weight", f"fc{k + 1}.bias"))
    fac = mlp_factors(np.random.default_rng(2), n)
    fpath, mpath = tmp / "factored.h5", tmp / "materialised.h5"
    with gs.GradientWriter(fpath, params, factors=specs, overwrite=True) as w:
        for r in range(0, n, 256):
            w.write(0, "train", factors={k: (a[r:r + 256], d[r:r + 256])
                                         for k, (a, d) in fac.items()})
    with gs.open_store(fpath) as s:
        infos, plain, P = s.factors, s.plain_index, s.layout.n_params
    with gs.GradientWriter(mpath, params, overwrite=True) as w:
        for r in range(0, n, 256):
            part = {k: (a[r:r + 256], d[r:r + 256]) for k, (a, d) in fac.items()}
            w.write(0, "train", gs.store.materialize(infos, plain, P, None, part, np.float32))
    df, dm = gs.reduce(fpath), gs.reduce(mpath)  # compile + page cache
    t_f = best(lambda: gs.reduce(fpath), repeat)
    t_m = best(lambda: gs.reduce(mpath), repeat)
    # one thread each too: on a shared machine a second thread is often not there to use
    t_f1 = best(lambda: gs.reduce(fpath, threads=1), repeat)
    t_m1 = best(lambda: gs.reduce(mpath, threads=1), repeat)
    scale = np.abs(dm["mean"].values).max()
    with np.errstate(invalid="ignore", divide="ignore"):
        dvar = np.nanmax(np.abs(df["var"].values / dm["var"].values - 1))
    res = {"factored_n": n, "factored_P": P, "factored_bytes": os.path.getsize(fpath),
           "materialised_bytes": os.path.getsize(mpath), "factored_reduce_s": t_f,
           "materialised_reduce_s": t_m, "factored_reduce_1thread_s": t_f1,
           "materialised_reduce_1thread_s": t_m1,
           "factored_max_dmean_rel": float(np.nanmax(np.abs(df["mean"].values
                                                            - dm["mean"].values)) / scale),
           "factored_max_dvar_rel": float(dvar)}
    os.unlink(fpath), os.unlink(mpath)
    return res


def print_factored(r: dict[str, float], repeat: int) -> None:
    print(f"MLP 784-512-256-10 (P = {r['factored_P']}), one record of {r['factored_n']} "
          f"samples, page cache, best of {repeat}: factored {r['factored_bytes'] / 1e6:.1f} MB, "
          f"materialised {r['materialised_bytes'] / 1e9:.2f} GB")
    print(f"| factored record: gs.reduce | {r['factored_reduce_s'] * 1e3:.0f} ms | "
          f"{r['materialised_reduce_s'] / r['factored_reduce_s']:.2f}x of the materialised "
          f"store's {r['materialised_reduce_s'] * 1e3:.0f} ms |")
    print(f"| factored record: gs.reduce, 1 thread | {r['factored_reduce_1thread_s'] * 1e3:.0f} ms | "
          f"{r['materialised_reduce_1thread_s'] / r['factored_reduce_1thread_s']:.2f}x of the "
          f"materialised store's {r['materialised_reduce_1thread_s'] * 1e3:.0f} ms |")
    print(f"  same numbers: max |Δmean| / max|mean| {r['factored_max_dmean_rel']:.1e}, max "
          f"|Δvar| / var {r['factored_max_dvar_rel']:.1e} (float32 rounding of the "
          "materialised products)")


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


def target_rows(tmp: Path, repeat: int, quick: bool) -> list[dict]:
    """Issue 14's target rows: reduce vs a plain h5py read at 1 GiB and 4 GiB, 2 and 1 threads.

    One record of ``(rows, 262144)`` float32 per size; the three contenders are timed in
    interleaved rounds (h5py read, reduce on every thread, reduce on one thread) so a
    slow spell of the shared machine hits all of them, and each keeps its best round.
    """
    p = 16384 if quick else 262144
    out = []
    for rows in ((64, 256) if quick else (1024, 4096)):
        path = tmp / f"target_{rows}.h5"
        make_store(path, rows, p)
        h5py_read(path), gs.reduce(path), gs.reduce(path, threads=1)  # compile + page cache
        t = {"h5py": [], "reduce": [], "reduce_1": []}
        for _ in range(repeat):
            for key, fn in (("h5py", lambda p_=path: h5py_read(p_)),
                            ("reduce", lambda p_=path: gs.reduce(p_)),
                            ("reduce_1", lambda p_=path: gs.reduce(p_, threads=1))):
                t0 = time.perf_counter()
                fn()
                t[key].append(time.perf_counter() - t0)
        nbytes = rows * p * 4
        out.append({"rows": rows, "p": p, "bytes": nbytes,
                    **{f"{k}_GBps": nbytes / min(v) / 1e9 for k, v in t.items()}})
        os.unlink(path)
    return out


def print_targets(rows: list[dict], repeat: int) -> None:
    print(f"reduce vs plain h5py read of the same file (page cache, best of {repeat} "
          "interleaved rounds; target >= 1.0x)")
    print("| store | h5py read GB/s | reduce GB/s (ratio) | reduce 1 thread GB/s (ratio) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        h = r["h5py_GBps"]
        print(f"| {r['rows']} x {r['p']} float32 ({r['bytes'] / 2**30:.2f} GiB) | {h:.2f} | "
              f"{r['reduce_GBps']:.2f} ({r['reduce_GBps'] / h:.2f}x) | "
              f"{r['reduce_1_GBps']:.2f} ({r['reduce_1_GBps'] / h:.2f}x) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the generated stores")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--factored-only", action="store_true",
                    help="only the factored-record row (issue 15)")
    ap.add_argument("--targets-only", action="store_true",
                    help="only the 1 GiB / 4 GiB reduce-vs-h5py rows (issue 14)")
    args = ap.parse_args()
    n, p = (256, 16384) if args.quick else (2048, 262144)
    sub = 64 if args.quick else 256  # rows for the slow numpy / dask contenders
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="gsnr-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.targets_only:
        print_targets(target_rows(tmp, args.repeat, args.quick), args.repeat)
        return
    fact = factored_vs_materialised(tmp, 256 if args.quick else 2048, args.repeat)
    if args.factored_only:
        print_factored(fact, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps(fact, indent=1))
        return
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
        "many_writes": n_w, "many_writes_s": t_many, "one_write_s": t_one, **fact,
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
    print_factored(fact, args.repeat)
    targets = target_rows(tmp, args.repeat, args.quick)
    print_targets(targets, args.repeat)
    res["targets"] = targets
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    for f in (small, large, comp):
        os.unlink(f)
    _ = resource


if __name__ == "__main__":
    main()
