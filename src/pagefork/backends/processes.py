"""The processes backend: a persistent pool of worker processes.

Workers are fresh interpreters (``python -m pagefork.backends.processes``,
spawn semantics: never a fork of this possibly multi-threaded process, and
never a re-import of the caller's ``__main__``), each talking over its own
Unix socket. Each receives the snapshot's memfd once (SCM_RIGHTS)
and maps it privately per thread, so memory is never copied to a worker;
functions travel with cloudpickle; results and compact-encoded diffs come back
(reductions combined per worker first, see combine.py).
A worker that dies is replaced and its threads fail with WorkerError.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing import connection, reduction
from typing import Any, Sequence

import cloudpickle

from .._errors import CorruptDataError
from ..executor import BatchSpec, ThreadOutcome
from ..snapshot import DiffBatch, Snapshot
from . import combine, replies
from .threads import group_by_slot

__all__ = ["ProcessesBackend"]


_END = -1  # in a slot's pending set: the worker's "end" message (combined diffs) is still due


def _send(conn: connection.Connection, message: Any) -> int:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    conn.send_bytes(data)
    return len(data)


def _ship(conn: connection.Connection, writer: replies.ReplyWriter | None, message: tuple,
          packed: tuple[Any, Any] = (None, b"")) -> None:
    """Sends ``message`` + (compact header, where the data is) of a packed
    batch, in one frame (so an interrupted parent never reads half a reply):
    where is None (no batch), ("inline", bytes) or (offset, length) in the
    reply buffer."""
    header, data = packed
    where: Any = None
    if header is not None:
        if writer is not None and memoryview(data).nbytes >= replies.INLINE_LIMIT:
            try:
                where = writer.put(data)
            except OSError:  # no room for the buffer: send it inline
                where = None
        if where is None:
            where = ("inline", bytes(data))
    _send(conn, message + (header, where))


def _worker_main(conn: connection.Connection) -> None:
    """A worker process: attach snapshots, run threads, send back diffs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    snapshot: Snapshot | None = None
    space = combine.CombiningWorkspace()
    writer: replies.ReplyWriter | None = None
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "snapshot":
            _, size, max_size = message
            fd = reduction.recv_handle(conn)
            if snapshot is not None:
                snapshot.close()
            snapshot = Snapshot.attach(fd, size, max_size)
            os.close(fd)
            continue
        if kind == "replies":
            if writer is not None:
                writer.close()
            writer = replies.ReplyWriter(reduction.recv_handle(conn))
            continue
        _, seq, version, size, n, fn_bytes, args_bytes, layout, regions, mode, indexes = message
        assert snapshot is not None, "a batch arrived before its snapshot"
        try:
            snapshot._follow_size(size)
            fn = cloudpickle.loads(fn_bytes)
            args = cloudpickle.loads(args_bytes)
        except BaseException:
            error = "".join(traceback.format_exc())
            for i in indexes:
                _ship(conn, writer, ("done", seq, i, None, 0, f"cannot load the thread function:\n{error}"))
            if combine.combines(regions, len(indexes)):
                _ship(conn, writer, ("end", seq, None))
            continue
        if writer is not None:
            writer.start_batch()
        spec = BatchSpec(fn, n, args, snapshot, layout, regions, mode, version)

        reported: set[int] = set()

        def report(outcome: ThreadOutcome) -> None:
            result = None
            packed: tuple[Any, Any] = (None, b"")
            if outcome.error is None:
                try:
                    result = cloudpickle.dumps(outcome.result)
                    packed = combine.pack(outcome.diffs)
                except BaseException:
                    outcome.error = "cannot send the result back:\n" + traceback.format_exc()
            _ship(conn, writer, ("done", seq, outcome.index, result, outcome.dirty_pages, outcome.error),
                  packed)
            reported.add(outcome.index)  # only once its reply is sent

        packed: tuple[Any, Any] = (None, b"")
        failure: str | None = None
        try:
            packed = combine.pack(space.run_combining(spec, indexes, report))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # combining failed (e.g. no memory): the batch fails
            failure = "the worker could not run or combine the threads:\n" + traceback.format_exc()
        if failure is not None:  # every thread still owed a reply gets the failure
            for i in indexes:
                if i not in reported:
                    _ship(conn, writer, ("done", seq, i, None, 0, failure))
        if combine.combines(regions, len(indexes)):  # the parent waits for it exactly then
            _ship(conn, writer, ("end", seq, failure), packed)


