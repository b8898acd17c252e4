"""The threads backend: Python threads in this process, each on its own
private copy-on-write mapping of the snapshot.

Each batch runs on fresh Python threads, one per slot used. A slot's
workspace (thread memory and tracker) is reused by later batches only once
the thread that used it has returned: when a batch is cancelled (its caller
was interrupted), slots whose thread is still running get new workspaces,
and the old ones are closed by their thread when it finally returns.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Sequence

from ..executor import POLL, BatchSpec, Cancel, Cancelled, ThreadOutcome, Workspace

__all__ = ["ThreadsBackend", "group_by_slot"]


def group_by_slot(placement: Sequence[int]) -> dict[int, list[int]]:
    """slot -> the thread indexes placed on it, in order."""
    work: dict[int, list[int]] = {}
    for i, slot in enumerate(placement):
        work.setdefault(slot, []).append(i)
    return work


class _Slot:
    """A workspace and whether a thread is using it."""

    def __init__(self) -> None:
        self.space = Workspace()
        self.busy = False
        self.retired = False  # replaced while busy: its thread closes it


class ThreadsBackend:
    """``workers`` threads (default: one per CPU) run a batch's threads; each
    runs its share one after the other on its own mapping."""

    name = "threads"

    def __init__(self, workers: int | None = None) -> None:
        self.slots = workers if workers is not None else (os.cpu_count() or 1)
        if self.slots < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._slots = [_Slot() for _ in range(self.slots)]
        self._lock = threading.Condition()
        self._running: set[threading.Thread] = set()  # threads of this and cancelled batches

    def _work(self, slot: _Slot, spec: BatchSpec, indexes: list[int], cancel: Cancel,
              out: dict[int, list[ThreadOutcome]], key: int) -> None:
        try:
            outcomes = slot.space.run(spec, indexes, copy_result=True, cancel=cancel)
        except BaseException as exc:  # never: run reports per thread
            outcomes = [ThreadOutcome(i, error=f"the worker thread failed: {exc!r}") for i in indexes]
        with self._lock:
            out[key] = outcomes
            slot.busy = False
            if slot.retired:
                slot.space.close()
            self._running.discard(threading.current_thread())
            self._lock.notify_all()

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> list[ThreadOutcome]:
        out: dict[int, list[ThreadOutcome]] = {}
        groups = group_by_slot(placement)
        started: list[tuple[int, _Slot]] = []
        try:
            for slot_index, indexes in groups.items():
                slot = self._slots[slot_index]
                assert not slot.busy, "a slot is reused while its thread runs"
                thread = threading.Thread(target=self._work, args=(slot, spec, indexes, cancel, out, slot_index),
                                          name=f"pagefork-{slot_index}", daemon=True)
                with self._lock:
                    slot.busy = True
                    self._running.add(thread)
                started.append((slot_index, slot))
                thread.start()
            with self._lock:
                while len(out) < len(started):
                    if cancel.is_set():
                        raise Cancelled()
                    self._lock.wait(POLL)
        except BaseException:
            self._abandon(started)
            raise
        return [o for slot_index in groups for o in out.get(slot_index, [])]

    def _abandon(self, started: list[tuple[int, _Slot]]) -> None:
        """Gives every slot still in use a new workspace; the old one is
        closed by its thread when it returns."""
        with self._lock:
            for slot_index, slot in started:
                if slot.busy:
                    slot.retired = True
                    self._slots[slot_index] = _Slot()

    def running(self) -> int:
        """Thread functions still running (of cancelled batches, too)."""
        with self._lock:
            return len(self._running)

    def close(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running and time.monotonic() < deadline:
                self._lock.wait(min(POLL, max(0.0, deadline - time.monotonic())))
            abandoned = len(self._running)
            for i, slot in enumerate(self._slots):
                if slot.busy:
                    slot.retired = True
                else:
                    slot.space.close()
        return abandoned
