"""gsnr-stats: GSNR, OSGR and generalization-gap analytics on saved per-sample gradients.

>>> import gsnr_stats as gs
>>> # with gs.GradientWriter("run.h5", params=[("w", (3,))]) as w: w.write(0, "train", G)
>>> # stats = gs.reduce("run.h5")
"""

from __future__ import annotations

from ._version import __version__
from .agreement import osgr_agreement
from .compare import compare, compare_figure
from .errors import (
    AdapterError,
    ArgumentTypeError,
    DiskSpaceWarning,
    GSNRError,
    LayoutMismatchError,
    MissingDependencyError,
    MissingSplitError,
    NonFiniteError,
    SchemaError,
    ShardSetError,
    SignalBelowNoiseWarning,
    StepSpacingWarning,
    StoreError,
    UsageError,
)
from .estimators import osgr_first_order, osgr_pools, osgr_probe, osgr_trajectory
from .groups import aggregate
from .inmemory import gsnr
from .projection import project_record
from .reduce import SkippedShardWarning, reduce
from .store import (
    FactorInfo,
    FactorSpec,
    GradientStore,
    GradientWriter,
    IncompleteRecordWarning,
    Layout,
    RecordInfo,
    open_store,
)
from .store._space import estimate_store_bytes
from .theory import (
    accumulated_gap,
    measured_gap,
    noise_scale,
    one_step_gap,
    osgr,
    osgr_param,
)
from .uncertainty import aggregate_ci, jackknife, osgr_ci

__all__ = [
    "AdapterError",
    "ArgumentTypeError",
    "DiskSpaceWarning",
    "FactorInfo",
    "FactorSpec",
    "GSNRError",
    "GradientStore",
    "GradientWriter",
    "IncompleteRecordWarning",
    "LayoutMismatchError",
    "Layout",
    "MissingDependencyError",
    "MissingSplitError",
    "NonFiniteError",
    "RecordInfo",
    "SchemaError",
    "ShardSetError",
    "SignalBelowNoiseWarning",
    "SkippedShardWarning",
    "StepSpacingWarning",
    "StoreError",
    "UsageError",
    "__version__",
    "accumulated_gap",
    "aggregate",
    "aggregate_ci",
    "compare",
    "compare_figure",
    "estimate_store_bytes",
    "gsnr",
    "jackknife",
    "measured_gap",
    "noise_scale",
    "one_step_gap",
    "open_store",
    "osgr",
    "osgr_agreement",
    "osgr_ci",
    "osgr_first_order",
    "osgr_param",
    "osgr_pools",
    "osgr_probe",
    "osgr_trajectory",
    "project_record",
    "reduce",
]
