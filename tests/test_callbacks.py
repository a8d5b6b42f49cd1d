"""Training-framework callbacks (issue 12, "Callbacks"): Lightning and the HF Trainer.

Each training test trains a small BatchNorm model for a few epochs under the framework's own
trainer with the callback recording, and checks the store against routes the test computes
itself: per-sample gradients from ``torch.func`` ``vmap(grad)`` in float64 on a copy of
the model in eval mode, loaded with the state a probe callback captured at the same hook;
the optimizer's step count from the test's own ``register_step_post_hook``.
"""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")
pytest.importorskip("transformers")

import lightning.pytorch as pl  # noqa: E402
import transformers  # noqa: E402
from conftest import U32, assert_within, f32_chain_bound, moments_shift_bound, two_pass  # noqa: E402
from gsnr_stats.adapters import hf as ghf  # noqa: E402
from gsnr_stats.adapters import lightning as gl  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gsnr_stats as gs  # noqa: E402
from gsnr_stats.errors import AdapterError  # noqa: E402

torch.set_num_threads(1)
# Lightning's own notes on a tiny CPU run (few workers, a deprecated pytree check)
pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec")]

CE = nn.CrossEntropyLoss(reduction="none")
# Terms along the longest float32 chain ending in a stored gradient entry (conftest bounds):
# forward Linear 64 + BatchNorm (eval) 4 + Linear 16 + log-softmax over 10 (~12), backward
# softmax 10 + Linear 16 + BatchNorm 2 + the product delta * a: ~125; about twice that.
K32 = 256


def _digits():
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


