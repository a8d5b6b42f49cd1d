"""Store size (issue 13): chunk padding ≤ 5 % of P, the size estimate, the disk-space warning.

Observed: a store of a 9,690-parameter model was 944 MB for 557 MB of gradients, because
chunks of 8,192 columns stored the second column chunk (1,498 used columns) in full (1.69×).
Every size below is checked against an independent route: the file's size on disk
(``os.path.getsize``), HDF5's own chunk index (``get_storage_size``), closed-form counts.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections import namedtuple

import h5py
import numpy as np
import pytest
from conftest import two_pass

import gsnr_stats as gs
from gsnr_stats.store import auto_chunks

MiB = 1 << 20
_Usage = namedtuple("_Usage", "total used free")


def _primes(lo: int, hi: int) -> list[int]:
    sieve = np.ones(hi, dtype=bool)
    sieve[:2] = False
    for i in range(2, int(hi**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = False
    return [int(p) for p in np.flatnonzero(sieve[lo:]) + lo]


SPECIAL = [1, 2, 4095, 4096, 4097, 8191, 8192, 8193, 9690, 12289, 16383, 16384, 16385,
           24577, 131071, 131073, 163839, 409601, 999_983, 1_048_577, 2_000_000]
PRIMES = _primes(8_000, 40_000)[::25] + _primes(1_900_000, 2_000_000)[::200]


def _padding(P: int, cols: int) -> int:
    return -(-P // cols) * cols - P


@pytest.mark.parametrize("itemsize", [4, 2])
def test_auto_chunks_pad_at_most_5_percent_for_any_P(itemsize):
    """Every P in 1..20000, every 997th to 2e6, primes, and the edge cases: padding ≤ 5 %."""
    Ps = sorted({*range(1, 20_001), *range(20_001, 2_000_001, 997), *SPECIAL, *PRIMES})
    worst = 0.0
    for P in Ps:
        rows, cols = auto_chunks(P, itemsize)
        assert 1 <= cols <= min(P, 8192), P
        pad = _padding(P, cols)
        worst = max(worst, pad / P)
        assert pad <= 0.05 * P, (P, cols, pad)
        # about 2 MiB a chunk, and a wide model's chunk row stays a few dozen samples
        assert rows * cols * itemsize <= 2 * MiB, P
        if P > 8192:
            assert cols * 2 >= 8192 and rows <= 2 * MiB // (4096 * itemsize), P
        if P * itemsize >= 4096:
            assert rows * cols * itemsize >= MiB // 2, P
    assert worst <= 0.02  # 4096-byte widths only up to 2 % padding, else a balanced width


def test_old_8192_columns_padded_9690_by_69_percent():
    """The observation: 8192-column chunks store 16384 columns for P = 9690; now ≤ 5 %."""
    assert 2 * 8192 / 9690 > 1.69
    rows, cols = auto_chunks(9690, 4)
    assert (_padding(9690, cols) + 9690) / 9690 <= 1.05


def test_wide_models_keep_4096_byte_columns_for_o_direct():
    """Where it costs ≤ 2 % padding the width is a multiple of 4096 bytes (O_DIRECT writes)."""
    for P in (100_000, 1_000_000, 10**7, 163_840, 409_600):
        _, cols = auto_chunks(P, 4)
        assert (cols * 4) % 4096 == 0 and _padding(P, cols) <= 0.02 * P, (P, cols)


def _write(path, P, n, batch, chunks=None, **kw):
    rng = np.random.default_rng(P + n)
    g = rng.normal(size=(n, P)).astype(np.float32)
    with gs.GradientWriter(path, [("w", (P,))], chunks=chunks, **kw) as w:
        for i in range(0, n, batch):
            w.write(0, "train", g[i : i + batch])
        chunks = w.chunks
    return g, chunks


def _grads_storage(path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["grads"].id.get_storage_size())


@pytest.mark.parametrize("fast_write", [True, False])
def test_store_of_9690_params_is_within_5_percent_of_its_gradients(tmp_path, fast_write):
    """A real store, P = 9690, float32: file ≤ 1.05 × raw gradients + fixed overhead.

    The rows are three whole chunk rows, so no chunk row is partly empty; the rest of the
    file is bounded by one chunk of each per-row vector (loss, sample_id, label: 3 × 8 bytes
    × max(4096, chunk rows)) and 1 MiB of HDF5 metadata and tables (an empty store is 41 KiB).
    """
    P = 9690
    rows, cols = auto_chunks(P, 4)
    n = 3 * rows
    p = tmp_path / "s.h5"
    g, chunks = _write(p, P, n, 32, fast_write=fast_write)
    assert chunks == (rows, cols)
    raw = n * P * 4
    size = os.path.getsize(p)
    vectors = 3 * 8 * max(4096, rows)
    assert _grads_storage(p) <= 1.05 * raw  # HDF5's own count of chunk bytes
    assert size <= 1.05 * raw + vectors + MiB, size / raw
    with gs.open_store(p) as s:
        np.testing.assert_array_equal(s.read_grads(0, "train"), g)
    st = gs.reduce(p)
    m, v = two_pass(g)
    np.testing.assert_allclose(st["mean"].values[0, 0], m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st["var"].values[0, 0], v, rtol=1e-11)


def test_old_chunk_shape_reproduces_169x_and_still_reads(tmp_path):
    """The old default (64, 8192) made the file ≥ 1.6 × its gradients; such stores still read
    (values equal to the written float32 rows, reduce equal to a float64 two-pass)."""
    P, n = 9690, 5 * 64
    p = tmp_path / "old.h5"
    g, chunks = _write(p, P, n, 40, chunks=(64, 8192))
    assert chunks == (64, 8192)
    assert os.path.getsize(p) >= 1.6 * n * P * 4
    assert _grads_storage(p) == n * 16384 * 4
    with gs.open_store(p) as s:
        np.testing.assert_array_equal(s.read_grads(0, "train"), g)
    m, v = two_pass(g)
    st = gs.reduce(p)
    np.testing.assert_allclose(st["var"].values[0, 0], v, rtol=1e-11)
    np.testing.assert_allclose(st["mean"].values[0, 0], m, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("P,n,batch", [(9690, 300, 32), (100_000, 150, 50), (8193, 130, 7),
                                       (50, 20_000, 1000)])
def test_estimate_bounds_the_real_file(tmp_path, P, n, batch):
    """estimate_store_bytes ≥ the file's size on disk, and within 2 % + 256 KiB of it."""
    p = tmp_path / "e.h5"
    _, chunks = _write(p, P, n, batch)
    est = gs.estimate_store_bytes([("w", (P,))], n, "float32", n_records=1)
    with gs.GradientWriter(tmp_path / "x.h5", [("w", (P,))]) as w:
        assert w.chunks == chunks and w.estimate_bytes(n) == est
    size = os.path.getsize(p)
    assert size <= est <= 1.02 * size + (256 << 10), (size, est)
    # from P alone the layout JSON is not counted
    assert gs.estimate_store_bytes(P, n) == est - 2 * len(gs.Layout.from_params([("w", (P,))])
                                                         .to_json())


