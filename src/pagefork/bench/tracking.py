"""Tracking benchmarks: pagefork beside the raw kernel mechanisms.

Every measurement pairs pagefork with the same mechanism written plainly in
C (``pagefork._baseline``), on memory of the same kind, in the same process
run, and reports ratios. The write loop is the same C loop for both sides
(one byte into each page), timed in C.
"""

from __future__ import annotations

import mmap
import statistics
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable, Iterable

import numpy as np

from .. import _baseline
from ..memory import PAGE_SIZE, Region
from ..tracking import MODES, probe, tracker

__all__ = ["TrackingCost", "tracking_costs", "format_table", "DEFAULT_SIZES", "QUICK_SIZES"]

DEFAULT_SIZES = ("4MiB", "64MiB", "256MiB", "1GiB")
QUICK_SIZES = ("4MiB", "64MiB")


@dataclass(frozen=True)
class TrackingCost:
    """One mode at one memory size; times are medians in nanoseconds."""

    mode: str
    size: int
    pages: int
    write_ns: float          # per page written, through pagefork
    raw_write_ns: float      # per page written, the bare mechanism in C
    plain_write_ns: float    # per page written with no tracking at all
    read_ns: float           # per page: read flags and re-arm, through pagefork
    raw_read_ns: float       # per page: the same with the bare mechanism
    start_stop_us: float     # start + stop through pagefork, whole region
    raw_arm_disarm_us: float

    @property
    def write_ratio(self) -> float:
        return self.write_ns / self.raw_write_ns if self.raw_write_ns else float("nan")

    @property
    def read_ratio(self) -> float:
        return self.read_ns / self.raw_read_ns if self.raw_read_ns else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"write_ratio": self.write_ratio, "read_ratio": self.read_ratio}


def _fill_file(region: Region) -> None:
    """Gives a memfd region's file one non-zero byte per page (a snapshot has
    content; copying a hole would not copy anything)."""
    with mmap.mmap(region.file_fd, region.size, mmap.MAP_SHARED) as file_map:
        np.frombuffer(file_map, np.uint8)[::PAGE_SIZE] = 0x5A


def _region(mode: str, size: int) -> Region:
    if mode == "cow":
        region = Region(size, backing="memfd")
        _fill_file(region)
    else:
        region = Region(size)
        _baseline.touch(region.address, region.n_pages, 0)  # allocate every page up front
    return region


def _pagefork_once(mode: str, region: Region) -> tuple[int, int, int]:
    """(write ns, read+re-arm ns, start+stop ns) for one round through pagefork."""

    n = region.n_pages
    t = tracker(mode)
    t0 = time.perf_counter_ns()
    if mode == "cow":
        region.map_snapshot(region.file_fd)  # what Snapshot.map_to does
    t.start(region)
    start_ns = time.perf_counter_ns() - t0
    write = _baseline.touch(region.address, n, 7)
    t0 = time.perf_counter_ns()
    flags = t.dirty_pages(region, "global")
    if mode in ("segfault", "uffd", "softpte"):
        t.reset()  # flags live in memory for these; re-protecting is the cost
    read = time.perf_counter_ns() - t0
    t0 = time.perf_counter_ns()
    t.stop(region)
    stop_ns = time.perf_counter_ns() - t0
    t.close()
    if not flags.all():
        raise RuntimeError(f"{mode}: {int((~flags).sum())} written pages were not reported")
    return write, read, start_ns + stop_ns


def _raw_once(mode: str, region: Region) -> tuple[int, int, int]:
    """(write ns, read+re-arm ns, arm+disarm ns) for the bare mechanism."""

    addr, n = region.address, region.n_pages
    if mode in ("segfault", "uffd"):
        arm, write, rearm, disarm = getattr(_baseline, mode)(addr, n)
        return write, rearm, arm + disarm
    if mode == "uffd-async":
        arm, write, rearm, _ = _baseline.uffd_async(addr, n)
        return write, rearm, arm
    if mode == "cow":
        mapping, write, read, _ = _baseline.cow(addr, n, region.file_fd)
        return write, read, mapping
    if mode == "softpte":
        arm, write, read, _ = _baseline.softpte(addr, n)
        return write, read + arm, arm
    write = _baseline.touch(addr, n, 8)  # "none": no mechanism at all
    return write, 0, 0


def tracking_costs(
    modes: Iterable[str] | None = None,
    sizes: Iterable[int] = (),
    repeat: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[TrackingCost]:
    """Measures every available mode (or ``modes``) at each size."""
    support = probe()
    chosen = [m for m in (modes or MODES) if support[m].available]
    rows = []
    for size in sizes:
        for mode in chosen:
            if progress:
                progress(f"{mode} at {size >> 20} MiB")
            ours, theirs = _region(mode, size), _region(mode, size)
            try:
                _baseline.touch(ours.address, ours.n_pages, 9)  # cow: copy first, then time
                plain = statistics.median(_baseline.touch(ours.address, ours.n_pages, 9)
                                          for _ in range(repeat))
                pf, raw = [], []
                for _ in range(repeat):  # interleaved, so drift hits both sides
                    pf.append(_pagefork_once(mode, ours))
                    raw.append(_raw_once(mode, theirs))
            finally:
                ours.close()
                theirs.close()
            n = size // PAGE_SIZE
            med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
            rows.append(TrackingCost(
                mode=mode, size=size, pages=n,
                write_ns=med(pf, 0) / n, raw_write_ns=med(raw, 0) / n,
                plain_write_ns=plain / n,
                read_ns=med(pf, 1) / n, raw_read_ns=med(raw, 1) / n,
                start_stop_us=med(pf, 2) / 1e3, raw_arm_disarm_us=med(raw, 2) / 1e3,
            ))
    return rows


def format_table(rows: list[TrackingCost]) -> str:
    head = (f"{'mode':<11}{'size':>8}{'write ns/pg':>13}{'raw C':>9}{'ratio':>7}"
            f"{'plain':>7}{'read ns/pg':>12}{'raw C':>9}{'ratio':>7}{'start+stop us':>15}"
            f"{'raw C':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.mode:<11}{r.size >> 20:>6}Mi{r.write_ns:>13.0f}{r.raw_write_ns:>9.0f}"
            f"{r.write_ratio:>7.2f}{r.plain_write_ns:>7.1f}{r.read_ns:>12.1f}"
            f"{r.raw_read_ns:>9.1f}{r.read_ratio:>7.2f}{r.start_stop_us:>15.0f}"
            f"{r.raw_arm_disarm_us:>10.0f}"
        )
    return "\n".join(lines)
