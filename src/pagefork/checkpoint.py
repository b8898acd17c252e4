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

import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import _native
from ._checkpoint_format import (KIND_IMAGE, KIND_PAGES, Manifest, ObjectRef, ObjectWriter,
                                 check_object, iter_refs, manifest_name, manifest_version,
                                 object_version, pages_body, read_object)
from ._checkpoint_store import open_store
from ._errors import CorruptDataError, OutOfBoundsError, PageforkError
from ._sizes import PAGE_SIZE
from .memory import Region
from .tracking import Tracker

if TYPE_CHECKING:
    from .app import App

__all__ = ["CheckpointInfo", "VersionInfo", "save", "load", "versions", "verify",
           "save_app", "restore_app"]

Target = Any  # a folder path, os.PathLike, or an fsspec URL string

DEFAULT_BASE_EVERY = 10
DEFAULT_BASE_FRACTION = 0.5
DEFAULT_COMPRESS = 1


@dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint did."""

    version: int
    base: bool           # a whole image rather than an increment
    pages: int           # pages written
    bytes_written: int   # bytes of data object and manifest
    seconds: float
    chain_length: int    # increments on top of the base this version restores from


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
    kind: str            # "app" or "region"


# ---- shared machinery --------------------------------------------------------------

def _manifests(store: Any) -> dict[int, str]:
    found = {}
    for name in store.names():
        v = manifest_version(name)
        if v is not None:
            found[v] = name
    return found


def _read_manifest(store: Any, version: int) -> Manifest:
    name = manifest_name(version)
    try:
        with store.open(name) as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptDataError(f"checkpoint version {version} in {store.description}: its manifest "
                               f"{name} is missing") from None
    except CorruptDataError as exc:
        raise _damage(store, version, name, str(exc)) from None
    try:
        manifest = Manifest.decode(data)
    except CorruptDataError as exc:
        raise _damage(store, version, name, str(exc)) from None
    if manifest.version != version:
        raise _damage(store, version, name, f"it describes version {manifest.version}")
    return manifest


def _damage(store: Any, version: int, name: str, why: str) -> CorruptDataError:
    err = CorruptDataError(f"checkpoint version {version} in {store.description}: object "
                           f"{name} is damaged: {why}")
    err.version = version  # type: ignore[attr-defined]
    err.object = name  # type: ignore[attr-defined]
    return err


def _pick_version(store: Any, version: int | None) -> int:
    found = _manifests(store)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {store.description}")
    if version is None:
        return max(found)
    if version not in found:
        raise ValueError(f"no checkpoint version {version} in {store.description}; it has "
                         f"{_ranges(sorted(found))}")
    return version


def _ranges(values: list[int]) -> str:
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)


def _restore_into(store: Any, manifest: Manifest, memory: Region, *, zeroed: bool) -> None:
    """Writes the image of ``manifest`` into ``memory``, which is at least
    ``manifest.size`` bytes (``zeroed``: it holds only zeros)."""
    view = memoryview(memory).cast("B")
    try:
        for ref in manifest.objects:
            try:
                with store.open(ref.name) as f:
                    size, batch = read_object(f, ref, view[: manifest.size] if ref.kind == "base" else None,
                                              manifest.size)
            except FileNotFoundError:
                raise _missing(store, manifest.version, ref) from None
            except CorruptDataError as exc:
                raise _damage(store, manifest.version, ref.name,
                              f"{exc} (written by version {ref.version})") from None
            if size > manifest.max_size:
                raise _damage(store, manifest.version, ref.name, f"its memory of {size} bytes is "
                              f"past the manifest's max_size {manifest.max_size}")
            if batch is not None and len(batch):
                _native.apply(view[: manifest.size], *batch.columns())
            if ref.kind == "base" and size < manifest.size and not zeroed:
                # The memory grew after the base: what was never written reads as zero.
                np.frombuffer(view, np.uint8, manifest.size - size, size)[:] = 0
    finally:
        view.release()


def _check_objects(store: Any, manifest: Manifest) -> None:
    """Checks every object ``manifest`` needs (headers, lengths, CRC32Cs;
    increments decoded) without writing anything: before a restore into
    memory that must stay as it was if the checkpoint is damaged."""
    for ref in manifest.objects:
        try:
            with store.open(ref.name) as f:
                check_object(f, ref, manifest.size)
        except FileNotFoundError:
            raise _missing(store, manifest.version, ref) from None
        except CorruptDataError as exc:
            raise _damage(store, manifest.version, ref.name,
                          f"{exc} (written by version {ref.version})") from None


def _missing(store: Any, version: int, ref: ObjectRef) -> CorruptDataError:
    err = CorruptDataError(f"checkpoint version {version} in {store.description}: object "
                           f"{ref.name} (written by version {ref.version}) is missing")
    err.version = version  # type: ignore[attr-defined]
    err.object = ref.name  # type: ignore[attr-defined]
    return err


def _own_version(store: Any, version: int, own_object: str) -> Manifest | None:
    """The manifest of ``version`` if it is still the newest version of
    ``store`` and still the one this process wrote or restored (its own
    object is ``own_object``), else None: a new chain starts. A target
    emptied and refilled by another writer can reach the same version
    number with other bytes; an increment on it would restore wrong ones."""
    if max(_manifests(store), default=0) != version:
        return None
    try:
        manifest = _read_manifest(store, version)
    except CorruptDataError:
        return None
    return manifest if manifest.objects[-1].name == own_object else None


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


def _commit(store: Any, *, source: memoryview, size: int, max_size: int,
            pages: np.ndarray | None, parent: Manifest | None, app: dict[str, Any] | None,
            base_every: int, base_fraction: float, keep: int | None,
            compress: int | None, t0: float, live: bool) -> tuple[CheckpointInfo, Manifest]:
    """Writes one version: a base when ``pages`` is None, there is no
    parent, or the parent's chain is long or large enough; else an
    increment of ``pages`` on top of ``parent``. ``live``: other threads
    may be writing ``source``."""
    store.remove_stale_temporaries()
    found = _manifests(store)
    version = max(found, default=0) + 1
    as_base = (pages is None or parent is None or parent.chain_length >= base_every
               or parent.increment_bytes > base_fraction * size)
    if as_base:
        n_pages = -(-size // PAGE_SIZE)
        writer = ObjectWriter(KIND_IMAGE, size, source[:size], compress, live=live)
    else:
        assert pages is not None
        n_pages = int(np.count_nonzero(pages))
        writer = ObjectWriter(KIND_PAGES, size, pages_body(source, size, pages), compress)
    name = f"v{version:010d}-{os.urandom(4).hex()}.{'base' if as_base else 'incr'}"
    store.put(name, writer.chunks())
    length = writer.length
    ref = ObjectRef(name, version, "base" if as_base else "increment", length, writer.crc, n_pages)
    objects = [ref] if as_base else [*parent.objects, ref]  # type: ignore[union-attr]
    manifest = Manifest(version, None if parent is None else parent.version, time.time(), size,
                        max_size, PAGE_SIZE, n_pages, length, objects, app)
    encoded = manifest.encode()
    try:
        store.put(manifest_name(version), [encoded], exclusive=True)  # the commit
    except FileExistsError:
        raise PageforkError(f"checkpoint version {version} of {store.description} was committed by "
                            "another writer meanwhile: one writer per target (this version was "
                            "not written)") from None
    if keep is not None:
        _prune(store, {**found, version: manifest_name(version)}, keep, manifest)
    else:
        _remove_orphans(store, {**found, version: manifest_name(version)}, manifest)
    info = CheckpointInfo(version, as_base, n_pages, length + len(encoded),
                          time.perf_counter() - t0, manifest.chain_length)
    return info, manifest


def _referenced(store: Any, found: dict[int, str], newest: Manifest) -> set[str] | None:
    names = {r.name for r in newest.objects}
    for v in found:
        if v == newest.version:
            continue
        try:
            names.update(r.name for r in _read_manifest(store, v).objects)
        except CorruptDataError:
            return None  # cannot tell what a damaged manifest needs: delete nothing
    return names


def _remove_orphans(store: Any, found: dict[int, str], newest: Manifest) -> None:
    """Deletes data objects no manifest names, left by a save killed (or
    failed) before its commit: the next save reuses that version number,
    so they carry its number or, if that save itself was killed after its
    commit and before this clean-up, the number before. Only those two
    versions' objects are looked at and only their manifests read, so a
    save costs the same after ten versions or ten thousand."""
    recent = newest.version - 1
    referenced = {r.name for r in newest.objects}
    candidates = [n for n in store.names() if n not in referenced
                  and (v := object_version(n)) is not None and recent <= v <= newest.version]
    if not candidates:
        return
    if recent in found:
        try:
            referenced.update(r.name for r in _read_manifest(store, recent).objects)
        except CorruptDataError:
            return  # cannot tell what a damaged manifest needs: delete nothing
    for n in candidates:
        if n not in referenced:
            store.delete(n)


def _prune(store: Any, found: dict[int, str], keep: int, newest: Manifest) -> None:
    """Keeps the newest ``keep`` versions; deletes the other manifests
    (oldest first) and then every object no kept version needs."""
    kept = sorted(found)[-keep:]
    kept_found = {v: found[v] for v in kept}
    referenced = _referenced(store, kept_found, newest)
    if referenced is None:
        return
    for v in sorted(found):
        if v not in kept_found:
            store.delete(found[v])
    for n in store.names():
        if manifest_version(n) is None and n.endswith((".base", ".incr")) and n not in referenced:
            store.delete(n)


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
_lock = threading.Lock()


class _TargetLock:
    """One writer at a time per target in this process (two would pick the
    same version number); forgotten when no save holds it. Other processes
    must not write the same target."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


