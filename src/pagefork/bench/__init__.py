"""Benchmarks: pagefork beside the raw kernel mechanisms (tracking), memcmp
(diffs), and other ways to do the same work (executor). Every comparison is
measured in one run and reported as a ratio; nothing here is asserted on
wall-clock time. ``pagefork bench`` and ``benchmarks/`` drive these."""

from __future__ import annotations

import sys
import time
from typing import TypeVar
from collections.abc import Callable, Iterable

T = TypeVar("T")

__all__ = ["parse_sizes", "progress_to_stderr", "best_of"]


def parse_sizes(text: Iterable[str]) -> list[int]:
    """Byte sizes from strings like "4MiB", rounded up to pages."""
    from .._sizes import parse_size, round_to_pages

    return [round_to_pages(parse_size(s, "size")) for s in text]


def progress_to_stderr(message: str) -> None:
    print(f"  measuring {message} ...", file=sys.stderr, flush=True)


def best_of(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """(fastest time in ns, last result) of ``repeat`` (at least one) calls."""
    t0 = time.perf_counter_ns()
    result = fn()
    best = float(time.perf_counter_ns() - t0)
    for _ in range(repeat - 1):
        t0 = time.perf_counter_ns()
        result = fn()
        best = min(best, time.perf_counter_ns() - t0)
    return best, result
