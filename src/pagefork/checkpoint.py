"""Incremental checkpoints of a Region or an App, to a folder or an fsspec URL.

A checkpoint version is a base (the whole memory image) or an increment
(only the pages that changed since the version before it), plus a manifest
written last that lists every object its restore needs, with sizes and
CRC32Cs. A version exists once its manifest exists: on local disks the
manifest is renamed into place after every object and itself were fsynced;
on object stores it is the last object written. A kill at any instant so
leaves the last complete version restorable. A base is written every
``base_every`` increments or once the increments since the base pass
``base_fraction`` of the memory, so restoring stays bounded; ``keep=``
prunes old versions (and any object no kept version needs).

``save(region, target, tracker=t)`` writes the pages ``t`` saw written
since the last save (read and re-armed in one atomic step, so with writers
running every page written before ``save`` returns is in this version or
the next one). ``App.checkpoint`` / ``App.restore`` use the executor's own
record of what changed in main memory.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from collections.abc import Callable, Iterator

import numpy as np

from . import _checkpoint_versions as _chain
from ._checkpoint_format import Manifest, iter_refs, manifest_name, read_object
from ._checkpoint_images import FileImage, Progress, restore_into_snapshot
from ._checkpoint_versions import CheckpointInfo
from ._forking import renewed_in_child
from ._checkpoint_store import Store, open_store
from ._errors import CorruptDataError, OutOfBoundsError, PageforkError, VersionPrunedError
from ._sizes import PAGE_SIZE
from .memory import Region
from .tracking import Tracker

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["CheckpointInfo", "VersionInfo", "VersionPrunedError", "save", "load", "versions", "verify",
           "SavedAt", "AppImage", "save_executor", "find_app_image", "restore_executor",
           "newest_restorable"]

Target = Any  # a folder path, os.PathLike, or an fsspec URL string

DEFAULT_BASE_EVERY = 10
DEFAULT_BASE_FRACTION = 0.5
DEFAULT_COMPRESS = 1

# A reader of the newest version that a writer's keep= pruned meanwhile
# takes the new newest; after this many in a row it gives up.
_PRUNED_RETRIES = 100

T = TypeVar("T")


@dataclass(frozen=True)
class VersionInfo:
    """One committed version, as ``pagefork checkpoint ls`` shows it."""

    version: int
    parent: int | None
    created: float
    base: bool
    size: int            # memory bytes
    pages: int
    bytes_written: int
    chain_length: int
    restore_bytes: int   # bytes a restore of this version reads
    kind: str            # "app" or "region" ("unknown" if damaged)
    damaged: str | None = None  # why its manifest cannot be read (the other fields are then 0)


# ---- shared machinery --------------------------------------------------------------

def _check_options(keep: Any, base_every: Any, base_fraction: Any, compress: Any) -> None:
    """Refuses bad options before a save touches the tracker or the target."""
    def whole(value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{what} must be an int, not {type(value).__name__}")

    whole(base_every, "base_every")
    if base_every < 0:
        raise ValueError(f"base_every must be >= 0, got {base_every}")
    if isinstance(base_fraction, bool) or not isinstance(base_fraction, (int, float, np.floating,
                                                                         np.integer)):
        raise TypeError(f"base_fraction must be a number, not {type(base_fraction).__name__}")
    if not 0 <= base_fraction:  # NaN included
        raise ValueError(f"base_fraction must be >= 0, got {base_fraction}")
    if keep is not None:
        whole(keep, "keep")
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
    if compress is not None:
        whole(compress, "compress")
        if not -(1 << 17) <= compress <= 22:
            raise ValueError(f"compress is a zstd level from -131072 to 22 (or None), got {compress}")



def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable as progress(done, total), not {type(progress).__name__}")


# ---- bare regions -----------------------------------------------------------------------

# region -> {tracker id: (the tracker, the store it last saved to with that
# tracker, the version it wrote and that version's own object, the region's
# shrink count and the tracker's epoch then)}. One entry per tracker, not per target: a save re-arms the
# tracker, so a save to another target takes the pages the first target's next
# increment would need. A changed epoch (the tracker was stopped, restarted or
# reset since) means writes may be missing from its flags.
_last_saved: weakref.WeakKeyDictionary[
    Region, dict[int, tuple[weakref.ref[Tracker], str, int, str, int, int | None]]] = \
    weakref.WeakKeyDictionary()
class _TargetLock:
    """One writer at a time per target in this process (two would pick the
    same version number); forgotten when no save holds it. Other processes
    must not write the same target."""

    __slots__ = ("lock", "owner", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner = -1

    def __enter__(self) -> None:
        # A save's progress callback saving to the same target would wait
        # for itself: refused instead.
        if self.owner == threading.get_ident():
            raise PageforkError("a save to this target is already running in this thread (a progress "
                                "callback cannot save to the target it reports on)")
        self.lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.owner = -1
        self.lock.release()


class _SaveLocks:
    """This process's save locks: ``lock`` guards ``_last_saved`` and
    ``targets``, one _TargetLock per target in use. Renewed whole in a
    fork()ed child."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.lock = threading.Lock()
        self.targets: weakref.WeakValueDictionary[str, _TargetLock] = weakref.WeakValueDictionary()


