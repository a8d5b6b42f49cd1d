"""The CLI over the matrix subcommand x kind of bad input (issue 13), and the public API's
argument checks.

Every user mistake of the issue is reproduced in-process through ``gsnr_stats.cli.main``:
exit status 2 and one stderr line naming the argument, never a traceback (before the fix,
each of them ended in a raw ``ValueError``/``KeyError``/``FileExistsError`` traceback, or
"Permission denied" for a directory). What the commands do with each kind of file (store,
stats ``.nc``, report directory) is checked against the library calls and a float64
two-pass over the stored gradients.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import two_pass

import gsnr_stats as gs
from gsnr_stats.cli import build_parser, main, sniff

PARAMS = [("fc.weight", (3, 4)), ("fc.bias", (4,))]
N = {"train": 37, "test": 23}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A store, its stats .nc (4 blocks), a report directory, junk and a foreign netCDF."""
    d = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(7)
    data = {}
    with gs.GradientWriter(d / "run.h5", PARAMS, run_id="run") as w:
        for step in (0, 10):
            for sp, n in N.items():
                g = rng.normal(0.4, 1.0 + step / 10, size=(n, 16)).astype(np.float32)
                w.write(step, sp, g, loss=rng.random(n), lr=0.1, epoch=step / 10)
                data[(step, sp)] = g
    gs.reduce(d / "run.h5", blocks=4).to_netcdf(d / "stats.nc")
    (d / "rep").mkdir()
    shutil.copy(d / "stats.nc", d / "rep" / "stats.nc")
    (d / "rep" / "report.md").write_text("# report\n")
    (d / "rep" / "report.html").write_text("<html></html>\n")
    (d / "junk.nc").write_text("not a netCDF at all\n")
    xr.Dataset({"x": ("a", [1.0, 2.0])}).to_netcdf(d / "foreign.nc")
    (d / "afile.txt").write_text("a file, not a directory\n")
    (d / "ro").mkdir()
    (d / "adir").mkdir()
    return {"dir": d, "store": d / "run.h5", "stats": d / "stats.nc", "report": d / "rep",
            "junk": d / "junk.nc", "foreign": d / "foreign.nc", "file": d / "afile.txt",
            "ro": d / "ro", "adir": d / "adir", "data": data}


@pytest.fixture
def read_only(files, monkeypatch):
    """``files['ro']`` as a read-only place. chmod alone does not stop root (this machine's
    test user), so the OS's answer to access(2) is simulated for that directory too."""
    ro = str(files["ro"])
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False
                        if str(p).startswith(ro) and mode & os.W_OK else real(p, mode, *a, **k))
    os.chmod(ro, 0o555)
    yield files["ro"]
    os.chmod(ro, 0o755)


