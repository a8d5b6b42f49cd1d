"""Hostile files (issue 10): damaged copies of a killed writer's file, byte flips of a
cleanly closed store, crafted moments, NUL names, glob characters in file names, memory
bombs, truncation during a reduce, a reader polling a live writer, metadata damaged after
open.

Every outcome must be one of ours: a :class:`gsnr_stats.GSNRError` naming the file, or a
result whose numbers equal the undamaged file's bit for bit. Never a silent numeric change,
a raw h5py/numpy exception, a hang or a crash. Checks of damaged HDF5 files run in
subprocesses (one per batch of files, to pay the interpreter start once) with a per-file
hang guard (``faulthandler.dump_traceback_later(..., exit=True)`` fires even while HDF5
sleeps in C) and a subprocess timeout; a negative return code (a signal: SIGSEGV, SIGBUS)
fails the test. Crafted files that are valid HDF5 (edited with h5py) are checked in-process.
There are no timed assertions other than these hang guards.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import gsnr_stats as gs
from gsnr_stats.store.layout import Layout
from gsnr_stats.store.schema import TABLES, bytes_crc, row_crc

PER_FILE_S = 20  # hang guard per damaged file (typical: ~30 ms)
BATCH_S = 100  # subprocess timeout of a batch
PARAMS = [("a", (8, 12)), ("b", (12,))]
P = 108
ENV = {**os.environ, "NUMBA_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


# -- helpers -------------------------------------------------------------------------------

def run_py(code: str, *args: object, timeout: float = BATCH_S,
           killed_by: int | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a hang or a death by signal fails the test
    (unless it is ``killed_by``, the signal the code sends itself)."""
    try:
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=ENV)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"subprocess hung for {timeout} s; stderr tail: {str(e.stderr)[-2000:]}")
    assert proc.returncode >= 0 or -proc.returncode == killed_by, (
        f"subprocess killed by signal {-proc.returncode} (crash); stderr: {proc.stderr[-3000:]}"
    )
    return proc


def grads_of(step: int) -> np.ndarray:
    return np.random.default_rng(step).normal(size=(40, P))


def set_row(f: h5py.File, table: str, i: int, **values: object) -> None:
    """Rewrite row ``i`` of a v2 table with a valid checksum (a crafted, hostile file)."""
    g = f[table]
    for k, v in values.items():
        g[k][i] = v
    g["crc"][i] = row_crc(table, [g[c][i] for c, _, _ in TABLES[table]])


def edit(src: Path, dst: Path, fn) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


def raw_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of every stored chunk of every dataset (the rest is metadata or free)."""
    out: list[tuple[int, int]] = []
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        def visit(_name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                obj.id.chunk_iter(lambda c: out.append((c.byte_offset, c.byte_offset + c.size)))
        f.visititems(visit)
    return out


def table_offsets(path: Path) -> np.ndarray:
    """Offsets of the stored bytes of the table rows (records, segments, trajectory)."""
    out = []
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        for t in ("records", "segments", "trajectory"):
            for c in f[t].values():
                row = c.dtype.itemsize * int(np.prod(c.shape[1:], dtype=np.int64))
                used = min(c.shape[0], c.chunks[0]) * row
                info = c.id.get_chunk_info_by_coord((0,) * c.ndim) if used else None
                if info is not None and info.byte_offset is not None:
                    out.append(np.arange(info.byte_offset, info.byte_offset + used))
    return np.concatenate(out)


def metadata_offsets(path: Path) -> np.ndarray:
    """Offsets of non-zero bytes outside stored chunks: HDF5 metadata (headers, indexes)."""
    data = np.frombuffer(path.read_bytes(), np.uint8)
    meta = data != 0
    for a, b in raw_ranges(path):
        meta[a:b] = False
    meta[:64] = True  # the superblock
    return np.flatnonzero(meta)


def damaged_copies(src: Path, out: Path, rng: np.random.Generator, n_flip: int,
                   n_trunc: int = 0) -> list[Path]:
    """Copies of ``src`` with seeded byte flips (superblock, metadata, table rows, anywhere)
    or truncated."""
    out.mkdir(exist_ok=True)
    data = src.read_bytes()
    meta, rows = metadata_offsets(src), table_offsets(src)
    files = []
    for i in range(n_flip):
        b = bytearray(data)
        where = i % 5
        k = 1 + int(rng.integers(0, 3)) if i % 3 else 1
        if where == 0:  # superblock (bytes 0..64: signature, versions, addresses, checksum)
            pos = rng.integers(0, 64, size=k)
        elif where in (1, 2):  # metadata: object headers, chunk indexes, heaps
            pos = meta[rng.integers(0, meta.size, size=k)]
        elif where == 3:  # the rows of the record index and the trajectory
            pos = rows[rng.integers(0, rows.size, size=k)]
        else:
            pos = rng.integers(0, len(b), size=k)
        for p in pos:
            b[int(p)] ^= int(rng.integers(1, 256))
        f = out / f"flip{i}.h5"
        f.write_bytes(bytes(b))
        files.append(f)
    cuts = [1, 8, 48, 100, 2048, len(data) // 2, len(data) - 1]
    cuts += [int(c) for c in rng.integers(1, len(data), size=max(0, n_trunc - len(cuts)))]
    for i, c in enumerate(cuts[:n_trunc]):
        f = out / f"trunc{i}.h5"
        f.write_bytes(data[:c])
        files.append(f)
    return files


# One interpreter judges a batch of files: reference from the undamaged file first, then
# open_store + reduce (+ trajectory) of each damaged file under the per-file hang guard.
JUDGE = r"""
import faulthandler, json, re, sys, warnings, zlib
import numpy as np
import gsnr_stats as gs
from gsnr_stats.store import IncompleteRecordWarning

