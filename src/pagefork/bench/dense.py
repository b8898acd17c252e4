"""Whole-array work (issue 19): pagefork beside what a user writes instead.

Every workload runs each system in the same process, interleaved per round
(so machine noise hits them alike), and checks every answer against serial
numpy; ratios are taken between medians of the same run. Round 0 warms
every system up and is not timed.

* ``stencil``: Jacobi steps on an n x n float64 grid in 4 bands of rows,
  2 workers; the main program copies the new grid back each step
  (``g[:] = out``). pagefork (threads, processes) beside serial numpy and a
  ThreadPoolExecutor writing the bands of one array in place. Also: diffs,
  diff bytes and merge time per step, and the ``g[:] = out`` copy alone
  beside the same copy into ordinary memory.
* ``empty``: an empty batch of 4 threads beside ThreadPoolExecutor.map and
  multiprocessing.Pool (fork) .map of 4 no-op tasks, 2 workers each.
* ``scattered``: 8 tasks each add 1 at 1% random unique indices of a 4M
  int64 array (little compute): pagefork (both backends, both starts)
  beside serial numpy and shared memory + a lock.
* ``dense``: 8 tasks each add (i+1) to all of a 4M int64 array: pagefork
  (both backends) beside serial numpy and shared memory + a lock.
* ``deposit``: a particle deposit as a new user writes it: 2M particles
  into 1M int64 cells with ``np.add.at``, 8 tasks, 5 steps (the grid is
  zeroed by the main program each step).
* ``rss``: peak parent RSS during a batch of ~2M scattered diffs (56 MiB
  App), each backend in a fresh process, beside the goal's budget.

Thread functions live at module level so worker processes import them.
:mod:`pagefork.bench.dense_report` runs them all and judges the goals.
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np

from ..app import App
from ..memory import PAGE_SIZE

__all__ = ["Timing", "Workload", "stencil", "empty_batch", "scattered_add", "dense_add", "deposit",
           "rss_peak"]

Progress = Callable[[str], None]
WORKERS = 2


@dataclass
class Timing:
    """One system's times on one workload (seconds, one per measurement)."""

    name: str
    seconds: list[float] = field(default_factory=list)
    correct: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        """(lowest, highest) time measured."""
        return (min(self.seconds), max(self.seconds)) if self.seconds else (float("nan"),) * 2

    def add(self, seconds: float, correct: bool) -> None:
        self.seconds.append(seconds)
        self.correct = self.correct and bool(correct)

    def as_dict(self) -> dict:
        return {**asdict(self), "median": self.median, "spread": list(self.spread)}


@dataclass
class Workload:
    """The systems measured on one workload, and facts about pagefork's
    batches there (diffs, merge time, phases: medians over the batches)."""

    key: str
    title: str
    timings: dict[str, Timing] = field(default_factory=dict)
    facts: dict[str, float] = field(default_factory=dict)

    def timing(self, name: str) -> Timing:
        return self.timings.setdefault(name, Timing(name))

    def median(self, name: str) -> float:
        t = self.timings.get(name)
        return t.median if t is not None else float("nan")

    def as_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "facts": self.facts,
                "timings": [t.as_dict() for t in self.timings.values()]}


def _record_phases(facts_lists: dict[str, list[float]], app: App, prefix: str) -> None:
    stats = app.last_batch
    facts_lists.setdefault(f"{prefix} diffs", []).append(stats.diffs)
    facts_lists.setdefault(f"{prefix} diff bytes", []).append(stats.diff_bytes)
    for phase, seconds in stats.times.items():
        facts_lists.setdefault(f"{prefix} {phase} ms", []).append(seconds * 1e3)


def _medians(facts_lists: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(statistics.median(v)) for k, v in facts_lists.items() if v}


def _count(n: int) -> str:
    """4194304 -> "4M", 1000 -> "1000"."""
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else str(n)


def _noop(mem: Any, i: int, n: int) -> None:
    return None


def _noop_task(i: int) -> None:
    return None


# ---- stencil -----------------------------------------------------------------------


def _band(rows: int, i: int, n: int) -> tuple[int, int]:
    """Rows [r0, r1) of band ``i`` of ``n`` over the interior rows [1, rows-1)."""
    inner = rows - 2
    return 1 + inner * i // n, 1 + inner * (i + 1) // n