class _Worker:
    def __init__(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pagefork.backends.processes", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self.conn = connection.Connection(ours.detach())
        self.slot = slot
        self.snapshot_key: tuple[int, int] | None = None
        self.replies: replies.ReplyReader | None = None

    def ensure_replies(self) -> int:
        """Passes this worker its reply buffer, once."""
        if self.replies is not None:
            return 0
        reader = replies.ReplyReader(replies.create())
        try:
            sent = _send(self.conn, ("replies",))
            reduction.send_handle(self.conn, reader.fd, self.process.pid)
        except BaseException:
            reader.close()
            raise
        self.replies = reader
        return sent

    def payload(self, where: Any) -> Any:
        """The diff data a reply points to (see _ship); ValueError if it
        points outside the reply buffer."""
        if where is None:
            return b""
        if where[0] == "inline":
            return where[1]
        if self.replies is None:
            raise ValueError("a reply points into a buffer this worker was never given")
        offset, length = where
        return self.replies.get(int(offset), int(length))

    def ensure_snapshot(self, snapshot: Snapshot) -> int:
        """Sends the snapshot's memfd unless this worker already has it."""
        key = (id(snapshot), snapshot.fd)
        if self.snapshot_key == key:
            return 0
        sent = _send(self.conn, ("snapshot", snapshot.size, snapshot.max_size))
        reduction.send_handle(self.conn, snapshot.fd, self.process.pid)
        self.snapshot_key = key
        return sent

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_code(self) -> int | None:
        try:
            return self.process.wait(1)
        except subprocess.TimeoutExpired:
            return None

    def close(self, timeout: float = 5.0) -> None:
        try:
            _send(self.conn, ("stop",))
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        self.drop_replies()

    def drop_replies(self) -> None:
        if self.replies is not None:
            self.replies.close()
            self.replies = None


class ProcessesBackend:
    """``workers`` persistent worker processes (default: one per CPU)."""

    name = "processes"

    def __init__(self, workers: int | None = None) -> None:
        self.slots = workers if workers is not None else (os.cpu_count() or 1)
        if self.slots < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        # Started now: the interpreters import numpy and pagefork while the
        # caller sets up its arrays, so the first batch does not wait for them.
        self._workers: list[_Worker | None] = [_Worker(slot) for slot in range(self.slots)]
        self.replaced = 0  # workers restarted after dying
        self._seq = 0

    def _worker(self, slot: int) -> _Worker:
        w = self._workers[slot]
        if w is None or not w.alive():
            if w is not None:
                w.conn.close()
                w.drop_replies()
                self.replaced += 1
            w = self._workers[slot] = _Worker(slot)
        return w

    def run(self, spec: BatchSpec, placement: Sequence[int]) -> list[ThreadOutcome]:
        self._seq += 1
        seq = self._seq  # replies carry it, so an interrupted batch's never count
        fn_bytes = cloudpickle.dumps(spec.fn)
        args_bytes = cloudpickle.dumps(spec.args)
        outcomes: dict[int, ThreadOutcome] = {}
        pending: dict[int, set[int]] = {}
        first: dict[int, int] = {}  # slot -> its first thread, which carries the combined diffs
        combined: dict[int, DiffBatch] = {}
        shipped = 0
        for slot, indexes in group_by_slot(placement).items():
            w = self._worker(slot)
            try:
                shipped += w.ensure_snapshot(spec.snapshot)
                shipped += w.ensure_replies()
                shipped += _send(w.conn, ("batch", seq, spec.version, spec.snapshot.size, spec.n, fn_bytes,
                                          args_bytes, spec.layout, spec.merge_regions, spec.tracking,
                                          indexes))
                pending[slot] = set(indexes) | ({_END} if combine.combines(spec.merge_regions, len(indexes))
                                                 else set())
                first[slot] = indexes[0]
            except (OSError, ValueError) as exc:
                for i in indexes:
                    outcomes[i] = ThreadOutcome(i, error=f"cannot reach worker {slot}: {exc}")
        while pending:
            waits: dict[Any, int] = {}
            for slot in pending:
                worker = self._workers[slot]
                assert worker is not None
                waits[worker.conn] = slot
            for ready in connection.wait(list(waits)):
                slot = waits[ready]
                w = self._workers[slot]  # type: ignore[assignment]
                assert w is not None
                try:
                    data = w.conn.recv_bytes()
                    message = pickle.loads(data)
                    header, where = message[-2:]
                    payload = w.payload(where)
                except (EOFError, OSError, ValueError):  # the worker died (its socket closed)
                    code = w.exit_code()
                    for i in sorted(pending.pop(slot) - {_END}) or [first[slot]]:
                        outcomes[i] = ThreadOutcome(
                            i, error=f"worker process {slot} (pid {w.process.pid}) died while "
                                     f"running thread {i} (exit code {code})")
                    self._workers[slot] = None
                    w.conn.close()
                    w.drop_replies()
                    self.replaced += 1
                    continue
                shipped += len(data)  # with inline payloads
                if where is not None and where[0] != "inline":
                    shipped += memoryview(payload).nbytes  # through the reply buffer
                if message[1] != seq:
                    continue  # a late reply to a batch that was interrupted
                if message[0] == "end":
                    error = message[2]
                    try:
                        batch = combine.unpack(header, payload)
                    except CorruptDataError as exc:
                        error = f"worker {slot} sent malformed combined diffs: {exc}"
                    if error is not None:
                        i = first[slot]
                        outcomes[i] = ThreadOutcome(i, error=error)
                    elif batch is not None:
                        combined[slot] = batch
                    i = _END
                else:
                    _, _, i, result, dirty, error, _, _ = message
                    outcome = ThreadOutcome(i, dirty_pages=dirty, error=error)
                    if error is None:
                        try:
                            outcome.diffs = combine.unpack(header, payload)
                        except CorruptDataError as exc:
                            outcome.error = f"worker {slot} sent malformed diffs: {exc}"
                        else:
                            outcome.result = cloudpickle.loads(result)
                    if i not in outcomes:  # an "end" error may have claimed it
                        outcomes[i] = outcome
                pending[slot].discard(i)
                if not pending[slot]:
                    del pending[slot]
        for slot, batch in combined.items():
            outcomes[first[slot]].combined = batch
        result = [outcomes[i] for i in sorted(outcomes)]
        if result:
            result[0].bytes_shipped = shipped
        return result

    def close(self) -> None:
        for w in self._workers:
            if w is not None:
                w.close()
        self._workers = [None] * self.slots


if __name__ == "__main__":
    _worker_main(connection.Connection(int(sys.argv[1])))
