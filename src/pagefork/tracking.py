"""Dirty-page tracking: one Tracker interface over six kernel mechanisms.

Pick a mode with :func:`tracker` (``None`` reads ``PAGEFORK_TRACKING``, else
``"auto"``), see what works here with :func:`probe`. All mechanisms live in
the native core; this module chooses, checks and explains.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import platform
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _native, _signals
from ._errors import PageforkError, UnsupportedModeError, native_error
from .memory import Region

__all__ = [
    "MODES", "AUTO_CANDIDATES", "Support", "Tracker", "TrackerStats", "TrackingFallbackWarning",
    "probe", "tracker", "write_costs", "setting_warnings",
]

MODES: tuple[str, ...] = ("none", "softpte", "segfault", "uffd", "uffd-async", "cow")

#: The general-purpose modes ``"auto"`` chooses from, by their per-page write
#: cost measured on this machine (:func:`write_costs`). softpte (process-wide
#: clearing) and cow (snapshot mappings only) are not general-purpose; "none"
#: is the last resort.
AUTO_CANDIDATES: tuple[str, ...] = ("uffd-async", "uffd", "segfault")

Scope = Literal["global", "thread", "both"]
_SCOPES = {"global": 0, "thread": 1, "both": 2}
_MODE_IDS = {
    "none": _native.MODE_NONE,
    "softpte": _native.MODE_SOFTPTE,
    "segfault": _native.MODE_SEGFAULT,
    "uffd": _native.MODE_UFFD,
    "uffd-async": _native.MODE_UFFD_ASYNC,
    "cow": _native.MODE_COW,
}
_THREAD_LOCAL = {"none", "segfault", "uffd"}
# Modes that cannot read and re-arm as one step, and why.
_NO_ATOMIC_RESET = {
    "cow": "is impossible: cow is re-armed only by mapping the snapshot again (Snapshot.map_to)",
    "softpte": "is impossible: /proc/self/clear_refs clears soft-dirty bits process-wide in a "
               "separate step, so writes between the read and the clear would be lost",
}


class TrackingFallbackWarning(RuntimeWarning):
    """Tracking fell back to reporting a whole region dirty (see :meth:`Tracker.stats`)."""


@dataclass(frozen=True)
class TrackerStats:
    """What a tracker had to do for one region.

    ``fallbacks``: times segfault mode could not re-enable writing to one
    page (``mprotect`` failed with ``ENOMEM``: each protected page splits the
    mapping, and the process reached ``vm.max_map_count``) and un-protected
    the whole region instead, reporting every page of it dirty.
    """

    fallbacks: int


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


def _kernel() -> str:
    return f"Linux {platform.release()}"


# ---- probes: each runs the real mechanism on scratch memory ---------------


def _write_test(mode: str, backing: str = "anonymous") -> str:
    """Tracks 4 scratch pages, writes pages 1 and 3, and returns "" if exactly
    those are reported, else what went wrong."""
    with Region(4 * _native.PAGE_SIZE, backing=backing) as region:  # type: ignore[arg-type]
        view = memoryview(region)
        tracking = _native.Tracking(_MODE_IDS[mode], region, 4)
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
        tracking = _native.Tracking(_MODE_IDS[mode], region, 4)
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
        return f"{_kernel()} has no userfaultfd (CONFIG_USERFAULTFD is off)", 0
    if err in (errno.EPERM, errno.EACCES):
        return (
            "userfaultfd is not permitted: vm.unprivileged_userfaultfd=0 and the process lacks "
            "CAP_SYS_PTRACE (UFFD_USER_MODE_ONLY needs Linux 5.11)"
        ), 0
    if err:
        return f"userfaultfd failed: {os.strerror(err)}", 0
    missing = [name for bit, name in needed.items() if not features & bit]
    if missing:
        return f"{_kernel()} lacks " + ", ".join(missing), features
    return "", features


def _probe_softpte() -> str:
    for path, mode in (("/proc/self/clear_refs", os.W_OK), ("/proc/self/pagemap", os.R_OK)):
        if not os.access(path, mode):
            return f"{path} is not accessible"
    reason = _write_test("softpte")
    if reason.startswith("a write test reported"):
        return (
            "the soft-dirty bit never sets after a write: the kernel lacks CONFIG_MEM_SOFT_DIRTY "
            f"({_kernel()}, {platform.machine()})"
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
        return f"{_kernel()} has no PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7)"
    return _write_test("uffd-async")


def _probe_cow() -> str:
    if not os.access("/proc/self/pagemap", os.R_OK):
        return "/proc/self/pagemap is not readable"
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
        result[mode] = Support(mode, not reason, reason, mode in _THREAD_LOCAL, not writes, writes)
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
    return costs


def auto_mode(thread_local: bool = False) -> str:
    """The mode ``"auto"`` stands for: the available general-purpose mode with
    the cheapest measured write (optionally only those with a thread scope)."""
    costs = {m: c for m, c in write_costs().items() if m in _THREAD_LOCAL or not thread_local}
    return min(costs, key=costs.__getitem__) if costs else "none"


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
    if _read_setting(ksm_run) == "1":
        found.append(
            f"KSM is running ({ksm_run}=1): merging pages drops userfaultfd write-protection. "
            "pagefork advises tracked memory MADV_UNMERGEABLE and reports pages merged anyway "
            "as written (uffd, uffd-async, cow), so nothing is lost, but memory made mergeable "
            "while tracked shows extra dirty pages; stop KSM (echo 0 > "
            f"{ksm_run}) for exact sets")
    limit = _read_setting(max_map_count)
    if limit.isdigit() and int(limit) < MAX_MAP_COUNT_ADVISED:
        pages = int(limit) // 2
        found.append(
            f"vm.max_map_count={limit}: segfault mode splits the mapping at every written "
            f"page, so after about {pages} scattered written pages per process it un-protects "
            "whole regions and reports them dirty (TrackingFallbackWarning); raise it "
            f"(sysctl vm.max_map_count={MAX_MAP_COUNT_ADVISED * 4}) or use uffd-async")
    return found


def _read_setting(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _max_map_count() -> str:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() would never be released here.
    for tracker in list(_live_trackers):
        tracker._lock = threading.RLock()


class Tracker:
    """Tracks which pages of one or more regions are written.

    ``start``/``stop`` track the whole process; ``start_thread``/
    ``stop_thread`` only the calling thread (modes with ``thread_local``).
    ``dirty_pages`` returns one bool per page. Flags stay readable after
    ``stop``; ``start`` clears them. Reads never mark a page, and tracking
    never changes the data. Each region is tracked independently (softpte
    clears soft-dirty bits process-wide; pagefork collects other softpte
    regions' bits before each clear so they stay correct).

    Thread-local scope records each thread's first write to a page after the
    page was armed; when several threads write the same page, the ones after
    the first are not seen (the page is already writable).
    Under ``segfault``, and ``uffd`` when userfaultfd is user-mode-only,
    kernel writes into tracked memory (``read(2)`` into a protected page) fail
    with ``EFAULT``: ``probe()[mode].kernel_writes`` says which here.
    """

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown tracking mode {mode!r}; valid: " + ", ".join(map(repr, MODES)))
        self.mode = mode
        self._regions: dict[int, tuple[weakref.ref[Region], _native.Tracking]] = {}
        # Re-entrant: any allocation under it can run the garbage collector,
        # whose weakref callbacks (_forget: a tracked region died) and
        # finalizers may call back into this tracker on the same thread.
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._fallbacks_seen: dict[int, int] = {}
        # region id -> a number that changes whenever whole-process flags may
        # have been lost (start, reset) and is absent while not tracking
        # (stop): an incremental checkpoint builds on the last one only if
        # the epoch is the same.
        self._epochs: dict[int, int] = {}
        _live_trackers.add(self)
        if mode == "segfault":
            _signals.install()

    def __repr__(self) -> str:
        return f"<Tracker mode={self.mode!r} regions={len(self._regions)}>"

    def _epoch(self, region: Region) -> int | None:
        """None unless whole-process tracking of ``region`` runs; else a
        number that changes when its flags are cleared other than by
        ``dirty_pages(reset=True)`` (start, reset)."""
        with self._lock:
            entry = self._regions.get(id(region))
            if entry is None or entry[0]() is not region:
                return None
            return self._epochs.get(id(region))

    # ---- region bookkeeping ------------------------------------------------

    def _check_owner(self) -> None:
        if self._pid != os.getpid():
            raise PageforkError(
                f"this {self.mode!r} tracker was inherited through fork() from process "
                f"{self._pid}; it cannot be used in a child (it would act on the parent's "
                "memory): create a new tracker in the child")

    def _tracking(self, region: Region, create: bool) -> _native.Tracking:
        self._check_owner()
        if not isinstance(region, Region):
            raise TypeError(f"expected a pagefork.Region, got {type(region).__name__}")
        if region.closed:
            raise PageforkError("the region is closed")
        with self._lock:
            entry = self._regions.get(id(region))
            if entry is not None and entry[0]() is region:
                return entry[1]
            if not create:
                raise PageforkError(f"this {self.mode!r} tracker has never tracked the region")
            for other in region._trackings:
                if other is not None:
                    raise PageforkError("the region is already tracked by another Tracker")
            self._check_memory(region)
            tracking = _native.Tracking(
                _MODE_IDS[self.mode], region, region.max_size // _native.PAGE_SIZE)
            key = id(region)

            def forget(_: object, key: int = key) -> None:
                self._forget(key)

            # Registered with the region first: an exception (KeyboardInterrupt)
            # between the two leaves no entry whose region does not know it.
            region._trackings.add(tracking)
            self._regions[key] = (weakref.ref(region, forget), tracking)
            return tracking

    def _forget(self, key: int) -> None:
        with self._lock:
            entry = self._regions.pop(key, None)
            self._epochs.pop(key, None)
        if entry is not None:
            entry[1].close()

    def _check_memory(self, region: Region) -> None:
        private_file = not region.shared and (region.backing == "memfd" or region._snapshot_mapped)
        if self.mode == "cow" and not private_file:
            raise PageforkError(
                "cow tracks only memory mapped privately from a snapshot (Snapshot.map_to) "
                "or a private memfd Region; this region is "
                + ("shared" if region.shared else "anonymous")
            )

    def _call(self, region: Region, action: str, create: bool = False) -> None:
        try:
            with self._lock:  # close() in another thread must not orphan it midway
                getattr(self._tracking(region, create), action)()
        except NotImplementedError:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope") from None
        except OSError as exc:
            raise self._error(exc, action, region) from exc

    def _error(self, exc: OSError, action: str, region: Region) -> PageforkError:
        if self.mode == "cow" and exc.errno == errno.EBUSY:
            return PageforkError(
                f"{exc.strerror}: cow tracking is re-armed only by mapping the memory from its "
                "snapshot again (Snapshot.map_to)"
            )
        if self.mode in ("uffd", "uffd-async") and exc.errno == errno.EINVAL and region.shared:
            err, features, _ = _native.uffd_probe()
            if not err and not features & _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
                return UnsupportedModeError(
                    self.mode, f"{_kernel()} lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19), "
                    "needed for shared memory")
        return native_error(exc, f"{self.mode} tracking: {action}")

    # ---- public API ----------------------------------------------------------

    def start(self, region: Region) -> None:
        """Starts tracking writes to ``region`` by every thread; clears its flags."""
        with self._lock:  # re-entrant: _call takes it again
            self._epochs.pop(id(region), None)
            self._call(region, "start", create=True)
            self._epochs[id(region)] = next(_epoch_counter)

    def stop(self, region: Region) -> None:
        """Stops whole-process tracking of ``region``; its flags stay readable."""
        with self._lock:
            self._epochs.pop(id(region), None)
            self._call(region, "stop")

    def start_thread(self, region: Region) -> None:
        """Starts tracking the calling thread's writes to ``region``."""
        self._check_owner()
        if self.mode not in _THREAD_LOCAL:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope")
        self._call(region, "start_thread", create=True)

    def stop_thread(self, region: Region) -> None:
        """Stops tracking the calling thread's writes; its flags stay readable."""
        self._check_owner()
        if self.mode not in _THREAD_LOCAL:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope")
        self._call(region, "stop_thread")

    def dirty_pages(self, region: Region, scope: Scope = "both", *, reset: bool = False) -> np.ndarray:
        """One bool per page of ``region``: written since tracking started
        (or since the last ``reset=True`` read of that scope).

        ``scope`` is ``"global"`` (every thread, since :meth:`start`),
        ``"thread"`` (the calling thread, since :meth:`start_thread`) or
        ``"both"`` (their union).

        ``reset=True`` clears the flags it read and re-arms tracking in the
        same step: with writers running, every write is reported by this read
        or the next one, never lost. It is the way to read in rounds while
        other threads write. ``cow`` (re-armed only by
        :meth:`Snapshot.map_to <pagefork.Snapshot.map_to>`) and ``softpte``
        (whose clearing is a separate, process-wide step) cannot, and raise
        :class:`UnsupportedModeError`.
        """
        self._check_owner()
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of 'global', 'thread', 'both', not {scope!r}")
        if scope == "thread" and self.mode not in _THREAD_LOCAL:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope")
        if reset and self.mode in _NO_ATOMIC_RESET:
            raise UnsupportedModeError(self.mode, "dirty_pages(reset=True) " + _NO_ATOMIC_RESET[self.mode])
        with self._lock:
            tracking = self._tracking(region, create=False)
            while True:
                out = np.empty(tracking.n_pages, dtype=np.uint8)  # dirty() writes every byte
                try:
                    tracking.dirty(out, _SCOPES[scope], bool(reset))
                    break
                except OSError as exc:
                    raise self._error(exc, "dirty_pages", region) from exc
                except ValueError:
                    if len(out) == tracking.n_pages:
                        raise
                    # another thread resized the region meanwhile: read again
        self._warn_fallbacks(tracking)
        return out.view(np.bool_)

    def stats(self, region: Region) -> TrackerStats:
        """What tracking ``region`` has needed so far (see :class:`TrackerStats`)."""
        return TrackerStats(fallbacks=self._tracking(region, create=False).fallbacks)

    def _warn_fallbacks(self, tracking: _native.Tracking) -> None:
        count = tracking.fallbacks
        if count > self._fallbacks_seen.get(id(tracking), 0):
            self._fallbacks_seen[id(tracking)] = count
            limit = _max_map_count()
            warnings.warn(
                "segfault tracking could not re-enable writes to one page (mprotect: ENOMEM, "
                f"the process reached vm.max_map_count={limit}), so it un-protected the whole "
                "region and reports all of it dirty; raise vm.max_map_count or use uffd-async "
                "(Tracker.stats counts these fallbacks)",
                TrackingFallbackWarning, stacklevel=3)

    def reset(self) -> None:
        """Clears every flag of every region and re-arms tracking where it is on.

        Writes made between an earlier :meth:`dirty_pages` and this call are
        forgotten, so it is safe only when no other thread writes tracked
        memory meanwhile; with writers running use
        ``dirty_pages(region, reset=True)``.
        """
        self._check_owner()
        with self._lock:
            for key, (ref, tracking) in list(self._regions.items()):
                region = ref()
                if region is None or region.closed:
                    continue
                if key in self._epochs:
                    self._epochs[key] = next(_epoch_counter)
                try:
                    tracking.reset()
                except OSError as exc:
                    raise self._error(exc, "reset", region) from exc

    def close(self) -> None:
        """Stops tracking every region. Safe in any state, from any thread, and
        in a forked child (where it only forgets: the parent's tracking is
        untouched)."""
        # All under the lock: a start() of the same region in another thread
        # must wait until the old tracking is closed, or closing it would
        # un-protect (unregister) the memory under the new one.
        with self._lock:
            entries = list(self._regions.values())
            self._regions.clear()
            self._epochs.clear()
            for ref, tracking in entries:
                tracking.close()
                region = ref()
                if region is not None:
                    region._trackings.discard(tracking)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_live_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()
_epoch_counter = itertools.count(1)
os.register_at_fork(after_in_child=_after_fork_in_child)
