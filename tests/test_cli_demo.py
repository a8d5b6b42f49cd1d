"""The CLI end to end: demo (quick) writes real netCDF + PNG; reduce writes netCDF."""

from __future__ import annotations

import numpy as np
import xarray as xr

from gsnr_stats.cli import main


def test_demo_quick(tmp_path):
    assert main(["demo", "-o", str(tmp_path), "--quick"]) == 0
    stats = xr.load_dataset(tmp_path / "mlp_stats.nc")
    assert stats.sizes["split"] == 2 and (stats["count"] > 0).all()
    assert np.isfinite(stats["var"]).any()
    png = tmp_path / "mlp" / "gsnr_trajectories.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reduce_and_info(small_store, tmp_path, capsys):
    path = small_store[0]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fc.weight" in out and "records: 4 complete" in out
    assert main(["reduce", str(path), "-o", str(tmp_path / "s.nc"), "-q"]) == 0
    st = xr.load_dataset(tmp_path / "s.nc")
    assert st.sizes["param"] == 16
    assert main(["osgr", str(tmp_path / "s.nc"), "-n", "10", "100"]) == 0
