"""A store in the ecosystem's readers (issue 13, first bullet).

The raw route: netCDF-C (``netCDF4``, xarray's ``netcdf4`` engine) and ``h5netcdf`` open a
store as a self-describing Dataset: named dimensions from HDF5 dimension scales, CF
attributes, the tables readable. They run in a subprocess, so an abort of the C library
(as v1's compound tables caused) fails the test instead of killing pytest. The gsnr-stats
route: ``xr.open_dataset(path, engine="gsnr_stats")`` gives the completed records, read
lazily and checked. Values are compared with the arrays the test wrote (the independent
reference) and with :class:`GradientStore`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
import xarray as xr
from conftest import U64, assert_within

import gsnr_stats as gs
from gsnr_stats.errors import SchemaError, StoreError
from gsnr_stats.store import GradientStore, IncompleteRecordWarning, is_store
from gsnr_stats.xr_backend import GSNRBackend

PARAMS = [("fc.weight", (3, 4)), ("fc.bias", (4,)), ("out", (5,), "head")]
P = 21
META = {"optimizer": {"class": "SGD", "groups": [{"lr": 0.1}]}, "framework": "numpy"}


def _write(path, rng, chunks=(4, 8)):
    """Two steps x (train, test) of per-sample records written in batches, one moments record,
    trajectory and probe rows. Returns what was written, by record."""
    data = {}
    with gs.GradientWriter(path, PARAMS, attrs={"framework": "numpy", "note": "xr"},
                           chunks=chunks) as w:
        for step in (0, 10):
            for split, n in (("train", 11), ("test", 6)):
                g = rng.normal(size=(n, P)).astype(np.float32)
                loss, lab = rng.random(n), rng.integers(0, 3, n).astype(float)
                ids = np.arange(n) + 100 * step
                for i in range(0, n, 5):  # several segments per record
                    w.write(step, split, g[i:i + 5], loss=loss[i:i + 5], label=lab[i:i + 5],
                            sample_id=ids[i:i + 5], lr=0.1, epoch=step / 10,
                            optimizer_step=step * 3, meta=META)
                data[(step, split)] = (g, loss, lab, ids)
        mom = []
        for _ in range(3):
            c, m, q = 4.0, rng.normal(size=P), rng.random(P)
            w.write_moments(20, "train", c, m, q)
            mom.append((c, m, q))
        w.write_trajectory(0, 0.1, 1.5, 1.7)
        w.write_trajectory(10, 0.1, 1.2, 1.6)
        w.write_probe(10, 8, 0.1, 0, 1.0, 0.9, 1.1, 1.05)
    return data, mom


@pytest.fixture
def store_file(tmp_path, rng):
    path = tmp_path / "run.h5"
    data, mom = _write(path, rng)
    return path, data, mom


def _concat(data):
    keys = sorted(data)  # the store's (step, split) order
    return keys, [np.concatenate([data[k][i] for k in keys]) for i in range(4)]


# -- the raw route: netCDF-C and h5netcdf, in a subprocess ------------------------------------

RAW_READERS = r"""
import json, sys
import numpy as np
import xarray as xr
path, out = sys.argv[1], sys.argv[2]
res = {}
for eng in ("netcdf4", "h5netcdf"):
    with xr.open_dataset(path, engine=eng) as ds:
        res[eng] = {
            "dims": {v: list(ds[v].dims) for v in ds.variables},
            "sizes": dict(ds.sizes), "attrs": {k: str(v) for k, v in ds.attrs.items()},
            "var_attrs": {v: {k: str(x) for k, x in ds[v].attrs.items()} for v in ds.variables},
            "layout": ds["layout"].values.tolist(),
            "layout_offset": ds["layout_offset"].values.tolist(),
        }
        np.save(f"{out}/{eng}_grads.npy", ds["grads"].values)
        np.save(f"{out}/{eng}_loss.npy", ds["loss"].values)
    with xr.open_dataset(path, engine=eng, group="moments") as m:
        res[eng]["moments"] = {v: list(m[v].dims) for v in m.variables}
        np.save(f"{out}/{eng}_mean.npy", m["mean"].values)
    for t in ("records", "segments", "trajectory", "probes"):
        with xr.open_dataset(path, engine=eng, group=t) as tab:
            res[eng][t] = {v: list(tab[v].dims) for v in tab.variables}
            res[eng][t + "_values"] = {v: tab[v].values.tolist() for v in tab.variables
                                       if v != "split"}
            res[eng][t + "_split"] = [bytes(r).rstrip(b"\0").decode() for r in
                                      tab["split"].values] if "split" in tab else None
