"""Write one shard of a per-sample-gradient dump: one task of a SLURM job array.

Run by ``dump_array.sbatch`` (``#SBATCH --array=0-(T-1)``); the task index comes from
``--task`` (default ``SLURM_ARRAY_TASK_ID``) and the number of tasks T of the whole run from
``--tasks`` (default the environment variable ``TASKS``, which the job script sets). T is
never read from ``SLURM_ARRAY_TASK_COUNT``/``MAX``: those describe the current submission,
and a retry of one failed task (``sbatch --array=5``) is an array of one. Every task runs
the same deterministic training -- a scikit-learn SGD logistic regression on the bundled
digits data, fixed seed -- so the model at each recorded epoch is identical in every task;
task ``i`` writes the per-sample gradients and losses of its slice of the samples (rows
``i, i+T, i+2T, ...`` of each split) to ``OUT/shard-{i:04d}.h5``, with run id the name of
``OUT`` (``--run-id``). ``gsnr-stats reduce "OUT/shard-*.h5"`` (or ``reduce_slurm.py``)
merges the shards record by record, which equals one dump of all samples.

In a real run the slice is a slice of a large dataset and the model comes from the
checkpoint of the recorded step (torch: ``gsnr_stats.adapters.torch``); the sharding and
the file naming are the same.

Usage::

    python examples/slurm/dump_shard.py --out /scratch/run42 --task 0 --tasks 8 [--epochs 6 --every 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def main(argv: Sequence[str] | None = None) -> int:
    """Train, then write this task's shard; returns 0."""
    from gsnr_stats.adapters import sklearn as gk
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory of the shards")
    ap.add_argument("--task", type=int, default=_env_int("SLURM_ARRAY_TASK_ID"),
                    help="this task's index (default $SLURM_ARRAY_TASK_ID)")
    ap.add_argument("--tasks", type=int, default=_env_int("TASKS"),
                    help="number of shards of the whole run, the same in a retry (default "
                         "$TASKS)")
    ap.add_argument("--run-id", default=None,
                    help="run id shared by the shards, the same in a retry (default: the "
                         "name of --out)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--every", type=int, default=2, help="record every k epochs")
    args = ap.parse_args(argv)
    task, tasks = args.task, args.tasks
    if task is None or tasks is None:
        ap.error("no task index or count: pass --task I --tasks T (or set "
                 "SLURM_ARRAY_TASK_ID and TASKS, as dump_array.sbatch does)")
    if tasks < 1 or not 0 <= task < tasks:
        ap.error(f"task {task} outside 0..{tasks - 1}: --tasks (TASKS) is the number of shards "
                 "of the whole run, the size of the first submission's --array, also in a retry")
    run_id = args.run_id if args.run_id is not None else Path(args.out).resolve().name

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)
    est = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05, alpha=1e-4,
                        random_state=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"shard-{task:04d}.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.partial_fit(Xtr[:64], ytr[:64], classes=np.unique(y))
        with gk.open_writer(path, est, overwrite=True, run_id=str(run_id),
                            attrs={"task": task, "tasks": tasks}) as w:
            for epoch in range(1, args.epochs + 1):
                est.partial_fit(Xtr, ytr)
                if epoch % args.every:
                    continue
                for split, Xs, ys in (("train", Xtr, ytr), ("test", Xte, yte)):
                    Xi, yi = Xs[task::tasks], ys[task::tasks]
                    w.write(epoch, split, gk.per_sample_gradients(est, Xi, yi),
                            loss=gk.per_sample_loss(est, Xi, yi), label=yi, lr=0.05, epoch=epoch)
                    w.end_record(epoch, split)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
