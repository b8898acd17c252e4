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
before the next batch, so no worker is ever in an unknown state. A worker
that sent half a reply and hangs blocks that read, which no cancel check
interrupts: the caller's thread then kills it (abort(), through a pidfd).
A reply that is no ThreadReply or GroupEnd kills its worker too.

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
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import connection, reduction
from typing import Any
from collections.abc import Sequence

import cloudpickle

from .._cpus import available_cpus
from .._errors import CorruptDataError, PageforkError
from .._thread_errors import code_files, format_exc, pickled_exception, restore_code_files
from .._log import log
from .._limits import cannot_start, is_out_of_tasks, limit_report
from ..batch import POLL, BatchResult, BatchSpec, Cancel, ThreadOutcome
from ..diffs import DiffBatch
from ..snapshot import Snapshot
from . import combine, replies
from ._messages import (NO_DIFFS, AttachReplies, AttachSnapshot, GroupEnd, Prepare, RunBatch, ShippedDiffs, Stop,
                        REPLIES, ThreadReply, dumps, loads, thread_outcome)
from .spawn import WorkerConnection, die_with_parent, spawn_worker
from .threads import group_by_slot

__all__ = ["ProcessesBackend"]


_END = -1  # in a slot's pending set: the worker's GroupEnd (combined diffs) is still due

# Orders closing a worker's pidfd against ProcessesBackend.abort signalling
# through it from the caller's thread (a closed descriptor's number is reused).
_PIDFDS = threading.Lock()


