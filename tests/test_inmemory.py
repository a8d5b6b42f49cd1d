"""``gs.gsnr`` (no file) and ``gs.compare`` (issue 12, scikit-learn section).

``gs.gsnr`` must return the Dataset ``gs.reduce`` returns for the same gradients written to
a store by the real writer: checked variable by variable, coordinate by coordinate, with
the same attributes and dtypes. The comparison table is checked against a float64 numpy
two-pass over the adapters' per-sample gradients and the closed forms of docs/theory.md.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import xarray as xr
from conftest import U32, U64, assert_within, f32_chain_bound, moments_shift_bound, two_pass
from gsnr_stats.adapters import sklearn as gk
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import gsnr_stats as gs
from gsnr_stats.errors import AdapterError, NonFiniteError
from gsnr_stats.inmemory import MemoryWriter

_X, _Y = load_breast_cancer(return_X_y=True)
_Xtr, _Xte, Y_TR, Y_TE = train_test_split(_X, _Y, test_size=0.3, random_state=0)
_sc = StandardScaler().fit(_Xtr)
X_TR, X_TE = _sc.transform(_Xtr), _sc.transform(_Xte)
N_TR = len(Y_TR)
VOLATILE = {"run_id", "sources"}  # a run's identity and where it came from


def assert_same_dataset(got: xr.Dataset, want: xr.Dataset, rtol: float) -> None:
    """Same variables, coordinates, dims, dtypes and attributes (but the run's identity);
    values within ``rtol`` (``xr.testing.assert_allclose``, NaNs in the same places)."""
    assert set(got.data_vars) == set(want.data_vars)
    assert set(got.coords) == set(want.coords)
    for v in [*got.data_vars, *got.coords]:
        assert got[v].dims == want[v].dims, v
        assert got[v].dtype == want[v].dtype, (v, got[v].dtype, want[v].dtype)
        assert got[v].attrs == want[v].attrs, v
    assert set(got.attrs) == set(want.attrs)
    assert {k: v for k, v in got.attrs.items() if k not in VOLATILE} == \
        {k: v for k, v in want.attrs.items() if k not in VOLATILE}
    xr.testing.assert_allclose(got, want, rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def logreg() -> LogisticRegression:
    return LogisticRegression(max_iter=1000).fit(X_TR, Y_TR)


def _no_files(monkeypatch) -> None:
    """Fail if anything opens an HDF5 file (issue 12: "every result needs an HDF5 file")."""
    import h5py

    def refuse(*a, **k):
        raise AssertionError("gs.gsnr opened an HDF5 file")

    monkeypatch.setattr(h5py, "File", refuse)


# --------------------------------------------------------------------------------------
# gs.gsnr == gs.reduce of the store
# --------------------------------------------------------------------------------------


def test_gsnr_of_an_estimator_is_reduce_of_its_store(tmp_path, monkeypatch, logreg) -> None:
    path = tmp_path / "lr.h5"
    with gk.open_writer(path, logreg) as w:
        gk.record(w, logreg, X_TR, Y_TR, step=3, split="train", lr=0.5)
        gk.record(w, logreg, X_TE, Y_TE, step=3, split="test", lr=0.5)
    want = gs.reduce(path)
    _no_files(monkeypatch)
    splits = {"train": (X_TR, Y_TR), "test": (X_TE, Y_TE)}
    # rounded to float32 as the store is: the same values, summed in another order
    # (float64 accumulators: DESIGN's 1e-10 relative)
    got32 = gs.gsnr(logreg, splits, step=3, lr=0.5, dtype="float32")
    assert_same_dataset(got32, want, rtol=1e-10)
    # the default keeps sklearn's float64: off the store by its float32 rounding only
    got = gs.gsnr(logreg, splits, step=3, lr=0.5)
    assert_same_dataset(got.drop_vars(["mean", "m2", "var", "gsnr", "gsnr_debiased"]),
                        want.drop_vars(["mean", "m2", "var", "gsnr", "gsnr_debiased"]),
                        rtol=1e-12)
    for sp, (X, y) in splits.items():
        G = gk.per_sample_gradients(logreg, X, y)
        m, v = two_pass(G)  # float64 reference
        sel = {"step": 3, "split": sp}
        np.testing.assert_allclose(got["mean"].sel(sel), m, rtol=1e-10, atol=0)
        np.testing.assert_allclose(got["var"].sel(sel), v, rtol=1e-10, atol=0)
        np.testing.assert_allclose(got["gsnr"].sel(sel), m * m / v, rtol=1e-9, atol=0)
        bm, bv = moments_shift_bound(U32 * np.abs(G).max(axis=0), v, len(G))
        assert_within(want["mean"].sel(sel), m, bm + 64 * U64 * np.abs(G).max(axis=0), sp)
        assert_within(want["var"].sel(sel), v, bv + 64 * U64 * v, sp)


def test_gsnr_of_an_array_with_names_loss_and_blocks(tmp_path) -> None:
    rng = np.random.default_rng(0)
    G = {"train": rng.normal(2.0, 1.0, size=(57, 7)).astype(np.float32),
         "test": rng.normal(0.0, 3.0, size=(20, 7)).astype(np.float32)}
    loss = {sp: rng.random(len(g)) for sp, g in G.items()}
    names = [("w", (2, 3), "fc"), ("b", (1,), "fc")]
    path = tmp_path / "a.h5"
    with gs.GradientWriter(path, names, attrs={"framework": "numpy"}) as w:
        for sp in G:
            w.write(0, sp, G[sp][:30], loss=loss[sp][:30])
            if len(G[sp]) > 30:
                w.write(0, sp, G[sp][30:], loss=loss[sp][30:])
    for blocks in (None, 3):
        want = gs.reduce(path, blocks=blocks)
        got = gs.gsnr(G, names=names, loss=loss, blocks=blocks)
        assert_same_dataset(got, want, rtol=1e-10)
    # one split, default layout: one tensor "theta"
    one = gs.gsnr(G["train"].astype(np.float64))
    m, v = two_pass(G["train"])
    np.testing.assert_allclose(one["var"].sel(step=0, split="train"), v, rtol=1e-12)
    assert one["tensor"].values.tolist() == ["theta"] * 7
    assert np.isnan(one["loss_mean"].values).all()
    per_column = gs.gsnr(G["test"], names=[f"p{i}" for i in range(7)], split="test", step=4)
    assert per_column["tensor"].values.tolist() == [f"p{i}" for i in range(7)]
    assert per_column["step"].values.tolist() == [4]


def test_gsnr_of_moments_records_matches_reduce(tmp_path, logreg) -> None:
    """keep='moments': the recorder's float64 blocks, merged by the engine's rule."""
    path = tmp_path / "m.h5"
    with gk.open_writer(path, logreg) as w:
        gk.record(w, logreg, X_TR, Y_TR, step=0, split="train", keep="moments",
                  batch_size=100)
    for blocks in (None, 2, 7):  # 7 > the 4 stored blocks: fewer jackknife blocks
        want = gs.reduce(path, blocks=blocks)
        got = gs.gsnr(logreg, X_TR, Y_TR, keep="moments", batch_size=100, blocks=blocks)
        assert_same_dataset(got, want, rtol=1e-12)


def test_gsnr_of_a_torch_model_is_reduce_of_its_store(tmp_path, monkeypatch) -> None:
    import torch
    from gsnr_stats.adapters import torch as gt

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X, y = torch.randn(70, 5), torch.randint(0, 3, (70,))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    path = tmp_path / "t.h5"
    with gt.open_writer(path, net) as w:
        rec = gt.Recorder(w, net, loss_fn)
        rec.record((X[:50], y[:50]), 0, "train", batch_size=16)
        rec.record((X[50:], y[50:]), 0, "test", batch_size=16)
    want = gs.reduce(path)
    _no_files(monkeypatch)
    got = gs.gsnr(net, {"train": (X[:50], y[:50]), "test": (X[50:], y[50:])},
                  loss_fn=loss_fn, batch_size=16)
    assert_same_dataset(got, want, rtol=1e-10)  # the same float32 rows: order only
    # a DataLoader, and float64 numpy inputs (cast to the parameters' dtype)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:50], y[:50]),
                                     batch_size=20)
    from_loader = gs.gsnr(net, dl, loss_fn=loss_fn)
    from_numpy = gs.gsnr(net, X[:50].numpy().astype(np.float64), y[:50].numpy(),
                         loss_fn=loss_fn)
    train = want.sel(split=["train"])
    for d in (from_loader, from_numpy):
        xr.testing.assert_allclose(d.drop_attrs(), train.drop_attrs(), rtol=1e-10, atol=0)


def test_memory_writer_keeps_optimizer_step_and_meta_like_the_store(tmp_path, logreg) -> None:
    meta = {"optimizer": {"class": "LogisticRegression", "solver": "lbfgs", "C": 1.0}}
    path = tmp_path / "o.h5"
    # the provenance open_writer stores (issue 13: the stats keep framework version, model)
    mw = MemoryWriter(gk.layout(logreg, with_layers=True), framework="sklearn",
                      dtype="float32", provenance={"framework_version": gk.sklearn.__version__,
                                                   "user_attrs": {"estimator": "LogisticRegression"}})
    with gk.open_writer(path, logreg) as w:
        for writer in (w, mw):
            for step, (X, y) in enumerate(((X_TR, Y_TR), (X_TE, Y_TE))):
                gk.record(writer, logreg, X, y, step=step, split="train", optimizer_step=7 + step,
                          meta=meta)
    want, got = gs.reduce(path), mw.dataset()
    assert_same_dataset(got, want, rtol=1e-10)  # optimizer_step coordinate, optimizer attr
    if "optimizer_step" in want.coords:  # the engine exposes the recorded update count
        assert got["optimizer_step"].values.tolist() == [7, 8]
    assert mw.optimizer_step(1, "train") == 8 and mw.record_meta(0, "train") == meta
    with gs.open_store(path) as store:
        assert store.record_meta(0, "train") == mw.record_meta(0, "train")


def test_nonfinite_gradients_raise_or_are_omitted_like_reduce(tmp_path) -> None:
    G = np.arange(40, dtype=np.float32).reshape(10, 4)
    G[3, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"theta\[2\].*sample 3"):
        gs.gsnr(G)
    path = tmp_path / "nan.h5"
    with gs.GradientWriter(path, [("theta", (4,))], attrs={"framework": "numpy"}) as w:
        w.write(0, "train", G)
    assert_same_dataset(gs.gsnr(G, nonfinite="omit"), gs.reduce(path, nonfinite="omit"),
                        rtol=1e-12)


@pytest.mark.parametrize("call,pattern", [
    (lambda m: gs.gsnr(m), r"needs data"),
    (lambda m: gs.gsnr(m, X_TR, Y_TR, loss_fn=len), r"loss_fn= is not used"),
    (lambda m: gs.gsnr(LogisticRegression(), X_TR, Y_TR), r"not fitted"),
    (lambda m: gs.gsnr(object()), r"object is not supported"),
    (lambda m: gs.gsnr(np.zeros((3, 2)), X_TR), r"takes no X"),
    (lambda m: gs.gsnr(np.zeros(3)), r"\(n, P\)"),
    (lambda m: gs.gsnr(np.zeros((3, 2)), keep="moments"), r"options \['keep'\] are for models"),
    (lambda m: gs.gsnr(m, {"train": (X_TR, Y_TR)}, Y_TR), r"leave y out"),
], ids=["no-data", "loss_fn", "unfitted", "object", "array-X", "array-1d", "array-opts",
        "mapping-y"])
def test_gsnr_misuse(call, pattern, logreg) -> None:
    with pytest.raises(AdapterError, match=pattern):
        call(logreg)


def test_torch_model_without_loss_fn_says_reduction_none() -> None:
    import torch

    with pytest.raises(AdapterError, match="reduction='none'"):
        gs.gsnr(torch.nn.Linear(3, 2), np.zeros((4, 3)), np.zeros(4, dtype=np.int64))


# --------------------------------------------------------------------------------------
# gs.compare
# --------------------------------------------------------------------------------------


def _osgr_closed_form(G: np.ndarray, n: int) -> float:
    """R(n) = sum G_j / sum (G_j + V_j/n), G_j = m_j^2 - s_j^2/N (docs/theory.md); NaN
    where the denominator is <= 0 (the estimate of E|g_D|^2 failed)."""
    m, v = two_pass(G)
    sig = m * m - v / len(G)
    den = (sig + v / n).sum()
    return float(sig.sum() / den) if den > 0 else math.nan


def test_compare_sklearn_models_on_breast_cancer() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence of the small fits
        models = {"logreg": LogisticRegression(max_iter=1000), "linear-svc": LinearSVC(),
                  "sgd": SGDClassifier(loss="log_loss", random_state=0),
                  "mlp": MLPClassifier((8,), max_iter=200, random_state=0)}
        table = gs.compare(models, (X_TR, Y_TR), (X_TE, Y_TE))
    assert list(table.index) == list(models) and table["fitted_here"].all()
    assert list(table.columns) == list(gs.compare.__globals__["COLUMNS"])
    for name, est in models.items():
        row = table.loc[name]
        Gtr = gk.per_sample_gradients(est, X_TR, Y_TR)
        Gte = gk.per_sample_gradients(est, X_TE, Y_TE)
        assert row["n_params"] == Gtr.shape[1] and row["n_train"] == N_TR
        for sp, G in (("train", Gtr), ("test", Gte)):
            m, v = two_pass(G)
            r = m * m / v
            assert math.isclose(row[f"gsnr_mean_{sp}"], r.mean(), rel_tol=1e-9), (name, sp)
            assert math.isclose(row[f"gsnr_median_{sp}"], np.median(r), rel_tol=1e-9)
            want = _osgr_closed_form(G, N_TR)
            got = row[f"osgr_{sp}"]
            assert (math.isnan(got) and math.isnan(want)) or \
                math.isclose(got, want, rel_tol=1e-9), (name, sp, got, want)
        ltr = gk.per_sample_loss(est, X_TR, Y_TR).mean()
        lte = gk.per_sample_loss(est, X_TE, Y_TE).mean()
        assert math.isclose(row["loss_train"], ltr, rel_tol=1e-12)
        assert math.isclose(row["gap_measured"], lte - ltr, rel_tol=1e-9)
        assert row["accuracy_test"] == est.score(X_TE, Y_TE)
        assert math.isnan(row["gap_theory_step"]) and math.isnan(row["gap_theory"])  # no lr
    # the model's own loss, independently: sklearn's log_loss (it clips at 1e-15)
    lr = models["logreg"]
    assert math.isclose(table.loc["logreg", "loss_test"],
                        log_loss(Y_TE, lr.predict_proba(X_TE)), rel_tol=1e-9)
    # a negative OSGR carries its reason (a fitted training split)
    neg = table[table["osgr_train"] < 0]
    assert len(neg) and all("train" in s and "fitted" in s for s in neg["note"])


def test_compare_a_torch_mlp_in_the_same_call() -> None:
    import torch
    from gsnr_stats.adapters import torch as gt

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    xt, yt = torch.tensor(X_TR, dtype=torch.float32), torch.tensor(Y_TR)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    lr = LogisticRegression(max_iter=1000).fit(X_TR, Y_TR)
    table = gs.compare({"logreg": lr, "torch-mlp": net}, (X_TR, Y_TR), (X_TE, Y_TE),
                       loss_fn={"torch-mlp": loss_fn}, lr={"torch-mlp": 0.1},
                       steps={"torch-mlp": 30})
    row = table.loc["torch-mlp"]
    assert (row["framework"], row["estimator"], row["fitted_here"]) == (
        "torch", "Sequential", False)
    # the torch adapter's plain torch.func route, reduced by numpy in float64
    xte = torch.tensor(X_TE, dtype=torch.float32)
    Gtr = gt.per_sample_gradients(net, loss_fn, xt, yt).astype(np.float64)
    Gte = gt.per_sample_gradients(net, loss_fn, xte, torch.tensor(Y_TE)).astype(np.float64)
    m, v = two_pass(Gtr)
    assert row["n_params"] == Gtr.shape[1] == 30 * 8 + 8 + 8 * 2 + 2
    # the recorder's rows (delta a^T fast path) and torch.func's are two float32 routes:
    # each row entry is within b_j of the exact one (f32_chain_bound, for both routes), so
    # m_j and s_j^2 move by at most (bm, bv) and r_j = m_j^2 / s_j^2 stays in [lo, hi]
    b = 2 * f32_chain_bound(Gtr, 64)
    bm, bv = moments_shift_bound(b, v, N_TR)
    lo = np.maximum(np.abs(m) - bm, 0) ** 2 / (v + bv)
    hi = (np.abs(m) + bm) ** 2 / np.maximum(v - bv, 0)
    assert lo.mean() <= row["gsnr_mean_train"] <= hi.mean()
    assert hi.mean() - lo.mean() < 1e-2 * (m * m / v).mean()  # a bound that constrains
    _, vte = two_pass(Gte)
    _, bvte = moments_shift_bound(2 * f32_chain_bound(Gte, 64), vte, len(Gte))
    step_gap = 0.1 * vte.sum() / N_TR  # lambda sum_j V_j / n, V from the held-out split
    assert abs(row["gap_theory_step"] - step_gap) <= 0.1 * bvte.sum() / N_TR
    assert math.isclose(row["gap_theory"], 30 * row["gap_theory_step"], rel_tol=1e-12)
    with torch.no_grad():
        acc = (net(xte).argmax(1).numpy() == Y_TE).mean()
    assert row["accuracy_test"] == acc
    assert net.training  # the mode is restored after the accuracy pass
    assert math.isnan(table.loc["logreg", "gap_theory"])  # no lr given for it


def test_compare_figure_saves_png(tmp_path) -> None:
    lr = LogisticRegression(max_iter=1000).fit(X_TR, Y_TR)
    sgd = SGDClassifier(loss="log_loss", random_state=0).fit(X_TR, Y_TR)
    table = gs.compare({"logreg": lr, "sgd": sgd}, (X_TR, Y_TR), (X_TE, Y_TE),
                       lr=0.01, steps=100)
    fig = gs.compare_figure(table, title="breast_cancer")
    assert len(fig.axes) == 3
    bars = [p.get_height() for p in fig.axes[2].patches]
    np.testing.assert_allclose(bars, [*table["gap_measured"], *table["gap_theory"]])
    out = tmp_path / "compare.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="lacks columns"):
        gs.compare_figure(table.drop(columns=["osgr_test"]))


def test_compare_misuse() -> None:
    with pytest.raises(AdapterError, match="needs loss_fn"):
        import torch

        gs.compare({"net": torch.nn.Linear(30, 2)}, (X_TR, Y_TR), (X_TE, Y_TE))
    with pytest.raises(AdapterError, match="not fitted"):
        gs.compare({"lr": LogisticRegression()}, (X_TR, Y_TR), (X_TE, Y_TE), fit=False)
    with pytest.raises(AdapterError, match="supported"):
        gs.compare({"x": object()}, (X_TR, Y_TR), (X_TE, Y_TE))
    with pytest.raises(AdapterError, match=r"\(X, y\)"):
        gs.compare({"lr": LogisticRegression()}, X_TR, (X_TE, Y_TE))


@pytest.mark.slow  # end to end: trains the docs' models (a few seconds once torch is warm)
def test_the_scikit_learn_section_of_docs_adapters_runs(tmp_path, monkeypatch) -> None:
    """docs/adapters.md's scikit-learn examples run as printed (in a scratch directory)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/adapters.md").read_text()
    section = text[text.index("\n## scikit-learn"):]
    section = section[: section.find("\n## ", 5)] if "\n## " in section[5:] else section
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if not b.lstrip().startswith("{")]  # the meta example is a value, not code
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence of the small fits; negative OSGR
        for b in blocks:
            exec(compile(b, "docs/adapters.md", "exec"), ns)  # noqa: S102 - our own docs
    assert ns["out"]["step"][:3].tolist() == [0, len(ns["y_tr"]), 2 * len(ns["y_tr"])]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert list(ns["table"].index)[-1] == "torch MLP"
    with gs.open_store(tmp_path / "traj.h5") as store:
        meta = store.record_meta(0, "train")
    shown = re.search(r'\{"optimizer".*?"framework": "scikit-learn [\d.]+"\}', section, re.S)
    for key in ("class", "module", "solver", "batch_size", "loss", "penalty", "alpha",
                "l1_ratio", "learning_rate"):
        assert f'"{key}": ' in shown.group(0) and key in meta["optimizer"], key
    assert "eta0" not in meta["optimizer"] and meta["optimizer"]["alpha"] == 0.001
