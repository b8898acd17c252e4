"""Incremental checkpoints: exact round trips (App and Region; local folders,
file://, memory:// and S3 through moto), a commit that survives SIGKILL at
any instant, damage reported by version and object, pruning, bases every K,
live writers, the CLI and the resuming example."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pagefork
from pagefork import PAGE_SIZE, App, CorruptDataError, Region
from pagefork import checkpoint as ck
from pagefork.cli import main as cli

from support import growth_rounds, open_fds, rss_kib

ROOT = Path(__file__).resolve().parent.parent


def reset_modes() -> list[str]:
    """Tracking modes whose dirty_pages(reset=True) works here."""
    support = pagefork.probe()
    return [m for m in ("uffd-async", "uffd", "segfault", "none") if support[m].available]


def objects(path: Path, suffix: str) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name.endswith(suffix))


def fill(region: Region, pages: list[int], seed: int) -> None:
    data = np.frombuffer(region, np.uint8)
    rng = np.random.default_rng(seed)
    for p in pages:
        data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)


# ---- the API -------------------------------------------------------------------------

def test_checkpoint_is_an_attribute_of_the_package():
    assert pagefork.checkpoint is ck
    assert "checkpoint" in pagefork.__all__
    assert callable(ck.save) and callable(ck.load)


def test_app_round_trip_is_exact(tmp_path):
    with App("1MiB", max_size="4MiB", backend="threads") as app:
        a = app.alloc("a", 5000, np.float64, merge="sum")
        b = app.alloc("b", (64, 64), np.int32, merge="max")
        app.alloc("c", 10, np.uint8, merge="ignore")
        a[:] = np.arange(5000)
        b[:] = -1
        first = app.checkpoint(tmp_path)
        assert first.version == 1 and first.base and first.chain_length == 0

        def work(mem, i, n):
            mem["a"][i::n] += i + 1
            mem["b"][i, :] = i
        app.parallel(work, 3)
        a[17] = 0.5  # a main-program write after the batch
        app.alloc("grown", 600_000, np.uint8)  # grows main memory past 1 MiB
        app["grown"][-1] = 9
        second = app.checkpoint(tmp_path)
        assert not second.base and second.version == 2 and second.chain_length == 1
        expected = bytes(app.memory)
        layout = app.arrays
        version = app._executor.version
    with App.restore(tmp_path, backend="threads") as back:
        assert bytes(back.memory) == expected
        assert back.arrays == layout
        assert back._executor.version == version
        assert back.memory.max_size == 4 << 20
        assert back["c"].dtype == np.uint8 and back["b"].shape == (64, 64)
        # the merge rules came back: a SUM batch adds, MAX keeps the larger
        before = back["a"].copy()
        back.parallel(lambda mem, i, n: mem["a"].__iadd__(1.0), 2)
        assert np.array_equal(back["a"], before + 2)
        back.parallel(lambda mem, i, n: mem["b"].__setitem__((0, 0), -5 + 10 * i), 2)
        assert back["b"][0, 0] == 5
    with App.restore(tmp_path, version=1, backend="threads") as old:
        assert np.array_equal(old["a"], np.arange(5000)) and (old["b"] == -1).all()
        assert "grown" not in old


def test_app_increment_holds_exactly_the_changed_pages(tmp_path):
    with App(64 * PAGE_SIZE, backend="threads") as app:
        raw = app.alloc("raw", 32 * PAGE_SIZE, np.uint8)
        ign = app.alloc("ign", 8 * PAGE_SIZE, np.uint8, merge="ignore")
        sums = app.alloc("sums", 8 * PAGE_SIZE // 8, np.int64, merge="sum")
        app.checkpoint(tmp_path)
        raw[3 * PAGE_SIZE] = 1                    # main program, page 3
        raw[5 * PAGE_SIZE - 1] = 1                # page 4, last byte

        def work(mem, i, n):
            mem["raw"][10 * PAGE_SIZE + i] = 7     # page 10, both threads
            mem["ign"][:] = 1                      # merged by IGNORE: never changes main memory
            mem["sums"][PAGE_SIZE // 8 * 2] += 1   # page 2 of sums
        app.parallel(work, 2)
        info = app.checkpoint(tmp_path)
        assert info.pages == 4
        assert info.bytes_written < 6 * PAGE_SIZE
        assert app.checkpoint(tmp_path).pages == 0  # nothing since
        expected = bytes(app.memory)
        assert ign.sum() == 0 and sums[PAGE_SIZE // 8 * 2] == 2
    with App.restore(tmp_path, backend="threads") as back:
        assert bytes(back.memory) == expected


def test_restored_app_continues_the_chain(tmp_path):
    with App("256KiB", backend="threads") as app:
        x = app.alloc("x", 1000, np.int64)
        app.checkpoint(tmp_path)
        x[:] = 1
        app.checkpoint(tmp_path)
    with App.restore(tmp_path, backend="threads") as back:
        back["x"][500] = 2
        info = back.checkpoint(tmp_path)
        assert not info.base and info.pages == 1 and info.version == 3
        expected = bytes(back.memory)
    with App.restore(tmp_path, backend="threads") as again:
        assert bytes(again.memory) == expected


def test_app_checkpoint_and_restore_on_processes_backend(tmp_path):
    def _add_one(mem, i, n):  # a closure: pickled by value for the worker processes
        v = mem["v"]
        v += 1.0
        mem["w"][i * PAGE_SIZE] = i + 1

    with App("128KiB", backend="processes", workers=2) as app:
        app.alloc("v", 100, np.float64, merge="sum")[:] = 2.0
        app.alloc("w", 2 * PAGE_SIZE, np.uint8)
        app.checkpoint(tmp_path)
        app.parallel(_add_one, 2)
        assert app.checkpoint(tmp_path).pages == 3  # v's page and one page of w per thread
        expected = bytes(app.memory)
    with App.restore(tmp_path, backend="processes", workers=2) as back:
        assert bytes(back.memory) == expected
        back.parallel(_add_one, 2)
        assert (back["v"] == 6.0).all()


def test_checkpoint_while_another_thread_runs_batches(tmp_path):
    with App("256KiB", backend="threads") as app:
        counter = app.alloc("c", 1, np.int64, merge="sum")
        stop = threading.Event()

        def batches():
            while not stop.is_set():
                app.parallel(lambda mem, i, n: mem["c"].__iadd__(1), 2)
        th = threading.Thread(target=batches)
        th.start()
        try:
            infos = [app.checkpoint(tmp_path) for _ in range(10)]
        finally:
            stop.set()
            th.join()
        final = app.checkpoint(tmp_path)
        expected = int(counter[0])
    values = []
    for info in infos + [final]:
        with App.restore(tmp_path, version=info.version, backend="threads") as back:
            values.append(int(back["c"][0]))
    assert values == sorted(values) and values[-1] == expected
    assert all(v % 2 == 0 for v in values)  # whole batches only, never half of one


def _until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def _inside_checkpoint_module(thread: threading.Thread) -> bool:
    """Whether ``thread`` is running (or waiting) inside pagefork.checkpoint."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    while frame is not None:
        if frame.f_code.co_filename == ck.__file__:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("second_target", ["other", "same"])
