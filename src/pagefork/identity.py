"""Arrays whose threads start from the merge rule's identity
(``App.alloc(..., start="identity")``): OpenMP's ``reduction(+:x)`` model.

Every thread's ``mem[name]`` starts at the identity of the array's rule (0
for ``sum`` and ``xor``, 1 for ``product``, the dtype's lowest value or -inf
for ``max``, its highest or +inf for ``min``) instead of the shared value,
and at the join main memory becomes ``main op (each thread's values)``, in
thread order.

Why: a thread's copy-on-write memory costs a page fault (several
microseconds) for every page it first writes; a thread that scatters updates
over a large array writes nearly every page. Here each worker keeps one
buffer per identity array, populated once and reused by every thread it
runs, in every batch. After a thread, the buffer is compared with an
identity-filled copy (the native diff kernel, at memory speed), which gives
exactly the diffs the merge needs (``sum``: value - 0, ``product``: value /
1, ``max``/``min``: the value, ``xor``: value ^ 0), and only the runs that
changed are put back to the identity before the next thread. So a thread
pays two passes over the array at memory speed, whatever it writes, instead
of a fault per page written.
"""

from __future__ import annotations

import gc
import mmap
import pickle
import sys
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from collections.abc import Iterable, Sequence

import numpy as np

from . import _native
from ._errors import PageforkError
from ._sizes import PAGE_SIZE, round_to_pages
from ._system import available_memory
from .diffs import DiffBatch, expand_runs
from .merge import DataType, MergeOp

if TYPE_CHECKING:
    from .layout import Allocation

__all__ = ["STARTS", "IDENTITY_RULES", "identity_of", "check_start", "IdentityBuffers", "with_contributions",
           "products_as_overwrites"]

#: The values ``App.alloc``'s ``start`` takes.
STARTS = ("snapshot", "identity")

#: The merge rules that have an identity (in the order the docs list them).
IDENTITY_RULES = (MergeOp.SUM, MergeOp.PRODUCT, MergeOp.MAX, MergeOp.MIN, MergeOp.XOR)


def identity_of(op: MergeOp, dt: np.dtype) -> np.ndarray:
    """One element of dtype ``dt`` holding the identity of ``op`` (a 1-element
    array, so structured and byte-string dtypes work for ``xor``). Raises
    ValueError for rules and dtypes that have none."""
    if op not in IDENTITY_RULES:
        raise ValueError(f"start='identity' needs a merge rule with an identity (sum, product, max, "
                         f"min, xor), not {op.name.lower()!r}")
    value = np.zeros(1, dt)  # sum and xor: all zero bytes
    if op is MergeOp.XOR or op is MergeOp.SUM:
        return value
    try:
        kind = DataType.of(dt)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"merge={op.name.lower()!r} has no identity for dtype {dt}: {exc}") from None
    if kind is DataType.RAW or (kind is DataType.BOOL and op is MergeOp.PRODUCT):
        raise ValueError(f"merge={op.name.lower()!r} has no identity for dtype {dt}")
    numeric = kind.numpy
    if op is MergeOp.PRODUCT:
        value[0] = 1
    elif kind is DataType.BOOL:
        value[0] = op is MergeOp.MIN
    elif numeric.kind == "f":
        value[0] = -np.inf if op is MergeOp.MAX else np.inf
    else:
        info = np.iinfo(numeric)
        value[0] = info.min if op is MergeOp.MAX else info.max
    return value


def check_start(start: object, op: MergeOp, dt: np.dtype) -> str:
    """``start`` checked against the rule and dtype (ValueError if refused)."""
    if not isinstance(start, str) or start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(map(repr, STARTS))}, not {start!r}")
    if start == "identity":
        identity_of(op, dt)
    return start


#: Each live buffer's export of its data's memoryview (see _Buffer._blank),
#: with the weak reference to data whose callback lets it go, by its id.
_PINS: dict[int, tuple[weakref.ref, pickle.PickleBuffer]] = {}


def _unpin(data: weakref.ref, pins: dict[int, tuple[weakref.ref, pickle.PickleBuffer]] = _PINS) -> None:
    # (the dict bound here: at interpreter exit the module's globals may be gone first)
    pin = pins.pop(id(data), None)
    if pin is not None:
        pin[1].release()


