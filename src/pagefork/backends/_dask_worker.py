"""The worker side of the Dask backend: each worker's cache of snapshots,
the task that runs a batch's threads there, and the replies it sends.

Workers may be on other hosts, so they cannot map the client's memfd. Each
keeps a cache of snapshots keyed by App, as an attribute of the Worker
object (never in ``Worker.data``, which Dask may spill or evict). A worker
that does not hold the batch's version receives the whole snapshot
(zstd-compressed, decompressed straight into its memfd in bounded pieces)
or a delta: the ranges that changed since the version it holds.

A cached snapshot lives as long as its App's *lease*: a small task the
App's client holds on the scheduler. Each worker asks the scheduler now
and then whether the leases of its cached Apps still exist, and drops the
snapshots of those that do not (a client that was killed, or an App
dropped without close), so they do not stay until the worker restarts.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import threading
from typing import Any

import cloudpickle
import numpy as np
import zstandard

from .. import compact
from .._errors import CorruptDataError
from .._sizes import PAGE_SIZE, round_to_pages
from .._thread_errors import format_exc, pickled_exception, restore_code_files
from ..batch import BatchSpec, ThreadOutcome, thread_tracking_mode
from ..diffs import DiffBatch
from ..snapshot import Snapshot
from ..tracking import probe
from ._messages import DaskProgram, GroupDone, GroupFailed, ThreadReply
from .combine import CombiningWorkspace

__all__ = ["SnapshotMissing", "compress_batch", "decompress_batch", "run_group", "hold_lease",
           "worker_room", "drop_cache", "LEASE_CHECK_SECONDS"]

#: How often a worker holding snapshots checks that their Apps' leases exist.
LEASE_CHECK_SECONDS = 3.0

#: Bytes a full snapshot is decompressed in at a time (one reused buffer).
_PIECE = 4 << 20

_WATCH = "pagefork-leases"  # the worker's periodic callback checking the leases


class SnapshotMissing(Exception):
    """A worker was asked to run a version it cannot build (it lost its cache)."""


class _CacheEntry:
    """One app's snapshot on one worker, and thread memory for its tasks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = -1
        self.snapshot: Snapshot | None = None
        self.spaces: list[CombiningWorkspace] = []
        self.lease = ""  # key of the App's lease on the scheduler ("" : none)

    def update(self, version: int, size: int, max_size: int, kind: str, payload: Any) -> Snapshot:
        """Brings the snapshot to ``version`` and returns it. An App's versions
        only grow, so an older one comes from a stale task (of a cancelled
        batch, reaching the worker late): refused, as replacing the snapshot
        would close it under the newer batch's running group."""
        with self.lock:
            if version < self.version:
                raise SnapshotMissing(f"holds version {self.version}, newer than the stale {version}")
            if self.version == version:
                assert self.snapshot is not None
                return self.snapshot
            if kind == "full" and payload is not None:
                old, self.snapshot = self.snapshot, unpack_full(payload, size, max_size)
                if old is not None:  # only now: a failure above keeps the old version usable
                    old.close()
            elif kind == "delta" and payload is not None and self.snapshot is not None:
                base, changes = cloudpickle.loads(zstandard.ZstdDecompressor().decompress(payload))
                if base != self.version:
                    raise SnapshotMissing(f"holds version {self.version}, delta is from {base}")
                self.snapshot.grow(size)
                self.snapshot.apply(compact.decode(changes))
                self.snapshot.clear_tracked_changes()  # nobody here reads them: they would only grow
            else:
                raise SnapshotMissing(f"holds version {self.version}, needs {version}")
            self.version = version
            return self.snapshot

    def workspace(self) -> CombiningWorkspace:
        with self.lock:
            return self.spaces.pop() if self.spaces else CombiningWorkspace()

    def give_back(self, space: CombiningWorkspace) -> None:
        with self.lock:
            self.spaces.append(space)

    def close(self) -> None:
        with self.lock:
            for space in self.spaces:
                space.close()
            self.spaces.clear()
            if self.snapshot is not None:
                self.snapshot.close()
                self.snapshot = None
            self.version = -1  # a group still holding the entry is told "missing"


