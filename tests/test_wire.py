"""The diff wire format: round trips, and malformed input never crashes."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagefork import CorruptDataError, DataType, Diff, DiffBatch, MergeOp, wire
from pagefork import _native

from fuzzing import mutate, reseal
from support import PAIRS
from pagefork import Snapshot


@st.composite
def diff_lists(draw):
    out = []
    for _ in range(draw(st.integers(0, 20))):
        dtype, op = draw(st.sampled_from(PAIRS))
        n = draw(st.integers(0, 5)) * dtype.itemsize
        out.append(Diff(draw(st.integers(0, 2**40)), draw(st.binary(min_size=n, max_size=n)), dtype, op))
    return out


@settings(deadline=None)
@given(diff_lists())
def test_round_trip(diffs):
    message = wire.encode(diffs)
    assert wire.decode(message) == diffs
    assert wire.decode(bytearray(message)) == DiffBatch(diffs)
    assert wire.encode(wire.decode(message)) == message


def test_decoding_does_not_copy_the_data():
    message = bytearray(wire.encode([Diff(5, b"hello")]))
    batch = wire.decode(message)
    assert bytes(batch.data) == b"hello"
    assert isinstance(batch.data, memoryview) and batch.data.obj is not None


def test_layout_is_versioned_and_checksummed():
    message = wire.encode([Diff(1, b"a")])
    assert message[:4] == b"PFDB" and struct.unpack_from("<H", message, 4)[0] == wire.VERSION
    assert struct.unpack("<I", message[-4:])[0] == _native.crc32c(message[:-4])


@pytest.mark.parametrize("bad, match", [
    (b"", "shorter"),
    (b"XXXX" + bytes(20) + bytes(4), "magic"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 9, 0, 0, 0)), "version"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 1, 0, 0)), "flags"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 2**60, 0)), "does not match"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 0, 5)), "does not match"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 2, 2) + struct.pack("<qqqq", 0, 0, 2, 2)
            + bytes(4) + b"xy"), "add up"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 1, 1) + struct.pack("<qq", -1, 1) + b"\0\0" + b"x"),
     "negative"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 1, 1) + struct.pack("<qq", 0, 1) + b"\x00\x02" + b"x"),
     "dtype/op"),
    (reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 1, 1) + struct.pack("<qq", 0, 1) + b"\x05\x02" + b"x"),
     "whole number"),
    (wire.encode([Diff(0, b"abc")]) + b"\0", "checksum|does not match"),
    (wire.encode([Diff(0, b"abc")])[:-1], "checksum|does not match"),
])
def test_malformed_messages(bad, match):
    with pytest.raises(CorruptDataError, match=match):
        wire.decode(bad)


def test_not_bytes_like():
    with pytest.raises(CorruptDataError):
        wire.decode("text")  # type: ignore[arg-type]


def test_fuzzed_messages_only_raise_corrupt_data():
    """60,000 malformed messages: half with a wrong checksum, half resealed so
    the parser itself is exercised. Together with the delta fuzz, over 100,000."""
    rng = random.Random(1234)
    seeds = [wire.encode([Diff(rng.randrange(1 << 20), rng.randbytes(8 * rng.randrange(5)),
                               *rng.choice([(DataType.RAW, MergeOp.OVERWRITE),
                                            (DataType.INT64, MergeOp.SUM)]))
                          for _ in range(rng.randrange(4))]) for _ in range(50)]
    decoded = 0
    for i in range(60_000):
        message = mutate(rng, rng.choice(seeds), [(8, 8), (16, 8)])  # count, data_len
        if i % 2 and len(message) >= 4:
            message = reseal(message[:-4])
        try:
            batch = wire.decode(message)
        except CorruptDataError as exc:
            assert type(exc) is CorruptDataError
            continue
        decoded += 1
        assert wire.decode(wire.encode(batch)) == batch  # whatever decodes is consistent
    assert decoded < 60_000


# ---- findings of issue 11 ------------------------------------------------------------


def test_zero_diffs_with_trailing_data_is_corrupt_data():
    """A message with no diffs but data bytes and a valid CRC."""
    message = reseal(struct.pack("<4sHHQQ", b"PFDB", 1, 0, 0, 5) + b"xxxxx")
    with pytest.raises(CorruptDataError, match="no diffs, but 5 bytes") as info:
        wire.decode(message)
    assert type(info.value) is CorruptDataError


@pytest.mark.parametrize("dtype", [DataType.INT16, DataType.INT32, DataType.LONG, DataType.DOUBLE])
def test_typed_diffs_must_be_whole_values_when_made_and_encoded(dtype):
    """Encode never accepts what decode would refuse; the error names the offset."""
    with pytest.raises(ValueError, match="offset 4096: 101 bytes is not a whole number"):
        Diff(4096, bytes(101), dtype, MergeOp.SUM)
    k = dtype.itemsize
    bad = DiffBatch.unchecked(np.array([0, 4096], np.int64), np.array([k, k + 1], np.int64),
                               np.array([dtype, dtype], np.uint8),
                               np.array([MergeOp.SUM] * 2, np.uint8), bytes(2 * k + 1))
    with pytest.raises(ValueError, match="offset 4096: .*not a whole number"):
        wire.encode(bad)
    with pytest.raises(ValueError, match="offset 4096"):
        DiffBatch.from_columns(*bad.columns())
    # Byte-wise ops on a typed region may have any length.
    assert wire.decode(wire.encode([Diff(3, bytes(5), dtype, MergeOp.XOR)])) == [
        Diff(3, bytes(5), dtype, MergeOp.XOR)]


@pytest.mark.parametrize("offsets, lengths, why", [
    ([-1], [1], "negative"),
    ([2**63 - 1], [1], "overflows"),
    ([0, 2**62], [1, 0], None),
])
def test_encode_rejects_what_decode_rejects(offsets, lengths, why):
    data = bytes(sum(lengths))
    n = len(offsets)
    batch = DiffBatch.unchecked(np.array(offsets, np.int64), np.array(lengths, np.int64),
                                 np.zeros(n, np.uint8), np.zeros(n, np.uint8), data)
    if why is None:
        assert wire.decode(wire.encode(batch)) == batch
        return
    with pytest.raises(ValueError, match=why):
        wire.encode(batch)
    raw = b"".join((struct.pack("<4sHHQQ", b"PFDB", 1, 0, n, len(data)),
                    np.array(offsets, "<i8").tobytes(), np.array(lengths, "<i8").tobytes(),
                    bytes(2 * n), data))
    with pytest.raises(CorruptDataError, match=why):
        wire.decode(reseal(raw))


def test_reused_receive_buffer_cannot_redirect_apply():
    """decode is zero-copy: the batch's columns are views of the buffer.
    Changing the buffer after decode changes the batch, but apply checks and
    applies one private copy of the columns."""
    from pagefork import OutOfBoundsError, Snapshot

    buffer = bytearray(wire.encode([Diff(0, b"ab"), Diff(10, b"cd")]))
    batch = wire.decode(buffer)
    at = 24 + 8  # the second diff's offset
    buffer[at: at + 8] = struct.pack("<q", 1 << 44)
    with Snapshot(bytes(16)) as snap:
        with pytest.raises(OutOfBoundsError):
            snap.apply(batch)
        assert snap.read() == bytes(16)
        buffer[at: at + 8] = struct.pack("<q", 12)
        snap.apply(batch)
        assert snap.read() == b"ab" + bytes(10) + b"cd" + bytes(2)


def test_every_cut_and_bit_flip_of_small_messages_is_corrupt_data_or_applies():
    """Exhaustive over small messages: every truncation, every bit flip
    (with the CRC as it was, and resealed), every byte set to 0/0x7F/0x80/
    0xFF and resealed. Decoding raises only CorruptDataError; what decodes
    applies or raises only OutOfBoundsError/MergeError."""
    from fuzzing import reseal

    from pagefork import CorruptDataError, MergeError, OutOfBoundsError, delta, wire

    old = bytes(range(200))
    new = bytes(range(50)) + b"Q" * 30 + bytes(range(80, 200)) + b"tail"
    messages = [(wire.encode([Diff(3, np.array([1, -2], np.int64).tobytes(), DataType.INT64,
                                   MergeOp.SUM), Diff(40, b"xyz", op="xor"), Diff(0, b"")]), "wire")]
    messages += [(delta.encode(old, new, **kw), "delta") for kw in
                 ({}, {"page_size": 16}, {"xor": True}, {"zstd_level": 1},
                  {"xor": True, "zstd_level": 3})]

    def check(message: bytes, kind: str) -> None:
        try:
            decoded = wire.decode(message) if kind == "wire" else delta.apply(message, old)
        except CorruptDataError:
            return
        if kind == "wire":
            with Snapshot(size=64, max_size=128) as snap:
                try:
                    snap.apply(decoded)
                except (OutOfBoundsError, MergeError):
                    pass

    for message, kind in messages:
        body = message[:-4]
        for cut in range(len(message)):
            check(message[:cut], kind)
            check(reseal(body[:cut]), kind)
        for bit in range(len(message) * 8):
            flipped = bytearray(message)
            flipped[bit // 8] ^= 1 << (bit % 8)
            check(bytes(flipped), kind)
            if bit < len(body) * 8:
                check(reseal(bytes(flipped[:len(body)])), kind)
        for at in range(len(body)):
            for value in (0, 0x7F, 0x80, 0xFF):
                changed = bytearray(body)
                changed[at] = value
                check(reseal(bytes(changed)), kind)


def test_diff_batches_pickle_whatever_made_them():
    """Before: a batch from Snapshot.diff or wire.decode held a memoryview,
    so pickling it (multiprocessing, a cache) raised TypeError."""
    import pickle

    from pagefork import DiffBatch, wire

    with Snapshot(bytes(100)) as snap:
        made = snap.diff(b"x" * 50 + bytes(50), [True])
    for batch in (made, wire.decode(bytearray(wire.encode(made))), DiffBatch([Diff(3, b"ab")])):
        copy = pickle.loads(pickle.dumps(batch))
        assert copy == batch and isinstance(copy, DiffBatch)
