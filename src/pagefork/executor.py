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

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ._errors import ConflictError, MergeError, PageforkError, WorkerError
from ._sizes import PAGE_SIZE, round_to_pages
from .memory import Region
from .snapshot import DiffBatch, MergeOp, MergeRegion, Snapshot
from .tracking import Tracker, probe, tracker

__all__ = ["Allocation", "BatchSpec", "BatchStats", "Executor", "ThreadMemory", "ThreadOutcome",
           "Backend", "Workspace", "run_thread", "thread_tracking_mode"]


@dataclass(frozen=True)
class Allocation:
    """A named array in main memory."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    merge: MergeOp

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def view(self, region: Region) -> np.ndarray:
        return region.array(self.dtype, self.shape, self.offset)


class ThreadMemory:
    """What a thread function gets as ``mem``: ``mem[name]`` is that thread's
    view of the named array; ``mem.region`` its whole memory."""

    def __init__(self, region: Region, layout: dict[str, Allocation]) -> None:
        self.region = region
        self._layout = layout

    def __getitem__(self, name: str) -> np.ndarray:
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

    def run(self, spec: BatchSpec, placement: Sequence[int]) -> list[ThreadOutcome]: ...

    def close(self) -> None: ...


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


def run_thread(spec: BatchSpec, index: int, region: Region, tracker_: Tracker) -> ThreadOutcome:
    """Runs thread ``index`` of a batch on ``region`` (any backend, any
    process): map the snapshot, track, call, diff."""
    try:
        spec.snapshot.map_to(region)
        tracker_.start(region)
        try:
            result = spec.fn(ThreadMemory(region, spec.layout), index, spec.n, *spec.args)
        finally:
            tracker_.stop(region)
        dirty = tracker_.dirty_pages(region, "global")
        diffs = spec.snapshot.diff(region, dirty, regions=spec.merge_regions)
        return ThreadOutcome(index, result, diffs, int(np.count_nonzero(dirty)))
    except BaseException as exc:  # the thread's own error, reported with its traceback
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
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
    to follow the snapshot (threads and worker processes each hold one)."""

    def __init__(self) -> None:
        self.region: Region | None = None
        self.tracker: Tracker | None = None

    def prepare(self, spec: BatchSpec) -> tuple[Region, Tracker]:
        size = round_to_pages(spec.snapshot.size)
        max_size = max(round_to_pages(spec.snapshot.max_size), size)
        if self.region is None or self.region.max_size < max_size:
            self.close()
            self.region = Region(size, max_size=max_size)
        elif self.region.size != size:
            self.region.resize(size)
        if self.tracker is None or self.tracker.mode != spec.tracking:
            if self.tracker is not None:
                self.tracker.close()
            self.tracker = tracker(spec.tracking)
        return self.region, self.tracker

    def run(self, spec: BatchSpec, indexes: Sequence[int]) -> list[ThreadOutcome]:
        region, t = self.prepare(spec)
        return [run_thread(spec, i, region, t) for i in indexes]

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.region is not None:
            self.region.close()
        self.region = self.tracker = None


class Executor:
    """Owns main memory, the main snapshot and a backend; runs batches."""

    def __init__(self, size: int, max_size: int, backend: Backend, *, tracking: str | None = None,
                 detect_conflicts: bool = False) -> None:
        self.backend = backend
        self.detect_conflicts = detect_conflicts
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
        self._remap_main()
        self._placements: dict[tuple[int, int], list[int]] = {}
        self.last_batch = BatchStats()
        self.closed = False
        # Pages of the snapshot changed since the last checkpoint (mark_saved):
        # carried main-program writes and merged batches.
        self._unsaved = np.zeros(round_to_pages(max_size) // PAGE_SIZE, np.bool_)
        self.lock = threading.RLock()  # batches, checkpoints and restores serialize

    # ---- main memory ---------------------------------------------------------

    def _remap_main(self) -> None:
        self.snapshot.map_to(self.memory)
        self._main_tracker.start(self.memory)

    def carry_main_writes(self) -> int:
        """Carries the main program's writes since the last batch into the
        snapshot: the pages it wrote, copied whole. Returns their count."""
        dirty = self._main_tracker.dirty_pages(self.memory, "global")
        n = int(np.count_nonzero(dirty))
        if n:
            self.snapshot.write_pages(self.memory, dirty)
            self._unsaved[: dirty.size] |= dirty
            self.version += 1
        self._remap_main()  # drops the private copies and re-arms tracking
        return n

    def _note_merged(self, batch: DiffBatch) -> None:
        """Flags the pages a merged batch changed (IGNORE diffs change
        nothing); costs what the diffs span, not the memory size."""
        keep = (batch.ops != MergeOp.IGNORE) & (batch.lengths > 0)
        if not keep.any():
            return
        first = batch.offsets[keep] // PAGE_SIZE
        counts = (batch.offsets[keep] + batch.lengths[keep] - 1) // PAGE_SIZE - first + 1
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

    def writable_snapshot(self) -> Region:
        """The snapshot's own memory, for a restore to fill before
        :meth:`restored` (nothing may run in between)."""
        return self.snapshot._memory

    def restored(self, version: int) -> None:
        """Main memory follows a snapshot a restore filled: remapped, version
        counter set, nothing unsaved."""
        self.snapshot.clear_tracked_changes()
        self._remap_main()
        self.version = version
        self.mark_saved()

    def resize(self, size: int) -> None:
        """Grows main memory and the snapshot in place (contents kept)."""
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
        self._placements[key] = placement
        return placement, False

    def run(self, fn: Callable[..., Any], n: int, args: tuple, layout: dict[str, Allocation]) -> list[Any]:
        with self.lock:
            return self._run(fn, n, args, layout)

    def _run(self, fn: Callable[..., Any], n: int, args: tuple, layout: dict[str, Allocation]) -> list[Any]:
        if self.closed:
            raise PageforkError("the executor is closed")
        if n < 1:
            raise ValueError(f"a batch needs at least one thread, got n={n}")
        stats = BatchStats(threads=n)
        t0 = time.perf_counter()
        stats.main_dirty_pages = self.carry_main_writes()
        regions = self.merge_regions(layout)
        t1 = time.perf_counter()
        placement, stats.placement_cached = self.placement(n)
        spec = BatchSpec(fn, n, tuple(args), self.snapshot, layout, regions, self.thread_mode,
                         self.version)
        outcomes = sorted(self.backend.run(spec, placement), key=lambda o: o.index)
        t2 = time.perf_counter()
        stats.bytes_shipped = sum(o.bytes_shipped for o in outcomes)
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            first = failed[0]
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
        """The batch's merge regions: one per array by its rule, gaps OVERWRITE."""
        self.snapshot.clear_merge_regions()
        for a in sorted(layout.values(), key=lambda a: a.offset):
            if a.nbytes:
                self.snapshot.add_merge_region(a.offset, a.nbytes, a.dtype, a.merge)
        self.snapshot.fill_gaps(MergeOp.OVERWRITE)
        return self.snapshot.merge_regions

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.backend.close()
        self._main_tracker.close()
        self.memory.close()
        self.snapshot.close()
