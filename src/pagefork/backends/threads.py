"""The threads backend: Python threads in this process, each on its own
private copy-on-write mapping of the snapshot."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..executor import BatchSpec, ThreadOutcome, Workspace

__all__ = ["ThreadsBackend"]


def group_by_slot(placement: Sequence[int]) -> dict[int, list[int]]:
    """slot -> the thread indexes placed on it, in order."""
    work: dict[int, list[int]] = {}
    for i, slot in enumerate(placement):
        work.setdefault(slot, []).append(i)
    return work


class ThreadsBackend:
    """``workers`` threads (default: one per CPU) run a batch's threads; each
    runs its share one after the other on its own mapping."""

    name = "threads"

    def __init__(self, workers: int | None = None) -> None:
        self.slots = workers if workers is not None else (os.cpu_count() or 1)
        if self.slots < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._spaces = [Workspace() for _ in range(self.slots)]
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="pagefork")

    def run(self, spec: BatchSpec, placement: Sequence[int]) -> list[ThreadOutcome]:
        futures = [self._pool.submit(self._spaces[slot].run, spec, indexes)
                   for slot, indexes in group_by_slot(placement).items()]
        return [o for f in futures for o in f.result()]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for space in self._spaces:
            space.close()