def _jacobi(g: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """One Jacobi update of rows [r0, r1) of ``out`` from ``g`` (the same
    per-element arithmetic whatever the band, so every system's grid is
    bit-identical to serial numpy's)."""
    out[r0:r1, 1:-1] = 0.25 * (g[r0 - 1:r1 - 1, 1:-1] + g[r0 + 1:r1 + 1, 1:-1]
                               + g[r0:r1, :-2] + g[r0:r1, 2:])


def _jacobi_task(mem: Any, i: int, n: int) -> None:
    g, out = mem["g"], mem["out"]
    _jacobi(g, out, *_band(g.shape[0], i, n))


def stencil(n: int = 1024, bands: int = 4, steps: int = 5, rounds: int = 3,
            workers: int = WORKERS, progress: Progress | None = None) -> tuple[Workload, Workload]:
    """(per-step times of each system, the ``g[:] = out`` copy alone): a
    Jacobi step on an n x n float64 grid in ``bands`` bands of rows, the
    main program copying the new grid back after each step."""
    rng = np.random.default_rng(3)
    init = rng.random((n, n))
    step_row = Workload("stencil", f"Jacobi step, {n}x{n} float64, {bands} bands, {workers} workers, "
                                   f"then g[:] = out (ms per step)")
    copy_row = Workload("main_write", f"the main program's g[:] = out ({n * n * 8 / 2**20:.3g} MiB) between "
                                      "batches (ms)")
    facts: dict[str, list[float]] = {}
    apps: dict[str, App] = {}
    pool = ThreadPoolExecutor(workers)
    try:
        for backend in ("threads", "processes"):
            app = apps[f"pagefork {backend}"] = App(2 * init.nbytes + PAGE_SIZE, backend=backend,
                                                    workers=workers)
            app.alloc("g", (n, n), np.float64)
            app.alloc("out", (n, n), np.float64)
        for r in range(rounds + 1):
            if progress:
                progress(f"stencil {n}x{n}: round {r} of {rounds}")
            # serial numpy: the reference every other system is checked against
            g, out = init.copy(), init.copy()
            for _ in range(steps):
                t0 = time.perf_counter()
                _jacobi(g, out, 1, n - 1)
                t1 = time.perf_counter()
                g[:] = out
                t2 = time.perf_counter()
                if r:
                    step_row.timing("serial numpy").add(t2 - t0, True)
                    copy_row.timing("ordinary memory (serial numpy)").add(t2 - t1, True)
            expected = g

            tg, tout = init.copy(), init.copy()
            for _ in range(steps):
                t0 = time.perf_counter()
                list(pool.map(lambda i: _jacobi(tg, tout, *_band(n, i, bands)), range(bands)))
                tg[:] = tout
                t = time.perf_counter() - t0
                if r:
                    step_row.timing("ThreadPoolExecutor in place").add(t, True)
            if r:
                step_row.timing("ThreadPoolExecutor in place").correct &= bool(np.array_equal(tg, expected))

            for name, app in apps.items():
                ag, aout = app["g"], app["out"]
                ag[:] = init
                aout[:] = init
                app.parallel(_noop, 1)  # carries the reset outside the timing
                for _ in range(steps):
                    t0 = time.perf_counter()
                    app.parallel(_jacobi_task, bands)
                    t1 = time.perf_counter()
                    ag[:] = aout
                    t2 = time.perf_counter()
                    if r:
                        step_row.timing(name).add(t2 - t0, True)
                        copy_row.timing(name).add(t2 - t1, True)
                        _record_phases(facts, app, name)
                if r:
                    step_row.timing(name).correct &= bool(np.array_equal(ag, expected))
                del ag, aout
            gc.collect()
    finally:
        pool.shutdown()
        for app in apps.values():
            app.close()
    step_row.facts = _medians(facts)
    return step_row, copy_row


# ---- an empty batch ------------------------------------------------------------------


def empty_batch(threads: int = 4, batches: int = 50, rounds: int = 3, workers: int = WORKERS,
                progress: Progress | None = None) -> Workload:
    """Seconds per empty batch of ``threads`` threads, each system called
    ``batches`` times per round."""
    import multiprocessing as mp

    row = Workload("empty", f"an empty batch of {threads} threads, {workers} workers (ms)")
    facts: dict[str, list[float]] = {}
    fork_pool = mp.get_context("fork").Pool(workers)  # forked before any App starts threads
    pool = ThreadPoolExecutor(workers)
    apps = {f"pagefork {b}": App(1 << 20, backend=b, workers=workers) for b in ("threads", "processes")}
    try:
        for r in range(rounds + 1):
            if progress:
                progress(f"empty batches: round {r} of {rounds}")
            systems: dict[str, Callable[[], Any]] = {
                "ThreadPoolExecutor.map": lambda: list(pool.map(_noop_task, range(threads))),
                "multiprocessing.Pool (fork) .map": lambda: fork_pool.map(_noop_task, range(threads)),
            }
            for name, app in apps.items():
                systems[name] = functools.partial(app.parallel, _noop, threads)
            for name, call in systems.items():
                for _ in range(batches):
                    t0 = time.perf_counter()
                    result = call()
                    t = time.perf_counter() - t0
                    if r:
                        row.timing(name).add(t, result == [None] * threads)
                        if name in apps:
                            _record_phases(facts, apps[name], name)
    finally:
        pool.shutdown()
        fork_pool.terminate()
        fork_pool.join()
        for app in apps.values():
            app.close()
    row.facts = _medians(facts)
    return row


# ---- shared memory + a lock ----------------------------------------------------------

_SHM: dict[str, Any] = {}


def _shm_init(names: list[str], lock: Any) -> None:
    from multiprocessing import shared_memory

    _SHM["parts"] = [shared_memory.SharedMemory(name) for name in names]
    _SHM["lock"] = lock


def _shm_scatter(elements: int, count: int, i: int) -> None:
    acc = np.ndarray(elements, np.int64, buffer=_SHM["parts"][0].buf)
    idx = np.ndarray((count,), np.int64, buffer=_SHM["parts"][1].buf, offset=i * count * 8)
    with _SHM["lock"]:
        acc[idx] += 1


def _shm_dense(elements: int, i: int) -> None:
    acc = np.ndarray(elements, np.int64, buffer=_SHM["parts"][0].buf)
    partial = np.full(elements, i + 1, np.int64)  # the task's own contribution
    with _SHM["lock"]:
        acc += partial


class _SharedArrays:
    """Shared memory segments and a forkserver pool whose workers map them."""

    def __init__(self, sizes: list[int], workers: int) -> None:
        import multiprocessing as mp
        from multiprocessing import shared_memory

        self.parts = [shared_memory.SharedMemory(create=True, size=max(1, s)) for s in sizes]
        ctx = mp.get_context("forkserver")
        self.pool = ctx.Pool(workers, initializer=_shm_init,
                             initargs=([p.name for p in self.parts], ctx.Lock()))

    def array(self, k: int, dtype: Any, shape: Any) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.parts[k].buf)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        for p in self.parts:
            p.close()
            p.unlink()


