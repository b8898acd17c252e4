"""The Dask backend: the threads a batch places on one Dask worker are one
task there, run one after the other in a combining workspace (reductions
combined on the worker first, see combine.py). The worker side (snapshot
caches, leases, the task itself) is in _dask_worker.py.

A worker that does not hold the batch's snapshot version is sent the whole
snapshot (first batch, or a worker that lost its cache) or a
zstd-compressed delta: the ranges the snapshot changed since the version it
holds, compact-encoded (pagefork.compact). Payloads travel as futures, not
task arguments, from the client straight to the first worker that needs
them and from worker to worker after that; replies come straight back
(the scheduler relays no data, unless the client cannot reach the workers).
Results come back as compressed compact-encoded DiffBatches and merge on
the client like every other backend's. A lost worker's task runs again
elsewhere, whole.

Every wait is bounded and cancellable: calls to the scheduler and workers
run on the client's event loop while the batch thread watches its Cancel
and a deadline; a cluster without workers, or a client that lost its
scheduler, fails the batch with a PageforkError.

Install with ``pip install pagefork[dask]``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import cloudpickle
import zstandard

from .. import compact
from .._errors import PageforkError
from .._log import log
from .._thread_errors import code_files
from ..batch import POLL, BatchResult, BatchSpec, Cancel, ThreadOutcome
from ..diffs import DiffBatch
from ._messages import DaskProgram, GroupDone, GroupFailed, thread_outcome
from ._dask_worker import (SnapshotMissing, _CacheEntry, compress_batch, decompress_batch, hold_lease,
                           room_problem, run_group, worker_room)
from ._dask_worker import drop_cache as _drop_cache
from .threads import group_by_slot

__all__ = ["DaskBackend", "WAIT_FOR_WORKERS", "CALL_TIMEOUT", "SnapshotMissing", "compress_batch",
           "decompress_batch"]

_MAX_ATTEMPTS = 3  # per task: a lost worker's threads re-run elsewhere

#: Seconds a batch waits for a cluster without workers to get one, or for a
#: client that lost its scheduler to reconnect, before failing.
WAIT_FOR_WORKERS = 20.0

#: Seconds one exchange with the scheduler or a worker may take (plus the
#: time its data takes at :data:`_SLOWEST_LINK` bytes per second).
CALL_TIMEOUT = 30.0
_SLOWEST_LINK = 20e6

#: Whole snapshots at least this large are sent only after the workers
#: receiving them said they have room (one round trip); smaller ones are
#: checked by the task on the worker.
_CHECK_ROOM_FROM = 16 << 20

_T = TypeVar("_T")

# Kept importable from here (tests and client.run callers name them so).
_ = (_CacheEntry, _drop_cache)


def _absolute(path: str) -> str:
    try:
        return os.path.abspath(path)
    except OSError:  # the working directory was deleted
        return path


class _Idle:
    """Watches, while a batch waits, for a cluster with no running worker
    (none, or all paused by Dask for lack of memory): Dask would keep the
    batch's tasks waiting for one for good. Asks the scheduler about once a
    second, without blocking the caller."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.query: concurrent.futures.Future | None = None
        self.asked = time.monotonic()
        self.since: float | None = None  # when a query first found no running worker

    def check(self) -> None:
        """Raises PageforkError once the cluster has had no running worker
        for WAIT_FOR_WORKERS seconds."""
        now = time.monotonic()
        query = self.query
        if query is not None and query.done():
            self.query = None
            running = None if query.cancelled() or query.exception() else query.result()
            if running:
                self.since = None
            elif running is not None and self.since is None:
                self.since = now
            if self.since is not None and now - self.since > WAIT_FOR_WORKERS:
                raise PageforkError(f"the Dask cluster has had no running workers for {WAIT_FOR_WORKERS:g} "
                                    "s while the batch waited (none, or all paused for lack of memory); "
                                    "nothing merged")
        if self.query is None and now - self.asked > 1.0 and self.client.status == "running":
            self.query = asyncio.run_coroutine_threadsafe(self.client.scheduler.ncores_running(),
                                                          self.client.loop.asyncio_loop)
            self.asked = now

    def close(self) -> None:
        if self.query is not None:
            self.query.cancel()