_target_locks: weakref.WeakValueDictionary[str, _TargetLock] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    """A lock another thread held at fork() would never be released in the child."""
    global _lock, _target_locks
    _lock = threading.Lock()
    _target_locks = weakref.WeakValueDictionary()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _target_lock(store: Any) -> _TargetLock:
    with _lock:
        found = _target_locks.get(store.description)
        if found is None:
            found = _target_locks[store.description] = _TargetLock()
        return found


def save(region: Region, target: Target, *, tracker: Tracker | None = None, keep: int | None = None,
         base_every: int = DEFAULT_BASE_EVERY, base_fraction: float = DEFAULT_BASE_FRACTION,
         compress: int | None = DEFAULT_COMPRESS) -> CheckpointInfo:
    """Checkpoints ``region`` to ``target`` (a folder or an fsspec URL).

    Without ``tracker`` every save is a base (the whole region). With a
    tracker that is tracking ``region`` (``tracker.start(region)``), the
    first save is a base and later ones write only the pages it saw
    written since the save before, read and re-armed atomically: with
    writer threads running, every page written before ``save`` returns is
    in this version or the next. ``compress`` is a zstd level (None: off;
    incompressible data is stored raw either way).
    """
    t0 = time.perf_counter()
    _check_options(keep, base_every, base_fraction, compress)
    if not isinstance(region, Region):
        raise TypeError(f"save checkpoints a pagefork Region, not {type(region).__name__}")
    if region.closed:
        raise PageforkError("the region is closed")
    if tracker is not None and not isinstance(tracker, Tracker):
        raise TypeError(f"tracker must be a pagefork Tracker, not {type(tracker).__name__}")
    store = open_store(target)
    with _target_lock(store):
        return _save(region, store, tracker, keep, base_every, base_fraction, compress, t0)