# ---- scattered and dense integer adds --------------------------------------------------


def _scatter_task(mem: Any, i: int, n: int) -> None:
    mem["acc"][mem["idx"][i]] += 1


def _dense_task(mem: Any, i: int, n: int) -> None:
    mem["acc"][:] += i + 1


def _scatter_indices(elements: int, tasks: int, density: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count = max(1, int(elements * density))
    return np.stack([np.sort(rng.permutation(elements)[:count]) for _ in range(tasks)])


def _pagefork_apps(size: int, systems: dict[str, tuple[str, str]], workers: int,
                   build: Callable[[App, str], None]) -> dict[str, App]:
    apps: dict[str, App] = {}
    try:
        for name, (backend, start) in systems.items():
            apps[name] = App(size, backend=backend, workers=workers)
            build(apps[name], start)
    except BaseException:
        for app in apps.values():
            app.close()
        raise
    return apps


def _timed_batch(app: App, fn: Callable[..., Any], tasks: int, args: tuple = ()) -> float:
    """Seconds for one batch, after a one-thread batch carries the main
    program's resets outside the timing."""
    app.parallel(_noop, 1)
    t0 = time.perf_counter()
    app.parallel(fn, tasks, args=args)
    return time.perf_counter() - t0


SCATTER_SYSTEMS = {"pagefork processes": ("processes", "snapshot"),
                   "pagefork processes, start=identity": ("processes", "identity"),
                   "pagefork threads": ("threads", "snapshot"),
                   "pagefork threads, start=identity": ("threads", "identity")}


def scattered_add(elements: int = 4 << 20, tasks: int = 8, density: float = 0.01, rounds: int = 3,
                  workers: int = WORKERS, progress: Progress | None = None) -> Workload:
    """Seconds for ``tasks`` tasks each adding 1 at ``density`` random unique
    indices of an int64 array."""
    idx = _scatter_indices(elements, tasks, density)
    expected = np.zeros(elements, np.int64)
    for i in range(tasks):
        expected[idx[i]] += 1
    row = Workload("scattered", f"{tasks} tasks each add 1 at {density:.0%} random unique indices of "
                                f"{_count(elements)} int64, {workers} workers (ms)")
    facts: dict[str, list[float]] = {}

    def build(app: App, start: str) -> None:
        app.alloc("idx", idx.shape, np.int64)[:] = idx
        app.alloc("acc", elements, np.int64, merge="sum", start=start)

    apps = _pagefork_apps(elements * 8 + idx.nbytes + 2 * PAGE_SIZE, SCATTER_SYSTEMS, workers, build)
    shared = None
    try:
        shared = _SharedArrays([elements * 8, idx.nbytes], workers)
        shared.array(1, np.int64, idx.shape)[:] = idx
        shm_acc = shared.array(0, np.int64, elements)
        for r in range(rounds + 1):
            if progress:
                progress(f"scattered adds: round {r} of {rounds}")
            for name, app in apps.items():
                acc = app["acc"]
                acc[:] = 0
                t = _timed_batch(app, _scatter_task, tasks)
                if r:
                    row.timing(name).add(t, np.array_equal(acc, expected))
                    _record_phases(facts, app, name)
                del acc
            t0 = time.perf_counter()
            serial = np.zeros(elements, np.int64)
            for i in range(tasks):
                serial[idx[i]] += 1
            t = time.perf_counter() - t0
            if r:
                row.timing("serial numpy").add(t, np.array_equal(serial, expected))
            shm_acc[:] = 0
            t0 = time.perf_counter()
            shared.pool.starmap(_shm_scatter, [(elements, idx.shape[1], i) for i in range(tasks)],
                                chunksize=1)
            t = time.perf_counter() - t0
            if r:
                row.timing("shared memory + lock").add(t, np.array_equal(shm_acc, expected))
        del shm_acc
    finally:
        if shared is not None:
            shared.close()
        for app in apps.values():
            app.close()
    row.facts = _medians(facts)
    return row


DENSE_SYSTEMS = {"pagefork processes": ("processes", "snapshot"),
                 "pagefork threads": ("threads", "snapshot")}


def dense_add(elements: int = 4 << 20, tasks: int = 8, rounds: int = 3, workers: int = WORKERS,
              progress: Progress | None = None) -> Workload:
    """Seconds for ``tasks`` tasks each adding (i+1) to all of an int64 array."""
    expected = tasks * (tasks + 1) // 2
    row = Workload("dense", f"{tasks} tasks each add (i+1) to all of {_count(elements)} int64, "
                            f"{workers} workers (ms)")
    facts: dict[str, list[float]] = {}

    def all_expected(a: np.ndarray) -> bool:
        return bool(a.size == elements and a.min() == expected and a.max() == expected)

    def build(app: App, start: str) -> None:
        app.alloc("acc", elements, np.int64, merge="sum", start=start)

    apps = _pagefork_apps(elements * 8 + PAGE_SIZE, DENSE_SYSTEMS, workers, build)
    shared = None
    try:
        shared = _SharedArrays([elements * 8], workers)
        shm_acc = shared.array(0, np.int64, elements)
        for r in range(rounds + 1):
            if progress:
                progress(f"dense adds: round {r} of {rounds}")
            for name, app in apps.items():
                acc = app["acc"]
                acc[:] = 0
                t = _timed_batch(app, _dense_task, tasks)
                if r:
                    row.timing(name).add(t, all_expected(acc))
                    _record_phases(facts, app, name)
                del acc
            gc.collect()
            t0 = time.perf_counter()
            serial = np.zeros(elements, np.int64)
            for i in range(tasks):
                serial += i + 1
            t = time.perf_counter() - t0
            if r:
                row.timing("serial numpy").add(t, all_expected(serial))
            del serial
            shm_acc[:] = 0
            t0 = time.perf_counter()
            shared.pool.starmap(_shm_dense, [(elements, i) for i in range(tasks)], chunksize=1)
            t = time.perf_counter() - t0
            if r:
                row.timing("shared memory + lock").add(t, all_expected(shm_acc))
        del shm_acc
    finally:
        if shared is not None:
            shared.close()
        for app in apps.values():
            app.close()
    row.facts = _medians(facts)
    return row


# ---- particle deposit ----------------------------------------------------------------


def _deposit_task(mem: Any, i: int, n: int, step: int) -> None:
    cells, weights, grid = mem["cells"], mem["weights"], mem["grid"]
    a, b = cells.size * i // n, cells.size * (i + 1) // n
    np.add.at(grid, (cells[a:b] + step) % grid.size, weights[a:b])


def deposit(particles: int = 2 << 20, cells: int = 1 << 20, tasks: int = 8, steps: int = 5,
            rounds: int = 2, workers: int = WORKERS, progress: Progress | None = None) -> Workload:
    """Seconds for ``steps`` deposit steps: the main program zeroes the grid,
    then ``tasks`` tasks each ``np.add.at`` their share of the particles
    (integer weights, so every system's grid is exact)."""
    rng = np.random.default_rng(5)
    where = rng.integers(0, cells, particles)
    weights = rng.integers(1, 100, particles)
    row = Workload("deposit", f"particle deposit, {_count(particles)} particles into {_count(cells)} cells "
                              f"with np.add.at, {tasks} tasks, {steps} steps, {workers} workers (ms)")
    facts: dict[str, list[float]] = {}

    def build(app: App, start: str) -> None:
        app.alloc("cells", particles, np.int64)[:] = where
        app.alloc("weights", particles, np.int64)[:] = weights
        app.alloc("grid", cells, np.int64, merge="sum", start=start)

    apps = _pagefork_apps(2 * particles * 8 + cells * 8 + 2 * PAGE_SIZE, SCATTER_SYSTEMS, workers, build)
    try:
        for r in range(rounds + 1):
            if progress:
                progress(f"particle deposit: round {r} of {rounds}")
            t0 = time.perf_counter()
            serial = np.zeros(cells, np.int64)
            for step in range(steps):
                serial[:] = 0
                np.add.at(serial, (where + step) % cells, weights)
            t = time.perf_counter() - t0
            expected = serial
            if r:
                row.timing("serial np.add.at").add(t, True)
            for name, app in apps.items():
                grid = app["grid"]
                app.parallel(_noop, 1)
                t0 = time.perf_counter()
                for step in range(steps):
                    grid[:] = 0
                    app.parallel(_deposit_task, tasks, args=(step,))
                t = time.perf_counter() - t0
                if r:
                    row.timing(name).add(t, np.array_equal(grid, expected))
                    _record_phases(facts, app, name)
                del grid
            del serial, expected
            gc.collect()
    finally:
        for app in apps.values():
            app.close()
    row.facts = _medians(facts)
    return row


# ---- peak parent RSS -------------------------------------------------------------------

_RSS_CHILD = r"""
import json, sys
import numpy as np
from pagefork.bench.dense import _rss_measure
print(json.dumps(_rss_measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
"""


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name + ":"))


