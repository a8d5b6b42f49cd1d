"""The record index's value types: a completed record, one write call's rows, the warning
about incomplete records. Shared by :mod:`.reader` and :mod:`._legacy` (v1 index)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordInfo:
    """One record: a checkpoint ``step`` × a ``split`` of per-sample gradients or moments.

    ``optimizer_step`` is the optimizer's update count at the checkpoint (``None``: not
    recorded, and always in stores older than format 3); the record's JSON metadata is read
    by :meth:`GradientStore.record_meta`.
    """

    step: int
    split: str
    kind: str
    n_samples: int
    lr: float = float("nan")
    epoch: float = float("nan")
    optimizer_step: int | None = None


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one write call, with its checksums (v2; ``None`` in v1)."""

    start: int
    stop: int
    sum1: int | None = None
    sum2: int | None = None
    aux_crc: int | None = None


class IncompleteRecordWarning(UserWarning):
    """A store holds records whose writer never completed them; they are skipped."""
