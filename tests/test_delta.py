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
from support import run_python


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
        except CorruptDataError as exc:
            assert type(exc) is CorruptDataError
            continue
        assert isinstance(out, bytes) and len(out) <= len(old) + len(message)


# ---- findings of issue 11 ------------------------------------------------------------

HEADER = struct.Struct("<4sBBHIQQQ")


def sealed(flags: int, old_len: int, new_len: int, body: bytes, body_len: int | None = None) -> bytes:
    return reseal(HEADER.pack(b"PFDL", 1, flags, 0, 0, old_len, new_len,
                              len(body) if body_len is None else body_len) + body)


def run_measured(code: str) -> tuple[int, str, str]:
    """Runs ``code`` in a fresh interpreter (a crash or a blow-up must not
    take the test run with it); returns exit status, stdout, stderr."""
    result = run_python(code)
    return result.returncode, result.stdout, result.stderr


def test_small_delta_declaring_gigabytes_is_refused_before_allocating():
    """A sealed 64 KiB zstd delta declaring a 2 GiB body and output: refused
    from the header, peak RSS stays flat (measured in a subprocess)."""
    code = """
        import resource, struct, zstandard
        from pagefork import CorruptDataError, delta, _native
        def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = 2 << 30
        compressor = zstandard.ZstdCompressor(level=1).compressobj(size=n)
        chunk = bytes(1 << 22)
        body = b"".join([compressor.compress(chunk) for _ in range(n // len(chunk))]
                        + [compressor.flush()])
        assert len(body) < 100_000, len(body)
        header = struct.pack("<4sBBHIQQQ", b"PFDL", 1, 2, 0, 0, 10, n, n)
        message = header + body
        message += struct.pack("<I", _native.crc32c(message))
        before = rss()
        for kwargs in ({}, {"max_size": 1 << 20}):
            try:
                delta.apply(message, bytes(10), **kwargs)
            except CorruptDataError as exc:
                assert type(exc) is CorruptDataError and "more than" in str(exc), exc
            else:
                raise AssertionError("accepted")
        # Under a max_size that admits the output, a body declared larger
        # than 3 bytes per output byte is refused before decompressing.
        small = struct.pack("<4sBBHIQQQ", b"PFDL", 1, 2, 0, 0, 10, 1 << 20, n) + body
        small += struct.pack("<I", _native.crc32c(small))
        try:
            delta.apply(small, bytes(10), max_size=1 << 20)
        except CorruptDataError as exc:
            assert "impossible" in str(exc), exc
        else:
            raise AssertionError("accepted")
        print(before, rss())
    """
    status, out, err = run_measured(code)
    assert status == 0, err
    before, after = map(int, out.split())
    assert after - before < 16 * 1024, (before, after)  # KiB: flat, not 2 GiB


def test_max_size_bounds_the_output(monkeypatch):
    old, new = bytes(100), bytes(100) + b"x" * 1000
    d = delta.encode(old, new)
    assert delta.apply(d, old, max_size=1100) == new
    assert delta.apply(d, old, max_size=np.int64(5000)) == new
    with pytest.raises(CorruptDataError, match="more than the 1099 allowed by max_size"):
        delta.apply(d, old, max_size=1099)
    # Growth of a compressed delta: by default up to DEFAULT_GROWTH, whatever
    # the ratio (1 MiB of zeros is under a hundred bytes of zstd).
    z = delta.encode(bytes(100), bytes(1 << 20), zstd_level=3)
    assert len(z) < 200 and delta.apply(z, bytes(100)) == bytes(1 << 20)
    # Past the bound only with max_size. The bound is read at each call: made
    # 4 MiB here, the same rule as at 64 MiB without building 64 MiB outputs
    # (seconds under ASan).
    assert delta.DEFAULT_GROWTH == 64 << 20  # docs/api.md
    monkeypatch.setattr(delta, "DEFAULT_GROWTH", 4 << 20)
    z = delta.encode(b"", bytes(delta.DEFAULT_GROWTH + 1), zstd_level=1)
    with pytest.raises(CorruptDataError, match="pass max_size"):
        delta.apply(z, b"")
    assert len(delta.apply(z, b"", max_size=delta.DEFAULT_GROWTH + 1)) == delta.DEFAULT_GROWTH + 1


def test_large_compressed_bodies_are_checked_as_they_stream():
    """A malformed compressed body larger than one chunk is refused after
    the first chunk: peak RSS stays flat (subprocess). A valid one round-trips."""
    code = """
        import resource, struct, zstandard
        from pagefork import CorruptDataError, delta, _native
        def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        new_len = 60 << 20                       # within the default bound
        body = bytes(3 * new_len)                # zero-length records: malformed
        packed = zstandard.ZstdCompressor(level=1).compress(body)
        del body
        header = struct.pack("<4sBBHIQQQ", b"PFDL", 1, 2, 0, 0, 10, new_len, 3 * new_len)
        message = header + packed
        message += struct.pack("<I", _native.crc32c(message))
        before = rss()
        try:
            delta.apply(message, bytes(10))
        except CorruptDataError as exc:
            assert "malformed" in str(exc), exc
        else:
            raise AssertionError("accepted")
        print(before, rss())
    """
    status, out, err = run_measured(code)
    assert status == 0, err
    before, after = map(int, out.split())
    assert after - before < 16 * 1024, (before, after)  # KiB
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    new = bytearray(old)
    new[::7] = bytes(len(new[::7]))
    d = delta.encode(old, bytes(new), zstd_level=1)
    assert delta.apply(d, old) == bytes(new)


