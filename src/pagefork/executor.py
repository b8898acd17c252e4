"""The fork-join executor: the main snapshot's lifecycle, batches of threads
on a backend, the placement cache, merging and remapping.

Main memory is a private (copy-on-write) mapping of the main snapshot from
the start. Before a batch, the pages the main program wrote since the last
one are diffed and carried into the snapshot (tracked, never copied
wholesale). Each thread maps the snapshot copy-on-write, runs, and returns
the diff of the pages it wrote. At the join the diffs merge into the
snapshot by the merge regions' rules, in thread order, all or nothing, and
main memory is mapped from the merged snapshot again.
"""

from __future__ import annotations

import _thread
import ast
import errno
import io
import math
import os
import pickle
import queue
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import cloudpickle
import numpy as np

from . import _native
from ._errors import ConflictError, MergeError, PageforkError, UnsupportedModeError, WorkerError
from ._sizes import PAGE_SIZE, round_to_pages
from .identity import IdentityBuffers, products_as_overwrites, with_contributions
from .memory import Region
from .snapshot import DataType, DiffBatch, MergeOp, MergeRegion, Snapshot
from .tracking import Tracker, probe, tracker

__all__ = ["Allocation", "BatchSpec", "BatchStats", "Cancelled", "Cancel", "Executor", "ThreadMemory",
           "ThreadOutcome", "Backend", "Workspace", "run_thread", "call_thread_function", "call_tracked",
           "check_thread_memory", "thread_tracking_mode", "dtype_of",
           "dtype_text", "MAX_THREADS_PER_BATCH", "MAX_TRACKED_REGIONS", "DEFAULT_CLOSE_TIMEOUT"]

#: The most threads one batch may have (each costs a placement entry, an
#: outcome and a diff batch in the client).
MAX_THREADS_PER_BATCH = 1 << 20

#: Seconds ``App.close`` waits for running thread functions by default.
DEFAULT_CLOSE_TIMEOUT = 10.0

# How often a thread that waits for workers looks at its Cancel (seconds).
POLL = 0.05


def dtype_text(dt: np.dtype) -> str:
    """A dtype as text that :func:`dtype_of` turns back into it: ``dt.str``
    for plain dtypes, the ``.npy`` descr for structured ones."""
    if dt.fields is None:
        return dt.str
    return repr(np.lib.format.dtype_to_descr(dt))


def dtype_of(text: str) -> np.dtype:
    """The dtype :func:`dtype_text` wrote."""
    if text.startswith("["):
        return np.lib.format.descr_to_dtype(ast.literal_eval(text))
    return np.dtype(text)


class Cancelled(Exception):
    """A backend's answer to a cancelled batch (the caller was interrupted)."""


