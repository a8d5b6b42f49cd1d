"""Dask backend: equality with the in-process reduce, a killed worker, bad shards, CLI, SLURM recipe.

One ``LocalCluster`` of two single-threaded worker processes serves the module; every result
is checked against the in-process ``gs.reduce`` (≤ 1e-12 relative) and against a float64
two-pass numpy reference on the concatenated samples of all shards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import two_pass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gsnr_stats as gs
from gsnr_stats.cli import main as cli_main

distributed = pytest.importorskip("distributed")

from gsnr_stats.distributed import (  # noqa: E402
    SCHEDULER_TIMEOUT_ENV,
    check_scheduler,
    column_blocks,
    local_client,
    reduce_distributed,
    scheduler_timeout,
)
from gsnr_stats.reduce import SkippedShardWarning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
PARAMS = [("w", (3, 5)), ("b", (4,))]  # P = 19


@pytest.fixture(scope="module")
def client():
    c = local_client(2)
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


def assert_same(got: xr.Dataset, ref: xr.Dataset, rtol: float = 1e-12) -> None:
    """Every variable equal to rounding; integer ones exactly; same coordinates and attrs."""
    assert set(got.data_vars) == set(ref.data_vars)
    assert got.sizes == ref.sizes
    for c in ("step", "split", "param", "tensor", "layer"):
        assert (got[c].values == ref[c].values).all(), c
    for v in ref.data_vars:
        a, b = got[v].values, ref[v].values
        if b.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0, equal_nan=True, err_msg=v)
        else:
            np.testing.assert_array_equal(a, b, err_msg=v)
    assert got.attrs == ref.attrs


def write_shards(tmp, rng, n_shards, chunk_rows, chunk_cols, records, moments_shard=-1,
                 nan_frac=0.0):
    """Shards of one run; returns the files and the concatenated samples per record."""
    files, data = [], {}
    for i in range(n_shards):
        p = tmp / f"shard-{i}.h5"
        cols = chunk_cols[i % len(chunk_cols)]
        with gs.GradientWriter(p, PARAMS, chunks=(chunk_rows, cols), run_id="run",
                               overwrite=True) as w:
            for step, split, n in records:
                n = n + i  # shards hold different numbers of samples
                g = rng.normal(3.0 + step, 1.0 + i, size=(n, 19)).astype(np.float32)
                if nan_frac:
                    g[rng.random(g.shape) < nan_frac] = np.nan
                if i == moments_shard and not nan_frac:
                    x = g.astype(np.float64)
                    for a, b in ((0, n // 2), (n // 2, n)):  # two stored blocks
                        m = x[a:b].mean(axis=0)
                        w.write_moments(step, split, b - a, m, ((x[a:b] - m) ** 2).sum(axis=0),
                                        lr=0.1)
                else:
                    w.write(step, split, g, loss=rng.random(n), lr=0.1, epoch=step)
                data.setdefault((step, split), []).append(g)
        files.append(p)
    return files, {k: np.concatenate(v) for k, v in data.items()}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_shards=st.integers(1, 4),
    chunk_rows=st.integers(3, 17),
    chunk_cols=st.lists(st.sampled_from([2, 3, 4, 8, 19]), min_size=1, max_size=3),
    n_rec=st.integers(1, 2),
    blocks=st.sampled_from([None, 3]),
    omit=st.booleans(),
    moments=st.booleans(),
    columns=st.sampled_from([1, 4, 8, 19]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_in_process(client, tmp_path_factory, n_shards, chunk_rows, chunk_cols, n_rec,
                            blocks, omit, moments, columns, seed):
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("prop")
    recs = [(s, sp, 6 + 5 * s) for s in range(n_rec) for sp in ("train", "test")][: 2 * n_rec - 1]
    files, data = write_shards(tmp, rng, n_shards, chunk_rows, chunk_cols, recs,
                               moments_shard=0 if moments else -1, nan_frac=0.05 if omit else 0.0)
    nonfinite = "omit" if omit else "raise"
    ref = gs.reduce(files, blocks=blocks, nonfinite=nonfinite)
    got = reduce_distributed(files, blocks=blocks, nonfinite=nonfinite, scheduler=client,
                             columns=columns)
    assert_same(got, ref)
    # independent route: float64 two-pass on all samples of all shards
    for (step, split), g in data.items():
        sel = got.sel(step=step, split=split)
        if omit:
            x = g.astype(np.float64)
            m = np.nanmean(x, axis=0)
            v = np.nansum((x - m) ** 2, axis=0) / (np.sum(np.isfinite(x), axis=0) - 1)
            np.testing.assert_array_equal(sel["n_omitted"].values, np.isnan(g).sum(axis=0))
        else:
            m, v = two_pass(g)
        np.testing.assert_allclose(sel["mean"].values, m, rtol=1e-10)
        np.testing.assert_allclose(sel["var"].values, v, rtol=1e-10)
        assert int(sel["count"]) == len(g)
        if blocks:
            assert sel["block_count"].values.sum() == len(g) or omit


def test_column_blocks_align_to_every_chunk_width():
    assert column_blocks(19, [2, 3], 1) == [(0, 6), (6, 12), (12, 18), (18, 19)]
    assert column_blocks(19, [4], 9) == [(0, 12), (12, 19)]
    assert column_blocks(19, [19], None) == [(0, 19)]
    with pytest.raises(ValueError, match="columns"):
        column_blocks(19, [2], 0)


def test_killed_worker_mid_reduce(client, tmp_path):
    """SIGKILL one worker process while it runs a task: Dask reruns it, the result is unchanged."""
    rng = np.random.default_rng(7)
    files, data = write_shards(tmp_path, rng, 4, 8, [4], [(0, "train", 40), (1, "train", 30)])
    ref = gs.reduce(files)
    pids = client.run(os.getpid)
    victim_addr, victim_pid = sorted(pids.items())[0]
    out: dict[str, object] = {}

    def run() -> None:
        try:
            # 0.3 s per task (test-only hook) so that tasks are still running when we kill
            out["ds"] = reduce_distributed(files, scheduler=client, columns=8, _task_delay=0.3)
        except BaseException as e:  # noqa: BLE001 - reported below
            out["err"] = e

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 30
    killed = False
    while time.monotonic() < deadline and not killed:
        busy = client.processing().get(victim_addr, [])
        if any("-partial-" in str(k) for k in busy):
            time.sleep(0.1)  # inside the task's sleep: mid-task
            os.kill(victim_pid, signal.SIGKILL)
            killed = True
        else:
            time.sleep(0.02)
    th.join(60)
    assert killed, "no task ever ran on the victim worker"
    assert "err" not in out, out.get("err")
    assert_same(out["ds"], ref)
    for (step, split), g in data.items():
        np.testing.assert_allclose(out["ds"]["var"].sel(step=step, split=split).values,
                                   two_pass(g)[1], rtol=1e-10)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
    assert victim_pid not in client.run(os.getpid).values()


@pytest.fixture
def shards_with_bad(tmp_path):
    rng = np.random.default_rng(3)
    files, _ = write_shards(tmp_path, rng, 2, 8, [4], [(0, "train", 20)])
    text = tmp_path / "shard-junk.h5"
    text.write_text("not a store\n" * 50)
    trunc = tmp_path / "shard-trunc.h5"
    raw = files[0].read_bytes()
    trunc.write_bytes(raw[: int(len(raw) * 0.6)])
    good_only = gs.reduce(files)
    g = np.concatenate([gs.open_store(f).read_grads(0, "train") for f in files])
    return files, [text, trunc], good_only, g


@pytest.mark.parametrize("mode", ["in-process", "dask"])
def test_bad_shard_fails_or_is_skipped(client, shards_with_bad, mode):
    files, bad, good_only, g = shards_with_bad
    sched = client if mode == "dask" else None
    for b in bad:
        with pytest.raises(gs.StoreError, match=b.name):
            gs.reduce([files[0], b, files[1]], scheduler=sched)
    with pytest.warns(SkippedShardWarning) as rec:
        got = gs.reduce([files[0], *bad, files[1]], scheduler=sched, skip_bad=True)
    msgs = " ".join(str(w.message) for w in rec if w.category is SkippedShardWarning)
    assert bad[0].name in msgs and bad[1].name in msgs
    assert_same(got, good_only)
    np.testing.assert_allclose(got["mean"].values[0, 0], two_pass(g)[0], rtol=1e-12)
    with pytest.raises(gs.StoreError, match="no valid shard"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedShardWarning)
        gs.reduce(bad, scheduler=sched, skip_bad=True)


def test_layout_mismatch_and_nonfinite_name_files(client, tmp_path):
    rng = np.random.default_rng(5)
    a = tmp_path / "a.h5"
    b = tmp_path / "b.h5"
    with gs.GradientWriter(a, PARAMS) as w:
        g = rng.normal(size=(5, 19)).astype(np.float32)
        g[2, 7] = np.inf
        w.write(0, "train", g)
    with gs.GradientWriter(b, [("v", (19,))]) as w:
        w.write(0, "train", rng.normal(size=(5, 19)).astype(np.float32))
    with pytest.raises(gs.LayoutMismatchError, match="a.h5.*b.h5"):
        gs.reduce([a, b], scheduler=client, skip_bad=True)
    with pytest.raises(gs.NonFiniteError, match=r"a.h5.*w\[1, 2\]"):
        gs.reduce(a, scheduler=client)
    with pytest.raises(ValueError, match="scheduler must be"):
        gs.reduce(a, scheduler=42)
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(gs.GSNRError, match="cannot connect to the Dask scheduler"):
        gs.reduce(a, scheduler="tcp://127.0.0.1:9")


def test_cli_workers_and_scheduler(client, tmp_path, capsys):
    rng = np.random.default_rng(11)
    files, data = write_shards(tmp_path, rng, 3, 5, [4, 8], [(0, "train", 12), (2, "test", 9)])
    ref = gs.reduce(files, blocks=2)
    pattern = str(tmp_path / "shard-*.h5")
    out1, out2 = tmp_path / "w.nc", tmp_path / "s.nc"
    assert cli_main(["reduce", pattern, "--workers", "2", "--blocks", "2", "-q", "-o", str(out1)]) == 0
    assert cli_main(["reduce", pattern, "--scheduler", client.scheduler.address, "--blocks", "2",
                     "-q", "-o", str(out2)]) == 0
    for out in (out1, out2):
        assert_same(xr.load_dataset(out), ref)
    np.testing.assert_allclose(xr.load_dataset(out1)["var"].sel(step=2, split="test").values,
                               two_pass(data[(2, "test")])[1], rtol=1e-10)
    assert cli_main(["reduce", pattern, "--workers", "2", "--scheduler", "tcp://x:1", "-o",
                     str(out1)]) == 2  # a usage error (issue 13)
    assert "either --workers" in capsys.readouterr().err
    # info over a glob with a bad shard: reported by name, merged summary, exit status 1
    (tmp_path / "shard-bad.h5").write_text("junk")
    capsys.readouterr()
    assert cli_main(["info", pattern]) == 1
    text = capsys.readouterr().out
    assert "shard-bad.h5  BAD SHARD" in text and "4 shards: 3 valid, 1 bad" in text
    assert f"n={sum(9 + i for i in range(3))}" in text


def test_processes_scheduler(tmp_path, monkeypatch):
    """scheduler="processes": a temporary local cluster of os.cpu_count() workers (1 here, to
    keep the test fast), closed afterwards."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    rng = np.random.default_rng(2)
    files, data = write_shards(tmp_path, rng, 2, 4, [3], [(0, "train", 10)])
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    got = gs.reduce(files, scheduler="processes")
    assert_same(got, gs.reduce(files))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the temporary cluster's processes are gone
        left = {p.pid for p in psutil.Process().children(recursive=True)} - before
        if not left:
            break
        time.sleep(0.1)
    assert not left
    np.testing.assert_allclose(got["mean"].values[0, 0], two_pass(data[(0, "train")])[0],
                               rtol=1e-12)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SLURM / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue")
    rs = _load("reduce_slurm")
    cfg = {**rs.DEFAULT_CONFIG, "kind": "slurm", "jobs": 3, "cores": 8, "memory": "32GB",
           "walltime": "00:45:00", "account": "proj42", "queue": "compute",
           "python": "/opt/gsnr/bin/python", "prologue": ["module load hdf5"],
           "dashboard_address": ":0", "interface": "no-such-if0"}
    # an interface this host lacks is the workers' (compute nodes'); the scheduler here
    # listens on Dask's default address instead of failing (issue 13)
    with pytest.warns(UserWarning, match="'no-such-if0' is not on this host"):
        cluster = rs.make_cluster(cfg)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for want in ("#SBATCH -A proj42", "#SBATCH -p compute", "#SBATCH -t 00:45:00",
                 "#SBATCH --cpus-per-task=8", "module load hdf5", "export NUMBA_NUM_THREADS=1",
                 "/opt/gsnr/bin/python -m distributed.cli.dask_worker", "--nworkers 8",
                 "--nthreads 1", "--interface no-such-if0"):
        assert want in script, (want, script)
    with pytest.raises(ValueError, match="scheduler_interface 'no-such-if0' is not an interface"):
        rs.make_cluster({**cfg, "scheduler_interface": "no-such-if0"})


