"""Kernel events that change page tables under a tracker (madvise, KSM), and
what no mode can see (docs/tracking.md, "What tracking can and cannot see"):
each statement of that page is a test here."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, PageforkError, Region, Snapshot
from pagefork._system import kernel_release

from support import (KINDS, SANITIZED, SEEING_MODES, as_set, madvise, require, unprivileged_prefix, vma_flags,
                     write_pages)
from support import run_python as run_script

libc = ctypes.CDLL(None, use_errno=True)
MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
PROT_NONE, PROT_READ = 0, 1
MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MADV_COLD, MADV_PAGEOUT = 4, 8, 9, 20, 21
UFFD_MODES = ["uffd", "uffd-async"]


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
            code = (f"import mmap, os; fd = os.open({path!r}, os.O_RDWR); "
                    f"m = mmap.mmap(fd, {8 * PAGE_SIZE}); m[{6 * PAGE_SIZE}] = 7; m.close()")
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


# ---- populating, guard regions, protections of your own -------------------------------

MADV_POPULATE_WRITE, MADV_GUARD_INSTALL, MADV_GUARD_REMOVE = 23, 102, 103
PROT_RW = 3


def page_at(region: Region, page: int) -> ctypes.c_void_p:
    return ctypes.c_void_p(region.address + page * PAGE_SIZE)


def tracked_region(mode_name: str, pages: int = 8) -> tuple[Region, Snapshot | None]:
    """A region of ones (cow: a fresh snapshot mapping of zeroes) to track."""
    if mode_name == "cow":
        snap = Snapshot(size=pages * PAGE_SIZE)
        region = Region(pages * PAGE_SIZE, backing="memfd")
        snap.map_to(region)
        return region, snap
    region = Region(pages * PAGE_SIZE)
    region.array()[:] = 1
    return region, None


def changed_pages(region: Region, before: bytes) -> set[int]:
    now = np.frombuffer(bytes(region.array()), np.uint8).reshape(region.n_pages, PAGE_SIZE)
    was = np.frombuffer(before, np.uint8).reshape(region.n_pages, PAGE_SIZE)
    return set(np.flatnonzero((now != was).any(axis=1)).tolist())


#: Why the mlock tests skip under `make test-sanitize`.
ASAN_MLOCK = "AddressSanitizer turns mlock, munlock, mlockall and munlockall into no-ops"


@pytest.mark.parametrize("mode_name", SEEING_MODES + ["cow"])
@pytest.mark.parametrize("how", ["mlock", "populate_write"])
def test_populating_for_writing_reports_unchanged_pages(mode_name, how):
    """mlock and MADV_POPULATE_WRITE fault pages in for writing without
    changing a byte: the uffd modes and cow report them (cow until mapped
    again); segfault's read-only protection turns them into read faults
    (mlock) or refuses them (EINVAL)."""
    require(mode_name)
    if mode_name == "uffd" and not pagefork.probe()["uffd"].kernel_writes:
        pytest.skip("uffd here fails the kernel's own faults: "
                    + pagefork.probe()["uffd"].kernel_writes_reason)
    if how == "mlock" and SANITIZED:
        pytest.skip(ASAN_MLOCK)
    region, snap = tracked_region(mode_name)
    try:
        with pagefork.tracker(mode_name) as t:
            t.start(region)
            before = bytes(region.array())
            if how == "mlock":
                rc = libc.mlock(page_at(region, 2), ctypes.c_size_t(3 * PAGE_SIZE))
            else:
                rc = libc.madvise(page_at(region, 2), ctypes.c_size_t(3 * PAGE_SIZE),
                                  MADV_POPULATE_WRITE)
            err = ctypes.get_errno() if rc else 0
            if mode_name == "segfault":
                assert err == (0 if how == "mlock" else errno.EINVAL)
                assert as_set(t.dirty_pages(region, "global")) == set()
            else:
                assert err == 0
                assert as_set(t.dirty_pages(region, "global")) == {2, 3, 4}
            assert changed_pages(region, before) == set()
            if mode_name == "cow":  # private copies now: reported until the next map_to
                assert as_set(t.dirty_pages(region, "global")) == {2, 3, 4}
            else:
                t.dirty_pages(region, "global", reset=True)
                write_pages(region, {6}, 7)
                assert as_set(t.dirty_pages(region, "global")) == {6}
            if how == "mlock":
                libc.munlock(page_at(region, 2), ctypes.c_size_t(3 * PAGE_SIZE))
    finally:
        region.close()
        if snap is not None:
            snap.close()


def guard(region: Region, first: int, count: int, advice: int) -> None:
    if libc.madvise(page_at(region, first), ctypes.c_size_t(count * PAGE_SIZE), advice) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and advice == MADV_GUARD_INSTALL:
            pytest.skip(f"{kernel_release()} has no MADV_GUARD_INSTALL (Linux 6.13)")
        raise OSError(err, os.strerror(err))


@pytest.mark.parametrize("mode_name", SEEING_MODES + ["cow"])
def test_guard_regions(mode_name):
    """MADV_GUARD_INSTALL drops the pages (a private copy reverts to the
    file's page, anonymous memory to zeroes) and leaves a marker that faults
    every access. segfault mode does not see the zeroed pages; the uffd
    modes report them; cow counts a marker as a written page while it is
    installed (a false positive: removed, the page is the file's again, but
    flags once read stay set until the memory is mapped again)."""
    require(mode_name)
    region, snap = tracked_region(mode_name)
    try:
        with pagefork.tracker(mode_name) as t:
            t.start(region)
            before = bytes(region.array())
            guard(region, 2, 2, MADV_GUARD_INSTALL)
            reported = as_set(t.dirty_pages(region, "global"))
            assert reported == (set() if mode_name == "segfault" else {2, 3})
            guard(region, 2, 2, MADV_GUARD_REMOVE)
            # anonymous memory: the ones are gone; cow: the file's zeroes, as before
            assert changed_pages(region, before) == (set() if mode_name == "cow" else {2, 3})
            if mode_name == "cow":
                assert as_set(t.dirty_pages(region, "global")) == {2, 3}
            else:
                assert as_set(t.dirty_pages(region, "global", reset=True)) == reported
                write_pages(region, {2, 5}, 9)  # later writes are seen again
                assert as_set(t.dirty_pages(region, "global")) == {2, 5}
    finally:
        region.close()
        if snap is not None:
            snap.close()


@pytest.mark.parametrize("prot", [PROT_NONE, PROT_READ], ids=["none", "read"])
def test_segfault_mode_does_not_see_pages_you_make_writable_again(prot):
    """Your own mprotect back to read-write un-protects a tracked page:
    writes to it go unseen until the next arm (start, reset=True)."""
    require("segfault")
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker("segfault") as t:
        t.start(region)
        assert libc.mprotect(page_at(region, 2), ctypes.c_size_t(PAGE_SIZE), prot) == 0
        assert libc.mprotect(page_at(region, 2), ctypes.c_size_t(PAGE_SIZE), PROT_RW) == 0
        write_pages(region, {2, 4}, 5)
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {4}
        write_pages(region, {2}, 6)  # armed again
        assert as_set(t.dirty_pages(region, "global")) == {2}


@pytest.mark.parametrize("mode_name", UFFD_MODES)
def test_uffd_modes_see_pages_you_make_writable_again(mode_name):
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        t.start(region)
        assert libc.mprotect(page_at(region, 2), ctypes.c_size_t(PAGE_SIZE), PROT_NONE) == 0
        assert libc.mprotect(page_at(region, 2), ctypes.c_size_t(PAGE_SIZE), PROT_RW) == 0
        write_pages(region, {2}, 5)
        assert as_set(t.dirty_pages(region, "global")) == {2}


# ---- the alternate signal stack ---------------------------------------------------------

#: Puts a thread's alternate signal stack (pages 8-23 of a 64-page region of
#: ones) inside tracked memory and takes a signal there (Python's handlers
#: are installed with SA_ONSTACK), then writes page 40 (the SIGSEGV of a
#: segfault-mode write is delivered there too). argv: mode, when.
#: when: "before" (the stack is set before start; a signal-handler swap and a
#: reset=True round follow), "then_call" (set after start, then a pagefork
#: call before the signal), "thread" (another thread sets it and calls
#: pagefork; this thread re-arms with reset=True, then signals it), "after"
#: (set after start, signal at once). Prints the pages reported.
ALTSTACK = r"""
import ctypes, signal, sys, threading
import pagefork
from pagefork import PAGE_SIZE, Region

class stack_t(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]

libc = ctypes.CDLL(None, use_errno=True)
mode, when = sys.argv[1:3]
region = Region(64 * PAGE_SIZE)
region.array()[:] = 1
t = pagefork.tracker(mode)
caught = []
signal.signal(signal.SIGUSR1, lambda *args: caught.append(threading.get_ident()))

def use_altstack():
    ss = stack_t(region.address + 8 * PAGE_SIZE, 0, 16 * PAGE_SIZE)
    assert libc.sigaltstack(ctypes.byref(ss), None) == 0, ctypes.get_errno()

def signal_me():
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

def dirty(scope="global", reset=False):
    return sorted(int(p) for p in t.dirty_pages(region, scope, reset=reset).nonzero()[0])

if when == "before":
    use_altstack()
    t.start(region)
    if mode != "uffd-async":
        t.start_thread(region)
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)  # segfault mode swaps handlers around it
    signal_me()
    region.array()[40 * PAGE_SIZE] = 2
    print("round", dirty(reset=True))
    signal_me()
    if mode != "uffd-async":
        print("thread", dirty("thread"))
    region.array()[41 * PAGE_SIZE] = 2
    print("round", dirty(reset=True))
