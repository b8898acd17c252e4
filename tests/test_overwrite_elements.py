"""OVERWRITE at element granularity in typed regions (issue 19): the native
diff against tests/reference.py, merges of several threads in thread order,
and what it means for an App's overwrite arrays (the merged values, conflict
detection, and why runs never reach across an unchanged element)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefork import (PAGE_SIZE, App, ConflictError, DataType, Diff, DiffBatch, MergeError, MergeOp,
                      MergeRegion, Snapshot)

import reference

WIDE = [DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32, DataType.FLOAT32,
        DataType.INT64, DataType.UINT64, DataType.FLOAT64]


def diffs_of(batch: DiffBatch) -> list[tuple[int, bytes, DataType]]:
    return [(d.offset, d.data, d.dtype) for d in batch]


def snapshot_of(orig: bytes, regions: list[MergeRegion]) -> Snapshot:
    s = Snapshot(orig, max_size=len(orig) + PAGE_SIZE)
    for r in regions:
        s.add_merge_region(r.offset, r.length, r.dtype, r.op)
    return s


# ---- the diff ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", WIDE, ids=lambda t: t.name)
def test_a_changed_element_is_carried_whole_and_runs_join_changed_elements(dtype):
    k = dtype.itemsize
    orig = np.arange(1, 601, dtype=np.uint8).tobytes()[:600 // k * k]
    mem = bytearray(orig)
    mem[3 * k] ^= 0xFF             # one byte of element 3
    for e in (10, 11, 12):         # three neighbours, each changed in its last byte only
        mem[e * k + k - 1] ^= 1
    mem[20 * k] ^= 1               # elements 20 and 22 with 21 unchanged between them
    mem[22 * k + 1] ^= 1
    with snapshot_of(orig, [MergeRegion(0, 0, dtype, MergeOp.OVERWRITE)]) as s:
        got = diffs_of(s.diff(bytes(mem), np.ones(1, bool)))
    m = bytes(mem)
    assert got == [(3 * k, m[3 * k:4 * k], dtype), (10 * k, m[10 * k:13 * k], dtype),
                   (20 * k, m[20 * k:21 * k], dtype), (22 * k, m[22 * k:23 * k], dtype)]


def test_floats_sharing_sign_and_exponent_bytes_make_one_run():
    """A Jacobi-like rewrite: every value changes a little; byte runs would
    split at the unchanged high bytes of each value, elements do not."""
    orig = np.linspace(1.0, 1.5, 4096)
    new = orig * (1 + 1e-9)
    assert (new.view(np.uint8).reshape(-1, 8)[:, 7] == orig.view(np.uint8).reshape(-1, 8)[:, 7]).all()
    dirty = np.ones(orig.nbytes // PAGE_SIZE, bool)
    with snapshot_of(orig.tobytes(), [MergeRegion(0, 0, DataType.FLOAT64, MergeOp.OVERWRITE)]) as s:
        batch = s.diff(new.tobytes(), dirty)
        assert len(batch) == 1 and batch[0] == Diff(0, new.tobytes(), DataType.FLOAT64)
        raw = s.diff(new.tobytes(), dirty, regions=[MergeRegion(0, 0)])
        assert len(raw) > 4000  # byte-exact, for comparison: about one run per value
        s.apply(batch)
        assert s.read() == new.tobytes()


def test_nan_and_signed_zero_compare_bitwise():
    orig = np.array([np.nan, 0.0, 1.0, 2.0])
    new = orig.copy()
    new[1] = -0.0  # equal as floats, a different value in memory
    with snapshot_of(orig.tobytes(), [MergeRegion(0, 0, DataType.FLOAT64, MergeOp.OVERWRITE)]) as s:
        assert diffs_of(s.diff(new.tobytes(), np.ones(1, bool))) == [(8, new[1:2].tobytes(), DataType.FLOAT64)]


@pytest.mark.parametrize("dtype", [DataType.RAW, DataType.UINT8, DataType.INT8, DataType.BOOL],
                         ids=lambda t: t.name)
def test_raw_and_one_byte_regions_keep_byte_runs(dtype):
    orig = bytes(64)
    mem = bytearray(orig)
    mem[1] = mem[3] = mem[4] = 1
    with snapshot_of(orig, [MergeRegion(0, 0, dtype, MergeOp.OVERWRITE)]) as s:
        assert diffs_of(s.diff(bytes(mem), np.ones(1, bool))) == [(1, b"\x01", dtype), (3, b"\x01\x01", dtype)]


def test_bytes_after_the_last_whole_value_are_byte_runs():
    """A typed OVERWRITE region need not be whole values (20 bytes of int64)."""
    orig = bytes(40)
    mem = bytearray(orig)
    mem[9] = 7    # element 1 of [0, 16): whole
    mem[16] = 1   # tail [16, 20): byte runs
    mem[18] = 2
    mem[21] = 3   # past the region: RAW gap
    regions = [MergeRegion(0, 20, DataType.INT64, MergeOp.OVERWRITE)]
    with snapshot_of(orig, regions) as s:
        s.fill_gaps()
        got = diffs_of(s.diff(bytes(mem), np.ones(1, bool)))
    m = bytes(mem)
    assert got == [(8, m[8:16], DataType.INT64), (16, b"\x01", DataType.INT64), (18, b"\x02", DataType.INT64),
                   (21, b"\x03", DataType.RAW)]


def test_an_element_straddling_a_dirty_range_edge_is_compared_whole():
    """Values counted from a region start that is not page aligned: the
    value across the end of a dirty page is compared (and carried) whole,
    as typed diffs always did; the clean page after it is not diffed."""
    orig = bytes(3 * PAGE_SIZE)
    mem = bytearray(orig)
    edge = PAGE_SIZE - 4  # the value at [PAGE_SIZE - 4, PAGE_SIZE + 4) from a region at 4
    mem[edge] = 1
    mem[PAGE_SIZE + 100] = 2  # on page 1, which is not dirty: ignored
    regions = [MergeRegion(4, 3 * PAGE_SIZE - 8, DataType.INT64, MergeOp.OVERWRITE)]
    dirty = np.array([True, False, False])
    with snapshot_of(orig, regions) as s:
        got = diffs_of(s.diff(bytes(mem), dirty))
    assert got == [(edge, bytes(mem[edge:edge + 8]), DataType.INT64)]
    assert got == [(d.offset, d.data, d.dtype) for d in reference.diff(orig, bytes(mem), dirty, regions)]


# ---- several threads merged in order, against the reference ------------------------


PAIRS = [(t, MergeOp.OVERWRITE) for t in [DataType.RAW, DataType.UINT8, *WIDE]] + [
    (DataType.INT32, MergeOp.SUM), (DataType.FLOAT64, MergeOp.MAX), (DataType.INT16, MergeOp.XOR)]


@st.composite
def thread_writes(draw):
    """(orig, regions, [(mem, dirty) per thread]): threads writing from one
    snapshot, often to the same values and to neighbouring bytes."""
    n_pages = draw(st.integers(1, 3))
    size = n_pages * PAGE_SIZE - draw(st.sampled_from([0, 0, 12]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    orig = rng.integers(0, 4, size, dtype=np.uint8)  # few distinct bytes: many equal ones
    cuts = sorted(draw(st.lists(st.integers(0, size // 8), min_size=2, max_size=8, unique=True)))
    regions = []
    for a, b in zip(cuts[::2], cuts[1::2]):
        dtype, op = draw(st.sampled_from(PAIRS))
        start, length = a * 8, (b - a) * 8
        if op is MergeOp.OVERWRITE and draw(st.booleans()):
            length -= draw(st.integers(0, 7))  # a typed OVERWRITE region need not be whole values
        regions.append(MergeRegion(start, length, dtype, op))
    hot = rng.integers(0, size, 8)  # places several threads write
    threads = []
    for _ in range(draw(st.integers(1, 4))):
        mem = orig.copy()
        at = np.concatenate([rng.integers(0, size, draw(st.integers(0, 30))),
                             hot[rng.random(8) < 0.5] + rng.integers(0, 3, 1)])
        at = at[at < size]
        mem[at] = rng.integers(0, 4, at.size, dtype=np.uint8)
        for _ in range(draw(st.integers(0, 2))):  # a rewritten stretch
            a = int(rng.integers(0, size))
            b = min(size, a + int(rng.integers(1, 200)))
            mem[a:b] = rng.integers(0, 4, b - a, dtype=np.uint8)
        n_dirty = -(-size // PAGE_SIZE)
        dirty = np.array(draw(st.lists(st.booleans(), min_size=n_dirty, max_size=n_dirty)))
        threads.append((mem.tobytes(), dirty))
    return orig.tobytes(), regions, threads


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=150)
@given(thread_writes())
def test_threads_merged_in_order_match_the_reference(case):
    """Every thread's diff equals the reference's, and merging them in
    thread order gives exactly the reference's bytes."""
    orig, regions, threads = case
    with snapshot_of(orig, regions) as s:
        s.fill_gaps()
        wanted, got = [], []
        for mem, dirty in threads:
            want = reference.diff(orig, mem, dirty, s.merge_regions)
            batch = s.diff(mem, dirty)
            assert [(d.offset, d.data, d.dtype, d.op) for d in batch] == \
                [(d.offset, d.data, d.dtype, d.op) for d in want]
            wanted += want
            got.append(batch)
        try:
            expected = reference.apply(orig, wanted)
        except MergeError:  # pragma: no cover - no PRODUCT here
            raise
        s.apply_batches(got)
        merged = s.read()
    if merged != expected:  # MAX over NaNs may differ only in NaN payloads
        a, b = np.frombuffer(merged, np.uint8), np.frombuffer(expected, np.uint8)
        for r in regions:
            if r.op is MergeOp.MAX:
                span = slice(r.offset, r.offset + r.length)
                x, y = a[span].view(np.float64), b[span].view(np.float64)
                assert np.array_equal(x, y, equal_nan=True)
                a, b = a.copy(), b.copy()
                a[r.offset:r.offset + r.length] = b[r.offset:r.offset + r.length]
        assert bytes(a) == bytes(b)


