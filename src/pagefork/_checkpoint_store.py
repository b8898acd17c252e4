"""Where checkpoints live: a local folder, or any fsspec filesystem.

A store holds flat named objects. ``put`` makes an object appear whole or
not at all: on a local disk by writing a temporary file, fsyncing it,
renaming it into place and fsyncing the folder; on an object store by the
store's own single-request (or multipart) commit. Checkpoints write their
data objects first and the manifest last, so a version exists only once
every byte it needs is durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from typing import Any, BinaryIO, Protocol
from collections.abc import Iterable

from ._errors import CorruptDataError

__all__ = ["Store", "LocalStore", "FsspecStore", "open_store"]

#: Objects larger than this go to fsspec targets in parts of this size
#: (S3's minimum part is 5 MiB).
PART_SIZE = 16 << 20

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


class Store(Protocol):
    """Flat named objects with atomic ``put``: what checkpoints need of a
    target (a local folder or an fsspec filesystem)."""

    description: str

    def put(self, name: str, chunks: Iterable[Any], *, exclusive: bool = False) -> None: ...

    def open(self, name: str) -> BinaryIO: ...

    def names(self) -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def exists(self) -> bool:
        """Whether the target itself (folder, bucket or prefix) exists."""
        ...

    def remove_stale_temporaries(self) -> None:
        """Deletes what saves killed before their commit left behind."""
        ...


class LocalStore:
    """A folder on a local filesystem (created on first write)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.description = self.path

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _make_folder(self) -> None:
        """Creates the folder (and its parents); says which part of the path
        is a broken symbolic link or not a folder (os.makedirs only says
        FileExistsError)."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except (FileExistsError, FileNotFoundError, NotADirectoryError):
            why = _not_a_folder(self.path)
            if why is None:
                raise
            raise why from None

    def put(self, name: str, chunks: Iterable[Any], *, exclusive: bool = False) -> None:
        """Writes ``name`` whole or not at all. ``exclusive``: FileExistsError
        if it exists (another writer committed it), checked atomically by
        link(2) where the filesystem has hard links."""
        self._make_folder()
        temp = os.path.join(self.path, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with open(temp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            final = os.path.join(self.path, name)
            if exclusive and _link(temp, final):
                os.unlink(temp)
            elif exclusive and os.path.lexists(final):
                raise FileExistsError(errno.EEXIST, "exists", final)
            else:
                os.replace(temp, final)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        self._fsync_dir()  # the rename itself must survive a crash

    def open(self, name: str) -> BinaryIO:
        """The object ``name`` for reading. Only a regular file is an object:
        a FIFO would block the open (O_NONBLOCK) and a directory or device
        is damage, raised as CorruptDataError with a bare reason."""
        fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) \
                    else "a device or socket"
                raise CorruptDataError(f"it is {kind}, not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        # Outside the try: once fdopen has it, the file object alone closes
        # it (Ctrl-C right after fdopen used to close the number twice, maybe
        # someone else's descriptor by then).
        return os.fdopen(fd, "rb")

    def names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.path) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.path, name))
        except FileNotFoundError:
            pass

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def remove_stale_temporaries(self) -> None:
        """Deletes temporary files left by writers that no longer run (a
        kill between create and rename)."""
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:
            return
        for entry in entries:
            m = _TEMP.match(entry)
            if m and not _alive(int(m["pid"])):
                try:
                    os.unlink(os.path.join(self.path, entry))
                except OSError:
                    pass


def _not_a_folder(path: str) -> OSError | None:
    """Why the folder ``path`` cannot be created: the first part of it that
    is a broken symbolic link (FileNotFoundError) or not a folder
    (NotADirectoryError); None if no part is either (a race: say what
    os.makedirs said)."""
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        part = os.sep.join(parts[:i])
        if os.path.islink(part) and not os.path.exists(part):
            return FileNotFoundError(errno.ENOENT, f"checkpoint target {path}: {part} is a broken "
                                     f"symbolic link (to {os.readlink(part)}, which does not exist)")
        if os.path.lexists(part) and not os.path.isdir(part):
            return NotADirectoryError(errno.ENOTDIR, f"checkpoint target {path}: {part} exists and is "
                                      "not a folder")
    return None


def _link(source: str, name: str) -> bool:
    """Hard-links ``source`` as ``name`` (FileExistsError if it exists);
    False where the filesystem has no hard links."""
    try:
        os.link(source, name)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            return False
        raise
    return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FsspecStore:
    """A folder in an fsspec filesystem (``memory://``, ``s3://``, ...).
    Objects are written with one request each; object stores make an
    object visible only once it is complete."""

    def __init__(self, fs: Any, root: str, description: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.description = description

    @classmethod
    def from_url(cls, url: str) -> FsspecStore:
        try:
            import fsspec
        except ImportError:
            raise ImportError(f"checkpoint target {url!r} needs fsspec: pip install "
                              "'pagefork[checkpoint]' (and s3fs for s3://)") from None
        fs, path = fsspec.core.url_to_fs(url)
        return cls(fs, path, url)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def put(self, name: str, chunks: Iterable[Any], *, exclusive: bool = False) -> None:
        """An object of at most one part (PART_SIZE bytes) in one request;
        a larger one streamed in parts of that size (a multipart upload on
        S3, which makes the object appear only once it completes; a failed
        one is aborted), so memory stays bounded by a few parts, not the
        object. ``exclusive`` is checked just before (object stores have no
        portable create-if-absent: the check narrows the race)."""
        path = self._path(name)
        if exclusive and self.fs.exists(path):
            raise FileExistsError(errno.EEXIST, "exists", path)
        pieces = iter(chunks)
        first = bytearray()
        for chunk in pieces:
            first += chunk
            if len(first) > PART_SIZE:
                break
        else:
            self.fs.pipe_file(path, bytes(first))
            return
        f = self.fs.open(path, "wb", block_size=PART_SIZE)
        try:
            f.write(first)
            del first
            for chunk in pieces:
                f.write(chunk)
            f.close()  # the commit
        except BaseException:
            _discard(f)
            with contextlib.suppress(Exception):  # the write's own error is the one to raise
                self.delete(name)  # where the file system wrote in place
            raise

    def open(self, name: str) -> BinaryIO:
        """The object for reading, streamed in PART_SIZE blocks (a restore
        holds a block at a time, not the object)."""
        path = self._path(name)
        try:
            return self.fs.open(path, "rb", block_size=PART_SIZE, cache_type="readahead")
        except FileNotFoundError:
            raise
        except OSError as exc:
            if not self.fs.exists(path):
                raise FileNotFoundError(path) from exc
            raise

    def names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without refresh=
            entries = self.fs.ls(self.root, detail=False)
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def exists(self) -> bool:
        """False for a bucket that does not exist, and for a prefix with no
        object under it (object stores have no empty folders)."""
        try:
            return bool(self.fs.exists(self.root))
        except FileNotFoundError:
            return False

    def remove_stale_temporaries(self) -> None:
        """Object stores leave no partial objects behind."""


def _discard(f: Any) -> None:
    """Throws away an object being written (aborts an S3 multipart upload)
    without committing it."""
    try:
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()
            # fsspec's discard drops the buffer but leaves the file open, so
            # its close() at garbage collection would flush it and fail.
            f.closed = True
    except Exception:  # the original error matters more
        pass


def _file_url_path(url: str) -> str:
    """The absolute path a ``file:`` URL names (RFC 8089): ``file:///p``,
    ``file://localhost/p`` and ``file:/p``, percent-escapes decoded. A remote
    host, a relative path, a query or a fragment is a ValueError: a folder
    with such characters in its name spells them %3F and %23."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.netloc and parts.netloc.lower() != "localhost":
        raise ValueError(f"checkpoint target {url!r} names host {parts.netloc!r}: a file URL can only "
                         "name this machine (file:///path or file://localhost/path)")
    if parts.query or url.endswith("?"):
        raise ValueError(f"checkpoint target {url!r} has a query: a file URL names a folder (spell a ? "
                         "in its name %3F)")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"checkpoint target {url!r} has a fragment: a file URL names a folder (spell "
                         "a # in its name %23)")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"checkpoint target {url!r} is not an absolute file URL (file:///path, "
                         "file://localhost/path or file:/path); a folder whose name starts with "
                         "'file:' is ./file:...")
    return path


def open_store(target: Any) -> Store:
    """A store for ``target``: a path, a ``file://`` URL, any other fsspec
    URL, or an fsspec mapper (``fs.get_mapper(path)``, for a filesystem
    with its own options, e.g. an S3 endpoint)."""
    if isinstance(target, (LocalStore, FsspecStore)):
        return target
    if hasattr(target, "fs") and isinstance(getattr(target, "root", None), str):
        protocol = target.fs.protocol
        protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        return FsspecStore(target.fs, target.root, f"{protocol}://{target.root}")
    if isinstance(target, os.PathLike):
        return LocalStore(target)
    if not isinstance(target, str) or not target:
        raise TypeError(f"a checkpoint target is a folder path or an fsspec URL, not {target!r}")
    if target[:5].lower() == "file:":
        # Local disks get the rename-and-fsync commit, not fsspec's plain writes.
        return LocalStore(_file_url_path(target))
    if "://" in target:
        return FsspecStore.from_url(target)
    return LocalStore(target)
