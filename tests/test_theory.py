"""Tests of gsnr_stats.theory against closed forms and brute-force numpy re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from gsnr_stats import theory as th

# Synthetic step labels here are optimizer steps and synthetic splits are noisy: the two
# warnings are checked where they are the point (test_step_spacing.py, test_reasons.py).
pytestmark = [pytest.mark.filterwarnings("ignore::gsnr_stats.errors.StepSpacingWarning"),
              pytest.mark.filterwarnings("ignore::gsnr_stats.errors.SignalBelowNoiseWarning")]

LAYOUT = [("fc1.weight", 6), ("fc1.bias", 3), ("fc2.weight", 4), ("fc2.bias", 2)]


# --------------------------------------------------------------------------------------
# fixture helpers
# --------------------------------------------------------------------------------------


def _param_coords(layout=LAYOUT):
    tensor = np.concatenate([[name] * size for name, size in layout])
    layer = np.array([t.rsplit(".", 1)[0] for t in tensor])
    return tensor.astype(str), layer.astype(str)


def _moments(x: np.ndarray, ddof: int):
    x = np.asarray(x, dtype=np.float64)
    N = x.shape[0]
    m = x.mean(axis=0)
    q = ((x - m) ** 2).sum(axis=0)
    var = q / (N - ddof) if N > ddof else np.full_like(m, np.nan)
    return N, m, q, var


def _bounds(n: int, k: int) -> list[int]:
    return [(b * n) // k for b in range(k + 1)]


def moments_dataset(
    raw: dict,
    *,
    ddof: int = 1,
    blocks: int | None = None,
    lr: dict | None = None,
    losses: dict | None = None,
    layout=LAYOUT,
) -> xr.Dataset:
    """A reduce()-shaped Dataset from raw gradients ``{(step, split): (N, P)}`` in float64 numpy."""
    steps = sorted({k[0] for k in raw})
    splits = sorted({k[1] for k in raw}, key=lambda s: (s != "train", s))
    P = next(iter(raw.values())).shape[1]
    S, T = len(steps), len(splits)
    K = blocks or 1
    count = np.zeros((S, T), dtype=np.int64)
    mean = np.full((S, T, P), np.nan)
    m2 = np.full((S, T, P), np.nan)
    var = np.full((S, T, P), np.nan)
    lr_a = np.full((S, T), np.nan)
    loss_mean = np.full((S, T), np.nan)
    bc = np.zeros((S, T, K))
    bm = np.full((S, T, K, P), np.nan)
    bq = np.full((S, T, K, P), np.nan)
    for (st, sp), x in raw.items():
        i, j = steps.index(st), splits.index(sp)
        count[i, j], mean[i, j], m2[i, j], var[i, j] = _moments(x, ddof)
        if lr is not None:
            lr_a[i, j] = lr.get(st, np.nan)
        if losses is not None and (st, sp) in losses:
            loss_mean[i, j] = np.mean(losses[(st, sp)])
        if blocks:
            b = _bounds(x.shape[0], K)
            for k in range(K):
                c, mu, q, _ = _moments(x[b[k]:b[k + 1]], ddof)
                bc[i, j, k], bm[i, j, k], bq[i, j, k] = c, mu, q
    with np.errstate(invalid="ignore", divide="ignore"):
        msq = mean**2
        gsnr = np.where(var > 0, msq / np.where(var > 0, var, 1),
                        np.where(var == 0, np.where(msq > 0, np.inf, np.nan), np.nan))
        gsnr_deb = gsnr - 1.0 / np.where(count > 0, count, np.nan)[..., None]
    tensor, layer = _param_coords(layout)
    sp3 = ("step", "split", "param")
    data = {
        "count": (("step", "split"), count),
        "mean": (sp3, mean),
        "m2": (sp3, m2),
        "var": (sp3, var),
        "gsnr": (sp3, gsnr),
        "gsnr_debiased": (sp3, gsnr_deb),
        "lr": (("step", "split"), lr_a),
        "loss_mean": (("step", "split"), loss_mean),
    }
    if blocks:
        data["block_count"] = (("step", "split", "block"), bc)
        data["block_mean"] = (("step", "split", "block", "param"), bm)
        data["block_m2"] = (("step", "split", "block", "param"), bq)
    ds = xr.Dataset(
        data,
        coords={"step": np.array(steps, dtype=np.int64), "split": np.array(splits),
                "param": np.arange(P), "tensor": ("param", tensor), "layer": ("param", layer)},
    )
    ds.attrs["ddof"] = ddof
    return ds


def make_stats(
    seed: int = 0,
    *,
    steps=(0, 10, 30),
    splits=("train", "test"),
    N: int = 40,
    ddof: int = 1,
    blocks: int | None = None,
    lr: float | dict | None = 0.1,
    dtype=np.float64,
):
    """Random per-sample gradients with a spread of GSNRs; returns ``(stats, raw, losses)``."""
    rng = np.random.default_rng(seed)
    P = sum(s for _, s in LAYOUT)
    mu = rng.normal(size=P) * np.logspace(-2, 0.5, P)
    sd = rng.uniform(0.2, 2.0, size=P)
    raw, losses = {}, {}
    for t, st in enumerate(steps):
        for sp in splits:
            shrink = 1.0 / (1 + t) if sp == "train" else 1.0
            raw[(st, sp)] = (mu * shrink + sd * rng.normal(size=(N, P))).astype(dtype)
            losses[(st, sp)] = rng.uniform(0, 1, size=N) + (0.1 * t if sp == "test" else 0.0)
    lrd = lr if isinstance(lr, dict) or lr is None else dict.fromkeys(steps, lr)
    stats = moments_dataset(raw, ddof=ddof, blocks=blocks, lr=lrd, losses=losses)
    return stats, raw, losses


def _constant_r_stats(r: float, N: int = 50, P: int = 15, ddof: int = 1) -> xr.Dataset:
    """Moments with every GSNR m_j^2/s_j^2 exactly r (different scales per parameter)."""
    rng = np.random.default_rng(1)
    s2 = rng.uniform(0.1, 5, size=P)
    m = np.sqrt(r * s2) * rng.choice([-1, 1], size=P)
    tensor, layer = _param_coords()
    sp3 = ("step", "split", "param")
    return xr.Dataset(
        {"count": (("step", "split"), np.array([[N]])),
         "mean": (sp3, m[None, None]), "var": (sp3, s2[None, None]),
         "m2": (sp3, (s2 * (N - ddof))[None, None])},
        coords={"step": [0], "split": ["train"], "param": np.arange(P),
                "tensor": ("param", tensor), "layer": ("param", layer)},
        attrs={"ddof": ddof},
    )


# brute-force reference implementations (loops over parameters) -------------------------


def bf_osgr(mean, var, N, n, debias, members=None):
    idx = range(len(mean)) if members is None else members
    sg = sv = 0.0
    for j in idx:
        G = mean[j] ** 2 - (var[j] / N if debias else 0.0)
        if not (math.isfinite(G) and math.isfinite(var[j])):
            continue
        sg += G
        sv += var[j]
    den = sg + sv / n
    return sg / den if den > 0 else math.nan  # documented: NaN where sum G + sum V/n <= 0


def _groups(by):
    tensor, layer = _param_coords()
    lab = tensor if by == "tensor" else layer
    names = list(dict.fromkeys(lab))
    return names, [np.flatnonzero(lab == g) for g in names]


# --------------------------------------------------------------------------------------
# OSGR theory
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.01, 0.3, 2.0])
@pytest.mark.parametrize("debias", [False, True])
def test_osgr_closed_form_equal_r(r, debias):
    N = 50
    ds = _constant_r_stats(r, N=N)
    ns = np.array([1, 7, 64, 1000])
    R = th.osgr(ds, ns, debias=debias)["osgr"].sel(step=0, split="train").values
    re = r - 1.0 / N if debias else r
    # NaN where the estimate of E|g_D|^2 = sum G + sum V/n is <= 0 (debiased r < -1/n)
    want = np.where(ns * re + 1 > 0, ns * re / (ns * re + 1), np.nan)
    np.testing.assert_allclose(R, want, rtol=1e-12)
    Rj = th.osgr_param(ds, ns, debias=debias)["osgr"].sel(step=0, split="train").values
    np.testing.assert_allclose(Rj, want[:, None] * np.ones((1, 15)), rtol=1e-12)


def test_osgr_large_n_tends_to_one():
    stats, _, _ = make_stats()
    R = th.osgr(stats, [10**12], debias=False)["osgr"].values
    np.testing.assert_allclose(R, 1.0, atol=1e-9)
    R = th.osgr(stats, [1, 10, 100, 10**4], debias=False)["osgr"].values
    assert np.all(np.diff(R, axis=-1) > 0)  # monotone in n


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("by", [None, "tensor", "layer"])
def test_osgr_matches_brute_force(debias, by):
    stats, raw, _ = make_stats(seed=3)
    ns = [1, 8, 64]
    out = th.osgr(stats, ns, debias=debias, by=by)
    assert out["osgr"].dims == (("step", "split", "n") if by is None
                                else ("step", "split", "n", "group"))
    for (st, sp), x in raw.items():
        N, m, _, v = _moments(x, 1)
        for n in ns:
            got = out["osgr"].sel(step=st, split=sp, n=n)
            if by is None:
                np.testing.assert_allclose(float(got), bf_osgr(m, v, N, n, debias), rtol=1e-12)
            else:
                names, members = _groups(by)
                assert list(out["group"].values) == names
                for g, idx in zip(names, members, strict=True):
                    np.testing.assert_allclose(float(got.sel(group=g)),
                                               bf_osgr(m, v, N, n, debias, idx), rtol=1e-12)


def test_osgr_param_identities():
    stats, raw, _ = make_stats(seed=4)
    ns = [2, 50]
    pp = th.osgr_param(stats, ns)
    R = th.osgr(stats, ns)["osgr"]
    for (st, sp), x in raw.items():
        N, m, _, v = _moments(x, 1)
        for n in ns:
            Rj = pp["osgr"].sel(step=st, split=sp, n=n).values
            W = pp["weight"].sel(step=st, split=sp, n=n).values
            G = m**2 - v / N
            r = G / v
            den = G + v / n
            np.testing.assert_allclose(W, den / den.sum(), rtol=1e-12)
            ok = den > 0
            np.testing.assert_allclose(Rj[ok], (r / (r + 1 / n))[ok], rtol=1e-10)
            total = float(R.sel(step=st, split=sp, n=n))
            # R = 1 - (1/n) sum_j W_j / (r_j + 1/n) = sum_j W_j R_j
            np.testing.assert_allclose(1 - np.sum(W / (r + 1 / n)) / n, total, rtol=1e-10)
            if ok.all():
                np.testing.assert_allclose(np.sum(W * Rj), total, rtol=1e-10)


def test_osgr_split_selection_and_errors():
    stats, _, _ = make_stats()
    out = th.osgr(stats, 16, split="test")
    assert list(out["split"].values) == ["test"]
    assert out["osgr"].dims == ("step", "split", "n")
    with pytest.raises(KeyError, match="valid"):
        th.osgr(stats, 16, split="valid")
    for bad in (0, -3, 2.5, []):
        with pytest.raises(ValueError):
            th.osgr(stats, bad)
    with pytest.raises(ValueError, match="by="):
        th.osgr(stats, 4, by="nonsense")


def test_dead_and_inf_parameters():
    stats, raw, _ = make_stats(seed=5)
    raw = {k: v.copy() for k, v in raw.items()}
    for x in raw.values():
        x[:, 0] = 0.0  # dead: m = s^2 = 0
        x[:, 1] = 0.5  # s^2 = 0, m != 0: GSNR +inf (0.5: exact mean, no round-off)
    ds = moments_dataset(raw)
    ds["mean"][dict(step=0, split=1, param=2)] = np.nan  # a parameter without data
    out = th.osgr(ds, [4, 100], debias=False)
    assert np.isfinite(out["osgr"]).all()
    assert (out["n_dead"] == 1).all()
    assert int(out["n_excluded"].sel(step=0, split="test")) == 1
    assert int(out["n_used"].sel(step=0, split="test")) == 14  # dead ones are used (G=V=0)
    pp = th.osgr_param(ds, 4, debias=False)
    assert np.isnan(pp["osgr"].sel(param=0)).all()
    assert (pp["weight"].sel(param=0) == 0).all()
    np.testing.assert_allclose(pp["osgr"].sel(param=1), 1.0)
    assert np.isinf(pp["gsnr"].sel(param=1)).all()
    ag = th.aggregate(ds, by="model")
    assert (ag["n_dead"] == 1).all() and (ag["n_inf"] == 1).all()
    assert int(ag["n_excluded"].sel(step=0, split="test", group="model")) == 1
    assert int(ag["n_params"].sel(step=10, split="train", group="model")) == 13
    assert np.isfinite(ag["gsnr_mean"]).all()
    # a record with no data at all gives NaN, not 0
    empty = ds.copy(deep=True)
    empty["mean"][dict(step=1, split=0)] = np.nan
    empty["var"][dict(step=1, split=0)] = np.nan
    R = th.osgr(empty, 8)["osgr"]
    assert np.isnan(R.sel(step=10, split="train")).all()
    assert np.isfinite(R.sel(step=10, split="test")).all()


def test_negative_debiased_osgr_is_reported():
    # pure noise: the debiased signal is below zero about half the time; never clipped
    rng = np.random.default_rng(0)
    raw = {(s, "train"): rng.normal(size=(30, 15)) for s in range(20)}
    from gsnr_stats.errors import SignalBelowNoiseWarning

    with pytest.warns(SignalBelowNoiseWarning, match="training split is fitted"):
        R = th.osgr(moments_dataset(raw), 10)["osgr"].values
    assert (R < 0).any()


# --------------------------------------------------------------------------------------
# Gaps
# --------------------------------------------------------------------------------------


def test_one_step_gap():
    stats, raw, _ = make_stats(seed=6, lr=0.05)
    out = th.one_step_gap(stats, [10, 100])
    for (st, sp), x in raw.items():
        _, _, _, v = _moments(x, 1)
        for n in (10, 100):
            np.testing.assert_allclose(float(out["gap_theory"].sel(step=st, split=sp, n=n)),
                                       0.05 * v.sum() / n, rtol=1e-12)
    meas = th.measured_gap(stats)["gap_measured"].values
    steps = stats["step"].values
    np.testing.assert_allclose(out["gap_measured"].values[:-1], np.diff(meas) / np.diff(steps))
    assert np.isnan(out["gap_measured"].values[-1])
    out2 = th.one_step_gap(stats, 10, lr=lambda s: 0.1 / (1 + s))
    np.testing.assert_allclose(out2["lr"].values, 0.1 / (1 + steps))


def test_measured_gap():
    stats, _, losses = make_stats(seed=7)
    g = th.measured_gap(stats)
    for st in stats["step"].values:
        np.testing.assert_allclose(float(g["gap_measured"].sel(step=st)),
                                   np.mean(losses[(st, "test")]) - np.mean(losses[(st, "train")]))


def _bf_accumulated(steps, sV, n, lr_fn, method):
    out = [0.0]
    total = 0.0
    for k in range(len(steps) - 1):
        for u in range(steps[k], steps[k + 1]):
            if method == "piecewise":
                v = sV[k]
            else:
                v = sV[k] + (sV[k + 1] - sV[k]) * (u - steps[k] + 0.5) / (steps[k + 1] - steps[k])
            total += lr_fn(u) * v / n
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("method", ["piecewise", "trapezoid"])
@pytest.mark.parametrize("lr_kind", ["recorded", "float", "callable"])
def test_accumulated_gap_brute_force(method, lr_kind):
    steps = (0, 5, 12, 30)
    lrs = {0: 0.1, 5: 0.05, 12: 0.02, 30: 0.01}
    stats, raw, _ = make_stats(seed=8, steps=steps, lr=lrs)
    sV = np.array([_moments(raw[(s, "test")], 1)[3].sum() for s in steps])
    if lr_kind == "recorded":
        lr_arg = None

        def lr_fn(u):
            return lrs[max(s for s in steps if s <= u)]
    elif lr_kind == "float":
        lr_arg = 0.03

        def lr_fn(u):
            return 0.03
    else:
        def lr_arg(u):
            return 0.1 * np.exp(-np.asarray(u) / 10)

        lr_fn = lr_arg
    out = th.accumulated_gap(stats, [50, 500], method=method, lr=lr_arg)
    for n in (50, 500):
        np.testing.assert_allclose(out["gap_theory"].sel(n=n).values,
                                   _bf_accumulated(steps, sV, n, lr_fn, method), rtol=1e-12)
    np.testing.assert_allclose(out["gap_measured"].values,
                               th.measured_gap(stats)["gap_measured"].values)
    np.testing.assert_allclose(out["gap_theory_offset"] - out["gap_theory"],
                               np.broadcast_to(out["gap_measured"].values[0], (4, 2)))


def test_accumulated_gap_closed_forms():
    stats, raw, _ = make_stats(seed=9, steps=(0, 10, 20, 40), lr=0.2)
    sV = np.array([_moments(raw[(s, "test")], 1)[3].sum() for s in (0, 10, 20, 40)])
    pw = th.accumulated_gap(stats, 100)["gap_theory"].sel(n=100).values
    tz = th.accumulated_gap(stats, 100, method="trapezoid")["gap_theory"].sel(n=100).values
    d = np.diff([0, 10, 20, 40])
    np.testing.assert_allclose(pw, np.concatenate([[0], np.cumsum(0.2 * d * sV[:-1] / 100)]))
    np.testing.assert_allclose(tz, np.concatenate(
        [[0], np.cumsum(0.2 * d * (sV[:-1] + sV[1:]) / 2 / 100)]))
    # steps_per_checkpoint overrides the step coordinate
    one = th.accumulated_gap(stats, 100, steps_per_checkpoint=1)["gap_theory"].sel(n=100).values
    np.testing.assert_allclose(one, np.concatenate([[0], np.cumsum(0.2 * sV[:-1] / 100)]))
    # train split instead of test
    tr = th.accumulated_gap(stats, 100, split="train")
    assert tr.attrs["v_split"] == "train"
    with pytest.raises(ValueError, match="method"):
        th.accumulated_gap(stats, 100, method="simpson")


def test_accumulated_gap_needs_lr():
    stats, _, _ = make_stats(lr=None)
    with pytest.raises(ValueError, match="lr="):
        th.accumulated_gap(stats, 10)
    assert np.isfinite(th.accumulated_gap(stats, 10, lr=0.1)["gap_theory"]).all()


# --------------------------------------------------------------------------------------
# Noise scale and aggregates
# --------------------------------------------------------------------------------------


def test_noise_scale_brute_force():
    stats, raw, _ = make_stats(seed=10)
    b = th.noise_scale(stats)["b_simple"]
    for (st, sp), x in raw.items():
        N, m, _, v = _moments(x, 1)
        np.testing.assert_allclose(float(b.sel(step=st, split=sp)),
                                   v.sum() / np.sum(m**2 - v / N), rtol=1e-12)
    bl = th.noise_scale(stats, by="layer")["b_simple"]
    assert bl.dims == ("step", "split", "group")


@pytest.mark.parametrize("by", ["tensor", "layer", "model"])
@pytest.mark.parametrize("debias", [False, True])
def test_aggregate_brute_force(by, debias):
    stats, raw, _ = make_stats(seed=11)
    q = (0.1, 0.5, 0.9)
    ag = th.aggregate(stats, by=by, quantiles=q, debias=debias)
    if by == "model":
        names, members = ["model"], [np.arange(15)]
    else:
        names, members = _groups(by)
    assert list(ag["group"].values) == names
    for (st, sp), x in raw.items():
        N, m, _, v = _moments(x, 1)
        r = m**2 / v - (1 / N if debias else 0)
        for g, idx in zip(names, members, strict=True):
            sel = dict(step=st, split=sp, group=g)
            np.testing.assert_allclose(float(ag["gsnr_mean"].sel(sel)), r[idx].mean(), rtol=1e-12)
            np.testing.assert_allclose(float(ag["gsnr_median"].sel(sel)), np.median(r[idx]),
                                       rtol=1e-12)
            np.testing.assert_allclose(ag["gsnr_quantile"].sel(sel).values,
                                       np.quantile(r[idx], q), rtol=1e-12)
            num = np.sum(m[idx] ** 2 - (v[idx] / N if debias else 0))
            np.testing.assert_allclose(float(ag["gsnr_pooled"].sel(sel)), num / v[idx].sum(),
                                       rtol=1e-12)
            assert int(ag["n_params"].sel(sel)) == len(idx)


def test_aggregate_bad_quantiles():
    stats, _, _ = make_stats()
    with pytest.raises(ValueError, match="quantiles"):
        th.aggregate(stats, quantiles=(0.5, 1.5))


# --------------------------------------------------------------------------------------
# Jackknife
# --------------------------------------------------------------------------------------


def _bf_loo_stats(raw, K, ddof=1, losses=None, lr=None):
    out = []
    for i in range(K):
        sub = {}
        for key, x in raw.items():
            b = _bounds(x.shape[0], K)
            sub[key] = np.concatenate([x[: b[i]], x[b[i + 1]:]])
        out.append(moments_dataset(sub, ddof=ddof, losses=losses, lr=lr))
    return out


def _bf_se(values):
    v = np.asarray(values)
    K = v.shape[0]
    return np.sqrt((K - 1) / K * np.sum((v - v.mean(axis=0)) ** 2, axis=0))


@pytest.mark.parametrize("ddof", [0, 1])
def test_leave_one_block_out_matches_raw(ddof):
    K = 5
    stats, raw, _ = make_stats(seed=12, N=37, blocks=K, ddof=ddof)
    ref = _bf_loo_stats(raw, K, ddof=ddof)
    got = list(th.leave_one_block_out(stats))
    assert [i for i, _ in got] == list(range(K))
    for (_, s), r in zip(got, ref, strict=True):
        for v in ("mean", "var", "m2", "gsnr"):
            np.testing.assert_allclose(s[v].values, r[v].values, rtol=1e-11, atol=1e-14)
        np.testing.assert_array_equal(s["count"].values, r["count"].values)
        assert "block_mean" not in s and "block" not in s.dims


def test_leave_one_block_out_stable_when_mean_dominates():
    # |m| = 1e4 sd: subtracting a block from the total would lose ~8 digits here
    rng = np.random.default_rng(0)
    raw = {(0, "train"): 1e4 + rng.normal(size=(64, 15))}
    stats = moments_dataset(raw, blocks=4)
    ref = _bf_loo_stats(raw, 4)
    for (_, s), r in zip(th.leave_one_block_out(stats), ref, strict=True):
        np.testing.assert_allclose(s["var"].values, r["var"].values, rtol=1e-9)


@pytest.mark.parametrize("by", [None, "layer"])
def test_jackknife_osgr_matches_brute_force(by):
    K = 6
    stats, raw, _ = make_stats(seed=13, N=48, blocks=K)
    ns = [4, 64]
    ci = th.osgr_ci(stats, ns, by=by, level=0.9)
    reps = [th.osgr(s, ns, by=by)["osgr"].values for s in _bf_loo_stats(raw, K)]
    np.testing.assert_allclose(ci["osgr_se"].values, _bf_se(reps), rtol=1e-9)
    np.testing.assert_allclose(ci["osgr"].values, th.osgr(stats, ns, by=by)["osgr"].values)
    z = 1.6448536269514722
    np.testing.assert_allclose(ci["osgr_hi"] - ci["osgr"], z * ci["osgr_se"], rtol=1e-12)
    np.testing.assert_allclose(ci["osgr"] - ci["osgr_lo"], z * ci["osgr_se"], rtol=1e-12)
    assert ci.attrs["jackknife_blocks"] == K
    assert ci["osgr_se"].attrs["long_name"].startswith("jackknife")


def test_jackknife_generic_and_aggregate():
    K = 4
    stats, raw, losses = make_stats(seed=14, N=41, blocks=K)
    ref = _bf_loo_stats(raw, K, losses=losses, lr=dict.fromkeys((0, 10, 30), 0.1))
    jk = th.jackknife(stats, lambda s: th.accumulated_gap(s, 100))
    reps = [th.accumulated_gap(s, 100)["gap_theory"].values for s in ref]
    np.testing.assert_allclose(jk["gap_theory_se"].values, _bf_se(reps), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(jk["gap_measured_se"].values, 0.0)
    ag = th.aggregate_ci(stats, "layer", level=None)
    reps = [th.aggregate(s, "layer")["gsnr_median"].values for s in ref]
    np.testing.assert_allclose(ag["gsnr_median_se"].values, _bf_se(reps), rtol=1e-9)
    da = th.jackknife(stats, lambda s: th.noise_scale(s)["b_simple"])
    reps = [th.noise_scale(s)["b_simple"].values for s in ref]
    np.testing.assert_allclose(da["b_simple_se"].values, _bf_se(reps), rtol=1e-9)


def test_jackknife_needs_blocks():
    stats, _, _ = make_stats()
    with pytest.raises(ValueError, match="blocks"):
        th.osgr_ci(stats, 8)
    one, _, _ = make_stats(blocks=1)
    with pytest.raises(ValueError, match="at least 2"):
        th.osgr_ci(one, 8)


# --------------------------------------------------------------------------------------
# Measured OSGR
# --------------------------------------------------------------------------------------


def test_osgr_trajectory():
    rng = np.random.default_rng(0)
    steps = np.array([0, 1, 2, 5, 6, 10])
    tr = np.cumsum(-rng.uniform(0.1, 1, 6)) + 10
    te = np.cumsum(-rng.uniform(0.05, 1, 6)) + 10
    traj = {"step": steps[::-1].copy(), "lr": np.full(6, 0.1), "epoch": np.zeros(6),
            "train_loss": tr[::-1].copy(), "test_loss": te[::-1].copy()}  # unsorted input
    out = th.osgr_trajectory(traj)
    np.testing.assert_allclose(out["osgr_measured"].values, -np.diff(te) / -np.diff(tr))
    np.testing.assert_array_equal(out["step"].values, steps[:-1])
    np.testing.assert_array_equal(out["n_steps"].values, np.diff(steps))
    w2 = th.osgr_trajectory(traj, window=2)
    np.testing.assert_allclose(w2["osgr_measured"].values, (te[:-2] - te[2:]) / (tr[:-2] - tr[2:]))
    stats, _, _ = make_stats(steps=(0, 5))
    out = th.osgr_trajectory(traj, stats, n=[16, 32])
    R = th.osgr(stats, [16, 32], split="test")["osgr"].sel(split="test")
    np.testing.assert_allclose(out["osgr_theory"].sel(step=[0, 1, 2]).values,
                               np.repeat(R.sel(step=[0]).values, 3, axis=0))
    np.testing.assert_allclose(out["osgr_theory"].sel(step=6).values, R.sel(step=5).values)
    with pytest.raises(ValueError, match="n"):
        th.osgr_trajectory(traj, stats)


def test_osgr_probe():
    rng = np.random.default_rng(1)
    rows = []
    for st in (0, 10):
        for n in (8, 64):
            for lr in (0.01, 0.1):
                for k in range(7):
                    tb, eb = rng.uniform(1, 2, 2)
                    rows.append((st, n, lr, k, tb, tb - rng.uniform(0.01, 0.1),
                                 eb, eb - rng.uniform(-0.02, 0.08)))
    arr = np.array(rows)
    rng.shuffle(arr)
    names = ["step", "n", "lr", "k", "train_before", "train_after", "test_before", "test_after"]
    probes = {c: arr[:, i] for i, c in enumerate(names)}
    stats, _, _ = make_stats(steps=(0, 10))
    out = th.osgr_probe(probes, stats)
    assert out.sizes["probe"] == 8
    R = th.osgr(stats, [8, 64], split="test")["osgr"].sel(split="test")
    for p in range(8):
        st, n, lr = (out[c].values[p] for c in ("step", "n", "lr"))
        sel = (arr[:, 0] == st) & (arr[:, 1] == n) & (arr[:, 2] == lr)
        dtr = arr[sel, 4] - arr[sel, 5]
        dte = arr[sel, 6] - arr[sel, 7]
        np.testing.assert_allclose(float(out["osgr_measured"][p]), dte.sum() / dtr.sum())
        loo = [(dte.sum() - dte[i]) / (dtr.sum() - dtr[i]) for i in range(dte.size)]
        np.testing.assert_allclose(float(out["osgr_se"][p]), _bf_se(loo), rtol=1e-12)
        assert int(out["n_probes"][p]) == 7
        np.testing.assert_allclose(float(out["osgr_theory"][p]), float(R.sel(step=st, n=n)))
    grid = out.set_index(probe=["step", "n", "lr"]).unstack("probe")
    assert grid["osgr_measured"].dims == ("step", "n", "lr")


# -- first order -----------------------------------------------------------------------


def _bf_first_order(A, B, subs_a, subs_b):
    num = np.array([A[a].astype(np.float64).sum(0) @ B[b].astype(np.float64).sum(0)
                    for a, b in zip(subs_a, subs_b, strict=True)])
    den = np.array([np.sum(A[a].astype(np.float64).sum(0) ** 2) for a in subs_a])
    return num, den


def test_first_order_kernel_vs_numpy_loop():
    rng = np.random.default_rng(0)
    P = 700  # several column blocks, last one partial
    A = rng.normal(size=(123, P)).astype(np.float32)
    B = rng.normal(size=(97, P)).astype(np.float32) + 0.3
    sa, sb = th._draw_subsets(np.random.default_rng(5), 123, 97, 20, 9)

    def chunks(x, r):
        return lambda: (x[i:i + r] for i in range(0, x.shape[0], r))

    num, den = th._first_order_core(chunks(A, 17), chunks(B, 50), (123, 97), P, sa, sb,
                                    col_block=256)
    # plain double loop: over subsets, and over rows of each subset
    ref_num, ref_den = [], []
    for a, b in zip(sa, sb, strict=True):
        ga = np.zeros(P)
        gb = np.zeros(P)
        for i in a:
            ga += A[i]
        for i in b:
            gb += B[i]
        ref_num.append(ga @ gb)
        ref_den.append(ga @ ga)
    np.testing.assert_allclose(num, ref_num, rtol=1e-12)
    np.testing.assert_allclose(den, ref_den, rtol=1e-12)
    # same pool: disjoint halves, single pass
    sa, sb = th._draw_subsets(np.random.default_rng(6), 123, None, 30, 5)
    for a, b in zip(sa, sb, strict=True):
        assert not set(a) & set(b)
    num, den = th._first_order_core(chunks(A, 31), None, (123, None), P, sa, sb)
    rn, rd = _bf_first_order(A, A, sa, sb)
    np.testing.assert_allclose(num, rn, rtol=1e-12)
    np.testing.assert_allclose(den, rd, rtol=1e-12)


def test_osgr_first_order_mapping():
    stats, raw, _ = make_stats(seed=15, N=60, dtype=np.float32)
    src = {k: v.astype(np.float32) for k, v in raw.items()}
    out = th.osgr_first_order(src, n=[5, 20], n_subsets=11, seed=3, stats=stats)
    assert out["osgr_first_order"].dims == ("step", "n")
    np.testing.assert_array_equal(out["step"].values, [0, 10, 30])
    rng = np.random.default_rng(3)
    for st in (0, 10, 30):
        for n in (5, 20):
            sa, sb = th._draw_subsets(rng, 60, 60, n, 11)
            num, den = _bf_first_order(src[(st, "train")], src[(st, "test")], sa, sb)
            sel = dict(step=st, n=n)
            np.testing.assert_allclose(float(out["osgr_first_order"].sel(sel)),
                                       num.sum() / den.sum(), rtol=1e-10)
            loo = (num.sum() - num) / (den.sum() - den)
            np.testing.assert_allclose(float(out["osgr_se"].sel(sel)), _bf_se(loo), rtol=1e-9)
            np.testing.assert_allclose(float(out["sqnorm_mean"].sel(sel)), den.mean() / n**2)
    R = th.osgr(stats, [5, 20], split="train")["osgr"].sel(split="train")
    np.testing.assert_allclose(out["osgr_theory"].values, R.values)
    # deterministic under a seed; n too large is an error
    again = th.osgr_first_order(src, n=[5, 20], n_subsets=11, seed=3)
    np.testing.assert_array_equal(again["osgr_first_order"].values,
                                  out["osgr_first_order"].values)
    with pytest.raises(ValueError, match="n=40"):
        th.osgr_first_order(src, 0, n=40, splits=("train", "train"))
    with pytest.raises(KeyError):
        th.osgr_first_order(src, 5, n=4)


def test_osgr_first_order_streams_stores_and_pools_shards(tmp_path):
    """A store (streamed in small row blocks) and the same rows split over shards and write
    batches give exactly the result of the in-memory mapping (same draws, same rows)."""
    import gsnr_stats as gs

    rng = np.random.default_rng(8)
    P = 300
    src = {(s, sp): (rng.normal(size=(N, P)) + 0.2).astype(np.float32)
           for s in (0, 5) for sp, N in (("train", 70), ("test", 50))}
    ref = th.osgr_first_order(src, n=[5, 20], n_subsets=9, seed=4)
    one = tmp_path / "one.h5"
    with gs.GradientWriter(one, [("w", (P,))]) as w:
        for (s, sp), g in src.items():
            w.write(s, sp, g[:33])  # two write batches per record
            w.write(s, sp, g[33:])
    out = th.osgr_first_order(one, n=[5, 20], n_subsets=9, seed=4, chunk_rows=8)
    np.testing.assert_allclose(out["osgr_first_order"].values, ref["osgr_first_order"].values,
                               rtol=1e-12)
    # three shards holding consecutive rows of every record; a glob and a list
    cuts = [0, 20, 41]
    for k in range(3):
        with gs.GradientWriter(tmp_path / f"shard-{k}.h5", [("w", (P,))], run_id="run") as w:
            for (s, sp), g in src.items():
                hi = cuts[k + 1] if k < 2 else g.shape[0]
                w.write(s, sp, g[cuts[k]:hi])
    for source in (str(tmp_path / "shard-*.h5"), sorted(tmp_path.glob("shard-*.h5"))):
        sh = th.osgr_first_order(source, n=[5, 20], n_subsets=9, seed=4, chunk_rows=16)
        np.testing.assert_allclose(sh["osgr_first_order"].values,
                                   ref["osgr_first_order"].values, rtol=1e-12)
        np.testing.assert_allclose(sh["osgr_se"].values, ref["osgr_se"].values, rtol=1e-10)
    with gs.GradientWriter(tmp_path / "other.h5", [("v", (P,))]) as w:
        w.write(0, "train", src[(0, "train")])
    with pytest.raises(gs.LayoutMismatchError, match="other.h5"):
        th.osgr_first_order([one, tmp_path / "other.h5"], n=5)


def test_osgr_first_order_agrees_with_theory_statistically():
    # many samples from one distribution: E[R1] = sum g^2 / sum (g^2 + rho^2/n)
    rng = np.random.default_rng(2)
    P, N, n = 30, 4000, 10
    mu = rng.normal(size=P) * 0.3
    sd = rng.uniform(0.5, 1.5, size=P)
    src = {(0, "a"): (mu + sd * rng.normal(size=(N, P))).astype(np.float32),
           (0, "b"): (mu + sd * rng.normal(size=(N, P))).astype(np.float32)}
    out = th.osgr_first_order(src, n=n, splits=("a", "b"), n_subsets=400, seed=0)
    truth = np.sum(mu**2) / np.sum(mu**2 + sd**2 / n)
    R1 = float(out["osgr_first_order"].squeeze())
    se = float(out["osgr_se"].squeeze())
    assert abs(R1 - truth) < 4 * se
    assert se < 0.1


# --------------------------------------------------------------------------------------
# CF attributes
# --------------------------------------------------------------------------------------


def test_cf_attrs_on_outputs():
    stats, raw, _ = make_stats(blocks=3)
    traj = {"step": np.arange(4), "lr": np.full(4, 0.1), "train_loss": np.array([3, 2, 1.5, 1.2]),
            "test_loss": np.array([3, 2.2, 1.9, 1.8])}
    outs = [th.osgr(stats, 8), th.osgr(stats, 8, by="tensor"), th.osgr_param(stats, 8),
            th.one_step_gap(stats, 8), th.accumulated_gap(stats, 8), th.measured_gap(stats),
            th.noise_scale(stats), th.aggregate(stats), th.osgr_ci(stats, 8),
            th.osgr_trajectory(traj, stats, n=8),
            th.osgr_first_order({k: v.astype(np.float32) for k, v in raw.items()}, n=4,
                                n_subsets=3)]
    ratios = {"osgr", "weight", "gap_theory", "gap_measured", "b_simple", "gsnr_mean",
              "gsnr_median", "gsnr_pooled", "osgr_se", "osgr_first_order", "osgr_measured",
              "osgr_theory"}
    for ds in outs:
        assert ds.attrs.get("title")
        for v in ds.data_vars:
            assert ds[v].attrs.get("long_name"), (ds.attrs["title"], v)
            if v in ratios:
                assert ds[v].attrs.get("units") == "1", (ds.attrs["title"], v)
        if "n" in ds.coords:
            assert ds["n"].attrs.get("long_name")


# --------------------------------------------------------------------------------------
# With the real store + reduce
# --------------------------------------------------------------------------------------


def _write_store(path, raw, losses, lr=0.1, traj=None):
    gs = pytest.importorskip("gsnr_stats")
    with gs.GradientWriter(path, params=[(n, (s,)) for n, s in LAYOUT]) as w:
        for (st, sp), x in raw.items():
            w.write(st, sp, x.astype(np.float32), loss=losses[(st, sp)], lr=lr)
            w.end_record(st, sp)
        if traj is not None:
            for row in zip(*traj, strict=True):
                w.write_trajectory(*row)
    return gs


def test_with_real_reduce(tmp_path):
    stats0, raw, losses = make_stats(seed=16, N=50, dtype=np.float32)
    raw = {k: v.astype(np.float32) for k, v in raw.items()}
    path = tmp_path / "run.h5"
    gs = _write_store(path, raw, losses)
    stats = gs.reduce(path, blocks=5)
    ref = moments_dataset({k: v.astype(np.float64) for k, v in raw.items()}, blocks=5,
                          lr=dict.fromkeys((0, 10, 30), 0.1), losses=losses)
    for fn in (lambda s: th.osgr(s, [4, 64], by="layer")["osgr"],
               lambda s: th.noise_scale(s)["b_simple"],
               lambda s: th.aggregate(s, "tensor")["gsnr_quantile"],
               lambda s: th.accumulated_gap(s, 500, method="trapezoid")["gap_theory"],
               lambda s: th.one_step_gap(s, 500)["gap_theory"]):
        np.testing.assert_allclose(fn(stats).values, fn(ref).values, rtol=1e-9)
    ci = th.osgr_ci(stats, [4, 64])
    reps = [th.osgr(s, [4, 64])["osgr"].values for s in _bf_loo_stats(raw, 5)]
    np.testing.assert_allclose(ci["osgr_se"].values, _bf_se(reps), rtol=1e-8)
    g = th.accumulated_gap(stats, 500)
    np.testing.assert_allclose(g["gap_measured"].values,
                               th.measured_gap(ref)["gap_measured"].values, rtol=1e-12)
    # first order from the store == from the in-memory arrays
    a = th.osgr_first_order(path, n=8, n_subsets=5, seed=1, stats=stats, chunk_rows=7)
    b = th.osgr_first_order(raw, n=8, n_subsets=5, seed=1)
    np.testing.assert_allclose(a["osgr_first_order"].values, b["osgr_first_order"].values,
                               rtol=1e-12)
    with gs.open_store(path) as store:
        c = th.osgr_first_order(store, [10], n=8, n_subsets=5, seed=1)
        assert c.sizes["step"] == 1


# --------------------------------------------------------------------------------------
# Which λ: the optimizer of attrs["optimizer"] (issue 12), closed forms per rule
# --------------------------------------------------------------------------------------

SPC = [10, 10, 20]  # optimizer steps between the checkpoints 0, 10, 20, 40 (no warning)


def _lam_stats(opt, lr=0.2):
    import json

    stats, raw, _ = make_stats(seed=9, steps=(0, 10, 20, 40), lr=lr)
    sV = np.array([_moments(raw[(s, "test")], 1)[3].sum() for s in (0, 10, 20, 40)])
    if opt is not None:
        stats = stats.assign_attrs(optimizer=json.dumps(opt))
    return stats, sV, raw


def _closed(sV, lam, n=100):
    return np.concatenate([[0], np.cumsum(lam * np.array(SPC) * sV[:-1] / n)])


TORCH_SGD = {"class": "SGD", "module": "torch.optim.sgd", "groups": [
    {"lr": 0.2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 5e-4, "nesterov": False,
     "params": ["fc1.weight", "fc1.bias"]},
    {"lr": 0.2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 5e-4, "nesterov": False,
     "params": ["fc2.weight", "fc2.bias"]}]}


def test_lambda_nominal_by_default_and_momentum_rule():
    stats, sV, raw = _lam_stats(TORCH_SGD)
    nom = th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC)
    np.testing.assert_allclose(nom["gap_theory"].sel(n=100).values, _closed(sV, 0.2), rtol=1e-12)
    note = nom.attrs["lambda_note"]
    assert "nominal learning rate of SGD with momentum 0.9" in note and "10× larger" in note
    assert "Weight decay / penalty (0.0005)" in note and "not in the gap's variance term" in note
    assert nom.attrs["optimizer_class"] == "SGD" and nom.attrs["lr_rule"] == "nominal"
    mom = th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC, lr_rule="momentum")
    np.testing.assert_allclose(mom["gap_theory"].sel(n=100).values, _closed(sV, 0.2 / 0.1),
                               rtol=1e-12)
    assert "effective step" in mom.attrs["lambda_note"] and mom.attrs["lambda_factor"] == \
        pytest.approx(10.0, rel=1e-15)
    one = th.one_step_gap(stats, 50, lr_rule="momentum", split="test", steps_per_checkpoint=SPC)
    v = _moments(raw[(10, "test")], 1)[3].sum()
    np.testing.assert_allclose(float(one["gap_theory"].sel(step=10, split="test", n=50)),
                               0.2 / (1 - 0.9) * v / 50, rtol=1e-12)
    # dampening d: (1 - d) / (1 - mu)
    damp = {"class": "SGD", "groups": [{"lr": 0.2, "momentum": 0.8, "dampening": 0.5}]}
    st2, _, _ = _lam_stats(damp)
    d = th.accumulated_gap(st2, 100, steps_per_checkpoint=SPC, lr_rule="momentum")
    np.testing.assert_allclose(d["gap_theory"].sel(n=100).values, _closed(sV, 0.2 * 0.5 / 0.2),
                               rtol=1e-12)


@pytest.mark.parametrize("opt, label, kind", [
    ({"class": "Adam", "groups": [{"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                   "weight_decay": 0.0}]}, "Adam", "adaptive"),
    ({"class": "MLPClassifier", "module": "sklearn.neural_network", "solver": "adam",
      "learning_rate_init": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "alpha": 1e-4},
     "MLPClassifier (solver 'adam')", "adaptive"),
    ({"class": "optax", "states": ["ScaleByAdamState", "EmptyState"],
      "hyperparams": {"learning_rate": 1e-3}}, "optax (ScaleByAdamState, EmptyState)",
     "adaptive"),
    ({"class": "LogisticRegression", "solver": "lbfgs", "C": 1.0},
     "LogisticRegression (solver 'lbfgs')", "other"),
    (None, None, "unknown"),
])
def test_lambda_nominal_for_adaptive_and_unknown(opt, label, kind):
    stats, sV, _ = _lam_stats(opt)
    g = th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC)
    np.testing.assert_allclose(g["gap_theory"].sel(n=100).values, _closed(sV, 0.2), rtol=1e-12)
    note = g.attrs["lambda_note"]
    if kind == "unknown":
        assert note == "λ = the nominal learning rate (optimizer unknown: none recorded)."
        assert g.attrs["optimizer_class"] == "unknown"
        match = "optimizer is unknown"
    else:
        assert f"nominal learning rate of {label}" in note
        assert ("no single λ" in note) == (kind == "adaptive")
        match = "is not SGD with momentum"
    with pytest.raises(ValueError, match=match):
        th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC, lr_rule="momentum")


@pytest.mark.parametrize("opt, factor", [
    ({"class": "MLPClassifier", "solver": "sgd", "momentum": 0.9, "nesterovs_momentum": True,
      "learning_rate_init": 0.2, "alpha": 1e-4}, 10.0),
    ({"class": "SGDClassifier", "solver": "sgd", "eta0": 0.2, "alpha": 1e-4}, 1.0),
    ({"class": "optax", "states": ["TraceState", "EmptyState"],
      "hyperparams": {"learning_rate": 0.2, "momentum": 0.5}}, 2.0),
])
def test_momentum_rule_across_recorders(opt, factor):
    stats, sV, _ = _lam_stats(opt)
    g = th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC, lr_rule="momentum")
    np.testing.assert_allclose(g["gap_theory"].sel(n=100).values, _closed(sV, 0.2 * factor),
                               rtol=1e-12)


def test_lambda_refusals_and_groups_with_different_lrs():
    stats, _, _ = _lam_stats({"class": "SGD", "groups": [{"lr": 0.1, "momentum": 0.9},
                                                        {"lr": 0.1, "momentum": 0.5}]})
    with pytest.raises(ValueError, match="differ in momentum"):
        th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC, lr_rule="momentum")
    with pytest.raises(ValueError, match="lr_rule must be one of"):
        th.accumulated_gap(stats, 100, steps_per_checkpoint=SPC, lr_rule="adam")
    trace = {"class": "optax", "states": ["TraceState"], "hyperparams": {"learning_rate": 0.1}}
    st, _, _ = _lam_stats(trace)
    with pytest.raises(ValueError, match="decay μ was not recorded"):
        th.accumulated_gap(st, 100, steps_per_checkpoint=SPC, lr_rule="momentum")
    # several groups with different learning rates: no single lr recorded (NaN) -> say so
    two = {"class": "SGD", "groups": [{"lr": 0.1, "momentum": 0.0}, {"lr": 0.01}]}
    st, sV, _ = _lam_stats(two, lr=None)
    with pytest.raises(ValueError, match=r"SGD\) has 2 parameter groups with different "
                                         r"learning rates \(0\.1, 0\.01\)"):
        th.accumulated_gap(st, 100, steps_per_checkpoint=SPC)
    g = th.accumulated_gap(st, 100, steps_per_checkpoint=SPC, lr=0.05)
    np.testing.assert_allclose(g["gap_theory"].sel(n=100).values, _closed(sV, 0.05), rtol=1e-12)
    assert g.attrs["lr_source"] == "lr= given"