def test_two_threads_checkpointing_one_app_at_once(tmp_path, second_target):
    """Two checkpoints called while the App is busy run one after the other
    on its batch thread; the second builds on what the first did. Before:
    the second decided against the App's last checkpoint as it was when it
    was *called*. To another target, that was this target's version 1
    while the first had meanwhile saved (and so cleared) the page written
    after it: the second wrote an increment without that page, and its
    restore gave back the old bytes. To the same target it wrote a whole
    base where an increment was due."""
    first_target, other = tmp_path / "first", tmp_path / "second"
    with App("64KiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4 * PAGE_SIZE // 8, np.int64)
        a[PAGE_SIZE // 8] = 5
        app.checkpoint(other)  # version 1 there: the App's last checkpoint
        a[0] = 7               # a page written after it
        started, proceed = threading.Event(), threading.Event()

        def hold(mem, i, n):
            started.set()
            assert proceed.wait(300)

        batch = threading.Thread(target=app.parallel, args=(hold, 1))
        batch.start()
        second_path = other if second_target == "other" else first_target
        first = threading.Thread(target=app.checkpoint, args=(first_target,))
        second = threading.Thread(target=app.checkpoint, args=(second_path,))
        try:
            assert started.wait(120)
            first.start()
            _until(lambda: app._executor._requests.qsize() == 1, "the first checkpoint queued")
            second.start()
            _until(lambda: _inside_checkpoint_module(second), "the second checkpoint called")
        finally:
            proceed.set()
            for th in (batch, first, second):
                if th.ident is not None:
                    th.join()
        expected = bytes(app.memory)
    with App.restore(second_path, backend="threads", workers=1) as back:
        assert int(back["a"][0]) == 7
        assert bytes(back.memory) == expected
    kinds = [v.base for v in ck.versions(second_path)]
    # other: a base (the first cleared what an increment on version 1 needs);
    # same: an increment on the version the first just wrote
    assert kinds == ([True, True] if second_target == "other" else [True, False])


def test_fork_child_can_save_while_the_parent_holds_the_lock(tmp_path):
    with Region(PAGE_SIZE) as r:
        with ck._target_lock(ck.open_store(tmp_path)):
            pid = os.fork()
            if pid == 0:  # the child: the lock held by the parent must not block it
                try:
                    ck.save(r, tmp_path)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [v.version for v in ck.versions(tmp_path)] == [1]


def test_restore_rejects_a_region_checkpoint_and_size_arguments(tmp_path):
    with Region(4 * PAGE_SIZE) as r:
        ck.save(r, tmp_path / "r")
    with pytest.raises(ValueError, match="bare Region"):
        App.restore(tmp_path / "r", backend="threads")
    with App("64KiB", backend="threads") as app:
        app.checkpoint(tmp_path / "a")
    with pytest.raises(TypeError, match="size"):
        App.restore(tmp_path / "a", size=4096, backend="threads")
    with pytest.raises(ValueError, match="no checkpoint version 7"):
        App.restore(tmp_path / "a", version=7, backend="threads")
    with pytest.raises(FileNotFoundError):
        App.restore(tmp_path / "nothing", backend="threads")


def test_region_round_trip_with_a_tracker(tmp_path):
    modes = reset_modes()
    with Region(32 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        fill(region, list(range(32)), 1)
        first = ck.save(region, tmp_path, tracker=t)
        assert first.base and first.pages == 32
        fill(region, [3, 4, 30], 2)
        second = ck.save(region, tmp_path, tracker=t)
        if t.mode != "none":
            assert second.pages == 3
        assert not second.base
        expected = bytes(region)
        third = ck.save(region, tmp_path, tracker=t)
        if t.mode != "none":
            assert third.pages == 0
        t.stop(region)
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected
    with ck.load(tmp_path, version=1) as back, Region(32 * PAGE_SIZE) as ref:
        fill(ref, list(range(32)), 1)
        assert bytes(back) == bytes(ref)


def test_region_without_tracker_writes_bases(tmp_path):
    with Region(8 * PAGE_SIZE, max_size=16 * PAGE_SIZE) as region:
        fill(region, [0, 7], 3)
        assert ck.save(region, tmp_path).base
        assert ck.save(region, tmp_path).base
        expected = bytes(region)
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected and back.max_size == 16 * PAGE_SIZE


def test_load_into_a_region(tmp_path):
    with Region(8 * PAGE_SIZE) as region:
        fill(region, range(8), 4)
        ck.save(region, tmp_path)
        expected = bytes(region)
    with Region(2 * PAGE_SIZE, max_size=8 * PAGE_SIZE) as into:
        np.frombuffer(into, np.uint8)[:] = 0xEE
        assert ck.load(tmp_path, into=into) is into
        assert bytes(into) == expected
    with Region(2 * PAGE_SIZE) as small, pytest.raises(pagefork.OutOfBoundsError):
        ck.load(tmp_path, into=small)


def test_grown_region_gets_a_new_base(tmp_path):
    modes = reset_modes()
    with Region(4 * PAGE_SIZE, max_size=8 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        fill(region, range(4), 5)
        ck.save(region, tmp_path, tracker=t)
        region.resize(8 * PAGE_SIZE)
        fill(region, [6], 6)
        info = ck.save(region, tmp_path, tracker=t)
        assert info.base
        expected = bytes(region)
        t.stop(region)
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected


def test_region_shrunk_and_regrown_gets_a_new_base(tmp_path):
    modes = reset_modes()
    with Region(4 * PAGE_SIZE, max_size=8 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        fill(region, range(4), 5)
        ck.save(region, tmp_path, tracker=t)
        region.resize(2 * PAGE_SIZE)
        region.resize(4 * PAGE_SIZE)  # pages 2 and 3 read as zero; no tracker reports them
        assert ck.save(region, tmp_path, tracker=t).base
        expected = bytes(region)
        assert expected[3 * PAGE_SIZE:] == bytes(PAGE_SIZE)
        t.stop(region)
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected


def test_a_new_tracker_starts_a_new_chain(tmp_path):
    modes = reset_modes()
    with Region(4 * PAGE_SIZE) as region:
        t = pagefork.tracker(modes[0])
        t.start(region)
        ck.save(region, tmp_path, tracker=t)
        t.stop(region)
        t.close()
        del t
        fill(region, [1], 3)  # no tracker sees this write
        t2 = pagefork.tracker(modes[0])  # may land at the freed tracker's id
        t2.start(region)
        assert ck.save(region, tmp_path, tracker=t2).base
        expected = bytes(region)
        t2.stop(region)
        t2.close()
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected


def _leak_round(path):
    with Region(4 * PAGE_SIZE) as region, pagefork.tracker(reset_modes()[0]) as t:
        t.start(region)
        region.array(np.uint8)[::PAGE_SIZE] += 1
        ck.save(region, path, tracker=t, keep=2)
        ck.save(region, path, tracker=t, keep=2)
        t.stop(region)
        with ck.load(path) as back:
            ck.load(path, into=back)
    list(ck.verify(path))
    ck.versions(path)
    with App("64KiB", backend="threads", workers=1) as app:
        app.alloc("x", 10, np.int64)[:] += 1
        app.checkpoint(path / "app", keep=2)
    with App.restore(path / "app", backend="threads", workers=1) as back:
        back.checkpoint(path / "app", keep=2)
    for bad in ("missing", "version"):
        try:
            ck.load(path / bad) if bad == "missing" else ck.load(path, version=10**6)
        except (FileNotFoundError, ValueError):
            pass


def test_no_growth(tmp_path):
    import gc

    for _ in range(20):
        _leak_round(tmp_path)
    gc.collect()
    before_fds, before_rss, before_locks = open_fds(), rss_kib(), len(ck._locks.targets)
    for _ in range(growth_rounds(200)):
        _leak_round(tmp_path)
    gc.collect()
    assert open_fds() == before_fds
    assert rss_kib() - before_rss < 8192, "RSS grew by more than 8 MiB over 200 rounds"
    assert len(ck._locks.targets) <= before_locks and len(ck._last_saved) == 0


def test_bad_arguments(tmp_path):
    with Region(PAGE_SIZE) as r:
        with pytest.raises(TypeError):
            ck.save(b"bytes", tmp_path)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ck.save(r, 42)
        with pytest.raises(ValueError, match="keep"):
            ck.save(r, tmp_path, keep=0)
        with pytest.raises(TypeError):
            ck.save(r, tmp_path, tracker="uffd")  # type: ignore[arg-type]
    closed = Region(PAGE_SIZE)
    closed.close()
    with pytest.raises(pagefork.PageforkError):
        ck.save(closed, tmp_path)


def test_cow_tracker_cannot_reset_atomically(tmp_path):
    if not pagefork.probe()["cow"].available:
        pytest.skip("cow unavailable")
    with pagefork.Snapshot(size=PAGE_SIZE) as snap, Region(PAGE_SIZE) as region, \
            pagefork.tracker("cow") as t:
        snap.map_to(region)
        t.start(region)
        with pytest.raises(pagefork.UnsupportedModeError):
            ck.save(region, tmp_path, tracker=t)
        assert ck.versions(tmp_path) == []


@given(steps=st.lists(st.tuples(st.sampled_from(["main", "batch", "checkpoint", "grow"]),
                                st.integers(0, 2**31)), min_size=1, max_size=12))
@settings(max_examples=15, deadline=None)
def test_every_version_restores_what_it_saw(tmp_path_factory, steps):
    """Random mixes of main-program writes, batches (sum and overwrite
    arrays), growth and checkpoints: every version restores byte for byte."""
    target = tmp_path_factory.mktemp("ckpt")
    seen: dict[int, bytes] = {}
    with App(8 * PAGE_SIZE, max_size=64 * PAGE_SIZE, backend="threads") as app:
        app.alloc("w", 4 * PAGE_SIZE, np.uint8)
        app.alloc("s", 2 * PAGE_SIZE // 8, np.int64, merge="sum")
        grown = 0
        for kind, seed in steps + [("checkpoint", 0)]:
            rng = np.random.default_rng(seed)
            if kind == "main":
                w = app["w"]
                w[rng.integers(0, w.size, 5)] = rng.integers(0, 256, 5)
            elif kind == "batch":
                idx = rng.integers(0, 2 * PAGE_SIZE // 8, 3)

                def work(mem, i, n, idx=idx, seed=seed):
                    mem["s"][idx] += i + 1
                    mem["w"][(seed + i * 4097) % mem["w"].size] = i + 1
                app.parallel(work, 2)
            elif kind == "grow" and grown < 8:
                app.alloc(f"g{grown}", 3 * PAGE_SIZE, np.uint8)[int(seed % (3 * PAGE_SIZE))] = 1
                grown += 1
            elif kind == "checkpoint":
                info = app.checkpoint(target, base_every=3)
                seen[info.version] = bytes(app.memory)
    for version, expected in seen.items():
        with App.restore(target, version=version, backend="threads") as back:
            assert bytes(back.memory) == expected


@given(flags=st.lists(st.booleans(), min_size=1, max_size=40), tail=st.integers(0, PAGE_SIZE - 1),
       seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_increment_body_holds_exactly_the_flagged_pages(flags, tail, seed):
    from pagefork._checkpoint_format import pages_body

    size = len(flags) * PAGE_SIZE - tail  # a last partial page too
    source = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    message = b"".join(pages_body(memoryview(source), size, np.array(flags)))
    batch = pagefork.wire.decode(message)
    assert pagefork.wire.encode(batch) == message  # exactly the wire format
    rebuilt = np.zeros(size, np.uint8)
    for d in batch:
        assert d.offset % PAGE_SIZE == 0 and d.op == pagefork.MergeOp.OVERWRITE
        rebuilt[d.offset:d.offset + len(d.data)] = np.frombuffer(d.data, np.uint8)
    expected = np.where(np.repeat(np.array(flags), PAGE_SIZE)[:size], source, 0)
    assert np.array_equal(rebuilt, expected)
    runs = np.diff(np.concatenate(([0], np.array(flags, np.int8), [0])))
    assert len(batch) == int((runs == 1).sum())  # maximal runs of consecutive pages


def test_a_crafted_manifest_cannot_name_files_outside_the_target(tmp_path):
    from pagefork._checkpoint_format import Manifest, ObjectRef

    (tmp_path / "secret").write_bytes(b"PFCK" + bytes(100))
    target = tmp_path / "ckpt"
    target.mkdir()
    for name, size in [("../secret", 104), ("v0000000001-0000abcd.base", -5),
                       ("v0000000001-0000abcd.base", "12")]:
        m = Manifest(1, None, 0.0, PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, 1, 104,
                     [ObjectRef(name, 1, "base", size, 0, 1)])  # type: ignore[arg-type]
        (target / "v0000000001.json").write_bytes(m.encode())
        with pytest.raises(CorruptDataError, match="v0000000001.json"):
            ck.load(target)
    m = Manifest(1, None, 0.0, 2 * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, 1, 104,
                 [ObjectRef("v0000000001-0000abcd.base", 1, "base", 104, 0, 1)])
    (target / "v0000000001.json").write_bytes(m.encode())
    with pytest.raises(CorruptDataError, match="max_size"):
        ck.load(target)


def test_failed_save_makes_the_next_one_a_base(tmp_path, monkeypatch):
    """The tracker's flags were consumed by the failed save: building the
    next increment on the version before would lose those pages."""
    from pagefork import _checkpoint_store

    modes = reset_modes()
    with Region(8 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        ck.save(region, tmp_path, tracker=t)
        fill(region, [2], 1)
        real_put = _checkpoint_store.LocalStore.put

        def failing_put(self, name, chunks, **options):
            if name.endswith(".json"):
                raise OSError(28, "No space left on device")
            return real_put(self, name, chunks, **options)
        monkeypatch.setattr(_checkpoint_store.LocalStore, "put", failing_put)
        with pytest.raises(OSError):
            ck.save(region, tmp_path, tracker=t)
        monkeypatch.setattr(_checkpoint_store.LocalStore, "put", real_put)
        info = ck.save(region, tmp_path, tracker=t)
        assert info.base and info.version == 2
        expected = bytes(region)
        t.stop(region)
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected
    assert len(list(tmp_path.glob("*.base"))) == 2
    assert not list(tmp_path.glob("*.incr"))  # the failed save left an orphan; the next removed it


def test_threads_saving_to_one_target_take_turns(tmp_path):
    regions = [Region(4 * PAGE_SIZE) for _ in range(4)]
    for i, r in enumerate(regions):
        fill(r, range(4), i)
    errors = []

    def run(r):
        try:
            for _ in range(5):
                ck.save(r, tmp_path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(r,)) for r in regions]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert [v.version for v in ck.versions(tmp_path)] == list(range(1, 21))
    contents = {bytes(r) for r in regions}
    for v in range(1, 21):
        with ck.load(tmp_path, version=v) as back:
            assert bytes(back) in contents
    for r in regions:
        r.close()


def test_sigint_at_random_points_of_checkpoints(tmp_path):
    """KeyboardInterrupt anywhere in checkpoint (objects, fsync, rename,
    prune): every committed version stays exact, and the App's next
    checkpoint and restore are exact too."""
    rng = random.Random(7)
    seen: dict[int, bytes] = {}
    with App("256KiB", backend="threads") as app:
        data = app.alloc("d", 200_000, np.uint8)
        interrupted = 0
        for _ in range(150):
            data[rng.randrange(data.size)] = rng.randrange(256)
            timer = threading.Timer(rng.uniform(0, 0.004), signal.raise_signal, (signal.SIGINT,))
            try:
                timer.start()
                info = app.checkpoint(tmp_path, keep=4, base_every=3)
                seen[info.version] = bytes(app.memory)
                timer.join()  # the signal may still land here, after the commit
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                timer.cancel()
                timer.join()
        info = app.checkpoint(tmp_path, keep=4, base_every=3)
        seen[info.version] = expected = bytes(app.memory)
    assert interrupted >= 10
    assert not [p for _, _, p in ck.verify(tmp_path) if p is not None]
    for v in ck.versions(tmp_path):
        with App.restore(tmp_path, version=v.version, backend="threads") as back:
            if v.version in seen:
                assert bytes(back.memory) == seen[v.version]
    with App.restore(tmp_path, backend="threads") as back:
        assert bytes(back.memory) == expected
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_crafted_app_layout_is_corrupt_data(tmp_path):
    from pagefork._checkpoint_format import Manifest

    with App("64KiB", backend="threads") as app:
        app.alloc("x", 10, np.int64)
        app.checkpoint(tmp_path)
    path = tmp_path / "v0000000001.json"
    good = Manifest.decode(path.read_bytes())
    for bad in ({"offset": 1 << 40}, {"dtype": "not a dtype"}, {"merge": "median"}, {"shape": "x"}):
        m = Manifest.decode(path.read_bytes())
        m.app["arrays"][0].update(bad)  # type: ignore[index]
        path.write_bytes(m.encode())
        with pytest.raises(CorruptDataError, match="layout"):
            App.restore(tmp_path, backend="threads")
        path.write_bytes(good.encode())
    with App.restore(tmp_path, backend="threads") as back:
        assert "x" in back


def test_a_crafted_app_layout_names_its_version_and_manifest(tmp_path):
    """A layout that passes the manifest's checksum but describes arrays no
    App can hold is damage like any other: the CorruptDataError names the
    version and the object it is in (the manifest), as its attributes and in
    its message, and so does the warning of a restore of the newest version
    that skips it. Before: neither (both attributes None)."""
    from pagefork._checkpoint_format import Manifest

    with App("64KiB", backend="threads") as app:
        app.alloc("x", 10, np.int64)
        app.checkpoint(tmp_path)
        app["x"][0] = 1
        app.checkpoint(tmp_path)
    path = tmp_path / "v0000000002.json"
    m = Manifest.decode(path.read_bytes())
    m.app["arrays"][0]["offset"] = -8  # type: ignore[index]
    path.write_bytes(m.encode())
    with pytest.raises(CorruptDataError, match="layout") as caught:
        App.restore(tmp_path, version=2, backend="threads")
    assert (caught.value.version, caught.value.object) == (2, "v0000000002.json")
    assert "version 2" in str(caught.value) and "v0000000002.json" in str(caught.value)
    with pytest.warns(RuntimeWarning, match="version 2 .*v0000000002.json is damaged: its array layout"):
        back = App.restore(tmp_path, backend="threads")
    with back:
        assert back["x"].tolist() == [0] * 10


# ---- targets --------------------------------------------------------------------------

def _round_trip(target, n_pages=24):
    modes = reset_modes()
    with Region(n_pages * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        fill(region, range(0, n_pages, 2), 7)
        ck.save(region, target, tracker=t)
        fill(region, [1, 5], 8)
        ck.save(region, target, tracker=t, keep=2)
        expected = bytes(region)
        t.stop(region)
    with ck.load(target) as back:
        assert bytes(back) == expected
    assert [v.version for v in ck.versions(target)] == [1, 2]
    assert all(problem is None for _, _, problem in ck.verify(target))
    with App("64KiB", backend="threads") as app:
        app.alloc("z", 100, np.int16)[:] = 12
        app.checkpoint(target)  # a new chain in the same target: a base
        app["z"][0] = 1
        assert not app.checkpoint(target).base
        expected = bytes(app.memory)
    with App.restore(target, backend="threads") as back:
        assert bytes(back.memory) == expected


def test_file_url_target(tmp_path):
    _round_trip(f"file://{tmp_path}/ckpt")
    assert (tmp_path / "ckpt" / "v0000000004.json").exists()


def test_memory_url_target():
    pytest.importorskip("fsspec", reason="memory:// needs fsspec: pip install 'pagefork[checkpoint]'")
    _round_trip(f"memory://pagefork-test-{uuid.uuid4().hex}")


def test_missing_fsspec_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with Region(PAGE_SIZE) as r, pytest.raises(ImportError, match=r"pagefork\[checkpoint\]"):
        ck.save(r, "memory://nowhere")


@pytest.fixture(scope="module")
def s3_bucket():
    pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'pagefork[test]'")
    server_mod = pytest.importorskip("moto.server", reason="S3 tests need moto[server]: "
                                     "pip install 'pagefork[test]'")
    import fsspec

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    endpoint = f"http://127.0.0.1:{port}"
    fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": endpoint, "region_name": "eu-west-1"})
    fs.mkdir("pagefork-test")
    try:
        yield fs
    finally:
        server.stop()


@pytest.mark.python_only
def test_s3_target_through_moto(s3_bucket):
    _round_trip(s3_bucket.get_mapper(f"pagefork-test/{uuid.uuid4().hex}"))


@pytest.mark.python_only
def test_s3_damage_is_named(s3_bucket):
    target = s3_bucket.get_mapper(f"pagefork-test/{uuid.uuid4().hex}")
    with Region(4 * PAGE_SIZE) as r:
        fill(r, range(4), 9)
        ck.save(r, target)
    root = target.root
    (name,) = [p for p in s3_bucket.ls(root, detail=False, refresh=True) if p.endswith(".base")]
    data = bytearray(s3_bucket.cat_file(name))
    data[100] ^= 1
    s3_bucket.pipe_file(name, bytes(data))
    with pytest.raises(CorruptDataError, match=r"version 1.*" + name.rsplit("/", 1)[-1]):
        ck.load(target)


# ---- damage ----------------------------------------------------------------------------

@pytest.fixture
def three_versions(tmp_path):
    """Versions 1 (base), 2 and 3 (increments) of a region, and their bytes."""
    modes = reset_modes()
    seen = {}
    with Region(16 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        for v, pages in enumerate([range(16), [2, 3], [9]], start=1):
            fill(region, list(pages), v)
            ck.save(region, tmp_path, tracker=t)
            seen[v] = bytes(region)
        t.stop(region)
    return tmp_path, seen


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "extend"])
def test_damaged_increment_names_version_and_object(three_versions, how):
    path, seen = three_versions
    (victim,) = [p for p in objects(path, ".incr") if p.name.startswith("v0000000002")]
    data = victim.read_bytes()
    if how == "flip":
        victim.write_bytes(data[:60] + bytes([data[60] ^ 0x10]) + data[61:])
    elif how == "truncate":
        victim.write_bytes(data[:-3])
    elif how == "extend":
        victim.write_bytes(data + b"\0")
    else:
        victim.unlink()
    for version in (2, 3):
        with pytest.raises(CorruptDataError) as info:
            ck.load(path, version=version)
        assert f"version {version}" in str(info.value) and victim.name in str(info.value)
        assert info.value.version == version and info.value.object == victim.name
    with ck.load(path, version=1) as back:
        assert bytes(back) == seen[1]
    assert cli(["checkpoint", "verify", str(path)]) == 1


def test_damaged_newest_leaves_older_ones(three_versions):
    path, seen = three_versions
    (victim,) = [p for p in objects(path, ".incr") if p.name.startswith("v0000000003")]
    victim.write_bytes(b"PFCK" + victim.read_bytes()[4:-1] + b"x")
    with pytest.raises(CorruptDataError, match="version 3"):
        ck.load(path)
    for v in (1, 2):
        with ck.load(path, version=v) as back:
            assert bytes(back) == seen[v]


def test_damaged_base_and_manifest(three_versions):
    path, seen = three_versions
    manifest = path / "v0000000003.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"pages": 1', '"pages": 2'))
    with pytest.raises(CorruptDataError, match=r"version 3.*v0000000003\.json"):
        ck.load(path)
    with ck.load(path, version=2) as back:
        assert bytes(back) == seen[2]
    (base,) = objects(path, ".base")
    data = bytearray(base.read_bytes())
    data[-1] ^= 0xFF
    base.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match=base.name):
        ck.load(path, version=1)


def test_verify_and_ls_cli(three_versions, capsys):
    path, _ = three_versions
    assert cli(["checkpoint", "verify", str(path)]) == 0
    assert "6 objects" in capsys.readouterr().out
    assert cli(["checkpoint", "ls", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["parent"], v["base"], v["chain_length"], v["pages"]) for v in listed] == \
        [(1, None, True, 0, 16), (2, 1, False, 1, 2), (3, 2, False, 2, 1)]
    assert cli(["checkpoint", "ls", str(path)]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "incr" in out
    (victim,) = [p for p in objects(path, ".incr") if p.name.startswith("v0000000002")]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 1
    victim.write_bytes(bytes(data))
    assert cli(["checkpoint", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert victim.name in err and "version 2" in err
    assert cli(["checkpoint", "verify", str(path / "none")]) == 1


def test_cli_runs_as_a_command(three_versions):
    path, _ = three_versions
    run = subprocess.run([sys.executable, "-m", "pagefork.cli", "checkpoint", "verify", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (victim,) = objects(path, ".base")
    victim.unlink()
    run = subprocess.run([sys.executable, "-m", "pagefork.cli", "checkpoint", "verify", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and victim.name in run.stderr and "missing" in run.stderr


# ---- chains: bases and pruning ----------------------------------------------------------

def test_base_every_k_and_keep(tmp_path):
    modes = reset_modes()
    with Region(16 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        kinds, seen = [], {}
        for i in range(9):
            fill(region, [i % 16], i)
            info = ck.save(region, tmp_path, tracker=t, base_every=3, keep=4)
            kinds.append(info.base)
            seen[info.version] = bytes(region)
        t.stop(region)
    assert kinds == [True, False, False, False, True, False, False, False, True]
    listed = ck.versions(tmp_path)
    assert [v.version for v in listed] == [6, 7, 8, 9]
    assert [v.chain_length for v in listed] == [1, 2, 3, 0]
    # only the objects the kept versions need remain: base 5, increments 6-8, base 9
    names = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert names == ["v0000000005", "v0000000006", "v0000000006.json", "v0000000007",
                     "v0000000007.json", "v0000000008", "v0000000008.json", "v0000000009",
                     "v0000000009.json"]
    for v in (6, 7, 8, 9):
        with ck.load(tmp_path, version=v) as back:
            assert bytes(back) == seen[v]


def test_base_when_the_chain_passes_a_fraction_of_memory(tmp_path):
    modes = reset_modes()
    with Region(16 * PAGE_SIZE) as region, pagefork.tracker(modes[0]) as t:
        t.start(region)
        ck.save(region, tmp_path, tracker=t, compress=None)
        bases = []
        for i in range(4):
            fill(region, range(5), 10 + i)  # 5 of 16 pages each time, incompressible
            bases.append(ck.save(region, tmp_path, tracker=t, base_fraction=0.5, compress=None).base)
        t.stop(region)
    if modes[0] != "none":
        # 5 + 5 pages of increments pass 8 pages: the third is a base
        assert bases == [False, False, True, False]


def test_unchanged_app_writes_an_empty_increment_and_compressible_data_shrinks(tmp_path):
    with App("8MiB", backend="threads") as app:
        app.alloc("zeros", 1 << 20, np.uint8)
        base = app.checkpoint(tmp_path)
        assert base.bytes_written < 64 << 10  # zeros compress
        assert app.checkpoint(tmp_path).pages == 0
        app["zeros"][:] = np.frombuffer(os.urandom(1 << 20), np.uint8)
        info = app.checkpoint(tmp_path)
        assert info.pages == 256 and info.bytes_written >= 1 << 20  # stored raw
        expected = bytes(app.memory)
    with App.restore(tmp_path, backend="threads") as back:
        assert bytes(back.memory) == expected


# ---- live writers ------------------------------------------------------------------------

@pytest.mark.parametrize("base_every, compress", [(100, 1), (2, None), (2, 1)],
                         ids=["increments", "raw-bases", "zstd-bases"])
@pytest.mark.parametrize("mode", ["uffd-async", "uffd", "segfault"])
def test_writes_before_save_returns_are_in_that_version_or_the_next(tmp_path, mode, base_every,
                                                                     compress):
    support = pagefork.probe()[mode]
    if not support.available:
        pytest.skip(f"{mode} unavailable: {support.reason}")
    n_pages, writers = 64, 3
    # The writers spin holding the GIL; every blocking call of a save waits
    # a switch interval (5 ms) per writer to get it back. A short interval
    # keeps the saves quick and the interleavings as dense.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        _writes_before_save(tmp_path, mode, base_every, compress, n_pages, writers)
    finally:
        sys.setswitchinterval(switch)


def _writes_before_save(tmp_path, mode, base_every, compress, n_pages, writers):
    region = Region(n_pages * PAGE_SIZE)
    t = pagefork.tracker(mode)
    t.start(region)
    counters = np.frombuffer(region, np.uint64).reshape(n_pages, PAGE_SIZE // 8)
    done = np.zeros(n_pages, np.uint64)  # the last value each page had fully written
    stop = threading.Event()

    def writer(k: int) -> None:
        rng = random.Random(k)
        mine = list(range(k, n_pages, writers))
        value = 0
        while not stop.is_set():
            value += 1
            p = rng.choice(mine)
            counters[p, rng.randrange(1, PAGE_SIZE // 8)] = value
            counters[p, 0] = value
            done[p] = value

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for th in threads:
        th.start()
    floors = []
    try:
        for _ in range(25):
            ck.save(region, tmp_path, tracker=t, keep=30, base_every=base_every, compress=compress)
            floors.append(done.copy())  # every write below these finished before save returned
    finally:
        stop.set()
        for th in threads:
            th.join()
    final = ck.save(region, tmp_path, tracker=t, keep=30, base_every=base_every, compress=compress)
    floors.append(done.copy())
    expected = bytes(region)
    t.stop(region)
    t.close()
    region.close()
    for i, floor in enumerate(floors[:-1]):
        with ck.load(tmp_path, version=i + 2) as back:  # the next version
            got = np.frombuffer(back, np.uint64).reshape(n_pages, -1)[:, 0]
            assert (got >= floor).all(), f"version {i + 2} lost writes finished before save {i + 1}"
    with ck.load(tmp_path, version=final.version) as back:
        assert bytes(back) == expected


# ---- SIGKILL at random instants ---------------------------------------------------------

# Each trial is a process forked from one single-threaded "zygote" that has
# imported numpy and pagefork already, so a trial costs milliseconds. Its
# output lines are single write(2)s: a kill never leaves half a line.
_ZYGOTE = """
import hashlib, os, sys
import numpy as np
import pagefork
from pagefork import PAGE_SIZE, App, checkpoint as ck


def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())


def region_trial(target, seed, mode):
    n = 48
    region = pagefork.Region(n * PAGE_SIZE)
    if ck.versions(target):
        ck.load(target, into=region)
    t = pagefork.tracker(mode)
    t.start(region)
    data = np.frombuffer(region, np.uint8)
    rng = np.random.default_rng(int(seed))
    say("ready", os.getpid())
    while True:
        for p in rng.choice(n, 3, replace=False):
            data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        say("pending", hashlib.sha256(region).hexdigest())
        info = ck.save(region, target, tracker=t, keep=3, base_every=4,
                       compress=int(rng.integers(0, 2)) or None)
        say("saved", info.version)


def work(mem, i, n, idx):
    mem["a"][idx] += 1.5
    mem["b"][idx[::-1]] = i


def app_trial(target, seed):
    if ck.versions(target):
        app = App.restore(target, backend="threads")
    else:
        app = App("192KiB", backend="threads")
        app.alloc("a", 8000, np.float64, merge="sum")
        app.alloc("b", 8000, np.int64)
    rng = np.random.default_rng(int(seed))
    say("ready", os.getpid())
    while True:
        app["b"][rng.integers(0, 8000, 4)] = rng.integers(0, 1000, 4)
        app.parallel(work, 2, args=(rng.integers(0, 8000, 50),))
        say("pending", hashlib.sha256(app.memory).hexdigest(), app._executor.version)
        info = app.checkpoint(target, keep=3, base_every=4)
        say("saved", info.version)


say("zygote")
for line in sys.stdin:
    command, *rest = line.split()
    if command == "reap":
        say("reaped", rest[0], os.waitpid(int(rest[0]), 0)[1])
    elif os.fork() == 0:
        try:
            globals()[command](*rest)
        finally:
            os._exit(1)
"""


def _kill_trials(tmp_path, command, args, trials, check):
    """Runs ``command`` in a forked process, kills it with SIGKILL a random
    moment after it is ready, checks the target against what it said it
    saved, and runs it again on the same target. Returns how many kills
    landed inside a save."""
    (tmp_path / "zygote.py").write_text(_ZYGOTE)
    target = tmp_path / "ckpt"
    with open(tmp_path / "stderr", "w") as errors:
        zygote = subprocess.Popen([sys.executable, str(tmp_path / "zygote.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=errors, text=True,
                                  env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert zygote.stdin is not None and zygote.stdout is not None

    def send(line: str) -> None:
        zygote.stdin.write(line + "\n")
        zygote.stdin.flush()

    def receive() -> str:
        line = zygote.stdout.readline()
        assert line, (tmp_path / "stderr").read_text()
        return line

    rng = random.Random(1234)
    interrupted = 0
    newest: tuple[int, list[str]] | None = None  # (version, state) committed so far
    try:
        assert receive() == "zygote\n"
        for trial in range(trials):
            send(" ".join([command, str(target), str(trial), *args]))
            word, pid = receive().split()
            assert word == "ready"
            # Kill it wherever it is: writing objects, fsyncing, renaming, pruning.
            threading.Event().wait(rng.uniform(0, 0.05))
            os.kill(int(pid), signal.SIGKILL)
            send(f"reap {pid}")
            state, in_flight = None, None
            while True:
                word, *fields = receive().split()
                if word == "reaped":
                    assert int(fields[1]) == signal.SIGKILL, (tmp_path / "stderr").read_text()
                    break
                if word == "pending":
                    state = in_flight = fields
                elif word == "saved":
                    newest, in_flight = (int(fields[0]), state), None  # type: ignore[assignment]
            interrupted += in_flight is not None
            versions = [v.version for v in ck.versions(target)]
            if not versions:
                assert newest is None
                continue
            got_version = max(versions)
            if in_flight is not None and got_version == (newest[0] if newest else 0) + 1:
                newest = (got_version, in_flight)  # killed after its commit, before it said so
            assert newest is not None and got_version == newest[0], (versions, newest)
            assert check(target) == newest[1]  # exactly the last completed version
            assert not [p for _, _, p in ck.verify(target) if p is not None]
    finally:
        zygote.stdin.close()
        zygote.wait()
    return interrupted


def _digest(data) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_sigkill_while_saving_a_region(tmp_path):
    def check(target):
        with ck.load(target) as back:
            return [_digest(back)]

    interrupted = _kill_trials(tmp_path, "region_trial", [reset_modes()[0]], 200, check)
    assert interrupted >= 40  # most kills landed inside a save
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) <= 2  # temporaries of killed writers go with the next save


def test_sigkill_while_checkpointing_an_app(tmp_path):
    def check(target):
        with App.restore(target, backend="threads") as back:
            return [_digest(back.memory), str(back._executor.version)]

    interrupted = _kill_trials(tmp_path, "app_trial", [], 150, check)
    assert interrupted >= 25


# ---- the example ------------------------------------------------------------------------

def test_jacobi_checkpoint_example_resumes_after_sigkill(tmp_path):
    script = ROOT / "examples" / "jacobi_checkpoint.py"
    args = ["--steps", "60", "--every", "5", "--size", "96", "--threads", "3"]
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / "whole"), *args,
                            "--out", str(tmp_path / "whole.npy")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    target = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(target), *args,
                             "--out", str(tmp_path / "killed.npy")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "checkpoint version 4" in line:  # partway: after step 20
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.npy").exists()
    again = subprocess.run([sys.executable, str(script), str(target), *args,
                            "--out", str(tmp_path / "killed.npy")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resumed at step" in again.stdout
    resumed_at = int(again.stdout.split("resumed at step")[1].split()[0])
    assert 20 <= resumed_at < 60
    assert np.load(tmp_path / "killed.npy").tobytes() == np.load(tmp_path / "whole.npy").tobytes()
