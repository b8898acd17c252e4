"""The thread side of a batch: what a backend gets (:class:`BatchSpec`),
running one thread of it on tracked memory and diffing what it wrote
(:func:`run_thread`, :class:`Workspace`), what it reports
(:class:`ThreadOutcome`), finding conflicts between threads, and the
:class:`Backend` protocol the executor drives.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol
from collections.abc import Callable, Sequence

import cloudpickle
import numpy as np

from . import _native
from ._errors import PageforkError
from ._forking import leave_if_forked
from ._sizes import round_to_pages
from ._thread_errors import PREPARATION, thread_error
from .diffs import DiffBatch
from .identity import IdentityBuffers, with_contributions
from .layout import Allocation, ThreadMemory
from .memory import Region
from .merge import MergeOp, MergeRegion
from .snapshot import Snapshot
from .tracking import Tracker, mode_for_new_mapping, probe, tracker

__all__ = ["BatchSpec", "Cancel", "Cancelled", "ThreadOutcome", "BatchResult", "Backend", "Workspace",
           "run_thread", "holders", "kept",
           "call_thread_function", "call_tracked", "check_thread_memory", "find_conflicts",
           "thread_tracking_mode", "inside_batch_of", "copied_result", "preparation_error",
           "MAX_TRACKED_REGIONS", "POLL", "PREPARATION", "ClosedBackend", "diff_written",
           "empty_batch"]

# How often a thread that waits for workers looks at its Cancel (seconds).
POLL = 0.05


class Cancelled(Exception):
    """A backend's answer to a cancelled batch (the caller was interrupted)."""


class Cancel:
    """Set when the caller of a batch was interrupted (or the App closes):
    backends stop waiting, abandon the batch's workers and raise Cancelled."""

    # A flag, not a threading.Event: nothing waits on it (backends poll it),
    # and an Event (a Condition and its lock) costs ~9 us per batch to make.
    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def check(self) -> None:
        if self._set:
            raise Cancelled()


# The batch a thread function of this Python thread belongs to (threads
# backend): calling app.parallel on the same App from inside it would wait
# for itself.
_inside = threading.local()


def inside_batch_of(snapshot: Snapshot) -> bool:
    """Whether the calling Python thread is running a thread function of a
    batch on ``snapshot``."""
    return getattr(_inside, "snapshot", None) is snapshot



@dataclass(frozen=True)
class BatchSpec:
    """Everything a backend needs to run one batch."""

    fn: Callable[..., Any]
    n: int
    args: tuple
    snapshot: Snapshot
    layout: dict[str, Allocation]
    merge_regions: list[MergeRegion]
    tracking: str  # mode for thread memory
    version: int   # snapshot version: bumps whenever its bytes change
    main_memory: tuple[int, int] = (0, 0)  # [start, end) addresses of main memory

    def dumps(self, obj: Any) -> bytes:
        """``obj`` pickled for a worker (cloudpickle), refusing views of main
        memory: a worker would get a copy, and writes to it would be lost."""
        if type(obj) is tuple and not obj:  # no args: the most common case, always the same bytes
            return _NO_ARGS
        _mp_main_by_value()
        buffer = io.BytesIO()
        _WorkerPickler(buffer, self.main_memory).dump(obj)
        return buffer.getvalue()


_NO_ARGS = pickle.dumps((), protocol=pickle.HIGHEST_PROTOCOL)


def _mp_main_by_value() -> None:
    """In a multiprocessing spawn or forkserver child the script runs as
    ``__mp_main__``, a name a worker cannot import (it never re-runs the
    script): its functions and classes travel by value, as ``__main__``'s do.
    cloudpickle's registry is process-wide; no other module has that name."""
    module = sys.modules.get("__mp_main__")
    if module is not None and getattr(module, "__name__", None) == "__mp_main__" \
            and "__mp_main__" not in cloudpickle.list_registry_pickle_by_value():
        cloudpickle.register_pickle_by_value(module)


