"""The processes backend: a persistent pool of worker processes.

Workers are fresh interpreters (``python -m pagefork.backends.processes``,
spawn semantics: never a fork of this possibly multi-threaded process, and
never a re-import of the caller's ``__main__``), each talking over its own
Unix socket. Each receives the snapshot's memfd once (SCM_RIGHTS)
and maps it privately per thread, so memory is never copied to a worker;
functions travel with cloudpickle; results and wire-encoded diffs come back.
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

from .. import wire
from ..executor import BatchSpec, ThreadOutcome, Workspace
from ..snapshot import Snapshot
from .threads import group_by_slot

__all__ = ["ProcessesBackend"]


def _send(conn: connection.Connection, message: Any) -> int:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    conn.send_bytes(data)
    return len(data)


def _worker_main(conn: connection.Connection) -> None:
    """A worker process: attach snapshots, run threads, send back diffs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    snapshot: Snapshot | None = None
    space = Workspace()
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
        _, seq, version, size, n, fn_bytes, args_bytes, layout, regions, mode, indexes = message
        assert snapshot is not None, "a batch arrived before its snapshot"
        try:
            snapshot._follow_size(size)
            fn = cloudpickle.loads(fn_bytes)
            args = cloudpickle.loads(args_bytes)
        except BaseException:
            error = "".join(traceback.format_exc())
            for i in indexes:
                _send(conn, ("done", seq, i, None, None, 0, f"cannot load the thread function:\n{error}"))
            continue
        spec = BatchSpec(fn, n, args, snapshot, layout, regions, mode, version)
        for i in indexes:
            (outcome,) = space.run(spec, [i])
            result = diffs = None
            if outcome.error is None:
                try:
                    result = cloudpickle.dumps(outcome.result)
                    diffs = wire.encode(outcome.diffs) if outcome.diffs is not None else None
                except BaseException:
                    outcome.error = "cannot send the result back:\n" + traceback.format_exc()
            _send(conn, ("done", seq, i, result, diffs, outcome.dirty_pages, outcome.error))


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
        shipped = 0
        for slot, indexes in group_by_slot(placement).items():
            w = self._worker(slot)
            try:
                shipped += w.ensure_snapshot(spec.snapshot)
                shipped += _send(w.conn, ("batch", seq, spec.version, spec.snapshot.size, spec.n, fn_bytes,
                                          args_bytes, spec.layout, spec.merge_regions, spec.tracking,
                                          indexes))
                pending[slot] = set(indexes)
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
                except (EOFError, OSError):  # the worker died: its socket closed
                    code = w.exit_code()
                    for i in sorted(pending.pop(slot)):
                        outcomes[i] = ThreadOutcome(
                            i, error=f"worker process {slot} (pid {w.process.pid}) died while "
                                     f"running thread {i} (exit code {code})")
                    self._workers[slot] = None
                    w.conn.close()
                    self.replaced += 1
                    continue
                shipped += len(data)
                _, reply_seq, i, result, diffs, dirty, error = pickle.loads(data)
                if reply_seq != seq:
                    continue  # a late reply to a batch that was interrupted
                outcome = ThreadOutcome(i, dirty_pages=dirty, error=error)
                if error is None:
                    outcome.result = cloudpickle.loads(result)
                    outcome.diffs = wire.decode(diffs) if diffs is not None else None
                outcomes[i] = outcome
                pending[slot].discard(i)
                if not pending[slot]:
                    del pending[slot]
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
