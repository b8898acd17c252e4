"""Shared fixtures (every tracking mode and every kind of memory), the
suite's markers and hooks, and the LeakSanitizer check at exit. Helpers that
tests import live in support.py."""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import signal
import sys
import threading
import time

import pytest
from hypothesis import settings

import pagefork
from support import KINDS, SANITIZED, kind_supports, make_region, require


# A runner that starts the suite as a background job (SIGINT ignored, as
# non-interactive shells do) would turn the Ctrl-C tests' interrupt_main()
# into a no-op: tests run with Python's own SIGINT handler wherever started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _threads_still_running() -> list[threading.Thread]:
    """The other threads that still run (threading lists a thread it did not
    start, a "dummy" one, for ever, even after it ended)."""
    running = set(sys._current_frames()) - {threading.get_ident()}
    return [t for t in threading.enumerate() if t.ident in running]


def _before_leak_check() -> None:
    """Threads still running at exit (daemon threads: atexit runs after the
    others were joined; an App's batch thread) hold objects in their frames
    that LeakSanitizer cannot see, so it would report them as leaks. They
    get 10 s to end (a timed-out batch's sleeping thread does); if some
    still run, the check is skipped, naming them on stderr, rather than
    report what it cannot tell from a leak. Then collects garbage."""
    deadline = time.monotonic() + 10
    for thread in _threads_still_running():
        if not isinstance(thread, threading._DummyThread):  # not joinable
            thread.join(max(0.0, deadline - time.monotonic()))
    while _threads_still_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    running = _threads_still_running()
    if running:
        atexit.unregister(_LEAK_CHECK)
        names = ", ".join(repr(t.name) for t in running)
        print(f"leak check skipped: threads still run at exit ({names}); objects their frames hold "
              "are invisible to LeakSanitizer", file=sys.stderr)
    gc.collect()


# LeakSanitizer runs from atexit, before the interpreter finalizes: every
# Python object is still reachable from the heap then. Not at process exit
# (CPython leaves memory behind on purpose), and not from inside pytest or
# any Python function: objects referenced only by running Python frames
# (locals, and a frame's own object wherever something materialized it, as
# warnings and tracebacks do) sit in CPython's mmap-ed frame stack, which
# LeakSanitizer does not scan. So the check itself is the atexit callback,
# called from C with no Python frame running; registered first, it runs after
# every later handler, _before_leak_check included. It exits the process with
# a report if anything leaked (a no-op unless detect_leaks=1).
if SANITIZED:
    _LEAK_CHECK = ctypes.CDLL(None).__lsan_do_leak_check
    atexit.register(_LEAK_CHECK)
    atexit.register(_before_leak_check)

#: Test files (by name prefix) that do not drive the native core beyond what
#: the others do: Dask (mostly distributed's Python, slow under ASan), the
#: example scripts, the docs' code blocks and the dense benchmarks' harness
#: (the executor paths test_app covers), text lints, packaging (builds,
#: sdists) and the CPU count. Every
#: other test, in files present and future, is marked ``native``, and ``make
#: test-sanitize`` (run by .ci/run) runs the ``native`` tests against an
#: ASan+UBSan build. ``@pytest.mark.native`` adds a test from these files;
#: ``@pytest.mark.python_only`` leaves out a test of another file whose extra
#: part is third-party Python (the S3 server: its libraries leak on purpose).
NOT_NATIVE_TEST_FILES = ("test_dask", "test_examples", "test_native_lint", "test_docs", "test_packaging",
                         "test_cpus", "test_bench_dense")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.startswith(NOT_NATIVE_TEST_FILES) or item.get_closest_marker("python_only"):
            continue
        item.add_marker(pytest.mark.native)


settings.register_profile("slow", max_examples=2000, deadline=None)
settings.register_profile("default", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("PAGEFORK_HYPOTHESIS", "default"))

@pytest.fixture(params=pagefork.MODES)
def mode(request: pytest.FixtureRequest) -> str:
    require(request.param)
    return request.param


@pytest.fixture(params=[m for m in pagefork.MODES if m in ("none", "segfault", "uffd")])
def thread_mode(request: pytest.FixtureRequest) -> str:
    require(request.param)
    return request.param


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


COMBOS = [(m, k) for m in pagefork.MODES for k in KINDS if kind_supports(m, k)]


@pytest.fixture(params=COMBOS, ids=[f"{m}-{k}" for m, k in COMBOS])
def tracked(request: pytest.FixtureRequest):
    """(mode, tracker, region) for every mode and the memory kinds it tracks
    (cow's refusal of the others is tested on its own)."""
    mode, kind = request.param
    require(mode)
    region = make_region(kind, 16, max_pages=32)
    tracker = pagefork.tracker(mode)
    yield mode, tracker, region
    tracker.close()
    region.close()