# ---- an App's overwrite arrays -------------------------------------------------------


@pytest.fixture(params=["threads", "processes"])
def backend(request) -> str:
    return request.param


def _one_element(mem, i, n):
    mem["a"][3] = 1.5 if i == 0 else -1.0


def test_threads_writing_one_float_merge_as_the_later_value_never_a_mix(backend):
    """1.0 -> 1.5 changes byte 6, 1.0 -> -1.0 byte 7: merged byte by byte
    that was -1.5, a value no thread wrote."""
    with App("1MiB", backend=backend, workers=2) as app:
        a = app.alloc("a", 8, np.float64)
        a[:] = 1.0
        app.parallel(_one_element, 2)
        assert a[3] == -1.0 and (np.delete(a, 3) == 1.0).all()
        assert app.last_batch.diffs == 2 and app.last_batch.diff_bytes == 16


def _bytes_of_one_element(mem, i, n):
    mem["a"].view(np.uint8)[8 * 2 + (0 if i == 0 else 7)] ^= 0x10


def test_different_bytes_of_one_element_conflict(backend):
    with App("1MiB", backend=backend, workers=2, detect_conflicts=True) as app:
        a = app.alloc("a", 8, np.int64)
        with pytest.raises(ConflictError, match=r"threads 0 and 1 wrote different bytes to \[\d+, \d+\)"):
            app.parallel(_bytes_of_one_element, 2)
        assert (a == 0).all()
    with App("1MiB", backend=backend, workers=2) as app:  # without detection: the later element wins
        a = app.alloc("a", 8, np.int64)
        app.parallel(_bytes_of_one_element, 2)
        assert a[2] == np.int64(0x10 << 56) and (np.delete(a, 2) == 0).all()


