"""The command line, run as a user would (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import pagefork

from support import run_cli as run
from support import run_python


def test_doctor_json_schema():
    result = run("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["modes"]) == set(pagefork.MODES)
    for mode, entry in report["modes"].items():
        support = pagefork.probe()[mode]
        assert entry["available"] == support.available
        assert isinstance(entry["reason"], str)
        assert entry["kernel_writes"] is support.kernel_writes
        assert entry["kernel_writes_reason"] == support.kernel_writes_reason
    assert report["auto"] in pagefork.MODES
    assert "vm.unprivileged_userfaultfd" in report["settings"]
    shmem = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
    if os.path.exists(shmem):  # kernels without THP have none
        with open(shmem) as f:
            assert report["settings"]["shmem_hugepage"] == f.read().strip()


def test_doctor_table_and_demo():
    result = run("doctor")
    assert result.returncode == 0 and "auto picks" in result.stdout
    for mode, support in pagefork.probe().items():
        assert mode in result.stdout
        if not support.available:
            assert support.reason.split(":")[0] in result.stdout.replace("\n", " ")
        elif not support.kernel_writes:
            assert f"{mode}: kernel writes into tracked memory fail" in " ".join(result.stdout.split())
    result = run("demo", "--threads", "3")
    assert result.returncode == 0, result.stderr
    assert "check against a serial computation: PASSED" in result.stdout
    assert result.stdout.count(" ok ") == 5


def test_bench_smoke(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run("bench", "--quick", "--sizes", "64KiB", "--batch-sizes", "1MiB", "--json", str(out),
                 "--plot", str(png), "--checkpoint-sizes", "4MiB", "1MiB")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "tracking", "diff", "batches", "checkpoint"}
    assert report["checkpoint"]["size"] == 4 << 20 and report["checkpoint"]["restore_chain"] == 10
    assert report["checkpoint"]["checkpoint_bytes"] < (4 << 20) // 10
    rows = report["tracking"]
    assert {r["mode"] for r in rows} == {m for m, s in pagefork.probe().items() if s.available}
    assert all(r["pages"] == 16 and r["write_ns"] > 0 and r["raw_write_ns"] > 0 for r in rows)
    assert {r["case"] for r in report["diff"]} == {"sparse", "dense"}
    assert report["batches"][0]["size"] == 1 << 20 and report["batches"][0]["dirty_pages"] == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Dirty tracking" in result.stdout and "Executor batches" in result.stdout
    assert "Incremental checkpoints" in result.stdout


def test_bad_arguments_exit_2():
    assert run("bench", "--modes", "bogus").returncode == 2
    assert run().returncode == 2


def test_bad_argument_values_print_usage_not_a_traceback():
    for args in (("bench", "--sizes", "lots"), ("bench", "--batch-sizes", "0"),
                 ("bench", "--sizes", "-4KiB"), ("demo", "--threads", "0"),
                 ("demo", "--workers", "-1"), ("demo", "--threads", "many"), ("nonsense",),
                 ("doctor", "--bogus"), ("bench", "--json", "/nonexistent/folder/out.json"),
                 ("bench", "--plot", "/")):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "usage: pagefork" in result.stderr and "Traceback" not in result.stderr, args


@pytest.mark.python_only  # distributed's Python: slow and leaky under ASan, as test_dask
def test_demo_on_a_local_dask_cluster():
    pytest.importorskip("distributed")
    result = run("demo", "--backend", "dask", "--threads", "3", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "local Dask cluster: scheduler tcp://127.0.0.1:" in result.stdout  # loopback only
    assert ", 2 worker processes" in result.stdout and "backend 'dask'" in result.stdout
    assert "check against a serial computation: PASSED" in result.stdout
    assert result.stdout.count(" ok ") == 5


def test_the_pagefork_logger_is_silent_by_default_and_tells_at_debug(tmp_path):
    """logging.getLogger("pagefork"): nothing reaches stderr unless the
    program configures logging; configured, it tells the tracking choice
    and each checkpoint's decision."""
    script = textwrap.dedent(f"""
        import logging, sys
        import numpy as np, pagefork
        region = pagefork.Region(4 * pagefork.PAGE_SIZE)
        pagefork.tracker("auto")  # measures each mode's cost once
        pagefork.checkpoint.save(region, {str(tmp_path / 'quiet')!r})
        if sys.argv[1] == "debug":
            logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
            pagefork.checkpoint.save(region, {str(tmp_path / 'loud')!r})
    """)
    quiet = run_python(script, "quiet", timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = run_python(script, "debug", timeout=120)
    assert loud.returncode == 0, loud.stderr
    assert "pagefork DEBUG checkpoint version 1 of" in loud.stderr and "a whole base (no tracked pages)" in loud.stderr


@pytest.mark.parametrize("args", [("doctor",), ("doctor", "--json")])  # rich, print()
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, args):
    """`pagefork doctor | head -1`: the pipe's reader is gone before the
    output is written; the command exits 1 with nothing on stderr (no
    BrokenPipeError traceback), as Python's documentation advises."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "pagefork", *(a.format(tmp=tmp_path) for a in args)],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (1, "")


@pytest.mark.parametrize("size", ["9" * 40, "1000TiB"])
def test_bench_size_larger_than_the_machine_is_a_usage_error(size):
    """Before: accepted by argparse, then a traceback (exit status 1) from
    the region it could not reserve."""
    out = subprocess.run([sys.executable, "-m", "pagefork.cli", "bench", "--sizes", size],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "larger than this machine's memory" in out.stderr
