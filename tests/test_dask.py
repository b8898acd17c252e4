"""The Dask backend on a real LocalCluster (worker processes)."""

from __future__ import annotations

import os

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from pagefork import App, PAGE_SIZE, PageforkError, WorkerError  # noqa: E402
from pagefork.backends.dask import _drop_cache  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=2,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def program(app: App) -> None:
    """A few batches with main-program writes between them."""
    data = app.alloc("data", 50_000, np.int64)
    app.alloc("hist", 64, np.int64, merge="sum")
    app.alloc("owner", 16, np.int32)
    app.alloc("hi", 1, np.int64, merge="max")
    data[:] = np.random.default_rng(0).integers(0, 64, data.size)

    def work(mem, i, n, step):
        share = mem["data"][i::n]
        mem["hist"][:] += np.bincount(share, minlength=64)
        mem["owner"][i] = step * 100 + i
        mem["hi"][0] = max(mem["hi"][0], int(share.max()) + step)
        return int(share.sum())

    for step in range(3):
        app.parallel(work, 6, args=(step,))
        data[step * 1000: step * 1000 + 10] = 63


def test_same_results_as_the_threads_backend(client):
    with App("1MiB", backend="threads") as local, App("1MiB", backend="dask", client=client) as remote:
        program(local)
        program(remote)
        assert bytes(remote.memory) == bytes(local.memory)
        assert remote.last_batch.placement_cached


def test_a_scheduler_address_works_too(client):
    with App("64KiB", backend="dask", client=client.scheduler.address) as app:
        app.alloc("x", 4, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["x"].__iadd__(1), 3)
        assert app["x"].tolist() == [3, 3, 3, 3]


def test_later_batches_ship_the_change_not_the_memory(client):
    shipped = {}
    for size in ("8MiB", "64MiB"):
        with App(size, backend="dask", client=client) as app:
            a = app.alloc("a", app.memory.size, np.uint8)
            a[::PAGE_SIZE] = 1  # every page has content
            app.parallel(lambda mem, i, n: None, 4)
            first = app.last_batch.bytes_shipped
            a[: 16 * PAGE_SIZE] = 2  # the main program changes 16 pages

            def work(mem, i, n):
                mem["a"][i * PAGE_SIZE] = 3

            app.parallel(work, 4)
            shipped[size] = (first, app.last_batch.bytes_shipped)
            assert (a[[0, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE]] == 3).all()
    later_8, later_64 = shipped["8MiB"][1], shipped["64MiB"][1]
    assert later_64 < 1.5 * later_8 + 4096  # grows with the change, not the memory
    assert later_64 < (64 << 20) // 100


