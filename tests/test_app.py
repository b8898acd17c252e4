"""App.parallel on every local backend: fork-join semantics, merges,
failures, conflicts, placement caching."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import pagefork
from pagefork import App, ConflictError, OutOfBoundsError, PAGE_SIZE, PageforkError, WorkerError


@pytest.fixture(params=["threads", "processes"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def app(backend):
    with App("1MiB", max_size="4MiB", backend=backend, workers=2) as app:
        yield app


def snapshot_bytes(app: App) -> bytes:
    return app._executor.snapshot.read()


def test_results_in_thread_order_with_args(app):
    assert app.parallel(lambda mem, i, n, k: (i, n, k), 5, args=("x",)) == [
        (i, 5, "x") for i in range(5)]


def test_main_writes_reach_threads_and_threads_are_isolated(app):
    a = app.alloc("a", 4 * PAGE_SIZE // 8, np.int64)
    a[:] = 7  # a main-program write between batches

    def work(mem, i, n):
        v = mem["a"]
        seen = int(v.sum())
        v[i] = 100 + i  # no other thread may see this
        return seen

    sums = app.parallel(work, 4)
    assert sums == [7 * a.size] * 4
    assert a[:4].tolist() == [100, 101, 102, 103]  # merged into main memory
    assert app.last_batch.main_dirty_pages == 4
    a[10] = -1
    assert app.parallel(lambda mem, i, n: int(mem["a"][10]), 2) == [-1, -1]


def test_reductions_accumulate_across_batches(app):
    total = app.alloc("total", 3, np.int64, merge="sum")
    hi = app.alloc("hi", 1, np.float64, merge="max")
    lo = app.alloc("lo", 1, np.float64, merge="min")
    prod = app.alloc("prod", 1, np.int64, merge="product")
    prod[0] = 1
    lo[0] = 1e9

    def work(mem, i, n, batch):
        mem["total"][:] += [1, i, batch]
        mem["hi"][0] = max(mem["hi"][0], 10 * batch + i)
        mem["lo"][0] = min(mem["lo"][0], 10 * batch + i)
        mem["prod"][0] *= 2

    for batch in range(3):
        app.parallel(work, 4, args=(batch,))
    assert total.tolist() == [12, 3 * 6, 4 * (0 + 1 + 2)]
    assert hi[0] == 23 and lo[0] == 0
    assert prod[0] == 2 ** 12


def test_views_made_before_a_batch_stay_valid(app):
    a = app.alloc("a", 1000, np.int32)
    view = app["a"]
    app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, i + 1), 3)
    assert view[:4].tolist() == [1, 2, 3, 0] and a[:4].tolist() == [1, 2, 3, 0]
    view[999] = 5
    assert app.parallel(lambda mem, i, n: int(mem["a"][999]), 1) == [5]


def test_a_failing_thread_changes_nothing(app):
    a = app.alloc("a", 100, np.int64, merge="sum")
    a[:] = 1
    app.parallel(lambda mem, i, n: None, 1)  # carry main writes first
    before_main, before_snapshot = bytes(app.memory), snapshot_bytes(app)

    def work(mem, i, n):
        mem["a"][:] += 1
        if i == 2:
            raise ValueError("thread two is unhappy")

    with pytest.raises(WorkerError) as info:
        app.parallel(work, 4)
    assert info.value.thread == 2
    assert "ValueError: thread two is unhappy" in info.value.traceback
    assert "thread 2 of 4" in str(info.value)
    assert bytes(app.memory) == before_main and snapshot_bytes(app) == before_snapshot
    app.parallel(work, 2)  # and the app still works
    assert (a == 3).all()


def test_conflicting_overwrites(backend):
    with App("64KiB", backend=backend, workers=2, detect_conflicts=True) as app:
        a = app.alloc("a", 10, np.int64)
        total = app.alloc("total", 1, np.int64, merge="sum")
        before = snapshot_bytes(app)

        def clash(mem, i, n):
            mem["a"][3] = i + 1   # different bytes at the same place
            mem["total"][0] += 1  # sums never conflict

        with pytest.raises(ConflictError, match=r"threads 0 and 1 wrote different bytes"):
            app.parallel(clash, 2)
        assert snapshot_bytes(app) == before and a[3] == 0 and total[0] == 0

        def agree(mem, i, n):
            mem["a"][3] = 42      # the same bytes: not a conflict
            mem["a"][5 + i] = i   # different places: not a conflict
            mem["total"][0] += 1

        app.parallel(agree, 2)
        assert a[3] == 42 and a[5] == 0 and a[6] == 1 and total[0] == 2


def test_placement_is_cached_per_batch_size(app):
    app.parallel(lambda mem, i, n: None, 4)
    assert not app.last_batch.placement_cached
    app.parallel(lambda mem, i, n: None, 4)
    assert app.last_batch.placement_cached
    app.parallel(lambda mem, i, n: None, 3)
    assert not app.last_batch.placement_cached
    app.parallel(lambda mem, i, n: None, 4)
    assert app.last_batch.placement_cached


def test_last_batch_statistics(app):
    a = app.alloc("a", 8 * PAGE_SIZE, np.uint8)

    def work(mem, i, n):
        mem["a"][i * PAGE_SIZE: i * PAGE_SIZE + 10] = 1

    app.parallel(work, 3)
    stats = app.last_batch
    assert stats.threads == 3 and stats.dirty_pages == 3
    assert stats.diffs == 3 and stats.diff_bytes == 30
    assert set(stats.times) == {"carry", "run", "merge", "remap"}
    if app.backend == "processes":
        assert stats.bytes_shipped > 30
    assert "3 threads" in stats.summary()
    assert (a.reshape(8, PAGE_SIZE)[:3, :10] == 1).all() and a.sum() == 30


def test_alloc_rules_and_growth(app):
    app.alloc("x", 10, np.float32, merge="max")
    with pytest.raises(ValueError, match="already exists"):
        app.alloc("x", 1)
    with pytest.raises(ValueError, match="numeric"):
        app.alloc("b", 4, np.bool_, merge="sum")
    with pytest.raises(ValueError, match="unknown merge op"):
        app.alloc("c", 4, merge="average")
    big = app.alloc("big", (2 * 1024 * 1024) // 8, np.int64, merge="sum")  # grows past 1 MiB
    assert app.memory.size >= 2 * 1024 * 1024 and big.ctypes.data % PAGE_SIZE == 0
    app.parallel(lambda mem, i, n: mem["big"].__setitem__(-1, 5), 2)
    assert big[-1] == 10
    with pytest.raises(OutOfBoundsError, match="max_size"):
        app.alloc("huge", 4 * 1024 * 1024, np.uint8)
    with pytest.raises(KeyError, match="no array named"):
        app["nope"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        App("1MiB", backend="mpi")
    with pytest.raises(ValueError):
        App(0, backend="threads")
    with pytest.raises(ValueError, match="workers"):
        App("1MiB", backend="threads", workers=0)
    with pytest.raises(ValueError, match="unknown tracking mode"):
        App("1MiB", backend="threads", tracking="mprotect")
    with App("64KiB", backend="threads") as app:
        with pytest.raises(ValueError, match="at least one thread"):
            app.parallel(lambda mem, i, n: None, 0)
        with pytest.raises(TypeError):
            app.parallel("not callable", 1)  # type: ignore[arg-type]
    with pytest.raises(PageforkError, match="closed"):
        app.parallel(lambda mem, i, n: None, 1)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_worker_killed_mid_batch(how):
    with App("256KiB", backend="processes", workers=2) as app:
        a = app.alloc("a", 64, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 2)
        before_main, before_snapshot = bytes(app.memory), snapshot_bytes(app)

        def work(mem, i, n):
            mem["a"][:] += 1
            if i == 1:
                if how == "exit":
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGKILL)

        with pytest.raises(WorkerError, match="died") as info:
            app.parallel(work, 4)
        assert 1 in info.value.failed
        assert bytes(app.memory) == before_main and snapshot_bytes(app) == before_snapshot
        app.parallel(lambda mem, i, n: mem["a"].__setitem__(0, mem["a"][0] + 1), 4)  # replaced
        assert a[0] == 4
        assert app._executor.backend.replaced >= 1


@pytest.mark.parametrize("mode", ["segfault", "uffd-async", "uffd"])
def test_other_tracking_modes_where_cow_is_unavailable(mode, backend):
    support = pagefork.probe()[mode]
    if not support.available:
        pytest.skip(support.reason)
    with App("64KiB", backend=backend, tracking=mode, workers=2) as app:
        assert app._executor._main_mode == mode
        a = app.alloc("a", 100, np.int64, merge="sum")
        b = app.alloc("b", 2 * PAGE_SIZE // 8, np.int64)
        for step in range(3):
            b[step * 500] = step + 1  # main-program writes, tracked by `mode`
            got = app.parallel(lambda mem, i, n: (mem["a"].__iadd__(1), int(mem["b"].sum()))[1], 3)
            assert got == [sum(range(step + 2))] * 3
        assert (a == 9).all()


def test_an_interrupted_batch_leaves_no_stale_replies():
    """Ctrl-C while workers run: their late replies must not count in the next batch."""
    import threading
    import time

    with App("64KiB", backend="processes", workers=1) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 1)

        def slow(mem, i, n):
            time.sleep(0.5)
            mem["a"][:] += 100
            return "slow"

        timer = threading.Timer(0.1, lambda: __import__("_thread").interrupt_main())
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            app.parallel(slow, 2)
        assert app.parallel(lambda mem, i, n: (mem["a"].__iadd__(1), "fast")[1], 1) == ["fast"]
        assert a.tolist() == [1, 1, 1, 1]
