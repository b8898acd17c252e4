"""The processes backend: a persistent pool of worker processes.

Workers are fresh interpreters (``python -m pagefork.backends.processes``,
spawn semantics: never a fork of this possibly multi-threaded process, and
never a re-import of the caller's ``__main__``), each talking over its own
Unix socket. Each receives the snapshot's memfd once (SCM_RIGHTS)
and maps it privately per thread, so memory is never copied to a worker;
functions travel with cloudpickle; results and wire-encoded diffs come back.
A worker that dies is replaced and its threads fail with WorkerError.

Like multiprocessing's spawn (``multiprocessing.spawn.get_preparation_data``),
workers follow the parent's ``sys.path`` and working directory, sent before
any batch that finds them changed, so functions of modules the parent can
import load in the workers too; the caller's ``__main__`` is never re-run
(cloudpickle sends its functions by value).

Replies are read on the executor's batch thread, where KeyboardInterrupt
never lands, so a message is never cut in half. A cancelled batch (its caller
was interrupted) kills the workers still running it; they are replaced
before the next batch, so no worker is ever in an unknown state.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing import connection, reduction
from typing import Any, Sequence

import cloudpickle

from .. import wire
from .._errors import PageforkError
from ..executor import POLL, BatchSpec, Cancel, ThreadOutcome, Workspace
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
        if kind == "prepare":  # the parent's sys.path and working directory
            _, path, cwd = message
            sys.path[:] = path
            try:
                if cwd is not None:
                    os.chdir(cwd)
            except OSError:
                pass
            continue
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


def _worker_env() -> dict[str, str]:
    """This environment, plus the folder pagefork itself was imported from
    (so ``-m pagefork...`` works however the parent found it)."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return env


def _preparation() -> tuple[list[str], str | None]:
    """What a worker needs to import what the parent imports."""
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # the working directory was deleted
        cwd = None
    return list(sys.path), cwd


class _Worker:
    def __init__(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with theirs:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "pagefork.backends.processes", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_worker_env(),
                    start_new_session=True)  # a terminal's Ctrl-C is the parent's to handle
        except BaseException:
            ours.close()
            raise
        self.conn = connection.Connection(ours.detach())
        self.slot = slot
        self.snapshot_key: tuple[int, int] | None = None
        self.prepared: tuple[list[str], str | None] | None = None

    def ensure_prepared(self, preparation: tuple[list[str], str | None]) -> int:
        """Sends the parent's sys.path and cwd unless this worker has them."""
        if self.prepared == preparation:
            return 0
        sent = _send(self.conn, ("prepare", *preparation))
        self.prepared = preparation
        return sent

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

    def kill(self) -> None:
        """Ends the worker at once (its state is unknown)."""
        try:
            self.process.kill()
        except OSError:
            pass
        self.process.wait()
        self.conn.close()

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
        self._workers: list[_Worker | None] = [None] * self.slots
        try:
            for slot in range(self.slots):
                self._workers[slot] = _Worker(slot)
        except BaseException:  # Ctrl-C while starting: stop the ones started
            self.close(0.0)
            raise
        self.replaced = 0  # workers restarted after dying or being abandoned
        self._seq = 0

    def _worker(self, slot: int) -> _Worker:
        w = self._workers[slot]
        if w is None or not w.alive():
            if w is not None:
                w.conn.close()
                self.replaced += 1
            w = self._workers[slot] = _Worker(slot)
        return w

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> list[ThreadOutcome]:
        self._seq += 1
        seq = self._seq  # replies carry it: a reply is only ever read by its own batch
        try:
            fn_bytes = spec.dumps(spec.fn)
            args_bytes = spec.dumps(spec.args)
        except Exception as exc:
            raise PageforkError(f"cannot send the thread function or its arguments to worker processes "
                                f"(they travel pickled): {exc!r}") from exc
        preparation = _preparation()
        outcomes: dict[int, ThreadOutcome] = {}
        pending: dict[int, set[int]] = {}
        shipped = 0
        try:
            for slot, indexes in group_by_slot(placement).items():
                cancel.check()
                w = self._worker(slot)
                try:
                    shipped += w.ensure_prepared(preparation)
                    shipped += w.ensure_snapshot(spec.snapshot)
                    shipped += _send(w.conn, ("batch", seq, spec.version, spec.snapshot.size, spec.n,
                                              fn_bytes, args_bytes, spec.layout, spec.merge_regions,
                                              spec.tracking, indexes))
                    pending[slot] = set(indexes)
                except (OSError, ValueError) as exc:
                    self._drop(slot)
                    for i in indexes:
                        outcomes[i] = ThreadOutcome(i, error=f"cannot reach worker {slot}: {exc}")
            while pending:
                cancel.check()
                waits: dict[Any, int] = {}
                for slot in pending:
                    worker = self._workers[slot]
                    assert worker is not None
                    waits[worker.conn] = slot
                for ready in connection.wait(list(waits), POLL):
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
                        self._drop(slot)
                        continue
                    shipped += len(data)
                    _, reply_seq, i, result, diffs, dirty, error = pickle.loads(data)
                    if reply_seq != seq:
                        continue  # cannot happen: workers of cancelled batches are replaced
                    outcome = ThreadOutcome(i, dirty_pages=dirty, error=error)
                    if error is None:
                        try:
                            outcome.result = cloudpickle.loads(result)
                            outcome.diffs = wire.decode(diffs) if diffs is not None else None
                        except Exception:
                            outcome.error = "cannot load the result in the parent:\n" + traceback.format_exc()
                    outcomes[i] = outcome
                    pending[slot].discard(i)
                    if not pending[slot]:
                        del pending[slot]
        except BaseException:  # cancelled (or broken): workers still busy are in an unknown state
            for slot in pending:
                self._drop(slot, kill=True)
            raise
        result = [outcomes[i] for i in sorted(outcomes)]
        if result:
            result[0].bytes_shipped = shipped
        return result

    def _drop(self, slot: int, kill: bool = False) -> None:
        """Forgets a worker that died or whose state is unknown; the next
        batch starts a new one."""
        w, self._workers[slot] = self._workers[slot], None
        if w is not None:
            if kill:
                w.kill()
            else:
                w.conn.close()
            self.replaced += 1

    def close(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        workers, self._workers = self._workers, [None] * self.slots
        for w in workers:  # ask all first, so they stop in parallel
            if w is not None:
                try:
                    _send(w.conn, ("stop",))
                except (OSError, ValueError):
                    pass
        for w in workers:
            if w is not None:
                w.close(max(0.0, deadline - time.monotonic()))
        return 0


if __name__ == "__main__":
    _worker_main(connection.Connection(int(sys.argv[1])))
