"""Every ```python block of the README and docs/ runs as a script (in a
subprocess, in a scratch folder) and exits 0; the site's pages that take
README sections (docs/_hooks.py) name sections that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


def _blocks() -> list:
    found = []
    for page in PAGES:
        if not page.is_file():
            continue
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}"))
    return found


BLOCKS = _blocks()


def test_the_docs_have_examples():
    if not (ROOT / "docs").is_dir():
        pytest.skip(f"no docs/ beside the tests ({ROOT})")
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("code", BLOCKS)
def test_example_runs(code, tmp_path):
    if "distributed" in code:
        pytest.importorskip("distributed")
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _hooks():
    path = ROOT / "docs" / "_hooks.py"
    if not path.is_file():
        pytest.skip(f"no {path}")
    spec = importlib.util.spec_from_file_location("docs_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_pages_take_readme_sections_that_exist():
    hooks = _hooks()
    markers = [(page.name, m) for page in PAGES[1:] for m in re.findall(r"<!-- readme: (.+?) -->",
                                                                         page.read_text())]
    assert {name for name, _ in markers} >= {"checkpoints.md", "limitations.md", "unprivileged.md"}
    for name, title in markers:
        body = hooks.readme_section(title)
        assert body.strip() and not body.startswith("## "), (name, title)
    with pytest.raises(ValueError, match="README.md has no section '## Nope'"):
        hooks.readme_section("Nope")


def test_readme_links_are_rewritten_for_the_site():
    hooks = _hooks()
    text = ("## A\nSee [`docs/api.md`](docs/api.md), [the API](docs/api.md#executor), "
            "[`examples/`](examples), [here](https://example.org) and [up](#a).\n## B\nnot this\n")
    assert hooks.readme_section("A", text) == (
        "See [`docs/api.md`](api.md), [the API](api.md#executor), `examples/`, "
        "[here](https://example.org) and [up](#a).\n")
