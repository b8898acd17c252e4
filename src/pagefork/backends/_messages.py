"""What the parent and its workers say to each other: small named messages
(as CPython's process pool talks through ``_CallItem`` and ``_ResultItem``),
and the one place a thread's reply becomes a :class:`ThreadOutcome`.

Processes backend, over each worker's socket (pickled, one frame each)::

    parent                                   worker process
      Prepare(path, cwd)           ----->    follows the parent's sys.path, cwd
      AttachSnapshot(size, ...)    ----->    + the snapshot's memfd (SCM_RIGHTS)
      AttachReplies()              ----->    + its reply memfd (replies.py)
      RunBatch(seq, ..., indexes)  ----->    runs the threads one after the other
                                   <-----    ThreadReply per thread, as each ends
                                   <-----    GroupEnd (combined diffs), if it combines
      Stop()                       ----->    exits

Dask backend: a task (``run_group``) reads the batch's
:class:`DaskProgram` and returns :class:`GroupDone` (a :class:`ThreadReply`
per thread) or :class:`GroupFailed`.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple
from collections.abc import Callable

import cloudpickle

from .._errors import CorruptDataError
from .._thread_errors import format_exc, rebuilt_exception
from ..batch import ThreadOutcome
from ..diffs import DiffBatch

__all__ = ["Stop", "Prepare", "AttachSnapshot", "AttachReplies", "RunBatch", "ShippedDiffs", "NO_DIFFS",
           "ThreadReply", "GroupEnd", "DaskProgram", "GroupDone", "GroupFailed", "REPLIES", "dumps", "loads",
           "thread_outcome"]


# ---- parent -> worker process ------------------------------------------------------


class Stop(NamedTuple):
    """The worker exits."""


class Prepare(NamedTuple):
    """The parent's ``sys.path`` and working directory (None: deleted), which
    the worker follows so it imports what the parent imports."""

    path: list[str]
    cwd: str | None


class AttachSnapshot(NamedTuple):
    """The snapshot's memfd follows (SCM_RIGHTS); the worker maps it."""

    size: int
    max_size: int


class AttachReplies(NamedTuple):
    """The worker's reply buffer (a memfd, replies.py) follows (SCM_RIGHTS)."""


class RunBatch(NamedTuple):
    """Run threads ``indexes`` of batch ``seq`` on the snapshot at ``version``."""

    seq: int
    version: int
    size: int  # the snapshot's size now
    n: int
    fn: bytes  # cloudpickled
    args: bytes  # cloudpickled
    layout: dict[str, Any]
    regions: list[Any]
    mode: str  # tracking mode for thread memory
    indexes: list[int]
    files: dict[tuple[str, int], str]  # the function's code -> its file (_thread_errors.code_files)


# ---- worker -> parent ------------------------------------------------------------------


class ShippedDiffs(NamedTuple):
    """Where a worker process put a packed DiffBatch (combine.pack): no batch
    (``header`` None), its data ``inline`` in the message, or ``length``
    bytes at ``offset`` in the worker's reply buffer."""

    header: tuple[int, bytes] | None
    inline: bytes | None = None
    offset: int = 0
    length: int = 0


NO_DIFFS = ShippedDiffs(None)


class ThreadReply(NamedTuple):
    """One thread's outcome from a worker. ``diffs`` is in the backend's
    encoding: :class:`ShippedDiffs` (processes) or compressed bytes (Dask)."""

    thread: int  # its index in the batch
    result: bytes | None  # cloudpickled; None if the thread failed
    dirty_pages: int
    error: str | None  # the formatted error, None on success
    diffs: Any = None
    seq: int = 0  # processes: the batch it belongs to
    exception: bytes | None = None  # what the thread raised, pickled (_thread_errors)


class GroupEnd(NamedTuple):
    """A worker process's last message of a batch when it combined diffs:
    the combined batch, or why combining failed."""

    seq: int
    error: str | None
    diffs: ShippedDiffs


