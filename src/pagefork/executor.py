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
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from . import _main_memory, _native
from ._batch_thread import Request, manage
from ._errors import ConflictError, PageforkError
from ._kernel_state import refuse_pinned
from ._limits import cannot_start, is_out_of_tasks
from ._log import lazy, log
from ._sizes import PAGE_SIZE, round_to_pages
from ._thread_errors import worker_error
from .batch import (POLL, Backend, BatchSpec, Cancelled, ClosedBackend, find_conflicts,
                    inside_batch_of, thread_tracking_mode)
from .diffs import DiffBatch
from .identity import products_as_overwrites
from .layout import Allocation, ThreadMemory
from .memory import Region
from .merge import MergeOp, MergeRegion
from .snapshot import Snapshot
from .tracking import Tracker, mode_for_new_mapping, probe, tracker

# Allocation (App.arrays' values) and ThreadMemory (a thread function's
# ``mem``) live in layout; still exported from here, where code annotating
# them imported them before the module split.
__all__ = ["BatchStats", "Executor", "MAX_THREADS_PER_BATCH", "DEFAULT_CLOSE_TIMEOUT", "Allocation",
           "ThreadMemory"]

#: The most threads one batch may have (each costs a placement entry, an
#: outcome and a diff batch in the client).
MAX_THREADS_PER_BATCH = 1 << 20

#: Seconds ``App.close`` waits for running thread functions by default.
DEFAULT_CLOSE_TIMEOUT = 10.0

