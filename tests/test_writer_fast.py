"""The direct chunk write path of GradientWriter (``fast_write``): same bytes as h5py.

Whole chunk rows of uncompressed gradients are written with ``os.pwritev`` at the chunk
offsets HDF5 reports (GIL released); partial chunk rows and compressed stores go through
h5py. Every test compares with an independent route: the input cast to the store dtype
with numpy, the plain h5py write path, a float64 two-pass reference for ``reduce``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest
from conftest import assert_within, f32_batch_sum_bound, two_pass

import gsnr_stats as gs
from gsnr_stats import store as store_mod


def _grads(path) -> np.ndarray:
    with h5py.File(path, "r") as f:  # plain h5py, no gsnr reader in between
        return f["grads"][()]


@pytest.fixture
def pwritev_bytes(monkeypatch):
    """Count the bytes the direct path writes (it must really be used)."""
    seen = {"bytes": 0, "calls": 0}
    real = os.pwritev

    def spy(fd, bufs, off, *a):
        seen["calls"] += 1
        n = real(fd, bufs, off, *a)
        seen["bytes"] += n
        return n

    monkeypatch.setattr(store_mod.os, "pwritev", spy)
    return seen


# (P, chunks, batch sizes): multi-column chunks with an edge chunk, one column chunk,
# batches aligned and not aligned to chunk rows, batches spanning several chunk rows.
CASES = [
    (1000, (4, 256), [8, 3, 5, 12, 1, 7, 4]),
    (1000, (4, 1000), [4, 9, 2, 6]),
    (37, None, [5, 70_000]),
    (300, (8, 64), [16, 16, 3, 21, 40]),
]


@pytest.mark.parametrize("P,chunks,sizes", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fast_path_bit_exact_with_h5py_path(tmp_path, P, chunks, sizes, dtype, pwritev_bytes):
    rng = np.random.default_rng(P + len(sizes))
    batches = [rng.normal(size=(n, P)).astype(np.float64 if i % 2 else np.float32)
               for i, n in enumerate(sizes)]
    want = np.concatenate(batches).astype(dtype)  # numpy's own cast: the reference
    out = {}
    for fast in (True, False):
        p = tmp_path / f"{fast}.h5"
        with gs.GradientWriter(p, [("w", (P,))], dtype=dtype, chunks=chunks,
                               fast_write=fast) as w:
            assert (w._direct is not None) == fast
            for i, g in enumerate(batches):
                w.write(i % 3, "train", g, loss=np.full(len(g), float(i)))
        out[fast] = _grads(p)
        if fast:
            rc, cc = w.chunks
            # bytes the direct path must have written: every chunk row no write shared
            n0, whole = 0, 0
            for g in batches:
                n1 = n0 + len(g)
                a, b = -(-n0 // rc) * rc, (n1 // rc) * rc
                whole += max(0, b - a) // rc
                n0 = n1
            item = np.dtype(dtype).itemsize
            assert pwritev_bytes["bytes"] == whole * (-(-P // cc)) * rc * cc * item
            assert whole > 0
    np.testing.assert_array_equal(out[True], want)
    np.testing.assert_array_equal(out[False], want)
    assert out[True].dtype == np.dtype(dtype)
    # the gsnr reader sees the same records, in the right rows
    with gs.open_store(tmp_path / "True.h5") as s:
        for step in range(min(3, len(sizes))):
            idx = [i for i in range(len(sizes)) if i % 3 == step]
            np.testing.assert_array_equal(
                s.read_grads(step, "train"), np.concatenate([batches[i] for i in idx]).astype(dtype))
            np.testing.assert_array_equal(
                s.read_loss(step, "train"), np.concatenate([np.full(sizes[i], float(i)) for i in idx]))


def test_reduce_of_fast_written_store_matches_two_pass(tmp_path, rng):
    """reduce memory-maps chunks by offset: the direct path's chunk layout must be HDF5's."""
    P = 700
    g = (rng.normal(size=(96, P)) * 2 + 0.5).astype(np.float32)
    path = tmp_path / "r.h5"
    with gs.GradientWriter(path, [("a", (20, 30)), ("b", (100,))], chunks=(16, 128)) as w:
        for lo in range(0, 96, 32):
            w.write(0, "train", g[lo:lo + 32])
    m, v = two_pass(g)
    st = gs.reduce(path)
    np.testing.assert_allclose(st["mean"].values.ravel(), m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st["var"].values.ravel(), v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compressed_store_falls_back_to_h5py(tmp_path, rng, compression, pwritev_bytes):
    g = rng.normal(size=(64, 300)).astype(np.float32)
    path = tmp_path / "c.h5"
    with gs.GradientWriter(path, [("w", (300,))], chunks=(16, 128),
                           compression=compression) as w:
        assert w._direct is None
        w.write(0, "train", g)
    assert pwritev_bytes["calls"] == 0
    np.testing.assert_array_equal(_grads(path), g)
    with h5py.File(path, "r") as f:
        assert f["grads"].compression == compression


def test_float16_overflow_refused_on_fast_path(tmp_path, pwritev_bytes):
    path = tmp_path / "h.h5"
    with gs.GradientWriter(path, [("a", (4,))], dtype="float16", chunks=(2, 4)) as w:
        assert w._direct is not None
        w.write(0, "train", np.arange(16.0).reshape(4, 4))
        with pytest.raises(gs.StoreError, match="overflows float16"):
            w.write(0, "train", np.array([[1e6, 0, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(_grads(path), np.arange(16.0, dtype=np.float16).reshape(4, 4))
    assert pwritev_bytes["bytes"] == 2 * 2 * 4 * 2  # two whole chunk rows of 2x4 float16


def test_live_reader_sees_direct_written_records(tmp_path, rng):
    """SWMR: a reader opened while the writer runs reads directly written rows."""
    path = tmp_path / "live.h5"
    g0 = rng.normal(size=(8, 500)).astype(np.float32)
    w = gs.GradientWriter(path, [("a", (500,))], chunks=(4, 128))
    w.write(0, "train", g0)
    w.end_record(0, "train")
    w.write(1, "train", g0[:4])
    w.flush()
    with pytest.warns(gs.IncompleteRecordWarning, match="step=1"):
        s = gs.open_store(path)
    np.testing.assert_array_equal(s.read_grads(0, "train"), g0)
    assert [r.step for r in s.incomplete] == [1]
    s.close()
    w.close()
    np.testing.assert_array_equal(_grads(path), np.concatenate([g0, g0[:4]]))


CHILD = r"""
import sys, numpy as np
from gsnr_stats.store import GradientWriter
path = sys.argv[1]
print("ready", flush=True)
with GradientWriter(path, [("a", (40, 30)), ("b", (30,))], chunks=(4, 256)) as w:
    assert w._direct is not None
    step = 0
    while True:
        g = np.random.default_rng(step).normal(size=(8 * (step % 3 + 1), 1230))
        for lo in range(0, len(g), 8):  # whole chunk rows: the direct path
            w.write(step, "train", g[lo:lo + 8])
        w.end_record(step, "train")
        print(f"done {step}", flush=True)  # one write: a kill cannot split it
        step += 1
