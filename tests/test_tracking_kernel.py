"""Kernel events that change page tables under a tracker (madvise, KSM), and
what no mode can see (docs/tracking.md, "What tracking can and cannot see"):
each statement of that page is a test here."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, Region, Snapshot

from conftest import require
from test_tracking import as_set, write_pages

libc = ctypes.CDLL(None, use_errno=True)
MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
PROT_NONE, PROT_READ = 0, 1
MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT = 4, 8, 20, 21
UFFD_MODES = ["uffd", "uffd-async"]


def madvise(region: Region, first: int, count: int, advice: int) -> None:
    rc = libc.madvise(ctypes.c_void_p(region.address + first * PAGE_SIZE),
                      ctypes.c_size_t(count * PAGE_SIZE), advice)
    if rc != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def vma_flags(address: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                inside = lo <= address < hi
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError("no VMA at that address")


# ---- madvise ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode_name", ["segfault", "uffd", "uffd-async"])
@pytest.mark.parametrize("advice", [[MADV_DONTNEED], [MADV_FREE, MADV_PAGEOUT], [MADV_PAGEOUT],
                                    [MADV_COLD]], ids=["dontneed", "free+pageout", "pageout",
                                                       "cold"])
def test_madvise_never_hides_later_writes(mode_name, advice):
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        a = region.array()
        a[::PAGE_SIZE] = 1
        t.start(region)
        for adv in advice:
            madvise(region, 0, 8, adv)
        write_pages(region, {2, 5}, 9)
        dirty = as_set(t.dirty_pages(region, "global", reset=True))
        discards = advice[-1] in (MADV_DONTNEED, MADV_PAGEOUT) and advice != [MADV_PAGEOUT]
        if discards and mode_name != "segfault":
            # the discarded pages changed too (they read as zeroes): reported
            assert dirty == set(range(8))
            assert a[0] == 0
        else:
            assert dirty == {2, 5}
        write_pages(region, {3})
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {3}
        # discarded again with no write after: the next write still shows
        for adv in advice:
            madvise(region, 0, 8, adv)
        t.dirty_pages(region, "global", reset=True)
        write_pages(region, {6})
        assert 6 in as_set(t.dirty_pages(region, "global", reset=True))
        write_pages(region, {7})
        assert as_set(t.dirty_pages(region, "global")) == {7}


def test_uffd_thread_scope_sees_discarded_pages():
    require("uffd")
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker("uffd") as t:
        region.array()[:] = 1
        t.start_thread(region)
        madvise(region, 2, 2, MADV_DONTNEED)
        assert as_set(t.dirty_pages(region, "thread")) == {2, 3}
        t.stop_thread(region)


@pytest.mark.parametrize("mode_name", UFFD_MODES)
def test_tracked_ranges_are_kept_out_of_ksm(mode_name):
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        madvise(region, 0, 8, MADV_MERGEABLE)
        assert "mg" in vma_flags(region.address)
        t.start(region)
        assert "mg" not in vma_flags(region.address)
        snap = Snapshot(size=8 * PAGE_SIZE)
        madvise(region, 0, 8, MADV_MERGEABLE)
        snap.map_to(region)  # a new mapping is re-armed, and kept out of KSM too
        assert "mg" not in vma_flags(region.address)
        snap.close()


KSM = "/sys/kernel/mm/ksm/"


@contextlib.contextmanager
def ksm_running():
    """Runs KSM as fast as it goes, merging zero pages into the zero page;
    restores every setting (and unmerges) afterwards. Root only."""
    if os.geteuid() != 0 or not os.path.exists(KSM + "run"):
        pytest.skip("needs root and CONFIG_KSM to run ksmd")
    names = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages")
    saved = {n: open(KSM + n).read().strip() for n in names}

    def put(name: str, value: object) -> None:
        with open(KSM + name, "w") as f:
            f.write(str(value))

    try:
        put("run", 0)
        put("use_zero_pages", 1)
        put("pages_to_scan", 5000)
        put("sleep_millisecs", 0)
        put("run", 1)
        yield
    finally:
        put("run", 2)  # unmerge everything merged meanwhile
        put("run", 0)
        for name in ("pages_to_scan", "sleep_millisecs", "use_zero_pages"):
            put(name, saved[name])
        put("run", saved["run"])


def ksm_full_scans(count: int = 3) -> None:
    """Waits until ksmd has scanned everything `count` more times."""
    start = int(open(KSM + "full_scans").read())
    for _ in range(60000):  # a bound, not a timing assumption: ksmd scans continuously
        if int(open(KSM + "full_scans").read()) >= start + count:
            return
        time.sleep(0.001)
    pytest.skip("ksmd made no progress")


@pytest.mark.parametrize("mode_name", ["segfault", "uffd", "uffd-async", "cow"])
def test_ksm_merging_tracked_memory_loses_no_write(mode_name):
    """Merging (into a KSM page or the zero page) replaces PTEs without their
    write-protect bit; a later write must still be seen. The memory is made
    mergeable after start, as a user (or PR_SET_MEMORY_MERGE) could."""
    require(mode_name)
    with ksm_running():
        snap = Snapshot(size=32 * PAGE_SIZE)
        region = Region(32 * PAGE_SIZE)
        t = pagefork.tracker(mode_name)
        try:
            a = region.array()
            if mode_name == "cow":
                snap.map_to(region)
                t.start(region)
                a[: 16 * PAGE_SIZE] = 7  # private copies: identical, and all-zero ones
                a[16 * PAGE_SIZE:] = 1
                a[16 * PAGE_SIZE:] = 0
            else:
                a[: 16 * PAGE_SIZE] = 7
                t.start(region)
            madvise(region, 0, 32, MADV_MERGEABLE)
            ksm_full_scans()
            write_pages(region, {3, 20}, 5)
            dirty = as_set(t.dirty_pages(region, "global"))
            assert {3, 20} <= dirty
            if mode_name == "cow":
                assert dirty == set(range(32))  # every page was written
            assert a[3 * PAGE_SIZE] == 5 and a[4 * PAGE_SIZE] == (7 if mode_name != "cow" else 7)
        finally:
            t.close()
            region.close()
            snap.close()


def test_uffd_thread_scope_misses_a_discarded_page_written_before_the_read():
    """Documented limit: the write populates the page without a fault, so no
    thread can be named; the process scope reports it."""
    require("uffd")
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker("uffd") as t:
        region.array()[:] = 1
        t.start(region)
        t.start_thread(region)
        madvise(region, 2, 1, MADV_DONTNEED)
        write_pages(region, {2})
        assert 2 in as_set(t.dirty_pages(region, "global"))
        assert 2 not in as_set(t.dirty_pages(region, "thread"))
        t.stop_thread(region)


# ---- what no mode can see ---------------------------------------------------------------

SEEING_MODES = ["segfault", "uffd", "uffd-async"]


def vma_perms(address: int) -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return perms
    raise AssertionError("no VMA at that address")


@pytest.mark.parametrize("mode_name", SEEING_MODES)
@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_another_process_writing_shared_memory_is_not_seen(mode_name, backing):
    require(mode_name)
    with Region(8 * PAGE_SIZE, shared=True, backing=backing) as region, \
            pagefork.tracker(mode_name) as t:
        t.start(region)
        pid = os.fork()
        if pid == 0:  # a forked child writes the shared pages
            region.array()[4 * PAGE_SIZE] = 9
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        if backing == "memfd":  # an unrelated process maps the memfd and writes it
            path = f"/proc/{os.getpid()}/fd/{region._fd}"
            code = ("import mmap, os; fd = os.open(%r, os.O_RDWR); "
                    "m = mmap.mmap(fd, %d); m[%d] = 7; m.close()") % (path, 8 * PAGE_SIZE,
                                                                     6 * PAGE_SIZE)
            subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        a = region.array()
        assert a[4 * PAGE_SIZE] == 9 and a[6 * PAGE_SIZE] == (7 if backing == "memfd" else 0)
        assert as_set(t.dirty_pages(region, "global")) == set()


@pytest.mark.parametrize("mode_name", SEEING_MODES + ["cow"])
@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_writes_through_the_file_are_not_seen(mode_name, shared):
    require(mode_name)
    if mode_name == "cow" and shared:
        pytest.skip("cow tracks private mappings only")
    with Region(8 * PAGE_SIZE, shared=shared, backing="memfd") as region, \
            pagefork.tracker(mode_name) as t:
        t.start(region)
        os.pwrite(region._fd, b"file", 2 * PAGE_SIZE)
        assert bytes(region.array()[2 * PAGE_SIZE:2 * PAGE_SIZE + 4]) == b"file"
        assert as_set(t.dirty_pages(region, "global")) == set()


@pytest.mark.parametrize("mode_name", SEEING_MODES + ["cow"])
def test_writes_through_proc_self_mem(mode_name):
    require(mode_name)
    backing = "memfd" if mode_name == "cow" else "anonymous"
    with Region(8 * PAGE_SIZE, backing=backing) as region, pagefork.tracker(mode_name) as t:
        t.start(region)
        fd = os.open("/proc/self/mem", os.O_RDWR)
        try:
            if mode_name == "uffd":
                with pytest.raises(OSError) as info:
                    os.pwrite(fd, b"m", region.address + 3 * PAGE_SIZE)
                assert info.value.errno == errno.EIO
            else:
                os.pwrite(fd, b"m", region.address + 3 * PAGE_SIZE)
        finally:
            os.close(fd)
        written = mode_name != "uffd"
        assert region.array()[3 * PAGE_SIZE] == (ord("m") if written else 0)
        seen = as_set(t.dirty_pages(region, "global"))
        assert seen == (set() if mode_name in ("segfault", "uffd") else {3})


def test_segfault_mode_undoes_your_own_mprotect():
    require("segfault")
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker("segfault") as t:
        t.start(region)
        assert libc.mprotect(ctypes.c_void_p(region.address + 5 * PAGE_SIZE), PAGE_SIZE,
                             PROT_READ) == 0
        write_pages(region, {5})  # succeeds instead of crashing, and is reported
        assert as_set(t.dirty_pages(region, "global")) == {5}
        assert libc.mprotect(ctypes.c_void_p(region.address + 6 * PAGE_SIZE), PAGE_SIZE,
                             PROT_NONE) == 0
        t.stop(region)
        assert vma_perms(region.address + 6 * PAGE_SIZE).startswith("rw")


@pytest.mark.parametrize("mode_name", UFFD_MODES)
def test_uffd_modes_keep_your_own_mprotect(mode_name):
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        t.start(region)
        assert libc.mprotect(ctypes.c_void_p(region.address + 5 * PAGE_SIZE), PAGE_SIZE,
                             PROT_READ) == 0
        t.dirty_pages(region, "global", reset=True)
        t.stop(region)
        assert vma_perms(region.address + 5 * PAGE_SIZE).startswith("r-")
        assert vma_perms(region.address + 4 * PAGE_SIZE).startswith("rw")


# ---- pagefork doctor ------------------------------------------------------------------


def test_setting_warnings(tmp_path):
    from pagefork.tracking import MAX_MAP_COUNT_ADVISED, setting_warnings

    ksm, maps = tmp_path / "run", tmp_path / "max_map_count"
    ksm.write_text("0\n")
    maps.write_text(f"{MAX_MAP_COUNT_ADVISED}\n")
    assert setting_warnings(str(ksm), str(maps)) == []
    ksm.write_text("1\n")
    maps.write_text("65530\n")
    found = setting_warnings(str(ksm), str(maps))
    assert len(found) == 2
    assert found[0].startswith("KSM is running")
    assert "vm.max_map_count=65530" in found[1] and "32765 scattered" in found[1]
    assert setting_warnings(str(tmp_path / "missing"), str(tmp_path / "missing")) == []


def test_doctor_prints_the_warnings():
    from pagefork.tracking import setting_warnings

    result = subprocess.run([sys.executable, "-m", "pagefork.cli", "doctor"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for warning in setting_warnings():
        assert " ".join(warning.split())[:60] in text
    if os.geteuid() == 0 and os.path.exists(KSM + "run"):
        with ksm_running():
            result = subprocess.run([sys.executable, "-m", "pagefork.cli", "doctor", "--json"],
                                    capture_output=True, text=True, timeout=300)
        assert "KSM is running" in result.stdout
