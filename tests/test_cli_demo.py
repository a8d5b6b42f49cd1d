"""The CLI end to end: demo (quick) writes real netCDF + PNG; reduce writes netCDF."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from gsnr_stats.cli import main


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    stats = xr.load_dataset(tmp_path / "mlp_stats.nc")
    assert stats.sizes["split"] == 2 and (stats["count"] > 0).all()
    assert np.isfinite(stats["var"]).any()
    for png in (tmp_path / "mlp" / "gsnr_trajectories.png", tmp_path / "shallow_vs_dnn.png",
                tmp_path / "osgr_validation.png", tmp_path / "report" / "osgr.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "report.md").is_file()
    # the printed tables are the netCDF numbers
    svd = xr.load_dataset(tmp_path / "shallow_vs_dnn.nc")
    assert set(svd["model"].values) == {"logreg", "linear_svm", "mlp"}
    v = float(svd["gsnr_mean"].sel(model="mlp").isel(epoch=-1))
    assert f"{v:.4g}" in out
    # and the mean GSNR is the one of the stored moments (train split, last checkpoint)
    g = stats["gsnr"].sel(split="train").isel(step=-1).values
    assert v == pytest.approx(np.mean(g[np.isfinite(g)]), rel=1e-12)
    val = xr.load_dataset(tmp_path / "osgr_validation.nc")
    assert np.isfinite(val["osgr_probe"]).all() and np.isfinite(val["osgr_theory"]).all()
    assert f"{float(val['osgr_probe'].isel(noise=0, n=0, phase=0)):.4g}" in out


def test_cli_reduce_and_info(small_store, tmp_path, capsys):
    path = small_store[0]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fc.weight" in out and "records: 4 complete" in out
    assert main(["reduce", str(path), "-o", str(tmp_path / "s.nc"), "-q"]) == 0
    st = xr.load_dataset(tmp_path / "s.nc")
    assert st.sizes["param"] == 16
    assert main(["osgr", str(tmp_path / "s.nc"), "-n", "10", "100"]) == 0
