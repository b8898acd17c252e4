"""Snapshots, merge regions and diffs, checked against tests/reference.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagefork
from pagefork import (PAGE_SIZE, DataType, Diff, DiffBatch, MergeError, MergeOp, MergeRegion,
                      OutOfBoundsError, PageforkError, Region, Snapshot)

import reference
from support import PAIRS, float_ranges_of, run_python, same_modulo_nan_payloads

TYPED_OPS = [MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.PRODUCT, MergeOp.MAX, MergeOp.MIN]
NUMERIC = [t for t in DataType if t not in (DataType.RAW, DataType.BOOL)]



# ---- types and values ----------------------------------------------------------


def test_datatype_and_mergeop_coercion():
    assert DataType.INT is DataType.INT32 and DataType.LONG is DataType.INT64
    assert DataType.FLOAT is DataType.FLOAT32 and DataType.DOUBLE is DataType.FLOAT64
    assert DataType.of(np.float64) is DataType.FLOAT64
    assert DataType.of("int16") is DataType.INT16
    assert DataType.of("raw") is DataType.RAW
    assert DataType.of(np.dtype("<u4")) is DataType.UINT32
    assert DataType.of(bool) is DataType.BOOL
    with pytest.raises(ValueError):
        DataType.of(np.complex128)
    with pytest.raises(ValueError):
        DataType.of(">i4")
    assert MergeOp.of("sum") is MergeOp.SUM and MergeOp.of("Max") is MergeOp.MAX
    with pytest.raises(ValueError, match="overwrite"):
        MergeOp.of("add")


def test_merge_region_validation():
    r = MergeRegion(8, 16, np.int32, "sum")
    assert r.dtype is DataType.INT32 and r.op is MergeOp.SUM
    with pytest.raises(ValueError, match="whole number"):
        MergeRegion(0, 6, DataType.INT32, MergeOp.SUM)
    with pytest.raises(ValueError, match="numeric"):
        MergeRegion(0, 8, DataType.RAW, MergeOp.SUM)
    with pytest.raises(ValueError, match="numeric"):
        MergeRegion(0, 8, DataType.BOOL, MergeOp.PRODUCT)
    with pytest.raises(ValueError):
        MergeRegion(-1, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.offset = 3  # type: ignore[misc]


def test_diff_batch_is_a_sequence():
    diffs = [Diff(0, b"ab"), Diff(10, b"\x01\x00\x00\x00", DataType.INT32, MergeOp.SUM),
             Diff(99, b"", op="xor")]
    batch = DiffBatch(diffs)
    assert len(batch) == 3 and batch == diffs and list(batch) == diffs
    assert batch[1] == diffs[1] and batch[-1] == diffs[2]
    assert batch[1:] == diffs[1:]
    assert batch.nbytes == 6
    with pytest.raises(IndexError):
        batch[3]
    assert DiffBatch.concat([batch, batch]) == diffs + diffs
    assert DiffBatch() == [] and batch != diffs[:2]


# ---- snapshot basics ------------------------------------------------------------


def test_read_write_and_growth():
    with Snapshot(b"hello", max_size=20) as s:
        assert s.size == 5 and s.read() == b"hello" and s.read(1, 3) == b"ell"
        s.write(b"!!", 4)
        assert s.read() == b"hell!!" and s.size == 6
        s.write(b"x", 19)
        assert s.size == 20 and s.read(6, 13) == bytes(13)
        with pytest.raises(OutOfBoundsError):
            s.write(b"yy", 19)
        with pytest.raises(OutOfBoundsError):
            s.read(18, 5)
        with pytest.raises(IndexError):
            s.read(-1, 1)
    assert s.closed
    with pytest.raises(PageforkError, match="closed"):
        s.read()
    with pytest.raises(ValueError):
        Snapshot(b"abc", size=5)
    assert Snapshot(size="8KiB").read() == bytes(8192)


def test_map_to_in_place_copy_on_write():
    content = np.arange(3 * PAGE_SIZE // 8, dtype=np.int64)
    with Snapshot(content) as snap, Region(3 * PAGE_SIZE) as region:
        view = region.array(np.int64)  # made before mapping: stays valid
        address = region.address
        snap.map_to(region)
        assert region.address == address and np.array_equal(view, content)
        view[:10] = -1
        assert np.array_equal(np.frombuffer(snap.read(0, 80), np.int64), np.arange(10))
        snap.map_to(region)  # restores
        assert np.array_equal(view, content)
        with Region(PAGE_SIZE) as small:
            snap.map_to(small)
            assert np.array_equal(small.array(np.int64), content[: PAGE_SIZE // 8])
        with Region(4 * PAGE_SIZE) as big, pytest.raises(OutOfBoundsError):
            snap.map_to(big)
        del view


def test_cow_tracks_memory_mapped_from_a_snapshot():
    pagefork.probe()["cow"].available or pytest.skip(pagefork.probe()["cow"].reason)
    with Snapshot(size=8 * PAGE_SIZE) as snap, Region(8 * PAGE_SIZE) as region:
        tracker = pagefork.tracker("cow")
        snap.map_to(region)
        tracker.start(region)
        region.array(np.uint8)[[PAGE_SIZE * 2, PAGE_SIZE * 5 + 9]] = 1
        dirty = tracker.dirty_pages(region)
        assert np.flatnonzero(dirty).tolist() == [2, 5]
        assert snap.diff(region, dirty) == [Diff(2 * PAGE_SIZE, b"\x01"), Diff(5 * PAGE_SIZE + 9, b"\x01")]
        with pytest.raises(PageforkError, match="map_to"):
            tracker.start(region)
        snap.map_to(region)
        tracker.start(region)
        tracker.close()


def test_merge_regions_sorted_overlaps_and_gaps():
    s = Snapshot(size=100)
    s.add_merge_region(40, 8, DataType.INT64, MergeOp.SUM)
    s.add_merge_region(0, 16, DataType.RAW, MergeOp.XOR)
    assert [r.offset for r in s.merge_regions] == [0, 40]
    with pytest.raises(ValueError, match="overlaps"):
        s.add_merge_region(44, 8)
    with pytest.raises(ValueError, match="overlaps"):
        s.add_merge_region(10, 0)  # to the end
    s.fill_gaps()
    assert s.merge_regions == [MergeRegion(0, 16, DataType.RAW, MergeOp.XOR),
                               MergeRegion(16, 24), MergeRegion(40, 8, DataType.INT64, MergeOp.SUM),
                               MergeRegion(48, 0)]
    with pytest.raises(ValueError, match="OVERWRITE or XOR"):
        s.fill_gaps(MergeOp.SUM)
    s.clear_merge_regions()
    s.fill_gaps("xor")
    assert s.merge_regions == [MergeRegion(0, 0, DataType.RAW, MergeOp.XOR)]


def test_diff_rules_by_example():
    orig = np.zeros(2 * PAGE_SIZE, np.uint8)
    orig[100:108] = np.frombuffer(np.int64(10).tobytes(), np.uint8)
    s = Snapshot(orig)
    s.add_merge_region(100, 8, DataType.INT64, MergeOp.SUM)
    s.add_merge_region(200, 4, DataType.UINT8, MergeOp.IGNORE)
    s.fill_gaps()
    mem = bytearray(orig.tobytes())
    mem[100:108] = np.int64(15).tobytes()
    mem[200] = 9  # ignored
    mem[PAGE_SIZE - 2: PAGE_SIZE + 2] = b"abcd"  # one run across the page boundary
    mem[300] = 1
    mem += b"ext"
    dirty = np.ones(3, bool)
    batch = s.diff(bytes(mem), dirty)
    assert batch == [Diff(100, np.int64(5).tobytes(), DataType.INT64, MergeOp.SUM),
                     Diff(300, b"\x01"), Diff(PAGE_SIZE - 2, b"abcd"),
                     Diff(2 * PAGE_SIZE, b"ext")]
    # Only dirty pages are compared.
    assert s.diff(bytes(mem), np.array([False, True, False])) == [
        Diff(PAGE_SIZE, b"cd"), Diff(2 * PAGE_SIZE, b"ext")]
    with pytest.raises(ValueError, match="one flag per page"):
        s.diff(bytes(mem), np.ones(2, bool))


def test_product_of_a_zero_integer_is_a_merge_error():
    s = Snapshot(np.array([0, 4, 3], np.int32))
    s.add_merge_region(0, 12, DataType.INT32, MergeOp.PRODUCT)
    with pytest.raises(MergeError, match="offset 0"):
        s.diff(np.array([5, 4, 3], np.int32), np.ones(1, bool))
    with pytest.raises(MergeError, match="offset 8: .*whole multiple"):
        s.diff(np.array([0, 8, 4], np.int32), np.ones(1, bool))
    assert s.diff(np.array([0, 12, 3], np.int32), np.ones(1, bool)) == [
        Diff(4, np.int32(3).tobytes(), DataType.INT32, MergeOp.PRODUCT)]
    before = s.read()
    bad = [Diff(4, np.int32(2).tobytes(), DataType.INT32, MergeOp.PRODUCT),
           Diff(0, np.int32(2).tobytes(), DataType.INT32, MergeOp.PRODUCT)]
    with pytest.raises(MergeError, match="offset 0"):
        s.apply(bad)
    assert s.read() == before  # nothing applied


def test_apply_is_all_or_nothing_and_grows():
    s = Snapshot(bytes(10), max_size=16)
    with pytest.raises(OutOfBoundsError):
        s.apply([Diff(0, b"ok"), Diff(15, b"xx")])
    assert s.read() == bytes(10) and s.size == 10
    s.apply([Diff(0, b"ok"), Diff(12, b"xy")])
    assert s.size == 14 and s.read() == b"ok" + bytes(10) + b"xy"


def test_queue_and_tracked_changes():
    s = Snapshot(bytes(64))
    s.queue([Diff(0, b"aaaa")])
    s.queue(DiffBatch([Diff(2, b"bb"), Diff(40, b"\x01", DataType.UINT8, MergeOp.SUM)]))
    assert s.queued == 3
    assert s.write_queued() == 3 and s.queued == 0
    s.write(b"zz", 50)
    changes = s.tracked_changes()
    assert changes == [Diff(0, b"aabb"), Diff(40, b"\x01"), Diff(50, b"zz")]
    s.clear_tracked_changes()
    assert s.tracked_changes() == []
    assert s.write_queued() == 0


# ---- the reference model ------------------------------------------------------------


@st.composite
def layouts(draw):
    """(orig, mem, dirty, regions): a few pages, a few changes, a merge layout."""
    n_pages = draw(st.integers(1, 3))
    size = n_pages * PAGE_SIZE - draw(st.sampled_from([0, 0, 13]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    orig = rng.integers(0, 256, size, dtype=np.uint8)
    n_regions = draw(st.integers(0, 4))
    cuts = sorted(draw(st.lists(st.integers(0, size // 8), min_size=n_regions * 2,
                                max_size=n_regions * 2, unique=True)))
    regions = []
    for i in range(n_regions):
        dtype, op = draw(st.sampled_from(PAIRS))
        k = dtype.itemsize
        start = cuts[2 * i] * 8
        length = (cuts[2 * i + 1] * 8 - start) // k * k
        if i == n_regions - 1 and draw(st.booleans()):
            length = 0
        if length or i == n_regions - 1:
            regions.append(MergeRegion(start, length, dtype, op))
    mem = orig.copy()
    n_changes = draw(st.integers(0, 40))
    at = rng.integers(0, size, n_changes)
    mem[at] = rng.integers(0, 256, n_changes, dtype=np.uint8)
    runs = draw(st.integers(0, 3))
    for _ in range(runs):
        a = int(rng.integers(0, size))
        b = min(size, a + int(rng.integers(1, 300)))
        mem[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8)
    # PRODUCT regions: make changes whole multiples of non-zero originals.
    for r in regions:
        if r.op is MergeOp.PRODUCT and draw(st.booleans()):
            end = r.end(size)
            k = r.dtype.itemsize
            end = r.offset + (end - r.offset) // k * k
            o = orig[r.offset:end].view(r.dtype.numpy).copy()
            o[o == 0] = 1
            orig[r.offset:end] = o.view(np.uint8)
            factor = rng.integers(-3, 4, o.size).astype(r.dtype.numpy)
            keep = rng.random(o.size) < 0.7
            with np.errstate(all="ignore"):
                m = np.where(keep, o, o * factor).astype(r.dtype.numpy)
            mem[r.offset:end] = m.view(np.uint8)
    extra = draw(st.sampled_from([0, 0, 0, 5]))
    mem_bytes = mem.tobytes() + rng.integers(0, 256, extra, dtype=np.uint8).tobytes()
    n_mem_pages = -(-len(mem_bytes) // PAGE_SIZE)
    dirty = np.array(draw(st.lists(st.booleans(), min_size=n_mem_pages, max_size=n_mem_pages)))
    return orig.tobytes(), mem_bytes, dirty, regions


def batches_match(got: DiffBatch, want: list) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if (g.offset, g.dtype, g.op) != (w.offset, w.dtype, w.op):
            return False
        if not same_modulo_nan_payloads(g.data, w.data, float_ranges_of([Diff(0, g.data, g.dtype, g.op)])):
            return False
    return True


def snapshot_with(orig: bytes, regions) -> Snapshot:
    s = Snapshot(orig, max_size=len(orig) + PAGE_SIZE)
    for r in regions:
        s.add_merge_region(r.offset, r.length, r.dtype, r.op)
    return s


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(layouts())
def test_diff_matches_the_reference(layout):
    orig, mem, dirty, regions = layout
    with snapshot_with(orig, regions) as s:
        try:
            expected = reference.diff(orig, mem, dirty, regions)
        except MergeError as exc:
            with pytest.raises(MergeError, match=str(exc).split(" ")[3]):
                s.diff(mem, dirty)
            return
        got = s.diff(mem, dirty)
        assert batches_match(got, expected)
        # Applying the diff merges exactly like the reference does.
        try:
            want = reference.apply(orig, expected)
        except MergeError:
            with pytest.raises(MergeError):
                s.apply(got)
            assert s.read() == orig
            return
        s.apply(got)
        assert same_modulo_nan_payloads(s.read(), want, float_ranges_of(got))


@settings(deadline=None)
@given(layouts())
def test_overwrite_and_xor_round_trip(layout):
    orig, mem, dirty, regions = layout
    regions = [MergeRegion(r.offset, r.length, DataType.RAW,
                           MergeOp.XOR if r.op is MergeOp.XOR else MergeOp.OVERWRITE) for r in regions]
    with snapshot_with(orig, regions) as s:
        s.fill_gaps()
        s.apply(s.diff(mem, dirty))
        got = s.read()
    expected = bytearray(orig)
    for p in np.flatnonzero(dirty):  # dirty pages take the new bytes, others keep the old
        lo, hi = p * PAGE_SIZE, min((p + 1) * PAGE_SIZE, len(orig))
        expected[lo:hi] = mem[lo:hi]
    extension = [d for d in reference.diff(orig, mem, dirty, []) if d.offset >= len(orig)]
    expected += extension[0].data if extension else b""
    assert got == bytes(expected)


@st.composite
def batches(draw, size: int = 256):
    diffs = []
    for _ in range(draw(st.integers(0, 8))):
        dtype, op = draw(st.sampled_from(PAIRS))
        k = dtype.itemsize
        n = draw(st.integers(0, 6))
        offset = draw(st.integers(0, (size - n * k) // k)) * k
        diffs.append(Diff(offset, draw(st.binary(min_size=n * k, max_size=n * k)), dtype, op))
    return diffs


@settings(deadline=None)
@given(st.binary(min_size=256, max_size=256), batches())
def test_apply_matches_the_reference(target, diffs):
    with Snapshot(target) as s:
        try:
            want = reference.apply(target, diffs)
        except MergeError:
            with pytest.raises(MergeError):
                s.apply(diffs)
            assert s.read() == target
            return
        s.apply(diffs)
        got = s.read()
    assert same_modulo_nan_payloads(got, want, float_ranges_of(diffs))


# ---- reductions from many threads ----------------------------------------------------


@pytest.mark.parametrize("dtype", NUMERIC, ids=lambda t: t.name)
@pytest.mark.parametrize("op", [MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.MAX, MergeOp.MIN])
def test_reductions_merged_from_many_threads(dtype, op):
    n, threads = 3000, 12  # spans several pages
    npdt = dtype.numpy
    rng = np.random.default_rng(int(dtype) * 10 + int(op))
    base = rng.integers(10, 50, n).astype(npdt)  # no wrap-around in MIN below
    snap = Snapshot(base, max_size=base.nbytes)
    snap.add_merge_region(0, 0, dtype, op)
    n_pages = -(-base.nbytes // PAGE_SIZE)
    updates = [rng.integers(0, 5, n).astype(npdt) * (rng.random(n) < 0.3) for _ in range(threads)]
    diffs: list[DiffBatch] = [None] * threads  # type: ignore[list-item]

    def thread(i: int) -> None:
        mine = base.copy()
        with np.errstate(all="ignore"):
            if op is MergeOp.SUM:
                mine += updates[i]
            elif op is MergeOp.SUBTRACT:
                mine -= updates[i]
            elif op is MergeOp.MAX:
                mine = np.maximum(mine, base + updates[i])
            else:
                mine = np.minimum(mine, base - updates[i])
        diffs[i] = snap.diff(mine, np.ones(n_pages, bool))

    workers = [threading.Thread(target=thread, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for batch in diffs:  # in thread order
        snap.queue(batch)
    snap.write_queued()
    got = np.frombuffer(snap.read(), npdt)
    with np.errstate(all="ignore"):
        if op is MergeOp.SUM:
            want = base + sum(updates)
        elif op is MergeOp.SUBTRACT:
            want = base - sum(updates)
        elif op is MergeOp.MAX:
            want = base + np.max(updates, axis=0)
        else:
            want = base - np.max(updates, axis=0)
    assert np.array_equal(got, want.astype(npdt))


def test_product_reduction_across_threads():
    base = np.full(100, 3, np.int64)
    snap = Snapshot(base)
    snap.add_merge_region(0, 0, np.int64, "product")
    for factor in (2, 5, -1):
        snap.queue(snap.diff(base * factor, np.ones(1, bool)))
    snap.write_queued()
    assert (np.frombuffer(snap.read(), np.int64) == 3 * 2 * 5 * -1).all()


def test_write_pages_copies_whole_dirty_pages():
    with Snapshot(bytes(3 * PAGE_SIZE + 100)) as s:
        mem = np.arange(3 * PAGE_SIZE + 100, dtype=np.uint64).astype(np.uint8)
        copied = s.write_pages(mem, np.array([True, False, True, True]))
        assert copied == 2 * PAGE_SIZE + 100
        got = np.frombuffer(s.read(), np.uint8)
        assert np.array_equal(got[:PAGE_SIZE], mem[:PAGE_SIZE])
        assert not got[PAGE_SIZE: 2 * PAGE_SIZE].any()
        assert np.array_equal(got[2 * PAGE_SIZE:], mem[2 * PAGE_SIZE:])
        assert [(d.offset, len(d.data)) for d in s.tracked_changes()] == [
            (0, PAGE_SIZE), (2 * PAGE_SIZE, PAGE_SIZE + 100)]
        with pytest.raises(ValueError, match="one flag per page"):
            s.write_pages(mem, np.ones(2, bool))


# ---- findings of issue 11 ---------------------------------------------------------


def test_apply_while_another_thread_changes_the_columns():
    """Snapshot.apply checks, then applies with the GIL released: a thread
    moving the last offset out of bounds in between must never make it
    write there (it crashed with SIGSEGV). Same for a reused receive buffer
    under a zero-copy wire.decode."""
    result = run_python("""
        import struct, sys, threading
        import numpy as np
        from pagefork import DiffBatch, OutOfBoundsError, Snapshot, wire
        sys.setswitchinterval(1e-4)  # apply releases the GIL: get it back without the 5 ms wait
        n = 2000
        snap = Snapshot(size=1 << 20)
        offsets = np.arange(n, dtype=np.int64) * 64
        batch = DiffBatch.from_columns(offsets, np.full(n, 64, np.int64), np.zeros(n, np.uint8),
                                       np.zeros(n, np.uint8), b"\\1" * (64 * n))
        buffer = bytearray(wire.encode(batch))
        received = wire.decode(buffer)
        last = 24 + 8 * (n - 1)
        far, near = struct.pack("<q", 1 << 44), struct.pack("<q", (n - 1) * 64)
        stop = False
        def mutate():
            while not stop:
                offsets[-1] = 1 << 44
                buffer[last:last + 8] = far
                offsets[-1] = (n - 1) * 64
                buffer[last:last + 8] = near
        thread = threading.Thread(target=mutate)
        thread.start()
        applied = refused = 0
        try:
            for i in range(3000):
                try:
                    snap.apply(batch if i % 2 else received)
                    applied += 1
                except OutOfBoundsError:
                    refused += 1
        finally:
            stop = True
            thread.join()
        assert snap.size == 1 << 20 and snap.read(0, 64 * n) == b"\\1" * (64 * n)
        assert snap.read(64 * n) == bytes((1 << 20) - 64 * n)
        print(applied, refused)
    """)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    applied, refused = map(int, result.stdout.split())
    assert applied + refused == 3000 and applied > 0


def test_close_while_other_threads_diff_and_apply():
    """close() from another thread waits for a running diff/apply/map_to;
    later calls raise PageforkError. Never a crash (subprocess, loop)."""
    result = run_python("""
        import threading
        import numpy as np
        from pagefork import PAGE_SIZE, Diff, PageforkError, Region, Snapshot
        for round in range(200):
            snap = Snapshot(size=64 * PAGE_SIZE)
            mem = np.ones(64 * PAGE_SIZE, np.uint8)
            region = Region(64 * PAGE_SIZE)
            errors = []
            def work(kind):
                try:
                    for _ in range(20):
                        if kind == 0:
                            snap.diff(mem, np.ones(64, bool))
                        elif kind == 1:
                            snap.apply([Diff(0, bytes(PAGE_SIZE * 8))])
                        elif kind == 2:
                            snap.map_to(region)
                        else:
                            snap.read(0, PAGE_SIZE)
                except PageforkError:
                    pass
                except BaseException as exc:
                    errors.append(exc)
            threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            snap.close()
            for t in threads:
                t.join()
            assert not errors, errors
            region.close()
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_writes_from_two_threads():
    with Snapshot(size=0, max_size=1 << 20) as snap:
        def writer(byte: int) -> None:
            for i in range(200):
                snap.write(bytes([byte]) * 100, (2 * i + byte) * 100)
        threads = [threading.Thread(target=writer, args=(b,)) for b in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert snap.size == 400 * 100
        assert snap.read() == b"".join(bytes([i % 2]) * 100 for i in range(400))
        assert [(d.offset, len(d.data)) for d in snap.tracked_changes()] == [(0, 400 * 100)]


@pytest.mark.parametrize("content", [b"hello world", bytes(PAGE_SIZE + 1), b"x" * (3 * PAGE_SIZE - 5)])
def test_snapshot_of_partial_pages_round_trips(content):
    """A region mapped from a snapshot whose size is not whole pages diffs
    nothing past the snapshot's size unless bytes there changed."""
    with Snapshot(content) as snap, Region(len(content)) as region:
        snap.map_to(region)
        dirty = np.ones(region.n_pages, bool)
        assert snap.diff(region, dirty) == []
        region.array(np.uint8)[0] ^= 1
        batch = snap.diff(region, dirty)
        assert batch == [Diff(0, bytes([content[0] ^ 1]))]
        snap.apply(batch)
        assert snap.read() == bytes([content[0] ^ 1]) + content[1:] and snap.size == len(content)
        # A nonzero byte past the end is a real change: it needs room to grow.
        region.array(np.uint8)[len(content) + 2] = 7
        batch = snap.diff(region, dirty)
        assert batch[-1] == Diff(len(content), b"\0\0\7")
        with pytest.raises(OutOfBoundsError):
            snap.apply(batch)
        assert snap.size == len(content)
        # ...unless its page is not dirty.
        dirty[-1] = False
        assert all(d.offset < len(content) for d in snap.diff(region, dirty))


def test_partial_page_snapshot_grows_by_the_changed_tail():
    with Snapshot(b"hello world", max_size=PAGE_SIZE) as snap, Region(11) as region:
        snap.map_to(region)
        region.array(np.uint8)[20:23] = [1, 2, 3]
        snap.apply(snap.diff(region, np.ones(1, bool)))
        assert snap.size == 23 and snap.read() == b"hello world" + bytes(9) + b"\1\2\3"


@pytest.mark.parametrize("dtype", [DataType.INT16, DataType.INT32, DataType.INT64, DataType.FLOAT64])
def test_typed_region_tail_is_carried_as_overwrite(dtype):
    """A typed region running to the end of a snapshot whose size is not a
    whole number of values: the leftover bytes merge as OVERWRITE."""
    k = dtype.itemsize
    size = 3 * k + k - 1
    orig = bytes(range(size))
    with Snapshot(orig) as snap:
        snap.add_merge_region(0, 0, dtype, MergeOp.MAX)
        mem = bytearray(orig)
        mem[-1] ^= 0xFF
        batch = snap.diff(bytes(mem), np.ones(1, bool))
        assert batch == [Diff(size - 1, bytes([orig[-1] ^ 0xFF]))]
        snap.apply(batch)
        assert snap.read() == bytes(mem)
    # The same for an explicit region cut short by the snapshot's end.
    with Snapshot(orig, max_size=64) as snap:
        snap.add_merge_region(k, 4 * k, dtype, "sum")
        assert snap.diff(bytes(mem), np.ones(1, bool)) == [Diff(size - 1, bytes([orig[-1] ^ 0xFF]))]


@pytest.mark.parametrize("kind", ["anon-private", "anon-shared", "memfd-private", "memfd-shared"])
def test_regrown_pages_read_zero_after_map_to(kind):
    from support import KINDS

    with Snapshot(b"\xab" * 4 * PAGE_SIZE) as snap, \
            Region(4 * PAGE_SIZE, max_size=4 * PAGE_SIZE, **KINDS[kind]) as region:
        snap.map_to(region)
        region.resize(PAGE_SIZE)
        region.resize(4 * PAGE_SIZE)
        got = region.array(np.uint8)
        assert (got[:PAGE_SIZE] == 0xAB).all() and not got[PAGE_SIZE:].any()
        del got
        snap.map_to(region)  # and mapping again after a regrowth still works
        assert bytes(memoryview(region)) == b"\xab" * 4 * PAGE_SIZE


def test_sizes_and_offsets_accept_any_integer():
    i = np.int64
    with Region(i(PAGE_SIZE), max_size=np.uint32(2 * PAGE_SIZE)) as region:
        region.resize(i(2 * PAGE_SIZE))
        assert region.size == 2 * PAGE_SIZE
        assert region.array(np.int64, i(10), offset=i(8)).shape == (10,)
        assert region.array(np.int64, (i(2), np.uint8(3))).shape == (2, 3)
        with pytest.raises(ValueError, match="negative"):
            region.array(np.int64, (-1,))
        with pytest.raises(OutOfBoundsError):
            region.array(np.int64, (2**40, 2**40))  # overflows int64 as a product
        with pytest.raises(TypeError):
            region.array(np.int64, 1.5)  # type: ignore[arg-type]
    with Snapshot(size=i(100), max_size=i(200)) as snap:
        snap.write(b"ab", i(10))
        assert snap.read(i(10), np.uint8(2)) == b"ab"
        region = snap.add_merge_region(i(16), np.int32(8), "int64", "sum")
        assert type(region.offset) is int and region == MergeRegion(16, 8, DataType.INT64, MergeOp.SUM)
        snap.apply([Diff(i(0), b"z")])
        assert snap.read(0, 1) == b"z"
    d = Diff(np.uint64(5), b"x")
    assert type(d.offset) is int and DiffBatch([d])[np.int64(0)] == d


@pytest.mark.parametrize("bad", [1.0, 1.5, "8", None, True])
def test_offsets_must_be_integers(bad):
    with pytest.raises(TypeError):
        MergeRegion(bad, 8)
    with pytest.raises(TypeError):
        Diff(bad, b"x")
    with Snapshot(size=16) as snap:
        with pytest.raises(TypeError):
            snap.add_merge_region(bad, 8)
        with pytest.raises(TypeError):
            snap.read(bad, 1)
        with pytest.raises(TypeError):
            snap.write(b"x", bad)


def test_diff_values_are_checked_when_made():
    with pytest.raises(ValueError, match=">= 0"):
        Diff(-1, b"a")
    with pytest.raises(ValueError, match="64 bits"):
        Diff(2**63 - 1, b"ab")
    with pytest.raises(ValueError, match="64 bits"):
        Diff(2**64, b"")
    with pytest.raises(TypeError):
        Diff(0, 5)  # type: ignore[arg-type]  # bytes(5) would be five zeros
    assert Diff(0, np.arange(3, dtype=np.uint8)).data == b"\0\1\2"
    assert Diff(0, bytearray(b"ab"), "int8", "sum") == Diff(0, b"ab", DataType.INT8, MergeOp.SUM)
    with pytest.raises(ValueError, match="numeric"):
        Diff(0, b"ab", "raw", "sum")
    with pytest.raises(ValueError, match="unknown DataType 'int3'"):
        Diff(0, b"ab", "int3")
    with pytest.raises(ValueError, match="unknown merge op"):
        Diff(0, b"ab", "int8", "add")
    with pytest.raises(TypeError):
        DataType.of(None)  # np.dtype(None) is float64


def test_from_columns_checks_every_column():
    z = np.zeros(1, np.uint8)
    with pytest.raises(ValueError, match="differ in length"):
        DiffBatch.from_columns([0, 1], [1], z, z, b"a")
    with pytest.raises(ValueError, match="do not fit"):
        DiffBatch.from_columns([2**64 - 1], [1], z, z, b"a")
    with pytest.raises(ValueError, match="integers"):
        DiffBatch.from_columns([0.5], [1], z, z, b"a")
    with pytest.raises(ValueError, match="unknown dtype/op"):
        DiffBatch.from_columns([0], [1], [12], z, b"a")
    with pytest.raises(ValueError, match="add up"):
        DiffBatch.from_columns([0], [1], z, z, b"ab")
    with pytest.raises(ValueError, match="no diffs"):
        DiffBatch.from_columns([], [], [], [], b"ab")


def test_apply_refuses_malformed_and_out_of_bounds_batches():
    def columns(offsets, lengths, dtypes=None, ops=None, data=None):
        n = len(offsets)
        return DiffBatch.unchecked(np.array(offsets, np.int64), np.array(lengths, np.int64),
                                    np.array(dtypes or [0] * n, np.uint8),
                                    np.array(ops or [0] * n, np.uint8),
                                    data if data is not None else bytes(sum(lengths)))

    with Snapshot(bytes(16), max_size=32) as snap:
        for batch, error in [
            (columns([-1], [1]), OutOfBoundsError),
            (columns([2**63 - 1], [1]), OutOfBoundsError),
            (columns([30], [4]), OutOfBoundsError),            # growth past max_size
            (columns([0], [3], [DataType.INT64], [MergeOp.SUM]), MergeError),
            (columns([0], [1], [0], [9]), MergeError),
            (columns([0], [1], data=b"ab"), MergeError),
            (columns([], [], data=b"ab"), MergeError),
        ]:
            with pytest.raises(error) as info:
                snap.apply(batch)
            assert type(info.value) is error
            assert snap.read() == bytes(16) and snap.size == 16
        with pytest.raises(OutOfBoundsError):
            snap.apply([Diff(0, b"ok"), Diff(31, b"xy")])
        assert snap.read() == bytes(16)


def test_read_bounds():
    with Snapshot(b"0123456789") as snap:
        assert snap.read(10) == b"" and snap.read(3, 0) == b""
        for offset, length in [(2**63, 2**63), (0, 2**64), (5, 6), (11, None), (-1, 1), (2, -1)]:
            with pytest.raises(OutOfBoundsError):
                snap.read(offset, length)


def test_merge_regions_stay_within_max_size():
    with Snapshot(size=64, max_size=128) as snap:
        snap.add_merge_region(120, 8)
        snap.add_merge_region(128, 0)  # an empty region at the very end
        for offset, length in [(121, 8), (129, 0), (2**62, 8)]:
            with pytest.raises(OutOfBoundsError):
                snap.add_merge_region(offset, length)
        with pytest.raises(ValueError, match="64 bits"):
            MergeRegion(2**63 - 4, 8)


def test_map_to_needs_a_region():
    with Snapshot(size=PAGE_SIZE) as snap:
        for bad in (bytearray(PAGE_SIZE), memoryview(bytearray(PAGE_SIZE)), np.zeros(PAGE_SIZE, np.uint8)):
            with pytest.raises(TypeError, match="needs a pagefork Region"):
                snap.map_to(bad)  # type: ignore[arg-type]


def test_attach_checks_its_file_and_never_resizes_it(tmp_path):
    with pytest.raises(ValueError, match="open file descriptor"):
        Snapshot.attach(-1, 10)
    with pytest.raises(ValueError, match="cannot attach fd"):
        Snapshot.attach(987654, 10)
    path = tmp_path / "data"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OutOfBoundsError, match="holds 10000 bytes"):
            Snapshot.attach(fd, 20000)
        with pytest.raises(OutOfBoundsError, match="holds 10000 bytes"):
            Snapshot.attach(fd, 10000)  # would map 3 whole pages
        assert os.fstat(fd).st_size == 10000
        with Snapshot.attach(fd, 100, max_size=PAGE_SIZE * 4) as snap:
            assert snap.read() == b"x" * 100
            snap.write(b"y", 200)  # within the file's pages: fine
            with pytest.raises(OutOfBoundsError, match="attached"):
                snap.write(b"z", 3 * PAGE_SIZE)  # would grow another's file
        assert os.fstat(fd).st_size == 10000 and path.read_bytes()[200:201] == b"y"
    finally:
        os.close(fd)
    # A snapshot's own memfd, attached elsewhere, follows its owner's growth.
    with Snapshot(b"abc", max_size=8 * PAGE_SIZE) as owner:
        with Snapshot.attach(owner.fd, owner.size, owner.max_size) as other:
            owner.write(b"z", 2 * PAGE_SIZE)
            other.follow_size(owner.size)
            assert other.read(2 * PAGE_SIZE, 1) == b"z"


