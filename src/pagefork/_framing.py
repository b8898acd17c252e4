"""The frame shared by the wire and delta formats: a header that starts with
a magic and a version, the body, and a CRC32C over both."""

from __future__ import annotations

import struct
from typing import Any

from . import _native
from ._buffers import byte_view
from ._errors import CorruptDataError

_CRC = struct.Struct("<I")


def seal(message: bytes) -> bytes:
    """``message`` followed by its CRC32C."""
    return message + _CRC.pack(_native.crc32c(message))


def seal_parts(parts: list[Any]) -> list[Any]:
    """The pieces of ``seal(b"".join(parts))``, without joining them: a
    consumer that streams them (a compressor) never copies a large body."""
    crc = 0
    for part in parts:
        crc = _native.crc32c(part, crc)
    return [*parts, _CRC.pack(crc)]


def open_sealed(data: Any, header: struct.Struct, magic: bytes, version: int,
                what: str) -> tuple[memoryview, tuple]:
    """Checks the frame of ``data`` and returns (everything but the CRC, the
    header's fields). The header's first two fields are magic and version."""
    try:
        view = byte_view(data)
    except TypeError as exc:
        raise CorruptDataError(f"{what} must be bytes-like: {exc}") from None
    size = view.nbytes
    if size < header.size + _CRC.size:
        raise CorruptDataError(f"{what} of {size} bytes is shorter than its header")
    fields = header.unpack_from(view)
    if fields[0] != magic:
        raise CorruptDataError(f"not a pagefork {what} (magic {bytes(fields[0])!r})")
    if fields[1] != version:
        raise CorruptDataError(f"unsupported {what} version {fields[1]} (this build reads {version})")
    (crc,) = _CRC.unpack_from(view, size - _CRC.size)
    if _native.crc32c(view[: size - _CRC.size]) != crc:
        raise CorruptDataError(f"{what} checksum mismatch: the data is corrupted")
    return view[: size - _CRC.size], fields
