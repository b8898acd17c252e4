"""The ``pagefork`` command: ``doctor``, ``bench``, ``demo`` and ``checkpoint``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any
from collections.abc import Callable, Sequence

from ._version import __version__

__all__ = ["main", "doctor_report"]


def _uffd_features() -> dict[str, Any]:
    from . import _native

    err, features, user_mode_only = _native.uffd_probe()
    names = {
        "THREAD_ID": _native.UFFD_FEATURE_THREAD_ID,
        "WP_HUGETLBFS_SHMEM": _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "WP_UNPOPULATED": _native.UFFD_FEATURE_WP_UNPOPULATED,
        "WP_ASYNC": _native.UFFD_FEATURE_WP_ASYNC,
    }
    return {"error": os.strerror(err) if err else None, "user_mode_only": bool(user_mode_only),
            "features": [name for name, bit in names.items() if features & bit]}


def doctor_report() -> dict[str, Any]:
    """What ``pagefork doctor`` shows, as data (the ``--json`` schema)."""
    from . import _native
    from ._sizes import PAGE_SIZE
    from ._system import read_setting
    from ._version import __version__
    from .tracking import auto_mode, probe, setting_warnings, write_costs

    support = probe()
    costs = write_costs()
    return {
        "pagefork": __version__,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "page_size": PAGE_SIZE,
        "modes": {
            m: {"available": s.available, "reason": s.reason, "thread_local": s.thread_local,
                "kernel_writes": s.kernel_writes, "kernel_writes_reason": s.kernel_writes_reason,
                "write_ns_per_page": round(costs[m], 1) if m in costs else None}
            for m, s in support.items()
        },
        "auto": auto_mode(),
        "auto_thread_local": auto_mode(thread_local=True),
        "settings": {
            "vm.unprivileged_userfaultfd": read_setting("/proc/sys/vm/unprivileged_userfaultfd", unreadable=None),
            "transparent_hugepage": read_setting("/sys/kernel/mm/transparent_hugepage/enabled", unreadable=None),
            "shmem_hugepage": read_setting("/sys/kernel/mm/transparent_hugepage/shmem_enabled", unreadable=None),
            "pagemap_readable": os.access("/proc/self/pagemap", os.R_OK),
            "pagemap_scan": bool(_native.pagemap_scan_available()),
            "userfaultfd": _uffd_features(),
            "euid": os.geteuid(),
            "ksm_run": read_setting("/sys/kernel/mm/ksm/run", unreadable=None),
            "vm.max_map_count": read_setting("/proc/sys/vm/max_map_count", unreadable=None),
        },
        "warnings": setting_warnings(),
    }


def _console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def _doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [(mode, "yes" if m["available"] else "no", "yes" if m["thread_local"] else "no",
             ("yes" if m["kernel_writes"] else "no") if m["available"] else "-",
             f"{m['write_ns_per_page']:.0f}" if m["write_ns_per_page"] is not None else "-",
             m["reason"] or "") for mode, m in report["modes"].items()]
    # Kernel writes (read(2) into tracked memory) that fail in an available mode.
    efault = {mode: m["kernel_writes_reason"] for mode, m in report["modes"].items()
              if m["available"] and not m["kernel_writes"]}
    uffd = report["settings"]["userfaultfd"]
    settings = {
        "vm.unprivileged_userfaultfd": report["settings"]["vm.unprivileged_userfaultfd"],
        "transparent huge pages": report["settings"]["transparent_hugepage"],
        # Snapshots are memfds (shmem): with "never" every page is 4 KiB, and
        # filling a large snapshot (the first batch after App.restore, or
        # after writing all of a fresh App) costs ~4x what huge pages do.
        "shmem huge pages (snapshots)": report["settings"]["shmem_hugepage"],
        "/proc/self/pagemap readable": report["settings"]["pagemap_readable"],
        "PAGEMAP_SCAN ioctl": report["settings"]["pagemap_scan"],
        "userfaultfd": uffd["error"] or ("user-mode only, " if uffd["user_mode_only"] else "")
        + "features " + ", ".join(uffd["features"]),
        "effective uid": report["settings"]["euid"],
        "KSM (/sys/kernel/mm/ksm/run)": report["settings"]["ksm_run"],
        "vm.max_map_count": report["settings"]["vm.max_map_count"],
    }
    title = (f"pagefork {report['pagefork']} on Linux {report['kernel']} ({report['machine']}), "
             f"page size {report['page_size']}")
    console = _console()
    if console is not None:
        from rich.markup import escape
        from rich.table import Table

        console.print(escape(title))
        table = Table()
        for column in ("mode", "works", "thread scope", "kernel writes", "first write ns/page"):
            table.add_column(column, justify="right" if "ns" in column else "left")
        for mode, works, thread, kernel, cost, _ in rows:
            table.add_row(mode, works, thread, kernel, cost, style=None if works == "yes" else "dim")
        console.print(table)
        for mode, works, _, _, _, why in rows:
            if works != "yes":
                console.print(f"[bold]{mode}[/bold] is unavailable: {escape(why)}")
        for mode, why in efault.items():
            console.print(f"[bold]{mode}[/bold]: kernel writes into tracked memory fail: {escape(why)}")
        console.print(f"auto picks [bold]{report['auto']}[/bold] (with a thread scope: "
                      f"[bold]{report['auto_thread_local']}[/bold])")
        for key, value in settings.items():
            console.print(f"  {key:<28} {escape(str(value))}", soft_wrap=True)
        for warning in report["warnings"]:
            console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}")
        return 0
    print(title)
    print(f"  {'mode':<11} {'works':<6} {'thread':<7} {'kernel writes':<14} {'write ns':>9}  why not")
    for mode, works, thread, kernel, cost, why in rows:
        print(f"  {mode:<11} {works:<6} {thread:<7} {kernel:<14} {cost:>9}  {why}")
    for mode, why in efault.items():
        print(f"{mode}: kernel writes into tracked memory fail: {why}")
    print(f"auto picks {report['auto']!r} (with a thread scope: {report['auto_thread_local']!r})")
    for key, value in settings.items():
        print(f"  {key:<28} {value}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    return 0


class _Progress:
    """A progress bar over a known number of steps (rich if installed)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self._bar = total, 0, None
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._bar = Progress(TextColumn("{task.description:<44}"), BarColumn(),
                             TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                             console=Console(stderr=True))
        self._task = self._bar.add_task("starting", total=total)
        self._bar.start()

    def step(self, message: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=message)
        else:
            print(f"  [{self.done + 1}/{self.total}] {message} ...", file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.total, description="done")
            self._bar.stop()