def test_failed_reservation_names_max_size():
    with pytest.raises(PageforkError, match=f"cannot reserve {1 << 60} bytes \\(max_size\\)"):
        Region(PAGE_SIZE, max_size=1 << 60)
    with pytest.raises(OutOfBoundsError, match="address space"):
        Region(PAGE_SIZE, max_size=1 << 64)


def test_unknown_tracking_mode_from_the_environment_names_the_variable():
    result = subprocess.run([sys.executable, "-c", "import pagefork; pagefork.tracker()"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PAGEFORK_TRACKING": "garbage"})
    assert result.returncode != 0 and "PAGEFORK_TRACKING" in result.stderr
    with pytest.raises(ValueError) as info:
        pagefork.tracker("garbage2")
    assert "PAGEFORK_TRACKING" not in str(info.value)


def test_nobody_can_shrink_a_snapshot_file_under_its_mappings():
    """A worker holding the memfd (or anyone it leaks to) truncating it would
    make the owner's next read a SIGBUS: the file is sealed against shrinking."""
    with Snapshot(b"x" * (3 * PAGE_SIZE), max_size=8 * PAGE_SIZE) as snap:
        with pytest.raises(PermissionError):
            os.ftruncate(snap.fd, 0)
        os.ftruncate(snap.fd, 4 * PAGE_SIZE)  # growing stays possible
        with Snapshot.attach(snap.fd, snap.size, snap.max_size) as other:
            other.write(b"y", 3 * PAGE_SIZE + 1)
            snap.follow_size(other.size)
            assert snap.read(3 * PAGE_SIZE, 2) == b"\0y"
        assert snap.read(0, 3 * PAGE_SIZE) == b"x" * (3 * PAGE_SIZE)


def test_a_child_forked_while_a_thread_holds_the_lock_can_use_the_snapshot():
    result = run_python("""
        import os, threading
        from pagefork import Snapshot
        snap = Snapshot(b"abc", max_size=100)
        held, release = threading.Event(), threading.Event()
        def hold():
            with snap._lock:
                held.set()
                release.wait()
        t = threading.Thread(target=hold)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            snap.write(b"d", 3)  # would block forever on the inherited lock
            os._exit(0 if snap.read() == b"abcd" else 1)
        release.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert result.returncode == 0 and result.stdout.split() == ["0"], result.stderr[-2000:]


class _Interrupting:
    """Stands in for the native module: a KeyboardInterrupt arrives as the
    check before growing returns, or as the writing call returns."""

    def __init__(self, native, after: bool) -> None:
        self.native, self.after = native, after

    def __getattr__(self, name):
        return getattr(self.native, name)

    def apply(self, *args):
        self.native.apply(*args)
        check_only = len(args) > 6 and args[6]
        if check_only != self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("after", [False, True], ids=["before-growing", "after-writing"])
def test_interrupted_apply_is_all_or_nothing(monkeypatch, after):
    """Ctrl-C around the write leaves the snapshot as before (size included)
    or fully applied and tracked; queued diffs never apply twice or vanish."""
    import pagefork.snapshot as module

    sums = [Diff(0, np.int64(5).tobytes(), DataType.INT64, MergeOp.SUM), Diff(20, b"grow")]
    with Snapshot(np.int64(1).tobytes() + bytes(8), max_size=64) as snap:
        snap.queue(sums)
        monkeypatch.setattr(module, "_native", _Interrupting(module._native, after))
        with pytest.raises(KeyboardInterrupt):
            snap.write_queued()
        monkeypatch.undo()
        if after:
            assert snap.size == 24 and snap.read(0, 8) == np.int64(6).tobytes()
            assert snap.queued == 0
            assert [(d.offset, len(d.data)) for d in snap.tracked_changes()] == [(0, 8), (20, 4)]
        else:
            assert snap.size == 16 and snap.read() == np.int64(1).tobytes() + bytes(8)
            assert snap.queued == 2 and snap.tracked_changes() == []
        assert snap.write_queued() == (0 if after else 2)
        assert snap.read(0, 8) == np.int64(6).tobytes()  # applied exactly once
        assert snap.read(8) == bytes(12) + b"grow" and snap.size == 24
