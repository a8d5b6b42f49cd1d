"""`gsnr-stats report`: the page, its figures, and numbers equal to the theory functions'."""

from __future__ import annotations

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
            gk.record(w, est, Xtr, ytr, step=step, split="train", lr=0.01, epoch=epoch)
            gk.record(w, est, Xte, yte, step=step, split="test", lr=0.01, epoch=epoch)
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


def test_report_page_figures_and_numbers(run_store, tmp_path):
    out = tmp_path / "rep"
    page = write_report([run_store], out, n=[50, 300], blocks=4)
    text = page.read_text()
    assert page == out / "report.md"
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
        a = ag.sel(step=int(r[0]), split=r[1], group="linear")
        assert r[2] == fmt(float(a["gsnr_median"]))
        assert r[3] == fmt(float(a["gsnr_pooled"]))
    # the median itself, by numpy from the recorded gradients (independent route)
    with gs.open_store(run_store) as s:
        st0 = s.steps[0]
        g = s.read_grads(st0, "train").astype(np.float64)
    m, v = g.mean(0), g.var(0, ddof=1)
    r_np = np.where(v > 0, m * m / np.where(v > 0, v, 1), np.nan)
    med_row = [r for r in _rows(text, "Median GSNR per layer") if int(r[0]) == st0
               and r[1] == "train"][0]
    assert float(med_row[2]) == pytest.approx(np.nanmedian(r_np), rel=1e-5)
    gap = th.accumulated_gap(stats, 300, split="test")
    for r in _rows(text, "Generalization gap"):
        g_ = gap.sel(step=int(r[0]))
        assert r[1] == fmt(float(g_["gap_measured"]))
        assert r[2] == fmt(float(g_["gap_theory_offset"].sel(n=300)))
    B = th.noise_scale(stats)
    for r in _rows(text, "Gradient noise scale"):
        assert r[1] == fmt(float(B["b_simple"].sel(step=int(r[0]), split="train")))
    with gs.open_store(run_store) as s:
        pr = th.osgr_probe(s.probes(), stats, split="test")
    prow = _rows(text, "OSGR, measured by probes")
    assert len(prow) == 3
    for i, r in enumerate(prow):
        assert r[3] == fmt(float(pr["osgr_measured"][i]))
    # the reduced moments are saved next to the page
    saved = xr.load_dataset(out / "stats.nc")
    np.testing.assert_allclose(saved["mean"].values, stats["mean"].values, rtol=0, atol=0)


def test_report_from_netcdf_and_cli(run_store, tmp_path, capsys):
    nc = tmp_path / "s.nc"
    assert main(["reduce", str(run_store), "-o", str(nc), "-q"]) == 0
    assert main(["report", str(nc), "-o", str(tmp_path / "r"), "-n", "300"]) == 0
    page = tmp_path / "r" / "report.md"
    assert str(page) in capsys.readouterr().out
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
    assert main(["report", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "o")]) == 1
    assert "error" in capsys.readouterr().err


def test_report_bad_options(run_store, tmp_path, capsys):
    assert main(["report", str(run_store), "-o", str(tmp_path / "o"), "--split", "nope"]) == 1
    assert "split 'nope' is not in the data" in capsys.readouterr().err
    assert main(["report", str(run_store), "-o", str(tmp_path / "o"), "--by", "nope"]) == 1
    assert "cannot group by 'nope'" in capsys.readouterr().err
