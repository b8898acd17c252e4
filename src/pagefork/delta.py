"""Delta encoding of one buffer against another.

``encode(old, new)`` records what changed; ``apply(delta, old)`` rebuilds
``new``. Byte-granular runs by default, or whole pages of ``page_size``
bytes; ``xor=True`` stores ``new ^ old`` (zeros where pages agree, which
compresses well); ``zstd_level`` compresses the records with zstandard.

Layout (little-endian)::

    magic "PFDL" | version u8 | flags u8 | reserved u16 | page_size u32
    old_len u64 | new_len u64 | body_len u64 | body (maybe zstd) | crc32c u32

Applying never allocates more than the receiver allows: the output is at
most ``max_size`` bytes (by default ``len(old)`` plus the larger of the
delta's own size and :data:`DEFAULT_GROWTH`), the decompressed body at most
three bytes per output byte (what the encoder can write), both checked from
the header before anything is allocated; a large compressed body is first
checked as it streams out of the decompressor, so a malformed one is refused
without ever being held whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from . import _native
from ._buffers import byte_view
from ._errors import CorruptDataError
from ._framing import open_sealed, seal
from ._sizes import as_index, parse_size

__all__ = ["encode", "apply", "Settings", "VERSION", "DEFAULT_GROWTH"]

MAGIC = b"PFDL"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIQQQ")
_XOR, _ZSTD = 1, 2
#: Without ``max_size``, how far past ``len(old)`` a compressed delta may grow
#: its output (an uncompressed one carries every byte it adds, so it may
#: always grow by its own size). zstd turns megabytes of zeros into a few
#: dozen bytes, so no ratio to the delta's size bounds an honest delta, while
#: a hostile 64 KiB one could declare gigabytes: receivers expecting more
#: pass ``max_size`` (e.g. their snapshot's ``max_size``).
DEFAULT_GROWTH = 64 << 20
# Body bytes per output byte: a record covers >= 1 byte with minimal varints.
_BODY_PER_OUTPUT = 3
# Compressed bodies larger than this are checked chunk by chunk first.
_CHUNK = 1 << 20


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        raise ImportError("zstd compression needs the 'zstandard' package") from None
    return zstandard


def encode(old: Any, new: Any, *, page_size: int | None = None, xor: bool = False,
           zstd_level: int | None = None) -> bytes:
    """A delta that turns ``old`` into ``new`` (sizes may differ)."""
    page_size = None if page_size is None else as_index(page_size, "page_size")
    if page_size is not None and not 0 < page_size < 2**32:
        raise ValueError(f"page_size must be a positive 32-bit size, got {page_size}")
    old_view, new_view = byte_view(old), byte_view(new)
    body = _native.delta_encode(old_view, new_view, page_size or 0, xor)
    body_len = len(body)
    flags = _XOR if xor else 0
    if zstd_level is not None:
        body = _zstd().ZstdCompressor(level=zstd_level, write_content_size=True).compress(body)
        flags |= _ZSTD
    header = _HEADER.pack(MAGIC, VERSION, flags, 0, page_size or 0, old_view.nbytes,
                          new_view.nbytes, body_len)
    return seal(header + body)


def apply(delta: Any, old: Any, *, max_size: int | str | None = None) -> bytes:
    """Rebuilds the new buffer from ``delta`` and the ``old`` it was made
    against. Malformed input raises :class:`CorruptDataError`, and so does a
    delta whose output would be larger than ``max_size`` bytes (default:
    ``len(old) + max(len(delta), DEFAULT_GROWTH)``; pass the size you are
    prepared to receive, e.g. a snapshot's ``max_size``). Nothing is
    allocated or decompressed beyond these bounds."""
    try:
        old_view = byte_view(old)
    except TypeError as exc:
        raise CorruptDataError(f"old must be bytes-like: {exc}") from None
    view, fields = open_sealed(delta, _HEADER, MAGIC, VERSION, "delta")
    _, _, flags, reserved, _page, old_len, new_len, body_len = fields
    if flags & ~(_XOR | _ZSTD) or reserved:
        raise CorruptDataError(f"unknown delta flags {flags:#x}")
    if old_len != old_view.nbytes:
        raise CorruptDataError(f"the delta was made against {old_len} bytes, got {old_view.nbytes}")
    limit = (old_view.nbytes + max(view.nbytes + 4, DEFAULT_GROWTH) if max_size is None
             else parse_size(max_size, "max_size"))
    if new_len > limit:
        raise CorruptDataError(f"the delta makes {new_len} bytes, more than the {limit} allowed "
                               + ("(pass max_size= to accept more)" if max_size is None
                                  else "by max_size"))
    if body_len > _BODY_PER_OUTPUT * new_len:
        raise CorruptDataError(f"a delta body of {body_len} bytes is impossible for "
                               f"{new_len} bytes of output")
    body = view[_HEADER.size:]
    if flags & _ZSTD:
        zstandard = _zstd()
        try:
            params = zstandard.get_frame_parameters(body)
            if params.content_size != body_len:
                raise CorruptDataError("compressed delta body has the wrong size")
            if body_len > _CHUNK:
                _check_streamed(zstandard, body, body_len, old_len, new_len)
            # One frame and nothing after it (decompress() would ignore the
            # rest). The streaming decoder refuses output past the frame's
            # declared size, already checked to be body_len.
            stream = zstandard.ZstdDecompressor().decompressobj()
            body = stream.decompress(body)
            if not stream.eof or stream.unused_data:
                raise CorruptDataError("compressed delta body is truncated or has bytes after "
                                       "its frame")
        except zstandard.ZstdError as exc:
            raise CorruptDataError(f"compressed delta body is corrupted: {exc}") from None
    if len(body) != body_len:
        raise CorruptDataError("delta body length does not match its header")
    try:
        return _native.delta_apply(old_view, body, new_len, bool(flags & _XOR))
    except ValueError as exc:
        raise CorruptDataError(str(exc)) from None


def _check_streamed(zstandard: Any, body: memoryview, body_len: int, old_len: int,
                    new_len: int) -> None:
    """Checks the records of a compressed body one decompressed chunk at a
    time (memory: one chunk), before the body is decompressed whole."""
    state = bytearray(_native.DELTA_CHECK_STATE)
    seen = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while chunk := reader.read(_CHUNK):
                seen += len(chunk)
                if seen > body_len:
                    raise CorruptDataError("compressed delta body is longer than its header says")
                _native.delta_check(state, chunk, old_len, new_len, False)
        _native.delta_check(state, b"", old_len, new_len, True)
    except ValueError as exc:
        raise CorruptDataError(str(exc)) from None
    if seen != body_len:
        raise CorruptDataError("compressed delta body length does not match its header")


@dataclass(frozen=True)
class Settings:
    """Delta settings, parsed from strings like ``"pages=64;xor;zstd=1"``."""

    page_size: int | None = None
    xor: bool = False
    zstd_level: int | None = None

    @classmethod
    def parse(cls, text: str) -> Settings:
        """Parses ``;``-separated items: ``pages=N``, ``bytes`` (byte runs),
        ``xor``, ``zstd`` or ``zstd=LEVEL``. Unknown items are a ValueError."""
        page_size, xor, zstd_level = None, False, None
        for item in filter(None, (part.strip() for part in text.split(";"))):
            key, _, value = item.partition("=")
            key = key.strip().lower()
            try:
                if key == "pages" and value:
                    page_size = int(value)
                    if page_size <= 0:
                        raise ValueError
                elif key == "bytes" and not value:
                    page_size = None
                elif key == "xor" and not value:
                    xor = True
                elif key == "zstd":
                    zstd_level = int(value) if value else 3
                else:
                    raise KeyError
            except KeyError:
                raise ValueError(f"unknown delta setting {item!r} (use pages=N, bytes, xor, "
                                 "zstd[=LEVEL])") from None
            except ValueError:
                raise ValueError(f"bad value in delta setting {item!r}") from None
        return cls(page_size, xor, zstd_level)

    def encode(self, old: Any, new: Any) -> bytes:
        return encode(old, new, page_size=self.page_size, xor=self.xor, zstd_level=self.zstd_level)
