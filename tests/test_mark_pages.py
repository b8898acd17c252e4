"""_native.mark_pages, which flags the pages a merged batch changed (the
executor's unsaved pages, for checkpoints), against a plain Python loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagefork import PAGE_SIZE, MergeOp
from pagefork import _native

N_PAGES = 12


def expected_flags(offsets, lengths, ops) -> np.ndarray:
    flags = np.zeros(N_PAGES, np.bool_)
    for off, n, op in zip(offsets, lengths, ops):
        if op != MergeOp.IGNORE and n > 0:
            flags[off // PAGE_SIZE: (off + n - 1) // PAGE_SIZE + 1] = True
    return flags


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.integers(0, N_PAGES * PAGE_SIZE - 1), st.integers(0, 3 * PAGE_SIZE),
                          st.sampled_from(list(MergeOp))), max_size=30))
def test_flags_every_page_a_diff_changes(diffs):
    diffs = [(o, min(n, N_PAGES * PAGE_SIZE - o), op) for o, n, op in diffs]
    offsets = np.array([d[0] for d in diffs], np.int64)
    lengths = np.array([d[1] for d in diffs], np.int64)
    ops = np.array([int(d[2]) for d in diffs], np.uint8)
    flags = np.zeros(N_PAGES, np.bool_)
    _native.mark_pages(flags.view(np.uint8), offsets, lengths, ops, PAGE_SIZE)
    assert np.array_equal(flags, expected_flags(offsets, lengths, ops))


@pytest.mark.parametrize("offset, length", [(N_PAGES * PAGE_SIZE - 1, 2), (-8, 8), (2**62, 2**62)])
def test_a_diff_past_the_flags_sets_none(offset, length):
    flags = np.zeros(N_PAGES, np.uint8)
    offsets = np.array([0, offset], np.int64)
    lengths = np.array([8, length], np.int64)
    with pytest.raises(ValueError, match="past the flags"):
        _native.mark_pages(flags, offsets, lengths, np.zeros(2, np.uint8), PAGE_SIZE)
    assert not flags.any()
    _native.mark_pages(flags, offsets, lengths, np.full(2, int(MergeOp.IGNORE), np.uint8), PAGE_SIZE)
    assert not flags.any()  # IGNORE diffs change nothing, wherever they point


def test_malformed_columns_are_refused():
    flags = np.zeros(N_PAGES, np.uint8)
    with pytest.raises(ValueError):
        _native.mark_pages(flags, np.zeros(2, np.int64), np.zeros(3, np.int64), np.zeros(2, np.uint8), PAGE_SIZE)
    with pytest.raises(ValueError):
        _native.mark_pages(flags, np.zeros(1, np.int64), np.ones(1, np.int64), np.zeros(1, np.uint8), 0)
