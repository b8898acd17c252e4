"""pagefork's exceptions, and the one place native OSErrors become them."""

from __future__ import annotations

import errno

__all__ = [
    "PageforkError",
    "UnsupportedModeError",
    "CorruptDataError",
    "OutOfBoundsError",
    "MergeError",
    "ConflictError",
    "WorkerError",
]


class PageforkError(Exception):
    """Base class of every error pagefork raises on purpose."""


class UnsupportedModeError(PageforkError):
    """A tracking mode cannot work on this kernel or for this memory.

    ``mode`` names it and ``reason`` says exactly what is missing.
    """

    def __init__(self, mode: str, reason: str) -> None:
        super().__init__(f"tracking mode {mode!r} is unavailable: {reason}")
        self.mode = mode
        self.reason = reason


class CorruptDataError(PageforkError, ValueError):
    """Encoded data (wire format, delta) is malformed."""


class OutOfBoundsError(PageforkError, IndexError):
    """An offset or length falls outside the memory it addresses."""


class MergeError(PageforkError):
    """A diff cannot be merged (e.g. PRODUCT over an integer zero)."""


class ConflictError(PageforkError):
    """Two threads wrote different bytes to the same overwrite location."""


class WorkerError(PageforkError):
    """A thread of a batch raised or its worker died."""


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
