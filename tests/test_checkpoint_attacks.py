"""Hostile-review regressions for checkpoints: one tracker saved to two
targets, crafted manifests and objects (memory bombs), damaged or odd
targets on the CLI, and App chains across growth and interrupted batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, App, CorruptDataError, Region
from pagefork import checkpoint as ck
from pagefork._checkpoint_format import Manifest

ROOT = Path(__file__).resolve().parent.parent


def reset_modes() -> list[str]:
    support = pagefork.probe()
    return [m for m in ("uffd-async", "uffd", "segfault") if support[m].available]


@pytest.mark.parametrize("mode", reset_modes())
def test_one_tracker_saving_to_two_targets_alternately_keeps_both_chains_exact(tmp_path, mode):
    # A save re-arms the tracker: the pages it took for target B must not be
    # missing from target A's next increment.
    a, b = tmp_path / "a", tmp_path / "b"
    region = Region(16 * PAGE_SIZE)
    t = pagefork.tracker(mode)
    t.start(region)
    try:
        data = np.frombuffer(region, np.uint8)
        for step in range(6):
            data[(step % 16) * PAGE_SIZE] = step + 1
            ck.save(region, a if step % 2 == 0 else b, tracker=t)
            data[((step + 5) % 16) * PAGE_SIZE + 7] = 100 + step
        ck.save(region, a, tracker=t)
        ck.save(region, b, tracker=t)
        expected = bytes(memoryview(region))
        for target in (a, b):
            for v in (x.version for x in ck.versions(target)):
                loaded = ck.load(target, version=v)
                loaded.close()
            loaded = ck.load(target)
            try:
                assert bytes(memoryview(loaded)) == expected, target
            finally:
                loaded.close()
    finally:
        t.stop(region)
        region.close()
