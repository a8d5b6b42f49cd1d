"""Shards never count twice (issue 13).

Observed before the fix: the same shard listed twice doubled ``count`` (135 -> 270), a glob
over two runs silently merged their ``run_id``s, and ``info`` printed "LAYOUTS DIFFER" and
then "merged records" anyway. Now a file given twice (by path, symbolic or hard link) or
a copy of one (same run, records and data checksums) is refused, several runs are refused
unless ``allow_mixed_runs=True`` / ``--allow-mixed-runs``, and ``info`` shows the run ids
and never presents as merged what ``reduce`` would refuse. Merged results are checked
against a float64 two-pass over the concatenated samples.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import two_pass

import gsnr_stats as gs
from gsnr_stats.cli import main

P = 6


def shard(path, rng, n, run_id, loc=0.3):
    g = rng.normal(loc, 1.0, size=(n, P)).astype(np.float32)
    with gs.GradientWriter(path, [("w", (P,))], run_id=run_id) as w:
        w.write(0, "train", g, loss=rng.random(n))
    return g


@pytest.fixture
def run(tmp_path):
    """Two shards of run 'A' (45 + 90 = 135 samples, the issue's count), one of run 'B'."""
    rng = np.random.default_rng(5)
    ga = shard(tmp_path / "a0.h5", rng, 45, "A")
    gb = shard(tmp_path / "a1.h5", rng, 90, "A")
    gc = shard(tmp_path / "b0.h5", rng, 30, "B", loc=-1.0)
    return tmp_path, {"a0": ga, "a1": gb, "b0": gc}


def check_moments(ds, g):
    m, v = two_pass(g)
    assert int(ds["count"].sel(step=0, split="train")) == g.shape[0]
    np.testing.assert_allclose(ds["mean"].sel(step=0, split="train").values, m, rtol=1e-12)
    np.testing.assert_allclose(ds["var"].sel(step=0, split="train").values, v, rtol=1e-12)


def test_shards_of_one_run_merge(run):
    d, g = run
    check_moments(gs.reduce([d / "a0.h5", d / "a1.h5"]), np.concatenate([g["a0"], g["a1"]]))


def test_the_same_file_twice_is_refused(run):
    d, g = run
    a0 = d / "a0.h5"
    os.symlink(a0, d / "link.h5")
    os.link(a0, d / "hard.h5")
    for twice, how in (([a0, d / "a1.h5", a0], "listed twice"),
                       ([a0, str(a0)], "listed twice"),
                       ([a0, d / "link.h5"], "the same file through a link"),
                       ([a0, d / "hard.h5"], "the same file through a link")):
        with pytest.raises(gs.ShardSetError, match=f"a0.h5 again \\({how}\\).*counted twice"):
            gs.reduce(twice)
        with pytest.raises(gs.ShardSetError, match="counted twice"):
            gs.osgr_first_order(twice, n=5, splits=("train", "train"))
    with pytest.raises(gs.ShardSetError):  # not a bad shard to skip: refused all the same
        gs.reduce([a0, a0], skip_bad=True)
    check_moments(gs.reduce(a0), g["a0"])  # the count is 45, not 90


def test_a_copy_of_a_shard_is_refused(run):
    d, g = run
    shutil.copy(d / "a0.h5", d / "copy.h5")  # another file, the same samples
    with pytest.raises(gs.ShardSetError, match=r"copy.h5 holds the same records as .*a0.h5 "
                                               r"\(run 'A', identical data checksums\)"):
        gs.reduce([d / "a0.h5", d / "a1.h5", d / "copy.h5"])
    # the same run and record shape but other samples is a genuine shard
    rng = np.random.default_rng(99)
    other = shard(d / "a2.h5", rng, 45, "A")
    check_moments(gs.reduce([d / "a0.h5", d / "a2.h5"]), np.concatenate([g["a0"], other]))


def test_several_runs_need_an_explicit_option(run):
    d, g = run
    files = sorted(str(p) for p in d.glob("*.h5"))  # a glob over two runs
    for call in (lambda **k: gs.reduce(str(d / "*.h5"), **k),
                 lambda **k: gs.osgr_first_order(files, n=5, splits=("train", "train"), **k)):
        with pytest.raises(gs.ShardSetError, match=r"2 different runs \(run_id 'A': .*a0.h5, "
                                                   r".*a1.h5; run_id 'B': .*b0.h5\).*"
                                                   r"allow_mixed_runs=True"):
            call()
        call(allow_mixed_runs=True)
    ds = gs.reduce(files, allow_mixed_runs=True)
    check_moments(ds, np.concatenate([g["a0"], g["a1"], g["b0"]]))
    assert ds.attrs["run_id"] == "A,B"


def test_the_dask_path_refuses_before_any_task(run, monkeypatch):
    from gsnr_stats import distributed

    d, _ = run

    def never(*a, **k):
        raise AssertionError("the cluster was asked to reduce")

    monkeypatch.setattr(distributed, "reduce_distributed", never)
    for files, what in (([d / "a0.h5", d / "a0.h5"], "counted twice"),
                        ([d / "a0.h5", d / "b0.h5"], "2 different runs")):
        with pytest.raises(gs.ShardSetError, match=what):
            gs.reduce(files, scheduler="processes")


def test_cli_reduce_refuses_and_allows(run, capsys):
    d, g = run
    out = d / "out" / "s.nc"
    capsys.readouterr()
    assert main(["reduce", str(d / "a0.h5"), str(d / "a0.h5"), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gsnr-stats reduce: error: argument STORES: ")
    assert "counted twice" in err[0] and not out.exists()
    assert main(["reduce", str(d / "*.h5"), "-o", str(out), "-q"]) == 2
    assert "--allow-mixed-runs" in capsys.readouterr().err
    assert main(["reduce", str(d / "*.h5"), "-o", str(out), "-q", "--allow-mixed-runs"]) == 0
    import xarray as xr

    check_moments(xr.load_dataset(out), np.concatenate([g["a0"], g["a1"], g["b0"]]))


def _info(argv, capsys):
    capsys.readouterr()
    rc = main(["info", *map(str, argv)])
    return rc, capsys.readouterr().out


def test_info_shows_runs_and_never_merges_what_reduce_refuses(run, capsys):
    d, g = run
    rc, out = _info([d / "a0.h5", d / "a1.h5"], capsys)
    assert rc == 0 and "run ids: A (2 shards)" in out
    assert "merged records: 1" in out and "n=135" in out  # 45 + 90
    # the same shard twice: the doubled count (n=270) is not shown
    rc, out = _info([d / "a0.h5", d / "a1.h5", d / "a0.h5"], capsys)
    assert rc == 1 and "NOT MERGED (reduce refuses these shards)" in out
    assert "counted twice" in out and "merged records" not in out and "n=180" not in out
    # two runs: shown, refused, unless allowed as reduce would be
    rc, out = _info([d / "a0.h5", d / "b0.h5"], capsys)
    assert rc == 1 and "run ids: A (1 shard), B (1 shard)" in out
    assert "2 different runs" in out and "merged records" not in out
    rc, out = _info([d / "a0.h5", d / "b0.h5", "--allow-mixed-runs"], capsys)
    assert rc == 0 and "merged records: 1" in out and "n=75" in out
    # layouts differ: never followed by "merged records"
    with gs.GradientWriter(d / "other.h5", [("v", (P + 1,))], run_id="A") as w:
        w.write(0, "train", np.zeros((3, P + 1), np.float32))
    rc, out = _info([d / "a0.h5", d / "other.h5"], capsys)
    assert rc == 1 and "layouts differ" in out and "merged records" not in out
    with pytest.raises(gs.LayoutMismatchError):
        gs.reduce([d / "a0.h5", d / "other.h5"])
