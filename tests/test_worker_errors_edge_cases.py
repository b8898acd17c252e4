"""Thread errors at the edges: exceptions that fight pickling and
formatting, code whose file the first line must name wherever it is sent by
value, malformed worker replies, and the pagefork logger with handlers that
misbehave (logging never changes what pagefork does)."""

from __future__ import annotations

import builtins
import logging
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pagefork import App, WorkerError
from pagefork._thread_errors import thread_error

from support import run_python as _run_script

BACKENDS = ["threads", "processes"]


def _kbi():
    raise KeyboardInterrupt("raised while unpickling the exception")


def _ok(mem, i, n):
    mem["a"][i] += 1
    return i


# ---- the first line names the user's file ------------------------------------------------


def test_first_line_names_the_file_of_closure_helpers_and_local_methods():
    def helper():
        raise ValueError("from a closure helper")

    class Local:
        def boom(self):
            raise ValueError("from a method")

    def via_closure(mem, i, n):
        helper()

    def via_method(mem, i, n):
        Local().boom()

    with App("64KiB", backend="processes", workers=1) as app:
        app.alloc("a", 4, np.int64)
        for fn in (via_closure, via_method):
            with pytest.raises(WorkerError) as info:
                app.parallel(fn, 1)
            first = str(info.value).splitlines()[0]
            assert "<dynamic-code>" not in first and __file__ in first, first


# ---- exceptions hostile to pickling and formatting ----------------------------------------


def test_unpickling_that_raises_keyboardinterrupt_in_the_parent():
    class Hostile(Exception):
        def __reduce__(self):
            return (_kbi, ())

    def fn(mem, i, n):
        raise Hostile("x")

    with App("64KiB", backend="processes", workers=1) as app:
        a = app.alloc("a", 4, np.int64)
        try:
            app.parallel(fn, 2)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt from unpickling the thread's exception")
        except WorkerError as err:
            assert err.__cause__ is None and "could not be rebuilt" in str(err)
        assert app.parallel(_ok, 2) == [0, 1] and list(a[:2]) == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_whose_notes_raise(backend):
    class BadNotes(Exception):
        @property
        def __notes__(self):
            raise RuntimeError("notes refuse")

    def fn(mem, i, n):
        raise BadNotes("x")

    with App("64KiB", backend=backend, workers=1) as app:
        app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(fn, 1)
        first = str(info.value).splitlines()[0]
        assert first.startswith("thread 0 of 1 failed: ") and f"BadNotes: x (in fn, {__file__}, line " in first
        assert type(info.value.__cause__).__name__ == "BadNotes"
        assert info.value.traceback.endswith("BadNotes: x\n"), info.value.traceback
        assert app.parallel(_ok, 1) == [0]


class _BadNotes(Exception):
    @property
    def __notes__(self):
        raise RuntimeError("notes refuse")


def test_a_cause_whose_notes_raise_still_gives_the_frame_and_the_text():
    """traceback cannot describe the chain: the text is the exception's own
    traceback, its first line still names the frame, and every traceback of
    the chain is dropped all the same."""
    try:
        try:
            raise _BadNotes("inner")
        except _BadNotes as inner:
            raise ValueError("outer") from inner
    except ValueError as exc:
        line = sys._getframe().f_lineno - 2
        text, outer = thread_error(exc), exc
    name = sys._getframe().f_code.co_name
    assert text.splitlines()[0] == f"ValueError: outer (in {name}, {__file__}, line {line})"
    assert text.endswith("    raise ValueError(\"outer\") from inner\nValueError: outer\n"), text
    assert outer.__traceback__ is None and outer.__cause__.__traceback__ is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11's")
def test_exception_group_members_drop_their_tracebacks():
    ExceptionGroup = builtins.ExceptionGroup  # Python 3.11+

    def sub(mem):
        view = mem["a"]  # noqa: F841  (a view of thread memory in the frame)
        raise ValueError("inner")

    def fn(mem, i, n):
        errors = []
        try:
            sub(mem)
        except ValueError as e:
            errors.append(e)
        raise ExceptionGroup("g", errors)

    with App("64KiB", backend="threads", workers=1) as app:
        app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(fn, 1)
        group = info.value.__cause__
        assert isinstance(group, ExceptionGroup)
        assert group.exceptions[0].__traceback__ is None


class _StrRaises(Exception):
    def __str__(self):
        raise RuntimeError("no str")


