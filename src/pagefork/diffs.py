"""Diffs: one change (:class:`Diff`) and many stored column-wise
(:class:`DiffBatch`), with the checks every way of building a batch shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from . import _native
from ._buffers import byte_view
from ._sizes import as_index
from .merge import BYTEWISE_OPS, INT64_MAX, DataType, MergeOp, check_op

__all__ = ["Diff", "DiffBatch", "Batchable", "as_batch", "column_error", "expand_runs"]

def column_error(offsets: np.ndarray, lengths: np.ndarray, dtypes: np.ndarray, ops: np.ndarray,
                  data_len: int) -> str | None:
    """Why these DiffBatch columns are malformed (naming the first bad diff
    and its offset), or None. The checks shared by DiffBatch.from_columns
    and the wire format: one native pass over the columns."""
    n = len(offsets)
    if not (offsets.ndim == lengths.ndim == dtypes.ndim == ops.ndim == 1):
        return "DiffBatch columns must be one-dimensional"
    if not (len(lengths) == len(dtypes) == len(ops) == n):
        return "DiffBatch columns differ in length"
    found = _native.check_columns(np.ascontiguousarray(offsets, np.int64),
                                  np.ascontiguousarray(lengths, np.int64),
                                  np.ascontiguousarray(dtypes, np.uint8),
                                  np.ascontiguousarray(ops, np.uint8), data_len)
    if found is None:
        return None
    i, problem = found
    if problem == _native.COLUMN_DATA_LENGTH:
        return (f"no diffs, but {data_len} bytes of data" if n == 0 else
                f"the diff lengths do not add up to the {data_len} bytes of data")
    offset, length, dtype, op = int(offsets[i]), int(lengths[i]), int(dtypes[i]), int(ops[i])
    why = {
        _native.COLUMN_NEGATIVE: f"negative offset or length ({length})",
        _native.COLUMN_OVERFLOW: f"{length} bytes there end past 64 bits (the end overflows)",
        _native.COLUMN_PAST_DATA: f"{length} bytes, longer than the {data_len} bytes of data",
        _native.COLUMN_UNKNOWN_CODE: f"unknown dtype/op codes {dtype}/{op}",
    }.get(problem)
    if why is None:
        name, op_name = DataType(dtype).name, MergeOp(op).name
        why = (f"invalid dtype/op: {op_name} is not defined for {name}" if problem == _native.COLUMN_INVALID_OP
               else f"{length} bytes is not a whole number of {name} values")
    return f"diff {i} at offset {offset}: {why}"



@dataclass(frozen=True)
class Diff:
    """One change: ``data`` at ``offset``, merged by ``op`` on ``dtype`` values."""

    offset: int
    data: bytes
    dtype: DataType = DataType.RAW
    op: MergeOp = MergeOp.OVERWRITE

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", as_index(self.offset, "diff offset"))
        object.__setattr__(self, "dtype", DataType.of(self.dtype))
        object.__setattr__(self, "op", MergeOp.of(self.op))
        if not isinstance(self.data, bytes):  # any bytes-like; bytes(5) would be 5 zeros
            object.__setattr__(self, "data", memoryview(self.data).tobytes())
        if self.offset < 0:
            raise ValueError(f"diff offset must be >= 0, got {self.offset}")
        if self.offset > INT64_MAX - len(self.data):
            raise ValueError(f"diff at offset {self.offset} of {len(self.data)} bytes ends past 64 bits")
        check_op(self.dtype, self.op)
        if self.op not in BYTEWISE_OPS and len(self.data) % self.dtype.itemsize:
            raise ValueError(f"diff at offset {self.offset}: {len(self.data)} bytes is not a whole "
                             f"number of {self.dtype.name} values")


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
        """Builds a batch from its columns without copying them (``data``
        is taken as its bytes, whatever its item type; a non-contiguous
        buffer is copied). Malformed
        columns (negative or overflowing ranges, unknown or invalid codes,
        typed diffs that are not whole values, lengths that do not add up to
        the data) raise ``ValueError`` naming the first bad diff."""
        batch = cls.unchecked(_int_column(offsets, np.int64, "offsets"),
                               _int_column(lengths, np.int64, "lengths"),
                               _int_column(dtypes, np.uint8, "dtypes"),
                               _int_column(ops, np.uint8, "ops"),
                               byte_view(data))  # its bytes, whatever its item type
        why = column_error(*batch.columns()[:4], batch.nbytes)
        if why is not None:
            raise ValueError(why)
        return batch

    @classmethod
    def unchecked(cls, offsets: np.ndarray, lengths: np.ndarray, dtypes: np.ndarray,
                  ops: np.ndarray, data: bytes | memoryview) -> DiffBatch:
        """Internal: for the diff and merge kernels' callers: a batch from columns already checked."""
        batch = cls.__new__(cls)
        batch.offsets, batch.lengths, batch.dtypes, batch.ops = offsets, lengths, dtypes, ops
        batch.data = data
        batch._starts = None
        return batch

    @classmethod
    def from_native(cls, columns: tuple[Any, Any, Any, Any, Any]) -> DiffBatch:
        """Internal: for snapshots and identity diffs. A batch the diff kernel made (well formed by construction)."""
        offsets, lengths, dtypes, ops, data = columns  # _native.Buffer: no copies
        return cls.unchecked(np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.int64),
                              np.frombuffer(dtypes, np.uint8), np.frombuffer(ops, np.uint8),
                              memoryview(data))

    @classmethod
    def concat(cls, batches: Iterable[DiffBatch]) -> DiffBatch:
        """One batch holding every diff of ``batches``, in order."""
        parts = list(batches)
        if not parts:
            return cls()
        return cls.unchecked(
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
        return memoryview(self.data).nbytes

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> Diff: ...
    @overload
    def __getitem__(self, index: slice) -> DiffBatch: ...

    def __getitem__(self, index: int | slice) -> Diff | DiffBatch:
        if isinstance(index, slice):
            return DiffBatch(self[i] for i in range(*index.indices(len(self))))
        index = as_index(index, "diff index")
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

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Columns made by the native core or decoded from the wire are
        # views (memoryview data): pickled as copies, checked when loaded.
        return (DiffBatch.from_columns, (np.array(self.offsets), np.array(self.lengths),
                                         np.array(self.dtypes), np.array(self.ops),
                                         bytes(self.data)))


Batchable = DiffBatch | Iterable[Diff]


def _int_column(values: Any, dtype: type, what: str) -> np.ndarray:
    """``values`` as a column of ``dtype`` (no copy when it already is one);
    values that do not fit are a ValueError, not a silent wrap."""
    array = np.ascontiguousarray(values)
    if array.dtype == dtype:
        return array
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"DiffBatch {what} must be integers, not {array.dtype}")
    info = np.iinfo(dtype)
    if array.size and (int(array.min()) < info.min or int(array.max()) > info.max):
        raise ValueError(f"DiffBatch {what} do not fit {np.dtype(dtype)}")
    return array.astype(dtype)



def expand_runs(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every index of the runs [first, first + count) (of pages, values,
    ...), whole-array numpy."""
    if counts.size == 0 or bool((counts == 1).all()):  # scattered values: one per run
        return firsts
    before = np.cumsum(counts) - counts
    return np.repeat(firsts - before, counts) + np.arange(int(counts.sum()))


def as_batch(diffs: Batchable) -> DiffBatch:
    return diffs if isinstance(diffs, DiffBatch) else DiffBatch(diffs)

