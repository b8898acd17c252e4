"""Bytes shipped and time per batch: pagefork's Dask backend against a plain
Dask version that ships the memory and returns whole arrays. Starts a local
cluster of 2 worker processes unless --scheduler is given.

    .venv/bin/python benchmarks/bench_dask.py [--size 8MiB] [--scheduler tcp://host:8786]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork._sizes import parse_size
from pagefork.bench import progress_to_stderr
from pagefork.bench.dask import dask_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="8MiB")
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    client = None
    if args.scheduler:
        import distributed

        client = distributed.Client(args.scheduler)
    runs = dask_comparison(client, parse_size(args.size), progress=progress_to_stderr)
    print(f"{'version':<16}{'MiB':>6}{'changed':>9}{'bytes/batch':>14}{'ms/batch':>10}")
    for r in runs:
        print(f"{r.name:<16}{r.size >> 20:>6}{r.changed_fraction:>9.2%}{r.bytes_per_batch:>14,.0f}"
              f"{r.seconds_per_batch * 1e3:>10.1f}")
    print(f"pagefork ships {runs[0].bytes_per_batch / runs[1].bytes_per_batch:.4f}x the bytes of "
          f"plain Dask, in {runs[0].seconds_per_batch / runs[1].seconds_per_batch:.2f}x the time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in runs], f, indent=2)


if __name__ == "__main__":
    main()
