"""App.restore writes the checkpoint straight into the App's (empty)
snapshot, only the pages that are not zero, and maps main memory from it;
then the main program may read and write its arrays: every write must reach
the threads of the next batch and the next checkpoint, exactly. (Bare
regions, checkpoint.load, are filled in fresh anonymous memory, huge pages
allowed: the second half of this file.)"""

from __future__ import annotations

import errno
import gc
import os
import random
import signal
import threading
import time
import weakref

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, App, Region, Snapshot
from pagefork import checkpoint as ck

from support import require, vma_flags_within
from support import run_python as _run

PAGES = 64
N = PAGES * PAGE_SIZE // 8
PER_PAGE = PAGE_SIZE // 8


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of one int64 'sum' array filling 64 pages; yields the
    folder and the array's values."""
    with App(PAGES * PAGE_SIZE, backend="threads", workers=1) as app:
        a = app.alloc("a", N, np.int64, merge="sum")
        a[:] = np.arange(N)
        app.checkpoint(tmp_path / "ck")
    return tmp_path / "ck", np.arange(N)


def _bump(mem, i, n, where):
    mem["a"][where] += 1
    return int(mem["a"][where])


@pytest.mark.parametrize("tracking", [None, "segfault", "uffd", "uffd-async"])
def test_writes_after_a_restore_are_in_the_next_checkpoint_exactly(saved, tracking):
    path, expected = saved
    require(tracking)
    with App.restore(path, backend="threads", workers=1, tracking=tracking) as app:
        a = app["a"]
        assert np.array_equal(a, expected)
        a[3 * PER_PAGE + 1] = -1
        a[40 * PER_PAGE] = -2
        expected[[3 * PER_PAGE + 1, 40 * PER_PAGE]] = [-1, -2]
        info = app.checkpoint(path)
        assert (info.base, info.pages) == (False, 2)
        # The fill is done now: tracking is main memory's own again, page-exact.
        a[63 * PER_PAGE + 7] = -3
        expected[63 * PER_PAGE + 7] = -3
        assert app.checkpoint(path).pages == 1
        assert app.checkpoint(path).pages == 0
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


def test_a_restore_and_a_checkpoint_without_writes_writes_nothing(saved):
    path, _ = saved
    with App.restore(path, backend="threads", workers=1) as app:
        int(app["a"].sum())  # reads every page
        assert app.checkpoint(path).pages == 0


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_the_first_batch_after_a_restore_sees_the_main_programs_writes(saved, backend):
    path, expected = saved
    with App.restore(path, backend=backend, workers=2) as app:
        version = app._executor.version
        app["a"][5] = 100
        assert app.parallel(_bump, 3, args=(5,)) == [101, 101, 101]
        expected[5] = 103
        assert np.array_equal(app["a"], expected)
        assert app._executor.version > version
        # Main memory is the snapshot's copy-on-write mapping again.
        app["a"][9] = 7
        expected[9] = 7
        assert app.parallel(_bump, 1, args=(9,)) == [8]
        expected[9] = 8
        assert np.array_equal(app["a"], expected)


def test_two_threads_starting_the_first_batches_after_a_restore_at_once(saved):
    """The first of them fills the snapshot, the other waits its turn: both
    see the main program's write and merge exactly."""
    path, expected = saved
    with App.restore(path, backend="threads", workers=2) as app:
        app["a"][5] = 100
        results: list = [None, None]

        def run(k):
            results[k] = app.parallel(_bump, 2, args=(5 + k * PER_PAGE,))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [[101, 101], [PER_PAGE + 6, PER_PAGE + 6]]
        expected[5] = 102
        expected[5 + PER_PAGE] += 2
        assert np.array_equal(app["a"], expected)
        assert app.checkpoint(path).pages == 2
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


