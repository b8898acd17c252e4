"""The Dask backend while the cluster changes under it: workers that leave or
join, a scheduler that restarts, clients that die, workers short of memory,
and what crosses the network. Cases that could wait for good run in a
subprocess with a timeout (the watchdog); the others poll with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from pagefork import App, PageforkError  # noqa: E402
from pagefork.backends import dask as pfdask  # noqa: E402


def run_isolated(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs ``script`` in its own process group; on timeout the whole group
    (the script and the scheduler and workers it started) is killed and the
    test fails with what it printed."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"still waiting after {timeout} s:\n{out}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything it left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_the_waits_are_bounded_so_tests_can_rely_on_them():
    assert 0 < pfdask.WAIT_FOR_WORKERS < 60 and 0 < pfdask.CALL_TIMEOUT < 60


# ---- a cluster whose workers left (issue 23, item 6) ---------------------------------------------

NO_WORKERS = r'''
import sys, threading, time, _thread
import numpy as np
import distributed
import pagefork.backends.dask as pfdask
from pagefork import App, PageforkError

def add(mem, i, n):
    mem["a"][:] += 1


def held(mem, i, n, gate):
    import os, time
    mem["a"][:] += 1
    open(gate + ".started", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.02)


gate = sys.argv[1]
pfdask.WAIT_FOR_WORKERS = 3.0  # the default (20 s) is bounded the same way
with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=2,
                              dashboard_address=None) as cluster, \
        distributed.Client(cluster) as client, App("1MiB", backend="dask", client=client) as app:
    a = app.alloc("a", 4, np.int64, merge="sum")
    app.parallel(add, 2)

    def retire():  # the worker leaves while the batch runs; it finishes its task first
        import os
        while not os.path.exists(gate + ".started"):
            time.sleep(0.02)
        cluster.scale(0)

    leaving = threading.Thread(target=retire)
    leaving.start()
    try:
        app.parallel(held, 1, args=(gate,))
        print("no error")
    except PageforkError as exc:
        print("error:", exc)
    open(gate, "w").close()
    leaving.join()
    while client.nthreads():
        time.sleep(0.05)
    try:
        app.parallel(add, 2)
        print("no error")
    except PageforkError as exc:
        print("error:", exc)
    pfdask.WAIT_FOR_WORKERS = 3600.0  # only Ctrl-C ends this wait
    threading.Timer(1.0, _thread.interrupt_main).start()
    try:
        app.parallel(add, 2)
        print("no error")
    except KeyboardInterrupt:
        print("interrupted")
    print("unchanged", a.tolist())
    cluster.scale(1)
    client.wait_for_workers(1)
    app.parallel(add, 2)
    print("after", a.tolist())
'''


def test_a_cluster_whose_workers_left_fails_the_batch_and_ctrl_c_cancels_the_wait(tmp_path):
    done = run_isolated(NO_WORKERS, str(tmp_path / "gate"), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("error: the Dask cluster has") and "no running workers" in lines[0], done.stdout
    assert lines[1].startswith("error: the Dask cluster has no workers for 3 s"), done.stdout
    assert lines[2:] == ["interrupted", "unchanged [2, 2, 2, 2]", "after [4, 4, 4, 4]"], done.stdout


def test_a_batch_waiting_while_every_worker_is_paused_fails(monkeypatch, tmp_path):
    """Dask pauses a worker short of memory: tasks queued there wait until it
    resumes, perhaps never. The batch fails after WAIT_FOR_WORKERS instead
    (the watchdog resumes the worker after a minute: the batch would then
    end without the error)."""
    import threading

    from distributed.core import Status

    monkeypatch.setattr(pfdask, "WAIT_FOR_WORKERS", 3.0)
    gate = tmp_path / "gate"

    def wait_for(path):
        while not os.path.exists(path):
            time.sleep(0.02)

    def pause(status, dask_worker=None):
        dask_worker.status = status

    # memory_limit=0: no memory monitor, which would resume the worker paused below
    with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1, memory_limit=0,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, App("1MiB", backend="dask", client=client) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 1)
        blocker = client.submit(wait_for, str(gate), pure=False)  # holds the worker's one thread

        def pause_when_queued():
            deadline = time.monotonic() + 60
            try:
                while not any(str(k).startswith("run_group") and ts.state in ("processing", "queued")
                              for k, ts in list(cluster.scheduler.tasks.items())):  # not the last batch's
                    time.sleep(0.02)
                client.run(pause, Status.paused)
                while not gate.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                client.run(pause, Status.running)
            finally:
                gate.touch()

        watchdog = threading.Thread(target=pause_when_queued)
        watchdog.start()
        try:
            with pytest.raises(PageforkError, match="no running workers for 3 s"):
                app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 1)
        finally:
            gate.touch()
            watchdog.join()
        blocker.result()
        assert a.tolist() == [1] * 4
        app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 1)
        assert a.tolist() == [2] * 4


# ---- a scheduler restarted mid-batch (issue 23, item 7) ------------------------------------------

RESTART = r'''
import os, signal, socket, subprocess, sys, threading, time
import numpy as np
import distributed
from pagefork import App, PageforkError

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
address = f"tcp://127.0.0.1:{port}"
gate = sys.argv[1]


def start(*command):  # in this process group: the test kills it all on a timeout
    return subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def scheduler():
    return start("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--dashboard-address", ":0")


def worker():  # no nanny: it exits with its scheduler, a new one joins the new scheduler
    return start("distributed.cli.dask_worker", address, "--no-nanny", "--nthreads", "2",
                 "--host", "127.0.0.1", "--dashboard-address", ":0")


def slow(mem, i, n, gate):
    import time
    open(f"{gate}{i}", "w").close()
    time.sleep(60)


def add(mem, i, n):
    mem["a"][:] += 1


processes = [scheduler(), worker()]
try:
    client = distributed.Client(address, timeout=30)
    client.wait_for_workers(1, timeout=120)
    with App("4MiB", backend="dask", client=client) as app:
        a = app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(add, 2)

        def restart():
            while not os.path.exists(f"{gate}0"):
                time.sleep(0.05)
            processes[0].kill()
            processes[0].wait()
            processes.append(scheduler())
            processes.append(worker())

        threading.Thread(target=restart).start()
        started = time.monotonic()
        try:
            app.parallel(slow, 2, args=(gate,))
            print("no error")
        except PageforkError as exc:
            print("error:", type(exc).__name__, exc)
        print(f"after {time.monotonic() - started:.1f} s", file=sys.stderr)
        print("unchanged", a.tolist())
        deadline = time.monotonic() + 120
        while client.status != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        client.wait_for_workers(1, timeout=120)
        app.parallel(add, 2)
        print("after", a.tolist())
    client.close()
finally:
    for p in processes:
        p.kill()
'''


def test_a_scheduler_restarted_mid_batch_fails_it_and_the_next_batch_runs(tmp_path):
    done = run_isolated(RESTART, str(tmp_path / "started"), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("error: PageforkError") and "scheduler" in lines[0], done.stdout
    assert lines[1:] == ["unchanged [2, 2, 2, 2]", "after [4, 4, 4, 4]"], done.stdout


# ---- workers added later (issue 23, item 8) ------------------------------------------------------


def _where(mem, i, n):
    mem["a"][:] += 1
    return distributed.get_worker().address


def test_workers_added_later_get_slots():
    with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, \
            App("1MiB", backend="dask", client=client) as app, \
            App("1MiB", backend="dask", client=client, workers=1) as capped:
        for x in (app, capped):
            x.alloc("a", 4, np.int64, merge="sum")
        first = client.nthreads()
        assert set(app.parallel(_where, 4)) == set(first) and app._executor.backend.slots == 1
        cluster.scale(2)
        client.wait_for_workers(2)
        assert set(app.parallel(_where, 4)) == set(client.nthreads())  # both workers ran threads
        assert app._executor.backend.slots == 2 and not app.last_batch.placement_cached
        assert set(app.parallel(_where, 4)) == set(client.nthreads()) and app.last_batch.placement_cached
        assert app["a"].tolist() == [12] * 4
        assert set(capped.parallel(_where, 4)) == set(first)  # workers=1 stays at one
        assert capped._executor.backend.slots == 1


# ---- a killed client's snapshots on the workers (issue 23, item 9) -------------------------------

KILLED_CLIENT = r'''
import sys, time
import numpy as np
import distributed
from pagefork import App

client = distributed.Client(sys.argv[1])
app = App("8MiB", backend="dask", client=client)
a = app.alloc("a", 1 << 20, np.int64, merge="sum")
a[:] = 5
app.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
print(app._executor.backend.app_id, flush=True)
time.sleep(600)
'''


def test_a_killed_clients_snapshots_are_freed_on_the_workers():
    def _cached_apps(dask_worker):  # nested: sent by value, the workers cannot import this file
        return sorted(getattr(dask_worker, "_pagefork_snapshots", {}))

    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, \
            App("1MiB", backend="dask", client=client) as mine:
        mine.alloc("a", 4, np.int64, merge="sum")
        mine.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        own = mine._executor.backend.app_id
        clients = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, cluster.scheduler_address],
                                    stdout=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            gone = [process.stdout.readline().strip() for process in clients]
            assert all(gone), gone
            assert all(set(gone) < set(apps) for apps in client.run(_cached_apps).values())
        finally:
            for process in clients:
                process.kill()
                process.wait()
        deadline = time.monotonic() + 60
        while any(set(gone) & set(apps) for apps in client.run(_cached_apps).values()):
            assert time.monotonic() < deadline, client.run(_cached_apps)
            time.sleep(0.2)
        assert all(own in apps for apps in client.run(_cached_apps).values())  # a live App keeps its own
        mine["a"][0] = 7
        mine.parallel(lambda mem, i, n: mem["a"].__iadd__(1), 2)
        assert mine.last_batch.bytes_shipped < 100_000  # a delta: its cache was kept
        assert mine["a"].tolist() == [9, 4, 4, 4]


# ---- what crosses the network (issue 23, item 10) ------------------------------------------------


def test_payloads_and_replies_go_straight_between_client_and_workers():
    """The scheduler relays no data (no scatter or gather through it), and
    bytes_shipped counts each payload once per worker it reaches and each
    reply once."""
    with distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        relayed: list[str] = []
        for op in ("scatter", "gather"):
            handler = cluster.scheduler.handlers[op]

            def counted(*args, _op=op, _handler=handler, **kwargs):
                relayed.append(_op)
                return _handler(*args, **kwargs)

            cluster.scheduler.handlers[op] = counted
        size = 4 << 20
        with App(size, backend="dask", client=client) as app:
            a = app.alloc("a", size, np.uint8)
            a[:] = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)  # incompressible
            app.parallel(lambda mem, i, n: None, 2)
            assert 2 * size < app.last_batch.bytes_shipped < 2 * size + 200_000  # once to each worker
            blob = os.urandom(300_000)
            reply = os.urandom(100_000)
            app.parallel(lambda mem, i, n, b, r: r, 2, args=(blob, reply))
            expected = 2 * (len(blob) + len(reply)) + 2 * len(reply)  # the program to each worker, replies
            assert expected < app.last_batch.bytes_shipped < expected + 50_000
        assert relayed == []


# ---- a worker receiving the whole snapshot (issue 23, item 5) ------------------------------------

SHORT_OF_MEMORY = r'''
import sys
import numpy as np
import distributed
from pagefork import App, PageforkError

with distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=1, memory_limit="256MiB",
                              dashboard_address=None) as cluster, \
        distributed.Client(cluster) as client:
    (worker,) = client.nthreads()
    with App("128MiB", backend="dask", client=client) as app:
        a = app.alloc("a", 128 << 20, np.uint8)
        a[:] = np.random.default_rng(0).integers(0, 256, a.size, dtype=np.uint8)
        for attempt in range(2):  # the next batch says so again, it does not hang
            try:
                app.parallel(lambda mem, i, n: None, 1)
                print("no error")
            except PageforkError as exc:
                print(type(exc).__name__, worker in str(exc), exc)
    with App("4MiB", backend="dask", client=client) as small:  # what fits still runs
        small.alloc("b", 4, np.int64, merge="sum")
        small.parallel(lambda mem, i, n: mem["b"].__iadd__(1), 2)
        print("small", small["b"].tolist())
'''


def test_a_worker_that_cannot_hold_the_snapshot_is_a_clear_error():
    done = run_isolated(SHORT_OF_MEMORY, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[2] == "small [2, 2, 2, 2]", done.stdout
    for line in lines[:2]:
        assert line.startswith("PageforkError True "), done.stdout
        assert "cannot hold" in line and str(128 << 20) in line and "memory_limit" in line, line


def test_a_worker_receiving_the_whole_snapshot_holds_it_once():
    """Decompressed straight into the worker's memfd: the worker's peak
    resident memory grows by about the App's size, not two or three times it
    (compressed payload, decompressed bytes, then the snapshot's copy)."""
    def memory_kib(reset: bool = False) -> tuple[int, int]:  # nested: sent by value
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
        return int(fields["VmRSS"][0]), int(fields["VmHWM"][0])

    size = 64 << 20
    with distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, App(size, backend="dask", client=client) as app:
        a = app.alloc("a", size // 8, np.int64)
        a[:] = np.arange(a.size) // 3  # no zero page, compresses well: the payload is small
        (before,) = client.run(memory_kib, True).values()
        app.parallel(lambda mem, i, n: None, 1)
        (after,) = client.run(memory_kib).values()
        grown = (after[1] - before[0]) << 10
        assert size * 0.9 < grown < size * 1.4, (before, after)
