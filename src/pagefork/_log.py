"""pagefork's logger, ``logging.getLogger("pagefork")``: silent unless the
program configures logging. INFO tells what changes how pagefork works
(tracking choices and fallbacks, workers started or replaced, checkpoint
bases); DEBUG adds every batch's phases and every checkpoint's decision."""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["log", "lazy"]

log = logging.getLogger("pagefork")
log.addHandler(logging.NullHandler())


class lazy:
    """A log argument made only if the record is: ``log.debug("%s", lazy(f))``
    calls ``f()`` only when DEBUG is on (every batch logs one)."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()