job = json.load(open(sys.argv[1]))
VARS = ("count", "mean", "var", "m2", "gsnr", "lr", "loss_mean", "loss_var")

def records(path):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        with gs.open_store(path) as s:
            traj = s.trajectory()
            # v3 record metadata, compared as a CRC of its JSON (a silent change is caught)
            meta = {f"{r.step}|{r.split}": float(zlib.crc32(json.dumps(
                [r.optimizer_step, s.record_meta(r.step, r.split)]).encode()))
                for r in s.records}
        ds = gs.reduce(path)
    warned = sorted({int(m) for w in ws if issubclass(w.category, IncompleteRecordWarning)
                     for m in re.findall(r"step=(\d+)", str(w.message))})
    out = {}
    for i, st in enumerate(ds["step"].values):
        for j, sp in enumerate(ds["split"].values):
            if ds["count"].values[i, j] > 0:
                key = f"{int(st)}|{sp}"
                out[key] = [np.asarray(ds[v].values[i, j]) for v in VARS] + [
                    np.asarray(ds["optimizer_step"].values[i]), np.asarray(meta[key])]
    return out, traj, warned

ref, ref_traj, _ = records(job["ref"])
print(json.dumps({"ref": sorted(ref)}), flush=True)
for path in job["files"]:
    faulthandler.dump_traceback_later(job["per_file"], exit=True)
    res = {"file": path}
    try:
        got, traj, warned = records(path)
        res["outcome"] = "read"
        res["keys"] = sorted(got)
        res["equal"] = sorted(k for k in got if k in ref and all(
            a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
            for a, b in zip(got[k], ref[k])))
        res["traj_equal"] = sorted(traj) == sorted(ref_traj) and all(
            np.array_equal(traj[c], ref_traj[c], equal_nan=True) for c in ref_traj)
        res["warned"] = warned
    except gs.GSNRError as e:
        res.update(outcome="error", type=type(e).__name__, msg=str(e)[:400])
    except BaseException as e:
        res.update(outcome="foreign", type=type(e).__name__, msg=str(e)[:400])
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(res), flush=True)
"""


def judge(ref: Path, files: list[Path], tmp: Path, name: str) -> tuple[list[str], list[dict]]:
    job = tmp / f"{name}.json"
    job.write_text(json.dumps({"ref": str(ref), "files": [str(f) for f in files],
                               "per_file": PER_FILE_S}))
    proc = run_py(JUDGE, job)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    done = {r["file"] for r in lines[1:]}
    hung = [str(f) for f in files if str(f) not in done]
    assert proc.returncode == 0 and not hung, (
        f"judge died (rc {proc.returncode}) at {hung[:1]} (hang guard: {PER_FILE_S} s): "
        f"{proc.stderr[-3000:]}"
    )
    return lines[0]["ref"], lines[1:]


def check_outcomes(ref_keys: list[str], results: list[dict], killed: bool) -> dict[str, int]:
    """Every file: our error naming it, or the undamaged numbers (a subset only if warned)."""
    tally = {"error": 0, "same": 0, "warned subset": 0}
    problems = []
    for r in results:
        f = r["file"]
        if r["outcome"] == "foreign":
            problems.append(f"{f}: raw {r['type']}: {r['msg']}")
        elif r["outcome"] == "error":
            tally["error"] += 1
            if f not in r["msg"]:
                problems.append(f"{f}: {r['type']} does not name the file: {r['msg']}")
        else:
            keys, equal = set(r["keys"]), set(r["equal"])
            missing = set(ref_keys) - keys
            if keys != equal or not keys <= set(ref_keys) or not r["traj_equal"]:
                problems.append(f"{f}: SILENT NUMERIC CHANGE: keys {sorted(keys)}, equal to "
                                f"the undamaged file: {sorted(equal)}, trajectory equal: "
                                f"{r['traj_equal']}")
            elif missing:
                # A killed writer's last completion row, damaged, is indistinguishable from
                # a torn one: dropping it is allowed if the reader warns about that record.
                unwarned = {k for k in missing if int(k.split("|")[0]) not in r["warned"]}
                if not killed or unwarned:
                    problems.append(f"{f}: completed records {sorted(missing)} dropped "
                                    f"(warned steps: {r['warned']})")
                tally["warned subset"] += 1
            else:
                tally["same"] += 1
    assert not problems, "\n".join(problems[:20])
    return tally


# -- 1. files left by a killed writer, then damaged ---------------------------------------

KILLED_WRITER = r"""
import os, sys, numpy as np
from gsnr_stats.store import GradientWriter
w = GradientWriter(sys.argv[1], [("a", (8, 12)), ("b", (12,))], chunks=(16, 64))
for step in range(3):
    g = np.random.default_rng(step).normal(size=(40, 108))
    for lo in range(0, 40, 15):
        w.write(step, "train", g[lo:lo + 15], loss=np.arange(lo, min(lo + 15, 40)) * 0.5)
        w.flush()
    w.end_record(step, "train", optimizer_step=20 * step,
                 meta={"optimizer": {"class": "SGD", "groups": [{"lr": 0.1, "step": step}]}})
