"""Main memory windows: what holding the other writers of main memory costs
a checkpoint and a batch's join, and what a held writer waits.

For each memory size and number of pages the main program wrote, the
window (carry, merge, new mapping) runs with writers held by userfaultfd
("uffd"), by mprotect and the SIGSEGV handler ("mprotect"), and by the GIL
alone ("none", which loses writes made without the GIL: the baseline).
Then a writer thread stores without the GIL (ctypes.memmove) while
checkpoints run back to back: its store latencies show the wait. Last, the
cost per batch of never reusing thread memory a thread kept a view of.

    .venv/bin/python benchmarks/bench_windows.py [--sizes 16MiB 256MiB 1GiB] [--repeats 15]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import pagefork._main_memory as main_memory
from pagefork import PAGE_SIZE, App
from pagefork.bench import parse_sizes

HOLDS = ("none", "uffd", "mprotect")


def _touch(mem, i, n, pages):
    a = mem["a"]
    a[np.arange(i, pages, n) * (PAGE_SIZE // 8)] += 1


def windows(size: int, written: int, repeats: int, mapped: bool) -> dict[str, tuple[float, float, float]]:
    """Median (held ms, checkpoint ms, join ms) per hold, the main program
    writing ``written`` pages before each; ``mapped``: it read all of main
    memory first (every page mapped, what a remap costs most)."""
    folder = tempfile.mkdtemp()
    seen: list[tuple[float, float, float, float]] = []
    real = main_memory.window

    def spy(*args, **kwargs):
        done = real(*args, **kwargs)
        seen.append(done.seconds)
        return done

    main_memory.window = spy
    out = {}
    try:
        with App(size, backend="threads", workers=2) as app:
            a = app.alloc("a", size // 8, np.int64, merge="sum")
            stride = max(1, size // PAGE_SIZE // max(written, 1)) * (PAGE_SIZE // 8)
            for hold in HOLDS:
                main_memory.HOLD = "auto" if hold == "uffd" else hold
                held, ck, join = [], [], []
                for _ in range(repeats):
                    if mapped:
                        int(a[:: PAGE_SIZE // 8].sum())
                    a[: written * stride: stride] += 1
                    seen.clear()
                    t0 = time.perf_counter()
                    app.checkpoint(folder, keep=1)
                    ck.append(time.perf_counter() - t0)
                    held.append(seen[-1][0] if seen else 0.0)
                    a[: written * stride: stride] += 1
                    seen.clear()
                    t0 = time.perf_counter()
                    app.parallel(_touch, 4, args=(16,))
                    join.append(app.last_batch.times["merge"] + app.last_batch.times["remap"])
                    held.append(seen[-1][0])
                out[hold] = (statistics.median(held) * 1e3, statistics.median(ck) * 1e3,
                             statistics.median(join) * 1e3)
    finally:
        main_memory.window = real
        main_memory.HOLD = "auto"
    return out


def writer_wait(size: int, seconds: float, hold: str) -> tuple[float, float, float, int]:
    """A thread storing without the GIL, a 0.2 ms pause between stores,
    while checkpoints run back to back (the main program rewriting 1/8 of
    memory before each): p50, p99 and max of the time from one store to the
    next (ms), and how many checkpoints ran."""
    main_memory.HOLD = "auto" if hold == "uffd" else hold
    folder = tempfile.mkdtemp()
    lat: list[float] = []
    stop = threading.Event()
    try:
        with App(size, backend="threads", workers=1) as app:
            a = app.alloc("a", size // 8 - 1024, np.int64)
            w = app.alloc("w", 1024, np.int64)
            address, value = w.ctypes.data, ctypes.c_int64(1)

            def writer():
                # The time from one store to the next, a 0.2 ms pause between
                # them: beyond the pause, what the store waited (a hold, or
                # the GIL, which a window keeps).
                k = 0
                clock = time.perf_counter
                last = clock()
                while not stop.is_set():
                    ctypes.memmove(address + 8 * (k % 1024), ctypes.byref(value), 8)
                    now = clock()
                    lat.append(now - last)
                    last = now
                    k += 1
                    time.sleep(0.0002)

            th = threading.Thread(target=writer)
            th.start()
            n, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                a[:: 8 * PAGE_SIZE // 8] += 1
                app.checkpoint(folder, keep=1)
                n += 1
            stop.set()
            th.join()
    finally:
        main_memory.HOLD = "auto"
    q = np.quantile(np.array(lat) * 1e3, [0.5, 0.99])
    return float(q[0]), float(q[1]), max(lat) * 1e3, n


def _keep(mem, i, n, box):
    box.append(mem["a"])


def _plain(mem, i, n, box):
    mem["a"][i] += 1


def kept_views(batches: int, backend: str) -> tuple[float, float]:
    """ms per batch of 8 threads on one worker of a 64 MiB App: none keeps
    anything, and every one keeps a view (new memory for each next)."""
    out = []
    for fn in (_plain, _keep):
        with App("64MiB", backend=backend, workers=1) as app:
            app.alloc("a", 1024, np.int64, merge="sum")
            app.parallel(fn, 8, args=([],))
            times = []
            for _ in range(batches):
                t0 = time.perf_counter()
                app.parallel(fn, 8, args=([],))
                times.append(time.perf_counter() - t0)
            out.append(statistics.median(times) * 1e3)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["16MiB", "256MiB", "1GiB"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    support = main_memory.hold_support()
    print(f"userfaultfd hold: {support.uffd} {support.reason} (kernel writes held: {support.kernel_writes})")
    print(f"{'size':>8} {'written':>8} {'mapped':>6}  " + "  ".join(f"{h + ' held/ck/join ms':>28}" for h in HOLDS))
    for size in parse_sizes(args.sizes):
        for written in (16, 1024):
            for mapped in (False, True):
                res = windows(size, written, args.repeats, mapped)
                cells = "  ".join(f"{res[h][0]:>9.2f}{res[h][1]:>9.2f}{res[h][2]:>10.2f}" for h in HOLDS)
                print(f"{size >> 20:>6}Mi {written:>8} {str(mapped):>6}  {cells}", flush=True)
    for hold in HOLDS:
        p50, p99, worst, n = writer_wait(256 << 20, 5.0, hold)
        print(f"store to store (0.2 ms pause), {hold:>8} hold, 256 MiB, {n} checkpoints: p50 {p50:.3f} ms, "
              f"p99 {p99:.3f} ms, max {worst:.2f} ms", flush=True)
    for backend in ("threads", "processes"):
        plain, keeping = kept_views(100, backend)
        print(f"{backend} backend, 8 threads on 1 worker: {plain:.2f} ms per batch; every thread keeping "
              f"a view (new memory for the next): {keeping:.2f} ms per batch "
              f"({(keeping - plain) / 8 * 1e3:.0f} us per thread)", flush=True)


if __name__ == "__main__":
    main()
