"""App.parallel(timeout=) at its edges: a deadline shorter than the caller's
poll interval, and a deadline that passes while the batch merges."""

from __future__ import annotations

import time

import numpy as np
import pytest

import pagefork.executor
from pagefork import App, _native


def _sleep_then_add(mem, i, n, seconds):
    time.sleep(seconds)
    mem["c"][i] += 1
    return i


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_deadline_shorter_than_the_poll_is_kept(backend, monkeypatch):
    """A batch still running at its deadline raises TimeoutError and merges
    nothing, even when it ends before the caller would next have polled
    (that poll is stretched to 30 s here; the batch takes 1 s against a
    0.2 s timeout)."""
    monkeypatch.setattr(pagefork.executor, "POLL", 30.0)
    with App("1MiB", backend=backend, workers=2) as app:
        c = app.alloc("c", 2, np.int64)
        app.parallel(_sleep_then_add, 2, args=(0.0,))  # workers started: only the batch is timed
        with pytest.raises(TimeoutError):
            app.parallel(_sleep_then_add, 2, args=(1.0,), timeout=0.2)
        assert c.tolist() == [1, 1]
        assert app.parallel(_sleep_then_add, 2, args=(0.0,)) == [0, 1]
        assert c.tolist() == [2, 2]


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_deadline_passing_during_the_merge_is_all_or_nothing(backend):
    """The deadline passes while the batch's windows are held open (1 s
    each, against a 0.3 s timeout): the call either returns the results
    with the batch merged, or raises TimeoutError with nothing merged,
    and the next batch is exact."""
    with App("1MiB", backend=backend, workers=2) as app:
        c = app.alloc("c", 2, np.int64, merge="sum")
        app.parallel(_sleep_then_add, 2, args=(0.0,))
        c[:] = 10  # the batch's first window carries it
        _native._set_window_pause(1.0)
        try:
            try:
                got = app.parallel(_sleep_then_add, 2, args=(0.0,), timeout=0.3)
            except TimeoutError:
                got = None
        finally:
            _native._set_window_pause(0)
        assert c.tolist() == ([10, 10] if got is None else [11, 11])
        assert got in (None, [0, 1])
        assert app.parallel(lambda mem, i, n: mem["c"].tolist(), 1) == [c.tolist()]