elif when == "then_call":
    t.start(region)
    use_altstack()
    t.dirty_pages(region)
    signal_me()
    region.array()[40 * PAGE_SIZE] = 2
    print("round", dirty(reset=True))
elif when == "thread":
    t.start(region)
    ready, done = threading.Event(), threading.Event()
    def other():
        old = stack_t()
        libc.sigaltstack(None, ctypes.byref(old))
        use_altstack()
        t.dirty_pages(region)
        ready.set()
        done.wait(600)
        libc.sigaltstack(ctypes.byref(old), None)  # ASan unmaps a thread's stack at exit
    worker = threading.Thread(target=other)
    worker.start()
    assert ready.wait(600)
    t.dirty_pages(region, reset=True)  # re-arms; the worker's stack stays writable
    signal.pthread_kill(worker.ident, signal.SIGUSR1)
    region.array()[40 * PAGE_SIZE] = 2
    done.set()
    worker.join()
    print("round", dirty(reset=True))
else:
    t.start(region)
    use_altstack()
    signal_me()
    region.array()[40 * PAGE_SIZE] = 2
    print("round", dirty(reset=True))
print("caught", len(caught))
"""

STACK_PAGES = set(range(8, 24))


def altstack_reads(result: subprocess.CompletedProcess) -> list[tuple[str, set[int]]]:
    """The script's reads, as (scope, pages); checks that it exited 0 and
    that its signals were handled."""
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().split("\n")
    assert lines[-1].startswith("caught") and int(lines[-1].split()[1]) >= 1
    return [(line.split(" ", 1)[0], set(json.loads(line.split(" ", 1)[1]))) for line in lines[:-1]]


def check_altstack_reads(when: str, reads: list[tuple[str, set[int]]],
                         kernel_writes_fail: bool) -> None:
    """Each read reports the pages written since the last reset=True read,
    plus the stack: all of it where it is left writable, else the pages the
    kernel's frame writes touched (the top one at least)."""
    labels = [label for label, _ in reads]
    if when != "before":
        assert labels == ["round"]
        expected = [{40}]
    elif "thread" in labels:
        assert labels == ["round", "thread", "round"]
        expected = [{40}, {40}, {41}]  # the thread scope was not reset
    else:  # uffd-async: no thread scope
        assert labels == ["round", "round"]
        expected = [{40}, {41}]
    for (_, reported), pages in zip(reads, expected):
        if kernel_writes_fail:
            assert reported == STACK_PAGES | pages
        else:
            assert pages | {23} <= reported <= STACK_PAGES | pages