w.write_moments(3, "test", 7, np.full(108, 0.25), np.full(108, 2.0))
w.write_moments(3, "test", 5, np.full(108, -0.5), np.full(108, 1.0))
w.end_record(3, "test")
w.write_trajectory(0, 0.1, 1.0, 1.25)
w.write(4, "train", np.ones((5, 108)))  # never completed
w.flush()
os.kill(os.getpid(), 9)
"""


@pytest.fixture(scope="module")
def killed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("killed") / "killed.h5"
    proc = run_py(KILLED_WRITER, path, timeout=60, killed_by=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and path.exists(), proc.stderr
    return path


def test_killed_writer_file_state(killed_file):
    from gsnr_stats.store.reader import _superblock

    sb = _superblock(killed_file)
    assert sb is not None and sb[1] & 0x05, "the writer's SWMR/consistency flags are set"
    with pytest.warns(gs.IncompleteRecordWarning, match=r"step=4"):
        s = gs.open_store(killed_file)
    with s:
        assert [(r.step, r.split) for r in s.records] == [(0, "train"), (1, "train"),
                                                          (2, "train"), (3, "test")]
        for st in range(3):
            np.testing.assert_array_equal(s.read_grads(st, "train"),
                                          grads_of(st).astype(np.float32))


def judge_halves(src: Path, files: list[Path], tmp_path: Path, tag: str):
    """:func:`judge` the damaged copies in two subprocess batches; (ref keys, results)."""
    ref_keys, results = [], []
    for b, batch in enumerate((files[::2], files[1::2])):
        ref_keys, res = judge(src, batch, tmp_path, f"{tag}{b}")
        results += res
    return ref_keys, results


def test_killed_writer_damaged_copies(killed_file, tmp_path):
    rng = np.random.default_rng(20261203)
    files = damaged_copies(killed_file, tmp_path / "k", rng, n_flip=140, n_trunc=24)
    ref_keys, results = judge_halves(killed_file, files, tmp_path, "k")
    assert ref_keys == ["0|train", "1|train", "2|train", "3|test"]
    assert len(results) >= 160
    tally = check_outcomes(ref_keys, results, killed=True)
    assert tally["error"] >= 1 and tally["same"] + tally["warned subset"] >= 1, tally


# -- 2. byte flips of a cleanly closed store ------------------------------------------------

@pytest.fixture(scope="module")
def clean_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "clean.h5"
    with gs.GradientWriter(path, PARAMS, chunks=(16, 64)) as w:
        for step in range(3):
            g = grads_of(step)
            w.write(step, "train", g[:25], loss=np.arange(25.0), lr=0.1)
            w.write(step, "train", g[25:], loss=np.arange(15.0), optimizer_step=20 * step,
                    meta={"optimizer": {"class": "SGD", "groups": [{"lr": 0.1, "k": step}]}})
        w.write_moments(3, "test", 7, np.full(P, 0.25), np.full(P, 2.0))
        w.write_trajectory(0, 0.1, 1.0, 1.25)
        w.write_trajectory(1, 0.1, 0.9, 1.5)
    return path


def test_byte_flips_of_closed_store(clean_file, tmp_path):
    rng = np.random.default_rng(7)
    files = damaged_copies(clean_file, tmp_path / "c", rng, n_flip=240)
    ref_keys, results = judge_halves(clean_file, files, tmp_path, "c")
    assert ref_keys == ["0|train", "1|train", "2|train", "3|test"]
    assert len(results) >= 200
    tally = check_outcomes(ref_keys, results, killed=False)
    assert tally["error"] >= 1 and tally["same"] >= 1, tally


def test_damaged_completion_row_of_closed_store_is_an_error(clean_file, tmp_path):
    """A cleanly closed file has no torn rows: a completion row (or trajectory row) failing
    its checksum is damage, not a killed writer's debris; it used to drop the record
    silently (reported as merely incomplete)."""
    p = edit(clean_file, tmp_path / "lastrec.h5", lambda f: f["records/lr"].__setitem__(-1, 0.5))
    with pytest.raises(gs.SchemaError, match=r"lastrec.h5: table 'records' row 3 fails its"):
        gs.reduce(p)
    p = edit(clean_file, tmp_path / "lasttraj.h5",
             lambda f: f["trajectory/test_loss"].__setitem__(-1, 9.0))
    with pytest.raises(gs.SchemaError, match=r"lasttraj.h5: table 'trajectory' row 1"):
        gs.open_store(p)

    # A writer that failed before writing a row's checksum leaves it 0: still debris.
    def unfinished(f):
        for c in f["records"]:
            f["records"][c].resize(5, axis=0)
        f["records/step"][4] = 9

    p = edit(clean_file, tmp_path / "debris.h5", unfinished)
    with gs.open_store(p) as s:
        assert len(s.records) == 4 and s.debris["records"] == 1


# -- 3. hostile moments ----------------------------------------------------------------------

@pytest.fixture
def moments_file(tmp_path) -> Path:
    path = tmp_path / "mom.h5"
    with gs.GradientWriter(path, PARAMS, chunks=(16, 64)) as w:
        w.write(0, "train", grads_of(0))
        w.write_moments(1, "train", 7, np.full(P, 0.25), np.full(P, 2.0))
        w.write_moments(1, "train", 5, np.full(P, -0.5), np.full(P, 1.0))
    return path


def _moments_seg(f: h5py.File, block: int) -> int:
    """Row of the segments table holding moments block ``block``."""
    kinds, starts = f["segments/kind"][:], f["segments/start"][:]
    return int(np.flatnonzero((kinds == 1) & (starts == block))[0])


def craft_moments(f: h5py.File, block: int, count=None, m2=None, recrc: bool = True) -> None:
    """Edit moments block ``block``; with ``recrc`` recompute its data and row checksums."""
    if count is not None:
        f["moments/count"][block] = count
    if m2 is not None:
        f["moments/m2"][block] = m2
    if recrc:
        c = f["moments/count"][block:block + 1]
        aux = bytes_crc(c, f["moments/mean"][block:block + 1], f["moments/m2"][block:block + 1])
        set_row(f, "segments", _moments_seg(f, block), aux_crc=aux)


@pytest.mark.parametrize("case", ["m2", "nan_count", "neg_count"])
def test_hostile_moments(moments_file, tmp_path, case):
    bad_m2 = np.full(P, 2.0)
    bad_m2[17] = -3.0
    kw = {"m2": {"m2": bad_m2}, "nan_count": {"count": np.nan},
          "neg_count": {"count": -4.0}}[case]
    # naive edit: the block's data checksum catches it
    p = edit(moments_file, tmp_path / f"naive_{case}.h5",
             lambda f: craft_moments(f, 1, recrc=False, **kw))
    where = rf"naive_{case}.h5: record \(step=1, split='train'\)"
    with gs.open_store(p) as s, pytest.raises(gs.StoreError, match=where + ": moments .* fail"):
        s.read_moments(1, "train")
    with pytest.raises(gs.StoreError, match=where):
        gs.reduce(p)
    # crafted with valid checksums: the semantic validation refuses it
    p = edit(moments_file, tmp_path / f"crafted_{case}.h5", lambda f: craft_moments(f, 1, **kw))
    what = "M2 < 0" if case == "m2" else r"moment counts \[.*\] are not finite non-negative"
    where = rf"crafted_{case}.h5: record \(step=1, split='train'\)"
    with gs.open_store(p) as s:
        with pytest.raises(gs.SchemaError, match=f"{where}: stored {what}"):
            s.read_moments(1, "train")
        np.testing.assert_array_equal(s.read_grads(0, "train"), grads_of(0).astype(np.float32))
    with pytest.raises(gs.SchemaError, match=f"{where}: stored {what}"):
        gs.reduce(p)
    assert gs.reduce(p, steps=[0])["count"].values.tolist() == [[40]]  # other records read


# -- 4. NUL in names -------------------------------------------------------------------------

def test_nul_in_names_refused_by_writer(tmp_path):
    p = tmp_path / "nul.h5"
    with pytest.raises(gs.SchemaError, match="contains a NUL character"):
        gs.GradientWriter(p, [("fc\x00.weight", (3,)), ("fc.bias", (3,))])
    with pytest.raises(gs.SchemaError, match="layer name .* contains a NUL"):
        gs.GradientWriter(p, [("w", (3,), "fc\x00")])
    with pytest.raises(gs.SchemaError, match="contains a NUL character"):
        Layout.from_params([("a\x00", (2,))])
    assert not p.exists() and not list(tmp_path.iterdir())
    with gs.GradientWriter(p, [("w", (3,))]) as w, pytest.raises((ValueError, gs.SchemaError),
                                                                 match="NUL"):
        w.write(0, "tr\x00ain", np.ones((2, 3)))


def test_nul_in_crafted_file_refused_by_reader(moments_file, tmp_path):
    def nul_layout(f):
        items = json.loads(f.attrs["layout"])
        items[0]["name"] = "a\x00b"
        text = json.dumps(items, separators=(",", ":"))
        f.attrs["layout"] = text
        import hashlib

        f.attrs["layout_hash"] = hashlib.sha256(text.encode()).hexdigest()

    p = edit(moments_file, tmp_path / "nullay.h5", nul_layout)
    for call in (gs.open_store, gs.reduce):
        with pytest.raises(gs.SchemaError, match=r"nullay.h5: .*NUL character"):
            call(p)

    def nul_split(f):
        sp = np.zeros(64, np.uint8)
        sp[:6] = np.frombuffer(b"tr\x00ain", np.uint8)
        set_row(f, "records", 0, split=sp)
        set_row(f, "segments", 0, split=sp)

    p = edit(moments_file, tmp_path / "nulsplit.h5", nul_split)
    for call in (gs.open_store, gs.reduce):
        with pytest.raises(gs.SchemaError, match=r"nulsplit.h5: .*split name"):
            call(p)


# -- 5. glob characters in file names ------------------------------------------------------

def test_glob_characters_in_names_are_literal(tmp_path):
    means = {}
    for name, loc in (("run[1].h5", 5.0), ("run1.h5", -2.0), ("r*n.h5", 1.0), ("ru?.h5", 3.0)):
        g = np.random.default_rng(1).normal(loc, 1.0, size=(30, 4)).astype(np.float32)
        with gs.GradientWriter(tmp_path / name, [("w", (4,))]) as w:
            w.write(0, "train", g)
        means[name] = g.astype(np.float64).mean(axis=0)

    def mean_of(arg):
        return gs.reduce(arg)["mean"].values[0, 0]

    for name in ("run[1].h5", "r*n.h5", "ru?.h5"):
        for arg in (str(tmp_path / name), tmp_path / name, [str(tmp_path / name)],
                    [tmp_path / name]):
            np.testing.assert_allclose(mean_of(arg), means[name], rtol=1e-12)
            assert gs.reduce(arg).attrs["sources"] == str(tmp_path / name)
        with gs.open_store(str(tmp_path / name)) as s:
            assert s.path == tmp_path / name
    # a pattern naming no existing file is still a glob
    np.testing.assert_allclose(mean_of(str(tmp_path / "run?.h5")), means["run1.h5"], rtol=1e-12)
    with pytest.raises(gs.StoreError, match="matches no file"):
        gs.reduce(str(tmp_path / "nothing[0-9].h5"))
    # a Path is never a glob
    with pytest.raises(gs.StoreError, match=r"run\?\.h5: no such file"):
        gs.reduce(tmp_path / "run?.h5")


# -- 6. memory bombs -----------------------------------------------------------------------

BOMB = r"""
import json, resource, sys, warnings
import gsnr_stats as gs
warnings.simplefilter("ignore")
good, files = sys.argv[1], sys.argv[2:]
gs.reduce(good)  # warm: imports, Numba compilation, thread pool
peak = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmPeak")][0] << 10
limit = peak + (1 << 30)  # the measured need plus 1 GiB: any bomb must fail long before
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps({"peak": peak, "limit": limit}), flush=True)
for p in [good] + files:
    try:
        gs.open_store(p).close()
        ds = gs.reduce(p)
        print(json.dumps({"file": p, "outcome": "read", "steps": ds["step"].values.tolist()}))
    except gs.GSNRError as e:
        print(json.dumps({"file": p, "outcome": "error", "msg": str(e)[:300]}))
    except BaseException as e:
        print(json.dumps({"file": p, "outcome": type(e).__name__, "msg": str(e)[:300]}))
