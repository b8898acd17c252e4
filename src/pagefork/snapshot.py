"""Snapshots: memfd-backed copies of memory, and the diffs against them.

A :class:`Snapshot` is a memfd-backed copy of memory. Memory is mapped from
it copy-on-write (:meth:`Snapshot.map_to`), changed, and compared back
(:meth:`Snapshot.diff`) over the pages a tracker saw written, giving a
:class:`DiffBatch` that merges into any snapshot with the same layout
(:meth:`Snapshot.apply`) by per-region rules (:class:`MergeRegion`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from . import _native
from ._buffers import byte_view
from ._errors import MergeError, OutOfBoundsError, PageforkError
from ._forking import renewed_in_child
from ._sizes import PAGE_SIZE, as_index, parse_size, round_to_pages
from .diffs import Batchable, Diff, DiffBatch, as_batch
from .memory import Region
from .merge import BYTEWISE_OPS, DataType, MergeOp, MergeRegion, checked_regions

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

# The rules and diffs were defined here before merge.py and diffs.py; still
# exported, so imports from here keep type-checking under mypy --strict.
__all__ = ["Snapshot", "DataType", "MergeOp", "MergeRegion", "Diff", "DiffBatch"]


def _fresh_lock(snapshot: Snapshot) -> None:
    snapshot._lock = threading.RLock()


# Every open snapshot: a forked child gives each a fresh lock.
_live = renewed_in_child(_fresh_lock)



class _Queued:
    """A queued batch and the flag the native write sets once it is written."""

    __slots__ = ("batch", "done")

    def __init__(self, batch: DiffBatch) -> None:
        self.batch = batch
        self.done = bytearray(1)

    @property
    def written(self) -> bool:
        return bool(self.done[0])


def _page_flags(dirty_pages: Any, nbytes: int) -> np.ndarray:
    """One contiguous 0/1 bool per page of ``nbytes`` of memory. The kernels
    look for the byte 1, so any other truthy byte (a bool array made with
    ``np.frombuffer``, a strided view) is normalized first: one cheap pass
    over one flag per page."""
    n_pages = -(-nbytes // PAGE_SIZE)
    flags = np.asarray(dirty_pages)
    if flags.shape != (n_pages,):
        raise ValueError(f"dirty_pages must hold one flag per page of memory ({n_pages}), "
                         f"got shape {flags.shape}")
    if flags.dtype == np.bool_:
        flags = flags.view(np.uint8)
    return np.ascontiguousarray(flags != 0)



def _changed_ranges(offsets: np.ndarray, lengths: np.ndarray, ops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of the diffs that change something (not IGNORE),
    for tracked_changes. The columns are private copies: kept as they are
    when nothing is ignored (the common case, and no copy per diff)."""
    keep = ops != MergeOp.IGNORE
    if keep.all():
        return offsets, lengths
    return offsets[keep], lengths[keep]