@pytest.mark.parametrize("mode_name", SEEING_MODES)
@pytest.mark.parametrize("when", ["before", "then_call", "thread"])
def test_alternate_signal_stack_in_tracked_memory(mode_name, when):
    """Where the kernel's own writes to an armed page fail (segfault; uffd
    when user-mode-only), a signal frame could not be written on an armed
    alternate stack and the process would die by SIGSEGV. The known
    threads' stacks are left writable and reported at every read."""
    require(mode_name)
    fails = mode_name == "segfault" or not pagefork.probe()[mode_name].kernel_writes
    result = run_script(ALTSTACK.replace("sys.argv[1:3]", repr((mode_name, when))), timeout=300)
    check_altstack_reads(when, altstack_reads(result), fails)


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_alternate_signal_stack_moved_into_tracked_memory_kills_at_the_next_signal(mode_name):
    """Documented limit: a thread that points its stack into armed memory
    and takes a signal before any pagefork call dies by SIGSEGV where the
    kernel's writes fail; no handler runs (the frame is what failed)."""
    require(mode_name)
    fails = mode_name == "segfault" or not pagefork.probe()[mode_name].kernel_writes
    result = run_script(ALTSTACK.replace("sys.argv[1:3]", repr((mode_name, "after"))), timeout=300)
    if fails:
        assert result.returncode == -signal.SIGSEGV, (result.returncode, result.stderr[-3000:])
        assert result.stdout == ""
    else:
        check_altstack_reads("after", altstack_reads(result), False)


#: argv: mode, n. One thread points its alternate stack into tracked memory
#: and calls pagefork, then n more threads with stacks elsewhere do; all stay
#: alive while the main thread re-arms and signals the first one.
MANY_ALTSTACKS = r"""
import ctypes, signal, sys, threading
import pagefork
from pagefork import PAGE_SIZE, Region

class stack_t(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]

libc = ctypes.CDLL(None, use_errno=True)
mode, others = sys.argv[1], int(sys.argv[2])
region = Region(64 * PAGE_SIZE)
region.array()[:] = 1
t = pagefork.tracker(mode)
t.start(region)
caught = []
signal.signal(signal.SIGUSR1, lambda *args: caught.append(1))
done = threading.Event()
buffers = [ctypes.create_string_buffer(64 * 1024) for _ in range(others)]

def run(address, size, ready):
    ss, old = stack_t(address, 0, size), stack_t()
    assert libc.sigaltstack(ctypes.byref(ss), ctypes.byref(old)) == 0, ctypes.get_errno()
    t.dirty_pages(region)  # pagefork learns this thread's stack
    ready.set()
    done.wait(600)
    libc.sigaltstack(ctypes.byref(old), None)  # ASan unmaps a thread's stack at exit

def spawn(address, size):
    ready = threading.Event()
    thread = threading.Thread(target=run, args=(address, size, ready))
    thread.start()
    assert ready.wait(600)
    return thread

first = spawn(region.address + 8 * PAGE_SIZE, 16 * PAGE_SIZE)
rest = [spawn(ctypes.addressof(b), len(b)) for b in buffers]
t.dirty_pages(region, reset=True)  # re-arms around the known stacks
signal.pthread_kill(first.ident, signal.SIGUSR1)
region.array()[40 * PAGE_SIZE] = 2
done.set()
for thread in [first, *rest]:
    thread.join()
print("round", sorted(int(p) for p in t.dirty_pages(region, reset=True).nonzero()[0]))
print("caught", len(caught))
"""


@pytest.mark.parametrize("others", [0, 200])
def test_alternate_signal_stacks_of_hundreds_of_threads(others):
    """Every live thread's stack stays known however many threads call
    pagefork: the list once held 64 and evicted the oldest live entry, so
    the 65th thread got the first one's stack protected at the next arm and
    its next signal killed the process (SIGSEGV)."""
    require("segfault")
    result = run_script(MANY_ALTSTACKS.replace("sys.argv[1], int(sys.argv[2])",
                                               f"'segfault', {others}"), timeout=600)
    check_altstack_reads("after", altstack_reads(result), True)


#: argv: n. n threads put 2-page alternate stacks 6 pages apart in tracked
#: memory and call pagefork (a read without reset un-protects each); then
#: this thread puts its stack between two of them, calls pagefork, and
#: takes a signal.
STACKS_BETWEEN = r"""
import ctypes, signal, sys, threading
import pagefork
from pagefork import PAGE_SIZE, Region
class stack_t(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
libc = ctypes.CDLL(None, use_errno=True)
n_threads = int(sys.argv[1])
region = Region(128 * PAGE_SIZE)
region.array()[:] = 1
t = pagefork.tracker("segfault")
t.start(region)
caught = []
signal.signal(signal.SIGUSR1, lambda *a: caught.append(1))
done = threading.Event()

def use_altstack(page):
    ss = stack_t(region.address + page * PAGE_SIZE, 0, 2 * PAGE_SIZE)
    assert libc.sigaltstack(ctypes.byref(ss), None) == 0, ctypes.get_errno()

def run(page, ready):
    old = stack_t()
    libc.sigaltstack(None, ctypes.byref(old))
    use_altstack(page)
    t.dirty_pages(region)  # no reset: pagefork un-protects this thread's stack
    ready.set()
    done.wait(600)
    libc.sigaltstack(ctypes.byref(old), None)  # ASan unmaps a thread's stack at exit

threads = []
for k in range(n_threads):  # stacks at pages 6k, 6k + 1: disjoint, apart
    ready = threading.Event()
    threads.append(threading.Thread(target=run, args=(6 * k, ready)))
    threads[-1].start()
    assert ready.wait(600)
use_altstack(6 * 3 + 3)  # this thread's stack: pages 21-22, between two others
t.dirty_pages(region)
signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
region.array()[120 * PAGE_SIZE] = 2
done.set()
for th in threads:
    th.join()
print("round", sorted(int(p) for p in t.dirty_pages(region, reset=True).nonzero()[0]))
print("caught", len(caught))
"""


@pytest.mark.parametrize("others", [4, 17])
def test_alternate_signal_stack_between_many_others(others):
    """Past 16 holes they merge into one span that also covers the armed
    pages between them: a stack put there was taken as already writable
    and left protected, and its thread's next signal killed the process
    (SIGSEGV). The merged hole is un-protected whole (reported whole)."""
    require("segfault")
    result = run_script(STACKS_BETWEEN.replace("int(sys.argv[1])", str(others)), timeout=600)
    reads = altstack_reads(result)
    assert [label for label, _ in reads] == ["round"]
    stacks = {p for k in range(others) for p in (6 * k, 6 * k + 1)} | {21, 22}
    if others == 4:
        assert reads[0][1] == stacks | {120}
    else:  # merged: the span from the first stack to the last, all reported
        assert reads[0][1] == set(range(6 * others - 4)) | {120}