@st.composite
def bodies(draw):
    """Record bodies: mostly well formed, sometimes damaged, with sizes."""
    old_len = draw(st.integers(0, 300))
    new_len = draw(st.integers(0, 300))
    records, end = bytearray(), 0
    while end < new_len and draw(st.integers(0, 4)):
        gap = draw(st.integers(0, max(0, min(old_len - end, new_len - end - 1))))
        length = draw(st.integers(1, new_len - end - gap)) if new_len - end - gap >= 1 else 0
        if length == 0:
            break
        for v in (gap, length):
            while v >= 0x80:
                records.append(v & 0x7F | 0x80)
                v >>= 7
            records.append(v)
        records += draw(st.binary(min_size=length, max_size=length))
        end += gap + length
    if new_len > old_len and end < new_len and draw(st.booleans()):
        length = new_len - end
        for v in (0, length):
            while v >= 0x80:
                records.append(v & 0x7F | 0x80)
                v >>= 7
            records.append(v)
        records += bytes(length)
    if records and draw(st.booleans()):
        records[draw(st.integers(0, len(records) - 1))] ^= 1 << draw(st.integers(0, 7))
    return old_len, new_len, bytes(records)


@settings(deadline=None)
@given(bodies(), st.lists(st.integers(1, 50), max_size=10))
def test_streamed_check_agrees_with_the_applying_walk(body, cuts):
    """delta_check, fed the body in arbitrary pieces (splitting varints and
    records), accepts exactly what delta_apply accepts."""
    from pagefork import _native

    old_len, new_len, records = body
    try:
        _native.delta_apply(bytes(old_len), records, new_len, False)
        valid = True
    except ValueError:
        valid = False
    state, at = bytearray(_native.DELTA_CHECK_STATE), 0
    try:
        for cut in cuts:
            _native.delta_check(state, records[at: at + cut], old_len, new_len, False)
            at += cut
        _native.delta_check(state, records[at:], old_len, new_len, True)
        checked = True
    except ValueError:
        checked = False
    assert checked == valid
def test_records_the_encoder_never_writes_are_corrupt():
    old = bytes(10)
    for body in (bytes([0, 0]) * 4 + bytes([0, 1]) + b"x",   # zero-length records
                 bytes([0x81, 0x00, 1]) + b"x",              # non-minimal varint gap
                 bytes([1, 0x81, 0x00]) + b"x"):             # non-minimal varint length
        with pytest.raises(CorruptDataError) as info:
            delta.apply(sealed(0, 10, 10, body), old)
        assert type(info.value) is CorruptDataError
    assert delta.apply(sealed(0, 10, 10, bytes([1, 1]) + b"x"), old) == b"\0x" + bytes(8)
    # A body longer than 3 bytes per output byte is refused from the header.
    with pytest.raises(CorruptDataError, match="impossible"):
        delta.apply(sealed(0, 10, 2, bytes([0, 1]) + b"x" + bytes(4)), old)


@pytest.mark.parametrize("old, new", [(b"", b""), (b"", b"abc"), (b"abc", b""), (bytes(5000), b"a"),
                                      (b"a", bytes(5000)), (b"abc" * 2000, b"abd" * 1000)])
@pytest.mark.parametrize("kwargs", SETTINGS)
def test_size_mismatched_inputs(old, new, kwargs):
    d = delta.encode(old, new, **kwargs)
    assert delta.apply(d, old, max_size=len(new)) == new
    for wrong in (old + b"x", old[:-1]) if old else (b"x",):
        with pytest.raises(CorruptDataError, match="made against"):
            delta.apply(d, wrong)


def test_encode_arguments():
    assert delta.apply(delta.encode(b"abc", b"abd", page_size=np.int64(2)), b"abc") == b"abd"
    for bad in (0, -1, 2**32):
        with pytest.raises(ValueError):
            delta.encode(b"a", b"b", page_size=bad)
    with pytest.raises(TypeError):
        delta.encode(b"a", b"b", page_size=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("tail", [b"garbage", "frame", b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd"],
                         ids=["garbage", "second-frame", "skippable-frame"])
def test_compressed_delta_with_bytes_after_its_frame_is_corrupt(tail):
    """Before: zstd's one-shot decompress stopped at the first frame, so a
    resealed delta with anything appended still applied."""
    import zstandard

    from pagefork import CorruptDataError, delta
    from fuzzing import reseal

    old, new = bytes(1000), bytes(500) + b"x" * 500
    message = delta.encode(old, new, zstd_level=3)
    assert delta.apply(message, old) == new
    extra = zstandard.ZstdCompressor().compress(b"abc") if tail == "frame" else tail
    with pytest.raises(CorruptDataError, match="after its frame"):
        delta.apply(reseal(message[:-4] + extra), old)
    with pytest.raises(CorruptDataError):
        delta.apply(reseal(message[:-7]), old)  # a cut frame
