"""The empty batch's shortcuts at their edges: thread memory a thread "left
unwritten" (cow: no private page) or wrote many pages of (put back by a
copy) reused without a remap, also after the thread remapped, unmapped or
protected it, diffs skipped for threads that wrote nothing, merge regions cached
per layout, the mlockall probe cached per batch. Each test compares with the
bytes a serial numpy reference gives."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pagefork import App

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
MAP_FIXED, MAP_PRIVATE, MAP_ANONYMOUS = 0x10, 0x02, 0x20


def _cow(app: App) -> bool:
    return app._executor.thread_mode == "cow"


def _page_of(a: np.ndarray) -> int:
    addr = a.ctypes.data
    assert addr % PAGE == 0
    return addr


def _seen(mem, i, n):
    return mem["a"].copy()


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_anonymous_remap_of_unwritten_thread_memory_is_not_reused(backend):
    """A thread maps anonymous memory over a page of its view (MAP_FIXED,
    never touched: not present, so the cow check sees no private page); the
    slot's next thread must still see the snapshot there, not zeros."""
    with App("1MiB", backend=backend, workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        a[:] = 9

        def remap(mem, i, n):
            if i == 0:  # (libc made here: a worker process gets the function pickled)
                lib = ctypes.CDLL(None, use_errno=True)
                lib.mmap.restype = ctypes.c_void_p
                lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_long]
                p = mem["a"].ctypes.data
                got = lib.mmap(p, mmap.PAGESIZE, 3, 0x10 | 0x02 | 0x20, -1, 0)  # FIXED|PRIVATE|ANONYMOUS
                assert got == p
            return mem["a"].copy() if i == 1 else None

        got = app.parallel(remap, 2)
        assert (got[1] == 9).all(), f"thread 1 saw {np.unique(got[1])} (the snapshot holds 9)"
        assert (a == 9).all()


def test_file_remap_of_unwritten_thread_memory_is_not_reused(tmp_path):
    """Same with a private mapping of another file, read (file pages: not
    private copies): the next thread must not see that file's bytes."""
    path = tmp_path / "other"
    path.write_bytes(b"\x07" * PAGE)
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        a[:] = 9

        def remap(mem, i, n):
            if i == 0:
                p = _page_of(mem["a"])
                fd = os.open(path, os.O_RDONLY)
                try:
                    got = _libc.mmap(p, PAGE, 3, MAP_FIXED | MAP_PRIVATE, fd, 0)
                finally:
                    os.close(fd)
                assert got == p
                assert int(mem["a"][0]) == 0x0707070707070707  # read: maps the file's page
            return mem["a"].copy() if i == 1 else None

        got = app.parallel(remap, 2)
        assert (got[1] == 9).all(), f"thread 1 saw {np.unique(got[1])} (the snapshot holds 9)"
        assert (a == 9).all()


_MPROTECT_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    from pagefork import App
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    def fn(mem, i, n):
        a = mem["a"]
        if i == 0:
            assert libc.mprotect(a.ctypes.data, a.nbytes, 1) == 0  # PROT_READ, nothing written
        else:
            a[i] = 5
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * mmap.PAGESIZE // 8, np.int64)
        print(app._executor.thread_mode, flush=True)
        app.parallel(fn, 2)
        assert a[1] == 5 and a[0] == 0 and (a[2:] == 0).all()
    print("ok", flush=True)
""")


def test_protection_a_thread_left_on_unwritten_memory_does_not_reach_the_next_thread():
    """A thread that made its view read-only (mprotect, writing nothing):
    before this branch the next thread got its memory mapped afresh
    (read-write); reused as is, its first write is a SIGSEGV."""
    proc = subprocess.run([sys.executable, "-c", _MPROTECT_CHILD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_madvise_dontneed_after_writes_reuses_exact_bytes():
    """Written then dropped (MADV_DONTNEED): the pages read the file again,
    and the next thread sees the snapshot's bytes."""
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        a[:] = 4

        def fn(mem, i, n):
            x = mem["a"]
            if i == 0:
                x[:] = 77
                assert _libc.madvise(_page_of(x), x.nbytes, 4) == 0  # MADV_DONTNEED
                assert (x == 4).all()
            return x.copy()

        for _ in range(2):
            got = app.parallel(fn, 3)
            assert all((g == 4).all() for g in got)
        assert (a == 4).all()


def test_write_then_restore_same_bytes_next_thread_sees_merges():
    """A thread that wrote and put back the same bytes (a private page, no
    change): no diff; the next batch's threads see what merged since."""
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        ref = np.zeros_like(a)

        def fn(mem, i, n, step):
            x = mem["a"]
            seen = x.copy()
            if i == 0:
                old = x[3]
                x[3] = -1
                x[3] = old
            elif i == 1:
                x[step] = step + 100
            return seen

        for step in range(5):
            got = app.parallel(fn, 3, args=(step,))
            assert all((g == ref).all() for g in got)
            ref[step] = step + 100
            assert (a == ref).all()


