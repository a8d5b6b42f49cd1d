"""Issue 13: osgr_ci's SE leaves out the finite pools' sampling error; osgr_agreement does not.

load_digits, a multinomial SGD logistic regression on 200 samples; at each of 6 checkpoints
the other 1597 samples are split at random into two disjoint pools A, B (re-drawn each step,
so the pool noise of the points is nearly independent). First-order OSGR over 60 draws
against the theory on A: with osgr_ci's SE (pool A only) many points fall outside 3 SE
(about 40 % in a first run); with the pool-aware SE (docs/theory.md) about none, and the
z-scores look like N(0, 1).
"""

from __future__ import annotations

import numpy as np
import pytest
from gsnr_stats.adapters import sklearn as gk
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier

import gsnr_stats as gs
from gsnr_stats.inmemory import MemoryWriter

NS = [50, 300, 700]
S = 6


@pytest.fixture(scope="module")
def agreement():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(X))
    tr, rest = perm[:200], perm[200:]
    est = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.01, alpha=1e-4,
                        random_state=0)
    mw, grads = None, {}
    for s in range(S):
        est.partial_fit(X[tr], y[tr], classes=np.arange(10))
        p = rng.permutation(rest)
        for sp, idx in (("pool_a", p[:len(p) // 2]), ("pool_b", p[len(p) // 2:])):
            g = gk.per_sample_gradients(est, X[idx], y[idx])
            if mw is None:
                mw = MemoryWriter([("w", (g.shape[1],))], blocks=16)
            mw.write(s, sp, g)
            mw.end_record(s, sp)
            grads[(s, sp)] = g
    stats = mw.dataset()
    fo = gs.osgr_first_order(grads, n=NS, splits=("pool_a", "pool_b"), n_subsets=60, seed=1,
                             stats=stats)
    return fo, stats, gs.osgr_agreement(fo, stats)


def test_osgr_ci_alone_misses_the_pool_error(agreement):
    fo, stats, ag = agreement
    # independent route to the pool SE: jackknife of pool_minus_theory by hand
    jk = gs.jackknife(stats, lambda s: gs.osgr_pools(s, NS, splits=("pool_a", "pool_b")),
                      variables=["pool_minus_theory"])
    np.testing.assert_allclose(ag["se_pools"].values, jk["pool_minus_theory_se"].values,
                               rtol=1e-12)
    np.testing.assert_allclose(ag["se_total"].values,
                               np.hypot(fo["osgr_se"].values, jk["pool_minus_theory_se"].values),
                               rtol=1e-12)
    diff = (fo["osgr_first_order"] - fo["osgr_theory"]).values
    np.testing.assert_allclose(ag["z"].values * ag["se_total"].values, diff, rtol=1e-10)
    ci = np.hypot(fo["osgr_se"].values, ag["se_theory_only"].values)
    out_ci = float(np.mean(np.abs(diff) > 3 * ci))
    out_pool = float(np.mean(np.abs(diff) > 3 * ag["se_total"].values))
    assert out_ci >= 0.2 and out_pool <= 0.05, (out_ci, out_pool)
    assert "pool-aware" in ag.attrs["error_shown"]


def test_pool_aware_z_is_roughly_standard_normal(agreement):
    z = agreement[2]["z"].values.ravel()
    assert np.isfinite(z).all() and z.size == S * len(NS)
    assert abs(z.mean()) < 0.8 and 0.5 < z.std() < 1.6, (z.mean(), z.std())


def test_scatter_shows_the_pool_aware_error(agreement):
    from gsnr_stats import plot

    fo, stats, ag = agreement
    fig = plot.osgr_scatter(fo, stats=stats, color_by=None)
    (ax,) = fig.axes
    assert "pool-aware" in ax.get_ylabel()
    (cont,) = ax.containers
    seg = cont.lines[2][0].get_segments()
    half = np.array([abs(s[1, 1] - s[0, 1]) / 2 for s in seg])
    np.testing.assert_allclose(np.sort(half), np.sort(ag["se_total"].values.ravel()),
                               rtol=1e-9)
    # without stats the label says loudly that the pools are left out
    assert "no pool error" in plot.osgr_scatter(fo, color_by=None).axes[0].get_ylabel()