"""


def test_sigkill_keeps_direct_written_records(tmp_path):
    rnd = np.random.default_rng(3)
    for rep in range(4):
        path = tmp_path / f"k{rep}.h5"
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rnd.uniform(0.2, 0.6)))
        proc.kill()
        out, _ = proc.communicate()
        # only whole "done N" lines (with PYTHONUNBUFFERED each write is a syscall)
        done = [int(m[1]) for m in re.finditer(r"^done (\d+)$", out, re.M)]
        if not path.exists():
            assert not done
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store = gs.open_store(path)
        with store:
            steps = [r.step for r in store.records]
            assert set(done) <= set(steps)
            for s in steps:
                want = np.random.default_rng(s).normal(size=(8 * (s % 3 + 1), 1230))
                np.testing.assert_array_equal(store.read_grads(s, "train"),
                                              want.astype(np.float32))


def test_alloc_rows_layout(tmp_path):
    """Rows padded to whole chunk columns, page-aligned, zeroed: written without a copy."""
    with gs.GradientWriter(tmp_path / "a.h5", [("w", (3000,))], chunks=(4, 1024)) as w:
        buf = w.alloc_rows(10)
        assert buf.shape == (10, 3000) and buf.dtype == np.float32
        assert buf.strides == (3 * 1024 * 4, 4)
        assert buf.ctypes.data % 4096 == 0
        assert not buf.any()
        raw, start, stride, padded = store_mod._row_bytes_view(buf[:8], 3 * 1024 * 4)
        assert padded and start == 0 and stride == 3 * 1024 * 4


# chunks of 64 KiB and more are 4096-aligned in the file (the writer's HDF5 alignment)
@pytest.mark.parametrize("P,chunks", [(3000, (16, 1024)), (2048, (8, 2048)), (700, (8, 128))])
@pytest.mark.parametrize("source", ["alloc_rows", "plain"])
def test_direct_io_bit_exact(tmp_path, P, chunks, source, pwritev_bytes):
    """O_DIRECT (where the file system allows it) stores exactly the numpy float32 rows."""
    rng = np.random.default_rng(P)
    sizes = [32, 5, 27, 48]
    p = tmp_path / "d.h5"
    want = []
    with gs.GradientWriter(p, [("w", (P,))], chunks=chunks, direct_io=True) as w:
        opened = w._direct._dfd is not None
        buf = w.alloc_rows(max(sizes))
        for n in sizes:
            g = rng.normal(size=(n, P))
            want.append(g.astype(np.float32))
            if source == "alloc_rows":
                buf[:n] = g
                w.write(0, "train", buf[:n], loss=np.arange(n, dtype=float))
            else:
                w.write(0, "train", g, loss=np.arange(n, dtype=float))
        rc, cc = w.chunks
        aligned_layout = (rc * cc * 4) % 4096 == 0 and (cc == P or (cc * 4) % 4096 == 0)
        direct = w._direct.bytes_direct
        buffered = w._direct.bytes_buffered
    np.testing.assert_array_equal(_grads(p), np.concatenate(want))
    assert direct + buffered == pwritev_bytes["bytes"] > 0
    if opened and aligned_layout:
        assert buffered == 0 and direct > 0
    if not aligned_layout:
        assert direct == 0
    with gs.open_store(p) as s:
        np.testing.assert_array_equal(s.read_loss(0, "train"),
                                      np.concatenate([np.arange(n, dtype=float) for n in sizes]))


def test_torch_recorder_direct_io_matches_batch_gradient(tmp_path):
    """torch Recorder into an O_DIRECT writer: rows sum to torch's own batch gradient."""
    torch = pytest.importorskip("torch")
    from gsnr_stats.adapters import torch as gt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    lf = torch.nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(48, 40), torch.randint(0, 3, (48,))
    p = tmp_path / "t.h5"
    with gt.open_writer(p, model, chunks=(8, 1024), direct_io=True) as w:
        gt.Recorder(w, model, lf).record((x, y), step=0, split="train", batch_size=16)
    with gs.open_store(p) as s:
        G = s.read_grads(0, "train").astype(np.float64)
    model.zero_grad()
    lf(model(x), y).sum().backward()
    want = torch.cat([q.grad.reshape(-1) for q in model.parameters()]).numpy()
    # float32 rows (fast path, batches of 16) vs torch's float32 batch gradient of 48: the
    # chain is Linear 40 + tanh + Linear 64 + softmax 3, backward 3 (~115 terms), K = 256
    assert_within(G.sum(axis=0), want, f32_batch_sum_bound(G, 256), "sum vs batch gradient")