"""


def _bomb_base(path: Path, p: int = 64, compression=None, moments: bool = False) -> Path:
    with gs.GradientWriter(path, [("w", (p,))], chunks=(16, 64), fast_write=False,
                           compression=compression) as w:
        if moments:
            w.write_moments(0, "train", 5, np.zeros(p), np.ones(p))
        else:
            w.write(0, "train", np.ones((20, p)))
    return path


def _claim_rows(f: h5py.File, rows: int, moments: bool = False) -> None:
    names = ("moments/count", "moments/mean", "moments/m2") if moments else (
        "grads", "loss", "sample_id", "label")
    for n in names:
        f[n].resize(rows, axis=0)
    set_row(f, "segments", 0, stop=rows)
    if moments:
        set_row(f, "records", 0, moments_stop=rows)
    else:
        set_row(f, "records", 0, n_samples=rows, grads_stop=rows)


def _huge_layout(f: h5py.File, p: int, chunks: tuple[int, int], rows: int, moments: bool) -> None:
    """Claim ``p`` parameters (a layout of one tensor) with nothing stored for them."""
    lay = Layout.from_params([("w", (p,))])
    f.attrs["layout"], f.attrs["layout_hash"], f.attrs["n_params"] = lay.to_json(), lay.hash, p
    del f["grads"]
    f.create_dataset("grads", (0 if moments else rows, p), maxshape=(None, p), dtype="<f4",
                     chunks=chunks)
    for n in ("moments/mean", "moments/m2"):
        old = f[n].shape[0]
        del f[n]
        f.create_dataset(n, (old, p), maxshape=(None, p), dtype="<f8", chunks=(1, 1 << 17))
    if not moments:
        for n in ("loss", "sample_id", "label"):
            f[n].resize(rows, axis=0)
        set_row(f, "segments", 0, stop=rows)
        set_row(f, "records", 0, n_samples=rows, grads_stop=rows)


def test_memory_bombs(tmp_path, clean_file):
    huge = 10**9
    bombs = []
    for name, comp, mom in (("rows", None, False), ("rowsgz", "gzip", False),
                            ("mrows", None, True)):
        src = _bomb_base(tmp_path / f"{name}_src.h5", compression=comp, moments=mom)
        bombs.append(edit(src, tmp_path / f"{name}.h5", lambda f, m=mom: _claim_rows(f, huge, m)))
    g_src = _bomb_base(tmp_path / "g_src.h5", p=4)
    m_src = _bomb_base(tmp_path / "m_src.h5", p=4, moments=True)
    for name, src, p, chunks, rows, mom in (
        ("P33", g_src, 2**33, (1, 2**26), 1, False),  # one unstored row of 32 GiB
        ("P33m", m_src, 2**33, (16, 2**20), 0, True),  # one unstored moments block
        ("P31z", g_src, 2**31, (1, 2**26), 0, False),  # empty records, O(P) output
        ("P26", g_src, 2**26, (16, 2**20), 1, False),  # small enough for the layout bound
        ("P25m", m_src, 2**25, (16, 2**20), 0, True),
    ):
        bombs.append(edit(src, tmp_path / f"{name}.h5",
                          lambda f, a=(p, chunks, rows, mom): _huge_layout(f, *a)))
    # tables claiming a billion rows: only the stored rows are read
    tables = edit(_bomb_base(tmp_path / "t_src.h5"), tmp_path / "tables.h5", lambda f: [
        f[t][c].resize(huge, axis=0) for t in ("records", "segments", "trajectory")
        for c in f[t]])
    proc = run_py(BOMB, clean_file, *bombs, tables, timeout=120)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, good, res = lines[0], lines[1], {r["file"]: r for r in lines[2:]}
    assert head["limit"] > head["peak"] and good["outcome"] == "read", (head, good)
    for b in bombs:
        r = res[str(b)]
        assert r["outcome"] == "error" and str(b) in r["msg"], r
    assert res[str(tables)]["outcome"] in ("read", "error"), res[str(tables)]
    if res[str(tables)]["outcome"] == "read":
        assert res[str(tables)]["steps"] == [0]


# -- 7. truncation while a reduce runs ---------------------------------------------------------

TRUNCATE_DURING = r"""
import json, os, sys, warnings
import gsnr_stats as gs
from gsnr_stats import kernels
from gsnr_stats.store import views as V
path, mode = sys.argv[1], sys.argv[2]
size = os.path.getsize(path)
calls = {"n": 0}

