"""App.parallel on every local backend: fork-join semantics, merges,
failures, conflicts, placement caching."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import pagefork
from pagefork import App, ConflictError, OutOfBoundsError, PAGE_SIZE, PageforkError, WorkerError

from support import SIGINT_PRELUDE
from support import run_python as run_script


@pytest.fixture(params=["threads", "processes"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def app(backend):
    with App("1MiB", max_size="4MiB", backend=backend, workers=2) as app:
        yield app


def snapshot_bytes(app: App) -> bytes:
    return app._executor.snapshot.read()


def test_results_in_thread_order_with_args(app):
    assert app.parallel(lambda mem, i, n, k: (i, n, k), 5, args=("x",)) == [
        (i, 5, "x") for i in range(5)]


def test_main_writes_reach_threads_and_threads_are_isolated(app):
    a = app.alloc("a", 4 * PAGE_SIZE // 8, np.int64)
    a[:] = 7  # a main-program write between batches

    def work(mem, i, n):
        v = mem["a"]
        seen = int(v.sum())
        v[i] = 100 + i  # no other thread may see this
        return seen

    sums = app.parallel(work, 4)
    assert sums == [7 * a.size] * 4
    assert a[:4].tolist() == [100, 101, 102, 103]  # merged into main memory
    assert app.last_batch.main_dirty_pages == 4
    a[10] = -1
    assert app.parallel(lambda mem, i, n: int(mem["a"][10]), 2) == [-1, -1]


def test_reductions_accumulate_across_batches(app):
    total = app.alloc("total", 3, np.int64, merge="sum")
    hi = app.alloc("hi", 1, np.float64, merge="max")
    lo = app.alloc("lo", 1, np.float64, merge="min")
    prod = app.alloc("prod", 1, np.int64, merge="product")
    prod[0] = 1
    lo[0] = 1e9

    def work(mem, i, n, batch):
        mem["total"][:] += [1, i, batch]
        mem["hi"][0] = max(mem["hi"][0], 10 * batch + i)
        mem["lo"][0] = min(mem["lo"][0], 10 * batch + i)
        mem["prod"][0] *= 2

    for batch in range(3):
        app.parallel(work, 4, args=(batch,))
    assert total.tolist() == [12, 3 * 6, 4 * (0 + 1 + 2)]
    assert hi[0] == 23 and lo[0] == 0
    assert prod[0] == 2 ** 12


def test_views_made_before_a_batch_stay_valid(app):
    a = app.alloc("a", 1000, np.int32)
    view = app["a"]
    app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, i + 1), 3)
    assert view[:4].tolist() == [1, 2, 3, 0] and a[:4].tolist() == [1, 2, 3, 0]
    view[999] = 5
    assert app.parallel(lambda mem, i, n: int(mem["a"][999]), 1) == [5]


def test_a_failing_thread_changes_nothing(app):
    a = app.alloc("a", 100, np.int64, merge="sum")
    a[:] = 1
    app.parallel(lambda mem, i, n: None, 1)  # carry main writes first
    before_main, before_snapshot = bytes(app.memory), snapshot_bytes(app)

    def work(mem, i, n):
        mem["a"][:] += 1
        if i == 2:
            raise ValueError("thread two is unhappy")

    with pytest.raises(WorkerError) as info:
        app.parallel(work, 4)
    assert info.value.thread == 2
    assert "ValueError: thread two is unhappy" in info.value.traceback
    assert "thread 2 of 4" in str(info.value)
    assert bytes(app.memory) == before_main and snapshot_bytes(app) == before_snapshot
    app.parallel(work, 2)  # and the app still works
    assert (a == 3).all()


def test_conflicting_overwrites(backend):
    with App("64KiB", backend=backend, workers=2, detect_conflicts=True) as app:
        a = app.alloc("a", 10, np.int64)
        total = app.alloc("total", 1, np.int64, merge="sum")
        before = snapshot_bytes(app)

        def clash(mem, i, n):
            mem["a"][3] = i + 1   # different bytes at the same place
            mem["total"][0] += 1  # sums never conflict

        with pytest.raises(ConflictError, match=r"threads 0 and 1 wrote different bytes"):
            app.parallel(clash, 2)
        assert snapshot_bytes(app) == before and a[3] == 0 and total[0] == 0

        def agree(mem, i, n):
            mem["a"][3] = 42      # the same bytes: not a conflict
            mem["a"][5 + i] = i   # different places: not a conflict
            mem["total"][0] += 1

        app.parallel(agree, 2)
        assert a[3] == 42 and a[5] == 0 and a[6] == 1 and total[0] == 2


def test_placement_is_cached_per_batch_size(app):
    app.parallel(lambda mem, i, n: None, 4)
    assert not app.last_batch.placement_cached
    app.parallel(lambda mem, i, n: None, 4)
    assert app.last_batch.placement_cached
    app.parallel(lambda mem, i, n: None, 3)
    assert not app.last_batch.placement_cached
    app.parallel(lambda mem, i, n: None, 4)
    assert app.last_batch.placement_cached


def test_last_batch_statistics(app):
    a = app.alloc("a", 8 * PAGE_SIZE, np.uint8)

    def work(mem, i, n):
        mem["a"][i * PAGE_SIZE: i * PAGE_SIZE + 10] = 1

    app.parallel(work, 3)
    stats = app.last_batch
    assert stats.threads == 3 and stats.dirty_pages == 3
    assert stats.diffs == 3 and stats.diff_bytes == 30
    assert set(stats.times) == {"carry", "run", "merge", "remap"}
    if app.backend == "processes":
        assert stats.bytes_shipped > 30
    assert "3 threads" in stats.summary()
    assert (a.reshape(8, PAGE_SIZE)[:3, :10] == 1).all() and a.sum() == 30


def test_alloc_rules_and_growth(app):
    app.alloc("x", 10, np.float32, merge="max")
    with pytest.raises(ValueError, match="already exists"):
        app.alloc("x", 1)
    with pytest.raises(ValueError, match="numeric"):
        app.alloc("b", 4, np.bool_, merge="sum")
    with pytest.raises(ValueError, match="unknown merge op"):
        app.alloc("c", 4, merge="average")
    big = app.alloc("big", (2 * 1024 * 1024) // 8, np.int64, merge="sum")  # grows past 1 MiB
    assert app.memory.size >= 2 * 1024 * 1024 and big.ctypes.data % PAGE_SIZE == 0
    app.parallel(lambda mem, i, n: mem["big"].__setitem__(-1, 5), 2)
    assert big[-1] == 10
    with pytest.raises(OutOfBoundsError, match="max_size"):
        app.alloc("huge", 4 * 1024 * 1024, np.uint8)
    with pytest.raises(KeyError, match="no array named"):
        app["nope"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        App("1MiB", backend="mpi")
    with pytest.raises(ValueError):
        App(0, backend="threads")
    with pytest.raises(ValueError, match="workers"):
        App("1MiB", backend="threads", workers=0)
    with pytest.raises(ValueError, match="unknown tracking mode"):
        App("1MiB", backend="threads", tracking="mprotect")
    with App("64KiB", backend="threads") as app:
        with pytest.raises(ValueError, match="at least one thread"):
            app.parallel(lambda mem, i, n: None, 0)
        with pytest.raises(TypeError):
            app.parallel("not callable", 1)  # type: ignore[arg-type]
    with pytest.raises(PageforkError, match="closed"):
        app.parallel(lambda mem, i, n: None, 1)


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("client", ["tcp://127.0.0.1:8786", object()])
def test_a_client_the_backend_would_ignore_is_refused(backend, client):
    """client= only means something to Dask: elsewhere it is refused before
    anything starts, not silently dropped."""
    with pytest.raises(ValueError) as info:
        App("1MiB", backend=backend, client=client)
    assert str(info.value) == (f"client= is for backend='dask'; backend={backend!r} runs on this machine "
                               "(leave client out, or pass backend='dask')")
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):  # the backend's own error first
        App("1MiB", backend="mpi", client=client)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_worker_killed_mid_batch(how):
    with App("256KiB", backend="processes", workers=2) as app:
        a = app.alloc("a", 64, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 2)
        before_main, before_snapshot = bytes(app.memory), snapshot_bytes(app)

        def work(mem, i, n):
            mem["a"][:] += 1
            if i == 1:
                if how == "exit":
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGKILL)

        with pytest.raises(WorkerError, match="died") as info:
            app.parallel(work, 4)
        assert 1 in info.value.failed
        assert bytes(app.memory) == before_main and snapshot_bytes(app) == before_snapshot
        app.parallel(lambda mem, i, n: mem["a"].__setitem__(0, mem["a"][0] + 1), 4)  # replaced
        assert a[0] == 4
        assert app._executor.backend.replaced >= 1


@pytest.mark.parametrize("mode", ["segfault", "uffd-async", "uffd"])
def test_other_tracking_modes_where_cow_is_unavailable(mode, backend):
    support = pagefork.probe()[mode]
    if not support.available:
        pytest.skip(support.reason)
    with App("64KiB", backend=backend, tracking=mode, workers=2) as app:
        assert app._executor._main_mode == mode
        a = app.alloc("a", 100, np.int64, merge="sum")
        b = app.alloc("b", 2 * PAGE_SIZE // 8, np.int64)
        for step in range(3):
            b[step * 500] = step + 1  # main-program writes, tracked by `mode`
            got = app.parallel(lambda mem, i, n: (mem["a"].__iadd__(1), int(mem["b"].sum()))[1], 3)
            assert got == [sum(range(step + 2))] * 3
        assert (a == 9).all()


def test_an_interrupted_batch_leaves_no_stale_replies():
    """Ctrl-C while workers run: their late replies must not count in the next batch."""
    import threading
    import time

    with App("64KiB", backend="processes", workers=1) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: None, 1)

        def slow(mem, i, n):
            time.sleep(0.5)
            mem["a"][:] += 100
            return "slow"

        timer = threading.Timer(0.1, lambda: __import__("_thread").interrupt_main())
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            app.parallel(slow, 2)
        assert app.parallel(lambda mem, i, n: (mem["a"].__iadd__(1), "fast")[1], 1) == ["fast"]
        assert a.tolist() == [1, 1, 1, 1]


# ---- loading user code ----------------------------------------------------------------


def write_module(folder, name: str) -> None:
    (folder / f"{name}.py").write_text(
        "import numpy as np\n"
        "def work(mem, i, n, k):\n"
        "    mem['a'][i] += k\n"
        "    return (__name__, i * k)\n")


def test_module_functions_load_the_way_multiprocessing_loads_them(app, tmp_path, monkeypatch):
    """A module importable only through a sys.path entry added at run time."""
    import importlib

    name = f"pf_tasks_{app.backend}_{os.getpid()}"
    write_module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))  # after the workers started
    module = importlib.import_module(name)
    try:
        a = app.alloc("a", 4, np.int64, merge="sum")
        assert app.parallel(module.work, 4, args=(3,)) == [(name, 3 * i) for i in range(4)]
        assert a.tolist() == [3, 3, 3, 3]
    finally:
        sys.modules.pop(name, None)


def test_every_kind_of_callable(app):
    import functools

    app.alloc("a", 8, np.int64, merge="sum")

    class Adder:
        def __init__(self, k: int) -> None:
            self.k = k

        def add(self, mem, i, n):
            mem["a"][i] += self.k
            return self.k

        def __call__(self, mem, i, n):
            return self.add(mem, i, n)

    def outer(k):
        def closure(mem, i, n):
            mem["a"][i] += k
            return k
        return closure

    def with_extra(extra, mem, i, n):
        mem["a"][i] += extra
        return extra

    for fn, k in [(lambda mem, i, n: (mem["a"].__setitem__(i, mem["a"][i] + 1), 1)[1], 1),
                  (outer(2), 2), (Adder(3).add, 3), (Adder(4), 4), (functools.partial(with_extra, 5), 5)]:
        assert app.parallel(fn, 8) == [k] * 8
    assert app["a"].tolist() == [15] * 8


# ---- interrupts -----------------------------------------------------------------------

STRESS = r"""
import os, random, signal, sys, threading, time
import numpy as np
from pagefork import App