import netCDF4
d = netCDF4.Dataset(path)
res["netCDF4"] = {"grads": list(d["grads"].dimensions), "shape": list(d["grads"].shape),
                  "dims": {k: len(v) for k, v in d.dimensions.items()},
                  "unlimited": sorted(k for k, v in d.dimensions.items() if v.isunlimited()),
                  "m2": list(d.groups["moments"]["m2"].dimensions),
                  "records_step": d.groups["records"]["step"][:].tolist()}
np.save(f"{out}/netCDF4_grads.npy", np.asarray(d["grads"][:]))
d.close()
print(json.dumps(res))
"""


def _raw(path, tmp_path):
    out = tmp_path / "raw_out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", RAW_READERS, str(path), str(out)],
                          capture_output=True, text=True, timeout=120)
    how = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else "failed"
    assert proc.returncode == 0, f"netCDF readers {how} on a store: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1]), out


def test_netcdf_readers_see_named_dimensions_and_the_data(store_file, tmp_path):
    """Before: phony_dim_N everywhere. Now grads is (sample, param) in all three readers,
    with the written values, the moments and tables on named dimensions."""
    path, data, mom = store_file
    keys, (g_all, loss_all, _, _) = _concat(data)
    res, out = _raw(path, tmp_path)
    with gs.open_store(path) as s:
        via_store = np.concatenate([s.read_grads(*k) for k in keys])
    # every row in the file is a completed record's here: the raw rows are the written rows,
    # in write order (step, then train before test), which is not the store's sorted order
    order = [(0, "train"), (0, "test"), (10, "train"), (10, "test")]
    written = np.concatenate([data[k][0] for k in order])
    np.testing.assert_array_equal(np.sort(via_store, axis=0), np.sort(written, axis=0))
    for eng in ("netcdf4", "h5netcdf"):
        r = res[eng]
        assert r["dims"]["grads"] == ["sample", "param"], eng
        assert r["sizes"]["sample"] == len(written) and r["sizes"]["param"] == P, eng
        assert not [d for d in r["sizes"] if d.startswith("phony")], (eng, r["sizes"])
        for v in ("loss", "label", "sample_id"):
            assert r["dims"][v] == ["sample"], (eng, v)
        np.testing.assert_array_equal(np.load(out / f"{eng}_grads.npy"), written)
        np.testing.assert_array_equal(np.load(out / f"{eng}_loss.npy"),
                                      np.concatenate([data[k][1] for k in order]))
        assert r["layout"] == ["fc.weight", "fc.bias", "out"] and r["layout_offset"] == [0, 12, 16]
        assert r["dims"]["layout_size"] == ["layout"]
        assert r["moments"]["mean"] == ["moment_block", "param"]
        np.testing.assert_array_equal(np.load(out / f"{eng}_mean.npy"), [m for _, m, _ in mom])
        # the tables: named row dims, the split names decodable, values as written
        assert r["records"]["step"] == ["records_row"]
        assert r["records"]["split"] == ["records_row", "split_byte"]
        assert r["segments"]["start"] == ["segments_row"]
        assert r["records_values"]["step"] == [0, 0, 10, 10, 20]
        assert r["records_split"] == ["train", "test", "train", "test", "train"]
        assert r["records_values"]["optimizer_step"] == [0, 0, 30, 30, -1]
        assert r["trajectory_values"]["test_loss"] == [1.7, 1.6]
        assert r["probes_values"]["train_after"] == [0.9]
        # batches of 5: 11 rows are 3 segments, 6 rows 2; then the 3 moments blocks
        assert r["segments_split"] == (["train"] * 3 + ["test"] * 2) * 2 + ["train"] * 3
        assert r["segments_values"]["stop"][:5] == [5, 10, 11, 16, 17]
        # CF attributes
        a = r["attrs"]
        assert a["Conventions"].startswith("CF-") and "Liu, J." in a["references"]
        assert "ICLR 2020" in a["references"] and a["source"].startswith("gsnr-stats ")
        assert a["history"].endswith("created by gsnr-stats " + gs.__version__)
        assert a["title"] and a["format"] == "gsnr-stats"
        va = r["var_attrs"]
        assert va["grads"]["units"] == "1" and va["loss"]["units"] == "1"
        assert all(va[v].get("long_name") for v in ("grads", "loss", "label", "sample_id"))
    n = res["netCDF4"]
    assert n["grads"] == ["sample", "param"] and n["shape"] == [len(written), P]
    assert n["m2"] == ["moment_block", "param"]
    assert n["dims"]["param"] == P and n["dims"]["split_byte"] == 64
    assert {"sample", "meta_byte"} <= set(n["unlimited"]) and "param" not in n["unlimited"]
    assert n["records_step"] == [0, 0, 10, 10, 20]
    np.testing.assert_array_equal(np.load(out / "netCDF4_grads.npy"), written)


def test_netcdf_readers_open_a_store_with_an_incomplete_record(tmp_path, rng):
    """The raw view holds every row, those of an unfinished record too (the dimension is as
    long as its longest variable); the gsnr_stats engine keeps the completed one only."""
    path = tmp_path / "inc.h5"
    g = rng.normal(size=(9, P)).astype(np.float32)
    with gs.GradientWriter(path, PARAMS) as w:
        w.write(0, "train", g[:4])
        w.end_record(0, "train")
        w.write(1, "train", g[4:])
        w.abort_record(1, "train")
    res, out = _raw(path, tmp_path)
    for eng in ("netcdf4", "h5netcdf"):
        np.testing.assert_array_equal(np.load(out / f"{eng}_grads.npy"), g)
        assert res[eng]["records_values"]["step"] == [0]
    with pytest.warns(IncompleteRecordWarning, match=r"inc\.h5: skipping 1 incomplete"):
        ds = xr.open_dataset(path, engine="gsnr_stats")
    with ds:
        np.testing.assert_array_equal(ds.grads.values, g[:4])
        assert ds.step.values.tolist() == [0] * 4


def test_ncdump_reads_the_store(store_file):
    """netCDF-C's own tool, often built against an older HDF5 (Debian 12: netCDF 4.9.0 on
    HDF5 1.10): it crashed with SIGSEGV on dimension scales written with HDF5 1.12-style
    references, which a file format low bound of "latest" gives."""
    ncdump = shutil.which("ncdump")
    if ncdump is None:
        pytest.skip("ncdump (netCDF-C utilities) not installed")
    for args in (["-h"], []):
        proc = subprocess.run([ncdump, *args, str(store_file[0])], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, (args, proc.returncode, proc.stderr[-2000:])
    head = subprocess.run([ncdump, "-h", str(store_file[0])], capture_output=True, text=True,
                          timeout=60).stdout
    for line in ("float grads(sample, param) ;", "sample = UNLIMITED ; // (34 currently)",
                 "param = 21 ;", "group: records {", "records_row = UNLIMITED ; // (5 currently)",
                 "ubyte split(records_row, split_byte) ;", "string layout(layout) ;",
                 "double mean(moment_block, param) ;"):
        assert line in head, line


def test_dimension_scales_hold_no_data_and_cost_no_write_steps(store_file):
    """The scales are set up at creation; appending never writes one (crash model unchanged):
    every dimension-only scale is still empty, its storage never allocated."""
    path = store_file[0]
    with h5py.File(path, "r") as f:
        for name in ("sample", "param", "split_byte", "meta_byte", "moments/moment_block",
                     "records/records_row", "segments/segments_row"):
            d = f[name]
            assert h5py.h5ds.is_scale(d.id), name
            assert d.attrs["NAME"].decode().startswith("This is a netCDF dimension but not"), name
            assert d.id.get_storage_size() == 0, name
        assert f["sample"].shape == (0,) and f["grads"].shape[0] == 34


# -- the gsnr_stats engine -----------------------------------------------------------------

def test_engine_is_registered_and_guesses_only_stores(store_file, tmp_path):
    path = store_file[0]
    assert "gsnr_stats" in xr.backends.list_engines()
    be = GSNRBackend()
    assert be.guess_can_open(path) and be.guess_can_open(str(path)) and is_store(path)
    nc = tmp_path / "stats.nc"
    gs.reduce(path).to_netcdf(nc)  # a file gsnr-stats wrote, but not a store
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "other"
        f["x"] = np.arange(3)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(path.read_bytes()[:2000])
    for p in (nc, foreign, text, trunc, tmp_path / "missing.h5", tmp_path):
        assert not be.guess_can_open(p), p
    with open(path, "rb") as fh:
        assert not be.guess_can_open(fh)  # file objects: not ours to read
    assert not be.guess_can_open(path.read_bytes())


def test_engine_refuses_foreign_files_naming_them(store_file, tmp_path):
    path = store_file[0]
    nc = tmp_path / "stats.nc"
    gs.reduce(path).to_netcdf(nc)
    with pytest.raises(SchemaError, match=r"stats\.nc: not a gsnr-stats store"):
        xr.open_dataset(nc, engine="gsnr_stats")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(StoreError, match=r"notes\.txt: not an HDF5 file"):
        xr.open_dataset(text, engine="gsnr_stats")
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreError, match=r"trunc\.h5: truncated file"):
        xr.open_dataset(trunc, engine="gsnr_stats")
    with pytest.raises(StoreError, match=r"gone\.h5: no such file"):
        xr.open_dataset(tmp_path / "gone.h5", engine="gsnr_stats")
    with open(path, "rb") as fh, pytest.raises(StoreError, match="by its path, got"):
        GSNRBackend().open_dataset(fh)


def test_engine_values_equal_the_written_records_and_the_store(store_file):
    path, data, mom = store_file
    keys, (g_all, loss_all, lab_all, ids_all) = _concat(data)
    with xr.open_dataset(path, engine="gsnr_stats") as ds, gs.open_store(path) as s:
        assert ds.grads.dims == ("sample", "param") and ds.grads.shape == (34, P)
        assert ds.grads.dtype == np.float32
        np.testing.assert_array_equal(ds.grads.values, g_all)
        np.testing.assert_array_equal(
            ds.grads.values, np.concatenate([s.read_grads(*k) for k in keys]))
        np.testing.assert_array_equal(ds.loss.values, loss_all)
        np.testing.assert_array_equal(ds.label.values, lab_all)
        np.testing.assert_array_equal(ds.sample_id.values, ids_all)
        want_step = np.concatenate([[k[0]] * len(data[k][0]) for k in keys])
        want_split = np.concatenate([[k[1]] * len(data[k][0]) for k in keys])
        assert ds.step.values.tolist() == want_step.tolist()
        assert ds.split.values.tolist() == want_split.tolist()
        # one record selected through the per-sample coordinates
        one = ds.isel(sample=(ds.step.values == 10) & (ds.split.values == "test"))
        np.testing.assert_array_equal(one.grads.values, data[(10, "test")][0])
        # the record index: both kinds, sorted by (step, split); start/stop locate them
        assert ds.record_step.values.tolist() == [0, 0, 10, 10, 20]
        assert ds.record_split.values.tolist() == ["test", "train", "test", "train", "train"]
        assert ds.record_kind.values.tolist() == ["gradients"] * 4 + ["moments"]
        assert ds.record_n_samples.values.tolist() == [6, 11, 6, 11, 12]
        assert ds.record_optimizer_step.values.tolist() == [0, 0, 30, 30, -1]
        assert ds.record_lr.values[:4].tolist() == [0.1] * 4
        for i, k in enumerate(keys):
            a, b = int(ds.record_start[i]), int(ds.record_stop[i])
            np.testing.assert_array_equal(ds.grads.values[a:b], data[k][0])
        assert [json.loads(m) for m in ds.record_meta.values] == [META] * 4 + [{}]
        # moments blocks
        assert ds.moments_mean.dims == ("moment_block", "param")
        np.testing.assert_array_equal(ds.moments_count.values, [c for c, _, _ in mom])
        np.testing.assert_array_equal(ds.moments_mean.values, [m for _, m, _ in mom])
        np.testing.assert_array_equal(ds.moments_m2.values, [q for _, _, q in mom])
        assert ds.moments_step.values.tolist() == [20] * 3
        # the layout, per column (as gs.reduce labels it) and per tensor
        stats = gs.reduce(path)
        assert ds.tensor.values.tolist() == stats.tensor.values.tolist()
        assert ds.layer.values.tolist() == ["fc"] * 16 + ["head"] * 5
        assert ds.layout.values.tolist() == ["fc.weight", "fc.bias", "out"]
        assert ds.layout_shape.values.tolist() == ["[3, 4]", "[4]", "[5]"]
        assert ds.layout_size.values.tolist() == [12, 4, 5]
        # tables
        assert ds.trajectory_test_loss.values.tolist() == [1.7, 1.6]
        assert ds.probes_test_after.values.tolist() == [1.05]
        # provenance
        a = s.attrs
        assert ds.attrs["run_id"] == a["run_id"] and ds.attrs["format_version"] == 3
        assert ds.attrs["library_version"] == gs.__version__
        assert json.loads(ds.attrs["user_attrs"]) == {"note": "xr"}
        assert ds.attrs["layout_hash"] == s.layout.hash
        # the mean over the train samples of step 0 equals reduce's (float64 two-pass route)
        tr = ds.grads.values[(ds.step.values == 0) & (ds.split.values == "train")]
        assert_within(tr.astype(np.float64).mean(axis=0),
                      stats["mean"].sel(step=0, split="train").values,
                      2 * 11 * U64 * np.abs(tr).max(), "mean vs reduce")


@pytest.mark.parametrize("key", [
    np.s_[:, :], np.s_[3:20, 5:13], np.s_[::3, ::4], np.s_[-1, 3], np.s_[7], np.s_[:, -2],
    np.s_[33:1:-2, ::-1], np.s_[[0, 5, 30], [1, 2, 20]], np.s_[[2, 2, 9]], np.s_[30:40],
    np.s_[1::17, 2:9], np.s_[::20, 4], np.s_[5:0],
])
def test_engine_indexing_matches_numpy(store_file, key):
    """Any selection reads what numpy gives on the whole array (blocks crossing records
    and segments, steps, negative and out-of-range ends, integer arrays)."""
    path, data, _ = store_file
    _, (g_all, *_) = _concat(data)
    with xr.open_dataset(path, engine="gsnr_stats", cache=False) as ds:
        got = ds.grads.variable[key].values
    if isinstance(key, tuple) and all(isinstance(k, list) for k in key):
        want = g_all[np.ix_(*key)]  # xarray indexes outer, not pointwise
    else:
        want = g_all[key]
    np.testing.assert_array_equal(got, want)


def test_engine_reads_nothing_until_asked(store_file, monkeypatch):
    """Opening, printing, selecting and reading attrs read no gradient, loss or moments row;
    ``.values`` of a block reads it (and only the segments it touches)."""
    path, data, _ = store_file
    _, (g_all, *_) = _concat(data)
    reads: list[tuple[str, object]] = []
    orig = GradientStore._read

    def counting(self, name, sel, where):
        reads.append((name, sel))
        return orig(self, name, sel, where)

    monkeypatch.setattr(GradientStore, "_read", counting)
    ds = xr.open_dataset(path, engine="gsnr_stats")
    repr(ds)
    sub = ds.isel(sample=slice(2, 9), param=slice(4, 10))
    _ = ds.grads.shape, ds.attrs["run_id"], sub.grads.dims, ds.step.values, ds.tensor.dims
    assert not isinstance(ds.grads.variable._data, np.ndarray)
    assert reads == []
    np.testing.assert_array_equal(sub.grads.values, g_all[2:9, 4:10])
    grads_reads = [s for n, s in reads if n == "grads"]
    # samples 2..8: rows 2..5 of (0, "test") (its segments of 5 and 1 rows), rows 0..2 of
    # (0, "train") (its first segment of 5): each touched segment read whole once (checksum)
    assert grads_reads and all(n == "grads" for n, _ in reads)

    def shape(sel):
        rows, cols = sel if isinstance(sel, tuple) else (sel, slice(0, P))
        return rows.stop - rows.start, (cols.stop or P) - (cols.start or 0)

    assert [shape(s) for s in grads_reads] == [(5, P), (1, P), (5, P)]
    reads.clear()
    np.testing.assert_array_equal(ds.grads.variable[2:9, 4:10].values, g_all[2:9, 4:10])
    # verified segments are not read whole again: only the block itself
    assert [shape(s) for _, s in reads] == [(3, 6), (1, 6), (3, 6)]
    ds.close()


def test_engine_verifies_checksums_of_what_it_reads(store_file, tmp_path):
    """A changed gradient value: any read touching its segment raises StoreError naming the
    file and record (even one not covering the changed value); other records read fine;
    verify=False reads the bytes as they are."""
    path, data, _ = store_file
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    # (0, "test") is written after (0, "train"): its rows are 11..16 of grads in the file
    with h5py.File(bad, "r+") as f:
        f["grads"][12, 3] = 99.0
    with xr.open_dataset(bad, engine="gsnr_stats", cache=False) as ds:
        with pytest.raises(StoreError, match=r"bad\.h5: record \(step=0, split='test'\): "
                                             r"gradients of rows \[11, 16\) fail their checksum"):
            _ = ds.grads.variable[4, 0:2].values  # row 4 of (0, "test"): the damaged segment
        np.testing.assert_array_equal(ds.grads.variable[5, :].values, data[(0, "test")][0][5])
        np.testing.assert_array_equal(ds.grads.variable[6:17].values, data[(0, "train")][0])
    with xr.open_dataset(bad, engine="gsnr_stats", verify=False) as ds:
        assert ds.grads.values[1, 3] == 99.0


def test_engine_chunks_give_dask_arrays(store_file):
    da = pytest.importorskip("dask.array")
    path, data, mom = store_file
    _, (g_all, loss_all, *_) = _concat(data)
    with xr.open_dataset(path, engine="gsnr_stats", chunks={}) as ds:
        assert isinstance(ds.grads.data, da.Array) and isinstance(ds.loss.data, da.Array)
        assert ds.grads.data.chunksize == (4, 8)  # the store's chunk shape (preferred chunks)
        np.testing.assert_array_equal(ds.grads.data.compute(), g_all)
        np.testing.assert_array_equal(ds.loss.compute().values, loss_all)
        np.testing.assert_array_equal(ds.moments_mean.compute().values, [m for _, m, _ in mom])
        # a reduction through dask equals the float64 mean of the written rows, up to the
        # rounding of two float64 summation orders over 34 rows
        assert_within(ds.grads.astype("f8").mean("sample").compute().values,
                      g_all.astype(np.float64).mean(axis=0),
                      2 * 34 * U64 * np.abs(g_all).max(), "dask mean")


def test_engine_dataset_pickles_and_reopens_by_path(store_file):
    """What a Dask worker receives: the lazy arrays reopen the store by its path."""
    path, data, _ = store_file
    _, (g_all, *_) = _concat(data)
    with xr.open_dataset(path, engine="gsnr_stats") as ds:
        again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again.grads.values, g_all)
    assert again.tensor.values[12] == "fc.bias"
    again.close()


def test_engine_drop_variables_and_empty_store(tmp_path, store_file):
    path = store_file[0]
    with xr.open_dataset(path, engine="gsnr_stats",
                         drop_variables=["moments_mean", "loss"]) as ds:
        assert "moments_mean" not in ds and "loss" not in ds and "grads" in ds
    empty = tmp_path / "empty.h5"
    with gs.GradientWriter(empty, PARAMS):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_dataset(empty, engine="gsnr_stats")
    with ds:
        assert ds.grads.shape == (0, P) and ds.sizes["record"] == 0
        assert ds.grads.values.shape == (0, P) and ds.moments_mean.values.shape == (0, P)


def test_store_opens_while_h5netcdf_holds_the_file(store_file):
    """h5netcdf keeps the file open through h5py with HDF5's default locking; opening the
    store in the same process used to fail ('file locking flag values don't match')."""
    path, data, _ = store_file
    with xr.open_dataset(path, engine="h5netcdf") as raw:
        with gs.open_store(path) as s:
            np.testing.assert_array_equal(s.read_grads(10, "test"), data[(10, "test")][0])
        assert raw.grads.shape == (34, P)
