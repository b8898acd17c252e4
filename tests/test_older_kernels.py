"""Older kernels, acted out: the native core hides userfaultfd features or
PAGEMAP_SCAN, and each mode must fall back or explain precisely. Each case
runs in a fresh interpreter (descriptors and probes are per process)."""

from __future__ import annotations

import pytest

import pagefork
from pagefork import _native

from support import run_python


def run(code: str) -> str:
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(autouse=True)
def needs_userfaultfd():
    if not pagefork.probe()["uffd"].available:
        pytest.skip(pagefork.probe()["uffd"].reason)


def test_uffd_without_wp_unpopulated_populates_first():
    """Linux 5.7-6.3: no WP_UNPOPULATED; never-touched pages must still count."""
    out = run(f"""
        import numpy as np, pagefork
        from pagefork import _native
        _native._set_uffd_feature_mask(~{_native.UFFD_FEATURE_WP_UNPOPULATED})
        support = pagefork.probe()
        print(support["uffd"].available, support["uffd-async"].reason)
        for kind in (dict(), dict(shared=True), dict(backing="memfd")):
            with pagefork.Region(16 * pagefork.PAGE_SIZE, **kind) as r:
                t = pagefork.tracker("uffd")
                t.start(r)
                r.array(np.uint8)[[0, 5 * pagefork.PAGE_SIZE, 15 * pagefork.PAGE_SIZE]] = 1
                print(np.flatnonzero(t.dirty_pages(r)).tolist())
                t.close()
    """)
    lines = out.splitlines()
    assert lines[0].startswith("True") and "UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4)" in lines[0]
    assert lines[1:] == ["[0, 5, 15]"] * 3


def test_without_wp_async_auto_falls_back():
    out = run(f"""
        import pagefork
        from pagefork import _native
        _native._set_uffd_feature_mask(~{_native.UFFD_FEATURE_WP_ASYNC})
        print(pagefork.probe()["uffd-async"].reason)
        print(pagefork.tracker().mode)
        try:
            pagefork.tracker("uffd-async")
        except pagefork.UnsupportedModeError as exc:
            print("refused:", exc.reason)
    """)
    reason, auto, refused = out.splitlines()
    assert reason.endswith("lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7)")
    assert auto in ("uffd", "segfault")
    assert refused == "refused: " + reason


def test_without_thread_id_uffd_is_unavailable():
    out = run(f"""
        import pagefork
        from pagefork import _native
        _native._set_uffd_feature_mask(~{_native.UFFD_FEATURE_THREAD_ID})
        print(pagefork.probe()["uffd"].reason)
    """)
    assert "UFFD_FEATURE_THREAD_ID (Linux 4.14)" in out


def test_without_pagemap_scan():
    """Before Linux 6.7: uffd-async is unavailable, cow reads /proc/self/pagemap."""
    out = run("""
        import numpy as np, pagefork
        from pagefork import _native
        _native._set_pagemap_scan(False)
        support = pagefork.probe()
        print(support["uffd-async"].reason)
        print(support["cow"].available)
        with pagefork.Snapshot(size=8 * pagefork.PAGE_SIZE) as s, pagefork.Region(8 * pagefork.PAGE_SIZE) as r:
            s.map_to(r)
            t = pagefork.tracker("cow")
            t.start(r)
            r.array(np.uint8)[[3 * pagefork.PAGE_SIZE, 7 * pagefork.PAGE_SIZE]] = 1
            print(np.flatnonzero(t.dirty_pages(r)).tolist())
    """)
    reason, cow, dirty = out.splitlines()
    assert "no PAGEMAP_SCAN" in reason and cow == "True" and dirty == "[3, 7]"
