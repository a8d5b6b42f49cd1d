"""Benchmark: ``gs.reduce`` of one source tree against another, in one run (A/B).

Run: ``.venv/bin/python bench/ab_reduce.py --before /tmp/before`` where ``/tmp/before`` is
a checkout of an older commit (``git worktree add /tmp/before <commit>``). The same store
(float32, uncompressed, page cache) is reduced by both trees in alternating fresh
subprocesses (``PYTHONPATH`` picks the tree), each reporting its best of ``--repeat``
reduces; the machine is shared and noisy, so rounds alternate and the best round of each
tree is compared. Prints ``after / before`` throughput (≥ 1 means no slowdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import gsnr_stats as gs

CHILD = r"""
import json, sys, time
import gsnr_stats as gs
path, repeat = sys.argv[1], int(sys.argv[2])
gs.reduce(path)  # compile + warm
best = min(
    (lambda t0: (gs.reduce(path), time.perf_counter() - t0)[1])(time.perf_counter())
    for _ in range(repeat)
)
print(json.dumps({"file": gs.__file__, "best_s": best}))
"""


def make_store(path: Path, n: int, p: int) -> None:
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((256, p), dtype=np.float32) * 0.1 + 1.0).astype(np.float32)
    with gs.GradientWriter(path, [("w", (p,))], overwrite=True) as w:
        for i in range(0, n, 256):
            w.write(0, "train", block[: min(256, n - i)] + np.float32(i % 7))


def run(tree: Path, path: Path, repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(repeat)], env=env,
                         check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["file"].startswith(str(tree)):
        raise SystemExit(f"{tree}: the child imported {res['file']} instead")
    return float(res["best_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", required=True, help="source tree of the baseline commit")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--params", type=int, default=262144)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gsnr-ab-") as d:
        path = Path(d) / "ab.h5"
        make_store(path, args.rows, args.params)
        nbytes = args.rows * args.params * 4
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name in ("before", "after"):
                times[name].append(run(Path(getattr(args, name)), path, args.repeat))
    b, a = min(times["before"]), min(times["after"])
    print(f"store {args.rows} x {args.params} float32 ({nbytes / 2**30:.2f} GiB), "
          f"{args.rounds} alternating rounds, best of {args.repeat} each")
    print(f"before: {nbytes / b / 1e9:.2f} GB/s   after: {nbytes / a / 1e9:.2f} GB/s   "
          f"after/before: {b / a:.3f}")


if __name__ == "__main__":
    main()