def after(k):
    calls["n"] += 1
    if calls["n"] == k:
        os.truncate(path, size // 3)

if mode == "before_guard":  # truncated between chunk rows, just before the size check
    guard = V.RecordView._guard
    def hooked(self, offs):
        after(4)
        return guard(self, offs)
    V.RecordView._guard = hooked
else:  # truncated right after the kernel finished a chunk row (mapped or h5py stripes)
    name = "moments_chunks" if mode == "after_kernel" else "moments_block"
    kern = getattr(kernels, name)
    def hooked(*a):
        out = kern(*a)
        after(3)
        return out
    setattr(kernels, name, hooked)
try:
    gs.reduce(path)
    print(json.dumps({"outcome": "read", "calls": calls["n"]}))
except gs.GSNRError as e:
    print(json.dumps({"outcome": type(e).__name__, "msg": str(e), "calls": calls["n"]}))
except BaseException as e:
    print(json.dumps({"outcome": "foreign " + type(e).__name__, "msg": str(e)}))
"""


@pytest.mark.parametrize("mode,compression", [("before_guard", None), ("after_kernel", None),
                                              ("h5py", "gzip")])
def test_truncation_during_reduce(tmp_path, mode, compression):
    path = tmp_path / "big.h5"
    g = np.random.default_rng(3).normal(size=(1280, 256)).astype(np.float32)
    # 64 KiB chunks: page aligned, so the uncompressed store is read through the mapping
    with gs.GradientWriter(path, [("w", (256,))], chunks=(64, 256), compression=compression) as w:
        w.write(0, "train", g)
    with gs.open_store(path) as s:  # validated before the truncation
        assert s.grads_rows == 1280
    proc = run_py(TRUNCATE_DURING, path, mode, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]  # in particular no SIGBUS
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["outcome"] in ("StoreError", "SchemaError"), out
    assert str(path) in out["msg"] and out["calls"] >= 3, out
    if mode != "h5py":
        assert "shrank" in out["msg"], out


# -- 8. a reader polling a live writer ----------------------------------------------------------

LIVE_WRITER = r"""
import sys, time, numpy as np
from gsnr_stats.store import GradientWriter
with GradientWriter(sys.argv[1], [("a", (8, 12)), ("b", (12,))], chunks=(16, 64)) as w:
    step = 0
    while True:
        g = np.random.default_rng(step).normal(size=(40, 108))
        for lo in range(0, 40, 15):
            w.write(step, "train", g[lo:lo + 15], loss=np.full(len(g[lo:lo + 15]), step))
            w.flush()
            time.sleep(0.02)
        if step % 4 == 3:
            w.write_moments(step, "test", 3, np.full(108, step), np.full(108, 1.0))
            w.flush()
        w.end_record(step, "train")
        if step % 4 == 3:
            w.end_record(step, "test")
        w.write_trajectory(step, 0.1, 1.0 / (step + 1), 2.0)
        w.flush()
        print(f"done {step}", flush=True)
        step += 1
        time.sleep(0.03)
"""


def _check_snapshot(path: Path, reduce: bool = True) -> tuple[int, dict]:
    """Open/read/reduce a live file: completed records bit for bit, only our warning."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        with gs.open_store(path) as s:
            keys = [(r.step, r.split) for r in s.records]
            for st, sp in keys:
                if sp == "train":
                    np.testing.assert_array_equal(s.read_grads(st, "train"),
                                                  grads_of(st).astype(np.float32))
                    assert (s.read_loss(st, "train") == st).all()
                else:
                    c, m, q = s.read_moments(st, sp)
                    assert c.tolist() == [3.0] and (m == st).all() and (q == 1.0).all()
            traj = s.trajectory()
        stats = gs.reduce(path) if keys and reduce else None
    for w in ws:
        assert issubclass(w.category, gs.IncompleteRecordWarning), w
    snap = {}
    if stats is not None:
        for i, st in enumerate(stats["step"].values):
            for j, sp in enumerate(stats["split"].values):
                if stats["count"].values[i, j]:
                    snap[(int(st), str(sp))] = (stats["mean"].values[i, j].copy(),
                                                stats["var"].values[i, j].copy())
        assert set(keys) <= set(snap)  # reduce opened the file again, later
    assert set(traj["step"].tolist()) <= {k[0] for k in keys} | {max((k[0] for k in keys),
                                                                    default=-1) + 1}
    return len(keys), snap


def test_reader_polls_live_writer(tmp_path):
    path = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(path)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snaps: list[dict] = []
    done = []
    try:
        # poll from the first completed record on (the writer's start includes compiling)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("done "), (line, proc.poll())
        done.append(int(line.split()[1]))
        # at least 2 s and 6 polls (a loaded machine, e.g. under pytest-xdist, makes each
        # poll slower); the 60 s bound only turns a hang into a failure
        t0 = time.monotonic()
        polls = 0
        while (time.monotonic() < t0 + 2.0 or polls < 6) and time.monotonic() < t0 + 60:
            assert proc.poll() is None, proc.stderr.read()
            n, snap = _check_snapshot(path, reduce=polls % 3 == 0)  # open often, reduce too
            snaps.append(snap)
            polls += 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=30)
    done += [int(x.split()[1]) for x in out.splitlines() if x.startswith("done ")]
    assert polls >= 6 and len(done) >= 3, (polls, done)
    n_final, final = _check_snapshot(path)
    assert {(s, "train") for s in done} <= set(final)
    # every record seen while the writer ran has the numbers of the final file, bit for bit
    for snap in snaps:
        for key, (m, v) in snap.items():
            np.testing.assert_array_equal(m, final[key][0])
            np.testing.assert_array_equal(v, final[key][1])
    assert max(len(s) for s in snaps) >= 3


