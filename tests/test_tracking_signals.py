"""segfault mode and other SIGSEGV handlers, and vm.max_map_count: the process
survives every tracked write, real crashes are still reported, and where
tracking cannot continue a call says why. Each case runs in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import SANITIZED, require

PRELUDE = """
import ctypes, faulthandler, signal, sys, warnings
import numpy as np
import pagefork
from pagefork import PAGE_SIZE, Region
region = Region(16 * PAGE_SIZE)
a = region.array()
t = pagefork.tracker("segfault")
def dirty(**kw):
    return np.flatnonzero(t.dirty_pages(region, "global", **kw)).tolist()
"""


def run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True)
def _segfault_available() -> None:
    require("segfault")


CRASH = "ctypes.string_at(0)  # a real crash outside tracked memory"


def test_faulthandler_enabled_after_start():
    result = run(f"""
        t.start(region)
        faulthandler.enable()
        a[3 * PAGE_SIZE] = 1  # must neither kill nor be missed
        print(dirty(reset=True), flush=True)
        a[5 * PAGE_SIZE] = 1
        print(dirty(), flush=True)
        {CRASH}
    """)
    assert result.stdout.split("\n")[:2] == ["[3]", "[5]"], result.stderr
    assert result.stderr.count("Fatal Python error: Segmentation fault") == 1
    assert "string_at" in result.stderr  # faulthandler's traceback of the real crash
    assert result.returncode == -11


def test_faulthandler_enabled_then_disabled_after_start():
    result = run(f"""
        t.start(region)
        faulthandler.enable()
        faulthandler.disable()
        a[3 * PAGE_SIZE] = 1
        print(dirty(), flush=True)
        {CRASH}
    """)
    assert result.stdout.strip() == "[3]", result.stderr
    assert "Fatal Python error" not in result.stderr
    assert result.returncode == -11  # dies as without a handler, never spins


def test_python_sigsegv_handler_installed_after_start():
    result = run(f"""
        t.start(region)
        seen = []
        signal.signal(signal.SIGSEGV, lambda *args: seen.append(args))
        a[2 * PAGE_SIZE] = 1
        a[9 * PAGE_SIZE] = 1
        print(dirty(), seen, flush=True)
        {CRASH}
    """)
    assert result.stdout.strip() == "[2, 9] []", result.stderr
    assert result.returncode == -11  # a real fault cannot be handled in Python: no spinning


def test_handler_installed_from_c_after_start_is_reported():
    result = run("""
        t.start(region)
        a[1 * PAGE_SIZE] = 1
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(signal.SIGSEGV, ctypes.c_void_p(0))  # SIG_DFL, behind Python's back
        for call in (dirty, lambda: t.stop(region)):
            try:
                call()
            except pagefork.PageforkError as exc:
                print("refused:", "another SIGSEGV handler" in str(exc), flush=True)
        a[:] = 4  # the memory is writable again
        t.start(region)  # and a new start puts pagefork's handler back
        a[6 * PAGE_SIZE] = 1
        print(dirty(), flush=True)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["refused: True", "refused: True", "[6]"]
    assert result.stderr == ""


def test_faulthandler_enabled_before_start_still_reports_real_crashes():
    result = run(f"""
        faulthandler.enable()
        t.start(region)
        a[4 * PAGE_SIZE] = 1
        print(dirty(), flush=True)
        {CRASH}
    """)
    assert result.stdout.strip() == "[4]"
    assert result.stderr.count("Fatal Python error: Segmentation fault") == 1
    assert result.returncode == -11


# ---- vm.max_map_count ------------------------------------------------------------


@pytest.mark.skipif(SANITIZED, reason="ASan maps shadow and allocator memory of its own: with the "
                    "process's mappings used up on purpose, its allocator fails first (exit 1)")
def test_max_map_count_exhausted_falls_back_instead_of_hanging():
    """Every protected page a write re-enables splits the mapping. With the
    process's mappings at the limit, mprotect fails with ENOMEM in the
    handler: tracking un-protects the whole region, reports all of it dirty,
    warns and counts it. The VMAs are used up inside the child itself, so no
    system setting changes."""
    result = run("""
        import mmap
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        def used():
            with open("/proc/self/maps") as f:
                return sum(1 for _ in f)
        limit = int(open("/proc/sys/vm/max_map_count").read())
        spare = limit - used() - 40
        pages = 2 * spare + 2
        base = libc.mmap(None, pages * PAGE_SIZE, mmap.PROT_READ,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)  # MAP_NORESERVE
        for i in range(1, pages - 1, 2):  # one VMA per page: alternate protections
            libc.mprotect(ctypes.c_void_p(base + i * PAGE_SIZE), PAGE_SIZE,
                          mmap.PROT_READ | mmap.PROT_WRITE)
        big = Region(400 * PAGE_SIZE)
        b = big.array()
        t.start(big)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b[:: 2 * PAGE_SIZE] = 7  # 200 scattered pages: more splits than the 40 left
            flags = t.dirty_pages(big, "global", reset=True)
        # Room again before checking: with no mapping left, any allocation
        # that needs a new one (numpy's reduction buffers) fails.
        libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(400 * PAGE_SIZE))
        print(bool(flags.all()), t.stats(big).fallbacks >= 1, int(b.sum()) == 200 * 7,
              [str(w.category.__name__) for w in caught][:1],
              "vm.max_map_count" in str(caught[0].message), flush=True)
        b[5 * PAGE_SIZE] = 1  # re-armed by the reset: single writes are exact again
        print(np.flatnonzero(t.dirty_pages(big, "global")).tolist(), flush=True)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "True True True ['TrackingFallbackWarning'] True"
    assert lines[1] == "[5]"