@pytest.mark.parametrize("when", ["before", "then_call", "thread", "after"])
def test_alternate_signal_stack_under_user_mode_only_uffd(when, tmp_path):
    """uffd in user-mode-only (an unprivileged process): like segfault mode."""
    script = tmp_path / "altstack.py"
    script.write_text(ALTSTACK)
    result = subprocess.run([*unprivileged_prefix(), sys.executable, str(script), "uffd", when],
                            capture_output=True, text=True, timeout=300)
    if "uffd unavailable" in result.stderr or "UnsupportedModeError" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    if when == "after":
        assert result.returncode == -signal.SIGSEGV, (result.returncode, result.stderr[-3000:])
    else:
        check_altstack_reads(when, altstack_reads(result), True)


def test_alternate_signal_stack_under_cow():
    """cow protects nothing: a signal frame's write copies the page, which
    is reported."""
    require("cow")
    result = run_script("""
        import ctypes, signal, threading
        import pagefork
        from pagefork import PAGE_SIZE, Region, Snapshot

        class stack_t(ctypes.Structure):
            _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                        ("ss_size", ctypes.c_size_t)]

        snap = Snapshot(size=64 * PAGE_SIZE)
        region = Region(64 * PAGE_SIZE, backing="memfd")
        snap.map_to(region)
        t = pagefork.tracker("cow")
        t.start(region)
        caught = []
        signal.signal(signal.SIGUSR1, lambda *args: caught.append(1))
        ss = stack_t(region.address + 8 * PAGE_SIZE, 0, 16 * PAGE_SIZE)
        assert ctypes.CDLL(None).sigaltstack(ctypes.byref(ss), None) == 0
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        region.array()[40 * PAGE_SIZE] = 2
        print("round", sorted(int(p) for p in t.dirty_pages(region, "global").nonzero()[0]))
        print("caught", len(caught))
    """, timeout=300)
    check_altstack_reads("after", altstack_reads(result), False)


# ---- mlockall ---------------------------------------------------------------------------

#: argv: backend. mlockall(MCL_CURRENT | MCL_FUTURE) between batches of an
#: App whose main memory is cow-tracked. Exit 77: mlockall refused here.
MLOCKALL = r"""
import ctypes, sys
import numpy as np
import pagefork
from pagefork import PAGE_SIZE, PageforkError, Region, Snapshot, _native

libc = ctypes.CDLL(None, use_errno=True)
backend = sys.argv[1]
if not pagefork.probe()["cow"].available:
    print("cow unavailable:", pagefork.probe()["cow"].reason)
    sys.exit(77)

def fn(mem, i, n):
    mem["a"][i] += i + 1

with pagefork.App("1MiB", backend=backend, workers=2) as app:
    a = app.alloc("a", 4096, np.int64)
    app.parallel(fn, 2)
    assert app._executor._main_tracker.mode == "cow"
    if libc.mlockall(1 | 2) != 0:  # MCL_CURRENT | MCL_FUTURE
        print("mlockall refused:", ctypes.get_errno())
        sys.exit(77)
    assert _native.new_mappings_locked()
    a[1000] = 7  # the next batch carries it
    app.parallel(fn, 2)
    print("main", app._executor._main_tracker.mode)
    a[3000] = 5  # one page: tracked exactly under mlockall
    app.parallel(fn, 2)
    print("carried", app.last_batch.main_dirty_pages)
    assert a[:2].tolist() == [3, 6] and a[1000] == 7 and a[3000] == 5
    # a plain cow tracker names mlockall as the cause
    snap = Snapshot(size=4 * PAGE_SIZE)
    region = Region(4 * PAGE_SIZE, backing="memfd")
    snap.map_to(region)
    try:
        pagefork.tracker("cow").start(region)
    except PageforkError as exc:
        print("error", exc)
    libc.munlockall()
    assert not _native.new_mappings_locked()
    app.parallel(fn, 2)
    print("after munlockall", app._executor._main_tracker.mode)
    assert a[:2].tolist() == [4, 8]
print("ok")
"""


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_batches_under_mlockall(backend):
    """mlockall(MCL_FUTURE) populates every new mapping as it is made, which
    copies every page of a private snapshot mapping, so cow cannot tell
    written pages: main memory (and thread memory mapped in this process)
    is tracked with uffd-async (or the auto mode) instead while it is in
    effect, and batches stay exact. A plain cow tracker says mlockall is the
    cause. Subprocess: mlockall locks everything the process maps."""
    if SANITIZED:
        pytest.skip(ASAN_MLOCK)
    result = run_script(MLOCKALL.replace("sys.argv[1]", repr(backend)), timeout=600)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().split("\n")[:-1]
                 if " " in line and not line.startswith("after"))
    if pagefork.probe()["uffd-async"].available:
        assert lines["main"] == "uffd-async"
        assert lines["carried"] == "1"  # tracked exactly, not every page
    else:  # the auto mode, whichever it is here
        assert lines["main"] != "cow"
    assert "mlockall(MCL_FUTURE) is in effect" in lines["error"]
    assert "after munlockall cow" in result.stdout
    assert result.stdout.strip().endswith("ok")


def test_mlockall_on_fault_keeps_cow():
    """MCL_ONFAULT locks pages as they are touched: mappings are not
    populated, and cow tracks as usual."""
    if SANITIZED:
        pytest.skip(ASAN_MLOCK)
    result = run_script("""
        import ctypes, sys
        import pagefork
        from pagefork import PAGE_SIZE, Region, Snapshot, _native
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(1 | 2 | 4) != 0:
            print("mlockall refused:", ctypes.get_errno())
            sys.exit(77)
        assert not _native.new_mappings_locked()
        assert pagefork.probe()["cow"].available, pagefork.probe()["cow"].reason
        snap = Snapshot(size=8 * PAGE_SIZE)
        region = Region(8 * PAGE_SIZE, backing="memfd")
        snap.map_to(region)
        t = pagefork.tracker("cow")
        t.start(region)
        region.array()[3 * PAGE_SIZE] = 1
        print(sorted(int(p) for p in t.dirty_pages(region, "global").nonzero()[0]))
    """)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[3]"


