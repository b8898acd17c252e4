"""Builds pagefork._native; everything else is in pyproject.toml."""

import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import PlatformError

NATIVE = Path("src/pagefork/_native")
# The extension is stamped with the package version so a stale build is caught at import.
VERSION = {}
exec(Path("src/pagefork/_version.py").read_text(), VERSION)

# PAGEFORK_SANITIZE=1 builds with ASan/UBSan for debugging signal and
# userfaultfd code (run Python with LD_PRELOAD=$(gcc -print-file-name=libasan.so);
# `make test-sanitize` does it all). Its objects go to build/sanitize, so
# setuptools never takes an unsanitized object for an up-to-date one.
extra_compile = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link: list[str] = []
options = {}
if os.environ.get("PAGEFORK_SANITIZE"):
    extra_compile += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-O0",
                      "-g", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=address,undefined"]
    options = {"build": {"build_base": "build/sanitize"}}



class BuildExt(build_ext):
    """build_ext that first checks for a C compiler and Python's headers, so a
    machine without them gets one clear message instead of
    ``[Errno 2] No such file or directory: 'gcc'`` or a missing Python.h."""

    def build_extensions(self) -> None:
        missing = []
        command = getattr(self.compiler, "compiler_so", None) or ["cc"]
        if shutil.which(command[0]) is None:
            missing.append(f"a C compiler ({command[0]!r} is not on PATH; set CC to use another)")
        # build_ext put this Python's include folders first in include_dirs.
        folders = self.include_dirs or [sysconfig.get_paths()["include"]]
        if not any(Path(d, "Python.h").is_file() for d in folders):
            missing.append(f"Python's C headers (no Python.h in {', '.join(folders)}; on Debian/Ubuntu: "
                           "apt-get install python3-dev, on Fedora: dnf install python3-devel)")
        if missing:
            raise PlatformError(
                "pagefork's native extension cannot be built here: missing " + " and ".join(missing)
                + ". No compiler is needed where a wheel fits: pagefork publishes manylinux wheels "
                "(Linux x86-64 and aarch64, glibc 2.17 or later), so `pip install pagefork` with a recent pip "
                "installs one; this build happens only where none matches (or from a checkout).")
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "pagefork._native",
            sources=sorted(str(p) for p in NATIVE.glob("*.c")),
            depends=[*sorted(str(p) for p in NATIVE.glob("*.h")), "src/pagefork/_version.py"],
            define_macros=[("PAGEFORK_NATIVE_VERSION", f'"{VERSION["__version__"]}"')],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        ),
        # The raw kernel mechanisms that benchmarks compare pagefork against.
        Extension(
            "pagefork._baseline",
            sources=["src/pagefork/_baseline/baseline.c"],
            depends=[str(NATIVE / "pagefork.h")],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        ),
    ],
    options=options,
)