def unpack_full(payload: Any, size: int, max_size: int) -> Snapshot:
    """A snapshot of ``size`` bytes from a whole compressed snapshot,
    decompressed straight into its memfd in bounded pieces (no copy of the
    whole beside it). Zero pages are skipped: a fresh memfd reads as zeros
    and holds no memory for them. CorruptDataError unless the payload
    holds exactly ``size`` bytes."""
    snapshot = Snapshot(size=size, max_size=max_size)
    try:
        buffer = bytearray(_PIECE)
        piece = memoryview(buffer)
        words = np.frombuffer(buffer, np.uint64).reshape(-1, PAGE_SIZE // 8)
        at = 0
        with zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False) as reader:
            while at < size:
                want = min(_PIECE, size - at)
                got = 0
                while got < want:
                    n = reader.readinto(piece[got:want])
                    if not n:
                        raise CorruptDataError(f"a whole snapshot holds {at + got} bytes, not {size}")
                    got += n
                pages = round_to_pages(got) // PAGE_SIZE
                buffer[got: pages * PAGE_SIZE] = bytes(pages * PAGE_SIZE - got)  # the last page's tail
                written = np.flatnonzero(words[:pages].any(axis=1))
                if written.size:  # runs of written pages, each copied once
                    breaks = np.flatnonzero(np.diff(written) != 1) + 1
                    for run in np.split(written, breaks):
                        start, end = int(run[0]) * PAGE_SIZE, min(int(run[-1] + 1) * PAGE_SIZE, got)
                        snapshot.write(piece[start:end], at + start)
                at += got
            if reader.read(1):
                raise CorruptDataError(f"a whole snapshot holds more than {size} bytes")
        snapshot.clear_tracked_changes()
        return snapshot
    except zstandard.ZstdError as exc:
        snapshot.close()
        raise CorruptDataError(f"a whole snapshot is malformed: {exc}") from None
    except BaseException:
        snapshot.close()
        raise


def _cache(worker: Any, app_id: str, lease: str) -> _CacheEntry:
    lock = worker.__dict__.setdefault("_pagefork_lock", threading.Lock())
    with lock:
        caches = worker.__dict__.setdefault("_pagefork_snapshots", {})
        entry = caches.get(app_id)
        if entry is None:
            entry = caches[app_id] = _CacheEntry()
            worker.loop.add_callback(_watch_leases, worker)
        entry.lease = lease  # a client that reconnected holds a new one
        return entry


def drop_cache(app_id: str, dask_worker: Any = None) -> None:
    """Drops an App's snapshot on this worker (``client.run`` passes ``dask_worker``)."""
    caches = getattr(dask_worker, "_pagefork_snapshots", {})
    entry = caches.pop(app_id, None)
    if entry is not None:
        entry.close()


def hold_lease() -> None:
    """The lease task: its result is nothing; that the scheduler knows its
    key while the App's client holds it is the point."""
    return None


def _watch_leases(worker: Any) -> None:
    """Starts the worker's lease check, once (on the worker's event loop)."""
    if _WATCH in worker.periodic_callbacks or worker.status.name in ("closing", "closed"):
        return
    from tornado.ioloop import PeriodicCallback

    callback = PeriodicCallback(lambda: _drop_expired(worker), LEASE_CHECK_SECONDS * 1000)
    worker.periodic_callbacks[_WATCH] = callback  # stopped with the worker's own
    callback.start()


async def _drop_expired(worker: Any) -> None:
    """Drops the snapshots of Apps whose lease the scheduler no longer knows."""
    leases = {app: e.lease for app, e in list(getattr(worker, "_pagefork_snapshots", {}).items()) if e.lease}
    if not leases:
        return
    try:
        known = await worker.scheduler.get_task_status(keys=sorted(set(leases.values())))
    except Exception:  # scheduler unreachable: try again next time (or the worker closes)
        return
    for app, lease in leases.items():
        if known.get(lease) is None:
            # In a thread: closing waits for a group that is decompressing into it.
            await asyncio.get_running_loop().run_in_executor(None, _drop_if_leased, worker, app, lease)


def _drop_if_leased(worker: Any, app: str, lease: str) -> None:
    entry = getattr(worker, "_pagefork_snapshots", {}).get(app)
    if entry is not None and entry.lease == lease:  # not renewed meanwhile
        drop_cache(app, worker)


def worker_room(dask_worker: Any = None) -> tuple[int, float, int]:
    """(memory_limit, the fraction of it at which Dask pauses or kills the
    worker, the process memory it uses now) for this worker; a limit of 0
    means none."""
    import dask

    limit = int(getattr(dask_worker.memory_manager, "memory_limit", None) or 0)
    fractions = [dask.config.get(f"distributed.worker.memory.{name}", False) for name in ("pause", "terminate")]
    usable = min([float(f) for f in fractions if f] or [1.0])
    return limit, usable, int(dask_worker.monitor.get_process_memory())