# ---- io_uring and direct I/O ------------------------------------------------------------

HELPER = Path(__file__).resolve().parent / "io_uring_helper.c"


@pytest.fixture(scope="session")
def kernel_io(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """tests/io_uring_helper.c, built with the system cc and loaded."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler (cc) to build tests/io_uring_helper.c")
    out = tmp_path_factory.mktemp("kernel_io") / "kernel_io.so"
    env = {k: v for k, v in os.environ.items()  # the compiler runs without the sanitizers
           if k != "LD_PRELOAD" and not k.endswith("SAN_OPTIONS")}
    built = subprocess.run([cc, "-O1", "-Wall", "-shared", "-fPIC", "-o", str(out), str(HELPER)],
                           capture_output=True, text=True, env=env, timeout=300)
    if built.returncode != 0 and "No such file" in built.stderr:
        pytest.skip(f"cannot build {HELPER.name}: {built.stderr.strip()[:300]}")
    assert built.returncode == 0, built.stderr
    lib = ctypes.CDLL(str(out), use_errno=True)
    ptr, i, u, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_longlong
    for name, args in {"ring_open": [ctypes.POINTER(ptr)], "ring_close": [ptr],
                       "ring_register": [ptr, ptr, ctypes.c_size_t], "ring_unregister": [ptr],
                       "ring_submit_read": [ptr, i, ptr, u, ll, i, i], "ring_ready": [ptr],
                       "ring_wait": [ptr], "blocker_open": [ctypes.POINTER(ptr)],
                       "blocker_wait": [i, i], "blocker_release": [i, ptr],
                       "blocker_close": [i, ptr]}.items():
        getattr(lib, name).argtypes = args
    return lib


def _io_uring_refused(err: int) -> str:
    if err == errno.ENOSYS:
        return f"{kernel_release()} has no io_uring (CONFIG_IO_URING is off)"
    try:
        disabled = Path("/proc/sys/kernel/io_uring_disabled").read_text().strip()
    except OSError:
        disabled = "?"
    return (f"io_uring_setup is refused ({errno.errorcode.get(err, err)}): "
            f"kernel.io_uring_disabled={disabled} (1: only kernel.io_uring_group), or a seccomp filter")


IO_URING_REGISTER = 427  # the syscall's number on every architecture (unified table)


class Ring:
    """One io_uring of the helper: register buffers, read and wait."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.ptr = ctypes.c_void_p()
        rc = lib.ring_open(ctypes.byref(self.ptr))
        if rc < 0:
            pytest.skip(_io_uring_refused(-rc))

    def register(self, address: int, length: int) -> int:
        return self.lib.ring_register(self.ptr, ctypes.c_void_p(address), length)

    def unregister(self) -> None:
        assert self.lib.ring_unregister(self.ptr) == 0

    @property
    def fd(self) -> int:
        """The ring's descriptor (the first field of the helper's struct ring)."""
        return ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_int))[0]

    def register_many(self, buffers: list[tuple[int, int]]) -> int:
        """IORING_REGISTER_BUFFERS of (address, length) pairs; (0, 0) is an
        empty slot (a sparse table). 0, or -errno."""
        iovecs = (ctypes.c_size_t * (2 * len(buffers)))(*[v for pair in buffers for v in pair])
        rc = libc.syscall(IO_URING_REGISTER, self.fd, 0, iovecs, len(buffers))  # 0: REGISTER_BUFFERS
        return 0 if rc == 0 else -ctypes.get_errno()

    def read(self, fd: int, address: int, length: int, offset: int = 0, *, fixed: bool = False,
             async_: bool = False) -> int:
        """Bytes read, or -errno."""
        assert self.lib.ring_submit_read(self.ptr, fd, ctypes.c_void_p(address), length, offset,
                                         int(fixed), int(async_)) == 0
        return self.lib.ring_wait(self.ptr)

    def close(self) -> None:
        self.lib.ring_close(self.ptr)


@pytest.fixture
def ring(kernel_io: ctypes.CDLL):
    r = Ring(kernel_io)
    yield r
    r.close()


DATA = bytes(range(256)) * (2 * PAGE_SIZE // 256)


@pytest.fixture
def data_fd(tmp_path: Path):
    """A file of two pages of known bytes, in the page cache."""
    path = tmp_path / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    assert os.pread(fd, len(DATA), 0) == DATA
    yield fd
    os.close(fd)


def page_bytes(region: Region, page: int, length: int = 100) -> bytes:
    return bytes(region.array()[page * PAGE_SIZE: page * PAGE_SIZE + length])


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_io_uring_fixed_buffers_are_reported_at_every_read(mode_name, ring, data_fd):
    """READ_FIXED writes through the kernel's pin of a registered buffer,
    never through the page tables: no mode can see it. pagefork looks for
    the buffers (the ring's /proc fdinfo, when /proc/self/status VmPin says
    something is pinned) at start, start_thread, reset() and map_to, and
    reports their pages at every read until a later look finds them gone."""
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        region.array()[:] = 1
        assert ring.register(region.address + 2 * PAGE_SIZE, 3 * PAGE_SIZE) == 0  # pages 2-4
        t.start(region)
        if mode_name != "uffd-async":
            t.start_thread(region)
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 3, 4}
        assert ring.read(data_fd, region.address + 3 * PAGE_SIZE, 100, 5, fixed=True) == 100
        assert page_bytes(region, 3) == DATA[5:105]
        write_pages(region, {6}, 7)
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 3, 4, 6}
        if mode_name != "uffd-async":
            assert as_set(t.dirty_pages(region, "thread")) == {2, 3, 4, 6}
        ring.unregister()
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 3, 4}  # not looked for
        t.reset()  # looks again: gone
        write_pages(region, {7}, 7)
        assert as_set(t.dirty_pages(region, "global")) == {7}


def test_io_uring_buffers_after_an_empty_slot_are_found(ring):
    """fdinfo prints an empty slot of the buffer table as "<index>: <none>";
    the buffers after it pin pages too (the list was read as ending there,
    so they went unreported and App batches did not refuse them)."""
    with Region(8 * PAGE_SIZE) as region:
        region.array()[:] = 1
        assert ring.register_many([(0, 0), (region.address + 2 * PAGE_SIZE, PAGE_SIZE),
                                   (region.address + 5 * PAGE_SIZE, 2 * PAGE_SIZE)]) == 0
        assert pagefork._native.pinned_pages(region.address, 8) == [(2, 1), (5, 2)]