backend, rounds = sys.argv[1], int(sys.argv[2])
rng = random.Random(int(sys.argv[3]))

signal.signal(signal.SIGINT, on_sigint)  # SIGINT_PRELUDE's
N = 3
with App("256KiB", max_size="8MiB", backend=backend, workers=2) as app:
    total = app.alloc("total", N, np.int64, merge="sum")
    stamp = app.alloc("stamp", N, np.int64)
    app.parallel(lambda mem, i, n: None, N)

    def work(mem, i, n, k, reply, pause):
        if pause:
            time.sleep(pause)  # interrupted threads go on running
        mem["total"][i] += 1
        mem["stamp"][i] = k + 1
        return b"x" * reply  # a large reply is being read when the signal lands

    merged = 0
    for r in range(rounds):
        k = int(total[0])
        timer = threading.Timer(rng.uniform(0, rng.choice([0.01, 0.1, 0.3])), burst,
                                (rng.choice([1, 1, 3]),))
        time.sleep(0.005)  # the last round's late signals are handled (and ignored) here
        try:
            inside = True
            timer.start()
            app.parallel(work, N, args=(k, rng.choice([0, 1 << 20, 8 << 20]),
                                        rng.choice([0, 0, 0.01, 0.05])))
            timer.join()  # a signal after the batch lands here
        except KeyboardInterrupt:
            inside = False
        inside = False
        if timer.ident is not None:
            timer.join()
        # all or nothing, and never a stale thread's writes
        done = int(total[0])
        assert done in (k, k + 1), (k, total.tolist())
        merged += done == k + 1
        assert total.tolist() == [done] * N and stamp.tolist() == [done] * N, (total, stamp)
        # the next batch runs and is exact
        got = app.parallel(lambda mem, i, n: (int(mem["total"][i]), int(mem["stamp"][i])), N)
        assert got == [(done, done)] * N, (got, done)