# -- 9. metadata damaged after open ------------------------------------------------------------

AFTER_OPEN = r"""
import faulthandler, json, sys, warnings
import numpy as np
import gsnr_stats as gs
from gsnr_stats.reduce import record_partial
path, pristine, spec = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
data = open(pristine, "rb").read()

def reads(s):
    out = []
    for r in s.records:
        if r.kind == "gradients":
            out += [s.read_grads(r.step, r.split), s.read_loss(r.step, r.split),
                    s.read_sample_id(r.step, r.split), s.read_label(r.step, r.split)]
        else:
            out += list(s.read_moments(r.step, r.split))
        p = record_partial(s, r.step, r.split)
        out += [p.mean, p.m2, p.count]
    out += list(s.trajectory().values())
    return out

with gs.open_store(path) as s:
    ref = reads(s)
for trial, runs in enumerate(spec):
    faulthandler.dump_traceback_later(20, exit=True)
    with open(path, "r+b") as fh:
        fh.write(data)
    res = {"trial": trial}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = gs.open_store(path)
            with open(path, "r+b") as fh:  # damage after the store was validated
                for off, nbytes, val in runs:
                    fh.seek(off)
                    fh.write(bytes([val]) * nbytes)
            try:
                got = reads(s)
            finally:
                s.close()
        same = len(got) == len(ref) and all(
            a.shape == b.shape and np.array_equal(a, b, equal_nan=True) for a, b in zip(got, ref))
        res["outcome"] = "same" if same else "DIFF"
    except gs.GSNRError as e:
        res.update(outcome="error", type=type(e).__name__, msg=str(e)[:300])
    except BaseException as e:
        res.update(outcome="foreign", type=type(e).__name__, msg=str(e)[:300])
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(res), flush=True)
"""


