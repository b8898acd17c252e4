"""How a thread function's exception reaches the caller: as text that leads
with the user's frame, and as the exception itself (``WorkerError.__cause__``)
wherever it can be rebuilt in the caller: the object itself on the threads
backend, pickled from worker processes and Dask workers."""

from __future__ import annotations

import os
import sysconfig
import traceback
import types
from typing import Any, Protocol
from collections.abc import Sequence

import cloudpickle

from ._errors import WorkerError

__all__ = ["PREPARATION", "thread_error", "pickled_exception", "rebuilt_exception", "worker_error", "code_files",
           "restore_code_files"]

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


# cloudpickle sends code by value (functions of __main__, lambdas, local
# functions) without its file name: a worker's traceback would say
# File "<dynamic-code>". The parent sends the names along and the worker
# puts them back, so the text names the user's file (and, where the worker
# can read the file, shows its lines).
_DYNAMIC = "<dynamic-code>"


def _functions(fn: Any) -> list[types.FunctionType]:
    """``fn`` and the functions of its module it names (its helpers)."""
    if not isinstance(fn, types.FunctionType):
        return []
    found = [fn]
    for name in fn.__code__.co_names:
        helper = fn.__globals__.get(name)
        if isinstance(helper, types.FunctionType) and helper is not fn:
            found.append(helper)
    return found


def _nested(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and the code objects defined inside it."""
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _nested(const)
    return found


def code_files(fn: Any) -> dict[tuple[str, int], str]:
    """(name, first line) -> file of the code a worker runs for ``fn``: its
    own, its helpers' (:func:`_functions`) and the code nested in them."""
    return {(c.co_name, c.co_firstlineno): c.co_filename
            for f in _functions(fn) for c in _nested(f.__code__)}


def _renamed(code: types.CodeType, files: dict[tuple[str, int], str]) -> types.CodeType:
    consts = tuple(_renamed(c, files) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    changes: dict[str, Any] = {}
    if any(a is not b for a, b in zip(consts, code.co_consts)):
        changes["co_consts"] = consts
    name = files.get((code.co_name, code.co_firstlineno))
    if code.co_filename == _DYNAMIC and name is not None:
        changes["co_filename"] = name
    return code.replace(**changes) if changes else code


def restore_code_files(fn: Any, files: dict[tuple[str, int], str]) -> None:
    """In a worker: gives the code of ``fn`` (and its helpers) that
    cloudpickle sent by value its file names back (:func:`code_files`)."""
    try:
        for f in _functions(fn):
            f.__code__ = _renamed(f.__code__, files)
    except Exception:  # only the tracebacks' file names are at stake: never fail the batch for them
        pass
