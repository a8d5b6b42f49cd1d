"""Fault-campaign harness for tests/test_faults.py (run as a script, never imported by pytest).

It imports the writer once, then forks one child per trial, so that hundreds of trials cost
one interpreter start. Each child runs :func:`work` (a small writer covering every write
path: several batches per record, whole chunk rows written with ``pwritev``, a moments
record, a ``record()`` block, trajectory rows) and reports ``done STEP`` on a pipe after each
completed record. The parent prints one JSON line per trial: the file, the steps reported
done and how the child ended. tests/test_faults.py then checks every file.

Modes (``argv[1]``):

``hookkill K0 K1``
    child ``k`` SIGKILLs itself at the k-th write step (``gsnr_stats.store._faults`` hook).
``hookint K0 K1``
    child ``k`` sends itself SIGINT at the k-th write step (a Ctrl-C landing there).
``hookraise K0 K1``
    the k-th write step raises ``RuntimeError`` (a failing disk, a bug below us).
``syscall N J0 J1``
    under ``strace -f -e inject=pwrite64:signal=KILL:when=N``: child ``j`` first makes
    ``N - j`` throw-away ``pwrite64`` calls, so that the writer's own j-th ``pwrite64`` is
    the N-th and the kernel kills the child at that system call (strace counts per process).
``randkill SEED COUNT`` / ``randint SEED COUNT``
    SIGKILL / SIGINT sent by the parent at a random moment.
``fhookkill K0 K1 [STEP]`` / ``fhookraise K0 K1 [STEP]``
    as ``hookkill`` / ``hookraise``, striking a factored writer (:func:`work_factored`,
    format 4: factor datasets written beside the plain columns in every write).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import numpy as np

import gsnr_stats  # noqa: F401 - the writer imports the package lazily; pay it once, before forking
from gsnr_stats.store import FactorSpec, GradientWriter, _faults
from gsnr_stats.store.schema import data_checksum

# load the writer's (serial) checksum kernel once here, not in every forked child
data_checksum(np.zeros((2, 3), np.float32))

LAYOUT = [("a", (40, 30)), ("b", (30,))]
P = 1230
CHUNKS = (16, 256)


def grads(step: int) -> np.ndarray:
    """Rows of gradient record ``step`` (float64; the store keeps them as float32)."""
    return np.random.default_rng(step).normal(size=(11 + 9 * (step % 3), P))


def moments(step: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Blocks ``(count, mean, m2)`` of moments record ``step``."""
    r = np.random.default_rng(1000 + step)
    return [(float(c), r.normal(size=P), r.uniform(0, 5, size=P)) for c in (5, 8)]


def kind(step: int) -> str:
    return "moments" if step % 3 == 2 else "grads"


def work(path: str, rep: int, records: int = 3) -> None:
    with GradientWriter(path, LAYOUT, chunks=CHUNKS) as w:
        for step in range(records):
            if kind(step) == "moments":
                for c, m, m2 in moments(step):
                    w.write_moments(step, "train", c, m, m2, lr=0.1)
                w.end_record(step, "train")
            elif step % 2:
                g = grads(step)
                with w.record(step, "train", lr=0.1, epoch=step) as r:
                    for lo in range(0, len(g), 17):  # 17 rows: crosses 16-row chunk rows
                        hi = min(lo + 17, len(g))
                        r.write(g[lo:hi], loss=np.full(hi - lo, step),
                                label=np.arange(lo, hi) % 3, sample_id=np.arange(lo, hi) + 7)
            else:
                g = grads(step)
                for lo in range(0, len(g), 5):
                    hi = min(lo + 5, len(g))
                    w.write(step, "train", g[lo:hi], loss=np.full(hi - lo, step), lr=0.1)
                    w.flush()
                w.end_record(step, "train")
            os.write(rep, f"done {step}\n".encode())  # one write: a kill cannot split it
            if step % 3 == 0:
                w.write_trajectory(step, 0.1, 1.0 / (step + 1), 2.0 / (step + 1))


FLAYOUT = [("fc.weight", (6, 5)), ("fc.bias", (6,)), ("norm", (3,)), ("seq.weight", (4, 6))]
FFACTORS = [("fc.weight", "fc.bias"), FactorSpec("seq.weight", rows=3)]


