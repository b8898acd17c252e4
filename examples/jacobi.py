"""A Jacobi iteration for the heat equation over many batches: threads own
row bands of the next grid (merged by "overwrite"), and between batches the
main program swaps the grids and resets the boundary: those writes are
carried into the snapshot, tracked, not copied wholesale.

    python examples/jacobi.py [--backend processes] [--threads 4] [--steps 50]
"""

from __future__ import annotations

import argparse

import numpy as np

import pagefork


def relax(mem, i, n):
    grid, new = mem["grid"], mem["next"]
    rows = grid.shape[0] - 2
    lo, hi = 1 + i * rows // n, 1 + (i + 1) * rows // n
    new[lo:hi, 1:-1] = 0.25 * (grid[lo - 1:hi - 1, 1:-1] + grid[lo + 1:hi + 1, 1:-1]
                               + grid[lo:hi, :-2] + grid[lo:hi, 2:])


def boundary(grid: np.ndarray) -> None:
    grid[0, :] = 100.0  # a hot edge


def serial(size: int, steps: int) -> np.ndarray:
    grid = np.zeros((size, size))
    boundary(grid)
    for _ in range(steps):
        new = grid.copy()
        new[1:-1, 1:-1] = 0.25 * (grid[:-2, 1:-1] + grid[2:, 1:-1] + grid[1:-1, :-2] + grid[1:-1, 2:])
        grid = new
        boundary(grid)
    return grid


def main(backend: str = "processes", threads: int = 4, steps: int = 50, size: int = 256) -> bool:
    with pagefork.App(f"{2 * size * size * 8 // 2**20 + 1}MiB", backend=backend) as app:
        grid = app.alloc("grid", (size, size), np.float64)
        new = app.alloc("next", (size, size), np.float64)
        boundary(grid)
        for _ in range(steps):
            new[:] = grid  # main-program writes between batches
            app.parallel(relax, threads)
            grid[:] = new
            boundary(grid)
        ok = np.allclose(grid, serial(size, steps))
        print(f"Jacobi {size}x{size}, {steps} steps in {threads} threads: "
              f"{'matches' if ok else 'DIFFERS FROM'} the serial result")
        print(" ", app.last_batch.summary())
        return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="processes")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    raise SystemExit(0 if main(args.backend, args.threads, args.steps) else 1)
