"""Diff, merge and encoding benchmarks: the diff beside memcmp of the same
pages, apply and wire throughput, delta sizes and speeds."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from collections.abc import Callable

import numpy as np

from .. import _baseline
from ..memory import PAGE_SIZE
from ..diffs import DiffBatch
from . import best_of

__all__ = ["DiffCost", "diff_costs", "DeltaCost", "delta_costs", "format_diff_table",
           "format_delta_table"]


@dataclass(frozen=True)
class DiffCost:
    """Diff/encode throughput on one workload, against memcmp of the same pages."""

    case: str
    size: int
    diffs: int
    memcmp_gbps: float
    diff_gbps: float
    apply_ns_per_diff: float
    wire_encode_gbps: float
    wire_decode_gbps: float

    @property
    def diff_ratio(self) -> float:
        return self.diff_gbps / self.memcmp_gbps

    def as_dict(self) -> dict:
        return asdict(self) | {"diff_ratio": self.diff_ratio}


DIFF_CASES = {
    "sparse": 16 * PAGE_SIZE,  # a changed byte every 16 pages
    "dense": 64,               # a changed byte in every 64
}


def diff_costs(size: int = 64 << 20, repeat: int = 5,
               progress: Callable[[str], None] | None = None) -> list[DiffCost]:
    """OVERWRITE diff of fully dirty memory against the snapshot, sparse and
    dense, beside memcmp over the same pages; apply and wire throughput."""
    from .. import wire
    from ..snapshot import Snapshot

    rng = np.random.default_rng(7)
    orig = rng.integers(0, 256, size, dtype=np.uint8)
    dirty = np.ones(size // PAGE_SIZE, dtype=bool)
    rows = []
    with Snapshot(orig) as snap:
        for case, stride in DIFF_CASES.items():
            if progress:
                progress(f"diff, {case} changes, {size >> 20} MiB")
            mem = orig.copy()
            mem[::stride] ^= 0xFF
            # memcmp reads the same two kinds of memory the diff reads (the
            # snapshot and a numpy array), with equal contents: it stops at
            # the first difference, and the diff must scan every byte.
            # Interleaved with the diff so both see the same machine.
            cmp_ns = diff_ns = float("inf")
            batch: DiffBatch | None = None
            for _ in range(repeat):
                with snap.view() as snapshot_bytes:
                    cmp_ns = min(cmp_ns, _baseline.memcmp(snapshot_bytes, orig))
                batch = None  # its columns go back to the cache before the next diff
                t0 = time.perf_counter_ns()
                batch = snap.diff(mem, dirty)
                diff_ns = min(diff_ns, time.perf_counter_ns() - t0)
            assert batch is not None and len(batch) == size // stride
            target = Snapshot(orig)
            apply_ns, _ = best_of(lambda: target.apply(batch), repeat)
            target.close()
            enc_ns, message = best_of(lambda: wire.encode(batch), repeat)
            dec_ns, _ = best_of(lambda: wire.decode(message), repeat)
            gbps = lambda ns, nbytes=size: nbytes / ns  # noqa: E731 (bytes per ns = GB/s)
            rows.append(DiffCost(case, size, len(batch), gbps(cmp_ns), gbps(diff_ns),
                                 apply_ns / len(batch), gbps(enc_ns, len(message)),
                                 gbps(dec_ns, len(message))))
    return rows


@dataclass(frozen=True)
class DeltaCost:
    """Delta size and speed for one setting on one change pattern."""

    setting: str
    case: str
    size: int
    delta_bytes: int
    encode_gbps: float
    apply_gbps: float

    def as_dict(self) -> dict:
        return asdict(self)


def delta_costs(size: int = 16 << 20, repeat: int = 3,
                progress: Callable[[str], None] | None = None) -> list[DeltaCost]:
    """Delta sizes and throughput: byte runs vs pages of 64 and 4096 bytes."""
    from .. import delta

    rng = np.random.default_rng(11)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    rows = []
    for case, stride in {"sparse": 16 * PAGE_SIZE, "scattered": 1024, "dense": 64}.items():
        new = old.copy()
        new[::stride] ^= 0xFF
        for setting in ("bytes", "pages=64", "pages=4096", "pages=4096;xor;zstd=1"):
            if progress:
                progress(f"delta {setting}, {case}")
            s = delta.Settings.parse(setting)
            enc_ns, encoded = best_of(lambda: s.encode(old, new), repeat)
            app_ns, out = best_of(lambda: delta.apply(encoded, old), repeat)
            assert out == new.tobytes()
            rows.append(DeltaCost(setting, case, size, len(encoded), size / enc_ns, size / app_ns))
    return rows


def format_diff_table(rows: list[DiffCost]) -> str:
    head = (f"{'case':<8}{'MiB':>6}{'diffs':>10}{'memcmp GB/s':>13}{'diff GB/s':>11}{'ratio':>7}"
            f"{'apply ns/diff':>14}{'wire enc GB/s':>15}{'dec GB/s':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case:<8}{r.size >> 20:>6}{r.diffs:>10}{r.memcmp_gbps:>13.2f}"
                     f"{r.diff_gbps:>11.2f}{r.diff_ratio:>7.2f}{r.apply_ns_per_diff:>14.1f}"
                     f"{r.wire_encode_gbps:>15.2f}{r.wire_decode_gbps:>10.2f}")
    return "\n".join(lines)


def format_delta_table(rows: list[DeltaCost]) -> str:
    head = f"{'setting':<24}{'case':<11}{'MiB':>5}{'delta bytes':>13}{'encode GB/s':>13}{'apply GB/s':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.setting:<24}{r.case:<11}{r.size >> 20:>5}{r.delta_bytes:>13}"
                     f"{r.encode_gbps:>13.2f}{r.apply_gbps:>12.2f}")
    return "\n".join(lines)
