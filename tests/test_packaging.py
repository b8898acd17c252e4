"""Packaging and conventions: the license in the metadata, the sdist carries
what its tests need, a build without a C compiler or Python's headers says
so, ``python -m pagefork`` and ``--version``, the names ``pagefork`` exports.

Tests that build need the checkout (setup.py beside tests/); CI also runs this
suite against an installed wheel, where they skip.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pagefork

ROOT = Path(__file__).resolve().parent.parent
needs_checkout = pytest.mark.skipif(not (ROOT / "setup.py").is_file(),
                                    reason="needs the source tree (setup.py), not an installed wheel")
# setup.py run here reads pyproject.toml's SPDX license, new in setuptools 77.
needs_setuptools = pytest.mark.skipif(
    int(importlib.metadata.version("setuptools").split(".")[0]) < 77,
    reason="needs setuptools>=77 (the test extra installs it)")


def copy_source(dest: Path) -> Path:
    """The checkout's sources (no venvs, builds or caches) in ``dest``."""
    dest.mkdir()
    ignore = shutil.ignore_patterns(".venv*", "build", "dist", "site", "wheelhouse", "*.egg-info",
                                    "__pycache__", "*.so", ".git", ".pytest_cache", ".hypothesis",
                                    ".mypy_cache", "benchmarks")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile",
                 "mkdocs.yml"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("src", "tests", "examples", "docs"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def test_license_is_spdx_and_shipped():
    meta = importlib.metadata.metadata("pagefork")
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "License" not in meta  # the deprecated free-text field is gone
    files = {str(f) for f in importlib.metadata.files("pagefork") or []}
    shipped = [f for f in files if f.endswith("licenses/LICENSE")]
    assert len(shipped) == 1, sorted(files)
    text = importlib.metadata.distribution("pagefork").locate_file(shipped[0]).read_text()
    assert text.split()[:3] == ["Apache", "License", "Version"] and "END OF TERMS AND CONDITIONS" in text


@needs_checkout
@needs_setuptools
def test_sdist_carries_what_its_tests_need_and_they_collect(tmp_path):
    src = copy_source(tmp_path / "src-copy")
    out = tmp_path / "dist"
    build = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=src,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert "deprecated" not in build.stderr.lower(), build.stderr
    (archive,) = out.glob("pagefork-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    wanted = {"LICENSE", "README.md", "Makefile", "tests/conftest.py", "tests/reference.py",
              "tests/fuzzing.py", "tests/support.py", "tests/lsan-suppressions.txt", "tests/test_packaging.py",
              "examples/jacobi_checkpoint.py", "docs/tracking.md", "docs/_hooks.py", "mkdocs.yml",
              "src/pagefork/_native/pagefork.h",
              *(f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py"))}
    assert wanted <= names, sorted(wanted - names)
    assert not any("__pycache__" in n or n.endswith(".so") for n in names)
    # pytest from the unpacked sdist: every test file imports (conftest,
    # reference, fuzzing), and a test that reads the sources runs.
    unpacked = next((tmp_path / "unpacked").iterdir())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                              "no:cacheprovider"], cwd=unpacked, capture_output=True, text=True,
                             timeout=600, env=env)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert " tests collected" in collect.stdout and "error" not in collect.stdout.splitlines()[-1]
    lint = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_native_lint.py"], cwd=unpacked, capture_output=True, text=True,
                          timeout=600, env=env)
    assert lint.returncode == 0, lint.stdout[-3000:]


