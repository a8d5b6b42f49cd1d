"""`gsnr-stats report`: the page, its figures, and numbers equal to the theory functions'."""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from gsnr_stats.adapters import sklearn as gk
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier

import gsnr_stats as gs
from gsnr_stats import theory as th
from gsnr_stats.cli import main
from gsnr_stats.errors import StoreError
from gsnr_stats.report import fmt, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    """Logistic regression (SGD) on 3 digit classes: 3 checkpoints x (train, test) + probes."""
    X, y = load_digits(n_class=3, return_X_y=True)
    X = X / 16.0
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    est = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.01, alpha=1e-4,
                        random_state=0)
    path = tmp_path_factory.mktemp("rep") / "run.h5"
    est.partial_fit(Xtr[:30], ytr[:30], classes=[0, 1, 2])
    with gk.open_writer(path, est, attrs={"run": "report-test"}) as w:
        step = 30
        for epoch in range(3):
            if epoch:
                est.partial_fit(Xtr, ytr)
                step += len(ytr)
            # step counts SGD updates (one per sample): recorded as the optimizer step
            gk.record(w, est, Xtr, ytr, step=step, split="train", lr=0.01, epoch=epoch,
                      optimizer_step=step)
            gk.record(w, est, Xte, yte, step=step, split="test", lr=0.01, epoch=epoch,
                      optimizer_step=step)
            gk.probe_osgr(est, Xtr, ytr, Xte, yte, n=50, lr=1e-3, k=8, rng=epoch, writer=w,
                          step=step)
    return path


def _rows(page: str, section: str) -> list[list[str]]:
    """Body rows of the first Markdown table after the heading ``section``."""
    table: list[str] = []
    for ln in page.split(f"## {section}\n", 1)[1].splitlines():
        if ln.startswith("|"):
            table.append(ln)
        elif table:
            break
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]


@pytest.fixture(scope="module")
def report_dir(run_store, tmp_path_factory):
    """The page of run_store with real figures, drawn once for the tests that read it."""
    out = tmp_path_factory.mktemp("page") / "rep"
    page = write_report([run_store], out, n=[50, 300], blocks=4)
    assert page == out / "report.md"
    return out


def test_report_page_figures_and_numbers(run_store, report_dir):
    out = report_dir
    text = (out / "report.md").read_text()
    # figures exist, are PNGs and are linked from the page
    for name in ("gsnr_trajectories", "gsnr_histogram", "osgr", "train_vs_test_gsnr", "gap",
                 "osgr_scatter"):
        f = out / f"{name}.png"
        assert f.read_bytes()[:8] == PNG
        assert f"]({name}.png)" in text
    # numbers on the page equal the theory functions' on an independent reduce
    stats = gs.reduce(run_store, blocks=4)
    R = th.osgr_ci(stats, [50, 300], split="test")
    rows = _rows(text, "OSGR, theory")
    assert len(rows) == 3 * 2
    for r in rows:
        st, nv = int(r[0]), int(r[1])
        sel = R.sel(step=st, split="test", n=nv)
        assert r[2] == fmt(float(sel["osgr"]))
        assert r[3] == fmt(float(sel["osgr_se"]))
    ag = th.aggregate(stats, by="layer", quantiles=(0.5,))
    for r in _rows(text, "Median GSNR per layer"):
        a = ag.sel(step=int(r[0]), split=r[1], group=r[2])
        assert r[2] == "linear"
        assert r[3] == fmt(float(a["gsnr_median"]))
        assert r[4] == fmt(float(a["gsnr_pooled"]))
    # the median itself, by numpy from the recorded gradients (independent route)
    with gs.open_store(run_store) as s:
        st0 = s.steps[0]
        g = s.read_grads(st0, "train").astype(np.float64)
    m, v = g.mean(0), g.var(0, ddof=1)
    r_np = np.where(v > 0, m * m / np.where(v > 0, v, 1), np.nan)
    med_row = [r for r in _rows(text, "Median GSNR per layer") if int(r[0]) == st0
               and r[1] == "train"][0]
    assert float(med_row[3]) == pytest.approx(np.nanmedian(r_np), rel=5e-4)  # 4 figures
    gap = th.accumulated_gap(stats, 300, split="test")
    for r in _rows(text, "Generalization gap"):
        g_ = gap.sel(step=int(r[0]))
        assert r[1] == fmt(float(g_["gap_measured"]))
        assert r[2] == fmt(float(g_["gap_theory_offset"].sel(n=300)))
    B = th.noise_scale(stats)
    rows = _rows(text, "Gradient noise scale")
    assert len(rows) == 3 * 2
    for r in rows:
        assert r[2] == fmt(float(B["b_simple"].sel(step=int(r[0]), split=r[1])))
    with gs.open_store(run_store) as s:
        pr = th.osgr_probe(s.probes(), stats, split="test")
    prow = _rows(text, "OSGR, measured by probes")
    assert len(prow) == 3
    for i, r in enumerate(prow):
        assert r[3] == fmt(float(pr["osgr_measured"][i]))
    # the reduced moments are saved next to the page
    saved = xr.load_dataset(out / "stats.nc")
    np.testing.assert_allclose(saved["mean"].values, stats["mean"].values, rtol=0, atol=0)


