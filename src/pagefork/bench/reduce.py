"""Reduction benchmarks: pagefork beside what users write by hand.

Four measurements, each comparing systems in one run with the systems
interleaved per repeat (so machine noise hits all alike), every result
checked against the exact answer:

* ``dense``: 8 tasks each add to every element of an int64 array, on 2
  worker processes: pagefork (sum merge) beside serial numpy, shared memory
  plus a lock (each task adds its partial under the lock), joblib/loky with
  one partial array per worker summed by the parent, and optionally a plain
  Dask tree sum.
* ``scattered``: each task adds compute-heavy values at 1% random unique
  indices: pagefork (default start, and ``start="identity"``) beside serial
  numpy.
* ``shipped``: bytes the processes backend ships per changed int64 when the
  updates are scattered (the value itself is 8 bytes).
* ``tracked``: ``Snapshot.tracked_changes()`` after rewriting a large range,
  time and peak RSS growth, beside ``bytes(snapshot.view())``.

Thread functions live at module level so worker processes import them.
"""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np

from ..app import App
from ..memory import PAGE_SIZE

__all__ = ["Timing", "ReduceResults", "dense_sum", "scattered_sum", "bytes_per_value",
           "tracked_changes_cost", "run_all", "format_results"]

Progress = Callable[[str], None]


@dataclass
class Timing:
    """One system's times (seconds, one per repeat) on one workload."""

    name: str
    seconds: list[float] = field(default_factory=list)
    correct: bool = True
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "best": self.best, "median": self.median}


# ---- dense: every task adds to the whole array --------------------------------------


def _dense_task(mem: Any, i: int, n: int) -> None:
    mem["acc"][:] += i + 1


def _dense_partial(elements: int, tasks: list[int]) -> np.ndarray:
    partial = np.zeros(elements, np.int64)
    for i in tasks:
        partial += i + 1
    return partial


_SHM: dict[str, Any] = {}


def _shm_init(name: str, lock: Any) -> None:
    from multiprocessing import shared_memory

    _SHM["shm"] = shared_memory.SharedMemory(name)
    _SHM["lock"] = lock


def _shm_task(elements: int, i: int) -> None:
    acc = np.ndarray(elements, np.int64, buffer=_SHM["shm"].buf)
    partial = np.full(elements, i + 1, np.int64)  # the task's own contribution
    with _SHM["lock"]:
        acc += partial


def _dense_expected(elements: int, tasks: int) -> int:
    return tasks * (tasks + 1) // 2


def _dask_partial(elements: int, i: int) -> np.ndarray:
    return np.full(elements, i + 1, np.int64)