@dataclass
class _Buffer:
    """One identity array's private buffer on a worker (page-rounded,
    page-aligned, populated once)."""

    allocation: Allocation
    identity: np.ndarray   # one element: what every element of data starts as
    kind: DataType         # the diffs' labels (xor: RAW bytes)
    # Set by _blank, never passed to __init__ (see _own).
    # uint8: the base of every view a thread gets, so only counted, never
    # read or written (mem[name].base is this very array: a thread may have
    # made it read-only or changed its dtype, shape or strides).
    data: np.ndarray = field(init=False)
    # data as identity-sized elements (bytes for xor), which no thread can
    # reach: every read and write of the buffer goes through it.
    elements: np.ndarray = field(init=False)
    # What the last thread changed, put back before the next one:
    # (offsets, lengths) of its diffs; None: unknown (a failed thread), all.
    pending: tuple[np.ndarray, np.ndarray] | None = None

    # What the buffer's own fields add to the reference counts _references
    # reads. Measured once on throwaway buffers, never on this one: a
    # profiler that sampled a frame holding ``data`` (Dask's samples every
    # task thread) would raise a measurement by one, and when it let go a
    # kept view would match it. So no frame that builds or measures a buffer
    # (_blank's, __init__'s, _references') has a local holding any of them.
    _own: ClassVar[tuple[int, ...] | None] = None

    @classmethod
    def build(cls, a: Allocation) -> _Buffer:
        dt = a.np_dtype
        size = max(round_to_pages(a.nbytes), PAGE_SIZE)
        xor = a.merge is MergeOp.XOR
        identity = np.zeros(1, np.uint8) if xor else identity_of(a.merge, dt)
        available = available_memory()
        if available is not None and size > available:  # filling it would wake the OOM killer
            raise MemoryError(f"start='identity': {a.name!r} needs a {size}-byte buffer on each worker; "
                              f"the machine has {available} bytes available")
        buffer = cls._blank(a, size, identity, DataType.RAW if xor else DataType.of(dt))
        buffer.reset()  # populates it: no thread pays a page fault
        return buffer

    @classmethod
    def _blank(cls, a: Any, size: int, identity: np.ndarray, kind: DataType) -> _Buffer:
        buffer = cls(a, identity, kind)
        # Private: a thread that fork()s must not write into the parent's buffer.
        buffer.data = np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), np.uint8)
        # data.base, the memoryview that alone holds the mapping, is reachable
        # from every view: its release() would unmap the memory under them
        # (numpy holds no export of it). One export held as long as data
        # lives makes release() refuse (BufferError), and mmap.close() too.
        # (C calls only: weakref.finalize's frame would hold data.)
        pin = weakref.ref(buffer.data, _unpin)
        _PINS[id(pin)] = pin, pickle.PickleBuffer(buffer.data.base)  # type: ignore[arg-type]
        buffer.elements = buffer.data.view(identity.dtype)  # the itemsize (1 to 8) divides a page
        return buffer

    @classmethod
    def own_references(cls) -> tuple[int, ...]:
        """The counts of a buffer nothing else holds: the least of three
        throwaway ones (whatever else held one then could only add)."""
        if cls._own is None:
            counts = [cls._blank(None, PAGE_SIZE, np.zeros(1, np.uint8), DataType.RAW)._references()
                      for _ in range(3)]
            cls._own = tuple(min(column) for column in zip(*counts))
        return cls._own

    def _references(self) -> tuple[int, ...]:
        """The reference counts of every object a view of the buffer can
        hold: ``data`` (numpy views of it); its memoryview (``data.base``;
        its own exports); that memoryview's managed buffer, which
        ``memoryview(mv)``, ``mv[...]``, ``mv.cast()``, ``np.frombuffer(mv)``
        and ctypes' ``from_buffer(mv)`` share without holding ``mv`` (CPython
        reaches it only through the memoryview's GC referents); the mmap
        behind it (``mv.obj``), which its own exports hold; and the weak
        references to data, mv and the mmap, which hold nothing but get
        them back while the buffer lives."""
        return (sys.getrefcount(self.data), sys.getrefcount(self.data.base),
                sys.getrefcount(gc.get_referents(self.data.base)[0]),
                sys.getrefcount(self.data.base.obj),  # type: ignore[union-attr]
                weakref.getweakrefcount(self.data) + weakref.getweakrefcount(self.data.base)
                + weakref.getweakrefcount(self.data.base.obj))  # type: ignore[union-attr]

    def _bytes(self) -> np.ndarray:
        """The whole buffer as bytes (a view a thread cannot have altered)."""
        return self.elements.view(np.uint8)

    def shared(self) -> bool:
        """Whether anything but the buffer itself holds it (a view a thread
        kept; a frame a profiler sampled, which costs a new buffer, never a
        leak). Checked between threads."""
        return self._references() != self.own_references()

    def reset(self) -> None:
        """Puts back to the identity what the last thread changed: the
        changed runs when few, else the whole buffer."""
        if self.pending is None or int(self.pending[1].sum()) * 4 > self.elements.nbytes:
            self.elements.fill(self.identity[0])
        elif self.pending[0].size:  # one native pass writing the identity over each run
            offsets, lengths = self.pending
            k = self.identity.itemsize
            total = int(lengths.sum())
            fill = (np.zeros(total, np.uint8) if not self.identity.view(np.uint8).any()
                    else np.full(total // k, self.identity[0], self.identity.dtype).view(np.uint8))
            raw = np.zeros(offsets.size, np.uint8)  # DataType.RAW, MergeOp.OVERWRITE
            _native.apply(self._bytes(), offsets, lengths, raw, raw, fill)
        self.pending = None  # until diffs() says what the next thread changed

    def hand_out(self) -> np.ndarray:
        """The next thread's view of the buffer."""
        a = self.allocation
        return self._bytes()[: a.nbytes].view(a.np_dtype).reshape(a.shape)

    def diffs(self) -> DiffBatch:
        """The thread's contributions as diffs at the allocation's offset."""
        a = self.allocation
        # Something the thread left (its result, a Python thread it started)
        # may write anywhere before it lets go: then reset it all. The view
        # handed out is gone from its mem (IdentityBuffers.collect). Counted
        # before the diff: what writes after the count held the buffer at
        # the count (the diff runs without the GIL).
        alone = self._references() == self.own_references()
        batch = DiffBatch.from_native(_native.identity_diff(
            self._bytes()[: a.nbytes], self.identity.view(np.uint8), int(self.kind), int(a.merge)))
        self.pending = (batch.offsets, batch.lengths) if alone else None
        return DiffBatch.unchecked(batch.offsets + a.offset, batch.lengths, batch.dtypes, batch.ops,
                                    batch.data)


class IdentityBuffers:
    """A worker's buffers for the identity arrays of the layouts it runs
    (one per :class:`~pagefork.batch.Workspace`, used by one thread at a
    time). A buffer is rebuilt when its allocation changes and dropped when
    it leaves the layout."""

    def __init__(self) -> None:
        self._buffers: dict[str, _Buffer] = {}
        self._views: dict[str, Any] = {}  # what begin handed out (the thread's mem._identity)

    def begin(self, layout: Iterable[Allocation]) -> dict[str, np.ndarray]:
        """Buffers at the identity for the next thread: name -> its array."""
        wanted = {a.name: a for a in layout if a.start == "identity"}
        self._expire()  # the last thread is over (a failed one was never collected)
        # A buffer a kept view still reaches is left to it (with its thread's
        # values): a fresh one serves the next thread, so nothing written
        # through that view after its thread can merge.
        for name in [n for n, b in self._buffers.items() if wanted.get(n) != b.allocation or b.shared()]:
            del self._buffers[name]  # freed with the last view a result may still hold
        for name, a in wanted.items():
            if name not in self._buffers:
                self._buffers[name] = _Buffer.build(a)
        views = {}
        for name, b in self._buffers.items():
            b.reset()
            views[name] = b.hand_out()
        self._views = views
        return views

    def _expire(self) -> None:
        """Takes the views handed out back from the thread's mem (a mem kept
        past its thread gets an error, never a buffer another thread runs on):
        only what the thread kept itself still reaches its buffers."""
        for name in list(self._views):
            self._views[name] = _EXPIRED

    def collect(self) -> DiffBatch | None:
        """The last thread's diffs of every identity array (None when there is
        no identity array); the runs they cover are reset at the next
        :meth:`begin`. A thread that fails is never collected: every buffer
        is then reset whole."""
        if not self._buffers:
            return None
        self._expire()
        parts = [b.diffs() for b in sorted(self._buffers.values(), key=lambda b: b.allocation.offset)]
        return parts[0] if len(parts) == 1 else DiffBatch.concat(parts)

    def close(self) -> None:
        self._expire()
        self._buffers.clear()


class _Expired:
    """What ``mem[name]`` of an identity array gives once its thread is over."""

    def __getitem__(self, key: object) -> Any:
        raise PageforkError("this mem's thread is over: its identity arrays went with it "
                            "(use mem[name] inside the thread function only)")


_EXPIRED = _Expired()


def with_contributions(diffs: DiffBatch, contributions: DiffBatch | None) -> DiffBatch:
    """A thread's diffs followed by its identity arrays' (copied only when
    both have some)."""
    if contributions is None or not len(contributions):
        return diffs
    return contributions if not len(diffs) else DiffBatch.concat([diffs, contributions])


def products_as_overwrites(batches: Sequence[DiffBatch], allocations: Iterable[Allocation],
                           snapshot: Any) -> list[DiffBatch]:
    """``batches`` (in thread order) with the PRODUCT diffs of identity
    arrays replaced by OVERWRITE diffs of the products. The merge kernel
    refuses a PRODUCT over a zero (with ``start="snapshot"`` the ratio
    behind it is lost); here each value is the factor itself, so main times
    every thread's factors, in thread order, is exact whatever main holds.
    Costs what the diffs hold (whole-array numpy, one pass per thread)."""
    products = [a for a in allocations if a.start == "identity" and a.merge is MergeOp.PRODUCT and a.nbytes]
    if not products or not any(len(b) for b in batches):
        return list(batches)
    keep = [np.ones(len(b), np.bool_) for b in batches]
    extra = []
    for a in products:
        dt, k, lo, hi = a.np_dtype, a.np_dtype.itemsize, a.offset, a.offset + a.nbytes
        parts = []  # per thread: (element indexes, factors)
        for b, kept in zip(batches, keep):
            mine = (b.ops == int(MergeOp.PRODUCT)) & (b.offsets >= lo) & (b.offsets < hi)
            if not mine.any():
                continue
            kept &= ~mine
            lengths = b.lengths[mine]
            factors = np.frombuffer(_native.gather(b.data, b.starts[mine], lengths), dt)
            parts.append((expand_runs((b.offsets[mine] - lo) // k, lengths // k), factors))
        if not parts:
            continue
        touched = np.unique(np.concatenate([p[0] for p in parts]))
        values = np.frombuffer(snapshot.view(), dt, a.nbytes // k, lo)[touched]
        with np.errstate(all="ignore"):
            for elements, factors in parts:  # thread order: floats round as it does
                # .at: an element may repeat (mem.region written there too), in diff order
                np.multiply.at(values, np.searchsorted(touched, elements), factors)
        count = touched.size
        extra.append(DiffBatch.unchecked(lo + touched.astype(np.int64) * k, np.full(count, k, np.int64),
                                          np.zeros(count, np.uint8), np.zeros(count, np.uint8),
                                          values.tobytes()))  # RAW, OVERWRITE
    out = [b if kept.all() else _select(b, kept) for b, kept in zip(batches, keep)]
    return out + extra


def _select(b: DiffBatch, kept: np.ndarray) -> DiffBatch:
    """The diffs of ``b`` flagged in ``kept``."""
    lengths = b.lengths[kept]
    return DiffBatch.unchecked(b.offsets[kept], lengths, b.dtypes[kept], b.ops[kept],
                                _native.gather(b.data, b.starts[kept], lengths))
