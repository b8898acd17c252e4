"""Issue 19's goals judged on the whole-array workloads of
:mod:`pagefork.bench.dense`: running them all, the same-run ratios, and
the report ``benchmarks/bench_dense.py`` and ``pagefork bench --dense``
print."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .dense import (Progress, Workload, deposit, dense_add, empty_batch, rss_peak, scattered_add,
                    stencil)

__all__ = ["Goal", "DenseResults", "SECTIONS", "goals", "run_all", "format_results"]


@dataclass
class Goal:
    """One of issue 19's goals, as measured in this run."""

    text: str
    value: float
    limit: float

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


@dataclass
class DenseResults:
    workloads: list[Workload]
    rss: list[dict]

    def get(self, key: str) -> Workload | None:
        return next((w for w in self.workloads if w.key == key), None)

    def as_dict(self) -> dict:
        return {"workloads": [w.as_dict() for w in self.workloads], "rss": self.rss,
                "goals": [g.as_dict() for g in goals(self)]}


#: The workloads ``run_all`` can be limited to.
SECTIONS = ("stencil", "empty", "scattered", "dense", "deposit", "rss")


def goals(res: DenseResults) -> list[Goal]:
    """Issue 19's goals, each as a same-run ratio (or count) and its limit."""
    out: list[Goal] = []

    def ratio(w: Workload, a: str, b: str) -> float:
        return w.median(a) / w.median(b)

    if (w := res.get("stencil")) is not None:
        out.append(Goal("stencil: pagefork threads / serial numpy", ratio(w, "pagefork threads", "serial numpy"), 1.0))
        out.append(Goal("stencil: pagefork processes / serial numpy",
                        ratio(w, "pagefork processes", "serial numpy"), 1.5))
        for b in ("threads", "processes"):
            out.append(Goal(f"stencil: diffs per step, pagefork {b}",
                            w.facts.get(f"pagefork {b} diffs", float("nan")), 8192))
    if (w := res.get("main_write")) is not None:
        for b in ("threads", "processes"):
            out.append(Goal(f"main write g[:] = out: pagefork {b} / ordinary memory",
                            ratio(w, f"pagefork {b}", "ordinary memory (serial numpy)"), 2.0))
    if (w := res.get("empty")) is not None:
        out.append(Goal("empty batch: pagefork threads / ThreadPoolExecutor.map",
                        ratio(w, "pagefork threads", "ThreadPoolExecutor.map"), 2.0))
        out.append(Goal("empty batch: pagefork processes / Pool(fork).map",
                        ratio(w, "pagefork processes", "multiprocessing.Pool (fork) .map"), 1.0))
    if (w := res.get("scattered")) is not None:
        best = min(w.median("pagefork processes"), w.median("pagefork processes, start=identity"))
        out.append(Goal("scattered: best pagefork processes / serial numpy", best / w.median("serial numpy"), 2.0))
    if (w := res.get("dense")) is not None:
        out.append(Goal("dense add: pagefork processes / serial numpy",
                        ratio(w, "pagefork processes", "serial numpy"), 1.5))
        out.append(Goal("dense add: pagefork processes / shared memory + lock",
                        ratio(w, "pagefork processes", "shared memory + lock"), 1.0))
    for key in ("stencil", "scattered", "dense", "deposit"):
        w = res.get(key)
        if w is None:
            continue
        threads = [n for n in w.timings if n.startswith("pagefork threads")]
        for t in threads:
            p = t.replace("threads", "processes")
            if p in w.timings:
                out.append(Goal(f"{key}: {t} / {p}", ratio(w, t, p), 1.2))
    for row in res.rss:
        out.append(Goal(f"peak parent RSS / budget, {row['backend']} (MiB {row['peak'] >> 20} of "
                        f"{row['budget'] >> 20})", row["peak"] / row["budget"], 1.0))
    return out


def run_all(quick: bool = False, progress: Progress | None = None, only: str | None = None) -> DenseResults:
    """Every workload (or ``only`` one of :data:`SECTIONS`); ``quick`` runs
    fewer rounds (a few minutes on an idle 2-core machine)."""
    if only is not None and only not in SECTIONS:
        raise ValueError(f"only must be one of {', '.join(SECTIONS)}, not {only!r}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    rounds = 2 if quick else 5
    res = DenseResults([], [])
    if only in (None, "empty"):  # first: its fork pool is forked before other threads exist
        res.workloads.append(empty_batch(rounds=rounds, batches=20 if quick else 50, progress=progress))
    if only in (None, "stencil"):
        res.workloads.extend(stencil(rounds=rounds, steps=3 if quick else 5, progress=progress))
    if only in (None, "scattered"):
        res.workloads.append(scattered_add(rounds=rounds + 1, progress=progress))
    if only in (None, "dense"):
        res.workloads.append(dense_add(rounds=rounds + 1, progress=progress))
    if only in (None, "deposit"):
        res.workloads.append(deposit(rounds=1 if quick else 3, progress=progress))
    if only in (None, "rss"):
        res.rss = rss_peak(progress=progress)
    return res


_FACTS = ("diffs", "diff bytes", "carry ms", "run ms", "merge ms", "remap ms")


def format_results(res: DenseResults) -> str:
    """Each workload's systems (median, spread, ratio to the first
    alternative), pagefork's batch facts, then the goals."""
    lines: list[str] = []
    for w in res.workloads:
        base_name = next((n for n in w.timings if not n.startswith("pagefork")), None)
        base = w.median(base_name) if base_name else float("nan")
        lines.append(f"{w.title}; median [lowest-highest] of {max(len(t.seconds) for t in w.timings.values())}"
                     f", ratio to {base_name}")
        for t in w.timings.values():
            lo, hi = t.spread
            lines.append(f"  {t.name:<38}{t.median * 1e3:>9.2f} [{lo * 1e3:.2f}-{hi * 1e3:.2f}]"
                         f"  {t.median / base:>6.2f}x  {'correct' if t.correct else 'WRONG'}")
        for name in w.timings:
            parts = [f"{f} {w.facts[f'{name} {f}']:.4g}" for f in _FACTS if f"{name} {f}" in w.facts]
            if parts:
                lines.append(f"    {name}: " + ", ".join(parts))
        lines.append("")
    if res.rss:
        lines.append("Peak parent RSS during a batch of scattered diffs (budget: memory + 2x diff bytes + 64 MiB)")
        for row in res.rss:
            lines.append(f"  {row['backend']:<10} peak {row['peak'] / 2**20:.0f} MiB (before the batch "
                         f"{row['before'] / 2**20:.0f} MiB), {row['diffs']} diffs, "
                         f"{row['diff_bytes'] / 2**20:.1f} MiB of diffs, budget {row['budget'] / 2**20:.0f} MiB"
                         f"  {'correct' if row['correct'] else 'WRONG'}")
        lines.append("")
    lines.append("Goals (issue 19), same-run ratios:")
    for g in goals(res):
        lines.append(f"  {'met    ' if g.met else 'NOT MET'}  {g.text}: {g.value:.3g} (goal <= {g.limit:g})")
    return "\n".join(lines)
