"""The fast restore path: the native copy that checksums each piece where it
landed (split between two native threads for large images, their CRC32Cs
joined),
a load into an existing region that leaves it untouched when the checkpoint
is damaged, and a checkpoint that does not remap main memory nobody wrote."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pagefork
from pagefork import PAGE_SIZE, App, CorruptDataError, Region
from pagefork import _checkpoint_format as fmt
from pagefork import _native
from pagefork import _checkpoint_versions as _chain
from pagefork import checkpoint as ck


def objects(path, suffix):
    return sorted(p for p in path.iterdir() if p.name.endswith(suffix))


# ---- crc32c_combine --------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000), st.integers(0, 2**32 - 1))
def test_crc32c_combine_is_the_crc_of_the_concatenation(a, b, seed):
    start = _native.crc32c(a, seed)
    assert _native.crc32c_combine(start, _native.crc32c(b), len(b)) == _native.crc32c(b, start)


def test_crc32c_combine_known_values_and_huge_lengths():
    # The CRC32C check value: "123456789" -> 0xE3069283, split anywhere.
    data = b"123456789"
    for cut in range(len(data) + 1):
        a, b = data[:cut], data[cut:]
        assert _native.crc32c_combine(_native.crc32c(a), _native.crc32c(b), len(b)) == 0xE3069283
    # Lengths past 4 GiB and up to 2**64 - 1: exact arithmetic, no overflow, no hang.
    zeros = bytes(1 << 20)
    c = _native.crc32c(zeros)
    twice = _native.crc32c_combine(c, c, len(zeros))
    assert twice == _native.crc32c(zeros + zeros)
    for n in (1 << 32, (1 << 40) + 7, 2**64 - 1):
        assert 0 <= _native.crc32c_combine(0x12345678, 0x9ABCDEF0, n) < 2**32
    with pytest.raises(OverflowError):
        _native.crc32c_combine(0, 0, 2**64)
    with pytest.raises((OverflowError, TypeError)):
        _native.crc32c_combine(-1, 0, 1)


# ---- read_checked ------------------------------------------------------------------------

def test_read_checked_copies_and_checksums_exactly(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 3 * (256 << 10) + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(b"HEAD" + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        dest = bytearray(len(data))
        assert _native.read_checked(fd, 4, len(data), dest) == (len(data), _native.crc32c(data))
        assert bytes(dest) == data
        # Continuing a CRC, and a short file: fewer bytes copied, CRC of those.
        seed = _native.crc32c(b"HEAD")
        dest = bytearray(len(data) + 100)
        got, crc = _native.read_checked(fd, 4, len(data) + 100, dest, seed)
        assert got == len(data) and crc == _native.crc32c(b"HEAD" + data)
        assert _native.read_checked(fd, 10**9, 10, bytearray(10)) == (0, 0)
        assert _native.read_checked(fd, 0, 0, bytearray()) == (0, 0)
    finally:
        os.close(fd)


def test_read_checked_refuses_bad_arguments(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            _native.read_checked(fd, 0, 100, bytearray(99))  # too small a destination
        with pytest.raises(TypeError):
            _native.read_checked(fd, 0, 10, b"immutable!")  # read-only
        with pytest.raises(OverflowError):
            _native.read_checked(fd, 2**63, 1, bytearray(1))
        with pytest.raises(OverflowError):
            _native.read_checked(fd, 2**62, 2**62, bytearray(1))
        with pytest.raises(OverflowError):
            _native.read_checked(fd, -1, 1, bytearray(1))
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        _native.read_checked(fd, 0, 10, bytearray(10))  # closed
    wfd = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            _native.read_checked(wfd, 0, 10, bytearray(10))  # not readable
    finally:
        os.close(wfd)


def test_read_checked_into_a_region_from_two_threads(tmp_path):
    size = 8 << 20
    data = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "f"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    crcs: dict[int, tuple[int, int]] = {}
    with Region(size) as region:
        view = memoryview(region).cast("B")
        half = size // 2

        def copy(i):
            crcs[i] = _native.read_checked(fd, i * half, half, view[i * half:(i + 1) * half])

        threads = [threading.Thread(target=copy, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        view.release()
        os.close(fd)
        assert bytes(region) == data.tobytes()
        joined = _native.crc32c_combine(crcs[0][1], crcs[1][1], half)
        assert joined == _native.crc32c(data)


@pytest.mark.parametrize("short_by", [0, 1, PAGE_SIZE, 3 * PAGE_SIZE + 5, 6 * PAGE_SIZE])
def test_read_checked_on_two_native_threads(tmp_path, short_by):
    """Both halves copied and checked; a file ending in either half copies
    exactly the bytes it has, with their CRC."""
    size = 8 * PAGE_SIZE + 321
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(b"H" + data[: size - short_by])
    fd = os.open(path, os.O_RDONLY)
    try:
        dest = bytearray(b"\xee" * size)
        got, crc = _native.read_checked(fd, 1, size, dest, _native.crc32c(b"H"), 2)
    finally:
        os.close(fd)
    assert got == size - short_by
    assert crc == _native.crc32c(b"H" + data[:got])
    assert bytes(dest[:got]) == data[:got]
    with pytest.raises(ValueError):
        _native.read_checked(0, 0, 0, bytearray(), 0, 3)


# ---- restores through the fast path, large enough for two threads ------------------------

@pytest.fixture
def large_checkpoint(tmp_path, monkeypatch):
    """A bare-region checkpoint whose base is copied by two threads (the
    threshold lowered so the test stays small), plus two increments."""
    monkeypatch.setattr(fmt, "PARALLEL_COPY", 64 * PAGE_SIZE)
    n = 96
    with Region(n * PAGE_SIZE + 100) as region, pagefork.tracker(_reset_mode()) as t:
        t.start(region)
        data = np.frombuffer(region, np.uint8)
        data[:] = np.random.default_rng(3).integers(0, 256, data.size, dtype=np.uint8)
        assert ck.save(region, tmp_path, tracker=t, compress=None).base
        for seed in (4, 5):
            rng = np.random.default_rng(seed)
            for p in rng.choice(n, 5, replace=False):
                data[p * PAGE_SIZE: p * PAGE_SIZE + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
            data[-1] = seed
            assert not ck.save(region, tmp_path, tracker=t).base
        t.stop(region)
        yield tmp_path, bytes(region)


def _reset_mode():
    support = pagefork.probe()
    return next(m for m in ("uffd-async", "uffd", "segfault", "none") if support[m].available)


def test_a_two_thread_restore_is_exact(large_checkpoint):
    path, expected = large_checkpoint
    with ck.load(path) as back:
        assert bytes(back) == expected
    assert all(problem is None for _, _, problem in ck.verify(path))


@pytest.mark.parametrize("where", ["first half", "second half", "last byte", "header"])
def test_a_flipped_byte_in_either_half_is_found(large_checkpoint, where):
    path, _ = large_checkpoint
    base = objects(path, ".base")[0]
    raw = bytearray(base.read_bytes())
    at = {"first half": 100, "second half": len(raw) - 5000, "last byte": len(raw) - 1,
          "header": 20}[where]
    raw[at] ^= 0x40
    base.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=base.name):
        ck.load(path)
    assert any(name == base.name and problem for _, name, problem in ck.verify(path))


@pytest.mark.parametrize("change", ["truncated", "longer"])
def test_a_base_of_the_wrong_length_is_found(large_checkpoint, change):
    path, _ = large_checkpoint
    base = objects(path, ".base")[0]
    raw = base.read_bytes()
    base.write_bytes(raw[:-PAGE_SIZE] if change == "truncated" else raw + b"\0" * 7)
    with pytest.raises(CorruptDataError, match=base.name):
        ck.load(path)


def test_a_base_truncated_while_it_is_copied_is_found(large_checkpoint, monkeypatch):
    """The file shrinks after its size was checked: the copy comes up short."""
    path, _ = large_checkpoint
    base = objects(path, ".base")[0]
    real = _native.read_checked

    def shrinking(fd, offset, length, dest, *rest):
        os.truncate(base, base.stat().st_size - PAGE_SIZE)
        return real(fd, offset, length, dest, *rest)

    monkeypatch.setattr(_native, "read_checked", shrinking)
    with pytest.raises(CorruptDataError, match="truncated"):
        ck.load(path)


@pytest.fixture
def large_app_checkpoint(tmp_path):
    """An App checkpoint with a raw (uncompressed) base, which a restore
    copies from its file into main memory in native code, plus an
    increment; yields the folder and the array."""
    with App(256 * PAGE_SIZE, backend="threads", workers=1) as app:
        a = app.alloc("a", 256 * PAGE_SIZE // 8 - 64, np.float64, merge="sum")
        a[:] = np.random.default_rng(7).random(a.size)
        app.checkpoint(tmp_path, compress=None)
        a[::999] += 1
        app.checkpoint(tmp_path)
        yield tmp_path, a.copy()


def test_an_app_restore_from_a_large_base_is_exact(large_app_checkpoint, monkeypatch):
    monkeypatch.setattr(fmt, "PARALLEL_COPY", 64 * PAGE_SIZE)  # the bare load below: two threads
    path, expected = large_app_checkpoint
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)
        # ... and the bare load of the same memory agrees byte for byte.
        with ck.load(path) as region:
            assert bytes(region)[: expected.nbytes] == expected.tobytes()


# ---- load(into=) leaves the region untouched when the checkpoint is damaged ---------------

@pytest.mark.parametrize("damage", ["base", "last increment", "missing increment"])
def test_load_into_a_region_is_all_or_nothing(large_checkpoint, damage):
    path, _ = large_checkpoint
    if damage == "missing increment":
        objects(path, ".incr")[-1].unlink()
    else:
        victim = objects(path, ".base")[0] if damage == "base" else objects(path, ".incr")[-1]
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 1
        victim.write_bytes(bytes(raw))
    with Region(3 * PAGE_SIZE, max_size=200 * PAGE_SIZE) as into:
        np.frombuffer(into, np.uint8)[:] = 0xEE
        before = bytes(into)
        with pytest.raises(CorruptDataError):
            ck.load(path, into=into)
        assert into.size == 3 * PAGE_SIZE  # not resized either
        assert bytes(into) == before


def test_load_into_a_closed_region_is_refused(large_checkpoint):
    path, _ = large_checkpoint
    region = Region(200 * PAGE_SIZE)
    region.close()
    with pytest.raises(pagefork.PageforkError, match="closed"):
        ck.load(path, into=region)


def test_check_object_reads_only_what_is_stored(tmp_path):
    """A manifest claiming a huge size costs no more than the bytes stored."""
    ref = fmt.ObjectRef("v0000000001-00000000.base", 1, "base", 1 << 60, 0, 1)
    path = tmp_path / "o"
    path.write_bytes(struct.pack("<Q", 7) * 10)
    with open(path, "rb") as f, pytest.raises(CorruptDataError, match="magic"):
        fmt.check_object(f, ref, 1 << 40)


# ---- a checkpoint does not remap main memory nobody wrote ---------------------------------

def test_main_memory_read_but_not_written_is_not_remapped_by_a_checkpoint(tmp_path):
    with App(64 * PAGE_SIZE, backend="threads", workers=1) as app:
        a = app.alloc("a", 64 * PAGE_SIZE, np.uint8)
        a[::PAGE_SIZE] = 1
        app.checkpoint(tmp_path)
        executor = app._executor
        remaps = []
        real = executor._window
        executor._window = lambda: (remaps.append(1), real())[1]
        int(a.sum())  # reads map every page
        app.checkpoint(tmp_path)
        assert remaps == []
        a[5 * PAGE_SIZE] = 9  # a main-program write: carried and remapped
        info = app.checkpoint(tmp_path)
        assert remaps == [1] and info.pages == 1
        del executor._window
        expected = a.copy()
    with App.restore(tmp_path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)



# ---- a save's cost does not grow with the history -----------------------------------------

def test_a_save_reads_a_bounded_number_of_manifests_whatever_the_history(tmp_path, monkeypatch):
    reads = []
    real = _chain.read_manifest
    monkeypatch.setattr(_chain, "read_manifest", lambda store, v: (reads.append(v), real(store, v))[1])
    with Region(16 * PAGE_SIZE) as region, pagefork.tracker(_reset_mode()) as t:
        t.start(region)
        per_save = []
        for i in range(40):
            region.array(np.uint8)[(i % 16) * PAGE_SIZE] = i + 1
            reads.clear()
            ck.save(region, tmp_path, tracker=t, base_every=1000, base_fraction=1000.0)
            per_save.append(len(reads))
        t.stop(region)
        expected = bytes(region)
    assert max(per_save) <= 2, per_save
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected


@pytest.mark.parametrize("killed_after_commit", [False, True])
def test_orphans_of_killed_saves_are_removed_by_the_next_one(tmp_path, killed_after_commit):
    """A save killed before its commit leaves an object carrying the version
    number the next save reuses; one killed after its commit but before its
    clean-up leaves the one before: both go with the next save, and
    nothing a version needs is touched."""
    with Region(4 * PAGE_SIZE) as region, pagefork.tracker(_reset_mode()) as t:
        t.start(region)
        for i in range(5):
            region.array(np.uint8)[i % 4 * PAGE_SIZE] = i + 1
            ck.save(region, tmp_path, tracker=t)
        newest = max(v.version for v in ck.versions(tmp_path))
        stray = newest if killed_after_commit else newest + 1
        orphan = tmp_path / f"v{stray:010d}-0badf00d.incr"
        orphan.write_bytes(b"half written")
        region.array(np.uint8)[0] = 99
        ck.save(region, tmp_path, tracker=t)
        expected = bytes(region)
        t.stop(region)
    assert not orphan.exists()
    assert all(why is None for _, _, why in ck.verify(tmp_path))
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected
    for v in ck.versions(tmp_path):
        ck.load(tmp_path, version=v.version).close()


@pytest.mark.parametrize("forgery", ["pages outside the memory", "header memory too large"])
def test_load_into_refuses_a_forged_increment_before_touching_the_region(large_checkpoint,
                                                                         forgery):
    """An increment with a valid checksum (the manifest rewritten to match)
    but impossible contents: found by decoding it before the base is
    written into the region."""
    path, _ = large_checkpoint
    victim = objects(path, ".incr")[-1]
    raw = bytearray(victim.read_bytes())
    if forgery == "header memory too large":
        struct.pack_into("<Q", raw, 8, 1 << 40)
    else:
        # The wire message's first run offset (after both headers) moved past the memory.
        struct.pack_into("<q", raw, fmt.HEADER.size + fmt._WIRE_HEADER.size, 1 << 40)
    victim.write_bytes(bytes(raw))
    version = max(v.version for v in ck.versions(path))
    name = path / fmt.manifest_name(version)
    manifest = fmt.Manifest.decode(name.read_bytes())
    manifest.objects[-1].crc32c = _native.crc32c(bytes(raw))
    manifest.objects[-1].size = len(raw)
    name.write_bytes(manifest.encode())
    with Region(3 * PAGE_SIZE, max_size=200 * PAGE_SIZE) as into:
        np.frombuffer(into, np.uint8)[:] = 0xEE
        before = bytes(into)
        with pytest.raises(CorruptDataError, match=victim.name):
            ck.load(path, into=into)
        assert into.size == 3 * PAGE_SIZE and bytes(into) == before


@pytest.mark.parametrize("where", ["first half", "second half"])
def test_an_app_restore_finds_a_flipped_byte_in_either_half(large_app_checkpoint, where):
    path, _ = large_app_checkpoint
    base = objects(path, ".base")[0]
    raw = bytearray(base.read_bytes())
    raw[100 if where == "first half" else len(raw) - 5000] ^= 0x01
    base.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=base.name):
        App.restore(path, backend="threads", workers=1)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_app_restore_from_a_base_truncated_meanwhile_is_an_error_not_a_crash(
        large_app_checkpoint, monkeypatch):
    """Another process truncates the base after its size was checked.
    Before, the checksum thread read a mapping of the file: truncated before
    the mapping, it died with a traceback; truncated while it read, SIGBUS
    would kill the process. Now it preads, and the restore says so."""
    from pagefork._checkpoint_store import LocalStore

    path, _ = large_app_checkpoint
    base = objects(path, ".base")[0]
    real = LocalStore.open

    def truncated_after_the_check(self, name):
        found = real(self, name)
        if name == base.name:
            os.truncate(base, base.stat().st_size // 3)
        return found

    monkeypatch.setattr(LocalStore, "open", truncated_after_the_check)
    with pytest.raises(CorruptDataError, match=f"{base.name}.*truncated"):
        App.restore(path, backend="threads", workers=1)


def _interrupt_restores(path, expected) -> int:
    """120 App.restore / checkpoint.load calls, each with SIGINT at a random
    instant: each gives exact memory or KeyboardInterrupt (nothing else: a
    descriptor closed twice was an OSError here). How many were interrupted."""
    import random
    import signal

    rng = random.Random(11)
    interrupted = 0
    for i in range(120):
        timer = threading.Timer(rng.uniform(0, 0.003), signal.raise_signal, (signal.SIGINT,))
        try:
            timer.start()
            if i % 2:
                with App.restore(path, backend="threads", workers=1) as back:
                    assert np.array_equal(back["a"], expected)
            else:
                with ck.load(path) as region:
                    assert bytes(region)[: expected.nbytes] == expected.tobytes()
            timer.join()  # the signal may still land here
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            timer.cancel()
            timer.join()
    return interrupted


def test_sigint_at_random_points_of_restores(large_app_checkpoint):
    """Ctrl-C anywhere in App.restore and checkpoint.load (the base copied
    and checksummed in native code). Before: Ctrl-C right after the
    store opened an object closed its descriptor twice (EBADF later, or
    another file's descriptor by then). The next restore is exact."""
    path, expected = large_app_checkpoint
    assert _interrupt_restores(path, expected) >= 10
    with App.restore(path, backend="threads", workers=1) as back:
        assert np.array_equal(back["a"], expected)


def test_interrupted_restores_leave_no_thread_behind(large_app_checkpoint):
    """The same interrupts leave no thread running (the process-wide helper
    threads the first App starts stay, by design: counted after one)."""
    import gc
    import time

    path, expected = large_app_checkpoint
    with App.restore(path, backend="threads", workers=1):
        pass
    before = len(os.listdir("/proc/self/task"))
    _interrupt_restores(path, expected)
    gc.collect()
    for _ in range(200):  # a joined thread's OS thread may take a moment to exit
        if len(os.listdir("/proc/self/task")) <= before:
            break
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= before  # fewer: a thread of an earlier test ended