def test_estimate_of_moments_is_the_written_file(tmp_path):
    """keep="moments" sizes: 16 P bytes a block, bounded like the gradients."""
    P, blocks = 9690, 40
    p = tmp_path / "m.h5"
    with gs.GradientWriter(p, [("w", (P,))]) as w:
        for b in range(blocks):
            w.write_moments(b // 2, "train", 10, np.zeros(P), np.ones(P))
    size = os.path.getsize(p)
    est = gs.estimate_store_bytes(P, 0, n_blocks=blocks, n_records=blocks // 2)
    assert 16 * P * blocks <= size <= est <= 1.05 * size + (256 << 10), (size, est)


def test_docs_example_moments_10_mb_instead_of_944_mb():
    """docs/format.md's example: 32 epochs × 450 samples, P = 9690, 2 moment blocks a record."""
    P, n = 9690, 32 * 450
    old_chunks = n * 16384 * 4  # the 944 MB: 14400 rows of two 8192-column chunks
    assert round(old_chunks / 1e6) == 944
    old = gs.estimate_store_bytes(P, n, chunks=(64, 8192))
    new = gs.estimate_store_bytes(P, n)
    moments = gs.estimate_store_bytes(P, 0, n_blocks=64, n_records=32)
    assert old_chunks < old < 1.01 * old_chunks
    assert n * P * 4 < new < 1.05 * n * P * 4 + MiB and round(new / 1e6) == 563
    assert 64 * 16 * P < moments < 11e6  # "about 10 MB"


def test_moment_chunks_balanced_for_wide_models(tmp_path):
    """mean/M2 chunks: P = 131073 used to be two chunks of 131072 columns (2×); now ≤ 1 %."""
    P = 131_073
    p = tmp_path / "w.h5"
    with gs.GradientWriter(p, [("w", (P,))]) as w:
        w.write_moments(0, "train", 3, np.full(P, 0.5), np.full(P, 2.0))
    with h5py.File(p, "r") as f:
        used = f["moments/mean"].id.get_storage_size()
    assert 8 * P <= used <= 1.01 * 8 * P
    st = gs.reduce(p)
    np.testing.assert_array_equal(st["mean"].values[0, 0], np.full(P, 0.5))
    np.testing.assert_array_equal(st["var"].values[0, 0], np.full(P, 1.0))  # M2 / (n - 1)


# -- the disk-space warning ----------------------------------------------------------------


@pytest.fixture
def small_disk(monkeypatch):
    """shutil.disk_usage says ``free`` bytes are left; records the directories asked about."""
    state = {"free": 1000, "asked": []}

    def fake(path):
        state["asked"].append(os.fspath(path))
        return _Usage(10**12, 10**12 - state["free"], state["free"])

    monkeypatch.setattr(shutil, "disk_usage", fake)
    return state


def _needed(msg: str) -> int:
    """The estimate in a warning: "needs about 4.2 MB (4190000 bytes)"."""
    m = re.search(r"needs about [^(]*\((\d+) bytes\)", msg)
    assert m, msg
    return int(m.group(1))


def _chunk_row_bytes(P, chunks, item=4):
    rc, cc = chunks
    return rc * -(-P // cc) * cc * item


def test_warns_before_any_data_are_written(tmp_path, small_disk):
    """Free 1000 bytes: the first write warns (as an error here) and nothing is in the file."""
    P = 9690
    p = tmp_path / "full" / "s.h5"
    g = np.ones((10, P), np.float32)
    w = gs.GradientWriter(p, [("w", (P,))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.DiskSpaceWarning)
        with pytest.raises(gs.DiskSpaceWarning) as ei:
            w.write(0, "train", g)
    w.close()
    with h5py.File(p, "r") as f:
        assert f["grads"].shape == (0, P) and f["grads"].id.get_storage_size() == 0
        assert f["records/crc"].shape == (0,) and f["segments/crc"].shape == (0,)
    msg = str(ei.value)
    need = _chunk_row_bytes(P, auto_chunks(P, 4))
    got = _needed(msg)
    assert str(p) in msg and "(1000 bytes) are free" in msg and 'keep="moments"' in msg
    assert need <= got <= 1.01 * need
    assert small_disk["asked"] == [str(p.parent)]


def test_warning_names_file_estimate_free_and_the_write_goes_on(tmp_path, small_disk):
    """A plain warning: the write still happens (the user was told), values intact; the
    estimate in the message is at least what HDF5 then allocated."""
    P = 9690
    p = tmp_path / "s.h5"
    with gs.GradientWriter(p, [("w", (P,))]) as w:
        with pytest.warns(gs.DiskSpaceWarning, match=r"s\.h5: this write") as rec:
            w.write(0, "train", np.ones((10, P)))
        with warnings.catch_warnings():
            warnings.simplefilter("error", gs.DiskSpaceWarning)
            w.write(0, "train", np.ones((10, P)))  # same chunk row: no new space, no check
    assert len(rec) == 1
    assert rec[0].filename == __file__  # it points at the caller's write, not at the toolkit
    got = _needed(str(rec[0].message))
    assert _grads_storage(p) <= got <= 1.01 * _grads_storage(p)
    assert len(small_disk["asked"]) == 1
    with gs.open_store(p) as s:
        assert s.record(0, "train").n_samples == 20


def test_planned_rows_checked_before_the_file_is_created(tmp_path, small_disk):
    """expected_rows=: the whole plan is compared with the free space before creation."""
    P, n = 9690, 300
    small_disk["free"] = 5 * MiB
    p = tmp_path / "plan.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.DiskSpaceWarning)
        with pytest.raises(gs.DiskSpaceWarning, match="planned store") as ei:
            gs.GradientWriter(p, [("w", (P,))], expected_rows=n)
    assert not p.exists()
    est = gs.estimate_store_bytes([("w", (P,))], n)
    assert f"({est} bytes)" in str(ei.value) and f"({5 * MiB} bytes)" in str(ei.value)
    assert est > n * P * 4 > 5 * MiB


def test_planned_rows_warn_when_the_rest_does_not_fit(tmp_path, small_disk):
    """Enough space for each chunk row, not for the rest of the plan: warned once, at the
    chunk row where the rest first exceeds the free space."""
    P = 9690
    rows, _ = auto_chunks(P, 4)
    row_bytes = _chunk_row_bytes(P, auto_chunks(P, 4))
    small_disk["free"] = 10**12
    p = tmp_path / "rest.h5"
    with gs.GradientWriter(p, [("w", (P,))], expected_rows=10 * rows) as w:
        small_disk["free"] = int(5.5 * row_bytes)  # room for 5 of the 10 chunk rows
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always", gs.DiskSpaceWarning)
            for _ in range(10):
                w.write(0, "train", np.ones((rows, P), np.float32))
    msgs = [str(r.message) for r in rec if r.category is gs.DiskSpaceWarning]
    assert len(msgs) == 1 and "the rest of the planned" in msgs[0]


def test_moment_blocks_are_checked(tmp_path, small_disk):
    P = 9690
    with gs.GradientWriter(tmp_path / "m.h5", [("w", (P,))]) as w:
        with pytest.warns(gs.DiskSpaceWarning, match="moment block") as rec:
            w.write_moments(0, "train", 2, np.zeros(P), np.ones(P))
    got = _needed(str(rec[0].message))
    assert got >= 2 * 8 * P


def test_no_warning_with_ample_space(tmp_path, small_disk):
    small_disk["free"] = 10**12
    P = 9690
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.DiskSpaceWarning)
        with gs.GradientWriter(tmp_path / "a.h5", [("w", (P,))], expected_rows=1000,
                               expected_blocks=10) as w:
            for s in range(5):
                w.write(s, "train", np.ones((200, P), np.float32))
            w.write_moments(9, "train", 2, np.zeros(P), np.ones(P))
    assert len(small_disk["asked"]) >= 5  # the checks ran


def test_expected_rows_refuses_nonsense(tmp_path):
    with pytest.raises(ValueError, match="expected_rows"):
        gs.GradientWriter(tmp_path / "a.h5", [("w", (3,))], expected_rows=-1)
    assert not (tmp_path / "a.h5").exists()
    with pytest.raises(ValueError, match="n_rows"):
        gs.estimate_store_bytes(3, -2)


@pytest.mark.parametrize("P", [9690, 8193, 100_000])
def test_default_chunks_direct_writes_bit_exact(tmp_path, P):
    """The whole-chunk pwritev / O_DIRECT path with the new widths stores exactly the float32
    rows (plain h5py read), its file space is HDF5's chunk count, and O_DIRECT is used (where
    the file system allows it) exactly when the width is a multiple of 4096 bytes."""
    rows, cols = auto_chunks(P, 4)
    n = 2 * rows + 5  # two whole chunk rows (direct) and a tail through h5py
    g = np.random.default_rng(P).normal(size=(n, P)).astype(np.float32)
    p = tmp_path / "d.h5"
    with gs.GradientWriter(p, [("w", (P,))], direct_io=True) as w:
        opened = w._direct._dfd is not None
        buf = w.alloc_rows(n)
        buf[:] = g
        w.write(0, "train", buf)
        direct, buffered = w._direct.bytes_direct, w._direct.bytes_buffered
    with h5py.File(p, "r") as f:
        np.testing.assert_array_equal(f["grads"][()], g)
        assert f["grads"].chunks == (rows, cols)
        assert f["grads"].id.get_storage_size() == 3 * rows * -(-P // cols) * cols * 4
    assert direct + buffered == 2 * rows * -(-P // cols) * cols * 4
    if (cols * 4) % 4096:
        assert direct == 0
    elif opened:
        assert direct > 0 and buffered == 0
