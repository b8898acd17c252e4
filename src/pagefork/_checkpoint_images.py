"""Whole images of an App's snapshot in and out of checkpoints without
touching its holes.

The snapshot is a memfd, and a page nobody wrote is a hole in it: reading
a hole through the snapshot's shared mapping allocates a page for it, so a
base checkpoint read that way made the whole App resident. A base is read
instead with ``pread`` (which reads holes as zeros without allocating them)
and a piece that lies wholly in a hole (``SEEK_DATA``) is not read at all:
it is zeros, which zstd stores in a few bytes. A restore writes only the
pages that are not zero, straight into the (empty) snapshot with ``pwrite``:
the holes stay holes, and main memory is then mapped from the snapshot, so
no byte is written twice.
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO
from collections.abc import Callable, Iterator

import numpy as np

from . import _native
from ._checkpoint_format import (CHUNK, FLAG_ZSTD, KIND_IMAGE, Manifest, ObjectReader, ObjectRef, check_read,
                                 read_header, read_object, read_rest)
from ._checkpoint_store import Store
from ._checkpoint_versions import damage, missing
from ._errors import CorruptDataError
from ._sizes import PAGE_SIZE
from .snapshot import Snapshot

__all__ = ["FileImage", "Progress", "restore_into_snapshot", "write_nonzero"]

#: ``progress(done, total)``: bytes done so far and in all.
Progress = Callable[[int, int], None]

_ZEROS = memoryview(bytes(CHUNK))


class FileImage:
    """The first ``size`` bytes of a file (a snapshot's memfd) as the body
    of a base: a buffer-like ``image[a:b]`` (at most CHUNK bytes) reads
    them with ``pread`` into a scratch buffer (valid until the next slice),
    or is a view of zeros when ``[a, b)`` lies in a hole."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.nbytes = size
        self._scratch = memoryview(bytearray(CHUNK))

    def _hole(self, start: int, stop: int) -> bool:
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) >= stop
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or past start
                return True
            raise

    def __getitem__(self, key: slice) -> memoryview:
        start, stop, step = key.indices(self.nbytes)
        n = max(stop - start, 0)
        if step != 1 or n > CHUNK:
            raise ValueError(f"a file image is read in contiguous pieces of at most {CHUNK} bytes")
        if n == 0 or self._hole(start, stop):
            return _ZEROS[:n]
        view = self._scratch[:n]
        got = 0
        while got < n:
            k = os.preadv(self.fd, [view[got:]], start + got)
            if k == 0:
                raise OSError(errno.EIO, f"the snapshot's file ended at byte {start + got} of {self.nbytes}")
            got += k
        return view


def write_nonzero(fd: int, chunk: memoryview, at: int) -> int:
    """Writes the pages of ``chunk`` that are not all zero into ``fd`` at
    offset ``at`` (page aligned), in runs; zero pages are skipped, so a
    hole of the file stays a hole. Returns the bytes written."""
    n = chunk.nbytes
    arr = np.frombuffer(chunk, np.uint8)
    full = n // PAGE_SIZE
    flags = np.zeros(-(-n // PAGE_SIZE) + 2, np.int8)  # one zero flag before and after
    if full:
        flags[1: full + 1] = arr[: full * PAGE_SIZE].view(np.uint64).reshape(full, -1).any(axis=1)
    if n > full * PAGE_SIZE:
        flags[full + 1] = arr[full * PAGE_SIZE:].any()
    edges = np.flatnonzero(np.diff(flags))
    written = 0
    for first, end in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        lo, hi = first * PAGE_SIZE, min(end * PAGE_SIZE, n)
        with chunk[lo:hi] as piece:
            done = 0
            while done < piece.nbytes:
                done += os.pwrite(fd, piece[done:], at + lo + done)
        written += hi - lo
    return written


def _image_chunks(f: BinaryIO, ref: ObjectRef, memory_limit: int) -> Iterator[tuple[int, memoryview]]:
    """The image of base ``ref`` as (offset, bytes) pieces of CHUNK bytes,
    each valid until the next. A compressed image is checked before it is
    decoded; a raw one is checked after its last piece (the caller then
    discards what it wrote)."""
    import zstandard

    r = ObjectReader(f)
    kind, flags, memory_size, _ = read_header(r, ref, memory_limit)
    if kind != KIND_IMAGE:  # read_header holds kind and the manifest equal
        raise CorruptDataError("a base that holds no image")
    buffer = memoryview(bytearray(CHUNK))
    source = zstandard.ZstdDecompressor().stream_reader(read_rest(r, ref)) if flags & FLAG_ZSTD else r
    try:
        for at in range(0, memory_size, CHUNK):
            want = min(CHUNK, memory_size - at)
            got = 0
            while got < want:
                n = source.readinto(buffer[got:want])
                if not n:
                    raise CorruptDataError("its image is truncated")
                got += n
            yield at, buffer[:want]
        if flags & FLAG_ZSTD:
            if source.read(1):
                raise CorruptDataError("its compressed image is longer than its memory")
        else:
            r.drain()
            check_read(r, ref)
    except zstandard.ZstdError as exc:
        raise CorruptDataError(f"its compressed body is damaged: {exc}") from None


def restore_into_snapshot(store: Store, manifest: Manifest, snapshot: Snapshot,
                          progress: Progress | None = None) -> None:
    """Writes the image of ``manifest`` into ``snapshot``, which must be
    empty (all holes) and ``manifest.size`` bytes: the base's pages that
    are not zero with pwrite, then the increments' pages. ``progress`` is
    told the stored bytes read (of ``sum(o.size for o in objects)``).
    Damage is a CorruptDataError naming the version and the object, raised
    possibly after some bytes were written."""
    total = sum(o.size for o in manifest.objects)
    done = 0
    fd = snapshot.mapping.file_fd
    for ref in manifest.objects:
        try:
            with store.open(ref.name) as f:
                if ref.kind == "base":
                    for at, chunk in _image_chunks(f, ref, manifest.size):
                        write_nonzero(fd, chunk, at)
                        if progress is not None:  # stored bytes scale with the image's
                            progress(done + ref.size * (at + chunk.nbytes) // max(manifest.size, 1), total)
                else:
                    _, batch = read_object(f, ref, None, manifest.size)
                    if batch is not None and len(batch):
                        with memoryview(snapshot.mapping) as whole:
                            _native.apply(whole[: manifest.size], *batch.columns())
        except FileNotFoundError:
            raise missing(store, manifest.version, ref) from None
        except CorruptDataError as exc:
            raise damage(store, manifest.version, ref.name, f"{exc} (written by version {ref.version})") from None
        done += ref.size
        if progress is not None:
            progress(done, total)
    if progress is not None and not manifest.objects:
        progress(0, 0)