class _WorkerPickler(cloudpickle.CloudPickler):
    def __init__(self, file: io.BytesIO, main_memory: tuple[int, int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._main = main_memory

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and obj.size:
            address = obj.__array_interface__["data"][0]
            if self._main[0] <= address < self._main[1]:
                raise pickle.PicklingError(
                    "the thread function or its arguments hold a view of the App's main memory "
                    f"(an array of shape {obj.shape}); a worker would get a copy and writes to it "
                    "would be lost. Use mem[name] inside the thread function, or pass a copy "
                    "(numpy.array(view)) to send values")
        return super().reducer_override(obj)


@dataclass
class ThreadOutcome:
    """One thread's result, as a backend reports it."""

    index: int
    result: Any = None
    diffs: DiffBatch | None = None
    dirty_pages: int = 0
    error: str | None = None  # formatted traceback, or why the worker died
    exception: BaseException | None = None  # what the thread function raised (its traceback dropped)


@dataclass
class BatchResult:
    """What a backend's run returns: each thread's outcome, and what belongs
    to the batch rather than to one thread."""

    outcomes: list[ThreadOutcome]
    # Diffs workers combined from several threads of the batch (regions
    # whose merge is order-free, see backends/combine.py); merged once each.
    combined: list[DiffBatch] = field(default_factory=list)
    bytes_shipped: int = 0  # what crossed to and from workers


class Backend(Protocol):
    """Runs the threads of a batch. ``slots`` workers; ``placement[i]`` names
    the slot thread ``i`` runs on."""

    name: str
    slots: int
    # Whether run() reads the snapshot's tracked changes (to ship deltas);
    # if not, the executor drops them after every batch.
    ships_changes: bool

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> BatchResult:
        """Every thread's outcome and the batch's own values (BatchResult);
        raises Cancelled soon after ``cancel`` is set, leaving no worker
        that could still touch a later batch."""
        ...

    def close(self, timeout: float) -> int:
        """Stops the workers, waiting at most ``timeout`` seconds for running
        thread functions; returns how many were still running (abandoned)."""
        ...


class ClosedBackend:
    """What a closed executor holds instead of its backend."""

    slots = 0
    ships_changes = False

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> BatchResult:
        raise PageforkError("the App is closed")

    def close(self, timeout: float) -> int:
        return 0



def thread_tracking_mode(requested: str | None = None) -> str:
    """The mode thread memory is tracked with: ``cow`` (free for memory
    mapped from a snapshot), else the fastest available other mode."""
    if requested is not None and requested != "auto":
        return tracker(requested).mode  # checks that it exists and works here
    support = probe()
    if support["cow"].available:
        return "cow"
    return tracker("auto").mode


#: Regions one process can track at once (the native registry's size, unless
#: the native module says otherwise). Main memory is one; each thread
#: function running on the threads backend holds one while it runs.
MAX_TRACKED_REGIONS = int(_native.MAX_TRACKED_REGIONS)


def preparation_error(exc: BaseException) -> str:
    """Why thread memory could not be mapped and tracked."""
    text = PREPARATION +  "".join(traceback.format_exception_only(exc)).strip()
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        text += (f" (a process tracks at most {MAX_TRACKED_REGIONS} regions at once: main memory, plus "
                 "one per thread function running at the same time on the threads backend; use fewer "
                 "workers)")
    return text


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes)


def _copied(value: Any) -> Any:
    """An independent copy, the way another backend would ship it back."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # lambdas, local classes: what cloudpickle is for
        data = cloudpickle.dumps(value)
    return pickle.loads(data)


def copied_result(result: Any) -> Any:
    """``result`` as an independent copy (pickled and unpickled, as other
    backends ship it back) unless it is immutable: thread memory is reused
    by the workspace's next thread, so views of it must not escape. Raises
    PageforkError naming the type if it cannot be copied."""
    if type(result) in _IMMUTABLE:
        return result
    try:
        return _copied(result)
    except BaseException as exc:
        raise PageforkError(f"cannot copy the result ({type(result).__name__}) out of thread "
                            f"memory: {exc!r}") from exc


def call_thread_function(spec: BatchSpec, index: int, region: Region,
                         identity: dict[str, np.ndarray] | None = None) -> Any:
    """Calls thread ``index``'s function on ``region`` (and the buffers of
    the identity arrays), marking this Python thread as inside the batch (so
    it cannot call its own App)."""
    previous = getattr(_inside, "snapshot", None)
    _inside.snapshot = spec.snapshot
    mem = ThreadMemory(region, spec.layout, identity)
    pid = os.getpid()
    try:
        result = spec.fn(mem, index, spec.n, *spec.args)
    except BaseException as exc:
        leave_if_forked(pid, exc)  # a child the function forked never returns into pagefork
        raise
    finally:
        _inside.snapshot = previous
        mem.expire()  # a mem kept past the thread reaches nothing
    leave_if_forked(pid, None)
    return result


def call_tracked(spec: BatchSpec, index: int, region: Region, tracker_: Tracker,
                 identity: dict[str, np.ndarray] | None = None) -> tuple[Any, np.ndarray]:
    """Calls thread ``index``'s function on ``region``, which ``tracker_``
    has started tracking; stops tracking and returns the result and the
    pages written. Raises if the function closed its memory (the workspace
    rebuilds it for the next thread)."""
    try:
        result = call_thread_function(spec, index, region, identity)
    finally:
        if not region.closed:
            tracker_.stop(region)
    check_thread_memory(region)
    return result, tracker_.dirty_pages(region, "global")


def check_thread_memory(region: Region) -> None:
    """Raises if the thread function closed its memory."""
    if region.closed:
        raise PageforkError("the thread function closed its memory (mem.region.close())")


def run_thread(spec: BatchSpec, index: int, region: Region, tracker_: Tracker, *,
               copy_result: bool = False, identity: IdentityBuffers | None = None) -> ThreadOutcome:
    """Runs thread ``index`` of a batch on ``region`` (any backend, any
    process): map the snapshot, track, call, diff (with the diffs of the
    identity arrays' buffers, from ``identity``). Whatever the function
    raises (``SystemExit`` and ``KeyboardInterrupt`` included) is reported as
    the thread's error. ``copy_result``: return an independent copy of the
    result (pickled and unpickled, as other backends ship it), since views of
    ``region`` change when the workspace runs its next thread."""
    try:
        spec.snapshot.map_to(region)
        views = identity.begin(spec.layout.values()) if identity is not None else None
        tracker_.start_mapped(region)
    except BaseException as exc:  # not the thread's fault: say what the workspace lacks
        return ThreadOutcome(index, error=preparation_error(exc))
    try:
        result, dirty = call_tracked(spec, index, region, tracker_, views)
        diffs = diff_written(spec.snapshot, region, dirty, spec.merge_regions)
        if identity is not None:
            diffs = with_contributions(diffs, identity.collect())
        if copy_result:
            result = copied_result(result)
        return ThreadOutcome(index, result, diffs, int(np.count_nonzero(dirty)))
    except BaseException as exc:  # the thread's own error, SystemExit included
        return ThreadOutcome(index, error=thread_error(exc), exception=exc)


# Columns of an empty batch (no element: shared safely).
_NONE64, _NONE8 = np.zeros(0, np.int64), np.zeros(0, np.uint8)


def empty_batch() -> DiffBatch:
    """A batch of no diffs, made without numpy's list conversions."""
    return DiffBatch.unchecked(_NONE64, _NONE64, _NONE8, _NONE8, b"")


def diff_written(snapshot: Snapshot, region: Region, dirty: np.ndarray,
                 regions: list[MergeRegion]) -> DiffBatch:
    """``snapshot.diff(region, dirty, regions=regions)``, skipped where no
    page is flagged and the region ends within the snapshot's last page:
    then it is empty (compared pages are only the flagged ones, and only a
    region reaching past the snapshot adds an extension diff)."""
    if region.size <= round_to_pages(snapshot.size) and not dirty.any():
        return empty_batch()
    return snapshot.diff(region, dirty, regions=regions)


def find_conflicts(outcomes: Sequence[ThreadOutcome], limit: int = 10) -> list[str]:
    """Locations two threads overwrote with different bytes, described."""
    parts = []
    for o in outcomes:
        d = o.diffs
        if d is None or len(d) == 0:
            continue
        keep = d.ops == MergeOp.OVERWRITE
        if keep.any():
            parts.append((o.index, d.offsets[keep], d.lengths[keep], d.starts[keep], d))
    if len(parts) < 2:
        return []
    thread = np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(parts)])
    starts = np.concatenate([p[1] for p in parts])
    ends = starts + np.concatenate([p[2] for p in parts])
    data_at = np.concatenate([p[3] for p in parts])
    order = np.argsort(starts, kind="stable")
    thread, starts, ends, data_at = thread[order], starts[order], ends[order], data_at[order]
    reach = np.maximum.accumulate(ends)
    overlapping = np.flatnonzero(starts[1:] < reach[:-1]) + 1  # candidates only
    found: list[str] = []
    for k in overlapping.tolist():
        for j in range(k - 1, -1, -1):  # earlier intervals that reach into k
            if ends[j] <= starts[k]:
                if reach[j] <= starts[k]:
                    break
                continue
            if thread[j] == thread[k]:
                continue
            lo, hi = int(starts[k]), int(min(ends[j], ends[k]))
            a, b = parts[thread[j]], parts[thread[k]]
            bytes_a = bytes(memoryview(a[4].data)[int(data_at[j]) + lo - int(starts[j]):][: hi - lo])
            bytes_b = bytes(memoryview(b[4].data)[int(data_at[k]):][: hi - lo])
            if bytes_a != bytes_b:
                found.append(f"threads {a[0]} and {b[0]} wrote different bytes to [{lo}, {hi})")
                if len(found) >= limit:
                    return found
    return found


