"""Malformed input to snapshots, batches, wire and delta: adversarial values
(huge and negative offsets, lengths overflowing 64 bits, zero-length and
page-straddling diffs, mutable buffers) raise only pagefork's own errors,
never crash, and never allocate more than the input or the receiver allows."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefork import (PAGE_SIZE, CorruptDataError, Diff, DiffBatch, MergeError, OutOfBoundsError, Snapshot, delta, wire)

import reference
from fuzzing import reseal
from support import PAIRS, float_ranges_of, same_modulo_nan_payloads
from support import run_python

ALLOWED = (CorruptDataError, OutOfBoundsError, MergeError)

# Values an attacker picks: edges of int64/uint64, around pages, negatives.
EDGES = [0, 1, 7, 8, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 2 * PAGE_SIZE - 3, 2**31, 2**32,
         2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**63]
adversarial = st.one_of(st.sampled_from(EDGES), st.integers(-2**64, 2**65), st.integers(0, 3 * PAGE_SIZE))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(adversarial, st.integers(0, 64), st.integers(0, 13), st.integers(0, 9)),
                max_size=6),
       st.integers(-3, 3))
def test_adversarial_columns(rows, extra):
    """from_columns refuses or accepts; whatever it accepts encodes, decodes
    and applies exactly like the reference model, or is refused by apply
    with OutOfBoundsError/MergeError (and then changes nothing)."""
    offsets = [r[0] for r in rows]
    lengths = [r[1] for r in rows]
    data_len = max(0, sum(lengths) + extra)
    data = bytes((i * 7 + 3) % 256 for i in range(data_len))
    try:
        batch = DiffBatch.from_columns(offsets, lengths, [r[2] for r in rows], [r[3] for r in rows],
                                       data)
    except ValueError as exc:
        assert type(exc) is ValueError
        return
    assert wire.decode(wire.encode(batch)) == batch
    target = bytes(range(256)) * (2 * PAGE_SIZE // 256) + b"tail"
    with Snapshot(target, max_size=3 * PAGE_SIZE) as snap:
        fits = max((int(o) + int(n) for o, n in zip(batch.offsets, batch.lengths)),
                   default=0) <= 3 * PAGE_SIZE
        try:
            want = reference.apply(target, list(batch)) if fits else None
        except MergeError:
            want, fits = None, False
        try:
            snap.apply(wire.decode(bytearray(wire.encode(batch))))
        except ALLOWED as exc:
            assert not fits or isinstance(exc, MergeError), exc
            assert snap.read() == target
            return
        assert want is not None and fits
        assert same_modulo_nan_payloads(snap.read(), want, float_ranges_of(batch))


@st.composite
def straddling(draw):
    """Valid diffs placed around page boundaries, zero-length ones included."""
    diffs = []
    for _ in range(draw(st.integers(0, 8))):
        dtype, op = draw(st.sampled_from(PAIRS))
        k = dtype.itemsize
        n = draw(st.sampled_from([0, 1, 2, 5, PAGE_SIZE // k + 1]))
        edge = draw(st.sampled_from([PAGE_SIZE, 2 * PAGE_SIZE]))
        offset = max(0, edge - draw(st.integers(0, 3)) * k - draw(st.integers(0, k - 1)))
        diffs.append(Diff(offset, draw(st.binary(min_size=n * k, max_size=n * k)), dtype, op))
    return diffs


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(straddling(), st.sampled_from([2 * PAGE_SIZE - 5, 2 * PAGE_SIZE, 2 * PAGE_SIZE + 9]))
def test_page_straddling_and_empty_diffs(diffs, size):
    target = bytes((i * 13 + 1) % 251 + 1 for i in range(size))  # no zeros: PRODUCT is defined
    with Snapshot(target, max_size=4 * PAGE_SIZE) as snap:
        try:
            want = reference.apply(target, diffs)
        except MergeError:  # PRODUCT past the end multiplies a zero
            with pytest.raises(MergeError):
                snap.apply(diffs)
            assert snap.read() == target
            return
        snap.apply(wire.decode(wire.encode(diffs)))
        assert same_modulo_nan_payloads(snap.read(), want, float_ranges_of(diffs))


@settings(deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 3), st.binary(max_size=50))
def test_adversarial_delta_headers(old, new_len, body_len, old_len_noise, flags, body):
    """Sealed deltas with arbitrary sizes and bodies: CorruptDataError or a
    result no larger than what the input carries."""
    old_len = len(old) if old_len_noise % 2 else old_len_noise
    message = reseal(delta._HEADER.pack(b"PFDL", 1, flags, 0, 0, old_len, new_len, body_len) + body)
    try:
        out = delta.apply(message, old)
    except CorruptDataError as exc:
        assert type(exc) is CorruptDataError
        return
    assert len(out) == new_len <= len(old) + len(body)


@settings(deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000), st.sampled_from([None, 1, 64, 4096]),
       st.booleans(), st.sampled_from([None, 1]))
def test_delta_round_trip_of_unrelated_buffers(old, new, page_size, xor, level):
    d = delta.encode(old, new, page_size=page_size, xor=xor, zstd_level=level)
    assert delta.apply(d, old, max_size=len(new)) == new
    if len(new):
        with pytest.raises(CorruptDataError):
            delta.apply(d, old, max_size=len(new) - 1)


FUZZ = """
    import random, resource, struct, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from fuzzing import mutate, reseal
    from pagefork import (CorruptDataError, DataType, Diff, MergeError, MergeOp,
                          OutOfBoundsError, Snapshot, delta, wire)
    ALLOWED = (CorruptDataError, OutOfBoundsError, MergeError)
    rng = random.Random(11)
    def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pairs = [(DataType.RAW, MergeOp.OVERWRITE), (DataType.RAW, MergeOp.XOR),
             (DataType.INT64, MergeOp.SUM), (DataType.INT32, MergeOp.PRODUCT),
             (DataType.FLOAT64, MergeOp.MAX), (DataType.UINT16, MergeOp.MIN)]
    def some_diffs():
        out = []
        for _ in range(rng.randrange(5)):
            dtype, op = rng.choice(pairs)
            k = dtype.itemsize
            out.append(Diff(rng.randrange(1 << 14) * k, rng.randbytes(k * rng.randrange(6)), dtype, op))
        return out
    wire_seeds = [wire.encode(some_diffs()) for _ in range(40)]
    bases = [rng.randbytes(rng.randrange(1, 400)) for _ in range(20)]
    delta_seeds = []
    for old in bases:
        new = bytearray(old + bytes(rng.randrange(30)))
        new[rng.randrange(len(new))] ^= 0xFF
        delta_seeds.append((old, delta.encode(old, bytes(new), page_size=rng.choice([None, 16]),
                                              xor=rng.random() < 0.5,
                                              zstd_level=rng.choice([None, 1]))))
    snap = Snapshot(bytes(range(256)) * 256, max_size=1 << 20)
    before = rss()
    counts = dict(ok=0, refused=0)
    for i in range({n}):
        message = mutate(rng, rng.choice(wire_seeds), [(8, 8), (16, 8)])
        if i % 2 and len(message) >= 4:
            message = reseal(message[:-4])
        try:
            snap.apply(wire.decode(bytearray(message)))
            counts["ok"] += 1
        except ALLOWED:
            counts["refused"] += 1
        old, message = rng.choice(delta_seeds)
        message = mutate(rng, message, [(12, 8), (20, 8), (28, 8)])
        if i % 2 and len(message) >= 4:
            message = reseal(message[:-4])
        try:
            delta.apply(message, old)
            counts["ok"] += 1
        except ALLOWED:
            counts["refused"] += 1
    print(before, rss(), counts["ok"], counts["refused"])
