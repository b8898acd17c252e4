"""Checkpoint benchmarks, each against a baseline measured in the same run
on the same disk: an incremental checkpoint of an App after 1% of its pages
changed beside ``np.save`` of the whole memory; a restore from a base plus
10 increments beside ``np.load`` of one full copy (and the first batch
after it beside a fresh App's first batch after np.load); and the
checkpoint cost of the same changed pages in a small and a large memory,
in rounds that alternate which memory goes first, also after the program
read all of its memory."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable

import numpy as np

from .. import checkpoint
from ..app import App
from ..memory import PAGE_SIZE

__all__ = ["CheckpointCosts", "checkpoint_costs", "format_checkpoint_report", "IncrementSizes",
           "increment_sizes", "format_increment_sizes"]


@dataclass(frozen=True)
class CheckpointCosts:
    """Medians of interleaved rounds (seconds, bytes)."""

    size: int                  # main memory of the large App
    small_size: int            # main memory of the small App
    changed_pages: int         # 1% of the large memory's pages
    changed_small: int         # 1% of the small memory's pages
    rounds: int
    checkpoint_s: float        # incremental checkpoint of changed_pages, large App (fsynced)
    checkpoint_bytes: int      # bytes it wrote (object + manifest)
    np_save_s: float           # np.save of the whole memory, same disk
    np_save_fsync_s: float     # the same, fsynced
    size_rounds: int
    small_checkpoint_s: float  # changed_small pages, small App
    same_pages_s: float        # changed_small pages, large App
    read_small_s: float        # the same after the program read all of the small memory
    read_large_s: float        # ... and all of the large memory
    restore_s: float           # App.restore from a base + 10 increments
    restore_chain: int
    np_load_s: float           # np.load of one full copy into numpy memory
    region_load_s: float       # checkpoint.load of the same version into a new bare Region
    app_load_s: float          # one full copy loaded into a fresh App's memory
    first_batch_s: float       # a batch right after the warm restore
    app_first_batch_s: float   # a batch right after app_load (carries the whole memory)
    base_s: float              # the first (whole) checkpoint
    warm_restore_s: float      # the restore again, its files in the page cache
    warm_np_load_s: float      # np.load again, its file in the page cache

    @property
    def save_ratio(self) -> float:
        return self.checkpoint_s / self.np_save_s

    @property
    def bytes_fraction(self) -> float:
        return self.checkpoint_bytes / self.size

    @property
    def restore_ratio(self) -> float:
        return self.restore_s / self.np_load_s

    @property
    def warm_restore_ratio(self) -> float:
        return self.warm_restore_s / self.warm_np_load_s

    @property
    def app_restore_ratio(self) -> float:
        return self.restore_s / self.app_load_s

    @property
    def region_restore_ratio(self) -> float:
        return self.region_load_s / self.np_load_s

    @property
    def restore_and_batch_ratio(self) -> float:
        """Restore then a first batch, against np.load into a fresh App then
        a first batch: the whole cost of resuming work in an App."""
        return (self.warm_restore_s + self.first_batch_s) / (self.app_load_s + self.app_first_batch_s)

    @property
    def size_ratio(self) -> float:
        return self.same_pages_s / self.small_checkpoint_s

    @property
    def read_size_ratio(self) -> float:
        return self.read_large_s / self.read_small_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(save_ratio=self.save_ratio, bytes_fraction=self.bytes_fraction,
                 restore_ratio=self.restore_ratio, warm_restore_ratio=self.warm_restore_ratio,
                 app_restore_ratio=self.app_restore_ratio,
                 region_restore_ratio=self.region_restore_ratio,
                 restore_and_batch_ratio=self.restore_and_batch_ratio,
                 size_ratio=self.size_ratio, read_size_ratio=self.read_size_ratio)
        return d


def _change(app: App, pages: np.ndarray, rng: np.random.Generator) -> None:
    """Writes 8 random bytes into each of ``pages`` from the main program
    (between batches), half of them, and from a batch, the other half."""
    data = app["data"]
    half = len(pages) // 2
    idx = pages[:half] * PAGE_SIZE + rng.integers(0, PAGE_SIZE - 8, half)
    data[idx] = rng.integers(1, 255, half, dtype=np.uint8)
    app.parallel(_batch_write, 2, args=(pages[half:], int(rng.integers(1, 255))))


def _batch_write(mem, i, n, pages, value):
    mem["data"][pages[i::n] * PAGE_SIZE + 17] = value


def _new_app(size: int, rng: np.random.Generator) -> App:
    app = App(size, backend="threads", workers=2)
    data = app.alloc("data", size, np.uint8)
    step = 64 << 20
    for at in range(0, size, step):  # incompressible contents, the hard case
        data[at: at + step] = rng.integers(0, 256, min(step, size - at), dtype=np.uint8)
    return app


def _evict(folder: str) -> None:
    """Drops the (clean, fsynced) files under ``folder`` from the page cache."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _noop(mem, i, n):
    return None


