"""Benchmark: first-order OSGR and JL projection on a factored vs the materialised store.

Run: ``.venv/bin/python bench/factored_estimators.py`` (``--dims``, ``--rows``, ``--subsets``,
``--n``, ``--k``, ``--repeat``). First order: ``factored="auto"``, ``"sums"`` (subset sums
``Δ_Dᵀ A_D``) and ``"gram"`` (sample Gram matrices) against the materialised store.

One MLP record pair (train, test) written twice in the same run: factored (format 4, A/Δ
per Linear, biases tied) and materialised (format 3, the float32 products). Both are read
from the page cache; the script reports the seconds of each path, their ratio, and the
largest difference of the results (equal up to the float32 rounding of the products).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import gsnr_stats as gs
from gsnr_stats.store import materialize


def make(d: Path, dims: list[int], rows: int) -> tuple[Path, Path, int]:
    params, specs = [], []
    for i in range(len(dims) - 1):
        params += [(f"fc{i}.weight", (dims[i + 1], dims[i])), (f"fc{i}.bias", (dims[i + 1],))]
        specs.append(gs.FactorSpec(f"fc{i}.weight", f"fc{i}.bias"))
    pf, pm = d / "factored.h5", d / "materialised.h5"
    rng = np.random.default_rng(0)
    with gs.GradientWriter(pf, params, factors=specs) as wf:
        for split in ("train", "test"):
            fac = {f"fc{i}.weight": (rng.normal(size=(rows, dims[i])).astype(np.float32),
                                     rng.normal(size=(rows, dims[i + 1])).astype(np.float32))
                   for i in range(len(dims) - 1)}
            wf.write(0, split, factors=fac, loss=np.zeros(rows))
    with gs.open_store(pf) as st:
        facs, pidx, P = st.factors, st.plain_index, st.layout.n_params
        with gs.GradientWriter(pm, params) as wm:
            for split in ("train", "test"):
                for lo in range(0, rows, 256):
                    hi = min(rows, lo + 256)
                    wm.write(0, split, materialize(facs, pidx, P, None,
                                                   st.read_factors(0, split, lo, hi)),
                             loss=np.zeros(hi - lo))
    return pf, pm, P


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[784, 512, 256, 10])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--subsets", type=int, default=16)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as td:
        pf, pm, P = make(Path(td), a.dims, a.rows)
        print(f"MLP {'-'.join(map(str, a.dims))}: P={P}, {a.rows} rows per split; "
              f"factored {pf.stat().st_size / 1e6:.1f} MB, materialised "
              f"{pm.stat().st_size / 1e6:.1f} MB")

        def fo(p: Path, how: str = "auto"):
            return gs.osgr_first_order(p, n=a.n, n_subsets=a.subsets, seed=0, factored=how)

        tm, rm = best(lambda: fo(pm), a.repeat)
        for how in ("auto", "sums", "gram"):
            tf, rf = best(lambda how=how: fo(pf, how), a.repeat)
            d = float(np.max(np.abs(rf["osgr_first_order"].values
                                    - rm["osgr_first_order"].values)))
            print(f"osgr_first_order (K={a.subsets}, n={a.n}): materialised {tm:.3f} s, "
                  f"factored={how!r} {tf:.3f} s, materialised / factored {tm / tf:.2f}x, "
                  f"|dR| {d:.2e}")
        k = a.k
        tm, zm = best(lambda: gs.project_record(pm, 0, "test", k), a.repeat)
        tf, zf = best(lambda: gs.project_record(pf, 0, "test", k), a.repeat)
        rel = float(np.max(np.abs(zf - zm)) / np.max(np.abs(zm)))
        print(f"project_record dense k={k}: materialised {tm:.3f} s, factored {tf:.3f} s, "
              f"ratio {tm / tf:.2f}x, max rel diff {rel:.2e}")
        k1 = int(np.sqrt(k))
        kk = (k1, k // k1)
        tk, _ = best(lambda: gs.project_record(pf, 0, "test", kk[0] * kk[1], kron=kk), a.repeat)
        print(f"project_record kron={kk} on the factored store: {tk:.3f} s, dense materialised "
              f"/ kron factored {tm / tk:.1f}x")


if __name__ == "__main__":
    main()