X_ALL, Y_ALL = _digits()
TRAIN = TensorDataset(X_ALL[:128], Y_ALL[:128])
VAL = [TensorDataset(X_ALL[128:192], Y_ALL[128:192]), TensorDataset(X_ALL[192:240], Y_ALL[192:240])]


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def reference(module: nn.Module, state: dict, ds: TensorDataset) -> tuple[np.ndarray, np.ndarray]:
    """Float64 per-sample gradients (n, P) and losses of ``module`` at ``state``, eval mode,
    by ``vmap(grad)`` over ``functional_call`` -- the test's own route."""
    m = copy.deepcopy(module).double()
    m.load_state_dict(state)
    m.eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    X, y = ds.tensors

    def loss(p, x, t):
        out = functional_call(m, (p, buffers), (x[None].double(),))
        return F.cross_entropy(out, t[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([g[k].reshape(len(X), -1) for k in params], dim=1).numpy()
    with torch.no_grad():
        L = F.cross_entropy(m(X.double()), y, reduction="none").numpy()
    return G, L


def open_fds(path) -> int:
    """File descriptors of this process open on ``path`` (Linux's /proc): a writer that was
    closed holds none."""
    fds = "/proc/self/fd"
    if not os.path.isdir(fds):
        pytest.skip("needs /proc/self/fd")
    n = 0
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            n += os.path.realpath(os.readlink(f"{fds}/{fd}")) == os.path.realpath(path)
    return n


def check_record(store, step: int, split: str, G: np.ndarray, L: np.ndarray, y) -> None:
    got = store.read_grads(step, split)
    assert got.shape == G.shape and got.dtype == np.float32
    assert_within(got, G, f32_chain_bound(G, K32), f"grads ({step}, {split})")
    assert_within(store.read_loss(step, split), L, K32 * U32 * np.abs(L).max(), "loss")
    np.testing.assert_array_equal(store.read_label(step, split), y.numpy())  # row order


# --------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------


class LitNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net()
        self.sanity_val_batches = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.sanity_val_batches += int(self.trainer.sanity_checking)
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


class LitProbe(pl.Callback):
    """Placed after the GradientCallback: captures, at the hooks it records in, the model's
    state (for the reference), the test's own optimizer step count, and checks that the
    record left modes, random state, parameters and buffers as a probe before it saw them."""

    def __init__(self, cb, before=None) -> None:
        self.cb, self.before = cb, before
        self.steps = 0              # optimizer.step() calls, counted by the test's own hook
        self.states: dict[int, dict] = {}
        self.counts: dict[int, int] = {}
        self.records_at_sanity_end = None
        self.snap = None

    def on_fit_start(self, trainer, pl_module):
        if self.before is None:
            def count(*_):
                self.steps += 1
            trainer.optimizers[0].register_step_post_hook(count)

    def on_sanity_check_end(self, trainer, pl_module):
        self.records_at_sanity_end = len(self.cb.records) if self.cb is not None else None

    def _at(self, trainer, pl_module):
        snap = ({n: m.training for n, m in pl_module.named_modules()}, torch.get_rng_state(),
                {k: v.clone() for k, v in pl_module.state_dict().items()})
        if self.before is not None:   # the probe before the callback
            self.snap = snap
            return
        b = self.before_probe.snap
        assert snap[0] == b[0], "submodule modes changed by the record"
        assert torch.equal(snap[1], b[1]), "torch's random state changed by the record"
        assert all(torch.equal(snap[2][k], b[2][k]) for k in b[2]), "state changed"
        if trainer.global_step not in self.states:  # the first hook at a step is the record's
            self.states[trainer.global_step] = copy.deepcopy(pl_module.net.state_dict())
            self.counts[trainer.global_step] = self.steps

    def on_train_start(self, trainer, pl_module):
        self._at(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._at(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._at(trainer, pl_module)


def _fit(cb, *, max_epochs=3, **kw):
    model = LitNet()
    before = LitProbe(None, before=True)
    after = LitProbe(cb)
    after.before_probe = before
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=2,
                         limit_train_batches=8, limit_val_batches=2, accumulate_grad_batches=2,
                         callbacks=[before, cb, after], **kw)
    torch.manual_seed(1)
    trainer.fit(model, DataLoader(TRAIN, batch_size=16, shuffle=True),
                [DataLoader(v, batch_size=32) for v in VAL])
    return model, after


def test_lightning_records_every_epoch_against_a_reference(tmp_path):
    """3 epochs of SGD (momentum, weight decay, StepLR) on a BatchNorm MLP, 2 validation
    loaders, a 2-batch sanity check, gradient accumulation 2: the stored per-sample
    gradients are vmap(grad)'s at the captured checkpoints, the stored steps are the
    optimizer's own step count, nothing is recorded in the sanity check, splits are
    named per loader."""
    path = tmp_path / "lit.h5"
    cb = gl.GradientCallback(path, CE, train_data=DataLoader(TRAIN, batch_size=50),
                             record_at_start=True)
    model, probe = _fit(cb)
    # (c) the sanity check ran (validation_step saw 2 batches per loader) and recorded
    # nothing; a record then would have collided with the step-0 record of on_train_start
    assert model.sanity_val_batches == 4 and probe.records_at_sanity_end == 0
    s = gs.open_store(path)
    # (d) splits named per loader, every held-out batch recorded (limit_val_batches=2 is
    # the validation loop's, not the record's)
    assert s.splits == ["train", "val", "val_1"]
    assert [(r.split, r.n_samples) for r in s.records if r.step == 0] == \
        [("train", 128), ("val", 64), ("val_1", 48)]
    # (b) steps = the optimizer's step count at each checkpoint: 8 batches per epoch with
    # accumulation 2 are 4 updates, not 8 (and not one per epoch)
    assert s.steps == [0, 4, 8, 12] == [probe.counts[k] for k in (0, 4, 8, 12)]
    assert all(r.optimizer_step == r.step for r in s.records)
    assert [r.epoch for r in s.records if r.split == "train"] == [0.0, 1.0, 2.0, 3.0]
    ds = gs.reduce(path)
    np.testing.assert_array_equal(np.diff(ds["optimizer_step"].values),
                                  np.diff([probe.counts[k] for k in (0, 4, 8, 12)]))
    # the optimizer's kind and per-group hyper-parameters are stored; lr after StepLR
    meta = s.record_meta(12, "train")["optimizer"]
    assert meta["class"] == "SGD" and meta["groups"][0]["momentum"] == 0.9
    assert [r.lr for r in s.records if r.split == "train"] == [0.1, 0.1, 0.1, 0.05]
    # (a) per-sample gradients against the test's own float64 reference at each checkpoint
    assert list(s.layout.names) == [k for k, _ in model.named_parameters()]
    for step in s.steps:
        for split, dset in zip(s.splits, [TRAIN, *VAL], strict=True):
            G, L = reference(model.net, probe.states[step], dset)
            check_record(s, step, split, G, L, dset.tensors[1])
    assert model.training  # back in train mode after the last record


def test_lightning_every_n_steps_moments_named_splits(tmp_path):
    """every_n_steps counts optimizer updates (accumulation 2: a step every 2 batches), never
    records a step twice, names held-out splits from val_names, keeps moments whose mean
    and variance are the reference's; no train_data: only held-out splits."""
    path = tmp_path / "steps.h5"
    cb = gl.GradientCallback(path, CE, val_names=["clean", "noisy"], every_n_steps=3,
                             keep="moments", max_samples=40)
    model, probe = _fit(cb, max_epochs=2)
    s = gs.open_store(path)
    assert s.splits == ["clean", "noisy"] and s.steps == [3, 6]
    assert all(r.kind == "moments" and r.n_samples == 40 for r in s.records)
    assert [r.epoch for r in s.records if r.split == "clean"] == [0.75, 1.5]  # 6/8, 1 + 4/8
    ds = gs.reduce(path)
    assert ds["optimizer_step"].values.tolist() == [probe.counts[3], probe.counts[6]] == [3, 6]
    for step in (3, 6):
        for split, dset in (("clean", VAL[0]), ("noisy", VAL[1])):
            G, _ = reference(model.net, probe.states[step], TensorDataset(*dset[:40]))
            m, v = two_pass(G)
            bm, bv = moments_shift_bound(f32_chain_bound(G, K32), v, 40)
            sel = ds.sel(step=step, split=split)
            assert_within(sel["mean"].values, m, bm, f"mean ({step}, {split})")
            assert_within(sel["var"].values, v, bv, f"var ({step}, {split})")


def test_lightning_error_closes_the_store_with_the_record_incomplete(tmp_path):
    """An error inside a record (here the data of the second split fails at step 4) reaches
    the user; the store is closed (on_exception), the records completed before survive,
    the interrupted one is incomplete, not completed with half its rows."""

    class Failing:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            yield VAL[1].tensors[0][:16], VAL[1].tensors[1][:16]
            if self.calls == 2:
                raise RuntimeError("disk gone")
            yield VAL[1].tensors[0][16:], VAL[1].tensors[1][16:]

    path = tmp_path / "fail.h5"
    cb = gl.GradientCallback(path, CE, train_data=DataLoader(TRAIN, batch_size=64),
                             val_data={"val": DataLoader(VAL[0], batch_size=64),
                                       "bad": Failing()}, record_at_start=True)
    with pytest.raises(RuntimeError, match="disk gone"):
        _fit(cb)
    assert open_fds(path) == 0  # closed by on_exception (teardown does not run)
    with pytest.warns(gs.IncompleteRecordWarning):
        s = gs.open_store(path)  # the writer closed the file: it opens, validated
    assert [(r.step, r.split) for r in s.records] == [
        (0, "bad"), (0, "train"), (0, "val"), (4, "train"), (4, "val")]
    assert [(r.step, r.split) for r in s.incomplete] == [(4, "bad")]
    assert s.record(0, "bad").n_samples == 48


def test_an_epoch_cut_by_max_steps_is_recorded_as_a_fraction(tmp_path):
    """max_steps=6 at 4 updates per epoch: the second epoch ends after 4 of its 8 batches;
    it is recorded (every_n_epochs=1) at step 6 as epoch 1.5, in Lightning and in HF."""
    cb = gl.GradientCallback(tmp_path / "l.h5", CE, train_data=DataLoader(TRAIN, batch_size=64),
                             val_data=False)
    _fit(cb, max_steps=6)
    assert [(r.step, r.epoch) for r in cb.records] == [(4, 1.0), (6, 1.5)]
    collate = transformers.default_data_collator
    train = DictDS(TRAIN)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
        gradient_accumulation_steps=2, max_steps=6, report_to=[], use_cpu=True,
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_pin_memory=False)
    cb = ghf.GradientCallback(tmp_path / "h.h5",
                              train_data=DataLoader(train, batch_size=64, collate_fn=collate))
    transformers.Trainer(model=TinyClassifier(TinyConfig()), args=args, train_dataset=train,
                         data_collator=collate, callbacks=[cb]).train()
    assert [(r.step, r.epoch) for r in cb.records] == [(4, 1.0), (6, 1.5)]


def test_docs_callback_examples_use_the_real_signatures():
    """docs/adapters.md's Lightning and HF examples call GradientCallback with keyword
    arguments it has, and import names the adapters export."""
    import ast
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/adapters.md").read_text()
    for title, mod in (("Lightning", gl), ("Hugging Face Trainer", ghf)):
        sec = text[text.index(f"\n## {title}\n"):]
        sec = sec[: sec.index("\n## ", 5)]
        blocks = re.findall(r"```python\n(.*?)```", sec, flags=re.S)
        assert blocks, title
        params = set(inspect.signature(mod.GradientCallback).parameters)
        calls = 0
        for node in ast.walk(ast.parse("\n".join(blocks))):
            if isinstance(node, ast.ImportFrom):
                assert node.module == mod.__name__, title
                assert all(a.name in mod.__all__ for a in node.names), title
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "GradientCallback":
                calls += 1
                assert {k.arg for k in node.keywords} <= params, title
        assert calls == 1, title


def test_lightning_configuration_errors(tmp_path):
    with pytest.raises(AdapterError, match="not both"):
        gl.GradientCallback(tmp_path / "a.h5", CE, every_n_epochs=1, every_n_steps=2)
    with pytest.raises(AdapterError, match="iterator"):
        gl.GradientCallback(tmp_path / "a.h5", CE, train_data=iter([(X_ALL, Y_ALL)]))
    with pytest.raises(AdapterError, match="keep"):
        gl.GradientCallback(tmp_path / "a.h5", CE, keep="moment")
    with pytest.raises(AdapterError, match="2 val_data loader.*1 split name"):
        gl.GradientCallback(tmp_path / "a.h5", CE, val_data=[TRAIN, TRAIN], val_names=["a"])
    with pytest.raises(AdapterError, match="set by the callback"):
        gl.GradientCallback(tmp_path / "a.h5", CE, optimizer=None)
    # nothing to record is found when training starts, before any update
    cb = gl.GradientCallback(tmp_path / "b.h5", CE, val_data=False)
    with pytest.raises(AdapterError, match="nothing to record"):
        _fit(cb)
    assert open_fds(tmp_path / "b.h5") == 0
    assert gs.open_store(tmp_path / "b.h5").records == []  # closed, empty, valid


# --------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------


class TinyConfig(transformers.PretrainedConfig):
    model_type = "gsnr-tiny-mlp"

    def __init__(self, n_in: int = 64, hidden: int = 16, num_labels: int = 10, **kw):
        super().__init__(num_labels=num_labels, **kw)
        self.n_in, self.hidden = n_in, hidden


class TinyClassifier(transformers.PreTrainedModel):
    """A local PreTrainedModel (no download): Linear-BatchNorm-ReLU-Linear on digits."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.net = net()
        self.post_init()

    def _init_weights(self, module):  # keep net()'s seeded initialisation
        pass

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


class DictDS(torch.utils.data.Dataset):
    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return {"x": x, "labels": y}


class HFProbe(transformers.TrainerCallback):
    """After the GradientCallback: the model's state at each record's hook and the test's
    own count of the torch optimizer's steps."""

    def __init__(self) -> None:
        self.steps = 0
        self.states: dict[int, dict] = {}
        self.counts: dict[int, int] = {}

    def _at(self, state, model):
        self.states[state.global_step] = copy.deepcopy(model.net.state_dict())
        self.counts[state.global_step] = self.steps

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        def count(*_):
            self.steps += 1
        # the torch optimizer inside accelerate's AcceleratedOptimizer
        getattr(optimizer, "optimizer", optimizer).register_step_post_hook(count)
        self._at(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kw):
        assert model.training  # the Trainer's train mode, restored after the record
        self._at(state, model)


def test_hf_trainer_records_every_epoch_against_a_reference(tmp_path):
    """3 epochs of the HF Trainer (AdamW, linear schedule, accumulation 2) on a local
    PreTrainedModel with BatchNorm; eval splits from a dict eval_dataset through
    eval_loaders; default dict unpacking and default cross-entropy loss: stored gradients
    are vmap(grad)'s at the captured checkpoints, steps the optimizer's own count."""
    collate = transformers.default_data_collator
    train, evals = DictDS(TRAIN), {"dev": DictDS(VAL[0]), "ood": DictDS(VAL[1])}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
        per_device_eval_batch_size=32, gradient_accumulation_steps=2, num_train_epochs=3,
        learning_rate=0.01, report_to=[], use_cpu=True, save_strategy="no",
        eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_pin_memory=False, seed=0)
    model = TinyClassifier(TinyConfig())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   eval_dataset=evals, data_collator=collate)
    path = tmp_path / "hf.h5"
    cb = ghf.GradientCallback(path, train_data=DataLoader(train, batch_size=50,
                                                          collate_fn=collate),
                              eval_data=ghf.eval_loaders(trainer), record_at_start=True)
    probe = HFProbe()
    trainer.add_callback(cb)
    trainer.add_callback(probe)
    with cb:
        trainer.train()
    assert open_fds(path) == 0  # closed at on_train_end
    s = gs.open_store(path)
    assert s.splits == ["dev", "ood", "train"]
    # 128 samples / 16 per batch = 8 batches per epoch, accumulation 2: 4 updates per epoch
    assert s.steps == [probe.counts[k] for k in sorted(probe.counts)] == [0, 4, 8, 12]
    assert all(r.optimizer_step == r.step for r in s.records)
    assert [r.epoch for r in s.records if r.split == "train"] == [0.0, 1.0, 2.0, 3.0]
    assert gs.reduce(path)["optimizer_step"].values.tolist() == [0, 4, 8, 12]
    meta = s.record_meta(4, "train")["optimizer"]
    assert meta["class"] == "AdamW" and len(meta["groups"]) == 2  # decay / no-decay groups
    for step in s.steps:
        for split, dset in (("train", TRAIN), ("dev", VAL[0]), ("ood", VAL[1])):
            G, L = reference(model.net, probe.states[step], dset)
            check_record(s, step, split, G, L, dset.tensors[1])


