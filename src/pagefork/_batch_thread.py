"""The batch thread: the one Python thread on which an executor's batches
and everything else that changes main memory run, one request at a time.

Python raises KeyboardInterrupt only in the main thread, so work done here
is never cut off half-way; a caller that is interrupted cancels its request
instead (:meth:`Request.interrupt`) and waits until it lets go.
"""

from __future__ import annotations

import _thread
import queue
import threading
from typing import Any, Protocol
from collections.abc import Callable

from .batch import Cancel

__all__ = ["Latch", "Request", "Server", "manage"]


class Latch:
    """Set once by the batch thread; waited for by callers that Ctrl-C may
    interrupt at any bytecode. threading.Event is not safe there: a
    KeyboardInterrupt raised while Condition.wait re-acquires the Event's
    lock leaves the waiter releasing a lock it never got back, which is the
    one the batch thread holds while setting it (the batch thread then dies
    with "release unlocked lock"). A bare lock's timed acquire is either
    completed or not, and the flag is read first."""

    def __init__(self) -> None:
        self._flag = False
        self._lock = _thread.allocate_lock()
        self._lock.acquire()  # released once, by set()

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float) -> bool:
        """Whether it is set, waiting at most ``timeout`` seconds."""
        if self._flag:
            return True
        if self._lock.acquire(True, timeout):
            self._lock.release()  # for other waiters; an interrupt before this only costs them a poll
        return self._flag


class Request:
    """One piece of work for the batch thread (a batch, an alloc, a close),
    and how it ended."""

    def __init__(self, work: Callable[[Request], Any], cancellable: bool = True,
                 skippable: bool = True) -> None:
        self.work = work
        self.cancellable = cancellable  # may be stopped once started (batches)
        self.skippable = skippable      # may be dropped before it starts (not close)
        self.cancel = Cancel()
        self.lock = threading.Lock()  # orders cancelling against starting and committing
        self.started = False
        self.committing = False
        self.why = ""
        self.done = Latch()
        self.result: Any = None
        self.error: BaseException | None = None

    def interrupt(self, why: str = "interrupted") -> bool:
        """Cancels the work if it has not started (and may be skipped), or
        has started, may be stopped, and has not begun to merge. Returns
        whether the caller must wait for it to let go (it started)."""
        with self.lock:
            if self.cancel.is_set() or self.committing:
                return self.started
            if (self.skippable and not self.started) or (self.cancellable and self.started):
                self.why = why
                self.cancel.set()
            return self.started

    def start(self) -> bool:
        """Called by the batch thread; False if the work was dropped first."""
        with self.lock:
            if self.cancel.is_set():
                return False
            self.started = True
            return True

    def begin_commit(self) -> bool:
        """From here on the batch merges whatever happens; False if it was
        cancelled first."""
        with self.lock:
            if self.cancel.is_set():
                return False
            self.committing = True
            return True


class Server(Protocol):
    """What the batch thread serves requests for (the executor)."""

    def serve(self, request: Request) -> None:
        """Runs one request; whatever it raises is kept in the request."""
        ...


def manage(server_ref: Callable[[], Server | None], requests: queue.SimpleQueue, alive: threading.Event) -> None:
    """The batch thread: serves queued requests one at a time until it gets
    None or the server is gone (it holds only a weak reference, so an
    executor dropped without close() is still collected)."""
    try:
        while True:
            request = requests.get()
            if request is None:
                return
            server = server_ref()
            if server is None:
                return
            try:
                server.serve(request)
            finally:
                request.done.set()
                del server, request
    finally:
        alive.clear()

