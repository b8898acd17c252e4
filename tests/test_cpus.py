"""The default worker count: CPU affinity and the cgroup CPU quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us``), read from fake cgroup files here and
from the real ones in a subprocess with a narrowed affinity."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pagefork import _cpus
from pagefork._cpus import available_cpus, cgroup_cpu_limit

from support import run_python


def fake_cgroups(tmp_path: Path, proc_cgroup: str, mounts: list[tuple[str, str, str, str]],
                 files: dict[str, str]) -> tuple[str, str]:
    """Writes /proc/self/cgroup and mountinfo texts and cgroup files under
    ``tmp_path``; ``mounts`` are (root, mount point, fs type, super options)."""
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    lines = [f"{30 + i} 20 0:{40 + i} {root} {point} rw,relatime - {fstype} {fstype} {options}"
             for i, (root, point, fstype, options) in enumerate(mounts)]
    lines.insert(0, "25 1 0:22 / /proc rw - proc proc rw")
    (tmp_path / "cgroup").write_text(proc_cgroup)
    (tmp_path / "mountinfo").write_text("\n".join(lines) + "\n")
    for _, point, _, _ in mounts:
        Path(point).mkdir(parents=True, exist_ok=True)
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


def test_v2_quota_of_the_cgroup_and_the_tightest_ancestor(tmp_path):
    cg = tmp_path / "cg2"
    paths = fake_cgroups(tmp_path, "0::/user.slice/job\n", [("/", str(cg), "cgroup2", "rw")], {
        "cg2/cpu.max": "max 100000",                          # the root: no quota
        "cg2/user.slice/cpu.max": "250000 100000",            # 2.5 CPUs
        "cg2/user.slice/job/cpu.max": "max 100000",
    })
    assert cgroup_cpu_limit(*paths) == 2.5
    (cg / "user.slice/job/cpu.max").write_text("150000 100000\n")  # 1.5 under the 2.5
    assert cgroup_cpu_limit(*paths) == 1.5
    (cg / "user.slice/cpu.max").write_text("50000 100000\n")  # the parent's 0.5 is tighter
    assert cgroup_cpu_limit(*paths) == 0.5


def test_v2_without_any_quota_is_none(tmp_path):
    paths = fake_cgroups(tmp_path, "0::/a\n", [("/", str(tmp_path / "cg2"), "cgroup2", "rw")],
                         {"cg2/cpu.max": "max 100000", "cg2/a/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(*paths) is None


def test_v2_in_a_container_sees_its_cgroup_as_the_mount(tmp_path):
    # A cgroup namespace: /proc/self/cgroup says "/", the mount is the container's cgroup.
    paths = fake_cgroups(tmp_path, "0::/\n", [("/", str(tmp_path / "cg2"), "cgroup2", "rw")],
                         {"cg2/cpu.max": "200000 100000"})
    assert cgroup_cpu_limit(*paths) == 2.0
    # No namespace, but only the container's own cgroup mounted (docker without cgroupns).
    paths = fake_cgroups(tmp_path, "0::/docker/abc\n",
                         [("/docker/abc", str(tmp_path / "cg2"), "cgroup2", "rw")],
                         {"cg2/cpu.max": "300000 100000"})
    assert cgroup_cpu_limit(*paths) == 3.0


def test_v1_cfs_quota(tmp_path):
    point = tmp_path / "cpu,cpuacct"
    paths = fake_cgroups(tmp_path, "5:memory:/x\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n",
                         [("/", str(point), "cgroup", "rw,cpu,cpuacct"),
                          ("/", str(tmp_path / "memory"), "cgroup", "rw,memory")],
                         {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "350000",
                          "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
                          "cpu,cpuacct/cpu.cfs_quota_us": "-1",
                          "cpu,cpuacct/cpu.cfs_period_us": "100000",
                          "memory/x/cpu.cfs_quota_us": "1"})  # not the cpu hierarchy: ignored
    assert cgroup_cpu_limit(*paths) == 3.5
    (point / "docker/abc/cpu.cfs_quota_us").write_text("-1\n")  # -1: no quota
    assert cgroup_cpu_limit(*paths) is None


def test_a_mount_point_with_a_blank_is_unescaped(tmp_path):
    point = tmp_path / "my cgroups"
    paths = fake_cgroups(tmp_path, "0::/\n", [("/", str(point).replace(" ", "\\040"), "cgroup2", "rw")],
                         {"my cgroups/cpu.max": "100000 100000"})
    assert cgroup_cpu_limit(*paths) == 1.0


def test_unreadable_or_garbled_cgroup_files_mean_no_quota(tmp_path):
    assert cgroup_cpu_limit(str(tmp_path / "missing"), str(tmp_path / "missing")) is None
    paths = fake_cgroups(tmp_path, "0::/\n", [("/", str(tmp_path / "cg2"), "cgroup2", "rw")],
                         {"cg2/cpu.max": "lots 0"})
    assert cgroup_cpu_limit(*paths) is None


@pytest.mark.parametrize("cpus, limit, expected", [
    ({0, 1, 2, 3}, None, 4),
    ({0, 1, 2, 3}, 1.5, 2),   # a quota rounds up
    ({0, 1, 2, 3}, 8.0, 4),   # affinity is tighter
    ({2}, None, 1),
    ({0, 1, 2, 3}, 0.1, 1),   # never below one
])
def test_available_cpus_is_affinity_capped_by_the_quota(monkeypatch, cpus, limit, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(_cpus, "cgroup_cpu_limit", lambda: limit)
    assert available_cpus() == expected


def test_default_workers_follow_the_affinity():
    """A process allowed one CPU (taskset) gets one worker by default, on
    the threads and the processes backends (os.cpu_count() says more)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may use one CPU only: narrowing the affinity changes nothing")
    if cgroup_cpu_limit() is not None and cgroup_cpu_limit() < 2:
        pytest.skip(f"the cgroup quota ({cgroup_cpu_limit()} CPUs) already limits to one worker")
    code = textwrap.dedent("""
        import os
        from pagefork import App
        from pagefork._cpus import available_cpus
        before = available_cpus()
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        slots = []
        for backend in ("threads", "processes"):
            with App("64KiB", backend=backend) as app:
                slots.append(app._executor.backend.slots)
        print(before, os.cpu_count(), *slots)
    """)
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    before, machine, threads, processes = map(int, result.stdout.split())
    assert before == available_cpus() >= 2 and machine >= 2
    assert (threads, processes) == (1, 1)
