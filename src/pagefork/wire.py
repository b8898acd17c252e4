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
from .diffs import Batchable, DiffBatch, as_batch, column_error

__all__ = ["encode", "decode", "VERSION"]

MAGIC = b"PFDB"
VERSION = 1
_HEADER = struct.Struct("<4sHHQQ")
_PER_DIFF = 8 + 8 + 1 + 1  # offset, length, dtype, op


def encode(diffs: Batchable) -> bytes:
    """Encodes a batch (or any iterable of Diff) as one checksummed message.
    A batch :func:`decode` would refuse (e.g. a typed diff that is not a
    whole number of values) raises ``ValueError`` naming the diff's offset."""
    batch = as_batch(diffs)
    offsets, lengths, dtypes, ops, data = batch.columns()
    why = column_error(offsets, lengths, dtypes, ops, batch.nbytes)
    if why is not None:
        raise ValueError(f"cannot encode: {why}")
    body = b"".join((
        _HEADER.pack(MAGIC, VERSION, 0, len(batch), batch.nbytes),
        offsets.astype("<i8", copy=False).tobytes(),
        lengths.astype("<i8", copy=False).tobytes(),
        dtypes.tobytes(),
        ops.tobytes(),
        data,
    ))
    return seal(body)


def decode(data: Any) -> DiffBatch:
    """Decodes :func:`encode`'s output; any malformed input raises
    :class:`CorruptDataError`. The batch's columns are views of ``data``:
    :meth:`Snapshot.apply` copies the index columns before checking them,
    so reusing a receive buffer cannot make it write out of bounds."""
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
    why = column_error(offsets, lengths, dtypes, ops, data_len)
    if why is not None:
        raise CorruptDataError(f"malformed wire message: {why}")
    return DiffBatch.unchecked(offsets, lengths, dtypes, ops, view[at: at + data_len])