def test_report_from_netcdf_and_cli(run_store, tmp_path, capsys, no_render):
    nc = tmp_path / "s.nc"
    assert main(["reduce", str(run_store), "-o", str(nc), "-q"]) == 0
    assert main(["report", str(nc), "-o", str(tmp_path / "r"), "-n", "300"]) == 0
    page = tmp_path / "r" / "report.md"
    printed = capsys.readouterr().out.split()
    assert str(page) in printed and str(page.with_suffix(".html")) in printed
    assert page.with_suffix(".html").read_text().startswith("<!DOCTYPE html>")
    text = page.read_text()
    stats = xr.load_dataset(nc)
    R = th.osgr(stats, 300, split="test")
    rows = _rows(text, "OSGR, theory")
    assert [r[2] for r in rows] == [fmt(float(R["osgr"].sel(step=int(r[0]), split="test", n=300)))
                                    for r in rows]
    assert "no per-block moments" in text


def test_report_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.nc"
    xr.Dataset({"x": ("a", [1.0])}).to_netcdf(bad)
    with pytest.raises(StoreError, match="lacks"):
        write_report(bad, tmp_path / "o")
    # a missing input is a command-line mistake: exit 2 (issue 13), naming the file
    assert main(["report", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "o")]) == 2
    assert "missing.h5: no such file" in capsys.readouterr().err


def test_report_bad_options(run_store, tmp_path, capsys):
    # wrong option values are usage errors: exit 2 (issue 13)
    assert main(["report", str(run_store), "-o", str(tmp_path / "o"), "--split", "nope"]) == 2
    assert "split 'nope' is not in the data" in capsys.readouterr().err
    assert main(["report", str(run_store), "-o", str(tmp_path / "o"), "--by", "nope"]) == 2
    assert "cannot group by 'nope'" in capsys.readouterr().err


# -- sections that cannot be computed say why (issue 13); λ and spacing named (issue 12) ----


@pytest.fixture
def no_render(monkeypatch):
    """Figures are built but not drawn (the page's text is under test, drawing is not)."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: open(path, "wb").close())


@pytest.fixture(scope="module")
def no_lr_store(tmp_path_factory):
    """sklearn's default path: records written without lr=; mean log losses kept aside."""
    from sklearn.metrics import log_loss

    X, y = load_digits(n_class=2, return_X_y=True)  # binary: one log loss per sample
    X = X / 16.0
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    est = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.01, alpha=1e-4,
                        random_state=0)
    est.partial_fit(Xtr[:30], ytr[:30], classes=[0, 1])
    path = tmp_path_factory.mktemp("nolr") / "run.h5"
    gaps = {}
    with gk.open_writer(path, est) as w:
        for step in (30, 330):
            if step > 30:
                est.partial_fit(Xtr, ytr)
            gk.record(w, est, Xtr, ytr, step=step, split="train")
            gk.record(w, est, Xte, yte, step=step, split="test")
            gaps[step] = (log_loss(yte, est.predict_proba(Xte), labels=[0, 1])
                          - log_loss(ytr, est.predict_proba(Xtr), labels=[0, 1]))
    return path, gaps


