"""The stats netCDF of ``reduce`` is CF-compliant and self-describing (issue 13).

Observed: ``mean``/``var`` had no ``units``, symbols were not defined, the paper was not
cited, ``block`` had no coordinate, the model and framework version were lost, and the
file written by ``stats.to_netcdf`` made the CF checker abort (a ``string`` coordinate
variable ``split(split)``: CF coordinate variables are numeric). Each is checked on files
written both by ``gsnr-stats reduce -o`` and by ``stats.to_netcdf``, reading them back with
``netCDF4`` (what is in the file, not what xarray decodes) and with the CF checker
``cfchecker`` (run with the UDUNITS-2 library that the ``cf-units`` wheel ships, and local
empty standard-name/area/region tables: no network, and no variable has a standard_name).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import netCDF4
import numpy as np
import pytest
import xarray as xr
from conftest import two_pass

import gsnr_stats as gs
from gsnr_stats.cli import main

PARAMS = [("fc.weight", (3, 4)), ("fc.bias", (4,))]
N = {"train": 29, "test": 17}
K = 3
PROV = {"framework": "torch", "framework_version": "2.13.0", "model": "TinyMLP"}
GRAD_VARS = ("mean", "block_mean")
GRAD2_VARS = ("var", "m2", "block_m2")

# Run in a subprocess: cfunits looks UDUNITS-2 up with ctypes.util.find_library, which is
# patched there (only there) to fall back on the copy inside the cf_units wheel.
_CHECK = r"""
import ctypes.util, glob, json, os, sys
import cf_units
base = os.path.dirname(cf_units.__file__)
lib = sorted(glob.glob(os.path.join(base + ".libs", "libudunits2*")))
os.environ.setdefault("UDUNITS2_XML_PATH", os.path.join(base, "etc", "share", "udunits2.xml"))
real = ctypes.util.find_library
ctypes.util.find_library = lambda n: (real(n) or (lib[0] if lib else None)) \
    if n == "udunits2" else real(n)
from cfchecker import cfchecks
tables, files = sys.argv[1], sys.argv[2:]
sn, at, rn = (os.path.join(tables, n) for n in ("sn.xml", "at.xml", "rn.xml"))
head = '<?xml version="1.0"?>'
open(sn, "w").write(head + "<standard_name_table><version_number>0</version_number>"
                    "<last_modified>none</last_modified></standard_name_table>")
for p in (at, rn):
    open(p, "w").write(head + "<table><version_number>0</version_number><date>none</date></table>")