def test_io_uring_hundreds_of_buffers(ring):
    """300 one-page buffers on every other page: every pinned page is
    reported (past 16 spans they merge into fewer, larger ones: more pages,
    never fewer)."""
    with Region(600 * PAGE_SIZE) as region:
        region.array()[:] = 1
        assert ring.register_many([(region.address + 2 * i * PAGE_SIZE, PAGE_SIZE)
                                   for i in range(300)]) == 0
        spans = pagefork._native.pinned_pages(region.address, 600)
        reported = {p for first, count in spans for p in range(first, first + count)}
        assert set(range(0, 600, 2)) <= reported <= set(range(599))
        assert len(spans) <= 16


def test_io_uring_pins_found_with_a_long_status_file(kernel_io):
    """/proc/self/status lists every supplementary group before VmPin: with
    1500 groups VmPin sits past the 4096 bytes once read, and no pin was
    ever found (App batches did not refuse, tracking did not report)."""
    if os.geteuid() != 0:
        pytest.skip("setgroups needs CAP_SETGID (run as root)")
    result = run_script(f"""
        import ctypes, os
        import pagefork
        from pagefork import PAGE_SIZE, Region
        lib = ctypes.CDLL({kernel_io._name!r})
        lib.ring_open.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.ring_register.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        ring = ctypes.c_void_p()
        if lib.ring_open(ctypes.byref(ring)) < 0:
            raise SystemExit(77)
        os.setgroups(list(range(100000, 101500)))
        with open("/proc/self/status") as f:
            status = f.read()
        assert status.index("VmPin:") > 8192, len(status)
        region = Region(8 * PAGE_SIZE)
        region.array()[:] = 1
        assert lib.ring_register(ring, region.address + 2 * PAGE_SIZE, 3 * PAGE_SIZE) == 0
        print(pagefork._native.pinned_pages(region.address, 8))
    """, timeout=300)
    if result.returncode == 77:
        pytest.skip("io_uring_setup is refused here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[(2, 3)]"


def test_io_uring_registration_of_segfault_tracked_pages_fails(ring):
    """Registering pins for writing: a read-only (armed) page refuses it
    with EFAULT, like read(2) into it."""
    require("segfault")
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker("segfault") as t:
        t.start(region)
        assert ring.register(region.address, 2 * PAGE_SIZE) == -errno.EFAULT
        assert as_set(t.dirty_pages(region, "global")) == set()


@pytest.mark.parametrize("mode_name", UFFD_MODES)
def test_io_uring_buffers_registered_while_tracked(mode_name, ring, data_fd):
    """Registering faults each page in for writing: reported once. A
    reset=True read does not look for buffers (that costs a /proc read per
    round): writes through the pin after it go unseen until the next start,
    start_thread or reset(), which finds the buffer."""
    require(mode_name)
    if mode_name == "uffd" and not pagefork.probe()["uffd"].kernel_writes:
        pytest.skip("uffd here fails the kernel's own faults: "
                    + pagefork.probe()["uffd"].kernel_writes_reason)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        t.start(region)
        assert ring.register(region.address + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == 0
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 3}
        assert ring.read(data_fd, region.address + 2 * PAGE_SIZE, 100, fixed=True) == 100
        assert page_bytes(region, 2) == DATA[:100]
        assert as_set(t.dirty_pages(region, "global", reset=True)) == set()  # unseen
        t.start(region)  # finds the buffer
        assert ring.read(data_fd, region.address + 3 * PAGE_SIZE, 100, fixed=True) == 100
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 3}
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 3}
        ring.unregister()


def test_io_uring_fixed_buffers_under_cow(ring, data_fd):
    """Registering copies each page (pinning for writing breaks
    copy-on-write): cow reports them all, and the ring writes into those
    private copies, which stay reported until the memory is mapped again."""
    require("cow")
    snap = Snapshot(size=8 * PAGE_SIZE)
    try:
        with Region(8 * PAGE_SIZE, backing="memfd") as region, pagefork.tracker("cow") as t:
            snap.map_to(region)
            t.start(region)
            assert ring.register(region.address + 2 * PAGE_SIZE, 3 * PAGE_SIZE) == 0
            assert as_set(t.dirty_pages(region, "global")) == {2, 3, 4}
            assert ring.read(data_fd, region.address + 3 * PAGE_SIZE, 100, fixed=True) == 100
            assert page_bytes(region, 3) == DATA[:100]
            assert as_set(t.dirty_pages(region, "global")) == {2, 3, 4}
            ring.unregister()
    finally:
        snap.close()


def test_mapping_again_under_an_io_uring_pin_loses_the_rings_writes(ring, data_fd):
    """Snapshot.map_to puts new pages under the address; the ring keeps
    its pin on the old ones and writes there: the region never shows it."""
    snap = Snapshot(size=8 * PAGE_SIZE)
    try:
        with Region(8 * PAGE_SIZE, backing="memfd") as region:
            snap.map_to(region)
            assert ring.register(region.address + 2 * PAGE_SIZE, PAGE_SIZE) == 0
            snap.map_to(region)
            assert ring.read(data_fd, region.address + 2 * PAGE_SIZE, 100, fixed=True) == 100
            assert page_bytes(region, 2) == bytes(100)
            ring.unregister()
            assert ring.register(region.address + 2 * PAGE_SIZE, PAGE_SIZE) == 0  # again: seen
            assert ring.read(data_fd, region.address + 2 * PAGE_SIZE, 100, fixed=True) == 100
            assert page_bytes(region, 2) == DATA[:100]
            ring.unregister()
    finally:
        snap.close()


