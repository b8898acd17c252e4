"""Snapshots at their edges: extreme values of every typed operation,
overlapping and growing batches, memory of other sizes, odd buffers and
size strings, lifetimes and many threads, each checked against the
reference model or exact bytes."""

from __future__ import annotations

import numpy as np
import pytest

from pagefork import DataType, Diff, MergeOp, PAGE_SIZE, Snapshot

from support import run_python


def test_write_keeps_its_errors():
    with Snapshot(size=8, max_size=16) as snap:
        with pytest.raises(IndexError):
            snap.write(b"x" * 9, 8)
        with pytest.raises(IndexError):
            snap.write(b"", 17)
        snap.write(b"", 12)  # an empty write may still grow, as before
        assert snap.size == 12
        snap.write(snap.view()[:4], 2)  # the data may alias the snapshot
        assert snap.read() == bytes(12)


def test_from_columns_takes_the_bytes_of_any_buffer():
    """Before: the data's length was counted in items (1 for one int64), so
    indexing returned 8 bytes for a 1-byte diff, encode wrote a message
    decode refused, and a correct 8-byte diff was refused."""
    from pagefork import DiffBatch, wire

    values = np.array([0x0102030405060708], np.int64)
    batch = DiffBatch.from_columns([0], [8], [0], [0], values)
    assert batch.nbytes == 8 and batch[0] == Diff(0, values.tobytes())
    assert wire.decode(wire.encode(batch)) == batch
    with pytest.raises(ValueError, match="do not add up"):
        DiffBatch.from_columns([0], [1], [0], [0], values)
    strided = np.arange(8, dtype=np.uint8)[::2]  # copied: the kernels need contiguous bytes
    batch = DiffBatch.from_columns([0], [4], [0], [0], strided)
    assert wire.decode(wire.encode(batch)) == [Diff(0, bytes([0, 2, 4, 6]))]
    with Snapshot(size=8) as snap:
        snap.apply(batch)
        assert snap.read(0, 4) == bytes([0, 2, 4, 6])


def test_any_truthy_page_flag_is_dirty():
    """Before: a bool array holding bytes other than 0/1 (np.frombuffer of a
    0/0xFF bitmap) read as clean, and a strided one was a ValueError."""
    memory = bytearray(2 * PAGE_SIZE)
    memory[3] = memory[PAGE_SIZE + 5] = 9
    with Snapshot(size=2 * PAGE_SIZE) as snap:
        for flags in (np.frombuffer(b"\xff\x02", np.bool_),
                      np.ones(4, np.bool_)[::2], [1, 2], np.array([0.5, -1.0])):
            assert [(d.offset, d.data) for d in snap.diff(memory, flags)] == \
                [(3, b"\t"), (PAGE_SIZE + 5, b"\t")]
        assert snap.write_pages(memory, np.frombuffer(b"\x00\x02", np.bool_)) == PAGE_SIZE
        assert snap.read(PAGE_SIZE + 5, 1) == b"\t" and snap.read(3, 1) == b"\0"


def test_size_strings_are_exact_and_never_overflow():
    """Before: sizes went through float: "9007199254740993" lost its last
    digit and 400 nines raised OverflowError."""
    from pagefork import OutOfBoundsError
    from pagefork._sizes import parse_size

    assert parse_size("9007199254740993") == 9007199254740993
    assert parse_size("1.5 GB") == 1_500_000_000 and parse_size("0.5KiB") == 512
    with pytest.raises(OutOfBoundsError):
        Snapshot(size="9" * 400)


def _special_values(dtype: DataType) -> list:
    np_type = dtype.numpy
    if dtype in (DataType.FLOAT32, DataType.FLOAT64):
        info = np.finfo(np_type)
        return [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, info.max, info.min, info.tiny,
                info.smallest_subnormal, 3.0, 0.1]
    if dtype is DataType.BOOL:
        return [0, 1]
    info = np.iinfo(np_type)
    return sorted({0, 1, 2, 3, info.max, info.min, info.max - 1, info.min + 1,
                   -1 % (info.max + 1) if info.min == 0 else -1, -2 if info.min else 2})


_TYPED = [(t, o) for t in DataType if t is not DataType.RAW and t.name == DataType(t).name
          for o in (MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.PRODUCT, MergeOp.MAX, MergeOp.MIN)
          if not (t is DataType.BOOL and o in (MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.PRODUCT))]


