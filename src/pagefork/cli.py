"""The ``pagefork`` command: doctor, bench and demo."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Sequence

__all__ = ["main"]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def doctor_report() -> dict:
    """What `pagefork doctor` shows, as data."""
    from . import PAGE_SIZE, probe
    from .tracking import auto_mode, write_costs

    support = probe()
    costs = write_costs()
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "page_size": PAGE_SIZE,
        "modes": {
            m: {"available": s.available, "reason": s.reason, "thread_local": s.thread_local,
                "write_ns_per_page": round(costs[m], 1) if m in costs else None}
            for m, s in support.items()
        },
        "auto": auto_mode(),
        "auto_thread_local": auto_mode(thread_local=True),
        "settings": {
            "vm.unprivileged_userfaultfd": _read("/proc/sys/vm/unprivileged_userfaultfd"),
            "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "pagemap_readable": os.access("/proc/self/pagemap", os.R_OK),
            "euid": os.geteuid(),
        },
    }


def _doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"pagefork doctor — Linux {report['kernel']} ({report['machine']}), "
          f"page size {report['page_size']}")
    print()
    print(f"  {'mode':<11} {'works':<6} {'thread':<7} {'write ns/page':>13}  reason")
    for mode, m in report["modes"].items():
        cost = f"{m['write_ns_per_page']:.0f}" if m["write_ns_per_page"] is not None else "-"
        print(f"  {mode:<11} {'yes' if m['available'] else 'no':<6} "
              f"{'yes' if m['thread_local'] else 'no':<7} {cost:>13}  {m['reason']}")
    print()
    print(f"  auto picks {report['auto']!r} (with a thread scope: {report['auto_thread_local']!r})")
    for key, value in report["settings"].items():
        print(f"  {key:<28} {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import parse_sizes, progress_to_stderr
    from .bench.tracking import DEFAULT_SIZES, QUICK_SIZES, format_table, tracking_costs

    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    rows = tracking_costs(args.modes, sizes, repeat=1 if args.quick else 3, progress=progress_to_stderr)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tracking": [r.as_dict() for r in rows]}, f, indent=2)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return 0 if run_demo(backend=args.backend, workers=args.workers, threads=args.threads) else 1


def main(argv: Sequence[str] | None = None) -> int:
    from . import MODES

    parser = argparse.ArgumentParser(prog="pagefork", description="pagefork command line")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="which tracking modes work here, and why not")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.set_defaults(run=_doctor)
    bench = sub.add_parser("bench", help="measure modes beside the raw kernel mechanisms")
    bench.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    bench.add_argument("--json", metavar="FILE", help="also write results as JSON")
    bench.add_argument("--modes", nargs="+", choices=MODES)
    bench.add_argument("--sizes", nargs="+", help="memory sizes, e.g. 4MiB 1GiB")
    bench.set_defaults(run=_bench)
    demo = sub.add_parser("demo", help="an example application end to end")
    demo.add_argument("--backend", default="processes", choices=("threads", "processes"))
    demo.add_argument("--workers", type=int, default=None)
    demo.add_argument("--threads", type=int, default=8)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
