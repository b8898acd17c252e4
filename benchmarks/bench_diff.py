"""Diff throughput against memcmp of the same dirty pages (sparse and dense
changes), apply and wire throughput, and delta sizes/speeds.

    .venv/bin/python benchmarks/bench_diff.py [--size 64MiB]
"""

from __future__ import annotations

import argparse
import json
import os

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork._sizes import parse_size
from pagefork.bench import progress_to_stderr
from pagefork.bench.diffs import delta_costs, diff_costs, format_delta_table, format_diff_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    size = parse_size(args.size)
    diffs = diff_costs(size, args.repeat, progress=progress_to_stderr)
    deltas = delta_costs(min(size, 16 << 20), max(1, args.repeat // 2), progress=progress_to_stderr)
    print(format_diff_table(diffs))
    print()
    print(format_delta_table(deltas))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"diff": [r.as_dict() for r in diffs], "delta": [r.as_dict() for r in deltas]},
                      f, indent=2)


if __name__ == "__main__":
    main()
