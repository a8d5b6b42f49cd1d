"""The gradient store: a versioned, crash-safe HDF5 schema for per-sample gradients.

The only package that knows HDF5. One file (a *shard*) per writer; ``docs/format.md`` is
the schema and the crash model. Rooms:

* :mod:`.layout` — the parameter layout (names, shapes, layers, flat offsets, hash);
* :mod:`.schema` — format versions, table columns, row and data checksums;
* :mod:`.writer` — :class:`GradientWriter` (append-only, SWMR, completion rows last);
* :mod:`._chunkio` — whole-chunk ``pwritev`` / ``O_DIRECT`` writes of uncompressed gradients;
* :mod:`.reader` — :class:`GradientStore`: open, validate, verify, read (v1 to v4);
  :mod:`._rows` its checked reads of any block of a record's rows and columns,
  :mod:`._legacy` the v1 record index, :mod:`._records` the index's value types;
* :mod:`._factored` — factored records (format 4): :class:`FactorSpec`, :class:`FactorInfo`,
  their checks, verified reads and :func:`materialize`;
* :mod:`._netcdf` — the dimension scales and CF attributes netCDF readers see;
* :mod:`._faults` — the fault-injection hook of the crash tests.
"""

from __future__ import annotations

import os  # noqa: F401 - tests patch os.pwritev through this module

from ._chunkio import DirectChunks, row_bytes_view
from ._factored import FactorInfo, FactorSpec, materialize
from ._open import is_store
from .layout import Layout, auto_chunks, check_same_layout
from .reader import (
    GradientStore,
    IncompleteRecordWarning,
    RecordInfo,
    Segment,
    expand_paths,
    open_store,
)
from .schema import FACTORED_VERSION, FORMAT_NAME, FORMAT_VERSION, KIND_GRADIENTS, KIND_MOMENTS, KIND_NAMES
from .writer import GradientWriter

_DirectChunks = DirectChunks  # names of the single-module store (v1 code, tests)
_row_bytes_view = row_bytes_view

__all__ = [
    "FACTORED_VERSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KIND_GRADIENTS",
    "KIND_MOMENTS",
    "KIND_NAMES",
    "FactorInfo",
    "FactorSpec",
    "GradientStore",
    "GradientWriter",
    "IncompleteRecordWarning",
    "Layout",
    "RecordInfo",
    "Segment",
    "auto_chunks",
    "check_same_layout",
    "expand_paths",
    "is_store",
    "materialize",
    "open_store",
]
