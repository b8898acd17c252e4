"""App: named arrays in main memory and fork-join batches over them."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, NoReturn
from collections.abc import Callable

import numpy as np

from . import checkpoint as _checkpoint
from ._errors import OutOfBoundsError, PageforkError
from ._sizes import PAGE_SIZE, parse_size, round_to_pages
from .backends import make_backend
from .executor import DEFAULT_CLOSE_TIMEOUT, BatchStats, Executor
from .identity import check_start
from .memory import Region
from .layout import Allocation, dtype_of, dtype_text
from .merge import DataType, MergeOp, MergeRegion

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["App"]

_ALIGN = 64  # a cache line; arrays of a page or more start on a page
_MAX_NAME = 255  # characters in an array name


def _check_name(name: Any) -> str:
    """An array name, or a clear error for one alloc cannot take."""
    if not isinstance(name, str):
        raise TypeError(f"an array name is a str, not {type(name).__name__}")
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise ValueError(f"an array name is 1 to {_MAX_NAME} printable characters, got {name!r}")
    return name


def _check_placement(layout: dict[str, Allocation], top: int, size: int) -> None:
    """What alloc's placement guarantees, for a layout read from elsewhere
    (a checkpoint): every array inside the memory, aligned for its dtype
    (identity arrays on pages of their own), no two overlapping, and ``top``
    (where the next alloc goes) past them all."""
    spans = []
    for a in layout.values():
        if a.offset < 0 or a.offset + a.nbytes > size:
            raise ValueError(f"array {a.name!r} lies outside the memory")
        own_pages = a.start == "identity"
        align = PAGE_SIZE if own_pages else a.np_dtype.alignment
        if a.offset % align:
            raise ValueError(f"array {a.name!r} at offset {a.offset} is not aligned to {align} bytes")
        end = round_to_pages(a.offset + a.nbytes) if own_pages else a.offset + a.nbytes
        if end > a.offset:
            spans.append((a.offset, end, a.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"arrays {name!r} and {other!r} overlap")
    if spans and top < max(end for _, end, _ in spans):
        raise ValueError(f"top {top} lies inside the arrays (the next alloc would overlap them)")


def _check_dtype_and_shape(dtype: DTypeLike, shape: Any, op: MergeOp) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape of a new array, or a clear error for what cannot
    live in main memory or merge by ``op``."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"not a numpy dtype: {dtype!r} ({exc})") from None
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape_t: tuple[int, ...] = (int(shape),)
    else:
        try:
            dims = list(shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a tuple of ints, not {type(shape).__name__}") from None
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in dims):
            raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
        shape_t = tuple(int(s) for s in dims)
    if dt.subdtype is not None:  # '(2,3)f8': the sub-array's shape joins the array's
        dt, sub = dt.subdtype
        shape_t += sub
    if any(s < 0 for s in shape_t):
        raise ValueError(f"negative dimension in shape {shape_t}")
    if len(shape_t) > 32:
        raise ValueError(f"numpy arrays have at most 32 dimensions, got {len(shape_t)}")
    if dt.hasobject:
        raise ValueError(f"dtype {dt} holds Python objects, which cannot live in shared memory "
                         "(use fixed-size values: numbers, bytes 'S', strings 'U', structured)")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has no size (give strings and bytes a length, e.g. 'U10')")
    if not op.bytewise:
        try:
            MergeRegion(0, dt.itemsize, DataType.of(dt), op)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"merge={op.name.lower()!r} cannot merge dtype {dt}: {exc}; any fixed-size "
                             "dtype can merge with 'overwrite', 'xor' or 'ignore'") from None
    return dt, shape_t


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable as progress(done, total), not {type(progress).__name__}")


class App:
    """Main memory with named arrays, and ``parallel`` to run batches.

    ``App(size, max_size=None, backend="processes", workers=None,
    tracking=None, client=None, detect_conflicts=False)``: ``size`` is bytes
    or a string like ``"64MiB"``; ``backend`` is ``"threads"``,
    ``"processes"`` or ``"dask"`` (``client``: a ``distributed.Client`` or a
    scheduler address, refused with another backend); ``workers`` is the
    number of threads or worker processes (default: the CPUs this process
    may use, by affinity and cgroup quota) or, with Dask, at most how many of
    the cluster's workers to use; ``tracking`` picks the mode that tracks
    thread memory (default: ``cow``).
    """

    def __init__(self, size: int | str, *, max_size: int | str | None = None,
                 backend: str = "processes", workers: int | None = None,
                 tracking: str | None = None, client: Any = None,
                 detect_conflicts: bool = False) -> None:
        nbytes = round_to_pages(parse_size(size, "size"))
        if nbytes == 0:
            raise ValueError("an App needs some memory: size must be at least one byte")
        max_bytes = nbytes if max_size is None else round_to_pages(parse_size(max_size, "max_size"))
        if max_bytes < nbytes:
            raise ValueError(f"max_size ({max_bytes}) is smaller than size ({nbytes})")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if client is not None and backend in ("threads", "processes"):  # it would be ignored
            raise ValueError(f"client= is for backend='dask'; backend={backend!r} runs on this "
                             "machine (leave client out, or pass backend='dask')")
        self._backend_name = backend
        self._executor = Executor(nbytes, max_bytes, make_backend(backend, workers, client),
                                  tracking=tracking, detect_conflicts=detect_conflicts)
        self._layout: dict[str, Allocation] = {}
        self._top = 0
        # Where main memory was last checkpointed to or restored from; a
        # checkpoint reads and sets it on the batch thread, in queue order.
        self._last_checkpoint: _checkpoint.SavedAt | None = None

    # ---- memory ----------------------------------------------------------------

    @property
    def memory(self) -> Region:
        """The main memory."""
        return self._executor.memory

    @property
    def backend(self) -> str:
        return self._backend_name

    @property
    def last_batch(self) -> BatchStats:
        """Statistics of the last batch: threads, dirty pages, diffs, bytes,
        whether the placement was cached, and seconds per phase."""
        return self._executor.last_batch

    def alloc(self, name: str, shape: int | tuple[int, ...], dtype: DTypeLike = np.float64, *,
              merge: str | MergeOp = "overwrite", start: str = "snapshot") -> np.ndarray:
        """A new zeroed array in main memory, merged by ``merge``.

        Any fixed-size dtype without Python objects may use the rules
        ``overwrite``, ``xor`` and ``ignore``; ``overwrite`` merges numbers
        value by value (a changed value is carried whole; complex by its
        float parts) and other dtypes (structured, strings, other byte
        orders) as bytes, ``xor`` and ``ignore`` work on bytes. The typed rules ``sum``,
        ``subtract``, ``product``, ``max`` and ``min`` need a native-endian
        bool, int8..64, uint8..64, float32 or float64 (``sum``, ``subtract``
        and ``product`` not bool). Everything is checked here; a failed
        ``alloc`` leaves the App as it was.

        ``start`` says what a thread's ``mem[name]`` holds when it starts:
        ``"snapshot"`` (default) the shared value; ``"identity"`` the rule's
        identity (OpenMP's ``reduction(+:x)``): 0 for ``sum`` and ``xor``, 1
        for ``product``, the dtype's lowest value (-inf, False) for ``max``,
        its highest (+inf, True) for ``min``; other rules are refused. At
        the join the main value becomes ``main op value`` for every element
        each thread changed, in thread order (integers wrap like numpy;
        floats round as that order does, which may differ from a serial loop
        that applied the same updates one by one). Each worker keeps a
        populated buffer per such array, so a thread costs two passes over
        the array at memory speed instead of a page fault for each page it
        writes: worth it for threads that scatter updates over most pages,
        not for threads that touch a few. ``mem.region`` still holds the
        snapshot's bytes of the array. Identity arrays get pages of their own.
        A view of ``mem[name]`` kept past its thread keeps that thread's
        values and never merges again (its worker builds a new buffer).
        """
        self._check_open()
        _check_name(name)
        op = MergeOp.of(merge)
        dt, shape_t = _check_dtype_and_shape(dtype, shape, op)
        start = check_start(start, op, dt)
        nbytes = math.prod(shape_t) * dt.itemsize
        # On the batch thread: never during a batch, never cut off half-way.
        return self._executor.call(lambda _: self._place(name, nbytes, dt, shape_t, op, start),
                                   cancellable=False)

    def _place(self, name: str, nbytes: int, dt: np.dtype, shape_t: tuple[int, ...], op: MergeOp,
               start: str = "snapshot") -> np.ndarray:
        """Places a checked array in main memory (on the batch thread)."""
        if name in self._layout:
            raise ValueError(f"an array named {name!r} already exists")
        own_pages = start == "identity"  # nothing else on its pages
        align = PAGE_SIZE if nbytes >= PAGE_SIZE or own_pages else max(_ALIGN, dt.alignment)
        offset = -(-self._top // align) * align
        end = offset + nbytes
        memory = self._executor.memory
        if end > memory.max_size:
            raise OutOfBoundsError(
                f"{name!r} needs {nbytes} bytes at offset {offset}; the App has "
                f"{memory.max_size - offset if offset < memory.max_size else 0} left "
                f"(max_size {memory.max_size})")
        allocation = Allocation(name, offset, shape_t, dtype_text(dt), op, start)
        if end > memory.size:
            self._executor.resize(round_to_pages(end))
        self._layout[name] = allocation
        self._top = round_to_pages(end) if own_pages else end
        return allocation.view(memory)

    def __getitem__(self, name: str) -> np.ndarray:
        self._check_open()
        try:
            return self._layout[name].view(self._executor.memory)
        except KeyError:
            raise KeyError(f"no array named {name!r}; allocated: {sorted(self._layout)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._layout

    @property
    def arrays(self) -> dict[str, Allocation]:
        """Name -> where each array lives and how it merges."""
        return dict(self._layout)

    # ---- batches -----------------------------------------------------------------

    def parallel(self, fn: Callable[..., Any], n: int, *, args: tuple = (),
                 timeout: float | None = None) -> list[Any]:
        """Runs ``fn(mem, i, n, *args)`` for ``i`` in ``range(n)`` and returns
        the results in thread order. Every thread starts from the same
        snapshot of main memory and sees only its own writes; at the join the
        changes merge by the arrays' rules, in thread order, and main memory
        reflects the merge. A failing thread raises WorkerError and changes
        nothing. A batch not done ``timeout`` seconds after the call (None:
        no limit) raises TimeoutError and changes nothing: its worker
        processes are killed and replaced (thread functions of the threads
        backend cannot be killed; their memory is never used again)."""
        self._check_open()
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple, not {type(args).__name__}")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
                raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
            if not timeout > 0:  # NaN included
                raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        return self._executor.run(fn, int(n), args, dict(self._layout),
                                  None if timeout is None else float(timeout))

    # ---- checkpoints ---------------------------------------------------------------

    def checkpoint(self, target: Any, *, keep: int | None = None,
                   base_every: int = _checkpoint.DEFAULT_BASE_EVERY,
                   base_fraction: float = _checkpoint.DEFAULT_BASE_FRACTION,
                   compress: int | None = _checkpoint.DEFAULT_COMPRESS,
                   progress: Callable[[int, int], None] | None = None) -> _checkpoint.CheckpointInfo:
        """Writes main memory's pages changed since this App's last
        checkpoint (a whole base the first time, every ``base_every``
        increments, or once the increments pass ``base_fraction`` of the
        memory), and the array layout, to ``target`` (a folder or an fsspec
        URL); ``keep`` prunes all but the newest versions. Call it between
        batches. Returns the version, pages, bytes written and seconds.
        ``progress(done, total)``, if given, is told the bytes of data
        written so far, piece by piece (from the batch thread), ending with
        ``done == total``."""
        self._check_open()
        _check_progress(progress)
        return _checkpoint.save_executor(self._executor, target, layout=self._checkpoint_layout,
                                         last=lambda: self._last_checkpoint, saved=self._saved, keep=keep,
                                         base_every=base_every, base_fraction=base_fraction,
                                         compress=compress, progress=progress)

    @classmethod
    def restore(cls, target: Any, *, version: int | None = None,
                progress: Callable[[int, int], None] | None = None, **app_kwargs: Any) -> App:
        """A new App with the arrays, merge rules, bytes and version counter
        of checkpoint ``version`` of ``target``; ``app_kwargs`` (backend,
        workers, ...) go to the constructor. The next ``checkpoint`` to the
        same target is an increment on it. Without ``version``, the newest
        restorable version: damaged newer ones are skipped with a
        RuntimeWarning naming them. ``progress(done, total)``, if given, is
        told the stored bytes read so far (``total``: the version's objects),
        ending with ``done == total``."""
        _check_progress(progress)
        for key in ("size", "max_size"):
            if key in app_kwargs:
                raise TypeError(f"App.restore takes {key} from the checkpoint, not as an argument")
        if version is None:
            return _checkpoint.newest_restorable(target, lambda image: cls._from_image(image, app_kwargs,
                                                                                      progress))
        return cls._from_image(_checkpoint.find_app_image(target, version), app_kwargs, progress)

    @classmethod
    def _from_image(cls, image: _checkpoint.AppImage, app_kwargs: dict[str, Any],
                    progress: Callable[[int, int], None] | None = None) -> App:
        """A new App restored from ``image``."""
        manifest = image.manifest
        app = cls(manifest.size, max_size=max(manifest.max_size, manifest.size), **app_kwargs)
        try:
            counter = app._restore_layout(image)  # checked before any byte is read
            app._last_checkpoint = _checkpoint.restore_executor(image, app._executor, counter, progress)
        except BaseException:
            app.close()
            raise
        return app

    def _saved(self, at: _checkpoint.SavedAt) -> None:
        self._last_checkpoint = at

    def _checkpoint_layout(self) -> dict[str, Any]:
        return {"version": self._executor.version, "top": self._top,
                "arrays": [{"name": a.name, "offset": a.offset, "shape": list(a.shape),
                            "dtype": a.dtype, "merge": a.merge.name.lower(), "start": a.start}
                           for a in self._layout.values()]}

    def _restore_layout(self, image: _checkpoint.AppImage) -> int:
        """Adopts a checkpoint's layout, checked as alloc checks each array
        and as its placement guarantees; returns its version counter."""
        meta = image.layout
        try:
            layout: dict[str, Allocation] = {}
            for a in meta["arrays"]:
                name = _check_name(a["name"])
                if name in layout:
                    raise ValueError(f"an array named {name!r} already exists")
                op = MergeOp.of(a["merge"])
                dt, shape_t = _check_dtype_and_shape(dtype_of(str(a["dtype"])), a["shape"], op)
                start = check_start(a.get("start", "snapshot"), op, dt)  # older checkpoints: none
                layout[name] = Allocation(name, int(a["offset"]), shape_t, dtype_text(dt), op, start)
            top, counter = int(meta["top"]), int(meta["version"])
            if not 0 <= top <= self.memory.size or counter < 0:
                raise ValueError(f"top {top} or version {counter} out of range")
            _check_placement(layout, top, self.memory.size)
        except (KeyError, TypeError, ValueError, SyntaxError, MemoryError, RecursionError,
                AttributeError) as exc:  # AttributeError: an entry that is not a mapping
            raise image.damaged(f"its array layout is unreadable: {exc}") from None
        self._layout, self._top = layout, top
        return counter

    def _check_open(self) -> None:
        if self._executor.closed:
            raise PageforkError("the App is closed")

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Stops the workers and tracking and deletes the main snapshot.

        A batch still running (another Python thread's) gets ``timeout``
        seconds, then is cancelled. Worker processes that do not stop in
        time are killed. Thread functions of the threads backend cannot be
        killed: if some still run after ``timeout`` seconds, the App closes
        anyway and ``TimeoutError`` says how many were abandoned. Closing
        twice is harmless."""
        self._executor.close(timeout)

    def __enter__(self) -> App:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except TimeoutError as timeout:
            if exc_type is None:
                raise
            warnings.warn(str(timeout), RuntimeWarning, stacklevel=2)  # keep the original error

    def __reduce__(self) -> NoReturn:
        raise TypeError("an App cannot be pickled or sent to workers: a thread function gets its "
                        "arrays as mem[name], not through the App")

    def __repr__(self) -> str:
        state = "closed" if self._executor.closed else f"{self.memory.size} bytes"
        return f"<App {self._backend_name}, {state}, arrays {sorted(self._layout)}>"