@pytest.mark.parametrize("dtype,op", _TYPED, ids=[f"{t.name}-{o.name}" for t, o in _TYPED])
def test_every_typed_op_on_extreme_values_matches_the_reference(dtype, op):
    """Every pair of extreme values (NaN, inf, -0.0, MIN, MAX, -1, 0) as
    original and update, one pair per element: diff and apply agree with
    the pure-Python model, and PRODUCT refuses exactly where it does."""
    import itertools

    import reference
    from pagefork import MergeError, MergeRegion

    values = np.array(_special_values(dtype), dtype.numpy)
    pairs = np.array(list(itertools.product(range(len(values)), repeat=2)))
    orig, mem = values[pairs[:, 0]], values[pairs[:, 1]]
    if op is MergeOp.PRODUCT:  # one refusal is enough: test the rest without it
        bad = (orig == 0) | (~np.isnan(orig) & (orig != mem) & _not_whole(dtype, orig, mem))
        orig, mem = orig[~bad], mem[~bad]
    regions = [MergeRegion(0, 0, dtype, op)]
    orig_b, mem_b = orig.tobytes(), mem.tobytes()
    dirty = np.ones(-(-len(mem_b) // PAGE_SIZE), bool)
    expected = reference.diff(orig_b, mem_b, dirty, regions)
    with Snapshot(orig_b) as snap:
        snap.add_merge_region(0, 0, dtype, op)
        got = snap.diff(mem_b, dirty)
        assert [(d.offset, d.dtype, d.op) for d in got] == \
            [(d.offset, d.dtype, d.op) for d in expected]
        for g, w in zip(got, expected):
            _same_values(dtype, g.data, w.data)
        want = reference.apply(orig_b, expected)
        snap.apply(got)
        _same_values(dtype, snap.read(), want)
        if op is MergeOp.PRODUCT:
            zero = np.zeros(1, dtype.numpy).tobytes()
            with pytest.raises(MergeError, match="offset 0"):
                Snapshot(zero).diff(np.ones(1, dtype.numpy).tobytes(), [True],
                                    regions=regions)


def _not_whole(dtype: DataType, orig: np.ndarray, mem: np.ndarray) -> np.ndarray:
    if dtype in (DataType.FLOAT32, DataType.FLOAT64):
        return np.zeros(len(orig), bool)
    o = [int(x) for x in orig]
    m = [int(x) for x in mem]
    return np.array([x != 0 and y % x != 0 for x, y in zip(o, m)])


def _same_values(dtype: DataType, got: bytes, want: bytes) -> None:
    a, b = np.frombuffer(got, dtype.numpy), np.frombuffer(want, dtype.numpy)
    if dtype in (DataType.FLOAT32, DataType.FLOAT64):
        both_nan = np.isnan(a) & np.isnan(b)
        assert np.array_equal(a[~both_nan].view(np.uint8 if a.itemsize == 1 else f"u{a.itemsize}"),
                              b[~both_nan].view(f"u{a.itemsize}")), (a, b)
    else:
        assert got == want


def test_attach_refuses_what_is_not_a_snapshot_file():
    """Before: a pipe, socket or folder attached as an empty snapshot, and a
    descriptor number past C int raised OverflowError."""
    import os
    import socket

    read_end, write_end = os.pipe()
    folder = os.open("/", os.O_RDONLY)
    sock = socket.socket()
    try:
        for fd in (read_end, folder, sock.fileno()):
            with pytest.raises(ValueError, match="not a snapshot's file"):
                Snapshot.attach(fd, 0)
        with pytest.raises(ValueError, match="not a file descriptor"):
            Snapshot.attach(1 << 40, 0)
        with Snapshot(b"abc") as owner, Snapshot.attach(owner.fd, 3) as attached:
            assert attached.read() == b"abc"
    finally:
        for fd in (read_end, write_end, folder):
            os.close(fd)
        sock.close()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SIZE, _MAX = PAGE_SIZE + 100, 3 * PAGE_SIZE
_ranges_st = st.tuples(st.integers(0, _MAX), st.integers(0, 300))


@st.composite
def _operations(draw):
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["write", "apply", "pages", "clear", "ignore"]))
        if kind in ("write", "apply", "ignore"):
            diffs = []
            for _ in range(draw(st.integers(1, 3) if kind != "write" else st.just(1))):
                offset, n = draw(_ranges_st)
                data = draw(st.binary(min_size=n, max_size=n))
                diffs.append((offset, data, draw(st.sampled_from([MergeOp.OVERWRITE, MergeOp.XOR]))
                              if kind == "apply" else
                              MergeOp.IGNORE if kind == "ignore" else MergeOp.OVERWRITE))
            ops.append((kind, diffs))
        elif kind == "pages":
            n = draw(st.integers(0, 3 * PAGE_SIZE))
            seed = draw(st.integers(0, 2**32 - 1))
            flags = draw(st.lists(st.booleans(), min_size=-(-n // PAGE_SIZE),
                                  max_size=-(-n // PAGE_SIZE)))
            ops.append((kind, (n, seed, flags)))
        else:
            ops.append((kind, None))
    return ops


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(_operations())
def test_interleaved_writes_applies_and_page_copies_track_every_byte(operations):
    """The snapshot's bytes and tracked_changes after any mix of write,
    apply (OVERWRITE/XOR/IGNORE, growing or refused), write_pages and
    clear_tracked_changes equal a byte model's: each tracked diff is a
    maximal run of touched bytes holding their current values."""
    from pagefork import OutOfBoundsError

    model, touched = bytearray(_SIZE), np.zeros(_MAX, bool)
    with Snapshot(size=_SIZE, max_size=_MAX) as snap:
        for kind, arg in operations:
            if kind == "clear":
                snap.clear_tracked_changes()
                touched[:] = False
            elif kind == "pages":
                n, seed, flags = arg
                memory = np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()
                snap.write_pages(memory, flags)
                for p in np.flatnonzero(flags):
                    lo, hi = p * PAGE_SIZE, min((p + 1) * PAGE_SIZE, n, len(model))
                    model[lo:hi] = memory[lo:hi]
                    touched[lo:hi] = hi > lo
            else:
                diffs = [Diff(o, d, DataType.RAW, op) for o, d, op in arg]
                end = max(o + len(d) for o, d, _ in arg)
                if end > _MAX:
                    with pytest.raises(OutOfBoundsError):
                        snap.write(arg[0][1], arg[0][0]) if kind == "write" else snap.apply(diffs)
                    continue
                snap.write(arg[0][1], arg[0][0]) if kind == "write" else snap.apply(diffs)
                model.extend(bytes(max(0, end - len(model))))
                for o, d, op in arg:
                    if op is MergeOp.OVERWRITE:
                        model[o:o + len(d)] = d
                    elif op is MergeOp.XOR:
                        model[o:o + len(d)] = bytes(a ^ b for a, b in zip(model[o:o + len(d)], d))
                    if op is not MergeOp.IGNORE:
                        touched[o:o + len(d)] = True
            assert snap.read() == bytes(model)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], touched.view(np.int8), [0]))))
        runs = list(zip(edges[::2], edges[1::2]))
        assert [(d.offset, d.data) for d in snap.tracked_changes()] == \
            [(int(a), bytes(model[a:b])) for a, b in runs]