@dataclass
class _Run:
    """One batch on the cluster, while it runs."""

    spec: BatchSpec
    cancel: Cancel
    lease: str  # the key of the App's lease
    program: bytes  # the function, arguments and layout (see DaskBackend._program)
    shipped: int = 0  # bytes crossing the network
    sent: dict[Any, tuple[Any, int, set[str]]] = field(default_factory=dict)  # key -> (future, bytes, reached)
    made: dict[Any, bytes] = field(default_factory=dict)  # payloads made before sent (to check room first)
    tasks: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # task key -> (threads, worker)
    submitted: list[Any] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)  # first thread of a task -> times sent
    outcomes: dict[int, ThreadOutcome] = field(default_factory=dict)
    combined: dict[int, DiffBatch] = field(default_factory=dict)  # first thread of a task -> its combined diffs

    def fail(self, indexes: list[int], why: str) -> None:
        for i in indexes:
            self.outcomes[i] = ThreadOutcome(i, error=why)


class DaskBackend:
    """Runs threads as Dask tasks; ``client`` is a ``distributed.Client`` or a
    scheduler address; ``workers`` limits how many workers are used (at
    most that many slots; otherwise one slot per worker, following the
    cluster as it grows)."""

    name = "dask"
    ships_changes = True  # later versions go to cached workers as deltas

    def __init__(self, client: Any, workers: int | None = None) -> None:
        try:
            import distributed
        except ImportError:
            raise ImportError("backend='dask' needs the distributed package: "
                              "pip install 'pagefork[dask]'") from None
        if client is None:
            raise ValueError("backend='dask' needs client= (a distributed.Client or a scheduler address)")
        self._own_client = not isinstance(client, distributed.Client)
        self.client: Any = distributed.Client(client) if self._own_client else client
        self._check_client()
        addresses = self._alive(None)
        if not addresses:
            raise PageforkError("the Dask cluster has no workers")
        self._limit = workers
        self.addresses = addresses[:workers] if workers else addresses
        log.info("Dask backend: %d slot(s), on workers %s", len(self.addresses), ", ".join(self.addresses))
        self.app_id = uuid.uuid4().hex
        # Straight to and from the workers unless the client was told not to
        # (direct_to_workers=False) or cannot reach them (found at the first try).
        self._direct = getattr(self.client, "direct_to_workers", None) is not False
        self._leases = 0
        self._lease: Any = None
        self._known: dict[str, int] = {}  # worker address -> snapshot version it holds
        self._recorded: list[int] = []    # versions whose changes are kept, oldest first
        self._changes: dict[int, DiffBatch] = {}  # version -> changes from the one before

    @property
    def slots(self) -> int:
        return len(self.addresses)

    # -- waiting on the client's event loop --

    def _wait(self, make: Callable[[], Awaitable[_T]], cancel: Cancel | None, what: str,
              timeout: float | None, watch: Callable[[], None] | None = None) -> _T:
        """Runs ``make()`` on the client's event loop and waits for it,
        raising Cancelled once ``cancel`` is set, PageforkError once the
        client is closed or after ``timeout`` seconds (None: no deadline),
        or what ``watch`` (called while waiting) raises; the coroutine is
        cancelled in every case."""

        async def call() -> _T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(call(), self.client.loop.asyncio_loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                concurrent.futures.wait([future], POLL)
                if future.done():
                    return future.result()
                if cancel is not None:
                    cancel.check()
                self._check_client()
                if watch is not None:
                    watch()
                if deadline is not None and time.monotonic() > deadline:
                    raise PageforkError(f"{what} took longer than {timeout:.0f} s; the Dask cluster "
                                        "does not answer")
        except BaseException:
            future.cancel()
            raise

    def _check_client(self) -> None:
        """A closed client never completes anything: say so at once."""
        status = getattr(self.client, "status", "running")
        if status in ("closing", "closed") or status is None:
            raise PageforkError(f"the Dask client is {status or 'closed'}: the App cannot run batches "
                                "(create the App with a running distributed.Client)")

    def _alive(self, cancel: Cancel | None, running: bool = False) -> list[str]:
        """The cluster's workers now, sorted; ``running``: only those taking
        tasks (not paused for lack of memory, not retiring). (``ncores``
        lists them all; ``scheduler_info`` lists only five by default in
        some versions.)"""
        ask = self.client.scheduler.ncores_running if running else self.client.scheduler.ncores
        workers = self._wait(lambda: ask(), cancel, "asking the Dask scheduler for its workers", CALL_TIMEOUT)
        return sorted(workers)

    def _workers(self, cancel: Cancel, running: bool = False) -> list[str]:
        """:meth:`_alive`, waiting at most WAIT_FOR_WORKERS for there to be one."""
        deadline = time.monotonic() + WAIT_FOR_WORKERS
        while True:
            alive = self._alive(cancel, running)
            if alive:
                return alive
            if time.monotonic() > deadline:
                which = ("running workers (none joined, or all are paused for lack of memory or retiring)"
                         if running else "workers")
                raise PageforkError(f"the Dask cluster has no {which} for {WAIT_FOR_WORKERS:g} s; start "
                                    "workers, then run the batch again")
            for _ in range(5):
                cancel.check()
                time.sleep(POLL)

    def _connected(self, cancel: Cancel) -> None:
        """Waits (at most WAIT_FOR_WORKERS) for a client that lost its
        scheduler to reconnect."""
        deadline = time.monotonic() + WAIT_FOR_WORKERS
        while self.client.status != "running":
            self._check_client()
            cancel.check()
            if time.monotonic() > deadline:
                raise PageforkError(f"the Dask client has not reconnected to its scheduler in "
                                    f"{WAIT_FOR_WORKERS:g} s (status {self.client.status!r}); "
                                    "run the batch again once the scheduler is back")
            time.sleep(POLL)

    def follow_workers(self, cancel: Cancel) -> None:
        """Brings the slots up to date with the cluster before a batch is
        placed (the executor calls this first): workers that left are
        replaced, workers that joined get slots. Waits at most
        WAIT_FOR_WORKERS for a cluster without workers to get one."""
        self._check_client()
        self._connected(cancel)
        self._follow_workers(self._workers(cancel))

    def _follow_workers(self, alive: list[str]) -> None:
        """Forgets workers that left the cluster, moves slots whose worker
        left (a nanny restarts it under a new address) to live workers no
        slot uses yet (the new worker's cache warms up again, where
        submitting to the old address would send it the whole snapshot on
        every batch), and gives workers that joined slots of their own, up
        to ``workers=``. Slots never go away: a cached placement names
        only slots that still exist."""
        if not alive:
            return
        for gone in set(self._known) - set(alive):  # its version would pin every change since
            del self._known[gone]
        spare = [a for a in alive if a not in self.addresses]
        moved: list[str] = []
        for slot, address in enumerate(self.addresses):
            if (address not in alive or address in moved) and spare:  # a shared one too, once
                address = spare.pop(0)                                 # the new worker is up
            elif address not in alive:
                address = alive[slot % len(alive)]
            moved.append(address)
        room = len(spare) if self._limit is None else max(0, min(len(spare), self._limit - len(moved)))
        for slot, (old, new) in enumerate(zip(self.addresses, moved)):
            if old != new:
                log.info("Dask slot %d moves from worker %s, which left, to %s", slot, old, new)
        for slot, address in enumerate(spare[:room], len(moved)):
            log.info("Dask worker %s joined: it gets slot %d", address, slot)
        self.addresses = moved + spare[:room]

    def _other(self, address: str, cancel: Cancel) -> str:
        """A running worker other than ``address`` if there is one."""
        alive = self._workers(cancel, running=True)
        return next((a for a in alive if a != address), alive[0])

    # -- leases --

    def _renew_lease(self) -> str:
        """The key of the App's lease, submitted again if the scheduler lost
        it (a client that reconnected to a restarted scheduler)."""
        lease = self._lease
        if lease is None or lease.status in ("cancelled", "lost", "error"):
            self._leases += 1
            self._lease = self.client.submit(hold_lease, key=f"pagefork-lease-{self.app_id}-{self._leases}",
                                             pure=False)
        return str(self._lease.key)

    # -- payloads --

    def _record(self, spec: BatchSpec) -> None:
        """Files the snapshot's changes since the last batch under this
        version, and forgets versions no worker holds any more."""
        if self._recorded and self._recorded[-1] == spec.version:
            return
        changes = spec.snapshot.tracked_changes()
        spec.snapshot.clear_tracked_changes()
        if self._recorded:
            self._changes[spec.version] = changes
        self._recorded.append(spec.version)
        # Only the slots' workers get deltas; another one that ran a task (a
        # retry, or Dask's work stealing) gets the whole snapshot if ever needed.
        held = [v for a, v in self._known.items() if a in self.addresses and v in self._recorded]
        oldest = min(held, default=spec.version)
        while self._recorded[0] < oldest:
            self._recorded.pop(0)
            self._changes.pop(self._recorded[0], None)

    def _payload_kind(self, spec: BatchSpec, held: int | None) -> tuple[str, int | None]:
        """What a worker holding version ``held`` needs: nothing, a delta from
        ``held``, or the whole snapshot."""
        if held == spec.version:
            return "none", None
        if held is not None and held in self._recorded:
            return "delta", held
        return "full", None

    def _payload(self, spec: BatchSpec, kind: str, held: int | None) -> bytes:
        """The payload itself, zstd-compressed; a whole snapshot straight from
        its memory (no copy of it first)."""
        compressor = zstandard.ZstdCompressor(level=1)
        if kind == "delta":
            batch = DiffBatch.concat(self._changes[v] for v in self._recorded if v > (held or 0))
            return compressor.compress(cloudpickle.dumps((held, compact.encode(batch))))
        with spec.snapshot.view() as view:
            return compressor.compress(view)

    def _check_room(self, addresses: Sequence[str], size: int, payload: int, cancel: Cancel) -> None:
        """Refuses (PageforkError) to send a whole snapshot to workers whose
        memory_limit leaves no room for it: Dask would pause the worker
        (and the batch would wait for good) or restart it."""
        rooms = self._wait(lambda: self.client._run(worker_room, workers=list(addresses), on_error="return"),
                           cancel, "asking Dask workers for their memory", CALL_TIMEOUT)
        for address, room in sorted(rooms.items()):
            if isinstance(room, tuple):  # a worker that left meanwhile answers an error
                problem = room_problem(address, room, size, payload)
                if problem:
                    raise PageforkError(problem)

    def _scatter(self, blob: bytes, address: str, cancel: Cancel) -> tuple[Any, str]:
        """A future holding ``blob`` on ``address`` (or another worker if it
        left), sent straight there unless the client cannot reach workers;
        returns it and the worker it went to."""
        timeout = CALL_TIMEOUT + len(blob) / _SLOWEST_LINK
        for attempt in range(_MAX_ATTEMPTS):
            direct = self._direct
            try:
                future = self._wait(lambda: self.client._scatter(
                    blob, workers=[address] if direct else None, direct=direct, hash=False,
                    timeout=min(5.0, CALL_TIMEOUT)), cancel, "sending data to a Dask worker", timeout)
                return future, address
            except PageforkError:
                raise
            except Exception as exc:
                if attempt == _MAX_ATTEMPTS - 1:
                    raise PageforkError(f"cannot send data to the Dask workers: {exc!r}") from exc
                alive = self._workers(cancel, running=True)
                # Running but unreachable from here (a comm error, not "no valid
                # workers"): send through the scheduler from now on.
                if direct and address in alive and isinstance(exc, OSError) and "valid" not in str(exc):
                    self._direct = False
                else:
                    address = next((a for a in alive if a != address), alive[0])
        raise AssertionError("unreachable")

    # -- running --

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> BatchResult:
        from distributed import as_completed

        self._check_client()
        self._connected(cancel)
        run = _Run(spec, cancel, self._renew_lease(), self._program(spec))
        self._record(spec)
        groups = [(self.addresses[slot], indexes) for slot, indexes in group_by_slot(placement).items()]
        idle = _Idle(self.client)
        try:
            full = sorted({a for a, _ in groups if self._payload_kind(spec, self._known.get(a))[0] == "full"})
            if full and spec.snapshot.size >= _CHECK_ROOM_FROM:
                blob = run.made[("full", None)] = self._payload(spec, "full", None)
                self._check_room(full, spec.snapshot.size, len(blob), cancel)
                del blob
            pending = as_completed([self._submit(run, indexes, address) for address, indexes in groups])
            run.attempts.update({indexes[0]: 1 for _, indexes in groups})
            for future in self._completed(pending, cancel, idle):
                again = self._collect(run, future, idle)
                if again is not None:
                    pending.add(again)
        except BaseException:  # cancelled, failed, or the client went away: stop the batch's tasks
            self._abandon(run.submitted)
            raise
        finally:
            idle.close()
        return BatchResult([run.outcomes[i] for i in sorted(run.outcomes)], list(run.combined.values()),
                           run.shipped)

    def _program(self, spec: BatchSpec) -> bytes:
        """The batch's function, arguments and layout, and the client's sys.path."""
        try:
            body = spec.dumps(DaskProgram(spec.fn, spec.args, spec.n, spec.layout, spec.merge_regions,
                                          spec.tracking, code_files(spec.fn)))
        except Exception as exc:
            raise PageforkError(f"cannot send the thread function or its arguments to Dask workers "
                                f"(they travel pickled): {exc!r}") from exc
        # Relative entries ('' is the working directory) mean the client's folders.
        paths = [_absolute(p) for p in sys.path if isinstance(p, str)]
        return pickle.dumps((paths, body), protocol=pickle.HIGHEST_PROTOCOL)

    def _ship(self, run: _Run, key: Any, make: Callable[[], bytes], address: str) -> Any:
        """The future of a payload (made once per batch) that ``address``
        will read; counts what crosses the network to get it there."""
        if key not in run.sent:
            blob = run.made.pop(key, None) or make()
            future, target = self._scatter(blob, address, run.cancel)
            run.sent[key] = (future, len(blob), {target})
            run.shipped += len(blob) * (1 if self._direct else 2)  # the scheduler relays it once more
        future, nbytes, reached = run.sent[key]
        if address not in reached:  # from a worker holding it to this one
            reached.add(address)
            run.shipped += nbytes
        return future

    def _submit(self, run: _Run, indexes: list[int], address: str, full: bool = False) -> Any:
        """Submits threads ``indexes`` as one task for ``address``."""
        spec = run.spec
        key = self._payload_kind(spec, None if full else self._known.get(address))
        program = self._ship(run, "program", lambda: run.program, address)
        payload = None if key[0] == "none" else self._ship(run, key, lambda: self._payload(spec, *key), address)
        future = self.client.submit(
            run_group, self.app_id, run.lease, spec.version, spec.snapshot.size, spec.snapshot.max_size,
            key[0], payload, program, indexes, workers=[address], allow_other_workers=True, pure=False)
        run.tasks[str(future.key)] = (indexes, address)
        run.submitted.append(future)
        return future

    def _collect(self, run: _Run, future: Any, idle: _Idle) -> Any:
        """Takes in a completed task's reply; returns the task sent again in
        its place (its worker was lost, or lost its snapshot), or None."""
        indexes, address = run.tasks[str(future.key)]
        try:
            if future.status == "cancelled":
                self._cancelled(future)
            # No deadline (a reply may be large), but a lost worker's task waits
            # for another one to run it again: idle watches for none.
            reply = self._wait(lambda: self.client._gather([future], direct=self._direct), run.cancel,
                               "fetching a reply from a Dask worker", None, idle.check)[0]
        except PageforkError:
            raise
        except Exception as exc:  # its worker died (and Dask gave up) or a payload was lost
            return self._resend_lost(run, indexes, address, exc)
        if isinstance(reply, GroupFailed):
            return self._failed(run, reply, indexes, address)
        self._known[reply.worker] = run.spec.version
        self._take_replies(run, reply, indexes[0])
        return None

    def _resend_lost(self, run: _Run, indexes: list[int], address: str, exc: Exception) -> Any:
        """Sends the threads of a task lost with its worker to another one
        (whole snapshot and all), or fails them after _MAX_ATTEMPTS."""
        first = indexes[0]
        self._known.pop(address, None)
        if run.attempts[first] >= _MAX_ATTEMPTS:
            run.fail(indexes, f"threads {indexes} were lost {run.attempts[first]} times with their Dask "
                              f"worker; last: {exc!r}")
            return None
        run.attempts[first] += 1
        run.sent.clear()  # scattered data dies with the worker that held it: start over
        try:
            other = self._other(address, run.cancel)
            log.info("threads %s were lost with Dask worker %s (%r): sent again, to %s", indexes, address,
                     exc, other)
            return self._submit(run, indexes, other, full=True)
        except PageforkError:
            raise
        except Exception as again:
            run.fail(indexes, f"threads {indexes} were lost with their Dask worker and could not be "
                              f"re-sent: {again!r}")
            return None

    def _failed(self, run: _Run, reply: GroupFailed, indexes: list[int], address: str) -> Any:
        """A task that ran no thread: the batch fails (no room for the
        snapshot), its threads fail, or (the worker lost its snapshot) it is
        sent again with the whole snapshot."""
        if reply.kind == "refused":
            raise PageforkError(reply.why)
        if reply.kind == "error":
            run.fail(indexes, reply.why)
            return None
        self._known.pop(address, None)  # "missing": the worker lost its cache, send it everything
        if run.attempts[indexes[0]] > _MAX_ATTEMPTS:
            run.fail(indexes, f"threads {indexes}: {reply.why}")
            return None
        run.attempts[indexes[0]] += 1
        log.info("Dask worker %s lacks the snapshot (%s): sending it whole", address, reply.why)
        return self._submit(run, indexes, address, full=True)

    def _take_replies(self, run: _Run, reply: GroupDone, first: int) -> None:
        """The outcomes of a task's threads, and its combined diffs."""
        memory_size = run.spec.snapshot.max_size
        relayed = 1 if self._direct else 2
        for thread in reply.threads:
            if thread.error is None:
                run.shipped += (len(thread.result or b"") + len(thread.diffs)) * relayed
            run.outcomes[thread.thread] = thread_outcome(
                thread, lambda: decompress_batch(thread.diffs, memory_size), "on the client")
        if reply.combined is not None:
            run.shipped += len(reply.combined) * relayed
            try:
                run.combined[first] = decompress_batch(reply.combined, memory_size)
            except Exception:
                run.outcomes[first] = ThreadOutcome(first, error="cannot load the combined diffs on the "
                                                    "client:\n" + traceback.format_exc())

    def _cancelled(self, future: Any) -> None:
        """Raises why a task of the batch was cancelled: PageforkError if the
        client lost its scheduler (its tasks are gone with it), otherwise
        (data it needed was lost with a worker) an error that sends its
        threads to another worker."""
        self._check_client()
        why = getattr(getattr(future, "_state", None), "exception", None)
        reason = getattr(why, "reason", "")
        if self.client.status != "running" or reason in ("scheduler-connection-lost", "scheduler-restart"):
            raise PageforkError("the Dask client lost its connection to the scheduler during the batch "
                                f"({reason or self.client.status}; restarted?), which dropped its tasks; "
                                "nothing merged. The next batch runs once the client has reconnected")
        raise RuntimeError(f"the task was cancelled on the Dask cluster: {why}")

    def _abandon(self, futures: list[Any]) -> None:
        """Cancels the batch's tasks, waiting a few seconds at most."""
        if futures and getattr(self.client, "status", None) == "running":
            try:
                self._wait(lambda: self.client._cancel(futures, force=True), None, "cancelling tasks", 5.0)
            except Exception:
                pass

    def _completed(self, pending: Any, cancel: Cancel, idle: _Idle) -> Any:
        """The futures of ``pending`` as they complete; raises Cancelled once
        ``cancel`` is set, PageforkError once the client is closed or
        ``idle`` finds no running worker."""
        condition = getattr(pending, "thread_condition", None)
        while not pending.is_empty():
            if pending.has_ready():
                yield from pending.next_batch(block=False)
                continue
            cancel.check()
            self._check_client()
            idle.check()
            if condition is not None:
                with condition:
                    if not pending.has_ready():
                        condition.wait(POLL)
            else:
                time.sleep(POLL / 10)

    def close(self, timeout: float = 10.0) -> int:
        if getattr(self.client, "status", None) == "running":
            try:
                self._wait(lambda: self.client._run(_drop_cache, self.app_id, on_error="ignore"), None,
                           "dropping the App's snapshots on the workers", max(timeout, 1.0))
            except Exception:
                pass
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                lease.release()  # the workers drop what the call above missed
            except Exception:  # the client is gone: so is the lease
                pass
        if self._own_client:
            self.client.close(timeout=max(timeout, 1.0))
        return 0
