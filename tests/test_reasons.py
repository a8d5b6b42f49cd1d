"""Negative and NaN outputs carry their reason (issue 12, scikit-learn bullet).

Observed: the theoretical OSGR of fitted models on breast_cancer came out as -1.25, -0.61,
-1.63 "with nothing to read it by". The train split of a fitted model has per-sample
gradients that sum to ~0, so the debiased signal sum(m^2 - s^2/N) is below zero. Each test
checks the value by an independent route (numpy closed-form gradients of the logistic
loss, float64 two-pass moments, or hand-built moments) and that the reason is attached.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import U32, moments_shift_bound
from gsnr_stats.adapters import sklearn as gk
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from test_theory import _moments, make_stats, moments_dataset

import gsnr_stats as gs
from gsnr_stats import _reasons
from gsnr_stats import theory as th
from gsnr_stats.errors import SignalBelowNoiseWarning

NS = [10, 100, 400]


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory):
    """LogisticRegression fitted on 400 breast_cancer rows; train and held-out records."""
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    perm = np.random.default_rng(0).permutation(len(y))
    X, y = X[perm], y[perm]
    data = {"train": (X[:400], y[:400]), "test": (X[400:], y[400:])}
    est = LogisticRegression(max_iter=1000).fit(*data["train"])
    path = tmp_path_factory.mktemp("bc") / "bc.h5"
    with gk.open_writer(path, est) as w:
        for split, (Xs, ys) in data.items():
            gk.record(w, est, Xs, ys, step=0, split=split)  # no lr: sklearn's default path
    # independent per-sample gradients of the log loss: (p_i - y_i) [x_i, 1]
    grads = {}
    for split, (Xs, ys) in data.items():
        p = est.predict_proba(Xs)[:, 1]
        grads[split] = (p - ys)[:, None] * np.c_[Xs, np.ones(len(ys))]
    return gs.reduce(path), grads


def _osgr_and_bound(G: np.ndarray, n: int) -> tuple[float, float]:
    """R(n) from float64 gradients, and how far float32 storage can move it.

    Each stored entry is fl32(g): |error| <= u |g_ij| <= u colmax_j = b_j. The moments move
    by <= b (mean) and moments_shift_bound (variance); G_j = m_j^2 - s_j^2/N and V_j/n by
    what that implies; R = A/(A + B) is monotone in A and in B separately, so its extremes
    over the box [A +- dA] x [B +- dB] are at the corners.
    """
    N = G.shape[0]
    m, v = G.mean(0), G.var(0, ddof=1)
    b = U32 * np.abs(G).max(0)
    dm, dv = moments_shift_bound(b, v, N)
    A, B = float(np.sum(m * m - v / N)), float(np.sum(v) / n)
    dA = float(np.sum(2 * np.abs(m) * dm + dm * dm + dv / N))
    dB = float(np.sum(dv) / n)
    R = A / (A + B)
    corners = [(A + sa * dA) / (A + sa * dA + B + sb * dB) for sa in (-1, 1) for sb in (-1, 1)]
    return R, max(abs(c - R) for c in corners)


def test_fitted_training_split_gives_negative_osgr_with_its_reason(breast_cancer):
    stats, grads = breast_cancer
    G = grads["train"]
    # the cause, independently: on the fitted split the signal is below the noise
    m, v = G.mean(0), G.var(0, ddof=1)
    assert np.sum(m * m) < np.sum(v) / G.shape[0]
    with pytest.warns(SignalBelowNoiseWarning,
                      match=r"split 'train' at step 0.*the training split is fitted.*use a "
                            r"held-out split"):
        R = gs.osgr(stats, NS, split="train")
    for nv in NS:
        want, bound = _osgr_and_bound(G, nv)
        got = float(R["osgr"].sel(step=0, split="train", n=nv))
        assert want < 0 and abs(got - want) <= bound, (nv, got, want, bound)
    assert _reasons.BELOW_NOISE_TRAIN in R["osgr"].attrs["reason"]
    assert "[3 of 3 values; step 0, split 'train']" in R["osgr"].attrs["reason"]
    assert R.attrs["note"].startswith("osgr: debiased signal below noise")
    assert _reasons.BELOW_NOISE_TRAIN in R["signal"].attrs["reason"]


def test_held_out_split_is_positive_without_warning(breast_cancer):
    stats, grads = breast_cancer
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        R = gs.osgr(stats, NS, split="test")
    assert not [w for w in rec if issubclass(w.category, SignalBelowNoiseWarning)]
    for nv in NS:
        want, bound = _osgr_and_bound(grads["test"], nv)
        got = float(R["osgr"].sel(step=0, split="test", n=nv))
        assert want > 0 and abs(got - want) <= bound, (nv, got, want, bound)
    assert "reason" not in R["osgr"].attrs and "note" not in R.attrs


def test_noise_scale_negative_on_the_fitted_split(breast_cancer):
    stats, grads = breast_cancer
    with pytest.warns(SignalBelowNoiseWarning, match="noise_scale.*split 'train'"):
        B = gs.noise_scale(stats)
    G = grads["train"]
    m, v = G.mean(0), G.var(0, ddof=1)
    want = np.sum(v) / np.sum(m * m - v / G.shape[0])
    got = float(B["b_simple"].sel(step=0, split="train"))
    assert want < 0 and got == pytest.approx(want, rel=1e-4)  # float32 storage, see above
    assert float(B["b_simple"].sel(step=0, split="test")) > 0
    assert _reasons.BELOW_NOISE_TRAIN in B["b_simple"].attrs["reason"]
    assert "split 'train'" in B["b_simple"].attrs["reason"]


def test_osgr_nan_and_empty_reasons():
    # pure noise, N = 30: sum G < 0 in some records; for n > N that can make sum G + sum V/n
    # <= 0 (NaN), which the reason distinguishes from a record without data
    rng = np.random.default_rng(0)
    raw = {(s, "test"): rng.normal(size=(30, 15)) for s in range(12)}
    stats = moments_dataset(raw)
    stats["var"][dict(step=11)] = np.nan  # a record without data
    stats["mean"][dict(step=11)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SignalBelowNoiseWarning)
        R = th.osgr(stats, [10, 1000])
    want_nan = []
    for s in range(11):
        _, m, _, v = _moments(raw[(s, "test")], 1)
        A = np.sum(m * m - v / 30)
        want_nan.append(A + np.sum(v) / 1000 <= 0)
    got_nan = np.isnan(R["osgr"].sel(split="test", n=1000).values[:11])
    np.testing.assert_array_equal(got_nan, want_nan)
    assert any(want_nan)  # the data do exercise the case
    reason = R["osgr"].attrs["reason"]
    assert "n exceeds the record's N" in reason
    assert f"[{sum(want_nan)} of 24 values" in reason
    assert _reasons.NO_PARAMS + " [2 of 24 values; step 11" in reason


def test_per_parameter_and_aggregate_reasons_without_warning():
    stats, raw, _ = make_stats(seed=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        P = th.osgr_param(stats, 8)
        ag = th.aggregate(stats, by="model", debias=True, quantiles=())
    assert not [w for w in rec if issubclass(w.category, SignalBelowNoiseWarning)]
    neg, neg_med = 0, 0
    for x in raw.values():
        N, m, _, v = _moments(x, 1)
        neg += int(np.sum(m * m - v / N < 0))
        neg_med += int(np.median(m * m / v - 1 / N) < 0)
    assert neg > 0 and neg_med > 0  # the data exercise both
    assert "G_j = m_j^2 - s_j^2/N < 0" in P["gsnr"].attrs["reason"]
    assert f"[{neg} of {stats['mean'].size} values" in P["gsnr"].attrs["reason"]
    r = ag["gsnr_median"].attrs["reason"]
    assert "debiased r_j - 1/N < 0" in r and f"[{neg_med} of 6 values" in r


def test_measured_gap_and_lr_reasons():
    stats, raw, _ = make_stats(seed=4, steps=(0, 10, 20, 30), lr={0: 0.1, 10: 0.1, 30: 0.1})
    # lr missing at step 20: the accumulated theory is NaN from the next checkpoint on
    g = th.accumulated_gap(stats, 100, steps_per_checkpoint=10)
    sV = [_moments(raw[(s, "test")], 1)[3].sum() for s in (0, 10, 20, 30)]
    want = [0.0, 0.1 * 10 * sV[0] / 100, 0.1 * 10 * (sV[0] + sV[1]) / 100, math.nan]
    np.testing.assert_allclose(g["gap_theory"].sel(n=100).values, want, rtol=1e-12)
    r = g["gap_theory"].attrs["reason"]
    assert "no learning rate at the checkpoint: not recorded there [1 of 4 values; step 30" in r
    # records without losses (moments only): measured gap NaN, said why
    no_loss = stats.drop_vars("loss_mean")
    mg = th.measured_gap(no_loss)
    assert np.isnan(mg["gap_measured"].values).all()
    assert "no per-sample losses" in mg["gap_measured"].attrs["reason"]


def test_osgr_ci_tiny_pools():
    # 2 samples in 2 blocks: each leave-one-block-out replicate keeps 1 sample, whose
    # variance (ddof 1) is undefined -> SE NaN, and the reason says so
    rng = np.random.default_rng(5)
    raw = {(0, "test"): rng.normal(loc=1.0, size=(2, 15)),
           (1, "test"): rng.normal(loc=1.0, size=(40, 15))}
    stats = moments_dataset(raw, blocks=2)
    ci = th.osgr_ci(stats, 4, split="test")
    se = ci["osgr_se"].sel(split="test", n=4).values
    assert np.isnan(se[0]) and np.isfinite(se[1])
    # independent: the replicates of step 0 have one sample each, var NaN
    assert np.isnan(_moments(raw[(0, "test")][:1], 1)[3]).all()
    r = ci["osgr_se"].attrs["reason"]
    assert "NaN in at least one leave-one-block-out replicate" in r and "step" not in r
    assert "1 in the smallest non-empty one" in r
    # a weak signal, 16 samples in 4 blocks: the normal interval reaches below 0 for R > 0
    from statistics import NormalDist

    x = np.random.default_rng(5).normal(loc=0.2, size=(16, 15))
    ci = th.osgr_ci(moments_dataset({(0, "test"): x}, blocks=4), 4, split="test")
    R, se, lo = (float(ci[v].squeeze()) for v in ("osgr", "osgr_se", "osgr_lo"))
    assert lo == pytest.approx(R - NormalDist().inv_cdf(0.975) * se, rel=1e-12)
    assert R > 0 > lo
    assert ("reaches below 0 for a positive R" in ci["osgr_lo"].attrs["reason"]
            and "4 samples" in ci["osgr_lo"].attrs["reason"])


def test_measured_estimators_reasons():
    # probes: one probe at a key (no SE), one key with the held-out loss rising (negative)
    probes = {"step": np.array([0, 0, 0, 5]), "n": np.array([8, 8, 8, 8]),
              "lr": np.array([0.1, 0.1, 0.1, 0.1]),
              "k": np.array([0, 1, 2, 0]),
              "train_before": np.array([1.0, 1.0, 1.0, 1.0]),
              "train_after": np.array([0.9, 0.8, 0.9, 0.9]),
              "test_before": np.array([1.0, 1.0, 1.0, 1.0]),
              "test_after": np.array([1.1, 1.05, 1.02, 0.95])}
    p = th.osgr_probe(probes)
    # independent: sum dL[D'] / sum dL[D] per key
    np.testing.assert_allclose(p["osgr_measured"].values,
                               [-(0.1 + 0.05 + 0.02) / (0.1 + 0.2 + 0.1), 0.05 / 0.1])
    assert "held-out loss rose" in p["osgr_measured"].attrs["reason"]
    assert "a single probe" in p["osgr_se"].attrs["reason"]
    # first order: held-out gradients anti-aligned with the training ones
    rng = np.random.default_rng(1)
    mu = rng.normal(size=6) * 3
    src = {(0, "train"): mu + rng.normal(size=(40, 6)),
           (0, "test"): -mu + rng.normal(size=(40, 6))}
    fo = th.osgr_first_order(src, n=10, n_subsets=8)
    _, m_a, _, v_a = _moments(src[(0, "train")], 1)
    m_b = src[(0, "test")].mean(0)
    expect = np.sum(m_a * m_b) / np.sum(m_a * m_a + (1 / 10 - 1 / 40) * v_a)  # osgr_pools' form
    got = float(fo["osgr_first_order"].squeeze())
    assert expect < -0.5 and got < 0
    assert abs(got - expect) <= 4 * float(fo["osgr_se"].squeeze())
    assert "points against" in fo["osgr_first_order"].attrs["reason"]
    # pools: n above pool A's size; pool A's mean is 0, so the denominator is negative there
    xa, xb = rng.normal(size=(20, 15)), rng.normal(size=(20, 15))
    xa -= xa.mean(0)
    stats = moments_dataset({(0, "train"): xa, (0, "test"): xb})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SignalBelowNoiseWarning)
        pools = th.osgr_pools(stats, [5, 50])
    _, ma, _, va = _moments(xa, 1)
    den = np.sum(ma * ma) + (1 / 50 - 1 / 20) * np.sum(va)
    assert den <= 0 and np.isnan(pools["osgr_pools"].sel(n=50).values).all()
    r = pools["osgr_pools"].attrs["reason"]
    assert "n larger than pool 'train'" in r and "[1 of 2 values; step 0, n 50]" in r
    assert "denominator sum" in r