class DaskProgram(NamedTuple):
    """What a Dask task of the batch runs (cloudpickled, sent once per
    worker with the client's sys.path)."""

    fn: Any
    args: tuple[Any, ...]
    n: int
    layout: dict[str, Any]
    regions: list[Any]
    mode: str  # the client's tracking mode for thread memory
    files: dict[tuple[str, int], str]  # the function's code -> its file (_thread_errors.code_files)


class GroupDone(NamedTuple):
    """A Dask task's threads ran: each one's reply, the combined diffs
    (compressed; None: nothing combined) and the worker that ran them."""

    threads: list[ThreadReply]
    combined: bytes | None
    worker: str


class GroupFailed(NamedTuple):
    """A Dask task ran no thread: ``kind`` is "missing" (the worker lost its
    snapshot: send it whole), "refused" (no room for the snapshot: the batch
    fails) or "error" (its threads fail with ``why``)."""

    kind: str
    why: str


# ---- on a worker process's socket ---------------------------------------------------------

# A message travels as its type's tag and its fields, a plain tuple:
# pickling the classes by reference (a module and attribute lookup per
# class per message) made a small reply's round trip several times slower.
_WIRE: tuple[type, ...] = (Stop, Prepare, AttachSnapshot, AttachReplies, RunBatch, ThreadReply, GroupEnd)
_TAG = {cls: tag for tag, cls in enumerate(_WIRE)}
_DIFFS_AT = {ThreadReply: ThreadReply._fields.index("diffs"), GroupEnd: GroupEnd._fields.index("diffs")}


def dumps(message: Any) -> bytes:
    """``message`` (one of the types above) as one frame."""
    tag = _TAG[type(message)]
    at = _DIFFS_AT.get(type(message))
    fields = tuple(message) if at is None else (*message[:at], tuple(message[at]), *message[at + 1:])
    return pickle.dumps((tag, fields), protocol=pickle.HIGHEST_PROTOCOL)


#: What a worker may send its parent.
REPLIES: tuple[type, ...] = (ThreadReply, GroupEnd)


def loads(data: bytes, accept: tuple[type, ...] = _WIRE) -> Any:
    """The message :func:`dumps` made, of one of the types ``accept``
    (ValueError if it is not one)."""
    try:
        tag, fields = pickle.loads(data)
        cls = _WIRE[tag]
        if cls not in accept:
            raise TypeError(f"a {cls.__name__} is not expected here")
        at = _DIFFS_AT.get(cls)
        if at is not None:
            fields = (*fields[:at], ShippedDiffs._make(fields[at]), *fields[at + 1:])
        return cls._make(fields)
    except Exception as exc:  # whatever the bytes were (a broken worker: the caller drops it)
        raise ValueError(f"not a pagefork worker message: {exc!r}") from None


def thread_outcome(reply: ThreadReply, diffs: Callable[[], DiffBatch | None], where: str) -> ThreadOutcome:
    """The outcome ``reply`` describes, its diffs decoded by ``diffs()`` and
    its result (or the thread's exception) unpickled here (``where``: "in the
    parent", "on the client"). A result or diffs that cannot be loaded fail
    the thread, saying why; an exception that cannot be rebuilt leaves the
    text only, with a note."""
    outcome = ThreadOutcome(reply.thread, dirty_pages=reply.dirty_pages, error=reply.error)
    if reply.error is not None:
        outcome.exception, note = rebuilt_exception(reply.exception)
        outcome.error = reply.error + note
    else:
        try:
            outcome.diffs = diffs()
            outcome.result = cloudpickle.loads(reply.result) if reply.result is not None else None
        except CorruptDataError as exc:
            outcome.error = f"the worker sent malformed diffs: {exc}"
        except BaseException:  # whatever a result's __reduce__ raises, even KeyboardInterrupt or SystemExit
            # (this runs while decoding a reply: a real Ctrl-C never lands here)
            outcome.error = f"cannot load the result {where}:\n" + format_exc()
    return outcome
