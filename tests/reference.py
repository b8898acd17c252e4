"""A small pure-Python model of diff and apply, to check the native kernels.

Slow and obvious on purpose: byte loops, Python ints, numpy scalars for float
rounding. Mirrors the diff and merge rules of docs/api.md (Snapshots and diffs).
"""

from __future__ import annotations

import math
import struct

import numpy as np

from pagefork import DataType, Diff, MergeError, MergeOp, PAGE_SIZE

FORMAT = {DataType.BOOL: "B", DataType.INT8: "b", DataType.INT16: "h", DataType.INT32: "i",
          DataType.INT64: "q", DataType.UINT8: "B", DataType.UINT16: "H", DataType.UINT32: "I",
          DataType.UINT64: "Q", DataType.FLOAT32: "f", DataType.FLOAT64: "d"}
FLOATS = {DataType.FLOAT32: np.float32, DataType.FLOAT64: np.float64}


def unpack(dtype: DataType, raw: bytes):
    if dtype in FLOATS:
        return np.frombuffer(raw, FLOATS[dtype])[0]
    return struct.unpack("<" + FORMAT[dtype], raw)[0]


def pack(dtype: DataType, value) -> bytes:
    if dtype in FLOATS:
        return np.array([value], FLOATS[dtype]).tobytes()
    bits = 8 * dtype.itemsize
    value %= 1 << bits  # wrap like numpy
    if FORMAT[dtype].islower() and value >= 1 << (bits - 1):
        value -= 1 << bits
    return struct.pack("<" + FORMAT[dtype], value)


def is_nan(x) -> bool:
    return isinstance(x, (float, np.floating)) and math.isnan(x)


def combine(dtype: DataType, op: MergeOp, o, d):
    """What apply does to one element. Integers are Python ints (unpack);
    floats are numpy scalars, whose overflow and NaN warnings are silenced
    (the context costs more than the arithmetic: entered for floats only)."""
    if dtype in FLOATS:
        with np.errstate(all="ignore"):
            return _combine(op, o, d)
    return _combine(op, o, d)


def _combine(op: MergeOp, o, d):
    if op is MergeOp.SUM:
        return o + d
    if op is MergeOp.SUBTRACT:
        return o - d
    if op is MergeOp.PRODUCT:
        return o * d
    if op is MergeOp.MAX:
        return o if (o >= d or is_nan(o)) else d
    if op is MergeOp.MIN:
        return o if (o <= d or is_nan(o)) else d
    raise AssertionError(op)


def element_delta(dtype: DataType, op: MergeOp, u, o, offset: int):
    """What diff sends for one changed element (warnings as in combine)."""
    if dtype in FLOATS:
        with np.errstate(all="ignore"):
            return _element_delta(dtype, op, u, o, offset)
    return _element_delta(dtype, op, u, o, offset)


def _element_delta(dtype: DataType, op: MergeOp, u, o, offset: int):
    if op is MergeOp.SUM:
        return u - o
    if op is MergeOp.SUBTRACT:
        return o - u
    if op is MergeOp.PRODUCT:
        if o == 0:
            raise MergeError(f"PRODUCT at offset {offset}")
        if dtype in FLOATS:
            return u / o
        if u % o:
            raise MergeError(f"PRODUCT at offset {offset}")
        return u // o
    return u


def dirty_runs(dirty, start: int, end: int):
    """Maximal runs of dirty pages, as byte ranges clipped to [start, end)."""
    p, last = start // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1
    while p < last:
        if not dirty[p]:
            p += 1
            continue
        p1 = p
        while p1 < last and dirty[p1]:
            p1 += 1
        yield max(start, p * PAGE_SIZE), min(end, p1 * PAGE_SIZE)
        p = p1


def byte_runs(orig: bytes, mem: bytes, dtype: DataType, a: int, b: int) -> list[Diff]:
    """OVERWRITE diffs of each maximal run of changed bytes in [a, b)."""
    out = []
    i = a
    while i < b:
        if mem[i] == orig[i]:
            i += 1
            continue
        j = i
        while j < b and mem[j] != orig[j]:
            j += 1
        out.append(Diff(i, mem[i:j], dtype, MergeOp.OVERWRITE))
        i = j
    return out


