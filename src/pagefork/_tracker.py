"""The :class:`Tracker`: one interface over the native tracking mechanisms
for any number of regions, with its scopes, rounds and lifetimes. Which
mode to use, and whether it works here, is :mod:`pagefork.tracking`'s
concern."""

from __future__ import annotations

import errno
import itertools
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _kernel_state, _native, _signals
from ._errors import PageforkError, UnsupportedModeError, native_error
from ._forking import renewed_in_child
from ._log import log
from ._system import kernel_release, read_setting
from .memory import Region

__all__ = ["MODES", "MODE_IDS", "THREAD_LOCAL_MODES", "Scope", "Tracker", "TrackerStats", "TrackingFallbackWarning"]

MODES: tuple[str, ...] = ("none", "softpte", "segfault", "uffd", "uffd-async", "cow")

Scope = Literal["global", "thread", "both"]
_SCOPES = {"global": 0, "thread": 1, "both": 2}
MODE_IDS = {
    "none": _native.MODE_NONE,
    "softpte": _native.MODE_SOFTPTE,
    "segfault": _native.MODE_SEGFAULT,
    "uffd": _native.MODE_UFFD,
    "uffd-async": _native.MODE_UFFD_ASYNC,
    "cow": _native.MODE_COW,
}
THREAD_LOCAL_MODES = {"none", "segfault", "uffd"}
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


def _fresh_lock(tracker: Tracker) -> None:
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

    def epoch(self, region: Region) -> int | None:
        """Internal: for executors and checkpoints. None unless whole-process tracking of ``region`` runs; else a
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

    def native_tracking(self, region: Region, create: bool) -> _native.Tracking:
        """Internal: for main-memory windows: the native tracking of ``region`` (made if ``create``)."""
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
            for other in region.trackings:
                if other is not None:
                    raise PageforkError("the region is already tracked by another Tracker")
            self._check_memory(region)
            tracking = _native.Tracking(
                MODE_IDS[self.mode], region, region.max_size // _native.PAGE_SIZE)
            key = id(region)

            def forget(_: object, key: int = key) -> None:
                self._forget(key)

            # Registered with the region first: an exception (KeyboardInterrupt)
            # between the two leaves no entry whose region does not know it.
            region.trackings.add(tracking)
            self._regions[key] = (weakref.ref(region, forget), tracking)
            return tracking

    def _forget(self, key: int) -> None:
        with self._lock:
            entry = self._regions.pop(key, None)
            self._epochs.pop(key, None)
        if entry is not None:
            entry[1].close()

    def _check_memory(self, region: Region) -> None:
        private_file = not region.shared and (region.backing == "memfd" or region.snapshot_mapped)
        if self.mode == "cow" and not private_file:
            raise PageforkError(
                "cow tracks only memory mapped privately from a snapshot (Snapshot.map_to) "
                "or a private memfd Region; this region is "
                + ("shared" if region.shared else "anonymous")
            )

    def _call(self, region: Region, action: str, create: bool = False) -> None:
        try:
            with self._lock:  # close() in another thread must not orphan it midway
                getattr(self.native_tracking(region, create), action)()
        except NotImplementedError:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope") from None
        except OSError as exc:
            raise self._error(exc, action, region) from exc

    def _error(self, exc: OSError, action: str, region: Region) -> PageforkError:
        if self.mode == "cow" and exc.errno == errno.EBUSY and _kernel_state.new_mappings_locked():
            return PageforkError(f"{exc.strerror}: {_kernel_state.MLOCK_COW_REASON}")
        if self.mode == "cow" and exc.errno == errno.EBUSY:
            return PageforkError(
                f"{exc.strerror}: cow tracking is re-armed only by mapping the memory from its "
                "snapshot again (Snapshot.map_to)"
            )
        if self.mode in ("uffd", "uffd-async") and exc.errno == errno.EINVAL and region.shared:
            err, features, _ = _native.uffd_probe()
            if not err and not features & _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
                return UnsupportedModeError(
                    self.mode, f"{kernel_release()} lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19), "
                    "needed for shared memory")
        return native_error(exc, f"{self.mode} tracking: {action}")

    # ---- public API ----------------------------------------------------------

    def start(self, region: Region) -> None:
        """Starts tracking writes to ``region`` by every thread; clears its flags."""
        with self._lock:  # re-entrant: _call takes it again
            self._epochs.pop(id(region), None)
            self._call(region, "start", create=True)
            self._epochs[id(region)] = next(_epoch_counter)

    def start_fresh(self, region: Region) -> None:
        """Internal: for executors. :meth:`start` on memory its owner has just mapped from its file
        (the executor, after a window): for ``cow`` a page copied since then
        is a write to report, not memory that was never freshly mapped."""
        with self._lock:
            self._epochs.pop(id(region), None)
            self._call(region, "start_fresh", create=True)
            self._epochs[id(region)] = next(_epoch_counter)

    def start_mapped(self, region: Region) -> None:
        """Internal: for thread memory. :meth:`start` on memory the caller has just mapped anew
        (``Snapshot.map_to``): a pin holds the pages it was registered on,
        which the new mapping replaced, so io_uring buffers are not looked
        for (~10-20 us per start in modes blind to pins; thread memory is
        mapped anew before every thread)."""
        with self._lock:
            self._epochs.pop(id(region), None)
            self._call(region, "start_mapped", create=True)
            self._epochs[id(region)] = next(_epoch_counter)

    def stop(self, region: Region) -> None:
        """Stops whole-process tracking of ``region``; its flags stay readable."""
        with self._lock:
            self._epochs.pop(id(region), None)
            self._call(region, "stop")

    def start_thread(self, region: Region) -> None:
        """Starts tracking the calling thread's writes to ``region``."""
        self._check_owner()
        if self.mode not in THREAD_LOCAL_MODES:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope")
        self._call(region, "start_thread", create=True)

    def stop_thread(self, region: Region) -> None:
        """Stops tracking the calling thread's writes; its flags stay readable."""
        self._check_owner()
        if self.mode not in THREAD_LOCAL_MODES:
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
        if scope == "thread" and self.mode not in THREAD_LOCAL_MODES:
            raise UnsupportedModeError(self.mode, "it has no thread-local scope")
        if reset and self.mode in _NO_ATOMIC_RESET:
            raise UnsupportedModeError(self.mode, "dirty_pages(reset=True) " + _NO_ATOMIC_RESET[self.mode])
        with self._lock:
            tracking = self.native_tracking(region, create=False)
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
        return TrackerStats(fallbacks=self.native_tracking(region, create=False).fallbacks)

    def _warn_fallbacks(self, tracking: _native.Tracking) -> None:
        count = tracking.fallbacks
        if count > self._fallbacks_seen.get(id(tracking), 0):
            self._fallbacks_seen[id(tracking)] = count
            limit = read_setting("/proc/sys/vm/max_map_count", unreadable="unknown")
            log.info("segfault tracking fell back to a whole region (%d time(s)): vm.max_map_count=%s",
                     count, limit)
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
                    region.trackings.discard(tracking)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Every tracker: a forked child gives each a fresh lock.
_live_trackers = renewed_in_child(_fresh_lock)
_epoch_counter = itertools.count(1)
