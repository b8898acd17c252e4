"""Snapshots of memory, merge regions, and the diffs between them.

A :class:`Snapshot` is a memfd-backed copy of memory. Memory is mapped from
it copy-on-write (:meth:`Snapshot.map_to`), changed, and compared back
(:meth:`Snapshot.diff`) over the pages a tracker saw written, giving a
:class:`DiffBatch` that merges into any snapshot with the same layout
(:meth:`Snapshot.apply`) by per-region rules (:class:`MergeRegion`).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, Union, overload

import numpy as np

from . import _native
from ._errors import MergeError, OutOfBoundsError, PageforkError
from ._sizes import PAGE_SIZE, parse_size, round_to_pages
from .memory import Region

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["DataType", "MergeOp", "MergeRegion", "Diff", "DiffBatch", "Snapshot"]


class DataType(enum.IntEnum):
    """Element type of a merge region (codes are part of the wire format)."""

    RAW = 0
    BOOL = 1
    INT8 = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    UINT8 = 6
    UINT16 = 7
    UINT32 = 8
    UINT64 = 9
    FLOAT32 = 10
    FLOAT64 = 11
    INT = 4
    LONG = 5
    FLOAT = 10
    DOUBLE = 11

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype of one element (``uint8`` for RAW)."""
        return _TO_NUMPY[self]

    @classmethod
    def of(cls, value: DataType | DTypeLike | str) -> DataType:
        """A DataType from itself, its name (``"int32"``, ``"raw"``) or any
        numpy dtype-like (``np.float64``, ``"f4"``)."""
        if isinstance(value, DataType):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        try:
            dt = np.dtype(value)
        except TypeError:
            raise TypeError(f"not a DataType or numpy dtype: {value!r}") from None
        found = _FROM_NUMPY.get(dt.newbyteorder("=") if dt.byteorder not in "=|" else dt)
        if found is None or dt.byteorder not in "=|<":
            raise ValueError(f"no DataType for numpy dtype {dt} (use a native-endian "
                             "bool, int8..64, uint8..64, float32 or float64)")
        return found


_ITEMSIZE = {DataType.RAW: 1, DataType.BOOL: 1, DataType.INT8: 1, DataType.INT16: 2,
             DataType.INT32: 4, DataType.INT64: 8, DataType.UINT8: 1, DataType.UINT16: 2,
             DataType.UINT32: 4, DataType.UINT64: 8, DataType.FLOAT32: 4, DataType.FLOAT64: 8}
_TO_NUMPY = {t: np.dtype(n) for t, n in [
    (DataType.RAW, "u1"), (DataType.BOOL, "?"), (DataType.INT8, "i1"), (DataType.INT16, "i2"),
    (DataType.INT32, "i4"), (DataType.INT64, "i8"), (DataType.UINT8, "u1"),
    (DataType.UINT16, "u2"), (DataType.UINT32, "u4"), (DataType.UINT64, "u8"),
    (DataType.FLOAT32, "f4"), (DataType.FLOAT64, "f8")]}
_FROM_NUMPY = {dt: t for t, dt in _TO_NUMPY.items() if t is not DataType.RAW}


class MergeOp(enum.IntEnum):
    """How a region's changes merge (codes are part of the wire format)."""

    OVERWRITE = 0
    XOR = 1
    SUM = 2
    PRODUCT = 3
    SUBTRACT = 4
    MAX = 5
    MIN = 6
    IGNORE = 7

    @classmethod
    def of(cls, value: MergeOp | str) -> MergeOp:
        """A MergeOp from itself or its name, any case (``"sum"``)."""
        if isinstance(value, MergeOp):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(f"unknown merge op {value!r}; valid: "
                         + ", ".join(m.name.lower() for m in cls))


_ARITHMETIC = {MergeOp.SUM, MergeOp.PRODUCT, MergeOp.SUBTRACT}
_BYTEWISE = {MergeOp.OVERWRITE, MergeOp.XOR, MergeOp.IGNORE}


def _check_op(dtype: DataType, op: MergeOp) -> None:
    if op in _BYTEWISE:
        return
    if dtype is DataType.RAW or (dtype is DataType.BOOL and op in _ARITHMETIC):
        raise ValueError(f"merge op {op.name} needs a numeric DataType, not {dtype.name}")


