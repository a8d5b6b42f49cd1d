"""Whole-chunk writes of uncompressed gradients with ``os.pwritev`` (GIL released, O_DIRECT).

The only code besides h5py that writes bytes into a store; the chunk byte offsets come from
HDF5's own chunk index.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from . import _faults


class DirectChunks:
    """Write whole chunks of the uncompressed ``grads`` dataset with ``os.pwritev``.

    Why: h5py holds the GIL for the whole of a dataset write (hundreds of MB per batch for
    a large model), so a background writer thread stalls a framework that dispatches its
    work from Python. ``pwritev`` releases the GIL. The dataset is created with early
    allocation and no fill (``H5D_ALLOC_TIME_EARLY``, ``H5D_FILL_TIME_NEVER``): growing it
    gives every new chunk its file space at once, without writing anything. HDF5 reports
    each chunk's byte offset, and the chunk's bytes (row-major, ``rows x cols`` of the
    chunk shape; an edge chunk is stored at full size, its columns beyond ``P`` unused) are
    written there. HDF5 never caches or rewrites these chunks: only chunk rows that no
    earlier write touched are written this way, and the writer never reads ``grads``.

    With ``direct_io``, chunks whose memory and file offsets are 4096-byte aligned (rows
    from :meth:`GradientWriter.alloc_rows`) are written with ``O_DIRECT``: no page-cache
    copy, so the writer thread costs almost no CPU. Anything else, or a file system that
    refuses ``O_DIRECT``, is written through the page cache.

    Crash safety is unchanged: the bytes reach the file before ``end_record`` flushes and
    writes the completion marker, and a file written this way is an ordinary HDF5 file for
    every reader.
    """

    ALIGN = 4096

    def __init__(self, fd: int, owned: bool, dfd: int | None = None) -> None:
        self._fd, self._owned, self._dfd = fd, owned, dfd
        self._iov_max = 1024
        with contextlib.suppress(ValueError, OSError, AttributeError):
            self._iov_max = max(16, min(int(os.sysconf("SC_IOV_MAX")), 1 << 16))
        self._zeros: memoryview | None = None
        self.bytes_direct = 0  # written with O_DIRECT (for tests and benchmarks)
        self.direct_after = 0  # bytes through the page cache before O_DIRECT is used
        self.direct_error = ""  # why O_DIRECT was given up, if it was
        self.bytes_buffered = 0

    @classmethod
    def open(cls, f: h5py.File, path: Path, direct_io: bool = False) -> DirectChunks | None:
        """The direct writer of ``f["grads"]``, or ``None`` when the dataset does not qualify."""
        ds = f["grads"]
        plist = ds.id.get_create_plist()
        if (
            not hasattr(os, "pwritev")
            or plist.get_nfilters() != 0
            or plist.get_alloc_time() != h5py.h5d.ALLOC_TIME_EARLY
            or plist.get_fill_time() != h5py.h5d.FILL_TIME_NEVER
            or f.driver != "sec2"
        ):
            return None
        dfd = None
        if direct_io and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # e.g. a file system without O_DIRECT
                dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        try:
            return cls(int(f.id.get_vfd_handle()), owned=False, dfd=dfd)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        try:
            return cls(os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), owned=True,
                       dfd=dfd)
        except OSError:
            if dfd is not None:
                os.close(dfd)
            return None

    def close(self) -> None:
        """Close the file descriptors this object opened."""
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None
        self._fd = -1

    def _pad(self, nbytes: int) -> memoryview:
        if self._zeros is None or len(self._zeros) < nbytes:
            self._zeros = memoryview(bytes(nbytes))
        return self._zeros[:nbytes]

    def _layout(self, body: np.ndarray, chunks: tuple[int, int]) -> tuple[Any, ...]:
        rc, cc = chunks
        n, P = body.shape
        item = body.dtype.itemsize
        n_ccols = -(-P // cc)
        raw, start, stride, padded = row_bytes_view(body, n_ccols * cc * item)
        contiguous_chunk = n_ccols == 1 and stride == P * item  # a chunk is one memory run
        A = self.ALIGN
        alignable = (rc * cc * item) % A == 0 and (
            contiguous_chunk or (cc * item) % A == 0)
        aligned = alignable and (raw.ctypes.data + start) % A == 0 and (
            contiguous_chunk or (padded and stride % A == 0))
        return raw, start, stride, padded, contiguous_chunk, alignable, aligned

    def wants_staging(self, body: np.ndarray, chunks: tuple[int, int]) -> bool:
        """Whether ``O_DIRECT`` is on and only a copy of ``body`` could use it."""
        if self._dfd is None or self.bytes_direct + self.bytes_buffered < self.direct_after:
            return False
        *_, alignable, aligned = self._layout(body, chunks)
        return alignable and not aligned

    def write_rows(self, ds: h5py.Dataset, r0: int, body: np.ndarray) -> None:
        """Write ``body`` ``(n, P)`` (store dtype, rows contiguous) as rows ``r0..`` of grads.

        ``r0`` and ``n`` are multiples of the chunk rows, and these chunks are allocated
        (the dataset was resized) but were never written. When the memory after each row
        of ``body`` belongs to the same buffer up to a whole number of chunks (a padded row
        stride, as from :meth:`GradientWriter.alloc_rows`), edge chunks are written from it
        as they are; otherwise zeros fill the columns beyond ``P``.
        """
        rc, cc = ds.chunks
        n, P = body.shape
        item = body.dtype.itemsize
        chunk_bytes = rc * cc * item
        n_ccols = -(-P // cc)
        raw, start, stride, padded, contiguous_chunk, _, aligned = self._layout(body, (rc, cc))
        mv = memoryview(raw)
        A = self.ALIGN
        w_full = cc * item
        for r in range(0, n, rc):
            for c in range(n_ccols):
                info = ds.id.get_chunk_info_by_coord((r0 + r, c * cc))
                off = info.byte_offset
                if off is None or info.size != chunk_bytes or info.filter_mask:
                    raise StoreError(
                        f"{ds.file.filename}: grads chunk at row {r0 + r}, column {c * cc} is "
                        f"not allocated as an uncompressed {chunk_bytes}-byte chunk ({info})"
                    )
                base = start + r * stride + c * w_full
                if contiguous_chunk:
                    bufs = [mv[base : base + rc * stride]]
                else:
                    w = min(cc, P - c * cc) * item
                    pad = None
                    if padded:
                        w = w_full
                    elif w < w_full:
                        pad = self._pad(w_full - w)
                    bufs = []
                    for i in range(rc):
                        s = base + i * stride
                        bufs.append(mv[s : s + w])
                        if pad is not None:
                            bufs.append(pad)
                dfd = self._dfd  # None once O_DIRECT was refused
                if self.bytes_direct + self.bytes_buffered < self.direct_after:
                    dfd = None
                if aligned and dfd is not None and off % A == 0 and self._pwritev_all(
                    dfd, bufs, off
                ):
                    self.bytes_direct += chunk_bytes
                    continue
                self._pwritev_all(self._fd, bufs, off)
                self.bytes_buffered += chunk_bytes

    def _pwritev_all(self, fd: int | None, bufs: list[memoryview], off: int) -> bool:
        """Write ``bufs`` back to back at ``off``; ``False`` if ``O_DIRECT`` was refused."""
        done = 0
        for i in range(0, len(bufs), self._iov_max):
            group = bufs[i : i + self._iov_max]
            want = sum(len(b) for b in group)
            try:
                _faults.point("grads.pwrite")
                got = os.pwritev(fd, group, off + done)
            except OSError as e:
                if fd == self._dfd and fd is not None and done == 0:
                    # O_DIRECT refused by this file system (EINVAL for alignment, ...): stop
                    # trying; the caller rewrites the chunk through the page cache, and a
                    # genuine I/O error shows up there
                    os.close(fd)
                    self._dfd = None
                    self.direct_error = f"{errno.errorcode.get(e.errno, e.errno)}: {e}"
                    return False
                raise StoreError(f"cannot write gradient chunk at byte {off + done}: {e}") from e
            if got != want:  # a short write: finish it through the page cache
                rest = b"".join(bytes(b) for b in group)[got:]
                while rest:
                    k = os.pwrite(self._fd, rest, off + done + got)
                    if k <= 0:
                        raise StoreError(f"cannot write gradient chunk at byte {off + done}")
                    got += k
                    rest = rest[k:]
            done += want
        return True


def row_bytes_view(a: np.ndarray, padded_row_bytes: int) -> tuple[np.ndarray, int, int, bool]:
    """Bytes under the rows of ``a`` ``(n, P)`` (rows contiguous, any row stride).

    Returns ``(raw, start, stride, padded)``: a 1-D ``uint8`` array over the memory, the byte
    offset of row 0 in it, the row stride in bytes, and whether every row is followed by
    memory of the same buffer up to ``padded_row_bytes`` (so it may be written as is).
    """
    n, P = a.shape
    item = a.dtype.itemsize
    if a.flags.c_contiguous:
        raw = a.reshape(-1).view(np.uint8)
        stride = P * item
        return raw, 0, stride, padded_row_bytes == stride
    b = a
    while isinstance(b.base, np.ndarray):
        b = b.base
    stride = a.strides[0]
    if b is not a and b.flags.c_contiguous:
        braw = b.reshape(-1).view(np.uint8)
        start = a.ctypes.data - braw.ctypes.data
        end = start + (n - 1) * stride + padded_row_bytes
        if 0 <= start and stride >= padded_row_bytes and end <= braw.nbytes:
            return braw, start, stride, True
        last = start + (n - 1) * stride + P * item
        if 0 <= start and last <= braw.nbytes:
            return braw, start, stride, False
    c = np.ascontiguousarray(a)
    return c.reshape(-1).view(np.uint8), 0, P * item, padded_row_bytes == P * item

