"""pagefork's logger, ``logging.getLogger("pagefork")``: silent unless the
program configures logging. INFO tells what changes how pagefork works
(tracking choices and fallbacks, workers started or replaced, checkpoint
bases); DEBUG adds every batch's phases and every checkpoint's decision.

Logging never changes what pagefork does: :data:`log` swallows whatever a
handler or filter raises (``logging`` itself only catches errors inside the
``emit`` of handlers that call ``handleError``), so a broken handler can
neither keep a stuck worker alive nor fail a batch that merged."""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["log", "lazy", "SafeLogger"]


class SafeLogger:
    """A logger whose calls never raise an Exception: a record that a
    handler, a filter or a formatter refuses is lost, pagefork goes on.
    Records name the line that called :meth:`debug` or :meth:`info`."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name, so callers read alike
        """Whether a record of ``level`` would be made (False if asking raises)."""
        try:
            return self.logger.isEnabledFor(level)
        except Exception:
            return False

    def debug(self, msg: str, *args: object) -> None:
        """``logging.Logger.debug``, never raising."""
        self._log(logging.DEBUG, msg, args)

    def info(self, msg: str, *args: object) -> None:
        """``logging.Logger.info``, never raising."""
        self._log(logging.INFO, msg, args)

    def _log(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        try:
            if self.logger.isEnabledFor(level):
                # stacklevel 3: the record names the caller of debug()/info()
                self.logger.log(level, msg, *args, stacklevel=3)
        except Exception:  # a handler's, filter's or lazy argument's error: never pagefork's
            pass


log = SafeLogger(logging.getLogger("pagefork"))
log.logger.addHandler(logging.NullHandler())


class lazy:
    """A log argument made only if the record is: ``log.debug("%s", lazy(f))``
    calls ``f()`` only when DEBUG is on (every batch logs one)."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()
