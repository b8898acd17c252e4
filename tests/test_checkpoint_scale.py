"""Checkpoints at scale: untouched pages stay untouched (a base reads only
what the snapshot holds, a restore writes only what is not zero, straight
into the snapshot), a base to S3 streams in bounded parts, progress
callbacks, and ``checkpoint ls``/``verify`` on a target with no checkpoint.
Memory is measured in a subprocess, at sizes CI can afford."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

from pagefork import PAGE_SIZE, App, Region
from pagefork import checkpoint as ck
from pagefork.cli import main as cli

from support import SANITIZED, moto_server


# ---- no checkpoint: ls and verify agree -------------------------------------------------

@pytest.mark.parametrize("where", ["missing", "empty"])
def test_ls_and_verify_agree_on_a_target_with_no_checkpoint(tmp_path, capsys, where):
    target = tmp_path / "none"
    if where == "empty":
        target.mkdir()
    for command in ("ls", "verify"):
        assert cli(["checkpoint", command, str(target)]) == 1
        err = capsys.readouterr().err
        assert f"pagefork checkpoint {command}: no checkpoint in {target}" in err
        assert ("(it does not exist)" in err) == (where == "missing")
    assert cli(["checkpoint", "ls", str(target), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == []
    with Region(PAGE_SIZE) as region:
        ck.save(region, target)
    assert cli(["checkpoint", "ls", str(target)]) == 0
    assert cli(["checkpoint", "verify", str(target)]) == 0


# ---- untouched pages stay untouched ---------------------------------------------------------

SIZE = 128 << 20  # 1% of its pages written: 1.3 MiB of data
EVERY = 100 * PAGE_SIZE // 8  # int64s between written pages
SLACK = 24 << 20  # buffers (4 MiB pieces, zstd), far below the 128 MiB a whole copy costs

_UNTOUCHED = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np
    from pagefork import App, PAGE_SIZE

    size, every, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    def memfd(app):  # bytes the snapshot's file holds (holes hold none)
        return os.fstat(app._executor.snapshot.fd).st_blocks * 512

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    def bump(mem, i, n):
        mem["a"][1::every] += 1

    out = {}
    with App(size, backend="threads", workers=1) as app:
        a = app.alloc("a", size // 8, np.int64)
        a[::every] = np.arange(1, len(a[::every]) + 1)
        app.parallel(bump, 1)
        del a
        out["data"] = memfd(app)
        app.checkpoint(target)
        out["after checkpoint"] = memfd(app)
        digest = hashlib.sha256(app.memory).hexdigest()
    anon0 = anon()
    with App.restore(target, backend="threads", workers=1) as back:
        out["restored anon"] = anon() - anon0
        out["restored file"] = memfd(back)
        back.parallel(bump, 1)
        out["batch anon"] = anon() - anon0
        out["batch file"] = memfd(back)
        a = back["a"].copy()
        a[1::every] -= 1
        out["exact"] = hashlib.sha256(a).hexdigest() == digest
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def untouched(tmp_path_factory):
    """Memory of a 128 MiB App with 1% of its pages written, through a base
    checkpoint, a restore and the first batch after it (in a subprocess)."""
    target = tmp_path_factory.mktemp("untouched")
    run = subprocess.run([sys.executable, "-c", _UNTOUCHED, str(SIZE), str(EVERY), str(target)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_a_base_checkpoint_leaves_untouched_pages_untouched(untouched):
    assert untouched["data"] < SLACK
    assert untouched["after checkpoint"] - untouched["data"] < SLACK


def test_a_restore_and_its_first_batch_hold_the_data_once(untouched):
    assert untouched["exact"] is True
    assert untouched["restored file"] < SLACK and untouched["batch file"] < SLACK
    if not SANITIZED:  # ASan's quarantine keeps freed buffers resident
        assert untouched["restored anon"] < SLACK and untouched["batch anon"] < SLACK


# ---- progress ---------------------------------------------------------------------------------

def _recorder() -> tuple[list[tuple[int, int]], object]:
    calls: list[tuple[int, int]] = []
    return calls, lambda done, total: calls.append((done, total))


def _assert_monotonic_to(calls: list[tuple[int, int]], total: int) -> None:
    assert calls and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and 0 <= dones[0]


@pytest.mark.parametrize("compress", [1, None])
def test_app_checkpoint_and_restore_report_progress(tmp_path, compress):
    size = 16 << 20
    with App(size, backend="threads", workers=1) as app:
        a = app.alloc("a", size // 8, np.int64)
        a[:: PAGE_SIZE // 8] = 7
        calls, progress = _recorder()
        app.checkpoint(tmp_path, compress=compress, progress=progress)
        _assert_monotonic_to(calls, size)  # a base: the whole image, piece by piece
        assert len(calls) == size // (4 << 20)
        a[5] = 1
        calls, progress = _recorder()
        info = app.checkpoint(tmp_path, compress=compress, progress=progress)
        assert not info.base
        _assert_monotonic_to(calls, calls[-1][1])  # an increment: its body
        expected = a.copy()
    calls, progress = _recorder()
    with App.restore(tmp_path, backend="threads", workers=1, progress=progress) as back:
        assert np.array_equal(back["a"], expected)
    _assert_monotonic_to(calls, ck.versions(tmp_path)[-1].restore_bytes)
    assert len(calls) > 2


def test_region_save_and_load_report_progress_and_stay_silent_by_default(tmp_path, capsys):
    with Region(8 << 20) as region:
        np.frombuffer(region, np.uint8)[::PAGE_SIZE] = 1
        calls, progress = _recorder()
        ck.save(region, tmp_path, progress=progress)
        _assert_monotonic_to(calls, 8 << 20)
        ck.save(region, tmp_path)
    calls, progress = _recorder()
    ck.load(tmp_path, version=1, progress=progress).close()
    _assert_monotonic_to(calls, ck.versions(tmp_path)[0].restore_bytes)
    ck.load(tmp_path).close()
    assert capsys.readouterr() == ("", "")


def test_progress_must_be_callable(tmp_path):
    with Region(PAGE_SIZE) as region, pytest.raises(TypeError, match="progress must be callable"):
        ck.save(region, tmp_path, progress=1)
    with App(PAGE_SIZE, backend="threads", workers=1) as app, \
            pytest.raises(TypeError, match="progress must be callable"):
        app.checkpoint(tmp_path, progress="yes")
    with pytest.raises(TypeError, match="progress must be callable"):
        App.restore(tmp_path, progress=3)


# ---- S3: a base streams in bounded parts --------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server with a bucket ``pagefork-scale``; yields its URL."""
    with moto_server() as endpoint:
        import fsspec

        fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": endpoint, "region_name": "eu-west-1"})
        fs.mkdir("pagefork-scale")
        yield endpoint


