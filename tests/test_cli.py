"""The command line, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pagefork


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagefork.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_doctor_json_schema():
    result = run("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["modes"]) == set(pagefork.MODES)
    for mode, entry in report["modes"].items():
        assert entry["available"] == pagefork.probe()[mode].available
        assert isinstance(entry["reason"], str)
    assert report["auto"] in pagefork.MODES
    assert "vm.unprivileged_userfaultfd" in report["settings"]


def test_doctor_table_and_demo():
    result = run("doctor")
    assert result.returncode == 0 and "auto picks" in result.stdout
    result = run("demo", "--threads", "3")
    assert result.returncode == 0, result.stderr
    assert "check against a serial computation: PASSED" in result.stdout
    assert result.stdout.count(" ok ") == 5


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--sizes", "64KiB", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["tracking"]
    assert {r["mode"] for r in rows} == {m for m, s in pagefork.probe().items() if s.available}
    assert all(r["pages"] == 16 and r["write_ns"] > 0 for r in rows)


def test_bad_arguments_exit_2():
    assert run("bench", "--modes", "bogus").returncode == 2
    assert run().returncode == 2