def test_hf_default_loss_is_per_sample_cross_entropy():
    """cross_entropy: -log softmax(z_i)[y_i] for (n, C) logits; for (n, T, C) the mean over
    sample i's tokens whose label is not -100 (float64 closed form here)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    want = -torch.log_softmax(z, 1)[torch.arange(5), y]
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=z)
    torch.testing.assert_close(ghf.cross_entropy(out, y), want, rtol=0, atol=1e-15)
    zt = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 4, (3, 6), generator=g)
    yt[0, 4:] = -100
    yt[2, :] = -100  # no token with a loss: 0
    lp = -torch.log_softmax(zt, 2)
    want_t = torch.stack([lp[i, t, yt[i, t]] for i in range(2) for t in range(6)
                          if yt[i, t] != -100]).split([4, 6])
    want_t = torch.stack([w.mean() for w in want_t] + [torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(ghf.cross_entropy({"logits": zt}, yt), want_t, rtol=0, atol=1e-15)
    with pytest.raises(AdapterError, match="integer class labels"):
        ghf.cross_entropy(z, y.double())
    with pytest.raises(AdapterError, match="logits"):
        ghf.cross_entropy(z[:, :1], y)


def test_hf_default_route_matches_the_models_own_loss_on_a_bert():
    """A real transformers model (tiny BertForTokenClassification, built locally, eager
    attention, no attention mask): gradients through unpack_labels + cross_entropy equal,
    for each sample, the gradient of the model's own loss on that sample alone."""
    from gsnr_stats.adapters import torch as gt

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 40, (4, 8), generator=g),
             "labels": torch.randint(0, 3, (4, 8), generator=g)}
    batch["labels"][1, 5:] = -100
    x, y = ghf.unpack_labels()(batch)
    assert set(x) == {"input_ids"}
    G = gt.per_sample_gradients(model, ghf.cross_entropy, x, y)
    own = []
    for i in range(4):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
        own.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy())
    own = np.stack(own)
    # Two float32 routes (vmap, plain autograd) through embeddings, LayerNorms over 16,
    # attention over 8 tokens, FFN 32 and back: ~250 terms, about twice that. Columns are
    # grouped by layer: the key bias's gradient is exactly 0 (softmax ignores a shift of
    # every score), its float32 value is rounding of the key layer's terms.
    layer = np.concatenate([[n.rsplit(".", 1)[0]] * p.numel()
                            for n, p in model.named_parameters()])
    assert_within(G, own, 2 * f32_chain_bound(own, 512, groups=layer), "bert grads")
    with pytest.raises(AdapterError, match="no 'labels'"):
        ghf.unpack_labels()({"input_ids": batch["input_ids"]})