def holders(region: Region) -> tuple[int, int, int]:
    """What holds ``region``: buffer exports (numpy views, memoryviews, and
    everything made from them), references (``mem.region`` kept) and weak
    references (which can give it back). Compared before and after a
    thread, at the same place in the same frame: any that grew means the
    thread kept a way to write its memory after it returned."""
    return region.exports, sys.getrefcount(region), weakref.getweakrefcount(region)


def kept(before: tuple[int, int, int], after: tuple[int, int, int]) -> bool:
    """Whether something the last thread left still holds its memory: what
    :func:`holders` said before it and after it (called the same way)."""
    return any(now > then for now, then in zip(after, before))


# The batch whose tracking mode for new mappings was last worked out here,
# weakly (a batch's function and arguments must not outlive it), and the mode.
_last_mode: tuple[weakref.ref, str] | None = None


def _new_mapping_mode(spec: BatchSpec) -> str:
    """``mode_for_new_mapping(spec.tracking)``, worked out once per batch in
    a process: its mlockall probe maps and unmaps a page (~10 us with other
    threads running), and the threads backend's slots share one batch."""
    global _last_mode
    last = _last_mode
    if last is not None and last[0]() is spec:
        return last[1]
    mode = mode_for_new_mapping(spec.tracking)
    _last_mode = (weakref.ref(spec), mode)
    return mode


