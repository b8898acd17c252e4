"""What fork() means for pagefork, in one place.

A fork()ed child must renew locks: only the forking thread exists there, so
a lock another thread held at fork() would never be released. Modules
register the objects that hold such locks (:func:`renewed_in_child`); the
child renews each one still alive (one os.register_at_fork hook).

A child fork()ed by a thread function that returns into pagefork (no
``os._exit``) would be handed back to the code that called the function: in
a worker process, a loop that reports for the worker on the parent's socket;
on the threads backend, a pool thread waiting for jobs that never come. A
child never speaks for its parent: :func:`leave_if_forked` ends it the way
a ``multiprocessing`` child ends (status 0 when the function returned, the
code of a ``SystemExit``, or 1 with the traceback on stderr)."""

from __future__ import annotations

import os
import sys
import traceback
import weakref
from typing import Any, TypeVar
from collections.abc import Callable

__all__ = ["renewed_in_child", "leave_if_forked"]

T = TypeVar("T")

_RENEWALS: list[tuple[weakref.WeakSet[Any], Callable[[Any], None]]] = []


def renewed_in_child(renew: Callable[[T], None]) -> weakref.WeakSet[T]:
    """A weak set of objects: in a fork()ed child, ``renew(obj)`` runs for
    each one still alive, before any other code of the child."""
    objects: weakref.WeakSet[T] = weakref.WeakSet()
    _RENEWALS.append((objects, renew))
    return objects


def _after_fork_in_child() -> None:
    for objects, renew in _RENEWALS:
        for obj in list(objects):
            renew(obj)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit_code(error: BaseException | None) -> int:
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        code = error.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    traceback.print_exception(error)
    return 1


def leave_if_forked(pid: int, error: BaseException | None) -> None:
    """Ends this process at once if it is not ``pid`` (the process that
    called the thread function): a child the function forked, returning
    normally (``error`` None) or raising ``error``."""
    if os.getpid() == pid:
        return
    try:
        code = _exit_code(error)
    except BaseException:
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # a closed or broken stream must not keep the child alive
            pass
    os._exit(code)
