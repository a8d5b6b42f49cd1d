"""The example studies run end to end (--quick): outputs exist, printed numbers are the netCDF's."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_printed(out: str, summary: xr.Dataset, variables, dims) -> None:
    """Every value of ``variables`` appears in the printed table (4 significant digits)."""
    lines = [ln.split() for ln in out.splitlines()]
    header = next(ln for ln in lines if all(v in ln for v in variables))
    body = [ln for ln in lines if len(ln) == len(header) and ln != header]
    assert body
    stacked = summary[list(variables)].stack(_r=dims)
    assert len(body) == stacked.sizes["_r"]
    for i, row in enumerate(body):
        for v in variables:
            want = float(stacked[v].isel(_r=i))
            got = row[header.index(v)]
            assert got == ("nan" if not np.isfinite(want) else f"{want:.4g}"), (v, i, got, want)


def test_shallow_vs_dnn_example(tmp_path, capsys):
    pytest.importorskip("torch")
    res = _load("shallow_vs_dnn").main(["-o", str(tmp_path), "--quick"])
    out = capsys.readouterr().out
    s = xr.load_dataset(tmp_path / "shallow_vs_dnn.nc")
    assert list(s["model"].values) == ["logreg", "linear_svm", "mlp", "torch_mlp"]
    assert (tmp_path / "shallow_vs_dnn.png").read_bytes()[:8] == PNG
    _check_printed(out, s, ["gsnr_mean", "gsnr_median", "osgr_theory", "gap_measured"],
                   ["model", "epoch"])
    # the torch model's numbers come from its own store: mean GSNR of the train split
    st = xr.load_dataset(tmp_path / "torch_mlp_stats.nc")
    g = st["gsnr"].sel(split="train").values
    mean = np.array([np.mean(r[np.isfinite(r)]) for r in g])
    np.testing.assert_allclose(s["gsnr_mean"].sel(model="torch_mlp").values, mean, rtol=1e-12)
    assert np.isfinite(res.summary["osgr_first_order"]).all()


def test_shallow_vs_dnn_generated_data(tmp_path, capsys):
    res = _load("shallow_vs_dnn").main(["-o", str(tmp_path), "--quick", "--no-torch",
                                        "--data", "generated"])
    out = capsys.readouterr().out
    s = xr.load_dataset(tmp_path / "shallow_vs_dnn.nc")
    assert s.attrs["title"] == "shallow vs DNN on make_classification"
    assert list(s["model"].values) == ["logreg", "linear_svm", "mlp"]
    _check_printed(out, s, ["gsnr_mean", "osgr_theory", "gap_measured"], ["model", "epoch"])
    # the printed mean GSNR is the mean over parameters of the stored train-split GSNR
    st = xr.load_dataset(tmp_path / "logreg_stats.nc")
    g = st["gsnr"].sel(split="train").values
    mean = np.array([np.mean(r[np.isfinite(r)]) for r in g])
    np.testing.assert_allclose(s["gsnr_mean"].sel(model="logreg").values, mean, rtol=1e-12)
    assert res.summary.attrs["n_train"] == 1078


def test_osgr_validation_example(tmp_path, capsys):
    _load("osgr_validation").main(["-o", str(tmp_path), "--quick", "-n", "50", "100",
                                   "--noise", "0.2"])
    out = capsys.readouterr().out
    s = xr.load_dataset(tmp_path / "osgr_validation.nc")
    assert s.sizes == {"noise": 1, "n": 2, "phase": 3}
    assert (tmp_path / "osgr_validation.png").read_bytes()[:8] == PNG
    _check_printed(out, s, ["osgr_theory", "osgr_probe", "osgr_probe_se"],
                   ["noise", "n", "phase"])
    assert np.isfinite(s["osgr_probe"]).all() and (s["osgr_probe_se"] > 0).all()


def test_random_labels_example(tmp_path, capsys):
    _load("random_labels").main(["-o", str(tmp_path), "--quick"])
    out = capsys.readouterr().out
    s = xr.load_dataset(tmp_path / "random_labels.nc")
    assert list(s["labels"].values) == ["true", "shuffled"]
    assert (tmp_path / "random_labels.png").read_bytes()[:8] == PNG
    _check_printed(out, s, ["gsnr_mean", "gap_measured", "gap_theory"], ["labels", "epoch"])
    # shuffled labels: no signal to learn, the held-out loss does not improve
    lt = s["loss_test"]
    assert float(lt.sel(labels="shuffled").isel(epoch=-1)) > float(lt.sel(labels="true")
                                                                   .isel(epoch=-1))


# --------------------------------------------------------------------------------------
# README: the plain-loop example (the first code block after `make demo` / `make test`)
# --------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = "EPOCHS, N_TRAIN, N_TEST = 2, 200, 100"  # the sizes the block defines, shrunk


def _readme_block_after_commands() -> tuple[str, str]:
    """(language, code) of the README's first code block after the two commands."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    i = next(k for k, (_, code) in enumerate(blocks)
             if code.split() == ["make", "demo", "make", "test"])
    return blocks[i + 1]