def room_problem(address: str, room: tuple[int, float, int], size: int, payload: int = 0) -> str:
    """Why a worker with ``room`` (see :func:`worker_room`) cannot take a
    whole snapshot of ``size`` bytes (``payload``: compressed bytes it has
    yet to receive), or ""."""
    limit, usable, used = room
    if not limit or used + payload + size <= usable * limit:
        return ""
    also = f" and {payload} bytes of compressed payload" if payload else ""
    return (f"the Dask worker {address} cannot hold the App's snapshot: it needs {size} bytes{also} "
            f"on top of the {used} bytes its process uses, over {usable:.0%} of its memory_limit of "
            f"{limit} bytes, where Dask pauses or restarts it. Give the workers a larger memory_limit "
            "or use a smaller App")


def compress_batch(batch: DiffBatch | None) -> bytes:
    """``batch`` compact-encoded and zstd-compressed, streamed: the diff data
    goes to the compressor from the batch's own buffer."""
    parts = compact.encode_parts(batch if batch is not None else DiffBatch())
    size = sum(memoryview(p).nbytes for p in parts)
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    return b"".join([*(compressor.compress(p) for p in parts), compressor.flush()])


def decompress_batch(blob: bytes, memory_size: int) -> DiffBatch:
    """The batch :func:`compress_batch` made of diffs to a memory of
    ``memory_size`` bytes. A frame claiming more than any such batch could
    hold is refused before anything is allocated (CorruptDataError)."""
    limit = 16 * memory_size + (1 << 20)  # data <= memory; a few token bytes per run of >= 1 byte
    try:
        claimed = zstandard.frame_content_size(blob)
        if claimed < 0 or claimed > limit:
            raise CorruptDataError(f"a compressed reply claims {claimed} bytes (-1: no size), not "
                                   f"0 to {limit} as diffs of a {memory_size}-byte memory")
        data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=claimed)
    except zstandard.ZstdError as exc:
        raise CorruptDataError(f"a compressed reply is malformed: {exc}") from None
    return compact.decode(data)


def run_group(app_id: str, lease: str, version: int, size: int, max_size: int, kind: str, payload: Any,
              program: bytes, indexes: list[int]) -> GroupDone | GroupFailed:
    """The threads ``indexes`` of a batch, on a worker: bring the cached
    snapshot to ``version``, run them one after the other, combining what
    combines (see GroupDone and GroupFailed for the replies)."""
    from distributed import get_worker

    worker = get_worker()
    entry = _cache(worker, app_id, lease)
    if kind == "full" and entry.version != version:
        problem = room_problem(worker.address, worker_room(worker), size)
        if problem:
            return GroupFailed("refused", problem)
    try:
        snapshot = entry.update(version, size, max_size, kind, payload)
    except SnapshotMissing as exc:
        return GroupFailed("missing", str(exc))
    except CorruptDataError as exc:
        return GroupFailed("error", f"the Dask worker {worker.address} received a damaged snapshot: {exc}")
    try:
        paths, body = pickle.loads(program)
        for path in paths:  # the client's sys.path, as multiprocessing's spawn passes it
            if path not in sys.path:
                sys.path.append(path)
        call: DaskProgram = cloudpickle.loads(body)
        restore_code_files(call.fn, call.files)
    except BaseException:
        return GroupFailed("error", "cannot load the thread function on the Dask worker:\n" + format_exc())
    mode = call.mode
    if mode not in probe() or not probe()[mode].available:
        mode = thread_tracking_mode(None)  # this host's kernel differs from the client's
    spec = BatchSpec(call.fn, call.n, call.args, snapshot, call.layout, call.regions, mode, version)
    replies: list[ThreadReply] = []

    def report(outcome: ThreadOutcome) -> None:
        if outcome.error is None:
            try:
                replies.append(ThreadReply(outcome.index, cloudpickle.dumps(outcome.result), outcome.dirty_pages,
                                           None, compress_batch(outcome.diffs)))
                return
            except BaseException:
                outcome.error = "cannot send the result back:\n" + format_exc()
        exception, note = pickled_exception(outcome.exception)
        replies.append(ThreadReply(outcome.index, None, outcome.dirty_pages, (outcome.error or "") + note,
                                   exception=exception))

    space = entry.workspace()
    try:
        combined = space.run_combining(spec, indexes, report)
        blob = None if combined is None else compress_batch(combined)
    except BaseException:  # combining failed (e.g. no memory): the threads fail with it
        return GroupFailed("error", "the worker could not run or combine the threads:\n" + format_exc())
    finally:
        entry.give_back(space)
    return GroupDone(replies, blob, worker.address)
