"""Helpers for the fuzz tests of the wire and delta formats."""

from __future__ import annotations

import random
import struct

from pagefork import _native


def reseal(body: bytes) -> bytes:
    """``body`` with a fresh CRC32C, so a mutation reaches the parser."""
    return body + struct.pack("<I", _native.crc32c(body))


def mutate(rng: random.Random, message: bytes, header_fields: list[tuple[int, int]]) -> bytes:
    """A damaged copy of ``message``: flipped bits, a cut, appended bytes, or a
    header field (offset, width) overwritten with an extreme value."""
    data = bytearray(message)
    kind = rng.randrange(5)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1):]
    elif kind == 2:
        data += rng.randbytes(rng.randint(1, 16))
    elif kind == 3 and header_fields:
        at, width = rng.choice(header_fields)
        if len(data) >= at + width:
            value = rng.choice([0, 1, 2**(8 * width - 1) - 1, 2**(8 * width) - 1, rng.randrange(2**32)])
            data[at:at + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    else:
        data = bytearray(rng.randbytes(rng.randrange(64)))
    return bytes(data)