_locks = _SaveLocks()
renewed_in_child(_SaveLocks.renew).add(_locks)


def _target_lock(store: Store) -> _TargetLock:
    with _locks.lock:
        found = _locks.targets.get(store.description)
        if found is None:
            found = _locks.targets[store.description] = _TargetLock()
        return found


def save(region: Region, target: Target, *, tracker: Tracker | None = None, keep: int | None = None,
         base_every: int = DEFAULT_BASE_EVERY, base_fraction: float = DEFAULT_BASE_FRACTION,
         compress: int | None = DEFAULT_COMPRESS, progress: Progress | None = None) -> CheckpointInfo:
    """Checkpoints ``region`` to ``target`` (a folder or an fsspec URL).

    Without ``tracker`` every save is a base (the whole region). With a
    tracker that is tracking ``region`` (``tracker.start(region)``), the
    first save is a base and later ones write only the pages it saw
    written since the save before, read and re-armed atomically: with
    writer threads running, every page written before ``save`` returns is
    in this version or the next. ``compress`` is a zstd level (None: off;
    incompressible data is stored raw either way). ``progress(done,
    total)``, if given, is told the bytes of the version's data written so
    far, piece by piece, ending with ``done == total``.
    """
    t0 = time.perf_counter()
    _check_options(keep, base_every, base_fraction, compress)
    _check_progress(progress)
    if not isinstance(region, Region):
        raise TypeError(f"save checkpoints a pagefork Region, not {type(region).__name__}")
    if region.closed:
        raise PageforkError("the region is closed")
    if tracker is not None and not isinstance(tracker, Tracker):
        raise TypeError(f"tracker must be a pagefork Tracker, not {type(tracker).__name__}")
    store = open_store(target)
    with _target_lock(store):
        return _save(region, store, tracker, keep, base_every, base_fraction, compress, t0, progress)


