"""The Dask backend: the threads a batch places on one Dask worker are one
task there, run one after the other in a combining workspace (reductions
combined on the worker first, see combine.py). The worker side (snapshot
caches, the task itself) is in _dask_worker.py.

Workers may be on other hosts, so they cannot map the snapshot's memfd.
Each keeps a cache of snapshots keyed by (app, version), as an attribute
of the Worker object (never in ``Worker.data``). A worker that does not
hold the batch's version receives either the whole snapshot (first batch,
or a worker that lost its cache) or a zstd-compressed delta: the ranges the
snapshot changed since the version it holds, compact-encoded (pagefork.compact). Payloads travel
as futures, not task arguments. Results come back as compressed compact-encoded
DiffBatches (streamed into the compressor, never joined into one copy) and
merge on the client like every other backend's. A lost worker's task runs
again elsewhere, whole.

Install with ``pip install pagefork[dask]``.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
import uuid
from typing import Any
from collections.abc import Sequence

import cloudpickle
import zstandard

from .. import compact
from .._errors import PageforkError
from ..batch import POLL, BatchSpec, Cancel, ThreadOutcome
from ..diffs import DiffBatch
from ._dask_worker import SnapshotMissing, _CacheEntry, compress_batch, decompress_batch, run_group
from ._dask_worker import drop_cache as _drop_cache
from .threads import group_by_slot

__all__ = ["DaskBackend", "SnapshotMissing", "compress_batch", "decompress_batch"]

_MAX_ATTEMPTS = 3  # per task: a lost worker's threads re-run elsewhere

# Kept importable from here (tests and client.run callers name them so).
_ = (_CacheEntry, _drop_cache)


def _absolute(path: str) -> str:
    try:
        return os.path.abspath(path)
    except OSError:  # the working directory was deleted
        return path


class DaskBackend:
    """Runs threads as Dask tasks; ``client`` is a ``distributed.Client`` or a
    scheduler address; ``workers`` limits how many workers are used."""

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
        self.client = distributed.Client(client) if self._own_client else client
        self._check_client()
        addresses = self._alive()
        if not addresses:
            raise PageforkError("the Dask cluster has no workers")
        self.addresses = addresses[:workers] if workers else addresses
        self.slots = len(self.addresses)
        self.app_id = uuid.uuid4().hex
        self._known: dict[str, int] = {}  # worker address -> snapshot version it holds
        self._recorded: list[int] = []    # versions whose changes are kept, oldest first
        self._changes: dict[int, DiffBatch] = {}  # version -> changes from the one before

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

    # -- running --

    def _check_client(self) -> None:
        """A closed client never completes anything: say so at once."""
        status = getattr(self.client, "status", "running")
        if status in ("closing", "closed") or status is None:
            raise PageforkError(f"the Dask client is {status or 'closed'}: the App cannot run batches "
                                "(create the App with a running distributed.Client)")

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> list[ThreadOutcome]:
        from distributed import as_completed

        self._check_client()
        self._follow_workers()
        try:
            body = spec.dumps((spec.fn, spec.args, spec.n, spec.layout, spec.merge_regions,
                               spec.tracking))
        except Exception as exc:
            raise PageforkError(f"cannot send the thread function or its arguments to Dask workers "
                                f"(they travel pickled): {exc!r}") from exc
        # Relative entries ('' is the working directory) mean the client's folders.
        paths = [_absolute(p) for p in sys.path if isinstance(p, str)]
        program = pickle.dumps((paths, body), protocol=pickle.HIGHEST_PROTOCOL)
        self._record(spec)
        shipped = 0
        program_to: set[str] = set()  # workers the program (future) goes to
        payloads: dict[tuple[str, int | None], tuple[Any, int]] = {}  # key -> (future, bytes)
        futures = {"program": self._scatter(program)}

        def rescatter() -> None:
            """Scattered data dies with the worker that held it: start over."""
            futures["program"] = self._scatter(program)
            payloads.clear()
            receivers.clear()
            program_to.clear()

        receivers: dict[tuple[str, int | None], set[str]] = {}

        def submit(indexes: list[int], address: str, full: bool = False) -> Any:
            nonlocal shipped
            if address not in program_to:  # Dask moves the program to each worker once
                program_to.add(address)
                shipped += len(program)
            key = self._payload_kind(spec, None if full else self._known.get(address))
            if key[0] != "none":
                if key not in payloads:  # one future per distinct payload
                    blob = self._payload(spec, *key)
                    payloads[key] = (self._scatter(blob), len(blob))
                if address not in receivers.setdefault(key, set()):  # Dask moves it to each
                    receivers[key].add(address)
                    shipped += payloads[key][1]
            future = self.client.submit(
                run_group, self.app_id, spec.version, spec.snapshot.size, spec.snapshot.max_size,
                key[0], payloads[key][0] if key in payloads else None, futures["program"], indexes,
                workers=[address], allow_other_workers=True, pure=False)
            tasks[str(future.key)] = (indexes, address)
            return future

        def fail(indexes: list[int], why: str) -> None:
            for i in indexes:
                outcomes[i] = ThreadOutcome(i, error=why)

        tasks: dict[str, tuple[list[int], str]] = {}
        attempts: dict[int, int] = {}  # first thread of a task -> times sent
        outcomes: dict[int, ThreadOutcome] = {}
        groups = list(group_by_slot(placement).items())
        submitted = [submit(indexes, self.addresses[slot]) for slot, indexes in groups]
        attempts.update({indexes[0]: 1 for _, indexes in groups})
        pending = as_completed(submitted)
        memory_size = spec.snapshot.max_size
        try:
            for future in self._completed(pending, cancel):
                indexes, address = tasks[str(future.key)]
                first = indexes[0]
                try:
                    reply = future.result()
                except Exception as exc:  # its worker died (and Dask gave up) or a payload was lost
                    self._check_client()
                    self._known.pop(address, None)
                    if attempts[first] < _MAX_ATTEMPTS:
                        attempts[first] += 1
                        try:
                            rescatter()
                            submitted.append(submit(indexes, self._other(address), full=True))
                            pending.add(submitted[-1])
                        except Exception as again:
                            fail(indexes, f"threads {indexes} were lost with their Dask worker and "
                                          f"could not be re-sent: {again!r}")
                    else:
                        fail(indexes, f"threads {indexes} were lost {attempts[first]} times with their "
                                      f"Dask worker; last: {exc!r}")
                    continue
                if reply[0] == "missing":  # the worker lost its cache: send it everything
                    self._known.pop(address, None)
                    if attempts[first] <= _MAX_ATTEMPTS:
                        attempts[first] += 1
                        submitted.append(submit(indexes, address, full=True))
                        pending.add(submitted[-1])
                    else:
                        fail(indexes, f"threads {indexes}: {reply[1]}")
                    continue
                if reply[0] == "error":
                    fail(indexes, reply[1])
                    continue
                _, replies, blob, worker = reply
                self._known[worker] = spec.version
                for i, result, diffs, dirty, error in replies:
                    outcome = outcomes[i] = ThreadOutcome(i, dirty_pages=dirty, error=error)
                    if error is None:
                        shipped += len(result) + len(diffs)
                        try:
                            outcome.diffs = decompress_batch(diffs, memory_size)
                            outcome.result = cloudpickle.loads(result)
                        except (Exception, SystemExit):  # a result's __reduce__ may call sys.exit
                            outcome.error = ("cannot load the result on the client:\n"
                                             + traceback.format_exc())
                if blob is not None:
                    shipped += len(blob)
                    try:
                        outcomes[first].combined = decompress_batch(blob, memory_size)
                    except Exception:
                        outcomes[first] = ThreadOutcome(first, error="cannot load the combined diffs on "
                                                        "the client:\n" + traceback.format_exc())
        except BaseException:  # cancelled, or the client went away: stop the batch's tasks
            try:
                if getattr(self.client, "status", None) == "running":
                    self.client.cancel(submitted, force=True)
            except Exception:
                pass
            raise
        result = [outcomes[i] for i in sorted(outcomes)]
        if result:
            result[0].bytes_shipped = shipped
        return result

    def _completed(self, pending: Any, cancel: Cancel) -> Any:
        """The futures of ``pending`` as they complete; raises Cancelled once
        ``cancel`` is set and PageforkError once the client is closed."""
        condition = getattr(pending, "thread_condition", None)
        while not pending.is_empty():
            if not pending.has_ready():
                cancel.check()
                self._check_client()
                if condition is not None:
                    with condition:
                        if not pending.has_ready():
                            condition.wait(POLL)
                else:
                    time.sleep(POLL / 10)
                continue
            yield from pending.next_batch(block=False)

    def _scatter(self, blob: bytes) -> Any:
        """A future holding ``blob``. Right after a worker dies the scheduler
        may still pick it, so a failed scatter is retried for a few seconds."""
        for attempt in range(20):
            self._check_client()
            try:
                return self.client.scatter(blob, hash=False)
            except Exception:
                self._check_client()
                if attempt == 19:
                    raise
                time.sleep(0.25)

    def _alive(self) -> list[str]:
        """The cluster's workers now, sorted (``nthreads`` lists them all;
        ``scheduler_info`` lists only five by default in some versions)."""
        return sorted(self.client.nthreads())

    def _follow_workers(self) -> None:
        """Forgets workers that left the cluster, and moves slots whose
        worker left (a nanny restarts it under a new address) to live
        workers no slot uses yet: the new worker's cache warms up again,
        where submitting to the old address would send it the whole
        snapshot on every batch."""
        alive = self._alive()
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
        self.addresses = moved

    def _other(self, address: str) -> str:
        alive = self._alive()
        others = [a for a in alive if a != address] or alive
        return others[0] if others else address

    def close(self, timeout: float = 10.0) -> int:
        if getattr(self.client, "status", None) == "running":
            try:
                self.client.run(_drop_cache, self.app_id)
            except Exception:
                pass
        if self._own_client:
            self.client.close(timeout=max(timeout, 1.0))
        return 0