def _pidfd(pid: int) -> int | None:
    """A descriptor of process ``pid``, which this process has not reaped
    (None where the kernel has none: before Linux 5.3): a signal sent
    through it never reaches a process that got the pid after it."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _send(conn: connection.Connection, message: Any) -> int:
    data = dumps(message)
    conn.send_bytes(data)
    return len(data)


def _shipped(writer: replies.ReplyWriter | None, packed: tuple[Any, Any]) -> ShippedDiffs:
    """Where a packed batch (combine.pack) travels: large data through the
    reply buffer, the rest inline in the message (sent in one frame, so an
    interrupted parent never reads half a reply)."""
    header, data = packed
    if header is None:
        return NO_DIFFS
    if writer is not None and memoryview(data).nbytes >= replies.INLINE_LIMIT:
        try:
            offset, length = writer.put(data)
            return ShippedDiffs(header, None, offset, length)
        except OSError:  # no room for the buffer: send it inline
            pass
    return ShippedDiffs(header, bytes(data))


class _WorkerLoop:
    """A worker process: attach snapshots, run threads, send back diffs."""

    def __init__(self, conn: connection.Connection) -> None:
        self.conn = conn
        self.snapshot: Snapshot | None = None
        self.home: tuple[list[str], str | None] | None = None  # the parent's sys.path and cwd
        self.space = combine.CombiningWorkspace()
        self.writer: replies.ReplyWriter | None = None

    def serve(self) -> None:
        while True:
            try:
                message = loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return
            if isinstance(message, Stop):
                return
            if isinstance(message, Prepare):
                self.home = (list(message.path), message.cwd)
                _go_home(self.home)
            elif isinstance(message, AttachSnapshot):
                fd = reduction.recv_handle(self.conn)
                if self.snapshot is not None:
                    self.snapshot.close()
                self.snapshot = Snapshot.attach(fd, message.size, message.max_size)
                os.close(fd)
            elif isinstance(message, AttachReplies):
                if self.writer is not None:
                    self.writer.close()
                self.writer = replies.ReplyWriter(reduction.recv_handle(self.conn))
            else:
                self.run_batch(message)
                # Loading the function may have imported a module that moved;
                # the thread function may have changed both.
                _go_home(self.home)

    def reply(self, seq: int, index: int, error: str, dirty: int = 0) -> None:
        """A thread's failure."""
        _send(self.conn, ThreadReply(index, None, dirty, error, NO_DIFFS, seq))

    def run_batch(self, batch: RunBatch) -> None:
        assert self.snapshot is not None, "a batch arrived before its snapshot"
        combining = combine.combines(batch.regions, len(batch.indexes))  # the parent waits for GroupEnd then
        try:
            self.snapshot.follow_size(batch.size)
            fn = cloudpickle.loads(batch.fn)
            args = cloudpickle.loads(batch.args)
            restore_code_files(fn, batch.files)
        except BaseException:
            error = "cannot load the thread function:\n" + format_exc()
            for i in batch.indexes:
                self.reply(batch.seq, i, error)
            if combining:
                _send(self.conn, GroupEnd(batch.seq, None, NO_DIFFS))
            return
        if self.writer is not None:
            self.writer.start_batch()
        spec = BatchSpec(fn, batch.n, args, self.snapshot, batch.layout, batch.regions, batch.mode,
                         batch.version)
        reported: set[int] = set()

        def report(outcome: ThreadOutcome) -> None:
            result: bytes | None = None
            packed: tuple[Any, Any] = (None, b"")
            if outcome.error is None:
                try:
                    result = cloudpickle.dumps(outcome.result)
                    packed = combine.pack(outcome.diffs)
                except BaseException:
                    outcome.error = "cannot send the result back:\n" + format_exc()
            exception, note = pickled_exception(outcome.exception)
            _send(self.conn, ThreadReply(outcome.index, result, outcome.dirty_pages,
                                         None if outcome.error is None else outcome.error + note,
                                         _shipped(self.writer, packed), batch.seq, exception))
            reported.add(outcome.index)  # only once its reply is sent

        packed: tuple[Any, Any] = (None, b"")
        failure: str | None = None
        try:
            packed = combine.pack(self.space.run_combining(spec, batch.indexes, report))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # combining failed (e.g. no memory): the batch fails
            failure = "the worker could not run or combine the threads:\n" + format_exc()
        if failure is not None:  # every thread still owed a reply gets the failure
            for i in batch.indexes:
                if i not in reported:
                    self.reply(batch.seq, i, failure)
        if combining:
            _send(self.conn, GroupEnd(batch.seq, failure, _shipped(self.writer, packed)))


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
        self.pidfd = _pidfd(self.process.pid)
        self.slot = slot
        log.info("worker process %d started (pid %d)", slot, self.process.pid)
        self.snapshot_key: tuple[int, int] | None = None
        self.replies: replies.ReplyReader | None = None
        self.prepared: tuple[list[str], str | None] | None = None

    def ensure_replies(self) -> int:
        """Passes this worker its reply buffer, once."""
        if self.replies is not None:
            return 0
        reader = replies.ReplyReader(replies.create())
        try:
            sent = _send(self.conn, AttachReplies())
            self.conn.send_handle(reader.fd)
        except BaseException:
            reader.close()
            raise
        self.replies = reader
        return sent

    def payload(self, diffs: ShippedDiffs) -> Any:
        """The diff data a reply points to (see _shipped); ValueError if it
        points outside the reply buffer."""
        if diffs.header is None:
            return b""
        if diffs.inline is not None:
            return diffs.inline
        if self.replies is None:
            raise ValueError("a reply points into a buffer this worker was never given")
        return self.replies.get(int(diffs.offset), int(diffs.length))

    def ensure_prepared(self, preparation: tuple[list[str], str | None]) -> int:
        """Sends the parent's sys.path and cwd unless this worker has them."""
        if self.prepared == preparation:
            return 0
        sent = _send(self.conn, Prepare(*preparation))
        self.prepared = preparation
        return sent

    def ensure_snapshot(self, snapshot: Snapshot) -> int:
        """Sends the snapshot's memfd unless this worker already has it."""
        key = (id(snapshot), snapshot.fd)
        if self.snapshot_key == key:
            return 0
        sent = _send(self.conn, AttachSnapshot(snapshot.size, snapshot.max_size))
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
                _send(self.conn, Stop())
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
        """Releases what the parent holds of a worker it forgets: its reply
        buffer and its pidfd."""
        if self.replies is not None:
            self.replies.close()
            self.replies = None
        with _PIDFDS:
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None

    def abort(self) -> None:
        """Kills the worker (SIGKILL through its pidfd) from any thread,
        without waiting: the thread reading its socket gets EOF."""
        with _PIDFDS:
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:  # it has exited
                    pass


