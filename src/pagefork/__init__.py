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

from ._errors import (  # noqa: E402
    ConflictError,
    CorruptDataError,
    MergeError,
    OutOfBoundsError,
    PageforkError,
    UnsupportedModeError,
    WorkerError,
)
from .memory import PAGE_SIZE, Region  # noqa: E402
from .merge import DataType, MergeOp, MergeRegion  # noqa: E402
from .diffs import Diff, DiffBatch  # noqa: E402
from .snapshot import Snapshot  # noqa: E402
from .tracking import MODES, Support, Tracker, TrackingFallbackWarning, probe, tracker  # noqa: E402
from . import compact, delta, wire  # noqa: E402
from . import checkpoint  # noqa: E402
from .checkpoint import CheckpointInfo  # noqa: E402
from .executor import BatchStats  # noqa: E402
from .layout import ThreadMemory  # noqa: E402
from .app import App  # noqa: E402

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
