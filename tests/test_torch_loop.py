"""The torch Recorder inside a real training loop (issue 12, "PyTorch").

A small ResNet (BatchNorm, Dropout, a residual block), an augmenting ``DataLoader`` (random
flips from torch's RNG, noise from numpy's global RNG, a shift from Python's ``random``),
SGD with momentum and a cosine schedule. Each test first states what was observed before
the fix; every value is checked against an independent route (a per-sample
``loss.backward()`` loop, the framework's own batch gradient, counting ``optimizer.step()``
calls in the loop itself, the optimizer's own ``param_groups``).
"""

from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
from conftest import assert_within, f32_batch_sum_bound, f32_chain_bound

torch = pytest.importorskip("torch")
from gsnr_stats.adapters import torch as gt  # noqa: E402
from torch import nn  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError  # noqa: E402

torch.set_num_threads(1)

CE = nn.CrossEntropyLoss(reduction="none")
N_TRAIN, BATCH, EPOCHS = 40, 8, 3  # 5 optimizer steps per epoch
# Longest float32 chain ending in a gradient entry of TinyResNet (conftest bounds): forward
# 9 + 36 + 36 (3x3 convs over 1, 4, 4 channels) + 64 (fc) + 3 (softmax), backward the same
# again, plus 64 spatial positions summed into a conv weight: ~310; about twice that.
K32 = 640


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.block = Block(c)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(c * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.drop(self.pool(self.block(h)).flatten(1)))


def resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    m = TinyResNet()
    with torch.no_grad():  # non-trivial running statistics, as after some training
        for bn in (m.bn, m.block.bn1, m.block.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return m.train()


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    x[:, 0, :, :4] += (y[:, None, None] - 1).float()  # learnable: class shifts the left half
    return x, y


class Augmented(torch.utils.data.Dataset):
    """Random flip (torch RNG), noise (numpy's global RNG), shift (Python's random)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = True) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = x + torch.from_numpy(np.random.normal(0, 0.1, x.shape).astype(np.float32))  # noqa: NPY002
            x = torch.roll(x, random.randint(-1, 1), dims=-2)
        return x, self.y[i]


def loader(augment: bool = True, shuffle: bool = True, **kw) -> torch.utils.data.DataLoader:
    x, y = images(N_TRAIN, 1)
    return torch.utils.data.DataLoader(Augmented(x, y, augment), batch_size=BATCH,
                                       shuffle=shuffle, **kw)


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train_epoch(model, opt, sched, data) -> int:
    """One ordinary training epoch; returns the number of ``opt.step()`` calls."""
    model.train()
    steps = 0
    for x, y in data:
        opt.zero_grad()
        CE(model(x), y).mean().backward()
        opt.step()
        sched.step()
        steps += 1
    return steps


def per_sample_backward(model: nn.Module, x, y) -> np.ndarray:
    """Independent reference: one ``loss.backward()`` per sample on an eval-mode copy."""
    m = copy.deepcopy(model).eval()
    rows = []
    for i in range(len(y)):
        m.zero_grad()
        CE(m(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append(np.concatenate([p.grad.reshape(-1).numpy() for p in m.parameters()]))
    return np.stack(rows)


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


# --------------------------------------------------------------------------------------
# 1 + 8. Mode: built in train mode, records in eval mode, modes restored, numbers right
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_train_mode_model_records_eval_gradients_and_keeps_its_modes(fast, tmp_path):
    # observed: a Recorder built while the model is in train mode was refused at construction
    model = resnet()
    model.block.bn2.eval()  # a submodule the user keeps in eval: its own flag must come back
    before = modes(model)
    state = copy.deepcopy(model.state_dict())
    x, y = images(12, 2)
    with gt.open_writer(tmp_path / "r.h5", model) as w:
        rec = gt.Recorder(w, model, CE, fast=fast)
        assert modes(model) == before
        rec.record((x, y), step=0, split="train", batch_size=5)
    assert modes(model) == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics untouched
    assert all(p.grad is None for p in model.parameters())
    G_ref = per_sample_backward(model, x, y)
    with gs.open_store(tmp_path / "r.h5") as s:
        G = s.read_grads(0, "train")
        assert s.record_meta(0, "train")["mode"] == "eval"
    # two float32 routes (per-sample backward vs the recorder's), each within K u colmax
    assert_within(G, G_ref, 2 * f32_chain_bound(G_ref, K32), f"eval-mode grads fast={fast}")


def test_modes_restored_when_the_record_fails(tmp_path):
    model = resnet()
    before = modes(model)

    def data():
        yield images(4, 3)
        raise RuntimeError("loader died")

    with gt.open_writer(tmp_path / "f.h5", model) as w:
        with pytest.raises(RuntimeError, match="loader died"):
            gt.Recorder(w, model, CE).record(data(), 0, "train")
    assert modes(model) == before and model.training


def test_as_is_mode_is_checked_at_every_record(tmp_path):
    # observed: built in eval, used after model.train(): a raw torch.func error ("attempted
    # to call in-place operation ... captured Tensor")
    model = resnet().eval()
    x, y = images(6, 4)
    with gt.open_writer(tmp_path / "a.h5", model) as w:
        rec = gt.Recorder(w, model, CE, mode="as_is", fast=False)
        rec.record((x, y), 0, "train", batch_size=6)
        model.train()
        with pytest.raises(AdapterError, match=r"BatchNorm.*mode='eval'"):
            rec.record((x, y), 1, "train", batch_size=6)
        model.eval()
        rec.record((x, y), 2, "train", batch_size=6)
    with gs.open_store(tmp_path / "a.h5") as s:
        assert [r.step for r in s.records] == [0, 2]
        np.testing.assert_array_equal(s.read_grads(2, "train"), s.read_grads(0, "train"))
    with pytest.raises(AdapterError, match="mode must be one of"):
        gt.Recorder(None, model, CE, mode="inference")


def test_train_mode_option_gives_batch_statistics_gradients(tmp_path):
    # the train-mode semantics stay available: mode="train" + train_batchnorm="batch"
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    state = copy.deepcopy(model.state_dict())
    with gt.open_writer(tmp_path / "t.h5", model) as w:
        gt.Recorder(w, model, CE, mode="train", train_batchnorm="batch").record(
            (x, y), 0, "train", batch_size=8)
    assert not model.training and not model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    m = copy.deepcopy(model).train()
    CE(m(x), y).sum().backward()  # the framework's batch gradient under batch statistics
    ref = np.concatenate([p.grad.reshape(-1).numpy() for p in m.parameters()])
    with gs.open_store(tmp_path / "t.h5") as s:
        G = s.read_grads(0, "train")
        assert s.record_meta(0, "train")["mode"] == "train"
    groups = np.concatenate([np.full(p.numel(), i // 2) for i, p in enumerate(m.parameters())])
    assert_within(G.astype(np.float64).sum(0), ref, f32_batch_sum_bound(G, 64, groups),
                  "sum of train-mode per-sample gradients")


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_record_under_no_grad_and_inference_mode(ctx, tmp_path):
    # observed: under torch.inference_mode() "element 0 of tensors does not require grad"
    model = resnet()
    x, y = images(10, 5)
    with gt.open_writer(tmp_path / "g.h5", model) as w:
        rec = gt.Recorder(w, model, CE)
        rec.record((x, y), 0, "train", batch_size=4)
        with getattr(torch, ctx)():
            xi, yi = x.clone(), y.clone()  # inference tensors under inference_mode
            rec.record((xi, yi), 1, "train", batch_size=4)
            rec.record(torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y), batch_size=4), 2, "train")
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with gs.open_store(tmp_path / "g.h5") as s:
        for step in (1, 2):  # same route, same batches: the same float32 operations
            np.testing.assert_array_equal(s.read_grads(step, "train"), s.read_grads(0, "train"))


def test_inference_mode_model_and_foreseeable_torch_errors_are_adapter_errors(tmp_path):
    x, y = images(6, 6)
    with torch.inference_mode():
        frozen = resnet()
    with pytest.raises(AdapterError, match=r"outside torch.inference_mode\(\)"):
        gt.Recorder(None, frozen, CE)

    class Counts(nn.Module):  # writes to a buffer in forward: torch.func refuses
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.fc(x.flatten(1))

    class Detaches(nn.Module):  # no gradient reaches the loss
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(x.flatten(1)).detach()

    with gt.open_writer(tmp_path / "n.h5", Detaches()) as w:
        with pytest.raises(AdapterError, match="no gradient reaches the loss"):
            gt.Recorder(w, Detaches(), CE, fast=True).record((x, y), 0, "train", batch_size=3)
    model = resnet()
    with gt.open_writer(tmp_path / "e.h5", Counts()) as w:
        with pytest.raises(AdapterError, match="changes a tensor in place"):
            gt.Recorder(w, Counts(), CE, fast=False).record((x, y), 0, "train", batch_size=3)
    with gt.open_writer(tmp_path / "d.h5", model) as w:
        meta_ce = nn.CrossEntropyLoss(weight=torch.ones(3, device="meta"), reduction="none")
        with pytest.raises(AdapterError, match="different devices"):
            gt.Recorder(w, model, meta_ce).record((x, y), 0, "train", batch_size=3)
        with pytest.raises(AdapterError, match=r"loss_fn\(outputs, targets\) failed.*targets"):
            gt.Recorder(w, model, CE).record((x, torch.randn(6, 5)), 0, "train", batch_size=3)


# --------------------------------------------------------------------------------------
# 2. Random state: a recorded run is the unrecorded run
# --------------------------------------------------------------------------------------


def run(tmp_path, *, record: bool = False, iterate: bool = False) -> nn.Module:
    """Seeded training (3 epochs), optionally recording "train" from the augmenting loader
    every epoch, or (control) just iterating that loader, as recording does."""
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - the augmentation uses the global generators
    random.seed(0)
    model = resnet()
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * N_TRAIN // BATCH)
    data = loader()
    w = gt.open_writer(tmp_path / f"run{record}{iterate}.h5", model) if record else None
    rec = gt.Recorder(w, model, CE, optimizer=opt) if record else None
    for epoch in range(EPOCHS):
        train_epoch(model, opt, sched, data)
        if rec is not None:
            rec.record(data, step=epoch, split="train", epoch=epoch)
        if iterate:
            for _ in data:
                pass
    if w is not None:
        rec.close()
        w.close()
    return model


def test_recording_does_not_change_the_training_run(tmp_path):
    # observed: recording from the training DataLoader advanced torch's and numpy's global
    # random state, so the recorded run differed from the unrecorded one
    plain = run(tmp_path)
    recorded = run(tmp_path, record=True)
    control = run(tmp_path, iterate=True)  # what recording draws, without restoring it
    same = [torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                              recorded.state_dict().values(), strict=True)]
    assert all(same), "a recorded run differs from the unrecorded one"
    assert not all(torch.equal(a, b) for a, b in zip(
        plain.state_dict().values(), control.state_dict().values(), strict=True)), \
        "the control run should differ: the test would not see a changed random state"


def test_loader_generator_and_python_numpy_state_restored(tmp_path):
    model = resnet()
    g = torch.Generator().manual_seed(7)
    data = loader(generator=g)
    with gt.open_writer(tmp_path / "g.h5", model) as w:
        rec = gt.Recorder(w, model, CE, dropout="different", mode="train",
                          train_batchnorm="batch")  # random layers draw from torch's RNG too
        states = (g.get_state(), torch.get_rng_state(), np.random.get_state()[1].copy(),  # noqa: NPY002
                  random.getstate())
        rec.record(data, 0, "train")
        assert torch.equal(g.get_state(), states[0])
        assert torch.equal(torch.get_rng_state(), states[1])
        np.testing.assert_array_equal(np.random.get_state()[1], states[2])  # noqa: NPY002
        assert random.getstate() == states[3]


# --------------------------------------------------------------------------------------
# 3 + 6. Batches: an explicit rule, unpack=, and batch_size= in the message
# --------------------------------------------------------------------------------------


def test_float_third_element_is_refused_not_cast_to_ids(tmp_path):
    # observed: per-sample weights as a third element were taken as sample_id, cast to int
    # (all 0)
    model = resnet()
    x, y = images(10, 7)
    weights = torch.rand(10) * 0.9  # int() of each is 0
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, weights),
                                     batch_size=4)
    with gt.open_writer(tmp_path / "u.h5", model) as w:
        rec = gt.Recorder(w, model, CE)
        with pytest.raises(AdapterError, match=r"third element \(dtype float32, shape \(4,\)\)"
                                               r".*unpack="):
            rec.record(dl, 0, "train")
        rec.record(dl, 1, "train", unpack=lambda b: (b[0], b[1]))
        ids = torch.arange(50, 60)
        rec.record(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, ids),
                                               batch_size=4), 2, "train")
        dict_dl = [{"x": x[:5], "y": y[:5], "sample_id": ids[:5]},
                   {"x": x[5:], "y": y[5:], "sample_id": ids[5:]}]
        rec.record(dict_dl, 3, "train")
        with pytest.raises(AdapterError, match=r"unrecognised keys \['weight'\]"):
            rec.record([{"x": x, "y": y, "weight": weights}], 4, "train")
        with pytest.raises(AdapterError, match=r"4 elements.*\[3\] dtype float32.*unpack="):
            rec.record([(x, y, ids, weights)], 4, "train")
        with pytest.raises(AdapterError, match="the third value unpack returned"):
            rec.record(dl, 4, "train", unpack=lambda b: (b[0], b[1], b[2]))
        G_ref = per_sample_backward(model, x, y)
    with gs.open_store(tmp_path / "u.h5") as s:
        np.testing.assert_array_equal(s.read_sample_id(1, "train"), np.arange(10))
        np.testing.assert_array_equal(s.read_sample_id(2, "train"), ids.numpy())
        np.testing.assert_array_equal(s.read_sample_id(3, "train"), ids.numpy())
        for step in (1, 2, 3):
            assert_within(s.read_grads(step, "train"), G_ref, 2 * f32_chain_bound(G_ref, K32),
                          f"record {step}")
    # the helpers take unpack= too
    ml = gt.mean_loss(resnet().eval(), CE, dl, unpack=lambda b: (b[0], b[1]))
    with torch.no_grad():
        ref = float(CE(resnet().eval()(x), y).double().mean())
    assert abs(ml - ref) <= 2 * K32 * 2.0 ** -24 * ref


def test_whole_set_tuple_without_batch_size_says_batch_size(tmp_path):
    # observed: "cannot unpack a batch of type Tensor", no word of batch_size=
    model = resnet()
    x, y = images(6, 8)
    with gt.open_writer(tmp_path / "b.h5", model) as w:
        rec = gt.Recorder(w, model, CE)
        with pytest.raises(AdapterError, match="batch_size="):
            rec.record((x, y), 0, "train")
        with pytest.raises(AdapterError, match="batch_size="):
            rec.record([x, x], 0, "train")  # bare tensors as batches
        with pytest.raises(AdapterError, match="batch_size="):
            rec.record(x, 0, "train")
        rec.record((x, y), 0, "train", batch_size=6)  # the fix the message names
        rec.record([torch.cat([x.flatten(1), y[:, None].float()], 1)], 1, "train",
                   unpack=lambda b: (b[:, :64].reshape(-1, 1, 8, 8), b[:, 64].long()))
    with gs.open_store(tmp_path / "b.h5") as s:
        np.testing.assert_array_equal(s.read_grads(1, "train"), s.read_grads(0, "train"))


# --------------------------------------------------------------------------------------
# 4. Optimizer: per-group lr, class and hyper-parameters
# --------------------------------------------------------------------------------------


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    decay = [n for n, p in model.named_parameters() if p.ndim > 1]
    return decay, [n for n, _ in model.named_parameters() if n not in decay]


def test_optimizer_groups_class_and_hyper_parameters_are_stored(tmp_path):
    # observed: the lr came from param_groups[0] silently; the optimizer kind was not stored
    model = resnet()
    decay, no_decay = split_decay(model)
    named = dict(model.named_parameters())
    opt = torch.optim.SGD([{"params": [named[n] for n in decay], "weight_decay": 5e-4},
                           {"params": [named[n] for n in no_decay], "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x, y = images(8, 9)
    with gt.open_writer(tmp_path / "o.h5", model) as w, \
            gt.Recorder(w, model, CE, optimizer=opt) as rec:
        train_epoch(model, opt, sched, [(x, y)] * 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # groups agree: no warning
            summ = rec.record((x, y), 3, "train", batch_size=8)
        lr_now = [g["lr"] for g in opt.param_groups]
        opt.param_groups[1]["lr"] = 0.01  # biases and BatchNorm at another rate
        with pytest.warns(UserWarning, match=r"groups \[0, 1\].*different learning rates.*lr="):
            nan_summ = rec.record((x, y), 4, "train", batch_size=8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rec.record((x, y), 5, "train", batch_size=8, lr=0.02)
    assert lr_now[0] == lr_now[1] != 0.05  # the schedule moved it
    assert summ.lr == lr_now[0] and math.isnan(nan_summ.lr)
    with gs.open_store(tmp_path / "o.h5") as s:
        lrs = {r.step: r.lr for r in s.records}
        assert lrs[3] == lr_now[0] and math.isnan(lrs[4]) and lrs[5] == 0.02
        meta = s.record_meta(3, "train")
        meta4 = s.record_meta(4, "train")
    assert meta["framework"] == f"torch {torch.__version__}" and meta["mode"] == "eval"
    o = meta["optimizer"]
    assert o["class"] == "SGD" and o["module"] == "torch.optim.sgd"
    for got, want, names in zip(o["groups"], opt.param_groups, (decay, no_decay), strict=True):
        assert got["params"] == names
        for k in ("momentum", "dampening", "weight_decay", "nesterov", "initial_lr"):
            assert got[k] == want[k], k
    assert [g["lr"] for g in o["groups"]] == lr_now
    assert [g["lr"] for g in meta4["optimizer"]["groups"]] == [lr_now[0], 0.01]


def test_adam_hyper_parameters_and_lr_of_the_recorded_groups_only(tmp_path):
    model = resnet()
    fc = [model.fc.weight, model.fc.bias]
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.Adam([{"params": fc, "lr": 1e-3}, {"params": rest, "lr": 1e-4}],
                           betas=(0.8, 0.99), eps=1e-7, amsgrad=True)
    x, y = images(6, 10)
    only_fc = {"param_filter": lambda n, p: n.startswith("fc.")}
    with gt.open_writer(tmp_path / "a.h5", model, **only_fc) as w:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fc group alone holds the recorded params
            gt.record(w, model, CE, (x, y), 0, "train", batch_size=6, optimizer=opt, **only_fc)
    with gs.open_store(tmp_path / "a.h5") as s:
        assert s.record(0, "train").lr == 1e-3
        o = s.record_meta(0, "train")["optimizer"]
    assert o["class"] == "Adam"
    g0, g1 = o["groups"]
    assert g0["betas"] == [0.8, 0.99] and g0["eps"] == 1e-7 and g0["amsgrad"] is True
    assert g0["params"] == ["fc.weight", "fc.bias"] and g1["params"] == []
    assert (g0["lr"], g1["lr"]) == (1e-3, 1e-4)


# --------------------------------------------------------------------------------------
# 5. Step spacing: the stored optimizer_step is the number of optimizer.step() calls
# --------------------------------------------------------------------------------------


def test_optimizer_step_counts_the_loops_steps(tmp_path):
    # observed: step=epoch made the analytics count one optimizer step between records
    # instead of 5; nothing in the store said otherwise
    torch.manual_seed(0)
    model = resnet()
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * 5)
    data = loader()
    plain = loader(augment=False, shuffle=False)
    calls, want = 0, []
    with gt.open_writer(tmp_path / "s.h5", model) as w:
        rec = gt.Recorder(w, model, CE, optimizer=opt)
        for epoch in range(EPOCHS):
            calls += train_epoch(model, opt, sched, data)  # counted here, independently
            summ = rec.record(plain, step=epoch, split="train", epoch=epoch)
            want.append(calls)
            assert summ.optimizer_step == calls
        rec.close()
        opt.step()  # not counted once closed
        assert rec.optimizer_step == calls
        with pytest.raises(AdapterError, match="closed"):
            rec.record(plain, step=9, split="train")
    with gs.open_store(tmp_path / "s.h5") as s:
        assert [r.optimizer_step for r in s.records] == want == [5, 10, 15]
        assert [r.step for r in s.records] == [0, 1, 2]


def test_optimizer_step_start_without_optimizer_and_override(tmp_path):
    model = resnet()
    x, y = images(6, 11)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):  # steps before the Recorder: Adam counts them in state[p]["step"]
        opt.zero_grad()
        CE(model(x), y).sum().backward()
        opt.step()
    m2 = resnet()
    sg = sgd(m2)
    CE(m2(x), y).sum().backward()
    sg.step()
    with gt.open_writer(tmp_path / "p.h5", model) as w:
        with gt.Recorder(w, model, CE, optimizer=opt) as rec:
            assert rec.optimizer_step == 4
            opt.step()
            rec.record((x, y), 0, "train", batch_size=6)
            rec.record((x, y), 1, "train", batch_size=6, optimizer_step=100)
        gt.record(w, model, CE, (x, y), 2, "train", batch_size=6)
        gt.record(w, model, CE, (x, y), 3, "train", batch_size=6, optimizer_step=7)
        with pytest.warns(UserWarning, match="has already taken steps"):
            gt.Recorder(w, m2, CE, optimizer=sg).close()
    with gs.open_store(tmp_path / "p.h5") as s:
        assert [r.optimizer_step for r in s.records] == [5, 100, None, 7]
        assert "optimizer" not in s.record_meta(2, "train")


# --------------------------------------------------------------------------------------
# 7. A mean-reduced loss fails on the first batch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("keep", ["grads", "moments"])
def test_mean_reduced_loss_fails_on_the_first_batch(fast, keep, tmp_path):
    # observed: "loss_fn returned () for a batch of 2 samples" (the batch was 64), only
    # after the first epoch
    model = resnet()
    x, y = images(66, 12)  # batches of 64 and 2
    drawn = []

    def batches():
        for b in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=64):
            drawn.append(len(b[1]))
            yield b

    with gt.open_writer(tmp_path / "m.h5", model) as w:
        rec = gt.Recorder(w, model, nn.CrossEntropyLoss(), fast=fast, keep=keep)
        with pytest.raises(AdapterError) as e:
            rec.record(batches(), 0, "train")
    assert drawn == [64], "the loss shape must be checked on the first batch"
    msg = str(e.value)
    assert "reduction='none'" in msg and "shape (n,)" in msg and "(64 samples)" in msg
    assert "returned shape ()" in msg
