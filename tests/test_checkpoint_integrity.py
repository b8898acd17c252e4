"""Checkpoint chains stay exact and damaged targets are refused: one
tracker saved to two targets, crafted manifests and objects (memory bombs),
damaged or odd targets on the CLI, writers racing for a version number, and
App chains across growth and interrupted batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, App, CorruptDataError, Region
from pagefork import _checkpoint_versions as _chain
from pagefork import checkpoint as ck
from pagefork._checkpoint_format import Manifest

from support import SANITIZED

ROOT = Path(__file__).resolve().parent.parent


def reset_modes() -> list[str]:
    support = pagefork.probe()
    return [m for m in ("uffd-async", "uffd", "segfault") if support[m].available]


@pytest.mark.parametrize("mode", reset_modes())
def test_one_tracker_saving_to_two_targets_alternately_keeps_both_chains_exact(tmp_path, mode):
    # A save re-arms the tracker: the pages it took for target B must not be
    # missing from target A's next increment.
    a, b = tmp_path / "a", tmp_path / "b"
    region = Region(16 * PAGE_SIZE)
    t = pagefork.tracker(mode)
    t.start(region)
    try:
        data = np.frombuffer(region, np.uint8)
        for step in range(6):
            data[(step % 16) * PAGE_SIZE] = step + 1
            ck.save(region, a if step % 2 == 0 else b, tracker=t)
            data[((step + 5) % 16) * PAGE_SIZE + 7] = 100 + step
        ck.save(region, a, tracker=t)
        ck.save(region, b, tracker=t)
        expected = bytes(memoryview(region))
        for target in (a, b):
            for v in (x.version for x in ck.versions(target)):
                loaded = ck.load(target, version=v)
                loaded.close()
            loaded = ck.load(target)
            try:
                assert bytes(memoryview(loaded)) == expected, target
            finally:
                loaded.close()
    finally:
        t.stop(region)
        region.close()


# ---- crafted manifests and objects ---------------------------------------------------

def _three_versions(path: Path, compress: int | None = 1) -> Region:
    """v1 base, v2 increment, v3 increment of a compressible region."""
    region = Region(8 * PAGE_SIZE)
    t = pagefork.tracker(reset_modes()[0])
    t.start(region)
    data = np.frombuffer(region, np.uint8)
    ck.save(region, path, tracker=t, compress=compress)
    data[3 * PAGE_SIZE: 5 * PAGE_SIZE] = 7
    ck.save(region, path, tracker=t, compress=compress)
    data[6 * PAGE_SIZE + 1] = 9
    ck.save(region, path, tracker=t, compress=compress)
    t.stop(region)
    return region


def _rewrite_manifest(path: Path, version: int, change) -> None:
    name = path / f"v{version:010d}.json"
    manifest = Manifest.decode(name.read_bytes())
    change(manifest)
    name.write_bytes(manifest.encode())  # a valid checksum: only the claims are false


_BOMB = textwrap.dedent("""
    import sys
    # The peak from here: ru_maxrss would carry the peak of the process that
    # forked this one (Linux keeps it across exec), e.g. a large pytest.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    from pagefork import CorruptDataError
    from pagefork import checkpoint as ck
    target, version = sys.argv[1], int(sys.argv[2])
    try:
        ck.load(target, version=version)
    except CorruptDataError as exc:
        assert exc.version == version, exc
        print("load", exc.object)
    for v, name, why in ck.verify(target):
        if why is not None:
            print("verify", name)
    print("rss", next(int(line.split()[1]) for line in open("/proc/self/status")
                      if line.startswith("VmHWM:")) // 1024)
""")


def _run_bomb(path: Path, version: int) -> list[str]:
    # A size taken on trust fails the run with MemoryError instead of swapping
    # the machine. ASan maps terabytes of shadow, so an address-space limit
    # would kill it at start; under it, its own allocation cap bounds the run
    # (and its quarantine makes RSS meaningless).
    env = dict(os.environ)
    if SANITIZED:
        limit = ""
        env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "")
                               + ":allocator_may_return_null=1:max_allocation_size_mb=3072")
    else:
        limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    out = subprocess.run([sys.executable, "-c", limit + _BOMB, str(path), str(version)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    if not SANITIZED:
        assert int(lines[-2].split()[1]) < 400, out.stdout  # MiB: nothing near the claimed sizes
    return lines[:-2]


@pytest.mark.parametrize("which", [-1, 0])
@pytest.mark.parametrize("claim", [1 << 31, 1 << 40, (1 << 62) - 1])
def test_a_manifest_claiming_a_huge_object_size_is_corrupt_data_not_a_memory_bomb(
        tmp_path, which, claim):
    # Increment (-1) and compressed base (0): nothing is allocated at the
    # claimed size; the object is damage named by version and object.
    _three_versions(tmp_path).close()

    def change(m: Manifest) -> None:
        m.objects[which].size = claim

    _rewrite_manifest(tmp_path, 3, change)
    name = Manifest.decode((tmp_path / "v0000000003.json").read_bytes()).objects[which].name
    lines = _run_bomb(tmp_path, 3)
    assert lines[0] == f"load {name}"
    assert f"verify {name}" in lines[1:]


def test_an_object_claiming_a_memory_larger_than_its_version_is_corrupt_data(tmp_path):
    # An increment header claiming a 16 GiB memory (and a zstd frame to
    # match) inside a version of 8 pages: refused before decompressing.
    import zstandard

    from pagefork import _native
    from pagefork._checkpoint_format import HEADER, MAGIC, VERSION, KIND_PAGES, FLAG_ZSTD

    _three_versions(tmp_path).close()
    manifest = Manifest.decode((tmp_path / "v0000000003.json").read_bytes())
    ref = manifest.objects[-1]
    body_len = 1 << 34
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=body_len)
    frame = cobj.compress(bytes(1 << 20)) + b""  # a prefix: its header claims 16 GiB
    blob = HEADER.pack(MAGIC, VERSION, KIND_PAGES, FLAG_ZSTD, body_len, body_len) + frame
    (tmp_path / ref.name).write_bytes(blob)

    def change(m: Manifest) -> None:
        m.objects[-1].size = len(blob)
        m.objects[-1].crc32c = _native.crc32c(blob)

    _rewrite_manifest(tmp_path, 3, change)
    lines = _run_bomb(tmp_path, 3)
    assert lines[0] == f"load {ref.name}"


# ---- odd things in the target folder ----------------------------------------------------

_ODD = textwrap.dedent("""
    import json, sys
    from pagefork import CorruptDataError
    from pagefork import checkpoint as ck
    target = sys.argv[1]
    try:
        ck.load(target).close()
        print(json.dumps(["loaded"]))
    except CorruptDataError as exc:
        print(json.dumps([exc.version, exc.object]))
    print(json.dumps([[v, n] for v, n, why in ck.verify(target) if why is not None]))
""")


@pytest.mark.parametrize("what", ["fifo", "directory", "device"])
@pytest.mark.parametrize("which", ["manifest", "object"])
def test_a_non_file_in_the_target_is_corrupt_data_and_never_blocks(tmp_path, what, which):
    # A FIFO would block open() forever; a directory raised IsADirectoryError;
    # /dev/zero never ends. Each is damage named by version and object.
    region = Region(4 * PAGE_SIZE)
    np.frombuffer(region, np.uint8)[:] = 5
    ck.save(region, tmp_path, compress=None)
    ck.save(region, tmp_path, compress=None)
    region.close()
    name = "v0000000002.json" if which == "manifest" else \
        next(p.name for p in tmp_path.iterdir() if p.name.startswith("v0000000002-"))
    path = tmp_path / name
    path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    elif what == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    out = subprocess.run([sys.executable, "-c", _ODD, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded, bad = (json.loads(line) for line in out.stdout.splitlines())
    assert loaded == [2, name]
    assert bad == [[2, name]]
    for command in ("ls", "verify"):
        run = subprocess.run([sys.executable, "-m", "pagefork.cli", "checkpoint", command,
                              str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in run.stderr, run.stderr
        if command == "verify":
            assert run.returncode == 1 and name in run.stdout + run.stderr
        elif which == "manifest":  # listed as damaged, with the other versions
            assert run.returncode == 0 and name in run.stdout and "damaged" in run.stdout, run.stdout


def test_a_deeply_nested_manifest_is_corrupt_data(tmp_path):
    region = Region(PAGE_SIZE)
    ck.save(region, tmp_path)
    region.close()
    (tmp_path / "v0000000002.json").write_bytes(b"[" * 100000 + b"]" * 100000)
    with pytest.raises(CorruptDataError) as info:
        ck.load(tmp_path)
    assert (info.value.version, info.value.object) == (2, "v0000000002.json")
    ck.load(tmp_path, version=1).close()


@pytest.mark.parametrize("mode", reset_modes())
@pytest.mark.parametrize("how", ["stop-start", "reset", "stopped"])
def test_a_tracker_interrupted_between_saves_starts_a_new_chain(tmp_path, mode, how):
    # start() and reset() clear the flags and a stopped tracker sees nothing:
    # an increment built on them would miss pages, so the save writes a base.
    region = Region(8 * PAGE_SIZE)
    data = np.frombuffer(region, np.uint8)
    t = pagefork.tracker(mode)
    t.start(region)
    ck.save(region, tmp_path, tracker=t)
    data[1 * PAGE_SIZE] = 1           # flagged, then lost by start/reset
    if how == "stop-start":
        t.stop(region)
        data[2 * PAGE_SIZE] = 2       # never seen
        t.start(region)
    elif how == "reset":
        t.reset()
    else:
        t.stop(region)
        data[2 * PAGE_SIZE] = 2
    data[3 * PAGE_SIZE] = 3
    info = ck.save(region, tmp_path, tracker=t)
    assert info.base
    loaded = ck.load(tmp_path)
    assert bytes(memoryview(loaded)) == bytes(memoryview(region))
    loaded.close()
    if how != "stopped":
        data[4 * PAGE_SIZE] = 4       # an unbroken chain again: an exact increment
        info = ck.save(region, tmp_path, tracker=t)
        assert not info.base and info.pages == 1
        loaded = ck.load(tmp_path)
        assert bytes(memoryview(loaded)) == bytes(memoryview(region))
        loaded.close()
    t.close()
    region.close()


# ---- a target another writer refilled -------------------------------------------------

def test_an_app_never_builds_on_a_version_another_writer_wrote_at_the_same_number(tmp_path):
    import shutil

    with App(16 * PAGE_SIZE, backend="threads") as first, \
            App(16 * PAGE_SIZE, backend="threads") as second:
        x = first.alloc("x", 16 * PAGE_SIZE, np.uint8)
        second.alloc("x", 16 * PAGE_SIZE, np.uint8)[:] = 9
        x[:] = 1
        first.checkpoint(tmp_path)
        shutil.rmtree(tmp_path)           # the target emptied ...
        second.checkpoint(tmp_path)       # ... and refilled: a version 1 with other bytes
        x[0] = 2
        info = first.checkpoint(tmp_path)
        assert info.base and info.version == 2
        expected = bytes(first.memory)
    with App.restore(tmp_path, backend="threads") as back:
        assert bytes(back.memory) == expected


@pytest.mark.parametrize("mode", reset_modes()[:1])
def test_a_region_never_builds_on_a_version_another_writer_wrote_at_the_same_number(tmp_path, mode):
    import shutil

    region, other = Region(8 * PAGE_SIZE), Region(8 * PAGE_SIZE)
    np.frombuffer(other, np.uint8)[:] = 9
    t = pagefork.tracker(mode)
    t.start(region)
    ck.save(region, tmp_path, tracker=t)
    shutil.rmtree(tmp_path)
    ck.save(other, tmp_path)
    np.frombuffer(region, np.uint8)[0] = 2
    assert ck.save(region, tmp_path, tracker=t).base
    loaded = ck.load(tmp_path)
    assert bytes(memoryview(loaded)) == bytes(memoryview(region))
    for r in (loaded, region, other):
        r.close()
    t.close()


def test_verify_reports_a_memory_size_no_restore_could_map_and_checks_the_rest(tmp_path):
    _three_versions(tmp_path).close()

    def change(m: Manifest) -> None:
        m.size = m.max_size = 1 << 61

    _rewrite_manifest(tmp_path, 1, change)
    results = list(ck.verify(tmp_path))
    bad = [(v, name) for v, name, why in results if why is not None]
    assert len(bad) == 1 and bad[0][0] == 1 and bad[0][1].endswith(".base")
    assert len(results) == 3 + 3  # every manifest and every object was looked at
    ck.load(tmp_path, version=3).close()


@pytest.mark.parametrize("option, value, error", [
    ("base_every", 2.5, TypeError), ("base_every", True, TypeError), ("base_every", -1, ValueError),
    ("base_fraction", float("nan"), ValueError), ("base_fraction", "1", TypeError),
    ("keep", 1.5, TypeError), ("keep", 0, ValueError),
    ("compress", 23, ValueError), ("compress", -(1 << 20), ValueError), ("compress", True, TypeError),
    ("compress", 2.0, TypeError)])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, option, value, error):
    region = Region(PAGE_SIZE)
    with pytest.raises(error, match=option):
        ck.save(region, tmp_path, **{option: value})
    with App(PAGE_SIZE, backend="threads") as app:
        with pytest.raises(error, match=option):
            app.checkpoint(tmp_path, **{option: value})
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
    region.close()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_commit_never_replaces_a_version_another_writer_committed(tmp_path, monkeypatch, where):
    # Two writers picking the same version number (one writer per target is
    # the rule; a second process breaks it): the later commit fails loudly
    # instead of silently replacing the first writer's version.
    import uuid

    target = tmp_path / "t" if where == "local" else f"memory://atk-{uuid.uuid4().hex}"
    region = Region(4 * PAGE_SIZE)
    np.frombuffer(region, np.uint8)[:] = 1
    ck.save(region, target)
    before = ck.load(target)
    np.frombuffer(region, np.uint8)[:] = 2
    real = _chain.manifests
    monkeypatch.setattr(_chain, "manifests", lambda store: {})  # blind to version 1: picks it again
    with pytest.raises(pagefork.PageforkError, match="another writer"):
        ck.save(region, target)
    monkeypatch.setattr(_chain, "manifests", real)
    after = ck.load(target)
    assert bytes(memoryview(after)) == bytes(memoryview(before))
    assert [v.version for v in ck.versions(target)] == [1]
    assert ck.save(region, target).version == 2  # and the orphan it left is cleaned
    assert not [why for _, _, why in ck.verify(target) if why]
    for r in (before, after, region):
        r.close()
