"""In-training moments from the user's own backward (issue 14, part 2): ``gt.TrainingMoments``.

Independent route: per-sample gradients of each sample's own loss from ``torch.func``
(``vmap(grad)`` written out here, not the adapter's), reduced by a float64 two-pass
(``conftest.two_pass``) over all the batches of the window; float32 models within the
float32 error bounds of ``conftest``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import U32, U64, f32_chain_bound, moments_shift_bound, two_pass

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError  # noqa: E402


def per_sample(model: nn.Module, lossf, x, y, names=None) -> np.ndarray:
    """(n, P) gradients of each sample's own loss ``lossf(out[None], y[None])`` (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = names or list(params)

    def one(p, xi, yi):
        return lossf(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in names], 1).double().numpy()


def mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, 4)).to(dtype)


def cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).to(dtype)


def batches(shape, k=3, n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=dtype),
             torch.randint(0, 4, (n,), generator=g)) for _ in range(k)]


def train(model, data, path, *, reduction="mean", lr=0.05, **kw):
    """SGD over ``data`` with TrainingMoments attached: one record of the window; the
    per-sample rows of every batch (torch.func, at the parameters of its step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    red = "sum" if reduction == "sum" else "mean"
    rows = []
    tm = gt.TrainingMoments(path, model, optimizer=opt, reduction=reduction, **kw)
    with tm:
        for x, y in data:
            rows.append(per_sample(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                   x, y))
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction=red).backward()
            opt.step()
            tm.step()
    return tm, np.concatenate(rows)


def _rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make,shape", [(mlp, (12,)), (cnn, (2, 8, 8))])
def test_float64_matches_per_sample_route(make, shape, reduction, tmp_path):
    model = make()
    tm, G = train(model, batches(shape), tmp_path / "m.h5", reduction=reduction)
    ref_m, ref_v = two_pass(G)
    st = gs.reduce(tmp_path / "m.h5")
    assert int(st["count"].values[0, 0]) == G.shape[0] == 48
    got_m, got_v = st["mean"].values[0, 0], st["var"].values[0, 0]
    assert _rel(got_m, ref_m) <= 1e-12
    assert np.max(np.abs(got_v - ref_v) / ref_v) <= 1e-12
    assert tm.records[0].n_samples == 48 and tm.records[0].optimizer_step == 3


def test_float64_high_gsnr_elements_are_exact(tmp_path):
    """A constant input feature and offset targets give weights of GSNR ~1e4..1e12: the
    closed form would cancel there; the flagged elements are recomputed exactly."""
    for r in (1e4, 1e8, 1e12):
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        g = torch.Generator().manual_seed(1)
        data = []
        for _ in range(3):
            x = torch.randn(32, 3, generator=g, dtype=torch.float64)
            x[:, 0] = 1.0
            data.append((x, torch.randn(32, 2, generator=g, dtype=torch.float64) - math.sqrt(r)))

        def mse(o, t):
            return ((o - t) ** 2).sum()

        opt = torch.optim.SGD(model.parameters(), lr=1e-9)  # the offset stays
        rows = []
        path = tmp_path / f"r{r:.0e}.h5"
        with gt.TrainingMoments(path, model, optimizer=opt, reduction="sum"):
            for x, y in data:
                rows.append(per_sample(model, mse, x, y))
                opt.zero_grad()
                mse(model(x), y).backward()
                opt.step()
        G = np.concatenate(rows)
        ref_m, ref_v = two_pass(G)
        assert (ref_m ** 2 / ref_v).max() >= r / 100
        st = gs.reduce(path)
        got_v = st["var"].values[0, 0]
        # beyond 1e-12: the two routes' rows themselves differ by the float64 rounding of
        # o - y (|y| = sqrt(r)), a few ulp of the column's largest |g|
        _, bv = moments_shift_bound(8 * U64 * np.abs(G).max(0), ref_v, G.shape[0])
        assert np.all(np.abs(got_v - ref_v) <= 1e-12 * ref_v + bv), r


@pytest.mark.parametrize("make,shape,K", [(mlp, (12,), 4 * (12 + 16 + 8 + 4)),
                                          (cnn, (2, 8, 8), 4 * (18 + 36 + 27 + 4 + 64))])
def test_float32_within_float32_bounds(make, shape, K, tmp_path):
    """Each per-sample row of either route is within K u colmax of the exact one (the
    float32 chains of forward and backward); the closed form adds <= tol M2 per batch and
    its mean (autograd's float32 weight gradient) <= (n + 2) u colmax."""
    model = make(torch.float32)
    data = batches(shape, dtype=torch.float32)
    tm, G = train(model, data, tmp_path / "m.h5")
    ref_m, ref_v = two_pass(G)
    st = gs.reduce(tmp_path / "m.h5")
    got_m, got_v = st["mean"].values[0, 0], st["var"].values[0, 0]
    n = data[0][0].shape[0]
    b = 2 * f32_chain_bound(G, K)
    bm, bv = moments_shift_bound(b, ref_v, G.shape[0])
    colmax = np.abs(G).max(0)
    assert np.all(np.abs(got_m - ref_m) <= bm + (n + 2) * U32 * colmax)
    assert np.all(np.abs(got_v - ref_v) <= bv + tm.tol * ref_v * 1.01)


def test_dataloader_scheduler_epochs(tmp_path):
    """A plain DataLoader + StepLR loop, one record per epoch via flush(): steps, epochs,
    the scheduler's learning rate and optimizer hyper-parameters in each record."""
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 4, (40,), generator=g)
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    per_epoch = []
    path = tmp_path / "e.h5"
    with gt.TrainingMoments(path, model, optimizer=opt, every="epoch") as tm:
        for epoch in range(3):
            rows = []
            for x, y in loader:
                rows.append(per_sample(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                       x, y))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                assert tm.step() is None  # every="epoch": step() only counts
            s = tm.flush(epoch=epoch + 1)
            assert s.lr == pytest.approx(0.1 * 0.5 ** epoch)
            sched.step()
            per_epoch.append(np.concatenate(rows))
    assert [r.step for r in tm.records] == [3, 6, 9]  # optimizer updates (3 batches/epoch)
    st = gs.reduce(path)
    with gs.open_store(path) as store:
        meta = store.record_meta(3, "train")
    assert meta["source"] == "training_moments" and meta["optimizer"]["class"] == "SGD"
    for i, G in enumerate(per_epoch):
        ref_m, ref_v = two_pass(G)
        assert int(st["count"].values[i, 0]) == 40
        assert np.max(np.abs(st["var"].values[i, 0] - ref_v) / ref_v) <= 1e-12
        assert st["epoch"].values[i, 0] == i + 1


