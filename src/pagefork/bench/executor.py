"""Executor benchmarks: batch cost against memory size, scaling with
workers, and a reduction workload beside joblib (loky) and multiprocessing.

Thread functions live at module level so worker processes import them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable

import numpy as np

from ..app import App
from ..memory import PAGE_SIZE

__all__ = ["BatchCost", "batch_costs", "scaling", "ReductionRun", "reduction_comparison",
           "format_batch_table"]


@dataclass(frozen=True)
class BatchCost:
    """Median batch time at one memory size, for a fixed set of dirty pages."""

    backend: str
    size: int
    threads: int
    dirty_pages: int
    batch_ms: float
    phases_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _touch(mem, i, n, pages):
    a = mem["a"]
    stride = a.size // PAGE_SIZE // (n * pages)
    a[(np.arange(pages) * n + i) * stride * PAGE_SIZE] += 1


def batch_costs(sizes: list[int], backend: str = "processes", workers: int = 2, threads: int = 4,
                pages_per_thread: int = 16, batches: int = 20,
                progress: Callable[[str], None] | None = None) -> list[BatchCost]:
    """Batch time with ``threads`` threads each dirtying ``pages_per_thread``
    pages, and the main program 16 pages between batches, at each size. One
    App per size, their batches interleaved, so machine noise hits every
    size alike."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        apps, views, main_pages = [], [], []
        for size in sizes:
            if progress:
                progress(f"batches on {backend} at {size >> 20} MiB")
            app = stack.enter_context(App(size, backend=backend, workers=workers))
            apps.append(app)
            views.append(app.alloc("a", size, np.uint8))
            main_pages.append(np.linspace(0, size // PAGE_SIZE - 1, 16).astype(np.int64) * PAGE_SIZE)
        times: list[list[float]] = [[] for _ in sizes]
        phases: list[list[dict[str, float]]] = [[] for _ in sizes]
        for b in range(batches + 1):
            for k, app in enumerate(apps):
                views[k][main_pages[k] + 1] += 1  # main-program writes between batches
                t0 = time.perf_counter()
                app.parallel(_touch, threads, args=(pages_per_thread,))
                if b:  # the first batch waits for the workers to start
                    times[k].append(time.perf_counter() - t0)
                    phases[k].append(app.last_batch.times)
        rows = []
        for k, size in enumerate(sizes):
            assert int(views[k][main_pages[k] + 1].min()) == batches + 1
            rows.append(BatchCost(backend, size, threads, apps[k].last_batch.dirty_pages,
                                  statistics.median(times[k]) * 1e3,
                                  {p: statistics.median(x[p] for x in phases[k]) * 1e3
                                   for p in phases[k][0]}))
        del views
        return rows


# ---- a reduction workload ---------------------------------------------------------


def _local_data(values: int, bins: int, threads: int, seed: int = 5) -> np.ndarray:
    """Values whose i-th share falls mostly in the i-th tile of the bins (a
    spatial decomposition: particles of a tile scattered into its grid)."""
    rng = np.random.default_rng(seed)
    tile = bins // threads
    owner = np.arange(values) * threads // values
    spread = rng.normal(0, tile / 3, values).astype(np.int64)
    return np.clip(owner * tile + tile // 2 + spread, 0, bins - 1)


def _count_pagefork(mem, i, n):
    data, hist = mem["data"], mem["hist"]
    share = data[i * data.size // n: (i + 1) * data.size // n]
    counts = np.bincount(share)  # only up to the largest value in the share
    lo = int(share.min()) if share.size else 0
    hist[lo:counts.size] += counts[lo:]  # touch only the bins this share hit


def _count_array(data, i, n, bins):
    share = data[i * data.size // n: (i + 1) * data.size // n]
    return np.bincount(share, minlength=bins)


def _count_chunk(share, bins):
    return np.bincount(share, minlength=bins)


@dataclass(frozen=True)
class ReductionRun:
    """One way of running the reduction; seconds for one batch, warm."""

    name: str
    seconds: float
    correct: bool

    def as_dict(self) -> dict:
        return asdict(self)


def reduction_comparison(values: int = 8_000_000, bins: int = 4_000_000, threads: int = 8,
                         workers: int = 2, repeat: int = 3,
                         progress: Callable[[str], None] | None = None) -> list[ReductionRun]:
    """A histogram into a large array, merged from ``threads`` tasks on
    ``workers`` processes: pagefork (sum merge, only written pages travel),
    joblib/loky (partial histograms returned and summed) and
    multiprocessing.Pool (chunks pickled out, arrays pickled back)."""
    data = _local_data(values, bins, threads)
    expected = np.bincount(data, minlength=bins)
    runs = []

    if progress:
        progress("reduction with pagefork")
    with App(data.nbytes + bins * 8 + 2 * PAGE_SIZE, backend="processes", workers=workers) as app:
        app.alloc("data", values, np.int64)[:] = data
        hist = app.alloc("hist", bins, np.int64, merge="sum")
        best = float("inf")
        for r in range(repeat + 1):
            hist[:] = 0
            app.parallel(lambda mem, i, n: None, threads)  # carry the reset outside the timing
            t0 = time.perf_counter()
            app.parallel(_count_pagefork, threads)
            if r:
                best = min(best, time.perf_counter() - t0)
        runs.append(ReductionRun("pagefork processes", best, bool(np.array_equal(hist, expected))))

    try:
        from joblib import Parallel, delayed
    except ImportError:
        joblib = None
    else:
        joblib = True
    if joblib:
        if progress:
            progress("reduction with joblib (loky)")
        with Parallel(n_jobs=workers, backend="loky") as parallel:
            best, result = float("inf"), np.zeros(0)
            for r in range(repeat + 1):
                t0 = time.perf_counter()
                result = sum(parallel(delayed(_count_array)(data, i, threads, bins)
                                      for i in range(threads)))
                if r:
                    best = min(best, time.perf_counter() - t0)
        runs.append(ReductionRun("joblib loky", best, bool(np.array_equal(result, expected))))

    if progress:
        progress("reduction with multiprocessing.Pool")
    import multiprocessing as mp

    with mp.get_context("forkserver").Pool(workers) as pool:
        best, result = float("inf"), np.zeros(0)
        for r in range(repeat + 1):
            t0 = time.perf_counter()
            chunks = [(data[i * values // threads: (i + 1) * values // threads], bins)
                      for i in range(threads)]
            result = sum(pool.starmap(_count_chunk, chunks))
            if r:
                best = min(best, time.perf_counter() - t0)
    runs.append(ReductionRun("multiprocessing Pool", best, bool(np.array_equal(result, expected))))
    return runs


def scaling(workers_list: tuple[int, ...] = (1, 2), values: int = 20_000_000, bins: int = 1000,
            threads: int = 8, repeat: int = 3,
            progress: Callable[[str], None] | None = None) -> dict[int, float]:
    """Seconds per histogram batch with each worker count."""
    data = np.random.default_rng(2).integers(0, bins, values)
    out = {}
    for workers in workers_list:
        if progress:
            progress(f"histogram scaling with {workers} worker(s)")
        with App(data.nbytes + bins * 8 + 2 * PAGE_SIZE, backend="processes", workers=workers) as app:
            app.alloc("data", values, np.int64)[:] = data
            hist = app.alloc("hist", bins, np.int64, merge="sum")
            best = float("inf")
            for r in range(repeat + 1):
                t0 = time.perf_counter()
                app.parallel(_count_pagefork, threads)
                if r:
                    best = min(best, time.perf_counter() - t0)
            assert int(hist.sum()) == values * (repeat + 1)
            out[workers] = best
    return out


def format_batch_table(rows: list[BatchCost]) -> str:
    head = f"{'backend':<10}{'MiB':>6}{'threads':>8}{'dirty pages':>12}{'batch ms':>10}  phases (ms)"
    lines = [head, "-" * (len(head) + 30)]
    for r in rows:
        phases = " ".join(f"{k} {v:.1f}" for k, v in r.phases_ms.items())
        lines.append(f"{r.backend:<10}{r.size >> 20:>6}{r.threads:>8}{r.dirty_pages:>12}"
                     f"{r.batch_ms:>10.1f}  {phases}")
    return "\n".join(lines)
