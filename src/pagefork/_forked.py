"""What a child fork()ed by a thread function does when it returns into pagefork.

A thread function that calls ``os.fork()`` and lets the child return (no
``os._exit``) would hand the child back to the code that called the
function: in a worker process, a loop that reports for the worker on the
parent's socket and reads its messages; on the threads backend, a pool
thread waiting for jobs that never come. A child never speaks for its
parent: it exits here, the way a ``multiprocessing`` child ends: status 0
when the function returned, the code of a ``SystemExit``, or 1 with the
traceback on stderr.
"""

from __future__ import annotations

import os
import sys
import traceback

__all__ = ["leave_if_forked"]


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