def _half_unit(txt: str) -> float:
    """Half a unit in the last printed digit of a number as printed (``0.0123``, ``1.5e-05``)."""
    mant, _, exp = txt.lower().partition("e")
    dec = len(mant.split(".")[1]) if "." in mant else 0
    return 0.5 * 10.0 ** (int(exp or 0) - dec)


def test_readme_plain_loop(tmp_path, monkeypatch, capsys):
    """The README's plain PyTorch loop runs (on bundled digits, shrunk through its own size
    variables) with at most 10 added `# +gsnr` lines, the loop without them runs too, and
    what it prints is the mean GSNR of the stored gradients by a float64 two-pass; the
    records carry the optimizer's step count (batches per epoch), not the epoch label."""
    pytest.importorskip("torch")
    from conftest import two_pass

    import gsnr_stats as gs

    lang, code = _readme_block_after_commands()
    assert lang == "python" and "for epoch in range(EPOCHS)" in code
    added = [ln for ln in code.splitlines() if ln.rstrip().endswith("# +gsnr")]
    assert 0 < len(added) <= 10, added
    small, k = re.subn(r"^EPOCHS, N_TRAIN, N_TEST = .*$", SMALL, code, flags=re.M)
    assert k == 1
    monkeypatch.chdir(tmp_path)
    plain = "\n".join(ln for ln in small.splitlines() if not ln.rstrip().endswith("# +gsnr"))
    exec(compile(plain, "README.md (without # +gsnr)", "exec"), {"__name__": "readme_plain"})
    assert not (tmp_path / "run.h5").exists() and capsys.readouterr().out == ""
    ns = {"__name__": "readme"}
    exec(compile(small, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    assert ns["model"].training  # the loop's own mode, restored after each record

    s = gs.open_store(tmp_path / "run.h5")
    assert s.steps == [0, 1] and s.splits == ["test", "train"]
    assert {r.split: r.n_samples for r in s.records} == {"train": 200, "test": 100}
    per_epoch = -(-200 // 32)  # optimizer steps per epoch: batches of 32, the last partial
    assert [s.record(e, "train").optimizer_step for e in (0, 1)] == [per_epoch, 2 * per_epoch]
    rows = [ln.split() for ln in out.splitlines()]
    header = next(r for r in rows if r and r[0] == "split")
    body = [r for r in rows if r and r[0].isdigit()]
    assert [int(r[0]) for r in body] == [0, 1] and sorted(header[1:]) == ["test", "train"]
    for r in body:
        for split, txt in zip(header[1:], r[1:], strict=True):
            m, v = two_pass(s.read_grads(int(r[0]), split))
            with np.errstate(invalid="ignore", divide="ignore"):  # dead parameters: 0/0
                g = m * m / v
            want = float(np.mean(g[np.isfinite(g)]))
            assert abs(float(txt) - want) <= _half_unit(txt) + 1e-9 * abs(want), (split, r)