def test_sbatch_script_syntax():
    sb = SLURM / "dump_array.sbatch"
    bash = shutil.which("bash")
    assert bash is not None
    r = subprocess.run([bash, "-n", str(sb)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = sb.read_text()
    assert "#SBATCH --array=" in text and "dump_shard.py" in text and "SLURM_ARRAY_TASK_ID" in text


def test_slurm_recipe_locally(tmp_path, monkeypatch):
    """The array's shards (task id from SLURM_ARRAY_TASK_ID) reduced through the recipe's
    config path with a LocalCluster equal one unsharded dump of the same training run."""
    ds_mod = _load("dump_shard")
    for task in range(3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("TASKS", "3")  # the run's task count, as dump_array.sbatch sets it
        # what SLURM says in a retry of one task (--array=2): not the run's count, ignored
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
        ds_mod.main(["--out", str(tmp_path / "shards"), "--epochs", "1", "--every", "1"])
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("TASKS")
    ds_mod.main(["--out", str(tmp_path / "whole"), "--epochs", "1", "--every", "1", "--tasks", "1",
                 "--task", "0"])
    shards = sorted((tmp_path / "shards").glob("*.h5"))
    assert len(shards) == 3
    cfg = tmp_path / "local.json"
    cfg.write_text(json.dumps({"kind": "local", "workers": 1, "dashboard_address": ":0"}))
    rs = _load("reduce_slurm")
    out = tmp_path / "stats.nc"
    assert rs.main([str(tmp_path / "shards" / "*.h5"), "--config", str(cfg), "-o", str(out)]) == 0
    got = xr.load_dataset(out)
    whole = gs.reduce(sorted((tmp_path / "whole").glob("*.h5")))
    assert got.sizes == whole.sizes and int(got["count"].sum()) == int(whole["count"].sum())
    for v in ("mean", "var", "gsnr", "loss_mean"):
        np.testing.assert_allclose(got[v].values, whole[v].values, rtol=1e-9, equal_nan=True,
                                   err_msg=v)
    assert_same(got, gs.reduce(shards))


# --- scheduler addresses that are not (or not yet) Dask schedulers --------------------------

HANG_GUARD = 120.0  # s: only so that a regression fails instead of hanging the suite


def bounded(fn):
    """``fn()`` in a thread; fail (instead of hanging the suite) if it never returns."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised below
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(HANG_GUARD)
    assert not th.is_alive(), f"no answer after {HANG_GUARD} s: connecting is not bounded"
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.fixture
def not_dask():
    """``start(mode)`` -> address of a local TCP server that accepts connections and then
    stays silent (``"silent"``, like an HTTP dashboard waiting for a request), answers with
    foreign bytes (``"garbage"``) or hangs up (``"close"``)."""
    stop = threading.Event()
    servers, held, threads = [], [], []

    def start(mode):
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(0.1)
        servers.append(srv)

        def serve():
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except (TimeoutError, OSError):
                    continue
                if mode == "close":
                    conn.close()
                    continue
                held.append(conn)
                if mode == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
                                 b"\x00\x01\x02\xff" * 8)

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        threads.append(th)
        return f"tcp://127.0.0.1:{srv.getsockname()[1]}"

    yield start
    stop.set()
    for th in threads:
        th.join(5)
    for sock in servers + held:
        sock.close()


@pytest.fixture
def one_shard(tmp_path):
    files, _ = write_shards(tmp_path, np.random.default_rng(0), 1, 4, [8], [(0, "train", 6)])
    return files[0]


@pytest.mark.parametrize("mode", ["silent", "garbage", "close"])
def test_port_that_is_not_a_scheduler_fails_not_hangs(one_shard, not_dask, monkeypatch, mode):
    """A port that accepts TCP but does not speak Dask as a scheduler: GSNRError naming the
    address, after at most the timeout (GSNR_SCHEDULER_TIMEOUT for gs.reduce, the keyword for
    reduce_distributed), never a hang (dask/distributed#8071)."""
    addr = not_dask(mode)
    monkeypatch.setenv(SCHEDULER_TIMEOUT_ENV, "2")
    with pytest.raises(gs.GSNRError) as info:
        bounded(lambda: gs.reduce(one_shard, scheduler=addr))
    msg = str(info.value)
    assert addr in msg and "not answering as a Dask scheduler" in msg, msg
    if mode == "silent":
        assert "within 2 s" in msg, msg
        monkeypatch.delenv(SCHEDULER_TIMEOUT_ENV)
        with pytest.raises(gs.GSNRError, match="not answering as a Dask scheduler"):
            bounded(lambda: reduce_distributed([one_shard], scheduler=addr, connect_timeout=1))
        # without a scheme, tcp:// is assumed (as dask does)
        with pytest.raises(gs.GSNRError, match="not answering as a Dask scheduler"):
            bounded(lambda: check_scheduler(addr.removeprefix("tcp://"), timeout="1s"))


def test_cli_scheduler_that_is_not_dask_is_a_one_line_error(one_shard, not_dask, tmp_path,
                                                              capsys, monkeypatch):
    monkeypatch.setenv(SCHEDULER_TIMEOUT_ENV, "2")
    out = tmp_path / "out.nc"
    for sched, want in ((not_dask("silent"), "not answering as a Dask scheduler"),
                        (not_dask("garbage"), "not answering as a Dask scheduler"),
                        ("nonsense", "bad scheduler address 'nonsense'")):
        capsys.readouterr()
        rc = bounded(lambda s=sched: cli_main(["reduce", str(one_shard), "--scheduler", s,
                                               "-q", "-o", str(out)]))
        assert rc == (2 if sched == "nonsense" else 1)  # a bad address is a usage error
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("gsnr-stats reduce: error: ") and want in lines[0], err
        assert sched in lines[0], err
        assert not out.exists()


def test_scheduler_address_and_timeout_checks(client, one_shard, monkeypatch):
    # unparseable addresses fail at once, naming the address
    for bad, why in (("nonsense", "missing port"), ("tcp://127.0.0.1", "missing port"),
                     ("tcp://127.0.0.1:notaport", "invalid literal"),
                     ("tcp://127.0.0.1:99999", "port 99999 is out of range"),
                     ("foo://x:1", "unknown address")):
        with pytest.raises(gs.GSNRError, match=f"bad scheduler address '{bad}': {why}"):
            bounded(lambda b=bad: gs.reduce(one_shard, scheduler=b))
    # a Dask worker answers the protocol but is not the scheduler
    worker = next(iter(client.scheduler_info()["workers"]))
    with pytest.raises(gs.GSNRError, match=f"{worker} answers the Dask protocol but is a Dask "
                                           "Worker"):
        bounded(lambda: check_scheduler(worker, timeout=10))
    # the real scheduler passes, with or without its scheme, and reduces
    addr = client.scheduler.address
    assert bounded(lambda: check_scheduler(addr, timeout=10)) == addr
    assert bounded(lambda: check_scheduler(addr.removeprefix("tcp://"), timeout=10)) == addr
    got = bounded(lambda: reduce_distributed([one_shard], scheduler=addr, connect_timeout=10))
    assert_same(got, gs.reduce(one_shard))
    # timeout: keyword, then GSNR_SCHEDULER_TIMEOUT, then dask's comm.timeouts.connect
    import dask

    monkeypatch.delenv(SCHEDULER_TIMEOUT_ENV, raising=False)
    with dask.config.set({"distributed.comm.timeouts.connect": "7s"}):
        assert scheduler_timeout() == 7.0
        monkeypatch.setenv(SCHEDULER_TIMEOUT_ENV, "2.5")
        assert scheduler_timeout() == 2.5
        assert scheduler_timeout(4) == 4.0 and scheduler_timeout("1 minute") == 60.0
    for env in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(SCHEDULER_TIMEOUT_ENV, env)
        with pytest.raises(gs.GSNRError, match=f"{SCHEDULER_TIMEOUT_ENV} must be a positive"):
            scheduler_timeout()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_workers_view_applies_the_shard_set_rules(client, tmp_path, monkeypatch):
    """A copy of a shard, the same shard twice, or shards of two runs are refused with
    ShardSetError also when only the workers can open the files (the client's pre-check in
    gs.reduce sees nothing: its open_store is made to fail, the workers' is not); before,
    the copy silently doubled the count."""
    rng = np.random.default_rng(8)
    files, data = write_shards(tmp_path, rng, 2, 4, [3], [(0, "train", 10)])
    copy = tmp_path / "copy-of-shard-0.h5"
    shutil.copy(files[0], copy)
    other = tmp_path / "other-run.h5"
    g_other = rng.normal(size=(7, 19)).astype(np.float32)
    with gs.GradientWriter(other, PARAMS, run_id="other") as w:
        w.write(0, "train", g_other, loss=rng.random(7))
    reduce_mod = sys.modules["gsnr_stats.reduce"]

    def client_cannot_open(p, *a, **k):
        raise gs.StoreError(f"{p}: not mounted on the client (test)")

    monkeypatch.setattr(reduce_mod, "open_store", client_cannot_open)
    with pytest.raises(gs.ShardSetError, match=r"copy-of-shard-0.h5 holds the same records as "
                                                r".*shard-0.h5"):
        gs.reduce([files[0], files[1], copy], scheduler=client)
    with pytest.raises(gs.ShardSetError, match=r"shard-0.h5 is .*shard-0.h5 again \(listed twice"):
        reduce_distributed([files[0], files[0]], scheduler=client)  # no client-side stat either
    with pytest.raises(gs.ShardSetError, match=r"2 different runs.*allow_mixed_runs=True"):
        gs.reduce([files[0], other], scheduler=client)
    got = gs.reduce([files[0], other], scheduler=client, allow_mixed_runs=True)
    monkeypatch.undo()
    pooled = np.concatenate([gs.open_store(files[0]).read_grads(0, "train"), g_other])
    assert int(got["count"].max()) == len(pooled) == 10 + 7
    np.testing.assert_allclose(got["mean"].values[0, 0], two_pass(pooled)[0], rtol=1e-10)
    np.testing.assert_allclose(got["var"].values[0, 0], two_pass(pooled)[1], rtol=1e-10)