#: Seconds a cancelled batch has to let go before its backend's workers are
#: aborted from the caller's thread (Executor._abort). Killing them sooner
#: changes nothing: a cancelled batch's workers are killed anyway.
ABORT_GRACE = 0.5


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
            # Main memory's tracking failed to re-arm: every page counts as
            # written until a window re-arms it (carried whole, saved whole).
            self._all_written = False
            self._remap_main()
        except BaseException:  # Ctrl-C included: release what exists
            self._release(0.0)
            raise
        self._placements: dict[tuple[int, int], list[int]] = {}
        self._regions_key: tuple | None = None  # the layout merge_regions last built for
        self._regions: list[MergeRegion] = []
        self.last_batch = BatchStats()
        # Pages of the snapshot changed since the last checkpoint (mark_saved):
        # carried main-program writes and merged batches.
        self._unsaved = np.zeros(round_to_pages(max_size) // PAGE_SIZE, np.bool_)
        self._current: Request | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._serving = -1  # the batch thread's ident, once it serves
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
        try:
            _thread.start_new_thread(manage, (weakref.ref(self), self._requests, self._alive))
        except RuntimeError as exc:  # e.g. RLIMIT_NPROC reached: say so
            self._release(0.0)
            if is_out_of_tasks(exc):
                raise cannot_start("the App's batch thread", exc) from exc
            raise

    # ---- main memory ---------------------------------------------------------

    def _remap_main(self) -> None:
        """Maps main memory from the snapshot and tracks it; only while no
        other thread can have it (the App is being made or restored)."""
        self.snapshot.map_to(self.memory)
        mode = mode_for_new_mapping(self._main_mode)  # not cow under mlockall(MCL_FUTURE)
        if mode != self._main_tracker.mode:
            self._main_tracker.close()
            self._main_tracker = tracker(mode)
        self._main_tracker.start(self.memory)

    def _window(self, batches: Sequence[DiffBatch] = (),
                closing: Sequence[Tracker] = ()) -> _main_memory.Window:
        """Carries main memory's written pages into the snapshot, merges
        ``batches`` and maps main memory again, its other writers held
        (see _main_memory); notes the pages carried. ``closing``: trackers
        whose tracking of main memory ends with the old mapping. Refuses
        while io_uring fixed buffers pin main memory: the ring would go on
        writing into the old pages, where nobody reads (looked for only
        here: ~20 us, and a batch that maps nothing again needs no look)."""
        refuse_pinned(self.memory, "a batch, checkpoint or resize")
        stopping = list(closing)
        mode = mode_for_new_mapping(self._main_mode)  # not cow under mlockall(MCL_FUTURE)
        switching = mode != self._main_tracker.mode
        if switching and self._main_tracker.epoch(self.memory) is not None:
            stopping.append(self._main_tracker)
        done = _main_memory.window(self.memory, self.snapshot, batches=batches, closing=stopping,
                                   carry_all=self._all_written)
        if switching:
            self._main_tracker.close()
            self._main_tracker = tracker(mode)
        self._all_written = done.tracking_error is not None
        if self._all_written:
            try:  # the window stopped it for good: a later window starts it again
                self._main_tracker.close()
            except (PageforkError, OSError):
                pass
            _main_memory.warn_tracking_lost(str(done.tracking_error))
        elif not closing and self._main_tracker.epoch(self.memory) is None:
            self._start_main_tracking()  # a new mode, or it could not start before
        self._note_carried(done.carried)
        return done

    def _start_main_tracking(self) -> None:
        """Starts main memory's tracker on a window's new mapping; failing,
        every page counts as written until a window re-arms it."""
        try:
            self._main_tracker.start_fresh(self.memory)
        except (PageforkError, OSError) as exc:
            self._all_written = True
            _main_memory.warn_tracking_lost(str(exc))

    def carry_main_writes(self) -> int:
        """Carries the main program's writes since the last batch into the
        snapshot: the pages it wrote, copied whole. Returns their count.
        Refuses while io_uring fixed buffers pin main memory, where it maps
        main memory again (:meth:`_window`)."""
        if self._all_written or _main_memory.written_pages(self.memory, self._main_tracker).any():
            # Unwritten, main memory shows the snapshot with tracking armed: a
            # window would cost every page mapped, for nothing. A write after
            # this look is a private copy, carried by the next window.
            return int(np.count_nonzero(self._window().carried))
        return 0

    def _note_carried(self, dirty: np.ndarray) -> None:
        """Flags the pages a window carried as unsaved (a new version)."""
        if dirty.any():
            self._unsaved[: dirty.size] |= dirty
            self.version += 1
            self._forget_unshipped_changes()

    def _forget_unshipped_changes(self) -> None:
        """The snapshot records every range written into it (tracked_changes)
        for backends that ship deltas; kept for any other, the record would
        grow with every batch and checkpoint for the App's lifetime."""
        if not self.backend.ships_changes:
            self.snapshot.clear_tracked_changes()

    def begin_restore(self) -> Snapshot:
        """The (empty) snapshot, for a restore to fill before :meth:`restored`;
        nothing may run in between. Main memory's tracking stops until then.

        A restore writes straight into the snapshot's file, only the pages
        that are not zero (the rest stay holes), and main memory is then
        mapped from it: nothing is written twice, and untouched pages stay
        untouched (filling main memory first, then the snapshot from it at
        the first batch, needed the App's size twice)."""
        self._main_tracker.close()  # started again on the new mapping
        return self.snapshot

    def restored(self, version: int) -> None:
        """The snapshot holds a restored image (:meth:`begin_restore`): main
        memory is mapped from it and tracked; version counter set, nothing
        unsaved."""
        self.snapshot.clear_tracked_changes()  # workers get the whole snapshot anyway
        self.snapshot.map_to(self.memory)
        mode = mode_for_new_mapping(self._main_mode)  # not cow under mlockall(MCL_FUTURE)
        if mode != self._main_tracker.mode:
            self._main_tracker = tracker(mode)
        # Failing, every page counts as written (warned) until a window re-arms it.
        self._start_main_tracking()
        self.version = version
        self.mark_saved()

    def _note_merged(self, batch: DiffBatch) -> None:
        """Flags the pages a merged batch changed (IGNORE diffs change
        nothing); costs what the diffs span, not the memory size."""
        if len(batch):
            _native.mark_pages(self._unsaved.view(np.uint8), np.ascontiguousarray(batch.offsets),
                               np.ascontiguousarray(batch.lengths), np.ascontiguousarray(batch.ops),
                               PAGE_SIZE)

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
        """Grows main memory and the snapshot in place (contents kept): the
        new pages map the snapshot's new (zero) pages, the others stay as
        they are, written pages included (the next window carries them).
        Call on the batch thread (``call``)."""
        self.snapshot.grow(size)
        self.memory.grow_file(self.snapshot.mapping.file_fd, round_to_pages(size))
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
        """Refuses calls from a thread function of this executor's own batch,
        and from the batch thread itself (a checkpoint's progress callback):
        both would wait for work queued behind their own, for ever."""
        if inside_batch_of(self.snapshot):
            raise PageforkError("a thread function cannot call app.parallel, alloc or close on its "
                                "own App (the batch it belongs to is still running)")
        if _thread.get_ident() == self._serving:
            raise PageforkError("a callback the App runs (a checkpoint's or restore's progress) cannot "
                                "call app.parallel, alloc, checkpoint or close on that App: it would wait "
                                "for itself")

    def run(self, fn: Callable[..., Any], n: int, args: tuple, layout: dict[str, Allocation],
            timeout: float | None = None) -> list[Any]:
        """Runs a batch on the batch thread and waits for it. Interrupted
        (KeyboardInterrupt or any exception while waiting), or not done
        ``timeout`` seconds after the call (TimeoutError), it cancels the
        batch: main memory and the snapshot stay as before, unless the merge
        had already begun, in which case the batch completes."""
        if self.closed:
            raise PageforkError("the App is closed")
        if n < 1:
            raise ValueError(f"a batch needs at least one thread, got n={n}")
        if n > MAX_THREADS_PER_BATCH:
            raise ValueError(f"a batch has at most {MAX_THREADS_PER_BATCH} threads, got n={n}")
        return self.call(lambda request: self._batch(request, fn, n, args, layout), timeout=timeout)

    def check_owner(self) -> None:
        """Refuses use from a fork()ed child: the batch thread and the
        workers belong to the parent."""
        if os.getpid() != self._pid:
            raise PageforkError(f"this App belongs to process {self._pid}; a fork()ed child cannot use "
                                "it (create a new App in the child)")

    def call(self, work: Callable[[Request], Any], cancellable: bool = True,
             timeout: float | None = None) -> Any:
        """Runs ``work(request)`` on the batch thread, after the batches
        before it, and returns its result. Everything that changes main
        memory or the snapshot goes through here, so it never races a batch
        and is never cut off half-way by KeyboardInterrupt: an interrupted
        caller cancels the work (if it is cancellable) and waits until it no
        longer touches anything. ``timeout`` (seconds from this call, for
        cancellable work) cancels it the same way and raises TimeoutError;
        the backend abandons the workers it ran on (stuck worker processes
        are killed and replaced)."""
        self.check_owner()
        self.check_not_nested()
        request = Request(work, cancellable)
        deadline = None if timeout is None else time.monotonic() + timeout
        abort_at: float | None = None  # when to abort the backend's workers (a batch that timed out)
        try:
            self._requests.put(request)
            # Woken now and then: a SIGINT that another thread received (or
            # _thread.interrupt_main) only raises once this thread runs bytecode.
            # (A deadline sooner than the next poll is waited for exactly: a
            # batch that ends within a poll of its deadline is still late.)
            while not request.done.wait(POLL if deadline is None else
                                        max(0.0, min(POLL, deadline - time.monotonic()))):
                if not self._alive.is_set():
                    raise PageforkError("the App's batch thread has ended (interpreter shutdown?)")
                if deadline is not None and time.monotonic() >= deadline:
                    request.interrupt("timeout")  # then it lets go as for Ctrl-C, or finishes its merge
                    deadline, abort_at = None, time.monotonic() + ABORT_GRACE
                if abort_at is not None and time.monotonic() >= abort_at:
                    self._abort(request)
                    abort_at = None
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

    def _settle(self, request: Request) -> None:
        """Waits for interrupted work to stop touching shared state. A batch
        lets go within a fraction of a second (backends react to the cancel)
        or finishes a merge that began; further interrupts do not stop that
        wait, as the batch remaps main memory when it ends, which would drop
        the writes a caller let go early makes next. Work that cannot be
        cancelled (alloc, a checkpoint's writes to a slow store) may be left
        to finish in the background by another interrupt. A cancelled batch
        that has not let go after :data:`ABORT_GRACE` seconds has its
        workers aborted (:meth:`_abort`)."""
        abort_at: float | None = time.monotonic() + ABORT_GRACE
        while True:
            try:
                while not request.done.wait(POLL) and self._alive.is_set():
                    if abort_at is not None and time.monotonic() >= abort_at:
                        self._abort(request)
                        abort_at = None
                return
            except BaseException:  # another Ctrl-C: the first one is re-raised after
                if not request.cancellable:
                    return

    def _abort(self, request: Request) -> None:
        """Aborts the workers still running ``request``'s batch, if it was
        cancelled (not merging) and the backend can: ``abort(cancel)``,
        called from this, the caller's thread, as the batch thread may be
        blocked in a read that no cancel check interrupts (a worker that
        sent half a reply and hangs). The backend then lets go as for any
        cancel."""
        abort = getattr(self.backend, "abort", None)
        if request.cancel.is_set() and abort is not None:
            abort(request.cancel)  # (a no-op if its batch has ended meanwhile)

    def serve(self, request: Request) -> None:
        """Runs one request on the batch thread."""
        self._serving = _thread.get_ident()
        if not request.start():
            request.error = self._cancelled_error(request)
            return
        if self.closed:
            request.error = PageforkError("the App is closed")
            return
        self._current = request
        try:
            request.result = request.work(request)
        except Cancelled:
            request.error = self._cancelled_error(request)
        except BaseException as exc:
            request.error = exc
        finally:
            self._current = None

    @staticmethod
    def _cancelled_error(request: Request) -> BaseException:
        """What the caller of cancelled work gets, by why it was cancelled."""
        if request.why == "closed":
            return PageforkError("the App was closed while the batch ran; nothing merged")
        if request.why == "timeout":
            return TimeoutError("the batch did not finish in time; nothing merged, and the workers "
                                "running it were abandoned (stuck worker processes are replaced)")
        return KeyboardInterrupt()

    def _batch(self, request: Request, fn: Callable[..., Any], n: int, args: tuple,
               layout: dict[str, Allocation]) -> list[Any]:
        stats = BatchStats(threads=n)
        t0 = time.perf_counter()
        stats.main_dirty_pages = self.carry_main_writes()
        regions = self.merge_regions(layout)
        t1 = time.perf_counter()
        follow = getattr(self.backend, "follow_workers", None)
        if follow is not None:  # a cluster's workers come and go: slots follow them before placing
            follow(request.cancel)
        placement, stats.placement_cached = self.placement(n)
        spec = BatchSpec(fn, n, args, self.snapshot, layout, regions, self.thread_mode, self.version,
                         (self.memory.address, self.memory.address + self.memory.max_size))
        log.debug("batch of %d threads starts on the %s backend", n, self.backend.name)
        ran = self.backend.run(spec, placement, request.cancel)
        outcomes = sorted(ran.outcomes, key=lambda o: o.index)
        t2 = time.perf_counter()
        stats.bytes_shipped = ran.bytes_shipped
        failed = [o for o in outcomes if o.error is not None]
        log.debug("batch: threads done in %.1f ms, %d failed", (t2 - t1) * 1e3, len(failed))
        if len(outcomes) != n and not failed:
            raise PageforkError(f"the {self.backend.name} backend reported {len(outcomes)} of {n} threads")
        if failed:
            self.last_batch = stats
            raise worker_error(failed, n)  # its __cause__: the thread's exception, where it could be rebuilt
        if self.detect_conflicts:
            conflicts = find_conflicts(outcomes)
            if conflicts:
                self.last_batch = stats
                raise ConflictError("; ".join(conflicts))
        batches = [o.diffs for o in outcomes if o.diffs is not None]
        batches += ran.combined
        stats.diffs = sum(len(b) for b in batches)
        stats.diff_bytes = sum(b.nbytes for b in batches)
        stats.dirty_pages = sum(o.dirty_pages for o in outcomes)
        if not request.begin_commit():
            raise Cancelled()
        remap = 0.0
        # Nothing to merge: main memory stays as it is (it maps the unchanged
        # snapshot with tracking armed; its writes are carried by the next
        # window). Else main memory written while the batch ran (other Python
        # threads, or thread functions writing the App's arrays directly) is
        # carried first, as if written just before the batch, then the
        # threads' changes merge, in one window (_main_memory). Identity
        # products read the carried values.
        if stats.diffs:
            if any(a.start == "identity" and a.merge is MergeOp.PRODUCT for a in layout.values()):
                _main_memory.carry_without_remap(self.memory, self.snapshot, self._main_tracker)
            batches = products_as_overwrites(batches, layout.values(), self.snapshot)
            done = self._window(batches)  # the merge checked first: all or nothing
            stats.main_dirty_pages += int(np.count_nonzero(done.carried))
            if done.refused is not None:
                self.last_batch = stats
                raise done.refused
            for batch in batches:
                self._note_merged(batch)
            self._forget_unshipped_changes()
            self.version += 1
            remap = done.seconds[3]  # the new mapping, its arming and the writers' wake-up
        t4 = time.perf_counter()
        stats.times = {"carry": t1 - t0, "run": t2 - t1, "merge": t4 - t2 - remap, "remap": remap}
        log.debug("batch merged: %s", lazy(stats.summary))
        self.last_batch = stats
        return [o.result for o in outcomes]

    def merge_regions(self, layout: dict[str, Allocation]) -> list[MergeRegion]:
        """The batch's merge regions: one per array by its rule (in units of
        :attr:`Allocation.merge_dtype`), gaps OVERWRITE; built again only
        when the layout's rules changed (an alloc)."""
        key = tuple((a.offset, a.nbytes, a.merge_dtype, a.merge) for a in layout.values())
        if key == self._regions_key:
            return self._regions
        self.snapshot.clear_merge_regions()
        for a in sorted(layout.values(), key=lambda a: a.offset):
            if a.nbytes:
                self.snapshot.add_merge_region(a.offset, a.nbytes, a.merge_dtype, a.merge)
        self.snapshot.fill_gaps(MergeOp.OVERWRITE)
        self._regions_key, self._regions = key, self.snapshot.merge_regions
        return self._regions

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
        request = Request(lambda request: self._close_now(deadline), cancellable=False, skippable=False)
        self._requests.put(request)
        while not request.done.wait(POLL):
            if not self._alive.is_set():
                self.closed = True
                return
            current = self._current
            if time.monotonic() > deadline and current is not None and current is not request:
                current.interrupt("closed")  # it lets go within a fraction of a second
                if time.monotonic() > deadline + ABORT_GRACE:
                    self._abort(current)  # it did not (again each poll: a no-op once its workers are gone)
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
        backend, self.backend = self.backend, ClosedBackend(self.backend.name)
        abandoned = backend.close(timeout) or 0
        # Those that exist (__init__ may have failed part-way).
        for name in ("_main_tracker", "memory", "snapshot"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        return abandoned


def _close_backend(backend: Backend, pid: int) -> None:
    """Stops the workers of an App that was never closed (garbage-collected,
    or open at interpreter exit), unless this is a fork()ed child."""
    if os.getpid() == pid:
        backend.close(1.0)
