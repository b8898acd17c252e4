"""Executor benchmarks: batch cost against memory size (it should stay flat),
the histogram with 2 workers against 1, and a reduction workload beside
joblib (loky) and multiprocessing returning arrays.

    .venv/bin/python benchmarks/bench_executor.py [--sizes 16MiB 1GiB] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork.bench import parse_sizes, progress_to_stderr
from pagefork.bench.executor import batch_costs, format_batch_table, reduction_comparison, scaling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["16MiB", "64MiB", "256MiB", "1GiB"])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = batch_costs(parse_sizes(args.sizes), progress=progress_to_stderr)
    print(format_batch_table(rows))
    print(f"batch time at {rows[-1].size >> 20} MiB / {rows[0].size >> 20} MiB: "
          f"{rows[-1].batch_ms / rows[0].batch_ms:.2f}x")
    scale = scaling(progress=progress_to_stderr)
    print(f"\nhistogram, 8 threads: 1 worker {scale[1] * 1e3:.0f} ms, 2 workers "
          f"{scale[2] * 1e3:.0f} ms: speed-up {scale[1] / scale[2]:.2f}x")
    runs = reduction_comparison(progress=progress_to_stderr)
    print("\nreduction into a 32 MB histogram, 8 tasks on 2 processes:")
    ours = runs[0].seconds
    for r in runs:
        print(f"  {r.name:<22}{r.seconds * 1e3:>9.0f} ms  {r.seconds / ours:>6.2f}x pagefork's time"
              f"  {'correct' if r.correct else 'WRONG'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batches": [r.as_dict() for r in rows], "scaling": scale,
                       "reduction": [r.as_dict() for r in runs]}, f, indent=2)


if __name__ == "__main__":
    main()
