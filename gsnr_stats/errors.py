"""One error hierarchy for the whole toolkit.

Every message names what the user needs to find the problem: the file, the record
``(step, split)`` and, where it applies, the parameter.
"""

from __future__ import annotations


class GSNRError(Exception):
    """Base class of every error raised by gsnr-stats."""


class StoreError(GSNRError):
    """A gradient store cannot be opened, read or written (I/O, corruption, truncation)."""


class SchemaError(StoreError):
    """A store opens but does not follow the documented schema (``docs/format.md``)."""


class LayoutMismatchError(SchemaError):
    """Two shards (or a write and its writer) disagree on the parameter layout."""


class NonFiniteError(GSNRError):
    """NaN or Inf gradients met with ``nonfinite="raise"``."""


class AdapterError(GSNRError):
    """A model, loss or estimator that an adapter cannot handle."""


class UsageError(GSNRError, ValueError):
    """An argument a public function or a CLI option cannot use: out of range, an unknown
    name, a file of the wrong kind, an output that cannot be written (the CLI exits 2)."""


class ArgumentTypeError(UsageError, TypeError):
    """A public function got an argument of the wrong kind, e.g. a path where the Dataset
    of :func:`gsnr_stats.reduce` is expected; the message says what was expected and got."""


class MissingSplitError(UsageError, KeyError):
    """A split (or record) asked for is not in the data; the message lists what is."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShardSetError(UsageError):
    """Files that must not be pooled: one shard listed twice (by path, link or content), or
    shards of several runs without ``allow_mixed_runs=True``."""


class BlocksError(UsageError):
    """More jackknife blocks asked for than a record has samples (each block needs one)."""


class MissingDependencyError(GSNRError, ImportError):
    """An optional extra is not installed; the message names the ``pip install``."""


class StepSpacingWarning(UserWarning):
    """Optimizer steps between checkpoints are unknown: the ``step`` labels are taken as
    optimizer steps (record ``optimizer_step`` or pass ``steps_per_checkpoint=``)."""


class SignalBelowNoiseWarning(UserWarning):
    """A debiased signal ``Σ(m² − s²/N)`` is below zero, so a ratio built on it (theoretical
    OSGR, noise scale) is negative; on a fitted training split, use a held-out split."""


class DiskSpaceWarning(UserWarning):
    """A store is about to need more bytes than its file system has free: the message names
    the file, the estimate and the free bytes (``GradientWriter.estimate_bytes``)."""
