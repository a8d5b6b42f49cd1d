"""PyTorch adapter: the contract suite plus torch-specific behaviour.

Every value is checked against an independent route: autograd's batch gradient
(``loss.sum().backward()``), central finite differences in float64, or a manual SGD step on
a copy of the model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import U32, assert_within, f32_batch_sum_bound, f32_chain_bound

torch = pytest.importorskip("torch")
from adapter_contract import ALL_CHECKS, FACTORED_CHECKS, AdapterCase  # noqa: E402
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError  # noqa: E402

torch.set_num_threads(1)

CE = nn.CrossEntropyLoss(reduction="none")
# Terms along the longest float32 chain ending in a gradient entry or loss (conftest bounds):
# the MLPs here (Linear 4 + tanh + Linear 5-6, softmax 3; backward 3 + 5, BatchNorm over 6)
# have ~30, the CNN ~80 (AdapterCase.f32_terms); about twice that.
K32, CNN_K32 = 64, 128


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )
    with torch.no_grad():  # non-trivial running statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def flat_params(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().double().reshape(-1).numpy()
                           for _, p in model.named_parameters() if p.requires_grad])


def batch_gradient(model: nn.Module, loss_fn, x, y) -> np.ndarray:
    m = copy.deepcopy(model)
    m.zero_grad()
    loss_fn(m(x), y).sum().backward()
    return np.concatenate([p.grad.reshape(-1).numpy()
                           for _, p in m.named_parameters() if p.requires_grad])


def losses_at(model: nn.Module, loss_fn, x, y):
    m64 = copy.deepcopy(model).double()
    names = [n for n, p in m64.named_parameters() if p.requires_grad]

    def f(theta: np.ndarray) -> np.ndarray:
        state = dict(m64.named_parameters())
        off = 0
        with torch.no_grad():
            for n in names:
                p = state[n]
                p.copy_(torch.from_numpy(theta[off:off + p.numel()]).reshape(p.shape))
                off += p.numel()
            # buffers copied each time: a train-mode BatchNorm forward would update them
            return loss_fn(copy.deepcopy(m64)(x.double()), y).numpy()

    return f, m64


def make_case(kind: str) -> AdapterCase:
    gen = torch.Generator().manual_seed(1)
    n = 7
    kw = {}
    label = kind
    if kind.endswith("-fast"):  # Linear/Conv from one backward (the recorder's default)
        kind = kind.removesuffix("-fast")
        kw = {"fast": True}
    if kind == "mlp":
        model, x = mlp(), torch.randn(n, 4, generator=gen)
    elif kind == "cnn-bn-eval":
        model, x = cnn(), torch.randn(n, 2, 6, 6, generator=gen)
    elif kind == "train-bn-batch":
        model, x = bn_mlp(), torch.randn(n, 4, generator=gen)
        kw = {"train_batchnorm": "batch"}
    else:
        raise ValueError(kind)
    y = torch.randint(0, 3, (n,), generator=gen)
    f, m64 = losses_at(model, CE, x, y)

    def write_batches(w, step, split, batch_size):
        gt.Recorder(w, model, CE, **kw).record((x, y), step, split, batch_size=batch_size)

    def write_factored(w, step, split, batch_size):
        gt.Recorder(w, model, CE, keep="factors").record((x, y), step, split,
                                                         batch_size=batch_size)

    factors = None
    if kw.get("fast"):  # every Linear of these models is worth factoring (T (in+out) < in out)
        mods = dict(model.named_modules())
        factors = [(f"{k}.weight", f"{k}.bias", 1) for k, m in mods.items()
                   if isinstance(m, nn.Linear)]

    return AdapterCase(
        name=f"torch-{label}",
        framework="torch",
        layout=gt.layout(model),
        per_sample_gradients=lambda: gt.per_sample_gradients(model, CE, x, y, **kw),
        batch_gradient=lambda: batch_gradient(model, CE, x, y),
        flat_params=lambda: flat_params(model),
        per_sample_losses=f,
        per_sample_gradients_fd=lambda: gt.per_sample_gradients(
            m64, CE, x.double(), y, **kw),
        losses=lambda: gt.per_sample_gradients(model, CE, x, y, return_loss=True, **kw)[1],
        write_batches=write_batches,
        unsupported=UNSUPPORTED,
        fd_max_coords=None,
        # batch statistics depend on the batch: only a whole-batch record equals one write
        batch_size=n if kind == "train-bn-batch" else 3,
        factors=factors,
        per_sample_factors=lambda: gt.per_sample_factors(model, CE, x, y),
        write_batches_factored=write_factored,
    )


class NoVmapFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class UsesNoVmapFn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return NoVmapFn.apply(self.lin(x))


def _call(model, loss_fn=CE, x=None, y=None, **kw):
    x = torch.randn(4, 4) if x is None else x
    y = torch.tensor([0, 1, 2, 0]) if y is None else y
    return lambda: gt.per_sample_gradients(model, loss_fn, x, y, **kw)


UNSUPPORTED = [
    (_call(bn_mlp()), r"BatchNorm.*train_batchnorm='batch'"),
    (_call(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3))),
     r"Dropout.*dropout='different'"),
    (_call(nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(12, 3)),
           x=torch.randint(0, 5, (4, 4))), r"sparse=True"),
    (_call(mlp(), nn.CrossEntropyLoss()), r"per-sample losses of shape \(2,\)"),
    (_call(UsesNoVmapFn()), r"autograd.Function"),
    (_call("not a model"), r"expected a torch.nn.Module"),
]


@pytest.mark.parametrize("kind", ["mlp", "cnn-bn-eval", "train-bn-batch", "mlp-fast",
                                  "cnn-bn-eval-fast"])
@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(check, kind, tmp_path):
    check(make_case(kind), tmp_path)


@pytest.mark.parametrize("kind", ["mlp-fast", "cnn-bn-eval-fast"])
@pytest.mark.parametrize("check", FACTORED_CHECKS, ids=lambda c: c.__name__)
def test_contract_factored(check, kind, tmp_path):
    check(make_case(kind), tmp_path)


# ---------------------------------------------------------------------------------------
# torch specifics
# ---------------------------------------------------------------------------------------


def test_frozen_excluded_and_filter():
    model = mlp()
    model[0].bias.requires_grad_(False)
    assert [n for n, _ in gt.layout(model)] == ["0.weight", "2.weight", "2.bias"]
    assert [n for n, _ in gt.layout(model, include_frozen=True)] == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    only2 = gt.layout(model, param_filter=lambda name, p: name.startswith("2."))
    assert only2 == [("2.weight", (3, 5)), ("2.bias", (3,))]
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    full = gt.per_sample_gradients(model, CE, x, y, include_frozen=True)
    part = gt.per_sample_gradients(model, CE, x, y, param_filter=lambda n, p: n.startswith("2."))
    np.testing.assert_array_equal(part, full[:, -18:])
    assert gt.per_sample_gradients(model, CE, x, y).shape == (5, 20 + 15 + 3)
    with pytest.raises(AdapterError, match="no selected"):
        gt.layout(model, param_filter=lambda n, p: False)


def test_chunk_size_and_tuple_inputs_and_float64():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(2, 3)

        def forward(self, u, v):
            return self.a(u) * torch.tanh(self.b(v))

    torch.manual_seed(0)
    model = Two()
    u, v, y = torch.randn(9, 3), torch.randn(9, 2), torch.randint(0, 3, (9,))
    G = gt.per_sample_gradients(model, CE, (u, v), y)
    Gc = gt.per_sample_gradients(model, CE, (u, v), y, chunk_size=4)
    assert_within(Gc, G, 2 * f32_chain_bound(G, K32), "chunked")  # two float32 routes
    assert_within(G.sum(0), _two_batch_grad(model, u, v, y), f32_batch_sum_bound(G, K32),
                  "sum vs batch gradient")
    G64 = gt.per_sample_gradients(model.double(), CE, (u.double(), v.double()), y)
    assert G64.dtype == np.float64


def _two_batch_grad(model, u, v, y):
    m = copy.deepcopy(model)
    CE(m(u, v), y).sum().backward()
    return np.concatenate([p.grad.reshape(-1).numpy() for p in m.parameters()])


@pytest.mark.parametrize("fast", [False, True])
def test_out_buffer_strided_and_checked(fast):
    """``out=``: gradients land in a caller's (row-padded) array, equal to a fresh call;
    nothing beyond the view is touched; a wrong shape or dtype is refused by name."""
    model = cnn()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 2, 6, 6, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    ref, loss = gt.per_sample_gradients(model, CE, x, y, return_loss=True)
    P = ref.shape[1]
    big = np.full((9, P + 7), np.nan, dtype=np.float32)
    got, got_loss = gt.per_sample_gradients(model, CE, x, y, fast=fast, out=big[:, :P],
                                            return_loss=True)
    assert np.shares_memory(got, big)
    # fast=True is another float32 route (one batch backward): each within K u colmax
    assert_within(got, ref, 2 * f32_chain_bound(ref, CNN_K32), "out=")
    assert_within(got_loss, loss, 2 * CNN_K32 * U32 * np.abs(loss).max(), "out= loss")
    assert np.isnan(big[:, P:]).all()
    for bad in (np.zeros((9, P + 1), np.float32), np.zeros((9, P), np.float64), [[0.0]]):
        with pytest.raises(AdapterError, match=r"out must be an ndarray of shape \(9, "):
            gt.per_sample_gradients(model, CE, x, y, fast=fast, out=bad)


def test_dict_inputs_as_keywords():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, features, scale):
            return self.lin(features) * scale

    torch.manual_seed(0)
    model = KW()
    f, s, y = torch.randn(6, 4), torch.rand(6, 1) + 0.5, torch.randint(0, 3, (6,))
    G = gt.per_sample_gradients(model, CE, {"features": f, "scale": s}, y)
    m = copy.deepcopy(model)
    CE(m(features=f, scale=s), y).sum().backward()
    ref = np.concatenate([p.grad.reshape(-1).numpy() for p in m.parameters()])
    assert_within(G.sum(0), ref, f32_batch_sum_bound(G, K32), "sum vs batch gradient")


def test_failed_recording_leaves_record_incomplete(tmp_path):
    if not hasattr(gs.GradientWriter, "abort_record"):
        pytest.skip("GradientWriter.abort_record not available: close() completes partial "
                    "records")
    model = mlp()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def data():
        yield x[:3], y[:3]
        raise RuntimeError("loader died")

    with gt.open_writer(tmp_path / "f.h5", model) as w:
        with pytest.raises(RuntimeError, match="loader died"):
            gt.record(w, model, CE, data(), 0, "train")
    with pytest.warns(gs.IncompleteRecordWarning):
        with gs.open_store(tmp_path / "f.h5") as s:
            assert s.records == [] and len(s.incomplete) == 1


def test_train_batchnorm_batch_leaves_model_unchanged():
    model = bn_mlp().train()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    G, loss = gt.per_sample_gradients(model, CE, x, y, train_batchnorm="batch", return_loss=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # losses are the batch-statistics losses of the ordinary training forward
    ref = CE(copy.deepcopy(model)(x), y).detach().numpy()
    # vmap'd Jacobian rows vs an ordinary forward: two float32 routes, K u max |loss| each
    assert_within(loss, ref, 2 * K32 * U32 * np.abs(ref).max(), "train-BN losses")
    assert all(p.grad is None for p in model.parameters())


def test_dropout_different_gives_per_sample_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    G = gt.per_sample_gradients(model, CE, x, y, dropout="different")
    # gradient of the last layer's weight (3, 8): dropped hidden units give zero columns
    W2 = G[:, 8 * 4 + 8: 8 * 4 + 8 + 24].reshape(16, 3, 8)
    dropped = np.all(W2 == 0, axis=1)  # (16, 8)
    assert dropped.any() and (~dropped).any()
    assert len({tuple(r) for r in dropped}) > 1, "all samples share one dropout mask"
    Gs = gt.per_sample_gradients(model, CE, x, y, dropout="same")
    dropped_s = np.all(Gs[:, 40:64].reshape(16, 3, 8) == 0, axis=1)
    assert len({tuple(r) for r in dropped_s}) == 1


def test_recorder_dataloader_ids_labels_lr_progress(tmp_path):
    model = mlp()
    x, y = torch.randn(11, 4), torch.randint(0, 3, (11,))
    ids = torch.arange(100, 111)
    ds = torch.utils.data.TensorDataset(x, y, ids)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.125)
    path = tmp_path / "rec.h5"
    with gt.open_writer(path, model) as w:
        rec = gt.Recorder(w, model, CE, optimizer=opt, progress={"disable": True})
        summ = rec.record(loader, step=5, split="train", epoch=2)
        summ2 = rec.record((x, y), step=5, split="test", batch_size=5, max_samples=8, lr=0.5)
    G, L = gt.per_sample_gradients(model, CE, x, y, return_loss=True)
    assert summ.n_samples == 11 and summ2.n_samples == 8
    # the recorder's route (fast path, batches of 4) vs one vmap call: two float32 routes,
    # each loss within K u max|L|, each mean of n float32 losses within gamma_n max|L|
    assert abs(summ.mean_loss - L.mean()) <= (2 * K32 + 2 * len(L)) * U32 * np.abs(L).max()
    with gs.open_store(path) as s:
        assert s.attrs["framework"] == "torch"
        assert_within(s.read_grads(5, "train"), G, 2 * f32_chain_bound(G, K32), "train grads")
        np.testing.assert_array_equal(s.read_sample_id(5, "train"), ids.numpy())
        np.testing.assert_array_equal(s.read_label(5, "train"), y.numpy().astype(float))
        assert_within(s.read_loss(5, "train"), L, 2 * K32 * U32 * np.abs(L).max(), "losses")
        info = {(r.step, r.split): r for r in s.records}
        assert info[(5, "train")].lr == 0.125 and info[(5, "train")].epoch == 2
        assert info[(5, "test")].lr == 0.5 and info[(5, "test")].n_samples == 8
        assert_within(s.read_grads(5, "test"), G[:8], 2 * f32_chain_bound(G[:8], K32), "test")


def test_recorder_synchronous_and_layout_mismatch(tmp_path):
    model = mlp()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with gt.open_writer(tmp_path / "a.h5", model) as w:
        gt.record(w, model, CE, (x, y), 0, "train", batch_size=2, max_pending=0)
    with gs.open_store(tmp_path / "a.h5") as s:
        G = gt.per_sample_gradients(model, CE, x, y)  # vmap vs the recorder's fast path
        assert_within(s.read_grads(0, "train"), G, 2 * f32_chain_bound(G, K32), "grads")
    with gt.open_writer(tmp_path / "b.h5", mlp(), param_filter=lambda n, p: "2." in n) as w:
        with pytest.raises(AdapterError, match="layout"):
            gt.Recorder(w, model, CE)


def test_recorder_error_in_writer_thread_propagates(tmp_path):
    model = mlp()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with gt.open_writer(tmp_path / "c.h5", model) as w:
        gt.record(w, model, CE, (x, y), 0, "train", batch_size=3)
        with pytest.raises(gs.StoreError):  # record already completed in this shard
            gt.record(w, model, CE, (x, y), 0, "train", batch_size=3)


def test_trajectory_rows(tmp_path):
    model = mlp()
    gen = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    xte, yte = torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    # mean losses by two float32 routes (batches of 7 vs one forward): each loss within
    # K u |loss| (CE >= 0, so the terms' magnitude is the mean's), each mean of <= 20 terms
    # within gamma_20: relative (2K + 2*20) u
    rel = (2 * K32 + 2 * 20) * U32
    expected = []
    with gt.open_writer(tmp_path / "t.h5", model) as w:
        for t in range(3):
            tr, te = gt.record_trajectory(w, model, CE, (xtr, ytr), (xte, yte), step=t,
                                          optimizer=opt, epoch=t, batch_size=7)
            with torch.no_grad():
                expected.append((CE(model(xtr), ytr).mean().item(),
                                 CE(model(xte), yte).mean().item()))
            assert_within((tr, te), expected[-1], rel * np.abs(expected[-1]), "trajectory")
            opt.zero_grad()
            CE(model(xtr), ytr).mean().backward()
            opt.step()
    with gs.open_store(tmp_path / "t.h5") as s:
        traj = s.trajectory()
    np.testing.assert_array_equal(traj["step"], [0, 1, 2])
    np.testing.assert_allclose(traj["lr"], 0.3)
    for c, key in enumerate(("train_loss", "test_loss")):
        want = np.array([e[c] for e in expected])
        assert_within(traj[key], want, rel * np.abs(want), key)
    assert traj["train_loss"][2] < traj["train_loss"][0]


def test_probe_osgr(tmp_path):
    model = cnn()
    gen = torch.Generator().manual_seed(5)
    xa, ya = torch.randn(30, 2, 6, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    xb, yb = torch.randn(30, 2, 6, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    before = copy.deepcopy(model.state_dict())
    lr, n, K = 0.05, 8, 4
    with gt.open_writer(tmp_path / "p.h5", model) as w:
        res = gt.probe_osgr(model, CE, (xa, ya), (xb, yb), n=n, lr=lr, K=K, step=7, writer=w,
                            seed=np.random.default_rng(11))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"probe changed {k}"
    assert all(p.grad is None for p in model.parameters())
    # independent route: same draws, a real SGD step on a copy. Two float32 routes: each
    # mean loss within (K + n) u of exact (CE >= 0: the terms' magnitude is the mean's); the
    # "after" losses also differ by lr Δg·∇ℓ <= (2K + n) u times the loss decrease (< the
    # loss) through the two routes' gradients: relative 2 (2K + 2n) u in all
    rel = 2 * (2 * CNN_K32 + 2 * n) * U32
    rng = np.random.default_rng(11)
    for k in range(K):
        ia = np.sort(rng.choice(30, n, replace=False))
        ib = np.sort(rng.choice(30, n, replace=False))
        m = copy.deepcopy(model)
        with torch.no_grad():
            tb, sb = CE(m(xa[ia]), ya[ia]).mean().item(), CE(m(xb[ib]), yb[ib]).mean().item()
        CE(m(xa[ia]), ya[ia]).mean().backward()
        torch.optim.SGD(m.parameters(), lr=lr).step()
        with torch.no_grad():
            ta, sa = CE(m(xa[ia]), ya[ia]).mean().item(), CE(m(xb[ib]), yb[ib]).mean().item()
        want = np.array([tb, ta, sb, sa])
        assert_within([res.train_before[k], res.train_after[k], res.test_before[k],
                       res.test_after[k]], want, rel * np.abs(want), f"probe draw {k}")
    num = np.sum(res.test_before - res.test_after)
    assert res.ratio == pytest.approx(num / np.sum(res.train_before - res.train_after))
    with gs.open_store(tmp_path / "p.h5") as s:
        pr = s.probes()
    for key, arr in res.as_dict().items():
        np.testing.assert_allclose(pr[key], arr, rtol=1e-12, err_msg=key)


def test_probe_small_lr_matches_first_order():
    """As lr -> 0, R -> sum_k g_D'k . g_Dk / sum_k |g_Dk|^2 (gradients by autograd)."""
    model = mlp().double()
    gen = torch.Generator().manual_seed(9)
    xa, ya = torch.randn(40, 4, generator=gen).double(), torch.randint(0, 3, (40,), generator=gen)
    xb, yb = torch.randn(40, 4, generator=gen).double(), torch.randint(0, 3, (40,), generator=gen)
    res = gt.probe_osgr(model, CE, (xa, ya), (xb, yb), n=10, lr=1e-5, K=5, seed=2)
    rng = np.random.default_rng(2)
    num = den = 0.0
    for _ in range(5):
        ia = np.sort(rng.choice(40, 10, replace=False))
        ib = np.sort(rng.choice(40, 10, replace=False))
        ga = batch_gradient(model, CE, xa[ia], ya[ia]) / 10
        gb = batch_gradient(model, CE, xb[ib], yb[ib]) / 10
        num, den = num + gb @ ga, den + ga @ ga
    assert res.ratio == pytest.approx(num / den, rel=1e-3)


def test_probe_errors():
    model = mlp()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(AdapterError, match="exceeds pool sizes"):
        gt.probe_osgr(model, CE, (x, y), (x, y), n=6, lr=0.1, K=1)
