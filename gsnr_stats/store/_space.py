"""Disk space of a store: what a planned dump takes, and a warning before the disk is full.

The writer's file space is known in advance: HDF5 stores every chunk whole, uncompressed
``grads`` chunks get their space when the dataset grows (early allocation, whole chunk rows),
and the other datasets grow by whole chunks of a fixed shape. :func:`estimate_store_bytes`
adds these up; :class:`SpaceCheck` compares them with ``shutil.disk_usage`` of the store's
directory before the writer allocates a new chunk row, so that a dump that cannot fit is
announced (:class:`~gsnr_stats.errors.DiskSpaceWarning`) before its bytes are written, not by
an ``ENOSPC`` half-way through a record.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiskSpaceWarning
from .layout import Layout, auto_chunks, balanced_width
from .schema import CRC_COL, TABLES

#: What an empty store takes (superblock, groups, attributes, dimension scales: ≈ 41 KiB
#: measured for a one-tensor layout) rounded up, plus the layout JSON stored twice.
FIXED_BYTES = 96 << 10
#: HDF5 aligns objects of 64 KiB and more on 4096 bytes (the writer's file access settings).
_ALIGN_THRESHOLD, _ALIGN = 64 << 10, 4096
#: Bytes of the chunk index per chunk (a generous bound for HDF5's B-tree / extensible array).
_INDEX_BYTES_PER_CHUNK = 64
_VEC_DATASETS = 3  # loss, sample_id, label: float64/int64 per row
_MOMENT_COLS = 1 << 17  # column cap of moments/mean and moments/m2 chunks


def _chunks_bytes(n: int, chunk_rows: int, row_bytes: int) -> int:
    """File bytes of ``n`` rows of a dataset stored in whole chunks of ``chunk_rows`` rows."""
    if n <= 0:
        return 0
    n_chunks = -(-n // chunk_rows)
    chunk = chunk_rows * row_bytes
    waste = _ALIGN if chunk >= _ALIGN_THRESHOLD else 0
    return n_chunks * (chunk + waste + _INDEX_BYTES_PER_CHUNK)


def grads_row_bytes(n_params: int, chunks: tuple[int, int], itemsize: int) -> int:
    """File bytes of one ``grads`` chunk row: ``rows · ceil(P / cols) · cols · itemsize``."""
    rc, cc = chunks
    n_ccols = -(-n_params // cc)
    chunk = rc * cc * itemsize
    waste = _ALIGN if chunk >= _ALIGN_THRESHOLD else 0
    return n_ccols * (chunk + waste + _INDEX_BYTES_PER_CHUNK)


def moment_block_bytes(n_params: int) -> int:
    """File bytes of one moment block: ``mean`` and ``M2`` rows, float64, in whole chunks."""
    mc = balanced_width(n_params, _MOMENT_COLS)
    chunk = mc * 8
    waste = _ALIGN if chunk >= _ALIGN_THRESHOLD else 0
    return 2 * -(-n_params // mc) * (chunk + waste + _INDEX_BYTES_PER_CHUNK)


def estimate_store_bytes(
    params: int | Layout | Sequence[Any],
    n_rows: int,
    dtype: str = "float32",
    chunks: tuple[int, int] | None = None,
    *,
    n_blocks: int = 0,
    n_records: int = 1,
) -> int:
    """File size of a store once ``n_rows`` per-sample gradients are written (an upper bound).

    Parameters
    ----------
    params : int, Layout or sequence of (name, shape[, layer])
        The number of parameters ``P`` or the layout given to :class:`GradientWriter`.
    n_rows : int
        Per-sample gradient rows over all records of the shard (samples × records).
    dtype : {"float32", "float16"}
        Storage dtype of the gradients.
    chunks : (int, int), optional
        Chunk shape of ``grads``; default that of :func:`~gsnr_stats.store.auto_chunks`.
    n_blocks : int
        Moment blocks over all moments-only records (``keep="moments"``).
    n_records : int
        Records (completion rows, and at least one segment row each).

    Returns
    -------
    int
        Bytes: ``grads`` in whole chunk rows, ``ceil(n_rows / r)·r · ceil(P / c)·c · itemsize``
        for chunks ``(r, c)`` (padding ≤ 5 % of ``P`` with the default chunks), the per-row
        losses, ids and labels (3 × 8 bytes a row), ``n_blocks × 16 P`` bytes of moments, the
        tables, and a fixed 96 KiB. Compression is not counted: a compressed store is smaller.
        Each further ``write`` call adds a segment row (≈ 130 bytes, 256 rows a chunk).
    """
    if isinstance(params, int | np.integer):
        P = int(params)
        layout_json = 0
    else:
        lay = Layout.from_params(params)
        P, layout_json = lay.n_params, len(lay.to_json())
    if P < 1:
        raise ValueError(f"params: expected P >= 1 parameters, got {P}")
    for name, v in (("n_rows", n_rows), ("n_blocks", n_blocks), ("n_records", n_records)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    item = np.dtype(dtype).itemsize
    rc, cc = chunks if chunks is not None else auto_chunks(P, item)
    rc, cc = int(rc), min(int(cc), P)
    n_rows, n_blocks, n_records = int(n_rows), int(n_blocks), int(n_records)
    total = FIXED_BYTES + 2 * layout_json
    total += -(-n_rows // rc) * grads_row_bytes(P, (rc, cc), item)
    total += _VEC_DATASETS * _chunks_bytes(n_rows, max(4096, rc), 8)
    total += n_blocks * moment_block_bytes(P) + _chunks_bytes(n_blocks, 256, 8)
    table_rows = {"records": n_records, "segments": n_records + n_blocks}
    for table, rows in table_rows.items():
        for _, dt, shape in (*TABLES[table], (CRC_COL, np.dtype("<u8"), ())):
            total += _chunks_bytes(rows, 256, dt.itemsize * int(np.prod(shape, dtype=int)))
    return int(total)


def _fmt(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class SpaceCheck:
    """The writer's disk-space checks (``shutil.disk_usage`` of the store's directory).

    ``planned_rows`` / ``planned_blocks`` (the writer's ``expected_rows`` /
    ``expected_blocks``) are the rows and moment blocks the user means to write; the bytes
    they need beyond what is allocated so far are checked with each allocation, and the
    whole plan before the file is created. Without a plan each new chunk row is checked on
    its own. Each kind of shortfall is warned about once per writer.
    """

    def __init__(self, path: Path, layout: Layout, dtype: np.dtype, chunks: tuple[int, int],
                 planned_rows: int | None, planned_blocks: int | None,
                 plain: Layout | None = None, factors: Sequence[Any] = ()) -> None:
        for name, v in (("expected_rows", planned_rows), ("expected_blocks", planned_blocks)):
            if v is not None and (not isinstance(v, int | np.integer) or int(v) < 0):
                raise ValueError(f"{path}: {name} must be an int >= 0 or None, got {v!r}")
        self.path, self.layout, self.chunks = path, layout, chunks
        self.dtype = str(np.dtype(dtype))
        self.planned_rows = None if planned_rows is None else int(planned_rows)
        self.planned_blocks = None if planned_blocks is None else int(planned_blocks)
        # a factored store (format 4): plain columns in grads, factor rows beside them
        self._factored = bool(factors)
        self._factor_slack = 2 * len(factors) * ((256 << 10) + _ALIGN + _INDEX_BYTES_PER_CHUNK)
        width = layout.n_params if plain is None else plain.n_params
        self._row_bytes = grads_row_bytes(width, chunks, np.dtype(dtype).itemsize) + chunks[0] * sum(
            f.stored_per_sample * f.dtype.itemsize for f in factors)
        self._block_bytes = moment_block_bytes(layout.n_params)
        self._warned: set[str] = set()

    def estimate(self, n_rows: int = 0, n_blocks: int = 0, n_records: int = 1) -> int:
        """:func:`estimate_store_bytes` with this writer's layout, dtype and chunks.

        A factored writer's rows cost their plain columns and factor rows (``_row_bytes``
        per chunk row of ``grads``), plus at most one partly filled chunk per factor dataset.
        """
        if not self._factored:
            return estimate_store_bytes(self.layout, n_rows, self.dtype, self.chunks,
                                        n_blocks=n_blocks, n_records=n_records)
        rc = self.chunks[0]
        return (estimate_store_bytes(self.layout, 0, self.dtype, self.chunks, n_blocks=n_blocks,
                                     n_records=n_records)
                + -(-int(n_rows) // rc) * self._row_bytes + self._factor_slack
                + _VEC_DATASETS * _chunks_bytes(int(n_rows), max(4096, rc), 8))

    def _free(self) -> int | None:
        try:
            return int(shutil.disk_usage(self.path.parent).free)
        except OSError:  # e.g. a directory removed under us: the write will tell
            return None

    def _warn(self, kind: str, what: str, need: int, free: int) -> None:
        """Warn once per kind, at the line of the caller's code that asked for the write."""
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"{self.path}: {what} needs about {_fmt(need)} ({need} bytes) but only "
            f"{_fmt(free)} ({free} bytes) are free in {self.path.parent}{os.sep}: free space "
            "or write the store elsewhere; per-layer GSNR needs only moments "
            "(keep=\"moments\": 16·P bytes a block instead of 4·P a sample)",
            DiskSpaceWarning, stacklevel=_caller_level(),
        )

    def at_create(self) -> None:
        """Before the file is created: the whole plan, if there is one."""
        if self.planned_rows is None and self.planned_blocks is None:
            return
        free = self._free()
        need = self.estimate(self.planned_rows or 0, self.planned_blocks or 0)
        if free is not None and need > free:
            self._warn("plan", f"the planned store ({self.planned_rows or 0} gradient rows, "
                       f"{self.planned_blocks or 0} moment blocks)", need, free)

    def before_grads(self, n0: int, n1: int) -> None:
        """Before rows ``[n0, n1)`` are appended: a check when new chunk rows get space."""
        rc = self.chunks[0]
        have, want = -(-n0 // rc), -(-n1 // rc)
        if want <= have:
            return
        free = self._free()
        if free is None:
            return
        need = (want - have) * self._row_bytes
        if need > free:
            self._warn("now", f"this write ({n1 - n0} rows, {want - have} new chunk rows of "
                       "file space)", need, free)
        elif self.planned_rows is not None:
            rest = max(0, -(-self.planned_rows // rc) - have) * self._row_bytes
            if rest > free:
                self._warn("plan", f"the rest of the planned {self.planned_rows} gradient rows",
                           rest, free)

    def before_moments(self, n0: int) -> None:
        """Before moment block ``n0`` is appended (each block is new file space)."""
        free = self._free()
        if free is None:
            return
        if self._block_bytes > free:
            self._warn("now", "this moment block", self._block_bytes, free)
        elif self.planned_blocks is not None:
            rest = max(0, self.planned_blocks - n0) * self._block_bytes
            if rest > free:
                self._warn("plan", f"the rest of the planned {self.planned_blocks} moment blocks",
                           rest, free)


#: Frames in these folders are the toolkit's own (an editable install keeps the adapters beside
#: the package): a warning points at the first frame outside them.
_OWN = (str(Path(__file__).resolve().parents[1]) + os.sep,
        str(Path(__file__).resolve().parents[2] / "adapters") + os.sep)


def _caller_level() -> int:
    """``stacklevel`` for a warning raised in the calling function, pointing at the first frame
    outside the toolkit (a fixed level broke when a writer method gained a wrapper)."""
    f = sys._getframe(2)  # the frame that called warnings.warn's caller's caller
    level = 2
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_OWN):
        f = f.f_back
        level += 1
    return level
