"""The layout of an App's memory: named arrays (:class:`Allocation`) and
what a thread function sees of them (:class:`ThreadMemory`)."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import PageforkError
from .memory import Region
from .merge import DataType, MergeOp

__all__ = ["Allocation", "ThreadMemory", "dtype_text", "dtype_of"]


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
    def merge_dtype(self) -> DataType:
        """The unit the array's changes are diffed and merged in. Typed rules:
        its DataType. ``overwrite``: its element where it has a DataType
        (bool, ints, floats: a changed value is carried whole, so threads
        writing one element never merge into a mix of their bytes), a
        complex number's float parts, else bytes (structured records,
        strings, other byte orders: two fields of one record stay two
        locations). ``xor`` and ``ignore``: bytes."""
        dt = self.np_dtype
        if self.merge in (MergeOp.XOR, MergeOp.IGNORE):
            return DataType.RAW
        if self.merge is not MergeOp.OVERWRITE:
            return DataType.of(dt)
        if dt.fields is None and dt.kind == "c" and dt.itemsize in (8, 16):
            dt = np.dtype(f"f{dt.itemsize // 2}").newbyteorder(dt.byteorder)
        try:
            return DataType.of(dt)
        except (TypeError, ValueError):
            return DataType.RAW

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
        self._region: Region | None = region
        self._layout = layout
        self._identity = identity or {}

    @property
    def region(self) -> Region:
        """The thread's whole memory; a ``mem`` kept past its thread raises
        :class:`PageforkError` (that memory serves later threads)."""
        if self._region is None:
            raise PageforkError("this mem's thread is over: its memory went with it (use mem and "
                                "mem[name] inside the thread function only)")
        return self._region

    def expire(self) -> None:
        """Internal: for batch threads. The thread is over: nothing reaches its memory through ``mem`` any more."""
        self._region = None

    def __getitem__(self, name: str) -> np.ndarray:
        own = self._identity.get(name)
        if own is not None:
            return own[...]  # a new view: the thread may reshape it freely
        try:
            return self._layout[name].view(self.region)
        except KeyError:
            raise KeyError(f"no array named {name!r}; allocated: {sorted(self._layout)}") from None

    def __setitem__(self, name: str, value: Any) -> None:
        """Only what augmented assignment stores back (``mem[name] += x``,
        ``-=``, ``|=``, ...: numpy changed the array in place and Python
        assigns the same array again). Anything else would replace this
        thread's view by an object the merge never sees: refused."""
        current = self[name]
        if isinstance(value, np.ndarray) and _same_view(value, current):
            return
        raise TypeError(f"mem[{name!r}] cannot be replaced; write into it: mem[{name!r}][...] = value "
                        f"(augmented assignment such as mem[{name!r}] += 1 works in place)")

    def __contains__(self, name: object) -> bool:
        return name in self._layout

    def keys(self) -> list[str]:
        return list(self._layout)



def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` show the same elements of the same memory."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)