class Snapshot:
    """A memfd-backed copy of memory.

    ``Snapshot(data)`` copies a bytes-like object; ``Snapshot(size=n)`` is n
    zero bytes. ``max_size`` (default ``size``) bounds growth by
    :meth:`write` and :meth:`apply`. Memory mapped from the snapshot with
    :meth:`map_to` is a private copy-on-write view: writes to it never reach
    the snapshot. (Pages the region has not written yet show later changes
    to the snapshot, as with any ``MAP_PRIVATE`` mapping, until the region is
    mapped again.)

    All writes through the snapshot's own methods are recorded for
    :meth:`tracked_changes`.
    """

    def __init__(self, data: Any = None, *, size: int | str | None = None,
                 max_size: int | str | None = None, _fd: int = -1) -> None:
        view = byte_view(data) if data is not None else None
        if view is not None and size is not None and parse_size(size) != view.nbytes:
            raise ValueError(f"size={size} disagrees with the {view.nbytes} bytes of data")
        nbytes = view.nbytes if view is not None else parse_size(size or 0, "size")
        max_bytes = nbytes if max_size is None else parse_size(max_size, "max_size")
        if max_bytes < nbytes:
            raise ValueError(f"max_size ({max_bytes}) is smaller than size ({nbytes})")
        self._size = nbytes
        self._max_size = max_bytes
        self._attached = _fd >= 0  # the file is another snapshot's: never resize it
        self._memory = Region(round_to_pages(nbytes), max_size=max(round_to_pages(max_bytes), PAGE_SIZE),
                              shared=True, backing="memfd", _fd=_fd)
        self._merge_regions: list[MergeRegion] = []
        self._queue: list[_Queued] = []
        # Ranges written through the snapshot: (offsets, lengths) array pairs.
        self._changes: list[tuple[np.ndarray, np.ndarray]] = []
        self._lock = threading.RLock()
        _live.add(self)
        if not self._attached:
            # Whoever else holds the memfd (a worker it was sent to) can grow
            # it but never shrink it: pages cut off under a mapping would
            # kill this process with SIGBUS on the next read.
            fcntl.fcntl(self._memory.file_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        if view is not None and nbytes:
            memoryview(self._memory)[:nbytes] = view

    @classmethod
    def attach(cls, fd: int, size: int, max_size: int | None = None) -> Snapshot:
        """A Snapshot over an existing snapshot's memfd (e.g. received from
        another process): the same bytes, shared, not copied. The file is
        duplicated; ``fd`` stays the caller's.

        The file belongs to the snapshot that made it: attaching never
        changes its size. It must already hold ``size`` bytes rounded up to
        whole pages (a snapshot's memfd always does), and the attached
        snapshot grows only as far as the owner has grown the file.
        """
        fd = as_index(fd, "fd")
        nbytes = parse_size(size, "size")
        if fd < 0:
            raise ValueError(f"attach needs an open file descriptor, got {fd}")
        try:
            info = os.fstat(fd)
        except OverflowError:
            raise ValueError(f"cannot attach fd {fd}: not a file descriptor") from None
        except OSError as exc:
            raise ValueError(f"cannot attach fd {fd}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):  # a pipe, socket or folder holds no snapshot
            raise ValueError(f"cannot attach fd {fd}: not a snapshot's file (mode {info.st_mode:#o})")
        held = info.st_size
        if held < round_to_pages(nbytes):
            raise OutOfBoundsError(f"cannot attach {nbytes} bytes: the file holds {held} bytes, "
                                   f"fewer than the {round_to_pages(nbytes)} bytes (whole pages) "
                                   "it would map; attaching never resizes it")
        return cls(size=nbytes, max_size=max_size, _fd=fd)

    def follow_size(self, size: int) -> None:
        """Internal: for worker processes: adopts a size the snapshot's owner grew the shared file to."""
        with self._lock:
            self._check_open()
            self.grow(size)

    # ---- basics ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the snapshot."""
        return self._size

    @property
    def max_size(self) -> int:
        """The size the snapshot may grow to."""
        return self._max_size

    @property
    def fd(self) -> int:
        """The memfd holding the snapshot (to pass to other processes)."""
        self._check_open()
        return self._memory.file_fd

    @property
    def closed(self) -> bool:
        return self._memory.closed

    def _check_open(self) -> None:
        if self._memory.closed:
            raise PageforkError("the snapshot is closed")

    @property
    def mapping(self) -> Region:
        """Internal: for windows, thread memory and checkpoints: the shared mapping of the file."""
        return self._memory

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Internal: for main-memory windows: holds the lock; refuses a closed snapshot."""
        with self._lock:
            self._check_open()
            yield

    def note_changes(self, ranges: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Internal: for main-memory windows: (offsets, lengths) written past the snapshot's API."""
        self._changes.extend(ranges)

    def undo_growth(self, size: int) -> None:
        """Internal: for a refused window merge: back to ``size`` (pages past it stay mapped, read as zero)."""
        self._size = size

    def _check_range(self, offset: int, length: int, limit: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > limit:
            raise OutOfBoundsError(f"{what} of {length} bytes at offset {offset} is outside "
                                   f"0..{limit}")

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """A copy of ``length`` bytes at ``offset`` (default: to the end)."""
        offset = as_index(offset, "offset")
        with self._lock:
            self._check_open()
            length = max(self._size - offset, 0) if length is None else as_index(length, "length")
            self._check_range(offset, length, self._size, "read")
            with memoryview(self._memory) as whole:
                return bytes(whole[offset:offset + length])

    def view(self) -> memoryview:
        """A read-only view of the snapshot's bytes (no copy)."""
        with self._lock:
            self._check_open()
            return memoryview(self._memory)[: self._size].toreadonly()

    def grow(self, size: int) -> None:
        """Internal: for main-memory windows and workers: grows to ``size`` (caller holds the lock)."""
        if size > self._max_size:
            raise OutOfBoundsError(f"the snapshot would grow to {size} bytes; its max_size is "
                                   f"{self._max_size}")
        if size > self._size:
            pages = round_to_pages(size)
            if pages > self._memory.size:  # (an undone apply may have left it larger)
                if self._attached and os.fstat(self._memory.file_fd).st_size < pages:
                    raise OutOfBoundsError(f"an attached snapshot cannot grow to {size} bytes: "
                                           "its file is smaller, and only the snapshot that "
                                           "made it grows it")
                self._memory.resize(pages)
            self._size = size

    def write(self, data: Any, offset: int = 0) -> None:
        """Writes ``data`` at ``offset``, growing the snapshot up to ``max_size``."""
        offset = as_index(offset, "offset")
        view = byte_view(data)
        if offset < 0:
            raise OutOfBoundsError(f"write at negative offset {offset}")
        with self._lock:
            self._check_open()
            if offset + view.nbytes > self._max_size:
                raise OutOfBoundsError(f"the snapshot would grow to {offset + view.nbytes} bytes; "
                                       f"its max_size is {self._max_size}")
            # One OVERWRITE diff: grown, written and recorded all or nothing,
            # even when interrupted.
            self._apply(DiffBatch.unchecked(np.array([offset], np.int64),
                                             np.array([view.nbytes], np.int64),
                                             np.zeros(1, np.uint8), np.zeros(1, np.uint8), view))

    def write_pages(self, memory: Any, dirty_pages: Any) -> int:
        """Copies the pages flagged in ``dirty_pages`` from ``memory`` (up to
        the snapshot's size) and returns the bytes copied. Cheaper than
        ``apply(diff(...))`` when whole pages are known to have changed."""
        mem = byte_view(memory)
        flags = _page_flags(dirty_pages, mem.nbytes)
        with self._lock:
            self._check_open()
            return self._write_pages(mem, flags)

    def _write_pages(self, mem: memoryview, flags: np.ndarray) -> int:
        with memoryview(self._memory) as whole:
            pages = np.flatnonzero(flags[: -(-min(mem.nbytes, self._size) // PAGE_SIZE)])
            if pages.size:  # recorded first, so an interrupt cannot lose a copied page
                starts = pages * PAGE_SIZE
                lengths = np.minimum(starts + PAGE_SIZE, min(mem.nbytes, self._size)) - starts
                self._changes.append((starts.astype(np.int64), lengths.astype(np.int64)))
            copied = _native.copy_pages(whole[: self._size], mem, flags.view(np.uint8), PAGE_SIZE)
        return int(copied)

    def map_to(self, region: Region) -> None:
        """Restores ``region`` from the snapshot, copy-on-write and in place:
        same address, existing numpy views stay valid, the snapshot is never
        changed through the region. The region must not be larger than the
        snapshot (rounded up to pages); a smaller one maps the prefix. Re-arms
        ``cow`` tracking of the region.
        """
        if not isinstance(region, Region):
            raise TypeError(f"map_to needs a pagefork Region, not {type(region).__name__} "
                            "(only a Region's pages can be remapped in place)")
        with self._lock:  # close() must not free the file while it is mapped
            self._check_open()
            if region.closed:
                raise PageforkError("the region is closed")
            if region.size > round_to_pages(self._size):
                raise OutOfBoundsError(f"a region of {region.size} bytes is larger than the "
                                       f"snapshot ({self._size} bytes)")
            region.map_snapshot(self._memory.file_fd)

    # ---- merge regions ----------------------------------------------------------

    def add_merge_region(self, offset: int, length: int, dtype: DataType | DTypeLike = DataType.RAW,
                         op: MergeOp | str = MergeOp.OVERWRITE) -> MergeRegion:
        """Adds a merge region; overlapping an existing one is a ``ValueError``,
        one reaching past ``max_size`` an :class:`OutOfBoundsError`."""
        region = MergeRegion(offset, length, dtype, op)  # type: ignore[arg-type]
        if region.offset + region.length > self._max_size:
            raise OutOfBoundsError(f"{region} reaches past the snapshot's max_size "
                                   f"({self._max_size} bytes)")
        with self._lock:
            end = region.end(self._max_size) if region.length == 0 else region.offset + region.length
            for other in self._merge_regions:
                other_end = float("inf") if other.length == 0 else other.offset + other.length
                region_end = float("inf") if region.length == 0 else end
                if region.offset < other_end and other.offset < region_end:
                    raise ValueError(f"{region} overlaps {other}")
            self._merge_regions.append(region)
            self._merge_regions.sort(key=lambda r: r.offset)
        return region

    @property
    def merge_regions(self) -> list[MergeRegion]:
        """The merge regions, sorted by offset."""
        return list(self._merge_regions)

    def clear_merge_regions(self) -> None:
        with self._lock:
            self._merge_regions.clear()

    def fill_gaps(self, op: MergeOp | str = MergeOp.OVERWRITE) -> None:
        """Covers every byte no merge region covers with ``op`` (OVERWRITE or
        XOR); with no regions, one region over everything."""
        op = MergeOp.of(op)
        if op not in (MergeOp.OVERWRITE, MergeOp.XOR):
            raise ValueError(f"fill_gaps takes OVERWRITE or XOR, not {op.name}")
        with self._lock:
            gaps, at = [], 0
            for r in self._merge_regions:
                if r.offset > at:
                    gaps.append(MergeRegion(at, r.offset - at, DataType.RAW, op))
                if r.length == 0:
                    at = -1
                    break
                at = max(at, r.offset + r.length)
            if at >= 0:
                gaps.append(MergeRegion(at, 0, DataType.RAW, op))
            self._merge_regions.extend(gaps)
            self._merge_regions.sort(key=lambda r: r.offset)

    def region_columns(self, limit: int, regions: list[MergeRegion]) -> tuple[np.ndarray, ...]:
        """Internal: for diffs and thread combines. The regions as kernel columns, clipped to ``limit``. A typed region
        cut short (running to the end, or past the snapshot) keeps its whole
        values; its leftover tail bytes are carried as OVERWRITE."""
        regions = regions or [MergeRegion(0, 0)]
        starts, ends, dtypes, ops = [], [], [], []

        def add(start: int, end: int, dtype: DataType, op: MergeOp) -> None:
            if end > start:
                starts.append(start)
                ends.append(end)
                dtypes.append(int(dtype))
                ops.append(int(op))

        for r in regions:
            start, end = r.offset, min(r.end(self._size), limit)
            if r.op in BYTEWISE_OPS:
                add(start, end, r.dtype, r.op)
                continue
            whole = start + max(end - start, 0) // r.dtype.itemsize * r.dtype.itemsize
            add(start, whole, r.dtype, r.op)
            add(whole, end, DataType.RAW, MergeOp.OVERWRITE)
        return (np.array(starts, np.int64), np.array(ends, np.int64),
                np.array(dtypes, np.uint8), np.array(ops, np.uint8))

    # ---- diffs ------------------------------------------------------------------

    def diff(self, memory: Any, dirty_pages: Any, *,
             regions: Iterable[MergeRegion] | None = None) -> DiffBatch:
        """The changes of ``memory`` against the snapshot, comparing only the
        pages flagged in ``dirty_pages`` (one bool per page of memory), by
        the merge regions' rules (no regions: OVERWRITE over everything).
        Memory larger than the snapshot adds one OVERWRITE diff for the
        extension. A PRODUCT that cannot be expressed raises MergeError.
        ``regions`` overrides the snapshot's merge regions for this call
        (``()``: OVERWRITE over everything).

        Memory past the snapshot's size but within its last page (a region
        mapped from a snapshot whose size is not whole pages) reads as zero
        in a snapshot; it adds a diff only for nonzero bytes there, on a dirty
        page, so an unchanged mapping never diffs past the snapshot's size."""
        mem = byte_view(memory)
        flags = _page_flags(dirty_pages, mem.nbytes)
        with self._lock:
            self._check_open()
            size = self._size
            columns = self.region_columns(min(mem.nbytes, size), self._merge_regions
                                           if regions is None else checked_regions(regions))
            try:
                with memoryview(self._memory) as whole:
                    batch = DiffBatch.from_native(_native.diff(
                        mem, whole[:size], flags.view(np.uint8), PAGE_SIZE, *columns))
            except ArithmeticError as exc:
                raise MergeError(str(exc)) from None
        end = mem.nbytes
        if size < end <= round_to_pages(size):  # the last page's tail: changed bytes only
            nonzero = np.flatnonzero(np.frombuffer(mem, np.uint8, offset=size)) if flags[-1] \
                else np.zeros(0, np.intp)
            end = size + int(nonzero[-1]) + 1 if nonzero.size else size
        if end > size:
            extension = DiffBatch([Diff(size, bytes(mem[size:end]))])
            batch = DiffBatch.concat([batch, extension])
        return batch

    def apply(self, diffs: Batchable) -> None:
        """Merges ``diffs`` into the snapshot in order. The whole batch is
        checked first (bounds, PRODUCT over a zero), so a bad one changes
        nothing. Diffs past the end grow the snapshot up to ``max_size``.

        The batch's index columns are copied first, so another thread (or a
        reused receive buffer under a zero-copy ``wire.decode``) changing
        them meanwhile cannot make ``apply`` write what it did not check.
        Malformed columns raise :class:`MergeError`, diffs outside
        ``max_size`` :class:`OutOfBoundsError`."""
        batch = as_batch(diffs)
        with self._lock:
            self._check_open()
            self._apply(batch)

    def apply_batches(self, batches: Sequence[DiffBatch]) -> None:
        """``apply(DiffBatch.concat(batches))`` without copying the batches'
        data into one: every batch is checked against the snapshot as it is
        before any is written, then they are applied in order. A refused
        batch changes nothing; an interrupt between two batches' writes
        keeps (and tracks) the ones already written."""
        with self._lock:
            self._check_open()
            self._apply(*batches)

    def _apply(self, *batches: DiffBatch, done: bytearray | None = None) -> None:
        """Applies ``batches`` in order (the caller holds the lock). For one
        batch, ``done[0]`` becomes 1 in the native call that writes it, so a
        caller interrupted anywhere (KeyboardInterrupt) knows whether it was
        written; for several, once all are."""
        done = bytearray(1) if done is None else done
        # Private copies of the small index columns: what is checked is applied.
        # The native check (bounds, codes, whole values, data length) runs on
        # these copies before anything grows or changes.
        columns = []
        for batch in batches:
            if len(batch) == 0 and batch.nbytes == 0:
                continue
            offsets, lengths = np.array(batch.offsets, np.int64), np.array(batch.lengths, np.int64)
            dtypes, ops = np.array(batch.dtypes, np.uint8), np.array(batch.ops, np.uint8)
            if len(offsets) != len(lengths) or len(offsets) == 0:
                raise MergeError(f"malformed diff batch: {len(offsets)} offsets, {len(lengths)} "
                                 f"lengths, {len(memoryview(batch.data))} bytes of data")
            columns.append((offsets, lengths, dtypes, ops, batch.data))
        if not columns:
            done[0] = 1
            return
        # Arrays wrap silently; the kernel catches what wrapped.
        end = max(int((c[0] + c[1]).max()) for c in columns)
        if end > self._max_size:
            raise OutOfBoundsError(f"a diff ends at byte {end}, past the snapshot's max_size "
                                   f"({self._max_size})")
        size = self._size
        records = [_changed_ranges(c[0], c[1], c[3]) for c in columns]
        n_changes = len(self._changes)
        written = bytearray(len(columns))  # set by the kernel as each batch is written
        try:
            if end > size or len(columns) > 1:  # check everything before growing or writing
                with memoryview(self._memory) as whole:
                    for c in columns:
                        _native.apply(whole[:size], *c, True, max(end, size))
                if end > size:
                    self.grow(end)
            # Recorded first: an interrupt right after a write must not lose
            # it from tracked_changes (reporting an unwritten range is harmless).
            self._changes.extend(records)
            # Each call checks its batch again, then writes it (all or nothing)
            # and sets its flag; a single batch sets the caller's own flag, in
            # the same native call as the write.
            if len(columns) == 1:
                written = done
            with memoryview(self._memory) as whole, memoryview(written) as flags:
                for k, c in enumerate(columns):
                    _native.apply(whole[: self._size], *c, False, -1, flags[k:k + 1])
            done[0] = 1
        except BaseException as exc:
            if not any(written):
                # Refused, or interrupted before any write: undo the growth
                # and the records. Pages past the old size stay mapped and
                # still read as zero.
                self._size = size
                del self._changes[n_changes:]
            if isinstance(exc, ArithmeticError):
                raise MergeError(str(exc)) from None
            if isinstance(exc, IndexError):
                raise OutOfBoundsError(str(exc)) from None
            if isinstance(exc, ValueError):  # unknown codes, partial values, data length
                raise MergeError(f"malformed diff batch: {exc}") from None
            raise

    def queue(self, diffs: Batchable) -> None:
        """Queues ``diffs`` for :meth:`write_queued` (thread-safe)."""
        batch = as_batch(diffs)
        with self._lock:
            self._queue.append(_Queued(batch))

    @property
    def queued(self) -> int:
        """Number of diffs queued."""
        with self._lock:
            return sum(len(q.batch) for q in self._queue if not q.written)

    def write_queued(self) -> int:
        """Applies every queued diff, in queue order, all or nothing; returns
        how many were written. Refused (or interrupted before anything was
        written), the diffs stay queued; once written, they never apply twice."""
        with self._lock:
            self._check_open()
            # An entry leaves the queue only by the flag the native write
            # sets, so an interrupt at any point cannot drop it unwritten
            # or keep it written.
            self._queue = [q for q in self._queue if not q.written]
            pending, done = list(self._queue), bytearray(1)
            for q in pending:
                q.done = done
            batch = DiffBatch.concat(q.batch for q in pending)
            self._apply(batch, done=done)
            self._queue = [q for q in self._queue if not q.written]
            return len(batch)

    def tracked_changes(self) -> DiffBatch:
        """OVERWRITE diffs of every range written (by write/apply) since
        :meth:`clear_tracked_changes`, overlapping ranges joined, with the
        snapshot's current bytes."""
        with self._lock:
            self._check_open()
            if not self._changes:
                return DiffBatch()
            offsets = np.concatenate([o for o, _ in self._changes])
            lengths = np.concatenate([n for _, n in self._changes])
            if offsets.size == 0:  # only IGNORE diffs were applied
                return DiffBatch()
            order = np.argsort(offsets, kind="stable")
            starts, ends = offsets[order], offsets[order] + lengths[order]
            reach = np.maximum.accumulate(ends)
            new_run = np.concatenate(([True], starts[1:] > reach[:-1]))
            run_starts = starts[new_run]
            # A run's end is the running maximum at its last range (ufunc.at,
            # the obvious way, is slow on older numpy).
            last = np.concatenate((np.flatnonzero(new_run)[1:] - 1, [len(starts) - 1]))
            run_ends = reach[last]
            # Clipped to the size: only a second interrupt inside apply's undo
            # can leave a record past it, and it must not break this.
            run_ends = np.minimum(run_ends, self._size)
            keep = run_ends > run_starts
            run_starts, run_ends = run_starts[keep], run_ends[keep]
            lengths = run_ends - run_starts
            with memoryview(self._memory) as whole:  # one copy of the runs, no per-byte index
                data = _native.gather(whole[: self._size], run_starts, lengths)
            n = len(run_starts)
            return DiffBatch.from_columns(run_starts, lengths, np.zeros(n, np.uint8),
                                          np.zeros(n, np.uint8), data)

    def clear_tracked_changes(self) -> None:
        with self._lock:
            self._changes.clear()

    def close(self) -> None:
        """Releases the snapshot's memory (regions mapped from it keep their
        pages). Waits for a diff, apply or map_to running in another thread."""
        with self._lock:
            self._memory.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Snapshot {self._size} bytes (max {self._max_size}), "
                f"{len(self._merge_regions)} merge regions>")