def _save(region: Region, store: Store, tracker: Tracker | None, keep: int | None, base_every: int,
          base_fraction: float, compress: int | None, t0: float,
          progress: Progress | None = None) -> CheckpointInfo:
    key = id(tracker)
    last, last_object, shrinks = None, "", 0
    epoch = tracker.epoch(region) if tracker is not None else None
    with _locks.lock:
        entry = _last_saved.get(region, {}).get(key) if tracker is not None else None
        # Not a new tracker at a reused id; its last save went to this target;
        # it has tracked without a break since.
        if entry is not None and entry[0]() is tracker and entry[1] == store.description \
                and epoch is not None and entry[5] == epoch:
            last, last_object, shrinks = entry[2], entry[3], entry[4]
    parent = None
    if last is not None:
        parent = _chain.own_version(store, last, last_object)
        if parent is not None and (parent.size != region.size or region.shrinks != shrinks):
            parent = None  # resized: a new base (pages cut off and regrown are not tracked)
    # Read-and-re-arm before copying: a write after this point is flagged
    # for the next save, and a page written before it is copied below.
    pages = None
    if tracker is not None:
        pages = tracker.dirty_pages(region, "global", reset=True)
    view = memoryview(region).cast("B")
    try:
        info, manifest = _chain.commit(store, source=view, size=region.size, max_size=region.max_size,
                                       pages=pages if parent is not None else None, parent=parent,
                                       app=None, base_every=base_every, base_fraction=base_fraction,
                                       keep=keep, compress=compress, t0=t0, live=True, progress=progress)
    except BaseException:
        # The tracker's flags were read and cleared: the next save must not
        # build on what this one may not have written. It writes a base.
        with _locks.lock:
            _last_saved.get(region, {}).pop(key, None)
        raise
    finally:
        view.release()
    if tracker is not None:
        with _locks.lock:
            _last_saved.setdefault(region, {})[key] = (
                weakref.ref(tracker), store.description, info.version,
                manifest.objects[-1].name, region.shrinks, epoch)
    return info


def load(target: Target, *, version: int | None = None, into: Region | None = None,
         progress: Progress | None = None) -> Region:
    """The memory of checkpoint ``version`` (default: the newest) of
    ``target``: a new Region, or ``into`` resized to it (within its
    max_size). Damaged or missing objects raise CorruptDataError naming
    the version and the object.

    With ``into``, every object is read and checked before ``into`` is
    touched (resized or written), so a damaged or missing object leaves it
    exactly as it was, at the price of reading the checkpoint twice (the
    second time from the page cache on a local disk). Only an object
    changed in the store while this load runs, or a compressed base whose
    intact bytes (right length and checksum) are not a valid zstd frame,
    can still fail the copy part-way: then ``into`` holds a mix of old and
    new bytes.

    A version a writer prunes (``keep=``) while this load reads it raises
    VersionPrunedError, not damage; a load of the newest version then
    takes the new newest instead. ``progress(done, total)``, if given, is
    told the stored bytes read, object by object, ending with ``done ==
    total``."""
    if into is not None and not isinstance(into, Region):
        raise TypeError(f"into must be a pagefork Region, not {type(into).__name__}")
    _check_progress(progress)
    store = open_store(target)
    for attempt in range(_PRUNED_RETRIES):
        try:
            return _load(store, _chain.pick_version(store, version), into, progress)
        except VersionPrunedError:
            if version is not None or attempt == _PRUNED_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _load(store: Store, v: int, into: Region | None, progress: Progress | None = None) -> Region:
    """``load`` of version ``v``."""
    manifest = _chain.read_manifest(store, v)
    if into is not None:
        if manifest.size > into.max_size:
            raise OutOfBoundsError(f"checkpoint version {v} holds {manifest.size} bytes; the "
                                   f"region's max_size is {into.max_size}")
        if into.closed:
            raise PageforkError("the region is closed")
        _chain.check_objects(store, manifest)
        if into.size != manifest.size:
            into.resize(manifest.size)
        memory = into
    else:
        memory = Region(manifest.size, max_size=max(manifest.max_size, manifest.size))
    try:
        if into is None:
            memory.advise_huge(True)  # filled whole: 2 MiB page faults, not 4 KiB ones
        _chain.restore_into(store, manifest, memory, zeroed=into is None, progress=progress)
        if into is None:
            memory.advise_huge(False)  # a region is tracked page by page: no new huge pages
    except BaseException:
        if into is None:
            memory.close()
        raise
    return memory


# ---- an App's executor ------------------------------------------------------------
# App.checkpoint and App.restore (app.py) glue these to the App's layout.

@dataclass(frozen=True)
class SavedAt:
    """Where an executor's memory was checkpointed last: the next checkpoint
    to the same target is an increment on it, if it is still there."""

    target: str       # the store's description
    version: int
    last_object: str  # the newest object of that version (its data)