@dataclass(frozen=True)
class MergeRegion:
    """A byte range of a snapshot and how changes to it merge.

    ``length == 0`` means "to the end of the snapshot". Typed ops (SUM,
    SUBTRACT, PRODUCT, MAX, MIN) work element-wise on ``dtype`` values, so
    their ``length`` must be a whole number of elements.
    """

    offset: int
    length: int
    dtype: DataType = DataType.RAW
    op: MergeOp = MergeOp.OVERWRITE

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DataType.of(self.dtype))
        object.__setattr__(self, "op", MergeOp.of(self.op))
        if self.offset < 0 or self.length < 0:
            raise ValueError(f"merge region offset and length must be >= 0, got {self.offset}, {self.length}")
        _check_op(self.dtype, self.op)
        if self.op not in _BYTEWISE and self.length % self.dtype.itemsize:
            raise ValueError(f"merge region of {self.length} bytes is not a whole number of "
                             f"{self.dtype.name} values")

    def end(self, size: int) -> int:
        """Where the region ends in a snapshot of ``size`` bytes."""
        return size if self.length == 0 else self.offset + self.length


@dataclass(frozen=True)
class Diff:
    """One change: ``data`` at ``offset``, merged by ``op`` on ``dtype`` values."""

    offset: int
    data: bytes
    dtype: DataType = DataType.RAW
    op: MergeOp = MergeOp.OVERWRITE

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DataType.of(self.dtype))
        object.__setattr__(self, "op", MergeOp.of(self.op))
        object.__setattr__(self, "data", bytes(self.data))
        if self.offset < 0:
            raise ValueError(f"diff offset must be >= 0, got {self.offset}")
        _check_op(self.dtype, self.op)


class DiffBatch(Sequence[Diff]):
    """A sequence of :class:`Diff` stored column-wise: ``offsets``,
    ``lengths`` (int64), ``dtypes``, ``ops`` (uint8) and one ``data`` buffer.
    Encoding and applying a batch never builds per-diff Python objects; only
    indexing and iteration do.
    """

    __slots__ = ("offsets", "lengths", "dtypes", "ops", "data", "_starts")

    def __init__(self, diffs: Iterable[Diff] = ()) -> None:
        items = list(diffs)
        for d in items:
            if not isinstance(d, Diff):
                raise TypeError(f"DiffBatch holds Diff objects, not {type(d).__name__}")
        self.offsets = np.array([d.offset for d in items], dtype=np.int64)
        self.lengths = np.array([len(d.data) for d in items], dtype=np.int64)
        self.dtypes = np.array([int(d.dtype) for d in items], dtype=np.uint8)
        self.ops = np.array([int(d.op) for d in items], dtype=np.uint8)
        self.data: bytes | memoryview = b"".join(d.data for d in items)
        self._starts: np.ndarray | None = None

    @classmethod
    def from_columns(cls, offsets: Any, lengths: Any, dtypes: Any, ops: Any,
                     data: bytes | memoryview) -> DiffBatch:
        """Builds a batch from its columns without copying them."""
        batch = cls.__new__(cls)
        batch.offsets = np.asarray(offsets, dtype=np.int64)
        batch.lengths = np.asarray(lengths, dtype=np.int64)
        batch.dtypes = np.asarray(dtypes, dtype=np.uint8)
        batch.ops = np.asarray(ops, dtype=np.uint8)
        batch.data = data
        batch._starts = None
        n = len(batch.offsets)
        if not (len(batch.lengths) == len(batch.dtypes) == len(batch.ops) == n):
            raise ValueError("DiffBatch columns differ in length")
        if int(batch.lengths.sum()) != len(memoryview(data)):
            raise ValueError("DiffBatch data length does not match the diff lengths")
        return batch

    @classmethod
    def _from_native(cls, columns: tuple[Any, Any, Any, Any, Any]) -> DiffBatch:
        offsets, lengths, dtypes, ops, data = columns  # _native.Buffer: no copies
        return cls.from_columns(np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.int64),
                                np.frombuffer(dtypes, np.uint8), np.frombuffer(ops, np.uint8),
                                memoryview(data))

    @classmethod
    def concat(cls, batches: Iterable[DiffBatch]) -> DiffBatch:
        """One batch holding every diff of ``batches``, in order."""
        parts = list(batches)
        if not parts:
            return cls()
        return cls.from_columns(
            np.concatenate([b.offsets for b in parts]), np.concatenate([b.lengths for b in parts]),
            np.concatenate([b.dtypes for b in parts]), np.concatenate([b.ops for b in parts]),
            b"".join(b.data for b in parts))

    @property
    def starts(self) -> np.ndarray:
        """Where each diff's data begins in :attr:`data`."""
        if self._starts is None:
            self._starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64) \
                if len(self.lengths) else np.zeros(0, np.int64)
        return self._starts

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes | memoryview]:
        """(offsets, lengths, dtypes, ops, data)."""
        return self.offsets, self.lengths, self.dtypes, self.ops, self.data

    @property
    def nbytes(self) -> int:
        """Bytes of diff data (the payload, not the columns)."""
        return len(memoryview(self.data))

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> Diff: ...
    @overload
    def __getitem__(self, index: slice) -> DiffBatch: ...

    def __getitem__(self, index: int | slice) -> Diff | DiffBatch:
        if isinstance(index, slice):
            return DiffBatch(self[i] for i in range(*index.indices(len(self))))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"diff index {index} out of range for a batch of {n}")
        i = index % n
        start = int(self.starts[i])
        return Diff(int(self.offsets[i]), bytes(memoryview(self.data)[start:start + int(self.lengths[i])]),
                    DataType(int(self.dtypes[i])), MergeOp(int(self.ops[i])))

    def __iter__(self) -> Iterator[Diff]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DiffBatch):
            return (np.array_equal(self.offsets, other.offsets)
                    and np.array_equal(self.lengths, other.lengths)
                    and np.array_equal(self.dtypes, other.dtypes)
                    and np.array_equal(self.ops, other.ops)
                    and bytes(self.data) == bytes(other.data))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"<DiffBatch {len(self)} diffs, {self.nbytes} bytes>"