class Workspace:
    """A worker's thread memory and tracker, reused across batches and resized
    to follow the snapshot (threads and worker processes each hold one).
    A thread function may have closed or resized the memory: it is rebuilt.
    Memory a thread kept a way into (a view, its Region, a weak reference:
    a Python thread it started may write through it later) is never reused:
    it is left to what holds it, closed (so new views of it fail) and the
    next thread gets new memory, so nothing written there after its thread
    returned can merge anywhere (see :meth:`detach`)."""

    def __init__(self) -> None:
        self.region: Region | None = None
        self.tracker: Tracker | None = None
        self.identity = IdentityBuffers()

    def prepare(self, spec: BatchSpec) -> tuple[Region, Tracker]:
        size = round_to_pages(spec.snapshot.size)
        max_size = max(round_to_pages(spec.snapshot.max_size), size)
        if self.region is not None and (self.region.closed or self.region.max_size < max_size):
            self.close()
        if self.region is not None and self.region.size != size:
            try:
                self.region.resize(size)
            except (BufferError, PageforkError, OSError):  # views of a shrunk region live on
                self.close()
        if self.region is None:
            self.region = Region(size, max_size=max_size)
        if not self.region.snapshot_mapped:  # what cow needs to track it (each thread maps it again)
            spec.snapshot.map_to(self.region)
        mode = _new_mapping_mode(spec)  # not cow under mlockall(MCL_FUTURE)
        if self.tracker is None or self.tracker.mode != mode:
            if self.tracker is not None:
                self.tracker.close()
            self.tracker = tracker(mode)
        # Its weak reference to the region made now, not during the first
        # thread, where it would look like one the thread kept.
        self.tracker.native_tracking(self.region, create=True)
        return self.region, self.tracker

    def detach(self) -> None:
        """Leaves the memory to what the last thread kept of it: closed (no
        new view of it, nothing tracks it; views already made keep it
        mapped, and writes through them reach nothing that merges), and the
        next thread gets new memory (:meth:`prepare`)."""
        if self.region is not None:
            self.region.close()
            self.region = None

    def run(self, spec: BatchSpec, indexes: Sequence[int], *, copy_result: bool = False,
            cancel: Cancel | None = None) -> list[ThreadOutcome]:
        """Runs ``indexes`` one after the other; stops early once ``cancel`` is set."""
        outcomes: list[ThreadOutcome] = []
        for i in indexes:
            if cancel is not None and cancel.is_set():
                break
            try:
                region, t = self.prepare(spec)  # new memory after a detach
            except Exception as exc:
                outcomes += [ThreadOutcome(k, error=preparation_error(exc)) for k in indexes[len(outcomes):]]
                break
            before = holders(region)
            outcomes.append(run_thread(spec, i, region, t, copy_result=copy_result, identity=self.identity))
            if kept(before, holders(region)):
                self.detach()
            del region
        return outcomes

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.region is not None:
            self.region.close()
        self.region = self.tracker = None
        self.identity.close()
