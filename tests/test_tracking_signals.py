"""segfault mode and other SIGSEGV handlers, and vm.max_map_count: the process
survives every tracked write, real crashes are still reported, and where
tracking cannot continue a call says why. Each case runs in a subprocess."""

from __future__ import annotations

import subprocess

import pytest

from support import SANITIZED, SEEING_MODES, require, run_python
from support import run_python as run_script

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
    return run_python(body, prelude=PRELUDE)


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


# ---- interrupts --------------------------------------------------------------------------


@pytest.mark.parametrize("mode_name", SEEING_MODES)
def test_keyboard_interrupt_at_random_points_leaves_tracking_consistent(mode_name):
    """A timer raises KeyboardInterrupt inside start/stop/dirty_pages/close/
    resize/start_thread at random points, a few thousand times; afterwards
    the tracker still reports exact sets and the process exits cleanly."""
    require(mode_name)
    result = run_script(f"""
        import random, signal
        import numpy as np
        import pagefork
        from pagefork import PAGE_SIZE, Region, PageforkError

        mode = {mode_name!r}
        pagefork.probe()
        t = pagefork.tracker(mode)
        r = Region(8 * PAGE_SIZE, max_size=16 * PAGE_SIZE)
        rng = random.Random(1)
        armed = False
        interrupts = 0

        def interrupt(*_):
            global armed
            if armed:  # only inside an operation, never in the loop's own handlers
                armed = False
                raise KeyboardInterrupt

        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
        for _ in range(3000):
            op = rng.randrange(8)
            try:
                armed = True
                if op == 0: t.start(r)
                elif op == 1: t.stop(r)
                elif op == 2: t.dirty_pages(r, "global", reset=True)
                elif op == 3: r.array()[rng.randrange(r.n_pages) * PAGE_SIZE] += 1
                elif op == 4: t.close()
                elif op == 5: r.resize(rng.choice([8, 16]) * PAGE_SIZE)
                elif op == 6 and mode != "uffd-async": t.start_thread(r)
                elif op == 7 and mode != "uffd-async": t.stop_thread(r)
                armed = False
            except KeyboardInterrupt:
                interrupts += 1
            except PageforkError as exc:
                armed = False
                assert "never tracked" in str(exc), exc
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        t.start(r)
        r.array()[[PAGE_SIZE, 5 * PAGE_SIZE]] += 1
        assert np.flatnonzero(t.dirty_pages(r, "global")).tolist() == [1, 5]
        print("ok")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\n"


# ---- SIGSEGV handlers swapped while writers run (segfault mode) ---------------------------


@pytest.mark.parametrize("swap", ["faulthandler", "signal"])
def test_handler_swaps_while_writers_write_neither_kill_nor_lose(swap):
    """faulthandler.enable()/disable() or signal.signal(SIGSEGV, ...) while
    native threads write segfault-tracked memory: a write that faulted
    between the new handler's install and pagefork's re-assert used to reach
    faulthandler, which reported it as a fatal error and killed the process.
    Rounds of reset=True reads with a shadow copy must still lose nothing."""
    require("segfault")
    result = run_script(f"""
        import faulthandler, signal, threading
        import numpy as np
        import pagefork
        from pagefork import PAGE_SIZE, Region, _native
        PAGES = 128
        region = Region(PAGES * PAGE_SIZE)
        mem = region.array(np.uint64).reshape(PAGES, PAGE_SIZE // 8)
        t = pagefork.tracker("segfault")
        t.start(region)
        stop = threading.Event()

        def writer(slot):
            seq, seed = 1, slot + 1
            while not stop.is_set():
                seed = _native._scribble(region.address, PAGES, slot, seq, 1 << 12, seed)
                seq += 1 << 12

        def swap(i):
            if {swap!r} == "faulthandler":
                faulthandler.enable() if i % 2 == 0 else faulthandler.disable()
            else:
                signal.signal(signal.SIGSEGV, signal.SIG_DFL if i % 2 else lambda *a: None)

        shadow = mem.copy()
        pending = np.zeros(PAGES, dtype=bool)
        lost = 0
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        for th in threads:
            th.start()
        for i in range(800):
            swap(i)
            dirty = t.dirty_pages(region, "global", reset=True)
            lost += int(np.count_nonzero(pending & ~dirty))
            shadow[dirty] = mem[dirty]
            pending = (mem != shadow).any(axis=1)
        stop.set()
        for th in threads:
            th.join()
        dirty = t.dirty_pages(region, "global", reset=True)
        lost += int(np.count_nonzero(pending & ~dirty))
        shadow[dirty] = mem[dirty]
        assert lost == 0 and np.array_equal(shadow, mem), lost
        swap(1)
        mem[7, 0] += 1  # single-threaded: exact again
        assert np.flatnonzero(t.dirty_pages(region, "global")).tolist() == [7]
        print("ok")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Fatal Python error" not in result.stderr
    assert result.stdout == "ok\n"


def test_handler_swap_with_a_tracked_page_the_user_made_inaccessible():
    """The swap hashes every tracked page: one the user made PROT_NONE must
    not crash it (segfault mode undoes user protections, as documented)."""
    require("segfault")
    result = run_script("""
        import ctypes, faulthandler
        import numpy as np
        import pagefork
        from pagefork import PAGE_SIZE, Region
        libc = ctypes.CDLL(None, use_errno=True)
        r = Region(8 * PAGE_SIZE)
        t = pagefork.tracker("segfault")
        t.start(r)
        assert libc.mprotect(ctypes.c_void_p(r.address + 2 * PAGE_SIZE),
                             ctypes.c_size_t(PAGE_SIZE), 0) == 0
        faulthandler.enable()
        r.array()[5 * PAGE_SIZE] = 1
        assert np.flatnonzero(t.dirty_pages(r, "global")).tolist() == [5]
        print("ok")
    """, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\n"
