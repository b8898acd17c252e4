"""The versions in a checkpoint target: finding and reading manifests,
committing a new version (base or increment), reading a version's image
back, and pruning what no kept version needs. Damage is a
:class:`CorruptDataError` naming the version and the object.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np

from . import _native
from ._checkpoint_format import (KIND_IMAGE, KIND_PAGES, Manifest, ObjectRef, ObjectWriter,
                                 check_object, manifest_name, manifest_version, object_version,
                                 pages_body, read_object)
from ._checkpoint_store import Store
from ._errors import CorruptDataError, PageforkError, VersionPrunedError
from ._log import log
from ._sizes import PAGE_SIZE
from .memory import Region

__all__ = ["CheckpointInfo", "manifests", "read_manifest", "damage", "missing", "pruned", "pick_version",
           "restore_into", "check_objects", "own_version", "commit"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint did."""

    version: int
    base: bool           # a whole image rather than an increment
    pages: int           # pages written
    bytes_written: int   # bytes of data object and manifest
    seconds: float
    chain_length: int    # increments on top of the base this version restores from



def manifests(store: Store) -> dict[int, str]:
    found = {}
    for name in store.names():
        v = manifest_version(name)
        if v is not None:
            found[v] = name
    return found


def read_manifest(store: Store, version: int) -> Manifest:
    name = manifest_name(version)
    try:
        with store.open(name) as f:
            data = f.read()
    except FileNotFoundError:  # listed, then deleted: only pruning deletes a manifest
        raise pruned(store, version) from None
    except CorruptDataError as exc:
        raise damage(store, version, name, str(exc)) from None
    try:
        manifest = Manifest.decode(data)
    except CorruptDataError as exc:
        raise damage(store, version, name, str(exc)) from None
    if manifest.version != version:
        raise damage(store, version, name, f"it describes version {manifest.version}")
    return manifest


def damage(store: Store, version: int, name: str, why: str) -> CorruptDataError:
    return CorruptDataError(f"checkpoint version {version} in {store.description}: object "
                            f"{name} is damaged: {why}", version=version, object=name)


def pruned(store: Store, version: int) -> VersionPrunedError:
    return VersionPrunedError(f"checkpoint version {version} in {store.description} was pruned (deleted "
                              "by a writer's keep=) while it was being read", version=version)


def pick_version(store: Store, version: int | None) -> int:
    found = manifests(store)
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