def _bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .tracking import probe
    from .bench import parse_sizes
    from .bench.diffs import diff_costs, format_diff_table
    from .bench.checkpoint import checkpoint_costs, format_checkpoint_report
    from .bench.executor import batch_costs, format_batch_table
    from .bench.tracking import DEFAULT_SIZES, QUICK_SIZES, format_table, tracking_costs

    if args.reduce and args.dense:
        print("pagefork bench takes --reduce or --dense, not both", file=sys.stderr)
        return 2
    if args.reduce:
        return _bench_reduce(args)
    if args.dense:
        return _bench_dense(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pagefork bench --plot needs matplotlib: pip install 'pagefork[cli]'", file=sys.stderr)
            return 2
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    modes = [m for m in (args.modes or probe()) if probe()[m].available]
    batch_sizes = parse_sizes(args.batch_sizes or (("16MiB", "128MiB") if args.quick
                                                   else ("16MiB", "64MiB", "256MiB", "1GiB")))
    diff_size = min(max(sizes), (16 if args.quick else 64) << 20)
    checkpoint_sizes = sorted(parse_sizes(args.checkpoint_sizes or (
        ("256MiB", "16MiB") if args.quick else ("1GiB", "64MiB"))), reverse=True)
    if len(checkpoint_sizes) != 2 or checkpoint_sizes[1] < 4096 * 100:
        print("--checkpoint-sizes takes two sizes of at least 400KiB (large, small)", file=sys.stderr)
        return 2
    progress = _Progress(len(sizes) * len(modes) + 2 + len(batch_sizes) + 1)
    try:
        tracking = tracking_costs(modes, sizes, repeat=1 if args.quick else 3, progress=progress.step)
        diffs = diff_costs(diff_size, repeat=3 if args.quick else 7, progress=progress.step)
        batches = batch_costs(batch_sizes, batches=5 if args.quick else 20, progress=progress.step)
        progress.step("checkpoints beside np.save / np.load")
        checkpoints = checkpoint_costs(checkpoint_sizes[0], checkpoint_sizes[1],
                                       rounds=3 if args.quick else 5,
                                       size_rounds=9 if args.quick else 31)
    finally:
        progress.close()
    print("Dirty tracking: first write to a page, read + re-arm, start + stop "
          "(pagefork beside the same mechanism in C)")
    print(format_table(tracking))
    print("\nDiffs against the snapshot, all pages dirty, beside memcmp of the same pages")
    print(format_diff_table(diffs))
    print("\nExecutor batches (processes backend, 2 workers, 4 threads x 16 dirty pages)")
    print(format_batch_table(batches))
    print("\nIncremental checkpoints of an App (threads backend) beside np.save / np.load")
    print(format_checkpoint_report(checkpoints))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"kernel": platform.release(), "machine": platform.machine(),
                                   "cpus": os.cpu_count()},
                       "tracking": [r.as_dict() for r in tracking],
                       "diff": [r.as_dict() for r in diffs],
                       "batches": [r.as_dict() for r in batches],
                       "checkpoint": checkpoints.as_dict()}, f, indent=2)
    if args.plot:
        _plot(args.plot, tracking, batches)
        print(f"\nplot written to {args.plot}")
    return 0


