"""benchmarks/bench_dense.py's workloads at toy sizes: every system runs and
every answer is right (times are never asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagefork.bench.dense import deposit, dense_add, empty_batch, rss_peak, scattered_add, stencil
from pagefork.bench.dense_report import DenseResults, format_results, goals, run_all


def test_every_workload_at_toy_sizes_is_correct():
    workloads = [empty_batch(batches=2, rounds=1), *stencil(n=66, steps=2, rounds=1),
                 scattered_add(1 << 14, rounds=1), dense_add(1 << 14, rounds=1),
                 deposit(1 << 14, 1 << 12, steps=2, rounds=1)]
    rss = rss_peak(4 << 20, 1 << 14, 1 << 10)
    for w in workloads:
        assert w.timings and all(t.correct and len(t.seconds) >= 1 for t in w.timings.values()), w.key
    assert all(row["correct"] and row["diffs"] > 0 and row["peak"] >= row["before"] for row in rss)
    res = DenseResults(workloads, rss)
    text = format_results(res)
    assert "WRONG" not in text and "Goals (issue 19)" in text
    stencil_row = res.get("stencil")
    assert stencil_row is not None and set(stencil_row.timings) == {
        "serial numpy", "ThreadPoolExecutor in place", "pagefork threads", "pagefork processes"}
    assert stencil_row.facts["pagefork threads diffs"] > 0
    texts = [g.text for g in goals(res)]
    assert "stencil: diffs per step, pagefork processes" in texts
    assert "empty batch: pagefork processes / Pool(fork).map" in texts
    assert sum(t.startswith("peak parent RSS") for t in texts) == 2
    with pytest.raises(ValueError, match="only"):
        run_all(only="everything")


def test_cli_refuses_reduce_and_dense_together():
    result = subprocess.run([sys.executable, "-m", "pagefork.cli", "bench", "--reduce", "--dense"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--reduce or --dense, not both" in result.stderr