def restore_into(store: Store, manifest: Manifest, memory: Region, *, zeroed: bool,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Writes the image of ``manifest`` into ``memory``, which is at least
    ``manifest.size`` bytes (``zeroed``: it holds only zeros); ``progress``
    is told the stored bytes read after each object."""
    view = memoryview(memory).cast("B")
    total, done = sum(o.size for o in manifest.objects), 0
    try:
        for ref in manifest.objects:
            try:
                with store.open(ref.name) as f:
                    size, batch = read_object(f, ref, view[: manifest.size] if ref.kind == "base" else None,
                                              manifest.size)
            except FileNotFoundError:
                raise missing(store, manifest.version, ref) from None
            except CorruptDataError as exc:
                raise damage(store, manifest.version, ref.name,
                              f"{exc} (written by version {ref.version})") from None
            if size > manifest.max_size:
                raise damage(store, manifest.version, ref.name, f"its memory of {size} bytes is "
                              f"past the manifest's max_size {manifest.max_size}")
            if batch is not None and len(batch):
                _native.apply(view[: manifest.size], *batch.columns())
            if ref.kind == "base" and size < manifest.size and not zeroed:
                # The memory grew after the base: what was never written reads as zero.
                np.frombuffer(view, np.uint8, manifest.size - size, size)[:] = 0
            done += ref.size
            if progress is not None:
                progress(done, total)
    finally:
        view.release()


def check_objects(store: Store, manifest: Manifest) -> None:
    """Checks every object ``manifest`` needs (headers, lengths, CRC32Cs;
    increments decoded) without writing anything: before a restore into
    memory that must stay as it was if the checkpoint is damaged."""
    for ref in manifest.objects:
        try:
            with store.open(ref.name) as f:
                check_object(f, ref, manifest.size)
        except FileNotFoundError:
            raise missing(store, manifest.version, ref) from None
        except CorruptDataError as exc:
            raise damage(store, manifest.version, ref.name,
                          f"{exc} (written by version {ref.version})") from None


def missing(store: Store, version: int, ref: ObjectRef) -> CorruptDataError | VersionPrunedError:
    """A missing object is damage, unless its version's manifest is gone
    too: pruning deletes manifests first, then the objects only they named."""
    if manifest_name(version) not in store.names():
        return pruned(store, version)
    return CorruptDataError(f"checkpoint version {version} in {store.description}: object "
                            f"{ref.name} (written by version {ref.version}) is missing",
                            version=version, object=ref.name)


def own_version(store: Store, version: int, own_object: str) -> Manifest | None:
    """The manifest of ``version`` if it is still the newest version of
    ``store`` and still the one this process wrote or restored (its own
    object is ``own_object``), else None: a new chain starts. A target
    emptied and refilled by another writer can reach the same version
    number with other bytes; an increment on it would restore wrong ones."""
    if max(manifests(store), default=0) != version:
        return None
    try:
        manifest = read_manifest(store, version)
    except (CorruptDataError, VersionPrunedError):
        return None
    return manifest if manifest.objects[-1].name == own_object else None


def commit(store: Store, *, source: memoryview, size: int, max_size: int,
            pages: np.ndarray | None, parent: Manifest | None, app: dict[str, Any] | None,
            base_every: int, base_fraction: float, keep: int | None,
            compress: int | None, t0: float, live: bool, image: Any = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[CheckpointInfo, Manifest]:
    """Writes one version: a base when ``pages`` is None, there is no
    parent, or the parent's chain is long or large enough; else an
    increment of ``pages`` on top of ``parent``. ``live``: other threads
    may be writing ``source``. ``image``: what a base stores, if not
    ``source[:size]`` (a FileImage of a snapshot's memfd, whose holes are
    never read). ``progress(done, total)`` is told the bytes of the data
    object's body done."""
    store.remove_stale_temporaries()
    found = manifests(store)
    version = max(found, default=0) + 1
    as_base = (pages is None or parent is None or parent.chain_length >= base_every
               or parent.increment_bytes > base_fraction * size)
    if log.isEnabledFor(logging.DEBUG):
        why = ("no tracked pages" if pages is None else "no version to build on" if parent is None
               else f"{parent.chain_length} increments (base_every={base_every})"
               if parent.chain_length >= base_every else
               f"increments of {parent.increment_bytes} bytes pass base_fraction={base_fraction}"
               if as_base else f"{int(np.count_nonzero(pages))} changed pages on version {parent.version}")
        log.debug("checkpoint version %d of %s: %s (%s)", version, store.description,
                  "a whole base" if as_base else "an increment", why)
    if as_base:
        n_pages = -(-size // PAGE_SIZE)
        writer = ObjectWriter(KIND_IMAGE, size, source[:size] if image is None else image, compress,
                              live=live)
    else:
        assert pages is not None
        n_pages = int(np.count_nonzero(pages))
        writer = ObjectWriter(KIND_PAGES, size, pages_body(source, size, pages), compress)
    writer.progress = progress
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


def _referenced(store: Store, found: dict[int, str], newest: Manifest) -> set[str] | None:
    names = {r.name for r in newest.objects}
    for v in found:
        if v == newest.version:
            continue
        try:
            names.update(r.name for r in read_manifest(store, v).objects)
        except VersionPrunedError:
            continue  # deleted meanwhile: it needs nothing
        except CorruptDataError:
            return None  # cannot tell what a damaged manifest needs: delete nothing
    return names


def _remove_orphans(store: Store, found: dict[int, str], newest: Manifest) -> None:
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
            referenced.update(r.name for r in read_manifest(store, recent).objects)
        except VersionPrunedError:
            pass  # deleted meanwhile: it needs nothing
        except CorruptDataError:
            return  # cannot tell what a damaged manifest needs: delete nothing
    for n in candidates:
        if n not in referenced:
            store.delete(n)


def _prune(store: Store, found: dict[int, str], keep: int, newest: Manifest) -> None:
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

