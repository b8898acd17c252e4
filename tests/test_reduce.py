"""The processes backend's reduction path: workers combining order-free
reductions, thread memory kept between threads, compact replies through a
shared buffer. Every batch is checked byte for byte against the reference
model (each thread diffed against the snapshot, merged in thread order)."""

from __future__ import annotations

import os
import sys

import cloudpickle
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagefork
from pagefork import App, PAGE_SIZE, Region, Snapshot, WorkerError, _native
from pagefork.backends import replies
from pagefork.backends.combine import combinable, split_regions
from pagefork.merge import DataType, MergeOp, MergeRegion

import reference
import support
from support import ARRAYS, SIGINT_PRELUDE, expected_arrays, run_python, write_arrays

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
cloudpickle.register_pickle_by_value(support)  # nor support (write_arrays)


@pytest.fixture(scope="module", autouse=True)
def keep_memory_always():
    """Workers keep thread memory however few pages a thread wrote, so the
    small arrays here exercise putting pages back (workers read it at start;
    the threads backend's slots read the module's value in this process)."""
    from pagefork.backends import combine

    old = os.environ.get("PAGEFORK_KEEP_MIN_PAGES")
    old_value = combine._KEEP_MIN_PAGES
    os.environ["PAGEFORK_KEEP_MIN_PAGES"] = "0"
    combine._KEEP_MIN_PAGES = 0
    yield
    combine._KEEP_MIN_PAGES = old_value
    if old is None:
        del os.environ["PAGEFORK_KEEP_MIN_PAGES"]
    else:
        os.environ["PAGEFORK_KEEP_MIN_PAGES"] = old



@pytest.fixture(scope="module", params=["processes", "threads"])
def reduce_app(keep_memory_always, request):
    total = sum(np.dtype(d).itemsize * c for _, d, c, _ in ARRAYS) + 16 * len(ARRAYS)
    with App(total + 3 * PAGE_SIZE, backend=request.param, workers=2) as app:
        for name, dtype, count, merge in ARRAYS:
            app.alloc(name, count, dtype, merge=merge)
        app["iprod"][:] = 1
        yield app


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), main=st.booleans())
def test_batches_merge_exactly_like_the_reference(reduce_app, n, seed, main):
    app = reduce_app
    app["iprod"][:] = 1  # keeps products small (wrapped ones are not whole multiples)
    if main:  # main-program writes between batches: the kept memory must follow them
        rng = np.random.default_rng(seed)
        app["isum"][rng.integers(0, 700, 5)] = rng.integers(-5, 5, 5)
        app["raw"][rng.integers(0, 3000, 50)] = 9
    app.parallel(lambda mem, i, n: None, 1)  # carries the main writes into the snapshot
    before = app._executor.snapshot.read()
    seen = app.parallel(write_arrays, n, args=(seed,))
    assert app._executor.snapshot.read() == expected_arrays(app, before, n, seed)
    assert bytes(app.memory)[: len(before)] == app._executor.snapshot.read()
    for s in seen:  # every thread saw the snapshot, not a neighbour's writes
        for name, *_ in ARRAYS:
            a = app._layout[name]
            assert s[name] == before[a.offset: a.offset + a.nbytes], name


def test_a_failing_thread_among_combined_ones_changes_nothing():
    with App("1MiB", backend="processes", workers=2) as app:
        a = app.alloc("a", 1000, np.int64, merge="sum")
        a[:] = 5
        app.parallel(lambda mem, i, n: None, 1)

        def work(mem, i, n):
            mem["a"][:] += i
            if i == 3:
                raise RuntimeError("boom")

        with pytest.raises(WorkerError, match="boom"):
            app.parallel(work, 6)
        assert (a == 5).all()
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(i), 6)
        assert (a == 5 + 15).all()


