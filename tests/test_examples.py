"""The example studies run end to end (--quick): outputs exist, printed numbers are the netCDF's."""

from __future__ import annotations

import importlib.util
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