_S3_CLIENT = textwrap.dedent("""
    import hashlib, json, sys
    import fsspec
    import numpy as np
    import pagefork._checkpoint_store
    from pagefork import App

    endpoint, root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pagefork._checkpoint_store.PART_SIZE = int(sys.argv[4])
    fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": endpoint, "region_name": "eu-west-1"})

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    target = fs.get_mapper(root)
    with App(4096, backend="threads", workers=1) as app:
        app.checkpoint(fs.get_mapper(root + "-warm-up"))  # imports, the client's pools
    with App(size, backend="threads", workers=1) as app:
        a = app.alloc("a", size, np.uint8)
        a[:] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)  # incompressible
        app.parallel(lambda mem, i, n: None, 1)  # into the snapshot
        del a
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        info = app.checkpoint(target)
        peak = status("VmHWM") - base
        digest = hashlib.sha256(app.memory).hexdigest()
    parts = len(fs.ls(root, detail=False, refresh=True))
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with App.restore(target, backend="threads", workers=1) as back:  # into the snapshot's file
        restore_peak = status("VmHWM") - base
        exact = hashlib.sha256(back.memory).hexdigest() == digest
    print(json.dumps({"peak": peak, "base": info.base, "objects": parts, "restore peak": restore_peak,
                      "exact": exact}))
""")


@pytest.mark.python_only
def test_a_base_checkpoint_to_s3_and_its_restore_stream_in_bounded_parts(s3_endpoint):
    size, part = 64 << 20, 5 << 20
    run = subprocess.run([sys.executable, "-c", _S3_CLIENT, s3_endpoint,
                          f"pagefork-scale/{uuid.uuid4().hex}", str(size), str(part)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["base"] and out["objects"] == 2  # the base and its manifest
    # A copy of every piece and their join were 2x the App (133 MiB here);
    # now a few parts (S3File's buffer, the part, the HTTP body: ~40 MiB).
    assert out["peak"] < size, out
    # A restore read the whole object into memory; now a block at a time.
    assert out["exact"] and out["restore peak"] < size, out


@pytest.mark.python_only
def test_an_object_of_several_parts_round_trips_through_s3(s3_endpoint, monkeypatch):
    import fsspec

    import pagefork._checkpoint_store as store

    monkeypatch.setattr(store, "PART_SIZE", 5 << 20)  # S3's smallest part
    fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": s3_endpoint, "region_name": "eu-west-1"})
    target = fs.get_mapper(f"pagefork-scale/{uuid.uuid4().hex}")
    with Region(12 << 20) as region:
        region.array(np.uint8)[:] = np.random.default_rng(2).integers(0, 256, 12 << 20, dtype=np.uint8)
        ck.save(region, target, compress=None)
        with ck.load(target) as back:
            assert bytes(back) == bytes(region)


@pytest.mark.python_only
def test_ls_and_verify_of_a_bucket_that_does_not_exist(s3_endpoint, monkeypatch, capsys):
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)
    for target, exists in (("s3://no-such-bucket/run", False), ("s3://pagefork-scale", True)):
        for command in ("ls", "verify"):
            assert cli(["checkpoint", command, target]) == 1
            err = capsys.readouterr().err
            assert f"pagefork checkpoint {command}: no checkpoint in {target}" in err, err
            assert ("(it does not exist)" in err) != exists, err


def test_verify_reports_progress_and_the_cli_shows_it(tmp_path, capsys):
    with Region(8 << 20) as region:
        np.frombuffer(region, np.uint8)[::PAGE_SIZE] = 1
        ck.save(region, tmp_path, compress=None)
        ck.save(region, tmp_path, compress=None)
    calls, progress = _recorder()
    assert all(problem is None for _, _, problem in ck.verify(tmp_path, progress=progress))
    total = sum(v.restore_bytes for v in ck.versions(tmp_path))
    _assert_monotonic_to(calls, total)
    assert cli(["checkpoint", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""  # not a terminal: silent
    assert cli(["checkpoint", "verify", str(tmp_path), "--progress"]) == 0
    err = capsys.readouterr().err
    assert err.endswith("verified: 16.0 MiB of 16.0 MiB (100%)\n"), err
