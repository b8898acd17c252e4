"""What the running kernel says about itself: its release, and settings
read from /proc and /sys (empty, or the reason, where unreadable)."""

from __future__ import annotations

import platform

__all__ = ["kernel_release", "read_setting", "available_memory"]


def kernel_release() -> str:
    """This kernel, as error messages name it."""
    return f"Linux {platform.release()}"


def read_setting(path: str, *, unreadable: str | None = "") -> str:
    """The stripped contents of a settings file such as
    ``/proc/sys/vm/max_map_count``; ``unreadable`` where it cannot be read
    (None: the OSError's reason, "unreadable (...)")."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"unreadable ({exc.strerror})" if unreadable is None else unreadable


def available_memory() -> int | None:
    """The memory the kernel says can be allocated without swapping
    (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
