"""pagefork: fork-join over copy-on-write memory snapshots.

Snapshot a block of memory, fork it to a batch of threads, let the kernel
track which pages each writes, diff and merge the changes back. The
README and docs/ describe the architecture and the API; this module only
re-exports public names.
"""

from __future__ import annotations

from . import _native
from ._version import __version__

if _native.VERSION != __version__:  # a stale build of the extension
    raise ImportError(
        f"pagefork's native extension is version {_native.VERSION} but the package is "
        f"{__version__}: rebuild it (make test, or pip install .)"
    )

from ._errors import (
    ConflictError,
    CorruptDataError,
    MergeError,
    OutOfBoundsError,
    PageforkError,
    UnsupportedModeError,
    WorkerError,
)
from .memory import PAGE_SIZE, Region
from .merge import DataType, MergeOp, MergeRegion
from .diffs import Diff, DiffBatch
from .snapshot import Snapshot
from .tracking import MODES, Support, Tracker, TrackingFallbackWarning, probe, tracker
from . import compact, delta, wire
from . import checkpoint
from .checkpoint import CheckpointInfo
from .executor import BatchStats
from .layout import ThreadMemory
from .app import App

__all__ = [
    "PAGE_SIZE",
    "Region",
    "MODES",
    "Support",
    "Tracker",
    "TrackingFallbackWarning",
    "probe",
    "tracker",
    "DataType",
    "MergeOp",
    "MergeRegion",
    "Diff",
    "DiffBatch",
    "Snapshot",
    "wire",
    "delta",
    "checkpoint",
    "compact",
    "App",
    "ThreadMemory",
    "BatchStats",
    "CheckpointInfo",
    "PageforkError",
    "UnsupportedModeError",
    "CorruptDataError",
    "OutOfBoundsError",
    "MergeError",
    "ConflictError",
    "WorkerError",
]
