"""Reading any block of rows and columns of one record's gradients, checksums included.

The lazy readers (the xarray backend) ask for arbitrary ``[rows, columns]`` blocks, but a
segment's checksum (``docs/format.md``, "Data checksums") covers all of its rows and
columns. So the first read touching a segment reads that segment whole, in row blocks of
bounded memory, verifies it and keeps the requested part; the segment is then marked
verified on the open store and later reads fetch only what they ask for.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from ..errors import StoreError
from .schema import data_checksum

if TYPE_CHECKING:
    from .reader import GradientStore, Segment

_VERIFY_BLOCK_BYTES = 64 << 20  # memory of one row block while a segment is verified
_LOCK = threading.Lock()  # one verification at a time: Dask threads asking for one segment
_MASK = 0xFFFFFFFFFFFFFFFF


def read_rows(store: GradientStore, step: int, split: str, start: int, stop: int,
              cols: tuple[int, int] | None, verify: bool) -> np.ndarray:
    """Rows ``[start, stop)`` (positions in the record) of ``grads`` over ``cols``."""
    rec = store.record(step, split)
    where = store._where(step, split)
    if rec.kind != "gradients":
        raise StoreError(f"{where} holds moments only; per-sample grads were not stored")
    P = store.n_plain  # the columns of grads (format 4: the plain ones)
    c0, c1 = (0, P) if cols is None else (int(cols[0]), int(cols[1]))
    start, stop = int(start), int(stop)
    if not (0 <= c0 <= c1 <= P and 0 <= start <= stop <= rec.n_samples):
        raise StoreError(f"{where}: rows [{start}, {stop}) columns [{c0}, {c1}) outside the "
                         f"record's {rec.n_samples} rows of {P} columns")
    out = np.empty((stop - start, c1 - c0), store.grads_dtype)
    key = (int(step), split)
    pos = 0
    for i, seg in enumerate(store._segments[key]):
        a, b = max(start, pos), min(stop, pos + seg.stop - seg.start)
        if a < b:
            lo, hi = seg.start + a - pos, seg.start + b - pos
            dst = out[a - start : b - start]
            if verify and seg.sum1 is not None and (key, i) not in store._verified:
                with _LOCK:
                    if (key, i) not in store._verified:
                        _verify(store, where, seg, lo, hi, c0, c1, dst)
                        store._verified.add((key, i))
                        lo = hi  # dst is filled
            if lo < hi:
                dst[:] = store._read("grads", np.s_[lo:hi, c0:c1], where)
        pos += seg.stop - seg.start
        if pos >= stop:
            break
    return out


def _verify(store: GradientStore, where: str, seg: Segment, lo: int, hi: int, c0: int,
            c1: int, dst: np.ndarray) -> None:
    """Read segment ``seg`` whole, check its sums, copy rows ``[lo, hi)`` into ``dst``."""
    P = store.n_plain
    step = max(1, _VERIFY_BLOCK_BYTES // max(1, P * store.grads_dtype.itemsize))
    s1 = s2 = 0
    for i in range(seg.start, seg.stop, step):
        j = min(i + step, seg.stop)
        block = store._read("grads", np.s_[i:j], where)
        a, b = data_checksum(block, (i - seg.start) * P, P)
        s1, s2 = (s1 + a) & _MASK, (s2 + b) & _MASK
        u, v = max(i, lo), min(j, hi)
        if u < v:
            dst[u - lo : v - lo] = block[u - i : v - i, c0:c1]
    if (s1, s2) != (seg.sum1, seg.sum2):
        raise store._damaged(where, "gradients", seg)
