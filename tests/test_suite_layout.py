"""The test suite's own shape: test modules share helpers through
support.py (and fixtures through conftest), never by importing one another
or conftest, and are named by subject. Read with ``ast``; nothing is
imported."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TEST_MODULES = sorted(TESTS.glob("test_*.py"))
#: Words that say where a test came from (a review, an attack) rather than what it is about.
PROVENANCE = ("attack", "hostile", "review", "regression")


def imported_modules(source: str) -> set[str]:
    """The top-level names of every module ``source`` imports, anywhere
    (function-level and conditional imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_test_module_imports_another_or_conftest():
    """Shared helpers live in support.py: a helper imported from a test
    module runs that module's collection-time code and ties two subjects
    together; conftest is pytest's, for fixtures."""
    names = {path.stem for path in TEST_MODULES}
    wrong = {path.name: sorted(m for m in imported_modules(path.read_text()) if m in names or m == "conftest")
             for path in TEST_MODULES}
    assert {name: modules for name, modules in wrong.items() if modules} == {}


def test_the_check_sees_every_kind_of_import():
    source = "import os\nfrom test_a import x\ndef f():\n    import test_b.c\nif 0:\n    from conftest import y\n"
    assert imported_modules(source) == {"os", "test_a", "test_b", "conftest"}


def test_test_modules_are_named_by_subject():
    assert [p.name for p in TEST_MODULES if any(word in p.stem for word in PROVENANCE)] == []