def _raise_kind(mem, i, n, kind):
    mem["a"][i] = 7
    if kind == "str":
        raise _StrRaises()
    if kind == "cycle":
        e = ValueError("cycle")
        e.__cause__ = e
        e.__context__ = e
        raise e
    if kind == "unpicklable":
        raise RuntimeError("a generator", (x for x in range(3)))
    raise {"kbi": KeyboardInterrupt, "exit": SystemExit, "genexit": GeneratorExit}[kind]("k")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,cause", [("str", _StrRaises), ("cycle", ValueError), ("unpicklable", None),
                                        ("kbi", KeyboardInterrupt), ("exit", SystemExit),
                                        ("genexit", GeneratorExit)])
def test_hostile_exceptions_give_worker_error_and_the_next_batch_is_exact(backend, kind, cause):
    with App("64KiB", backend=backend, workers=2) as app:
        a = app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(_raise_kind, 3, args=(kind,))
        err = info.value
        assert err.thread == 0 and err.failed == [0, 1, 2]
        first = str(err).splitlines()[0]
        assert first.startswith("thread 0 of 3 failed: ") and __file__ in first, first
        if cause is None:
            if backend == "processes":
                assert err.__cause__ is None and "could not be sent back" in str(err)
        else:
            assert isinstance(err.__cause__, cause)
        assert list(a) == [0, 0, 0, 0]
        assert app.parallel(_ok, 3) == [0, 1, 2] and list(a) == [1, 1, 1, 0]


def _some_fail(mem, i, n):
    mem["a"][i] = 5
    if i in (2, 3):
        raise ValueError(f"thread {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_failures_report_the_lowest_index(backend):
    with App("64KiB", backend=backend, workers=2) as app:
        a = app.alloc("a", 8, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(_some_fail, 5)
        assert info.value.thread == 2 and info.value.failed == [2, 3]
        assert str(info.value.__cause__) == "thread 2"
        assert list(a) == [0] * 8
        app.parallel(_ok, 5)
        assert list(a) == [1] * 5 + [0] * 3


# ---- malformed replies from a worker process ------------------------------------------------


def _send_stop_as_reply(mem, i, n):
    data = pickle.dumps((0, ()))  # a Stop: a message of the parent's, not a reply
    os.write(int(sys.argv[1]), struct.pack("!i", len(data)) + data)  # the worker's socket
    time.sleep(0.3)


def _truncated_then_die(mem, i, n):
    os.write(int(sys.argv[1]), struct.pack("!i", 1000) + b"x" * 10)
    os._exit(9)


def test_a_reply_of_the_wrong_message_type():
    with App("64KiB", backend="processes", workers=1) as app:
        a = app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError, match=r"thread 0 of 1 failed: worker process 0 \(pid \d+\) sent a "
                           r"malformed reply while running thread 0 \(.*a Stop is not expected here"):
            app.parallel(_send_stop_as_reply, 1)
        assert app.parallel(_ok, 2) == [0, 1] and list(a[:2]) == [1, 1]


def test_a_truncated_reply_then_death_replaces_the_worker_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="pagefork"):
        with App("64KiB", backend="processes", workers=1) as app:
            a = app.alloc("a", 4, np.int64)
            with pytest.raises(WorkerError, match="died while running thread 0"):
                app.parallel(_truncated_then_die, 1)
            assert app.parallel(_ok, 2) == [0, 1] and list(a[:2]) == [1, 1]
    text = caplog.text
    assert "was lost" in text and text.count("started (pid") == 2


_PRELUDE = """
import os, sys, struct, time, logging, numpy as np
from pagefork import App, WorkerError
"""