def _build_ext(src: Path, path: str, python_code: str = "") -> subprocess.CompletedProcess:
    """``setup.py build_ext`` in a copy of the sources with only ``path`` on
    PATH, after ``python_code`` ran in the same interpreter."""
    runner = (f"{python_code}\nimport runpy, sys\n"
              "sys.argv = ['setup.py', 'build_ext', '--build-temp', 'tmp-build', '--build-lib', 'tmp-lib']\n"
              "runpy.run_path('setup.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "LDSHARED", "CFLAGS")}
    env["PATH"] = path
    return subprocess.run([sys.executable, "-c", runner], cwd=src, capture_output=True, text=True,
                          timeout=300, env=env)


@needs_checkout
@needs_setuptools
def test_build_without_a_compiler_says_what_is_missing(tmp_path):
    src = copy_source(tmp_path / "src-copy")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = _build_ext(src, str(empty))
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert "pagefork's native extension cannot be built here: missing a C compiler" in err
    assert "is not on PATH" in err and "manylinux wheels" in err and "pip install pagefork" in err
    assert "Errno 2" not in err and "Traceback" not in err
    assert "Python's C headers" not in err  # they are there: only the compiler is named
    assert not list(src.glob("tmp-lib/**/*.so"))


@needs_checkout
@needs_setuptools
def test_build_without_python_headers_says_what_is_missing(tmp_path):
    src = copy_source(tmp_path / "src-copy")
    # As on a system Python without its -dev package: no Python.h where
    # distutils (which build_ext asks) says this Python's headers are.
    hide = ("import setuptools, distutils.sysconfig\n"
            "distutils.sysconfig.get_python_inc = lambda *a, **k: '/nonexistent/include'")
    result = _build_ext(src, os.environ["PATH"], hide)
    assert result.returncode == 1, result.stdout + result.stderr
    missing = result.stderr.split("cannot be built here: missing ", 1)[1].split(". No compiler")[0]
    # Every include folder the build looked in (a venv adds its own first).
    assert missing.startswith("Python's C headers (no Python.h in "), result.stderr
    assert "/nonexistent/include" in missing.split(";")[0]
    assert missing.endswith("on Debian/Ubuntu: apt-get install python3-dev, on Fedora: "
                            "dnf install python3-devel)")
    assert "a C compiler" not in missing and "manylinux wheels" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_is_the_pagefork_command_with_a_version():
    for command in ([sys.executable, "-m", "pagefork"], [sys.executable, "-m", "pagefork.cli"]):
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
        assert (version.returncode, version.stdout, version.stderr) == (
            0, f"pagefork {pagefork.__version__}\n", "")
    assert pagefork.__version__ == importlib.metadata.version("pagefork")
    usage = subprocess.run([sys.executable, "-m", "pagefork"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: pagefork")
    doctor = subprocess.run([sys.executable, "-m", "pagefork", "doctor", "--json"], capture_output=True,
                            text=True, timeout=300)
    assert doctor.returncode == 0 and f'"pagefork": "{pagefork.__version__}"' in doctor.stdout


def test_types_a_user_annotates_or_filters_are_exported():
    from pagefork.checkpoint import CheckpointInfo
    from pagefork.executor import BatchStats
    from pagefork.layout import ThreadMemory
    from pagefork.tracking import TrackingFallbackWarning

    for obj in (ThreadMemory, BatchStats, CheckpointInfo, TrackingFallbackWarning):
        assert getattr(pagefork, obj.__name__) is obj and obj.__name__ in pagefork.__all__
    assert issubclass(pagefork.TrackingFallbackWarning, RuntimeWarning)
    # Every name in __all__ exists, and nothing is listed twice.
    assert all(hasattr(pagefork, name) for name in pagefork.__all__)
    assert len(set(pagefork.__all__)) == len(pagefork.__all__)


def test_thread_functions_receive_the_exported_thread_memory():
    import numpy as np

    with pagefork.App("64KiB", backend="threads", workers=2) as app:
        app.alloc("a", 4, np.int64, merge="sum")

        def fn(mem: pagefork.ThreadMemory, i: int, n: int) -> str:
            mem["a"][i] += i + 1
            return type(mem).__name__ if isinstance(mem, pagefork.ThreadMemory) else "other"

        assert app.parallel(fn, 4) == ["ThreadMemory"] * 4
        assert app["a"].tolist() == [1, 2, 3, 4]
        assert isinstance(app.last_batch, pagefork.BatchStats) and app.last_batch.threads == 4
