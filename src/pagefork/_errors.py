"""pagefork's exceptions, and the one place native OSErrors become them."""

from __future__ import annotations

import errno
from typing import Any

__all__ = [
    "PageforkError",
    "UnsupportedModeError",
    "CorruptDataError",
    "OutOfBoundsError",
    "MergeError",
    "ConflictError",
    "WorkerError",
    "VersionPrunedError",
]


class PageforkError(Exception):
    """Base class of every error pagefork raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from args and attributes, not by calling the constructor:
        # subclasses take their attributes as keywords (pickle would drop them).
        return (_rebuild, (type(self), self.args, self.__dict__))


class UnsupportedModeError(PageforkError):
    """A tracking mode cannot work on this kernel or for this memory.

    ``mode`` names it and ``reason`` says exactly what is missing.
    """

    def __init__(self, mode: str, reason: str) -> None:
        super().__init__(f"tracking mode {mode!r} is unavailable: {reason}")
        self.mode = mode
        self.reason = reason


class CorruptDataError(PageforkError, ValueError):
    """Encoded data (wire format, delta, a checkpoint) is malformed.

    For a damaged or missing checkpoint object, ``version`` is the
    checkpoint version being read and ``object`` the object's name; both
    are None for other data.
    """

    def __init__(self, message: str, *, version: int | None = None, object: str | None = None) -> None:
        super().__init__(message)
        self.version = version
        self.object = object


class OutOfBoundsError(PageforkError, IndexError):
    """An offset or length falls outside the memory it addresses."""


class MergeError(PageforkError):
    """A diff cannot be merged (e.g. PRODUCT over an integer zero)."""


class ConflictError(PageforkError):
    """Two threads wrote different bytes to the same overwrite location."""


class WorkerError(PageforkError):
    """A thread of a batch raised or its worker died.

    ``thread`` is the index of the thread reported (the first that failed,
    preferring one whose memory could not be prepared, as that explains the
    others), ``traceback`` its formatted traceback (or why its worker died),
    and ``failed`` the indexes of every thread that failed.
    """

    def __init__(self, message: str, *, thread: int, traceback: str, failed: list[int]) -> None:
        super().__init__(message)
        self.thread = thread
        self.traceback = traceback
        self.failed = failed


class VersionPrunedError(PageforkError):
    """A checkpoint version was deleted (pruned by a writer's ``keep=``)
    while it was being read: the version is gone, nothing is damaged.
    ``version`` names it."""

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Unpickles an error whose constructor takes keyword-only attributes."""
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


def native_error(exc: OSError, what: str) -> PageforkError:
    """Wraps an OSError from the native core in a PageforkError naming ``what``."""
    hint = {
        errno.EPERM: " (not permitted: see `pagefork doctor`)",
        errno.ENOMEM: " (out of memory or address space)",
        errno.EINVAL: " (the kernel rejected the request for this memory)",
    }.get(exc.errno or 0, "")
    err = PageforkError(f"{what}: {exc.strerror or exc}{hint}")
    err.__cause__ = exc
    return err