def test_every_k_steps_and_blocks(tmp_path):
    model = mlp()
    data = batches((12,), k=4)
    tm, G = train(model, data, tmp_path / "k.h5", every=2, block_size=16)
    assert [r.step for r in tm.records] == [2, 4]
    with gs.open_store(tmp_path / "k.h5") as s:
        assert len(s.read_moments(2, "train")[0]) == 2  # one block per batch of 16
    st = gs.reduce(tmp_path / "k.h5")
    for i, lo in enumerate((0, 32)):
        ref_m, ref_v = two_pass(G[lo:lo + 32])
        assert np.max(np.abs(st["var"].values[i, 0] - ref_v) / ref_v) <= 1e-12


def test_eval_forwards_and_the_recorder_are_ignored(tmp_path):
    """no_grad evaluation, a grad-enabled forward never backpropagated, and a Recorder's
    own passes (functional_call) between training steps add nothing to the window."""
    model = mlp()
    data = batches((12,), k=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rows = []
    with gt.open_writer(tmp_path / "rec.h5", model) as w, \
            gt.TrainingMoments(tmp_path / "t.h5", model, optimizer=opt):
        rec = gt.Recorder(w, model, nn.CrossEntropyLoss(reduction="none"), keep="moments")
        for i, (x, y) in enumerate(data):
            with torch.no_grad():
                model(x)
            model(x[:3])  # grad enabled, never backpropagated
            rows.append(per_sample(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                   x, y))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            rec.record((x, y), step=i, split="test", batch_size=8)
    ref_m, ref_v = two_pass(np.concatenate(rows))
    st = gs.reduce(tmp_path / "t.h5")
    assert int(st["count"].values[0, 0]) == 32
    assert np.max(np.abs(st["var"].values[0, 0] - ref_v) / ref_v) <= 1e-12


@pytest.mark.parametrize("c", [1e-5, 1e-3])
def test_outside_use_is_refused(c, tmp_path):
    model = mlp()
    x, y = batches((12,), k=1)[0]
    with gt.TrainingMoments(tmp_path / "o.h5", model) as tm:
        loss = F.cross_entropy(model(x), y) + c * model[2].weight.sum()
        with pytest.raises(AdapterError, match=r"2\.weight.*outside"):
            loss.backward()
        assert tm.pending_samples == 0


def test_batchnorm_in_train_mode(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    x, y = batches((12,), k=1)[0]
    with pytest.warns(UserWarning, match=r"1\.weight"):  # BatchNorm affine: not covered
        tm = gt.TrainingMoments(tmp_path / "bn.h5", model)
    with tm, pytest.raises(AdapterError, match="batch statistics"):
        F.cross_entropy(model(x), y).backward()
    # contributions: the rows delta_i a_i^T sum to the batch gradient of the summed loss
    with pytest.warns(UserWarning):
        tm = gt.TrainingMoments(tmp_path / "bn2.h5", model, batchnorm="contributions",
                                reduction="sum")
    with tm:
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        s = tm.flush(step=0)
    st = gs.reduce(tmp_path / "bn2.h5")
    want = torch.cat([model[0].weight.grad.reshape(-1), model[0].bias.grad,
                      model[3].weight.grad.reshape(-1), model[3].bias.grad]).numpy()
    np.testing.assert_allclose(st["mean"].values[0, 0] * s.n_samples, want, rtol=1e-12,
                               atol=1e-14)
    with gs.open_store(tmp_path / "bn2.h5") as store:
        assert "contributions" in store.record_meta(0, "train")["batchnorm"]
        assert store.record_meta(0, "train")["uncovered"] == ["1.weight", "1.bias"]
    model.eval()  # running statistics: per-sample gradients are defined; no refusal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = gt.TrainingMoments(tmp_path / "bn3.h5", model)
    with tm:
        F.cross_entropy(model(x), y).backward()
    assert tm.records[0].n_samples == 16


def test_uncovered_parameters_and_the_writer_layout(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 4)).double()
    assert [n for n, _ in gt.TrainingMoments.layout(model)] == ["0.weight", "0.bias",
                                                                "2.weight", "2.bias"]
    with gt.open_writer(tmp_path / "full.h5", model) as w, \
            pytest.warns(UserWarning, match="LayerNorm"), \
            pytest.raises(AdapterError, match=r"1\.weight"):
        gt.TrainingMoments(w, model)
    lay = gt.TrainingMoments.layout(model)
    with gs.GradientWriter(tmp_path / "cov.h5", params=lay) as w, \
            pytest.warns(UserWarning, match="left out"):
        tm = gt.TrainingMoments(w, model)
    assert tm.uncovered == ["1.weight", "1.bias"]
    tm.close()


def test_bad_arguments(tmp_path):
    model = mlp()
    for kw, msg in (({"every": 0}, "every"), ({"reduction": "max"}, "reduction"),
                    ({"batchnorm": "x"}, "batchnorm"), ({"loss_scale": 0}, "loss_scale"),
                    ({"block_size": 0}, "block_size")):
        with pytest.raises(AdapterError, match=msg):
            gt.TrainingMoments(tmp_path / "x.h5", model, **kw)
    with pytest.raises(AdapterError, match="Linear"):
        gt.TrainingMoments(tmp_path / "y.h5", nn.Sequential(nn.LayerNorm(3)))


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gsnr_stats.adapters.lightning import TrainingMomentsCallback
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(3)
    X = torch.randn(32, 12, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,), generator=g)
    module = Module()
    rows = []

    class Rows(pl.Callback):  # per-sample rows at the parameters each batch sees
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            rows.append(per_sample(pl_module.net, lambda o, t: F.cross_entropy(
                o, t, reduction="sum"), *batch))

    cb = TrainingMomentsCallback(tmp_path / "l.h5", every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[Rows(), cb],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=8))
    assert [r.step for r in cb.records] == [2, 4]  # 4 batches, 2 per update, per epoch
    st = gs.reduce(tmp_path / "l.h5")
    for i in range(2):
        ref_m, ref_v = two_pass(np.concatenate(rows[4 * i:4 * i + 4]))
        assert np.max(np.abs(st["var"].values[i, 0] - ref_v) / ref_v) <= 1e-12
        assert _rel(st["mean"].values[i, 0], ref_m) <= 1e-12


