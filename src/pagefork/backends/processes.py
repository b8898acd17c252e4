"""The processes backend: a persistent pool of worker processes.

Workers are fresh interpreters (``python -m pagefork.backends.processes``,
spawn semantics: never a fork of this possibly multi-threaded process, and
never a re-import of the caller's ``__main__``), each talking over its own
Unix socket. Each receives the snapshot's memfd once (SCM_RIGHTS)
and maps it privately per thread, so memory is never copied to a worker;
functions travel with cloudpickle; results and compact-encoded diffs come back
(reductions combined per worker first, see combine.py).
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

Workers die with their parent: each asks the kernel for SIGKILL when its
parent dies (PR_SET_PDEATHSIG) and exits at once if the parent was gone
before it asked. The kernel sends that signal when the *thread* that started
the worker ends, so every worker is started by one thread that lives as long
as this process (spawn.py), never by the caller's or the batch thread. A
thread function's working directory and sys.path changes end with its batch;
writes to a worker never raise SIGPIPE (a program that restored its default
action would be killed by a write to a worker that had exited).
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
from typing import Any
from collections.abc import Sequence

import cloudpickle

from .._cpus import available_cpus
from .._errors import CorruptDataError, PageforkError
from .._limits import cannot_start, is_out_of_tasks, limit_report
from ..batch import POLL, BatchSpec, Cancel, ThreadOutcome
from ..diffs import DiffBatch
from ..snapshot import Snapshot
from . import combine, replies
from .spawn import WorkerConnection, die_with_parent, spawn_worker
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
    home: tuple[list[str], str | None] | None = None  # the parent's sys.path and cwd
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
        if kind == "prepare":  # the parent's sys.path and working directory
            _, path, cwd = message
            home = (list(path), cwd)
            _go_home(home)
            continue
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
            _go_home(home)  # loading the function may have imported a module that moved
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
        _go_home(home)


def _go_home(home: tuple[list[str], str | None] | None) -> None:
    """Puts back the parent's sys.path and working directory, which a thread
    function may have changed: the next batch starts where the parent is."""
    if home is None:
        return
    path, cwd = home
    if sys.path != path:
        sys.path[:] = path
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:  # deleted, or no longer allowed
            pass


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
            self.process = spawn_worker(theirs)
        except BaseException as exc:
            ours.close()
            if is_out_of_tasks(exc):
                raise cannot_start("a worker process", exc) from exc
            raise
        self.conn = WorkerConnection(ours)
        self.slot = slot
        self.snapshot_key: tuple[int, int] | None = None
        self.replies: replies.ReplyReader | None = None
        self.prepared: tuple[list[str], str | None] | None = None

    def ensure_replies(self) -> int:
        """Passes this worker its reply buffer, once."""
        if self.replies is not None:
            return 0
        reader = replies.ReplyReader(replies.create())
        try:
            sent = _send(self.conn, ("replies",))
            self.conn.send_handle(reader.fd)
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
        self.conn.send_handle(snapshot.fd)
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

    def why_lost(self, slot: int) -> str | None:
        """Why this worker, which has ended, never started: interrupted by
        SIGINT while it started, which only OpenBLAS does (when it cannot
        start its threads: a worker ignores SIGINT once it runs, and lives in
        its own session); None if it ended otherwise."""
        if self.exit_code() != -signal.SIGINT:
            return None
        return (f"worker process {slot} (pid {self.process.pid}) could not start: it was interrupted "
                "(SIGINT) while importing numpy, as OpenBLAS does when it cannot start its threads "
                f"(its message is on stderr); {limit_report()}. Raise the limit, use fewer workers or "
                "set OPENBLAS_NUM_THREADS")

    def close(self, timeout: float = 5.0, *, ask: bool = True) -> None:
        """Stops the worker (``ask``: sends "stop"; False when the caller
        already did: a second write to a worker that has exited fails)."""
        if ask:
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
    """``workers`` persistent worker processes (default: one per CPU this
    process may use, by its affinity and cgroup quota)."""

    name = "processes"
    ships_changes = False  # workers map the snapshot itself

    def __init__(self, workers: int | None = None) -> None:
        self.slots = workers if workers is not None else available_cpus()
        if self.slots < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        # Started now: the interpreters import numpy and pagefork while the
        # caller sets up its arrays, so the first batch does not wait for them.
        self._workers: list[_Worker | None] = [None] * self.slots
        self._closed = False  # set by close(), maybe on another thread while a batch runs
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
                w.drop_replies()
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
        used: dict[int, _Worker] = {}  # this batch's workers (close() may empty self._workers meanwhile)
        first: dict[int, int] = {}  # slot -> its first thread, which carries the combined diffs
        combined: dict[int, DiffBatch] = {}
        shipped = 0
        try:
            for slot, indexes in group_by_slot(placement).items():
                cancel.check()
                self._check_open()
                w = used[slot] = self._worker(slot)
                try:
                    shipped += w.ensure_prepared(preparation)
                    shipped += w.ensure_snapshot(spec.snapshot)
                    shipped += w.ensure_replies()
                    shipped += _send(w.conn, ("batch", seq, spec.version, spec.snapshot.size, spec.n,
                                              fn_bytes, args_bytes, spec.layout, spec.merge_regions,
                                              spec.tracking, indexes))
                    pending[slot] = set(indexes) | (
                        {_END} if combine.combines(spec.merge_regions, len(indexes)) else set())
                    first[slot] = indexes[0]
                except (OSError, ValueError) as exc:
                    self._check_open()
                    why = f"cannot reach worker {slot}: {exc}"
                    if not w.alive():
                        why = w.why_lost(slot) or why
                    self._drop(slot)
                    for i in indexes:
                        outcomes[i] = ThreadOutcome(i, error=why)
            while pending:
                cancel.check()
                self._check_open()
                waits: dict[Any, int] = {used[slot].conn: slot for slot in pending}
                try:
                    ready_list = connection.wait(list(waits), POLL)
                except (OSError, ValueError):  # a socket close() closed meanwhile
                    self._check_open()
                    raise
                for ready in ready_list:
                    slot = waits[ready]
                    w = used[slot]
                    try:
                        data = w.conn.recv_bytes()
                        message = pickle.loads(data)
                        header, where = message[-2:]
                        payload = w.payload(where)
                    except (EOFError, OSError, ValueError):  # the worker died (its socket closed)
                        self._check_open()
                        code = w.exit_code()
                        lost = w.why_lost(slot)
                        for i in sorted(pending.pop(slot) - {_END}) or [first[slot]]:
                            outcomes[i] = ThreadOutcome(
                                i, error=lost or f"worker process {slot} (pid {w.process.pid}) died while "
                                                 f"running thread {i} (exit code {code})")
                        self._drop(slot)
                        continue
                    shipped += len(data)  # with inline payloads
                    if where is not None and where[0] != "inline":
                        shipped += memoryview(payload).nbytes  # through the reply buffer
                    if message[1] != seq:
                        continue  # cannot happen: workers of cancelled batches are replaced
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
                                outcome.result = cloudpickle.loads(result)
                            except CorruptDataError as exc:
                                outcome.error = f"worker {slot} sent malformed diffs: {exc}"
                            except (Exception, SystemExit):  # a result's __reduce__ may call sys.exit
                                outcome.error = ("cannot load the result in the parent:\n"
                                                 + traceback.format_exc())
                        if i not in outcomes:  # an "end" error may have claimed it
                            outcomes[i] = outcome
                    pending[slot].discard(i)
                    if not pending[slot]:
                        del pending[slot]
        except BaseException:  # cancelled (or broken): workers still busy are in an unknown state
            for slot in pending:
                self._drop(slot, kill=True)
            raise
        for slot, batch in combined.items():
            outcomes[first[slot]].combined = batch
        result = [outcomes[i] for i in sorted(outcomes)]
        if result:
            result[0].bytes_shipped = shipped
        return result

    def _check_open(self) -> None:
        """Raises if close() ran (on another thread: an App collected, or
        closed at interpreter exit) while a batch was running."""
        if self._closed:
            raise PageforkError("the App was closed while the batch ran (by another thread, or at "
                                "interpreter exit); nothing merged")

    def _drop(self, slot: int, kill: bool = False) -> None:
        """Forgets a worker that died or whose state is unknown; the next
        batch starts a new one."""
        w, self._workers[slot] = self._workers[slot], None
        if w is not None:
            if kill:
                w.kill()
            else:
                w.conn.close()
            w.drop_replies()
            self.replaced += 1

    def close(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        self._closed = True
        workers, self._workers = self._workers, [None] * self.slots
        for w in workers:  # ask all first, so they stop in parallel
            if w is not None:
                try:
                    _send(w.conn, ("stop",))
                except (OSError, ValueError):
                    pass
        for w in workers:
            if w is not None:
                w.close(max(0.0, deadline - time.monotonic()), ask=False)
        return 0


if __name__ == "__main__":
    die_with_parent(int(sys.argv[2]))
    _worker_main(connection.Connection(int(sys.argv[1])))
