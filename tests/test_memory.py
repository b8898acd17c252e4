"""Region: sizes, buffer protocol, numpy views, in-place resize, close."""

from __future__ import annotations

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, OutOfBoundsError, PageforkError, Region

from support import KINDS, make_region, vma_flags


def test_page_size_is_the_hosts():
    import mmap

    assert pagefork.PAGE_SIZE == mmap.PAGESIZE


@pytest.mark.parametrize("kind", list(KINDS))
def test_region_basics(kind):
    with make_region(kind, 3) as region:
        assert region.size == 3 * PAGE_SIZE
        assert region.n_pages == 3
        assert region.address % PAGE_SIZE == 0
        assert region.shared == KINDS[kind]["shared"]
        assert not region.closed
        view = memoryview(region)
        assert not view.readonly and len(view) == region.size
        assert bytes(view) == bytes(region.size)  # starts zeroed
        view[5] = 42
        view.release()
        a = region.array(np.int32)
        assert a.shape == (3 * PAGE_SIZE // 4,)
        a[2] = -7
        assert np.frombuffer(region, np.int32)[2] == -7
        assert region.array(np.uint8)[5] == 42
        assert "nh" in vma_flags(region.address)  # MADV_NOHUGEPAGE
        del a
    assert region.closed


def test_sizes_round_up_and_parse():
    with Region(1) as r:
        assert r.size == PAGE_SIZE
    with Region("8KiB", max_size="1MiB") as r:
        assert r.size == 8192 and r.max_size == 1 << 20
    with pytest.raises(ValueError, match="cannot parse"):
        Region("eight pages")
    with pytest.raises(ValueError, match="negative"):
        Region(-1)
    with pytest.raises(ValueError, match="smaller than size"):
        Region(4 * PAGE_SIZE, max_size=PAGE_SIZE)
    with pytest.raises(TypeError):
        Region(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backing"):
        Region(1, backing="disk")  # type: ignore[arg-type]


def test_array_views_and_bounds():
    with Region(2 * PAGE_SIZE) as r:
        m = r.array(np.float64, (4, 4), offset=64)
        m[:] = np.arange(16).reshape(4, 4)
        assert r.array(np.float64, 16, offset=64).tolist() == list(map(float, range(16)))
        with pytest.raises(OutOfBoundsError):
            r.array(np.uint8, 1, offset=2 * PAGE_SIZE)
        with pytest.raises(OutOfBoundsError):
            r.array(np.uint64, PAGE_SIZE)
        with pytest.raises(IndexError):  # OutOfBoundsError is an IndexError
            r.array(np.uint8, offset=-1)
        del m


@pytest.mark.parametrize("kind", list(KINDS))
def test_resize_in_place_keeps_contents(kind):
    with make_region(kind, 2, max_pages=64) as region:
        address = region.address
        a = region.array(np.uint8)
        a[:] = 0xAB
        region.resize(40 * PAGE_SIZE)
        assert region.address == address and region.n_pages == 40
        assert (a == 0xAB).all()  # an old view stays valid
        grown = region.array(np.uint8)
        assert (grown[: 2 * PAGE_SIZE] == 0xAB).all()
        assert not grown[2 * PAGE_SIZE:].any()
        grown[-1] = 1
        del a, grown
        region.resize(PAGE_SIZE)
        assert region.size == PAGE_SIZE and region.address == address
        assert (region.array(np.uint8) == 0xAB).all()
        region.resize(3 * PAGE_SIZE)  # pages dropped by a shrink come back zeroed
        assert bytes(memoryview(region)[PAGE_SIZE:]) == bytes(2 * PAGE_SIZE)
        with pytest.raises(OutOfBoundsError, match="max_size"):
            region.resize(65 * PAGE_SIZE)


def test_shrink_refused_while_views_exist():
    with Region(2 * PAGE_SIZE, max_size=4 * PAGE_SIZE) as r:
        a = r.array()
        with pytest.raises(BufferError):
            r.resize(PAGE_SIZE)
        r.resize(4 * PAGE_SIZE)  # growing is safe
        del a
        r.resize(PAGE_SIZE)


def test_close_with_live_view_defers_unmap():
    r = Region(PAGE_SIZE)
    a = r.array(np.uint8)
    r.close()
    assert r.closed
    a[0] = 9  # still mapped: the view keeps it alive
    assert a[0] == 9
    with pytest.raises(BufferError):
        memoryview(r)
    with pytest.raises(PageforkError, match="closed"):
        r.array()
    with pytest.raises(PageforkError, match="closed"):
        r.resize(PAGE_SIZE)
    r.close()  # idempotent
    del a


def test_shared_memory_is_shared_with_a_child():
    import os

    with Region(PAGE_SIZE, shared=True) as shared, Region(PAGE_SIZE) as private:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            memoryview(shared)[0] = 1
            memoryview(private)[0] = 1
            os._exit(0)
        os.waitpid(pid, 0)
        assert memoryview(shared)[0] == 1
        assert memoryview(private)[0] == 0
