"""Fault campaigns: a completed record survives every fault a writer meets (issue 10).

Like SQLite's tests, each campaign strikes at every step of a small writer
(tests/fault_harness.py) — a SIGKILL, a Ctrl-C or an exception before each HDF5 update, a
SIGKILL at each ``pwrite64`` system call (strace), kills and Ctrl-Cs at random moments — and
then proves of every file left behind: each record reported done is there bit for bit, no
half record reads as complete, the file opens promptly, and reduce accepts it. Disk full
(a 3 MiB tmpfs, and ``RLIMIT_FSIZE``), two writers racing for one path, stale temporary
files and rejected writes are tested below.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import gsnr_stats as gs
from gsnr_stats.errors import GSNRError, SchemaError, StoreError
from gsnr_stats.store import GradientWriter, _faults

sys.path.insert(0, str(Path(__file__).parent))
import fault_harness as fh  # noqa: E402

HARNESS = str(Path(__file__).parent / "fault_harness.py")
STRACE = shutil.which("strace")
PWRITES = 400  # > the harness writer's pwrite64 calls (about 360): the sweep ends on its own


def _open(path: Path) -> gs.GradientStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gs.open_store(path)


def check_file(path: Path, done: list[int], reduce: bool = False,
               factored: bool = False) -> tuple[int, int]:
    """Every record reported done is intact; every record read as complete is whole.

    Returns (completed records, incomplete records).
    """
    if factored:
        return check_factored(path, done)
    if not path.exists():
        assert not done, f"{path}: records {done} were reported complete, the file is missing"
        return 0, 0
    t0 = time.monotonic()
    store = _open(path)
    # a hang guard (HDF5's SWMR retries once slept for minutes), not a speed test
    assert time.monotonic() - t0 < 5, f"{path}: opening took {time.monotonic() - t0:.1f} s"
    with store:
        steps = [r.step for r in store.records]
        assert set(done) <= set(steps), (path, done, steps)
        for s in steps:  # any record read as complete holds all its data, bit for bit
            rec = store.record(s, "train")
            if fh.kind(s) == "moments":
                count, mean, m2 = store.read_moments(s, "train")
                want = fh.moments(s)
                assert rec.kind == "moments" and rec.n_samples == 13
                np.testing.assert_array_equal(count, [c for c, _, _ in want])
                np.testing.assert_array_equal(mean, np.stack([m for _, m, _ in want]))
                np.testing.assert_array_equal(m2, np.stack([q for _, _, q in want]))
            else:
                g = fh.grads(s)
                np.testing.assert_array_equal(store.read_grads(s, "train"),
                                              g.astype(np.float32))
                assert rec.n_samples == len(g)
                assert (store.read_loss(s, "train") == s).all()
                if s % 2:
                    np.testing.assert_array_equal(store.read_sample_id(s, "train"),
                                                  np.arange(len(g)) + 7)
                    np.testing.assert_array_equal(store.read_label(s, "train"),
                                                  np.arange(len(g)) % 3)
            assert rec.lr == 0.1
        n_incomplete = len(store.incomplete)
    if reduce and steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = gs.reduce(path)
        assert list(stats["step"].values) == steps
    return len(steps), n_incomplete


def check_factored(path: Path, done: list[int]) -> tuple[int, int]:
    """check_file for fault_harness.work_factored: plain columns and factors bit for bit,
    materialised rows equal to gs.store.materialize of the written factors."""
    if not path.exists():
        assert not done, f"{path}: records {done} were reported complete, the file is missing"
        return 0, 0
    with _open(path) as store:
        steps = [r.step for r in store.records]
        assert set(done) <= set(steps), (path, done, steps)
        for s in steps:
            g, fac = fh.factored(s)
            assert store.record(s, "train").n_samples == len(g)
            np.testing.assert_array_equal(store.read_plain_rows(s, "train"), g)
            got = store.read_factors(s, "train")
            for k, (a, d) in fac.items():
                np.testing.assert_array_equal(got[k][0][:, : a.reshape(len(g), -1, a.shape[-1]).shape[1]],
                                              a.reshape(len(g), -1, a.shape[-1]))
                np.testing.assert_array_equal(got[k][1][:, : d.reshape(len(g), -1, d.shape[-1]).shape[1]],
                                              d.reshape(len(g), -1, d.shape[-1]))
            want = gs.store.materialize(store.factors, store.plain_index, store.layout.n_params,
                                        g, fac, np.float32)
            np.testing.assert_array_equal(store.read_grads(s, "train"), want)
            assert (store.read_loss(s, "train") == s).all()
        return len(steps), len(store.incomplete)


def run_campaigns(tmp_path: Path, campaigns: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Run harness campaigns side by side (one process each); their JSON lines by name."""
    procs = {}
    for name, cmd in campaigns.items():
        d = tmp_path / name
        d.mkdir()
        procs[name] = subprocess.Popen(
            [*cmd[:-1], str(d), *cmd[-1].split()], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        try:
            so, se = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            pytest.fail(f"campaign {name} hung:\n{se[-2000:]}")
        assert p.returncode == 0, f"campaign {name} failed:\n{se[-3000:]}"
        out[name] = [json.loads(line) for line in so.splitlines()]
    return out


def _sweep(results: list[dict], what: str) -> None:
    # the sweep reached past the last step: the final trial ran to the end
    assert results and results[-1]["end"] == ["finished"], f"{what}: sweep did not finish"


def _campaigns() -> dict[str, list[str]]:
    py = sys.executable
    campaigns = {
        # a SIGKILL, a Ctrl-C, an exception before every dataset resize/write, flush, pwritev
        "hookkill": [py, HARNESS, "hookkill", "1 100000"],
        "hookraise": [py, HARNESS, "hookraise", "1 100000"],
        "hookint": [py, HARNESS, "hookint", "1 100000 3"],  # every third step
        # a factored writer (format 4): a kill at every 7th step, an exception at every 11th
        "fhookkill": [py, HARNESS, "fhookkill", "1 100000 7"],
        "fhookraise": [py, HARNESS, "fhookraise", "3 100000 11"],
        # kills and Ctrl-Cs from outside, at random moments of a long writer
        "randkill": [py, HARNESS, "randkill", "11 30"],
        "randint": [py, HARNESS, "randint", "12 50"],
        "syscall": [
            STRACE or "strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=pwrite64",
            "-e", f"inject=pwrite64:signal=KILL:when={PWRITES}",
            py, HARNESS, "syscall", f"{PWRITES} 1 {PWRITES}"],
    }
    return campaigns


def _strace_works() -> bool:
    return STRACE is not None and subprocess.run(
        [STRACE, "-qq", "-o", os.devnull, "true"], capture_output=True).returncode == 0


# What each campaign must at least have done (its sweep strikes every step: ~285 hook steps,
# ~360 pwrite64 calls), so that a harness that stopped striking fails the test.
_AT_LEAST = {
    "hookkill": {"kills": 200, "incomplete": 20},
    "hookraise": {"raised": 100, "incomplete": 20},
    "hookint": {"ints": 50, "incomplete": 5},
    "fhookkill": {"kills": 20, "incomplete": 8},
    "fhookraise": {"raised": 12, "incomplete": 4},
    "randkill": {"kills": 10},
    "randint": {"ints": 10},
    "syscall": {"kills": 200, "incomplete": 20},
}


# One test per campaign, so that pytest-xdist spreads them over the workers.
@pytest.mark.parametrize("name", list(_AT_LEAST))
def test_fault_campaign(tmp_path, name):
    if name == "syscall" and not _strace_works():
        pytest.skip("strace cannot trace here (not installed, or ptrace not permitted)")
    results = run_campaigns(tmp_path, {name: _campaigns()[name]})[name]
    n = {"kills": 0, "ints": 0, "raised": 0, "incomplete": 0}
    for i, r in enumerate(results):
        path = Path(r["path"])
        if name in ("hookkill", "fhookkill", "syscall", "randkill"):
            if r["signal"] == signal.SIGKILL:
                n["kills"] += 1
            else:
                assert r["end"] == ["finished"], r
        elif name in ("hookint", "randint"):
            assert r["signal"] == 0, r  # never a crash, never a hang (killed at 10 s)
            if r["end"] == ["interrupted"]:
                n["ints"] += 1
            else:  # a swallowed KeyboardInterrupt would let the writer run on
                assert name == "hookint" and i == len(results) - 1, r
        else:  # hookraise: our error, the writer stopped, the file closed
            assert r["signal"] == 0, r
            if r["end"] != ["finished"]:
                n["raised"] += 1
                assert len(r["end"]) == 1 and r["end"][0].startswith(
                    "error gsnr_stats.errors.StoreError:"), r
                assert "injected at" in r["end"][0] and str(path) in r["end"][0], r
        _, n_inc = check_file(path, r["done"], reduce=i % 16 == 0 and name[0] != "f",
                              factored=name[0] == "f")
        n["incomplete"] += n_inc
    if name.lstrip("f").startswith("hook") or name == "syscall":
        _sweep(results, name)
    print(name, n)
    for what, least in _AT_LEAST[name].items():
        assert n[what] >= least, (name, n)  # the campaign did strike (mid-record, too)


def test_exception_inside_record_block_leaves_it_incomplete(tmp_path):
    """Out of memory while producing a record: it must not read as complete (issue 10)."""
    path = tmp_path / "oom.h5"
    g = fh.grads(0)
    with pytest.raises(MemoryError):
        with GradientWriter(path, fh.LAYOUT, chunks=fh.CHUNKS) as w:
            w.write(0, "train", g, loss=np.zeros(len(g)))
            w.end_record(0, "train")
            w.write(1, "train", g[:5])
            with w.record(2, "train") as r:
                r.write(g[:7])
                raise MemoryError("per-sample gradients of the next batch")
    with pytest.warns(gs.IncompleteRecordWarning):
        store = gs.open_store(path)
    with store:
        assert [r.step for r in store.records] == [0]
        assert sorted(r.step for r in store.incomplete) == [1, 2]
    stats = gs.reduce(path)
    assert list(stats["step"].values) == [0]
    # a clean exit of the with block does complete the open records
    p2 = tmp_path / "clean.h5"
    with GradientWriter(p2, fh.LAYOUT) as w:
        w.write(0, "train", g)
    with gs.open_store(p2) as s:
        assert s.records[0].n_samples == len(g)


@pytest.mark.parametrize("bad", [
    dict(step=2**63), dict(step=-(2**63) - 1), dict(step=1.5), dict(sample_id=[2**70] * 3),
    dict(loss=[1.0, 2.0]), dict(label=np.zeros(4)), dict(lr="abc"), dict(epoch=object()),
    dict(grads=np.full((3, fh.P), 1e39)), dict(grads=np.zeros((3, fh.P - 1))),
    dict(grads=np.array([["x"] * fh.P] * 3)), dict(split=""), dict(split="x" * 65),
    dict(moments=dict(count=1e19)), dict(moments=dict(count=math.nan)),
    dict(moments=dict(count=-1.0)), dict(moments=dict(m2=-1.0)),
    dict(moments=dict(mean=np.zeros(3))),
])
def test_rejected_write_appends_nothing_and_the_writer_goes_on(tmp_path, bad):
    path = tmp_path / "r.h5"
    g = fh.grads(0)
    with GradientWriter(path, fh.LAYOUT) as w:
        w.write(0, "train", g)
        w.end_record(0, "train")
        w.write(2, "train", g[:4])  # open record: must survive the rejected write
        size = {k: w._f[k].shape[0] for k in ("grads", "loss", "segments/crc", "moments/count")}
        kw = dict(bad)
        with pytest.raises(GSNRError) as ei:
            if "moments" in kw:
                m = dict(count=3.0, mean=np.zeros(fh.P), m2=np.ones(fh.P)) | kw["moments"]
                w.write_moments(5, "train", m["count"], m["mean"], m["m2"])
            else:
                args = dict(step=1, split="train", grads=g[:3]) | kw
                w.write(args.pop("step"), args.pop("split"), args.pop("grads"), **args)
        assert str(path) in str(ei.value)
        assert isinstance(ei.value, SchemaError | StoreError)
        assert size == {k: w._f[k].shape[0] for k in size}  # nothing appended
        w.write(2, "train", g[4:])
        w.write(3, "train", g[:2])
    with gs.open_store(path) as s:  # no empty record for the rejected write
        assert [(r.step, r.n_samples) for r in s.records] == [(0, len(g)), (2, len(g)), (3, 2)]
        np.testing.assert_array_equal(s.read_grads(2, "train"), g.astype(np.float32))


DISKFULL = r"""
import sys, numpy as np
from gsnr_stats.errors import StoreError
from gsnr_stats.store import GradientWriter, _faults
path, comp, fast = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if sys.argv[4] != "0":
    import resource
    lim = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
comp = None if comp == "none" else comp
try:
    with GradientWriter(path, [("a", (40, 30)), ("b", (30,))], chunks=(16, 256),
                        compression=comp, fast_write=fast) as w:
        for step in range(100000):
            g = np.random.default_rng(step).normal(size=(37, 1230))
            for lo in range(0, 37, 10):
                w.write(step, "train", g[lo:lo + 10], loss=np.full(len(g[lo:lo + 10]), step))
            w.end_record(step, "train")
            print(f"done {step}", flush=True)
except StoreError as e:
    print("storeerror", str(e).replace("\n", " "), flush=True)
"""


def _diskfull_check(path: Path, out: str, rc: int) -> None:
    assert rc == 0, f"writer died with {rc} (a SIGSEGV once, with lzf):\n{out[-2000:]}"
    # (a DiskSpaceWarning on stderr, from the writer's free-space check, may come first)
    lines = [ln for ln in out.splitlines() if "DiskSpaceWarning" not in ln]
    assert lines[-1].startswith("storeerror"), lines[-3:]
    assert str(path) in lines[-1]
    done = [int(x.split()[1]) for x in lines if x.startswith("done ")]
    assert done, "the disk filled before the first record"
    store = _open(path)
    with store:
        assert set(done) <= {r.step for r in store.records}
        for s in done:
            want = np.random.default_rng(s).normal(size=(37, 1230)).astype(np.float32)
            np.testing.assert_array_equal(store.read_grads(s, "train"), want)
    gs.reduce(path)


@pytest.mark.parametrize("comp,fast", [("none", 1), ("none", 0), ("lzf", 1), ("gzip", 1)])
def test_disk_full_keeps_completed_records(tmp_path, comp, fast):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {r.stderr.strip()}")
    try:
        path = mnt / "full.h5"
        p = subprocess.run([sys.executable, "-c", DISKFULL, str(path), comp, str(fast), "0"],
                           capture_output=True, text=True, timeout=120)
        _diskfull_check(path, p.stdout + p.stderr, p.returncode)
        # room again: the next writer of the file system works
        path.unlink()
        with GradientWriter(mnt / "again.h5", fh.LAYOUT) as w:
            w.write(0, "train", fh.grads(0))
        with gs.open_store(mnt / "again.h5") as s:
            assert s.records[0].n_samples == len(fh.grads(0))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("comp", ["none", "lzf"])
def test_file_size_limit_keeps_completed_records(tmp_path, comp):
    """``ulimit -f``: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    path = tmp_path / "fsize.h5"
    p = subprocess.run([sys.executable, "-c", DISKFULL, str(path), comp, "1", str(3 << 20)],
                       capture_output=True, text=True, timeout=120)
    _diskfull_check(path, p.stdout + p.stderr, p.returncode)


def test_two_writers_racing_for_one_path(tmp_path):
    """Exactly one of two writers creating the same new path wins; the other is told."""
    big = [("w", (1000, 1000)), ("b", (7,))]  # a large layout: creation takes a while
    for trial in range(8):
        path = tmp_path / f"race{trial}.h5"
        go = threading.Barrier(2)
        outcome: dict[int, object] = {}

        def writer(k: int, path=path, go=go, outcome=outcome) -> None:
            go.wait()
            try:
                with GradientWriter(path, big, chunks=(4, 65536)) as w:
                    w.write(k, "train", np.full((3, 1_000_007), k, np.float32))
                outcome[k] = "ok"
            except StoreError as e:
                outcome[k] = e

        ts = [threading.Thread(target=writer, args=(k,)) for k in (1, 2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        wins = [k for k, v in outcome.items() if v == "ok"]
        assert len(wins) == 1, outcome
        loser = ({1, 2} - set(wins)).pop()
        assert "another writer" in str(outcome[loser]) and str(path) in str(outcome[loser])
        with gs.open_store(path) as s:
            assert [r.step for r in s.records] == wins
            assert (s.read_grads(wins[0], "train") == wins[0]).all()
        assert not list(tmp_path.glob(f".{path.name}.*.tmp"))


KILL_BEFORE_PUBLISH = r"""
import os, sys
from gsnr_stats.store import writer
def die(self, tmp, overwrite):
    os.kill(os.getpid(), 9)
writer.GradientWriter._publish = die
writer.GradientWriter(sys.argv[1], [("a", (3,))])
"""


def test_stale_temporary_files_are_cleaned_and_reported(tmp_path, capsys):
    path = tmp_path / "run.h5"
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", KILL_BEFORE_PUBLISH, str(path)])
        assert p.returncode == -signal.SIGKILL
    # each new writer removed the temp file of the one killed before it
    stale = sorted(tmp_path.glob(".run.h5.*.tmp"))
    assert len(stale) == 1 and not path.exists()
    # a temp file of a live process (this one) is not touched
    mine = tmp_path / f".run.h5.{_host()}.{os.getpid()}.abcdef12.tmp"
    mine.write_bytes(b"in progress")
    with GradientWriter(path, [("a", (3,))]) as w:
        w.write(0, "train", np.ones((2, 3)))
    assert sorted(tmp_path.glob(".run.h5.*.tmp")) == [mine]
    from gsnr_stats.cli import main as cli_main

    assert cli_main(["info", str(path)]) == 0
    assert mine.name in capsys.readouterr().out  # info reports leftover temporary files


def _host() -> str:
    import socket

    return socket.gethostname().replace(".", "_") or "host"


def test_ctrl_c_at_every_step_of_close(tmp_path):
    """A Ctrl-C while ``close`` completes the open records never leaves a half marker."""
    # Python's own Ctrl-C handler (a library imported earlier, e.g. dask_jobqueue, may have
    # installed one that exits)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_at_every_step_of_close(tmp_path)
    finally:
        signal.signal(signal.SIGINT, old)


def _ctrl_c_at_every_step_of_close(tmp_path: Path) -> None:
    n_points = 0
    for k in range(1, 200):
        path = tmp_path / f"c{k}.h5"
        w = GradientWriter(path, fh.LAYOUT, chunks=fh.CHUNKS)
        w.write(0, "train", fh.grads(0), loss=np.zeros(len(fh.grads(0))))
        w.end_record(0, "train")
        w.write(1, "train", fh.grads(1))
        hits = [0]

        def hook(label: str, k=k, hits=hits) -> None:
            hits[0] += 1
            if hits[0] == k:
                os.kill(os.getpid(), signal.SIGINT)

        _faults.set_hook(hook)
        try:
            w.close()
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
            w.close()  # closing again after the interrupt is safe
        finally:
            _faults.set_hook(None)
        with _open(path) as s:
            steps = [r.step for r in s.records]
            assert 0 in steps
            if 1 in steps:
                np.testing.assert_array_equal(s.read_grads(1, "train"),
                                              fh.grads(1).astype(np.float32))
        if not interrupted:
            n_points = k - 1
            break
    assert n_points >= 5


def test_segment_over_never_written_rows_is_refused_not_read_as_zeros(tmp_path):
    """Rows a record claims but whose bytes never reached the file (zeros, HDF5's fill) are
    caught by the segment checksum instead of reducing to mean 0, var 0 (issue 10)."""
    path = tmp_path / "z.h5"
    g = fh.grads(1)
    with GradientWriter(path, fh.LAYOUT, chunks=fh.CHUNKS) as w:
        w.write(0, "train", g)
        w.write(1, "train", g[:4])
    import h5py

    with h5py.File(path, "r+") as f:  # the chunks of record 0 as if never written
        f["grads"][: len(g)] = 0
    with pytest.raises(StoreError, match=r"z\.h5.*(checksum|damaged)"):
        gs.reduce(path)
    with gs.open_store(path) as s, pytest.raises(StoreError, match="z.h5"):
        s.read_grads(0, "train")
    with gs.open_store(path) as s:  # the other record is untouched
        np.testing.assert_array_equal(s.read_grads(1, "train"), g[:4].astype(np.float32))


def test_fsync_writer_syncs_each_completed_record(tmp_path, monkeypatch):
    """``fsync=True`` syncs the file at every completed record and on flush (power loss)."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    with GradientWriter(tmp_path / "s.h5", fh.LAYOUT, fsync=True) as w:
        w.write(0, "train", fh.grads(0))
        w.end_record(0, "train")
        n_record = len(calls)
        w.flush()
        n_flush = len(calls)
        w.write(1, "train", fh.grads(1))
    assert n_record >= 1 and n_flush > n_record and len(calls) > n_flush
    calls.clear()
    with GradientWriter(tmp_path / "n.h5", fh.LAYOUT) as w:  # default: no fsync
        w.write(0, "train", fh.grads(0))
        w.end_record(0, "train")
    assert calls == []


def test_ctrl_c_anywhere_in_a_write_call_is_raised_when_the_call_returns(tmp_path):
    """A SIGINT that lands while a write call validates its input (before any write step) is
    held for the whole call: the write lands, then KeyboardInterrupt. Held only inside the
    write steps, it could be delivered inside an h5py object's finaliser and be lost (a
    random-SIGINT campaign saw a writer run on after its Ctrl-C)."""
    import gsnr_stats as gs

    class Strikes:  # an array-like that presses Ctrl-C while the writer converts it
        def __array__(self, dtype=None, copy=None):
            os.kill(os.getpid(), signal.SIGINT)
            return np.ones((3, 4), dtype=np.float32)

    path = tmp_path / "s.h5"
    with gs.GradientWriter(path, [("w", (4,))]) as w:
        with pytest.raises(KeyboardInterrupt):
            w.write(0, "train", Strikes())
        w.end_record(0, "train")
    with gs.open_store(path) as st:
        assert st.record(0, "train").n_samples == 3
        np.testing.assert_array_equal(st.read_grads(0, "train"), np.ones((3, 4), np.float32))