def test_a_stuck_half_sent_reply_is_ended_by_the_timeout_ctrl_c_and_close():
    """A worker that sent part of a reply and hangs blocks the batch thread
    in a read: the caller's thread kills it once the cancelled batch has not
    let go within a grace, and the worker is replaced as for any cancel."""
    code = _PRELUDE + """
    import _thread, threading
    def half(mem, i, n):
        os.write(int(sys.argv[1]), struct.pack("!i", 1000) + b"x" * 10)
        time.sleep(3600)
    with App("64KiB", backend="processes", workers=1) as app:
        app.alloc("a", 4, np.int64)
        app.parallel(lambda mem, i, n: i, 1)  # the worker is up: the half frame is sent within the timeout
        try:
            app.parallel(half, 1, timeout=1.0)
        except TimeoutError:
            print("timed out", app.parallel(lambda mem, i, n: i, 2))
        try:
            threading.Timer(1.0, _thread.interrupt_main).start()
            app.parallel(half, 1)
        except KeyboardInterrupt:
            print("interrupted", app.parallel(lambda mem, i, n: i, 2))
        stuck = threading.Thread(target=app.parallel, args=(half, 1), daemon=True)
        stuck.start()
        time.sleep(1.0)
        try:
            app.close(timeout=0.5)
        except Exception as e:
            print("close raised", repr(e))
        stuck.join(30)
        print("closed", not stuck.is_alive())
    """
    try:
        done = _run_script(code.replace("\n    ", "\n"), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("app.parallel or close still running after 60 s")
    assert done.stdout.splitlines() == ["timed out [0, 1]", "interrupted [0, 1]", "closed True"], \
        done.stdout + done.stderr


# ---- the pagefork logger -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_on_stderr_by_default(backend):
    code = _PRELUDE + f"""
def boom(mem, i, n):
    raise ValueError("x")
with App("64KiB", backend="{backend}", workers=2) as app:
    a = app.alloc("a", 4, np.int64)
    app.parallel(lambda mem, i, n: mem["a"].__setitem__(i, 1), 3)
    try:
        app.parallel(boom, 2)
    except WorkerError:
        pass
    print(a.tolist())
"""
    done = _run_script(code, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[1, 1, 1, 0]"
    assert done.stderr == ""


def test_a_raising_handler_never_leaves_a_merged_batch_reported_as_failed():
    class Raises(logging.Handler):
        def emit(self, record):
            if "merged" in record.getMessage():
                raise RuntimeError("handler broke")

    logger = logging.getLogger("pagefork")
    handler, level = Raises(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with App("64KiB", backend="threads", workers=1) as app:
            a = app.alloc("a", 4, np.int64)
            assert app.parallel(_ok, 2) == [0, 1] and list(a[:2]) == [1, 1]  # the handler's error is lost
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_raising_filter_loses_its_records_only_and_records_name_their_caller():
    """A filter that raises loses the records it sees (logging would let
    its error out of app.parallel); the other records name pagefork's line
    that logged them, not the logger's wrapper."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    def refuse(record):
        if "starts" in record.getMessage():
            raise RuntimeError("filter broke")
        return True

    logger = logging.getLogger("pagefork")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.addFilter(refuse)
    logger.setLevel(logging.DEBUG)
    try:
        with App("64KiB", backend="threads", workers=1) as app:
            a = app.alloc("a", 4, np.int64)
            assert app.parallel(_ok, 2) == [0, 1] and list(a[:2]) == [1, 1]
    finally:
        logger.removeFilter(refuse)
        logger.removeHandler(handler)
        logger.setLevel(level)
    done = [r for r in seen if r.getMessage().startswith("batch: threads done")]
    assert not [r for r in seen if "starts" in r.getMessage()] and len(done) == 1
    assert done[0].pathname.endswith(os.path.join("pagefork", "executor.py")) and done[0].funcName == "_batch"


def test_a_handler_calling_into_the_app_is_refused_not_deadlocked():
    code = _PRELUDE + """
app = App("64KiB", backend="threads", workers=1)
app.alloc("a", 4, np.int64)
class Calls(logging.Handler):
    def emit(self, record):
        if "starts" in record.getMessage() and not getattr(self, "busy", False):
            self.busy = True
            try:
                app.parallel(lambda mem, i, n: i, 1)
            except Exception as e:
                print("refused", type(e).__name__)
logging.getLogger("pagefork").addHandler(Calls())
logging.getLogger("pagefork").setLevel(logging.DEBUG)
print(app.parallel(lambda mem, i, n: i, 2))
sys.stdout.flush()  # os._exit skips it
os._exit(0)
"""
    try:
        done = _run_script(code, timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlocked: a handler called app.parallel on the batch thread")
    assert done.stdout.splitlines() == ["refused PageforkError", "[0, 1]"], done.stdout + done.stderr


# ---- a cause holding a view of the thread's memory ------------------------------------------


def _raise_view(mem, i, n):
    mem["a"][:] = 3
    raise ValueError(mem["a"])  # the cause holds a view of this thread's memory (threads backend)


def _fill(mem, i, n, value):
    mem["a"][:] = value


def test_a_cause_holding_thread_memory_never_reaches_a_later_batch():
    with App("64KiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(_raise_view, 1)
        view = info.value.__cause__.args[0]
        assert view.tolist() == [3, 3, 3, 3] and not np.shares_memory(view, a)
        app.parallel(_fill, 1, args=(9,))
        assert view.tolist() == [3, 3, 3, 3] and a.tolist() == [9] * 4  # not reused by the next thread
        view[:] = 123  # writes after its thread ended reach nothing
        app.parallel(_fill, 1, args=(10,))
        assert a.tolist() == [10] * 4
        app.parallel(lambda mem, i, n: None, 1)
        assert a.tolist() == [10] * 4


# ---- Dask -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


def test_dask_first_line_names_the_file_of_a_closure_helper(dask_client):
    def helper():
        raise ValueError("closure")

    def via_closure(mem, i, n):
        helper()

    with App("64KiB", backend="dask", client=dask_client) as app:
        app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(via_closure, 1)
        first = str(info.value).splitlines()[0]
        assert "<dynamic-code>" not in first and __file__ in first, first


def test_dask_unpickling_that_raises_keyboardinterrupt_on_the_client(dask_client):
    class Hostile(Exception):
        def __reduce__(self):
            return (_kbi, ())

    def fn(mem, i, n):
        raise Hostile()

    with App("64KiB", backend="dask", client=dask_client) as app:
        app.alloc("a", 4, np.int64)
        try:
            app.parallel(fn, 1)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt from unpickling the thread's exception")
        except WorkerError:
            pass


def _sleep_forever(mem, i, n):
    if i == 0:
        time.sleep(3600)
    mem["a"][i] = 1


def test_timeout_kills_a_stuck_worker_logs_it_and_the_next_batch_is_exact(caplog):
    with caplog.at_level(logging.INFO, logger="pagefork"):
        with App("64KiB", backend="processes", workers=2) as app:
            a = app.alloc("a", 4, np.int64)
            app.parallel(_ok, 2)  # both workers up
            with pytest.raises(TimeoutError):
                app.parallel(_sleep_forever, 2, timeout=0.5)
            assert a.tolist() == [1, 1, 0, 0]
            assert app.parallel(_ok, 2) == [0, 1] and a.tolist() == [2, 2, 0, 0]
    assert "is killed: its batch was cancelled" in caplog.text


def _pid(mem, i, n):
    return os.getpid()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_raising_handler_never_keeps_a_cancelled_worker_alive():
    class Raises(logging.Handler):
        def emit(self, record):
            if "is killed" in record.getMessage():
                raise RuntimeError("handler broke")

    logger = logging.getLogger("pagefork")
    handler, level = Raises(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    pid = None
    try:
        with App("64KiB", backend="processes", workers=1) as app:
            app.alloc("a", 4, np.int64)
            pid = app.parallel(_pid, 1)[0]
            with pytest.raises(TimeoutError):  # never the handler's error
                app.parallel(_sleep_forever, 1, timeout=0.5)
            deadline = time.monotonic() + 10  # (killed before TimeoutError is raised: this is slack)
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pid), "the cancelled batch's worker still runs"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        if pid is not None and _alive(pid):
            os.kill(pid, 9)  # the worker this test started


def test_main_helpers_two_calls_deep_name_the_script(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from pagefork import App, WorkerError

        def deep(i):
            raise ValueError("deep")

        def middle(i):
            deep(i)

        def work(mem, i, n):
            middle(i)

        with App("64KiB", backend="processes", workers=1) as app:
            app.alloc("a", 4, np.int64)
            try:
                app.parallel(work, 1)
            except WorkerError as e:
                print(str(e).splitlines()[0])
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith(f"(in deep, {script}, line 6)"), done.stdout + done.stderr


def _add_then_maybe_fail(mem, i, n, fail):
    mem["h"][:] += 1
    mem["a"][i] = i + 1
    if i in fail:
        raise ValueError(f"thread {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_combining_batch_leaves_nothing_for_the_next(backend):
    with App("64KiB", backend=backend, workers=1) as app:
        a = app.alloc("a", 8, np.int64)
        h = app.alloc("h", 4, np.int64, merge="sum")
        with pytest.raises(WorkerError) as info:
            app.parallel(_add_then_maybe_fail, 4, args=((1, 3),))
        assert info.value.failed == [1, 3] and info.value.thread == 1
        assert h.tolist() == [0] * 4 and a.tolist() == [0] * 8
        app.parallel(_add_then_maybe_fail, 4, args=((),))
        assert h.tolist() == [4] * 4 and a.tolist() == [1, 2, 3, 4, 0, 0, 0, 0]
