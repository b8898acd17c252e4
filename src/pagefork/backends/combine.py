"""Running several threads of one batch on one worker, combining what they
can before anything is shipped.

A worker that runs several threads of a batch merges their changes to
*combinable* arrays into one private copy of the snapshot, and ships a
single diff of that copy instead of one per thread. Combinable means that
merging in any grouping and any order gives the same bytes as merging
thread by thread: wrapping integer SUM and SUBTRACT, integer (and bool) MIN
and MAX, and XOR of any type. Float arithmetic rounds differently when
regrouped, integer PRODUCT cannot be divided back out of a wrapped product,
and OVERWRITE's thread order and conflict detection need each thread's own
runs: those regions still ship per thread. Regions never overlap, so the
per-thread and the combined diffs touch disjoint bytes and may merge in any
order.

Diffs travel as a small header (:mod:`pagefork.compact` tokens) and the
raw data, so a dense run costs its bytes and a scattered int64 about 9.5.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from .. import _native, compact
from .._errors import PageforkError
from .._sizes import round_to_pages
from .._thread_errors import thread_error
from ..batch import (BatchSpec, Cancel, ThreadOutcome, Workspace, call_thread_function, call_tracked,
                     check_thread_memory, copied_result, diff_written, empty_batch, holders, kept,
                     preparation_error)
from ..diffs import DiffBatch
from ..identity import with_contributions
from ..memory import PAGE_SIZE, Region
from ..merge import DataType, MergeOp, MergeRegion
from ..tracking import Tracker

__all__ = ["combinable", "combines", "split_regions", "CombiningWorkspace", "pack", "unpack"]

_INTEGERS = {DataType.BOOL, DataType.INT8, DataType.INT16, DataType.INT32, DataType.INT64,
             DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64}


def combinable(region: MergeRegion) -> bool:
    """Whether threads' diffs to ``region`` can be merged in any grouping and
    order with identical bytes (see the module docstring)."""
    if region.op is MergeOp.XOR:
        return True
    if region.op in (MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.MIN, MergeOp.MAX):
        return region.dtype in _INTEGERS
    return False


def combines(regions: Sequence[MergeRegion], threads: int) -> bool:
    """Whether a worker running ``threads`` threads of a batch with these
    merge regions combines anything (it then sends one combined batch)."""
    return threads > 1 and any(combinable(r) for r in regions)


def split_regions(regions: Sequence[MergeRegion]) -> tuple[list[MergeRegion], list[MergeRegion]]:
    """(per-thread regions with the combinable ones IGNOREd, combinable regions)."""
    own = [replace(r, op=MergeOp.IGNORE) if combinable(r) else r for r in regions]
    return own, [r for r in regions if combinable(r)]


def pack(batch: DiffBatch | None) -> tuple[tuple[int, bytes] | None, Any]:
    """(header, data) of a batch for shipping: the compact tokens with the
    count, and the data buffer itself (sent as is, never copied here)."""
    if batch is None:
        return None, b""
    if len(batch) == 0 and batch.nbytes == 0:  # a thread that wrote nothing: nothing to encode
        return (0, b""), b""
    return (len(batch), compact.encode_columns(batch)), batch.data


def unpack(header: tuple[int, bytes] | None, data: Any) -> DiffBatch | None:
    """The batch :func:`pack` described (``CorruptDataError`` if malformed)."""
    if header is None:
        return None
    count, tokens = header
    if count == 0 and tokens == b"" and memoryview(data).nbytes == 0:  # pack's empty batch
        return empty_batch()
    return compact.decode_columns(tokens, count, data)


class _Unprepared(Exception):
    """Thread memory could not be mapped, tracked or given its identity
    buffers: not the thread's fault (the text says what the workspace lacks)."""


@dataclass
class _Partial:
    """A worker's private copy of the snapshot with the combinable changes
    of the batch's threads merged in, and which pages they touched."""

    region: Region
    touched: np.ndarray


