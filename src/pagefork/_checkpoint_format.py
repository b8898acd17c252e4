"""The checkpoint format: data objects and manifests.

A data object holds either a whole memory image (a base) or the pages that
changed (an increment, a wire-encoded DiffBatch of page runs). Layout
(little-endian)::

    magic "PFCK" | version u8 | kind u8 | flags u16 | memory_size u64 | body_len u64
    body (body_len bytes, or a zstd frame of them when flags has ZSTD)

The manifest of each version (JSON, written last) lists every object its
restore needs, base first, each with its size and CRC32C, so damage is
found before anything is decoded. The manifest carries its own CRC32C.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO
from collections.abc import Callable, Iterator

import numpy as np

from . import _native, wire
from ._errors import CorruptDataError
from ._sizes import PAGE_SIZE
from .diffs import DiffBatch
from .merge import MergeOp

MAGIC = b"PFCK"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQ")
KIND_IMAGE, KIND_PAGES = 0, 1
FLAG_ZSTD = 1
FORMAT = "pagefork-checkpoint"
CHUNK = 4 << 20  # streaming granularity: big enough for fast I/O, small enough for the cache

_MANIFEST = re.compile(r"^v(\d{10})\.json$")


def manifest_name(version: int) -> str:
    return f"v{version:010d}.json"


def manifest_version(name: str) -> int | None:
    m = _MANIFEST.match(name)
    return int(m.group(1)) if m else None


def object_version(name: str) -> int | None:
    """The version that wrote the data object ``name``; None if ``name`` is
    not a data object's."""
    return int(name[1:11]) if _OBJECT.match(name) else None


# ---- data objects ----------------------------------------------------------------