def test_metadata_damaged_after_open(clean_file, tmp_path):
    work = tmp_path / "after.h5"
    shutil.copy(clean_file, work)
    meta = metadata_offsets(clean_file)
    meta = meta[meta >= 64]  # keep the superblock: the store is open already
    # contiguous runs of metadata bytes: object headers, chunk indexes, heaps
    cut = np.flatnonzero(np.diff(meta) > 1) + 1
    runs = [(int(r[0]), int(r[-1] - r[0] + 1)) for r in np.split(meta, cut)]
    rng = np.random.default_rng(11)
    spec = [[(int(meta[i]), int(rng.integers(1, 64)), int(rng.integers(0, 256)))]
            for i in rng.integers(0, meta.size, size=50)]  # one small run of garbage
    for frac in (0.1, 0.25, 0.5, 1.0):  # a share of all metadata runs overwritten
        for _ in range(5 if frac < 1 else 2):
            pick = rng.random(len(runs)) < frac
            spec.append([(a, n, int(rng.integers(0, 256)))
                         for (a, n), p in zip(runs, pick, strict=True) if p])
    job = tmp_path / "after.json"
    job.write_text(json.dumps(spec))
    proc = run_py(AFTER_OPEN, work, clean_file, job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(res) == len(spec)
    bad = [r for r in res if r["outcome"] in ("foreign", "DIFF")
           or (r["outcome"] == "error" and str(work) not in r["msg"])]
    assert not bad, bad[:10]
    assert any(r["outcome"] == "error" for r in res), "no damage was ever noticed"

