"""Every public API, and its error paths, called many times: no growth in
memory or open file descriptors (the native core frees what it allocates)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, Diff, MergeError, Region, Snapshot, delta, wire

from support import SANITIZED, growth_rounds, open_fds, rss_kib


def _snapshot_round():
    with Snapshot(np.arange(4 * PAGE_SIZE, dtype=np.uint8), max_size=8 * PAGE_SIZE) as s:
        s.add_merge_region(0, 64, np.int32, "sum")
        s.fill_gaps()
        mem = np.frombuffer(s.read(), np.uint8).copy()
        mem[::97] ^= 1
        batch = s.diff(mem, np.ones(4, bool))
        s.apply(wire.decode(wire.encode(batch)))
        s.queue(batch)
        s.write_queued()
        s.tracked_changes()
        try:
            s.apply([Diff(0, b"\x02\x00\x00\x00", np.int32, "product"),
                     Diff(PAGE_SIZE * 9, b"x")])
        except pagefork.OutOfBoundsError:
            pass
        with Region(4 * PAGE_SIZE) as r:
            s.map_to(r)


def _product_error():
    with Snapshot(np.zeros(4, np.int32)) as s:
        s.add_merge_region(0, 16, np.int32, "product")
        try:
            s.diff(np.array([1, 0, 0, 0], np.int32), np.ones(1, bool))
        except MergeError:
            pass


def _encodings():
    old = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    new = bytearray(old)
    new[100:200] = bytes(100)
    for kwargs in ({}, {"page_size": 64, "xor": True, "zstd_level": 1}):
        assert delta.apply(delta.encode(old, new, **kwargs), old) == new
    for bad in (b"", b"PFDB" + bytes(40), delta.encode(old, new)[:-3]):
        for decode in (wire.decode, lambda d: delta.apply(d, old)):
            try:
                decode(bad)
            except pagefork.CorruptDataError:
                pass


def _hostile_inputs():
    """The error paths of the column, record and bound checks."""
    from pagefork import DiffBatch, OutOfBoundsError
    from pagefork import _native

    z = np.zeros(2, np.uint8)
    with Snapshot(bytes(64), max_size=128) as s:
        for offsets, lengths, ops in (([0, 1 << 44], [1, 1], z), ([0, 1], [1, 1], [0, 9])):
            batch = DiffBatch.unchecked(np.array(offsets, np.int64), np.array(lengths, np.int64),
                                         z, np.array(ops, np.uint8), b"ab")
            try:
                s.apply(batch)
            except (OutOfBoundsError, MergeError):
                pass
            try:
                wire.encode(batch)
            except ValueError:
                pass
    state = bytearray(_native.DELTA_CHECK_STATE)
    _native.delta_check(state, bytes([0, 3]) + b"abc", 10, 10, True)
    try:
        _native.delta_check(bytearray(_native.DELTA_CHECK_STATE), bytes([0, 0]), 10, 10, True)
    except ValueError:
        pass
    big = delta.encode(bytes(10), bytes(delta._CHUNK + PAGE_SIZE), zstd_level=1)  # over a chunk: streamed
    assert len(delta.apply(big, bytes(10))) == delta._CHUNK + PAGE_SIZE


def _regions():
    with Region(2 * PAGE_SIZE, max_size=16 * PAGE_SIZE, backing="memfd") as r:
        r.resize(16 * PAGE_SIZE)
        r.array(np.int64)[:] = 1
        r.resize(PAGE_SIZE)


@pytest.mark.parametrize("work", [_snapshot_round, _product_error, _encodings, _hostile_inputs,
                                  _regions],
                         ids=lambda f: f.__name__.strip("_"))
def test_no_growth(work):
    for _ in range(50):  # warm up caches and allocators
        work()
    gc.collect()
    fds, rss = open_fds(), rss_kib()
    for _ in range(growth_rounds(1000)):
        work()
    gc.collect()
    assert open_fds() == fds
    if not SANITIZED:  # ASan's quarantine keeps freed memory
        assert rss_kib() - rss < 8192, "RSS grew by more than 8 MiB over 1000 rounds"


def test_no_growth_over_batches():
    with pagefork.App("256KiB", backend="threads", workers=2) as app:
        a = app.alloc("a", 1000, np.int64, merge="sum")

        def work(mem, i, n):
            mem["a"][i::n] += 1

        for _ in range(30):
            app.parallel(work, 4)
        gc.collect()
        fds, rss = open_fds(), rss_kib()
        for _ in range(growth_rounds(500)):
            a[0] += 1
            app.parallel(work, 4)
        gc.collect()
        assert open_fds() == fds
        if not SANITIZED:  # ASan's quarantine keeps freed memory
            assert rss_kib() - rss < 8192


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_scattered_batches_and_checkpoints_leave_no_record_behind(backend, tmp_path):
    """The snapshot's record of changed ranges (for backends that ship
    deltas) is dropped after every batch and carry on the others: before,
    each merged diff's offset and length stayed for the App's lifetime
    (+150 MiB over 20 batches of 500,000 scattered diffs)."""
    with pagefork.App("8MiB", backend=backend, workers=2) as app:
        a = app.alloc("a", 1 << 20, np.int64, merge="sum")
        picks = [np.random.default_rng(k).choice(a.size, 100_000, replace=False) for k in range(2)]

        def scatter(mem, i, n, picks):
            mem["a"][picks[i]] += 1

        def round_():
            app.parallel(scatter, 2, args=(picks,))
            a[::4096] += 1  # the main program's writes, carried by the next batch or checkpoint
            app.checkpoint(tmp_path / "ck", keep=1)
            assert len(app._executor.snapshot.tracked_changes()) == 0

        rounds = growth_rounds(15)
        for _ in range(3):
            round_()
        gc.collect()
        rss = rss_kib()
        for _ in range(rounds):
            round_()
        gc.collect()
        if not SANITIZED:  # ASan's quarantine keeps freed memory
            assert rss_kib() - rss < 16384, "RSS grew by more than 16 MiB over 15 batches"
        assert (a[picks[0]] >= 3 + rounds).all()