def _same_value(mem, i, n):
    mem["a"][5] = 7.25
    mem["a"][10 + i] = i + 1.0


def test_the_same_value_from_two_threads_is_no_conflict(backend):
    with App("1MiB", backend=backend, workers=2, detect_conflicts=True) as app:
        a = app.alloc("a", 16, np.float64)
        app.parallel(_same_value, 2)
        assert a[5] == 7.25 and a[10] == 1.0 and a[11] == 2.0


def _around(mem, i, n):
    if i == 0:
        mem["a"][5] = 50
    else:
        mem["a"][4] = 40
        mem["a"][6] = 60


def test_an_earlier_threads_value_between_a_later_threads_values_is_kept(backend):
    """Why runs never reach across an unchanged element: thread 1's run
    over [4, 7) would carry element 5's old value over thread 0's."""
    for detect in (False, True):
        with App("1MiB", backend=backend, workers=2, detect_conflicts=detect) as app:
            a = app.alloc("a", 16, np.int32)
            app.parallel(_around, 2)
            assert list(a[3:8]) == [0, 40, 50, 60, 0]
            assert app.last_batch.diffs == 3


def _complex_parts(mem, i, n):
    if i == 0:
        mem["c"].real[2] = 1.0
    else:
        mem["c"].imag[2] = 2.0


def _record_fields(mem, i, n):
    mem["r"]["x" if i == 0 else "y"][1] = i + 10


def test_complex_parts_and_record_fields_are_separate_locations(backend):
    with App("1MiB", backend=backend, workers=2, detect_conflicts=True) as app:
        c = app.alloc("c", 4, np.complex128)
        r = app.alloc("r", 4, np.dtype([("x", np.int32), ("y", np.int32)]))
        app.parallel(_complex_parts, 2)
        app.parallel(_record_fields, 2)
        assert c[2] == 1 + 2j and (r["x"] == [0, 10, 0, 0]).all() and (r["y"] == [0, 11, 0, 0]).all()


def _jacobi(mem, i, n):
    g, out = mem["g"], mem["out"]
    inner = g.shape[0] - 2
    r0, r1 = 1 + inner * i // n, 1 + inner * (i + 1) // n
    out[r0:r1, 1:-1] = 0.25 * (g[r0 - 1:r1 - 1, 1:-1] + g[r0 + 1:r1 + 1, 1:-1] + g[r0:r1, :-2] + g[r0:r1, 2:])


def test_a_jacobi_step_is_one_diff_per_row_and_exact(backend):
    n = 130
    init = np.random.default_rng(4).random((n, n))
    with App("1MiB", backend=backend, workers=2) as app:
        g, out = app.alloc("g", (n, n)), app.alloc("out", (n, n))
        g[:] = out[:] = init
        sg, sout = init.copy(), init.copy()
        for _ in range(3):
            app.parallel(_jacobi, 4)
            assert app.last_batch.diffs == n - 2  # one run of 128 values per interior row
            g[:] = out
            sout[1:-1, 1:-1] = 0.25 * (sg[:-2, 1:-1] + sg[2:, 1:-1] + sg[1:-1, :-2] + sg[1:-1, 2:])
            sg[:] = sout
        assert np.array_equal(g, sg) and np.array_equal(out, sout)
