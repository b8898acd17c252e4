"""Dirty tracking: every mode x every kind of memory, exact page sets."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, PageforkError, Region, UnsupportedModeError
from pagefork import _native

from support import (SANITIZED, as_set, expected, growth_rounds, kind_supports, make_region, open_fds, remap, require,
                     rss_kib, run_python, write_pages)


def rearm(mode: str, tracker, region) -> None:
    if mode == "cow":
        remap(region)
    tracker.start(region)


# ---- the matrix ---------------------------------------------------------------


def test_exact_dirty_set(tracked):
    mode, tracker, region = tracked
    tracker.start(region)
    pages = {0, 3, 4, 15}
    write_pages(region, pages, 7, offset=123)
    assert as_set(tracker.dirty_pages(region, "global")) == expected(mode, pages, 16)
    assert as_set(tracker.dirty_pages(region)) == expected(mode, pages, 16)
    tracker.stop(region)
    a = region.array(np.uint8)
    for p in range(16):  # tracking never changes the data
        assert a[p * PAGE_SIZE + 123] == (7 if p in pages else 0)


def test_reads_never_mark(tracked):
    mode, tracker, region = tracked
    write_pages(region, range(8), 3)  # populate some pages before tracking
    if mode == "cow":
        remap(region)
    tracker.start(region)
    total = int(region.array(np.uint8).sum())  # read every page
    assert total == (0 if mode == "cow" else 8 * 3)
    assert as_set(tracker.dirty_pages(region)) == expected(mode, (), 16)
    tracker.stop(region)


def test_flags_survive_stop_and_start_clears(tracked):
    mode, tracker, region = tracked
    tracker.start(region)
    write_pages(region, {2, 5})
    tracker.stop(region)
    write_pages(region, {9})  # not tracked
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {2, 5}, 16)
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {2, 5}, 16)  # reading twice
    rearm(mode, tracker, region)
    assert as_set(tracker.dirty_pages(region)) == expected(mode, (), 16)
    write_pages(region, {2, 11}, 5)  # re-armed: a page written before counts again
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {2, 11}, 16)
    tracker.stop(region)


def test_reading_while_tracking_keeps_accumulating(tracked):
    mode, tracker, region = tracked
    tracker.start(region)
    write_pages(region, {1})
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {1}, 16)
    write_pages(region, {1, 6}, 2)
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {1, 6}, 16)
    tracker.reset()
    if mode != "cow":  # cow cannot forget a copied page without a remap
        assert as_set(tracker.dirty_pages(region)) == expected(mode, (), 16)
        write_pages(region, {1, 12}, 3)
        assert as_set(tracker.dirty_pages(region)) == expected(mode, {1, 12}, 16)
    tracker.stop(region)


def test_resize_while_tracked(tracked):
    mode, tracker, region = tracked
    tracker.start(region)
    region.resize(24 * PAGE_SIZE)
    write_pages(region, {3, 17, 23})
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {3, 17, 23}, 24)
    region.resize(12 * PAGE_SIZE)
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {3}, 12)
    region.resize(32 * PAGE_SIZE)
    write_pages(region, {20, 31})
    assert as_set(tracker.dirty_pages(region)) == expected(mode, {3, 20, 31}, 32)
    tracker.stop(region)
    a = region.array(np.uint8)
    assert a[3 * PAGE_SIZE] == 1 and a[20 * PAGE_SIZE] == 1 and a[17 * PAGE_SIZE] == 0


def test_several_regions_independently(mode):
    kind = "memfd-private" if mode == "cow" else "anon-private"
    tracker = pagefork.tracker(mode)
    regions = [make_region(kind, 8) for _ in range(4)]
    try:
        for r in regions[:3]:
            tracker.start(r)
        for i, r in enumerate(regions):
            write_pages(r, {i, 7})
        tracker.stop(regions[1])
        write_pages(regions[1], {5})
        for i, r in enumerate(regions[:3]):
            assert as_set(tracker.dirty_pages(r)) == expected(mode, {i, 7}, 8)
        with pytest.raises(PageforkError, match="never tracked"):
            tracker.dirty_pages(regions[3])
        rearm(mode, tracker, regions[0])  # restarting one leaves the others alone
        assert as_set(tracker.dirty_pages(regions[2])) == expected(mode, {2, 7}, 8)
    finally:
        tracker.close()
        for r in regions:
            r.close()


def test_unsupported_memory_kinds_are_refused(kind):
    if kind_supports("cow", kind):
        pytest.skip("cow supports this kind")
    require("cow")
    with make_region(kind) as region, pagefork.tracker("cow") as tracker:
        with pytest.raises(PageforkError, match="cow tracks only"):
            tracker.start(region)


def test_cow_refuses_memory_already_copied():
    require("cow")
    with make_region("memfd-private", 4) as region, pagefork.tracker("cow") as tracker:
        write_pages(region, {1})
        with pytest.raises(PageforkError, match="already private copies"):
            tracker.start(region)
        remap(region)
        tracker.start(region)
        write_pages(region, {2})
        assert as_set(tracker.dirty_pages(region)) == {2}


@pytest.mark.parametrize("scan", [True, False], ids=["pagemap_scan", "pagemap_read"])
def test_cow_both_pagemap_paths(scan):
    require("cow")
    _native._set_pagemap_scan(scan)
    try:
        with make_region("memfd-private", 64) as region, pagefork.tracker("cow") as tracker:
            tracker.start(region)
            region.array(np.uint8).sum()  # reads map the file's pages, never copies
            write_pages(region, {0, 31, 32, 63})
            assert as_set(tracker.dirty_pages(region)) == {0, 31, 32, 63}
    finally:
        _native._set_pagemap_scan(True)


def test_one_tracker_per_region():
    with Region(PAGE_SIZE) as region:
        a, b = pagefork.tracker("segfault"), pagefork.tracker("none")
        a.start(region)
        with pytest.raises(PageforkError, match="another Tracker"):
            b.start(region)
        a.close()
        b.start(region)
        b.close()


def test_closing_the_region_stops_tracking(mode):
    kind = "memfd-private" if mode == "cow" else "anon-private"
    tracker = pagefork.tracker(mode)
    region = make_region(kind, 4)
    tracker.start(region)
    region.close()
    with pytest.raises(PageforkError, match="closed"):
        tracker.dirty_pages(region)
    tracker.close()


# ---- thread-local scope --------------------------------------------------------


def test_thread_local_under_contention(thread_mode):
    n_threads, pages_each, loops = 100, 3, 20
    with Region(n_threads * pages_each * PAGE_SIZE) as region, pagefork.tracker(thread_mode) as tracker:
        a = region.array(np.uint8)
        for loop in range(loops):
            tracker.start(region)
            barrier = threading.Barrier(n_threads)
            seen: dict[int, set[int]] = {}
            errors: list[BaseException] = []

            def work(i: int) -> None:
                try:
                    tracker.start_thread(region)
                    mine = [i * pages_each + k for k in range(pages_each)]
                    barrier.wait()
                    for p in mine:  # one byte at a time, interleaved with the others
                        a[p * PAGE_SIZE + loop] = (i + loop) % 251 + 1
                    tracker.stop_thread(region)
                    seen[i] = as_set(tracker.dirty_pages(region, "thread"))
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            total = n_threads * pages_each
            for i in range(n_threads):
                mine = {i * pages_each + k for k in range(pages_each)}
                assert seen[i] == expected(thread_mode, mine, total), f"thread {i}, loop {loop}"
            assert as_set(tracker.dirty_pages(region, "global")) == set(range(total))
            assert as_set(tracker.dirty_pages(region, "thread")) == expected(thread_mode, (), total)
            tracker.stop(region)
            for i in range(n_threads):
                assert a[i * pages_each * PAGE_SIZE + loop] == (i + loop) % 251 + 1


def test_thread_scope_without_global(thread_mode):
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(thread_mode) as tracker:
        tracker.start_thread(region)
        write_pages(region, {4})
        assert as_set(tracker.dirty_pages(region, "thread")) == expected(thread_mode, {4}, 8)
        assert as_set(tracker.dirty_pages(region, "global")) == expected(thread_mode, (), 8)
        tracker.stop_thread(region)
        write_pages(region, {5})
        assert as_set(tracker.dirty_pages(region, "both")) == expected(thread_mode, {4}, 8)


@pytest.mark.parametrize("mode_name", ["uffd-async", "cow", "softpte"])
def test_modes_without_thread_scope(mode_name):
    require(mode_name)
    assert not pagefork.probe()[mode_name].thread_local
    with Region(PAGE_SIZE, backing="memfd") as region, pagefork.tracker(mode_name) as tracker:
        with pytest.raises(UnsupportedModeError, match="thread-local"):
            tracker.start_thread(region)
        tracker.start(region)
        with pytest.raises(UnsupportedModeError, match="thread-local"):
            tracker.dirty_pages(region, "thread")
    with pytest.raises(UnsupportedModeError):
        pagefork.tracker(mode_name, thread_local=True)


# ---- kernel writes --------------------------------------------------------------


def expected_kernel_writes(mode: str) -> bool:
    """Where kernel writes into tracked memory work, from first principles:
    the kernel never raises SIGSEGV for its own accesses, and user-mode-only
    userfaultfd does not hand kernel faults to the handler (async
    write-protect resolves them in the kernel, without a handler)."""
    if mode == "segfault":
        return False
    if mode == "uffd":
        return not _native.uffd_probe()[2]
    return True


def test_probe_reports_kernel_writes(mode):
    support = pagefork.probe()[mode]
    assert support.kernel_writes is expected_kernel_writes(mode)
    assert (support.kernel_writes_reason == "") is support.kernel_writes
    if mode == "segfault":
        assert "EFAULT" in support.kernel_writes_reason
    if mode == "uffd" and not support.kernel_writes:
        assert "user-mode-only" in support.kernel_writes_reason


def test_probe_kernel_writes_of_unavailable_modes():
    for support in pagefork.probe().values():
        if not support.available:
            assert not support.kernel_writes
            assert support.kernel_writes_reason == "the mode is unavailable"


def test_kernel_writes_into_tracked_memory(mode):
    """readv into tracked pages: works and is tracked exactly where the probe
    says so; elsewhere fails with EFAULT, leaving the memory and flags clean."""
    kind = "memfd-private" if mode == "cow" else "anon-private"
    works = pagefork.probe()[mode].kernel_writes
    with make_region(kind, 8) as region, pagefork.tracker(mode) as tracker:
        tracker.start(region)
        r, w = os.pipe()
        view = memoryview(region)
        try:
            payload = bytes(range(256)) * 16
            os.write(w, payload + payload)
            targets = [view[2 * PAGE_SIZE: 2 * PAGE_SIZE + 4096],
                       view[5 * PAGE_SIZE + 100: 5 * PAGE_SIZE + 100 + 4096]]
            if works:
                assert os.readv(r, targets) == 8192
                assert bytes(targets[0]) == payload and bytes(targets[1]) == payload
            else:
                with pytest.raises(OSError) as info:
                    os.readv(r, targets)
                assert info.value.errno == errno.EFAULT
                assert bytes(view) == bytes(len(view))
        finally:
            view.release()
            os.close(r)
            os.close(w)
        dirty = as_set(tracker.dirty_pages(region))
        if mode == "none":
            assert dirty == set(range(8))
        elif works:
            assert dirty == {2, 5} | ({6} if PAGE_SIZE == 4096 else set())
        else:
            assert dirty == set()
        # The memory stays usable from user space after a refused kernel write.
        region.array(np.uint8)[3 * PAGE_SIZE] = 9
        assert 3 in as_set(tracker.dirty_pages(region))


# ---- signal handling -------------------------------------------------------------


def test_faulthandler_between_rounds_and_real_crash_reported():
    require("segfault")
    result = run_python("""
        import ctypes, faulthandler, sys
        import numpy as np
        import pagefork
        region = pagefork.Region(8 * pagefork.PAGE_SIZE)
        t = pagefork.tracker("segfault")
        a = region.array(np.uint8)
        t.start(region); a[0] = 1; t.stop(region)
        assert np.flatnonzero(t.dirty_pages(region)).tolist() == [0]
        faulthandler.enable()
        t.start(region); a[3 * pagefork.PAGE_SIZE] = 1; t.stop(region)
        assert np.flatnonzero(t.dirty_pages(region)).tolist() == [3], t.dirty_pages(region)
        t.start(region)
        print("rounds ok", flush=True)
        ctypes.string_at(0)  # a real crash, outside any tracked region
    """)
    assert "rounds ok" in result.stdout, result.stderr
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert result.stderr.count("Fatal Python error") == 1
    assert result.returncode == -11


def test_real_crash_without_faulthandler_still_dies_by_sigsegv():
    require("segfault")
    result = run_python("""
        import ctypes, pagefork
        region = pagefork.Region(pagefork.PAGE_SIZE)
        t = pagefork.tracker("segfault"); t.start(region)
        ctypes.string_at(0)
    """)
    assert result.returncode == -11


def test_write_to_read_only_memory_outside_tracking_still_crashes():
    require("segfault")
    result = run_python("""
        import ctypes, faulthandler, mmap
        import numpy as np
        import pagefork
        faulthandler.enable()
        region = pagefork.Region(pagefork.PAGE_SIZE)
        t = pagefork.tracker("segfault"); t.start(region)
        read_only = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ)
        ctypes.memset(np.frombuffer(read_only, np.uint8).ctypes.data, 1, 1)
    """)
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert result.returncode == -11


# ---- resources --------------------------------------------------------------------


def test_no_fd_or_memory_growth(mode):
    kind = "memfd-private" if mode == "cow" else "anon-private"
    with make_region(kind, 64) as region:
        tracker = pagefork.tracker(mode)

        def cycles(n: int) -> None:
            for i in range(n):
                if mode == "cow":
                    remap(region)
                tracker.start(region)
                write_pages(region, {i % 64})
                tracker.dirty_pages(region)
                tracker.stop(region)
                if mode in ("segfault", "uffd"):
                    tracker.start_thread(region)
                    tracker.stop_thread(region)

        cycles(growth_rounds(300))  # warm up allocators and caches
        fds, rss = open_fds(), rss_kib()
        cycles(growth_rounds(3000))
        assert open_fds() == fds
        if not SANITIZED:  # ASan's quarantine keeps freed memory
            assert rss_kib() - rss < 4096, "RSS grew by more than 4 MiB over 3000 cycles"
        # Fresh trackers and regions each time: nothing leaks either.
        for _ in range(growth_rounds(500)):
            with make_region(kind, 4) as r, pagefork.tracker(mode) as t:
                t.start(r)
                write_pages(r, {1})
                t.dirty_pages(r)
        assert open_fds() == fds
        tracker.close()


# ---- choosing a mode ---------------------------------------------------------------


def test_probe_reports_every_mode_with_reasons():
    support = pagefork.probe()
    assert tuple(support) == pagefork.MODES
    for mode, s in support.items():
        assert s.mode == mode
        assert s.available == (s.reason == "")
    assert support["none"].available and support["none"].thread_local
    assert pagefork.probe(refresh=True) == support


def test_unavailable_mode_raises_with_reason():
    missing = [s for s in pagefork.probe().values() if not s.available]
    if not missing:
        pytest.skip("every mode works here")
    with pytest.raises(UnsupportedModeError) as info:
        pagefork.tracker(missing[0].mode)
    assert info.value.reason == missing[0].reason
    assert missing[0].reason in str(info.value)


def test_softpte_reason_names_the_kernel_option():
    support = pagefork.probe()["softpte"]
    if support.available:
        pytest.skip("soft-dirty works here")
    assert "CONFIG_MEM_SOFT_DIRTY" in support.reason or "not accessible" in support.reason


def test_tracker_names_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="'segfault'"):
        pagefork.tracker("mprotect")
    monkeypatch.setenv("PAGEFORK_TRACKING", "none")
    assert pagefork.tracker().mode == "none"
    monkeypatch.setenv("PAGEFORK_TRACKING", "bogus")
    with pytest.raises(ValueError, match="valid"):
        pagefork.tracker()
    monkeypatch.delenv("PAGEFORK_TRACKING")
    from pagefork.tracking import write_costs

    costs = write_costs()
    assert pagefork.tracker().mode == min(costs, key=costs.__getitem__)
    assert set(costs) == {m for m in ("uffd-async", "uffd", "segfault") if pagefork.probe()[m].available}
    assert pagefork.probe()[pagefork.tracker(thread_local=True).mode].thread_local


def test_bad_scope_and_argument_types():
    with Region(PAGE_SIZE) as region, pagefork.tracker("none") as tracker:
        tracker.start(region)
        with pytest.raises(ValueError, match="scope"):
            tracker.dirty_pages(region, "all")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            tracker.start(bytearray(10))  # type: ignore[arg-type]
