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
    html = tmp_path / "report" / "report.html"  # the self-contained page, printed too
    assert f"wrote {html}" in out and "data:image/png;base64," in html.read_text()
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


def test_cli_osgr_with_first_order_over_shards(tmp_path, capsys):
    """`gsnr-stats osgr STATS --first-order SHARDS` = the library calls on the same inputs."""
    import gsnr_stats as gs

    rng = np.random.default_rng(3)
    P = 40
    for k in range(2):
        with gs.GradientWriter(tmp_path / f"s{k}.h5", [("w", (P,))], run_id="run") as w:
            for step in (0, 1):
                for sp in ("train", "test"):
                    w.write(step, sp, (rng.normal(size=(60, P)) + 0.3 / (step + 1)).astype("f4"))
    shards = sorted(str(p) for p in tmp_path.glob("s*.h5"))
    assert main(["reduce", *shards, "-o", str(tmp_path / "stats.nc")]) == 0
    out_nc = tmp_path / "osgr.nc"
    assert main(["osgr", str(tmp_path / "stats.nc"), "-n", "10", "40", "--first-order",
                 str(tmp_path / "s*.h5"), "--subsets", "16", "-o", str(out_nc)]) == 0
    printed = capsys.readouterr().out
    assert "first-order OSGR" in printed
    got = xr.load_dataset(out_nc)
    stats = gs.reduce(shards)
    want = gs.osgr_first_order(shards, n=[10, 40], n_subsets=16, seed=0, stats=stats)
    np.testing.assert_allclose(got["osgr_first_order"].values, want["osgr_first_order"].values,
                               rtol=1e-12)
    np.testing.assert_allclose(got["osgr_first_order_theory"].values,
                               gs.osgr(stats, [10, 40], split="train")["osgr"]
                               .sel(split="train").values, rtol=1e-12)
    # the theory on the held-out split, as `report` defaults to (issue 13: same defaults)
    np.testing.assert_allclose(got["osgr"].values,
                               gs.osgr(stats, [10, 40], split="test")["osgr"].values, rtol=1e-12)