def _save(region: Region, store: Any, tracker: Tracker | None, keep: int | None, base_every: int,
          base_fraction: float, compress: int | None, t0: float) -> CheckpointInfo:
    key = id(tracker)
    last, last_object, shrinks = None, "", 0
    epoch = tracker._epoch(region) if tracker is not None else None
    with _lock:
        entry = _last_saved.get(region, {}).get(key) if tracker is not None else None
        # Not a new tracker at a reused id; its last save went to this target;
        # it has tracked without a break since.
        if entry is not None and entry[0]() is tracker and entry[1] == store.description \
                and epoch is not None and entry[5] == epoch:
            last, last_object, shrinks = entry[2], entry[3], entry[4]
    parent = None
    if last is not None:
        parent = _own_version(store, last, last_object)
        if parent is not None and (parent.size != region.size or region._shrinks != shrinks):
            parent = None  # resized: a new base (pages cut off and regrown are not tracked)
    # Read-and-re-arm before copying: a write after this point is flagged
    # for the next save, and a page written before it is copied below.
    pages = None
    if tracker is not None:
        pages = tracker.dirty_pages(region, "global", reset=True)
    view = memoryview(region).cast("B")
    try:
        info, manifest = _commit(store, source=view, size=region.size, max_size=region.max_size,
                          pages=pages if parent is not None else None, parent=parent, app=None,
                          base_every=base_every, base_fraction=base_fraction, keep=keep,
                          compress=compress, t0=t0, live=True)
    except BaseException:
        # The tracker's flags were read and cleared: the next save must not
        # build on what this one may not have written. It writes a base.
        with _lock:
            _last_saved.get(region, {}).pop(key, None)
        raise
    finally:
        view.release()
    if tracker is not None:
        with _lock:
            _last_saved.setdefault(region, {})[key] = (
                weakref.ref(tracker), store.description, info.version,
                manifest.objects[-1].name, region._shrinks, epoch)
    return info