def run(argv, capsys):
    """``main(argv)``: exit status, stdout, the stderr lines."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def assert_usage_error(argv, capsys, *fragments):
    """Exit 2, one stderr line 'gsnr-stats CMD: error: argument ...' with ``fragments``."""
    rc, _, err = run(argv, capsys)
    assert rc == 2, (argv, rc, err)
    assert len(err) == 1, err
    line = err[0]
    assert "Traceback" not in line
    assert line.startswith(f"gsnr-stats {argv[0]}: error: argument "), line
    for f in fragments:
        assert f in line, (f, line)
    return line


# -- the matrix: subcommand x kind of bad input -----------------------------------------------

def _cases(f):
    S, STATS, REP, J, F = f["store"], f["stats"], f["report"], f["junk"], f["foreign"]
    FILE, DIR, RO, D = f["file"], f["adir"], f["ro"], f["dir"]
    return [
        # reduce: outputs
        (["reduce", S, "-o", FILE / "out.nc"], ["-o/--output", "which is a file"]),
        (["reduce", S, "-o", DIR], ["-o/--output", "is a directory", "stats.nc"]),
        (["reduce", S, "-o", RO / "o.nc"], ["-o/--output", "not writable"]),
        # reduce: options
        (["reduce", S, "-o", D / "o.nc", "--blocks", "-3"], ["--blocks", "'-3'"]),
        # more jackknife blocks than samples (was 115 s of one-sample-per-block kernel calls)
        (["reduce", S, "-o", D / "o.nc", "--blocks", "1000000"],
         ["--blocks", "blocks=1000000", "samples of record", "at most"]),
        (["reduce", S, "-o", D / "o.nc", "--scheduler", "nonsense"],
         ["--scheduler", "'nonsense'"]),
        (["reduce", S, "-o", D / "o.nc", "--workers", "0"], ["--workers", "'0'"]),
        (["reduce", S, "-o", D / "o.nc", "--workers", "2", "--scheduler", "tcp://x:1"],
         ["--scheduler", "not allowed with --workers"]),
        # reduce: kinds of input
        (["reduce", STATS, "-o", D / "o.nc"], ["STORES", "already reduced"]),
        (["reduce", REP, "-o", D / "o.nc"], ["STORES", "report directory", "stats.nc"]),
        (["reduce", DIR, "-o", D / "o.nc"], ["STORES", "is a directory"]),
        (["reduce", D / "missing.h5", "-o", D / "o.nc"], ["STORES", "no such file"]),
        (["reduce", str(D / "nomatch-*.h5"), "-o", D / "o.nc"], ["STORES", "matches no file"]),
        (["reduce", S, S, "-o", D / "o.nc"], ["STORES", "counted twice"]),
        # reduce: a selection naming absent records (was a StoreError, exit 1)
        (["reduce", S, "-o", D / "o.nc", "--steps", "10", "99"],
         ["--steps", "99 not in the stores", "available: 0, 10"]),
        (["reduce", S, "-o", D / "o.nc", "--splits", "val"],
         ["--splits", "'val' not in the stores", "available: test, train"]),
        (["reduce", S, "-o", D / "o.nc", "--steps", "0", "--splits", "train", "nope"],
         ["--splits", "'nope' not in the selected steps", "available: test, train"]),
        # osgr
        (["osgr", J], ["STATS", "junk.nc", "neither HDF5 nor netCDF", "gsnr-stats reduce"]),
        (["osgr", F], ["STATS", "foreign.nc", "without the variables"]),
        (["osgr", DIR], ["STATS", "without stats.nc"]),
        (["osgr", STATS, "-n", "0"], ["-n", "positive integer", "'0'"]),
        (["osgr", STATS, "-n", "-4"], ["-n", "'-4'"]),
        (["osgr", STATS, "--split", "nope"], ["--split", "'nope'", "train", "test"]),
        (["osgr", STATS, "--first-order", S, "--pools", "train", "nope"],
         ["--pools", "'nope'"]),
        (["osgr", STATS, "--first-order", S, "--subsets", "0"], ["--subsets", "'0'"]),
        (["osgr", STATS, "-n", "1257", "--first-order", S], ["-n", "n=1257", "37 stored"]),
        (["osgr", STATS, "-o", DIR], ["-o/--output", "is a directory"]),
        (["osgr", STATS, "--by", "nope"], ["--by", "'nope'"]),
        (["osgr"], ["required", "STATS"]),
        # plot
        (["plot", J, "-o", D / "figs"], ["STATS", "junk.nc"]),
        (["plot", STATS, "-o", FILE], ["-o/--output", "existing file, not a directory"]),
        (["plot", STATS, "-o", RO / "figs"], ["-o/--output", "not writable"]),
        # report
        (["report", S, "-o", FILE], ["-o/--output", "existing file, not a directory"]),
        (["report", S, "-o", RO / "r"], ["-o/--output", "not writable"]),
        (["report", S, "-o", D / "r", "-n", "0"], ["-n", "'0'"]),
        (["report", S, "-o", D / "r", "-n", "-4"], ["-n", "'-4'"]),
        (["report", S, "-o", D / "r", "--blocks", "-1"], ["--blocks", "'-1'"]),
        (["report", S, "-o", D / "r", "--blocks", "1"], ["--blocks", "at least 2"]),
        (["report", S, "-o", D / "r", "--split", "nope"], ["--split", "'nope'"]),
        (["report", S, STATS, "-o", D / "r"], ["STORES", "not a mix"]),
        (["report", J, "-o", D / "r"], ["STORES", "junk.nc"]),
        # demo
        (["demo", "-o", RO / "demo", "--quick"], ["-o/--output", "not writable"]),
        (["demo", "-o", FILE, "--quick"], ["-o/--output", "existing file"]),
        # info
        (["info", str(D / "nomatch-*.h5")], ["FILE", "matches no file"]),
        # argparse's own errors are one line too
        (["info", S, "--bogus"], ["unrecognized arguments: --bogus"]),
    ]


N_CASES = 45


def test_every_user_mistake_is_one_line_and_exit_2(files, read_only, capsys):
    cases = _cases(files)
    assert len(cases) == N_CASES
    before = sorted(p.name for p in files["dir"].iterdir())
    for argv, fragments in cases:
        if argv[0] in ("osgr",) and argv == ["osgr"]:
            rc, _, err = run(argv, capsys)  # argparse: "the following arguments are required"
            assert rc == 2 and len(err) == 1 and "STATS" in err[0] and "required" in err[0]
            continue
        if "--bogus" in argv:
            rc, _, err = run(argv, capsys)
            assert rc == 2 and len(err) == 1 and err[0].startswith("gsnr-stats: error: ")
            assert "--bogus" in err[0]
            continue
        assert_usage_error(argv, capsys, *fragments)
    # no command left a file or directory behind (outputs are checked before any work)
    assert sorted(p.name for p in files["dir"].iterdir()) == before
    assert list(files["ro"].iterdir()) == []


def test_a_failed_write_names_the_output_and_leaves_no_file(files, tmp_path, capsys,
                                                            monkeypatch):
    # the place looked writable, the write itself was refused (a race, an ACL, a quota)
    def refuse(self, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(xr.Dataset, "to_netcdf", refuse)
    out = tmp_path / "o.nc"
    assert_usage_error(["reduce", files["store"], "-o", out, "-q"], capsys, "-o/--output",
                       "cannot write", "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_unexpected_errors_are_one_line_unless_verbose(files, tmp_path, capsys, monkeypatch):
    """A bug is not a user mistake: exit 1, one line saying so; -v shows its traceback."""
    import gsnr_stats.theory as th

    def boom(*a, **k):
        raise RuntimeError("deep inside")

    monkeypatch.setattr(th, "osgr", boom)
    rc, _, err = run(["osgr", files["stats"]], capsys)
    assert rc == 1 and len(err) == 1 and "unexpected RuntimeError" in err[0]
    assert "deep inside" in err[0] and "-v" in err[0]
    with pytest.raises(RuntimeError, match="deep inside"):
        main(["osgr", str(files["stats"]), "-v"])


def test_damaged_data_is_exit_1_in_one_line(files, tmp_path, capsys):
    """Exit 1 is for inputs whose content is bad (a truncated store), still one line."""
    bad = tmp_path / "cut.h5"
    bad.write_bytes(files["store"].read_bytes()[:5000])
    rc, _, err = run(["reduce", bad, "-o", tmp_path / "o.nc", "-q"], capsys)
    assert rc == 1 and len(err) == 1 and "cut.h5" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o.nc").exists()


# -- what each command does with each kind of file --------------------------------------------

def test_sniff_tells_the_three_kinds(files):
    assert sniff(files["store"])[0] == "store"
    assert sniff(files["stats"])[0] == "stats"
    assert sniff(files["report"])[0] == "report"
    assert sniff(files["junk"])[0] == "other"
    assert sniff(files["foreign"])[0] == "netcdf"
    assert sniff(files["adir"])[0] == "dir"
    assert sniff(files["dir"] / "nope.h5")[0] == "missing"


def _osgr_reference(data, n, split="test"):
    """R(n) = ΣG/Σ(G + V/n), G = m² − s²/N, from a float64 two-pass over the gradients."""
    out = {}
    for step in (0, 10):
        g = data[(step, split)]
        m, v = two_pass(g)
        G = m * m - v / g.shape[0]
        out[step] = G.sum() / (G + v / n).sum()
    return out


def test_osgr_takes_each_kind_and_infers_n_and_split_like_report(files, tmp_path, capsys):
    want = _osgr_reference(files["data"], n=N["train"])  # report's defaults: n, split
    for src in (files["stats"], files["store"], files["report"]):
        out = tmp_path / "sub" / f"{Path(src).stem}.nc"  # missing directory: created
        rc, printed, err = run(["osgr", src, "-o", out], capsys)
        assert rc == 0, err
        got = xr.load_dataset(out)
        assert got["n"].values.tolist() == [N["train"]]
        assert got["split"].values.tolist() == ["test"]
        for step, r in want.items():
            assert float(got["osgr"].sel(step=step, split="test", n=N["train"])) == \
                pytest.approx(r, rel=1e-10)
        assert "moments of test, n = 37" in printed


def test_plot_reduces_a_store(files, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, path, **kw: (drawn.append(self), open(path, "wb").close()))
    rc, printed, err = run(["plot", files["store"], "-o", tmp_path / "figs"], capsys)
    assert rc == 0, err
    names = {Path(x).name for x in printed.split()}
    assert {"gsnr_trajectories.png", "osgr.png", "train_vs_test_gsnr.png"} <= names
    # the OSGR figure shows the theory of the reduced moments (train split, its default n)
    ax = next(f for f, p in zip(drawn, printed.split(), strict=True)
              if p.endswith("osgr.png")).axes[0]
    ys = sorted(float(y) for line in ax.get_lines() for y in np.atleast_1d(line.get_ydata()))
    g = files["data"][(10, "train")]
    m, v = two_pass(g)
    G = m * m - v / g.shape[0]
    R10 = G.sum() / (G + v / N["train"]).sum()
    assert any(abs(y - R10) <= 1e-9 * abs(R10) for y in ys), (R10, ys)


def test_info_on_a_stats_file_and_a_report_directory(files, capsys):
    # the original: "not a gsnr-stats store ... a foreign HDF5 file?" about our own .nc
    rc, out, err = run(["info", files["stats"]], capsys)
    assert rc == 0 and not err
    assert "stats netCDF written by gsnr-stats" in out and "foreign" not in out
    assert "4 jackknife blocks" in out and "run run" in out
    assert "step        0  train n=37, test n=23" in out
    rc, out, _ = run(["info", files["report"]], capsys)
    assert rc == 0 and "report directory: report.md, report.html" in out and "train n=37" in out
    rc, out, err = run(["info", files["junk"]], capsys)
    assert rc == 1 and len(err) == 1 and "junk.nc" in err[0]


def test_report_from_a_report_directory(files, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: open(path, "wb").close())
    rc, _, err = run(["report", files["report"], "-o", tmp_path / "again", "-n", "37"], capsys)
    assert rc == 0, err
    text = (tmp_path / "again" / "report.md").read_text()
    R = _osgr_reference(files["data"], 37)
    from gsnr_stats.report import fmt

    assert fmt(R[10]) in text


# -- one consistent CLI -----------------------------------------------------------------------

def _subparsers(p):
    import argparse

    act = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return act.choices


def test_every_option_has_help():
    p = build_parser()
    missing = [f"{name}: {a.dest}" for name, sp in _subparsers(p).items() for a in sp._actions
               if not a.help]
    missing += [a.dest for a in p._actions if not a.help]
    assert not missing, missing


def test_verbose_anywhere(files):
    p = build_parser()
    for argv in (["-v", "info", "x"], ["info", "-v", "x"], ["info", "x", "--verbose"]):
        assert p.parse_args(argv).verbose is True, argv
    assert p.parse_args(["info", "x"]).verbose is False


def test_same_defaults_in_osgr_and_report():
    sub = _subparsers(build_parser())
    o, r = (sub[c].parse_args(["x", "-o", "y"] if c == "report" else ["x"])
            for c in ("osgr", "report"))
    assert o.n is None and r.n is None  # both infer n from the train count
    assert o.split is None and r.split is None  # both resolve to the held-out split


def test_the_console_script_takes_verbose_after_the_subcommand(files):
    exe = Path(sys.executable).with_name("gsnr-stats")
    res = subprocess.run([str(exe), "info", str(files["store"]), "-v"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "records: 4 complete" in res.stdout and "unrecognized" not in res.stderr


# -- optional parts --------------------------------------------------------------------------

def test_dask_missing_names_the_extra(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    for opt in (["--workers", "2"], ["--scheduler", "tcp://127.0.0.1:8786"]):
        rc, _, err = run(["reduce", files["store"], "-o", tmp_path / "o.nc", *opt], capsys)
        assert rc == 2 and len(err) == 1, err
        assert 'pip install "gsnr-stats[distributed]"' in err[0] and "Traceback" not in err[0]
    with pytest.raises(gs.MissingDependencyError, match=r'gsnr-stats\[distributed\]'):
        gs.reduce(files["store"], scheduler="processes")
    with pytest.raises(ImportError):  # still an ImportError for code that catches those
        gs.reduce(files["store"], scheduler="tcp://127.0.0.1:8786")


# -- public functions given the wrong kind of argument ----------------------------------------

def _api_calls(stats):
    from gsnr_stats import plot, report

    return {
        "gs.osgr": lambda x: gs.osgr(x, [10]),
        "gs.osgr_param": lambda x: gs.osgr_param(x, [10]),
        "gs.accumulated_gap": lambda x: gs.accumulated_gap(x, 10),
        "gs.one_step_gap": lambda x: gs.one_step_gap(x, 10),
        "gs.measured_gap": lambda x: gs.measured_gap(x),
        "gs.noise_scale": lambda x: gs.noise_scale(x),
        "gs.aggregate": lambda x: gs.aggregate(x),
        "gs.jackknife": lambda x: gs.jackknife(x, lambda s: gs.osgr(s, 10)),
        "gs.osgr_ci": lambda x: gs.osgr_ci(x, 10),
        "gs.aggregate_ci": lambda x: gs.aggregate_ci(x),
        "gs.osgr_pools": lambda x: gs.osgr_pools(x, 10),
        "gs.plot.save_all": lambda x: plot.save_all(x, "figs"),
        "gs.osgr_first_order": lambda x: gs.osgr_first_order("run.h5", n=5, stats=x),
        "gs.osgr_probe": lambda x: gs.osgr_probe({k: [] for k in (
            "step", "n", "lr", "train_before", "train_after", "test_before", "test_after")}, x),
        "report": lambda x: report.write_report(x, "r"),
    }


def test_public_functions_say_what_they_expected(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files["dir"])
    stats = xr.load_dataset(files["stats"])
    for where, call in _api_calls(stats).items():
        # the original: gs.osgr("store.h5", [10]) -> TypeError: string indices must be integers
        with pytest.raises(gs.ArgumentTypeError) as ei:
            call("store.h5") if where != "report" else call(["run.h5", 3])
        msg = str(ei.value)
        assert isinstance(ei.value, TypeError) and isinstance(ei.value, gs.GSNRError)
        if where != "report":
            assert msg.startswith(f"{where}: stats must be an xarray.Dataset from gs.reduce"), msg
            assert "got str 'store.h5' — did you mean gs.reduce('store.h5') first?" in msg, msg
        # a Dataset that is not the moments: what it lacks, and what it has
        with pytest.raises(gs.UsageError, match=r"lacks \[.*\].*Dataset with variables \['x'\]"):
            call(xr.Dataset({"x": ("a", [1.0])}))
    # the suggested call works, and gives the reference numbers
    R = gs.osgr(gs.reduce("run.h5"), [10], split="test")
    want = _osgr_reference(files["data"], 10)
    assert float(R["osgr"].sel(step=10, split="test", n=10)) == pytest.approx(want[10],
                                                                              rel=1e-10)
    # other wrong kinds, named
    cases = [
        (lambda: gs.osgr(stats.sel(split="test")["mean"], 10), "a DataArray 'mean'"),
        (lambda: gs.osgr("stats.nc", 10), "xr.load_dataset('stats.nc')"),
        (lambda: gs.osgr(stats, "10"), "n must be a positive integer"),
        (lambda: gs.osgr(stats, 10, split=3), "split must be a split name"),
        (lambda: gs.reduce(stats), "already reduced"),
        (lambda: gs.reduce(["run.h5", 3]), "a store path, a glob or a list of them"),
        (lambda: gs.reduce("run.h5", blocks="4"), "blocks must be an integer"),
        (lambda: gs.reduce("run.h5", steps=10), "steps must be a list"),
        (lambda: gs.gsnr("run.h5"), "for a store file use gs.reduce('run.h5')"),
        (lambda: gs.gsnr(stats), "moments already"),
        (lambda: gs.jackknife(stats, "osgr"), "func must be a callable"),
        (lambda: gs.aggregate(stats, by=3), "by must be"),
        (lambda: gs.compare({"m": object()}, ([1], [1]), ([1], [1]), n="10"),
         "n must be an integer"),
    ]
    for call, text in cases:
        with pytest.raises(gs.ArgumentTypeError, match=None) as ei:
            call()
        assert text in str(ei.value), (text, str(ei.value))
    # values out of range are UsageError (a ValueError), named
    for call, text in [
        (lambda: gs.reduce("run.h5", blocks=-3), "blocks must be >= 0, got -3"),
        (lambda: gs.osgr(stats, [0]), "n must hold positive integers"),
        (lambda: gs.osgr_ci(stats, 10, level=95), "level must be a probability"),
        (lambda: gs.osgr_first_order("run.h5", n=5, n_subsets=0), "n_subsets must be >= 1"),
        (lambda: gs.osgr_first_order("run.h5", n=5, splits=("train", "nope")), "'nope'"),
        (lambda: gs.jackknife(gs.reduce("run.h5"), lambda s: gs.osgr(s, 10)),
         "no per-block moments"),
        (lambda: gs.osgr(stats, 10, split="nope"), "split(s) ['nope'] not in the Dataset"),
    ]:
        with pytest.raises(gs.UsageError) as ei:
            call()
        assert isinstance(ei.value, ValueError) and text in str(ei.value), str(ei.value)
    assert not (files["dir"] / "figs").exists() and not (files["dir"] / "r").exists()


def test_reduce_tells_a_stats_file_named_like_a_store(files, tmp_path, capsys):
    # netCDF-4 is HDF5 too: the store reader refuses it, the CLI says what it is instead
    disguised = tmp_path / "stats.h5"
    shutil.copy(files["stats"], disguised)
    assert sniff(disguised)[0] == "stats"
    assert_usage_error(["reduce", disguised, "-o", tmp_path / "o.nc", "-q"], capsys, "STORES",
                       "stats.h5 is a stats netCDF, already reduced")
    assert not (tmp_path / "o.nc").exists()
