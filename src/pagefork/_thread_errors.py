"""How a thread function's exception reaches the caller: as text that leads
with the user's frame, and as the exception itself (``WorkerError.__cause__``)
wherever it can be rebuilt in the caller: the object itself on the threads
backend, pickled from worker processes and Dask workers."""

from __future__ import annotations

import builtins
import os
import sys
import sysconfig
import traceback
import types
from typing import Any, Protocol
from collections.abc import Sequence

import cloudpickle

from ._errors import WorkerError

__all__ = ["PREPARATION", "thread_error", "formatted", "format_exc", "pickled_exception", "rebuilt_exception",
           "worker_error", "code_files", "restore_code_files"]

#: How the text of a thread whose memory could not be prepared begins.
PREPARATION = "cannot prepare thread memory: "

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Where a frame is not the user's own code: Python's library and installed packages.
_LIBRARIES = tuple(sorted({os.path.join(p, "") for p in (sysconfig.get_paths().get(k) for k in
                                                          ("stdlib", "platstdlib", "purelib", "platlib")) if p}))


# Python 3.11's exception groups (absent on 3.10: nothing is one).
_GROUPS: tuple[type, ...] = tuple(t for t in (getattr(builtins, "BaseExceptionGroup", None),) if t is not None)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it chains (cause, context and an
    exception group's members), once each."""
    seen: dict[int, BaseException] = {}
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen[id(e)] = e
        try:
            todo += [c for c in (e.__cause__, e.__context__) if isinstance(c, BaseException)]
            if isinstance(e, _GROUPS):
                todo += [m for m in e.exceptions if isinstance(m, BaseException)]  # type: ignore[attr-defined]
        except Exception:  # a subclass's property that raises: what it hides is out of reach
            pass
    return list(seen.values())


def _plain_line(exc: BaseException) -> str:
    """``exc``'s last traceback line made without ``traceback`` (which
    raises where a ``__notes__`` property does): its type and str."""
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = f"{cls.__module__}.{name}"
    try:
        text = str(exc)
    except Exception:
        text = "<exception str() failed>"
    return f"{name}: {text}" if text else name


def _exception_line(exc: BaseException) -> str:
    """The line that names ``exc`` (its first, if it has several)."""
    try:
        lines = "".join(traceback.format_exception_only(exc)).splitlines()
        return next((line for line in lines if line and not line.startswith(" ")), type(exc).__name__)
    except Exception:
        return _plain_line(exc)


def formatted(exc: BaseException | None) -> str:
    """``traceback.format_exception``'s text of ``exc``; where that raises
    (a ``__notes__`` property that does), its own traceback and a plain line
    without notes or chained exceptions."""
    if exc is None:
        return "NoneType: None\n"
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return ("Traceback (most recent call last):\n" + "".join(traceback.format_tb(exc.__traceback__))
                + _plain_line(exc) + "\n")


def format_exc() -> str:
    """``traceback.format_exc``, never raising (see :func:`formatted`)."""
    return formatted(sys.exc_info()[1])


def thread_error(exc: BaseException) -> str:
    """The text of a thread function's exception: a first line naming the
    exception and the user's frame it came from (the innermost frame outside
    pagefork, Python's library and installed packages; else the thread
    function's), then its traceback without pagefork's frames that called
    the thread function. An exception that ``traceback`` cannot describe (a
    ``__notes__`` property that raises) gets its own traceback and a plain
    line (:func:`formatted`).

    Drops the tracebacks of ``exc`` and the exceptions it chains once
    formatted: their frames would keep the thread's memory and the worker's
    state alive for as long as the caller keeps the error (the text keeps
    the traceback; an exception pickled from a worker has none either)."""
    described: traceback.TracebackException | None
    try:
        described = traceback.TracebackException.from_exception(exc)
        stack = described.stack
    except Exception:
        described, stack = None, traceback.extract_tb(exc.__traceback__)
    inside = next((k for k, f in enumerate(stack) if not f.filename.startswith(_PACKAGE)), None)
    if inside:  # raised below the thread function: start there
        del stack[:inside]
    head = _exception_line(exc)
    users = [f for f in stack if not f.filename.startswith((_PACKAGE, *_LIBRARIES))]
    frame = users[-1] if users else (stack[0] if inside is not None else None)
    try:
        text = "".join(described.format()) if described is not None else None
    except Exception:
        text = None
    if text is None:
        text = "Traceback (most recent call last):\n" + "".join(stack.format()) + _plain_line(exc) + "\n"
    if frame is not None:
        head += f" (in {frame.name}, {frame.filename}, line {frame.lineno})"
    for e in _chain(exc):
        try:
            e.__traceback__ = None
        except Exception:  # (a subclass's property)
            pass
    return head + "\n" + text


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


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}: repr() failed>"


