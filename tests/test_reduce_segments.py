"""reduce() of records written in many small ``write`` calls (issue 14, 1a).

Consecutive segments are coalesced into one kernel call per chunk row; each segment's data
checksum is still verified on its own.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import two_pass

import gsnr_stats as gs
from gsnr_stats import kernels

# 64 KiB chunks: HDF5 aligns them, so uncompressed rows are mapped (lzf ones copied)
N, P, RC, CC = 800, 100, 256, 64  # 4 chunk rows (256+256+256+32), 2 column chunks


def _grads(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, P)) * 0.1 + 1.0).astype(np.float32)


def _write(path, g, rows_per_write: int, **kw):
    with gs.GradientWriter(path, [("w", (P,))], chunks=(RC, CC), overwrite=True, **kw) as w:
        for lo in range(0, g.shape[0], rows_per_write):
            w.write(0, "train", g[lo:lo + rows_per_write])
    return path


def _counting(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(kernels, name)

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kernels, name, wrapper)
    return calls


@pytest.mark.parametrize("blocks", [None, 4])
def test_one_row_writes_equal_one_write(tmp_path, blocks):
    g = _grads()
    one = gs.reduce(_write(tmp_path / "one.h5", g, N), blocks=blocks)
    many = gs.reduce(_write(tmp_path / "many.h5", g, 1), blocks=blocks)
    m, v = two_pass(g.astype(np.float64))
    np.testing.assert_allclose(many["mean"].values[0, 0], m, rtol=1e-10)
    np.testing.assert_allclose(many["var"].values[0, 0], v, rtol=1e-10)
    for name in one.data_vars:
        a, b = one[name].values, many[name].values
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-300, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)


@pytest.mark.parametrize("blocks, most", [(None, 4), (4, 4 + 3)])
def test_kernel_calls_follow_chunk_rows_not_writes(tmp_path, monkeypatch, blocks, most):
    # 800 one-row writes: before coalescing this was 800 kernel calls, one per segment
    p = _write(tmp_path / "many.h5", _grads(), 1)
    calls = _counting(monkeypatch, "moments_chunks")
    gs.reduce(p, blocks=blocks, threads=1)
    assert 4 <= len(calls) <= most  # 4 chunk rows, plus at most one cut per block bound


def test_copied_path_one_call_per_chunk_row(tmp_path, monkeypatch):
    g = _grads(1)
    p = _write(tmp_path / "lzf.h5", g, 1, compression="lzf")  # filtered: read through HDF5
    calls = _counting(monkeypatch, "checksum_rows_segmented")
    r = gs.reduce(p, threads=1)
    assert len(calls) == 4
    np.testing.assert_allclose(r["var"].values[0, 0], two_pass(g.astype(np.float64))[1],
                               rtol=1e-10)


def _swap_rows(path, i: int, j: int) -> None:
    with h5py.File(path, "r+") as f:
        ds = [o for o in _datasets(f) if o.shape == (N, P)][0]
        a, b = ds[i].copy(), ds[j].copy()
        ds[i], ds[j] = b, a


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    out: list[h5py.Dataset] = []
    f.visititems(lambda _, o: out.append(o) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_swapped_rows_of_two_coalesced_segments_fail_their_checksums(tmp_path, compression):
    # the two rows sit in one coalesced piece: a checksum of the whole piece would not see
    # the swap (same values, and a one-row segment's positions do not change), per-segment
    # checksums do; the moments are unchanged, so only the checksum can tell
    p = _write(tmp_path / "swap.h5", _grads(2), 1, compression=compression)
    _swap_rows(p, 70, 71)
    with pytest.raises(gs.StoreError, match=r"rows \[70, 71\)"):
        gs.reduce(p)


def test_blocks_more_than_samples_refused(tmp_path):
    p = _write(tmp_path / "few.h5", _grads()[:5], 5)
    with pytest.raises(gs.UsageError, match=r"blocks=6 .*5 samples"):
        gs.reduce(p, blocks=6)
    r = gs.reduce(p, blocks=5)  # one sample per block is the most there can be
    np.testing.assert_array_equal(r["block_count"].values[0, 0], np.ones(5))
