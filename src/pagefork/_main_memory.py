"""Windows of an executor's main memory: carrying the program's writes into
the main snapshot, merging a batch into it and mapping main memory from it
again, while every other writer of main memory is held.

Main memory is a private (copy-on-write) mapping of the main snapshot. A
page written after the written pages were read, or while a merge changes
the snapshot under it, is a private copy that mapping main memory again
drops. So each of those steps runs in one native call (``_native.window``)
that keeps the GIL, so no Python code runs meanwhile, and holds every
writer that runs without the GIL (numpy loops, ``read(2)`` into an array,
native threads) with userfaultfd write-protection (or, where it cannot,
``mprotect`` and the SIGSEGV handler); held writers write again on the new
mapping once it is armed. What a held writer waits is the window: the pages
carried, the merge and the mapping.

Which pages a window carries: the ones main memory's trackers saw written
and, for memory mapped from the snapshot, every private copy (whatever the
tracker), so a write a tracker missed (one between mapping and re-arming,
a failed re-arm) is still carried.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from . import _native
from ._errors import MergeError, OutOfBoundsError, PageforkError
from ._kernel_state import new_mappings_locked
from ._sizes import PAGE_SIZE, round_to_pages
from .diffs import DiffBatch
from .memory import Region
from .merge import MergeOp
from .snapshot import Snapshot
from .tracking import Tracker, TrackingFallbackWarning, probe

__all__ = ["HOLD", "Window", "window", "written_pages", "carry_without_remap", "hold_support",
           "warn_tracking_lost"]

#: How writers are held: "auto" (userfaultfd, else mprotect), "mprotect" (the
#: fallback, for tests) or "none" (the GIL alone, for benchmarks).
HOLD = "auto"
_HOLD_CODES = {"auto": 0, "mprotect": 1, "none": 2}
_MERGE_ERRORS = {1: OutOfBoundsError, 2: MergeError, 3: MergeError}


@dataclass(frozen=True)
class HoldSupport:
    """How writers are held here: ``uffd`` (userfaultfd holds them, and the
    kernel's writes too when ``kernel_writes``), else mprotect (``reason``
    says why not), where the kernel's writes fail with EFAULT for a window."""

    uffd: bool
    reason: str
    kernel_writes: bool


@functools.lru_cache(maxsize=1)
def hold_support() -> HoldSupport:
    """How windows hold writers in this process (probed once, on scratch memory)."""
    uffd, reason, kernel_writes = _native.hold_probe()
    return HoldSupport(bool(uffd), reason, bool(kernel_writes))


@dataclass(frozen=True)
class Window:
    """What a window did."""

    carried: np.ndarray       # bool per page of main memory: copied into the snapshot
    refused: PageforkError | None  # why the merge was refused (nothing merged), or None
    hold: str                 # "uffd", "mprotect" or "none"
    hold_error: str | None    # why writers could not be held (they may have lost writes)
    tracking_error: str | None  # a tracker failed to read or re-arm: count every page written
    seconds: tuple[float, float, float, float]  # writers held; of which carry, merge, remap


def _scannable(memory: Region) -> bool:
    """Whether main memory's private copies are its written pages (mapped
    from the snapshot, /proc/self/pagemap readable, and not mapped under
    mlockall(MCL_FUTURE), which copies every page as it maps it)."""
    return memory.snapshot_mapped and probe()["cow"].available and not new_mappings_locked()


def written_pages(memory: Region, tracker_: Tracker) -> np.ndarray:
    """Pages of main memory written since it was last mapped (what a window
    would carry), read without re-arming anything."""
    try:
        flags = tracker_.dirty_pages(memory, "global").copy()
    except PageforkError:  # not tracking (a failed start): the scan below, or everything
        flags = np.ones(memory.n_pages, np.bool_) if not _scannable(memory) else \
            np.zeros(memory.n_pages, np.bool_)
    if tracker_.mode != "cow" and _scannable(memory):
        # (a userfaultfd tracker's markers read as swapped copies; it saw
        # every write to a copy swapped out since)
        private = np.zeros(memory.n_pages, np.uint8)
        _native.private_pages(memory, private, tracker_.mode in ("uffd", "uffd-async"))
        flags |= private.view(np.bool_)
    return flags


def carry_without_remap(memory: Region, snapshot: Snapshot, tracker_: Tracker) -> None:
    """Copies the pages written so far into the snapshot, holding nobody and
    mapping nothing (a write meanwhile stays a private copy, carried by the
    next window): for a merge that must read the main program's writes."""
    snapshot.write_pages(memory, written_pages(memory, tracker_))


