"""Shallow vs DNN: GSNR and OSGR over training (Liu et al. 2020, section 4).

Logistic regression and a linear SVM (scikit-learn SGD), a one-hidden-layer scikit-learn MLP
and, when PyTorch is installed, a two-hidden-layer PyTorch MLP train on ``load_digits``
(60 % train / 40 % held out). At dense-early checkpoints the per-sample gradients of both
splits are recorded through the adapters, reduced, and summarised: mean/median GSNR on the
training split, theoretical OSGR from held-out moments, first-order measured OSGR, measured
gap. Writes ``<model>.h5``, ``<model>_stats.nc``, ``shallow_vs_dnn.nc`` (every plotted
number) and ``shallow_vs_dnn.png`` into ``-o``, and prints the table.

    python examples/shallow_vs_dnn.py -o out/shallow_vs_dnn [--quick] [--no-torch] [--data generated]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gsnr_stats import studies


class TorchMLP:
    """A PyTorch MLP (64-64 ReLU) trained by minibatch SGD, recorded by the torch adapter."""

    def __init__(self, n_in: int, n_out: int, *, hidden: int = 64, lr: float = 0.05,
                 batch: int = 32, seed: int = 0) -> None:
        import torch
        from torch import nn

        torch.manual_seed(seed)
        torch.set_num_threads(1)  # a tiny model: threads only contend
        self.torch = torch
        self.name = "torch_mlp"
        self.lr = lr
        self.batch = batch
        self.model = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.ReLU(), nn.Linear(hidden, n_out)).double()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(seed)

    @staticmethod
    def loss_fn(out: Any, y: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(out, y, reduction="none")

    def _t(self, X: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return self.torch.as_tensor(X, dtype=self.torch.float64), self.torch.as_tensor(y)

    def _steps(self, X: Any, y: Any, idx: Any) -> None:
        self.opt.zero_grad()
        self.loss_fn(self.model(X[idx]), y[idx]).mean().backward()
        self.opt.step()

    def initialize(self, X: np.ndarray, y: np.ndarray) -> int:
        Xt, yt = self._t(X, y)
        self._steps(Xt, yt, slice(0, self.batch))  # like sklearn's first partial_fit
        return 1

    def train_epoch(self, X: np.ndarray, y: np.ndarray) -> int:
        Xt, yt = self._t(X, y)
        perm = self.torch.randperm(len(y), generator=self.gen)
        for i in range(0, len(y), self.batch):
            self._steps(Xt, yt, perm[i:i + self.batch])
        return math.ceil(len(y) / self.batch)

    def open_writer(self, path: Path) -> Any:
        from gsnr_stats.adapters import torch as gt

        return gt.open_writer(path, self.model, overwrite=True)

    def record(self, writer: Any, step: int, split: str, X: np.ndarray, y: np.ndarray, *,
               epoch: float) -> float:
        from gsnr_stats.adapters import torch as gt

        return gt.record(writer, self.model, self.loss_fn, self._t(X, y), step, split,
                         batch_size=512, lr=self.lr, epoch=epoch).mean_loss


def main(argv: Sequence[str] | None = None) -> studies.StudyResult:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="out/shallow_vs_dnn", help="output directory")
    p.add_argument("--quick", action="store_true", help="3 epochs instead of 40")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch MLP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=sorted(studies.DATASETS), default="digits",
                   help="load_digits or digits-shaped generated data (make_classification)")
    args = p.parse_args(argv)
    extra = []
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not installed: the PyTorch MLP is left out")
        else:
            extra.append(TorchMLP(64, 10, seed=args.seed))
    res = studies.shallow_vs_dnn(args.output, quick=args.quick, extra=extra, seed=args.seed,
                                 data=args.data)
    print(res.table)
    for k in ("summary", "figure"):
        print(f"wrote {res.files[k]}")
    return res


if __name__ == "__main__":
    main()
