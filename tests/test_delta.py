"""Delta encoding: round trips for every setting, and malformed input."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagefork import CorruptDataError, delta
from fuzzing import mutate, reseal


@st.composite
def pairs(draw):
    old = draw(st.binary(max_size=3000))
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 8))):
        if new:
            at = draw(st.integers(0, len(new) - 1))
            new[at: at + draw(st.integers(1, 40))] = draw(st.binary(min_size=1, max_size=40))
    cut = draw(st.integers(-100, 100))
    new = new[: max(0, len(new) + cut)] if cut < 0 else new + draw(st.binary(min_size=cut, max_size=cut))
    return old, bytes(new)


SETTINGS = [dict(), dict(page_size=64), dict(page_size=4096), dict(xor=True),
            dict(page_size=64, xor=True, zstd_level=1), dict(zstd_level=3)]


@settings(deadline=None)
@given(pairs(), st.sampled_from(SETTINGS))
def test_round_trip(pair, kwargs):
    old, new = pair
    encoded = delta.encode(old, new, **kwargs)
    assert delta.apply(encoded, old) == new
    assert delta.apply(bytearray(encoded), memoryview(old)) == new


def test_sizes_byte_runs_vs_pages():
    old = np.zeros(1 << 20, np.uint8)
    new = old.copy()
    new[::4096] = 1  # one byte per page
    by_bytes = delta.encode(old, new)
    by_64 = delta.encode(old, new, page_size=64)
    by_4096 = delta.encode(old, new, page_size=4096)
    assert len(by_bytes) < len(by_64) < len(by_4096)
    assert len(delta.encode(old, new, page_size=4096, xor=True, zstd_level=1)) < len(by_bytes)
    for d in (by_bytes, by_64, by_4096):
        assert delta.apply(d, old) == new.tobytes()
    assert len(delta.encode(old, old)) == 40  # header and checksum only


def test_settings_parse():
    assert delta.Settings.parse("pages=64;xor;zstd=1") == delta.Settings(64, True, 1)
    assert delta.Settings.parse("") == delta.Settings()
    assert delta.Settings.parse(" zstd ; bytes ") == delta.Settings(None, False, 3)
    for bad in ("pages=0", "pages=x", "xor=1", "lz4", "pages"):
        with pytest.raises(ValueError):
            delta.Settings.parse(bad)
    s = delta.Settings.parse("pages=16;xor")
    assert delta.apply(s.encode(b"abc" * 50, b"abd" * 50), b"abc" * 50) == b"abd" * 50


def test_wrong_base_and_bad_arguments():
    d = delta.encode(b"aaaa", b"abaa")
    with pytest.raises(CorruptDataError, match="made against 4 bytes"):
        delta.apply(d, b"aaa")
    with pytest.raises(ValueError):
        delta.encode(b"a", b"b", page_size=0)


def test_describing_more_than_it_carries_is_rejected():
    header = struct.Struct("<4sBBHIQQQ")
    # 10 bytes of old, claims 1 TB of new with an empty body.
    huge = reseal(header.pack(b"PFDL", 1, 0, 0, 0, 10, 1 << 40, 0))
    with pytest.raises(CorruptDataError):
        delta.apply(huge, bytes(10))
    # A record with a gap past the end of old.
    body = bytes([20, 1]) + b"x"  # gap 20, length 1
    with pytest.raises(CorruptDataError):
        delta.apply(reseal(header.pack(b"PFDL", 1, 0, 0, 0, 10, 21, len(body)) + body), bytes(10))


def test_fuzzed_deltas_only_raise_corrupt_data():
    """50,000 malformed deltas (half resealed past the checksum)."""
    rng = random.Random(99)
    bases = [rng.randbytes(rng.randrange(300)) for _ in range(20)]
    seeds = []
    for old in bases:
        new = bytearray(old + rng.randbytes(rng.randrange(20)))
        for _ in range(3):
            if new:
                new[rng.randrange(len(new))] ^= 0xFF
        seeds.append((old, delta.encode(old, bytes(new), **rng.choice(SETTINGS))))
    for i in range(50_000):
        old, message = rng.choice(seeds)
        message = mutate(rng, message, [(12, 4), (16, 8), (24, 8), (32, 8)])  # sizes
        if i % 2 and len(message) >= 4:
            message = reseal(message[:-4])
        try:
            out = delta.apply(message, old)
        except CorruptDataError:
            continue
        assert isinstance(out, bytes) and len(out) <= len(old) + len(message) * 64
