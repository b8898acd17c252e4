"""The package's shape: one concept per module, none over 600 lines, and
imports that only point down the layers (no cycles, type-only and
function-level imports included). Read from the sources with ``ast``;
nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import cycles_in

ROOT = Path(__file__).resolve().parent.parent / "src" / "pagefork"
if not ROOT.is_dir():  # CI also runs the suite against an installed wheel, from a copy of tests/
    pytest.skip(f"no sources at {ROOT} (tests run outside the source tree)", allow_module_level=True)
MAX_LINES = 600

# Lowest first. A module may import modules of its own layer or of a lower
# one; within a layer the imports must still be acyclic. A new module must
# be placed here, which is the moment to decide where it belongs.
LAYERS: list[set[str]] = [
    {"_version", "_errors", "_buffers", "_native", "_baseline", "_sizes", "_signals", "_framing", "_system",
     "_forking", "_cpus", "_limits", "_log", "_thread_errors"},
    {"memory"},
    {"_kernel_state", "_tracker", "tracking"},
    {"merge", "diffs", "snapshot", "wire", "compact", "delta"},
    {"layout", "identity"},
    {"batch"},
    {"backends.threads", "backends.replies", "backends.combine", "backends.spawn", "backends.processes",
     "backends._messages",
     "backends.dask", "backends._dask_worker", "backends"},
    {"_main_memory", "_batch_thread", "executor"},
    {"_checkpoint_format", "_checkpoint_store", "_checkpoint_versions", "_checkpoint_images", "checkpoint"},
    {"app"},
    {"demo", "bench", "bench.tracking", "bench.diffs", "bench.executor", "bench.reduce", "bench.checkpoint",
     "bench.dask", "bench.dense", "bench.dense_report", "cli", "__main__"},
    {""},  # the package itself: public names only
]


def _modules() -> dict[str, Path]:
    """Module name (relative to the package, "" for the package) -> source.
    Extension modules count through their ``.pyi`` stubs."""
    found = {}
    for path in [*ROOT.rglob("*.py"), *ROOT.rglob("*.pyi")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name.split(".", 1)[1] if "." in a.name else "" for a in node.names
                       if a.name.split(".")[0] == "pagefork"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "pagefork":
                module = node.module.split(".", 1)[1] if "." in node.module else ""
            else:
                continue
            for alias in node.names:  # `from . import x` imports submodule x if there is one
                sub = f"{module}.{alias.name}" if module else alias.name
                targets.append(sub if sub in modules else module)
        for target in targets:
            while target not in modules and target:
                target = target.rpartition(".")[0]
            if target != name:
                found.add(target)
    return found


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) if path.suffix == ".py" else set()
         for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert sorted(set(MODULES) - placed) == [], "place new modules in LAYERS"


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.suffix == ".py"))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines; split it by concept"


def test_imports_point_down_the_layers():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    upward = [f"{name or 'pagefork'} -> {target or 'pagefork'}"
              for name, targets in GRAPH.items() for target in targets
              if layer.get(target, -1) > layer.get(name, len(LAYERS))]
    assert upward == []


def test_no_import_cycles():
    assert cycles_in(GRAPH) == []


def test_the_checker_sees_cycles_and_type_only_imports(tmp_path):
    """The walk counts imports under TYPE_CHECKING and inside functions."""
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert _imports("a", modules["a"], modules) == {"b"}
    assert _imports("b", modules["b"], modules) == {"a"}


def test_the_cycle_finder_names_each_cycle():
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert cycles_in({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
