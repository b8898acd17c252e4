"""App: named arrays in main memory and fork-join batches over them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import checkpoint as _checkpoint
from ._errors import CorruptDataError, OutOfBoundsError, PageforkError
from ._sizes import PAGE_SIZE, parse_size, round_to_pages
from .backends import make_backend
from .executor import Allocation, BatchStats, Executor
from .memory import Region
from .snapshot import DataType, MergeOp, MergeRegion

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["App"]

_ALIGN = 64  # a cache line; arrays of a page or more start on a page


class App:
    """Main memory with named arrays, and ``parallel`` to run batches.

    ``App(size, max_size=None, backend="processes", workers=None,
    tracking=None, client=None, detect_conflicts=False)``: ``size`` is bytes
    or a string like ``"64MiB"``; ``backend`` is ``"threads"``,
    ``"processes"`` or ``"dask"`` (``client``: a ``distributed.Client`` or a
    scheduler address); ``tracking`` picks the mode that tracks thread memory
    (default: ``cow``).
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
        self._backend_name = backend
        self._executor = Executor(nbytes, max_bytes, make_backend(backend, workers, client),
                                  tracking=tracking, detect_conflicts=detect_conflicts)
        self._layout: dict[str, Allocation] = {}
        self._top = 0
        self._last_checkpoint: tuple[str, int] | None = None  # (target, version) written or restored

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
              merge: str | MergeOp = "overwrite") -> np.ndarray:
        """A new zeroed array in main memory, merged by ``merge``
        (overwrite, xor, sum, subtract, product, max, min, ignore)."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError("an array needs a non-empty string name")
        if name in self._layout:
            raise ValueError(f"an array named {name!r} already exists")
        dt = np.dtype(dtype)
        op = MergeOp.of(merge)
        shape_t = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape_t):
            raise ValueError(f"negative dimension in shape {shape_t}")
        if op not in (MergeOp.OVERWRITE, MergeOp.XOR, MergeOp.IGNORE):
            MergeRegion(0, dt.itemsize, DataType.of(dt), op)  # raises for unsupported pairs
        nbytes = int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize
        align = PAGE_SIZE if nbytes >= PAGE_SIZE else max(_ALIGN, dt.itemsize)
        offset = -(-self._top // align) * align
        end = offset + nbytes
        memory = self._executor.memory
        if end > memory.size:
            if end > memory.max_size:
                raise OutOfBoundsError(
                    f"{name!r} needs {nbytes} bytes at offset {offset}; the App has "
                    f"{memory.max_size - offset if offset < memory.max_size else 0} left "
                    f"(max_size {memory.max_size})")
            self._executor.resize(round_to_pages(end))
        self._layout[name] = Allocation(name, offset, shape_t, dt.str, op)
        self._top = end
        return self[name]

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

    def parallel(self, fn: Callable[..., Any], n: int, *, args: tuple = ()) -> list[Any]:
        """Runs ``fn(mem, i, n, *args)`` for ``i`` in ``range(n)`` and returns
        the results in thread order. Every thread starts from the same
        snapshot of main memory and sees only its own writes; at the join the
        changes merge by the arrays' rules, in thread order, and main memory
        reflects the merge. A failing thread raises WorkerError and changes
        nothing."""
        self._check_open()
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        return self._executor.run(fn, int(n), tuple(args), dict(self._layout))

    # ---- checkpoints ---------------------------------------------------------------

    def checkpoint(self, target: Any, *, keep: int | None = None,
                   base_every: int = _checkpoint.DEFAULT_BASE_EVERY,
                   base_fraction: float = _checkpoint.DEFAULT_BASE_FRACTION,
                   compress: int | None = _checkpoint.DEFAULT_COMPRESS) -> _checkpoint.CheckpointInfo:
        """Writes main memory's pages changed since this App's last
        checkpoint (a whole base the first time, every ``base_every``
        increments, or once the increments pass ``base_fraction`` of the
        memory), and the array layout, to ``target`` (a folder or an fsspec
        URL); ``keep`` prunes all but the newest versions. Call it between
        batches. Returns the version, pages, bytes written and seconds."""
        self._check_open()
        return _checkpoint.save_app(self, target, keep=keep, base_every=base_every,
                                    base_fraction=base_fraction, compress=compress)

    @classmethod
    def restore(cls, target: Any, *, version: int | None = None, **app_kwargs: Any) -> App:
        """A new App with the arrays, merge rules, bytes and version counter
        of checkpoint ``version`` (default: the newest) of ``target``;
        ``app_kwargs`` (backend, workers, ...) go to the constructor. The
        next ``checkpoint`` to the same target is an increment on it."""
        return _checkpoint.restore_app(cls, target, version=version, **app_kwargs)

    def _checkpoint_layout(self) -> dict[str, Any]:
        return {"version": self._executor.version, "top": self._top,
                "arrays": [{"name": a.name, "offset": a.offset, "shape": list(a.shape),
                            "dtype": a.dtype, "merge": a.merge.name.lower()}
                           for a in self._layout.values()]}

    def _restore_layout(self, meta: dict[str, Any]) -> int:
        """Adopts a checkpoint's layout; returns its version counter."""
        try:
            layout = {}
            for a in meta["arrays"]:
                alloc = Allocation(str(a["name"]), int(a["offset"]), tuple(int(s) for s in a["shape"]),
                                   np.dtype(a["dtype"]).str, MergeOp.of(a["merge"]))
                if alloc.offset < 0 or alloc.offset + alloc.nbytes > self.memory.size:
                    raise ValueError(f"array {alloc.name!r} lies outside the memory")
                layout[alloc.name] = alloc
            top, counter = int(meta["top"]), int(meta["version"])
            if not 0 <= top <= self.memory.size or counter < 0:
                raise ValueError(f"top {top} or version {counter} out of range")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptDataError(f"the checkpoint's array layout is unreadable: {exc}") from None
        self._layout, self._top = layout, top
        return counter

    def _check_open(self) -> None:
        if self._executor.closed:
            raise PageforkError("the App is closed")

    def close(self) -> None:
        """Stops the workers and tracking and deletes the main snapshot."""
        self._executor.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._executor.closed else f"{self.memory.size} bytes"
        return f"<App {self._backend_name}, {state}, arrays {sorted(self._layout)}>"