def test_direct_io_refused_falls_back_to_page_cache(tmp_path, monkeypatch):
    """A file system refusing O_DIRECT writes (EINVAL) costs nothing but speed."""
    import errno

    real = os.pwritev
    refused = []

    def pwritev(fd, bufs, off, *a):
        if w._direct._dfd is not None and fd == w._direct._dfd:
            refused.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off, *a)

    monkeypatch.setattr(store_mod.os, "pwritev", pwritev)
    g = np.random.default_rng(5).normal(size=(48, 3000)).astype(np.float32)
    p = tmp_path / "f.h5"
    w = gs.GradientWriter(p, [("w", (3000,))], chunks=(16, 1024), direct_io=True)
    if w._direct._dfd is None:
        w.close()
        pytest.skip("this file system refuses O_DIRECT at open")
    w.write(0, "train", g)
    w.close()
    assert len(refused) == 1 and "EINVAL" in w._direct.direct_error
    assert w._direct.bytes_direct == 0 and w._direct.bytes_buffered == 48 // 16 * 3 * 16 * 1024 * 4
    np.testing.assert_array_equal(_grads(p), g)


@pytest.mark.parametrize("mode", ["auto", False, True])
def test_direct_io_auto_switches_after_threshold(tmp_path, monkeypatch, mode):
    """Default "auto": page cache for the first DIRECT_AFTER bytes, O_DIRECT after (where the
    file system allows it); every mode stores the same bytes."""
    monkeypatch.setattr(gs.GradientWriter, "DIRECT_AFTER", 3 * 16 * 1024 * 4 * 2)  # 2 chunk rows
    rng = np.random.default_rng(9)
    p = tmp_path / "a.h5"
    kw = {} if mode == "auto" else {"direct_io": mode}
    want = []
    with gs.GradientWriter(p, [("w", (3000,))], chunks=(16, 1024), **kw) as w:
        opened = w._direct._dfd is not None
        buf = w.alloc_rows(32)
        for _ in range(4):
            buf[:] = rng.normal(size=(32, 3000))
            want.append(buf.copy())
            w.write(0, "train", buf)
        direct, buffered = w._direct.bytes_direct, w._direct.bytes_buffered
    np.testing.assert_array_equal(_grads(p), np.concatenate(want))
    row = 3 * 16 * 1024 * 4  # one chunk row: 3 chunks
    assert direct + buffered == 8 * row
    if mode is False or not opened:
        assert direct == 0
    elif mode == "auto":
        assert buffered == 2 * row and direct == 6 * row
    else:
        assert buffered == 0