def test_a_fill_failing_during_a_restore_fails_the_restore_and_leaves_nothing(saved, monkeypatch):
    """A failure writing the snapshot (its file system full) is the
    restore's, and the half-made App is closed (its batch thread gone)."""
    import pagefork._checkpoint_images as images
    import pagefork.executor as executor_module

    path, _ = saved
    monkeypatch.setattr(images, "write_nonzero",
                        lambda fd, chunk, at: (_ for _ in ()).throw(OSError(errno.ENOSPC, "no space")))
    made = []
    real_init = executor_module.Executor.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append((weakref.ref(self), self._alive))

    monkeypatch.setattr(executor_module.Executor, "__init__", recording_init)
    with pytest.raises(OSError, match="no space"):
        App.restore(path, backend="threads", workers=1)
    ((ref, alive),) = made
    executor = ref()
    if executor is not None:  # closed by the restore, whether or not collected yet
        assert executor.closed and executor.memory.closed and executor.snapshot.closed
    del executor
    gc.collect()  # the batch thread ends once its executor is gone
    for _ in range(500):
        if not alive.is_set():
            break
        time.sleep(0.01)
    assert not alive.is_set() and ref() is None


def test_an_alloc_that_grows_memory_right_after_a_restore_keeps_every_byte(tmp_path):
    with App(PAGES * PAGE_SIZE, max_size=4 * PAGES * PAGE_SIZE, backend="threads", workers=1) as app:
        app.alloc("a", N, np.int64)[:] = np.arange(N)
        app.checkpoint(tmp_path)
    with App.restore(tmp_path, backend="threads", workers=1) as app:
        app["a"][2] = -2
        b = app.alloc("b", 2 * N, np.int64)
        assert app.memory.size == 3 * PAGES * PAGE_SIZE
        assert not b.any()
        b[:] = 1
        expected = np.arange(N)
        expected[2] = -2
        assert np.array_equal(app["a"], expected)
        assert app.parallel(lambda mem, i, n: int(mem["a"][2] + mem["b"].sum()), 1) == [-2 + 2 * N]
        app.checkpoint(tmp_path)
    with App.restore(tmp_path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected) and (back["b"] == 1).all()


def test_a_bare_load_is_unchanged_by_the_app_path(saved):
    path, expected = saved
    with ck.load(path) as region:
        assert np.array_equal(np.frombuffer(region, np.int64)[:N], expected)


def test_ctrl_c_during_first_batches_after_restores(saved):
    """SIGINT at random instants of the first batch after a restore (which
    fills the snapshot): KeyboardInterrupt or the exact result, and a batch
    after an interrupted one is exact."""
    path, expected = saved
    rng = random.Random(5)
    interrupted = 0
    for _ in range(40):
        with App.restore(path, backend="threads", workers=1) as app:
            app["a"][11] = 1000
            timer = threading.Timer(rng.uniform(0, 0.004), signal.raise_signal, (signal.SIGINT,))
            try:
                timer.start()
                assert app.parallel(_bump, 1, args=(11,)) == [1001]
                timer.join()
                merged = 1
            except KeyboardInterrupt:
                interrupted += 1
                merged = int(app["a"][11]) - 1000  # cancelled before or after the merge
            finally:
                timer.cancel()
                timer.join()
            assert merged in (0, 1)
            assert app.parallel(_bump, 1, args=(11,)) == [1001 + merged]
            want = expected.copy()
            want[11] = 1001 + merged
            assert np.array_equal(app["a"], want)
    assert interrupted >= 1