print("ok", rounds, "merged", merged)
"""


def test_sigint_at_random_points_in_a_loop(backend):
    """Real SIGINTs at random points of batches (large replies arriving,
    threads still running); after each, the state is all-or-nothing and the
    next batch is exact."""
    done = run_script(STRESS, backend, 40, 1, prelude=SIGINT_PRELUDE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok 40")
    merged = int(done.stdout.split()[-1])
    assert 0 < merged < 40  # some signals cancelled batches, others came after them


def interrupt_main_soon(delay: float = 0.05) -> threading.Timer:
    """A real SIGINT to the main thread after ``delay`` seconds."""
    timer = threading.Timer(delay, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


def test_an_interrupted_threads_batch_never_touches_a_later_one():
    with App("64KiB", backend="threads", workers=2) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        b = app.alloc("b", 4, np.int64)
        release, running = threading.Event(), threading.Barrier(3)
        seen: list[int] = []

        def stuck(mem, i, n):
            running.wait()
            release.wait()
            mem["a"][:] += 100         # its scratch memory, never merged
            mem["b"][i] = 99
            seen.append(int(mem["a"][0]))
            return mem["a"]

        timer = None
        app.parallel(lambda mem, i, n: None, 2)
        old_spaces = [slot.space for slot in app._executor.backend._slots]
        try:
            with pytest.raises(KeyboardInterrupt):
                threading.Timer(0, running.wait).start()
                timer = interrupt_main_soon(0.2)
                app.parallel(stuck, 2)
        finally:
            if timer:
                timer.join()
        assert app._executor.backend.running() == 2  # still running, on memory nobody else uses

        def work(mem, i, n):
            mem["a"][i] += 1
            return int(mem["a"].sum()), int(mem["b"].sum())

        try:
            assert app.parallel(work, 2) == [(1, 0), (1, 0)]
        finally:
            release.set()
        while app._executor.backend.running():
            time.sleep(0.01)
        assert len(seen) == 2  # they ran to the end, on their own memory
        assert [space.region for space in old_spaces] == [None, None]  # and released it
        assert app.parallel(work, 2) == [(3, 0), (3, 0)]
        assert a.tolist() == [2, 2, 0, 0] and b.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("how", ["sys.exit", "SystemExit(0)", "KeyboardInterrupt", "GeneratorExit",
                                 "BaseException"])
def test_exits_and_base_exceptions_are_worker_errors(app, how):
    a = app.alloc("a", 4, np.int64, merge="sum")
    app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
    before_main, before_snapshot = bytes(app.memory), snapshot_bytes(app)

    def work(mem, i, n, how):
        mem["a"][:] += 1
        if i == 1:
            if how == "sys.exit":
                sys.exit(3)
            raise {"SystemExit(0)": SystemExit(0), "KeyboardInterrupt": KeyboardInterrupt(),
                   "GeneratorExit": GeneratorExit(), "BaseException": BaseException("odd")}[how]

    with pytest.raises(WorkerError) as info:
        app.parallel(work, 3, args=(how,))
    assert info.value.thread == 1 and info.value.failed == [1]
    assert ("SystemExit" if how.startswith("s") or how.startswith("S") else how) in info.value.traceback
    assert bytes(app.memory) == before_main and snapshot_bytes(app) == before_snapshot
    app.parallel(work, 1, args=(how,))
    assert a.tolist() == [3] * 4


def test_close_has_a_default_timeout():
    import inspect

    assert inspect.signature(App.close).parameters["timeout"].default == 10.0


def test_close_abandons_a_thread_function_that_never_returns():
    release = threading.Event()
    app = App("64KiB", backend="threads", workers=2)
    app.alloc("a", 4, np.int64)
    errors: list[BaseException] = []

    def call():
        try:
            app.parallel(lambda mem, i, n: release.wait(), 2)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while app._executor.backend.running() < 2:
        time.sleep(0.01)
    with pytest.raises(TimeoutError, match=r"2 thread function\(s\) .* still running"):
        app.close(timeout=0.2)
    caller.join()
    assert len(errors) == 1 and isinstance(errors[0], PageforkError) and "closed" in str(errors[0])
    with pytest.raises(PageforkError, match="closed"):
        app.parallel(lambda mem, i, n: None, 1)
    app.close()  # twice is fine
    release.set()


def test_close_kills_worker_processes_that_never_return():
    app = App("64KiB", backend="processes", workers=2)
    app.parallel(lambda mem, i, n: None, 2)
    pids = [w.process.pid for w in app._executor.backend._workers]
    caller = threading.Thread(target=lambda: pytest.raises(PageforkError, app.parallel,
                                                           lambda mem, i, n: time.sleep(1000), 2))
    caller.start()
    time.sleep(0.2)
    app.close(timeout=0.5)
    caller.join()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: gone


# ---- concurrency and aliasing -------------------------------------------------------------


def test_several_python_threads_share_one_app(app):
    total = app.alloc("total", 1, np.int64, merge="sum")
    hits = app.alloc("hits", 8, np.int64, merge="sum")
    errors: list[BaseException] = []

    def caller(k):
        try:
            for _ in range(10):
                got = app.parallel(lambda mem, i, n, k: (mem["total"].__iadd__(1), mem["hits"].__setitem__(
                    k, mem["hits"][k] + 1), k)[2], 3, args=(k,))
                assert got == [k] * 3
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert errors == []
    assert total[0] == 4 * 10 * 3 and hits.tolist() == [30, 30, 30, 30, 0, 0, 0, 0]


def test_results_are_independent_values(app):
    app.alloc("a", 4, np.int64)

    def work(mem, i, n):
        mem["a"][:] = i
        return mem["a"], {"nested": [mem["a"][:2], (mem["a"][1:],)]}

    first = app.parallel(work, 3)
    assert [r[0].tolist() for r in first] == [[0] * 4, [1] * 4, [2] * 4]
    assert [r[1]["nested"][0].tolist() for r in first] == [[0, 0], [1, 1], [2, 2]]
    app.parallel(work, 3)
    app.parallel(lambda mem, i, n: mem["a"].__setitem__(slice(None), 7), 2)
    assert [r[0].tolist() for r in first] == [[0] * 4, [1] * 4, [2] * 4]
    assert [r[1]["nested"][1][0].tolist() for r in first] == [[0] * 3, [1] * 3, [2] * 3]
    for r in first:
        r[0][0] = 50  # writable and independent of the App
    assert app["a"].tolist() == [7] * 4


def test_main_writes_made_while_a_batch_runs_are_carried(app, tmp_path):
    a = app.alloc("a", 2 * PAGE_SIZE // 8, np.int64)
    total = app.alloc("total", 2, np.int64, merge="sum")
    started, proceed = tmp_path / "started", tmp_path / "proceed"

    def work(mem, i, n, started, proceed):
        mem["total"][:] += 1
        mem["a"][i] = 10 + i
        if i == 0:
            open(started, "w").close()
            while not os.path.exists(proceed):
                time.sleep(0.005)

    def writer():
        while not started.exists():
            time.sleep(0.005)
        a[2] = -1                   # a page the threads also write
        a[PAGE_SIZE // 8 + 3] = 33  # a page no thread writes
        total[1] = 100
        proceed.touch()

    background = threading.Thread(target=writer)
    background.start()
    app.parallel(work, 2, args=(str(started), str(proceed)))
    background.join()
    assert a[:3].tolist() == [10, 11, -1] and a[PAGE_SIZE // 8 + 3] == 33
    assert total.tolist() == [2, 102]
    assert app.parallel(lambda mem, i, n: (int(mem["a"][PAGE_SIZE // 8 + 3]), int(mem["total"][1])), 1) == [(33, 102)]


def test_closures_over_main_memory(app):
    a = app.alloc("a", 4, np.int64)

    def write_through_closure(mem, i, n):
        a[i] = 5

    if app.backend == "threads":  # the same memory: carried like any main-program write
        app.parallel(write_through_closure, 2)
        assert a.tolist() == [5, 5, 0, 0]
    else:  # a worker would write to a copy: refused, not dropped
        with pytest.raises(PageforkError, match="view of the App's main memory"):
            app.parallel(write_through_closure, 2)
        with pytest.raises(PageforkError, match="view of the App's main memory"):
            app.parallel(lambda mem, i, n, v: None, 2, args=(app["a"],))
        assert app.parallel(lambda mem, i, n, v: int(v.sum()), 1, args=(np.array(a) + 1,)) == [4]


def test_a_thread_function_closing_its_memory(app):
    a = app.alloc("a", 4, np.int64, merge="sum")
    before = bytes(app.memory)

    def close_it(mem, i, n):
        mem["a"][:] += 1
        if i == 1:
            mem.region.close()

    for _ in range(2):
        with pytest.raises(WorkerError, match="closed its memory"):
            app.parallel(close_it, 2)
        assert bytes(app.memory) == before
    for _ in range(3):  # every slot recovers
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
    assert a.tolist() == [12] * 4

    def grow(mem, i, n):
        mem.region.resize(mem.region.max_size)  # later batches need the snapshot's size

    app.parallel(grow, 2)
    app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
    assert a.tolist() == [16] * 4


# ---- arrays and limits ------------------------------------------------------------------

BYTEWISE_DTYPES = [np.complex128, ">f8", ">i4", "U10", "S5", np.dtype([("x", "<i4"), ("y", ">f8")]),
                   "(2,3)f4", "datetime64[ns]", np.float16, np.longdouble, "V3"]


def dtype_id(dtype) -> str:
    dt = np.dtype(dtype)
    return "structured" if dt.fields else "subarray" if dt.subdtype else dt.str


@pytest.mark.parametrize("dtype", BYTEWISE_DTYPES, ids=dtype_id)
def test_any_fixed_size_dtype_merges_as_bytes(app, dtype):
    dt = np.dtype(dtype)
    x = app.alloc("x", 6, dtype)
    flip = app.alloc("flip", 6, dtype, merge="xor")
    app.alloc("skip", 6, dtype, merge="ignore")
    expected = np.zeros_like(x)
    raw = np.random.default_rng(1).integers(0, 256, expected.nbytes, dtype=np.uint8)
    expected.view(np.uint8).reshape(-1)[:] = raw
    flip.view(np.uint8).reshape(-1)[:] = raw

    def work(mem, i, n, expected):
        mem["x"][2 * i: 2 * i + 2] = expected[2 * i: 2 * i + 2]
        mem["flip"][2 * i: 2 * i + 2] = expected[2 * i: 2 * i + 2]  # xor: flipped to zero
        mem["skip"][:] = expected
        return mem["x"][2 * i: 2 * i + 2]

    got = app.parallel(work, 3, args=(expected,))
    assert x.tobytes() == expected.tobytes() and x.dtype == np.dtype(dt.subdtype[0] if dt.subdtype else dt)
    assert flip.tobytes() == expected.tobytes()  # raw ^ raw ^ raw: written once per byte, xor of the change
    assert not app["skip"].view(np.uint8).any()
    assert b"".join(g.tobytes() for g in got) == expected.tobytes()
    if dt.subdtype:
        assert x.shape == (6, 2, 3)


@pytest.mark.parametrize("dtype, merge", [(np.complex128, "sum"), (">f8", "max"), ("U10", "min"),
                                          (np.dtype([("x", "<i4")]), "sum"), (np.bool_, "product"),
                                          (np.float16, "sum"), ("S4", "max")],
                         ids=lambda x: x if isinstance(x, str) else dtype_id(x))
def test_typed_merges_only_where_defined(app, dtype, merge):
    app.alloc("first", 3, np.int32)
    state = (dict(app.arrays), app.memory.size, snapshot_bytes(app), app._top)
    with pytest.raises(ValueError, match=f"merge='{merge}' cannot merge dtype"):
        app.alloc("x", 4, dtype, merge=merge)
    assert (dict(app.arrays), app.memory.size, snapshot_bytes(app), app._top) == state
    app.alloc("x", 4, dtype)  # the name is free; byte-wise works
    app.parallel(lambda mem, i, n: None, 2)


def test_failed_allocs_leave_the_app_unchanged(app):
    app.alloc("first", 3, np.int32)
    state = (dict(app.arrays), app.memory.size, snapshot_bytes(app), app._top)
    bad = [
        (ValueError, dict(name="o", shape=4, dtype=object)),
        (ValueError, dict(name="o", shape=4, dtype=np.dtype([("a", "i4"), ("b", "O")]))),
        (ValueError, dict(name="u", shape=4, dtype="U")),
        (TypeError, dict(name="t", shape=4, dtype="not a dtype")),
        (OutOfBoundsError, dict(name="huge", shape=(2 ** 62, 2), dtype=np.int64)),
        (OutOfBoundsError, dict(name="huge", shape=(2 ** 40,) * 4, dtype=np.uint8)),
        (ValueError, dict(name="neg", shape=(4, -1))),
        (TypeError, dict(name="float", shape=2.5)),
        (TypeError, dict(name="float", shape=(2, 2.0))),
        (TypeError, dict(name="bool", shape=True)),
        (ValueError, dict(name="deep", shape=(1,) * 33)),
        (ValueError, dict(name="", shape=1)),
        (ValueError, dict(name="a\x00b", shape=1)),
        (ValueError, dict(name="x" * 256, shape=1)),
        (TypeError, dict(name=b"bytes", shape=1)),
        (ValueError, dict(name="first", shape=1)),
        (ValueError, dict(name="m", shape=1, merge="average")),
    ]
    for error, kwargs in bad:
        with pytest.raises(error):
            app.alloc(**kwargs)
        assert (dict(app.arrays), app.memory.size, snapshot_bytes(app), app._top) == state, kwargs
    x = app.alloc("o", 4, np.int64, merge="sum")  # the failed names are free
    assert app.arrays["o"].offset == 64 and x.ctypes.data == app.memory.address + 64
    app.alloc("empty", (0, 5), np.float64)
    app.parallel(lambda mem, i, n: mem["o"].__iadd__(1), 2)
    assert x.tolist() == [2] * 4 and app["empty"].shape == (0, 5)


def test_batch_sizes(app):
    for n in (0, -1, -2 ** 70):
        with pytest.raises(ValueError, match="at least one thread"):
            app.parallel(lambda mem, i, n: None, n)
    with pytest.raises(ValueError, match="at most 1048576 threads"):
        app.parallel(lambda mem, i, n: None, 2 ** 20 + 1)
    with pytest.raises(ValueError, match="at most"):
        app.parallel(lambda mem, i, n: None, 2 ** 70)
    for n in (True, 2.0, "3", None):
        with pytest.raises(TypeError):
            app.parallel(lambda mem, i, n: None, n)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="args must be a tuple"):
        app.parallel(lambda mem, i, n, x: None, 1, args=[1])  # type: ignore[arg-type]
    assert app.parallel(lambda mem, i, n: i, np.int64(3)) == [0, 1, 2]
    assert len(app.parallel(lambda mem, i, n: None, 300)) == 300


def test_unpicklable_functions_arguments_and_results(app):
    import _thread as thread_module

    a = app.alloc("a", 4, np.int64, merge="sum")
    before = bytes(app.memory)
    lock = thread_module.allocate_lock()

    def uses_lock(mem, i, n):
        mem["a"][:] += 1
        with lock:
            return i

    def returns_lock(mem, i, n):
        mem["a"][:] += 1
        return thread_module.allocate_lock()

    if app.backend == "threads":  # nothing travels, but results are copied out of thread memory
        assert app.parallel(uses_lock, 2) == [0, 1]
        assert app.parallel(lambda mem, i, n, lk: i, 2, args=(lock,)) == [0, 1]
        before = bytes(app.memory)
    else:
        with pytest.raises(PageforkError, match="cannot send the thread function"):
            app.parallel(uses_lock, 2)
        with pytest.raises(PageforkError, match="cannot send the thread function"):
            app.parallel(lambda mem, i, n, lk: i, 2, args=(lock,))
        assert bytes(app.memory) == before
    with pytest.raises(WorkerError, match="lock"):
        app.parallel(returns_lock, 2)
    assert bytes(app.memory) == before
    app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
    assert a.tolist() == [(2 if app.backend == "threads" else 0) + 2] * 4


def test_large_results(app):
    got = app.parallel(lambda mem, i, n: np.full(4 << 20, i, np.uint8), 3)  # 12 MiB back
    assert [int(g[-1]) for g in got] == [0, 1, 2] and all(g.size == 4 << 20 for g in got)


def test_a_thread_function_that_forks(app):
    a = app.alloc("a", 4, np.int64, merge="sum")

    def work(mem, i, n):
        mem["a"][i] += 1
        pid = os.fork()
        if pid == 0:  # the child writes its own copy and leaves at once
            mem["a"][:] = 1000
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads alive
        assert app.parallel(work, 2) == [7, 7]
    assert a.tolist() == [1, 1, 0, 0]
    assert app.parallel(lambda mem, i, n: int(mem["a"].sum()), 2) == [2, 2]


def test_nested_batches_are_refused(app):
    app.alloc("a", 4, np.int64, merge="sum")

    def nested(mem, i, n):
        return app.parallel(lambda mem, i, n: i, 2)

    if app.backend == "threads":
        with pytest.raises(WorkerError, match="cannot call app.parallel"):
            app.parallel(nested, 2)
        with pytest.raises(WorkerError, match="cannot call app.parallel, alloc or close"):
            app.parallel(lambda mem, i, n: app.alloc("b", 1), 1)
        with pytest.raises(WorkerError, match="cannot call app.parallel, alloc or close"):
            app.parallel(lambda mem, i, n: app.close(), 1)
    else:
        with pytest.raises(PageforkError, match="an App cannot be pickled"):
            app.parallel(nested, 2)
    if app.backend == "threads":
        with App("64KiB", backend="threads", workers=1) as other:  # another App is fine
            assert app.parallel(lambda mem, i, n: other.parallel(lambda m, j, k: j, 2), 1) == [[0, 1]]
    assert app.parallel(lambda mem, i, n: i, 2) == [0, 1]


def test_an_app_after_close(backend):
    app = App("64KiB", backend=backend, workers=1)
    a = app.alloc("a", 4, np.int64)
    app.close()
    for call in (lambda: app.parallel(lambda mem, i, n: None, 1), lambda: app.alloc("b", 1),
                 lambda: app["a"]):
        with pytest.raises(PageforkError, match="closed"):
            call()
    assert "closed" in repr(app)
    app.close()
    del a


def test_many_threads_backend_workers():
    with App("64KiB", backend="threads", workers=300) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        for _ in range(3):  # no tracked region or thread slot leaks across batches
            app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 300)
        assert a.tolist() == [900] * 4
        arrived = threading.Condition()
        count = [0]

        def all_at_once(mem, i, n):
            with arrived:  # wait for all 300 (or until no more arrive): tracked at the same time
                count[0] += 1
                arrived.notify_all()
                while count[0] < 300:
                    seen = count[0]
                    if not arrived.wait(1.0) and count[0] == seen:
                        break
            mem["a"][:] += 1

        try:
            app.parallel(all_at_once, 300)
            assert a.tolist() == [1200] * 4
        except WorkerError as exc:  # a native limit: named, with the number
            assert "tracks at most" in str(exc) and "regions at once" in str(exc)
            assert a.tolist() == [900] * 4
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 300)


GC_SCRIPT = r"""
import sys, numpy as np
from pagefork import App
app = App("64KiB", backend=sys.argv[1], workers=2)
app.alloc("a", 4, np.int64, merge="sum")
app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
print(app["a"].tolist())
if sys.argv[2] == "del":
    del app
    import gc; gc.collect()
    print("collected")