class Cancel:
    """Set when the caller of a batch was interrupted (or the App closes):
    backends stop waiting, abandon the batch's workers and raise Cancelled."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
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
class Allocation:
    """A named array in main memory."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    merge: MergeOp
    start: str = "snapshot"  # or "identity": threads start from the rule's identity (identity.py)

    @property
    def np_dtype(self) -> np.dtype:
        return dtype_of(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize

    def view(self, region: Region) -> np.ndarray:
        return region.array(self.np_dtype, self.shape, self.offset)


class ThreadMemory:
    """What a thread function gets as ``mem``: ``mem[name]`` is that thread's
    view of the named array; ``mem.region`` its whole memory. An array
    allocated with ``start="identity"`` is a separate buffer starting at its
    rule's identity; ``mem.region`` still holds the snapshot's bytes there
    (and writes to them merge as changes to the shared value, as with
    ``start="snapshot"``)."""

    def __init__(self, region: Region, layout: dict[str, Allocation],
                 identity: dict[str, np.ndarray] | None = None) -> None:
        self.region = region
        self._layout = layout
        self._identity = identity or {}

    def __getitem__(self, name: str) -> np.ndarray:
        own = self._identity.get(name)
        if own is not None:
            return own[...]  # a new view: the thread may reshape it freely
        try:
            return self._layout[name].view(self.region)
        except KeyError:
            raise KeyError(f"no array named {name!r}; allocated: {sorted(self._layout)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._layout

    def keys(self) -> list[str]:
        return list(self._layout)


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
        buffer = io.BytesIO()
        _WorkerPickler(buffer, self.main_memory).dump(obj)
        return buffer.getvalue()


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
    bytes_shipped: int = 0
    # Diffs its worker combined from several threads of the batch (regions
    # whose merge is order-free, see backends/combine.py); merged once.
    combined: DiffBatch | None = None


class Backend(Protocol):
    """Runs the threads of a batch. ``slots`` workers; ``placement[i]`` names
    the slot thread ``i`` runs on."""

    name: str
    slots: int

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> list[ThreadOutcome]:
        """Every thread's outcome; raises Cancelled soon after ``cancel`` is
        set, leaving no worker that could still touch a later batch."""
        ...

    def close(self, timeout: float) -> int:
        """Stops the workers, waiting at most ``timeout`` seconds for running
        thread functions; returns how many were still running (abandoned)."""
        ...


@dataclass
class BatchStats:
    """What the last batch did (``App.last_batch``)."""

    threads: int = 0
    dirty_pages: int = 0
    diffs: int = 0
    diff_bytes: int = 0
    bytes_shipped: int = 0
    placement_cached: bool = False
    main_dirty_pages: int = 0
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.times.items())
        return (f"{self.threads} threads, {self.dirty_pages} pages dirtied, {self.diffs} diffs "
                f"({self.diff_bytes} bytes), {self.bytes_shipped} bytes shipped, placement "
                f"{'cached' if self.placement_cached else 'new'}; {phases}")


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


_PREPARATION = "cannot prepare thread memory: "


def _preparation_error(exc: BaseException) -> str:
    """Why thread memory could not be mapped and tracked."""
    text = _PREPARATION +  "".join(traceback.format_exception_only(exc)).strip()
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


def call_thread_function(spec: BatchSpec, index: int, region: Region,
                         identity: dict[str, np.ndarray] | None = None) -> Any:
    """Calls thread ``index``'s function on ``region`` (and the buffers of
    the identity arrays), marking this Python thread as inside the batch (so
    it cannot call its own App)."""
    previous = getattr(_inside, "snapshot", None)
    _inside.snapshot = spec.snapshot
    try:
        return spec.fn(ThreadMemory(region, spec.layout, identity), index, spec.n, *spec.args)
    finally:
        _inside.snapshot = previous


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
        tracker_.start(region)
    except BaseException as exc:  # not the thread's fault: say what the workspace lacks
        return ThreadOutcome(index, error=_preparation_error(exc))
    try:
        result, dirty = call_tracked(spec, index, region, tracker_, views)
        diffs = spec.snapshot.diff(region, dirty, regions=spec.merge_regions)
        if identity is not None:
            diffs = with_contributions(diffs, identity.collect())
        if copy_result and type(result) not in _IMMUTABLE:
            try:
                result = _copied(result)
            except BaseException as exc:
                raise PageforkError(f"cannot copy the result ({type(result).__name__}) out of thread "
                                    f"memory: {exc!r}") from exc
        return ThreadOutcome(index, result, diffs, int(np.count_nonzero(dirty)))
    except BaseException as exc:  # the thread's own error, SystemExit included
        return ThreadOutcome(index, error="".join(traceback.format_exception(exc)))


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


class Workspace:
    """A worker's thread memory and tracker, reused across batches and resized
    to follow the snapshot (threads and worker processes each hold one).
    A thread function may have closed or resized the memory: it is rebuilt."""

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
        if self.tracker is None or self.tracker.mode != spec.tracking:
            if self.tracker is not None:
                self.tracker.close()
            self.tracker = tracker(spec.tracking)
        return self.region, self.tracker

    def run(self, spec: BatchSpec, indexes: Sequence[int], *, copy_result: bool = False,
            cancel: Cancel | None = None) -> list[ThreadOutcome]:
        """Runs ``indexes`` one after the other; stops early once ``cancel`` is set."""
        try:
            region, t = self.prepare(spec)
        except Exception as exc:
            return [ThreadOutcome(i, error=_preparation_error(exc)) for i in indexes]
        outcomes = []
        for i in indexes:
            if cancel is not None and cancel.is_set():
                break
            outcomes.append(run_thread(spec, i, region, t, copy_result=copy_result, identity=self.identity))
        return outcomes

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.region is not None:
            self.region.close()
        self.region = self.tracker = None
        self.identity.close()


class _Latch:
    """Set once by the batch thread; waited for by callers that Ctrl-C may
    interrupt at any bytecode. threading.Event is not safe there: a
    KeyboardInterrupt raised while Condition.wait re-acquires the Event's
    lock leaves the waiter releasing a lock it never got back, which is the
    one the batch thread holds while setting it (the batch thread then dies
    with "release unlocked lock"). A bare lock's timed acquire is either
    completed or not, and the flag is read first."""

    def __init__(self) -> None:
        self._flag = False
        self._lock = _thread.allocate_lock()
        self._lock.acquire()  # released once, by set()

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float) -> bool:
        """Whether it is set, waiting at most ``timeout`` seconds."""
        if self._flag:
            return True
        if self._lock.acquire(True, timeout):
            self._lock.release()  # for other waiters; an interrupt before this only costs them a poll
        return self._flag


