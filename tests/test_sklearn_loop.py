"""scikit-learn in a training loop (issue 12): the Recorder, the writer-first trajectory,
unfitted estimators fitted from their initialisation, optimizer_step and meta.

References are independent of the adapter: closed-form gradients of the logistic loss at
the recorded parameters, sklearn's own Glorot initialisation re-drawn from the seed, and
unrecorded twins of the estimators trained by plain sklearn calls.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
from conftest import U32, U64, assert_within
from gsnr_stats.adapters import sklearn as gk
from scipy.special import expit
from sklearn import __version__ as SKLEARN_VERSION
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier

import gsnr_stats as gs
from gsnr_stats.errors import AdapterError

_rng = np.random.default_rng(5)
D = 4
X_TR = _rng.normal(size=(80, D))
X_HO = _rng.normal(size=(31, D))
_W = np.array([1.0, -2.0, 0.5, 0.0])
Y_TR = (X_TR @ _W + 0.7 * _rng.normal(size=80) > 0).astype(np.int64)
Y_HO = (X_HO @ _W + 0.7 * _rng.normal(size=31) > 0).astype(np.int64)


def logistic_rows(X: np.ndarray, t: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """Closed form: per-sample gradient of log(1 + exp(-y f)), f = x.w + b, y = 2t - 1, is
    (sigmoid(f) - t) [x, 1] (coef then intercept)."""
    r = expit(X @ w + b) - t
    return np.hstack([r[:, None] * X, r[:, None]])


def stored_bound(ref: np.ndarray) -> np.ndarray:
    """One rounding to float32 plus the float64 routes' error (64 terms' worth of u64)."""
    return U32 * np.abs(ref) + 64 * U64 * np.abs(ref).max(axis=0)


def mlp_rows(X: np.ndarray, t: np.ndarray, W1: np.ndarray, b1: np.ndarray, W2: np.ndarray,
             b2: np.ndarray) -> np.ndarray:
    """Closed-form backprop of one tanh hidden layer and a logistic output (binary)."""
    a = np.tanh(X @ W1 + b1)
    d2 = expit(a @ W2 + b2)[:, 0] - t  # (n,)
    d1 = d2[:, None] * W2[:, 0][None, :] * (1.0 - a * a)  # (n, H)
    n = X.shape[0]
    return np.hstack([(X[:, :, None] * d1[:, None, :]).reshape(n, -1), d1,
                      a * d2[:, None], d2[:, None]])


def glorot(seed: int, units: list[int]) -> list[np.ndarray]:
    """sklearn's MLP initialisation drawn anew: per layer U(-b, b) coef then intercept,
    b = sqrt(6 / (fan_in + fan_out)) (tanh/relu), from RandomState(seed)."""
    rs = np.random.RandomState(seed)
    out = []
    for fi, fo in zip(units[:-1], units[1:], strict=True):
        bound = np.sqrt(6.0 / (fi + fo))
        out += [rs.uniform(-bound, bound, (fi, fo)), rs.uniform(-bound, bound, fo)]
    return out


# --------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------


def test_recorder_has_the_torch_shape() -> None:
    """Issue 12: "sklearn has no Recorder". It has, with torch's argument order (no loss_fn:
    the estimator defines the loss)."""
    from gsnr_stats.adapters import torch as gt

    mine = list(inspect.signature(gk.Recorder).parameters)
    theirs = list(inspect.signature(gt.Recorder).parameters)
    assert mine[:2] == ["writer", "estimator"] and theirs[0] == "writer"
    rec_mine = list(inspect.signature(gk.Recorder.record).parameters)
    rec_theirs = list(inspect.signature(gt.Recorder.record).parameters)
    assert rec_mine[:4] == rec_theirs[:4] == ["self", "data", "step", "split"]
    for opt in ("keep", "params_subset", "project", "seed", "block_size", "progress",
                "store_labels"):
        assert opt in mine and opt in theirs, opt


def test_recorder_in_a_partial_fit_loop(tmp_path) -> None:
    """A Recorder built before the first partial_fit records every epoch; each record holds
    the closed-form gradients at that epoch's parameters, and optimizer_step and meta."""
    est = SGDClassifier(loss="log_loss", alpha=1e-3, random_state=0)
    path = tmp_path / "loop.h5"
    n = len(X_TR)
    snaps = {}
    with gk.open_writer(path, est, X=X_TR, y=Y_TR) as w:  # unfitted: layout from the data
        rec = gk.Recorder(w, est, batch_size=17)
        for epoch in range(1, 4):
            est.partial_fit(X_TR, Y_TR, classes=[0, 1])
            snaps[epoch] = (est.coef_.ravel().copy(), float(est.intercept_[0]))
            meta = {"optimizer": {"class": "SGDClassifier", "alpha": 1e-3}}
            s = rec.record((X_TR, Y_TR), epoch, "train", epoch=epoch,
                           optimizer_step=epoch * n, meta=meta)
            assert (s.n_samples, s.optimizer_step) == (n, epoch * n)
            rec.record((X_HO, Y_HO, np.arange(100, 131)), epoch, "test", max_samples=20,
                       optimizer_step=epoch * n, meta=meta)
    with gs.open_store(path) as store:
        assert {(r.step, r.split, r.optimizer_step) for r in store.records} == {
            (e, sp, e * n) for e in (1, 2, 3) for sp in ("train", "test")}
        assert store.record_meta(2, "test")["optimizer"]["alpha"] == 1e-3
        for e, (wv, b) in snaps.items():
            ref = logistic_rows(X_TR, Y_TR, wv, b)
            assert_within(store.read_grads(e, "train"), ref, stored_bound(ref), f"epoch {e}")
            ref = logistic_rows(X_HO[:20], Y_HO[:20], wv, b)
            assert_within(store.read_grads(e, "test"), ref, stored_bound(ref), "max_samples")
            np.testing.assert_array_equal(store.read_sample_id(e, "test"), np.arange(100, 120))
            np.testing.assert_array_equal(store.read_label(e, "train"), Y_TR)


