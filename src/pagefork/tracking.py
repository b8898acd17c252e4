"""Dirty-page tracking: which of the six kernel mechanisms work here and
why not (:func:`probe`), and a :class:`Tracker` for the one you pick
(:func:`tracker`: ``None`` reads ``PAGEFORK_TRACKING``, else ``"auto"``).

All mechanisms live in the native core and the Tracker itself in
``_tracker.py``; this module probes, chooses and explains.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
from dataclasses import dataclass

from . import _kernel_state, _native
from ._errors import UnsupportedModeError
from ._log import log
from ._system import kernel_release, read_setting
from ._tracker import MODE_IDS, MODES, THREAD_LOCAL_MODES, Tracker, TrackerStats, TrackingFallbackWarning
from .memory import Region

__all__ = [
    "MODES", "AUTO_CANDIDATES", "Support", "Tracker", "TrackerStats", "TrackingFallbackWarning",
    "probe", "tracker", "write_costs", "setting_warnings", "mode_for_new_mapping",
]

#: The general-purpose modes ``"auto"`` chooses from, by their per-page write
#: cost measured on this machine (:func:`write_costs`). softpte (process-wide
#: clearing) and cow (snapshot mappings only) are not general-purpose; "none"
#: is the last resort.
AUTO_CANDIDATES: tuple[str, ...] = ("uffd-async", "uffd", "segfault")


@dataclass(frozen=True)
class Support:
    """Whether a tracking mode works here; ``reason`` says exactly why not.

    ``kernel_writes`` says whether the kernel can write into tracked memory
    for this process (``read(2)``/``readv`` into a tracked page succeeds and
    the page is reported); ``kernel_writes_reason`` says why not (under
    ``segfault``, and under ``uffd`` when userfaultfd is user-mode-only, they
    fail with ``EFAULT``).
    """

    mode: str
    available: bool
    reason: str
    thread_local: bool
    kernel_writes: bool = False
    kernel_writes_reason: str = "not probed"


# ---- probes: each runs the real mechanism on scratch memory ---------------


def _write_test(mode: str, backing: str = "anonymous") -> str:
    """Tracks 4 scratch pages, writes pages 1 and 3, and returns "" if exactly
    those are reported, else what went wrong."""
    with Region(4 * _native.PAGE_SIZE, backing=backing) as region:  # type: ignore[arg-type]
        view = memoryview(region)
        tracking = _native.Tracking(MODE_IDS[mode], region, 4)
        try:
            tracking.start()
            _ = bytes(view[: _native.PAGE_SIZE])  # a read must not count
            view[_native.PAGE_SIZE] = 1
            view[3 * _native.PAGE_SIZE + 5] = 7
            out = bytearray(4)
            tracking.dirty(out, 0)
            tracking.stop()
        except OSError as exc:
            return f"{exc.strerror or exc} during a write test"
        finally:
            tracking.close()
            view.release()
        if list(out) != [0, 1, 0, 1]:
            return f"a write test reported pages {list(out)} instead of [0, 1, 0, 1]"
    return ""


def _kernel_write_test(mode: str) -> str:
    """Lets the kernel write into tracked scratch memory (``readv`` from a
    pipe into page 2 of 4) and returns "" if that works and page 2 is
    reported as the write test expects, else why not."""
    backing = "memfd" if mode == "cow" else "anonymous"
    with Region(4 * _native.PAGE_SIZE, backing=backing) as region:  # type: ignore[arg-type]
        view = memoryview(region)
        tracking = _native.Tracking(MODE_IDS[mode], region, 4)
        r, w = os.pipe()
        try:
            tracking.start()
            os.write(w, b"\x5a" * 64)
            try:
                os.readv(r, [view[2 * _native.PAGE_SIZE: 2 * _native.PAGE_SIZE + 64]])
            except OSError as exc:
                return _kernel_write_failure(mode, exc)
            out = bytearray(4)
            tracking.dirty(out, 0)
            tracking.stop()
        finally:
            os.close(r)
            os.close(w)
            tracking.close()
            view.release()
        expected = [1, 1, 1, 1] if mode == "none" else [0, 0, 1, 0]  # "none": every page dirty
        if list(out) != expected:
            return f"a kernel write (readv) into page 2 was reported as pages {list(out)}"
    return ""


def _kernel_write_failure(mode: str, exc: OSError) -> str:
    what = f"read(2)/readv into a tracked page fails with {errno.errorcode.get(exc.errno or 0, exc)}"
    if exc.errno != errno.EFAULT:
        return what
    if mode == "segfault":
        return what + ": the kernel does not raise SIGSEGV for its own accesses to protected pages"
    if mode == "uffd" and _native.uffd_probe()[2]:
        return what + (
            ": userfaultfd is user-mode-only for this process (vm.unprivileged_userfaultfd=0 "
            "and no CAP_SYS_PTRACE), so faults the kernel raises are not handled"
        )
    return what


def _uffd_reason(needed: dict[int, str]) -> tuple[str, int]:
    err, features, _ = _native.uffd_probe()
    if err == errno.ENOSYS:
        return f"{kernel_release()} has no userfaultfd (CONFIG_USERFAULTFD is off)", 0
    if err in (errno.EPERM, errno.EACCES):
        return (
            "userfaultfd is not permitted: vm.unprivileged_userfaultfd=0 and the process lacks "
            "CAP_SYS_PTRACE (UFFD_USER_MODE_ONLY needs Linux 5.11)"
        ), 0
    if err:
        return f"userfaultfd failed: {os.strerror(err)}", 0
    missing = [name for bit, name in needed.items() if not features & bit]
    if missing:
        return f"{kernel_release()} lacks " + ", ".join(missing), features
    return "", features


def _probe_softpte() -> str:
    for path, mode in (("/proc/self/clear_refs", os.W_OK), ("/proc/self/pagemap", os.R_OK)):
        if not os.access(path, mode):
            return f"{path} is not accessible"
    reason = _write_test("softpte")
    if reason.startswith("a write test reported"):
        return (
            "the soft-dirty bit never sets after a write: the kernel lacks CONFIG_MEM_SOFT_DIRTY "
            f"({kernel_release()}, {platform.machine()})"
        )
    return reason


def _probe_uffd() -> str:
    reason, _ = _uffd_reason({_native.UFFD_FEATURE_THREAD_ID: "UFFD_FEATURE_THREAD_ID (Linux 4.14)"})
    return reason or _write_test("uffd")


def _probe_uffd_async() -> str:
    reason, _ = _uffd_reason({
        _native.UFFD_FEATURE_WP_UNPOPULATED: "UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4)",
        _native.UFFD_FEATURE_WP_ASYNC: "UFFD_FEATURE_WP_ASYNC (Linux 6.7)",
    })
    if reason:
        return reason
    if not _native.pagemap_scan_available():
        return f"{kernel_release()} has no PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7)"
    return _write_test("uffd-async")


def _probe_cow() -> str:
    if not os.access("/proc/self/pagemap", os.R_OK):
        return "/proc/self/pagemap is not readable"
    if _kernel_state.new_mappings_locked():
        return _kernel_state.MLOCK_COW_REASON
    return _write_test("cow", backing="memfd")


_PROBES = {
    "none": lambda: "",
    "softpte": _probe_softpte,
    "segfault": lambda: _write_test("segfault"),
    "uffd": _probe_uffd,
    "uffd-async": _probe_uffd_async,
    "cow": _probe_cow,
}


@functools.lru_cache(maxsize=1)
def _probe_all() -> dict[str, Support]:
    result = {}
    for mode in MODES:
        try:
            reason = _PROBES[mode]()
        except Exception as exc:  # a probe must explain, never crash the caller
            reason = f"probe failed: {exc}"
        if reason:
            writes = "the mode is unavailable"
        else:
            try:
                writes = _kernel_write_test(mode)
            except Exception as exc:
                writes = f"probe failed: {exc}"
        result[mode] = Support(mode, not reason, reason, mode in THREAD_LOCAL_MODES, not writes, writes)
    return result


def probe(refresh: bool = False) -> dict[str, Support]:
    """Which modes work here and why not, by trying each on scratch memory.

    The result is cached for the process; ``refresh=True`` probes again.
    """
    if refresh:
        _probe_all.cache_clear()
    return dict(_probe_all())


@functools.lru_cache(maxsize=1)
def write_costs() -> dict[str, float]:
    """Nanoseconds per first write to a page under each available
    general-purpose mode, measured once per process on 128 scratch pages
    (a few milliseconds). ``"auto"`` picks the cheapest."""
    from . import _baseline  # the C write loop the benchmarks use too

    support = probe()
    pages = 128
    costs = {}
    for mode in AUTO_CANDIDATES:
        if not support[mode].available:
            continue
        with Region(pages * _native.PAGE_SIZE) as region:
            _baseline.touch(region.address, pages, 0)  # allocate first: time only tracking
            with Tracker(mode) as t:
                t.start(region)
                costs[mode] = _baseline.touch(region.address, pages, 1) / pages
    log.info("first-write cost per page, ns (auto picks the cheapest): %s",
             ", ".join(f"{m} {c:.0f}" for m, c in costs.items()) or "no general-purpose mode works")
    return costs


def auto_mode(thread_local: bool = False) -> str:
    """The mode ``"auto"`` stands for: the available general-purpose mode with
    the cheapest measured write (optionally only those with a thread scope)."""
    costs = {m: c for m, c in write_costs().items() if m in THREAD_LOCAL_MODES or not thread_local}
    return min(costs, key=costs.__getitem__) if costs else "none"


def mode_for_new_mapping(mode: str) -> str:
    """The mode to track memory about to be mapped from a snapshot with:
    ``mode``, except ``cow`` while ``mlockall(MCL_FUTURE)`` makes every
    page a private copy as it is mapped (``_kernel_state.MLOCK_COW_REASON``):
    then uffd-async where it works (like cow it lets the kernel write tracked
    memory, and sees it), else the ``"auto"`` mode."""
    if mode != "cow" or not _kernel_state.new_mappings_locked():
        return mode
    instead = "uffd-async" if probe()["uffd-async"].available else auto_mode()
    log.info("mlockall(MCL_FUTURE) makes every mapped page a private copy: tracking with %s "
             "instead of cow", instead)
    return instead


def tracker(mode: str | None = None, *, thread_local: bool = False) -> Tracker:
    """Returns a :class:`Tracker` for ``mode``.

    ``None`` means the ``PAGEFORK_TRACKING`` environment variable, else
    ``"auto"``: the fastest available general-purpose mode (with
    ``thread_local=True``, the fastest one that has a thread-local scope).
    An unknown name raises ``ValueError``; an unavailable mode raises
    :class:`UnsupportedModeError` with the probe's reason.
    """
    if mode is None:
        mode = os.environ.get("PAGEFORK_TRACKING") or "auto"
    if mode == "auto":
        mode = auto_mode(thread_local)
    if mode not in MODES:
        raise ValueError(f"unknown tracking mode {mode!r}"
                         + (" (from the PAGEFORK_TRACKING environment variable)"
                            if os.environ.get("PAGEFORK_TRACKING") == mode else "")
                         + "; valid: 'auto', " + ", ".join(map(repr, MODES)))
    support = probe()[mode]
    if not support.available:
        raise UnsupportedModeError(mode, support.reason)
    if thread_local and not support.thread_local:
        raise UnsupportedModeError(mode, "it has no thread-local scope")
    return Tracker(mode)


#: Below this vm.max_map_count, doctor warns that segfault mode falls back early.
MAX_MAP_COUNT_ADVISED = 262144


def setting_warnings(ksm_run: str = "/sys/kernel/mm/ksm/run",
                     max_map_count: str = "/proc/sys/vm/max_map_count") -> list[str]:
    """Settings of this machine that break or degrade tracking, explained
    (``pagefork doctor`` prints them). The paths are parameters for tests."""
    found = []
    if read_setting(ksm_run) == "1":
        found.append(
            f"KSM is running ({ksm_run}=1): merging pages drops userfaultfd write-protection. "
            "pagefork advises tracked memory MADV_UNMERGEABLE and reports pages merged anyway "
            "as written (uffd, uffd-async, cow), so nothing is lost, but memory made mergeable "
            "while tracked shows extra dirty pages; stop KSM (echo 0 > "
            f"{ksm_run}) for exact sets")
    limit = read_setting(max_map_count)
    if limit.isdigit() and int(limit) < MAX_MAP_COUNT_ADVISED:
        pages = int(limit) // 2
        found.append(
            f"vm.max_map_count={limit}: segfault mode splits the mapping at every written "
            f"page, so after about {pages} scattered written pages per process it un-protects "
            "whole regions and reports them dirty (TrackingFallbackWarning); raise it "
            f"(sysctl vm.max_map_count={MAX_MAP_COUNT_ADVISED * 4}) or use uffd-async")
    return found


