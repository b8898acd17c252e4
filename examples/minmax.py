"""A parallel min/max search: each thread scans its share and folds its
extremes into two scalars merged by "min" and "max".

    python examples/minmax.py [--backend processes] [--threads 8]
"""

from __future__ import annotations

import argparse

import numpy as np

import pagefork


def scan(mem, i, n):
    data = mem["data"]
    share = data[i * data.size // n: (i + 1) * data.size // n]
    mem["lo"][0] = min(mem["lo"][0], share.min())
    mem["hi"][0] = max(mem["hi"][0], share.max())


def main(backend: str = "processes", threads: int = 8, values: int = 2_000_000) -> bool:
    with pagefork.App(f"{values * 8 // 2**20 + 1}MiB", backend=backend) as app:
        data = app.alloc("data", values, np.float64)
        data[:] = np.random.default_rng(3).normal(size=values)
        lo = app.alloc("lo", 1, np.float64, merge="min")
        hi = app.alloc("hi", 1, np.float64, merge="max")
        lo[0], hi[0] = np.inf, -np.inf
        app.parallel(scan, threads)
        ok = lo[0] == data.min() and hi[0] == data.max()
        print(f"min {lo[0]:.4f}, max {hi[0]:.4f} of {values} values: {'exact' if ok else 'WRONG'}")
        return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="processes")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    raise SystemExit(0 if main(args.backend, args.threads) else 1)