"""


@pytest.mark.parametrize("how", ["del", "exit"])
def test_an_app_never_closed(backend, how):
    done = run_script(GC_SCRIPT, backend, how, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "[4, 4, 4, 4]" and done.stderr == ""


DROPPED_SCRIPT = r"""
import gc, os, sys, time, weakref
import numpy as np
from pagefork import App
app = App("64KiB", backend=sys.argv[1], workers=2)
app.alloc("a", 4, np.int64, merge="sum")
app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 4)
executor, alive = weakref.ref(app._executor), app._executor._alive
workers = [w.process.pid for w in getattr(app._executor.backend, "_workers", [])]
assert alive.is_set() and len(workers) == (2 if sys.argv[1] == "processes" else 0)
del app
gc.collect()
def running(pid):  # neither gone nor a zombie
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
deadline = time.monotonic() + 120
while executor() is not None or alive.is_set() or any(map(running, workers)):
    assert time.monotonic() < deadline, (executor(), alive.is_set(), [running(p) for p in workers])
    time.sleep(0.05)
print("stopped")
"""


def test_an_app_dropped_without_close_stops_before_exit(backend):
    """Collected (the batch thread holds only a weak reference to its
    executor), its batch thread ends and its worker processes exit, while
    the program goes on."""
    done = run_script(DROPPED_SCRIPT, backend, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "stopped\n" and done.stderr == ""



def test_workers_stopped_under_a_running_batch_is_a_clear_error(tmp_path):
    """What an App still open at interpreter exit goes through: atexit runs
    its finalizer, which stops the worker processes from the exiting thread
    while a daemon thread's batch waits for them. That batch fails with a
    PageforkError and merges nothing. Before the processes backend checked
    for a close() under its batch: a bare AssertionError."""
    started = tmp_path / "started"

    def slow(mem, i, n, started):
        mem["a"][:] += 1
        open(started, "w").close()
        time.sleep(2)

    def finalize_when_started(app):
        while not started.exists():
            time.sleep(0.01)
        app._executor._backend_finalizer()  # what atexit calls for an App never closed

    with App("64KiB", backend="processes", workers=2) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        finalizer = threading.Thread(target=finalize_when_started, args=(app,))
        finalizer.start()
        try:
            # (or, had the killed workers' sockets closed first, WorkerError: died)
            with pytest.raises(PageforkError):
                app.parallel(slow, 2, args=(str(started),))
        finally:
            finalizer.join()
        assert a.tolist() == [0, 0, 0, 0]


LIFECYCLE = r"""
import os, random, signal, sys, threading, time
import numpy as np
from pagefork import App

