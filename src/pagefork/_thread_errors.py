"""How a thread function's exception reaches the caller: as text that leads
with the user's frame, and as the exception itself (``WorkerError.__cause__``)
wherever it can be rebuilt in the caller: the object itself on the threads
backend, pickled from worker processes and Dask workers."""

from __future__ import annotations

import os
import sysconfig
import traceback
from typing import Protocol
from collections.abc import Sequence

import cloudpickle

from ._errors import WorkerError

__all__ = ["PREPARATION", "thread_error", "pickled_exception", "rebuilt_exception", "worker_error"]

#: How the text of a thread whose memory could not be prepared begins.
PREPARATION = "cannot prepare thread memory: "

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Where a frame is not the user's own code: Python's library and installed packages.
_LIBRARIES = tuple(sorted({os.path.join(p, "") for p in (sysconfig.get_paths().get(k) for k in
                                                          ("stdlib", "platstdlib", "purelib", "platlib")) if p}))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it chains (cause and context), once each."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return seen


def thread_error(exc: BaseException) -> str:
    """The text of a thread function's exception: a first line naming the
    exception and the user's frame it came from (the innermost frame outside
    pagefork, Python's library and installed packages; else the thread
    function's), then its traceback without pagefork's frames that called
    the thread function.

    Drops the tracebacks of ``exc`` and the exceptions it chains once
    formatted: their frames would keep the thread's memory and the worker's
    state alive for as long as the caller keeps the error (the text keeps
    the traceback; an exception pickled from a worker has none either)."""
    described = traceback.TracebackException.from_exception(exc)
    stack = described.stack
    inside = next((k for k, f in enumerate(stack) if not f.filename.startswith(_PACKAGE)), None)
    if inside:  # raised below the thread function: start there
        del stack[:inside]
    lines = "".join(traceback.format_exception_only(exc)).splitlines()
    head = next((line for line in lines if line and not line.startswith(" ")), type(exc).__name__)
    users = [f for f in stack if not f.filename.startswith((_PACKAGE, *_LIBRARIES))]
    frame = users[-1] if users else (stack[0] if inside is not None else None)
    if frame is not None:
        head += f" (in {frame.name}, {frame.filename}, line {frame.lineno})"
    for e in _chain(exc):
        e.__traceback__ = None
    return head + "\n" + "".join(described.format())


def pickled_exception(exc: BaseException | None) -> tuple[bytes | None, str]:
    """``exc`` pickled to travel to the caller (cloudpickle: classes of
    ``__main__`` by value), or None and a note saying why it cannot."""
    if exc is None:
        return None, ""
    try:
        return cloudpickle.dumps(exc), ""
    except BaseException as why:  # whatever its __reduce__ does
        return None, (f"\n(the {type(exc).__name__} itself could not be sent back, only this text: "
                      f"{why!r})")


def rebuilt_exception(data: bytes | None) -> tuple[BaseException | None, str]:
    """The exception :func:`pickled_exception` sent, or None and a note
    saying why it cannot be rebuilt here."""
    if data is None:
        return None, ""
    try:
        exc = cloudpickle.loads(data)
    except (Exception, SystemExit) as why:  # an exception's __reduce__ may call sys.exit
        return None, f"\n(the exception itself could not be rebuilt here, only this text: {why!r})"
    if not isinstance(exc, BaseException):
        return None, f"\n(the exception came back as a {type(exc).__name__}, not an exception)"
    return exc, ""


class _Failed(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def exception(self) -> BaseException | None: ...


def worker_error(failed: Sequence[_Failed], n: int) -> WorkerError:
    """The WorkerError of a batch of ``n`` threads where ``failed`` failed:
    it reports the first, preferring one whose memory could not be prepared
    (that explains the others), and its ``__cause__`` is that thread's
    exception where it could be rebuilt here."""
    first = min(failed, key=lambda o: (not (o.error or "").startswith(PREPARATION), o.index))
    error = first.error or ""
    err = WorkerError(f"thread {first.index} of {n} failed: {error}", thread=first.index, traceback=error,
                      failed=[o.index for o in failed])
    err.__cause__ = first.exception
    return err
