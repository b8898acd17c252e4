"""The compact diff encoding: exact round trips, its size on scattered
updates, malformed input never crashes; and tracked_changes without a
per-byte index."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagefork import CorruptDataError, DataType, Diff, DiffBatch, MergeOp, PAGE_SIZE, Snapshot, compact, wire
from pagefork import _native

from fuzzing import mutate, reseal
from support import PAIRS


@st.composite
def diff_lists(draw):
    """Diffs as Snapshot.diff makes them (ascending, aligned) and arbitrary ones."""
    out = []
    at = draw(st.integers(0, 2**40))
    for _ in range(draw(st.integers(0, 30))):
        dtype, op = draw(st.sampled_from(PAIRS))
        n = draw(st.integers(0, 5)) * dtype.itemsize
        if draw(st.booleans()):
            at += draw(st.sampled_from([0, 1, 3, dtype.itemsize, 8 * dtype.itemsize, 1000, 2**33]))
            offset = at
        else:
            offset = draw(st.integers(0, 2**62))
        out.append(Diff(offset, draw(st.binary(min_size=n, max_size=n)), dtype, op))
        at = offset + n
    return out


@settings(deadline=None, max_examples=300)
@given(diff_lists())
def test_round_trip_is_exact(diffs):
    message = compact.encode(diffs)
    batch = compact.decode(message)
    assert batch == diffs
    assert batch == wire.decode(wire.encode(diffs))
    assert compact.decode(bytearray(message)) == DiffBatch(diffs)
    assert compact.encode(batch) == message
    assert b"".join(bytes(p) for p in compact.encode_parts(diffs)) == message  # streamed pieces


@settings(deadline=None, max_examples=100)
@given(diff_lists())
def test_the_dask_backends_compressed_replies_round_trip(diffs):
    from pagefork.backends.dask import compress_batch, decompress_batch

    assert decompress_batch(compress_batch(diffs), 1 << 20) == diffs


def test_extreme_offsets_round_trip():
    top = 2**63 - 1
    diffs = [Diff(top - 8, bytes(8), DataType.INT64, MergeOp.SUM), Diff(top, b""), Diff(0, b"a"),
             Diff(top - 1, b"z")]
    assert compact.decode(compact.encode(diffs)) == diffs


def test_decoding_does_not_copy_the_data():
    message = bytearray(compact.encode([Diff(5, b"hello")]))
    batch = compact.decode(message)
    assert bytes(batch.data) == b"hello" and isinstance(batch.data, memoryview)


@pytest.mark.parametrize("dtype", [DataType.INT64, DataType.FLOAT64, DataType.INT32])
def test_scattered_values_cost_little_more_than_themselves(dtype):
    """1% of 4M elements changed at random: at most 2 bytes beside each value
    (10 bytes per 8-byte value, the goal of issue 12)."""
    rng = np.random.default_rng(3)
    k = dtype.itemsize
    elements = 4 << 20
    original = np.zeros(elements * k, np.uint8)
    memory = original.copy()
    idx = np.sort(rng.permutation(elements)[: elements // 100])
    memory.view(dtype.numpy)[idx] = 1
    s = Snapshot(original)
    s.add_merge_region(0, elements * k, dtype, MergeOp.SUM)
    batch = s.diff(memory, np.ones(-(-memory.nbytes // PAGE_SIZE), bool))
    assert batch.nbytes == idx.size * k
    encoded = compact.encode(batch)
    assert compact.decode(encoded) == batch
    per_value = len(encoded) / idx.size
    assert per_value <= k + 2 and (k < 8 or per_value <= 10), per_value  # the wire format: k + 18
    assert len(wire.encode(batch)) > 1.8 * len(encoded)  # 18 bytes of columns per run


def test_dense_runs_cost_their_data():
    batch = DiffBatch([Diff(0, bytes(1 << 20), DataType.INT64, MergeOp.SUM)])
    assert len(compact.encode(batch)) - (1 << 20) < 64


@pytest.mark.parametrize("columns", [
    ([-1], [1], [0], [0]),                 # negative offset
    ([0], [-1], [0], [0]),                 # negative length
    ([2**63 - 1], [8], [5], [2]),          # end past 2**63
    ([0], [1], [0], [2]),                  # SUM on RAW
    ([0], [1], [12], [0]),                 # unknown dtype
])
def test_encoding_rejects_impossible_batches(columns):
    offsets, lengths, dtypes, ops = columns
    batch = DiffBatch.__new__(DiffBatch)  # columns no constructor would accept
    batch.offsets, batch.lengths = np.array(offsets, np.int64), np.array(lengths, np.int64)
    batch.dtypes, batch.ops = np.array(dtypes, np.uint8), np.array(ops, np.uint8)
    batch.data, batch._starts = bytes(max(0, lengths[0])), None
    with pytest.raises(ValueError):
        compact.encode_columns(batch)


def _message(count: int, tokens: bytes, data: bytes) -> bytes:
    return reseal(struct.pack("<4sHHQQQ", b"PFCB", 1, 0, count, len(tokens), len(data)) + tokens + data)


@pytest.mark.parametrize("bad, match", [
    (b"", "shorter"),
    (reseal(struct.pack("<4sHHQQQ", b"PFCB", 2, 0, 0, 0, 0)), "version"),
    (reseal(struct.pack("<4sHHQQQ", b"PFCB", 1, 4, 0, 0, 0)), "flags"),
    (reseal(struct.pack("<4sHHQQQ", b"PFCB", 1, 0, 0, 2**63, 0)), "does not match"),
    (_message(2**40, b"\x00\x00\x01\x00\x00", b"x"), "cannot hold"),
    (_message(1, b"\x00\x00\x01\x00", b"x"), "truncated"),
    (_message(1, b"\x00", b"x"), "truncated"),
    (_message(1, b"\x20\x00\x01\x00\x00", b"x"), "invalid dtype/op"),   # SUM on RAW
    (_message(1, b"\x25\x07\x01\x00\x00", bytes(8)), "invalid dtype/op"),  # unit 2**7
    (_message(1, b"\x00\x00\x02\x00\x00", b"x"), "count"),               # segment longer than header
    (_message(1, b"\x00\x00\x00\x00", b""), "count"),                    # empty segment
    (_message(1, b"\x00\x00\x01\x00\x00", b"xy"), "add up"),
    (_message(1, b"\x00\x00\x01\x00\x01\x05", b"x"), "exceed"),
    (_message(1, b"\x00\x00\x01" + b"\xff" * 10 + b"\x01" + b"\x00", b"x"), "count or offset"),
    (_message(1, b"\x00\x00\x01\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x00", b"x"), "overflows"),
    (_message(1, b"\x00\x00\x01\x00" + b"\x80" * 11 + b"\x00", b"x"), "overlong"),
    (_message(1, b"\x00\x00\x81\x00\x00\x00", b"x"), "count or offset"),  # count 1, not minimal
    (_message(1, b"\x00\x00\x01\x00\x80\x00", b"x"), "overlong"),          # token 0, not minimal
    (_message(1, b"\x25\x00\x01\x00\x01\x03", b"xyz"), "whole number"),  # 3 bytes of INT64 SUM
    (_message(2, b"\x00\x00\x01\x00\x00", b"x"), "fewer"),
    (compact.encode([Diff(0, b"abc")]) + b"\0", "checksum|does not match"),
])
def test_malformed_messages(bad, match):
    with pytest.raises(CorruptDataError, match=match):
        compact.decode(bad)


def test_fuzzed_messages_only_raise_corrupt_data():
    rng = random.Random(99)
    seeds = [compact.encode([Diff(rng.randrange(1 << 20) * 8, rng.randbytes(8 * rng.randrange(4)),
                                  *rng.choice([(DataType.RAW, MergeOp.OVERWRITE),
                                               (DataType.INT64, MergeOp.SUM)]))
                             for _ in range(rng.randrange(6))]) for _ in range(50)]
    decoded = 0
    for i in range(30_000):
        message = mutate(rng, rng.choice(seeds), [(8, 8), (16, 8), (24, 8)])
        if i % 2 and len(message) >= 4:
            message = reseal(message[:-4])
        try:
            batch = compact.decode(message)
        except CorruptDataError:
            continue
        decoded += 1
        assert compact.decode(compact.encode(batch)) == batch
    assert decoded < 30_000


def test_gather_checks_bounds():
    src = bytes(range(10))
    assert _native.gather(src, np.array([8, 0], np.int64), np.array([2, 3], np.int64)) == b"\x08\x09\x00\x01\x02"
    for starts, lengths in (([9], [2]), ([-1], [1]), ([0], [-1]), ([2**62], [2**62])):
        with pytest.raises(IndexError):
            _native.gather(src, np.array(starts, np.int64), np.array(lengths, np.int64))
    with pytest.raises(ValueError):
        _native.gather(src, np.zeros(2, np.int64), np.zeros(1, np.int64))


def test_tracked_changes_join_ranges_and_read_current_bytes():
    s = Snapshot(size=64 * PAGE_SIZE)
    s.write(b"abc", 10)
    s.write(b"XY", 12)                 # overlaps: joined
    s.write(b"q", 20)
    s.apply([Diff(30, b"\x01", DataType.RAW, MergeOp.XOR), Diff(40, b"i", op=MergeOp.IGNORE)])
    flags = np.zeros(64, bool)
    flags[[3, 4]] = True
    mem = bytearray(s.read())
    mem[3 * PAGE_SIZE] = 7
    s.write_pages(mem, flags)
    changes = s.tracked_changes()
    assert [(d.offset, d.data) for d in changes] == [
        (10, b"abXY"), (20, b"q"), (30, b"\x01"), (3 * PAGE_SIZE, s.read(3 * PAGE_SIZE, 2 * PAGE_SIZE))]
    assert all(d.op is MergeOp.OVERWRITE for d in changes)


def test_tracked_changes_cost_follows_the_runs_not_the_bytes():
    """A 64 MiB rewrite: the result holds the bytes once; no per-byte index
    (which took 16 bytes per changed byte) is built."""
    import tracemalloc

    size = 64 << 20
    s = Snapshot(size=size)
    s.write(np.full(size, 3, np.uint8))
    tracemalloc.start()
    try:
        changes = s.tracked_changes()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(changes) == 1 and changes.nbytes == size
    assert peak < size + (4 << 20), peak
    assert bytes(changes.data[:4]) == b"\x03" * 4
