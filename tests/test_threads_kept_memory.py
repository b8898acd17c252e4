"""The threads backend's slots keep their thread memory mapped across threads
and batches (backends/combine.py's CombiningWorkspace): exact merges, results
copied out of the reused memory, cancellation between threads, and memory
that cannot be prepared named as such."""

from __future__ import annotations

import numpy as np
import pytest

from pagefork import App, WorkerError
from pagefork.backends import combine
from pagefork.backends.combine import CombiningWorkspace
from pagefork.batch import PREPARATION, BatchSpec, Cancel
from pagefork.snapshot import Snapshot


@pytest.fixture
def keep_always(monkeypatch):
    monkeypatch.setattr(combine, "_KEEP_MIN_PAGES", 0)


def _slots(app: App) -> list[CombiningWorkspace]:
    return [slot.space for slot in app._executor.backend._slots]  # type: ignore[attr-defined]


def _rewrite(mem, i, n, step):
    a = mem["a"]
    assert (a == step).all(), f"thread {i} saw {np.unique(a)} in batch {step}"  # the snapshot, not a neighbour
    a[i::n] = step + 1
    return a[:4]  # a view of thread memory, which the slot's next thread reuses


def test_kept_memory_stays_exact_and_results_are_copies(keep_always):
    with App("1MiB", backend="threads", workers=2) as app:
        a = app.alloc("a", 50_000, np.int64)  # ~98 pages
        results = []
        for step in range(4):
            results.append(app.parallel(_rewrite, 4, args=(step,)))
            assert (a == step + 1).all()
        if app._executor.thread_mode == "cow":  # only cow thread memory is kept
            assert all(space._kept is not None for space in _slots(app))
        for step, got in enumerate(results):  # copies, unchanged by later threads
            assert all(isinstance(r, np.ndarray) and (r == step + 1)[i::4].all() for i, r in enumerate(got))


def test_a_thread_that_cannot_get_memory_is_a_preparation_error(monkeypatch):
    with App("1MiB", backend="threads", workers=2) as app:
        a = app.alloc("a", 100, np.int64)

        def refuse(self, region):
            if region is not app.memory:
                raise OSError(12, "no memory for thread memory (test)")
            return original(self, region)

        original = Snapshot.map_to
        monkeypatch.setattr(Snapshot, "map_to", refuse)
        with pytest.raises(WorkerError) as info:
            app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, 1), 2)
        assert info.value.traceback.startswith(PREPARATION) and "no memory for thread memory" in str(info.value)
        monkeypatch.setattr(Snapshot, "map_to", original)
        app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, 1), 2)
        assert list(a[:3]) == [1, 1, 0]


def test_no_thread_starts_once_cancelled():
    snap = Snapshot(size=1 << 16)
    cancel = Cancel()
    ran: list[int] = []

    def fn(mem, i, n):
        ran.append(i)
        if i == 1:
            cancel.set()

    spec = BatchSpec(fn, 4, (), snap, {}, [], "none", 0)
    space = CombiningWorkspace()
    reported: list[int] = []
    try:
        space.run_combining(spec, [0, 1, 2, 3], lambda o: reported.append(o.index), cancel=cancel)
    finally:
        space.close()
        snap.close()
    assert ran == [0, 1] and reported == [0, 1]


def _look(mem, i, n, write):
    a = mem["a"]
    seen = a.copy()  # what this thread started from
    if write and i == 1:
        a[1] = 5
    return seen


def test_memory_a_thread_left_unwritten_is_reused_without_a_remap(monkeypatch):
    """A thread that wrote nothing leaves its memory still mapping the
    snapshot: the slot's next thread starts on it without mapping it again,
    sees the snapshot's current bytes (changed by the main program and by
    merges since), and memory written meanwhile is mapped afresh."""
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 1000, np.int64)
        a[:] = 3
        remaps: list[int] = []
        original = Snapshot.map_to

        def counted(self, region):
            if region is not app.memory:
                remaps.append(region.address)
            return original(self, region)

        monkeypatch.setattr(Snapshot, "map_to", counted)
        app.parallel(_look, 3, args=(False,))  # new memory, mapped for the first thread
        remaps.clear()
        assert all((seen == 3).all() for seen in app.parallel(_look, 3, args=(False,)))
        cow = app._executor.thread_mode == "cow"
        if cow:  # left unwritten by every thread: never mapped again
            assert remaps == []
        a[:] = 7
        got = app.parallel(_look, 3, args=(True,))
        assert all((seen == 7).all() for seen in got)  # not thread 1's write, nor the old bytes
        assert a[1] == 5 and (np.delete(a, 1) == 7).all()
        space = _slots(app)[0]
        if cow:
            app.parallel(_look, 1, args=(False,))  # leaves the memory clean
            view = space.region.array(np.uint8)
            view[:] = 0xFF  # written outside any thread: private pages
            del view
            remaps.clear()
        assert (app.parallel(_look, 1, args=(False,))[0] == np.where(np.arange(1000) == 1, 5, 7)).all()
        if cow:
            assert len(remaps) == 1  # the start saw the private pages: mapped afresh


def _shrink_and_regrow(mem, i, n):
    if i == 0:  # regrown pages read as zero, not the snapshot's bytes (and no tracker sees them)
        mem["a"][0] = 4  # a page written: kept memory (below) is put back, not mapped afresh
        size = mem.region.size
        mem.region.resize(size // 2)
        mem.region.resize(size)
        return None
    return int(np.count_nonzero(mem["a"] != 3))


@pytest.mark.parametrize("keep", [False, True])
def test_memory_a_thread_shrank_and_regrew_is_mapped_again(keep, monkeypatch):
    """Shrinking and regrowing thread memory to the same size, the regrown
    pages are no longer the snapshot's (and no tracker sees them): the next
    thread gets the memory mapped afresh, whether it would be reused as it
    was or kept and put back."""
    if keep:
        monkeypatch.setattr(combine, "_KEEP_MIN_PAGES", 0)
    with App("1MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 100_000, np.int64)
        a[:] = 3
        assert app.parallel(_shrink_and_regrow, 2) == [None, 0]
