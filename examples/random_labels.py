"""Random labels: GSNR and generalization gap with true vs shuffled labels.

The scikit-learn MLP of the shallow-vs-DNN study trains on ``load_digits`` with its true
labels, and again with the labels of both splits shuffled. Over training: mean GSNR on the
training split, measured gap (test - train loss) and the accumulated theoretical gap
(``theory.accumulated_gap``, V from the held-out split). Writes ``rl_<labels>.h5``,
``rl_<labels>_stats.nc``, ``random_labels.nc`` (every plotted number) and
``random_labels.png``, and prints the table.

    python examples/random_labels.py -o out/random_labels [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gsnr_stats import studies


def main(argv: Sequence[str] | None = None) -> studies.StudyResult:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="out/random_labels", help="output directory")
    p.add_argument("--quick", action="store_true", help="3 epochs instead of 60")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    res = studies.random_labels(args.output, quick=args.quick, seed=args.seed)
    print(res.table)
    for k in ("summary", "figure"):
        print(f"wrote {res.files[k]}")
    return res


if __name__ == "__main__":
    main()
