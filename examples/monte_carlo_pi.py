"""Monte Carlo estimate of pi: every thread adds its hits to one counter
merged by "sum" (a plain shared counter would lose updates).

    python examples/monte_carlo_pi.py [--backend processes] [--threads 8]
"""

from __future__ import annotations

import argparse

import numpy as np

import pagefork


def throw(mem, i, n, samples):
    rng = np.random.default_rng(i)
    x, y = rng.random(samples), rng.random(samples)
    mem["hits"][0] += int(np.count_nonzero(x * x + y * y <= 1.0))
    mem["thrown"][0] += samples


def main(backend: str = "processes", threads: int = 8, samples: int = 1_000_000) -> bool:
    with pagefork.App("64KiB", backend=backend) as app:
        hits = app.alloc("hits", 1, np.int64, merge="sum")
        thrown = app.alloc("thrown", 1, np.int64, merge="sum")
        app.parallel(throw, threads, args=(samples,))
        pi = 4 * hits[0] / thrown[0]
        serial = sum(int(np.count_nonzero(np.hypot(*np.random.default_rng(i).random((2, samples))) <= 1.0))
                     for i in range(threads))
        ok = hits[0] == serial and thrown[0] == threads * samples
        print(f"pi ~ {pi:.5f} from {thrown[0]} samples ({'exact' if ok else 'WRONG'} hit count)")
        return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="processes")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    raise SystemExit(0 if main(args.backend, args.threads) else 1)
