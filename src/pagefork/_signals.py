"""Keeps segfault mode's SIGSEGV handler first when Python code installs another.

``faulthandler.enable()`` or ``signal.signal(SIGSEGV, f)`` after a segfault
tracker started would put their handler in front of pagefork's, which then
never sees tracked writes: faulthandler reports each as a fatal error, a
Python-level handler makes the write fault forever. Both are wrapped here so
that pagefork's handler goes back on top right after, with the new handler
as the one it passes every fault it does not own to (so faulthandler still
reports real crashes). While the handlers are swapped, segfault-tracked
memory is writable and every page of it counts as written: a write in that
window would otherwise reach the new handler (faulthandler would report it as
a fatal error). Handlers installed from C, behind Python's back, are
noticed at the next ``dirty_pages``/``stop``, which then raises.
"""

from __future__ import annotations

import faulthandler
import functools
import signal
from typing import Any
from collections.abc import Callable

from . import _native

_WRAPPED = "__pagefork_follows_sigsegv__"


def _follow(module: Any, name: str, concerns_sigsegv: Callable[..., bool]) -> None:
    original = getattr(module, name)
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        concerned = concerns_sigsegv(*args, **kwargs)
        if concerned:  # a tracked write must never reach the new handler
            _native.segfault_suspend()
        try:
            return original(*args, **kwargs)
        finally:
            if concerned:
                _native.segfault_reassert()

    setattr(wrapper, _WRAPPED, True)
    setattr(module, name, wrapper)


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


def _is_sigsegv(signalnum: Any = None, *args: Any, **kwargs: Any) -> bool:
    return signalnum == signal.SIGSEGV


def install() -> None:
    """Wraps the Python functions that replace the SIGSEGV handler (idempotent)."""
    _follow(faulthandler, "enable", _always)
    _follow(faulthandler, "disable", _always)
    _follow(signal, "signal", _is_sigsegv)
