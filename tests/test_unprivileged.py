"""What an unprivileged user gets: userfaultfd in user-mode-only.

When ``vm.unprivileged_userfaultfd=0``, a process without CAP_SYS_PTRACE may
only open a user-mode-only userfaultfd (Linux 5.11+). As root, these tests
drop CAP_SYS_PTRACE in a subprocess (``setpriv``) to get there; as an
ordinary user the process is already there. ``.ci/run`` also runs the whole
suite as a fresh unprivileged user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path



from support import unprivileged_prefix

TESTS = Path(__file__).resolve().parent


def run_unprivileged(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*unprivileged_prefix(), sys.executable, *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def test_probe_in_user_mode_only():
    result = run_unprivileged("-c", textwrap.dedent("""
        import json, pagefork
        from pagefork import _native
        print(json.dumps({"user_mode_only": _native.uffd_probe()[2],
                          "modes": {m: [s.available, s.kernel_writes, s.kernel_writes_reason]
                                    for m, s in pagefork.probe().items()}}))
    """))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["user_mode_only"] == 1
    modes = report["modes"]
    available, writes, why = modes["uffd"]
    assert available and not writes
    assert "EFAULT" in why and "user-mode-only" in why
    if modes["uffd-async"][0]:  # the kernel resolves async write-protect faults itself
        assert modes["uffd-async"][1:] == [True, ""]
    assert modes["segfault"][1] is False
    assert modes["cow"][1:] == [True, ""]


def test_kernel_write_tests_in_user_mode_only():
    """The probe-driven kernel-write tests, run where uffd is user-mode-only."""
    result = run_unprivileged("-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(TESTS / "test_tracking.py"), "-k", "kernel_writes",
                              cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_doctor_in_user_mode_only():
    result = run_unprivileged("-m", "pagefork.cli", "doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["userfaultfd"]["user_mode_only"] is True
    uffd = report["modes"]["uffd"]
    assert uffd["available"] and uffd["kernel_writes"] is False
    assert "user-mode-only" in uffd["kernel_writes_reason"]
    table = run_unprivileged("-m", "pagefork.cli", "doctor")
    assert table.returncode == 0, table.stderr
    assert "uffd: kernel writes into tracked memory fail" in " ".join(table.stdout.split())


def test_bench_baseline_falls_back_to_user_mode_only(tmp_path):
    out = tmp_path / "bench.json"
    result = run_unprivileged("-m", "pagefork.cli", "bench", "--quick", "--modes", "uffd",
                              "uffd-async", "--sizes", "64KiB", "--batch-sizes", "1MiB",
                              "--checkpoint-sizes", "4MiB", "1MiB", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["tracking"]
    assert {r["mode"] for r in rows} <= {"uffd", "uffd-async"}
    assert "uffd" in {r["mode"] for r in rows}
    assert all(r["write_ns"] > 0 and r["raw_write_ns"] > 0 for r in rows)