rng = random.Random(3)
backend = sys.argv[1]
for r in range(int(sys.argv[2])):
    app = None
    timer = threading.Timer(rng.uniform(0, 0.2), os.kill, (os.getpid(), signal.SIGINT))
    try:
        try:
            timer.start()
            app = App("64KiB", backend=backend, workers=2)
            app.alloc("a", 4, np.int64, merge="sum")
            app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
            app.close()
        finally:
            timer.join()
    except KeyboardInterrupt:
        pass
    if app is not None:
        app.close()  # after an interrupted close, closing again finishes the job
        assert "closed" in repr(app)
# no worker process outlives its App
time.sleep(0.5)
children = []
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        continue
    if pid.isdigit() and int(fields[1]) == os.getpid() and fields[0] != "Z":
        children.append(pid)
print("children", len(children))
"""


def test_sigint_during_construction_and_close(backend):
    done = run_script(LIFECYCLE, backend, 25)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "children 0"


def test_ctrl_c_while_waiting_for_another_threads_batch(app, tmp_path):
    """The interrupted caller leaves at once; its batch never runs."""
    a = app.alloc("a", 4, np.int64, merge="sum")
    started, proceed = tmp_path / "started", tmp_path / "proceed"

    def blocker(mem, i, n, started, proceed):
        mem["a"][0] += 1
        open(started, "w").close()
        while not os.path.exists(proceed):
            time.sleep(0.005)

    other = threading.Thread(target=app.parallel, args=(blocker, 1), kwargs=dict(args=(str(started), str(proceed))))
    other.start()
    try:
        while not started.exists():
            time.sleep(0.005)
        timer = interrupt_main_soon(0.1)
        try:
            with pytest.raises(KeyboardInterrupt):
                app.parallel(lambda mem, i, n: mem["a"].__setitem__(1, 1), 2)  # queued behind it
        finally:
            timer.join()
        assert other.is_alive()  # left while the other batch still ran
    finally:
        proceed.touch()
        other.join()
    assert app.parallel(lambda mem, i, n: int(mem["a"][1]), 1) == [0]
    assert a.tolist() == [1, 0, 0, 0]


FORK_SCRIPT = r"""
import os, sys, numpy as np
from pagefork import App, PageforkError
app = App("64KiB", backend=sys.argv[1], workers=2)
a = app.alloc("a", 4, np.int64, merge="sum")
app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
pid = os.fork()
if pid == 0:
    try:
        app.parallel(lambda mem, i, n: None, 1)
        code = 3
    except PageforkError as exc:
        code = 0 if "fork()ed child" in str(exc) else 4
    app.close()
    sys.exit(code)  # a normal exit: atexit and finalizers run in the child too
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
assert a.tolist() == [4] * 4, a
assert getattr(app._executor.backend, "replaced", 0) == 0  # the child stopped none of our workers
app.close()
print("ok")
"""


def test_a_forked_child_cannot_use_or_stop_the_parents_app(backend):
    done = run_script(FORK_SCRIPT, backend, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "ok\n"


SECOND_CTRL_C = r"""
import signal, sys, threading
import numpy as np
from pagefork import App
import pagefork._main_memory as main_memory

