"""The threads backend: Python threads in this process, each on its own
private copy-on-write mapping of the snapshot.

A slot's memory is kept mapped across its threads and batches
(:class:`~pagefork.backends.combine.CombiningWorkspace`, as in a worker
process): the pages its threads made private are put back to the
snapshot's bytes by a copy instead of being dropped, so a thread rewriting
them takes no copy-on-write fault. In a process whose threads run on
several CPUs each such fault also interrupts the other CPUs to flush their
TLBs (~15 us a page here, against ~3 us in a worker process); a copy into a
page already mapped takes none. A slot running several threads of a batch
also combines their order-free reductions into one diff, like a worker.

Each slot has a Python thread and a workspace (thread memory and tracker),
both reused by later batches only once the slot's thread function has
returned: when a batch is cancelled (its caller was interrupted), slots
whose thread function still runs are replaced by new slots (a new thread,
new memory), and the old thread closes its workspace and ends when the
function finally returns.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Sequence

from .._cpus import available_cpus
from .._limits import cannot_start, is_out_of_tasks
from ..batch import POLL, BatchResult, BatchSpec, Cancel, Cancelled, ThreadOutcome
from ..diffs import DiffBatch
from .combine import CombiningWorkspace

__all__ = ["ThreadsBackend", "group_by_slot"]


def group_by_slot(placement: Sequence[int]) -> dict[int, list[int]]:
    """slot -> the thread indexes placed on it, in order."""
    work: dict[int, list[int]] = {}
    for i, slot in enumerate(placement):
        work.setdefault(slot, []).append(i)
    return work


class _Slot:
    """A workspace, the thread that runs jobs on it, and whether a job runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.space = CombiningWorkspace()
        self.busy = False
        self.retired = False  # replaced while busy: its thread closes the workspace and ends
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:  # started on first use
            thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            thread.start()  # may fail (RLIMIT_NPROC): the next submit tries again
            self._thread = thread
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()
            if self.retired:
                return


class ThreadsBackend:
    """``workers`` threads (default: one per CPU this process may use, by
    its affinity and cgroup quota) run a batch's threads; each runs its
    share one after the other on its own mapping."""

    name = "threads"
    ships_changes = False

    def __init__(self, workers: int | None = None) -> None:
        self.slots = workers if workers is not None else available_cpus()
        if self.slots < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._slots = [_Slot(f"pagefork-{i}") for i in range(self.slots)]
        self._lock = threading.Condition()
        self._running: set[_Slot] = set()  # slots running jobs, of this and cancelled batches

    def _work(self, slot: _Slot, spec: BatchSpec, indexes: list[int], cancel: Cancel,
              out: dict[int, tuple[list[ThreadOutcome], DiffBatch | None]], key: int) -> None:
        combined = None
        try:
            outcomes: list[ThreadOutcome] = []
            combined = slot.space.run_combining(spec, indexes, outcomes.append, copy_result=True,
                                                cancel=cancel)
        except BaseException as exc:  # never: run_combining reports per thread
            outcomes = [ThreadOutcome(i, error=f"the worker thread failed: {exc!r}") for i in indexes]
        with self._lock:
            out[key] = (outcomes, combined)
            slot.busy = False
            if slot.retired:
                slot.space.close()
            self._running.discard(slot)
            self._lock.notify_all()

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> BatchResult:
        out: dict[int, tuple[list[ThreadOutcome], DiffBatch | None]] = {}
        groups = group_by_slot(placement)
        started: list[tuple[int, _Slot]] = []
        try:
            for slot_index, indexes in groups.items():
                slot = self._slots[slot_index]
                assert not slot.busy, "a slot is reused while its thread runs"
                with self._lock:
                    slot.busy = True
                    self._running.add(slot)
                try:
                    slot.submit(functools.partial(self._work, slot, spec, indexes, cancel, out, slot_index))
                except RuntimeError as exc:  # its thread could not start: the slot stays free
                    with self._lock:
                        slot.busy = False
                        self._running.discard(slot)
                    if is_out_of_tasks(exc):
                        raise cannot_start("a thread of the threads backend", exc) from exc
                    raise
                started.append((slot_index, slot))
            with self._lock:
                while len(out) < len(started):
                    if cancel.is_set():
                        raise Cancelled()
                    self._lock.wait(POLL)
        except BaseException:
            self._abandon(started)
            raise
        done = [out[slot_index] for slot_index in groups if slot_index in out]
        return BatchResult([o for outcomes, _ in done for o in outcomes],
                           [combined for _, combined in done if combined is not None])

    def _abandon(self, started: list[tuple[int, _Slot]]) -> None:
        """Replaces every slot still in use by a new one; the old slot's
        thread closes its workspace and ends when its function returns."""
        with self._lock:
            for slot_index, slot in started:
                if slot.busy:
                    slot.retired = True
                    self._slots[slot_index] = _Slot(slot.name)

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
            for slot in self._slots:
                if slot.busy:
                    slot.retired = True
                else:
                    slot.space.close()
                slot.stop()
        return abandoned
