"""Reductions beside what users write by hand: a dense int64 sum (pagefork,
serial numpy, shared memory + lock, joblib with one partial per worker,
optionally plain Dask), a compute-heavy 1% scattered sum beside serial
numpy, bytes shipped per changed value, and Snapshot.tracked_changes()
after rewriting 256 MiB. Systems are interleaved per repeat; read ratios.

    .venv/bin/python benchmarks/bench_reduce.py [--quick] [--dask] [--dense-elements 64M]
                                                [--only scattered] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os

# Idle OpenBLAS threads spin on the second core and blur the timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pagefork.bench import progress_to_stderr
from pagefork.bench.reduce import SECTIONS, format_results, run_all


def _elements(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    parser.add_argument("--dask", action="store_true", help="also time a plain Dask tree sum")
    parser.add_argument("--dense-elements", type=_elements, default=None,
                        help="int64 elements of the dense case (default 16M)")
    parser.add_argument("--only", choices=SECTIONS, help="run one measurement only")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    res = run_all(quick=args.quick, dense_elements=args.dense_elements, dask=args.dask,
                  progress=progress_to_stderr, only=args.only)
    print(format_results(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.as_dict(), f, indent=2)


if __name__ == "__main__":
    main()