merging, release, wrote = threading.Event(), threading.Event(), threading.Event()
plain_window = main_memory.window


def slow_window(*args, **kwargs):  # the join of a large batch, held open
    merging.set()
    release.wait()
    return plain_window(*args, **kwargs)


main_memory.window = slow_window
main = threading.main_thread().ident


def ctrl_c_twice():
    merging.wait()
    signal.pthread_kill(main, signal.SIGINT)  # too late to cancel: the batch completes
    threading.Event().wait(0.3)
    signal.pthread_kill(main, signal.SIGINT)  # the impatient second Ctrl-C
    wrote.wait(1.0)  # the caller writes at once if it was let go mid-merge
    release.set()


with App("64KiB", backend=sys.argv[1], workers=2) as app:
    a = app.alloc("a", 8, np.int64, merge="sum")
    helper = threading.Thread(target=ctrl_c_twice)
    helper.start()
    try:
        app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, i + 1), 2)
    except KeyboardInterrupt:
        pass
    a[5] = 7  # the caller's next write: after parallel returned, so it must stay
    wrote.set()
    helper.join()
    assert a.tolist() == [1, 2, 0, 0, 0, 7, 0, 0], a.tolist()
    assert app.parallel(lambda mem, i, n: mem["a"].tolist(), 1) == [[1, 2, 0, 0, 0, 7, 0, 0]]