class _Request:
    """One piece of work for the batch thread (a batch, an alloc, a close),
    and how it ended."""

    def __init__(self, work: Callable[[_Request], Any], cancellable: bool = True,
                 skippable: bool = True) -> None:
        self.work = work
        self.cancellable = cancellable  # may be stopped once started (batches)
        self.skippable = skippable      # may be dropped before it starts (not close)
        self.cancel = Cancel()
        self.lock = threading.Lock()  # orders cancelling against starting and committing
        self.started = False
        self.committing = False
        self.why = ""
        self.done = _Latch()
        self.result: Any = None
        self.error: BaseException | None = None

    def interrupt(self, why: str = "interrupted") -> bool:
        """Cancels the work if it has not started (and may be skipped), or
        has started, may be stopped, and has not begun to merge. Returns
        whether the caller must wait for it to let go (it started)."""
        with self.lock:
            if self.cancel.is_set() or self.committing:
                return self.started
            if (self.skippable and not self.started) or (self.cancellable and self.started):
                self.why = why
                self.cancel.set()
            return self.started

    def start(self) -> bool:
        """Called by the batch thread; False if the work was dropped first."""
        with self.lock:
            if self.cancel.is_set():
                return False
            self.started = True
            return True

    def begin_commit(self) -> bool:
        """From here on the batch merges whatever happens; False if it was
        cancelled first."""
        with self.lock:
            if self.cancel.is_set():
                return False
            self.committing = True
            return True


def _manage(executor_ref: weakref.ref[Executor], requests: queue.SimpleQueue, alive: threading.Event) -> None:
    """The batch thread: runs queued batches one at a time. Python raises
    KeyboardInterrupt only in the main thread, so nothing here is ever cut
    off half-way; a caller that is interrupted cancels its request instead."""
    try:
        while True:
            request = requests.get()
            if request is None:
                return
            executor = executor_ref()
            if executor is None:
                return
            try:
                executor._serve(request)
            finally:
                request.done.set()
                del executor, request
    finally:
        alive.clear()