out = {}
for f in files:
    c = cfchecks.CFChecker(cfStandardNamesXML=sn, cfAreaTypesXML=at, cfRegionNamesXML=rn,
                           silent=True, version=cfchecks.CFVersion())  # from Conventions
    try:
        c.checker(f)
    except Exception as e:  # the checker itself failed on the file
        out[f] = {"crash": f"{type(e).__name__}: {e}"}
        continue
    res = {"global": c.results["global"], **c.results["variables"]}
    out[f] = {name: {k: r[k] for k in ("FATAL", "ERROR", "WARN") if r.get(k)}
              for name, r in res.items()}
    out[f]["version"] = c.results["global"]["VERSION"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A store with torch-like provenance, its reduce (K blocks) via the API and the CLI."""
    d = tmp_path_factory.mktemp("cf")
    rng = np.random.default_rng(13)
    data = {}
    with gs.GradientWriter(d / "run.h5", PARAMS, run_id="cfrun", attrs=dict(PROV)) as w:
        for step in (0, 10):
            for sp, n in N.items():
                g = rng.normal(0.3, 1.0 + step / 10, size=(n, 16)).astype(np.float32)
                w.write(step, sp, g, loss=rng.random(n), lr=0.05, epoch=step / 10)
                data[(step, sp)] = g
    stats = gs.reduce(d / "run.h5", blocks=K)
    stats.to_netcdf(d / "api.nc")
    assert main(["reduce", str(d / "run.h5"), "-o", str(d / "cli.nc"), "--blocks", str(K),
                 "-q"]) == 0
    return {"dir": d, "stats": stats, "data": data, "api": d / "api.nc", "cli": d / "cli.nc"}


@pytest.fixture(scope="module")
def checked(files):
    """cfchecker's FATAL/ERROR/WARN messages per variable, for both files."""
    pytest.importorskip("cfchecker")
    pytest.importorskip("cf_units")
    r = subprocess.run([sys.executable, "-c", _CHECK, str(files["dir"]), str(files["api"]),
                        str(files["cli"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["api", "cli"])
def test_cf_checker_finds_no_error(files, checked, which):
    res = checked[str(files[which])]
    assert "crash" not in res, res  # the old file: TypeError on the string split(split)
    assert any("CF Version CF-1.8" in v for v in res.pop("version")), "checked as CF-1.8"
    errors = {k: v for k, r in res.items() for c, v in r.items() if c in ("FATAL", "ERROR")}
    assert errors == {}
    warns = {k: r["WARN"] for k, r in res.items() if r.get("WARN")}
    # The one warning left, by design: split is a dimension with string labels. As a char
    # array it is a CF label variable, which the checker flags as a "possible" coordinate
    # variable; a numeric split coordinate would break stats.sel(split="test").
    assert warns == {"split": ["(5): Possible incorrect declaration of a coordinate variable."]}


@pytest.mark.parametrize("which", ["api", "cli"])
def test_every_variable_has_units_and_a_definition(files, which):
    cf_units = pytest.importorskip("cf_units")
    with netCDF4.Dataset(files[which]) as nc:
        for name, v in nc.variables.items():
            a = {k: v.getncattr(k) for k in v.ncattrs()}
            assert a.get("long_name"), name
            if v.dtype.kind in "fiu":  # numbers carry UDUNITS-2 units; labels (chars) none
                assert "units" in a, name
                cf_units.Unit(a["units"])  # parses as UDUNITS-2 (CF section 3.1)
            if name in files["stats"].data_vars:
                assert len(a.get("comment", "")) > 20, name  # the symbol in words
        for name in GRAD_VARS:
            assert nc[name].units == "1"
            assert nc[name].units_description.startswith("loss per parameter unit"), name
        for name in GRAD2_VARS:
            assert nc[name].units_description == "(loss per parameter unit)^2", name
        assert "m_j = (1/N) sum_i g_ij" in nc["mean"].comment
        assert "d loss_i / d theta_j" in nc["mean"].comment
        assert "s_j^2 = M2_j / (N - ddof)" in nc["var"].comment
        assert "M2_j = sum_i (g_ij - m_j)^2" in nc["m2"].comment
        assert "r_j - 1/N" in nc["gsnr_debiased"].comment
        assert nc["var"].long_name.endswith("(ddof=1)")
        assert nc["split"].dtype == np.dtype("S1")  # a label variable, not string split(split)


@pytest.mark.parametrize("which", ["api", "cli"])
def test_globals_cite_the_paper_and_keep_the_provenance(files, which):
    with gs.open_store(files["dir"] / "run.h5") as st:
        sa = st.attrs
    with netCDF4.Dataset(files[which]) as nc:
        g = {k: nc.getncattr(k) for k in nc.ncattrs()}
    assert g["Conventions"] == "CF-1.8"
    assert "Liu, J." in g["references"] and "ICLR 2020" in g["references"]
    assert "Understanding Why Neural Networks Generalize Well Through GSNR of Parameters" \
        in g["references"]
    for k in ("title", "source", "history", "comment"):
        assert g[k], k
    # the store's own attributes, read back from the store
    assert g["framework"] == sa["framework"] == "torch"
    assert g["framework_version"] == sa["framework_version"] == PROV["framework_version"]
    assert g["model"] == sa["user_attrs"]["model"] == PROV["model"]
    assert g["run_id"] == sa["run_id"] == "cfrun"
    assert "torch 2.13.0" in g["source"] and "TinyMLP" in g["source"]
    assert g["library_version"] == gs.__version__


@pytest.mark.parametrize("which", ["api", "cli"])
def test_block_coordinate_and_values_read_back(files, which):
    back = xr.load_dataset(files[which])
    np.testing.assert_array_equal(back["block"].values, np.arange(K))
    assert back["block"].attrs["units"] == "1"
    assert list(back["split"].values) == ["train", "test"]
    xr.testing.assert_identical(back, files["stats"])
    for (step, sp), g in files["data"].items():
        sel = back.sel(step=step, split=sp)
        m, v = two_pass(g)  # float64 two-pass over the stored float32 gradients
        np.testing.assert_allclose(sel["mean"], m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(sel["var"], v, rtol=1e-12)
        # the blocks partition the samples: N = sum_k N_k
        assert float(sel["block_count"].sum("block")) == len(g) == int(sel["count"])


def test_in_memory_gsnr_keeps_the_same_attributes(files):
    """``gs.gsnr`` on an array: the same CF attributes as the stored route."""
    g = files["data"][(0, "train")]
    ds = gs.gsnr(g)
    for v in ("mean", "var", "gsnr", "count", "param"):
        assert ds[v].attrs == files["stats"][v].attrs, v
    assert ds.attrs["references"] == files["stats"].attrs["references"]


def test_a_reread_subset_is_written_without_warnings(files, tmp_path):
    """The CLI's writer (osgr -o on a stats .nc) writes a subset of a re-read file: shorter
    labels than the file's character dimension gave xarray's length-mismatch warning."""
    from gsnr_stats.cli import _write_netcdf

    sub = xr.load_dataset(files["api"]).sel(split=["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _write_netcdf(sub, tmp_path / "sub.nc")
    back = xr.load_dataset(tmp_path / "sub.nc")
    xr.testing.assert_identical(back, files["stats"].sel(split=["test"]))
    with netCDF4.Dataset(tmp_path / "sub.nc") as nc:
        assert nc["split"].dimensions == ("split", "split_nchar")
        assert nc.dimensions["split_nchar"].size == len("test")
