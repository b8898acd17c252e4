"""Processes that outlive or leave an executor window: a child fork()ed from
a GIL-free thread while main memory is held for a window, and worker
processes whose parent execs or whose parent is reaped by a subreaper.

Each scenario runs in a fresh interpreter and checks exit statuses exactly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

import pagefork

from support import run_python as run

HELPER = Path(__file__).resolve().parent / "fork_in_window_helper.c"


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/fork_in_window_helper.c, built with the system cc."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip(f"no C compiler (cc) to build {HELPER.name}")
    out = tmp_path_factory.mktemp("fork_in_window") / "fork_in_window.so"
    env = {k: v for k, v in os.environ.items()  # the compiler runs without the sanitizers
           if k != "LD_PRELOAD" and not k.endswith("SAN_OPTIONS")}
    built = subprocess.run([cc, "-O1", "-Wall", "-shared", "-fPIC", "-o", str(out), str(HELPER)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr
    return out


FORK_IN_WINDOW = r"""
import ctypes, os, sys, threading
import numpy as np
import pagefork._main_memory as main_memory
from pagefork import App, _native

main_memory.HOLD, tracking = sys.argv[2], sys.argv[3]
lib = ctypes.CDLL(sys.argv[1])
lib.fork_and_write.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_uint, ctypes.c_uint]
with App("1MiB", backend="threads", workers=1, tracking=None if tracking == "default" else tracking) as app:
    a = app.alloc("a", 1024, np.int64)
    a[:] = 5
    got = []
    # The thread forks 0.5 s into a window held open for 3 s.
    t = threading.Thread(target=lambda: got.append(lib.fork_and_write(a.ctypes.data + 8 * 7, 42, 500_000, 20)))
    _native._set_window_pause(3.0)
    t.start()
    app.checkpoint(sys.argv[4])
    _native._set_window_pause(0)
    t.join()
    status = got[0]
    print("exit", os.WEXITSTATUS(status) if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}",
          int(a[7]))
"""


@pytest.mark.parametrize("hold", ["auto", "mprotect"])
@pytest.mark.parametrize("tracking", ["default", "segfault", "uffd-async"])
def test_a_child_forked_during_a_window_can_write_its_copy_of_main_memory(helper, tmp_path, hold, tracking):
    """A native fork(2) from a thread without the GIL while a window holds
    main memory: the child's copy is its own, so its write must go through
    (under the mprotect hold it used to park in the SIGSEGV handler for
    ever, waiting for a window that only the parent ends), and the parent's
    main memory keeps its value."""
    if tracking != "default":
        support = pagefork.probe()[tracking]
        if not support.available:
            pytest.skip(f"{tracking} unavailable: {support.reason}")
    done = run(FORK_IN_WINDOW, helper, hold, tracking, tmp_path / "ck")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "exit 0 5\n"


# ---- worker processes whose parent execs, or dies under a subreaper --------------------------

WORKERS_THEN = r"""
import os, sys, threading, time
from pagefork import App

folder, how = sys.argv[1], sys.argv[2]


def fn(mem, i, n, folder):
    with open(os.path.join(folder, f"pid.{i}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(folder, f"pid.{i}.tmp"), os.path.join(folder, f"pid.{i}"))
    time.sleep(120)


def execer():
    while len([f for f in os.listdir(folder) if f.startswith("pid.") and not f.endswith(".tmp")]) < 2:
        time.sleep(0.02)
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)"])


if how == "exec":  # from a caller's thread, as a worker pool's thread would
    threading.Thread(target=execer, daemon=True).start()
app = App("1MiB", backend="processes", workers=2)
app.parallel(fn, 2, args=(folder,))
"""

SUBREAPER = r"""
import ctypes, os, subprocess, sys, time

folder, how, script = sys.argv[1], sys.argv[2], sys.argv[3]
if how == "subreaper":
    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
parent = subprocess.Popen([sys.executable, "-c", script, folder, how])
deadline = time.monotonic() + 120
while len([f for f in os.listdir(folder) if f.startswith("pid.") and not f.endswith(".tmp")]) < 2:
    assert time.monotonic() < deadline and parent.poll() is None, "the workers did not start"
    time.sleep(0.02)
workers = sorted(int(open(os.path.join(folder, f)).read()) for f in os.listdir(folder) if not f.endswith(".tmp"))
if how == "subreaper":
    parent.kill()
    parent.wait()
else:
    time.sleep(0.5)  # the exec happens; the exec'd program sleeps on
deadline = time.monotonic() + 30
ends = {}
while len(ends) < 2 and time.monotonic() < deadline:
    for w in workers:
        if w in ends:
            continue
        try:
            if how == "subreaper":  # re-parented to us: ours to reap
                pid, status = os.waitpid(w, os.WNOHANG)
                if pid == w and os.WIFSIGNALED(status):
                    ends[w] = f"signal {os.WTERMSIG(status)}"
                elif pid == w:
                    ends[w] = f"exit {os.WEXITSTATUS(status)}"
            else:  # a zombie of the exec'd program, which never reaps it
                with open(f"/proc/{w}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        ends[w] = "ended"
        except FileNotFoundError:
            ends[w] = "ended"
    time.sleep(0.02)
for w in workers:
    if w not in ends:
        os.kill(w, 9)
if parent.poll() is None:
    parent.kill()
print(sorted(ends.values()), len(workers))
"""


@pytest.mark.parametrize("how", ["exec", "subreaper"])
def test_workers_end_when_their_parent_execs_or_dies_under_a_subreaper(tmp_path, how):
    """A parent that execs another program mid-batch (from a non-main
    thread: the exec ends the thread that started the workers), or that is
    SIGKILLed while its own parent is a child subreaper (the workers are
    re-parented to the subreaper, not to init): the workers end, SIGKILLed
    by their parent-death signal, within 30 s (in practice milliseconds)."""
    done = run(SUBREAPER, tmp_path, how, textwrap.dedent(WORKERS_THEN))
    assert done.returncode == 0, done.stderr[-3000:]
    want = [f"signal {int(signal.SIGKILL)}"] * 2 if how == "subreaper" else ["ended"] * 2
    assert done.stdout == f"{want} 2\n"
