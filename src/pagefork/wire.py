"""The wire format of a DiffBatch.

Layout (little-endian)::

    magic "PFDB" | version u16 | flags u16 | count u64 | data_len u64
    offsets i64[count] | lengths i64[count] | dtypes u8[count] | ops u8[count]
    data u8[data_len] | crc32c u32 over everything before it

Decoding checks every length against the buffer before anything is
allocated, rejects trailing bytes, and returns a batch whose columns are
views of the input (no copies).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ._errors import CorruptDataError
from ._framing import open_sealed, seal
from .snapshot import Batchable, DiffBatch, _as_batch

__all__ = ["encode", "decode", "VERSION"]

MAGIC = b"PFDB"
VERSION = 1
_HEADER = struct.Struct("<4sHHQQ")
_PER_DIFF = 8 + 8 + 1 + 1  # offset, length, dtype, op

# valid[dtype, op]: which op a dtype allows (mirrors snapshot._check_op).
_VALID = np.zeros((12, 8), dtype=bool)
_VALID[:, [0, 1, 7]] = True            # OVERWRITE, XOR, IGNORE: any dtype
_VALID[1:, [5, 6]] = True              # MAX, MIN: not RAW
_VALID[2:, [2, 3, 4]] = True           # SUM, PRODUCT, SUBTRACT: numbers
_ITEMSIZE = np.array([1, 1, 1, 2, 4, 8, 1, 2, 4, 8, 4, 8], dtype=np.int64)
_BYTEWISE_OPS = np.array([True, True, False, False, False, False, False, True])


def encode(diffs: Batchable) -> bytes:
    """Encodes a batch (or any iterable of Diff) as one checksummed message."""
    batch = _as_batch(diffs)
    n = len(batch)
    body = b"".join((
        _HEADER.pack(MAGIC, VERSION, 0, n, batch.nbytes),
        batch.offsets.astype("<i8", copy=False).tobytes(),
        batch.lengths.astype("<i8", copy=False).tobytes(),
        batch.dtypes.tobytes(),
        batch.ops.tobytes(),
        batch.data,
    ))
    return seal(body)


def decode(data: Any) -> DiffBatch:
    """Decodes :func:`encode`'s output; any malformed input raises
    :class:`CorruptDataError`."""
    view, (_, _, flags, count, data_len) = open_sealed(data, _HEADER, MAGIC, VERSION, "wire message")
    if flags != 0:
        raise CorruptDataError(f"unknown wire flags {flags:#x}")
    room = view.nbytes - _HEADER.size
    if count > room // _PER_DIFF or data_len != room - count * _PER_DIFF:
        raise CorruptDataError(f"wire header says {count} diffs and {data_len} data bytes, which "
                               f"does not match the {view.nbytes + 4}-byte message")
    at = _HEADER.size
    offsets = np.frombuffer(view, "<i8", count, at).astype(np.int64, copy=False)
    at += 8 * count
    lengths = np.frombuffer(view, "<i8", count, at).astype(np.int64, copy=False)
    at += 8 * count
    dtypes = np.frombuffer(view, np.uint8, count, at)
    at += count
    ops = np.frombuffer(view, np.uint8, count, at)
    at += count
    if count:
        if (offsets < 0).any() or (lengths < 0).any() or (lengths > data_len).any():
            raise CorruptDataError("wire diff with a negative offset or an impossible length")
        if (offsets > np.iinfo(np.int64).max - lengths).any():
            raise CorruptDataError("wire diff whose end overflows")
        if int(lengths.sum()) != data_len:
            raise CorruptDataError("wire diff lengths do not add up to the data length")
        if (dtypes >= 12).any() or (ops >= 8).any() or not _VALID[dtypes, ops].all():
            raise CorruptDataError("wire diff with an unknown or invalid dtype/op code")
        typed = ~_BYTEWISE_OPS[ops]
        if (lengths[typed] % _ITEMSIZE[dtypes[typed]]).any():
            raise CorruptDataError("typed wire diff that is not a whole number of values")
    return DiffBatch.from_columns(offsets, lengths, dtypes, ops, view[at: at + data_len])