def save_executor(executor: Executor, target: Target, *, layout: Callable[[], dict[str, Any]],
                  last: Callable[[], SavedAt | None], saved: Callable[[SavedAt], None],
                  keep: int | None = None, base_every: int = DEFAULT_BASE_EVERY,
                  base_fraction: float = DEFAULT_BASE_FRACTION,
                  compress: int | None = DEFAULT_COMPRESS,
                  progress: Progress | None = None) -> CheckpointInfo:
    """The executor's main-memory pages changed since ``last()`` (all of
    them if it is None or elsewhere) to ``target``, with ``layout()`` as the
    manifest's App layout; ``saved`` learns where they went. The callbacks
    run on the executor's batch thread: never during a batch, never cut off
    half-way, and ``last()`` after every checkpoint queued before this one
    (whose ``mark_saved`` cleared what an increment on an older one needs)."""
    t0 = time.perf_counter()
    _check_options(keep, base_every, base_fraction, compress)
    store = open_store(target)

    def save(_: Any) -> CheckpointInfo:
        # Every change to main memory since the last checkpoint: the pages
        # batches merged into the snapshot, the pages the main program
        # wrote (carried into the snapshot here), and growth.
        executor.carry_main_writes()
        pages = executor.unsaved_pages()
        parent = None
        at = last()
        if at is not None and at.target == store.description:
            parent = _chain.own_version(store, at.version, at.last_object)
        meta = layout()
        snapshot = executor.snapshot
        # A base reads the snapshot's file, not its mapping: a hole (a page
        # never written) read through the mapping would be allocated.
        info, manifest = _chain.commit(store, source=snapshot.view(), size=snapshot.size,
                                       max_size=snapshot.max_size,
                                       pages=pages if parent is not None else None, parent=parent,
                                       app=meta, base_every=base_every, base_fraction=base_fraction,
                                       keep=keep, compress=compress, t0=t0, live=False,
                                       image=FileImage(snapshot.fd, snapshot.size), progress=progress)
        executor.mark_saved()
        saved(SavedAt(store.description, info.version, manifest.objects[-1].name))
        return info

    with _target_lock(store):
        info = executor.call(save, cancellable=False)
    return info


@dataclass(frozen=True)
class AppImage:
    """A checkpoint version of an App, found but not yet read."""

    store: Store
    version: int
    manifest: Manifest

    @property
    def layout(self) -> dict[str, Any]:
        assert self.manifest.app is not None
        return self.manifest.app

    def damaged(self, why: str) -> CorruptDataError:
        """The error for damage found in this version's manifest (its App
        layout, say), naming the version and the manifest."""
        return _chain.damage(self.store, self.version, manifest_name(self.version), why)


def find_app_image(target: Target, version: int | None = None) -> AppImage:
    """Checkpoint ``version`` (default: the newest) of ``target``, which
    must hold an App."""
    store = open_store(target)
    v = _chain.pick_version(store, version)
    manifest = _chain.read_manifest(store, v)
    if manifest.app is None:
        raise ValueError(f"checkpoint version {v} in {store.description} holds a bare Region, "
                         "not an App: use pagefork.checkpoint.load")
    return AppImage(store, v, manifest)


def newest_restorable(target: Target, restore: Callable[[AppImage], T]) -> T:
    """``restore(image)`` of the newest version of ``target`` it succeeds on:
    a newer version that is damaged (CorruptDataError: its manifest, an
    object, its layout) is skipped with a RuntimeWarning naming it, so a
    resume goes on from the last good state; one a writer prunes meanwhile
    gives way to the new newest."""
    store = open_store(target)
    damaged: dict[int, CorruptDataError] = {}
    pruned = 0
    while True:
        left = [v for v in _chain.manifests(store) if v not in damaged]
        if not left:
            if damaged:
                raise damaged[max(damaged)]
            raise FileNotFoundError(f"no checkpoint in {store.description}")
        v = max(left)
        try:
            result = restore(find_app_image(store, v))
        except VersionPrunedError:
            pruned += 1
            if pruned == _PRUNED_RETRIES:
                raise
            continue
        except CorruptDataError as exc:
            damaged[v] = exc
            continue
        if damaged:
            warnings.warn(f"{damaged[max(damaged)]}; restored version {v}, the newest restorable one "
                          f"(damaged: {', '.join(map(str, sorted(damaged)))})", RuntimeWarning, stacklevel=3)
        return result