Batchable = Union[DiffBatch, Iterable[Diff]]


def _as_batch(diffs: Batchable) -> DiffBatch:
    return diffs if isinstance(diffs, DiffBatch) else DiffBatch(diffs)


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
        view = memoryview(data).cast("B") if data is not None else None
        if view is not None and size is not None and parse_size(size) != view.nbytes:
            raise ValueError(f"size={size} disagrees with the {view.nbytes} bytes of data")
        nbytes = view.nbytes if view is not None else parse_size(size or 0, "size")
        max_bytes = nbytes if max_size is None else parse_size(max_size, "max_size")
        if max_bytes < nbytes:
            raise ValueError(f"max_size ({max_bytes}) is smaller than size ({nbytes})")
        self._size = nbytes
        self._max_size = max_bytes
        self._memory = Region(round_to_pages(nbytes), max_size=max(round_to_pages(max_bytes), PAGE_SIZE),
                              shared=True, backing="memfd", _fd=_fd)
        self._merge_regions: list[MergeRegion] = []
        self._queue: list[DiffBatch] = []
        # Ranges written through the snapshot: (offsets, lengths) array pairs.
        self._changes: list[tuple[np.ndarray, np.ndarray]] = []
        self._lock = threading.RLock()
        if view is not None and nbytes:
            memoryview(self._memory)[:nbytes] = view

    @classmethod
    def attach(cls, fd: int, size: int, max_size: int | None = None) -> Snapshot:
        """A Snapshot over an existing snapshot's memfd (e.g. received from
        another process): the same bytes, shared, not copied. The file is
        duplicated; ``fd`` stays the caller's."""
        return cls(size=size, max_size=max_size, _fd=fd)

    def _follow_size(self, size: int) -> None:
        """Adopts a size the snapshot's owner grew the shared file to."""
        self._grow(size)

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
        return self._memory._fd

    @property
    def closed(self) -> bool:
        return self._memory.closed

    def _check_open(self) -> None:
        if self._memory.closed:
            raise PageforkError("the snapshot is closed")

    def _check_range(self, offset: int, length: int, limit: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > limit:
            raise OutOfBoundsError(f"{what} of {length} bytes at offset {offset} is outside "
                                   f"0..{limit}")

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """A copy of ``length`` bytes at ``offset`` (default: to the end)."""
        self._check_open()
        if length is None:
            length = max(self._size - offset, 0)
        self._check_range(offset, length, self._size, "read")
        return bytes(memoryview(self._memory)[offset:offset + length])

    def view(self) -> memoryview:
        """A read-only view of the snapshot's bytes (no copy)."""
        self._check_open()
        return memoryview(self._memory)[: self._size].toreadonly()

    def _grow(self, size: int) -> None:
        if size > self._max_size:
            raise OutOfBoundsError(f"the snapshot would grow to {size} bytes; its max_size is "
                                   f"{self._max_size}")
        if size > self._size:
            self._memory.resize(round_to_pages(size))
            self._size = size

    def write(self, data: Any, offset: int = 0) -> None:
        """Writes ``data`` at ``offset``, growing the snapshot up to ``max_size``."""
        self._check_open()
        view = memoryview(data).cast("B")
        if offset < 0:
            raise OutOfBoundsError(f"write at negative offset {offset}")
        with self._lock:
            self._grow(offset + view.nbytes)
            memoryview(self._memory)[offset:offset + view.nbytes] = view
            self._changes.append((np.array([offset], np.int64), np.array([view.nbytes], np.int64)))

    def write_pages(self, memory: Any, dirty_pages: Any) -> int:
        """Copies the pages flagged in ``dirty_pages`` from ``memory`` (up to
        the snapshot's size) and returns the bytes copied. Cheaper than
        ``apply(diff(...))`` when whole pages are known to have changed."""
        self._check_open()
        mem = memoryview(memory).cast("B")
        flags = np.ascontiguousarray(dirty_pages, dtype=np.bool_)
        if flags.shape != (-(-mem.nbytes // PAGE_SIZE),):
            raise ValueError(f"dirty_pages must hold one flag per page of memory, got {flags.shape}")
        with self._lock, memoryview(self._memory) as whole:
            copied = _native.copy_pages(whole[: self._size], mem, flags.view(np.uint8), PAGE_SIZE)
            pages = np.flatnonzero(flags[: -(-min(mem.nbytes, self._size) // PAGE_SIZE)])
            if pages.size:
                starts = pages * PAGE_SIZE
                lengths = np.minimum(starts + PAGE_SIZE, min(mem.nbytes, self._size)) - starts
                self._changes.append((starts.astype(np.int64), lengths.astype(np.int64)))
        return int(copied)

    def map_to(self, region: Region) -> None:
        """Restores ``region`` from the snapshot, copy-on-write and in place:
        same address, existing numpy views stay valid, the snapshot is never
        changed through the region. The region must not be larger than the
        snapshot (rounded up to pages); a smaller one maps the prefix. Re-arms
        ``cow`` tracking of the region.
        """
        self._check_open()
        if region.closed:
            raise PageforkError("the region is closed")
        if region.size > round_to_pages(self._size):
            raise OutOfBoundsError(f"a region of {region.size} bytes is larger than the snapshot "
                                   f"({self._size} bytes)")
        region._map_file(self._memory._fd, region.size, False)
        region._snapshot_mapped = True

    # ---- merge regions ----------------------------------------------------------

    def add_merge_region(self, offset: int, length: int, dtype: DataType | DTypeLike = DataType.RAW,
                         op: MergeOp | str = MergeOp.OVERWRITE) -> MergeRegion:
        """Adds a merge region; overlapping an existing one is a ``ValueError``."""
        region = MergeRegion(offset, length, dtype, op)  # type: ignore[arg-type]
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

    def _region_columns(self, limit: int, regions: list[MergeRegion]) -> tuple[np.ndarray, ...]:
        regions = regions or [MergeRegion(0, 0)]
        starts, ends, dtypes, ops = [], [], [], []
        for r in regions:
            start, end = r.offset, min(r.end(self._size), limit)
            if r.op not in _BYTEWISE:  # whole elements only
                end = start + (end - start) // r.dtype.itemsize * r.dtype.itemsize
            if end > start:
                starts.append(start)
                ends.append(end)
                dtypes.append(int(r.dtype))
                ops.append(int(r.op))
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
        (``()``: OVERWRITE over everything)."""
        self._check_open()
        mem = memoryview(memory).cast("B")
        n_pages = -(-mem.nbytes // PAGE_SIZE)
        flags = np.asarray(dirty_pages)
        if flags.dtype != np.bool_:
            flags = flags.astype(np.bool_)
        if flags.shape != (n_pages,):
            raise ValueError(f"dirty_pages must hold one flag per page of memory ({n_pages}), "
                             f"got shape {flags.shape}")
        limit = min(mem.nbytes, self._size)
        with self._lock:
            columns = self._region_columns(limit, self._merge_regions if regions is None
                                           else sorted(regions, key=lambda r: r.offset))
            try:
                batch = DiffBatch._from_native(_native.diff(
                    mem, self.view(), flags.view(np.uint8), PAGE_SIZE, *columns))
            except ArithmeticError as exc:
                raise MergeError(str(exc)) from None
        if mem.nbytes > self._size:
            extension = DiffBatch([Diff(self._size, bytes(mem[self._size:]))])
            batch = DiffBatch.concat([batch, extension])
        return batch

    def apply(self, diffs: Batchable) -> None:
        """Merges ``diffs`` into the snapshot in order. The whole batch is
        checked first (bounds, PRODUCT over a zero), so a bad one changes
        nothing. Diffs past the end grow the snapshot up to ``max_size``."""
        self._check_open()
        self._apply(_as_batch(diffs))

    def apply_batches(self, batches: Sequence[DiffBatch]) -> None:
        """``apply(DiffBatch.concat(batches))`` without copying the batches
        into one: all are checked against the snapshot as it is before any
        is written (all or nothing), then applied in order."""
        self._check_open()
        self._apply(*[b for b in batches if len(b)])

    def _apply(self, *batches: DiffBatch) -> None:
        if not batches or not any(len(b) for b in batches):
            return
        end = 0
        for batch in batches:
            if len(batch) == 0:
                continue
            if (batch.offsets < 0).any() or (batch.lengths < 0).any():
                raise OutOfBoundsError("a diff has a negative offset or length")
            end = max(end, int((batch.offsets + batch.lengths).max()))
        with self._lock:
            if end > self._max_size:
                raise OutOfBoundsError(f"a diff ends at byte {end}, past the snapshot's max_size "
                                       f"({self._max_size})")
            try:
                # Check everything before growing or writing anything.
                with memoryview(self._memory) as whole:
                    for batch in batches:
                        _native.apply(whole[: self._size], *batch.columns(), True, max(end, self._size))
                self._grow(end)
                with memoryview(self._memory) as whole:
                    for batch in batches:
                        _native.apply(whole[: self._size], *batch.columns())
            except ArithmeticError as exc:
                raise MergeError(str(exc)) from None
            except IndexError as exc:
                raise OutOfBoundsError(str(exc)) from None
            for batch in batches:
                changed = batch.ops != MergeOp.IGNORE
                self._changes.append((batch.offsets[changed], batch.lengths[changed]))

    def queue(self, diffs: Batchable) -> None:
        """Queues ``diffs`` for :meth:`write_queued` (thread-safe)."""
        batch = _as_batch(diffs)
        with self._lock:
            self._queue.append(batch)

    @property
    def queued(self) -> int:
        """Number of diffs queued."""
        with self._lock:
            return sum(len(b) for b in self._queue)

    def write_queued(self) -> int:
        """Applies every queued diff, in queue order, all or nothing; returns
        how many were written."""
        self._check_open()
        with self._lock:
            batch = DiffBatch.concat(self._queue)
            self._apply(batch)
            self._queue.clear()
            return len(batch)

    def tracked_changes(self) -> DiffBatch:
        """OVERWRITE diffs of every range written (by write/apply) since
        :meth:`clear_tracked_changes`, overlapping ranges joined, with the
        snapshot's current bytes."""
        self._check_open()
        with self._lock:
            if not self._changes:
                return DiffBatch()
            offsets = np.concatenate([o for o, _ in self._changes])
            lengths = np.concatenate([n for _, n in self._changes])
            order = np.argsort(offsets, kind="stable")
            starts, ends = offsets[order], offsets[order] + lengths[order]
            reach = np.maximum.accumulate(ends)
            new_run = np.concatenate(([True], starts[1:] > reach[:-1]))
            run_id = np.cumsum(new_run) - 1
            run_starts = starts[new_run]
            run_ends = np.zeros(len(run_starts), np.int64)
            np.maximum.at(run_ends, run_id, ends)
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
        """Releases the snapshot's memory (regions mapped from it keep their pages)."""
        self._memory.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Snapshot {self._size} bytes (max {self._max_size}), "
                f"{len(self._merge_regions)} merge regions>")
