"""How many CPUs this process may use: the default number of workers.

``os.cpu_count()`` counts the machine's CPUs. A process may run on fewer:
its CPU affinity (``taskset``, ``docker --cpuset-cpus``) and its cgroup's CPU
quota (``docker --cpus``, Kubernetes CPU limits: cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), where any ancestor cgroup's
quota limits it too. A quota of 1.5 CPUs counts as 2 (rounded up: workers
that wait on memory leave a share unused).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ._system import read_setting

__all__ = ["available_cpus", "cgroup_cpu_limit"]


def _read(path: Path) -> str | None:
    """A cgroup file's text; None where missing or unreadable (no limit known there)."""
    return read_setting(str(path)) or None


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(root within the hierarchy, mount point, fs type, super options) of
    each cgroup mount in ``/proc/self/mountinfo`` text."""
    found = []
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        parts, tail = fields.split(), rest.split()
        if not sep or len(parts) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        # Mount points escape blanks, tabs and backslashes as octal (\040).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        found.append((parts[3], point, tail[0], set(tail[2].split(","))))
    return found


def _folder(point: str, mount_root: str, cgroup: str) -> Path:
    """The folder of ``cgroup`` (a path in /proc/self/cgroup) under a mount of
    the hierarchy's ``mount_root``, or the mount point itself where the
    cgroup lies outside it (a container sees its own cgroup as the root)."""
    if mount_root != "/" and (cgroup == mount_root or cgroup.startswith(mount_root + "/")):
        cgroup = cgroup[len(mount_root):]
    folder = Path(point, cgroup.lstrip("/"))
    return folder if folder.is_dir() else Path(point)


def _quota_v2(folder: Path, top: Path) -> float | None:
    limit = None
    while True:
        text = _read(folder / "cpu.max")  # "max 100000" or "150000 100000"
        if text is not None and not text.startswith("max"):
            try:
                quota, period = (int(v) for v in text.split()[:2])
            except ValueError:
                quota = period = 0
            if quota > 0 and period > 0:
                limit = quota / period if limit is None else min(limit, quota / period)
        if folder == top or folder.parent == folder:
            return limit
        folder = folder.parent


def _quota_v1(folder: Path, top: Path) -> float | None:
    limit = None
    while True:
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        try:
            q, p = int(quota or "-1"), int(period or "0")
        except ValueError:
            q, p = -1, 0
        if q > 0 and p > 0:  # -1: no quota
            limit = q / p if limit is None else min(limit, q / p)
        if folder == top or folder.parent == folder:
            return limit
        folder = folder.parent


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup",
                     mountinfo: str = "/proc/self/mountinfo") -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, in CPUs
    (e.g. 1.5), or None where there is none (or cgroups cannot be read)."""
    cgroups, mounts = _read(Path(proc_cgroup)), _read(Path(mountinfo))
    if cgroups is None or mounts is None:
        return None
    limits = []
    for line in cgroups.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for root, point, fstype, options in _mounts(mounts):
            if hierarchy == "0" and controllers == "" and fstype == "cgroup2":
                folder = _folder(point, root, path)
                limit = _quota_v2(folder, Path(point))
            elif fstype == "cgroup" and "cpu" in options and "cpu" in controllers.split(","):
                folder = _folder(point, root, path)
                limit = _quota_v1(folder, Path(point))
            else:
                continue
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def available_cpus() -> int:
    """The CPUs this process may run on (affinity), capped by its cgroup's
    CPU quota rounded up; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)