def test_recorder_misuse_is_an_adapter_error(tmp_path) -> None:
    est = LogisticRegression().fit(X_TR, Y_TR)
    with gk.open_writer(tmp_path / "m.h5", est) as w:
        with pytest.raises(AdapterError, match="writer comes first"):
            gk.Recorder(est, w)
        rec = gk.Recorder(w, est)
        with pytest.raises(AdapterError, match=r"\(X, y\)"):
            rec.record(X_TR, 0, "train")
        with pytest.raises(AdapterError, match="never cast"):  # weights are not ids
            rec.record((X_TR, Y_TR, np.ones(80)), 0, "train")
        with pytest.raises(AdapterError, match="given twice"):
            rec.record((X_TR, Y_TR, np.arange(80)), 0, "train", sample_id=np.arange(80))
        with pytest.raises(AdapterError, match="not fitted"):
            gk.Recorder(w, LogisticRegression()).record((X_TR, Y_TR), 0, "train")
        with pytest.raises(AdapterError, match="batch_size"):
            gk.Recorder(w, est, batch_size=0)
        rec.record((X_TR, Y_TR), 0, "train")
    with gs.open_store(tmp_path / "m.h5") as store:  # the refused calls left nothing behind
        assert [(r.step, r.split, r.n_samples) for r in store.records] == [(0, "train", 80)]


# --------------------------------------------------------------------------------------
# record_trajectory: argument order
# --------------------------------------------------------------------------------------


def test_trajectory_takes_the_writer_first_and_the_old_order_warns(tmp_path) -> None:
    """Issue 12: record(writer, est, ...) and record_trajectory(est, ..., writer) took the
    writer at opposite ends. Now the writer comes first; the old order still works (one
    release) with a DeprecationWarning and writes the same store."""
    outs, stats = [], []
    for i, old in enumerate((False, True)):
        est = SGDClassifier(loss="log_loss", alpha=1e-3, random_state=0)
        path = tmp_path / f"t{i}.h5"
        with gk.open_writer(path, est, X=X_TR, y=Y_TR) as w:
            if old:
                with pytest.warns(DeprecationWarning, match="writer comes first"):
                    outs.append(gk.record_trajectory(est, X_TR, Y_TR, X_HO, Y_HO, w, epochs=2))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", DeprecationWarning)
                    outs.append(gk.record_trajectory(w, est, X_TR, Y_TR, X_HO, Y_HO, epochs=2))
        stats.append(gs.reduce(path))
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
    np.testing.assert_array_equal(stats[0]["mean"].values, stats[1]["mean"].values)
    with pytest.raises(AdapterError, match="not a writer"):
        gk.record_trajectory(X_TR, Y_TR, X_TR, Y_TR, X_HO, Y_HO, epochs=1)