def test_hf_configuration_errors(tmp_path):
    with pytest.raises(AdapterError, match="nothing to record"):
        ghf.GradientCallback(tmp_path / "a.h5")
    with pytest.raises(AdapterError, match="repeat"):
        ghf.GradientCallback(tmp_path / "a.h5", train_data=[1], eval_data={"train": [2]})
    with pytest.raises(AdapterError, match="positive int"):
        ghf.GradientCallback(tmp_path / "a.h5", train_data=[1], every_n_steps=0)


def test_docs_one_api_table_matches_the_recorders():
    """docs/adapters.md's "One API, three frameworks" table states each Recorder's and
    record()'s signature as the code has it: the same parameters, in order where
    positional, with the same defaults (JAX's deprecated ``Recorder(params=)`` left out)."""
    import ast
    import inspect
    import re
    from pathlib import Path

    pytest.importorskip("jax")
    from gsnr_stats.adapters import jax as gj
    from gsnr_stats.adapters import sklearn as gk
    from gsnr_stats.adapters import torch as gt

    text = (Path(__file__).resolve().parents[1] / "docs/adapters.md").read_text()
    table = text[text.index("\n## One API, three frameworks\n"):]
    rows = {r.split("|")[1].strip(): r.split("|")[2:5] for r in table.splitlines()
            if r.startswith("| `Recorder` |") or r.startswith("| `record()` |")}
    deprecated = {(gj, "Recorder"): {"params"}}
    P = inspect.Parameter
    for col, mod in enumerate((gt, gj, gk)):
        for row, fn in (("`Recorder`", mod.Recorder.__init__), ("`record()`", mod.Recorder.record)):
            doc = re.match(r"\s*`(\w+)\((.*?)\)`", rows[row][col]).group(2)
            a = ast.parse(f"def f({doc}): pass").body[0].args
            doc_pos = [x.arg for x in a.args]
            doc_kw = {x.arg: ast.literal_eval(d) for x, d in zip(a.kwonlyargs, a.kw_defaults,
                                                               strict=True)}
            params = list(inspect.signature(fn).parameters.values())[1:]  # without self
            act_kw = {p.name: p.default for p in params if p.kind == P.KEYWORD_ONLY}
            if any(p.kind == P.VAR_POSITIONAL for p in params):  # jax record(*args, step=, ...)
                assert all(n in act_kw for n in doc_pos[1:]), (mod.__name__, row)
            else:
                assert doc_pos == [p.name for p in params if p.kind == P.POSITIONAL_OR_KEYWORD], \
                    (mod.__name__, row)
            skip = set(doc_pos) | deprecated.get((mod, row.strip("`()")), set())
            assert doc_kw == {k: v for k, v in act_kw.items() if k not in skip}, (mod.__name__, row)
