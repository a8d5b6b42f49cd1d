"""Schema constants of the store: format versions, table columns, row and data checksums.

Version 2 keeps every table as a group of plain 1-D column datasets (no compound types:
netCDF-C/xarray abort the interpreter on v1's compound tables) and makes each table row
carry a checksum column, written last. Version 3 (written now) adds per-record optimizer
metadata: ``optimizer_step`` and the extent and CRC of the record's JSON metadata bytes in
the ``record_meta`` byte dataset, as four more ``records`` columns. Version 4 has the
same tables and adds factored records (``factors/<k>/a``, ``factors/<k>/delta``, written
only by a writer given ``factors=``). Versions 1 (compound
tables, no checksums) and 2 are still read. ``docs/format.md`` is the written schema and
crash model.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import kernels
from ..errors import SchemaError

FORMAT_NAME = "gsnr-stats"
FORMAT_VERSION = 3  # stores without factored tensors
FACTORED_VERSION = 4  # stores with factored tensors (gsnr_stats/store/_factored.py)
READABLE_VERSIONS = (1, 2, 3, 4)
META_MAX_BYTES = 64 << 10  # encoded JSON metadata of one record
NO_OPTIMIZER_STEP = -1  # the optimizer_step column of a record that has none
SPLIT_MAX_BYTES = 64

KIND_GRADIENTS = 0
KIND_MOMENTS = 1
KIND_NAMES = {KIND_GRADIENTS: "gradients", KIND_MOMENTS: "moments"}

GRAD_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
BITS_DTYPES = {np.dtype("<f4"): np.dtype("<u4"), np.dtype("<f2"): np.dtype("<u2")}

# Upper bound of any HDF5 filter's compression ratio (deflate's is 1032:1): a filtered
# dataset cannot back more raw bytes than this times its stored size. Used to refuse
# files that claim far more data than they hold (memory bombs).
MAX_FILTER_RATIO = 1100

# -- v2 tables: ordered columns (name, dtype, trailing shape) -------------------------------
_SPLIT_COL = ("split", np.dtype("u1"), (SPLIT_MAX_BYTES,))
TABLES: dict[str, tuple[tuple[str, np.dtype, tuple[int, ...]], ...]] = {
    "segments": (
        ("step", np.dtype("<i8"), ()), _SPLIT_COL, ("kind", np.dtype("u1"), ()),
        ("start", np.dtype("<i8"), ()), ("stop", np.dtype("<i8"), ()),
        ("sum1", np.dtype("<u8"), ()), ("sum2", np.dtype("<u8"), ()),
        ("aux_crc", np.dtype("<u8"), ()),
    ),
    "records": (
        ("step", np.dtype("<i8"), ()), _SPLIT_COL, ("kind", np.dtype("u1"), ()),
        ("n_samples", np.dtype("<i8"), ()), ("lr", np.dtype("<f8"), ()),
        ("epoch", np.dtype("<f8"), ()), ("seg_stop", np.dtype("<i8"), ()),
        ("grads_stop", np.dtype("<i8"), ()), ("moments_stop", np.dtype("<i8"), ()),
        # v3: the optimizer's update count (-1: none) and the record's metadata bytes
        # [meta_start, meta_stop) of record_meta with their CRC (bytes_crc)
        ("optimizer_step", np.dtype("<i8"), ()), ("meta_start", np.dtype("<i8"), ()),
        ("meta_stop", np.dtype("<i8"), ()), ("meta_crc", np.dtype("<u8"), ()),
    ),
    "trajectory": (
        ("step", np.dtype("<i8"), ()), ("lr", np.dtype("<f8"), ()), ("epoch", np.dtype("<f8"), ()),
        ("train_loss", np.dtype("<f8"), ()), ("test_loss", np.dtype("<f8"), ()),
    ),
    "probes": (
        ("step", np.dtype("<i8"), ()), ("n", np.dtype("<i8"), ()), ("lr", np.dtype("<f8"), ()),
        ("k", np.dtype("<i8"), ()), ("train_before", np.dtype("<f8"), ()),
        ("train_after", np.dtype("<f8"), ()), ("test_before", np.dtype("<f8"), ()),
        ("test_after", np.dtype("<f8"), ()),
    ),
}
CRC_COL = "crc"
# v2 files: the records table without the four v3 columns (read only)
TABLES_V2 = {**TABLES, "records": TABLES["records"][:9]}


def tables(version: int) -> dict[str, tuple[tuple[str, np.dtype, tuple[int, ...]], ...]]:
    """Columns of the column tables of a store of format ``version`` (2 or 3)."""
    return TABLES_V2 if version == 2 else TABLES

TABLE_LONG_NAMES = {
    "segments": "one row per write call: the rows [start, stop) of a record",
    "records": "completion markers: one row per completed record, written last",
    "trajectory": "loss trajectory rows",
    "probes": "OSGR probe rows",
}

# -- v1 compound tables (read only) ---------------------------------------------------------
V1_SEGMENT_DTYPE = np.dtype(
    [("step", "<i8"), ("split", f"S{SPLIT_MAX_BYTES}"), ("kind", "u1"),
     ("start", "<i8"), ("stop", "<i8")]
)
V1_RECORD_DTYPE = np.dtype(
    [("step", "<i8"), ("split", f"S{SPLIT_MAX_BYTES}"), ("kind", "u1"),
     ("n_samples", "<i8"), ("lr", "<f8"), ("epoch", "<f8")]
)
V1_TRAJECTORY_DTYPE = np.dtype(
    [("step", "<i8"), ("lr", "<f8"), ("epoch", "<f8"), ("train_loss", "<f8"),
     ("test_loss", "<f8")]
)
V1_PROBE_DTYPE = np.dtype(
    [("step", "<i8"), ("n", "<i8"), ("lr", "<f8"), ("k", "<i8"), ("train_before", "<f8"),
     ("train_after", "<f8"), ("test_before", "<f8"), ("test_after", "<f8")]
)
V1_TABLES = {
    "segments": V1_SEGMENT_DTYPE,
    "records": V1_RECORD_DTYPE,
    "trajectory": V1_TRAJECTORY_DTYPE,
    "probes": V1_PROBE_DTYPE,
}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def encode_split(split: str) -> np.ndarray:
    """The split name as the ``(64,)`` uint8 column value (UTF-8, NUL padded)."""
    b = check_split(split)
    out = np.zeros(SPLIT_MAX_BYTES, np.uint8)
    out[: len(b)] = np.frombuffer(b, np.uint8)
    return out


def check_split(split: str) -> bytes:
    """UTF-8 bytes of a valid split name; ``ValueError`` otherwise."""
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    b = split.encode("utf-8")
    if len(b) > SPLIT_MAX_BYTES or "\x00" in split:
        raise ValueError(f"split name {split!r} is longer than {SPLIT_MAX_BYTES} bytes or has NUL")
    return b


def row_crc(table: str, values: Sequence[Any], version: int = FORMAT_VERSION) -> int:
    """Checksum of one table row, as stored in its ``crc`` column.

    CRC-32 of the table name and the little-endian bytes of every column value in order,
    with bit 32 set so that a row of zeros (space a killed writer allocated but never
    wrote) never carries a valid checksum. ``version``: the table's columns of that format.
    """
    h = zlib.crc32(table.encode())
    for (_, dt, shape), v in zip(tables(version)[table], values, strict=True):
        h = zlib.crc32(np.ascontiguousarray(np.asarray(v, dtype=dt).reshape(shape)).tobytes(), h)
    return h | (1 << 32)


def bytes_crc(*arrays: np.ndarray) -> int:
    """CRC-32 (bit 32 set) of the bytes of ``arrays`` back to back: loss/id/label, moments."""
    h = 0
    for a in arrays:
        h = zlib.crc32(np.ascontiguousarray(a).tobytes(), h)
    return h | (1 << 32)


def data_checksum(x: np.ndarray, pos0: int = 0, p_total: int | None = None,
                  parallel: bool = False) -> tuple[int, int]:
    """Position-weighted checksum of gradient rows ``x`` in their store dtype.

    See :func:`gsnr_stats.kernels.checksum_rows`; ``pos0`` is the position of ``x[0, 0]`` in
    its segment and ``p_total`` the segment's row width (default ``x.shape[1]``).
    ``parallel=False`` (the writer's choice) runs on the calling thread only: starting
    Numba's thread pool inside a user's training process would make a later ``fork`` (a
    DataLoader worker, multiprocessing) unsafe, and one thread checksums faster than a
    disk takes the rows.
    """
    bits = BITS_DTYPES[x.dtype]
    if x.ndim != 2:
        raise ValueError("data_checksum expects a 2-D array")
    if x.shape[0] == 0 or x.shape[1] == 0:
        return 0, 0
    if x.strides[1] != x.dtype.itemsize:
        x = np.ascontiguousarray(x)
    fn = kernels.checksum_rows if parallel else kernels.checksum_rows_serial
    s1, s2 = fn(x.view(bits), int(pos0), int(x.shape[1] if p_total is None else p_total))
    return int(s1), int(s2)


# -- values a writer is handed, checked against the schema's types -----------------------

def _as_int64(x: Any, what: str, where: str) -> int:
    try:
        v = int(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise SchemaError(f"{where}: {what} {x!r} is not an integer") from e
    if isinstance(x, float | np.floating) and v != x:
        raise SchemaError(f"{where}: {what} {x!r} is not an integer")
    if not INT64_MIN <= v <= INT64_MAX:
        raise SchemaError(f"{where}: {what} {v} does not fit in int64")
    return v


def _as_float(x: Any, what: str, where: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise SchemaError(f"{where}: {what} {x!r} is not a number") from e
