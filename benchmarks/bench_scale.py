"""Time and peak memory in use as an App grows: for each size, in a fresh
subprocess (so each size starts from the same memory):

- numpy: ``np.full`` into fresh memory of the App's size (the baseline a
  fill is compared with), freed before the App is made;
- fill: a new App whose one float64 array fills its memory, written whole;
- batch: one batch of 2 threads writing 1% of the pages;
- checkpoint: a base checkpoint to a folder on disk (``--dir``);
- restore: the App closed, ``App.restore`` of that checkpoint;
- first batch: the same 1% batch on the restored App;
- and a sparse App (1% of its pages ever written): checkpoint, restore and
  first batch, where memory should follow the data, not the size.

Memory in use is machine-wide, MemTotal - MemAvailable (what issue 23's goal
is stated in), and this process's own (its anonymous memory plus its App's
snapshot file), both sampled every 10 ms in a thread; "peak" is the highest
value during the step minus the value before the App existed, and "x data"
divides it by the bytes the App's data holds. Other programs on the machine
move the first too (and the page cache a checkpoint leaves): read it on an
idle machine, or as an upper bound.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 1GiB 4GiB 8GiB 16GiB] [--dir FOLDER] [--json FILE]

Sizes default to 1, 4, 8 and 16 GiB: the larger need that much free memory
(and the machine to yourself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def in_use() -> int:
    """MemTotal - MemAvailable, in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"] - values["MemAvailable"]


#: Descriptors of the live Apps' snapshots (their memfd blocks are this process's memory).
SNAPSHOT_FDS: list[int] = []


def own() -> int:
    """This process's anonymous memory plus its Apps' snapshot files."""
    with open("/proc/self/status") as f:
        anon = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    files = 0
    for fd in list(SNAPSHOT_FDS):
        try:
            files += os.fstat(fd).st_blocks * 512
        except OSError:
            pass
    return anon + files


class Peak:
    """Samples memory in use (machine-wide, and this process's own) in a
    thread; ``step`` returns the seconds and both peaks while ``fn`` ran."""

    def __init__(self) -> None:
        self.high = (in_use(), own())
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            value = (in_use(), own())
            with self.lock:
                self.high = (max(self.high[0], value[0]), max(self.high[1], value[1]))

    def step(self, fn) -> tuple[float, int, int]:
        with self.lock:
            self.high = (in_use(), own())
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        with self.lock:
            return seconds, max(self.high[0], in_use()), max(self.high[1], own())


def _touch(mem, i, n, every):
    a = mem["a"]
    a[i * every:: n * every] += 1.0


def one_size(size: int, folder: str) -> dict:
    """Every step at ``size`` bytes, in this process."""
    import numpy as np

    from pagefork import PAGE_SIZE, App

    every = 100 * PAGE_SIZE // 8  # float64s between pages written: 1% of the pages
    peak = Peak()
    rows = {}
    base = [in_use(), own()]

    def record(name: str, fn, data: int) -> None:
        seconds, high, mine = peak.step(fn)
        rows[name] = {"seconds": seconds, "peak": high - base[0], "own": mine - base[1], "data": data}

    def numpy_fill() -> None:
        a = np.full(size // 8, 1.5)
        del a

    record("numpy fill (baseline)", numpy_fill, size)
    state: dict = {}
    target = os.path.join(folder, "dense")

    def fill() -> None:
        app = App(size, backend="threads", workers=2)
        state["app"] = app
        SNAPSHOT_FDS[:] = [app._executor.snapshot.fd]
        app.alloc("a", size // 8, np.float64)[:] = 1.5

    record("fill", fill, size)
    app = state["app"]
    record("batch (1% of pages)", lambda: app.parallel(_touch, 2, args=(every,)), size)
    record("checkpoint (base)", lambda: app.checkpoint(target), size)
    app.close()
    del app, state["app"]

    record("restore", restore_from(target, state), size)
    app = state.pop("app")
    record("first batch after restore", lambda: app.parallel(_touch, 2, args=(every,)), size)
    app.close()
    del app

    # Sparse: 1% of the pages ever written (from a new baseline: the dense
    # checkpoint's files may still be in the page cache).
    sparse = os.path.join(folder, "sparse")
    data = size // 100
    SNAPSHOT_FDS.clear()
    base[:] = [in_use(), own()]

    def sparse_fill() -> None:
        app = App(size, backend="threads", workers=2)
        state["app"] = app
        SNAPSHOT_FDS[:] = [app._executor.snapshot.fd]
        app.alloc("a", size // 8, np.float64)[::every] = 1.5
        app.parallel(_touch, 2, args=(every,))

    record("sparse: fill and batch (1%)", sparse_fill, data)
    app = state.pop("app")
    record("sparse: checkpoint (base)", lambda: app.checkpoint(sparse), data)
    app.close()
    del app
    record("sparse: restore", restore_from(sparse, state), data)
    app = state.pop("app")
    record("sparse: first batch after restore", lambda: app.parallel(_touch, 2, args=(every,)), data)
    app.close()
    peak.done.set()
    return rows


def restore_from(target: str, state: dict):
    from pagefork import App

    def restore() -> None:
        state["app"] = App.restore(target, backend="threads", workers=2)
        SNAPSHOT_FDS[:] = [state["app"]._executor.snapshot.fd]
    return restore


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1GiB", "4GiB", "8GiB", "16GiB"])
    parser.add_argument("--dir", default=None, help="folder on the disk for checkpoints (default: a temporary "
                        "folder here)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.dir)))
        return
    from pagefork.bench import parse_sizes

    results = {}
    for size in parse_sizes(args.sizes):
        folder = tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir or ".")
        try:
            run = subprocess.run([sys.executable, __file__, "--one", str(size), "--dir", folder],
                                 capture_output=True, text=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if run.returncode != 0:
            print(f"{_gib(size)} GiB: failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}",
                  file=sys.stderr)
            continue
        results[size] = json.loads(run.stdout)
        print(f"{_gib(size)} GiB done", file=sys.stderr)
    print("| App | step | seconds | peak in use, machine (GiB) | x data | peak, this process (GiB) | x data |")
    print("|---|---|---|---|---|---|---|")
    for size, rows in results.items():
        for name, row in rows.items():
            print(f"| {_gib(size)} GiB | {name} | {row['seconds']:.2f} | {_gib(row['peak'])} | "
                  f"{row['peak'] / row['data']:.2f} | {_gib(row['own'])} | {row['own'] / row['data']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