def load(target: Target, *, version: int | None = None, into: Region | None = None) -> Region:
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
    new bytes."""
    store = open_store(target)
    v = _pick_version(store, version)
    manifest = _read_manifest(store, v)
    if into is not None:
        if not isinstance(into, Region):
            raise TypeError(f"into must be a pagefork Region, not {type(into).__name__}")
        if manifest.size > into.max_size:
            raise OutOfBoundsError(f"checkpoint version {v} holds {manifest.size} bytes; the "
                                   f"region's max_size is {into.max_size}")
        if into.closed:
            raise PageforkError("the region is closed")
        _check_objects(store, manifest)
        if into.size != manifest.size:
            into.resize(manifest.size)
        memory = into
    else:
        memory = Region(manifest.size, max_size=max(manifest.max_size, manifest.size))
    try:
        if into is None:
            memory._advise_huge(True)  # filled whole: 2 MiB page faults, not 4 KiB ones
        _restore_into(store, manifest, memory, zeroed=into is None)
        if into is None:
            memory._advise_huge(False)  # a region is tracked page by page: no new huge pages
    except BaseException:
        if into is None:
            memory.close()
        raise
    return memory


# ---- Apps ------------------------------------------------------------------------------

def save_app(app: App, target: Target, *, keep: int | None = None,
             base_every: int = DEFAULT_BASE_EVERY, base_fraction: float = DEFAULT_BASE_FRACTION,
             compress: int | None = DEFAULT_COMPRESS) -> CheckpointInfo:
    """``App.checkpoint``: the executor's main-memory pages changed since
    this App's last checkpoint to ``target``, with the layout."""
    t0 = time.perf_counter()
    _check_options(keep, base_every, base_fraction, compress)
    store = open_store(target)
    executor = app._executor

    def save(_: Any) -> CheckpointInfo:
        # Every change to main memory since the last checkpoint: the pages
        # batches merged into the snapshot, the pages the main program
        # wrote (carried into the snapshot here), and growth.
        executor.carry_main_writes()
        pages = executor.unsaved_pages()
        last = app._last_checkpoint
        parent = None
        if last is not None and last[0] == store.description:
            parent = _own_version(store, last[1], last[2])
        meta = app._checkpoint_layout()
        snapshot = executor.snapshot
        info, manifest = _commit(store, source=snapshot.view(), size=snapshot.size,
                                 max_size=snapshot.max_size, pages=pages if parent is not None else None,
                                 parent=parent, app=meta, base_every=base_every,
                                 base_fraction=base_fraction, keep=keep, compress=compress, t0=t0,
                                 live=False)
        executor.mark_saved()
        app._last_checkpoint = (store.description, info.version, manifest.objects[-1].name)
        return info

    # On the App's batch thread: never during a batch, never cut off half-way.
    with _target_lock(store):
        info = executor.call(save, cancellable=False)
    return info