def restore_executor(image: AppImage, executor: Executor, counter: int,
                     progress: Progress | None = None) -> SavedAt:
    """Reads ``image`` into the executor's (empty) snapshot, writing only
    pages that are not zero, maps main memory from it, on its batch thread,
    and sets its version counter; returns where it came from."""
    def fill(_: Any) -> None:
        restore_into_snapshot(image.store, image.manifest, executor.begin_restore(), progress)
        executor.restored(counter)

    executor.call(fill, cancellable=False)
    return SavedAt(image.store.description, image.version, image.manifest.objects[-1].name)


# ---- inspection -----------------------------------------------------------------------------

def versions(target: Target) -> list[VersionInfo]:
    """Every committed version of ``target``, oldest first. A version whose
    manifest is damaged is listed with ``damaged`` saying why."""
    store = open_store(target)
    out = []
    for v in sorted(_chain.manifests(store)):
        try:
            m = _chain.read_manifest(store, v)
        except VersionPrunedError:
            continue  # pruned since it was listed
        except CorruptDataError as exc:  # listed as such: the others may be intact
            out.append(VersionInfo(v, None, 0.0, False, 0, 0, 0, 0, 0, "unknown", damaged=str(exc)))
            continue
        out.append(VersionInfo(v, m.parent, m.created, m.is_base, m.size, m.pages,
                               m.bytes_written, m.chain_length, sum(o.size for o in m.objects),
                               "app" if m.app is not None else "region"))
    return out


def verify(target: Target, *, progress: Progress | None = None) -> Iterator[tuple[int, str, str | None]]:
    """Checks every object of every version: yields (version, object,
    None if intact else why not), manifests first. Reads everything.
    ``progress(done, total)``, if given, is told the data objects' stored
    bytes checked, after each object. Arguments are checked at the call,
    before the first item."""
    _check_progress(progress)
    return _verify(open_store(target), progress)


def _verify(store: Store, progress: Progress | None) -> Iterator[tuple[int, str, str | None]]:
    manifests = []
    for v in sorted(_chain.manifests(store)):
        try:
            manifests.append(_chain.read_manifest(store, v))
            yield v, manifest_name(v), None
        except VersionPrunedError:
            continue  # a writer pruned it since it was listed: not damage
        except CorruptDataError as exc:
            yield v, manifest_name(v), str(exc)
    refs = list(iter_refs(manifests))
    total, done = sum(ref.size for _, ref in refs), 0
    for m, ref in refs:
        if progress is not None and done:
            progress(done, total)
        done += ref.size
        try:  # bases never exceed it
            scratch = Region(max(m.size, PAGE_SIZE)) if ref.kind == "base" else None
        except PageforkError as exc:  # a size no restore could map either: check the rest
            yield m.version, ref.name, str(_chain.damage(store, m.version, ref.name, f"its memory of "
                                                   f"{m.size} bytes cannot be mapped here: {exc}"))
            continue
        try:
            with store.open(ref.name) as f:
                read_object(f, ref, memoryview(scratch) if scratch is not None else None, m.size)
            yield m.version, ref.name, None
        except FileNotFoundError:
            lost = _chain.missing(store, m.version, ref)
            if not isinstance(lost, VersionPrunedError):  # pruned meanwhile: not damage
                yield m.version, ref.name, str(lost)
        except CorruptDataError as exc:
            yield m.version, ref.name, str(_chain.damage(store, m.version, ref.name, str(exc)))
        finally:
            if scratch is not None:
                scratch.close()
    if progress is not None:
        progress(done, total)

