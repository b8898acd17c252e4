"""Shared fixtures: every tracking mode and every kind of memory."""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import signal
import sys
import threading
import time
import traceback

import pytest
from hypothesis import settings

import pagefork
from pagefork import PAGE_SIZE, Region


# A runner that starts the suite as a background job (SIGINT ignored, as
# non-interactive shells do) would turn the Ctrl-C tests' interrupt_main()
# into a no-op: tests run with Python's own SIGINT handler wherever started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _asan_loaded() -> bool:
    return hasattr(ctypes.CDLL(None), "__asan_init")


#: True under AddressSanitizer (`make test-sanitize`). Its quarantine holds on
#: to freed memory, so RSS growth says nothing about leaks there; tests that
#: measure RSS skip that check, and LeakSanitizer checks instead (below).
SANITIZED = _asan_loaded()


def _name_running_threads() -> None:
    """Threads still running at exit (daemon threads: atexit runs after the
    others were joined) hold objects in their frames that LeakSanitizer
    cannot see. They get 10 s to end (a timed-out batch's sleeping thread
    does); those still running are named on stderr, with where they are, so
    a report they cause can be told apart from a real leak."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    deadline = time.monotonic() + 10
    for thread in others:
        thread.join(max(0.0, deadline - time.monotonic()))
    frames = sys._current_frames()
    for thread in others:
        if thread.is_alive():
            where = traceback.format_stack(frames[thread.ident]) if thread.ident in frames else ["?"]
            print(f"leak check: thread {thread.name!r} still runs at:\n{''.join(where[-3:])}", file=sys.stderr)


def _before_leak_check() -> None:
    """Names threads still running, then collects garbage, before the leak
    check (registered apart: see below)."""
    _name_running_threads()
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
    atexit.register(ctypes.CDLL(None).__lsan_do_leak_check)
    atexit.register(_before_leak_check)

#: Test files (by name prefix) that do not drive the native core beyond what
#: the others do: Dask (mostly distributed's Python, slow under ASan), the
#: example scripts and the docs' code blocks (the executor paths test_app
#: covers), text lints, packaging (builds, sdists) and the CPU count. Every
#: other test, in files present and future, is marked ``native``, and ``make
#: test-sanitize`` (run by .ci/run) runs the ``native`` tests against an
#: ASan+UBSan build. ``@pytest.mark.native`` adds a test from these files;
#: ``@pytest.mark.python_only`` leaves out a test of another file whose extra
#: part is third-party Python (the S3 server: its libraries leak on purpose).
NOT_NATIVE_TEST_FILES = ("test_dask", "test_examples", "test_native_lint", "test_docs", "test_packaging",
                         "test_cpus")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.startswith(NOT_NATIVE_TEST_FILES) or item.get_closest_marker("python_only"):
            continue
        item.add_marker(pytest.mark.native)


settings.register_profile("slow", max_examples=2000, deadline=None)
settings.register_profile("default", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("PAGEFORK_HYPOTHESIS", "default"))

KINDS = {
    "anon-private": dict(shared=False, backing="anonymous"),
    "anon-shared": dict(shared=True, backing="anonymous"),
    "memfd-private": dict(shared=False, backing="memfd"),
    "memfd-shared": dict(shared=True, backing="memfd"),
}


def require(mode: str) -> None:
    """Skips the test with the probe's reason when ``mode`` cannot work here."""
    support = pagefork.probe()[mode]
    if not support.available:
        pytest.skip(f"{mode} unavailable: {support.reason}")


def kind_supports(mode: str, kind: str) -> bool:
    """cow tracks only private memfd (snapshot) mappings."""
    return mode != "cow" or kind == "memfd-private"


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


def make_region(kind: str, pages: int = 16, max_pages: int | None = None) -> Region:
    max_size = None if max_pages is None else max_pages * PAGE_SIZE
    return Region(pages * PAGE_SIZE, max_size=max_size, **KINDS[kind])


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


def remap(region: Region) -> None:
    """Maps a memfd region's file over it again (how cow tracking is re-armed)."""
    region._map_file(region._fd, region.size, region.shared)


def cycles_in(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of ``graph`` (node -> nodes it points
    to) closes, as "a -> b -> a"; empty when it is acyclic. Used for the
    package's imports and the C files' calls."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]))
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles
