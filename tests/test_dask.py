"""The Dask backend on a real LocalCluster (worker processes)."""

from __future__ import annotations

import os

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from pagefork import App, PAGE_SIZE, WorkerError  # noqa: E402
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
