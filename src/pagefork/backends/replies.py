"""Diff data from worker processes to the parent through shared memory.

The parent creates one memfd per worker, sealed so it can grow but never
shrink (a shrinking file would turn the parent's reads into SIGBUS), and
passes it once. A worker copies each large diff payload into it, one after
the other within a batch, and sends only where it is; the parent reads it
in place through a read-only mapping, with no socket copies.

Only the data travels this way: the offsets and lengths that say where it
goes are decoded into the parent's own arrays, so a worker changing the
buffer while the parent merges can change values, never where they land.
A worker writes a batch's payloads after the parent sent that batch, which
is after the parent finished merging the previous one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any

__all__ = ["INLINE_LIMIT", "create", "ReplyWriter", "ReplyReader"]

#: Payloads smaller than this travel inline on the socket.
INLINE_LIMIT = 64 << 10
_ALIGN = 64


def create() -> int:
    """A new reply memfd (the parent's), sealed against shrinking."""
    fd = os.memfd_create("pagefork-replies", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ReplyWriter:
    """The worker's side: appends payloads for the current batch."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._map: mmap.mmap | None = None
        self._at = 0
        self._high = 0  # bytes the last batches used
        self._holes_from: int | None = None  # pages past this were given back

    def start_batch(self) -> None:
        """Payloads of a new batch start from the beginning again. A buffer
        much larger than recent batches needed gives its pages back."""
        size = len(self._map) if self._map is not None else 0
        self._high = max(self._at, self._high // 2)
        if self._map is not None and size > 4 * self._high + (64 << 20):
            keep = -(-max(self._high, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_REMOVE, keep, size - keep)
            self._holes_from = keep
        self._at = 0

    def put(self, data: Any) -> tuple[int, int]:
        """Copies ``data`` into the buffer; returns (offset, length)."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        at = self._at
        end = at + n
        size = len(self._map) if self._map is not None else 0
        if end > size:
            grown = max(end, 2 * size, 1 << 20)
            grown = -(-grown // mmap.PAGESIZE) * mmap.PAGESIZE
            os.ftruncate(self._fd, grown)
            # Allocated now: a full tmpfs is an OSError here, not a SIGBUS on the copy.
            os.posix_fallocate(self._fd, size, grown - size)
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self._fd, grown, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert self._map is not None
        if self._holes_from is not None and end > self._holes_from:
            os.posix_fallocate(self._fd, at, n)  # refill given-back pages: ENOSPC, not SIGBUS
        self._map[at:end] = view
        self._at = -(-end // _ALIGN) * _ALIGN
        return at, n

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)


class ReplyReader:
    """The parent's side: read-only views of a worker's payloads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None

    def get(self, offset: int, length: int) -> memoryview:
        """The payload at ``offset`` (ValueError if the file does not hold it)."""
        if offset < 0 or length < 0:
            raise ValueError(f"reply payload at {offset}, {length} bytes")
        end = offset + length
        # len(), not size(): mmap.size() is the file's size, which the
        # worker grows past this mapping's end.
        if self._map is None or end > len(self._map):
            size = os.fstat(self.fd).st_size
            if end > size:
                raise ValueError(f"reply payload ends at {end}, past the {size}-byte buffer")
            # The old mapping stays alive while batches still view it.
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        return memoryview(self._map)[offset:end]

    def close(self) -> None:
        self._map = None  # unmapped once no batch views it any more
        os.close(self.fd)
