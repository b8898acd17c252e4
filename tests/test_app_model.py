"""Random programs of alloc / main-program writes / parallel batches, run on
a real App and on a pure-numpy model of fork-join semantics (every thread
starts from the same snapshot and sees only its own writes; at the join each
thread's changes merge by its array's rule, in thread order). Arrays grow
the memory between batches while workers keep thread memory, and some are
large enough that replies outgrow the workers' reply buffers."""

from __future__ import annotations

import hashlib
import sys

import cloudpickle
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefork import App

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests

# kind letter -> dtype, merge rule
KINDS = {"s": (np.int64, "sum"), "o": (np.int64, "overwrite"), "x": (np.uint32, "xor"),
         "m": (np.int32, "max"), "f": (np.float64, "sum"), "d": (np.uint16, "subtract"),
         "n": (np.int8, "min")}
SIZES = [1, 7, 500, 3000, 20000, 150_000]  # the last: 1.2 MB of int64, past the reply buffer's first MiB


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def thread_writes(arrays: dict[str, np.ndarray], i: int, seed: int) -> None:
    """What thread ``i`` writes (deterministic: run by the App's workers and
    by the model alike)."""
    rng = np.random.default_rng([seed, i])
    for name, a in arrays.items():
        mode = int(rng.integers(0, 4))
        if mode == 0:
            continue
        if mode == 1:
            idx: object = slice(None)
        elif mode == 2:
            idx = np.unique(rng.integers(0, a.size, size=int(rng.integers(1, 20))))
        else:
            lo = int(rng.integers(0, a.size))
            idx = slice(lo, lo + int(rng.integers(1, 3000)))
        kind = name[0]
        with np.errstate(over="ignore"):
            if kind == "f":
                a[idx] += (i + 1) * 0.5
            elif kind in "sd":
                a[idx] += a.dtype.type(i + 1)
            elif kind == "o":
                a[idx] = i * 1000 + 7
            elif kind == "x":
                a[idx] ^= np.uint32(rng.integers(1, 2**32 - 1))
            elif kind == "m":
                a[idx] = np.maximum(a[idx], np.int32(rng.integers(-10**6, 10**6)))
            else:
                a[idx] = np.minimum(a[idx], np.int8(rng.integers(-128, 127)))


def thread_function(mem, i, n, seed, names):
    arrays = {name: mem[name] for name in names}
    seen = digest(arrays)  # what this thread saw before writing
    thread_writes(arrays, i, seed)
    return seen


def model_batch(main: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    """Main memory after a batch, by the fork-join rules."""
    out = {k: v.copy() for k, v in main.items()}
    for i in range(n):
        mine = {k: v.copy() for k, v in main.items()}
        thread_writes(mine, i, seed)
        for name, after in mine.items():
            before, merge = main[name], KINDS[name[0]][1]
            if merge in ("overwrite", "xor"):  # by bytes
                b0, b1, bo = before.view(np.uint8), after.view(np.uint8), out[name].view(np.uint8)
                if merge == "overwrite":
                    changed = b0 != b1
                    bo[changed] = b1[changed]
                else:
                    bo ^= b0 ^ b1
                continue
            size = before.itemsize
            changed = (before.view(np.uint8).reshape(-1, size) != after.view(np.uint8).reshape(-1, size)).any(1)
            o = out[name]
            with np.errstate(over="ignore"):
                if merge == "sum":
                    o[changed] += after[changed] - before[changed]
                elif merge == "subtract":
                    o[changed] -= before[changed] - after[changed]
                elif merge == "max":
                    o[changed] = np.maximum(o[changed], after[changed])
                else:
                    o[changed] = np.minimum(o[changed], after[changed])
    return out


step = st.one_of(
    st.tuples(st.just("alloc"), st.sampled_from(sorted(KINDS)), st.sampled_from(SIZES)),
    st.tuples(st.just("write"), st.integers(0, 2**16), st.integers(0, 2**31)),
    st.tuples(st.just("parallel"), st.sampled_from([1, 2, 3, 5, 8, 17]), st.integers(0, 2**31)),
)


def run_program(backend: str, workers: int, steps: list[tuple]) -> None:
    main: dict[str, np.ndarray] = {}
    with App(1 << 16, max_size=64 << 20, backend=backend, workers=workers) as app:
        for number, (what, a, b) in enumerate(steps):
            if what == "alloc" or not main:
                kind, size = (a, b) if what == "alloc" else ("s", 3000)
                name = f"{kind}{number}"
                app.alloc(name, size, KINDS[kind][0], merge=KINDS[kind][1])
                main[name] = np.zeros(size, KINDS[kind][0])
            elif what == "write":  # the main program, between batches
                name = sorted(main)[a % len(main)]
                rng = np.random.default_rng(b)
                idx = rng.integers(0, main[name].size, size=5)
                value = main[name].dtype.type(rng.integers(0, 100))
                main[name][idx] = value
                app[name][idx] = value
            else:
                seen = app.parallel(thread_function, a, args=(b, tuple(main)))
                assert seen == [digest(main)] * a, f"step {number}: a thread did not see the snapshot"
                main = model_batch(main, a, b)
            for name, expected in main.items():
                got = app[name]
                assert got.tobytes() == expected.tobytes(), (
                    f"step {number} ({what}): {name} differs at {np.flatnonzero(got != expected)[:10]}")


@pytest.fixture
def keep_memory_always(monkeypatch):
    """Workers started from here keep thread memory however few pages a
    thread wrote (they read it at start)."""
    monkeypatch.setenv("PAGEFORK_KEEP_MIN_PAGES", "0")


@pytest.mark.parametrize("backend,workers", [("threads", 1), ("threads", 3), ("processes", 1), ("processes", 2)])
@settings(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=12))
def test_random_programs_match_the_fork_join_model(keep_memory_always, backend, workers, steps):
    run_program(backend, workers, steps)


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_long_program_with_growth_and_large_replies(keep_memory_always, backend):
    """Alternating sum/overwrite batches on growing memory, checked after every step."""
    rng = np.random.default_rng(7)
    steps: list[tuple] = [("alloc", "s", 20000), ("alloc", "o", 3000), ("parallel", 3, 1),
                          ("alloc", "x", 150_000), ("parallel", 5, 2), ("write", 0, 3),
                          ("parallel", 2, 4), ("alloc", "s", 150_000), ("parallel", 8, 5)]
    for k in range(12):
        steps.append(("write", int(rng.integers(0, 99)), k) if k % 3 == 0 else
                     ("parallel", int(rng.choice([2, 3, 5])), int(rng.integers(0, 2**31))))
    run_program(backend, 2, steps)
