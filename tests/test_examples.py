"""The examples run and check themselves against serial computations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("name, kwargs", [
    ("histogram", dict(threads=3, values=100_000, bins=50)),
    ("monte_carlo_pi", dict(threads=3, samples=20_000)),
    ("jacobi", dict(threads=3, steps=5, size=64)),
    ("minmax", dict(threads=3, values=50_000)),
])
def test_example(name, kwargs, backend):
    assert load(name).main(backend=backend, **kwargs)
