"""Checkpoint details: compressed increments, file URLs as RFC 8089 spells
them, damaged old versions listed rather than fatal, layouts checked as
alloc checks them, readers racing a pruning writer, loads into memory a
tracker protects, and broken symbolic links as targets."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import pagefork
from pagefork import PAGE_SIZE, App, CorruptDataError, Region
from pagefork import _checkpoint_format as fmt
from pagefork import checkpoint as ck
from pagefork._checkpoint_store import LocalStore
from pagefork.cli import main as cli

from support import require


def objects(path: Path, suffix: str) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name.endswith(suffix))


def stored_flags(path: Path) -> int:
    """The flags of a data object's header (FLAG_ZSTD: its body is compressed)."""
    with open(path, "rb") as f:
        return fmt.HEADER.unpack(f.read(fmt.HEADER.size))[3]


def reset_mode() -> str:
    """A tracking mode whose dirty_pages(reset=True) works here."""
    support = pagefork.probe()
    return next(m for m in ("uffd-async", "uffd", "segfault", "none") if support[m].available)


# ---- increments are compressed like bases (item 13) ------------------------------------

@pytest.mark.parametrize("data", ["compressible", "incompressible"])
def test_app_increments_follow_the_bases_compression_rule(tmp_path, data):
    """One changed value per page of a zero-heavy array compresses (it wrote
    the whole 16 MiB before); random pages are stored raw, base or increment."""
    rng = np.random.default_rng(5)
    with App("16MiB", backend="threads", workers=1) as app:
        a = app.alloc("a", (16 << 20) // 8, np.float64)
        if data == "incompressible":
            a[:] = rng.random(a.size)
        base = app.checkpoint(tmp_path)
        if data == "compressible":
            a[:: PAGE_SIZE // 8] += 1.5  # one value per page
        else:
            a[:] = rng.random(a.size)
        increment = app.checkpoint(tmp_path, base_fraction=2.0)
        expected = bytes(app.memory)
    assert base.base and not increment.base and increment.pages == (16 << 20) // PAGE_SIZE
    (incr,) = objects(tmp_path, ".incr")
    (base_object,) = objects(tmp_path, ".base")
    if data == "compressible":
        assert stored_flags(incr) == fmt.FLAG_ZSTD == stored_flags(base_object)
        assert increment.bytes_written < 512 << 10, increment  # was 16 MiB
    else:
        assert stored_flags(incr) == 0 == stored_flags(base_object)
        assert increment.bytes_written > 16 << 20
    with App.restore(tmp_path, backend="threads") as back:
        assert bytes(back.memory) == expected


@pytest.mark.parametrize("data", ["compressible", "incompressible"])
def test_region_increments_follow_the_bases_compression_rule(tmp_path, data):
    pages = 256
    rng = np.random.default_rng(9)
    with Region(pages * PAGE_SIZE) as region, pagefork.tracker(reset_mode()) as t:
        t.start(region)
        values = np.frombuffer(region, np.uint64)
        ck.save(region, tmp_path, tracker=t)
        if data == "compressible":
            values[:: PAGE_SIZE // 8] = np.arange(pages) + 7
        else:
            values[:] = rng.integers(0, 1 << 63, values.size, dtype=np.uint64)
        info = ck.save(region, tmp_path, tracker=t, base_fraction=2.0)
        expected = bytes(region)
        t.stop(region)
    assert not info.base and info.pages == pages
    (incr,) = objects(tmp_path, ".incr")
    assert stored_flags(incr) == (fmt.FLAG_ZSTD if data == "compressible" else 0)
    assert (info.bytes_written < pages * PAGE_SIZE // 10) == (data == "compressible")
    with ck.load(tmp_path) as back:
        assert bytes(back) == expected


def test_the_compression_sample_covers_an_increments_whole_body():
    """Not its last piece (the 4-byte checksum): zero pages are worth
    compressing, random ones are not."""
    with Region(64 * PAGE_SIZE) as region:
        body = fmt.pages_body(memoryview(region).cast("B"), region.size, np.ones(64, np.bool_))
        writer = fmt.ObjectWriter(fmt.KIND_PAGES, region.size, body, 1)
        assert writer.level == 1
        noisy = np.frombuffer(region, np.uint8)
        noisy[:] = np.random.default_rng(1).integers(0, 256, noisy.size, dtype=np.uint8)
        body = fmt.pages_body(memoryview(region).cast("B"), region.size, np.ones(64, np.bool_))
        assert fmt.ObjectWriter(fmt.KIND_PAGES, region.size, body, 1).level is None


# ---- file URLs (item 14) ------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["file://localhost{path}", "file:{path}", "file://{path}",
                                      "file://LOCALHOST{path}"])
def test_file_url_spellings_name_the_absolute_folder(tmp_path, monkeypatch, spelling):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    folder = tmp_path / "with space" / "ckpt"
    url = spelling.format(path=str(folder).replace(" ", "%20"))
    with Region(2 * PAGE_SIZE) as region:
        np.frombuffer(region, np.uint8)[:] = 3
        ck.save(region, url)
    assert (folder / "v0000000001.json").exists()
    assert list(cwd.iterdir()) == [], "wrote under the working directory"
    assert [v.version for v in ck.versions(url)] == [1]
    with ck.load(url) as back:
        assert bytes(back) == bytes([3]) * 2 * PAGE_SIZE


@pytest.mark.parametrize("url, why", [("file://example.com{path}/x", "host"),
                                      ("file:relative/x", "absolute"),
                                      ("file://{path}/x?v=1", "query"),
                                      ("file://{path}/x#top", "fragment")])
def test_file_urls_a_local_folder_cannot_be(tmp_path, monkeypatch, url, why):
    monkeypatch.chdir(tmp_path)
    with Region(PAGE_SIZE) as region, pytest.raises(ValueError, match=why):
        ck.save(region, url.format(path=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_plain_path_keeps_its_percent_signs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Region(PAGE_SIZE) as region:
        ck.save(region, "a%20b")
    assert (tmp_path / "a%20b" / "v0000000001.json").exists()


# ---- a damaged old version (item 15) -------------------------------------------------------

@pytest.fixture
def three_app_versions(tmp_path):
    """Versions 1 (base), 2 and 3 (increments) of an App, and main memory at each."""
    seen = {}
    with App("64KiB", backend="threads", workers=1) as app:
        a = app.alloc("a", 64, np.int64)
        for v in (1, 2, 3):
            a[v] = v * 11
            app.checkpoint(tmp_path)
            seen[v] = bytes(app.memory)
    return tmp_path, seen


def test_a_damaged_old_manifest_is_listed_as_damaged(three_app_versions, capsys):
    path, seen = three_app_versions
    (path / "v0000000001.json").write_text("{ not json")
    listed = ck.versions(path)
    assert [(v.version, v.damaged is None) for v in listed] == [(1, False), (2, True), (3, True)]
    assert "v0000000001.json" in listed[0].damaged and "damaged" in listed[0].damaged
    assert (listed[2].base, listed[2].chain_length, listed[2].kind) == (False, 2, "app")
    # The README's resume idiom: there are versions, and the newest restores.
    with App.restore(path, backend="threads") as back:
        assert bytes(back.memory) == seen[3]
    assert cli(["checkpoint", "ls", str(path)]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "incr" in out
    assert cli(["checkpoint", "ls", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [1, 2, 3] and rows[0]["damaged"] and rows[2]["damaged"] is None


@pytest.mark.parametrize("damage", ["manifest", "object", "object missing"])
def test_app_restore_takes_the_newest_restorable_version(three_app_versions, damage):
    path, seen = three_app_versions
    if damage == "manifest":
        (path / "v0000000003.json").write_bytes(b"\0" * 10)
    else:
        (victim,) = [p for p in objects(path, ".incr") if p.name.startswith("v0000000003")]
        if damage == "object":
            raw = bytearray(victim.read_bytes())
            raw[-2] ^= 1
            victim.write_bytes(bytes(raw))
        else:
            victim.unlink()
    with pytest.warns(RuntimeWarning, match=r"version 3 .*restored version 2"):
        back = App.restore(path, backend="threads")
    with back:
        assert bytes(back.memory) == seen[2]
        back["a"][9] = 9
        assert back.checkpoint(path).base  # a new chain: version 3 is not its parent
    with pytest.raises(CorruptDataError, match="version 3"):
        App.restore(path, version=3, backend="threads")


def test_app_restore_with_nothing_restorable_names_the_newest(three_app_versions):
    path, _ = three_app_versions
    for manifest in objects(path, ".json"):
        manifest.write_text("{}")
    with pytest.raises(CorruptDataError, match="version 3"):
        App.restore(path, backend="threads")


# ---- layouts that alloc refuses (item 16) ----------------------------------------------------

@pytest.mark.parametrize("forgery, why", [
    (lambda arrays: arrays[0].update(dtype="|O"), "Python objects"),
    (lambda arrays: arrays[0].update(shape=[-3]), "negative"),
    (lambda arrays: arrays[0].update(name=""), "name"),
    (lambda arrays: arrays[0].update(name="b"), "already"),
    (lambda arrays: arrays[1].update(offset=arrays[0]["offset"] + 8), "overlap"),
    (lambda arrays: arrays[1].update(offset=arrays[1]["offset"] + 1), "align"),
    (lambda arrays: arrays[0].update(dtype="<U0"), "no size"),
    (lambda arrays: arrays[0].update(name=7), "name"),
], ids=["object dtype", "negative shape", "empty name", "duplicate name", "overlapping",
        "misaligned", "zero-size dtype", "name not text"])
def test_a_restore_refuses_a_layout_alloc_would_refuse(tmp_path, forgery, why):
    with App("64KiB", backend="threads") as app:
        app.alloc("a", 10, np.int64)
        app.alloc("b", 10, np.float64)
        app.checkpoint(tmp_path)
    path = tmp_path / "v0000000001.json"
    manifest = fmt.Manifest.decode(path.read_bytes())
    forgery(manifest.app["arrays"])  # type: ignore[index]
    path.write_bytes(manifest.encode())  # its checksum recomputed: only the layout is wrong
    with pytest.raises(CorruptDataError, match=f"layout.*{why}"):
        App.restore(tmp_path, backend="threads")


def test_a_restore_refuses_a_top_below_an_array(tmp_path):
    """The next alloc would be placed on top of an array."""
    with App("64KiB", backend="threads") as app:
        app.alloc("a", 100, np.int64)
        app.checkpoint(tmp_path)
    path = tmp_path / "v0000000001.json"
    manifest = fmt.Manifest.decode(path.read_bytes())
    manifest.app["top"] = 8  # type: ignore[index]
    path.write_bytes(manifest.encode())
    with pytest.raises(CorruptDataError, match="layout.*top"):
        App.restore(tmp_path, backend="threads")


# ---- a reader while a writer prunes (item 17) -------------------------------------------------

class _PrunedUnder(LocalStore):
    """A local store that, the first time ``victim`` is opened, lets a writer
    save ``extra`` more versions with keep=1 first (a prune under the reader)."""

    def __init__(self, path: Path, victim_suffix: str, writer) -> None:
        super().__init__(path)
        self.victim_suffix = victim_suffix
        self.writer = writer

    def open(self, name: str):
        if self.writer is not None and name.endswith(self.victim_suffix):
            writer, self.writer = self.writer, None
            writer()
        return super().open(name)


@pytest.fixture
def pruned_target(tmp_path):
    """A target with versions 1 and 2 of a region, and a function that saves
    version 3 with keep=1 (deleting 1 and 2 and their objects)."""
    region = Region(8 * PAGE_SIZE)
    t = pagefork.tracker(reset_mode())
    t.start(region)
    data = np.frombuffer(region, np.uint8)
    for v in (1, 2):
        data[v * PAGE_SIZE] = v
        ck.save(region, tmp_path, tracker=t)

    def prune() -> None:
        data[0] = 3
        ck.save(region, tmp_path, tracker=t, keep=1, base_every=0)  # a base: 1 and 2 go

    yield tmp_path, prune, lambda: bytes(region)
    t.close()
    region.close()


@pytest.mark.parametrize("when", ["manifest", "object"])
def test_a_load_of_the_newest_moves_on_when_it_is_pruned_under_it(pruned_target, when):
    path, prune, now = pruned_target
    store = _PrunedUnder(path, "v0000000002.json" if when == "manifest" else ".incr", prune)
    with ck.load(store) as back:
        assert bytes(back) == now()
    assert [v.version for v in ck.versions(path)] == [3]


def test_a_load_of_a_named_version_pruned_under_it_says_so(pruned_target):
    path, prune, _ = pruned_target
    store = _PrunedUnder(path, ".incr", prune)
    with pytest.raises(ck.VersionPrunedError, match="version 2.*pruned") as info:
        ck.load(store, version=2)
    assert not isinstance(info.value, CorruptDataError) and info.value.version == 2
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is ck.VersionPrunedError and again.version == 2 and str(again) == str(info.value)


def test_an_app_restore_moves_on_when_the_newest_is_pruned_under_it(tmp_path):
    with App("64KiB", backend="threads") as app:
        a = app.alloc("a", 64, np.int64)
        a[1] = 1
        app.checkpoint(tmp_path)
        a[2] = 2
        app.checkpoint(tmp_path)

        def prune() -> None:
            a[3] = 3
            app.checkpoint(tmp_path, keep=1, base_every=0)

        store = _PrunedUnder(tmp_path, ".incr", prune)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # moving to the newest is no fallback to warn about
            with App.restore(store, backend="threads") as back:
                assert back["a"][:4].tolist() == [0, 1, 2, 3]


def test_verify_skips_a_version_pruned_under_it(pruned_target):
    path, prune, _ = pruned_target
    store = _PrunedUnder(path, ".incr", prune)
    problems = [(v, name, why) for v, name, why in ck.verify(store) if why is not None]
    assert problems == []


PRUNER = """
import sys, time
import numpy as np
import pagefork
from pagefork import Region, checkpoint as ck
path, seconds = sys.argv[1], float(sys.argv[2])
with Region(32 * 4096) as region, pagefork.tracker(sys.argv[3]) as t:
    t.start(region)
    data = np.frombuffer(region, np.uint64)
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
        data[::512] = n  # every page holds the version's number
        ck.save(region, path, tracker=t, keep=1, base_every=3)
print(n)
"""


def test_loads_while_another_process_prunes_never_see_damage(tmp_path):
    """A real writer process saving with keep=1 as fast as it can; every
    load gets a whole version (every value the same number)."""
    with Region(32 * PAGE_SIZE) as region:
        ck.save(region, tmp_path)  # version 1, so the first loads find one
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PRUNER), str(tmp_path), "6",
                               reset_mode()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loads = 0
    try:
        while writer.poll() is None:
            with ck.load(tmp_path) as back:
                values = np.frombuffer(back, np.uint64)[::512]
                assert (values == values.max()).all() or values.max() == 0, values
            loads += 1
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert loads > 0 and int(out) > 0


# ---- a load into memory a tracker protects (item 18) -------------------------------------------

@pytest.mark.parametrize("data", ["incompressible", "compressible"])
@pytest.mark.parametrize("mode", ["segfault", "uffd", "uffd-async", "none"])
def test_load_into_a_tracked_region(tmp_path, mode, data):
    """Whatever the mode and the data, load(into=) fills the region exactly,
    and the tracker sees every page it changed."""
    require(mode)
    pages = 64
    with Region(pages * PAGE_SIZE) as source:
        bytes_ = np.frombuffer(source, np.uint8)
        if data == "incompressible":
            bytes_[:] = np.random.default_rng(3).integers(0, 256, bytes_.size, dtype=np.uint8)
        else:
            bytes_[:: PAGE_SIZE] = 1
        ck.save(source, tmp_path, compress=1)
        expected = bytes(source)
    (base,) = objects(tmp_path, ".base")
    assert stored_flags(base) == (fmt.FLAG_ZSTD if data == "compressible" else 0)
    with Region(pages * PAGE_SIZE) as into, pagefork.tracker(mode) as t:
        t.start(into)
        assert ck.load(tmp_path, into=into) is into
        assert bytes(into) == expected
        dirty = t.dirty_pages(into)
        t.stop(into)
    assert dirty.all(), np.flatnonzero(~dirty)


# ---- a broken symbolic link (item 19) ------------------------------------------------------------

@pytest.mark.parametrize("where", ["target", "parent"])
def test_a_broken_symlink_target_is_named(tmp_path, where):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    target = link if where == "target" else link / "ckpt"
    with Region(PAGE_SIZE) as region, pytest.raises(FileNotFoundError) as info:
        ck.save(region, target)
    text = str(info.value)
    assert "broken" in text and str(link) in text and str(tmp_path / "gone") in text, text
    with App("64KiB", backend="threads") as app, pytest.raises(FileNotFoundError, match="broken"):
        app.checkpoint(target)
    assert not (tmp_path / "gone").exists()
