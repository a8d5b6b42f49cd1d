"""The torch moments fast path is exact at any GSNR, and detects any outside use (issue 14, 3).

Independent routes: float64 two-pass moments (``conftest.two_pass``) of per-sample gradients
materialised by ``torch.func`` (``fast=False``), and float32 error bounds of conftest.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import f32_chain_bound, moments_shift_bound, two_pass

torch = pytest.importorskip("torch")
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402

import gsnr_stats as gs  # noqa: E402

U64 = 2.0 ** -53
LIN_K32 = 32  # float32 chain of the linear MSE model: forward 4 + 2, backward 2 + 2, twice


def mse(out, y):
    return ((out - y) ** 2).sum(1)


def _offset_problem(r: float, dtype=torch.float64, n: int = 96):
    """A Linear(3, 2) under squared error with targets offset by C = sqrt(r): the bias and
    the weights of the constant input feature have GSNR about r (a large offset)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(dtype)
    with torch.no_grad():
        model.weight.mul_(0.1)
        model.bias.zero_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[:, 0] = 1.0
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) - float(np.sqrt(r))
    return model, x.to(dtype), y.to(dtype)


def _record_moments(model, loss, x, y, path, batch_size=32):
    with gt.open_writer(path, model) as w:
        rec = gt.Recorder(w, model, loss, keep="moments")
        rec.record((x, y), 0, "train", batch_size=batch_size)
    return rec, gs.reduce(path)


@pytest.mark.parametrize("r", [1e4, 1e8, 1e12, 1e16, 1e20])
def test_fast_moments_exact_at_high_gsnr(r, tmp_path):
    model, x, y = _offset_problem(r)
    G = gt.per_sample_gradients(model, mse, x, y, fast=False).astype(np.float64)
    ref_m, ref_v = two_pass(G)
    gsnr = ref_m ** 2 / ref_v
    assert r / 100 <= gsnr.max() <= 100 * r  # the problem has the GSNR it is meant to have
    top = int(np.argmax(gsnr))
    if r >= 1e12:  # the original problem: the closed form per batch of 32 cancels
        b = G[:32]
        naive = ((b * b).sum(0) - b.sum(0) ** 2 / 32) / 31
        bm, bv = two_pass(b)
        assert not abs(naive[top] - bv[top]) <= 1e-6 * bv[top]
    rec, st = _record_moments(model, mse, x, y, tmp_path / "m.h5")
    assert set(rec._fast.modules) == {""}  # the fast path did the work
    got_m, got_v = st["mean"].values[0, 0], st["var"].values[0, 0]
    rtol = 1e-9 if r <= 1e12 else 1e-6
    assert np.all(np.isfinite(got_v)) and np.all(got_v > 0)
    assert np.all(np.abs(got_v - ref_v) <= rtol * ref_v), np.max(np.abs(got_v / ref_v - 1))
    assert np.all(np.abs(got_m - ref_m) <= 1e-12 * np.abs(ref_m) + 1e-9 * np.sqrt(ref_v))
    got_r = got_m ** 2 / got_v
    assert np.all(np.isfinite(got_r))
    assert np.all(np.abs(got_r - gsnr) <= 2.5 * rtol * gsnr)


def test_linear_weight_moments_closed_form_kept_at_low_gsnr():
    """Elements whose closed form is within the tolerance are not recomputed (the speed):
    the result equals the closed form bit for bit there, and the two-pass elsewhere."""
    from gsnr_stats.adapters._torch_fast import linear_weight_moments

    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 5, generator=g, dtype=torch.float64)
    a[:, 0] = 1.0
    d = torch.randn(64, 2, generator=g, dtype=torch.float64)
    d[:, 1] += 1e6  # column (1, 0) has GSNR ~1e12
    mean, m2 = linear_weight_moments(a, d, 64)
    G = (d[:, :, None] * a[:, None, :]).reshape(64, -1).numpy()
    ref_m, ref_v = two_pass(G, ddof=0)
    closed = ((d * d).T @ (a * a) - (d.T @ a) ** 2 / 64).reshape(-1).numpy()
    flat = m2.reshape(-1).numpy()
    assert abs(flat[5] / 64 - ref_v[5]) <= 1e-12 * ref_v[5]
    assert not abs(closed[5] / 64 - ref_v[5]) <= 1e-6 * ref_v[5]  # it would have cancelled
    low = np.abs(ref_m) ** 2 / ref_v < 10
    assert low.sum() >= 6 and np.array_equal(flat[low], closed[low])
    assert np.allclose(mean.reshape(-1).numpy(), ref_m, rtol=1e-13, atol=0)