def rebuilt_exception(data: bytes | None) -> tuple[BaseException | None, str]:
    """The exception :func:`pickled_exception` sent, or None and a note
    saying why it cannot be rebuilt here."""
    if data is None:
        return None, ""
    try:
        exc = cloudpickle.loads(data)
    except BaseException as why:  # whatever its __reduce__ raises, even KeyboardInterrupt or SystemExit
        # (this runs on the batch thread or while decoding a reply: a real Ctrl-C never lands here)
        return None, f"\n(the exception itself could not be rebuilt here, only this text: {_safe_repr(why)})"
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


#: How many objects :func:`_functions` looks at, at most (a closure may reach
#: a large graph: the file names are worth a bounded walk only).
_WALK_LIMIT = 2000


def _by_value(fn: types.FunctionType) -> bool:
    """Whether cloudpickle sends function ``fn`` by value: it is
    ``__main__``'s or local to a function (in the parent), or came by value
    (in a worker: its code has no file yet)."""
    return (fn.__module__ == "__main__" or "<locals>" in fn.__qualname__
            or fn.__code__.co_filename == _DYNAMIC)


def _class_by_value(cls: type) -> bool:
    """Whether cloudpickle sends class ``cls`` by value: as a function (in
    the parent), or (in a worker, where such a class comes back without its
    qualified name) one of its functions came by value."""
    return (cls.__module__ == "__main__" or "<locals>" in cls.__qualname__
            or any(isinstance(v, types.FunctionType) and v.__code__.co_filename == _DYNAMIC
                   for v in vars(cls).values()))


def _functions(fn: Any) -> list[types.FunctionType]:
    """``fn`` and the functions it reaches that travel with it by value
    (:func:`_by_value`): the module functions its code names, the functions
    in its closure, the functions and methods of the classes it reaches, and
    so on recursively (each once, at most :data:`_WALK_LIMIT` objects)."""
    found: list[types.FunctionType] = []
    seen: set[int] = set()
    todo: list[Any] = [fn]
    while todo and len(seen) < _WALK_LIMIT:
        obj = todo.pop()
        if isinstance(obj, (staticmethod, classmethod, types.MethodType)):
            obj = obj.__func__
        elif isinstance(obj, property):
            todo += [obj.fget, obj.fset, obj.fdel]
            continue
        if id(obj) in seen:
            continue
        if isinstance(obj, type) and _class_by_value(obj):
            seen.add(id(obj))  # (every object walked stays alive: fn reaches it)
            todo += list(vars(obj).values())
        elif isinstance(obj, types.FunctionType) and (obj is fn or _by_value(obj)):
            seen.add(id(obj))
            found.append(obj)
            todo += [obj.__globals__.get(name) for code in _nested(obj.__code__) for name in code.co_names]
            for cell in obj.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # a cell not filled yet
                    pass
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
    try:
        functions = _functions(fn)
    except Exception:  # an object that fights isinstance (its __class__ raises): only the file names are at stake
        functions = [fn] if isinstance(fn, types.FunctionType) else []
    return {(c.co_name, c.co_firstlineno): c.co_filename for f in functions for c in _nested(f.__code__)}


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
