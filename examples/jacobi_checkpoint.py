"""The Jacobi iteration of jacobi.py, checkpointed every few steps so that a
killed run resumes where its last checkpoint left it.

Run it, kill it (even with SIGKILL), run it again with the same folder: it
restores the App from the newest checkpoint and carries on. The step
counter lives in main memory, so it is checkpointed with the grids. Each
checkpoint writes only the pages that changed since the one before.

    python examples/jacobi_checkpoint.py CHECKPOINTS [--steps 200] [--every 10] [--out grid.npy]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import pagefork

try:
    from jacobi import boundary, relax, serial  # run as a script from examples/
except ImportError:  # loaded by path (tests)
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "jacobi", os.path.join(os.path.dirname(os.path.abspath(__file__)), "jacobi.py"))
    _jacobi = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
    _spec.loader.exec_module(_jacobi)  # type: ignore[union-attr]
    boundary, relax, serial = _jacobi.boundary, _jacobi.relax, _jacobi.serial


def start(target: str, size: int, backend: str) -> pagefork.App:
    """The App of the newest checkpoint in ``target``, or a fresh one."""
    if pagefork.checkpoint.versions(target):
        app = pagefork.App.restore(target, backend=backend)
        print(f"resumed at step {int(app['step'][0])} from {target}", flush=True)
        return app
    app = pagefork.App(f"{2 * size * size * 8 // 2**20 + 1}MiB", backend=backend)
    boundary(app.alloc("grid", (size, size), np.float64))
    app.alloc("next", (size, size), np.float64)
    app.alloc("step", 1, np.int64)
    return app


def run(target: str, *, steps: int = 200, every: int = 10, size: int = 128, threads: int = 3,
        backend: str = "threads") -> np.ndarray:
    """Runs (or resumes) to ``steps`` steps, checkpointing every ``every``; the final grid."""
    with start(target, size, backend) as app:
        grid, new, step = app["grid"], app["next"], app["step"]
        while step[0] < steps:
            new[:] = grid
            app.parallel(relax, threads)
            grid[:] = new
            boundary(grid)
            step[0] += 1
            if step[0] % every == 0 or step[0] == steps:
                info = app.checkpoint(target, keep=3)
                print(f"step {int(step[0])}: checkpoint version {info.version}, {info.pages} pages, "
                      f"{info.bytes_written} bytes, {info.seconds * 1e3:.1f} ms", flush=True)
        return grid.copy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("target", help="checkpoint folder or fsspec URL")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--backend", default="threads")
    parser.add_argument("--out", help="save the final grid here (.npy)")
    args = parser.parse_args()
    final = run(args.target, steps=args.steps, every=args.every, size=args.size,
                threads=args.threads, backend=args.backend)
    if args.out:
        np.save(args.out, final)
    ok = np.allclose(final, serial(args.size, args.steps))
    print(f"done: {'matches' if ok else 'DIFFERS FROM'} the serial result")
    raise SystemExit(0 if ok else 1)