def test_report_without_learning_rate(no_lr_store, tmp_path, capsys, no_render):
    # the original crash: KeyError "No variable named 'gap_theory'" from the gap figure
    path, gaps = no_lr_store
    assert main(["report", str(path), "-o", str(tmp_path / "cli")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    text = write_report(path, tmp_path / "r").read_text()
    assert ("theoretical gap: not computed — no learning rate recorded; record with lr= or pass "
            "lr= (CLI: --lr) (optimizer") in text
    rows = _rows(text, "Generalization gap")
    assert [r[0] for r in rows] == ["30", "330"] and all(r[2] == "—" for r in rows)
    for r in rows:  # the measured gap, against sklearn's own log loss
        assert float(r[1]) == pytest.approx(gaps[int(r[0])], rel=5e-4, abs=1e-6)  # 4 figures
    assert (tmp_path / "r" / "gap.png").is_file()  # the measured gap alone (test_plot draws it)
    assert "Measured OSGR by probes: not computed — the stores hold no probe rows" in text
    # given lr=, the theory is there: sum_u lr sum_j V_j / n over the 300 updates
    with pytest.warns(gs.errors.StepSpacingWarning):  # no optimizer_step recorded here
        text = write_report(path, tmp_path / "r2", n=300, lr=0.01).read_text()
    stats = gs.reduce(path)
    sV = float(stats["var"].sel(step=30, split="test").sum())
    got, bound = _increments(text)
    assert abs(got[0] - 0.01 * 300 * sV / 300) <= bound[0]


def test_report_and_plot_cli_take_lr_and_step_spacing(no_lr_store, tmp_path, capsys, no_render):
    # the report's sentences point at --lr / --steps-per-checkpoint: the flags must exist and
    # give the same numbers as the Python API (300 updates between the two checkpoints)
    path, _ = no_lr_store
    out = tmp_path / "cli"
    assert main(["report", str(path), "-o", str(out), "-n", "300", "--lr", "0.01",
                 "--steps-per-checkpoint", "300"]) == 0
    got, bound = _increments((out / "report.md").read_text())
    stats = gs.reduce(path)
    sV = float(stats["var"].sel(step=30, split="test").sum())
    assert abs(got[0] - 0.01 * 300 * sV / 300) <= bound[0]
    nc = tmp_path / "s.nc"
    stats.to_netcdf(nc)
    assert main(["plot", str(nc), "-o", str(tmp_path / "figs"), "--lr", "0.01",
                 "--steps-per-checkpoint", "300", "--lr-rule", "nominal"]) == 0
    assert (tmp_path / "figs" / "gap.png").is_file()
    assert "Traceback" not in capsys.readouterr().err


def _increments(page: str) -> tuple[np.ndarray, np.ndarray]:
    """Increments of the page's theory-gap column and their bound from its 4 significant
    figures (each printed value is within 5e-4 of itself, relatively)."""
    v = np.array([float(r[2]) for r in _rows(page, "Generalization gap")])
    return np.diff(v), 5e-4 * (np.abs(v[1:]) + np.abs(v[:-1]))


def _nc(stats: xr.Dataset, tmp_path, name: str):
    p = tmp_path / f"{name}.nc"
    stats.to_netcdf(p)
    return p


def _stats_with(run_store, optimizer: dict | None, lr_nan: bool = False) -> xr.Dataset:
    import json

    stats = gs.reduce(run_store)
    if lr_nan:
        stats["lr"][:] = np.nan
    if optimizer is not None:
        stats.attrs["optimizer"] = json.dumps(optimizer)
    return stats.assign_coords(optimizer_step=("step", stats["step"].values))


def test_report_several_groups_with_different_lrs(run_store, tmp_path, no_render):
    two = {"class": "SGD", "module": "torch.optim.sgd",
           "groups": [{"lr": 0.1, "momentum": 0.0, "params": ["linear.weight"]},
                      {"lr": 0.01, "momentum": 0.0, "params": ["linear.bias"]}]}
    nc = _nc(_stats_with(run_store, two, lr_nan=True), tmp_path, "two")
    text = write_report(nc, tmp_path / "o").read_text()
    assert ("theoretical gap: not computed — the optimizer (SGD) has 2 parameter groups with "
            "different learning rates (0.1, 0.01), so no single learning rate was recorded; "
            "pass lr= (CLI: --lr) with the λ to use (optimizer: SGD).") in text


def test_report_names_optimizer_and_lambda(run_store, tmp_path, no_render):
    sgd = {"class": "SGD", "groups": [{"lr": 0.01, "momentum": 0.9, "dampening": 0.0,
                                       "weight_decay": 0.0}]}
    stats = _stats_with(run_store, sgd)
    nc = _nc(stats, tmp_path, "sgd")
    nominal = write_report(nc, tmp_path / "a", n=300).read_text()
    assert ("λ = the nominal learning rate of SGD with momentum 0.9; its effective long-run "
            "step lr/(1 − μ) would give a 10× larger gap (lr_rule='momentum').") in nominal
    assert "from the recorded `optimizer_step` (30, 330, 630)" in nominal
    mom = write_report(nc, tmp_path / "b", n=300, lr_rule="momentum").read_text()
    assert "λ = effective step lr·(1 − dampening)/(1 − μ) = 10 × lr of SGD" in mom
    # increments of the theory: lr/(1 - mu) * 300 updates * sum V(test) / n, by hand
    sV = stats["var"].sel(split="test").sum("param").values
    want = 0.01 / (1 - 0.9) * 300 * sV[:2] / 300
    got, bound = _increments(mom)
    assert (np.abs(got - want) <= bound).all(), (got, want)
    got, bound = _increments(nominal)
    assert (np.abs(got - want / 10) <= bound).all(), (got, want / 10)
    adam = _nc(_stats_with(run_store, {"class": "Adam", "groups": [{"lr": 1e-3,
                                                                    "betas": [0.9, 0.999]}]}),
               tmp_path, "adam")
    assert "nominal learning rate of Adam: its per-parameter step" in \
        write_report(adam, tmp_path / "c", n=300).read_text()
    unknown = write_report(_nc(_stats_with(run_store, None), tmp_path, "unk"), tmp_path / "d",
                           n=300).read_text()
    assert "λ = the nominal learning rate (optimizer unknown: none recorded)." in unknown


def test_report_gap_section_without_test_split_or_losses(run_store, tmp_path, no_render):
    stats = gs.reduce(run_store)
    only = _nc(stats.sel(split=["train"]), tmp_path, "train")
    text = write_report(only, tmp_path / "a", split="train").read_text()
    assert ("generalization gap: not computed — needs a 'train' and a 'test' split (splits "
            "here: train).") in text
    no_loss = _nc(stats.drop_vars("loss_mean"), tmp_path, "noloss")
    text = write_report(no_loss, tmp_path / "b").read_text()
    assert "generalization gap: not computed — the records hold no per-sample losses" in text
    assert "the input is a stats netCDF, which holds no probe rows" in text


def test_report_says_why_values_are_negative(tmp_path, no_render):
    # breast_cancer, LogisticRegression fitted on the train split (issue 12's observation)
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    est = LogisticRegression(max_iter=1000).fit(X[:400], y[:400])
    path = tmp_path / "bc.h5"
    with gk.open_writer(path, est) as w:
        gk.record(w, est, X[:400], y[:400], step=0, split="train")
        gk.record(w, est, X[400:], y[400:], step=0, split="test")
    with pytest.warns(gs.errors.SignalBelowNoiseWarning, match="split 'train'"):
        text = write_report(path, tmp_path / "r", split="train").read_text()
    r = [row for row in _rows(text, "OSGR, theory")]
    assert float(r[0][2]) < 0
    assert ("Why some `osgr` values are negative or NaN: debiased signal below noise: the "
            "training split is fitted (its per-sample gradients sum to ~0 at an optimum)") in text
    assert "Why some `b_simple` values are negative or NaN: debiased signal below noise" in text


def test_report_default_adam_mlp(tmp_path, no_render):
    # issue 13: the default (Adam) MLPClassifier records no single learning rate
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(n_class=3, return_X_y=True)
    X = X / 16.0
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    est = MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    path = tmp_path / "mlp.h5"
    with gk.open_writer(path, est, X=Xtr, y=ytr) as w:
        traj = gk.record_trajectory(w, est, Xtr, ytr, Xte, yte, epochs=2)
    assert np.isnan(traj["lr"]).all()
    text = write_report(path, tmp_path / "a", n=300).read_text()
    assert ("theoretical gap: not computed — no learning rate recorded; record with lr= or pass "
            "lr= (CLI: --lr) (optimizer: MLPClassifier (solver 'adam')).") in text
    text = write_report(path, tmp_path / "b", n=300, lr=1e-3).read_text()
    assert "λ = the nominal learning rate of MLPClassifier (solver 'adam'): its per-parameter " \
        "step ≈ lr/(sqrt(v) + eps) has no single λ" in text
    steps = [int(v) for v in traj["step"]]  # 2 minibatch updates per epoch (batch 200)
    assert f"from the recorded `optimizer_step` ({', '.join(map(str, steps))})" in text
    with gs.open_store(path) as s:
        sV = [s.read_grads(st, "test").astype(np.float64).var(0, ddof=1).sum() for st in steps]
    got, bound = _increments(text)
    want = 1e-3 * np.diff(steps) * np.array(sV[:-1]) / 300
    assert (np.abs(got - want) <= bound).all(), (got, want, bound)


# -- a page a non-expert reads, and one file to send (issue 13) ------------------------------

_FLOAT = re.compile(r"(?<![\w.:+-])[-+]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?e[-+]?\d+)(?![\w.])")


def _sig_figs(tok: str) -> int:
    mant = tok.lower().lstrip("+-").split("e")[0].replace(".", "").lstrip("0")
    return len(mant) if mant else 1


def _tables(page: str) -> list[list[list[str]]]:
    """Every Markdown table of the page: header row then body rows, cells stripped."""
    out, cur = [], []
    for ln in page.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            out.append([[c.strip() for c in r.strip("|").split(" | ")]
                        for i, r in enumerate(cur) if i != 1])
            cur = []
    return out


def test_fmt_prints_four_significant_figures():
    # the page printed 6 (0.333333); 4 are all the estimates' errors justify
    assert fmt(1 / 3) == "0.3333"
    assert fmt(2 / 3) == "0.6667"
    assert fmt(-0.000123456) == "-0.0001235"
    assert fmt(123456.7) == "1.235e+05"
    assert fmt(0.081) == "0.081"
    assert fmt(1257) == "1257" and fmt(np.int64(12345)) == "12345"  # counts and steps exact
    assert (fmt(float("nan")), fmt(float("inf")), fmt("—")) == ("nan", "inf", "—")


def test_report_numbers_have_at_most_four_figures(report_dir):
    text = (report_dir / "report.md").read_text()
    toks = _FLOAT.findall(text)
    assert len(toks) > 40  # the tables' numbers were found
    too_long = [t for t in toks if _sig_figs(t) > 4]
    assert not too_long, too_long[:10]


def test_report_tables_are_long_not_wide(run_store, tmp_path, no_render):
    # 12 layers: the GSNR table was step, split + 12 medians + 12 pooled = 26 columns
    stats = gs.reduce(run_store, blocks=4)
    P = stats.sizes["param"]
    names = [f"layer{i % 12:02d}" for i in range(P)]
    stats = stats.assign_coords(layer=("param", names))
    text = write_report(stats, tmp_path / "r", n=300).read_text()
    tables = _tables(text)
    assert max(len(t[0]) for t in tables) <= 8, [t[0] for t in tables]
    assert len(tables) == 6  # provenance, records, GSNR, OSGR, gap, noise (no probes here)
    assert all(len(r) == len(t[0]) for t in tables for r in t)
    # the long GSNR table: one row per (step, split, layer), values from numpy directly
    rows = _rows(text, "Median GSNR per layer")
    assert len(rows) == 3 * 2 * 12
    lay = np.array(names)
    with gs.open_store(run_store) as s:
        grads = {(st, sp): s.read_grads(st, sp).astype(np.float64) for st in s.steps
                 for sp in ("train", "test")}
    for r in rows:
        st, sp, g = int(r[0]), r[1], r[2]
        sub = grads[st, sp][:, lay == g]
        m, v = sub.mean(0), sub.var(0, ddof=1)
        ok = v > 0
        assert float(r[3]) == pytest.approx(np.median(m[ok] ** 2 / v[ok]), rel=5e-4)
        assert float(r[4]) == pytest.approx((m ** 2).sum() / v.sum(), rel=5e-4)
    # the noise scale: one row per (step, split), not one column per split
    assert [len(r) for r in _rows(text, "Gradient noise scale")] == [3] * 6


def test_report_cites_the_paper_not_repository_docs(report_dir):
    for name in ("report.md", "report.html"):
        text = (report_dir / name).read_text()
        assert "docs/" not in text and ".md'" not in text
        assert "Liu, J." in text and "ICLR 2020" in text and "arXiv:2001.07384" in text


def test_report_formulas_have_plain_words(report_dir):
    lines = (report_dir / "report.md").read_text().splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith("Formula: `")]
    formulas = [lines[i] for i in at]
    for want in ("r_j = m_j^2 / s_j^2", "R(n) = sum_j G_j / sum_j (G_j + V_j / n)",
                 "gap = mean test loss - mean train loss", "B_simple = ", "R = sum dL[D']"):
        assert any(want in f for f in formulas), want
    names = ["signal-to-noise ratio", "one-step generalization ratio", "generalization gap",
             "batch size", "OSGR measured directly"]
    for i, name in zip(at, names, strict=True):
        meaning = lines[i + 1]  # right beside the formula
        assert meaning.startswith("In plain words: ") and name in meaning
        assert len(meaning.split()) >= 30
    # and in the HTML: each formula paragraph is followed by its meaning
    html_text = (report_dir / "report.html").read_text()
    pairs = re.findall(r'<p class="formula">Formula: <code>[^<]*</code></p>\n'
                       r'<p class="meaning">In plain words: ', html_text)
    assert len(pairs) == len(at) == 5


def _provenance_rows(text: str) -> list[list[str]]:
    return _rows(text, "Provenance")


def test_report_provenance_same_from_nc_as_from_stores(run_store, report_dir, tmp_path,
                                                       no_render):
    from_stores = _provenance_rows((report_dir / "report.md").read_text())
    nc = tmp_path / "s.nc"
    assert main(["reduce", str(run_store), "-o", str(nc), "-q", "--blocks", "4"]) == 0
    from_nc = _provenance_rows(write_report(nc, tmp_path / "a", n=[50, 300]).read_text())
    from_dir = _provenance_rows(write_report(report_dir, tmp_path / "b").read_text())
    assert from_nc == from_stores and from_dir == from_stores
    got = dict(map(tuple, from_stores))
    with gs.open_store(run_store) as s:  # the values, read from the store itself
        want = {"reduced by gsnr-stats": gs.__version__, "store files": str(run_store),
                "run id": s.attrs["run_id"], "parameter layout hash": s.layout.hash,
                "framework": s.attrs["framework"], "parameters": str(s.layout.n_params),
                "variance ddof": "1"}
        fw_version = s.attrs.get("framework_version")
        created = s.attrs["created_at"]
    assert {k: got.get(k) for k in want} == want
    # the store's own date and attributes, beside the table, when built from the store
    assert (f"From the first store (a stats file does not keep these): written {created}; "
            "attributes recorded with it `{") in (report_dir / "report.md").read_text()
    if "framework_version" in xr.load_dataset(nc).attrs:  # kept by reduce (stats .nc CF work)
        assert got["framework version"] == fw_version
        assert got["model"] == "SGDClassifier"


class _HTMLCheck(html.parser.HTMLParser):
    """Tags, attributes, heading texts and table cells of a page; flags unbalanced tags."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.h2: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("h2", "td", "th"):
            self._text = []
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("h2", "td", "th") and self._text is not None:
            t = "".join(self._text).strip()
            if tag == "h2":
                self.h2.append(t)
            else:
                self.tables[-1][-1].append(t)
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def _png_ok(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG whose every chunk's CRC holds and whose image data inflate."""
    assert data[:8] == PNG
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and idat
    w, h = struct.unpack(">II", data[16:24])
    bit_depth, colour = data[24], data[25]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(idat)  # one filter byte per row + the row's samples
    assert len(raw) == h * (1 + (w * channels * bit_depth + 7) // 8)
    return w, h


def test_report_html_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text()
    p = _HTMLCheck()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    # no reference to anything outside the file
    for tag, a in p.tags:
        assert tag not in ("link", "script", "iframe", "object", "embed"), tag
        for k in ("href", "srcset", "poster", "data", "action"):
            assert k not in a, (tag, a)
        if "src" in a:
            assert tag == "img" and a["src"].startswith("data:image/png;base64,")
    assert "url(" not in text and "@import" not in text
    # every figure embedded, byte for byte the PNG written beside it, and a valid PNG
    imgs = [a for t, a in p.tags if t == "img"]
    pngs = sorted(report_dir.glob("*.png"))
    assert len(imgs) == len(pngs) == 6
    by_alt = {a["alt"]: base64.b64decode(a["src"].split(",", 1)[1], validate=True)
              for a in imgs}
    for f in pngs:
        assert by_alt[f.stem] == f.read_bytes()
        w, h = _png_ok(by_alt[f.stem])
        assert w > 100 and h > 100
    # all sections, and the same tables as the Markdown (same cells, rows of header width)
    md = (report_dir / "report.md").read_text()
    assert p.h2 == [ln[3:] for ln in md.splitlines() if ln.startswith("## ")]
    assert p.h2 == ["Provenance", "Records", "Median GSNR per layer", "OSGR, theory",
                    "Generalization gap", "Gradient noise scale", "OSGR, measured by probes",
                    "Figures", "Files"]
    for t in p.tables:
        assert all(len(r) == len(t[0]) for r in t)
    strip = [[[c.replace("`", "") for c in r] for r in t] for t in _tables(md)]
    assert p.tables == strip


_BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
             "headless_shell")
_PROBE = """<script>
window.__errs = [];
window.addEventListener('error', function (e) {
  window.__errs.push(e.message || ('failed to load ' + (e.target && e.target.tagName)));
}, true);
console.error = function () { window.__errs.push([].join.call(arguments, ' ')); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    widths: imgs.map(function (i) { return i.complete ? i.naturalWidth : -1; }),
    errors: window.__errs, tables: document.querySelectorAll('table').length});
  document.body.appendChild(out);
});
</script>"""


def _render(browser: str, page: Path, tmp: Path) -> dict:
    """Load ``page`` in the headless browser with a probe script; what the probe saw."""
    probed = tmp / page.name
    probed.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
           "--virtual-time-budget=10000", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--user-data-dir={tmp / 'profile'}", probed.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp)})
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stdout[-2000:]
    return json.loads(html.unescape(m.group(1)))


def test_report_html_renders_in_a_headless_browser(report_dir, tmp_path):
    browser = next((b for b in map(shutil.which, _BROWSERS) if b), None)
    if browser is None:
        pytest.skip("no headless browser installed (chromium-headless-shell, chromium, "
                    "google-chrome); the HTML is checked by parsing in "
                    "test_report_html_is_self_contained")
    page = report_dir / "report.html"
    got = _render(browser, page, tmp_path)
    want = sorted(_png_ok(f.read_bytes())[0] for f in report_dir.glob("*.png"))
    assert sorted(got["widths"]) == want  # every figure decoded, at its own width
    assert got["errors"] == []
    assert got["tables"] == len(_tables((report_dir / "report.md").read_text())) == 7
    # the probe can fail: a figure whose data is damaged does not decode
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.html").write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    got = _render(browser, bad / "report.html", bad)
    assert sorted(got["widths"])[0] == 0 and len(got["widths"]) == len(want)
    assert any("IMG" in e for e in got["errors"])


def test_report_osgr_figure_gets_the_confidence_band(run_store, tmp_path, monkeypatch,
                                                     no_render):
    # the OSGR figure was drawn from theory.osgr (no interval) whatever the page showed
    from gsnr_stats import plot

    seen: list[xr.Dataset] = []
    orig = plot.osgr_plot
    monkeypatch.setattr(plot, "osgr_plot", lambda ds, *a, **k: seen.append(ds) or orig(ds, *a,
                                                                                         **k))
    text = write_report(run_store, tmp_path / "a", n=[50, 300], blocks=4).read_text()
    last = seen[-1]  # the figure the page shows, drawn after save_all's
    assert "osgr_lo" in last and "osgr_hi" in last
    assert "](osgr.png)" in text and "with its 95 % jackknife band" in text
    ci = th.osgr_ci(gs.reduce(run_store, blocks=4), [50, 300], split="test")
    for v in ("osgr", "osgr_lo", "osgr_hi"):
        np.testing.assert_allclose(last[v].sel(split="test").values,
                                   ci[v].sel(split="test").values, rtol=1e-12)
    seen.clear()
    text = write_report(run_store, tmp_path / "b", n=300, blocks=None).read_text()
    assert "osgr_lo" not in seen[-1] and "band" not in text.split("](osgr.png)")[1][:200]