def test_a_start_on_memory_just_mapped_drops_the_pins_of_the_old_pages(ring, data_fd):
    """Thread memory is mapped anew before every thread and started without
    a look for io_uring buffers (Tracker.start_mapped): a pin holds the
    pages it was registered on, which the new mapping replaced. The pinned
    spans an earlier start found are dropped, and the ring writes into the
    old pages, never into the region."""
    mode_name = next((m for m in SEEING_MODES if pagefork.probe()[m].available), None)
    if mode_name is None:
        pytest.skip("no mode blind to pins works here")
    snap = Snapshot(size=8 * PAGE_SIZE)
    try:
        with Region(8 * PAGE_SIZE, backing="memfd") as region, pagefork.tracker(mode_name) as t:
            snap.map_to(region)
            assert ring.register(region.address + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == 0
            t.start(region)
            assert as_set(t.dirty_pages(region, "global")) == {2, 3}  # found by start's look
            t.stop(region)
            snap.map_to(region)
            t.start_mapped(region)
            assert ring.read(data_fd, region.address + 2 * PAGE_SIZE, 100, fixed=True) == 100
            write_pages(region, {6}, 7)
            assert as_set(t.dirty_pages(region, "global")) == {6}
            assert page_bytes(region, 2) == bytes(100)
            t.stop(region)
            ring.unregister()
    finally:
        snap.close()


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_app_batches_refuse_while_io_uring_pins_main_memory(backend, ring, data_fd, tmp_path):
    """A batch (a checkpoint, a resize) maps main memory again: under a pin
    the ring would go on writing into the old pages. It refuses instead,
    saying what to do: unregister before the batch, register again after."""
    with pagefork.App("64KiB", max_size="1MiB", backend=backend, workers=1) as app:
        a = app.alloc("a", 4 * PAGE_SIZE, np.uint8)
        a[:] = 1
        address = a.ctypes.data - a.ctypes.data % PAGE_SIZE
        assert ring.register(address, PAGE_SIZE) == 0
        with pytest.raises(PageforkError, match="io_uring fixed buffers") as info:
            app.parallel(lambda mem, i, n: None, 1)
        assert "IORING_UNREGISTER_BUFFERS" in str(info.value)
        with pytest.raises(PageforkError, match="io_uring fixed buffers"):
            app.checkpoint(str(tmp_path / "checkpoints"))
        ring.unregister()
        app.parallel(lambda mem, i, n: mem["a"].__setitem__(PAGE_SIZE, 9), 1)
        assert a[PAGE_SIZE] == 9 and a[0] == 1
        assert ring.register(address, PAGE_SIZE) == 0  # registered again after the batch
        assert ring.read(data_fd, address, 100, fixed=True) == 100
        assert bytes(app["a"][address - a.ctypes.data:][:100]) == DATA[:100]
        ring.unregister()
        app.parallel(lambda mem, i, n: None, 1)
        assert bytes(app["a"][address - a.ctypes.data:][:100]) == DATA[:100]


@pytest.mark.parametrize("mode_name", SEEING_MODES + ["cow"])
def test_io_uring_reads_handed_to_a_kernel_worker(mode_name, ring, data_fd):
    """IOSQE_ASYNC hands the read to a kernel worker thread (io-wq), which
    writes like read(2) does, but whose faults name the worker: the uffd
    thread scope of the submitting thread misses the page, the process
    scope sees it. Where the kernel's writes to armed pages fail, the read
    fails with EFAULT."""
    require(mode_name)
    region, snap = tracked_region(mode_name)
    try:
        with pagefork.tracker(mode_name) as t:
            t.start(region)
            if mode_name in ("segfault", "uffd"):
                t.start_thread(region)
            got = ring.read(data_fd, region.address + 3 * PAGE_SIZE, 100, async_=True)
            if not pagefork.probe()[mode_name].kernel_writes:
                assert got == -errno.EFAULT
                assert as_set(t.dirty_pages(region, "global")) == set()
                return
            assert got == 100 and page_bytes(region, 3) == DATA[:100]
            assert as_set(t.dirty_pages(region, "global")) == {3}
            if mode_name == "uffd":
                assert as_set(t.dirty_pages(region, "thread")) == set()
    finally:
        region.close()
        if snap is not None:
            snap.close()


class Blocker:
    """A page whose first touch waits until release() (userfaultfd, missing
    mode): a direct read into [tracked page, this page] pins the tracked
    page and then waits here, before any data moves."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.page = ctypes.c_void_p()
        self.fd = lib.blocker_open(ctypes.byref(self.page))
        if self.fd < 0:
            pytest.skip("a userfaultfd that handles the kernel's faults is refused here "
                        f"({errno.errorcode.get(-self.fd, -self.fd)}: user-mode-only)")
        self.view = memoryview((ctypes.c_char * PAGE_SIZE).from_address(self.page.value)).cast("B")

    def wait(self) -> None:
        assert self.lib.blocker_wait(self.fd, 600_000) == 0

    def release(self) -> None:
        assert self.lib.blocker_release(self.fd, self.page) == 0

    def close(self) -> None:
        self.view.release()
        self.lib.blocker_close(self.fd, self.page)


def direct_file(tmp_path: Path) -> int:
    path = tmp_path / "direct"
    path.write_bytes(b"\xab" * PAGE_SIZE + b"\xcd" * PAGE_SIZE)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"{tmp_path} does not take O_DIRECT: {exc}")


def test_direct_io_into_segfault_tracked_pages_fails(tmp_path):
    """Direct I/O pins its pages for writing first: armed (read-only) pages
    refuse it with EFAULT, like read(2)."""
    require("segfault")
    fd = direct_file(tmp_path)
    try:
        with Region(8 * PAGE_SIZE) as region, pagefork.tracker("segfault") as t:
            t.start(region)
            view = memoryview(region)
            with pytest.raises(OSError) as info:
                os.preadv(fd, [view[3 * PAGE_SIZE: 4 * PAGE_SIZE]], 0)
            view.release()
            assert info.value.errno == errno.EFAULT
            assert as_set(t.dirty_pages(region, "global")) == set()
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode_name", UFFD_MODES)
def test_direct_io_in_flight_across_a_reset_is_not_seen(mode_name, kernel_io, tmp_path):
    """An O_DIRECT read pins its pages when it starts (faulting them for
    writing: marked) and its data lands later, through the pin. A
    dirty_pages(reset=True) in between reports the page early and arms it
    again; the data then lands unreported. Wait for direct I/O to complete
    before such a read (buffered reads copy through the page tables: seen)."""
    require(mode_name)
    if mode_name == "uffd" and not pagefork.probe()["uffd"].kernel_writes:
        pytest.skip("uffd here fails the kernel's own faults: "
                    + pagefork.probe()["uffd"].kernel_writes_reason)
    fd = direct_file(tmp_path)
    blocker = Blocker(kernel_io)
    try:
        with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
            region.array()[:] = 1
            t.start(region)
            view = memoryview(region)
            done: list[object] = []

            def read() -> None:
                try:
                    done.append(os.preadv(fd, [view[3 * PAGE_SIZE: 4 * PAGE_SIZE], blocker.view], 0))
                except OSError as exc:
                    done.append(exc)

            reader = threading.Thread(target=read)
            reader.start()
            blocker.wait()  # page 3 is pinned (and marked); no data has moved
            assert page_bytes(region, 3) == b"\x01" * 100
            assert as_set(t.dirty_pages(region, "global", reset=True)) == {3}
            blocker.release()
            reader.join(600)
            assert done == [2 * PAGE_SIZE]
            assert page_bytes(region, 3, PAGE_SIZE) == b"\xab" * PAGE_SIZE
            assert as_set(t.dirty_pages(region, "global")) == set()  # landed unseen
            # completed before the read: seen
            assert os.preadv(fd, [view[5 * PAGE_SIZE: 6 * PAGE_SIZE]], PAGE_SIZE) == PAGE_SIZE
            assert as_set(t.dirty_pages(region, "global", reset=True)) == {5}
            view.release()
    finally:
        blocker.close()
        os.close(fd)


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


@pytest.mark.parametrize("mode", ["segfault", "uffd-async"])
def test_no_descriptor_of_proc_status_is_kept_open(mode):
    """The pin check reads /proc/self/status at every arm and closes it: a
    descriptor kept open could be closed by the program and its number
    reused (pagefork would then read another file, or close the program's
    descriptor in a forked child)."""
    require(mode)
    with pagefork.Region(4 * PAGE_SIZE) as region, pagefork.tracker(mode) as t:
        t.start(region)
        t.dirty_pages(region, reset=mode != "cow")
        t.stop(region)
        t.start(region)
        open_files = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        assert not [f for f in open_files if f.endswith("/status")]


def _thread_sees_a(mem, i, n):
    return mem["a"].copy()


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("mode", ["cow", "uffd", "uffd-async"])
def test_idle_batch_after_a_pin_on_clean_main_memory_refuses(backend, mode, ring, data_fd):
    """The io_uring pin look runs only before a window that maps main memory
    again. A batch that maps nothing again must still never run threads on a
    snapshot that misses what a ring wrote into main memory: registering a
    buffer is itself a write every mode sees, so the batch carries it (a
    window) and refuses."""
    if not pagefork.probe()[mode].available:
        pytest.skip(f"{mode} is not available")
    with pagefork.App("64KiB", backend=backend, workers=1, tracking=mode) as app:
        a = app.alloc("a", 4 * PAGE_SIZE, np.uint8)
        a[:] = 1
        app.parallel(_thread_sees_a, 1)  # carried: main memory maps the snapshot again, unwritten
        app.parallel(_thread_sees_a, 1)
        address = a.ctypes.data + PAGE_SIZE - a.ctypes.data % PAGE_SIZE
        assert ring.register(address, PAGE_SIZE) == 0
        assert ring.read(data_fd, address, 100, fixed=True) == 100
        try:
            got = app.parallel(_thread_sees_a, 2)
        except PageforkError as exc:
            assert "io_uring fixed buffers" in str(exc)
        else:  # ran: the threads must have seen the ring's bytes
            off = address - a.ctypes.data
            assert all(bytes(g[off:off + 100]) == DATA[:100] for g in got), "threads saw a stale snapshot"
        finally:
            ring.unregister()
        got = app.parallel(_thread_sees_a, 2)
        off = address - a.ctypes.data
        assert all(bytes(g[off:off + 100]) == DATA[:100] for g in got)
        assert bytes(a[off:off + 100]) == DATA[:100]


# ---- discarding pages that are not private anonymous memory (docs/tracking.md) ----------


@pytest.mark.parametrize("mode_name", SEEING_MODES)
@pytest.mark.parametrize("kind,advice", [("memfd-private", MADV_DONTNEED),
                                         ("anon-shared", MADV_REMOVE),
                                         ("memfd-shared", MADV_REMOVE)],
                         ids=["private-memfd-dontneed", "shared-anon-remove",
                              "shared-memfd-remove"])
def test_discarding_file_backed_pages_is_not_seen(mode_name, kind, advice):
    """Documented limit: the pages change (a private copy reverts to the
    file's page; a punched hole reads as zeroes) through the file, without
    any page-table event a mode could see; later writes are still seen."""
    require(mode_name)
    with Region(8 * PAGE_SIZE, **KINDS[kind]) as region, pagefork.tracker(mode_name) as t:
        a = region.array()
        a[::PAGE_SIZE] = 1
        t.start(region)
        madvise(region, 0, 8, advice)
        assert not a[::PAGE_SIZE].any()  # the data changed
        assert as_set(t.dirty_pages(region, "global", reset=True)) == set()
        a[3 * PAGE_SIZE] = 2
        assert as_set(t.dirty_pages(region, "global")) == {3}


# ---- memory replaced behind pagefork's back ----------------------------------------------


def _map_fixed_anonymous(address: int, length: int) -> None:
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    got = libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0)  # 0x10: MAP_FIXED
    assert got == address, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_memory_mapped_over_a_tracked_region(mode_name):
    """A user's mmap(MAP_FIXED) over tracked pages drops their protection and
    registration. uffd reports the replaced pages (they read as unprotected);
    uffd-async cannot scan a range that is partly unregistered and reports
    the whole region instead of failing for ever; segfault cannot tell
    (documented): the first write there is lost until the next arm. Every
    mode is armed again by the next reset=True read."""
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        t.start(region)
        _map_fixed_anonymous(region.address + 2 * PAGE_SIZE, 2 * PAGE_SIZE)
        a = region.array()
        a[[2 * PAGE_SIZE, 6 * PAGE_SIZE]] = 1
        dirty = as_set(t.dirty_pages(region, "global", reset=True))
        if mode_name == "segfault":
            assert dirty == {6}
        elif mode_name == "uffd":
            assert dirty == {2, 3, 6}
        else:
            assert dirty == set(range(8))
        a[[2 * PAGE_SIZE, 6 * PAGE_SIZE]] = 2
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 6}
        a[3 * PAGE_SIZE] = 3
        assert as_set(t.dirty_pages(region, "global")) == {3}
        t.stop(region)