def dense_sum(elements: int = 16 << 20, tasks: int = 8, workers: int = 2, repeat: int = 3,
              dask: bool = False, progress: Progress | None = None) -> list[Timing]:
    """Seconds per dense reduction for each system, interleaved per repeat."""
    import multiprocessing as mp

    expected = _dense_expected(elements, tasks)
    shares = [list(range(w, tasks, workers)) for w in range(workers)]
    results: dict[str, Timing] = {}

    def record(name: str, seconds: float, ok: bool) -> None:
        t = results.setdefault(name, Timing(name))
        t.seconds.append(seconds)
        t.correct = t.correct and ok

    def all_equal(a: np.ndarray) -> bool:
        return bool(a.size == elements and a.min() == expected and a.max() == expected)

    if progress:
        progress(f"dense sum, {elements * 8 >> 20} MB: starting the systems")
    ctx = mp.get_context("forkserver")
    from multiprocessing import shared_memory

    app = App(elements * 8 + PAGE_SIZE, backend="processes", workers=workers)
    shm = shared_memory.SharedMemory(create=True, size=elements * 8)
    parallel = client = cluster = pool = dask_app = None
    dask_acc: Any = None
    try:
        acc = app.alloc("acc", elements, np.int64, merge="sum")
        try:
            from joblib import Parallel, delayed
            parallel = Parallel(n_jobs=workers, backend="loky")
            parallel.__enter__()
        except ImportError:
            delayed = None
        if dask:
            try:
                from distributed import Client, LocalCluster
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
                client = Client(cluster)
                dask_app = App(elements * 8 + PAGE_SIZE, backend="dask", client=client)
                dask_acc = dask_app.alloc("acc", elements, np.int64, merge="sum")
            except ImportError:
                pass
        shared = np.ndarray(elements, np.int64, buffer=shm.buf)
        pool = ctx.Pool(workers, initializer=_shm_init, initargs=(shm.name, ctx.Lock()))
        for r in range(repeat + 1):  # round 0 warms every system up, untimed
            if progress:
                progress(f"dense sum, {elements * 8 >> 20} MB: round {r} of {repeat}")
            acc[:] = 0
            app.parallel(_noop, 1)  # carries the reset outside the timing
            t0 = time.perf_counter()
            app.parallel(_dense_task, tasks)
            t = time.perf_counter() - t0
            if r:
                record("pagefork processes", t, all_equal(acc))

            gc.collect()
            t0 = time.perf_counter()
            serial = np.zeros(elements, np.int64)
            for i in range(tasks):
                serial += i + 1
            t = time.perf_counter() - t0
            if r:
                record("serial numpy", t, all_equal(serial))
            del serial

            shared[:] = 0
            t0 = time.perf_counter()
            pool.starmap(_shm_task, [(elements, i) for i in range(tasks)], chunksize=1)
            t = time.perf_counter() - t0
            if r:
                record("shared memory + lock", t, all_equal(shared))

            if parallel is not None:
                gc.collect()
                t0 = time.perf_counter()
                total = sum(parallel(delayed(_dense_partial)(elements, s) for s in shares))
                t = time.perf_counter() - t0
                if r:
                    record("joblib, a partial per worker", t, all_equal(np.asarray(total)))
                del total

            if dask_app is not None:
                dask_acc[:] = 0
                dask_app.parallel(_noop, 1)
                t0 = time.perf_counter()
                dask_app.parallel(_dense_task, tasks)
                t = time.perf_counter() - t0
                if r:
                    record("pagefork on Dask", t, all_equal(dask_acc))

            if client is not None:
                gc.collect()
                t0 = time.perf_counter()
                futures = [client.submit(_dask_partial, elements, i, pure=False) for i in range(tasks)]
                while len(futures) > 1:  # a tree sum, pairs combined on the workers
                    futures = [client.submit(np.add, futures[k], futures[k + 1]) if k + 1 < len(futures)
                               else futures[k] for k in range(0, len(futures), 2)]
                total = futures[0].result()
                t = time.perf_counter() - t0
                if r:
                    record("plain Dask tree sum", t, all_equal(total))
                del total, futures
        del shared, acc
    finally:
        if parallel is not None:
            parallel.__exit__(None, None, None)
        if pool is not None:
            pool.terminate()
            pool.join()
        if dask_app is not None:
            dask_acc = None
            dask_app.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        shm.close()
        shm.unlink()
        app.close()
    return list(results.values())


def _noop(mem: Any, i: int, n: int) -> None:
    return None


# ---- scattered, compute-heavy --------------------------------------------------------


def _work(idx: np.ndarray, rounds: int) -> np.ndarray:
    """Values worth ``rounds`` passes of float arithmetic per index."""
    x = idx.astype(np.float64) * 1e-6
    for _ in range(rounds):
        x = np.sin(x) * 1.25 + 0.5
    return np.floor(x * 1000).astype(np.int64)


def _scattered_task(mem: Any, i: int, n: int, rounds: int) -> None:
    idx = mem["idx"][i]
    mem["acc"][idx] += _work(idx, rounds)


