"""Smoke tests of gsnr_stats.plot: figures build headless, have the expected artists, save PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from test_theory import make_stats

from gsnr_stats import plot
from gsnr_stats import theory as th

# Synthetic step labels here are optimizer steps and synthetic splits are noisy: the two
# warnings are checked where they are the point (test_step_spacing.py, test_reasons.py).
pytestmark = [pytest.mark.filterwarnings("ignore::gsnr_stats.errors.StepSpacingWarning"),
              pytest.mark.filterwarnings("ignore::gsnr_stats.errors.SignalBelowNoiseWarning")]

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stats():
    return make_stats(seed=0, steps=(0, 10, 20, 40), N=30, blocks=3)[0]


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_headless_without_pyplot(tmp_path):
    # building and saving figures never imports pyplot: no GUI backend, no global registry
    code = (
        "import sys, numpy as np, xarray as xr\n"
        "from gsnr_stats import plot\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_theory import make_stats\n"
        "from gsnr_stats import theory\n"
        "fig = plot.osgr_plot(theory.osgr(make_stats()[0], [4, 64]))\n"
        f"fig.savefig({str(tmp_path / 'osgr.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    env = {**os.environ, "MPLBACKEND": "", "DISPLAY": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.returncode == 0, res.stderr
    assert _is_png(tmp_path / "osgr.png")


def test_gsnr_trajectories(stats, tmp_path):
    fig = plot.gsnr_trajectories(stats, by="layer")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2  # fc1, fc2
    assert len(ax.collections) == 2  # quantile bands
    assert ax.get_yscale() == "log"
    fig2 = plot.gsnr_trajectories(stats, by="tensor", split=None)
    assert len(fig2.axes) == 2 and all(len(a.get_lines()) == 4 for a in fig2.axes)
    fig2.savefig(tmp_path / "t.png")
    assert _is_png(tmp_path / "t.png")


def test_gsnr_histogram(stats):
    fig = plot.gsnr_histogram(stats, steps=[0, 40])
    (ax,) = fig.axes
    assert len(ax.patches) == 2
    assert len(ax.get_legend().get_texts()) == 2
    fig = plot.gsnr_histogram(stats, split="test", debias=True)
    assert len(fig.axes[0].patches) == 3  # first, middle, last


def test_osgr_scatter(stats):
    raw = make_stats(seed=0, steps=(0, 10, 20, 40), N=30)[1]
    fo = th.osgr_first_order({k: v.astype(np.float32) for k, v in raw.items()}, n=[3, 10],
                             n_subsets=8, stats=stats)
    fig = plot.osgr_scatter(fo)
    (ax,) = fig.axes
    assert len(ax.containers) == 2  # one error-bar series per n
    diag = [ln for ln in ax.get_lines() if ln.get_label() == "y = x"]
    assert len(diag) == 1
    # explicit prediction, no colouring
    fig = plot.osgr_scatter(fo, fo["osgr_theory"], color_by=None)
    assert len(fig.axes[0].containers) == 1
    with pytest.raises(ValueError, match="osgr_theory"):
        plot.osgr_scatter(fo.drop_vars("osgr_theory"))


def test_gap_plot(stats):
    gap = th.accumulated_gap(stats, [100, 1000])
    fig = plot.gap_plot(gap)
    (ax,) = fig.axes
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels == ["theory (n=100)", "theory (n=1000)", "measured"]
    jk = th.jackknife(stats, lambda s: th.accumulated_gap(s, [100, 1000]))
    fig = plot.gap_plot(jk)
    assert len(fig.axes[0].collections) == 2  # jackknife bands
    fig = plot.gap_plot(th.one_step_gap(stats, 50))
    assert len(fig.axes[0].get_lines()) == 3  # train, test theory + measured


def test_train_vs_test_and_osgr_plot(stats):
    fig = plot.train_vs_test_gsnr(stats, by="layer")
    assert len(fig.axes) == 2
    assert len(fig.axes[0].get_lines()) == 4  # 2 layers x (train, test)
    assert len(fig.axes[1].collections) == 1
    fig = plot.osgr_plot(th.osgr(stats, [8, 64]))
    assert len([ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("R")]) == 4


def test_save_all(stats, tmp_path):
    raw = make_stats(seed=0, steps=(0, 10, 20, 40), N=30)[1]
    fo = th.osgr_first_order(raw, n=4, n_subsets=5, stats=stats)
    paths = plot.save_all(stats, tmp_path / "figs", measured=fo)
    names = sorted(p.name for p in paths)
    assert names == sorted(["gsnr_trajectories.png", "gsnr_histogram.png", "osgr.png",
                            "train_vs_test_gsnr.png", "gap.png", "osgr_scatter.png"])
    assert all(p.parent == tmp_path / "figs" and _is_png(p) for p in paths)
    # train split only, no lr: what cannot be drawn is skipped
    only = make_stats(splits=("train",), lr=None)[0]
    paths = plot.save_all(only, tmp_path / "only", n=64)
    assert sorted(p.name for p in paths) == ["gsnr_histogram.png", "gsnr_trajectories.png",
                                             "osgr.png"]


def test_gap_plot_without_theory_draws_the_measurement_and_says_why(tmp_path):
    # issue 13: no learning rate recorded -> gap_plot raised KeyError 'gap_theory'
    only, _, losses = make_stats(lr=None)
    gap = plot.gap_or_reason(only, 100)
    assert "gap_theory" not in gap
    assert gap.attrs["theory_missing"] == ("theoretical gap: not computed — no learning rate "
                                           "recorded; record with lr= or pass lr=")
    fig = plot.gap_plot(gap)
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert line.get_label() == "measured"
    want = [np.mean(losses[(s, "test")]) - np.mean(losses[(s, "train")]) for s in (0, 10, 30)]
    np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)
    assert "not computed — no learning rate recorded" in ax.get_title()
    fig.savefig(tmp_path / "g.png", dpi=40)
    assert _is_png(tmp_path / "g.png")


def _many_layers(L: int):
    from gsnr_stats.inmemory import MemoryWriter

    rng = np.random.default_rng(L)
    mw = MemoryWriter([(f"l{i}.w", (3,), f"l{i}") for i in range(L)], blocks=3)
    for s in (0, 10):
        for sp in ("train", "test"):
            mw.write(s, sp, rng.normal(0.3, 1.0, (30, 3 * L)))
            mw.end_record(s, sp)
    return mw.dataset()


def _outside(fig, ax) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    lb, ab = ax.get_legend().get_window_extent(r), ax.get_window_extent(r)
    return lb.x0 >= ab.x1 - 1e-6  # entirely to the right of the axes


@pytest.mark.parametrize("L", [20, 40])
def test_many_layers_distinct_colours_legend_outside(L):
    st = _many_layers(L)
    fig = plot.gsnr_trajectories(st, by="layer")
    (ax,) = fig.axes
    cols = [tuple(to_rgba(ln.get_color())) for ln in ax.get_lines()]
    assert len(cols) == L and len(set(cols)) == L
    assert _outside(fig, ax)
    fig = plot.train_vs_test_gsnr(st, by="layer")
    ax = fig.axes[0]
    cols = [tuple(to_rgba(ln.get_color())) for ln in ax.get_lines()]
    assert len(set(cols)) == L  # train/test of one layer share it, layers never
    assert _outside(fig, ax)


def test_few_layers_keep_default_look(stats):
    fig = plot.gsnr_trajectories(stats, by="layer")
    (ax,) = fig.axes
    assert [ln.get_color() for ln in ax.get_lines()] == ["C0", "C1"]
    assert not _outside(fig, ax)


def test_osgr_plot_band_from_osgr_ci(stats):
    ci = th.osgr_ci(stats, [8, 64])
    fig = plot.osgr_plot(ci)
    (ax,) = fig.axes
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4  # 2 splits x 2 n
    da = ci["osgr_lo"].transpose("step", ...)
    lo = da.values.reshape(da.sizes["step"], -1)
    hi = ci["osgr_hi"].transpose(*da.dims).values.reshape(da.sizes["step"], -1)
    for i, b in enumerate(bands):
        y = b.get_paths()[0].vertices[:, 1]
        ok = np.isfinite(lo[:, i])
        assert np.isclose(y.min(), min(lo[ok, i].min(), hi[ok, i].min()))
        assert np.isclose(y.max(), max(lo[ok, i].max(), hi[ok, i].max()))
    assert not [c for c in plot.osgr_plot(th.osgr(stats, 8)).axes[0].collections
                if isinstance(c, PolyCollection)]