def test_non_finite_gradients_raise(tmp_path):
    from gsnr_stats.errors import NonFiniteError

    model = mlp()
    x, y = batches((12,), k=1)[0]
    x[3, 0] = float("inf")
    with gt.TrainingMoments(tmp_path / "nf.h5", model) as tm:
        with pytest.raises(NonFiniteError, match=r"parameter 4\.weight"):
            F.cross_entropy(model(x), y).backward()
            tm.flush()  # overlap=True: the worker's error surfaces here at the latest
        assert tm.pending_samples == 0


def test_docs_section_uses_the_real_signatures():
    """docs/adapters.md's TrainingMoments section calls it (and its methods) with keyword
    arguments they have."""
    import ast
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/adapters.md").read_text()
    sec = text[text.index("\n## In-training moments from your own backward"):]
    sec = sec[: sec.index("\n## ", 5)]
    (block,) = re.findall(r"```python\n(.*?)```", sec, flags=re.S)
    sigs = {"TrainingMoments": gt.TrainingMoments, "flush": gt.TrainingMoments.flush,
            "step": gt.TrainingMoments.step}
    seen = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in sigs:
                seen.add(name)
                assert {k.arg for k in node.keywords} <= set(
                    inspect.signature(sigs[name]).parameters), name
    assert seen == set(sigs)


