"""What a backend hands the executor (batch.Backend.run): a BatchResult
holding each thread's outcome, and apart from them what belongs to the
batch (the diffs a worker combined from several threads, bytes shipped).
Each backend is driven directly, on a snapshot of its own. And the named
messages a worker process and its parent exchange (backends/_messages.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pagefork.backends import _messages as messages
from pagefork.backends import make_backend
from pagefork.batch import BatchResult, BatchSpec, Cancel, thread_tracking_mode
from pagefork.layout import Allocation
from pagefork.merge import MergeOp
from pagefork.snapshot import Snapshot


def _add_and_mark(mem, i, n):
    mem["s"][:] += i + 1
    mem["o"][i] = 7
    return i * 10


@pytest.mark.parametrize("name", ["threads", "processes"])
def test_combined_diffs_and_bytes_shipped_belong_to_the_batch(name):
    """Two threads on one worker: their int64 sums combine into one batch
    level diff, their overwrites stay with each thread, and the bytes
    shipped are the batch's (none for threads, which ship nothing)."""
    snap = Snapshot(size=1 << 16)
    layout = {"s": Allocation("s", 0, (4,), "int64", MergeOp.SUM),
              "o": Allocation("o", 64, (4,), "int64", MergeOp.OVERWRITE)}
    for a in layout.values():
        snap.add_merge_region(a.offset, a.nbytes, a.merge_dtype, a.merge)
    snap.fill_gaps(MergeOp.OVERWRITE)
    spec = BatchSpec(_add_and_mark, 2, (), snap, layout, snap.merge_regions, thread_tracking_mode(), 0)
    backend = make_backend(name, 1)
    try:
        ran = backend.run(spec, [0, 0], Cancel())
        assert isinstance(ran, BatchResult)
        assert [(o.index, o.result, o.error) for o in ran.outcomes] == [(0, 0, None), (1, 10, None)]
        assert len(ran.combined) == 1 and set(ran.combined[0].ops.tolist()) == {int(MergeOp.SUM)}
        assert all(not (o.diffs.offsets < 32).any() for o in ran.outcomes)  # the sums travel combined only
        assert (ran.bytes_shipped > 0) == (name == "processes")
        for batch in [*(o.diffs for o in ran.outcomes), *ran.combined]:
            snap.apply(batch)
        with snap.view() as view:
            values = np.frombuffer(view, np.int64, 12).tolist()
        assert values[:4] == [3] * 4 and values[8:12] == [7, 7, 0, 0]
    finally:
        backend.close(5.0)
        snap.close()


def test_worker_messages_round_trip_as_their_own_types():
    """Each message a worker's socket carries comes back equal and of its
    type (a nested ShippedDiffs too); anything else is a ValueError."""
    sent = [messages.Stop(), messages.Prepare(["/a", ""], None), messages.AttachSnapshot(8192, 1 << 20),
            messages.AttachReplies(),
            messages.RunBatch(3, 2, 8192, 4, b"fn", b"args", {}, [], "cow", [0, 2], {("f", 1): "/x.py"}),
            messages.ThreadReply(2, b"result", 5, None, messages.ShippedDiffs((1, b"t"), None, 64, 9), 3),
            messages.ThreadReply(1, None, 0, "boom", messages.NO_DIFFS, 3, b"exception"),
            messages.GroupEnd(3, None, messages.ShippedDiffs((2, b"tt"), b"inline"))]
    for message in sent:
        back = messages.loads(messages.dumps(message))
        assert back == message and type(back) is type(message)
        assert type(getattr(back, "diffs", messages.NO_DIFFS)) is messages.ShippedDiffs
    for bad in [b"", b"not a pickle", messages.pickle.dumps((99, ())), messages.pickle.dumps(("x", (1,))),
                messages.pickle.dumps((5, (1, 2)))]:
        with pytest.raises(ValueError, match="not a pagefork worker message"):
            messages.loads(bad)