# --------------------------------------------------------------------------------------
# record_trajectory: unfitted estimators, step 0, optimizer_step and meta
# --------------------------------------------------------------------------------------


def _reduce_steps(path) -> dict[int, int]:
    with gs.open_store(path) as store:
        return {r.step: r.optimizer_step for r in store.records if r.split == "train"}


@pytest.mark.parametrize("random_state", [0, None])
def test_trajectory_fits_an_unfitted_sgd_from_zero(tmp_path, random_state) -> None:
    """Issue 12: record_trajectory wanted a fitted estimator although it trains it. A fresh
    SGDClassifier is trained from sklearn's start theta_0 = 0 (step 0: gradients
    (1/2 - t) [x, 1]) exactly as an unrecorded twin, global RNG included."""
    kw = {"loss": "log_loss", "alpha": 1e-3, "random_state": random_state}
    est, twin = SGDClassifier(**kw), SGDClassifier(**kw)
    path = tmp_path / "sgd.h5"
    np.random.seed(11)  # noqa: NPY002 - random_state=None draws from the global generator
    with gk.open_writer(path, est, X=X_TR, y=Y_TR) as w:
        out = gk.record_trajectory(w, est, X_TR, Y_TR, X_HO, Y_HO, epochs=3, every=2)
    np.random.seed(11)  # noqa: NPY002
    for _ in range(3):
        twin.partial_fit(X_TR, Y_TR, classes=[0, 1])
    np.testing.assert_array_equal(est.coef_, twin.coef_)  # recording changed nothing
    np.testing.assert_array_equal(est.intercept_, twin.intercept_)
    n = len(X_TR)
    np.testing.assert_array_equal(out["step"], [0, n, 2 * n, 3 * n])
    np.testing.assert_array_equal(out["recorded"], [True, False, True, True])
    assert out["lr"][0] == pytest.approx(gk._sgd_lr(SGDClassifier(**kw), n), rel=0)
    assert _reduce_steps(path) == {0: 0, 2 * n: 2 * n, 3 * n: 3 * n}
    with gs.open_store(path) as store:
        ref = logistic_rows(X_HO, Y_HO, np.zeros(D), 0.0)  # theta_0 = 0
        assert_within(store.read_grads(0, "test"), ref, stored_bound(ref), "step 0")
        ref = logistic_rows(X_TR, Y_TR, est.coef_.ravel(), float(est.intercept_[0]))
        assert_within(store.read_grads(3 * n, "train"), ref, stored_bound(ref), "last")
        meta = store.record_meta(2 * n, "train")
    assert meta["framework"] == f"scikit-learn {SKLEARN_VERSION}"
    opt = meta["optimizer"]
    assert (opt["class"], opt["solver"], opt["batch_size"]) == ("SGDClassifier", "sgd", 1)
    assert (opt["learning_rate"], opt["alpha"]) == ("optimal", est.alpha)
    assert "eta0" not in opt  # the "optimal" schedule ignores eta0: not a rate to read
    assert opt["module"] == type(est).__module__