"""


def test_fuzz_raises_only_pagefork_errors_within_a_memory_bound():
    """60,000 malformed wire messages (applied to a snapshot) and deltas, in
    a subprocess: any other exception or a crash fails the exit status, and
    peak RSS may grow by at most 64 MiB over the process's own start."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    result = run_python(FUZZ.format(tests=tests, n=30_000), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after, ok, refused = map(int, result.stdout.split())
    assert ok + refused == 60_000 and ok > 0 and refused > 0
    assert after - before < 64 * 1024, (before, after)  # KiB


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(straddling(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6))
def test_receive_buffer_changed_after_decode(diffs, edits):
    """decode is zero-copy; a receive buffer changed after decode changes the
    batch. apply then does exactly what the batch says at that moment (the
    reference model), or refuses it with nothing changed."""
    from pagefork.diffs import column_error as _column_error

    buffer = bytearray(wire.encode(diffs))
    batch = wire.decode(buffer)
    for at, value in edits:
        buffer[24 + at % max(1, len(buffer) - 28)] = value  # header and CRC stay
    target = bytes((i * 13 + 1) % 251 + 1 for i in range(2 * PAGE_SIZE))
    with Snapshot(target, max_size=4 * PAGE_SIZE) as snap:
        valid = _column_error(*batch.columns()[:4], batch.nbytes) is None and max(
            (int(o) + int(n) for o, n in zip(batch.offsets, batch.lengths)), default=0) <= 4 * PAGE_SIZE
        try:
            want = reference.apply(target, list(batch)) if valid else None
        except MergeError:
            want = None
        if want is None:
            with pytest.raises(ALLOWED):
                snap.apply(batch)
            assert snap.read() == target
            return
        snap.apply(batch)
        assert same_modulo_nan_payloads(snap.read(), want, float_ranges_of(batch))


def test_diff_data_may_alias_the_snapshot():
    """A batch whose data is a view of the snapshot itself (overlapping copy)."""
    with Snapshot(bytes(range(256)) * 16) as snap:
        view = snap.view()
        batch = DiffBatch.from_columns([8], [100], [0], [0], view[0:100])
        snap.apply(batch)
        del batch, view
        assert snap.read(8, 100) == bytes(range(100)) and snap.read(0, 8) == bytes(range(8))
