"""WorkerError carries the thread's own exception as ``__cause__`` wherever
it can be rebuilt in the caller (the object itself on the threads backend,
pickled from worker processes), falls back to the text when it cannot, and
its message leads with the user's frame, not pagefork's."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from pagefork import App, WorkerError
from pagefork._thread_errors import thread_error


class Unrebuildable(Exception):
    """Pickles (args and all), but its constructor refuses what pickle gives back."""

    def __init__(self, a, b):
        super().__init__(a)


def _fail(mem, i, n, how):
    mem["a"][i] = 1
    if i == 1:
        if how == "key":
            return {}["missing"]  # the line the first line of the message names
        if how == "lock":
            raise RuntimeError("holds a lock", threading.Lock())
        raise Unrebuildable("half", "made")
    return None


_KEY_LINE = _fail.__code__.co_firstlineno + 4


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_the_cause_is_the_threads_exception(backend):
    """A KeyError, a custom exception of the caller's (sent by value and
    rebuilt as the caller's own class), an unpicklable one and one that
    cannot be rebuilt: each a WorkerError whose first line names the user's
    frame; ``__cause__`` is the exception wherever it can be rebuilt here."""

    class Custom(Exception):  # local: travels by value, and comes back as this very class
        def __init__(self, code):
            super().__init__(code)
            self.code = code

    def custom(mem, i, n):
        if i == 0:
            raise Custom(7)

    with App("64KiB", backend=backend, workers=2) as app:
        a = app.alloc("a", 4, np.int64)
        with pytest.raises(WorkerError) as info:
            app.parallel(_fail, 3, args=("key",))
        err = info.value
        assert str(err).splitlines()[0] == (f"thread 1 of 3 failed: KeyError: 'missing' "
                                            f"(in _fail, {__file__}, line {_KEY_LINE})")
        assert type(err.__cause__) is KeyError and err.__cause__.args == ("missing",)
        assert err.__cause__.__traceback__ is None  # frames would keep the thread's memory: the text has it
        assert err.traceback.splitlines()[1:3] == ["Traceback (most recent call last):",
                                                   f'  File "{__file__}", line {_KEY_LINE}, in _fail']
        assert a.tolist() == [0, 0, 0, 0]  # nothing merged

        with pytest.raises(WorkerError) as info:
            app.parallel(custom, 2)
        assert type(info.value.__cause__) is Custom and info.value.__cause__.code == 7
        # Sent by value (cloudpickle drops its file name): the worker puts the name back.
        line = custom.__code__.co_firstlineno + 2
        assert str(info.value).splitlines()[0].endswith(f"Custom: 7 (in custom, {__file__}, line {line})")
        assert f'File "{__file__}", line {line}, in custom\n    raise Custom(7)' in info.value.traceback

        with pytest.raises(WorkerError) as info:
            app.parallel(_fail, 2, args=("lock",))
        cause, text = info.value.__cause__, str(info.value)
        assert text.startswith("thread 1 of 2 failed: RuntimeError: ('holds a lock', <unlocked _thread.lock")
        if backend == "threads":  # never pickled
            assert type(cause) is RuntimeError and cause.args[0] == "holds a lock"
        else:
            assert cause is None and "the RuntimeError itself could not be sent back" in text

        with pytest.raises(WorkerError) as info:
            app.parallel(_fail, 2, args=("rebuild",))
        cause, text = info.value.__cause__, str(info.value)
        if backend == "threads":
            assert type(cause) is Unrebuildable
        else:
            assert cause is None and "the exception itself could not be rebuilt here" in text
        assert text.startswith("thread 1 of 2 failed: test_worker_errors.Unrebuildable: half (in _fail")
        app.parallel(_fail, 1, args=("key",))  # the App still works
        assert a.tolist() == [1, 0, 0, 0]


def test_the_first_line_names_the_innermost_frame_of_the_users_code():
    """Raised inside Python's library (json) called by the user's helper: the
    first line names the helper's line, not json's."""

    def helper():
        return json.loads("{")

    try:
        helper()
    except json.JSONDecodeError as exc:
        text = thread_error(exc)
        assert exc.__traceback__ is None
    line = helper.__code__.co_firstlineno + 1
    assert text.splitlines()[0].endswith(f"(in helper, {__file__}, line {line})")
    assert text.splitlines()[0].startswith("json.decoder.JSONDecodeError: Expecting property name")
    assert 'json/decoder.py", line' in text  # the whole traceback follows
