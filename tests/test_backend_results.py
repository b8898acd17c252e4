"""What a backend hands the executor (batch.Backend.run): a BatchResult
holding each thread's outcome, and apart from them what belongs to the
batch (the diffs a worker combined from several threads, bytes shipped).
Each backend is driven directly, on a snapshot of its own."""

from __future__ import annotations

import numpy as np
import pytest

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