print("ok")
"""


def test_a_second_ctrl_c_never_lets_the_caller_race_the_merge(backend):
    """Ctrl-C after the merge began, then Ctrl-C again: the call used to stop
    waiting at the second one while the batch thread still merged, and the
    caller's next writes to main memory were dropped by the join's remap."""
    done = run_script(SECOND_CTRL_C, backend, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "ok\n"


MERGE_WINDOW = r"""
import sys, threading
import numpy as np
from pagefork import App, _native
import pagefork._main_memory as main_memory

if sys.argv[2] != "auto":
    main_memory.HOLD = sys.argv[2]
_native._set_window_pause(0.3)  # every join's merge held open, writers held
with App("64KiB", backend=sys.argv[1], workers=2) as app:
    a = app.alloc("a", 8, np.int64, merge="sum")
    log = app.alloc("log", 4000, np.int64)  # a thread's sequence, never touched by the batch
    stop, written = bytearray(1), []
    # Another thread writes without the GIL, one value every 20 microseconds,
    # before, during and after the join (where the merge waits 0.3 s).
    writer = threading.Thread(target=lambda: written.append(
        _native._write_sequence(log.ctypes.data, log.size, 1, 20000, stop)))
    writer.start()
    app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, i + 1), 2)
    times = app.last_batch.times
    a[5] = 7  # after the join: never dropped
    stop[0] = 1
    writer.join()
    n = written[0]
    lost = int(np.count_nonzero(log[:n] != np.arange(1, n + 1)))
    print(a.tolist(), "lost", lost, "held", times["merge"] >= 0.3)