def test_a_raising_task_is_a_worker_error(client):
    with App("64KiB", backend="dask", client=client) as app:
        a = app.alloc("a", 8, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        before = bytes(app.memory)

        def work(mem, i, n):
            mem["a"][:] += 1
            if i == 1:
                raise RuntimeError("remote failure")

        with pytest.raises(WorkerError, match="RuntimeError: remote failure") as info:
            app.parallel(work, 3)
        assert info.value.thread == 1
        assert bytes(app.memory) == before and a.tolist() == [2] * 8


def test_a_worker_that_lost_its_cache_gets_the_full_snapshot(client):
    with App("1MiB", backend="dask", client=client) as app:
        a = app.alloc("a", 100, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
        client.run(_drop_cache, app._executor.backend.app_id)
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
        assert (a == 8).all()


def test_a_worker_killed_mid_batch(tmp_path):
    marker = tmp_path / "killed-once"
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, \
            App("256KiB", backend="dask", client=client) as app:
        a = app.alloc("a", 16, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 4)

        def work(mem, i, n, path):
            if i == 1 and not os.path.exists(path):
                open(path, "w").close()
                os._exit(1)  # the whole worker process dies
            mem["a"][i] += 10

        app.parallel(work, 4, args=(str(marker),))  # re-run elsewhere from the snapshot
        assert a[:4].tolist() == [10, 10, 10, 10]
        before = bytes(app.memory)

        def always(mem, i, n):
            mem["a"][:] += 1
            if i == 0:
                os._exit(1)

        with pytest.raises(WorkerError):
            app.parallel(always, 2)
        assert bytes(app.memory) == before


def test_module_functions_load_through_sys_path(client, tmp_path, monkeypatch):
    import importlib
    import sys

    name = f"pf_dask_tasks_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "def work(mem, i, n, k):\n"
        "    mem['a'][i] += k\n"
        "    return (__name__, i * k)\n")
    with App("64KiB", backend="dask", client=client) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        monkeypatch.syspath_prepend(str(tmp_path))
        module = importlib.import_module(name)
        try:
            assert app.parallel(module.work, 4, args=(3,)) == [(name, 3 * i) for i in range(4)]
            assert a.tolist() == [3, 3, 3, 3]
        finally:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("how", ["sys.exit", "KeyboardInterrupt", "BaseException"])
def test_exits_and_base_exceptions_are_worker_errors(client, how):
    with App("64KiB", backend="dask", client=client) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        before = bytes(app.memory)

        def work(mem, i, n, how):
            import sys

            mem["a"][:] += 1
            if i == 1:
                if how == "sys.exit":
                    sys.exit(3)
                raise {"KeyboardInterrupt": KeyboardInterrupt(), "BaseException": BaseException("odd")}[how]

        with pytest.raises(WorkerError) as info:
            app.parallel(work, 3, args=(how,))
        assert info.value.thread == 1 and info.value.failed == [1]
        assert ("SystemExit" if how == "sys.exit" else how) in info.value.traceback
        assert bytes(app.memory) == before
        app.parallel(work, 1, args=(how,))
        assert a.tolist() == [3] * 4


def test_unloadable_functions_and_unpicklable_arguments(client):
    import _thread

    with App("64KiB", backend="dask", client=client) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        lock = _thread.allocate_lock()
        with pytest.raises(PageforkError, match="cannot send the thread function"):
            app.parallel(lambda mem, i, n, lk: None, 2, args=(lock,))
        with pytest.raises(PageforkError, match="view of the App's main memory"):
            app.parallel(lambda mem, i, n: a.__setitem__(i, 1), 2)
        with pytest.raises(WorkerError, match="lock"):
            app.parallel(lambda mem, i, n: _thread.allocate_lock(), 2)
        got = app.parallel(lambda mem, i, n: mem["a"].__iadd__(i) if False else mem["a"], 2)
        got[0][0] = 5  # independent values
        assert got[1].tolist() == [0] * 4 and a.tolist() == [0] * 4


def test_a_closed_client_is_a_clear_error():
    with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        client = distributed.Client(cluster)
        app = App("64KiB", backend="dask", client=client)
        app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        before = bytes(app.memory)
        client.close()
        with pytest.raises(PageforkError, match="Dask client is closed"):
            app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        assert bytes(app.memory) == before
        app.close()
        with pytest.raises(PageforkError, match="Dask client is closed"):
            App("64KiB", backend="dask", client=client)


def test_a_client_closed_mid_batch(tmp_path):
    import threading
    import time

    started = tmp_path / "started"
    with distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=2,
                                  dashboard_address=None) as cluster:
        client = distributed.Client(cluster)
        with App("64KiB", backend="dask", client=client) as app:
            a = app.alloc("a", 4, np.int64, merge="sum")
            app.parallel(lambda mem, i, n: None, 2)

            def slow(mem, i, n, path):
                import time

                open(path, "w").close()
                mem["a"][:] += 1
                time.sleep(30)

            def closer():
                while not started.exists():
                    time.sleep(0.01)
                client.close()

            background = threading.Thread(target=closer)
            background.start()
            with pytest.raises(PageforkError, match="Dask client is closed"):
                app.parallel(slow, 2, args=(str(started),))
            background.join()
            assert a.tolist() == [0] * 4


STRESS = r'''
import os, random, signal, sys, threading, time
import numpy as np
import distributed
from pagefork import App

rng = random.Random(5)


def burst(count):
    for _ in range(count):  # Ctrl-C pressed once, or several times quickly
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.002)


inside = False


def on_sigint(signum, frame):
    if inside:  # Python's own behaviour, but only inside the test's try
        raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_sigint)
    with distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=2,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client, \
            App("64KiB", backend="dask", client=client) as app:
        total = app.alloc("total", 3, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 3)
        merged = 0
        for r in range(int(sys.argv[1])):
            k = int(total[0])
            timer = threading.Timer(rng.uniform(0, rng.choice([0.01, 0.05, 0.2])), burst,
                                    (rng.choice([1, 1, 3]),))
            time.sleep(0.005)  # the last round's late signals are handled (and ignored) here
            try:
                inside = True
                timer.start()
                app.parallel(lambda mem, i, n: mem["total"].__setitem__(i, mem["total"][i] + 1), 3)
                timer.join()  # a signal after the batch lands here
            except KeyboardInterrupt:
                inside = False
            inside = False
            if timer.ident is not None:
                timer.join()
            assert total.tolist() in ([k] * 3, [k + 1] * 3), (k, total)
            merged += int(total[0]) == k + 1
            assert app.parallel(lambda mem, i, n: int(mem["total"][i]), 3) == total.tolist()
        print("ok merged", merged)
'''


def test_sigint_at_random_points_in_a_loop(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "stress.py"
    script.write_text(STRESS)
    done = subprocess.run([sys.executable, str(script), "25"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok merged")


def _noop(mem, i, n):
    return None


def test_reductions_combine_on_the_workers_exactly(client):
    """Several threads per worker: order-free arrays come back combined, one
    batch per worker; every byte equals the thread-by-thread reference, and
    each thread saw the snapshot, not a neighbour's writes."""
    from test_reduce import ARRAYS, _expected, _write

    total = sum(np.dtype(d).itemsize * c for _, d, c, _ in ARRAYS) + 16 * len(ARRAYS)
    with App(total + 3 * PAGE_SIZE, backend="dask", client=client) as app:
        for name, dtype, count, merge in ARRAYS:
            app.alloc(name, count, dtype, merge=merge)
        for n, seed in [(1, 11), (4, 12), (7, 13), (6, 14), (6, 15)]:
            app["iprod"][:] = 1
            app.parallel(_noop, 1)
            before = app._executor.snapshot.read()
            seen = app.parallel(_write, n, args=(seed,))
            assert app._executor.snapshot.read() == _expected(app, before, n, seed)
            assert bytes(app.memory)[: len(before)] == app._executor.snapshot.read()
            for s in seen:
                for name, *_ in ARRAYS:
                    a = app._layout[name]
                    assert s[name] == before[a.offset: a.offset + a.nbytes], name


def test_a_dense_sum_ships_one_combined_batch_per_worker(client):
    with App("1MiB", backend="dask", client=client) as app:
        acc = app.alloc("acc", 100_000, np.int64, merge="sum")
        workers = len(app._executor.backend.addresses)

        def add(mem, i, n):
            mem["acc"][:] += i + 1

        app.parallel(add, 8)
        assert (acc == 36).all()
        assert app.last_batch.diffs == workers  # not one per thread


@pytest.mark.parametrize("claim", ["none", "huge"])
def test_a_reply_claiming_more_than_the_memory_is_refused(claim):
    import zstandard

    from pagefork import CorruptDataError
    from pagefork.backends.dask import compress_batch, decompress_batch
    from pagefork.snapshot import Diff

    good = compress_batch([Diff(8, b"\x01" * 8)])
    assert list(decompress_batch(good, PAGE_SIZE)) == [Diff(8, b"\x01" * 8)]
    if claim == "none":  # a frame without its size
        c = zstandard.ZstdCompressor(write_content_size=False).compressobj()
        blob = c.compress(b"x" * 64) + c.flush()
    else:  # a frame whose header claims 1 TiB for a one-page memory
        c = zstandard.ZstdCompressor().compressobj(size=1 << 40)
        blob = c.compress(b"\0" * 64) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(CorruptDataError, match="claims"):
        decompress_batch(blob, PAGE_SIZE)
    with pytest.raises(CorruptDataError, match="malformed"):
        decompress_batch(b"\x28\xb5\x2f\xfd garbage", PAGE_SIZE)
    with pytest.raises(CorruptDataError):  # a valid frame of bytes that are no batch
        decompress_batch(zstandard.ZstdCompressor().compress(b"no batch here"), PAGE_SIZE)


def test_identity_start_gives_the_same_bytes_as_the_threads_backend(client):
    def work(mem, i, n):
        fresh = bool((mem["acc"] == 0).all() and (mem["lo"] == np.inf).all())
        mem["acc"][i::3] += i + 1
        mem["lo"][i % 4] = -float(i)
        return fresh

    answers = []
    for app in (App("1MiB", backend="threads"), App("1MiB", backend="dask", client=client)):
        with app:
            acc = app.alloc("acc", 10_000, np.int64, merge="sum", start="identity")
            lo = app.alloc("lo", 4, np.float64, merge="min", start="identity")
            acc[:] = 7
            for _ in range(2):  # the workers' buffers are reset between tasks
                assert all(app.parallel(work, 5))
            answers.append((bytes(acc), bytes(lo)))
    assert answers[0] == answers[1]
    assert np.frombuffer(answers[0][1], np.float64).tolist() == [-4.0, -1.0, -2.0, -3.0]



def test_identity_views_kept_past_their_task_never_leak(client):
    """A task that keeps its identity array and writes it after the task: the
    worker's next tasks still start at the identity and merge exactly."""
    def keep(mem, i, n):
        import sys
        mem["acc"][i] += 1
        sys.__dict__.setdefault("_pagefork_test_kept", []).append(mem["acc"])  # the worker's process

    def scribble(mem, i, n):
        import sys
        kept = sys.__dict__.pop("_pagefork_test_kept", [])
        for view in kept:
            view[:] = 99
        return len(kept)

    def work(mem, i, n):
        fresh = bool((mem["acc"] == 0).all())
        mem["acc"][i] += 10
        return fresh

    with App("1MiB", backend="dask", client=client) as app:
        acc = app.alloc("acc", 1000, np.int64, merge="sum", start="identity")
        app.parallel(keep, 3)
        assert sum(app.parallel(scribble, 8)) == 3
        assert all(app.parallel(work, 3)) and all(app.parallel(work, 3))
        expected = np.zeros(1000, np.int64)
        expected[:3] = 21
        assert np.array_equal(acc, expected)
