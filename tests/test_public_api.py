"""The public surface: exactly these names in ``pagefork``, of these kinds,
and the errors with the attributes docs/api.md promises (pickled intact)."""

from __future__ import annotations

import enum
import importlib
import inspect
import pickle
import types

import pytest

import pagefork
from pagefork import (ConflictError, CorruptDataError, MergeError, OutOfBoundsError, PageforkError,
                      UnsupportedModeError, WorkerError)

PUBLIC = {
    # name: what it is
    "PAGE_SIZE": int, "MODES": tuple,
    "Region": type, "Support": type, "Tracker": type, "DataType": enum.EnumMeta, "MergeOp": enum.EnumMeta,
    "MergeRegion": type, "Diff": type, "DiffBatch": type, "Snapshot": type, "App": type,
    "probe": types.FunctionType, "tracker": types.FunctionType,
    "wire": types.ModuleType, "delta": types.ModuleType, "checkpoint": types.ModuleType,
    "compact": types.ModuleType,
    "PageforkError": type, "UnsupportedModeError": type, "CorruptDataError": type,
    "OutOfBoundsError": type, "MergeError": type, "ConflictError": type, "WorkerError": type,
    "ThreadMemory": type, "BatchStats": type, "CheckpointInfo": type, "TrackingFallbackWarning": type,
}


def test_all_is_exactly_the_public_names():
    assert sorted(pagefork.__all__) == sorted(PUBLIC)
    assert len(pagefork.__all__) == len(set(pagefork.__all__))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_has_its_kind(name):
    assert isinstance(getattr(pagefork, name), PUBLIC[name])


def test_the_version_is_a_string_matching_the_native_build():
    assert isinstance(pagefork.__version__, str) and pagefork.__version__
    assert pagefork._native.VERSION == pagefork.__version__


def test_error_hierarchy():
    for cls in (UnsupportedModeError, CorruptDataError, OutOfBoundsError, MergeError, ConflictError,
                WorkerError):
        assert issubclass(cls, PageforkError)
    assert issubclass(CorruptDataError, ValueError)
    assert issubclass(OutOfBoundsError, IndexError)


def test_errors_declare_their_attributes():
    for cls, names in [(UnsupportedModeError, ["mode", "reason"]),
                       (CorruptDataError, ["message", "version", "object"]),
                       (WorkerError, ["message", "thread", "traceback", "failed"])]:
        assert list(inspect.signature(cls).parameters) == names
    plain = CorruptDataError("bad bytes")
    assert (plain.version, plain.object) == (None, None)


@pytest.mark.parametrize("err", [
    UnsupportedModeError("uffd", "no userfaultfd"),
    CorruptDataError("object v1 is damaged", version=3, object="v0000000003-ab.base"),
    CorruptDataError("bad wire data"),
    WorkerError("thread 2 of 4 failed", thread=2, traceback="Traceback ...", failed=[2, 3]),
    OutOfBoundsError("past the end"),
    MergeError("PRODUCT over zero at offset 8"),
    ConflictError("threads 0 and 1 wrote different bytes to [0, 8)"),
], ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_attributes(err):
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and str(again) == str(err)
    assert again.__dict__ == err.__dict__


# Public classes and functions at the module paths code imported them from
# before the module split (issue 18), which moved their definitions: those
# paths keep working, give the same objects, and stay in the module's
# __all__, which is what mypy --strict (no implicit re-export) accepts an
# import by. (Internal helpers such as run_thread, dtype_text or the Backend
# protocol moved without a trace on purpose.)
FORMER_PATHS = {
    "pagefork.snapshot": ["DataType", "MergeOp", "MergeRegion", "Diff", "DiffBatch", "Snapshot"],
    "pagefork.executor": ["Executor", "BatchStats", "Allocation", "ThreadMemory", "DEFAULT_CLOSE_TIMEOUT",
                          "MAX_THREADS_PER_BATCH"],
    "pagefork.tracking": ["Tracker", "TrackerStats", "TrackingFallbackWarning", "Support", "MODES", "probe",
                          "tracker"],
    "pagefork.checkpoint": ["CheckpointInfo", "VersionInfo", "save", "load", "versions", "verify"],
}


@pytest.mark.parametrize("module, name", [(m, n) for m, names in FORMER_PATHS.items() for n in names],
                         ids=lambda v: v)
def test_names_stay_importable_from_their_former_modules(module, name):
    """Before: ``from pagefork.executor import ThreadMemory``, how code
    annotated a thread function's ``mem`` before ``pagefork.ThreadMemory``
    existed, was an ImportError, and mypy
    --strict refused ``from pagefork.snapshot import DataType`` and
    ``from pagefork.executor import Allocation`` (not exported)."""
    found = getattr(importlib.import_module(module), name)
    home = importlib.import_module(getattr(found, "__module__", None) or module)
    assert getattr(home, getattr(found, "__qualname__", name), found) is found
    assert name in importlib.import_module(module).__all__
    if name in pagefork.__all__:
        assert found is getattr(pagefork, name)
