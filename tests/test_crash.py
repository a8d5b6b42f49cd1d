"""A writer killed with SIGKILL at random moments never loses a completed record."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

import gsnr_stats as gs
from gsnr_stats.cli import main as cli_main

CHILD = r"""
import sys, numpy as np
from gsnr_stats.store import GradientWriter
from gsnr_stats.store.schema import data_checksum
path = sys.argv[1]
data_checksum(np.zeros((1, 1), np.float32))  # load the checksum kernel (~0.5 s, once)
with GradientWriter(path, [("a", (40, 30)), ("b", (30,))], chunks=(16, 256)) as w:
    print("ready", flush=True)  # after start-up: the kills land while records are written
    step = 0
    while True:
        g = np.random.default_rng(step).normal(size=(7 * (step % 5 + 1), 1230))
        for lo in range(0, len(g), 5):  # several batches per record
            w.write(step, "train", g[lo:lo + 5], loss=np.full(len(g[lo:lo + 5]), step))
            w.flush()
        w.end_record(step, "train")
        print(f"done {step}", flush=True)  # one write: a kill cannot split it
        step += 1
"""


def expected(step: int) -> np.ndarray:
    return np.random.default_rng(step).normal(size=(7 * (step % 5 + 1), 1230)).astype(np.float32)


def test_sigkill_at_random_points(tmp_path, capsys):
    rnd = random.Random(7)
    reps = 10  # tests/test_faults.py randkill strikes 30 more times, forked (cheaper)
    seen_incomplete = 0
    for rep in range(reps):
        path = tmp_path / f"k{rep}.h5"
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        # only whole "done N" lines (with PYTHONUNBUFFERED each write is a syscall)
        done = [int(m[1]) for m in re.finditer(r"^done (\d+)$", out, re.M)]
        if not path.exists():
            assert not done, "a record was reported complete but the file never appeared"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store = gs.open_store(path)
        with store:
            steps = [r.step for r in store.records]
            # every record reported done before the kill is there, bit for bit
            assert set(done) <= set(steps)
            for s in steps:
                np.testing.assert_array_equal(store.read_grads(s, "train"), expected(s))
                assert (store.read_loss(s, "train") == s).all()
            seen_incomplete += len(store.incomplete)
        if steps:
            stats = gs.reduce(path)
            assert list(stats["step"].values) == steps
        # `info` lists the incomplete records and exits cleanly
        assert cli_main(["info", str(path)]) == 0
        info = capsys.readouterr().out
        if store.incomplete:
            assert "INCOMPLETE" in info
    # killing mid-record must have happened at least once over the repetitions
    assert seen_incomplete >= 1