def _bench_reduce(args: argparse.Namespace) -> int:
    from .bench import reduce

    return _bench_report(args, reduce.run_all, reduce.format_results)


def _bench_dense(args: argparse.Namespace) -> int:
    from .bench import dense_report

    return _bench_report(args, dense_report.run_all, dense_report.format_results)


def _bench_report(args: argparse.Namespace, run_all: Any, format_results: Any) -> int:
    """Runs one comparison benchmark, prints its report, writes --json."""
    from .bench import progress_to_stderr

    res = run_all(quick=args.quick, progress=progress_to_stderr)
    print(format_results(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.as_dict(), f, indent=2)
    return 0


def _plot(path: str, tracking: list, batches: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    largest = max(r.size for r in tracking)
    rows = [r for r in tracking if r.size == largest and r.mode != "none"]
    x = np.arange(len(rows))
    left.bar(x - 0.2, [r.write_ns for r in rows], 0.4, label="through pagefork", color="#2b6cb0")
    left.bar(x + 0.2, [r.raw_write_ns for r in rows], 0.4, label="same mechanism in C", color="#a0aec0")
    for i, r in enumerate(rows):
        left.annotate(f"{r.write_ratio:.2f}x", (i, max(r.write_ns, r.raw_write_ns)), ha="center",
                      va="bottom", fontsize=9)
    left.set_xticks(x, [r.mode for r in rows])
    left.set_yscale("log")
    left.set_ylabel("ns per first write to a page (log); label: pagefork / C")
    left.set_title(f"Cost of tracking a write, {largest >> 20} MiB region")
    left.legend()
    sizes = [r.size >> 20 for r in batches]
    right.plot(sizes, [r.batch_ms for r in batches], "o-", color="#2b6cb0", label="whole batch")
    for phase in batches[0].phases_ms:
        right.plot(sizes, [r.phases_ms[phase] for r in batches], ".--", label=phase, alpha=0.7)
    right.set_xscale("log", base=2)
    right.set_xticks(sizes, [str(s) for s in sizes])
    right.set_xlabel("memory size (MiB)")
    right.set_ylabel("ms per batch")
    right.set_ylim(bottom=0)
    right.set_title("Batch cost against memory size (same dirty pages)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        return 0 if run_demo(backend=args.backend, workers=args.workers, threads=args.threads) else 1
    except ImportError as exc:  # --backend dask without distributed installed
        print(f"pagefork demo: {exc}", file=sys.stderr)
        return 1


def _size_argument(text: str) -> int:
    """A byte size like 4MiB (argparse type: a bad one is a usage error)."""
    from ._sizes import parse_size

    try:
        size = parse_size(text, "size")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > memory:  # could never be mapped and filled: say so now, not in a traceback
        raise argparse.ArgumentTypeError(f"size {text!r} is larger than this machine's memory "
                                         f"({memory} bytes)")
    return size


def _output_file(text: str) -> str:
    """A file to write at the end of a long run: its folder must exist now."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no such folder, or a folder")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _checkpoint_ls(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from .checkpoint import versions

    try:
        found = versions(args.target)
    except Exception as exc:  # a damaged manifest, an unreachable store: say which, exit 1
        print(f"pagefork checkpoint ls: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in found], indent=1))
    if not found:
        return _no_checkpoint("ls", args.target)
    if args.json:
        return 0
    header = ("version", "parent", "written (UTC)", "kind", "memory", "pages", "bytes",
              "chain", "restore")
    rows = [(str(v.version), "-" if v.parent is None else str(v.parent),
             time.strftime("%m-%d %H:%M:%S", time.gmtime(v.created)),
             "base" if v.base else "incr", _human(v.size), str(v.pages), _human(v.bytes_written),
             str(v.chain_length), _human(v.restore_bytes)) if v.damaged is None else
            (str(v.version), "-", "-", "damaged", "-", "-", "-", "-", "-") for v in found]
    damaged = [v for v in found if v.damaged is not None]
    kind = next((v.kind for v in reversed(found) if v.damaged is None), "unknown")  # the newest's
    console = _console()
    if console is not None:
        from rich.table import Table

        table = Table(title=f"checkpoints in {args.target} ({kind})")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i in (2, 3) else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for v in damaged:  # listed, and the rest still shown: the newest may restore
        print(f"version {v.version} is damaged: {v.damaged}")
    return 0


def _no_checkpoint(command: str, target: str) -> int:
    """``ls`` and ``verify`` of a target with no checkpoint (an empty folder,
    or one, a bucket or a prefix that does not exist) both say so on stderr,
    naming a target that does not exist, and exit 1: a mistyped target
    never passes for an empty one."""
    from ._checkpoint_store import open_store

    try:
        exists = open_store(target).exists()
    except Exception:  # unreachable: listing it just said "nothing there"
        exists = True
    why = "" if exists else " (it does not exist)"
    print(f"pagefork checkpoint {command}: no checkpoint in {target}{why}", file=sys.stderr)
    return 1


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class _ByteProgress:
    """``progress(done, total)`` as one line on stderr, rewritten in place
    at most every 0.2 s, and ended when done reaches total."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        share = f" ({100 * done // total}%)" if total else ""
        end = "\n" if done >= total else ""
        print(f"\r{self.what}: {_human(done)} of {_human(total)}{share}", end=end, file=sys.stderr, flush=True)


def _checkpoint_verify(args: argparse.Namespace) -> int:
    from .checkpoint import verify

    checked = 0
    show = args.progress or sys.stderr.isatty()
    try:
        for version, name, problem in verify(args.target, progress=_ByteProgress("verified") if show else None):
            if problem is not None:
                print(f"{chr(10) if show else ''}version {version}: {name} is bad: {problem}", file=sys.stderr)
                return 1
            checked += 1
    except Exception as exc:  # an unreachable store
        print(f"pagefork checkpoint verify: {exc}", file=sys.stderr)
        return 1
    if checked == 0:
        return _no_checkpoint("verify", args.target)
    print(f"{checked} objects in {args.target} are intact")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; bad arguments print a usage line and exit 2."""
    from .tracking import MODES

    parser = argparse.ArgumentParser(prog="pagefork", description="pagefork: fork-join over "
                                     "copy-on-write memory snapshots with kernel dirty tracking")
    parser.add_argument("--version", action="version", version=f"pagefork {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="which tracking modes work here, and why not")
    doctor.add_argument("--json", action="store_true", help="print a JSON report")
    doctor.set_defaults(run=_doctor)
    bench = sub.add_parser("bench", help="measure modes, diffs and batches side by side")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats (under 2 minutes)")
    bench.add_argument("--json", metavar="FILE", type=_output_file,
                       help="also write the results as JSON")
    bench.add_argument("--plot", metavar="PNG", type=_output_file,
                       help="also draw the results into a PNG file")
    bench.add_argument("--modes", nargs="+", choices=MODES, help="tracking modes to measure")
    bench.add_argument("--sizes", nargs="+", type=_size_argument,
                       help="region sizes for tracking, e.g. 4MiB 1GiB")
    bench.add_argument("--batch-sizes", nargs="+", type=_size_argument,
                       help="memory sizes for executor batches")
    bench.add_argument("--checkpoint-sizes", nargs=2, metavar=("LARGE", "SMALL"), type=_size_argument,
                       help="App sizes for the checkpoint benchmark (default 1GiB 64MiB)")
    bench.add_argument("--reduce", action="store_true",
                       help="reductions beside serial numpy, shared memory + lock and joblib instead "
                            "(as benchmarks/bench_reduce.py)")
    bench.add_argument("--dense", action="store_true",
                       help="whole-array work (stencil, empty batch, scattered and dense adds, deposit) "
                            "beside serial numpy and its alternatives instead (as benchmarks/bench_dense.py)")
    bench.set_defaults(run=_bench)
    demo = sub.add_parser("demo", help="an example application end to end")
    demo.add_argument("--backend", default="processes", choices=("threads", "processes", "dask"),
                      help="dask: on a local cluster (worker processes on loopback)")
    demo.add_argument("--workers", type=_positive_int, default=None,
                      help="worker threads or processes (dask: the local cluster's workers, default 2)")
    demo.add_argument("--threads", type=_positive_int, default=8)
    demo.set_defaults(run=_demo)
    checkpoint = sub.add_parser("checkpoint", help="list or verify the checkpoints in a folder or URL")
    checkpoint_sub = checkpoint.add_subparsers(dest="action", required=True)
    ls = checkpoint_sub.add_parser("ls", help="versions, times, sizes and chain lengths; exit 1 if "
                                   "there is no checkpoint")
    ls.add_argument("target", help="a folder or an fsspec URL (memory://, s3://...)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=_checkpoint_ls)
    check = checkpoint_sub.add_parser("verify", help="check every object; exit 1 naming the first bad one, "
                                      "or if there is no checkpoint")
    check.add_argument("target", help="a folder or an fsspec URL")
    check.add_argument("--progress", action="store_true",
                       help="show the bytes checked on stderr (the default where stderr is a terminal)")
    check.set_defaults(run=_checkpoint_verify)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = int(run(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`pagefork doctor | head -1`): stop quietly, as
        # Python's documentation advises, with stdout on /dev/null so the
        # interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
