"""Merge rules: the element types (:class:`DataType`), the operations
(:class:`MergeOp`) and the byte ranges they apply to (:class:`MergeRegion`).

A snapshot's merge regions say how the changes threads make to each range
merge back: bytes overwrite or XOR, typed values reduce element-wise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING
from collections.abc import Iterable

import numpy as np

from ._sizes import as_index

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["DataType", "MergeOp", "MergeRegion", "BYTEWISE_OPS", "INT64_MAX", "check_op", "checked_regions"]

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
        if value is None:  # np.dtype(None) would be float64
            raise TypeError("not a DataType or numpy dtype: None")
        try:
            dt = np.dtype(value)
        except TypeError:
            if isinstance(value, str):
                raise ValueError(f"unknown DataType {value!r}; valid: "
                                 + ", ".join(t.lower() for t in cls.__members__)) from None
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

    @property
    def bytewise(self) -> bool:
        """Whether it merges bytes (OVERWRITE, XOR, IGNORE: any dtype) rather
        than typed values (SUM, SUBTRACT, PRODUCT, MAX, MIN)."""
        return self in BYTEWISE_OPS

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
BYTEWISE_OPS = {MergeOp.OVERWRITE, MergeOp.XOR, MergeOp.IGNORE}

# Offsets and lengths are int64 in every column and on the wire.
INT64_MAX = (1 << 63) - 1


def check_op(dtype: DataType, op: MergeOp) -> None:
    if op in BYTEWISE_OPS:
        return
    if dtype is DataType.RAW or (dtype is DataType.BOOL and op in _ARITHMETIC):
        raise ValueError(f"merge op {op.name} needs a numeric DataType, not {dtype.name}")



@dataclass(frozen=True)
class MergeRegion:
    """A byte range of a snapshot and how changes to it merge.

    ``length == 0`` means "to the end of the snapshot". Typed ops (SUM,
    SUBTRACT, PRODUCT, MAX, MIN) work element-wise on ``dtype`` values, so
    their ``length`` must be a whole number of elements. Where the snapshot
    (or the memory diffed) ends inside a typed region's last value, as it
    may for a region running to the end, the leftover bytes are diffed and
    merged as OVERWRITE: no change is ever left out.
    """

    offset: int
    length: int
    dtype: DataType = DataType.RAW
    op: MergeOp = MergeOp.OVERWRITE

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", as_index(self.offset, "merge region offset"))
        object.__setattr__(self, "length", as_index(self.length, "merge region length"))
        object.__setattr__(self, "dtype", DataType.of(self.dtype))
        object.__setattr__(self, "op", MergeOp.of(self.op))
        if self.offset < 0 or self.length < 0:
            raise ValueError(f"merge region offset and length must be >= 0, got {self.offset}, {self.length}")
        if self.offset + self.length > INT64_MAX:
            raise ValueError(f"merge region at offset {self.offset} of {self.length} bytes ends "
                             "past 64 bits")
        check_op(self.dtype, self.op)
        if self.op not in BYTEWISE_OPS and self.length % self.dtype.itemsize:
            raise ValueError(f"merge region of {self.length} bytes is not a whole number of "
                             f"{self.dtype.name} values")

    def end(self, size: int) -> int:
        """Where the region ends in a snapshot of ``size`` bytes."""
        return size if self.length == 0 else self.offset + self.length



def checked_regions(regions: Iterable[MergeRegion]) -> list[MergeRegion]:
    """``regions`` sorted by offset; anything but disjoint MergeRegions is a
    TypeError/ValueError naming the culprit."""
    ordered = list(regions)
    for r in ordered:
        if not isinstance(r, MergeRegion):
            raise TypeError(f"regions must be MergeRegion objects, not {type(r).__name__}")
    ordered.sort(key=lambda r: r.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.length == 0 or b.offset < a.offset + a.length:
            raise ValueError(f"{b} overlaps {a}")
    return ordered