@dataclass
class _Run:
    """One batch on the pool, while it runs."""

    seq: int
    outcomes: dict[int, ThreadOutcome] = field(default_factory=dict)
    pending: dict[int, set[int]] = field(default_factory=dict)  # slot -> replies still due
    used: dict[int, _Worker] = field(default_factory=dict)  # slot -> its worker for this batch
    first: dict[int, int] = field(default_factory=dict)  # slot -> its first thread
    combined: dict[int, DiffBatch] = field(default_factory=dict)  # slot -> its combined diffs
    shipped: int = 0  # bytes sent and received


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
        self._running: tuple[Cancel, _Run] | None = None  # the batch run() is running (for abort())

    def _worker(self, slot: int) -> _Worker:
        w = self._workers[slot]
        if w is None or not w.alive():
            if w is not None:  # it ended between batches
                w.conn.close()
                w.drop_replies()
                self.replaced += 1
                log.info("worker process %d (pid %d) had ended (exit code %s); starting another", slot,
                         w.process.pid, w.process.returncode)
            w = self._workers[slot] = _Worker(slot)
        return w

    def run(self, spec: BatchSpec, placement: Sequence[int], cancel: Cancel) -> BatchResult:
        self._seq += 1
        run = _Run(self._seq)  # replies carry its seq: a reply is only ever read by its own batch
        try:
            call = RunBatch(run.seq, spec.version, spec.snapshot.size, spec.n, spec.dumps(spec.fn),
                            spec.dumps(spec.args), spec.layout, spec.merge_regions, spec.tracking, [],
                            code_files(spec.fn))
        except Exception as exc:
            raise PageforkError(f"cannot send the thread function or its arguments to worker processes "
                                f"(they travel pickled): {exc!r}") from exc
        self._running = (cancel, run)
        try:
            preparation = _preparation()
            for slot, indexes in group_by_slot(placement).items():
                cancel.check()
                self._check_open()
                self._start(run, slot, spec, call._replace(indexes=indexes), preparation)
            while run.pending:
                cancel.check()
                self._check_open()
                for slot in self._ready(run):
                    self._receive(run, slot, cancel)
        except BaseException:  # cancelled (or broken): workers still busy are in an unknown state
            for slot in run.pending:
                self._drop(slot, kill=True)
            raise
        finally:
            self._running = None
        return BatchResult([run.outcomes[i] for i in sorted(run.outcomes)], list(run.combined.values()),
                           run.shipped)

    def _start(self, run: _Run, slot: int, spec: BatchSpec, call: RunBatch,
               preparation: tuple[list[str], str | None]) -> None:
        """Sends slot ``slot``'s worker what it lacks and its threads; a
        worker that cannot be reached fails them."""
        w = run.used[slot] = self._worker(slot)  # (close() may empty self._workers meanwhile)
        try:
            run.shipped += w.ensure_prepared(preparation)
            run.shipped += w.ensure_snapshot(spec.snapshot)
            run.shipped += w.ensure_replies()
            run.shipped += _send(w.conn, call)
        except (OSError, ValueError) as exc:
            self._check_open()
            why = f"cannot reach worker {slot}: {exc}"
            if not w.alive():
                why = w.why_lost(slot) or why
            self._drop(slot)
            for i in call.indexes:
                run.outcomes[i] = ThreadOutcome(i, error=why)
            return
        run.pending[slot] = set(call.indexes) | (
            {_END} if combine.combines(spec.merge_regions, len(call.indexes)) else set())
        run.first[slot] = call.indexes[0]

    def _ready(self, run: _Run) -> list[int]:
        """The slots of ``run`` with a reply to read (waiting at most POLL)."""
        waits: dict[Any, int] = {run.used[slot].conn: slot for slot in run.pending}
        try:
            return [waits[ready] for ready in connection.wait(list(waits), POLL)]
        except (OSError, ValueError):  # a socket close() closed meanwhile
            self._check_open()
            raise

    def _receive(self, run: _Run, slot: int, cancel: Cancel) -> None:
        """Reads one reply from slot ``slot``'s worker into ``run``."""
        w = run.used[slot]
        try:
            data = w.conn.recv_bytes()
        except (EOFError, OSError):  # the worker died (its socket closed), or abort() killed it
            self._check_open()
            cancel.check()
            self._lost(run, slot)
            return
        try:
            message = loads(data, REPLIES)
            payload = w.payload(message.diffs)
        except ValueError as exc:  # not a reply: the worker's state is unknown
            self._lost(run, slot, malformed=str(exc))
            return
        run.shipped += len(data)  # with inline payloads
        if message.diffs.header is not None and message.diffs.inline is None:
            run.shipped += memoryview(payload).nbytes  # through the reply buffer
        if message.seq != run.seq:
            return  # cannot happen: workers of cancelled batches are replaced
        if isinstance(message, GroupEnd):
            error = message.error
            try:
                batch = combine.unpack(message.diffs.header, payload)
            except CorruptDataError as exc:
                error = f"worker {slot} sent malformed combined diffs: {exc}"
            if error is not None:
                i = run.first[slot]
                run.outcomes[i] = ThreadOutcome(i, error=error)
            elif batch is not None:
                run.combined[slot] = batch
            i = _END
        else:
            i = message.thread
            outcome = thread_outcome(message, lambda: combine.unpack(message.diffs.header, payload),
                                     "in the parent")
            run.outcomes.setdefault(i, outcome)  # a GroupEnd's error may have claimed it
        run.pending[slot].discard(i)
        if not run.pending[slot]:
            del run.pending[slot]

    def _lost(self, run: _Run, slot: int, malformed: str | None = None) -> None:
        """Fails the threads a worker that died (or sent a ``malformed``
        reply: it is killed) still owed (its first one if only its GroupEnd
        was due) and forgets the worker."""
        w = run.used[slot]
        pid = w.process.pid
        if malformed is not None:
            self._drop(slot, kill=True, why="sent a malformed reply and is killed")
            def why(i: int) -> str:
                return (f"worker process {slot} (pid {pid}) sent a malformed reply while running thread {i} "
                        f"({malformed}); it was killed")
        else:
            code = w.exit_code()
            lost = w.why_lost(slot)
            self._drop(slot)
            def why(i: int) -> str:
                return lost or f"worker process {slot} (pid {pid}) died while running thread {i} (exit code {code})"
        for i in sorted(run.pending.pop(slot) - {_END}) or [run.first[slot]]:
            run.outcomes[i] = ThreadOutcome(i, error=why(i))

    def abort(self, cancel: Cancel) -> None:
        """Kills the workers still running the batch ``cancel`` belongs to
        (if it is the one running), from any thread, without waiting: for a
        batch that was cancelled and has not let go (the executor calls this
        after a grace), as the batch thread may be blocked reading a reply a
        worker sent only half of. The batch thread then reads EOF, and
        replaces the workers as for any cancelled batch. (Without pidfds,
        before Linux 5.3, it does nothing.)"""
        running = self._running
        if running is not None and running[0] is cancel:  # never a later batch's workers
            run = running[1]
            for slot in tuple(run.pending):  # (copied under the GIL: the batch thread changes it)
                run.used[slot].abort()

    def _check_open(self) -> None:
        """Raises if close() ran (on another thread: an App collected, or
        closed at interpreter exit) while a batch was running."""
        if self._closed:
            raise PageforkError("the App was closed while the batch ran (by another thread, or at "
                                "interpreter exit); nothing merged")

    def _drop(self, slot: int, kill: bool = False,
              why: str = "is killed: its batch was cancelled, its state is unknown") -> None:
        """Forgets a worker that died or whose state is unknown (``kill``:
        ends it, saying ``why``); the next batch starts a new one."""
        w, self._workers[slot] = self._workers[slot], None
        if w is not None:  # the worker is dealt with first, then logged (logging never comes first)
            if kill:
                w.kill()
            else:
                w.conn.close()
            w.drop_replies()
            self.replaced += 1
            log.info("worker process %d (pid %d) %s; another starts for the next batch", slot, w.process.pid,
                     why if kill else "was lost")

    def close(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        self._closed = True
        workers, self._workers = self._workers, [None] * self.slots
        for w in workers:  # ask all first, so they stop in parallel
            if w is not None:
                try:
                    _send(w.conn, Stop())
                except (OSError, ValueError):
                    pass
        for w in workers:
            if w is not None:
                w.close(max(0.0, deadline - time.monotonic()), ask=False)
        return 0


if __name__ == "__main__":
    die_with_parent(int(sys.argv[2]))
    _WorkerLoop(connection.Connection(int(sys.argv[1]))).serve()
