"""A parallel histogram: each thread counts its share of the data into a
shared array merged by "sum", so no update is lost.

    python examples/histogram.py [--backend processes] [--threads 8]
"""

from __future__ import annotations

import argparse

import numpy as np

import pagefork


def count(mem, i, n):
    data, hist = mem["data"], mem["hist"]
    share = data[i * data.size // n: (i + 1) * data.size // n]
    hist += np.bincount(share, minlength=hist.size)


def main(backend: str = "processes", threads: int = 8, values: int = 4_000_000, bins: int = 256) -> bool:
    with pagefork.App(f"{values * 8 // 2**20 + 1}MiB", backend=backend) as app:
        data = app.alloc("data", values, np.int64)
        data[:] = np.random.default_rng(1).integers(0, bins, values)
        hist = app.alloc("hist", bins, np.int64, merge="sum")
        app.parallel(count, threads)
        ok = np.array_equal(hist, np.bincount(data, minlength=bins))
        print(f"histogram of {values} values in {threads} threads: "
              f"{'matches' if ok else 'DIFFERS FROM'} numpy.bincount")
        print(" ", app.last_batch.summary())
        return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="processes")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    raise SystemExit(0 if main(args.backend, args.threads) else 1)
