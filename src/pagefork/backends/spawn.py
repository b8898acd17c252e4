"""Starting worker processes, and the parent's end of their sockets.

Workers die with their parent: each asks the kernel for SIGKILL when its
parent dies (PR_SET_PDEATHSIG, :func:`die_with_parent`) and exits at once if
the parent was gone before it asked. The kernel sends that signal when the
*thread* that forked the worker ends, so every worker of this process is
started by one thread that lives as long as the process (:class:`Spawner`),
never by a caller's thread or an App's batch thread. Writes to a worker use
MSG_NOSIGNAL (:class:`WorkerConnection`): a program that restored SIGPIPE's
default action would be killed by a write to a worker that had exited.
"""

from __future__ import annotations

import _thread
import array
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing import connection
from typing import Any

from .._errors import PageforkError
from .._forking import renewed_in_child
from .._limits import cannot_start, is_out_of_tasks
from ..batch import POLL

__all__ = ["WorkerConnection", "Spawner", "spawn_worker", "die_with_parent", "worker_env"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerConnection(connection.Connection):
    """The parent's end of a worker's socket. Writes use MSG_NOSIGNAL, so a
    write to a worker that has exited raises BrokenPipeError and never
    SIGPIPE, whatever the program set SIGPIPE to. The socket object owns the
    descriptor (and is blocking whatever ``socket.setdefaulttimeout`` says)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        self._sock = sock
        super().__init__(sock.fileno())

    def _send(self, buf: Any, write: Any = None) -> None:
        view = memoryview(buf).cast("B")
        while view.nbytes:
            view = view[self._sock.send(view, socket.MSG_NOSIGNAL):]

    def _close(self, _close: Any = None) -> None:
        self._sock.close()

    def send_handle(self, fd: int) -> None:
        """Passes descriptor ``fd`` (what ``reduction.recv_handle`` reads)."""
        if self.closed:
            raise OSError("handle is closed")
        self._sock.sendmsg([b"\x01"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                           socket.MSG_NOSIGNAL)


def die_with_parent(parent: int) -> None:
    """Asks the kernel to SIGKILL this worker when its parent dies, then exits
    at once if the parent died (and this worker was re-parented) before that
    was asked. The parent starts workers from a thread that lives as long as
    it does (Spawner): the signal fires when that thread ends."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError):  # no prctl: the closed socket still ends an idle worker
        pass
    if os.getppid() != parent:
        sys.stderr.write(f"pagefork worker {os.getpid()}: its parent process {parent} has ended; "
                         "exiting\n")
        sys.stderr.flush()
        os._exit(1)


def worker_env() -> dict[str, str]:
    """This environment, plus the folder pagefork itself was imported from
    (so ``-m pagefork...`` works however the parent found it)."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return env


class _SpawnJob:
    """One worker process to start on the spawner thread. The spawner owns
    ``theirs`` (the worker's end of its socket) and closes it once the
    worker has it; a caller interrupted while waiting abandons the job, and
    the spawner then kills the worker it started."""

    def __init__(self, theirs: socket.socket) -> None:
        self.theirs = theirs
        self.lock = threading.Lock()
        self.done = _thread.allocate_lock()  # released once, by run(): a bare lock's wait is interrupt-safe
        self.done.acquire()
        self.abandoned = False
        self.process: subprocess.Popen | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """On the spawner thread; the caller is released whatever happens."""
        process, error = None, None
        try:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "pagefork.backends.processes", str(self.theirs.fileno()),
                     str(os.getpid())],
                    pass_fds=[self.theirs.fileno()], stdin=subprocess.DEVNULL, env=worker_env(),
                    start_new_session=True)  # a terminal's Ctrl-C is the parent's to handle
            except BaseException as exc:
                error = exc
            finally:
                self.theirs.close()
            with self.lock:
                abandoned = self.abandoned
                self.process, self.error = process, error
            if abandoned and process is not None:
                process.kill()
                process.wait()
        finally:
            self.done.release()

    def wait(self) -> subprocess.Popen:
        """On the caller's thread: the started worker, or what stopped it."""
        try:
            while not self.done.acquire(True, POLL):
                pass
        except BaseException:
            with self.lock:
                self.abandoned = True
                process = self.process
            if process is not None:
                process.kill()
                process.wait()
            raise
        if self.error is not None:
            raise self.error
        if self.process is None:
            raise PageforkError("the thread that starts worker processes failed to start one")
        return self.process


def _serve_spawns(jobs: queue.SimpleQueue) -> None:
    """The spawner thread: runs jobs until the process exits."""
    while True:
        job = jobs.get()
        try:
            job.run()
        except BaseException:  # reported to its caller already; the thread must go on
            pass
        del job


class Spawner:
    """Starts every worker process of this process from one thread that
    lives as long as the process: a worker's parent-death signal fires when
    the thread that started it ends, so workers started by a short-lived
    caller thread (an App made in a thread pool) would die with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        _spawners.add(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it; the thread is not here

    def spawn(self, theirs: socket.socket) -> subprocess.Popen:
        job = _SpawnJob(theirs)
        with self._lock:
            if self._pid != os.getpid():  # first use, or a fork()ed child without the thread
                jobs: queue.SimpleQueue = queue.SimpleQueue()
                try:
                    # A plain thread, as the executor's batch thread: nothing
                    # joins it, and it lives until the process exits.
                    _thread.start_new_thread(_serve_spawns, (jobs,))
                except RuntimeError as exc:
                    theirs.close()
                    if is_out_of_tasks(exc):
                        raise cannot_start("the thread that starts worker processes", exc) from exc
                    raise
                self._jobs, self._pid = jobs, os.getpid()
            self._jobs.put(job)
        return job.wait()


# In a fork()ed child each spawner gets a new lock (its thread is not there:
# the first spawn starts one).
_spawners = renewed_in_child(Spawner._after_fork)
_spawner = Spawner()


def spawn_worker(theirs: socket.socket) -> subprocess.Popen:
    """A new worker process (``python -m pagefork.backends.processes``) on
    ``theirs``, its end of its socket, which this takes over."""
    return _spawner.spawn(theirs)
