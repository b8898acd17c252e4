"""Whole-array work (issue 19): a Jacobi stencil, the main program's writes
between batches, an empty batch, scattered and dense integer adds and a
particle deposit, each beside serial numpy and what a user writes instead
(ThreadPoolExecutor in place, multiprocessing.Pool (fork), shared memory +
a lock), plus the peak parent RSS during a batch of ~2M scattered diffs.
Systems are interleaved per round and every answer is checked against
serial numpy; the goals are judged on same-run ratios of medians.

    .venv/bin/python benchmarks/bench_dense.py [--quick] [--only stencil] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork.bench import progress_to_stderr
from pagefork.bench.dense_report import SECTIONS, format_results, run_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes)")
    parser.add_argument("--only", choices=SECTIONS, help="run one workload only")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    res = run_all(quick=args.quick, progress=progress_to_stderr, only=args.only)
    print(format_results(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.as_dict(), f, indent=2)


if __name__ == "__main__":
    main()