@st.composite
def _growing_batches(draw):
    diffs = []
    for _ in range(draw(st.integers(1, 6))):
        dtype, op = draw(st.sampled_from(
            [(DataType.RAW, MergeOp.OVERWRITE), (DataType.RAW, MergeOp.XOR),
             (DataType.RAW, MergeOp.IGNORE)] + _TYPED))
        k = dtype.itemsize
        n = draw(st.integers(0, 4)) * k
        offset = draw(st.integers(0, 300))
        values = draw(st.sampled_from(["random", "special"]))
        if values == "special" and dtype is not DataType.RAW and n:
            pool = np.array(_special_values(dtype), dtype.numpy)
            data = pool[draw(st.lists(st.integers(0, len(pool) - 1), min_size=n // k,
                                      max_size=n // k))].tobytes()
        else:
            data = draw(st.binary(min_size=n, max_size=n))
        diffs.append(Diff(offset, data, dtype, op))
    return diffs


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.binary(min_size=100, max_size=100), _growing_batches())
def test_apply_of_overlapping_unsorted_growing_batches_matches_the_reference(target, diffs):
    """Diffs at any offsets, unaligned, overlapping, out of order, reaching
    into the growth area (or past max_size): applied like the reference, or
    refused with nothing changed (size included)."""
    import reference

    from pagefork import MergeError, OutOfBoundsError

    with Snapshot(target, max_size=256) as snap:
        end = max(d.offset + len(d.data) for d in diffs)
        if end > 256:
            with pytest.raises(OutOfBoundsError):
                snap.apply(diffs)
            assert snap.read() == target and snap.size == 100
            return
        try:
            want = reference.apply(target, diffs)
        except MergeError:
            with pytest.raises(MergeError):
                snap.apply(diffs)
            assert snap.read() == target and snap.size == 100
            return
        snap.apply(diffs)
        got = snap.read()
    assert len(got) == len(want)
    spans = [(d.offset, d.offset + len(d.data), d.dtype) for d in diffs
             if d.dtype in (DataType.FLOAT32, DataType.FLOAT64)]
    a, b = bytearray(got), bytearray(want)
    for lo, hi, dtype in spans:  # NaN payloads may differ between numpy and C
        x = np.frombuffer(a, np.uint8)[lo:hi]
        y = np.frombuffer(b, np.uint8)[lo:hi]
        k = dtype.itemsize
        for i in range(0, len(x) - len(x) % k, k):
            if np.isnan(x[i:i + k].view(dtype.numpy))[0] and np.isnan(y[i:i + k].view(dtype.numpy))[0]:
                a[lo + i:lo + i + k] = b[lo + i:lo + i + k]
    assert bytes(a) == bytes(b)


def test_tracked_changes_after_only_ignored_diffs():
    """Before: an apply of IGNORE diffs only recorded an empty range list,
    and tracked_changes then raised numpy's IndexError."""
    with Snapshot(size=16) as snap:
        snap.apply([Diff(4, b"abcd", op="ignore")])
        assert snap.tracked_changes() == [] and snap.read() == bytes(16)
        snap.write(b"xy", 3)
        assert snap.tracked_changes() == [Diff(3, b"xy")]


def test_tracked_changes_memory_stays_near_its_output_size():
    """Before: one int64 index per byte gathered: 64 MiB of tracked writes
    peaked at about 1 GiB more. Measured in a fresh process."""
    import textwrap

    script = textwrap.dedent("""
        import resource
        from pagefork import Snapshot
        snap = Snapshot(size=64 << 20)
        snap.write(bytes(range(256)) * (1 << 18))
        snap.write_pages(bytes(8 << 20), [i % 2 == 0 for i in range((8 << 20) // 4096)])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        changes = snap.tracked_changes()
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10
        assert len(changes) == 1 and changes[0].data == snap.read()
        print(grown)
    """)
    out = run_python(script)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 3 * 64, f"tracked_changes of 64 MiB peaked {out.stdout.strip()} MiB more"


@st.composite
def _mismatched_layouts(draw):
    size = draw(st.integers(1, 3 * PAGE_SIZE))
    mem_size = draw(st.sampled_from([0, 1, size - 1, size, size + 1, size + 7,
                                     -(-size // PAGE_SIZE) * PAGE_SIZE,
                                     -(-size // PAGE_SIZE) * PAGE_SIZE + 3, 4 * PAGE_SIZE]))
    mem_size = max(0, mem_size)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    orig = rng.integers(0, 256, size, np.uint8)
    mem = np.resize(orig, mem_size).copy() if size else np.zeros(mem_size, np.uint8)
    mem[:min(size, mem_size)] = orig[:mem_size]
    for _ in range(draw(st.integers(0, 30))):
        if mem_size:
            mem[int(rng.integers(0, mem_size))] = rng.integers(0, 256)
    from pagefork import MergeRegion

    regions, at = [], 0
    for _ in range(draw(st.integers(0, 3))):
        dtype, op = draw(st.sampled_from([(DataType.RAW, MergeOp.OVERWRITE),
                                          (DataType.RAW, MergeOp.XOR),
                                          (DataType.RAW, MergeOp.IGNORE)] +
                                         [p for p in _TYPED if p[1] is not MergeOp.PRODUCT]))
        offset = at + draw(st.integers(0, 2 * PAGE_SIZE))
        to_end = draw(st.booleans())
        length = 0 if to_end else draw(st.integers(1, 600)) * dtype.itemsize
        regions.append(MergeRegion(offset, length, dtype, op))
        if to_end:
            break
        at = offset + length
    n_pages = -(-mem_size // PAGE_SIZE)
    dirty = np.array(draw(st.lists(st.booleans(), min_size=n_pages, max_size=n_pages)), bool)
    return orig.tobytes(), mem.tobytes(), dirty, regions


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(_mismatched_layouts())
def test_diff_of_memory_smaller_or_larger_than_the_snapshot_matches_the_reference(layout):
    """Memory shorter, longer, ending mid-value or mid-page, regions past
    either end, typed regions running to the end: the reference's diff."""
    import reference

    orig, mem, dirty, regions = layout
    expected = reference.diff(orig, mem, dirty, regions)
    with Snapshot(orig, max_size=8 * PAGE_SIZE) as snap:
        got = snap.diff(mem, dirty, regions=regions)
        assert [(d.offset, d.dtype, d.op) for d in got] == \
            [(d.offset, d.dtype, d.op) for d in expected]
        for g, w in zip(got, expected):
            if g.dtype in (DataType.FLOAT32, DataType.FLOAT64):
                _same_values(g.dtype, g.data, w.data)
            else:
                assert g.data == w.data


def test_tracked_changes_survive_a_record_past_the_size():
    """What a second Ctrl-C inside apply's undo can leave behind (the size
    restored, the record not yet dropped): tracked_changes still works."""
    with Snapshot(b"abcdefgh", max_size=64) as snap:
        snap._changes.append((np.array([4, 30], np.int64), np.array([20, 5], np.int64)))
        assert snap.tracked_changes() == [Diff(4, b"efgh")]


def test_strided_buffers_are_taken_like_numpy_takes_them():
    """Before: a strided numpy slice was refused (TypeError from memoryview,
    or CorruptDataError for a perfectly good message) by Snapshot(),
    write, diff, write_pages, wire.decode and delta."""
    from pagefork import delta, wire

    data = np.arange(64, dtype=np.uint8)
    strided = data[::2]
    with Snapshot(strided) as snap:
        assert snap.read() == strided.tobytes()
        snap.write(data[1::2][:4], 0)
        assert snap.read(0, 4) == bytes([1, 3, 5, 7])
        assert snap.diff(strided, [True]) == [Diff(0, bytes([0, 2, 4, 6]))]
        assert snap.write_pages(strided, [True]) == 32 and snap.read() == strided.tobytes()
    message = np.frombuffer(wire.encode([Diff(5, b"abc")]), np.uint8)
    doubled = np.repeat(message, 2)[::2]
    assert wire.decode(doubled) == [Diff(5, b"abc")]
    old, new = np.zeros(200, np.uint8)[::2], np.arange(100, dtype=np.uint8)
    encoded = np.repeat(np.frombuffer(delta.encode(old, new[::1]), np.uint8), 2)[::2]
    assert delta.apply(encoded, old) == new.tobytes()
    assert delta.apply(delta.encode(old, new[::-1]), old) == new[::-1].tobytes()


_FREED_WHILE_MAPPED = r"""
import gc, sys, threading
import numpy as np
from pagefork import PAGE_SIZE, Diff, PageforkError, Region, Snapshot, wire

snap = Snapshot(b"x" * 5000, max_size=4 * PAGE_SIZE)
region = Region(2 * PAGE_SIZE, max_size=4 * PAGE_SIZE)
view = region.array()
snap.map_to(region)
del snap
gc.collect()
assert bytes(view[4998:5002]) == b"xx\0\0"  # the mapping outlives the snapshot
view[0] = 7
del view
region.resize(PAGE_SIZE)
region.resize(3 * PAGE_SIZE)
assert not np.frombuffer(region, np.uint8)[PAGE_SIZE:].any()
# Left alive for interpreter exit: snapshots, mapped regions, views, queued
# diffs, a reference cycle, and daemon threads still diffing and applying.
snaps = [Snapshot(b"y" * 5000, max_size=4 * PAGE_SIZE) for _ in range(3)]
regions = [Region(2 * PAGE_SIZE) for _ in range(3)]
views = [r.array() for r in regions]
cycle = [snaps, regions, views]
cycle.append(cycle)
for s, r in zip(snaps, regions):
    s.map_to(r)
    s.queue([Diff(0, b"abc")])


def churn(s, r):
    # "close" ends these loops with "the snapshot is closed"; they stop quietly,
    # since a daemon thread printing a traceback while the interpreter finalizes
    # aborts CPython itself (_enter_buffered_busy), whatever pagefork does.
    try:
        while True:
            s.apply(s.diff(r, np.ones(2, bool)))
            wire.decode(wire.encode(s.tracked_changes()))
    except PageforkError as e:
        assert str(e) == "the snapshot is closed", e


for s, r in zip(snaps, regions):
    threading.Thread(target=churn, args=(s, r), daemon=True).start()
if sys.argv[1] == "close":
    for s in snaps:
        s.close()
print("ok")
"""


@pytest.mark.parametrize("how", ["close", "leave"])
def test_snapshot_freed_while_mapped_and_exit_with_everything_alive(how):

    out = run_python(_FREED_WHILE_MAPPED, how)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_queue_write_queued_apply_and_tracked_changes_from_many_threads():
    """Every queued +1 lands exactly once, whoever writes the queue."""
    import random
    import threading

    one = Diff(8, np.int64(1).tobytes(), DataType.INT64, MergeOp.SUM)
    other = Diff(16, np.int64(1).tobytes(), DataType.INT64, MergeOp.SUM)
    threads, rounds = 4, 400
    written = [0] * threads
    applied = [0] * threads
    with Snapshot(np.zeros(4, np.int64).tobytes()) as snap:
        def work(i: int) -> None:
            rng = random.Random(i)
            for _ in range(rounds):
                snap.queue([one])
                if rng.random() < 0.3:
                    written[i] += snap.write_queued()
                if rng.random() < 0.2:
                    snap.apply([other])
                    applied[i] += 1
                if rng.random() < 0.1:
                    snap.tracked_changes()
                    snap.clear_tracked_changes()

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        rest = snap.write_queued()
        values = np.frombuffer(snap.read(), np.int64)
        assert values[1] == threads * rounds == sum(written) + rest
        assert values[2] == sum(applied) and snap.queued == 0


def test_map_to_regions_of_other_sizes_and_max_sizes():
    from pagefork import OutOfBoundsError, Region

    content = bytes(range(256)) * (3 * PAGE_SIZE // 256) + b"tail" * 25
    with Snapshot(content, max_size=8 * PAGE_SIZE) as snap:
        prefix = Region(PAGE_SIZE, max_size=6 * PAGE_SIZE)
        snap.map_to(prefix)
        assert bytes(memoryview(prefix)) == content[:PAGE_SIZE]
        prefix.resize(3 * PAGE_SIZE)  # pages past the mapped prefix are new and zero
        assert not np.frombuffer(prefix, np.uint8)[PAGE_SIZE:].any()
        whole = Region(4 * PAGE_SIZE)  # the snapshot rounded up to pages
        snap.map_to(whole)
        assert bytes(memoryview(whole)) == content + bytes(4 * PAGE_SIZE - len(content))
        with pytest.raises(OutOfBoundsError):
            snap.map_to(Region(5 * PAGE_SIZE))
        snap.write(b"more", len(content))  # grown: still maps, and diffs back to nothing
        snap.map_to(whole)
        assert snap.diff(whole, np.ones(4, bool)) == []


def test_diff_regions_override_is_checked_like_add_merge_region():
    """Before: overlapping regions were a cryptic native ValueError, and a
    tuple an AttributeError."""
    from pagefork import MergeRegion

    with Snapshot(bytes(100)) as snap:
        for regions in ([MergeRegion(0, 50), MergeRegion(10, 20)],
                        [MergeRegion(10, 0), MergeRegion(0, 0)]):
            with pytest.raises(ValueError, match="overlaps"):
                snap.diff(b"x" * 100, [True], regions=regions)
        with pytest.raises(TypeError, match="MergeRegion"):
            snap.diff(b"x" * 100, [True], regions=[(0, 10)])
        got = snap.diff(b"x" * 100, [True], regions=[MergeRegion(50, 0), MergeRegion(0, 50)])
        assert got == [Diff(0, b"x" * 50), Diff(50, b"x" * 50)]