def _rss_measure(backend: str, app_bytes: int, elements: int, per_task: int) -> dict:
    """In a fresh process: peak RSS during one batch of 8 tasks each adding 1
    at ``per_task`` random unique indices (one diff each)."""
    tasks = 8
    idx = _scatter_indices(elements, tasks, per_task / elements, seed=13)
    with App(app_bytes, backend=backend, workers=WORKERS) as app:
        app.alloc("idx", idx.shape, np.int64)[:] = idx
        acc = app.alloc("acc", elements, np.int64, merge="sum")
        app.parallel(_scatter_task, tasks)  # warm: workers started, memory populated
        acc[:] = 0
        app.parallel(_noop, 1)
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current RSS
        app.parallel(_scatter_task, tasks)
        peak = _status("VmHWM")
        stats = app.last_batch
        expected = np.zeros(elements, np.int64)
        for i in range(tasks):
            expected[idx[i]] += 1
        correct = bool(np.array_equal(acc, expected))
        del acc
        size = app.memory.size
    return {"backend": backend, "memory": size, "before": before, "peak": peak, "diffs": stats.diffs,
            "diff_bytes": stats.diff_bytes, "budget": size + 2 * stats.diff_bytes + (64 << 20),
            "correct": correct}


def rss_peak(app_bytes: int = 56 << 20, elements: int = 4 << 20, per_task: int = 1 << 18,
             progress: Progress | None = None) -> list[dict]:
    """Peak parent RSS during a batch of ~``8 * per_task`` scattered diffs,
    each backend in a fresh process (a peak only grows)."""
    rows = []
    for backend in ("processes", "threads"):
        if progress:
            progress(f"peak RSS during a batch of scattered diffs, {backend}")
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, backend, str(app_bytes), str(elements),
                              str(per_task)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout))
    return rows
