"""Reading the record index of a format 1 store (compound tables, no checksums).

Version 1 stores are still read (``docs/format.md``); this is the one place that knows
their compound ``segments``/``records``/``trajectory``/``probes`` tables. Used by
:class:`gsnr_stats.store.reader.GradientStore` while it validates a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import SchemaError
from ._open import _backed_rows, _decode_split
from ._records import RecordInfo, Segment
from .schema import KIND_GRADIENTS, KIND_NAMES, V1_TABLES

if TYPE_CHECKING:
    from .reader import GradientStore


def load_index_v1(self: GradientStore) -> None:
    """Fill ``self``'s record index from the v1 compound tables (validating them)."""
    path = self.path
    rows = self._obj("grads").shape[0]
    for name in ("loss", "sample_id", "label"):
        if self._obj(name).shape[0] < rows:
            raise SchemaError(
                f"{path}: {name} has {self._obj(name).shape[0]} rows, fewer than grads ({rows})"
            )
    mrows = self._obj("moments/count").shape[0]
    for name in ("moments/mean", "moments/m2"):
        if self._obj(name).shape[0] < mrows:
            raise SchemaError(f"{path}: {name} has shape {self._obj(name).shape}, inconsistent")
    for name, dt in V1_TABLES.items():
        ds = self._check_ds(name, 1, (dt,), compound=True)
        if ds.shape[0] > _backed_rows(ds, dt.itemsize):
            raise SchemaError(f"{path}: table {name!r} claims more rows than it stores")
    self._grads_stop, self._moments_stop = rows, mrows
    segs = self._obj("segments")[()]
    recs = self._obj("records")[()]
    by_key: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
    for s in segs:
        split = _decode_split(s["split"], path)
        key = (int(s["step"]), split)
        start, stop, kind = int(s["start"]), int(s["stop"]), int(s["kind"])
        if kind not in KIND_NAMES:
            raise SchemaError(f"{path}: record (step={key[0]}, split={split!r}): bad kind {kind}")
        by_key.setdefault(key, []).append((kind, start, stop))
    self._segments = {}
    self.records = []
    done: set[tuple[int, str]] = set()
    for r in recs:
        split = _decode_split(r["split"], path)
        key = (int(r["step"]), split)
        where = f"{path}: record (step={key[0]}, split={split!r})"
        if key in done:
            raise SchemaError(f"{where} is completed twice")
        done.add(key)
        kind = int(r["kind"])
        if kind not in KIND_NAMES:
            raise SchemaError(f"{where}: bad kind {kind}")
        limit = rows if kind == KIND_GRADIENTS else mrows
        total = 0
        ranges = []
        for skind, start, stop in by_key.get(key, []):
            if skind != kind:
                raise SchemaError(f"{where}: mixes gradient and moments segments")
            if not (0 <= start <= stop <= limit):
                raise SchemaError(
                    f"{where}: segment rows [{start}, {stop}) outside the stored "
                    f"{limit} rows (truncated file?)"
                )
            ranges.append(Segment(start, stop))
            total += stop - start
        n = int(r["n_samples"])
        if kind == KIND_GRADIENTS and total != n:
            raise SchemaError(f"{where}: segments hold {total} samples, record says {n}")
        self._segments[key] = ranges
        self.records.append(
            RecordInfo(key[0], split, KIND_NAMES[kind], n, float(r["lr"]), float(r["epoch"]))
        )
    self.incomplete = []
    for key, segl in by_key.items():
        if key not in done:
            kind = segl[0][0]
            n = sum(b - a for _, a, b in segl) if kind == KIND_GRADIENTS else 0
            self.incomplete.append(RecordInfo(key[0], key[1], KIND_NAMES[kind], n))

    def table(name: str) -> dict[str, np.ndarray]:
        t = self._obj(name)[()]
        return {k: np.asarray(t[k]) for k in t.dtype.names}

    self.trajectory_rows = table("trajectory")
    self.probe_rows = table("probes")