def test_growth_between_batches_remaps_the_kept_memory():
    with App("64KiB", max_size="1MiB", backend="processes", workers=2) as app:
        a = app.alloc("a", 4000, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
        b = app.alloc("b", 60_000, np.int32, merge="max")  # grows memory and snapshot
        b[:] = -1

        def work(mem, i, n):
            mem["a"][i::n] += 10
            mem["b"][i * 1000: i * 1000 + 5] = i

        app.parallel(work, 4)
        assert (a == 4 + 10).all()
        assert list(b[3000:3005]) == [3] * 5 and (b[5:1000] == -1).all()


def test_scattered_updates_ship_under_10_bytes_per_value():
    elements = 1 << 20
    rng = np.random.default_rng(4)
    idx = np.stack([np.sort(rng.permutation(elements)[: elements // 100]) for _ in range(4)])
    with App(elements * 8 + idx.nbytes + 2 * PAGE_SIZE, backend="processes", workers=2) as app:
        app.alloc("idx", idx.shape, np.int64)[:] = idx
        acc = app.alloc("acc", elements, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 4)

        def work(mem, i, n):
            j = mem["idx"][i]
            mem["acc"][j] += j + 1

        app.parallel(work, 4)
        expected = np.zeros(elements, np.int64)
        for i in range(4):
            expected[idx[i]] += idx[i] + 1
        assert np.array_equal(acc, expected)
        assert app.last_batch.bytes_shipped / idx.size <= 10


def test_combinable_regions():
    assert combinable(MergeRegion(0, 8, DataType.INT64, MergeOp.SUM))
    assert combinable(MergeRegion(0, 8, DataType.UINT8, MergeOp.SUBTRACT))
    assert combinable(MergeRegion(0, 8, DataType.BOOL, MergeOp.MAX))
    assert combinable(MergeRegion(0, 8, DataType.FLOAT64, MergeOp.XOR))
    assert not combinable(MergeRegion(0, 8, DataType.FLOAT64, MergeOp.SUM))  # rounding
    assert not combinable(MergeRegion(0, 8, DataType.FLOAT32, MergeOp.MIN))  # -0.0, NaN order
    assert not combinable(MergeRegion(0, 8, DataType.INT64, MergeOp.PRODUCT))
    assert not combinable(MergeRegion(0, 8))
    own, shared = split_regions([MergeRegion(0, 8, DataType.INT64, MergeOp.SUM), MergeRegion(8, 8)])
    assert [r.op for r in own] == [MergeOp.IGNORE, MergeOp.OVERWRITE]
    assert shared == [MergeRegion(0, 8, DataType.INT64, MergeOp.SUM)]


@pytest.mark.parametrize("dtype, op", [(d, o) for d in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")
                                       for o in (MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.MIN, MergeOp.MAX)]
                         + [("?", MergeOp.MIN), ("?", MergeOp.MAX), ("f8", MergeOp.XOR), ("u1", MergeOp.XOR)])
def test_fold_equals_diff_then_apply(dtype, op):
    rng = np.random.default_rng(1)
    size = 3 * PAGE_SIZE
    orig = rng.integers(0, 256, size, dtype=np.uint8)
    if dtype == "?":
        orig = (orig & 1).astype(np.uint8)
    start, end = 100, 100 + (size - 300) // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize
    region = MergeRegion(start, end - start, dtype, op)
    snap = Snapshot(orig.tobytes())
    acc_fold = orig.copy()
    acc_apply = Snapshot(orig.tobytes())
    dirty = np.array([1, 0, 1], np.uint8)
    for _ in range(3):
        mem = orig.copy()
        flip = rng.integers(0, size, 200)
        mem[flip] = rng.integers(0, 256, 200, dtype=np.uint8) & (1 if dtype == "?" else 255)
        cols = snap.region_columns(size, [region])
        diffs = snap.diff(mem, dirty.astype(bool), regions=[region])
        acc_apply.apply(diffs)
        expected_mem = mem.copy()  # changed elements put back, on dirty pages only
        for d in diffs:
            expected_mem[d.offset: d.offset + len(d.data)] = orig[d.offset: d.offset + len(d.data)]
        changed = np.zeros(3, np.uint8)
        _native.fold(acc_fold, mem, orig, dirty, changed, PAGE_SIZE, *cols)
        assert mem.tobytes() == expected_mem.tobytes()
        pages = {p for d in diffs for p in range(d.offset // PAGE_SIZE,
                                                 (d.offset + len(d.data) - 1) // PAGE_SIZE + 1)}
        assert set(np.flatnonzero(changed)) == pages
    assert acc_fold.tobytes() == acc_apply.read()


_FOLDS = [(d, o) for d in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")
          for o in (MergeOp.SUM, MergeOp.SUBTRACT, MergeOp.MIN, MergeOp.MAX)] + [
    ("?", MergeOp.MIN), ("?", MergeOp.MAX), ("f8", MergeOp.XOR), ("u1", MergeOp.XOR)]


@settings(deadline=None, max_examples=60)
@given(kind=st.sampled_from(_FOLDS), pages=st.integers(1, 6), head=st.integers(0, 64),
       tail=st.integers(0, 64), changes=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_fold_equals_the_reference_at_any_density(kind, pages, head, tail, changes, seed):
    """Many more changed spans than the fold finds ahead at once, runs that
    cross pages and elements straddling page boundaries: the partial equals
    the reference's merge of each thread's diff, the thread memory is put
    back exactly where elements changed, and the changed pages are exact."""
    dtype, op = kind
    k = np.dtype(dtype).itemsize
    rng = np.random.default_rng(seed)
    size = pages * PAGE_SIZE
    orig = rng.integers(0, 2 if dtype == "?" else 256, size, dtype=np.uint8)
    start = head
    end = start + max(0, (size - tail - start) // k * k)
    region = MergeRegion(start, end - start, dtype, op)
    snap = Snapshot(orig.tobytes())
    cols = snap.region_columns(size, [region])
    dirty = rng.integers(0, 2, pages).astype(np.uint8)
    acc = orig.copy()
    expected_acc = orig.tobytes()
    for _ in range(2):
        mem = orig.copy()
        at = rng.integers(0, size, changes)
        mem[at] = rng.integers(0, 2 if dtype == "?" else 256, changes, dtype=np.uint8)
        if changes and rng.integers(0, 2):  # a dense run across pages too
            a = int(rng.integers(0, size))
            mem[a: a + int(rng.integers(1, 3 * PAGE_SIZE))] ^= 1
        clean = np.repeat(dirty == 0, PAGE_SIZE)  # a page not written holds the original
        mem[clean] = orig[clean]
        diffs = reference.diff(orig.tobytes(), mem.tobytes(), dirty.astype(bool), [region])
        expected_acc = reference.apply(expected_acc, diffs)
        expected_mem = mem.copy()
        for d in diffs:
            expected_mem[d.offset: d.offset + len(d.data)] = orig[d.offset: d.offset + len(d.data)]
        changed = np.zeros(pages, np.uint8)
        _native.fold(acc, mem, orig, dirty, changed, PAGE_SIZE, *cols)
        assert mem.tobytes() == expected_mem.tobytes()
        if op is MergeOp.XOR:  # the reference xors whole dirty runs: count changed bytes only
            pages_hit = {(d.offset + int(j)) // PAGE_SIZE for d in diffs
                         for j in np.flatnonzero(np.frombuffer(d.data, np.uint8))}
        else:
            pages_hit = {p for d in diffs for p in range(d.offset // PAGE_SIZE,
                                                         (d.offset + len(d.data) - 1) // PAGE_SIZE + 1)}
        assert set(np.flatnonzero(changed)) == pages_hit
    assert acc.tobytes() == expected_acc


def test_fold_rejects_what_it_cannot_do():
    buf = bytearray(PAGE_SIZE)
    snap = Snapshot(size=PAGE_SIZE)
    for region in (MergeRegion(0, 8, DataType.FLOAT64, MergeOp.SUM), MergeRegion(0, 8),
                   MergeRegion(0, 8, DataType.INT64, MergeOp.PRODUCT)):
        with pytest.raises(ValueError):
            _native.fold(buf, buf, buf, b"\x01", bytearray(1), PAGE_SIZE,
                         *snap.region_columns(PAGE_SIZE, [region]))
    cols = snap.region_columns(PAGE_SIZE, [MergeRegion(0, 8, DataType.INT64, MergeOp.SUM)])
    with pytest.raises(ValueError):
        _native.fold(bytearray(4), buf, buf, b"\x01", bytearray(1), PAGE_SIZE, *cols)  # acc too short
    with pytest.raises(ValueError):
        _native.fold(buf, buf, buf, b"", bytearray(0), PAGE_SIZE, *cols)  # no flags
    with pytest.raises(ValueError):
        _native.fold(buf, buf, buf, b"\x01", bytearray(0), PAGE_SIZE, *cols)  # no room to flag
    with pytest.raises(TypeError):
        _native.fold(buf, bytes(PAGE_SIZE), buf, b"\x01", bytearray(1), PAGE_SIZE, *cols)  # read-only


def test_private_pages_and_keep_changed():
    snap = Snapshot(size=8 * PAGE_SIZE)
    snap.write(b"x" * PAGE_SIZE, 2 * PAGE_SIZE)
    with Region(8 * PAGE_SIZE) as r:
        snap.map_to(r)
        flags = np.zeros(8, np.uint8)
        assert _native.private_pages(r, flags) == 0
        view = memoryview(r)
        view[3 * PAGE_SIZE] = 1
        view[5 * PAGE_SIZE] = 0  # same byte as the snapshot: private, unchanged
        _ = view[6 * PAGE_SIZE]  # a read copies nothing
        assert _native.private_pages(r, flags) == 2 and list(np.flatnonzero(flags)) == [3, 5]
        assert _native.keep_changed(r, snap.view(), flags) == 1 and list(np.flatnonzero(flags)) == [3]
        del view
    with pytest.raises(ValueError):
        _native.private_pages(memoryview(bytearray(PAGE_SIZE * 2))[1:], np.zeros(2, np.uint8))


def test_reply_buffer_round_trip_growth_and_seals():
    fd = replies.create()
    writer = replies.ReplyWriter(os.dup(fd))
    reader = replies.ReplyReader(fd)
    writer.start_batch()
    a = writer.put(b"hello")
    big = os.urandom(3 << 20)
    b = writer.put(big)  # grows the file
    assert bytes(reader.get(*a)) == b"hello" and bytes(reader.get(*b)) == big
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)  # sealed against shrinking: the reader can never SIGBUS
    with pytest.raises(ValueError):
        reader.get(os.fstat(fd).st_size, 1)
    with pytest.raises(ValueError):
        reader.get(-1, 1)
    writer.start_batch()
    assert writer.put(b"again")[0] == 0  # a new batch reuses the buffer
    writer.close()
    reader.close()


def test_reply_reader_remaps_when_the_buffer_grows_after_a_read():
    """The reader mapped the buffer at its old size; the worker then grew the
    file. mmap.size() reports the file's new size, not the mapping's, so a
    reader trusting it returned a cut-off view past its old end."""
    fd = replies.create()
    writer = replies.ReplyWriter(os.dup(fd))
    reader = replies.ReplyReader(fd)
    writer.start_batch()
    small = writer.put(b"s" * (100 << 10))
    assert bytes(reader.get(*small)) == b"s" * (100 << 10)  # maps the 1 MiB buffer
    big = os.urandom(3 << 20)
    at = writer.put(big)  # grows the file past the reader's mapping
    assert bytes(reader.get(*at)) == big
    writer.close()
    reader.close()


def test_a_reply_buffer_growing_between_batches():
    """A batch with a small combined reply, then one with a larger one than
    the buffer held: the second read the first's mapping, cut off, and
    failed with 'malformed combined diffs'."""
    with App("1MiB", max_size="16MiB", backend="processes", workers=1) as app:
        s = app.alloc("s", 300_000, np.int64, merge="sum")
        o = app.alloc("o", 300_000, np.int64)  # per-thread diffs through the buffer too
        expected_s = np.zeros(300_000, np.int64)

        def work(mem, i, n, step):
            mem["s"][::step] += i + 1
            mem["o"][i::step] = step

        for step in (16, 1, 8, 1):
            app.parallel(work, 3, args=(step,))
            expected_s[::step] += 6
            assert np.array_equal(s, expected_s)
            assert (o == step).all() if step == 1 else True
        assert (o == 1).all()


def test_reduce_benchmark_smoke():
    """The benchmark's workloads at toy sizes: every system's answer is right."""
    from pagefork.bench.reduce import (ReduceResults, bytes_per_value, dense_sum, format_results, run_all,
                                       scattered_sum, tracked_changes_cost)

    dense = dense_sum(1 << 14, repeat=1)
    scattered, rounds = scattered_sum(1 << 16, repeat=1, task_seconds=0.001)
    shipped = bytes_per_value(1 << 16)
    tracked = tracked_changes_cost(1 << 20)
    assert all(t.correct and len(t.seconds) == 1 for t in dense + scattered)
    assert {t.name for t in dense} >= {"pagefork processes", "serial numpy", "shared memory + lock"}
    assert shipped["correct"] and all(row["correct"] for row in tracked)
    text = format_results(ReduceResults(dense, 1 << 14, scattered, rounds, shipped, tracked, 1 << 20))
    assert "WRONG" not in text and "speed-up over serial numpy, pagefork processes:" in text
    assert {t.name for t in scattered} == {"pagefork processes", "pagefork processes, start=identity",
                                           "serial numpy"}
    assert "speed-up over serial numpy, pagefork processes, start=identity:" in text
    with pytest.raises(ValueError, match="only"):
        run_all(only="everything")


@pytest.mark.parametrize("mode", ["segfault", "uffd-async", "none"])
def test_combining_with_other_tracking_modes(mode):
    """Without cow the memory is mapped afresh per thread; combining still holds."""
    if not pagefork.probe()[mode].available:
        pytest.skip(pagefork.probe()[mode].reason)
    with App("256KiB", backend="processes", workers=2, tracking=mode) as app:
        a = app.alloc("a", 5000, np.int64, merge="sum")
        m = app.alloc("m", 3000, np.int32, merge="min")
        m[:] = 100

        def work(mem, i, n):
            mem["a"][i::3] += i + 1
            mem["m"][i * 10: i * 10 + 10] = -i

        for _ in range(2):
            app.parallel(work, 5)
        expected = np.zeros(5000, np.int64)
        for i in range(5):
            expected[i::3] += 2 * (i + 1)
        assert np.array_equal(a, expected)
        assert list(m[:50]) == [0] * 10 + [-1] * 10 + [-2] * 10 + [-3] * 10 + [-4] * 10
        assert (m[50:] == 100).all()


def test_memory_that_is_not_whole_pages():
    """A snapshot whose last page is partly past its end: the kept memory's
    tail is put back too, so no thread sees another's tail writes."""
    with App(3 * PAGE_SIZE + 1000, backend="processes", workers=1) as app:
        a = app.alloc("a", (3 * PAGE_SIZE + 1000) // 8, np.int64, merge="sum")

        def work(mem, i, n):
            before = int(mem["a"][-1])
            mem["a"][-1] += 1
            mem["a"][i] += 1
            return before

        assert app.parallel(work, 4) == [0, 0, 0, 0]  # one worker: the memory is kept
        assert int(a[-1]) == 4 and list(a[:5]) == [1, 1, 1, 1, 0]
        assert app.parallel(work, 4) == [4, 4, 4, 4]
        assert int(a[-1]) == 8


def test_overwrite_beside_sums_keeps_thread_order_and_conflicts():
    """OVERWRITE arrays still ship per thread: the last thread's write wins,
    and conflicting writes are detected, even when sums are combined."""
    with App("1MiB", backend="processes", workers=2, detect_conflicts=True) as app:
        s = app.alloc("s", 1000, np.int64, merge="sum")
        o = app.alloc("o", 1000, np.uint8)

        def ordered(mem, i, n):
            mem["s"][:] += 1
            mem["o"][i] = i + 1

        app.parallel(ordered, 6)
        assert (s == 6).all() and list(o[:7]) == [1, 2, 3, 4, 5, 6, 0]

        def clash(mem, i, n):
            mem["s"][:] += 1
            mem["o"][500] = i + 10

        with pytest.raises(pagefork.ConflictError):
            app.parallel(clash, 4)
        assert (s == 6).all() and o[500] == 0


def test_apply_batches_is_apply_of_the_concatenation():
    from pagefork import Diff, DiffBatch, MergeError, OutOfBoundsError

    first = DiffBatch([Diff(0, b"ab"), Diff(8, np.int64(5).tobytes(), DataType.INT64, MergeOp.SUM)])
    second = DiffBatch([Diff(1, b"Z"), Diff(8, np.int64(2).tobytes(), DataType.INT64, MergeOp.PRODUCT)])
    a, b = Snapshot(np.arange(64, dtype=np.uint8).tobytes(), max_size=128), Snapshot(
        np.arange(64, dtype=np.uint8).tobytes(), max_size=128)
    a.apply_batches([first, DiffBatch(), second])
    b.apply(DiffBatch.concat([first, second]))
    assert a.read() == b.read()
    before = a.read()
    with pytest.raises(OutOfBoundsError):  # the second batch is bad: nothing of the first lands
        a.apply_batches([DiffBatch([Diff(0, b"x")]), DiffBatch([Diff(200, b"y")])])
    zero = Snapshot(size=16)
    with pytest.raises(MergeError):
        zero.apply_batches([DiffBatch([Diff(0, b"\x01")]),
                            DiffBatch([Diff(8, np.int64(2).tobytes(), DataType.INT64, MergeOp.PRODUCT)])])
    assert a.read() == before and zero.read() == bytes(16)
    grow = Snapshot(size=8, max_size=32)
    grow.apply_batches([DiffBatch([Diff(10, b"q")]), DiffBatch([Diff(20, b"r")])])
    assert grow.size == 21 and grow.read(10, 1) == b"q"
    assert [(d.offset, d.data) for d in grow.tracked_changes()] == [(10, b"q"), (20, b"r")]


def test_reply_buffer_gives_back_pages_beyond_recent_batches():
    fd = replies.create()
    writer = replies.ReplyWriter(os.dup(fd))
    reader = replies.ReplyReader(fd)
    big = os.urandom(80 << 20)
    writer.start_batch()
    writer.put(big)
    for _ in range(8):  # small batches since (the need halves each time): pages given back
        writer.start_batch()
        small = writer.put(b"tiny")
    assert bytes(reader.get(*small)) == b"tiny"
    blocks = os.fstat(fd).st_blocks * 512
    assert blocks < 64 << 20, blocks
    writer.start_batch()
    again = writer.put(big)  # the given-back pages are allocated again before the copy
    assert bytes(reader.get(*again)) == big
    writer.close()
    reader.close()


def test_a_worker_whose_combining_fails_answers_and_recovers():
    """A hostile thread closes its worker's partial: the batch fails with
    WorkerError (no hang, nothing merged) and the next batch is exact."""
    with App("1MiB", backend="processes", workers=1) as app:
        a = app.alloc("a", 1000, np.int64, merge="sum")

        def sabotage(mem, i, n):
            import gc

            from pagefork.backends.combine import CombiningWorkspace

            mem["a"][:] += 1
            if i == 1:
                for o in gc.get_objects():
                    if isinstance(o, CombiningWorkspace) and o._partial_region is not None:
                        o._partial_region.close()

        with pytest.raises(WorkerError):
            app.parallel(sabotage, 3)
        assert (a == 0).all()
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 3)
        assert (a == 3).all()


def _kept_now(mem, i, n):
    """Whether this worker's thread memory was kept (not mapped afresh) for
    the running thread, after adding to every page of ``a``."""
    import gc

    from pagefork.backends.combine import CombiningWorkspace

    mem["a"][::512] += i + 1
    return [o._kept is not None for o in gc.get_objects() if isinstance(o, CombiningWorkspace)]


def test_one_small_batch_between_big_ones_keeps_the_thread_memory():
    """A batch of one thread writing nothing (as a reset between big
    batches) only halves the recent page count: the next big batch still
    runs on the kept memory, and every batch stays exact."""
    old = os.environ.get("PAGEFORK_KEEP_MIN_PAGES")
    os.environ["PAGEFORK_KEEP_MIN_PAGES"] = "16"  # read by the workers as they start
    try:
        with App("1MiB", backend="processes", workers=1) as app:
            a = app.alloc("a", 64 * 512, np.int64, merge="sum")  # 64 pages
            app.parallel(_kept_now, 2)
            app.parallel(lambda mem, i, n: None, 1)
            keeps = app._executor.thread_mode == "cow"  # only cow thread memory is kept
            kept = app.parallel(_kept_now, 2)
            assert kept == [[keeps], [keeps]]
            expected = np.zeros(64 * 512, np.int64)
            expected[::512] = 6
            assert np.array_equal(a, expected)
            for _ in range(5):  # sparse batches decay the count: mapped afresh again
                app.parallel(lambda mem, i, n: None, 1)
            assert app.parallel(_kept_now, 1) == [[False]]
            expected[::512] += 1
            assert np.array_equal(a, expected)
    finally:
        if old is None:
            del os.environ["PAGEFORK_KEEP_MIN_PAGES"]
        else:
            os.environ["PAGEFORK_KEEP_MIN_PAGES"] = old


@settings(deadline=None, max_examples=40)
@given(diffs=st.lists(st.tuples(st.integers(0, 20 * PAGE_SIZE), st.integers(0, 3 * PAGE_SIZE),
                                st.sampled_from([MergeOp.OVERWRITE, MergeOp.IGNORE, MergeOp.XOR])),
                      max_size=30))
def test_merged_batches_flag_exactly_the_pages_they_change(diffs):
    """The pages a merged batch flags unsaved (for incremental checkpoints):
    every page a non-IGNORE, non-empty diff spans, and no other."""
    from pagefork.diffs import Diff, DiffBatch

    with App(24 * PAGE_SIZE, backend="threads", workers=1) as app:
        executor = app._executor
        executor.mark_saved()
        executor._note_merged(DiffBatch([Diff(at, bytes(n), DataType.RAW, op) for at, n, op in diffs]))
        expected = np.zeros(24, bool)
        for at, n, op in diffs:
            if n and op is not MergeOp.IGNORE:
                expected[at // PAGE_SIZE: (at + n - 1) // PAGE_SIZE + 1] = True
        assert np.array_equal(executor.unsaved_pages(), expected)


COMBINING_STRESS = r"""
import os, random, signal, sys, threading, time
import numpy as np
from pagefork import App

rounds, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
signal.signal(signal.SIGINT, on_sigint)  # SIGINT_PRELUDE's


E, N = 300_000, 5  # 2.4 MB arrays: combined diffs travel through the reply buffers


def work(mem, i, n, k, pause, dense, head):
    s, x, o = mem["s"], mem["x"], mem["o"]
    if not (np.array_equal(s[:64], head) and int(o[0]) == k):
        raise AssertionError(f"thread {i} saw stale memory")
    if dense:
        s += 1
        x ^= np.uint32(1 << i)
    else:
        s[i::97] += 1
        x[i::97] ^= np.uint32(1 << i)
    if pause:
        time.sleep(pause)  # the signal lands while others combine or reply
    if i == n - 1:
        o[:] = k + 1
    return i


with App("1MiB", max_size="16MiB", backend=sys.argv[3], workers=2) as app:
    s = app.alloc("s", E, np.int64, merge="sum")
    x = app.alloc("x", E, np.uint32, merge="xor")
    o = app.alloc("o", E, np.int64)
    want_s, want_x = np.zeros(E, np.int64), np.zeros(E, np.uint32)
    merged = 0
    for r in range(rounds):
        k, dense = int(o[0]), rng.random() < 0.5
        timer = threading.Timer(rng.uniform(0, rng.choice([0.2, 0.6, 2.0])), burst, (rng.choice([1, 3]), 0.001))
        time.sleep(0.005)  # late signals of the last round are ignored here
        try:
            timer.start()
            inside = True
            app.parallel(work, N, args=(k, rng.choice([0, 0, 0.02]), dense, want_s[:64].copy()))
            timer.join()
        except KeyboardInterrupt:
            pass
        inside = False
        if timer.ident is not None:
            timer.join()
        done = int(o[0])
        assert done in (k, k + 1) and (o == done).all(), (k, done)
        if done == k + 1:  # all or nothing
            merged += 1
            if dense:
                want_s += N
                want_x ^= np.uint32(2 ** N - 1)
            else:
                for i in range(N):
                    want_s[i::97] += 1
                    want_x[i::97] ^= np.uint32(1 << i)
        assert np.array_equal(s, want_s) and np.array_equal(x, want_x), r
        s[r % 64] += 5  # the main program writes between batches
        want_s[r % 64] += 5
print("ok", rounds, "merged", merged)
"""


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_sigint_while_workers_combine_and_reply_through_the_buffer(backend):
    """Real SIGINTs (single and bursts) at random points of batches whose
    workers (worker processes, or the threads backend's slots) combine
    reductions and send megabytes through their reply buffers, with memory
    kept between threads: every round is all or nothing, threads always see
    the snapshot, and main writes survive."""
    env = dict(os.environ, PAGEFORK_KEEP_MIN_PAGES="0")
    done = run_python(COMBINING_STRESS, "15", "11", backend, prelude=SIGINT_PRELUDE, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok 15")


# ---- what a float sum merges exactly (docs/api.md, "Float sums") ------------------------

def _floats(rng, n, dtype):
    """Values over a wide range of magnitudes and both signs."""
    span = 30 if dtype == np.float32 else 200
    return (rng.standard_normal(n) * 10.0 ** rng.integers(-span, span, n)).astype(dtype)


def _adds_once(mem, i, n, adds):
    mem["a"][i::n] += adds[i::n]


def _adds_twice(mem, i, n, adds):
    a = mem["a"]
    a += adds[i]
    a += adds[i + n]


def _assigns(mem, i, n, values):
    mem["a"][i::n] = values[i::n]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_single_writer_adding_to_a_float_sum_merges_bitwise_to_its_own_value(backend, dtype):
    """One writer per element that adds to it (a[k] += v, any magnitudes):
    the merge gives exactly the value the thread computed."""
    rng = np.random.default_rng(7)
    with App("1MiB", backend=backend, workers=2) as app:
        a = app.alloc("a", 20_000, dtype, merge="sum")
        a[:] = _floats(rng, a.size, dtype)
        adds = _floats(rng, a.size, dtype)
        expected = a + adds
        app.parallel(_adds_once, 4, args=(adds,))
        assert a.tobytes() == expected.tobytes()


@pytest.mark.parametrize("start", ["snapshot", "identity"])
def test_several_threads_adding_to_one_float_merge_in_thread_order(start):
    """Several threads adding to the same elements: with the default start,
    main + (new_i - old) in thread order, which may differ from serial
    accumulation in the last bits; start="identity": main + total_i in
    thread order, where total_i is the thread's own sum from zero, so it
    equals serial code that adds each thread's total in turn."""
    rng = np.random.default_rng(11)
    n = 4
    with App("1MiB", backend="threads", workers=2) as app:
        a = app.alloc("a", 5_000, np.float64, merge="sum", start=start)
        a[:] = rng.standard_normal(a.size)
        adds = [rng.standard_normal(a.size) * 10.0 ** rng.integers(-8, 8, a.size) for _ in range(2 * n)]
        old = a.copy()
        app.parallel(_adds_twice, n, args=(adds,))
        expected = old.copy()
        for i in range(n):
            if start == "snapshot":
                expected += ((old + adds[i]) + adds[i + n]) - old
            else:
                expected += (0.0 + adds[i]) + adds[i + n]
        assert a.tobytes() == expected.tobytes()
        serial = old.copy()
        for i in range(n):
            serial += adds[i]
            serial += adds[i + n]
        # Not bitwise serial in either case: the grouping differs (documented).
        assert not np.array_equal(a, serial) and np.allclose(a, serial, rtol=1e-12, atol=1e-300)


def test_assigning_into_a_float_sum_merges_the_difference_not_the_value():
    """A thread that assigns (a[k] = x) under merge="sum" contributes
    x - old, which is not a float exactly when the magnitudes differ much:
    1e16 set to 1.0 merges as 0.0. Assigned values want merge="overwrite"."""
    with App("1MiB", backend="threads", workers=2) as app:
        a = app.alloc("a", 4, np.float64, merge="sum")
        b = app.alloc("b", 4, np.float64)  # overwrite
        a[:] = b[:] = 1e16
        app.parallel(_assigns, 2, args=(np.ones(4),))
        assert a.tolist() == [0.0] * 4

        def assign_b(mem, i, n):
            mem["b"][i::n] = 1.0

        app.parallel(assign_b, 2)
        assert b.tolist() == [1.0] * 4