def _merge_columns(batches: Sequence[DiffBatch]) -> tuple[list[tuple], list[tuple[np.ndarray, np.ndarray]]]:
    """Private copies of the batches' index columns (what is checked is what
    is applied) and the ranges each changes, for tracked_changes."""
    columns, records = [], []
    for batch in batches:
        if len(batch) == 0 and batch.nbytes == 0:
            continue
        offsets, lengths = np.array(batch.offsets, np.int64), np.array(batch.lengths, np.int64)
        ops = np.array(batch.ops, np.uint8)
        if len(offsets) != len(lengths) or len(offsets) == 0:
            raise MergeError(f"malformed diff batch: {len(offsets)} offsets, {len(lengths)} "
                             f"lengths, {len(memoryview(batch.data))} bytes of data")
        columns.append((offsets, lengths, np.array(batch.dtypes, np.uint8), ops, batch.data))
        keep = ops != MergeOp.IGNORE
        records.append((offsets, lengths) if keep.all() else (offsets[keep], lengths[keep]))
    return columns, records


def window(memory: Region, snapshot: Snapshot, *, batches: Sequence[DiffBatch] = (),
           closing: Sequence[Tracker] = (), carry_all: bool = False) -> Window:
    """Carries main memory's written pages (all of them with ``carry_all``)
    into ``snapshot``, merges ``batches`` on top (all or nothing: a refused
    merge is ``refused``, a MergeError or OutOfBoundsError, and the carry
    and the new mapping happen anyway), stops the trackers in ``closing``
    and maps ``memory`` from the snapshot again, with its other writers held
    throughout. Main memory's other trackers are armed on the new mapping,
    their flags cleared."""
    columns, records = _merge_columns(batches)
    flags = (np.ones if carry_all else np.zeros)(memory.n_pages, np.uint8)
    scan = _scannable(memory)
    stopping = [t.native_tracking(memory, create=False) for t in closing]
    with snapshot.held_open():
        if memory.size > round_to_pages(snapshot.size):
            raise OutOfBoundsError(f"main memory ({memory.size} bytes) is larger than its snapshot "
                                   f"({snapshot.size} bytes)")
        # Diffs past the end grow the snapshot (a thread grew its memory),
        # as Snapshot.apply does: undone if the merge is refused.
        size = snapshot.size
        end = max((int((c[0] + c[1]).max()) for c in columns), default=0)
        if end > snapshot.max_size:
            raise OutOfBoundsError(f"a diff ends at byte {end}, past the snapshot's max_size "
                                   f"({snapshot.max_size})")
        if end > size:
            snapshot.grow(end)
        with memoryview(snapshot.mapping) as whole:
            hold, hold_error, refused, tracking_error, seconds = _native.window(
                memory, whole[: snapshot.size], snapshot.mapping.file_fd, flags, int(scan), columns,
                stopping, _HOLD_CODES[HOLD])
        memory.snapshot_mapped = True
        carried = flags.view(np.bool_)
        pages = np.flatnonzero(carried[: -(-min(memory.size, snapshot.size) // PAGE_SIZE)])
        if pages.size:
            starts = pages.astype(np.int64) * PAGE_SIZE
            snapshot.note_changes([(starts, np.minimum(starts + PAGE_SIZE, snapshot.size) - starts)])
        if refused is None:
            snapshot.note_changes(records)
        else:
            snapshot.undo_growth(size)
    for t in closing:
        t.close()
    if hold_error is not None:
        warnings.warn(f"pagefork could not hold the writers of main memory for a window ({hold_error}); "
                      "a write made meanwhile without the GIL (numpy, read(2), native threads) may be "
                      "lost", RuntimeWarning, stacklevel=3)
    error = None
    if refused is not None:
        problem, message = refused
        error = _MERGE_ERRORS[problem](message if problem != 2 else f"malformed diff batch: {message}")
    return Window(carried, error, hold, hold_error, tracking_error, seconds)


def warn_tracking_lost(why: str) -> None:
    """Says that main memory's tracking failed and every page now counts as
    written (stacklevel: the caller of the App method)."""
    warnings.warn(f"tracking of main memory failed ({why}): until it is re-armed every page counts as "
                  "written, so the next batch carries all of main memory into the snapshot and the "
                  "next checkpoint stores all of it", TrackingFallbackWarning, stacklevel=5)
