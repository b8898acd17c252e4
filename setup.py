"""Builds pagefork._native; everything else is in pyproject.toml."""

import os
from pathlib import Path

from setuptools import Extension, setup

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

setup(
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