def _scatter_indices(elements: int, tasks: int, density: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count = int(elements * density)
    return np.stack([np.sort(rng.permutation(elements)[:count]) for _ in range(tasks)])


def _calibrate_rounds(count: int, target_s: float) -> int:
    """Rounds worth ``target_s`` of CPU time (not wall time: on a loaded
    machine that would shrink the work and inflate every overhead ratio)."""
    idx = np.arange(count, dtype=np.int64)
    t0 = time.process_time()
    _work(idx, 10)
    per_round = (time.process_time() - t0) / 10
    return max(1, int(target_s / max(per_round, 1e-9)))


def _workers_cpu(app: App) -> float | None:
    """CPU seconds the processes backend's workers used so far (from /proc),
    or None where that cannot be read."""
    total = 0.0
    try:
        for w in app._executor.backend._workers:  # type: ignore[attr-defined]
            with open(f"/proc/{w.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return total


SCATTERED_STARTS = {"pagefork processes": "snapshot", "pagefork processes, start=identity": "identity"}


def scattered_sum(elements: int = 4 << 20, tasks: int = 8, workers: int = 2, density: float = 0.01,
                  task_seconds: float = 0.037, repeat: int = 3,
                  progress: Progress | None = None) -> tuple[list[Timing], int]:
    """Seconds per compute-heavy scattered reduction (pagefork with each
    ``start`` of the accumulator, beside serial numpy), and the arithmetic
    rounds per task used. Each Timing's note gives CPU milliseconds per task
    (pagefork: its workers', and the parent's per batch), which a loaded
    machine blurs far less than wall time: their difference is pagefork's
    overhead per task."""
    idx = _scatter_indices(elements, tasks, density)
    rounds = _calibrate_rounds(idx.shape[1], task_seconds)
    expected = np.zeros(elements, np.int64)
    for i in range(tasks):
        expected[idx[i]] += _work(idx[i], rounds)
    results = {name: Timing(name) for name in [*SCATTERED_STARTS, "serial numpy"]}
    cpu: dict[str, list[float]] = {"serial": []}
    apps: dict[str, App] = {}
    try:
        for name, start in SCATTERED_STARTS.items():
            app = apps[name] = App(elements * 8 + idx.nbytes + 2 * PAGE_SIZE, backend="processes",
                                   workers=workers)
            app.alloc("idx", idx.shape, np.int64)[:] = idx
            app.alloc("acc", elements, np.int64, merge="sum", start=start)
            cpu[name + " workers"], cpu[name + " parent"] = [], []
        for r in range(repeat + 1):
            if progress:
                progress(f"scattered {density:.0%} sum, round {r} of {repeat}")
            for name, app in apps.items():
                acc = app["acc"]
                acc[:] = 0
                app.parallel(_noop, 1)
                w0, p0 = _workers_cpu(app), time.process_time()
                t0 = time.perf_counter()
                app.parallel(_scattered_task, tasks, args=(rounds,))
                t = time.perf_counter() - t0
                w1, p1 = _workers_cpu(app), time.process_time()
                if r:
                    results[name].seconds.append(t)
                    results[name].correct &= bool(np.array_equal(acc, expected))
                    if w0 is not None and w1 is not None:
                        cpu[name + " workers"].append((w1 - w0) / tasks)
                    cpu[name + " parent"].append(p1 - p0)
                del acc
            t0, c0 = time.perf_counter(), time.process_time()
            serial = np.zeros(elements, np.int64)
            for i in range(tasks):
                serial[idx[i]] += _work(idx[i], rounds)
            t, c = time.perf_counter() - t0, time.process_time() - c0
            if r:
                results["serial numpy"].seconds.append(t)
                results["serial numpy"].correct &= bool(np.array_equal(serial, expected))
                cpu["serial"].append(c / tasks)
    finally:
        for app in apps.values():
            app.close()
    for name in SCATTERED_STARTS:
        if cpu[name + " workers"]:
            results[name].note = (
                f"CPU {statistics.median(cpu[name + ' workers']) * 1e3:.1f} ms per task in the workers, "
                f"{statistics.median(cpu[name + ' parent']) * 1e3:.0f} ms per batch in the parent")
    if cpu["serial"]:
        results["serial numpy"].note = f"CPU {statistics.median(cpu['serial']) * 1e3:.1f} ms per task"
    return list(results.values()), rounds


def _scattered_plain(mem: Any, i: int, n: int) -> None:
    idx = mem["idx"][i]
    mem["acc"][idx] += idx + 1


def bytes_per_value(elements: int = 4 << 20, tasks: int = 8, workers: int = 2,
                    density: float = 0.01, progress: Progress | None = None) -> dict[str, float]:
    """Bytes the processes backend ships per changed int64 for scattered
    updates (each task changes ``density`` of the elements, at random)."""
    if progress:
        progress(f"bytes shipped per changed value, {density:.0%} scattered")
    idx = _scatter_indices(elements, tasks, density, seed=11)
    with App(elements * 8 + idx.nbytes + 2 * PAGE_SIZE, backend="processes", workers=workers) as app:
        app.alloc("idx", idx.shape, np.int64)[:] = idx
        acc = app.alloc("acc", elements, np.int64, merge="sum")
        app.parallel(_noop, tasks)  # ships the snapshot to the workers first
        app.parallel(_scattered_plain, tasks)
        stats = app.last_batch
        expected = np.zeros(elements, np.int64)
        for i in range(tasks):
            expected[idx[i]] += idx[i] + 1
        correct = bool(np.array_equal(acc, expected))
        del acc
    changed = tasks * idx.shape[1]  # values the tasks changed
    return {"bytes_shipped": stats.bytes_shipped, "values_changed": changed,
            "bytes_per_value": stats.bytes_shipped / changed, "correct": correct}


# ---- tracked_changes ---------------------------------------------------------------------


_TRACKED_CHILD = r"""
import json, sys, time
import numpy as np
from pagefork import Snapshot

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

size, mode = int(sys.argv[1]), sys.argv[2]
snap = Snapshot(size=size)
rng = np.random.default_rng(1)
chunk = 16 << 20
for at in range(0, size, chunk):  # one write per chunk keeps the peak RSS low
    snap.write(rng.integers(0, 255, min(chunk, size - at), dtype=np.uint8), at)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS
t0 = time.perf_counter()
if mode == "tracked":
    out = snap.tracked_changes()
    ok = bool(len(out) == 1 and out.offsets[0] == 0 and out.lengths[0] == size)
else:
    out = bytes(snap.view())
    ok = len(out) == size
t = time.perf_counter() - t0
extra = status("VmHWM") - before
data = np.frombuffer(out.data if mode == "tracked" else out, np.uint8)
ok = ok and bool(np.array_equal(data, np.frombuffer(snap.view(), np.uint8)))
print(json.dumps({"seconds": t, "extra_rss": extra, "correct": ok}))
"""


def tracked_changes_cost(size: int = 256 << 20, repeat: int = 1,
                         progress: Progress | None = None) -> list[dict]:
    """``tracked_changes()`` after one write of ``size`` bytes, beside
    ``bytes(snapshot.view())``: seconds and growth of the peak RSS, each in
    a fresh process (peak RSS only grows)."""
    rows: dict[str, dict] = {}
    import json

    for _ in range(repeat):
        for mode, name in (("tracked", "Snapshot.tracked_changes()"), ("bytes", "bytes(snapshot.view())")):
            if progress:
                progress(f"{name} after writing {size >> 20} MiB")
            out = subprocess.run([sys.executable, "-c", _TRACKED_CHILD, str(size), mode],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout)
            row = rows.setdefault(name, {"name": name, "seconds": [], "extra_rss": [], "correct": True})
            row["seconds"].append(m["seconds"])
            row["extra_rss"].append(m["extra_rss"])
            row["correct"] = row["correct"] and m["correct"]
    return list(rows.values())


# ---- all together ------------------------------------------------------------------------


@dataclass
class ReduceResults:
    dense: list[Timing]
    dense_elements: int
    scattered: list[Timing]
    scattered_rounds: int
    shipped: dict[str, float]
    tracked: list[dict]
    tracked_size: int

    def as_dict(self) -> dict:
        return {"dense": [t.as_dict() for t in self.dense], "dense_elements": self.dense_elements,
                "scattered": [t.as_dict() for t in self.scattered],
                "scattered_rounds": self.scattered_rounds, "shipped": self.shipped,
                "tracked": self.tracked, "tracked_size": self.tracked_size}


#: The measurements ``run_all`` can be limited to.
SECTIONS = ("dense", "scattered", "shipped", "tracked")


def run_all(quick: bool = False, dense_elements: int | None = None, dask: bool = False,
            progress: Progress | None = None, only: str | None = None) -> ReduceResults:
    """Every reduction measurement (or ``only`` one of :data:`SECTIONS`);
    ``quick`` keeps the whole run near a minute."""
    if only is not None and only not in SECTIONS:
        raise ValueError(f"only must be one of {', '.join(SECTIONS)}, not {only!r}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    elements = dense_elements or (16 << 20)
    repeat = 2 if quick else 5
    res = ReduceResults([], elements, [], 0, {}, [], 256 << 20)
    # Scattered first: measured after the dense systems (GBs allocated and
    # freed, loky and Dask started and stopped) in the same run, its fresh
    # workers spent ~1.5x the CPU per task on this VM, serial numpy did not.
    if only in (None, "scattered"):
        res.scattered, res.scattered_rounds = scattered_sum(repeat=3 if quick else 7, progress=progress)
    if only in (None, "dense"):
        res.dense = dense_sum(elements, repeat=repeat, dask=dask, progress=progress)
    if only in (None, "shipped"):
        res.shipped = bytes_per_value(progress=progress)
    if only in (None, "tracked"):
        res.tracked = tracked_changes_cost(res.tracked_size, progress=progress)
    return res


def format_results(res: ReduceResults) -> str:
    lines: list[str] = []
    if res.dense:
        _format_dense(res, lines)
    if res.scattered:
        _format_scattered(res, lines)
    if res.shipped:
        s = res.shipped
        lines.append(f"\nScattered updates, bytes shipped per changed int64: {s['bytes_per_value']:.1f} B "
                     f"({int(s['bytes_shipped'])} bytes for {int(s['values_changed'])} values; "
                     f"{s['bytes_per_value'] / 8:.2f}x the values; "
                     f"{'correct' if s['correct'] else 'WRONG'})")
    if res.tracked:
        lines.append(f"\nAfter rewriting {res.tracked_size >> 20} MiB of a snapshot:")
        base = res.tracked[1]
        for row in res.tracked:
            lines.append(f"  {row['name']:<32}{min(row['seconds']) * 1e3:>9.0f} ms  "
                         f"+{max(row['extra_rss']) / 2**20:>6.0f} MiB RSS  "
                         f"{min(row['seconds']) / min(base['seconds']):>6.2f}x  "
                         f"{'correct' if row['correct'] else 'WRONG'}")
    return "\n".join(lines).lstrip("\n")


def _format_dense(res: ReduceResults, lines: list[str]) -> None:
    ours = next(t for t in res.dense if t.name.startswith("pagefork"))
    lines.append(f"Dense: 8 tasks each add to all of {res.dense_elements >> 20}M int64 "
                 f"({res.dense_elements * 8 >> 20} MB), 2 worker processes (median of "
                 f"{len(ours.seconds)}; ratio = pagefork / system)")
    for t in res.dense:
        lines.append(f"  {t.name:<32}{t.median * 1e3:>9.0f} ms   pagefork/this {ours.median / t.median:>6.2f}x"
                     f"  {'correct' if t.correct else 'WRONG'}")


def _format_scattered(res: ReduceResults, lines: list[str]) -> None:
    serial = next(t for t in res.scattered if t.name == "serial numpy")
    lines.append(f"\nScattered: 8 tasks, 1% random unique indices of 4M int64 each, "
                 f"{res.scattered_rounds} rounds of arithmetic per task (median of {len(serial.seconds)})")
    for t in res.scattered:
        lines.append(f"  {t.name:<36}{t.median * 1e3:>9.0f} ms  {'correct' if t.correct else 'WRONG'}"
                     + (f"  ({t.note})" if t.note else ""))
    for t in res.scattered:
        if t is not serial:
            lines.append(f"  speed-up over serial numpy, {t.name}: {serial.median / t.median:.2f}x")