"""


def test_main_writes_during_the_merge_itself_are_carried(backend):
    """A thread writing main memory without the GIL while the join merges
    (held open for 0.3 s) is held until main memory is mapped again: every
    value it wrote is there afterwards."""
    done = run_script(MERGE_WINDOW, backend, "auto", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "[1, 2, 0, 0, 0, 7, 0, 0] lost 0 held True\n"


def test_main_writes_during_the_merge_are_lost_unless_held():
    """The same writer with the holding switched off (only the GIL): the
    writes it made during the merge are dropped by the new mapping, so the
    test above does see them."""
    done = run_script(MERGE_WINDOW, "threads", "none", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("[1, 2, 0, 0, 0, 7, 0, 0] lost ") and " lost 0 " not in done.stdout


SIGINT_STORM = r"""
import os, signal, sys, threading, time
import numpy as np
from pagefork import App

stop = threading.Event()
signal.signal(signal.SIGINT, on_sigint)  # SIGINT_PRELUDE's


def storm():
    while not stop.is_set():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.0005)


with App("64KiB", backend=sys.argv[1], workers=2) as app:
    a = app.alloc("a", 4, np.int64, merge="sum")
    helper = threading.Thread(target=storm)
    helper.start()
    for _ in range(int(sys.argv[2])):
        try:
            inside = True
            app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        except KeyboardInterrupt:
            pass
        inside = False
    stop.set()
    helper.join()
    assert app._executor._alive.is_set(), "the batch thread died"
    k = int(a[0])
    app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
    assert a.tolist() == [k + 2] * 4 and k % 2 == 0, a.tolist()
print("ok")
"""


def test_a_sigint_storm_never_kills_the_batch_thread(backend):
    """Ctrl-C every half millisecond while batches run back to back: every
    call ends (merged or not, never half), and the batch thread lives on."""
    done = run_script(SIGINT_STORM, backend, 1500, timeout=300, prelude=SIGINT_PRELUDE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "ok\n"


def test_the_batch_threads_done_latch():
    """What callers wait on for the batch thread. It replaced threading.Event,
    which breaks when Ctrl-C lands inside Condition.wait between releasing
    and re-taking the Event's lock: the waiter then releases the lock the
    batch thread holds in set(), and the batch thread died with 'release
    unlocked lock' (seen once in a SIGINT stress loop; every later parallel()
    raised 'the batch thread has ended'). A waiter stopped between taking and
    giving back the latch's lock costs other waiters one poll, nothing more."""
    from pagefork._batch_thread import Latch as _Latch
    latch = _Latch()
    assert not latch.is_set() and latch.wait(0.001) is False
    threading.Timer(0.05, latch.set).start()
    while not latch.wait(0.01):
        pass
    assert latch.is_set() and latch.wait(0) is True
    latch._lock.acquire()  # a waiter interrupted between its acquire and release
    assert latch.wait(0.01) is True
    latch.set()  # twice: harmless


class _ExitsWhenLoaded:
    """A result whose unpickling calls sys.exit (a hostile __reduce__)."""

    def __reduce__(self):
        return (sys.exit, (3,))


def test_a_result_that_exits_when_loaded_is_a_worker_error_on_processes():
    with App("64KiB", backend="processes", workers=2) as app:
        total = app.alloc("total", 4, np.int64, merge="sum")

        def work(mem, i, n):
            mem["total"][:] += 1
            return _ExitsWhenLoaded() if i == 2 else i

        with pytest.raises(WorkerError, match="cannot load the result") as info:
            app.parallel(work, 5)
        assert info.value.failed == [2] and total.tolist() == [0] * 4
        assert app.parallel(lambda mem, i, n: i, 5) == list(range(5))


def _augmented(mem, i, n):
    mem["s"] += i + 1          # the natural numpy idiom, in place
    mem["x"] ^= 1 << i
    mem["m"] *= 2
    mem["o"] |= 1 << i
    mem["d"] -= 0.5


def test_augmented_assignment_on_mem_works_in_place(app):
    s = app.alloc("s", 8, np.int64, merge="sum")
    x = app.alloc("x", 8, np.uint8, merge="xor")
    m = app.alloc("m", 8, np.int64, merge="product")
    o = app.alloc("o", 8, np.uint8, merge="max")
    d = app.alloc("d", (2, 4), np.float64, merge="sum", start="identity")
    m[:] = 3
    app.parallel(_augmented, 4)
    assert s.tolist() == [10] * 8 and x.tolist() == [15] * 8 and m.tolist() == [3 * 16] * 8
    assert o.tolist() == [8] * 8 and d.tolist() == [[-2.0] * 4] * 2


def _replaces(mem, i, n, how):
    if how == "array":
        mem["s"] = np.zeros(8, np.int64)
    elif how == "slice":
        mem["s"] = mem["s"][1:]
    else:
        mem["s"] = 1


@pytest.mark.parametrize("how", ["array", "slice", "scalar"])
def test_replacing_an_array_of_mem_is_refused_with_the_fix(app, how):
    s = app.alloc("s", 8, np.int64, merge="sum")
    with pytest.raises(pagefork.WorkerError, match=r"TypeError: mem\['s'\] cannot be replaced; write into it"):
        app.parallel(_replaces, 2, args=(how,))
    assert s.tolist() == [0] * 8
