"""Per-page write cost, read/re-arm cost and start/stop cost of every tracking
mode, through pagefork and through the bare kernel mechanism in C, in one run.

    .venv/bin/python benchmarks/bench_tracking.py [--sizes 4MiB 1GiB] [--modes segfault cow]
"""

from __future__ import annotations

import argparse
import json
import os

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork import MODES
from pagefork.bench import parse_sizes, progress_to_stderr
from pagefork.bench.tracking import DEFAULT_SIZES, format_table, tracking_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = tracking_costs(args.modes, parse_sizes(args.sizes), args.repeat, progress=progress_to_stderr)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