class _Seq(nn.Module):
    """A Linear on (B, T, in) and a Linear called twice per forward (per-sample products)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):  # x: (B, T, 5)
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(torch.tanh(self.b(h))))
        return self.out(h.mean(1))


def test_sequence_and_repeated_layers(tmp_path):
    model = _Seq().double()
    data = batches((3, 5), k=2, n=8)
    tm, G = train(model, data, tmp_path / "s.h5")
    ref_m, ref_v = two_pass(G)
    st = gs.reduce(tmp_path / "s.h5")
    assert _rel(st["mean"].values[0, 0], ref_m) <= 1e-12
    assert np.max(np.abs(st["var"].values[0, 0] - ref_v) / ref_v) <= 1e-12


def test_overlap_gives_the_same_numbers(tmp_path):
    """overlap=True (merges on a worker thread) writes the same record, bit for bit."""
    data = batches((12,), k=3)
    train(mlp(), data, tmp_path / "a.h5")
    train(mlp(), data, tmp_path / "b.h5", overlap=True)
    a, b = gs.reduce(tmp_path / "a.h5"), gs.reduce(tmp_path / "b.h5")
    np.testing.assert_array_equal(a["mean"].values, b["mean"].values)
    np.testing.assert_array_equal(a["m2"].values, b["m2"].values)