def test_trajectory_fits_an_unfitted_logistic_regression(tmp_path) -> None:
    """LogisticRegression: step 0 is the warm-start solver's first iterate theta_0 = 0; each
    epoch is one lbfgs iteration, as warm-started sklearn fits by hand."""
    est = LogisticRegression(C=2.0)
    path = tmp_path / "lr.h5"
    with gk.open_writer(path, est, X=X_TR, y=Y_TR) as w:
        out = gk.record_trajectory(w, est, X_TR, Y_TR, X_HO, Y_HO, epochs=3)
    twin = LogisticRegression(C=2.0, warm_start=True, max_iter=1)
    steps = [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(3):
            twin.fit(X_TR, Y_TR)
            steps.append(steps[-1] + int(twin.n_iter_[0]))
    np.testing.assert_array_equal(est.coef_, twin.coef_)
    assert (est.warm_start, est.max_iter) == (False, 100)  # restored
    np.testing.assert_array_equal(out["step"], steps)
    assert out["train_loss"][0] == pytest.approx(np.log(2.0), rel=1e-14)  # theta_0 = 0
    with gs.open_store(path) as store:
        ref = logistic_rows(X_TR, Y_TR, np.zeros(D), 0.0)
        assert_within(store.read_grads(0, "train"), ref, stored_bound(ref), "step 0")
        opt = store.record_meta(steps[-1], "test")["optimizer"]
    assert (opt["class"], opt["solver"], opt["C"], opt["batch_size"]) == (
        "LogisticRegression", "lbfgs", 2.0, len(X_TR))
    assert _reduce_steps(path) == {s: s for s in steps}


@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_trajectory_fits_an_unfitted_mlp_from_its_glorot_draw(tmp_path, solver) -> None:
    """MLPClassifier: step 0 is sklearn's Glorot-uniform draw from random_state (re-drawn
    here from the seed); training continues exactly as an unrecorded twin's."""
    kw = {"hidden_layer_sizes": (5,), "activation": "tanh", "solver": solver,
          "learning_rate_init": 0.05, "batch_size": 20, "random_state": 3, "momentum": 0.9}
    est, twin = MLPClassifier(**kw), MLPClassifier(**kw)
    path = tmp_path / "mlp.h5"
    with gk.open_writer(path, est, X=X_TR, y=Y_TR) as w:
        out = gk.record_trajectory(w, est, X_TR, Y_TR, X_HO, Y_HO, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(2):
            twin.partial_fit(X_TR, Y_TR, classes=[0, 1])
    for a, b in zip(est.coefs_ + est.intercepts_, twin.coefs_ + twin.intercepts_, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out["step"], [0, 4, 8])  # 80 / 20 updates per epoch
    W1, b1, W2, b2 = glorot(3, [D, 5, 1])
    with gs.open_store(path) as store:
        ref = mlp_rows(X_TR, Y_TR, W1, b1, W2, b2)
        assert_within(store.read_grads(0, "train"), ref, stored_bound(ref), "Glorot step 0")
        ref = mlp_rows(X_HO, Y_HO, *(np.asarray(p) for p in
                                     (est.coefs_[0], est.intercepts_[0], est.coefs_[1],
                                      est.intercepts_[1])))
        assert_within(store.read_grads(8, "test"), ref, stored_bound(ref), "trained")
        opt = store.record_meta(4, "train")["optimizer"]
    assert (opt["solver"], opt["batch_size"], opt["learning_rate_init"]) == (solver, 20, 0.05)
    assert ("momentum" in opt) == (solver == "sgd")
    if solver == "sgd":
        np.testing.assert_allclose(out["lr"], 0.05, rtol=0)


def test_trajectory_continues_a_fitted_estimator(tmp_path) -> None:
    """A fitted estimator is not re-initialised: step start_step is its current state."""
    est = SGDClassifier(loss="log_loss", alpha=1e-3, random_state=0).fit(X_TR, Y_TR)
    before = copy.deepcopy(est)
    path = tmp_path / "c.h5"
    with gk.open_writer(path, est) as w:
        out = gk.record_trajectory(w, est, X_TR, Y_TR, X_HO, Y_HO, epochs=1, start_step=500)
    np.testing.assert_array_equal(out["step"], [500, 580])
    with gs.open_store(path) as store:
        ref = logistic_rows(X_TR, Y_TR, before.coef_.ravel(), float(before.intercept_[0]))
        assert_within(store.read_grads(500, "train"), ref, stored_bound(ref), "fitted start")


def test_moments_records_carry_optimizer_step_and_meta(tmp_path) -> None:
    """keep='moments' writes through the moments blocks: optimizer_step and meta too."""
    est = LogisticRegression().fit(X_TR, Y_TR)
    path = tmp_path / "mom.h5"
    with gk.open_writer(path, est) as w:
        gk.Recorder(w, est, keep="moments", batch_size=30).record(
            (X_TR, Y_TR), 0, "train", optimizer_step=12, meta={"optimizer": {"class": "X"}})
    with gs.open_store(path) as store:
        (rec,) = store.records
        assert (rec.kind, rec.optimizer_step, rec.n_samples) == ("moments", 12, 80)
        assert store.record_meta(0, "train") == {"optimizer": {"class": "X"}}
    ref = logistic_rows(X_TR, Y_TR, est.coef_.ravel(), float(est.intercept_[0]))
    m, v = ref.mean(axis=0), ref.var(axis=0, ddof=1)
    stats = gs.reduce(path)
    # float64 on both routes (moments records are float64): summation order only, at most
    # N u64 max|g| in the mean, the DESIGN's 1e-10 relative in the variance
    assert_within(stats["mean"].sel(step=0, split="train"), m,
                  len(ref) * U64 * np.abs(ref).max(axis=0), "mean")
    np.testing.assert_allclose(stats["var"].sel(step=0, split="train"), v, rtol=1e-10)
