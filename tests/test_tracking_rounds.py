"""Reading in rounds: dirty_pages(reset=True) with writers running loses nothing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, Region, UnsupportedModeError
from pagefork import _native

from support import as_set, expected, require, write_pages

ATOMIC_RESET_MODES = ["none", "segfault", "uffd", "uffd-async"]


def test_reset_read_clears_what_it_read(tracked):
    mode, tracker, region = tracked
    if mode in ("cow", "softpte"):
        pytest.skip("covered by test_modes_that_cannot_reset_atomically")
    tracker.start(region)
    write_pages(region, {1, 4})
    assert as_set(tracker.dirty_pages(region, "global", reset=True)) == expected(mode, {1, 4}, 16)
    assert as_set(tracker.dirty_pages(region, "global")) == expected(mode, (), 16)
    write_pages(region, {4, 9}, 2)  # page 4 again: re-armed
    assert as_set(tracker.dirty_pages(region, "both", reset=True)) == expected(mode, {4, 9}, 16)
    assert as_set(tracker.dirty_pages(region, "global", reset=True)) == expected(mode, (), 16)
    tracker.stop(region)
    write_pages(region, {7})  # stopped: not recorded, and reset=True still reads
    assert as_set(tracker.dirty_pages(region, "global", reset=True)) == expected(mode, (), 16)


@pytest.mark.parametrize("mode_name", ["segfault", "uffd"])
def test_reset_of_one_scope_keeps_the_other(mode_name):
    require(mode_name)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as t:
        t.start(region)
        t.start_thread(region)
        write_pages(region, {2})
        assert as_set(t.dirty_pages(region, "thread", reset=True)) == {2}
        assert as_set(t.dirty_pages(region, "thread")) == set()
        assert as_set(t.dirty_pages(region, "global")) == {2}  # untouched
        write_pages(region, {2, 5})  # re-armed: both scopes see the new writes
        assert as_set(t.dirty_pages(region, "thread")) == {2, 5}
        assert as_set(t.dirty_pages(region, "global", reset=True)) == {2, 5}
        assert as_set(t.dirty_pages(region, "thread")) == {2, 5}
        assert as_set(t.dirty_pages(region, "global")) == set()


@pytest.mark.parametrize("mode_name", ["cow", "softpte"])
def test_modes_that_cannot_reset_atomically(mode_name):
    region = Region(4 * PAGE_SIZE, backing="memfd")
    try:
        t = pagefork.Tracker(mode_name)
        with pytest.raises(UnsupportedModeError, match="reset=True"):
            t.dirty_pages(region, "global", reset=True)
    finally:
        region.close()


# ---- concurrent writers -----------------------------------------------------------

WRITERS = 3
PAGES = 256
ROUNDS = 400
CHUNK = 1 << 16


@pytest.mark.parametrize("mode_name", ATOMIC_RESET_MODES)
@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_no_write_lost_with_concurrent_writers(mode_name, shared):
    """Native writer threads store per-page sequence numbers while the main
    thread reads in rounds with reset=True and copies what was reported into
    a shadow. A page that differs from the shadow after a round was written
    after that round's read, so the next round must report it; at the end the
    shadow must equal memory exactly."""
    require(mode_name)
    region = Region(PAGES * PAGE_SIZE, shared=shared)
    tracker = pagefork.tracker(mode_name)
    mem = region.array(np.uint64).reshape(PAGES, PAGE_SIZE // 8)
    stop = threading.Event()
    writes = [0] * WRITERS

    def writer(slot: int) -> None:
        seq, seed = 1, 0x9E3779B97F4A7C15 * (slot + 1) & (2**64 - 1)
        while not stop.is_set():
            seed = _native._scribble(region.address, PAGES, slot, seq, CHUNK, seed)
            seq += CHUNK
        writes[slot] = seq - 1

    tracker.start(region)
    shadow = mem.copy()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    pending = np.zeros(PAGES, dtype=np.bool_)
    lost = reported = 0
    try:
        for t in threads:
            t.start()
        for _ in range(ROUNDS):
            time.sleep(0.001)  # pacing only: lets the writers take the GIL between chunks
            dirty = tracker.dirty_pages(region, "global", reset=True)
            lost += int(np.count_nonzero(pending & ~dirty))
            reported += int(np.count_nonzero(dirty))
            shadow[dirty] = mem[dirty]
            pending = (mem != shadow).any(axis=1)
    finally:
        stop.set()
        for t in threads:
            t.join()
        dirty = tracker.dirty_pages(region, "global", reset=True)
        lost += int(np.count_nonzero(pending & ~dirty))
        shadow[dirty] = mem[dirty]
        tracker.close()
        region.close()
    print(f"{mode_name}: {ROUNDS + 1} rounds, {sum(writes)} writes, {reported} pages reported, "
          f"{lost} lost")
    assert lost == 0
    assert np.array_equal(shadow, mem)


# ---- Snapshot.map_to over tracked memory ------------------------------------------------


@pytest.mark.parametrize("mode_name", ["segfault", "uffd", "uffd-async", "cow"])
@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_map_to_keeps_tracking_armed(mode_name, backing):
    require(mode_name)
    snap = pagefork.Snapshot(bytes(range(256)) * (16 * PAGE_SIZE // 256))
    region = Region(16 * PAGE_SIZE, backing=backing)
    tracker = pagefork.tracker(mode_name)
    try:
        if mode_name == "cow":
            snap.map_to(region)
        tracker.start(region)
        write_pages(region, {1})
        snap.map_to(region)  # same address; protections of the old mapping are gone
        assert bytes(region.array()[PAGE_SIZE:PAGE_SIZE + 4]) == bytes(range(4))
        write_pages(region, {4, 9}, 5)
        assert as_set(tracker.dirty_pages(region, "global")) == {1, 4, 9}
        if mode_name != "cow":
            assert as_set(tracker.dirty_pages(region, "global", reset=True)) == {1, 4, 9}
            snap.map_to(region)
            write_pages(region, {6})
            assert as_set(tracker.dirty_pages(region, "global", reset=True)) == {6}
            snap.map_to(region)  # nothing written after this remap
            assert as_set(tracker.dirty_pages(region, "global", reset=True)) == set()
        tracker.stop(region)
        write_pages(region, {12})  # stopped, and map_to must not re-arm a stopped tracker
        snap.map_to(region)
        write_pages(region, {13})
        if mode_name == "cow":
            assert as_set(tracker.dirty_pages(region, "global")) == {1, 4, 9}
        else:
            assert as_set(tracker.dirty_pages(region, "global")) == set()
    finally:
        tracker.close()
        region.close()
        snap.close()


@pytest.mark.parametrize("mode_name", ["segfault", "uffd"])
def test_map_to_keeps_thread_tracking_armed(mode_name):
    require(mode_name)
    snap = pagefork.Snapshot(size=8 * PAGE_SIZE)
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(mode_name) as tracker:
        tracker.start_thread(region)
        snap.map_to(region)
        write_pages(region, {3})
        assert as_set(tracker.dirty_pages(region, "thread")) == {3}
        tracker.stop_thread(region)
    snap.close()