def _run_ok(script: str) -> None:
    """Runs ``script`` in a fresh interpreter: it must exit 0 having printed
    exactly "ok"."""
    result = _run(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("ending", ["exit", "close then exit", "del then exit", "fork"])
def test_a_restored_app_never_filled_ends_cleanly(saved, ending):
    path, expected = saved
    _run_ok(f"""
        import gc, os, sys
        import numpy as np
        from pagefork import App
        ending = {ending!r}
        app = App.restore({str(path)!r}, backend="processes", workers=1)
        a = app["a"]
        a[4] = -4
        view = memoryview(app.memory)
        if ending == "fork":
            pid = os.fork()
            if pid == 0:
                a[4096 // 8 * 3] = -99  # the child's own copy
                os._exit(0 if a[4] == -4 else 3)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert a[4096 // 8 * 3] == 4096 // 8 * 3, "the child's write reached the parent"
            info = app.checkpoint({str(path)!r})
            assert info.pages == 1, info
        elif ending == "close then exit":
            app.close()
            assert a[4] == -4 and view[0] == 0
        elif ending == "del then exit":
            del app
            gc.collect()
            assert a[4] == -4
        print("ok")
    """)


# ---- the native remap behind it ------------------------------------------------------------

def test_map_anonymous_gives_zeroed_memory_in_place_and_keeps_views():
    with Region(8 * PAGE_SIZE, max_size=16 * PAGE_SIZE) as region:
        view = region.array(np.uint8)
        view[:] = 5
        address = region.address
        region._map_anonymous(4 * PAGE_SIZE, True)
        assert region.address == address
        assert not view[: 4 * PAGE_SIZE].any() and (view[4 * PAGE_SIZE:] == 5).all()
        view[:] = 6
        region.resize(16 * PAGE_SIZE)
        assert (region.array(np.uint8)[: 8 * PAGE_SIZE] == 6).all()
        assert not region.array(np.uint8)[8 * PAGE_SIZE:].any()


def test_map_anonymous_over_a_snapshot_mapping_then_shrink_and_grow_reads_zero():
    with Snapshot(b"\x07" * (8 * PAGE_SIZE)) as snap, Region(8 * PAGE_SIZE) as region:
        snap.map_to(region)
        region._map_anonymous(8 * PAGE_SIZE, False)
        assert bytes(region) == bytes(8 * PAGE_SIZE)
        region.resize(2 * PAGE_SIZE)
        region.resize(8 * PAGE_SIZE)
        assert bytes(region) == bytes(8 * PAGE_SIZE)


@pytest.mark.parametrize("kind", ["memfd", "shared"])
def test_map_anonymous_refuses_memory_others_share(kind):
    region = Region(4 * PAGE_SIZE, backing="memfd") if kind == "memfd" else Region(4 * PAGE_SIZE, shared=True)
    with region:
        with pytest.raises(ValueError, match="anonymous private"):
            region._map_anonymous(PAGE_SIZE, False)


@pytest.mark.parametrize("length", [-PAGE_SIZE, 1, 5 * PAGE_SIZE, 1 << 62, -(1 << 62)])
def test_map_anonymous_refuses_bad_lengths(length):
    with Region(4 * PAGE_SIZE) as region:
        with pytest.raises((ValueError, OverflowError)):
            region._map_anonymous(length, False)


def test_map_anonymous_on_a_closed_region_is_an_error():
    region = Region(4 * PAGE_SIZE)
    region.close()
    with pytest.raises(ValueError, match="closed"):
        region._map_anonymous(PAGE_SIZE, False)


def test_map_file_refuses_a_negative_descriptor():
    with Region(4 * PAGE_SIZE) as region:
        with pytest.raises(ValueError, match="negative"):
            region._map_file(-1, PAGE_SIZE, False)


@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async", "softpte"])
def test_a_tracked_region_remapped_anonymous_still_reports_its_pages(mode):
    """Protection and uffd registration belong to the mapping: a tracking
    running when the region is remapped is re-armed, and finds writes after."""
    require(mode)
    with Region(16 * PAGE_SIZE) as region, pagefork.tracker(mode) as t:
        t.start(region)
        region.array(np.uint8)[PAGE_SIZE] = 1
        region._map_anonymous(8 * PAGE_SIZE, True)
        region.array(np.uint8)[3 * PAGE_SIZE] = 1
        assert np.flatnonzero(t.dirty_pages(region, "global")).tolist() == [1, 3]


# ---- a bare load fills its new Region on huge pages, then tracks page by page ----------------

@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async", "softpte"])
def test_a_loaded_region_is_tracked_page_by_page(tmp_path, mode):
    require(mode)
    size = 8 << 20  # four 2 MiB huge pages, if the kernel gives them
    with Region(size) as region:
        region.array(np.uint8)[:] = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
        ck.save(region, tmp_path)
        expected = bytes(region)
    with ck.load(tmp_path) as loaded, pagefork.tracker(mode) as t:
        assert bytes(loaded) == expected
        t.start(loaded)
        view = loaded.array(np.uint8)
        for page in (0, 1, 511, 512, 1000, 2047):
            view[page * PAGE_SIZE + 5] ^= 0xFF
        assert np.flatnonzero(t.dirty_pages(loaded, "global", reset=mode != "softpte")).tolist() == \
            [0, 1, 511, 512, 1000, 2047]
        del view
        loaded.resize(size // 2)
        loaded.resize(size)
        assert not loaded.array(np.uint8)[size // 2:].any()


def test_advise_huge_refuses_memory_others_share_and_closed_regions():
    with Region(4 * PAGE_SIZE, backing="memfd") as memfd, Region(4 * PAGE_SIZE, shared=True) as shared:
        for region in (memfd, shared):
            with pytest.raises(ValueError, match="anonymous private"):
                region._advise_huge(True)
    with Snapshot(bytes(4 * PAGE_SIZE)) as snap, Region(4 * PAGE_SIZE) as mapped:
        snap.map_to(mapped)
        with pytest.raises(ValueError, match="anonymous private"):
            mapped._advise_huge(True)
    region = Region(4 * PAGE_SIZE)
    region._advise_huge(True)
    region._advise_huge(False)
    region.close()
    with pytest.raises(ValueError, match="closed"):
        region._advise_huge(True)


# ---- restores without a page-exact tracker, forks, discards and kept views before the fill ----

@pytest.mark.parametrize("tracking", [None, "segfault", "uffd", "uffd-async"])
def test_one_written_page_of_a_huge_page_is_exactly_one_checkpointed_page(tmp_path, tracking):
    """Restored main memory may sit on transparent huge pages: a write to
    one 4 KiB page of one must still be exactly one page of the next
    checkpoint and of the first batch's carried writes."""
    require(tracking)
    size = 8 << 20
    n = size // 8
    with App(size, backend="threads", workers=1) as app:
        app.alloc("a", n, np.int64)[:] = np.arange(n)
        app.checkpoint(tmp_path)
    expected = np.arange(n)
    with App.restore(tmp_path, backend="threads", workers=1, tracking=tracking) as app:
        a = app["a"]
        for page in (700, 701, 1500):
            a[page * PER_PAGE + 5] = -page
            expected[page * PER_PAGE + 5] = -page
        assert app.parallel(lambda mem, i, n: int(mem["a"][701 * PER_PAGE + 5]), 1) == [-701]
        assert app.last_batch.main_dirty_pages == 3
        assert app.checkpoint(tmp_path).pages == 3
        a[1800 * PER_PAGE] = -1
        expected[1800 * PER_PAGE] = -1
        assert app.checkpoint(tmp_path).pages == 1
    with App.restore(tmp_path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


@pytest.mark.parametrize("tracking", [None, "segfault", "uffd", "uffd-async"])
def test_after_a_fork_before_the_fill_the_parent_stays_exact(saved, tracking):
    """fork() between a restore and the fill: the child writes its own copy
    (tracking inherited by it must not act on the parent's), cannot use the
    App, and exits 0; the parent's later writes are exactly the next
    checkpoint's pages, and the child's never reach it."""
    path, expected = saved
    require(tracking)
    _run_ok(f"""
        import os
        import numpy as np
        from pagefork import App, PageforkError
        app = App.restore({str(path)!r}, backend="threads", workers=1, tracking={tracking!r})
        a = app["a"]
        a[1] = -1
        pid = os.fork()
        if pid == 0:
            a[{PER_PAGE} * 30] = -30
            try:
                app.parallel(lambda mem, i, n: None, 1)
                os._exit(4)
            except PageforkError:
                pass
            os._exit(0 if a[1] == -1 and a[{PER_PAGE} * 30] == -30 else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        a[{PER_PAGE} * 50] = -50
        assert app.checkpoint({str(path)!r}).pages == 2  # pages 0 and 50
        assert app.parallel(lambda mem, i, n: int(mem["a"][{PER_PAGE} * 30]), 1) == [{PER_PAGE} * 30]
        app.close()
        print("ok")
    """)
    expected[[1, PER_PAGE * 50]] = [-1, -50]
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


@pytest.mark.parametrize("tracking", ["uffd", "uffd-async"])
def test_pages_discarded_after_a_restore_are_checkpointed_as_they_read(saved, tracking):
    """MADV_DONTNEED on restored main memory (a private mapping of the
    snapshot) drops nothing the program wrote: the pages read the restored
    values again, and the threads and the next checkpoint agree."""
    import ctypes
    import mmap

    require(tracking)
    path, expected = saved
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with App.restore(path, backend="threads", workers=1, tracking=tracking) as app:
        assert libc.madvise(app.memory.address + 2 * PAGE_SIZE, PAGE_SIZE, mmap.MADV_DONTNEED) == 0
        assert np.array_equal(app["a"], expected)
        assert app.parallel(lambda mem, i, n: int(mem["a"][2 * PER_PAGE + 1]), 1) == [2 * PER_PAGE + 1]
        assert app.checkpoint(path).pages == 0
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


@pytest.mark.parametrize("tracking", [None, "segfault", "uffd", "uffd-async"])
@pytest.mark.parametrize("ending", ["close", "gc"])
def test_views_kept_past_an_unfilled_app_stay_writable(saved, tracking, ending):
    """Closing (or dropping) a restored App before the fill stops the
    restore tracker: numpy views kept past it read and write like plain
    memory (no SIGSEGV from a protection left behind, no fault thread
    waited on)."""
    path, _ = saved
    require(tracking)
    _run_ok(f"""
        import gc
        from pagefork import App
        app = App.restore({str(path)!r}, backend="threads", workers=1, tracking={tracking!r})
        a = app["a"]
        a[4] = -4
        if {ending!r} == "close":
            app.close()
        else:
            del app
            gc.collect()
        a[:] = 7
        a[{PER_PAGE} * 9] = 3
        assert int(a.sum()) == 7 * (a.size - 1) + 3
        print("ok")
    """)


def test_ctrl_c_anywhere_in_the_first_writes_batch_and_checkpoint_then_checkpoints_are_exact(saved):
    """SIGINT at random instants of: a write, the first batch (the fill) and
    a checkpoint after a restore. Whatever was cut off, the next checkpoint
    restores to exactly what main memory holds."""
    path, _ = saved
    rng = random.Random(13)
    interrupted = 0
    for it in range(30):
        with App.restore(path, backend="threads", workers=1) as app:
            timer = threading.Timer(rng.uniform(0, 0.004), signal.raise_signal, (signal.SIGINT,))
            try:
                timer.start()
                app["a"][(it * 7 % PAGES) * PER_PAGE + it] = -it
                app.parallel(_bump, 1, args=((it * 11 % PAGES) * PER_PAGE,))
                app.checkpoint(path)
                timer.join()
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                timer.cancel()
                timer.join()
            held = app["a"].copy()
            app.checkpoint(path)
        with App.restore(path, backend="threads", workers=1) as back:
            assert np.array_equal(back["a"], held), it
    assert interrupted >= 1


@pytest.mark.parametrize("auto", [None, "segfault", "uffd"])
@pytest.mark.parametrize("how", ["readinto", "recv_into", "/proc/self/mem"])
def test_the_kernel_may_write_restored_memory_before_the_fill(saved, tmp_path, monkeypatch, auto, how):
    """Found by atk13: where "auto" measured segfault cheapest (or was the
    only mode, as for a user without userfaultfd), the restore tracker
    mprotected main memory, so read(2)/recv_into into an array failed with
    EFAULT until the first batch (cow main memory never refused them).
    Now a cow App's restore window is watched by uffd-async or nothing
    (the snapshot filled at once); what the kernel wrote is checkpointed."""
    import socket

    import pagefork.tracking

    path, expected = saved
    if auto is not None:
        require(auto)
        monkeypatch.setattr(pagefork.tracking, "auto_mode", lambda thread_local=False: auto)
    data = np.full(2 * PER_PAGE, -7, np.int64)
    with App.restore(path, backend="threads", workers=1) as app:
        target = memoryview(app["a"]).cast("B")[5 * PAGE_SIZE: 7 * PAGE_SIZE]
        if how == "readinto":
            (tmp_path / "data").write_bytes(data.tobytes())
            with open(tmp_path / "data", "rb", buffering=0) as f:
                assert f.readinto(target) == 2 * PAGE_SIZE
        elif how == "recv_into":
            a, b = socket.socketpair()
            with a, b:
                a.sendall(data.tobytes())
                got = 0
                while got < 2 * PAGE_SIZE:
                    got += b.recv_into(target[got:])
        else:
            fd = os.open("/proc/self/mem", os.O_RDWR)
            try:
                assert os.pwrite(fd, data.tobytes(), app.memory.address + 5 * PAGE_SIZE) == 2 * PAGE_SIZE
            finally:
                os.close(fd)
        expected[5 * PER_PAGE: 7 * PER_PAGE] = -7
        assert np.array_equal(app["a"], expected)
        assert app.checkpoint(path).pages == 2
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


def test_a_restore_with_tracking_none_stays_exact(saved):
    path, expected = saved
    with App.restore(path, backend="threads", workers=1, tracking="none") as app:
        app["a"][9] = -9
        expected[9] = -9
        assert app.parallel(_bump, 1, args=(10,)) == [11]
        expected[10] = 11
        assert np.array_equal(app["a"], expected)
        app.checkpoint(path)
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


# ---- regions loaded on huge pages ------------------------------------------------------------

HUGE = 2 << 20
LOADED_SIZE = 4 * HUGE
LOADED_PAGES = LOADED_SIZE // PAGE_SIZE


@pytest.fixture
def huge_saved(tmp_path):
    """A bare checkpoint of 8 MiB of random bytes: its load starts on four
    2 MiB huge pages where the kernel gives them. Returns (folder, bytes)."""
    with Region(LOADED_SIZE) as region:
        region.array(np.uint8)[:] = np.random.default_rng(7).integers(0, 256, LOADED_SIZE, np.uint8)
        ck.save(region, tmp_path / "ck")
        return tmp_path / "ck", bytes(region)


def _global(t, region, reset=True):
    return np.flatnonzero(t.dirty_pages(region, "global", reset=reset)).tolist()


def test_a_loaded_region_is_advised_no_huge_pages_again(huge_saved):
    path, expected = huge_saved
    with ck.load(path) as loaded:
        assert bytes(loaded) == expected
        flags = vma_flags_within(loaded.address, loaded.address + loaded.max_size)
        assert flags and all("nh" in f and "hg" not in f for f in flags), flags


@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async"])
def test_reset_rounds_on_a_loaded_region_while_a_thread_writes_see_each_write_once(huge_saved, mode):
    require(mode)
    path, _ = huge_saved
    pages = random.Random(5).sample(range(LOADED_PAGES), 1200)
    with ck.load(path) as loaded, pagefork.tracker(mode) as t:
        t.start(loaded)
        view = loaded.array(np.uint8)
        done = threading.Event()

        def writer():
            for page in pages:
                view[page * PAGE_SIZE + 17] ^= 1
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        seen = []
        while not done.is_set():
            seen += _global(t, loaded)
        thread.join()
        seen += _global(t, loaded)
        assert sorted(seen) == sorted(pages)


@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async"])
def test_a_loaded_region_stays_exact_through_madvise_fork_and_resize(huge_saved, mode):
    """Kernel events on memory that starts on huge pages: MADV_DONTNEED of
    part of one and of a whole one, MADV_FREE, a refused MADV_COLLAPSE, a
    fork whose child writes everything, a shrink into a huge page."""
    require(mode)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_DONTNEED, MADV_FREE, MADV_PAGEOUT, MADV_COLLAPSE = 4, 8, 21, 25
    path, expected = huge_saved
    with ck.load(path) as loaded, pagefork.tracker(mode) as t:
        t.start(loaded)
        view = loaded.array(np.uint8)
        assert libc.madvise(loaded.address + 2 * PAGE_SIZE, 3 * PAGE_SIZE, MADV_DONTNEED) == 0
        assert libc.madvise(loaded.address + HUGE, HUGE, MADV_DONTNEED) == 0
        dropped = [] if mode == "segfault" else [2, 3, 4, *range(512, 1024)]  # docs/tracking.md
        assert _global(t, loaded) == dropped
        view[3 * PAGE_SIZE] = 1
        view[HUGE + 5 * PAGE_SIZE] = 1
        view[3 * HUGE + 7] = 9
        assert _global(t, loaded) == [3, 517, 1536]
        assert libc.madvise(loaded.address + 2 * HUGE, HUGE, MADV_FREE) == 0
        view[2 * HUGE + 9 * PAGE_SIZE] = 3
        assert _global(t, loaded) == [1033]
        # Freed and reclaimed before any write: a whole huge page of zeroes.
        assert libc.madvise(loaded.address + 3 * HUGE, HUGE, MADV_FREE) == 0
        assert libc.madvise(loaded.address + 3 * HUGE, HUGE, MADV_PAGEOUT) == 0
        if not view[3 * HUGE:].any():  # reclaimed (else the kernel kept the bytes)
            assert _global(t, loaded) == ([] if mode == "segfault" else list(range(1536, 2048)))
        assert libc.madvise(loaded.address, HUGE, MADV_COLLAPSE) == -1  # no huge pages: refused
        view[100 * PAGE_SIZE] = 7
        assert _global(t, loaded) == [100]
        pid = os.fork()
        if pid == 0:
            view[:] = 0xAB
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        view[600 * PAGE_SIZE] ^= 1
        view[PAGE_SIZE] ^= 1
        assert _global(t, loaded) == [1, 600]
        untouched = 200 * PAGE_SIZE + 3
        assert view[untouched] == expected[untouched]  # the child's writes stayed its own
        del view
        cut = 2 * HUGE + 3 * PAGE_SIZE  # inside the third huge page
        loaded.resize(cut)
        loaded.resize(LOADED_SIZE)
        view = loaded.array(np.uint8)
        assert not view[cut:].any()
        view[cut - PAGE_SIZE] = 1
        view[cut] = 1
        view[-1] = 1
        assert _global(t, loaded) == [cut // PAGE_SIZE - 1, cut // PAGE_SIZE, LOADED_PAGES - 1]


@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async"])
def test_a_loaded_region_mapped_over_saved_with_its_tracker_and_loaded_again(huge_saved, tmp_path, mode):
    require(mode)
    path, expected = huge_saved
    with ck.load(path) as loaded, pagefork.tracker(mode) as t:
        t.start(loaded)
        assert ck.save(loaded, tmp_path / "again", tracker=t).base
        view = loaded.array(np.uint8)
        for page in (0, 511, 512, LOADED_PAGES - 1):
            view[page * PAGE_SIZE + 1] = 0x5A
        info = ck.save(loaded, tmp_path / "again", tracker=t)
        assert (info.base, info.pages) == (False, 4)
        with ck.load(tmp_path / "again") as back:
            assert bytes(back) == bytes(loaded)
        del view
        with Snapshot(expected) as snap:
            snap.map_to(loaded)
            _global(t, loaded)
            view = loaded.array(np.uint8)
            view[3 * PAGE_SIZE] = 1
            view[1024 * PAGE_SIZE] = 2
            assert _global(t, loaded) == [3, 1024]
            del view


# A seccomp filter making madvise(MADV_HUGEPAGE / MADV_NOHUGEPAGE) fail with
# EINVAL, as on a kernel built without transparent huge pages.
_NO_THP_KERNEL = """
    import ctypes, errno
    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
    LD, JEQ, RET = 0x20, 0x15, 0x06
    code = [(LD, 0, 0, 4), (JEQ, 0, 5, 0xC000003E), (LD, 0, 0, 0), (JEQ, 0, 3, 28),
            (LD, 0, 0, 32), (JEQ, 2, 0, 14), (JEQ, 1, 0, 15),
            (RET, 0, 0, 0x7FFF0000), (RET, 0, 0, 0x00050000 | errno.EINVAL)]
    insns = (Insn * len(code))(*[Insn(*c) for c in code])
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    prog = Prog(len(code), insns)
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # PR_SET_SECCOMP, filter
"""


def test_load_works_on_a_kernel_without_transparent_huge_pages(huge_saved):
    """There MADV_HUGEPAGE fails with EINVAL: the load must not."""
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter is written for x86-64")
    path, expected = huge_saved
    _run_ok(_NO_THP_KERNEL + f"""
    import hashlib, mmap
    import numpy as np
    import pagefork
    from pagefork import checkpoint as ck
    m = mmap.mmap(-1, 1 << 21)
    assert libc.madvise(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(m))),
                        ctypes.c_size_t(1 << 21), 14) == -1 and ctypes.get_errno() == errno.EINVAL
    with ck.load({str(path)!r}) as loaded, pagefork.tracker("segfault") as t:
        assert hashlib.sha256(loaded).hexdigest() == {__import__("hashlib").sha256(expected).hexdigest()!r}
        t.start(loaded)
        loaded.array(np.uint8)[4096 * 3] ^= 1
        assert np.flatnonzero(t.dirty_pages(loaded, "global")).tolist() == [3]
    print("ok")
    """)


def test_sigint_at_random_instants_of_a_load_leaves_no_region_on_huge_pages(huge_saved):
    """Ctrl-C lands anywhere in load (the handler raises only inside it, so
    the loop around it stays simple): a load either returns the exact
    bytes or raises KeyboardInterrupt, and no region stays advised huge."""
    path, expected = huge_saved
    result = _run(f"""
    import gc, hashlib, os, random, signal, threading, time
    from pagefork import checkpoint as ck
    want = {__import__("hashlib").sha256(expected).hexdigest()!r}
    def advised_huge():
        with open("/proc/self/smaps") as smaps:
            return sum(line.startswith("VmFlags:") and " hg" in line for line in smaps)
    armed = False
    def interrupt(signum, frame):
        global armed
        if armed:
            armed = False
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupt)
    stop = threading.Event()
    def interrupter(rng=random.Random(11)):
        while not stop.is_set():
            time.sleep(rng.random() * 0.004)
            os.kill(os.getpid(), signal.SIGINT)
    thread = threading.Thread(target=interrupter)
    thread.start()
    loads = interrupted = 0
    for _ in range(400):
        if loads >= 3 and interrupted >= 20:
            break
        try:
            armed = True
            loaded = ck.load({str(path)!r})
            armed = False
        except KeyboardInterrupt:
            interrupted += 1
            continue
        loads += 1
        assert hashlib.sha256(loaded).hexdigest() == want
        assert advised_huge() == 0
        loaded.close()
    stop.set()
    thread.join()
    gc.collect()
    assert advised_huge() == 0
    print("ok", loads, interrupted)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("mode", ["segfault", "uffd"])
def test_thread_scope_on_a_loaded_region_sees_only_this_threads_writes(huge_saved, mode):
    require(mode)
    path, _ = huge_saved
    with ck.load(path) as loaded, pagefork.tracker(mode, thread_local=True) as t:
        t.start_thread(loaded)
        view = loaded.array(np.uint8)
        view[5 * PAGE_SIZE] ^= 1
        view[HUGE + PAGE_SIZE] ^= 1
        other = threading.Thread(target=lambda: view.__setitem__(700 * PAGE_SIZE, 1))
        other.start()
        other.join()
        assert np.flatnonzero(t.dirty_pages(loaded, "thread", reset=True)).tolist() == [5, 513]
        t.stop_thread(loaded)
        view = None  # released before the region closes


def test_advise_huge_passes_on_a_failing_truth_test_and_refuses_a_closed_region_with_views():
    class Unclear:
        def __bool__(self):
            raise ZeroDivisionError("no truth")

    region = Region(4 * PAGE_SIZE)
    with pytest.raises(ZeroDivisionError):
        region._advise_huge(Unclear())
    view = memoryview(region)
    region._advise_huge(1)
    region._advise_huge(0)
    region.close()  # the view keeps the memory mapped
    with pytest.raises(ValueError, match="closed"):
        region._advise_huge(True)
    view[0] = 1
    view.release()


@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async"])
def test_four_threads_first_writing_the_same_huge_pages_at_once_are_all_seen(huge_saved, mode):
    require(mode)
    path, _ = huge_saved
    mine = [[h * 512 + 4 * j + k for h in range(4) for j in range(16)] for k in range(4)]
    with ck.load(path) as loaded, pagefork.tracker(mode) as t:
        t.start(loaded)
        view = loaded.array(np.uint8)
        together = threading.Barrier(4)

        def write(k):
            together.wait()
            for page in mine[k]:
                view[page * PAGE_SIZE + k] ^= 0xFF

        threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        seen = []
        while any(thread.is_alive() for thread in threads):
            seen += _global(t, loaded)
        for thread in threads:
            thread.join()
        seen += _global(t, loaded)
        assert sorted(seen) == sorted(page for pages in mine for page in pages)
        view = None  # released before the region closes


@pytest.mark.parametrize("mode", ["uffd", "uffd-async"])
def test_kernel_writes_into_a_loaded_region_are_seen(huge_saved, mode):
    require(mode)
    support = pagefork.probe()[mode]
    if not support.kernel_writes:  # user-mode-only userfaultfd (an unprivileged user): EFAULT
        pytest.skip(f"{mode} cannot take kernel writes here: {support.kernel_writes_reason}")
    path, _ = huge_saved
    with ck.load(path) as loaded, pagefork.tracker(mode) as t:
        t.start(loaded)
        rfd, wfd = os.pipe()
        try:
            os.write(wfd, b"x" * 10)
            view = memoryview(loaded)
            assert os.readv(rfd, [view[700 * PAGE_SIZE + 5: 700 * PAGE_SIZE + 15]]) == 10
            assert bytes(view[700 * PAGE_SIZE + 5: 700 * PAGE_SIZE + 15]) == b"x" * 10
            view.release()
        finally:
            os.close(rfd)
            os.close(wfd)
        assert _global(t, loaded) == [700]
