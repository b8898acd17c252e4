"""Incremental checkpoints against whole-memory np.save / np.load, measured
in one interleaved run on the same disk:

- 1 GiB main memory, 1% of its pages changed: checkpoint time (fsynced)
  against np.save of the whole memory (goal <= 1/20), bytes written
  (goal <= 2% of 1 GiB);
- restore from a base plus 10 increments against np.load of one full copy
  (goal <= 1.5x);
- the same changed pages in 64 MiB and in 1 GiB (goal <= 1.2x), medians of
  rounds that alternate which memory goes first; also after the program read
  all of its memory;
- and, to show where a restore's time goes: the same restore into a bare
  Region, and the floor of any restore into an App (filling a fresh memfd);
- bytes a base and an increment write for compressible (zeros) and
  incompressible (random) data, one value changed per page, compressed
  against stored raw: increments follow the bases' rule.

    .venv/bin/python benchmarks/bench_checkpoint.py [--quick] [--size 1GiB] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork.bench import parse_sizes, progress_to_stderr
from pagefork.bench.checkpoint import (checkpoint_costs, format_checkpoint_report, format_increment_sizes,
                                       increment_sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB against 16 MiB, 3 rounds")
    parser.add_argument("--size", default=None, help="large memory (default 1GiB)")
    parser.add_argument("--small-size", default=None, help="small memory (default 64MiB)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: here)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    size = parse_sizes([args.size or ("256MiB" if args.quick else "1GiB")])[0]
    small = parse_sizes([args.small_size or ("16MiB" if args.quick else "64MiB")])[0]
    rounds = args.rounds or (5 if args.quick else 7)
    costs = checkpoint_costs(size, small, rounds=rounds, size_rounds=9 if args.quick else 31,
                             folder=args.dir, progress=progress_to_stderr)
    print("Incremental checkpoints (App, threads backend, incompressible data)")
    print(format_checkpoint_report(costs))
    compression_size = small
    sizes = [increment_sizes(compression_size, data, folder=args.dir)
             for data in ("compressible", "incompressible")]
    print("\nBases and increments, compressed (zstd level 1) against stored raw")
    print(format_increment_sizes(sizes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**costs.as_dict(), "increment_sizes": [s.as_dict() for s in sizes]}, f, indent=2)


if __name__ == "__main__":
    main()