def checkpoint_costs(size: int = 1 << 30, small_size: int = 64 << 20, fraction: float = 0.01,
                     rounds: int = 5, size_rounds: int = 31, folder: str | None = None,
                     progress: Callable[[str], None] | None = None) -> CheckpointCosts:
    """Runs the comparisons, interleaved round by round so machine noise
    hits both sides alike. ``folder`` (default: a temporary folder under the
    current directory, so on the disk the user works on) holds the
    checkpoints and the np.save files. ``size_rounds``: rounds of the
    small-against-large comparison (a few milliseconds each, so noisy:
    many, alternating which memory goes first)."""
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="pagefork-bench-ckpt-", dir=folder or os.getcwd())
    changed = max(1, int(size // PAGE_SIZE * fraction))
    changed_small = max(1, int(small_size // PAGE_SIZE * fraction))
    increments = 10
    try:
        if progress:
            progress(f"filling a {size >> 20} MiB and a {small_size >> 20} MiB App")
        big, small = _new_app(size, rng), _new_app(small_size, rng)
        try:
            big_target, small_target = os.path.join(work, "big"), os.path.join(work, "small")
            t0 = time.perf_counter()
            big.checkpoint(big_target, base_every=increments)
            base_s = time.perf_counter() - t0
            small.checkpoint(small_target, base_every=increments)
            save_file = os.path.join(work, "whole.npy")
            ckpt, ckpt_bytes, saves, saves_fsync = [], [], [], []
            same_big: list[float] = []
            same_small: list[float] = []
            read_big: list[float] = []
            read_small: list[float] = []
            # A base and 10 increments of 1% each, np.save interleaved.
            for r in range(increments):
                if progress:
                    progress(f"increment {r + 1}: {changed} changed pages; np.save of {size >> 20} MiB")
                _change(big, rng.choice(size // PAGE_SIZE, changed, replace=False), rng)
                info = big.checkpoint(big_target, base_every=increments)
                ckpt.append(info.seconds)
                ckpt_bytes.append(info.bytes_written)
                if r < rounds:
                    t0 = time.perf_counter()
                    np.save(save_file, big["data"])
                    saves.append(time.perf_counter() - t0)
                    with open(save_file, "rb+") as f:
                        os.fsync(f.fileno())
                    saves_fsync.append(time.perf_counter() - t0)
                    os.unlink(save_file)
            # The same number of changed pages in the small and the large App,
            # in rounds alternating which goes first; in a third of them the
            # program first reads all of its memory (mapping every page).
            # Both chains start from a new base first, so the two sides differ
            # in memory size only (the large App's chain was 10 increments
            # longer, and a longer chain's manifests cost more to read and write).
            big.checkpoint(big_target, base_every=0)
            small.checkpoint(small_target, base_every=0)
            for r in range(size_rounds):
                reads = r % 3 == 2
                if progress:
                    progress(f"round {r + 1}: {changed_small} changed pages in {small_size >> 20} MiB "
                             f"and in {size >> 20} MiB{' after reading all of it' if reads else ''}")
                pages = rng.choice(small_size // PAGE_SIZE, changed_small, replace=False)
                sides = [(small, small_target, pages, read_small if reads else same_small),
                         (big, big_target, pages * (size // small_size), read_big if reads else same_big)]
                for app, target, where, out in sides[:: 1 if r % 2 else -1]:
                    _change(app, where, rng)
                    if reads:
                        int(app["data"][::PAGE_SIZE // 2].sum())
                    out.append(app.checkpoint(target, base_every=1 << 30).seconds)
            chain = checkpoint.versions(big_target)[increments].chain_length
            np.save(save_file, big["data"])
            with open(save_file, "rb+") as f:
                os.fsync(f.fileno())
        finally:
            big.close()
            small.close()
        restores, loads, app_loads, warm_restores, warm_loads = [], [], [], [], []
        region_loads: list[float] = []
        first_batches: list[float] = []
        app_first_batches: list[float] = []

        def restore(first_batch: list[float] | None = None) -> float:
            t0 = time.perf_counter()
            with App.restore(big_target, version=increments + 1, backend="threads", workers=1) as app:
                elapsed = time.perf_counter() - t0
                if first_batch is not None:
                    t0 = time.perf_counter()
                    app.parallel(_noop, 1)
                    first_batch.append(time.perf_counter() - t0)
                return elapsed

        def load() -> float:
            t0 = time.perf_counter()
            loaded = np.load(save_file)
            elapsed = time.perf_counter() - t0
            del loaded
            return elapsed

        for r in range(rounds):
            if progress:
                progress(f"round {r + 1}: restore from a base + {chain} increments, np.load")
            # A restart after a kill reads from the disk: both sides start
            # with their files out of the page cache, then read them again
            # from the cache.
            _evict(work)
            loads.append(load())
            warm_loads.append(load())
            _evict(work)
            restores.append(restore())
            warm_restores.append(restore(first_batches))
            _evict(work)
            t0 = time.perf_counter()
            with checkpoint.load(big_target, version=increments + 1):
                region_loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with App(size, backend="threads", workers=1) as fresh:
                fresh.alloc("data", size, np.uint8)[:] = np.load(save_file, mmap_mode="r")
                app_loads.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                fresh.parallel(_noop, 1)
                app_first_batches.append(time.perf_counter() - t0)
        med = statistics.median
        return CheckpointCosts(size, small_size, changed, changed_small, rounds, med(ckpt),
                               int(med(ckpt_bytes)), med(saves), med(saves_fsync), size_rounds,
                               med(same_small), med(same_big), med(read_small), med(read_big),
                               med(restores), chain, med(loads), med(region_loads), med(app_loads),
                               med(first_batches), med(app_first_batches), base_s, med(warm_restores),
                               med(warm_loads))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def len_same(c: CheckpointCosts) -> int:
    """Rounds of the small-against-large comparison without reads."""
    return c.size_rounds - c.size_rounds // 3


def format_checkpoint_report(c: CheckpointCosts) -> str:
    mib = 1 << 20

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    return "\n".join([
        f"  medians of {c.rounds} interleaved rounds; incompressible data; checkpoints fsynced",
        f"  checkpoint, {c.changed_pages} pages (1%) of {c.size // mib} MiB changed "
        f"{c.checkpoint_s * 1e3:8.1f} ms  vs np.save of the whole memory {c.np_save_s * 1e3:.1f} ms: "
        f"1/{c.np_save_s / c.checkpoint_s:.0f}  (goal <= 1/20: {mark(c.save_ratio <= 1 / 20)}; "
        f"np.save + fsync {c.np_save_fsync_s * 1e3:.0f} ms)",
        f"  bytes written {c.checkpoint_bytes / mib:.2f} MiB = {c.bytes_fraction:.2%} of memory  "
        f"(goal <= 2%: {mark(c.bytes_fraction <= 0.02)})",
        f"  restore, base + {c.restore_chain} increments, from the disk {c.restore_s * 1e3:8.1f} ms  vs "
        f"np.load of one copy {c.np_load_s * 1e3:.1f} ms: {c.restore_ratio:.2f}x  (goal <= 1.5x: "
        f"{mark(c.restore_ratio <= 1.5)})",
        f"  the same, files in the page cache {c.warm_restore_s * 1e3:8.1f} ms  vs np.load "
        f"{c.warm_np_load_s * 1e3:.1f} ms: {c.warm_restore_ratio:.2f}x  (goal <= 1.5x: "
        f"{mark(c.warm_restore_ratio <= 1.5)}); vs one copy loaded into a fresh App "
        f"{c.app_load_s * 1e3:.1f} ms: {c.app_restore_ratio:.2f}x",
        f"  the same into a bare Region (checkpoint.load), from the disk {c.region_load_s * 1e3:8.1f} ms: "
        f"{c.region_restore_ratio:.2f}x np.load",
        f"  the first batch after that restore {c.first_batch_s * 1e3:.1f} ms; "
        f"restore + first batch vs np.load into a fresh App + first batch "
        f"{(c.warm_restore_s + c.first_batch_s) * 1e3:.0f} vs "
        f"{(c.app_load_s + c.app_first_batch_s) * 1e3:.0f} ms: {c.restore_and_batch_ratio:.2f}x",
        f"  {c.changed_small} changed pages in {c.size // mib} MiB {c.same_pages_s * 1e3:.1f} ms vs in "
        f"{c.small_size // mib} MiB {c.small_checkpoint_s * 1e3:.1f} ms: {c.size_ratio:.2f}x  "
        f"(goal <= 1.2x: {mark(c.size_ratio <= 1.2)}; medians of {len_same(c)} rounds alternating "
        f"which goes first)",
        f"  the same after the program read all of its memory: {c.read_large_s * 1e3:.1f} ms vs "
        f"{c.read_small_s * 1e3:.1f} ms: {c.read_size_ratio:.2f}x  (cow tracking scans every "
        f"mapped page for the program's writes)",
        f"  (the first, whole checkpoint of {c.size // mib} MiB took {c.base_s * 1e3:.0f} ms)",
    ])


@dataclass(frozen=True)
class IncrementSizes:
    """A base and an increment that changed one value in every page of an
    App, with the default compression and without (two Apps with the same
    bytes): increments follow the bases' rule, compressed when a sample of
    the body compresses, stored raw otherwise."""

    data: str                  # "compressible" (zeros) or "incompressible" (random bytes)
    size: int
    changed_pages: int
    base_bytes: int
    base_s: float
    increment_bytes: int       # compress=DEFAULT_COMPRESS
    increment_s: float
    raw_increment_bytes: int   # compress=None
    raw_increment_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def increment_sizes(size: int, data: str, folder: str | None = None) -> IncrementSizes:
    """Measures one base and one increment of ``data`` ("compressible" or
    "incompressible") in a ``size``-byte App, compressed and raw."""
    if data not in ("compressible", "incompressible"):
        raise ValueError(f"data is 'compressible' or 'incompressible', not {data!r}")
    work = tempfile.mkdtemp(prefix="pagefork-bench-incr-", dir=folder or os.getcwd())
    results = []
    try:
        for compress in (1, None):
            rng = np.random.default_rng(0)
            with App(size, backend="threads", workers=1) as app:
                values = app.alloc("data", size // 8, np.float64)
                if data == "incompressible":
                    values[:] = rng.random(values.size)
                target = os.path.join(work, f"compress-{compress}")
                base = app.checkpoint(target, compress=compress)
                values[:: PAGE_SIZE // 8] += 1.0  # one value in every page
                increment = app.checkpoint(target, compress=compress, base_fraction=2.0)
                results.append((base, increment))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (base, increment), (_, raw) = results
    return IncrementSizes(data, size, increment.pages, base.bytes_written, base.seconds,
                          increment.bytes_written, increment.seconds, raw.bytes_written, raw.seconds)


def format_increment_sizes(rows: list[IncrementSizes]) -> str:
    mib = 1 << 20
    lines = []
    for r in rows:
        lines.append(
            f"  {r.data:>14}, {r.size // mib} MiB, one value changed in each of {r.changed_pages} pages: "
            f"base {r.base_bytes / 1024:.1f} KiB ({r.base_s * 1e3:.1f} ms); increment "
            f"{r.increment_bytes / 1024:.1f} KiB ({r.increment_s * 1e3:.1f} ms) vs "
            f"{r.raw_increment_bytes / 1024:.1f} KiB stored raw ({r.raw_increment_s * 1e3:.1f} ms): "
            f"{r.raw_increment_bytes / r.increment_bytes:.1f}x smaller")
    return "\n".join(lines)
