"""The Dask backend beside a plain Dask version of the same workload that
ships the memory to the workers and returns whole arrays."""

from __future__ import annotations

import pickle
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Callable

import numpy as np

from ..app import App
from ..memory import PAGE_SIZE

__all__ = ["DaskRun", "dask_comparison"]


@dataclass(frozen=True)
class DaskRun:
    """Per-batch medians of one way of running the workload."""

    name: str
    size: int
    changed_fraction: float
    bytes_per_batch: float
    seconds_per_batch: float

    def as_dict(self) -> dict:
        return asdict(self)


def _pages_of(i: int, n: int, size: int, pages: int) -> np.ndarray:
    """The pages thread i changes: spread over the memory."""
    total = size // PAGE_SIZE
    return (np.arange(pages) * n + i) * (total // (n * pages)) * PAGE_SIZE


def _change(a: np.ndarray, i: int, n: int, size: int, pages: int) -> None:
    """Random bytes (incompressible, unlike a counter) into 512 bytes of each page."""
    rng = np.random.default_rng([i, int(a[700])])  # a[700]: the main program bumps it per batch
    for p in _pages_of(i, n, size, pages):
        a[p + 1: p + 513] = rng.integers(0, 256, 512, dtype=np.uint8)


def _pagefork_task(mem, i, n, size, pages):
    _change(mem["a"], i, n, size, pages)


def _plain_task(a, i, n, size, pages):
    out = a.copy()
    _change(out, i, n, size, pages)
    return out


def dask_comparison(client: Any = None, size: int = 8 << 20, threads: int = 4, batches: int = 5,
                    pages_per_thread: int = 4,
                    progress: Callable[[str], None] | None = None) -> list[DaskRun]:
    """Each batch: ``threads`` tasks each write random bytes into 512 bytes
    of ``pages_per_thread`` pages, and the main program changes 4 pages: at
    most 1% of 8 MiB of memory changes per batch."""
    import distributed

    own = client is None
    cluster = None
    if own:
        cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        changed = (threads * pages_per_thread + 4) * PAGE_SIZE / size
        main_pages = np.linspace(0, size // PAGE_SIZE - 1, 4).astype(np.int64) * PAGE_SIZE + 700
        if progress:
            progress(f"pagefork on Dask, {size >> 20} MiB")
        with App(size, backend="dask", client=client) as app:
            a = app.alloc("a", size, np.uint8)
            app.parallel(_pagefork_task, threads, args=(size, pages_per_thread))  # ships it all once
            sent, times = [], []
            for _ in range(batches):
                a[main_pages] += 1
                t0 = time.perf_counter()
                app.parallel(_pagefork_task, threads, args=(size, pages_per_thread))
                times.append(time.perf_counter() - t0)
                sent.append(app.last_batch.bytes_shipped)
            ours = a.copy()
        runs = [DaskRun("pagefork dask", size, changed, statistics.median(sent), statistics.median(times))]

        if progress:
            progress(f"plain Dask returning arrays, {size >> 20} MiB")
        a = np.zeros(size, np.uint8)
        a, _ = _plain_round(client, a, threads, size, pages_per_thread)  # warm up, like pagefork
        sent, times = [], []
        for _ in range(batches):
            a[main_pages] += 1
            t0 = time.perf_counter()
            a, nbytes = _plain_round(client, a, threads, size, pages_per_thread)
            times.append(time.perf_counter() - t0)
            sent.append(nbytes)
        assert np.array_equal(a, ours), "the two versions disagree"
        runs.append(DaskRun("plain dask", size, changed, statistics.median(sent), statistics.median(times)))
        return runs
    finally:
        if cluster is not None:
            client.close()
            cluster.close()


def _plain_round(client: Any, a: np.ndarray, threads: int, size: int, pages: int) -> tuple[np.ndarray, int]:
    """The memory goes to every worker as a future; each task returns its
    whole updated copy, and the changes are summed on the client."""
    workers = len(client.scheduler_info()["workers"])
    future = client.scatter(a, hash=False)
    outs = client.gather([client.submit(_plain_task, future, i, threads, size, pages, pure=False)
                          for i in range(threads)])
    merged = a.copy()
    for o in outs:  # overwrite merge: each task's changed bytes
        changed = o != a
        merged[changed] = o[changed]
    wire = len(pickle.dumps(a, protocol=5))
    return merged, wire * workers + wire * threads