def factored(step: int) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Plain columns (norm) and float32 factors of factored record ``step``."""
    r = np.random.default_rng(2000 + step)
    n = 6 + 2 * step  # 6, 8 rows: 4 writes of <= 4 rows in all (few fault steps)
    f32 = np.float32
    return r.normal(size=(n, 3)).astype(f32), {
        "fc.weight": (r.normal(size=(n, 5)).astype(f32), r.normal(size=(n, 6)).astype(f32)),
        "seq.weight": (r.normal(size=(n, 2, 6)).astype(f32), r.normal(size=(n, 2, 4)).astype(f32)),
    }


def work_factored(path: str, rep: int, records: int = 2) -> None:
    """A factored writer: ``records`` records of 4-row writes, each completed by end_record."""
    with GradientWriter(path, FLAYOUT, factors=FFACTORS, chunks=(4, 3)) as w:
        for step in range(records):
            g, fac = factored(step)
            for lo in range(0, len(g), 4):
                sl = slice(lo, lo + 4)
                w.write(step, "train", g[sl], factors={k: (a[sl], d[sl]) for k, (a, d) in fac.items()},
                        loss=np.full(len(g[sl]), step), lr=0.1)
            w.end_record(step, "train")
            os.write(rep, f"done {step}\n".encode())


def _hook_at(k: int, action) -> None:
    n = [0]

    def hook(label: str) -> None:
        n[0] += 1
        if n[0] == k:
            action(label)

    _faults.set_hook(hook)


def child(mode: str, arg: int, path: str, rep: int) -> int:
    """Body of one forked trial; returns the exit code."""
    body = work
    if mode.startswith("fhook"):
        body, mode = work_factored, mode[1:]
    if mode == "hookkill":
        _hook_at(arg, lambda label: os.kill(os.getpid(), signal.SIGKILL))
    elif mode == "hookint":
        _hook_at(arg, lambda label: os.kill(os.getpid(), signal.SIGINT))
    elif mode == "hookraise":
        def boom(label: str) -> None:
            raise RuntimeError(f"injected at {label}")
        _hook_at(arg, boom)
    elif mode == "syscall":
        fd = os.open(path + ".scratch", os.O_WRONLY | os.O_CREAT, 0o600)
        for _ in range(arg):
            os.pwrite(fd, b"x", 0)
        os.close(fd)
        os.unlink(path + ".scratch")
    try:
        if body is work:
            work(path, rep, records=10_000 if mode.startswith("rand") else 3)
        else:
            work_factored(path, rep)
    except KeyboardInterrupt:
        os.write(rep, b"interrupted\n")
        return 3
    except Exception as e:  # noqa: BLE001 - reported to the test, which judges it
        os.write(rep, f"error {type(e).__module__}.{type(e).__name__}: {e}\n".encode())
        return 4
    os.write(rep, b"finished\n")
    return 0


def trial(mode: str, arg: int, path: str, delay: float | None = None) -> dict:
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 1
        try:
            code = child(mode, arg, path, wfd)
        except KeyboardInterrupt:  # a Ctrl-C landing before the writer started
            os.write(wfd, b"interrupted\n")
            code = 3
        finally:
            os._exit(code)
    os.close(wfd)
    if delay is not None:
        # wait until the child has started writing, then strike at a random moment
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL if mode == "randkill" else signal.SIGINT)
    out = b""
    t0 = time.monotonic()
    while chunk := os.read(r, 65536):
        out += chunk
        if time.monotonic() - t0 > 10:
            os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    lines = out.decode().splitlines()
    return {
        "mode": mode, "arg": arg, "path": path,
        "done": [int(x.split()[1]) for x in lines if x.startswith("done ")],
        "end": [x for x in lines if not x.startswith("done ")],
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "seconds": time.monotonic() - t0,
    }


def main(argv: list[str]) -> None:
    mode, outdir = argv[1], argv[2]
    args = [int(a) for a in argv[3:]]
    if mode in ("randkill", "randint"):
        seed, count = args
        rnd = random.Random(seed)
        trials = [(i, rnd.uniform(0.02, 0.4)) for i in range(count)]
    elif mode == "syscall":
        n, j0, j1 = args
        trials = [(n - j, None) for j in range(j0, j1)]
    else:
        trials = [(k, None) for k in range(args[0], args[1], args[2] if len(args) > 2 else 1)]
    for i, (arg, delay) in enumerate(trials):
        path = os.path.join(outdir, f"{mode}{i}.h5")
        res = trial(mode, arg, path, delay)
        print(json.dumps(res), flush=True)
        if mode.lstrip("f") in ("hookkill", "hookint", "hookraise", "syscall") \
                and res["end"] == ["finished"]:
            break  # past the last write step: every step has been hit


if __name__ == "__main__":
    main(sys.argv)
