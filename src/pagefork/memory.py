"""Region: page-aligned memory that can grow in place and be tracked."""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _native
from ._errors import OutOfBoundsError, PageforkError, native_error
from ._sizes import PAGE_SIZE, as_index, parse_size, round_to_pages

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["Region", "PAGE_SIZE"]

Backing = Literal["anonymous", "memfd"]

# Sizes the native core takes as ssize_t; x86-64 user space is far smaller.
_LARGEST = (1 << 63) - PAGE_SIZE


class Region(_native.Mapping):
    """Page-aligned, mmap-backed memory.

    ``size`` is rounded up to whole pages; ``max_size`` (default ``size``)
    reserves address space so :meth:`resize` can grow the region without
    moving it. ``shared=True`` maps it ``MAP_SHARED`` (visible to processes
    that share it); ``backing="memfd"`` backs it with a memfd instead of
    anonymous memory (``cow`` tracking needs a private memfd mapping). Memory
    starts zeroed. Supports the writable buffer protocol, so
    ``memoryview(region)`` and ``numpy.frombuffer(region, ...)`` work.

    Regions are advised ``MADV_NOHUGEPAGE`` so tracking stays page-granular
    (one that :func:`pagefork.checkpoint.load` made may start on huge pages:
    the first tracked write to one splits it, and writes are still found
    page by page).
    """

    def __init__(
        self,
        size: int | str,
        *,
        max_size: int | str | None = None,
        shared: bool = False,
        backing: Backing = "anonymous",
        _fd: int = -1,
    ) -> None:
        nbytes = round_to_pages(parse_size(size, "size"))
        max_bytes = nbytes if max_size is None else round_to_pages(parse_size(max_size, "max_size"))
        if max_bytes < nbytes:
            raise ValueError(f"max_size ({max_bytes} bytes) is smaller than size ({nbytes} bytes)")
        if backing not in ("anonymous", "memfd"):
            raise ValueError(f"backing must be 'anonymous' or 'memfd', not {backing!r}")
        self.backing: Backing = backing
        # Internal: for Tracker: trackings of this region (the native core
        # resizes and stops them).
        self.trackings: weakref.WeakSet[Any] = weakref.WeakSet()
        # Internal: for Snapshot.map_to and main-memory windows: the memory is
        # a private mapping of a snapshot.
        self.snapshot_mapped = False
        # Internal: for pagefork.backends.combine: (snapshot, size, shrinks) a
        # workspace left this memory mapped from with no page written:
        # reusable without a remap.
        self.clean_for: tuple[Any, int, int] | None = None
        # Counts shrinks: pages cut and regrown read as zero without any
        # tracker reporting them, so an incremental checkpoint must start over.
        self._shrinks = 0
        reserve = max(max_bytes, PAGE_SIZE)
        if reserve > _LARGEST:
            raise OutOfBoundsError(f"cannot reserve {reserve} bytes (max_size) for a region: "
                                   f"more than the address space ({_LARGEST} bytes)")
        try:
            self._map(nbytes, reserve, bool(shared), backing == "memfd", _fd)
        except OSError as exc:
            what = (f"cannot reserve {reserve} bytes (max_size) for a region of {nbytes} bytes"
                    if reserve > nbytes else f"cannot map a region of {nbytes} bytes")
            raise native_error(exc, what) from exc
        self._max_size = max_bytes

    # The C base reports the reservation (at least one page); the contract's
    # max_size is what the user asked for.
    @property
    def max_size(self) -> int:  # type: ignore[override]
        """The largest size :meth:`resize` accepts, in bytes."""
        return self._max_size

    @property
    def shrinks(self) -> int:
        """Internal: for checkpoints and thread combines: how many times the region shrank."""
        return self._shrinks

    @property
    def file_fd(self) -> int:
        """Internal: for snapshots and benchmarks: the backing memfd, or -1."""
        return self._fd

    @property
    def exports(self) -> int:
        """Internal: for leak checks: views (memoryview, numpy) of the region still alive."""
        return self._exports

    def map_snapshot(self, fd: int) -> None:
        """Internal: for Snapshot.map_to: maps the snapshot file ``fd`` over the region, privately, in place."""
        self._map_file(fd, self.size, False)
        self.snapshot_mapped = True

    def grow_file(self, fd: int, size: int) -> None:
        """Internal: for executors: grows the region to ``size`` bytes, mapping the new pages of
        the file ``fd`` privately; the pages it had stay as they are."""
        self._grow_file(fd, size)

    def advise_huge(self, huge: bool) -> None:
        """Internal: for checkpoint restores: asks for (or against) transparent huge pages."""
        self._advise_huge(huge)

    @property
    def n_pages(self) -> int:
        """Number of pages in the region."""
        return self.size // PAGE_SIZE

    def resize(self, size: int | str) -> None:
        """Grows or shrinks the region in place, keeping its address and the
        contents of the pages it keeps; grown pages read as zero.

        Tracking stays correct across a resize: new pages are tracked like the
        rest. Shrinking while views (memoryview, numpy) exist raises
        ``BufferError``.
        """
        self._check_open()
        nbytes = round_to_pages(parse_size(size, "size"))
        if nbytes > self._max_size:
            raise OutOfBoundsError(
                f"cannot resize to {nbytes} bytes: max_size is {self._max_size} bytes"
            )
        old = self.size
        if nbytes < old and self._exports:
            raise BufferError("cannot shrink a region while views of it exist (memoryview/numpy)")
        try:
            self._resize(nbytes)  # resizes its trackings too, in the same native step
        except OSError as exc:
            raise native_error(exc, f"cannot resize the region to {nbytes} bytes") from exc
        if nbytes < old:
            self._shrinks += 1

    def array(self, dtype: DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None,
              offset: int = 0) -> np.ndarray:
        """Returns a writable numpy view of the region starting at byte ``offset``.

        ``shape=None`` covers the rest of the region. The view keeps the
        memory alive even after :meth:`close`.
        """
        self._check_open()
        dt = np.dtype(dtype)
        offset = as_index(offset, "offset")
        if offset < 0 or offset > self.size:
            raise OutOfBoundsError(f"offset {offset} is outside the region (size {self.size})")
        if shape is None:
            shape = ((self.size - offset) // dt.itemsize,)
        try:
            shape_t = tuple(as_index(n, "shape") for n in shape)  # type: ignore[union-attr]
        except TypeError:
            shape_t = (as_index(shape, "shape"),)
        if any(n < 0 for n in shape_t):
            raise ValueError(f"negative dimension in shape {shape_t}")
        count = math.prod(shape_t)  # Python ints: no overflow
        if offset + count * dt.itemsize > self.size:
            raise OutOfBoundsError(
                f"{shape_t} of {dt} at offset {offset} needs {offset + count * dt.itemsize} bytes; "
                f"the region has {self.size}"
            )
        return np.frombuffer(memoryview(self), dtype=dt, count=count, offset=offset).reshape(shape_t)

    def close(self) -> None:
        """Stops all tracking of the region and releases it. Views still alive
        keep the memory mapped until they are gone."""
        if self.closed:
            return
        self._close()  # stops every tracking of it first (the native core owns that order)
        self.trackings.clear()

    def _check_open(self) -> None:
        if self.closed:
            raise PageforkError("the region is closed")

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes at {self.address:#x}"
        kind = ("shared " if self.shared else "private ") + self.backing
        return f"<Region {kind}, {state}, max_size={self._max_size}>"
