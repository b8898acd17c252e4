"""A Snapshot's operations interrupted: KeyboardInterrupt raised at every
line they run (a tracer) and real signals at random instants leave apply,
write, write_queued and write_pages all or nothing."""

from __future__ import annotations

import sys

import numpy as np

import pagefork.diffs
import pagefork.merge
import pagefork.snapshot
from pagefork import DataType, Diff, MergeOp, PAGE_SIZE, Snapshot

from support import run_python


#: Where a Snapshot's operations run: the snapshot itself and the diff and
#: merge-rule code it calls (in snapshot.py alone before the module split).
SNAPSHOT_SOURCES = frozenset(m.__file__ for m in (pagefork.snapshot, pagefork.diffs, pagefork.merge))


class _InterruptAtLine:
    """A tracer that raises KeyboardInterrupt at the k-th line run in
    SNAPSHOT_SOURCES: a Ctrl-C landing between any two statements."""

    def __init__(self, k: int) -> None:
        self.k, self.seen, self.fired = k, 0, False
        self.where = ""  # the file the interrupt landed in

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in SNAPSHOT_SOURCES:
            return None
        if event == "line" and not self.fired:
            self.seen += 1
            if self.seen == self.k:
                self.fired, self.where = True, frame.f_code.co_filename
                raise KeyboardInterrupt
        return self


def _interrupt_everywhere(make, operation, check, landed: set[str] | None = None) -> int:
    """Runs ``operation(make())`` once per line it executes, interrupted at
    that line, and ``check``s the snapshot after each; returns the count.
    ``landed`` collects the files the interrupts landed in."""
    k = 0
    while True:
        k += 1
        snap = make()
        tracer = _InterruptAtLine(k)
        sys.settrace(tracer)
        try:
            operation(snap)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        try:
            check(snap, k)
        finally:
            snap.close()
        if not tracer.fired:
            return k
        if landed is not None:
            landed.add(tracer.where)


BASE = np.int64(1).tobytes() + bytes(8)


SUMS = [Diff(0, np.int64(5).tobytes(), DataType.INT64, MergeOp.SUM), Diff(20, b"grow")]


APPLIED = np.int64(6).tobytes() + bytes(12) + b"grow"


def _ranges(snap):
    return [(d.offset, len(d.data)) for d in snap.tracked_changes()]


def test_apply_interrupted_at_any_line_is_all_or_nothing():
    """Before: a Ctrl-C between growing and the write left the snapshot grown
    (24 bytes) with nothing applied, and the unwritten ranges tracked."""
    def check(snap, k):
        before = (snap.size, snap.read(), _ranges(snap)) == (16, BASE, [])
        after = (snap.size, snap.read(), _ranges(snap)) == (24, APPLIED, [(0, 8), (20, 4)])
        assert before or after, (k, snap.size, snap.read(), _ranges(snap))

    landed: set[str] = set()
    assert _interrupt_everywhere(lambda: Snapshot(BASE, max_size=64), lambda s: s.apply(SUMS),
                                 check, landed) > 20
    # The diff checks apply runs moved to diffs.py: interrupted there too
    assert {pagefork.snapshot.__file__, pagefork.diffs.__file__} <= landed


def test_write_queued_interrupted_at_any_line_neither_drops_nor_repeats():
    """Before: a Ctrl-C just before the write emptied the queue with nothing
    written, so the diffs vanished."""
    def make():
        snap = Snapshot(BASE, max_size=64)
        snap.queue(SUMS)
        return snap

    def check(snap, k):
        assert snap.queued in (0, 2), k
        snap.write_queued()
        assert (snap.size, snap.read(), snap.queued) == (24, APPLIED, 0), k

    assert _interrupt_everywhere(make, lambda s: s.write_queued(), check) > 20


def test_write_interrupted_at_any_line_is_all_or_nothing():
    """Before: a Ctrl-C could leave the snapshot grown but unwritten, or
    written but missing from tracked_changes."""
    def check(snap, k):
        before = (snap.size, snap.read(), _ranges(snap)) == (16, BASE, [])
        after = (snap.size, snap.read(), _ranges(snap)) == (24, BASE[:10] + b"abcdefghijklmn",
                                                              [(10, 14)])
        assert before or after, (k, snap.size, snap.read(), _ranges(snap))

    assert _interrupt_everywhere(lambda: Snapshot(BASE, max_size=64),
                                 lambda s: s.write(b"abcdefghijklmn", 10), check) > 5


def test_write_pages_interrupted_at_any_line_never_hides_a_copied_page():
    memory = bytearray(2 * PAGE_SIZE)
    memory[PAGE_SIZE + 3] = 7
    flags = np.array([False, True])

    def check(snap, k):
        if snap.read(PAGE_SIZE + 3, 1) == b"\x07":
            assert _ranges(snap) == [(PAGE_SIZE, PAGE_SIZE)], k

    _interrupt_everywhere(lambda: Snapshot(size=2 * PAGE_SIZE),
                          lambda s: s.write_pages(memory, flags), check)


_SIGNAL_LOOP = r"""
import random, signal, sys
import numpy as np
from pagefork import DataType, Diff, MergeOp, Snapshot

armed = False


def interrupt(signum, frame):  # a real signal, raised as Ctrl-C while armed
    if armed:
        raise KeyboardInterrupt


signal.signal(signal.SIGALRM, interrupt)
rng = random.Random(int(sys.argv[1]))
base = np.int64(1).tobytes() + bytes(8)
sums = [Diff(0, np.int64(5).tobytes(), DataType.INT64, MergeOp.SUM), Diff(20, b"grow")]
applied = np.int64(6).tobytes() + bytes(12) + b"grow"
interrupted = 0
for _ in range(int(sys.argv[2])):
    snap = Snapshot(base, max_size=64)
    snap.queue(sums)
    kind = rng.randrange(3)
    try:
        try:
            armed = True
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 3e-4))  # one shot
            if kind == 0:
                snap.write_queued()
            elif kind == 1:
                snap.apply(sums)
            else:
                snap.write(b"abcdefghijklmn", 10)
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        interrupted += 1
    state = (snap.size, snap.read(), [(d.offset, len(d.data)) for d in snap.tracked_changes()])
    if kind == 2:
        assert state in [(16, base, []), (24, base[:10] + b"abcdefghijklmn", [(10, 14)])], state
    else:
        assert state in [(16, base, []), (24, applied, [(0, 8), (20, 4)])], state
        if kind == 0:
            assert snap.queued == (0 if state[0] == 24 else 2)
            snap.write_queued()
            assert snap.read() == applied and snap.queued == 0
    snap.close()
print(interrupted)
"""


def test_real_signals_at_random_instants_leave_apply_write_and_queue_all_or_nothing():
    """SIGALRM raised as KeyboardInterrupt at random instants of
    write_queued/apply/write, in a fresh process (its exit status checked)."""
    out = run_python(_SIGNAL_LOOP, "11", "1500", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
