"""Which limit stopped a thread or a process from starting.

Python says only ``can't start new thread`` and fork() only EAGAIN; the
usual cause is RLIMIT_NPROC (``ulimit -u``), which counts every process and
thread of the user, across all of that user's programs. Other causes are the
cgroup's ``pids.max`` and the system's ``kernel.threads-max``. The error
says what each is and how many tasks count against it (read only on the
failure path: counting a user's tasks walks /proc).
"""

from __future__ import annotations

import errno
import os
import resource

from ._errors import PageforkError
from ._system import read_setting

__all__ = ["cannot_start", "limit_report", "is_out_of_tasks"]


def _tasks_of_user(uid: int) -> int | None:
    """Processes and threads whose real user is ``uid`` (what RLIMIT_NPROC
    counts), or None if /proc cannot tell."""
    total = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                ruid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            if ruid == uid:
                total += len(os.listdir(f"/proc/{pid}/task"))
        except (OSError, StopIteration, ValueError, IndexError):  # ended meanwhile, or hidden
            continue
    return total


def _read(path: str) -> str | None:
    return read_setting(path) or None  # "" where unreadable


def _cgroup_pids() -> tuple[str, str] | None:
    """(pids.current, pids.max) of this process's cgroup (v2), if limited."""
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            folder = "/sys/fs/cgroup" + line[3:].rstrip("/")
            limit, current = _read(folder + "/pids.max"), _read(folder + "/pids.current")
            if limit is not None and limit != "max" and current is not None:
                return current, limit
    return None


def limit_report() -> str:
    """RLIMIT_NPROC and this user's count of processes and threads, and the
    other limits on tasks where one is set, as one sentence."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    uid = os.getuid()
    used = _tasks_of_user(uid)
    count = "" if used is None else f", and user {uid} runs {used} processes and threads"
    if soft == resource.RLIM_INFINITY:
        text = f"RLIMIT_NPROC (ulimit -u) is unlimited{count}"
    else:
        near = used is not None and used + 4 >= soft
        text = (f"RLIMIT_NPROC (ulimit -u), the most processes and threads one user may run, is "
                f"{soft}{count}" + (": the limit is reached" if near else ""))
        if uid == 0:
            text += " (root is exempt from it)"
    cgroup = _cgroup_pids()
    if cgroup is not None:
        text += f"; this cgroup's pids.max is {cgroup[1]} ({cgroup[0]} in use)"
    threads_max = _read("/proc/sys/kernel/threads-max")
    if threads_max is not None:
        text += f"; kernel.threads-max is {threads_max}"
    return text


def is_out_of_tasks(exc: BaseException) -> bool:
    """Whether ``exc`` says a thread or process could not be created for
    lack of tasks: Python's RuntimeError("can't start new thread"), or
    EAGAIN from fork() or pthread_create."""
    if isinstance(exc, RuntimeError):
        return "can't start new thread" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.EAGAIN


def cannot_start(what: str, exc: BaseException) -> PageforkError:
    """The error for ``what`` (e.g. "a worker process") that could not
    start, naming the limit on tasks; the original error is its cause."""
    err = PageforkError(f"cannot start {what} ({exc}): {limit_report()}. Raise the limit or use "
                        "fewer workers")
    err.__cause__ = exc
    return err