def restore_app(cls: type[App], target: Target, *, version: int | None = None,
                **app_kwargs: Any) -> App:
    """``App.restore``: a new App (``app_kwargs`` go to its constructor) with
    the arrays, merge rules, bytes and version counter of checkpoint
    ``version`` (default: the newest)."""
    store = open_store(target)
    v = _pick_version(store, version)
    manifest = _read_manifest(store, v)
    if manifest.app is None:
        raise ValueError(f"checkpoint version {v} in {store.description} holds a bare Region, "
                         "not an App: use pagefork.checkpoint.load")
    for key in ("size", "max_size"):
        if key in app_kwargs:
            raise TypeError(f"App.restore takes {key} from the checkpoint, not as an argument")
    app = cls(manifest.size, max_size=max(manifest.max_size, manifest.size), **app_kwargs)
    try:
        counter = app._restore_layout(manifest.app)  # checked before any byte is read
        executor = app._executor
        def fill(_: Any) -> None:
            _restore_into(store, manifest, executor.begin_restore(), zeroed=True)
            executor.restored(counter)

        executor.call(fill, cancellable=False)
        app._last_checkpoint = (store.description, v, manifest.objects[-1].name)
    except BaseException:
        app.close()
        raise
    return app


# ---- inspection -----------------------------------------------------------------------------

def versions(target: Target) -> list[VersionInfo]:
    """Every committed version of ``target``, oldest first."""
    store = open_store(target)
    out = []
    for v in sorted(_manifests(store)):
        m = _read_manifest(store, v)
        out.append(VersionInfo(v, m.parent, m.created, m.is_base, m.size, m.pages,
                               m.bytes_written, m.chain_length, sum(o.size for o in m.objects),
                               "app" if m.app is not None else "region"))
    return out


def verify(target: Target) -> Iterator[tuple[int, str, str | None]]:
    """Checks every object of every version: yields (version, object,
    None if intact else why not), manifests first. Reads everything."""
    store = open_store(target)
    manifests = []
    for v in sorted(_manifests(store)):
        try:
            manifests.append(_read_manifest(store, v))
            yield v, manifest_name(v), None
        except CorruptDataError as exc:
            yield v, manifest_name(v), str(exc)
    for m, ref in iter_refs(manifests):
        try:  # bases never exceed it
            scratch = Region(max(m.size, PAGE_SIZE)) if ref.kind == "base" else None
        except PageforkError as exc:  # a size no restore could map either: check the rest
            yield m.version, ref.name, str(_damage(store, m.version, ref.name, f"its memory of "
                                                   f"{m.size} bytes cannot be mapped here: {exc}"))
            continue
        try:
            with store.open(ref.name) as f:
                read_object(f, ref, memoryview(scratch) if scratch is not None else None, m.size)
            yield m.version, ref.name, None
        except FileNotFoundError:
            yield m.version, ref.name, str(_missing(store, m.version, ref))
        except CorruptDataError as exc:
            yield m.version, ref.name, str(_damage(store, m.version, ref.name, str(exc)))
        finally:
            if scratch is not None:
                scratch.close()

