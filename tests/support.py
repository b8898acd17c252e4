"""What the tests share, defined once: the subprocess runner, probes of
this process (descriptors, RSS, VMA flags), small memory and tracking
helpers, the merge type/operation pairs, the reduce model's arrays, and the
scripts' SIGINT prelude. Test modules import from here (or take conftest's
fixtures), never from one another (test_module_layout checks that)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, DataType, MergeOp, MergeRegion, Region

import reference

# ---- the environment -------------------------------------------------------------------


def _asan_loaded() -> bool:
    return hasattr(ctypes.CDLL(None), "__asan_init")


#: True under AddressSanitizer (`make test-sanitize`). Its quarantine holds on
#: to freed memory, so RSS growth says nothing about leaks there; tests that
#: measure RSS skip that check, and LeakSanitizer checks instead (conftest).
SANITIZED = _asan_loaded()


def growth_rounds(rounds: int) -> int:
    """How many rounds a test that checks for growth runs: ``rounds``, or a
    tenth under ASan. There RSS is not checked (the quarantine keeps freed
    memory) and LeakSanitizer reports memory lost in one round as surely as
    in a thousand; a descriptor lost per round shows after any number."""
    return max(1, rounds // 10) if SANITIZED else rounds


def require(mode: str | None) -> None:
    """Skips the test with the probe's reason when ``mode`` cannot work here
    (None, an App's default, always can)."""
    if mode is None:
        return
    support = pagefork.probe()[mode]
    if not support.available:
        pytest.skip(f"{mode} unavailable: {support.reason}")


def unprivileged_prefix() -> list[str]:
    """The command prefix that runs a process in user-mode-only userfaultfd,
    or skips with why that cannot happen here."""
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    if sysctl.exists() and sysctl.read_text().strip() != "0":
        pytest.skip("vm.unprivileged_userfaultfd=1: every process may handle kernel faults")
    err = pagefork._native.uffd_probe()[0]
    if err:
        pytest.skip(f"userfaultfd cannot be opened here: {os.strerror(err)}")
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop CAP_SYS_PTRACE")
    return [setpriv, "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]


#: The modes that see writes ("none" reports every page; cow needs a snapshot's memory).
SEEING_MODES = ["segfault", "uffd", "uffd-async"]


#: The kinds of memory a Region maps, by name.
KINDS = {
    "anon-private": dict(shared=False, backing="anonymous"),
    "anon-shared": dict(shared=True, backing="anonymous"),
    "memfd-private": dict(shared=False, backing="memfd"),
    "memfd-shared": dict(shared=True, backing="memfd"),
}


def kind_supports(mode: str, kind: str) -> bool:
    """cow tracks only private memfd (snapshot) mappings."""
    return mode != "cow" or kind == "memfd-private"


def make_region(kind: str, pages: int = 16, max_pages: int | None = None) -> Region:
    """A region of ``pages`` pages of memory ``kind`` (see KINDS)."""
    max_size = None if max_pages is None else max_pages * PAGE_SIZE
    return Region(pages * PAGE_SIZE, max_size=max_size, **KINDS[kind])


def remap(region: Region) -> None:
    """Maps a memfd region's file over it again (how cow tracking is re-armed)."""
    region._map_file(region._fd, region.size, region.shared)


# ---- subprocesses ----------------------------------------------------------------------


def run_python(script: str, *args: object, timeout: float = 300, prelude: str = "",
               flags: tuple[str, ...] = (), prefix: tuple[str, ...] | list[str] = (),
               cwd: Path | str | None = None, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Runs ``prelude`` + ``script`` (dedented) in a fresh interpreter, with
    ``args`` as sys.argv[1:], interpreter ``flags``, a command ``prefix`` and
    the environment ``env`` (None: this one):
    a crash or a hang shows as an exit status or TimeoutExpired instead of
    taking pytest down. The timeout only bounds a hang (the machine may be
    loaded and sanitized), it asserts nothing about speed."""
    return subprocess.run([*prefix, sys.executable, *flags, "-c", prelude + textwrap.dedent(script),
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m pagefork.cli args`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "pagefork.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


#: Prepended to scripts that press Ctrl-C on themselves: ``on_sigint`` (to
#: install with signal.signal) raises KeyboardInterrupt only while the
#: script's global ``inside`` is true, so a signal landing after a round
#: ended does not end the script; ``burst(count, pause)`` sends ``count``
#: SIGINTs ``pause`` seconds apart (Ctrl-C once, or several times quickly).
SIGINT_PRELUDE = """\
import os as _os, signal as _signal, time as _time

inside = False


def on_sigint(signum, frame):
    if inside:
        raise KeyboardInterrupt


def burst(count, pause=0.002):
    for _ in range(count):
        _os.kill(_os.getpid(), _signal.SIGINT)
        _time.sleep(pause)

"""


# ---- this process ----------------------------------------------------------------------


def open_fds() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    """This process's resident set size (VmRSS), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _smaps_flags() -> list[tuple[int, int, list[str]]]:
    """(start, end, VmFlags) of every mapping of this process."""
    found: list[tuple[int, int, list[str]]] = []
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, []))
            elif fields and fields[0] == "VmFlags:" and found:
                found[-1][2].extend(fields[1:])
    return found


def vma_flags(address: int) -> list[str]:
    """The VmFlags (smaps' two-letter codes) of the mapping holding ``address``."""
    for start, end, flags in _smaps_flags():
        if start <= address < end:
            return flags
    raise AssertionError(f"no mapping holds {address:#x}")


def vma_flags_within(start: int, end: int) -> list[list[str]]:
    """The VmFlags of every mapping that begins in [start, end)."""
    return [flags for lo, _, flags in _smaps_flags() if start <= lo < end]


_libc = ctypes.CDLL(None, use_errno=True)


def madvise(region: Region, first: int, count: int, advice: int) -> None:
    """madvise(2) on ``count`` pages of ``region`` from page ``first``."""
    if _libc.madvise(ctypes.c_void_p(region.address + first * PAGE_SIZE),
                     ctypes.c_size_t(count * PAGE_SIZE), advice) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


# ---- tracking --------------------------------------------------------------------------


def write_pages(region: Region, pages, value: int = 1, offset: int = 0) -> None:
    """Writes ``value`` at byte ``offset`` of each of ``pages``."""
    a = region.array(np.uint8)
    a[np.asarray(list(pages), dtype=np.int64) * PAGE_SIZE + offset] = value


def as_set(flags: np.ndarray) -> set[int]:
    """The indices of a page-flag array's set flags."""
    assert flags.dtype == np.bool_
    return set(np.flatnonzero(flags).tolist())


def expected(mode: str, pages, n: int) -> set[int]:
    """The pages ``mode`` reports after ``pages`` of ``n`` were written
    ("none" reports every page)."""
    return set(range(n)) if mode == "none" else set(pages)


# ---- merges ----------------------------------------------------------------------------


def _valid_pairs():
    for dtype in dict.fromkeys(DataType):  # aliases collapse
        for op in MergeOp:
            try:
                MergeRegion(0, 8, dtype, op)
            except ValueError:
                continue
            yield dtype, op


#: Every (data type, merge operation) a merge region accepts.
PAIRS = list(_valid_pairs())


def same_modulo_nan_payloads(got: bytes, want: bytes, float_ranges) -> bool:
    """Bytes equal, except that two NaNs count as equal inside float ranges
    (IEEE 754 leaves the payload of NaN arithmetic open; numpy and C differ)."""
    if got == want:
        return True
    if len(got) != len(want):
        return False
    a, b = np.frombuffer(got, np.uint8).copy(), np.frombuffer(want, np.uint8).copy()
    for start, end, dtype in float_ranges:
        x = a[start:end].view(dtype.numpy)
        y = b[start:end].view(dtype.numpy)
        both_nan = np.isnan(x) & np.isnan(y)
        x[both_nan] = y[both_nan] = 0
    return bool(np.array_equal(a, b))


def float_ranges_of(batch) -> list:
    """(start, end, dtype) of a batch's diffs whose float arithmetic may
    leave NaN payloads open."""
    return [(d.offset, d.offset + len(d.data), d.dtype) for d in batch
            if d.dtype in (DataType.FLOAT32, DataType.FLOAT64) and d.op not in
            (MergeOp.OVERWRITE, MergeOp.XOR, MergeOp.IGNORE)]


# ---- the reduce model (test_reduce, test_dask) -----------------------------------------

#: name, dtype, elements, merge: combinable ones and ones that must stay per thread.
ARRAYS = [
    ("isum", "i8", 700, "sum"), ("isub", "i4", 900, "subtract"), ("umin", "u1", 5000, "min"),
    ("imax", "i2", 1500, "max"), ("bmax", "?", 3000, "max"), ("fxor", "f8", 300, "xor"),
    ("fsum", "f8", 600, "sum"), ("iprod", "i8", 300, "product"), ("fmin", "f4", 900, "min"),
    ("raw", "u1", 3000, "overwrite"),
]


def write_arrays(mem, i, n, seed):
    """Thread i: random values at random places of every array, and reads
    of everything (returned), so isolation is checked too."""
    rng = np.random.default_rng([seed, i])
    seen = {}
    for name, dtype, count, merge in ARRAYS:
        a = mem[name]
        seen[name] = a.tobytes()
        k = int(rng.integers(0, 4))
        if k == 0:
            continue
        if k == 3:
            idx = np.arange(count)  # the whole array
        else:
            idx = np.unique(rng.integers(0, count, int(rng.integers(1, 40))))
        if merge == "product":
            a[idx] = a[idx] * rng.choice([-3, -2, -1, 2, 3], idx.size)  # whole multiples only
        elif dtype == "?":
            a[idx] = rng.integers(0, 2, idx.size).astype(bool)
        elif dtype.startswith("f"):
            a[idx] = rng.normal(0, 100, idx.size).astype(dtype)
        else:
            info = np.iinfo(dtype)
            a[idx] = rng.integers(info.min, info.max, idx.size, dtype=dtype, endpoint=True)
    return seen


class _Views:
    def __init__(self, buf: bytearray, layout):
        self._buf, self._layout = buf, layout

    def __getitem__(self, name):
        a = self._layout[name]
        return np.frombuffer(self._buf, a.dtype, int(np.prod(a.shape)), a.offset).reshape(a.shape)


def expected_arrays(app, before: bytes, n: int, seed: int) -> bytes:
    """The memory after ``n`` threads of write_arrays merged, thread by
    thread, by the reference."""
    regions = app._executor.merge_regions(app._layout)
    dirty = np.ones(len(before) // PAGE_SIZE, bool)
    out = before
    for i in range(n):
        mem = bytearray(before)
        write_arrays(_Views(mem, app._layout), i, n, seed)
        out = reference.apply(out, reference.diff(before, bytes(mem), dirty, regions))
    return out


# ---- graphs ----------------------------------------------------------------------------


def cycles_in(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of ``graph`` (node -> nodes it points
    to) closes, as "a -> b -> a"; empty when it is acyclic. Used for the
    package's imports and the C files' calls."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]))
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


_MOTO = textwrap.dedent("""
    import sys
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server._server.server_port, flush=True)
    sys.stdin.read()  # until the test closes it
""")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in a process of its own (the objects it keeps stay
    out of the test process, whose children's peaks tests measure); yields
    its URL. Skips where s3fs or moto's server is not installed."""
    pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'pagefork[test]'")
    pytest.importorskip("moto.server", reason="S3 tests need moto[server]: pip install 'pagefork[test]'")
    server = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