def _span(pieces: list[memoryview], start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of the pieces taken as one body."""
    out, at = [], 0
    for piece in pieces:
        n = piece.nbytes
        if at + n > start and length > 0:
            lo = max(0, start - at)
            take = piece[lo: lo + length]
            out.append(bytes(take))
            length -= take.nbytes
            start += take.nbytes
        at += n
        if length <= 0:
            break
    return b"".join(out)


def _worth_compressing(pieces: list[memoryview], level: int) -> bool:
    """Compresses a few samples spread over the body (its pieces taken as
    one: an increment's pages, not its 4-byte checksum): incompressible data
    (floats that changed) is stored raw, so it costs one copy, not zstd.
    Bases and increments follow this one rule."""
    import zstandard

    n = sum(p.nbytes for p in pieces)
    if n < 4096:
        return False
    sample_len = min(64 << 10, n)
    starts = np.linspace(0, n - sample_len, num=min(8, max(1, n // sample_len))).astype(np.int64)
    sample = b"".join(_span(pieces, int(s), sample_len) for s in starts)
    packed = zstandard.ZstdCompressor(level=level).compress(sample)
    return len(packed) < 0.8 * len(sample)


class ObjectWriter:
    """A data object as it is written: :meth:`chunks` yields its bytes (each
    chunk must be consumed before the next is asked for) and leaves
    :attr:`crc` and :attr:`length` behind. With ``live=True`` the body is
    memory other threads may be writing: each piece is copied once before
    it is checksummed or compressed, so what is stored is what was checked
    (zstd reading a buffer that changes under it may emit a frame that
    decodes to bytes that were never there)."""

    def __init__(self, kind: int, memory_size: int, body: Any,
                 level: int | None, *, live: bool = False) -> None:
        self.pieces = body if isinstance(body, list) else [body]
        self.live = live
        self.level = level if level is not None and _worth_compressing(self.pieces, level) else None
        flags = FLAG_ZSTD if self.level is not None else 0
        body_len = sum(p.nbytes for p in self.pieces)
        self.header = HEADER.pack(MAGIC, VERSION, kind, flags, memory_size, body_len)
        self.crc = 0
        self.length = 0
        #: told (body bytes done, body bytes in all) after each piece
        self.progress: Callable[[int, int], None] | None = None

    def _out(self, data: Any) -> Any:
        self.crc = _native.crc32c(data, self.crc)
        self.length += len(memoryview(data))
        return data

    def chunks(self) -> Iterator[Any]:
        self.crc, self.length = 0, 0
        yield self._out(self.header)
        compressor = None
        if self.level is not None:
            import zstandard

            compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True) \
                .compressobj(size=sum(p.nbytes for p in self.pieces))
        scratch = memoryview(bytearray(CHUNK)) if self.live else None
        total = sum(p.nbytes for p in self.pieces)
        done = 0
        for body in self.pieces:
            for at in range(0, body.nbytes, CHUNK):
                piece = body[at: at + CHUNK]
                done += piece.nbytes
                if scratch is not None:
                    scratch[: piece.nbytes] = piece
                    piece = scratch[: piece.nbytes]
                if compressor is not None:
                    packed = compressor.compress(piece)
                    if packed:
                        yield self._out(packed)
                else:
                    yield self._out(piece)
                if self.progress is not None:
                    self.progress(done, total)
        if compressor is not None:
            yield self._out(compressor.flush())
        if self.progress is not None and total == 0:
            self.progress(0, 0)


_WIRE_HEADER = struct.Struct("<4sHHQQ")  # wire.py's header; tests hold the two equal


def pages_body(source: memoryview, size: int, pages: np.ndarray) -> list[memoryview]:
    """The pages flagged in ``pages`` of ``source`` (its first ``size``
    bytes) as a wire message of OVERWRITE runs of consecutive pages, in
    pieces: byte for byte what ``wire.encode`` makes, without joining the
    pieces (at 1% of 1 GiB, each join is 10 MiB more to copy)."""
    index = np.flatnonzero(pages)
    full = size // PAGE_SIZE
    arr = np.frombuffer(source, np.uint8, count=size)
    whole = index[index < full]
    data = arr[: full * PAGE_SIZE].reshape(full, PAGE_SIZE)[whole].reshape(-1)
    if index.size and index[-1] >= full:  # a last partial page
        data = np.concatenate([data, arr[full * PAGE_SIZE:]])
    run_start = np.concatenate(([True], index[1:] != index[:-1] + 1)) if index.size else \
        np.zeros(0, np.bool_)
    firsts = index[run_start]
    lasts = index[np.concatenate((np.flatnonzero(run_start)[1:] - 1, [index.size - 1]))] \
        if index.size else index
    offsets = firsts.astype("<i8") * PAGE_SIZE
    lengths = np.minimum((lasts.astype("<i8") + 1) * PAGE_SIZE, size) - offsets
    n = len(offsets)
    pieces = [memoryview(_WIRE_HEADER.pack(wire.MAGIC, wire.VERSION, 0, n, data.nbytes)),
              offsets.astype("<i8").data.cast("B"), lengths.astype("<i8").data.cast("B"),
              memoryview(bytes(n)), memoryview(bytes([int(MergeOp.OVERWRITE)]) * n),
              np.ascontiguousarray(data).data.cast("B")]
    crc = 0
    for piece in pieces:
        crc = _native.crc32c(piece, crc)
    pieces.append(memoryview(struct.pack("<I", crc)))
    return pieces


class ObjectReader:
    """Internal: for checkpoint images too. Reads an object in chunks, keeping its CRC32C and length."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.crc = 0
        self.length = 0

    def readinto(self, view: memoryview) -> int:
        got = 0
        while got < view.nbytes:
            n = self.f.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                break
            got += n
        self.crc = _native.crc32c(view[:got], self.crc)
        self.length += got
        return got

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.crc = _native.crc32c(data, self.crc)
        self.length += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


@dataclass
class ObjectRef:
    """One data object of a manifest."""

    name: str
    version: int       # the version that wrote it
    kind: str          # "base" or "increment"
    size: int          # bytes stored
    crc32c: int
    pages: int         # pages it carries


def read_header(r: ObjectReader, ref: ObjectRef, memory_limit: int) -> tuple[int, int, int, int]:
    """Reads and checks an object's header: (kind, flags, memory_size,
    body_len)."""
    header = r.read(HEADER.size)
    if len(header) < HEADER.size:
        raise CorruptDataError(f"truncated: {len(header)} bytes, shorter than its header")
    magic, version, kind, flags, memory_size, body_len = HEADER.unpack(header)
    if magic != MAGIC:
        raise CorruptDataError(f"not a pagefork checkpoint object (magic {magic!r})")
    if version != VERSION:
        raise CorruptDataError(f"unsupported object format version {version} (this build reads {VERSION})")
    if flags & ~FLAG_ZSTD or kind not in (KIND_IMAGE, KIND_PAGES):
        raise CorruptDataError(f"unknown object kind {kind} or flags {flags:#x}")
    if kind != (KIND_IMAGE if ref.kind == "base" else KIND_PAGES):
        raise CorruptDataError(f"holds a {'base' if kind == KIND_IMAGE else 'increment'}, the "
                               f"manifest says {ref.kind}")
    if memory_size > memory_limit:
        raise CorruptDataError(f"its memory of {memory_size} bytes is larger than the version's "
                               f"{memory_limit}")
    if kind == KIND_IMAGE and body_len != memory_size:
        raise CorruptDataError(f"its image holds {body_len} bytes for a memory of {memory_size}")
    if body_len > 64 + 18 * (memory_size // PAGE_SIZE + 1) + memory_size:
        raise CorruptDataError(f"its body of {body_len} bytes is impossible for its memory size")
    return kind, flags, memory_size, body_len


def read_object(f: BinaryIO, ref: ObjectRef, into: memoryview | None,
                memory_limit: int) -> tuple[int, DiffBatch | None]:
    """Checks and decodes one object of a version whose memory is
    ``memory_limit`` bytes. A base is written into ``into`` (its first
    memory_size bytes); an increment returns its DiffBatch. Returns
    (memory_size, batch). Raises CorruptDataError with a bare reason. What
    it allocates is bounded by the bytes actually stored and
    ``memory_limit``, never by a size a manifest or header claims."""
    import zstandard

    r = ObjectReader(f)
    kind, flags, memory_size, body_len = read_header(r, ref, memory_limit)
    try:
        if kind == KIND_IMAGE:
            if into is None or into.nbytes < memory_size:
                raise CorruptDataError(f"its image of {memory_size} bytes does not fit the memory")
            _read_image(r, ref, flags, into[:memory_size])
            return memory_size, None
        body = read_rest(r, ref)
        raw: Any = body
        if flags & FLAG_ZSTD:
            raw = _decompress(body, body_len)
        if len(raw) != body_len:
            raise CorruptDataError(f"its body is {len(raw)} bytes, its header says {body_len}")
        batch = wire.decode(raw)
    except zstandard.ZstdError as exc:
        raise CorruptDataError(f"its compressed body is damaged: {exc}") from None
    if len(batch) and (int((batch.offsets + batch.lengths).max()) > memory_size
                       or (batch.ops != int(MergeOp.OVERWRITE)).any()):
        raise CorruptDataError("holds pages outside its memory size")
    return memory_size, batch


def _read_image(r: ObjectReader, ref: ObjectRef, flags: int, target: memoryview) -> None:
    """Streams an image into ``target`` chunk by chunk. The bytes land
    before the checksum is known: a damaged image fails after writing, and
    the caller discards the memory."""
    import zstandard

    if flags & FLAG_ZSTD:
        # Checksum the compressed bytes first: never decode unchecked input.
        packed = read_rest(r, ref)
        source = zstandard.ZstdDecompressor().stream_reader(packed)
        _fill_image(source, target)
        if source.read(1):
            raise CorruptDataError("its compressed image is longer than its memory")
        return
    body = (r.crc, r.length, r.f.tell() if r.f.seekable() else None)
    try:
        if not _copy_local(r, ref, target):
            _fill_image(r, target)
            r.drain()
            check_read(r, ref)
        return
    except OSError as exc:
        if exc.errno != errno.EFAULT or body[2] is None:
            raise
    # The kernel may not write into ``target``: memory a tracker protects
    # (segfault mode, user-mode-only uffd) fails read(2) with EFAULT. Read
    # again into a buffer of our own and copy from there, a write the
    # tracker sees.
    r.crc, r.length = body[0], body[1]
    r.f.seek(body[2])
    _fill_image(_Bounced(r), target)
    r.drain()
    check_read(r, ref)


def _fill_image(source: Any, target: memoryview) -> None:
    """Fills ``target`` from ``source`` chunk by chunk."""
    size = target.nbytes
    for at in range(0, size, CHUNK):
        want = min(CHUNK, size - at)
        if _fill(source, target[at: at + want]) != want:
            raise CorruptDataError("its image is truncated")


class _Bounced:
    """Reads through a buffer of its own, then copies: for memory the
    kernel may not write into."""

    def __init__(self, reader: ObjectReader) -> None:
        self.reader = reader
        self.buffer = memoryview(bytearray(CHUNK))

    def readinto(self, view: memoryview) -> int:
        n = self.reader.readinto(self.buffer[: min(view.nbytes, CHUNK)])
        view[:n] = self.buffer[:n]
        return n


PARALLEL_COPY = 64 << 20  # images at least this large are copied by two native threads


def _local_file(r: ObjectReader, ref: ObjectRef) -> tuple[int, int] | None:
    """(descriptor, offset of the body) when the object is a local regular
    file of the size the manifest says, read just past its header; else
    None (the caller streams it)."""
    try:
        src = r.f.fileno()
        stat = os.fstat(src)
        at = r.f.tell()
    except (AttributeError, OSError, ValueError):
        return None
    if not (stat.st_mode & 0o170000 == 0o100000) or stat.st_size != ref.size or at != HEADER.size:
        return None
    return src, at


def _copy_local(r: ObjectReader, ref: ObjectRef, target: memoryview) -> bool:
    """Copies a raw image from a local file into ``target`` in native code:
    one copy, with the CRC32C computed over each piece where it landed,
    while it is still in the cache; large images by two native threads,
    each copying and checking its half. False if the object is not a
    local regular file of the size the manifest says (then the caller
    streams it)."""
    local = _local_file(r, ref)
    if local is None:
        return False
    src, at = local
    size = target.nbytes
    threads = 2 if size >= PARALLEL_COPY and (os.cpu_count() or 1) > 1 else 1
    copied, crc = _native.read_checked(src, at, size, target, r.crc, threads)
    if copied != size:
        raise CorruptDataError("its image is truncated")
    r.length, r.crc = at + size, crc
    r.f.seek(at + size)
    r.drain()  # bytes past the image: counted and checksummed, then refused by the length check
    check_read(r, ref)
    return True


def check_object(f: BinaryIO, ref: ObjectRef, memory_limit: int) -> None:
    """Checks an object of a version whose memory is ``memory_limit`` bytes
    without writing anything: an increment is decoded whole, a base's
    header checked and its bytes read for their length and CRC32C. Raises
    CorruptDataError with a bare reason."""
    if ref.kind != "base":
        read_object(f, ref, None, memory_limit)
        return
    r = ObjectReader(f)
    read_header(r, ref, memory_limit)
    buffer = memoryview(bytearray(CHUNK))
    while r.readinto(buffer) == CHUNK:
        pass
    check_read(r, ref)


def read_rest(r: ObjectReader, ref: ObjectRef) -> bytearray | memoryview:
    """The rest of the object, checked against ``ref``. Read straight into
    a buffer that at most doubles as bytes arrive, so memory grows with the
    bytes stored, not with the size ``ref`` claims. A local file of the
    claimed size gets its whole buffer at once, from numpy: large ones on
    huge pages (a fresh bytearray faulted in 4 KiB pages costs about as
    much as the read itself)."""
    want = max(ref.size - HEADER.size, 0) + 1  # one byte more: finds an object longer than claimed
    if _local_file(r, ref) is not None:
        whole = np.empty(want, np.uint8).data.cast("B")
        got = _fill(r, whole)
        r.drain()
        check_read(r, ref)
        return whole[:got]
    body = bytearray(min(want, CHUNK))
    got = 0
    while True:
        with memoryview(body) as view, view[got:] as free:
            got += r.readinto(free)
        if got < len(body) or len(body) == want:
            break
        body.extend(bytes(min(len(body), want - len(body))))
    del body[got:]
    r.drain()
    check_read(r, ref)
    return body


def _decompress(body: bytearray | memoryview, body_len: int) -> bytes:
    """One zstd frame that must decode to exactly ``body_len`` bytes; a frame
    header claiming another size is refused before anything is allocated."""
    import zstandard

    claimed = zstandard.frame_content_size(body)
    if claimed != body_len:
        raise CorruptDataError(f"its compressed body claims {claimed} bytes, its header says "
                               f"{body_len}")
    return zstandard.ZstdDecompressor().decompress(body, max_output_size=body_len)


def _fill(reader: Any, target: memoryview) -> int:
    got = 0
    while got < target.nbytes:
        n = reader.readinto(target[got: got + CHUNK])
        if not n:
            break
        got += n
    return got


def check_read(r: ObjectReader, ref: ObjectRef) -> None:
    """Refuses (CorruptDataError) an object read whole whose length or CRC32C is not the manifest's."""
    if r.length != ref.size:
        raise CorruptDataError(f"{r.length} bytes long, the manifest says {ref.size}")
    if r.crc != ref.crc32c:
        raise CorruptDataError(f"checksum mismatch (crc32c {r.crc:#010x}, the manifest says "
                               f"{ref.crc32c:#010x})")


# ---- manifests -------------------------------------------------------------------

@dataclass
class Manifest:
    """One committed version: what restores it and what it holds."""

    version: int
    parent: int | None      # the version this one's increment is relative to
    created: float          # unix time
    size: int               # memory bytes
    max_size: int
    page_size: int
    pages: int              # pages this version wrote
    bytes_written: int      # bytes of this version's own object
    objects: list[ObjectRef] = field(default_factory=list)  # base first
    app: dict[str, Any] | None = None  # App layout and version counter

    @property
    def is_base(self) -> bool:
        return len(self.objects) == 1

    @property
    def chain_length(self) -> int:
        """Increments on top of the base."""
        return len(self.objects) - 1

    @property
    def increment_bytes(self) -> int:
        return sum(o.size for o in self.objects[1:])

    def encode(self) -> bytes:
        body = asdict(self)
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        crc = _native.crc32c(text.encode())
        return json.dumps({"format": FORMAT, "format_version": VERSION, "crc32c": crc,
                           "manifest": body}, sort_keys=True, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            outer = json.loads(data)
            if outer.get("format") != FORMAT:
                raise CorruptDataError("not a pagefork checkpoint manifest")
            if outer.get("format_version") != VERSION:
                raise CorruptDataError(f"unsupported manifest format version "
                                       f"{outer.get('format_version')} (this build reads {VERSION})")
            body = outer["manifest"]
            text = json.dumps(body, sort_keys=True, separators=(",", ":"))
            if _native.crc32c(text.encode()) != outer["crc32c"]:
                raise CorruptDataError("manifest checksum mismatch")
            objects = [ObjectRef(**o) for o in body.pop("objects")]
            manifest = cls(objects=objects, **body)
        except CorruptDataError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CorruptDataError(f"unreadable manifest: {exc}") from None
        _validate(manifest)
        if not manifest.objects or manifest.objects[0].kind != "base" or any(
                o.kind != "increment" for o in manifest.objects[1:]):
            raise CorruptDataError("manifest's object chain does not start with one base")
        if manifest.page_size != PAGE_SIZE:
            raise CorruptDataError(f"written with {manifest.page_size}-byte pages, this host has "
                                   f"{PAGE_SIZE}")
        return manifest


_OBJECT = re.compile(r"^v\d{10}-[0-9a-f]{8}\.(base|incr)$")


def _validate(m: Manifest) -> None:
    """Types and ranges of every field: a manifest names files to open and
    sizes to allocate, so nothing in it is taken on trust."""
    def count(value: Any, what: str) -> None:
        if type(value) is not int or not 0 <= value < 1 << 62:
            raise CorruptDataError(f"manifest field {what} is not a valid count: {value!r}")

    for what in ("version", "size", "max_size", "page_size", "pages", "bytes_written"):
        count(getattr(m, what), what)
    if m.parent is not None:
        count(m.parent, "parent")
    if m.size > m.max_size:
        raise CorruptDataError(f"manifest size {m.size} exceeds its max_size {m.max_size}")
    if not isinstance(m.created, (int, float)) or (m.app is not None and not isinstance(m.app, dict)):
        raise CorruptDataError("manifest has a malformed time or App layout")
    for ref in m.objects:
        if not isinstance(ref.name, str) or not _OBJECT.match(ref.name) or ref.kind not in (
                "base", "increment"):
            raise CorruptDataError(f"manifest names an impossible object {ref.name!r}")
        for what in ("version", "size", "crc32c", "pages"):
            count(getattr(ref, what), f"{ref.name}.{what}")
        if ref.version > m.version:
            raise CorruptDataError(f"manifest of version {m.version} needs {ref.name} of a later version")


def iter_refs(manifests: list[Manifest]) -> Iterator[tuple[Manifest, ObjectRef]]:
    """Every object of ``manifests`` once per distinct claim about it (name,
    kind, size, checksum), with the first manifest making that claim: a
    later manifest that disagrees about an object is checked against it
    too, as its restore would be."""
    seen: set[tuple[str, str, int, int]] = set()
    for m in manifests:
        for ref in m.objects:
            claim = (ref.name, ref.kind, ref.size, ref.crc32c)
            if claim not in seen:
                seen.add(claim)
                yield m, ref
