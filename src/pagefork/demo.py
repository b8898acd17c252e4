"""`pagefork demo`: an example application end to end, with a summary.

A histogram and the extremes of a data set that the main program keeps
changing between batches, on the default (processes) backend: reductions
merged by "sum", "min" and "max" across worker processes, checked against a
serial computation after every batch. ``backend="dask"`` runs it on a local
Dask cluster of worker processes listening on loopback only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from collections.abc import Iterator

import numpy as np

from .app import App
from .executor import BatchStats

__all__ = ["run_demo"]


def _count(mem, i, n):
    data = mem["data"]
    share = data[i * data.size // n: (i + 1) * data.size // n]
    mem["hist"][:] += np.bincount(share, minlength=mem["hist"].size)
    mem["lo"][0] = min(mem["lo"][0], int(share.min()))
    mem["hi"][0] = max(mem["hi"][0], int(share.max()))
    return int(share.size)


@contextlib.contextmanager
def local_cluster(workers: int, echo=print) -> Iterator[Any]:
    """A ``distributed.Client`` of a new local cluster: ``workers`` worker
    processes of one thread each, everything on 127.0.0.1, no dashboard."""
    try:
        import distributed
    except ImportError:
        raise ImportError("the Dask demo needs the distributed package: "
                          "pip install 'pagefork[dask]'") from None
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        echo(f"local Dask cluster: scheduler {cluster.scheduler_address}, {workers} worker processes")
        yield client


def run_demo(backend: str = "processes", workers: int | None = None, threads: int = 8,
             values: int = 2_000_000, bins: int = 1000, batches: int = 5,
             echo=print) -> bool:
    """Runs the demo; returns whether every batch matched the serial result.
    With ``backend="dask"``, ``workers`` is the local cluster's size (default 2)."""
    if backend == "dask":
        with local_cluster(workers or 2, echo) as client:
            return _run(backend, {"client": client}, threads, values, bins, batches, echo)
    return _run(backend, {"workers": workers}, threads, values, bins, batches, echo)


def _run(backend: str, options: dict[str, Any], threads: int, values: int, bins: int, batches: int,
         echo) -> bool:
    rng = np.random.default_rng(0)
    ok = True
    started = time.perf_counter()
    size = f"{values * 8 // 2**20 + 2}MiB"
    echo(f"pagefork demo: histogram + min/max of {values:,} int64 values, {threads} threads "
         f"per batch, {batches} batches, backend {backend!r}")
    with App(size, backend=backend, **options) as app:
        data = app.alloc("data", values, np.int64)
        hist = app.alloc("hist", bins, np.int64, merge="sum")
        lo = app.alloc("lo", 1, np.int64, merge="min")
        hi = app.alloc("hi", 1, np.int64, merge="max")
        data[:] = rng.integers(0, bins, values)
        expected = np.zeros(bins, np.int64)
        totals = BatchStats()
        for batch in range(batches):
            # The main program changes a few values between batches: only the
            # pages it touched are carried into the snapshot.
            touched = rng.integers(0, values, 500)
            data[touched] = rng.integers(0, bins, touched.size)
            hist[:] = 0
            lo[0], hi[0] = np.iinfo(np.int64).max, np.iinfo(np.int64).min
            counted = app.parallel(_count, threads)
            expected = np.bincount(data, minlength=bins)
            good = (sum(counted) == values and np.array_equal(hist, expected)
                    and lo[0] == data.min() and hi[0] == data.max())
            ok &= good
            s = app.last_batch
            totals.dirty_pages += s.dirty_pages
            totals.diff_bytes += s.diff_bytes
            totals.bytes_shipped += s.bytes_shipped
            echo(f"  batch {batch + 1}: {'ok ' if good else 'BAD'} {s.summary()}")
        elapsed = time.perf_counter() - started
        echo(f"summary: {batches} batches x {threads} threads; main program carried "
             f"{app.last_batch.main_dirty_pages} pages into the last batch; threads dirtied "
             f"{totals.dirty_pages} pages, {totals.diff_bytes:,} diff bytes merged, "
             f"{totals.bytes_shipped:,} bytes moved between processes, {elapsed:.2f} s in all")
        echo(f"check against a serial computation: {'PASSED' if ok else 'FAILED'}")
    return ok