def _covered_pages(n_pages: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Pages lying wholly inside one of the byte ranges [starts, ends)."""
    covered = np.zeros(n_pages, np.bool_)
    for a, b in zip((starts + PAGE_SIZE - 1) // PAGE_SIZE, ends // PAGE_SIZE):  # per region
        covered[int(a): int(b)] = True
    return covered


def _pages_of(batch: DiffBatch, n_pages: int) -> np.ndarray:
    """Pages the diffs of ``batch`` touch."""
    out = np.zeros(n_pages + 1, np.int64)
    if len(batch):
        np.add.at(out, np.minimum(batch.offsets // PAGE_SIZE, n_pages), 1)
        last = (batch.offsets + np.maximum(batch.lengths, 1) - 1) // PAGE_SIZE + 1
        np.add.at(out, np.minimum(last, n_pages), -1)
    return np.cumsum(out[:n_pages]) > 0


def _keep_min_pages(default: int = 256) -> int:
    """Keeping thread memory saves a copy-on-write fault per written page but
    costs two page-map scans per thread; below this many pages written by
    recent threads (the count halves with each thread that writes fewer),
    mapping afresh is cheaper (and keeps sparse batches flat in
    the memory size). ``PAGEFORK_KEEP_MIN_PAGES`` overrides it (tests use 0
    to exercise the kept memory on small arrays)."""
    try:
        return max(0, int(os.environ.get("PAGEFORK_KEEP_MIN_PAGES", default)))
    except ValueError:
        return default


_KEEP_MIN_PAGES = _keep_min_pages()


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two (snapshot, address, size, ...) keys name the same mapping (the
    snapshot by identity: a new one may reuse an old one's id and fd)."""
    return a[0] is b[0] and a[1:] == b[1:]


def _still_mapped(spec: BatchSpec, region: Region) -> bool:
    """Whether ``region`` is still the one private read-write mapping of the
    snapshot a workspace made: a thread can remap, unmap or protect its
    memory (mmap, munmap, mprotect through ctypes), which no page-state read
    sees, and the next thread must not meet that. False where the kernel
    cannot tell (no PROCMAP_QUERY before Linux 6.11): map afresh."""
    return region.size > 0 and bool(_native.maps_covers(region.address, region.size, spec.snapshot.fd))


class CombiningWorkspace(Workspace):
    """A worker's :class:`Workspace` that, across the threads of a batch it
    runs, combines the diffs of combinable regions (see the module), and
    keeps its thread memory mapped between threads.

    Keeping the memory: a ``cow`` thread memory is normally mapped afresh
    for every thread, so each page a thread writes costs a copy-on-write
    fault (several microseconds here). Instead, the pages that are private
    copies are put back to the snapshot's bytes (a page copy, a fraction of
    the fault; in combinable regions folding already put each changed
    element back), and the next thread's pages to compare are its new
    private pages plus the ones put back (narrowed to those whose bytes
    differ when no fold follows, so XOR diffs and the page counts stay
    exact). The first thread of a batch puts back every private page, as
    the snapshot may have changed since. When the private pages grow much
    beyond what threads change, or recent threads wrote few pages (then the
    faults cost less than the scans; one small thread between big ones only
    halves the count), the memory is mapped afresh; other
    tracking modes always map afresh.
    """

    def __init__(self) -> None:
        super().__init__()
        self._partial_region: Region | None = None
        # (snapshot, address, size, shrinks) kept mapped: a shrink and a regrowth
        # to the same size leave zero pages no scan sees, so they count too.
        self._kept: tuple[Any, int, int, int] | None = None
        self._partial_kept: tuple[Any, int, int] | None = None
        self._recent = 0  # pages recent threads changed (halving per thread that changed fewer)
        self._private: np.ndarray | None = None  # private pages the last thread left

    def _partial(self, spec: BatchSpec) -> _Partial:
        size = round_to_pages(spec.snapshot.size)
        max_size = max(round_to_pages(spec.snapshot.max_size), size)
        r = self._partial_region
        if r is None or r.closed or r.max_size < max_size:
            if r is not None:
                r.close()
            self._partial_kept = None
            r = self._partial_region = Region(size, max_size=max_size)
        elif r.size != size:
            r.resize(size)
        key = (spec.snapshot, r.address, r.size)
        if self._partial_kept is not None and _same(self._partial_kept, key):
            private = np.empty(r.n_pages, np.uint8)  # put back to the snapshot's bytes
            _native.private_pages(r, private)
            _native.copy_pages(r, spec.snapshot.mapping, private, PAGE_SIZE)
        else:
            spec.snapshot.map_to(r)  # equal to the snapshot, copy-on-write
            self._partial_kept = key
        return _Partial(r, np.zeros(r.n_pages, np.bool_))

    @staticmethod
    def _start_clean(spec: BatchSpec, region: Region, tracker_: Tracker,
                     clean: tuple[Any, int, int] | None) -> bool:
        """Starts ``cow`` tracking of ``region`` without mapping it again, if
        the last thread on it left no private page (it still maps the
        snapshot, and shows its current bytes: a merge writes the file the
        mapping reads). The start itself checks that no page is private
        (a write since); else, or when the region is new, resized (a shrink
        and a regrowth back to the same size included: regrown pages are
        not the snapshot's) or of another snapshot, returns False (map it
        afresh). Saves a remap per
        thread that wrote nothing. ``clean``: what the last thread left
        (``Region.clean_for``)."""
        if (tracker_.mode != "cow" or clean is None or clean[0] is not spec.snapshot
                or clean[1:] != (region.size, region.shrinks) or not _still_mapped(spec, region)):
            return False
        try:
            tracker_.start(region)
        except (PageforkError, OSError):  # a page was written since: map afresh
            return False
        return True

    def _run_one(self, spec: BatchSpec, i: int, region: Region, tracker_: Tracker,
                 clean: np.ndarray | None, exact: bool,
                 identity: dict[str, np.ndarray]) -> tuple[Any, np.ndarray, np.ndarray | None]:
        """Runs thread ``i`` on ``region`` from the snapshot's bytes (and
        ``identity``: the identity arrays' buffers). ``clean``:
        pages known to hold the snapshot's bytes already (not copied back).
        Returns its result, the pages to compare, and, when the memory was
        kept, the pages it newly made private (None when freshly mapped: then
        the pages to compare are exactly those it wrote). With ``exact``, the
        pages to compare are narrowed to the ones it wrote or changed; else
        every private page is compared."""
        whole = spec.snapshot.mapping  # the snapshot's pages, to the page-rounded end
        key = (spec.snapshot, region.address, region.size, region.shrinks)
        clean_for, region.clean_for = region.clean_for, None  # this thread may write it
        shape = (region.size, region.shrinks)  # as mapped for this thread
        before = None
        if (tracker_.mode == "cow" and self._recent >= _KEEP_MIN_PAGES and self._kept is not None
                and _same(self._kept, key) and _still_mapped(spec, region)):
            if clean is not None and self._private is not None:
                before = self._private  # as the last thread of this batch left it
                kept = int(np.count_nonzero(before))
            else:
                before = np.empty(region.n_pages, np.uint8)
                kept = _native.private_pages(region, before)
            if kept > 4 * self._recent + 256:
                before = None  # too many to put back: map afresh
            else:
                stale = before if clean is None else (before.view(np.bool_) & ~clean).view(np.uint8)
                _native.copy_pages(region, whole, stale, PAGE_SIZE)
        if before is None:
            self._kept = None
            try:
                if not self._start_clean(spec, region, tracker_, clean_for):
                    spec.snapshot.map_to(region)
                    tracker_.start_mapped(region)
            except BaseException as exc:
                raise _Unprepared(preparation_error(exc)) from exc
            result, dirty = call_tracked(spec, i, region, tracker_, identity)
            if tracker_.mode == "cow":  # not under mlockall: Workspace.prepare
                self._kept = key
                # Still the snapshot's mapping, unless it was resized: reusable.
                if not dirty.any() and (region.size, region.shrinks) == shape:
                    region.clean_for = (spec.snapshot, *shape)
                # cow: written = private. Only worth keeping for many pages.
                many = np.count_nonzero(dirty) >= _KEEP_MIN_PAGES
                self._private = dirty.view(np.uint8).copy() if many else None
            return result, dirty, None
        result = call_thread_function(spec, i, region, identity)
        check_thread_memory(region)
        after = np.empty(region.n_pages, np.uint8)
        _native.private_pages(region, after)
        self._private = after
        new = after.view(np.bool_) & ~before.view(np.bool_)
        if not exact:
            return result, after.view(np.bool_) | before.view(np.bool_), new
        _native.keep_changed(region, whole, before)  # of the pages put back, the changed ones
        return result, new | before.view(np.bool_), new

    def run_combining(self, spec: BatchSpec, indexes: Sequence[int],
                      report: Callable[[ThreadOutcome], None], *, copy_result: bool = False,
                      cancel: Cancel | None = None) -> DiffBatch | None:
        """Runs ``indexes`` one after the other, calling ``report`` with each
        outcome as it finishes (its diffs cover the non-combinable regions).
        Returns one batch holding the combined diffs of the combinable
        regions, or None when nothing was combined. ``copy_result``: each
        result is copied out of thread memory (which the next thread reuses)
        before it is reported. Once ``cancel`` is set no further thread
        starts (the threads not run are not reported). Memory that cannot
        be prepared fails every thread with a preparation error."""
        combining = combines(spec.merge_regions, len(indexes))
        own, shared = split_regions(spec.merge_regions) if combining else (spec.merge_regions, [])
        try:
            region, tracker_ = self.prepare(spec)
        except Exception as exc:
            for i in indexes:
                report(ThreadOutcome(i, error=preparation_error(exc)))
            return None
        snapshot = spec.snapshot
        partial = self._partial(spec) if combining else None
        columns: tuple[np.ndarray, ...] = ()  # the combinable regions, for fold
        covered = None
        if combining:
            columns = snapshot.region_columns(min(region.size, snapshot.size), shared)
            covered = _covered_pages(region.n_pages, *columns[:2])
        clean: np.ndarray | None = None  # the first thread puts back every private page
        result: Any
        diffs: DiffBatch | None
        outcome: ThreadOutcome | None
        for i in indexes:
            if cancel is not None and cancel.is_set():
                break
            before = None
            try:
                try:
                    if region.closed:  # an earlier thread function closed it, or it was left: rebuild
                        region, tracker_ = self.prepare(spec)
                        self._kept = self._private = None
                        clean = None
                    before = holders(region)
                    # (collect takes the identity views back from this dict)
                    views = self.identity.begin(spec.layout.values())
                except BaseException as exc:
                    raise _Unprepared(preparation_error(exc)) from exc
                result, dirty, new = self._run_one(spec, i, region, tracker_, clean, not combining, views)
                diffs = diff_written(snapshot, region, dirty, own)
                written = dirty
                if partial is not None:
                    changed = np.zeros(region.n_pages, np.uint8)
                    _native.fold(partial.region, region, snapshot.view(), dirty.view(np.uint8), changed,
                                 PAGE_SIZE, *columns)
                    partial.touched |= changed.view(np.bool_)
                    clean = covered  # fold put every changed element there back
                    if new is not None:  # compared more than written: count what changed
                        written = new | changed.view(np.bool_) | _pages_of(diffs, region.n_pages)
                count = int(np.count_nonzero(written))
                # One small thread (a batch of a single cheap task between big
                # ones) must not throw away the kept memory: decay, not reset.
                self._recent = max(count, self._recent // 2)
                # Identity arrays ship per thread: at scattered densities
                # their diffs are small, and folding them costs a pass more.
                diffs = with_contributions(diffs, self.identity.collect())
                if copy_result:
                    result = copied_result(result)
                outcome = ThreadOutcome(i, result, diffs, count)
            except _Unprepared as exc:
                self._kept = self._private = None
                outcome = ThreadOutcome(i, error=str(exc))
            except BaseException as exc:  # the thread's own error (SystemExit included)
                self._kept = self._private = None  # the next thread maps afresh
                outcome = ThreadOutcome(i, error=thread_error(exc), exception=exc)
            report(outcome)
            # What the thread left holding its memory (a view, its Region, a
            # weak reference) keeps it: the next thread gets new memory.
            outcome = result = diffs = None
            if before is not None and not region.closed and kept(before, holders(region)):
                self.detach()  # closed: the next iteration rebuilds
        if partial is None:
            return None
        return diff_written(snapshot, partial.region, partial.touched, shared)

    def close(self) -> None:
        super().close()
        self._kept = self._partial_kept = self._private = None
        if self._partial_region is not None:
            self._partial_region.close()
            self._partial_region = None
