"""Optimizer steps between checkpoints (issue 12, "step is free-form").

The observed bug: a loop that labels checkpoints by epoch (0..4) with ~20 optimizer updates
per epoch got an accumulated theoretical gap 20x too small, silently, from
``accumulated_gap``, ``plot.save_all`` and ``report``. Every expected value here is the
closed form ``sum_k lr/n * sum_j V_j(t_k) * steps_k`` computed from the raw gradients with
numpy (float64 two-pass), never by the function under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import xarray as xr
from test_report import _rows
from test_theory import _moments, make_stats

from gsnr_stats import plot
from gsnr_stats import theory as th
from gsnr_stats.errors import StepSpacingWarning
from gsnr_stats.report import fmt, write_report

EPOCHS = (0, 1, 2, 3, 4)
PER_EPOCH = 20
LR = 0.1
N_TRAIN = 200


@pytest.fixture(scope="module")
def epoch_run():
    """Checkpoints labelled by epoch; ``optimizer_step`` added as the recorders store it."""
    stats, raw, losses = make_stats(seed=3, steps=EPOCHS, lr=LR)
    labelled = stats.assign_coords(optimizer_step=("step", np.array(EPOCHS) * PER_EPOCH))
    sV = np.array([_moments(raw[(e, "test")], 1)[3].sum() for e in EPOCHS])
    return stats, labelled, sV, losses


def _closed_form(sV: np.ndarray, steps_per_interval, lr: float = LR, n: int = N_TRAIN):
    d = np.broadcast_to(np.asarray(steps_per_interval, dtype=float), (sV.size - 1,))
    return np.concatenate([[0.0], np.cumsum(lr / n * sV[:-1] * d)])


def _no_spacing_warning(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in rec if issubclass(w.category, StepSpacingWarning)], \
        [str(w.message) for w in rec]
    return out


def test_epoch_labels_reproduce_the_bug_and_warn(epoch_run):
    # the original problem: without optimizer steps the epoch labels count one update each
    stats, _, sV, _ = epoch_run
    with pytest.warns(StepSpacingWarning, match=r"step labels \[0, 1, 2, 3, 4\] are taken as "
                                                r"optimizer steps.*steps_per_checkpoint="):
        g = th.accumulated_gap(stats, N_TRAIN)
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, _closed_form(sV, 1),
                               rtol=1e-12)
    assert g.attrs["step_spacing"] == "step labels"


def test_recorded_optimizer_step_gives_the_20x_gap(epoch_run):
    stats, labelled, sV, _ = epoch_run
    g = _no_spacing_warning(lambda: th.accumulated_gap(labelled, N_TRAIN))
    want = _closed_form(sV, PER_EPOCH)
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, want, rtol=1e-12)
    assert g.attrs["step_spacing"] == "optimizer_step"
    np.testing.assert_array_equal(g["optimizer_step"].values, np.array(EPOCHS) * PER_EPOCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepSpacingWarning)
        from_labels = th.accumulated_gap(stats, N_TRAIN)["gap_theory"].sel(n=N_TRAIN).values
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values[1:] / from_labels[1:],
                               PER_EPOCH, rtol=1e-12)
    # an explicit steps_per_checkpoint gives the same without the coordinate, and no warning
    g2 = _no_spacing_warning(lambda: th.accumulated_gap(stats, N_TRAIN,
                                                        steps_per_checkpoint=PER_EPOCH))
    np.testing.assert_allclose(g2["gap_theory"].sel(n=N_TRAIN).values, want, rtol=1e-12)
    assert g2.attrs["step_spacing"] == "steps_per_checkpoint"


def test_irregular_optimizer_steps_and_trapezoid(epoch_run):
    stats, _, sV, _ = epoch_run
    opt = np.array([5, 24, 45, 63, 85])  # ~20 per epoch, a last partial batch or not
    st = stats.assign_coords(optimizer_step=("step", opt))
    d = np.diff(opt)
    g = _no_spacing_warning(lambda: th.accumulated_gap(st, N_TRAIN, method="trapezoid"))
    want = np.concatenate([[0.0], np.cumsum(LR / N_TRAIN * d * (sV[:-1] + sV[1:]) / 2)])
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, want, rtol=1e-12)


def test_optimizer_step_wins_over_labels_and_argument(epoch_run):
    stats, _, sV, _ = epoch_run
    opt = np.array([0, 30, 45, 90, 100])
    st = stats.assign_coords(optimizer_step=("step", opt))
    with pytest.warns(StepSpacingWarning, match="steps_per_checkpoint=20 ignored.*wins"):
        g = th.accumulated_gap(st, N_TRAIN, steps_per_checkpoint=20)
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values,
                               _closed_form(sV, np.diff(opt)), rtol=1e-12)
    # agreeing argument: no warning
    _no_spacing_warning(lambda: th.accumulated_gap(st, N_TRAIN,
                                                   steps_per_checkpoint=np.diff(opt)))


def test_partly_unknown_optimizer_step(epoch_run):
    stats, _, sV, _ = epoch_run
    st = stats.assign_coords(optimizer_step=("step", np.array([0, 20, -1, 60, 80])))
    with pytest.warns(StepSpacingWarning, match=r"optimizer_step is -1, unknown, at step \[2\]"):
        g = th.accumulated_gap(st, N_TRAIN)
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, _closed_form(sV, 1),
                               rtol=1e-12)
    g = _no_spacing_warning(lambda: th.accumulated_gap(st, N_TRAIN, steps_per_checkpoint=20))
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, _closed_form(sV, 20),
                               rtol=1e-12)


def test_schedule_evaluated_at_optimizer_steps(epoch_run):
    _, labelled, sV, _ = epoch_run

    def lr(u):
        return 0.1 * np.exp(-np.asarray(u) / 30.0)

    g = _no_spacing_warning(lambda: th.accumulated_gap(labelled, N_TRAIN, lr=lr))
    want, total = [0.0], 0.0
    for k in range(len(EPOCHS) - 1):
        for u in range(EPOCHS[k] * PER_EPOCH, EPOCHS[k + 1] * PER_EPOCH):
            total += 0.1 * math.exp(-u / 30.0) * sV[k] / N_TRAIN
        want.append(total)
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, want, rtol=1e-12)
    np.testing.assert_allclose(g["lr"].values, lr(np.array(EPOCHS) * PER_EPOCH), rtol=1e-15)


def test_one_step_gap_growth_per_optimizer_step(epoch_run):
    stats, labelled, _, losses = epoch_run
    meas = np.array([np.mean(losses[(e, "test")]) - np.mean(losses[(e, "train")])
                     for e in EPOCHS])
    out = _no_spacing_warning(lambda: th.one_step_gap(labelled, 50))
    np.testing.assert_allclose(out["gap_measured"].values[:-1], np.diff(meas) / PER_EPOCH,
                               rtol=1e-12)
    assert "none after the last" in out["gap_measured"].attrs["reason"]
    with pytest.warns(StepSpacingWarning):
        th.one_step_gap(stats, 50)


def test_spacing_must_increase(epoch_run):
    stats, _, _, _ = epoch_run
    st = stats.assign_coords(optimizer_step=("step", np.array([0, 20, 20, 60, 80])))
    with pytest.raises(ValueError, match=r"strictly increasing.*optimizer_step.*\[0, 20, 20"):
        th.accumulated_gap(st, N_TRAIN)
    with pytest.raises(ValueError, match="one int or 4 values"):
        th.accumulated_gap(stats, N_TRAIN, steps_per_checkpoint=[1, 2])
    # a single checkpoint needs no spacing: no warning
    _no_spacing_warning(lambda: th.accumulated_gap(stats.isel(step=[0]), N_TRAIN))


@pytest.fixture
def no_render(monkeypatch):
    """Figures are built but not drawn (drawing is test_plot's; here only their data counts)."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: open(path, "wb").close())


def test_save_all_uses_the_same_spacing(epoch_run, tmp_path, monkeypatch, no_render):
    stats, labelled, sV, _ = epoch_run
    seen = []
    real = plot.gap_plot
    monkeypatch.setattr(plot, "gap_plot", lambda ds, **kw: seen.append(ds) or real(ds, **kw))
    _no_spacing_warning(lambda: plot.save_all(labelled, tmp_path / "a", n=N_TRAIN))
    np.testing.assert_allclose(seen[-1]["gap_theory"].sel(n=N_TRAIN).values,
                               _closed_form(sV, PER_EPOCH), rtol=1e-12)
    _no_spacing_warning(lambda: plot.save_all(stats, tmp_path / "b", n=N_TRAIN,
                                              steps_per_checkpoint=PER_EPOCH))
    np.testing.assert_allclose(seen[-1]["gap_theory"].sel(n=N_TRAIN).values,
                               _closed_form(sV, PER_EPOCH), rtol=1e-12)
    with pytest.warns(StepSpacingWarning):
        plot.save_all(stats, tmp_path / "c", n=N_TRAIN)


def _report_gap(stats: xr.Dataset, tmp_path, name: str, **kw) -> tuple[str, list[list[str]]]:
    nc = tmp_path / f"{name}.nc"
    stats.to_netcdf(nc)
    text = write_report(nc, tmp_path / name, n=N_TRAIN, **kw).read_text()
    return text, _rows(text, "Generalization gap")


def test_report_uses_the_same_spacing(epoch_run, tmp_path, no_render):
    stats, labelled, sV, losses = epoch_run
    first = np.mean(losses[(0, "test")]) - np.mean(losses[(0, "train")])
    want = _closed_form(sV, PER_EPOCH) + first
    text, rows = _no_spacing_warning(lambda: _report_gap(labelled, tmp_path, "rec"))
    assert [r[2] for r in rows] == [fmt(v) for v in want]
    assert "from the recorded `optimizer_step` (0, 20, 40, 60, 80)" in text
    text, rows = _no_spacing_warning(lambda: _report_gap(stats, tmp_path, "arg",
                                                         steps_per_checkpoint=PER_EPOCH))
    assert [r[2] for r in rows] == [fmt(v) for v in want]
    with pytest.warns(StepSpacingWarning):
        text, rows = _report_gap(stats, tmp_path, "labels")
    assert [r[2] for r in rows] == [fmt(v) for v in _closed_form(sV, 1) + first]
    assert "the step labels are taken as optimizer steps" in text


def test_end_to_end_torch_loop_epoch_labels(tmp_path, no_render):
    """A plain torch loop labelling checkpoints by epoch: the store's optimizer_step (20 per
    epoch) reaches the gap, the report and the figures; nothing warns."""
    torch = pytest.importorskip("torch")
    from gsnr_stats.adapters import torch as gt

    import gsnr_stats as gs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; restored below
    try:
        _torch_loop(torch, gt, gs, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _torch_loop(torch, gt, gs, tmp_path):
    torch.manual_seed(0)
    X, Xte = torch.randn(200, 5), torch.randn(100, 5)
    w = torch.randn(5, 3)
    y, yte = (X @ w).argmax(1), (Xte @ w).argmax(1)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    path = tmp_path / "loop.h5"
    counted = 0
    with gt.open_writer(path, model) as wr, gt.Recorder(wr, model, loss_fn, optimizer=opt) as rec:
        for epoch in EPOCHS:
            rec.record((X, y), step=epoch, split="train", batch_size=100, epoch=epoch)
            rec.record((Xte, yte), step=epoch, split="test", batch_size=100, epoch=epoch)
            if epoch == EPOCHS[-1]:
                break
            for i in range(0, 200, 10):  # 20 optimizer steps per epoch
                opt.zero_grad()
                loss_fn(model(X[i:i + 10]), y[i:i + 10]).mean().backward()
                opt.step()
                counted += 1
    assert counted == PER_EPOCH * (len(EPOCHS) - 1)
    stats = gs.reduce(path)
    np.testing.assert_array_equal(stats["optimizer_step"].values, np.array(EPOCHS) * PER_EPOCH)
    # closed form from the stored gradients, numpy two-pass (not through reduce)
    with gs.open_store(path) as s:
        sV = np.array([s.read_grads(e, "test").astype(np.float64).var(0, ddof=1).sum()
                       for e in EPOCHS])
    want = _closed_form(sV, PER_EPOCH, lr=0.05)
    g = _no_spacing_warning(lambda: th.accumulated_gap(stats, N_TRAIN))
    np.testing.assert_allclose(g["gap_theory"].sel(n=N_TRAIN).values, want, rtol=1e-9)
    assert g.attrs["step_spacing"] == "optimizer_step"
    assert "nominal learning rate of SGD with momentum 0.9" in g.attrs["lambda_note"]
    text = _no_spacing_warning(lambda: write_report(path, tmp_path / "rep", n=N_TRAIN,
                                                    blocks=None).read_text())
    assert "from the recorded `optimizer_step` (0, 20, 40, 60, 80)" in text
    assert "λ = the nominal learning rate of SGD with momentum 0.9" in text
    first = float(g["gap_measured"].values[0])
    assert [r[2] for r in _rows(text, "Generalization gap")] == [fmt(v) for v in want + first]
