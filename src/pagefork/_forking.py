"""What a fork()ed child must renew: only the forking thread exists there,
so a lock another thread held at fork() would never be released. Modules
register the objects that hold such locks; the child renews each one still
alive (the os.register_at_fork hook, once for the package)."""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable, TypeVar

__all__ = ["renewed_in_child"]

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
