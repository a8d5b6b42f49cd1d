"""End-to-end demo on scikit-learn's bundled digits data (no download).

Trains a logistic regression (shallow) and an MLP (deep) by SGD on ``load_digits``,
records per-sample gradients of the train and test splits every few epochs through the
scikit-learn adapter, reduces them, computes the theoretical OSGR and writes netCDF files
and PNG figures. Every number comes from these real training runs.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def run_demo(outdir: Path, *, quick: bool = False) -> dict[str, Path]:
    """Run the demo and return the written files by name."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    from gsnr_stats.adapters import sklearn as gk

    from . import plot, theory
    from .reduce import reduce

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)
    classes = np.unique(y)
    epochs = 6 if quick else 30
    every = 3 if quick else 5
    models = {
        "logreg": SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05,
                                alpha=1e-4, random_state=0),
        "mlp": MLPClassifier(hidden_layer_sizes=(64,), solver="sgd", learning_rate_init=0.05,
                             batch_size=64, momentum=0.0, alpha=1e-4, random_state=0),
    }
    written: dict[str, Path] = {}
    for name, est in models.items():
        store = outdir / f"{name}.h5"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.partial_fit(Xtr[:64], ytr[:64], classes=classes)
            with gk.open_writer(store, est, overwrite=True) as w:
                for epoch in range(1, epochs + 1):
                    est.partial_fit(Xtr, ytr)
                    if epoch % every == 0 or epoch == 1:
                        for split, Xs, ys in (("train", Xtr, ytr), ("test", Xte, yte)):
                            g = gk.per_sample_gradients(est, Xs, ys)
                            loss = gk.per_sample_loss(est, Xs, ys)
                            w.write(epoch, split, g, loss=loss, label=ys, lr=0.05, epoch=epoch)
                            w.end_record(epoch, split)
        stats = reduce(store)
        nc = outdir / f"{name}_stats.nc"
        stats.to_netcdf(nc)
        written[f"{name}_stats"] = nc
        r = theory.osgr(stats, n=[64, len(Xtr)], split="test")
        r.to_netcdf(outdir / f"{name}_osgr.nc")
        figs = plot.save_all(stats, outdir / name, n=[64, len(Xtr)])
        for f in figs:
            written[f"{name}/{f.name}"] = f
        med = stats["gsnr"].sel(split="train").median("param").values
        print(f"{name}: median train GSNR per recorded epoch {np.round(med, 4).tolist()}")
        print(f"{name}: theoretical OSGR R(n={len(Xtr)}) from test moments "
              f"{np.round(r['osgr'].sel(n=len(Xtr)).values.ravel(), 3).tolist()}")
        lm = stats["loss_mean"]
        gap = (lm.sel(split="test") - lm.sel(split="train")).values
        print(f"{name}: measured gap (test - train loss) {np.round(gap, 4).tolist()}")
    for v in written.values():
        print(f"wrote {v}")
    return written
