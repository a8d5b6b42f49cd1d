"""Benchmark: ``gs.reduce`` over many small records vs one record of the same bytes.

Run: ``.venv/bin/python bench/records.py`` (``--records``, ``--rows``, ``--params``).

A run records a checkpoint every few steps, so stores hold hundreds of records. The per-
record cost on top of streaming the bytes (opening the record, locating its chunks) should
be small: this script writes the same gradients once as R records of ``rows`` samples and
once as one record of R·rows samples (same chunk shape), reduces both from the page cache
in one run, and reports the ratio (1.0 = no per-record overhead).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import gsnr_stats as gs


def make(path: Path, records: int, rows: int, p: int, chunks: tuple[int, int]) -> None:
    g = np.random.default_rng(0).normal(size=(rows, p)).astype(np.float32)
    with gs.GradientWriter(path, [("w", (p,))], chunks=chunks, overwrite=True) as w:
        for s in range(records):
            w.write(s if records > 1 else 0, "train", g)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--params", type=int, default=16384)
    ap.add_argument("--chunk-cols", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    chunks = (a.rows, a.chunk_cols)
    with tempfile.TemporaryDirectory(dir=".") as d:
        many, one = Path(d) / "many.h5", Path(d) / "one.h5"
        make(many, a.records, a.rows, a.params, chunks)
        one_rows = a.records * a.rows
        with gs.GradientWriter(one, [("w", (a.params,))], chunks=chunks, overwrite=True) as w:
            g = np.random.default_rng(0).normal(size=(a.rows, a.params)).astype(np.float32)
            for _ in range(a.records):
                w.write(0, "train", g)
        gs.reduce(one)  # compile, warm the page cache
        gs.reduce(many)
        t_one = best(lambda: gs.reduce(one), a.repeat)
        t_many = best(lambda: gs.reduce(many), a.repeat)
    gb = one_rows * a.params * 4 / 1e9
    n_chunks = a.records * -(-a.params // a.chunk_cols)
    print(f"{a.records} records x {a.rows} rows x {a.params} float32, chunks {chunks} "
          f"({n_chunks} chunks, {gb:.2f} GB), page cache, best of {a.repeat}")
    print("| store | s | GB/s | vs one record |")
    print("|---|---:|---:|---:|")
    print(f"| one record of {one_rows} rows | {t_one:.3f} | {gb / t_one:.2f} | 1.00x |")
    print(f"| {a.records} records of {a.rows} rows | {t_many:.3f} | {gb / t_many:.2f} | "
          f"{t_many / t_one:.2f}x |")


if __name__ == "__main__":
    main()
