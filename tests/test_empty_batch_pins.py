"""Hostile review of the empty batch: the io_uring pin look now runs only
before a window that maps main memory again. A batch that maps nothing again
must still never run threads on a snapshot that misses what a ring wrote
into main memory: registering a buffer is itself a write every mode sees,
so the batch carries it (a window) and refuses."""

from __future__ import annotations

import numpy as np
import pytest

import pagefork
from pagefork import PageforkError
from test_tracking_kernel import DATA, PAGE_SIZE, data_fd, kernel_io, ring  # noqa: F401 (fixtures)


def _seen(mem, i, n):
    return mem["a"].copy()


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("mode", ["cow", "uffd", "uffd-async"])
def test_idle_batch_after_a_pin_on_clean_main_memory_refuses(backend, mode, ring, data_fd):
    if not pagefork.probe()[mode].available:
        pytest.skip(f"{mode} is not available")
    with pagefork.App("64KiB", backend=backend, workers=1, tracking=mode) as app:
        a = app.alloc("a", 4 * PAGE_SIZE, np.uint8)
        a[:] = 1
        app.parallel(_seen, 1)  # carried: main memory maps the snapshot again, unwritten
        app.parallel(_seen, 1)
        address = a.ctypes.data + PAGE_SIZE - a.ctypes.data % PAGE_SIZE
        assert ring.register(address, PAGE_SIZE) == 0
        assert ring.read(data_fd, address, 100, fixed=True) == 100
        try:
            got = app.parallel(_seen, 2)
        except PageforkError as exc:
            assert "io_uring fixed buffers" in str(exc)
        else:  # ran: the threads must have seen the ring's bytes
            off = address - a.ctypes.data
            assert all(bytes(g[off:off + 100]) == DATA[:100] for g in got), "threads saw a stale snapshot"
        finally:
            ring.unregister()
        got = app.parallel(_seen, 2)
        off = address - a.ctypes.data
        assert all(bytes(g[off:off + 100]) == DATA[:100] for g in got)
        assert bytes(a[off:off + 100]) == DATA[:100]