def overwrite_elements(orig: bytes, mem: bytes, dtype: DataType, start: int, end: int, a: int,
                       b: int) -> list[Diff]:
    """OVERWRITE in a region of ``dtype`` values over [start, end), for the
    dirty range [a, b): each maximal run of changed elements (any byte
    differs), whole; an element straddling the range's edge is compared
    whole; bytes after the last whole element are byte runs."""
    k = dtype.itemsize
    whole = start + (end - start) // k * k
    out = []
    e = start + (a - start) // k * k
    run = None
    while e < min(b, whole):
        if mem[e:e + k] != orig[e:e + k]:
            run = e if run is None else run
        elif run is not None:
            out.append(Diff(run, mem[run:e], dtype, MergeOp.OVERWRITE))
            run = None
        e += k
    if run is not None:
        out.append(Diff(run, mem[run:e], dtype, MergeOp.OVERWRITE))
    if b > whole:
        out.extend(byte_runs(orig, mem, dtype, max(a, whole), b))
    return out


def diff(orig: bytes, mem: bytes, dirty, regions) -> list[Diff]:
    """regions: MergeRegion list (empty: OVERWRITE over everything)."""
    size, limit = len(orig), min(len(orig), len(mem))
    out: list[Diff] = []
    from pagefork import MergeRegion

    clipped = []
    for r in sorted(regions or [MergeRegion(0, 0)], key=lambda r: r.offset):
        end = min(size if r.length == 0 else r.offset + r.length, limit)
        k = r.dtype.itemsize
        if r.op in (MergeOp.OVERWRITE, MergeOp.XOR, MergeOp.IGNORE):
            clipped.append((r, r.offset, end))
        else:  # whole values; a leftover tail is carried as OVERWRITE
            whole = r.offset + max(end - r.offset, 0) // k * k
            clipped.append((r, r.offset, whole))
            clipped.append((MergeRegion(whole, 0), whole, end))
    for r, start, end in clipped:
        k = r.dtype.itemsize
        if end <= start or r.op is MergeOp.IGNORE:
            continue
        for a, b in dirty_runs(dirty, start, end):
            if r.op is MergeOp.OVERWRITE and k > 1:
                out.extend(overwrite_elements(orig, mem, r.dtype, start, end, a, b))
            elif r.op is MergeOp.OVERWRITE:
                out.extend(byte_runs(orig, mem, r.dtype, a, b))
            elif r.op is MergeOp.XOR:
                out.append(Diff(a, bytes(x ^ y for x, y in zip(mem[a:b], orig[a:b])), r.dtype, r.op))
            else:
                n = (end - start) // k
                e0, e1 = (a - start) // k, min(n, (b - start + k - 1) // k)
                e = e0
                while e < e1:
                    at = start + e * k
                    if mem[at:at + k] == orig[at:at + k]:
                        e += 1
                        continue
                    run0, data = e, b""
                    while e < e1 and mem[start + e * k: start + e * k + k] != orig[start + e * k: start + e * k + k]:
                        at = start + e * k
                        u, o = unpack(r.dtype, mem[at:at + k]), unpack(r.dtype, orig[at:at + k])
                        data += pack(r.dtype, element_delta(r.dtype, r.op, u, o, at))
                        e += 1
                    out.append(Diff(start + run0 * k, data, r.dtype, r.op))
    if len(mem) > size:
        tail = mem[size:]
        page_end = -(-size // PAGE_SIZE) * PAGE_SIZE
        if len(mem) <= page_end:  # within the snapshot's last page: nonzero bytes of a dirty page
            tail = tail.rstrip(b"\0") if dirty[size // PAGE_SIZE] else b""
        if tail:
            out.append(Diff(size, tail))
    return out


def apply(target: bytes, diffs) -> bytes:
    for d in diffs:  # checked up front: a bad batch changes nothing
        if d.op is MergeOp.PRODUCT:
            k = d.dtype.itemsize
            for at in range(d.offset, d.offset + len(d.data), k):
                if at + k > len(target) or unpack(d.dtype, target[at:at + k]) == 0:
                    raise MergeError(f"PRODUCT at offset {at}")
    buf = bytearray(target)
    for d in diffs:
        end = d.offset + len(d.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        if d.op is MergeOp.OVERWRITE:
            buf[d.offset:end] = d.data
        elif d.op is MergeOp.XOR:
            buf[d.offset:end] = bytes(x ^ y for x, y in zip(buf[d.offset:end], d.data))
        elif d.op is not MergeOp.IGNORE:
            k = d.dtype.itemsize
            for at in range(d.offset, end, k):
                o = unpack(d.dtype, bytes(buf[at:at + k]))
                v = unpack(d.dtype, d.data[at - d.offset: at - d.offset + k])
                buf[at:at + k] = pack(d.dtype, combine(d.dtype, d.op, o, v))
    return bytes(buf)
