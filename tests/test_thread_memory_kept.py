"""A way into a thread's memory kept past the thread (by a Python thread it
started, a global, a weak reference): whatever is written through it after
the thread returned never merges anywhere, on every backend and for every
``start``. Each case runs in a fresh interpreter (the writer outlives the
batch that started it) and checks its exit status and output exactly."""

from __future__ import annotations

import numpy as np
import pytest

from support import run_python

KEPT = r"""
import os, sys, threading, time, weakref
import numpy as np
from pagefork import App

backend, start, how, folder = sys.argv[1:5]
go_file, done_file = os.path.join(folder, "go"), os.path.join(folder, "done")


def write_later(mem, i, n, how, offset, go_file, done_file):
    # What the thread keeps: the way a Python thread it starts writes later.
    a = mem["a"]
    kept = {"view": lambda: a, "mem": lambda: mem, "region": lambda: mem.region,
            "memoryview": lambda: memoryview(mem.region), "weakref": lambda: weakref.ref(mem.region)}[how]()
    del a

    def target(k):
        if how == "view":
            return kept
        if how == "mem":
            return kept["a"]
        region = kept() if how == "weakref" else kept
        return np.frombuffer(region, np.int64, 64, offset)

    def writer():
        while not os.path.exists(go_file):  # the thread function has returned
            time.sleep(0.001)
        refused = None
        for k in range(300):
            try:
                target(k)[k % 64] += 1
            except Exception as exc:  # a way closed behind it: the writes stop here
                refused = type(exc).__name__
                break
            time.sleep(0.001)
        with open(done_file, "w") as f:
            f.write(str(refused))

    threading.Thread(target=writer, daemon=True).start()


with App("256KiB", backend=backend, workers=1) as app:
    a = app.alloc("a", 64, np.int64, merge="sum", start=start)
    other = app.alloc("other", 64, np.int64, merge="sum")
    offset = app.arrays["a"].offset
    app.parallel(write_later, 1, args=(how, offset, go_file, done_file))
    open(go_file, "w").close()
    batches = 0
    deadline = time.monotonic() + 120
    while not os.path.exists(done_file) or batches < 20:  # later, unrelated batches
        app.parallel(lambda mem, i, n: mem["other"].__setitem__(i, mem["other"][i] + 1), 1)
        batches += 1
        assert time.monotonic() < deadline, "the writer never finished"
    time.sleep(0.05)  # (the file is written when the writer is done: nothing is in flight)
    app.parallel(lambda mem, i, n: mem["other"].__setitem__(i, mem["other"][i] + 1), 1)
    seen = app.parallel(lambda mem, i, n: int(np.count_nonzero(np.frombuffer(mem.region, np.int64, 64, offset))),
                        1)[0]
    print(int(np.count_nonzero(a)), seen, int(other[0]) == batches + 1)
"""


@pytest.mark.parametrize("how", ["view", "mem", "region", "memoryview", "weakref"])
@pytest.mark.parametrize("start", ["snapshot", "identity"])
@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_writes_after_a_thread_returned_never_merge(backend, start, how, tmp_path):
    """A thread function starts a Python thread that keeps writing through
    what it kept (its view of an array, its mem, mem.region, a memoryview
    of it, a weak reference to it) while unrelated batches run on the same
    worker: none of those writes reaches main memory or a later thread."""
    done = run_python(KEPT, backend, start, how, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "0 0 True\n"


_KEPT: list = []  # module-level: a worker process keeps it across batches


def _address(mem, i, n):
    return mem.region.address


def _keep_a_view(mem, i, n):
    _KEPT.append(mem["a"])
    return mem.region.address


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_thread_memory_is_reused_unless_something_kept_a_way_into_it(backend):
    """The guard costs nothing when nothing is kept (a worker's memory
    serves every thread), and new memory once per thread that keeps some."""
    from pagefork import App

    _KEPT.clear()
    with App("256KiB", backend=backend, workers=1) as app:
        app.alloc("a", 64, np.int64, merge="sum")
        first = {app.parallel(_address, 3)[k] for _ in range(5) for k in range(3)}
        assert len(first) == 1
        kept_at = app.parallel(_keep_a_view, 1)[0]
        after = {app.parallel(_address, 3)[k] for _ in range(5) for k in range(3)}
        assert first == {kept_at} and len(after) == 1 and after != first
    _KEPT.clear()
