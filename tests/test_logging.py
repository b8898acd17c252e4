"""pagefork's logger, ``logging.getLogger("pagefork")``: nothing reaches
the terminal unless the program configures logging; configured, INFO tells
worker processes started and replaced, DEBUG each batch's phases."""

from __future__ import annotations

import logging
import os
import re
import signal

import numpy as np
import pytest

from pagefork import App, BatchStats, WorkerError


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pagefork" and r.levelno == level]


def _add(mem, i, n):
    mem["a"][:] += 1
    if n == 3:
        raise ValueError("three")


def test_nothing_is_printed_by_default(capfd, monkeypatch):
    """A program that never configured logging: a batch, a failed batch and
    the App's close print nothing (pytest's own handlers taken away)."""
    monkeypatch.setattr(logging.root, "handlers", [])
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("pagefork").handlers)
    with App("64KiB", backend="threads", workers=1) as app:
        app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(_add, 2)
        with pytest.raises(WorkerError):
            app.parallel(_add, 3)
    assert capfd.readouterr() == ("", "")


def test_batch_phases_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="pagefork")
    with App("64KiB", backend="threads", workers=1) as app:
        app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(_add, 2)
        with pytest.raises(WorkerError):
            app.parallel(_add, 3)
    phases = [m for m in _records(caplog, logging.DEBUG) if m.startswith("batch")]
    assert phases[0] == "batch of 2 threads starts on the threads backend"
    assert re.fullmatch(r"batch: threads done in \d+\.\d ms, 0 failed", phases[1])
    assert re.fullmatch(r"batch merged: 2 threads, .*; carry \S+ ms, run \S+ ms, merge \S+ ms, remap \S+ ms",
                        phases[2])
    assert phases[3] == "batch of 3 threads starts on the threads backend"
    assert re.fullmatch(r"batch: threads done in \d+\.\d ms, 3 failed", phases[4]) and len(phases) == 5
    assert not any(m.startswith("batch") for m in _records(caplog, logging.INFO))


def test_the_batch_summary_is_made_only_for_debug(caplog, monkeypatch):
    """Every batch logs its summary at DEBUG: below it, the text is never made."""
    made: list[int] = []
    monkeypatch.setattr(BatchStats, "summary", lambda self: str(made.append(1)))
    caplog.set_level(logging.INFO, logger="pagefork")
    with App("64KiB", backend="threads", workers=1) as app:
        app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(_add, 2)
        assert made == []
        caplog.set_level(logging.DEBUG, logger="pagefork")
        app.parallel(_add, 2)
    assert made and "batch merged: None" in _records(caplog, logging.DEBUG)  # made for each handler


def test_worker_processes_started_and_replaced_at_info(caplog):
    caplog.set_level(logging.INFO, logger="pagefork")
    with App("64KiB", backend="processes", workers=1) as app:
        app.alloc("a", 4, np.int64, merge="sum")
        app.parallel(_add, 1)
        old = app._executor.backend._workers[0].process
        os.kill(old.pid, signal.SIGKILL)
        old.wait(60)
        app.parallel(_add, 1)
        new = app._executor.backend._workers[0].process.pid
        assert app["a"].tolist() == [2] * 4
    info = _records(caplog, logging.INFO)
    assert info.index(f"worker process 0 started (pid {old.pid})") < info.index(
        f"worker process 0 (pid {old.pid}) had ended (exit code -9); starting another") < info.index(
        f"worker process 0 started (pid {new})")
    assert not _records(caplog, logging.DEBUG)  # batch phases only at DEBUG
