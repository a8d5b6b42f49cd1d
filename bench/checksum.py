"""Benchmark: cost of verifying data checksums inside reduce (issue 10's 5 % budget).

Run: ``.venv/bin/python bench/checksum.py [--mib 1024] [--repeat 5]``.

Times, in one run on the same bytes (a store of ``--mib`` MiB float32, read from the page
cache), ``gs.reduce`` as shipped (moments kernel with the fused checksum) against the same
memory-mapped reduce with a kernel that skips the checksum (built here from the library's
own ``_chunk_update``), and reports the ratio; best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

import gsnr_stats as gs
from gsnr_stats import engine as _reduce_mod  # noqa: E402 - Partial lives in the engine
from gsnr_stats import kernels


@njit(parallel=True, nogil=True, cache=False)
def _moments_chunks_nocheck(buf, offsets, rows_c, cols_c, n_params, r_lo, r_hi, count, mean, m2,
                            omit, n_omit, bad, ubuf, pos0, p_total, sums):
    for c in prange(offsets.shape[0]):
        col0 = c * cols_c
        ncols = min(cols_c, n_params - col0)
        o = offsets[c]
        x = buf[o : o + rows_c * cols_c].reshape((rows_c, cols_c))
        kernels._chunk_update(x, r_lo, r_hi, ncols, col0, count, mean, m2, omit, n_omit, bad)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    p = 262144
    n = a.mib * (1 << 20) // (4 * p)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.h5"
        rng = np.random.default_rng(0)
        block = rng.standard_normal((256, p), dtype=np.float32)
        with gs.GradientWriter(path, [("w", (p,))]) as w:
            for i in range(0, n, 256):
                w.write(0, "train", block[: min(256, n - i)] + np.float32(i % 7))
        gs.reduce(path)  # warm the page cache and the JIT
        shipped, verify = kernels.moments_chunks, _reduce_mod.Partial.verify
        times: dict[str, list[float]] = {"with checksum": [], "without": []}
        for _ in range(a.repeat):
            for name in times:
                if name == "without":  # the checksum neither computed nor compared
                    kernels.moments_chunks = _moments_chunks_nocheck
                    _reduce_mod.Partial.verify = lambda self, n_params: None
                try:
                    t0 = time.perf_counter()
                    st = gs.reduce(path)
                    times[name].append(time.perf_counter() - t0)
                finally:
                    kernels.moments_chunks, _reduce_mod.Partial.verify = shipped, verify
                assert np.isfinite(st["mean"].values).all()
    gb = n * p * 4 / 1e9
    w_, wo = min(times["with checksum"]), min(times["without"])
    print(f"{a.mib} MiB store, best of {a.repeat}")
    print(f"| reduce | GB/s |\n|---|---:|\n| with checksum (shipped) | {gb / w_:.2f} |\n"
          f"| checksum skipped | {gb / wo:.2f} |")
    print(f"checksum overhead: {100 * (w_ / wo - 1):+.1f} %")


if __name__ == "__main__":
    main()