def test_kernel_write_into_unwritten_thread_memory_is_merged():
    """os.readv into the view (a kernel write, breaks cow) by an otherwise
    idle thread: merged, and the next thread does not see it."""
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        a[:] = 1

        def fn(mem, i, n):
            x = mem["a"]
            seen = x.copy()
            if i == 0:
                r, w = os.pipe()
                os.write(w, np.full(4, 55, np.int64).tobytes())
                os.close(w)
                os.readv(r, [memoryview(x[PAGE // 8: PAGE // 8 + 4]).cast("B")])
                os.close(r)
            return seen

        got = app.parallel(fn, 2)
        assert (got[0] == 1).all() and (got[1] == 1).all()
        ref = np.ones(len(a), np.int64)
        ref[PAGE // 8: PAGE // 8 + 4] = 55
        assert (a == ref).all()


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_restored_app_idle_threads_see_current_bytes(tmp_path, backend):
    """A restored App: idle threads reusing their memory see the restored
    bytes, then the main program's writes and the merges since."""
    with App("1MiB", backend=backend, workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        a[:] = 2
        app.parallel(_seen, 2)
        app.checkpoint(tmp_path / "ck")
    with App.restore(tmp_path / "ck", backend=backend, workers=1) as app:
        a = app["a"]
        ref = np.full(len(a), 2, np.int64)
        for step in range(3):
            got = app.parallel(_seen, 3)
            assert all((g == ref).all() for g in got), [np.unique(g) for g in got]
            a[step] = 40 + step
            ref[step] = 40 + step
            got = app.parallel(_seen, 3)
            assert all((g == ref).all() for g in got), [np.unique(g) for g in got]
            app.parallel(lambda mem, i, n: mem["a"].__setitem__(PAGE // 8 + i, 7), 2)
            ref[PAGE // 8: PAGE // 8 + 2] = 7
            assert (a == ref).all()


_MLOCK_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    from pagefork import App
    libc = ctypes.CDLL(None, use_errno=True)
    def seen(mem, i, n):
        return mem["a"].copy()
    def write(mem, i, n, v):
        mem["a"][i] = v
    with App("1MiB", backend=sys.argv[1], workers=1) as app:
        a = app.alloc("a", 4 * mmap.PAGESIZE // 8, np.int64)
        a[:] = 5
        ref = a.copy()
        app.parallel(seen, 2)
        for step in range(2):
            assert libc.mlockall(2) == 0  # MCL_FUTURE
            try:
                assert all((g == ref).all() for g in app.parallel(seen, 2)), (step, "locked idle")
                app.parallel(write, 2, args=(step + 10,))
                ref[:2] = step + 10
                assert (a == ref).all(), (step, "locked write")
            finally:
                libc.munlockall()
            assert all((g == ref).all() for g in app.parallel(seen, 2)), (step, "unlocked idle")
            a[3] = step
            ref[3] = step
            assert all((g == ref).all() for g in app.parallel(seen, 2)), (step, "after a main write")
            app.parallel(write, 2, args=(step + 20,))
            ref[:2] = step + 20
            assert (a == ref).all(), (step, "unlocked write")
    print("ok", flush=True)
""")


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_mlockall_turned_on_and_off_between_batches(backend):
    """The mlockall probe is cached per batch: turned on and off between
    batches, every batch still tracks with the right mode and is exact."""
    proc = subprocess.run([sys.executable, "-c", _MLOCK_CHILD, backend], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("detect", [False, True])
def test_merge_regions_follow_allocs_between_batches(detect):
    """Merge regions are rebuilt only when the layout changes: arrays of
    other rules allocated between (idle) batches merge by their own rule."""
    with App("64KiB", max_size="1MiB", backend="threads", workers=2, detect_conflicts=detect) as app:
        x = app.alloc("x", 10, np.int64)
        app.parallel(_noop, 2)
        refs = {"x": np.zeros(10, np.int64)}
        rules = ["sum", "max", "xor", "product", "min", "overwrite"]
        for k, rule in enumerate(rules):
            name = f"r{k}"
            arr = app.alloc(name, 3000 if k % 2 else 7, np.int64, merge=rule)  # some past the first size
            if rule in ("product", "min"):
                arr[:] = 3
            refs[name] = arr.copy()
            app.parallel(_noop, 2)  # idle: the cache must not hide the new array's rule
            app.parallel(_bump, 2, args=(name, rule))
            ref = refs[name]
            for i in range(2):
                if rule == "sum":
                    ref[:5] += i + 1
                elif rule == "max":
                    ref[:5] = np.maximum(ref[:5], i + 1)
                elif rule == "xor":
                    ref[:5] ^= i + 1
                elif rule == "product":
                    ref[:5] *= i + 2
                elif rule == "min":
                    ref[:5] = np.minimum(ref[:5], i + 1)
            if rule == "overwrite":
                ref[0], ref[1] = 1, 2
            for n, r in refs.items():
                assert (app[n] == r).all(), (rule, n, app[n][:6], r[:6])
        assert (x == 0).all()


def _noop(mem, i, n):
    return None


def _bump(mem, i, n, name, rule):
    a = mem[name]
    if rule == "sum":
        a[:5] += i + 1
    elif rule in ("max", "min"):
        a[:5] = i + 1
    elif rule == "xor":
        a[:5] ^= i + 1
    elif rule == "product":
        a[:5] *= i + 2
    else:
        a[i] = i + 1


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("mode", ["cow", "segfault", "uffd", "uffd-async"])
def test_idle_and_writing_batches_alternate_exactly_in_every_mode(backend, mode):
    """Idle threads, main-program writes, merges and kernel writes into
    thread memory, in every tracking mode, against a numpy reference."""
    import pagefork
    if not pagefork.probe()[mode].available:
        pytest.skip(f"{mode} is not available")
    # The kernel's writes fail with EFAULT where the mode cannot take them
    # (segfault; uffd where userfaultfd is user-mode-only, unprivileged).
    kernel = pagefork.probe()[mode].kernel_writes
    with App("256KiB", backend=backend, workers=2, tracking=mode) as app:
        a = app.alloc("a", 8 * PAGE // 8, np.int64)
        ref = np.zeros(len(a), np.int64)
        for step in range(4):
            got = app.parallel(_seen, 4)
            assert all((g == ref).all() for g in got), (step, "idle")
            a[step * PAGE // 8] = step + 1
            ref[step * PAGE // 8] = step + 1
            got = app.parallel(_seen, 4)
            assert all((g == ref).all() for g in got), (step, "after a main write")
            app.parallel(_mixed, 4, args=(step, kernel))
            for i in range(4):
                if i % 2 == 0:
                    ref[(4 + i) * PAGE // 8 + step] = 100 * step + i
                elif kernel:
                    ref[(4 + i) * PAGE // 8 + step + 1] = 200 * step + i
            assert (a == ref).all(), (step, mode)


def _mixed(mem, i, n, step, kernel):
    a = mem["a"]
    if i % 2 == 0:
        a[(4 + i) * PAGE // 8 + step] = 100 * step + i
    elif kernel:  # the odd threads write only through the kernel
        r, w = os.pipe()
        os.write(w, np.int64(200 * step + i).tobytes())
        os.close(w)
        k = (4 + i) * PAGE // 8 + step + 1
        os.readv(r, [memoryview(a[k:k + 1]).cast("B")])
        os.close(r)


_MUNMAP_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    from pagefork import App
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    def fn(mem, i, n):
        a = mem["a"]
        if i == 0:
            assert libc.munmap(a.ctypes.data + mmap.PAGESIZE, mmap.PAGESIZE) == 0  # a hole, nothing written
            return None
        return int(a[mmap.PAGESIZE // 8])
    with App("1MiB", backend=sys.argv[1], workers=1) as app:
        a = app.alloc("a", 4 * mmap.PAGESIZE // 8, np.int64)
        a[:] = 6
        got = app.parallel(fn, 2)
        assert got[1] == 6, got
    print("ok", flush=True)
""")


def test_a_hole_a_thread_left_in_unwritten_memory_does_not_reach_the_next_thread():
    """munmap of a page of the view, nothing written: PAGEMAP_SCAN skips
    the hole (no private page), the memory is reused, the next thread's
    read of that page is a SIGSEGV. Before this branch it was mapped afresh."""
    proc = subprocess.run([sys.executable, "-c", _MUNMAP_CHILD, "threads"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_madvise_remove_on_thread_memory_is_refused_by_the_kernel():
    """MADV_REMOVE needs a shared mapping: on thread memory (a private
    mapping of the snapshot) the kernel refuses it, so it can neither punch
    the snapshot's file nor leave the next thread anything."""
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * PAGE // 8, np.int64)
        a[:] = 8

        def fn(mem, i, n):
            x = mem["a"]
            if i == 0:
                rc = _libc.madvise(_page_of(x), x.nbytes, 9)  # MADV_REMOVE
                return rc, ctypes.get_errno()
            return x.copy()

        got = app.parallel(fn, 2)
        assert got[0][0] == -1
        assert (got[1] == 8).all() and (a == 8).all()


_KEPT_MPROTECT_CHILD = textwrap.dedent("""
import ctypes, mmap, numpy as np
from pagefork import App
from pagefork.backends.combine import _KEEP_MIN_PAGES
pages = 2 * _KEEP_MIN_PAGES + 8
def fn(mem, i, n):
    a = mem["a"]
    a[:] = i + 1  # every page written: the slot keeps this memory for the next thread
    if i == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(a.ctypes.data, mmap.PAGESIZE, 1) == 0  # PROT_READ, after writing
    return int(a[0])
with App(f"{pages * mmap.PAGESIZE + (1 << 20)}", backend="threads", workers=1) as app:
    a = app.alloc("a", pages * mmap.PAGESIZE // 8, np.int64)
    assert app.parallel(fn, 3) == [1, 2, 3]
    assert (a == 3).all()
print("ok", flush=True)
""")


def test_protection_a_thread_left_on_kept_memory_does_not_reach_the_next_thread():
    """The same on memory a slot keeps mapped across threads because they
    write many pages (put back by a copy): a page the thread made read-only
    must not reach the next thread (nor the copy that puts pages back)."""
    proc = subprocess.run([sys.executable, "-c", _KEPT_MPROTECT_CHILD], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])
