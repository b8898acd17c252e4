"""Tracking under concurrency: resizes, forks, garbage collection, threads
sharing a tracker, restarts and exits while other threads write. Each test
names the way a write could be lost, a page misreported, or the process
taken down."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, Region

from support import KINDS, SEEING_MODES, as_set, require
from support import run_python as run_script

KIND_IDS = list(KINDS)


# ---- resize --------------------------------------------------------------------------


class _WritesRightAfterResize(Region):
    """Writes one grown page the moment the memory has grown: what another
    Python thread can do as soon as Region.resize's native call returns."""

    def _resize(self, size: int) -> None:
        old = self.size
        super()._resize(size)
        if size > old:
            view = memoryview(self)
            view[old + 1] = 9
            view.release()


@pytest.mark.parametrize("mode_name", SEEING_MODES)
@pytest.mark.parametrize("kind", KIND_IDS)
def test_grown_pages_are_armed_before_python_code_runs(mode_name, kind):
    require(mode_name)
    with _WritesRightAfterResize(4 * PAGE_SIZE, max_size=8 * PAGE_SIZE, **KINDS[kind]) as region, \
            pagefork.tracker(mode_name) as t:
        t.start(region)
        region.resize(8 * PAGE_SIZE)
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {4}
        region.resize(2 * PAGE_SIZE)
        region.resize(6 * PAGE_SIZE)
        assert as_set(t.dirty_pages(region, "global")) == {2}


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_forked_child_resizes_a_region_the_parent_tracks(mode_name):
    require(mode_name)
    result = run_script(f"""
        import os
        import numpy as np
        import pagefork
        from pagefork import PAGE_SIZE, Region
        r = Region(4 * PAGE_SIZE, max_size=8 * PAGE_SIZE)
        t = pagefork.tracker({mode_name!r})
        t.start(r)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                r.resize(8 * PAGE_SIZE)
                r.array()[7 * PAGE_SIZE] = 1
                r.resize(2 * PAGE_SIZE)
                r.array()[PAGE_SIZE] = 3
            except BaseException as exc:
                print("child:", type(exc).__name__, exc, flush=True)
                status = 1
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        r.array()[2 * PAGE_SIZE] = 1
        assert np.flatnonzero(t.dirty_pages(r, "global")).tolist() == [2]
        r.resize(8 * PAGE_SIZE)
        r.array()[6 * PAGE_SIZE] = 1
        assert np.flatnonzero(t.dirty_pages(r, "global")).tolist() == [2, 6]
        print("ok")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\n"


# ---- one tracker, several threads ------------------------------------------------------


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_garbage_collection_under_the_tracker_lock_does_not_hang(mode_name):
    """Any allocation while the tracker holds its lock can start a collection
    that frees a tracked region in a reference cycle; its weakref callback
    then forgets that region, on the same thread."""
    require(mode_name)
    result = run_script(f"""
        import gc
        import pagefork
        from pagefork import PAGE_SIZE, Region

        class CollectsOnLookup(dict):
            def get(self, key, default=None):  # runs with the tracker's lock held
                gc.collect()
                return dict.get(self, key, default)

        t = pagefork.tracker({mode_name!r})
        cyclic = Region(PAGE_SIZE)
        cyclic.me = cyclic
        t.start(cyclic)
        del cyclic
        t._regions = CollectsOnLookup(t._regions)
        other = Region(PAGE_SIZE)
        t.start(other)
        other.array()[5] = 1
        assert t.dirty_pages(other, "global").tolist() == [True]
        assert len(t._regions) == 1
        print("ok")
    """, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\n"


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_threads_sharing_one_tracker_never_see_another_tracker(mode_name):
    """start/stop/close/dirty_pages/resize of one tracker from several threads
    at once: no spurious "tracked by another Tracker", no size mismatch, and
    the tracker still reports exact sets afterwards."""
    require(mode_name)
    import random
    import threading

    tracker = pagefork.tracker(mode_name)
    regions = [Region(4 * PAGE_SIZE, max_size=8 * PAGE_SIZE) for _ in range(2)]
    errors: list[str] = []
    old_interval = sys.getswitchinterval()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1500):
            region = rng.choice(regions)
            op = rng.randrange(6)
            try:
                if op == 0:
                    tracker.start(region)
                elif op == 1:
                    tracker.stop(region)
                elif op == 2:
                    tracker.dirty_pages(region, "global", reset=rng.random() < 0.5)
                elif op == 3 and rng.random() < 0.2:
                    tracker.close()
                elif op == 4:
                    region.resize(rng.choice([4, 8]) * PAGE_SIZE)
                else:
                    try:
                        region.array()[rng.randrange(4) * PAGE_SIZE] += 1
                    except pagefork.OutOfBoundsError:
                        pass  # Region.array raced a shrink (not tracking's concern)
            except pagefork.PageforkError as exc:
                if "never tracked" not in str(exc):
                    errors.append(repr(exc))
            except BufferError:
                pass  # shrinking while another thread holds a view
            except Exception as exc:
                errors.append(repr(exc))

    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == []
    tracker.close()
    for region in regions:
        tracker.start(region)
        region.array()[[0, 3 * PAGE_SIZE]] += 1
        assert as_set(tracker.dirty_pages(region, "global")) == {0, 3}
        region.close()
    tracker.close()


# ---- start again while writers run ---------------------------------------------------------


def _writable_pages(region: Region) -> np.ndarray:
    """Pages of region that /proc/self/maps shows writable (segfault mode's
    protection state)."""
    out = np.zeros(region.n_pages, dtype=np.bool_)
    lo0, hi0 = region.address, region.address + region.size
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi > lo0 and lo < hi0 and "w" in perms:
                out[(max(lo, lo0) - lo0) // PAGE_SIZE:(min(hi, hi0) - lo0) // PAGE_SIZE] = True
    return out


def test_start_again_while_writers_run_leaves_no_page_writable_and_unmarked():
    """start (and start_thread) on a region already tracked clear the flags
    and protect every page. A fault handler straddling the two used to
    un-protect its page after the protect, with its mark already cleared:
    every later write to that page went unseen until the next arm. After
    each start, a page segfault mode left writable must be marked."""
    require("segfault")
    import threading

    from pagefork import _native

    pages, rounds = 64, 1000
    region = Region(pages * PAGE_SIZE)
    tracker = pagefork.tracker("segfault")
    stop = threading.Event()

    def writer(slot: int) -> None:
        seq, seed = 1, 0x9E3779B97F4A7C15 * (slot + 1) & (2**64 - 1)
        while not stop.is_set():
            seed = _native._scribble(region.address, pages, slot, seq, 1 << 12, seed)
            seq += 1 << 12

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    tracker.start(region)
    unmarked = 0
    try:
        for th in threads:
            th.start()
        for _ in range(rounds):
            tracker.start(region)
            writable = _writable_pages(region)  # before the flags: a mark precedes un-protecting
            unmarked += int(np.count_nonzero(writable & ~tracker.dirty_pages(region, "global")))
    finally:
        stop.set()
        for th in threads:
            th.join()
        tracker.close()
        region.close()
    assert unmarked == 0


# ---- interpreter exit -------------------------------------------------------------------------


@pytest.mark.parametrize("mode_name", SEEING_MODES)
@pytest.mark.parametrize("faulthandler", [False, True], ids=["plain", "faulthandler"])
def test_exit_with_native_writers_still_writing(mode_name, faulthandler):
    """Daemon threads keep writing tracked memory at native speed (no GIL)
    while the interpreter exits and frees the module-level tracker and
    regions: no crash, no hang, nothing on stderr."""
    require(mode_name)
    result = run_script(f"""
        import faulthandler, threading
        import pagefork
        from pagefork import PAGE_SIZE, Region, _native
        if {faulthandler!r}:
            faulthandler.enable()
        r = Region(64 * PAGE_SIZE)
        t = pagefork.tracker({mode_name!r})
        t.start(r)

        def writer(view, slot):
            seed = slot + 1
            while True:
                seed = _native._scribble(view.ctypes.data, 64, slot, 1, 1 << 14, seed)

        for i in range(3):
            threading.Thread(target=writer, args=(r.array(), i), daemon=True).start()
        t.dirty_pages(r, "global", reset=True)
        if {mode_name!r} != "uffd-async":
            t2 = pagefork.tracker({mode_name!r})
            r2 = Region(8 * PAGE_SIZE)
            t2.start_thread(r2)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# ---- fork ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode_name", SEEING_MODES)
@pytest.mark.parametrize("how", ["close", "exit"])
def test_child_without_the_tracked_memory_closes_silently(mode_name, how):
    """MADV_DONTFORK: the child has no copy of the tracked region at all.
    Closing (or freeing at exit) the inherited tracker there must stay
    silent, and the parent's tracking exact."""
    require(mode_name)
    result = run_script(f"""
        import ctypes, os, sys
        import numpy as np
        import pagefork
        from pagefork import PAGE_SIZE, Region
        libc = ctypes.CDLL(None, use_errno=True)
        r = Region(8 * PAGE_SIZE)
        t = pagefork.tracker({mode_name!r})
        t.start(r)
        assert libc.madvise(ctypes.c_void_p(r.address), ctypes.c_size_t(8 * PAGE_SIZE), 10) == 0
        pid = os.fork()
        if pid == 0:
            if {how!r} == "close":
                try:
                    t.close()
                except BaseException as exc:
                    print("child:", type(exc).__name__, exc, flush=True)
                    os._exit(1)
            sys.exit(0)  # frees the tracker and the region at interpreter exit
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        r.array()[3 * PAGE_SIZE] = 1
        assert np.flatnonzero(t.dirty_pages(r, "global")).tolist() == [3]
        print("ok")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\n"
    assert result.stderr == ""