@pytest.mark.parametrize("r", [1e4, 1e8])
def test_fast_moments_float32_within_bounds(r, tmp_path):
    """float32 model: fast moments (exact float64 products of float32 inputs and output
    gradients) vs the float64 two-pass of vmap's float32 rows, within the float32 bound."""
    model, x, y = _offset_problem(r, torch.float32)
    G = gt.per_sample_gradients(model, mse, x, y, fast=False).astype(np.float64)
    ref_m, ref_v = two_pass(G)
    rec, st = _record_moments(model, mse, x, y, tmp_path / "m.h5")
    assert set(rec._fast.modules) == {""}
    b = 2 * f32_chain_bound(G, LIN_K32)  # both routes' rows are within K u colmax
    bm, bv = moments_shift_bound(b, ref_v, G.shape[0])
    got_m, got_v = st["mean"].values[0, 0], st["var"].values[0, 0]
    assert np.all(np.abs(got_m - ref_m) <= bm)
    assert np.all(np.abs(got_v - ref_v) <= bv)
    assert np.all(got_v > 0) and np.all(np.isfinite(got_m ** 2 / got_v))


class OutsideSmall(nn.Module):
    """A Linear whose weight is also used, with weight c, outside its forward."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        out = self.fc(x)
        if self.c:
            # added to one logit (softmax ignores a shift of all of them)
            out = torch.cat([out[:, :1] + self.c * self.fc.weight.sum(), out[:, 1:]], 1)
        return out


LF = nn.CrossEntropyLoss(reduction="none")


def _gsnr(st):
    return st["mean"].values[0, 0] ** 2 / st["var"].values[0, 0]


@pytest.mark.parametrize("c", [1e-5, 1e-3])
def test_outside_use_is_detected_whatever_its_size(c, tmp_path):
    torch.manual_seed(0)
    model = OutsideSmall(c).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    G = gt.per_sample_gradients(model, LF, x, y, fast=False)
    plain = copy_without_outside(model)
    G0 = gt.per_sample_gradients(plain, LF, x, y, fast=False)
    ref_m, ref_v = two_pass(G)
    r0m, r0v = two_pass(G0)
    if c < 1e-4:  # the original problem: the old two-sample check at 1e-4 max|g| misses it
        assert np.abs(G[:2] - G0[:2]).max() <= 1e-4 * np.abs(G[:2]).max()
        assert np.max(np.abs(r0m ** 2 / r0v / (ref_m ** 2 / ref_v) - 1)) > 1e-6  # and it matters
    with pytest.warns(UserWarning, match=r"fc\.weight also used outside"):
        rec, st = _record_moments(model, LF, x, y, tmp_path / "m.h5")
    assert rec._fast.outside == {"fc": ["fc.weight"]}
    assert "fc" not in rec._fast.modules  # demoted to vmap
    want = ref_m ** 2 / ref_v
    assert np.all(np.abs(_gsnr(st) - want) <= 1e-9 * want + 1e-300)


def copy_without_outside(model):
    import copy

    m = copy.deepcopy(model)
    m.c = 0.0
    return m


def test_no_outside_use_keeps_the_fast_path(tmp_path):
    torch.manual_seed(0)
    model = OutsideSmall(0.0).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    ref_m, ref_v = two_pass(gt.per_sample_gradients(model, LF, x, y, fast=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*do not match")
        rec, st = _record_moments(model, LF, x, y, tmp_path / "m.h5")
    assert rec._fast.outside == {}
    assert set(rec._fast.modules) == {"fc"} and rec._fast.fallback is None
    want = ref_m ** 2 / ref_v
    assert np.all(np.abs(_gsnr(st) - want) <= 1e-9 * want)