class Executor:
    """Owns main memory, the main snapshot and a backend; runs batches.

    Batches run one at a time on the executor's batch thread; ``run`` may be
    called from any Python thread and waits for its turn. An interrupted
    caller cancels its batch: nothing merges, and the backend abandons the
    workers that were running it (processes are replaced, thread memory is
    never reused while its thread function still runs).
    """

    def __init__(self, size: int, max_size: int, backend: Backend, *, tracking: str | None = None,
                 detect_conflicts: bool = False) -> None:
        self.closed = False
        self.backend = backend
        self.detect_conflicts = detect_conflicts
        try:
            self.snapshot = Snapshot(size=size, max_size=max_size)
            self.memory = Region(size, max_size=max_size)
            self.version = 0
            self.thread_mode = thread_tracking_mode(tracking)
            # Main memory: a private mapping of the snapshot, so cow tracks the
            # main program's writes for free; other modes where cow cannot work
            # or where the caller asked for one.
            self._main_mode = self.thread_mode if tracking not in (None, "auto") else (
                "cow" if probe()["cow"].available else tracker("auto").mode)
            self._main_tracker = tracker(self._main_mode)
            # Set between a restore and the snapshot's fill (see begin_restore).
            self._restore_tracker: Tracker | None = None
            self._remap_main()
        except BaseException:  # Ctrl-C included: release what exists
            self._release(0.0)
            raise
        self._placements: dict[tuple[int, int], list[int]] = {}
        self.last_batch = BatchStats()
        # Pages of the snapshot changed since the last checkpoint (mark_saved):
        # carried main-program writes and merged batches.
        self._unsaved = np.zeros(round_to_pages(max_size) // PAGE_SIZE, np.bool_)
        self._current: _Request | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        # Workers, sockets and the batch thread belong to this process; a
        # fork()ed child must not use them (or stop them when it exits).
        self._pid = os.getpid()
        weakref.finalize(self, self._requests.put, None)
        # An App dropped without close() still stops its workers.
        self._backend_finalizer = weakref.finalize(self, _close_backend, backend, self._pid)
        # A plain thread, started without threading.Thread.start (which waits
        # and so can be interrupted after the thread exists).
        self._alive = threading.Event()
        self._alive.set()
        _thread.start_new_thread(_manage, (weakref.ref(self), self._requests, self._alive))

    # ---- main memory ---------------------------------------------------------

    def _remap_main(self) -> None:
        self.snapshot.map_to(self.memory)
        self._main_tracker.start(self.memory)

    def _main_dirty(self) -> np.ndarray:
        return self._main_tracker.dirty_pages(self.memory, "global")

    def carry_main_writes(self) -> int:
        """Carries the main program's writes since the last batch into the
        snapshot: the pages it wrote, copied whole. Returns their count.
        After a restore, first fills the snapshot from main memory."""
        if self._restore_tracker is not None:
            dirty = self._fill_snapshot()
        else:
            dirty = self._main_dirty()
            if dirty.any():
                self.snapshot.write_pages(self.memory, dirty)
                # Drops the private copies and re-arms tracking. Unwritten,
                # main memory already shows the snapshot with tracking armed,
                # and a remap would cost every page the program has mapped (a
                # checkpoint after reading all of 1 GiB: ~60 ms for nothing).
                self._remap_main()
        n = int(np.count_nonzero(dirty))
        if n:
            self._unsaved[: dirty.size] |= dirty
            self.version += 1
        return n

    def begin_restore(self) -> Region:
        """Main memory as fresh anonymous memory (huge pages allowed) for a
        restore to fill, before :meth:`restored`; nothing may run in between.

        The snapshot stays empty until the first batch, checkpoint or resize
        fills it from main memory (:meth:`carry_main_writes`): a restore
        then costs what reading the bytes into memory costs. Filling a memfd
        first was 2.5x slower where shmem has only 4 KiB pages."""
        self._main_tracker.close()  # only main memory's; started again at the fill
        self.memory._map_anonymous(self.memory.size, True)
        self.memory._snapshot_mapped = False
        return self.memory

    def restored(self, version: int) -> None:
        """Main memory holds a restored image (:meth:`begin_restore`): its
        writes are tracked until the snapshot is filled; version counter set,
        nothing unsaved. Where no page-exact tracker can watch main memory
        (none available, or "none", which would report every page written),
        the snapshot is filled at once instead."""
        self.version = version
        restore_tracker = self._start_restore_tracker()
        if restore_tracker is None:
            self.snapshot._fill_from(self.memory)
            self.snapshot.clear_tracked_changes()
            self._remap_main()
        self._restore_tracker = restore_tracker
        self.mark_saved()

    def _start_restore_tracker(self) -> Tracker | None:
        """A page-exact tracker started on main memory, or None. Where main
        memory is cow-tracked, only uffd-async stands in for cow: like cow it
        lets the kernel write the memory and sees it (read(2), recv_into,
        /proc/self/mem); segfault's protection fails read(2) with EFAULT and
        misses /proc/self/mem, sync uffd fails /proc/self/mem with EIO, and
        "auto" may pick either where it measures cheaper."""
        try:
            restore_tracker = tracker(self._main_mode if self._main_mode != "cow" else "uffd-async")
        except UnsupportedModeError:
            return None
        if restore_tracker.mode == "none":
            return None
        try:
            restore_tracker.start(self.memory)
        except PageforkError:  # e.g. userfaultfd refused at run time
            restore_tracker.close()
            return None
        return restore_tracker

    def _fill_snapshot(self) -> np.ndarray:
        """Copies restored main memory into the empty snapshot and maps main
        memory from it again. Returns the pages the program wrote since the
        restore (copied again if written during the fill)."""
        assert self._restore_tracker is not None
        self.snapshot._fill_from(self.memory)
        dirty = self._restore_tracker.dirty_pages(self.memory, "global")
        if dirty.any():
            self.snapshot.write_pages(self.memory, dirty)
        self.snapshot.clear_tracked_changes()  # workers get the whole snapshot anyway
        self._restore_tracker.close()
        self._restore_tracker = None
        self._remap_main()
        return dirty

    def _note_merged(self, batch: DiffBatch) -> None:
        """Flags the pages a merged batch changed (IGNORE diffs change
        nothing); costs what the diffs span, not the memory size."""
        keep = (batch.ops != MergeOp.IGNORE) & (batch.lengths > 0)
        if not keep.any():
            return
        offsets = batch.offsets if keep.all() else batch.offsets[keep]
        lengths = batch.lengths if keep.all() else batch.lengths[keep]
        first = offsets // PAGE_SIZE
        last = (offsets + lengths - 1) // PAGE_SIZE
        self._unsaved[first] = True  # most diffs (scattered values) end on their first page
        self._unsaved[last] = True
        inner = last - first > 1  # the pages between a long diff's first and last
        if inner.any():
            first, last = first[inner] + 1, last[inner]
            counts = last - first
            starts = np.cumsum(counts) - counts
            pages = np.repeat(first - starts, counts) + np.arange(int(counts.sum()))
            self._unsaved[pages] = True

    def unsaved_pages(self) -> np.ndarray:
        """Flags (one per page of the snapshot) of the pages changed since
        :meth:`mark_saved`; call :meth:`carry_main_writes` first to include
        the main program's latest writes."""
        return self._unsaved[: round_to_pages(self.snapshot.size) // PAGE_SIZE].copy()

    def mark_saved(self) -> None:
        # Only the pages the snapshot has: the rest of the array (sized for
        # max_size, which may be a huge reservation) is never touched.
        self._unsaved[: round_to_pages(self.snapshot.size) // PAGE_SIZE] = False

    def resize(self, size: int) -> None:
        """Grows main memory and the snapshot in place (contents kept).
        Call on the batch thread (``call``)."""
        self.carry_main_writes()
        self.snapshot._grow(size)
        self.memory.resize(size)
        self._remap_main()
        self.version += 1

    # ---- batches ---------------------------------------------------------------

    def placement(self, n: int) -> tuple[list[int], bool]:
        """Thread -> worker slot for a batch of ``n`` threads, reused for
        every batch of the same size (so worker-side caches stay warm)."""
        key = (n, self.backend.slots)
        cached = self._placements.get(key)
        if cached is not None:
            return cached, True
        slots = max(1, self.backend.slots)
        placement = [i % slots for i in range(n)]
        if len(self._placements) > 64:  # batch sizes seen long ago
            self._placements.pop(next(iter(self._placements)))
        self._placements[key] = placement
        return placement, False

    def check_not_nested(self) -> None:
        """Refuses calls from a thread function of this executor's own batch."""
        if inside_batch_of(self.snapshot):
            raise PageforkError("a thread function cannot call app.parallel, alloc or close on its "
                                "own App (the batch it belongs to is still running)")

    def run(self, fn: Callable[..., Any], n: int, args: tuple, layout: dict[str, Allocation]) -> list[Any]:
        """Runs a batch on the batch thread and waits for it. Interrupted
        (KeyboardInterrupt or any exception while waiting), it cancels the
        batch: main memory and the snapshot stay as before, unless the merge
        had already begun, in which case the batch completes."""
        if self.closed:
            raise PageforkError("the App is closed")
        if n < 1:
            raise ValueError(f"a batch needs at least one thread, got n={n}")
        if n > MAX_THREADS_PER_BATCH:
            raise ValueError(f"a batch has at most {MAX_THREADS_PER_BATCH} threads, got n={n}")
        return self.call(lambda request: self._batch(request, fn, n, args, layout))

    def check_owner(self) -> None:
        """Refuses use from a fork()ed child: the batch thread and the
        workers belong to the parent."""
        if os.getpid() != self._pid:
            raise PageforkError(f"this App belongs to process {self._pid}; a fork()ed child cannot use "
                                "it (create a new App in the child)")

    def call(self, work: Callable[[_Request], Any], cancellable: bool = True) -> Any:
        """Runs ``work(request)`` on the batch thread, after the batches
        before it, and returns its result. Everything that changes main
        memory or the snapshot goes through here, so it never races a batch
        and is never cut off half-way by KeyboardInterrupt: an interrupted
        caller cancels the work (if it is cancellable) and waits until it no
        longer touches anything."""
        self.check_owner()
        self.check_not_nested()
        request = _Request(work, cancellable)
        try:
            self._requests.put(request)
            # Woken now and then: a SIGINT that another thread received (or
            # _thread.interrupt_main) only raises once this thread runs bytecode.
            while not request.done.wait(POLL):
                if not self._alive.is_set():
                    raise PageforkError("the App's batch thread has ended (interpreter shutdown?)")
        except BaseException:
            while True:  # a burst of Ctrl-C must not skip the wait below
                try:
                    started = request.interrupt()
                    break
                except BaseException:
                    continue
            if started:  # wait until it no longer touches anything
                self._settle(request)
            raise
        if request.error is not None:
            error, request.error = request.error, None
            raise error
        return request.result

    def _settle(self, request: _Request) -> None:
        """Waits for interrupted work to stop touching shared state. A batch
        lets go within a fraction of a second (backends react to the cancel)
        or finishes a merge that began; further interrupts do not stop that
        wait, as the batch remaps main memory when it ends, which would drop
        the writes a caller let go early makes next. Work that cannot be
        cancelled (alloc, a checkpoint's writes to a slow store) may be left
        to finish in the background by another interrupt."""
        while True:
            try:
                while not request.done.wait(POLL) and self._alive.is_set():
                    pass
                return
            except BaseException:  # another Ctrl-C: the first one is re-raised after
                if not request.cancellable:
                    return

    def _serve(self, request: _Request) -> None:
        """Runs one request on the batch thread."""
        if not request.start():
            request.error = KeyboardInterrupt()
            return
        if self.closed:
            request.error = PageforkError("the App is closed")
            return
        self._current = request
        try:
            request.result = request.work(request)
        except Cancelled:
            request.error = (PageforkError("the App was closed while the batch ran; nothing merged")
                             if request.why == "closed" else KeyboardInterrupt())
        except BaseException as exc:
            request.error = exc
        finally:
            self._current = None

    def _batch(self, request: _Request, fn: Callable[..., Any], n: int, args: tuple,
               layout: dict[str, Allocation]) -> list[Any]:
        stats = BatchStats(threads=n)
        t0 = time.perf_counter()
        stats.main_dirty_pages = self.carry_main_writes()
        regions = self.merge_regions(layout)
        t1 = time.perf_counter()
        placement, stats.placement_cached = self.placement(n)
        spec = BatchSpec(fn, n, args, self.snapshot, layout, regions,
                         self.thread_mode, self.version,
                         (self.memory.address, self.memory.address + self.memory.max_size))
        outcomes = sorted(self.backend.run(spec, placement, request.cancel), key=lambda o: o.index)
        t2 = time.perf_counter()
        stats.bytes_shipped = sum(o.bytes_shipped for o in outcomes)
        failed = [o for o in outcomes if o.error is not None]
        if len(outcomes) != n and not failed:
            raise PageforkError(f"the {self.backend.name} backend reported {len(outcomes)} of {n} threads")
        if failed:
            # A workspace that could not be prepared explains the others' failures
            first = min(failed, key=lambda o: (not (o.error or "").startswith(_PREPARATION), o.index))
            err = WorkerError(f"thread {first.index} of {n} failed:\n{first.error}")
            err.thread = first.index  # type: ignore[attr-defined]
            err.traceback = first.error  # type: ignore[attr-defined]
            err.failed = [o.index for o in failed]  # type: ignore[attr-defined]
            self.last_batch = stats
            raise err
        if self.detect_conflicts:
            conflicts = find_conflicts(outcomes)
            if conflicts:
                self.last_batch = stats
                raise ConflictError("; ".join(conflicts))
        batches = [o.diffs for o in outcomes if o.diffs is not None]
        batches += [o.combined for o in outcomes if o.combined is not None]
        stats.diffs = sum(len(b) for b in batches)
        stats.diff_bytes = sum(b.nbytes for b in batches)
        stats.dirty_pages = sum(o.dirty_pages for o in outcomes)
        if not request.begin_commit():
            raise Cancelled()
        # Main memory written while the batch ran (other Python threads, or
        # thread functions writing the App's arrays directly): carried first,
        # as if written just before the batch, then the threads' changes.
        if self._main_dirty().any():
            stats.main_dirty_pages += self.carry_main_writes()
        batches = products_as_overwrites(batches, layout.values(), self.snapshot)
        try:
            self.snapshot.apply_batches(batches)  # checked first: all or nothing
        except MergeError:
            self.last_batch = stats
            raise
        for batch in batches:
            self._note_merged(batch)
        if stats.diffs:
            self.version += 1
        t3 = time.perf_counter()
        self._remap_main()
        t4 = time.perf_counter()
        stats.times = {"carry": t1 - t0, "run": t2 - t1, "merge": t3 - t2, "remap": t4 - t3}
        self.last_batch = stats
        return [o.result for o in outcomes]

    def merge_regions(self, layout: dict[str, Allocation]) -> list[MergeRegion]:
        """The batch's merge regions: one per array by its rule, gaps OVERWRITE.
        Byte-wise rules merge any dtype as bytes; typed rules use its DataType."""
        self.snapshot.clear_merge_regions()
        for a in sorted(layout.values(), key=lambda a: a.offset):
            if a.nbytes:
                typed = a.merge not in (MergeOp.OVERWRITE, MergeOp.XOR, MergeOp.IGNORE)
                self.snapshot.add_merge_region(a.offset, a.nbytes, a.np_dtype if typed else DataType.RAW,
                                               a.merge)
        self.snapshot.fill_gaps(MergeOp.OVERWRITE)
        return self.snapshot.merge_regions

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Stops the backend and releases memory, on the batch thread after
        the batches queued before. A batch still running after ``timeout``
        seconds is cancelled. Raises TimeoutError if thread functions
        (threads backend) were still running after that. Interrupted, the
        close goes on in the background; calling close again waits for it."""
        if self.closed:
            return
        if os.getpid() != self._pid:  # a fork()ed child: the parent's workers are not ours to stop
            self.closed = True
            self._backend_finalizer.detach()
            return
        self.check_not_nested()
        timeout = max(0.0, timeout)
        deadline = time.monotonic() + timeout
        request = _Request(lambda request: self._close_now(deadline), cancellable=False, skippable=False)
        self._requests.put(request)
        while not request.done.wait(POLL):
            if not self._alive.is_set():
                self.closed = True
                return
            current = self._current
            if time.monotonic() > deadline and current is not None and current is not request:
                current.interrupt("closed")  # it lets go within a fraction of a second
        if request.error is not None:
            error, request.error = request.error, None
            raise error
        abandoned = request.result
        if abandoned:
            raise TimeoutError(
                f"{abandoned} thread function(s) of the {self.backend.name} backend were still running "
                f"{timeout:g} s after close() began; they were abandoned (Python threads cannot be "
                "killed) and release their memory when they return")

    def _close_now(self, deadline: float) -> int:
        self.closed = True
        return self._release(max(0.0, deadline - time.monotonic()))

    def _release(self, timeout: float) -> int:
        """Closes what exists; safe to call again after an interruption."""
        abandoned = 0
        finalizer = getattr(self, "_backend_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        backend, self.backend = self.backend, _ClosedBackend(self.backend.name)
        abandoned = backend.close(timeout) or 0
        for name in ("_restore_tracker", "_main_tracker", "memory", "snapshot"):  # those that exist (__init__ may have failed)
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        return abandoned


def _close_backend(backend: Backend, pid: int) -> None:
    """Stops the workers of an App that was never closed (garbage-collected,
    or open at interpreter exit), unless this is a fork()ed child."""
    if os.getpid() == pid:
        backend.close(1.0)


class _ClosedBackend:
    """What a closed executor holds instead of its backend."""

    slots = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> list[ThreadOutcome]:
        raise PageforkError("the App is closed")

    def close(self, timeout: float) -> int:
        return 0
