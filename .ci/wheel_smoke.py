"""A smoke test of an installed pagefork wheel on a machine where the test
suite cannot run (aarch64 under qemu-user, .ci/aarch64-smoke): the native
kernels give exact bytes, and a batch merges exactly."""

import platform

import numpy as np

import pagefork
from pagefork import Diff, DiffBatch, Region, Snapshot, _native, delta, wire

print(f"pagefork {pagefork.__version__} on {platform.machine()} from {pagefork.__file__}")
batch = DiffBatch([Diff(0, b"abc"), Diff(4096, b"xyz")])
assert wire.decode(wire.encode(batch)) == batch
old, new = bytes(8192), b"\1" * 100 + bytes(8092)
assert delta.apply(delta.encode(old, new), old) == new
assert _native.crc32c(b"123456789") == 0xE3069283  # the CRC32C check value
with Region(1 << 16) as region:
    view = region.array(np.int64)
    view[:] = 7
    assert int(view.sum()) == 7 * 8192
with Snapshot(bytes(8192)) as snapshot:
    snapshot.write(b"hi", 10)
    assert snapshot.read(8, 6) == b"\0\0hi\0\0"
print("modes:", ", ".join(m for m, s in pagefork.probe().items() if s.available))
with pagefork.App("1MiB", backend="threads", workers=2) as app:
    hist = app.alloc("hist", 16, np.int64, merge="sum")
    top = app.alloc("top", 1, np.int64, merge="max")
    app.parallel(lambda mem, i, n: (mem["hist"].__iadd__(i), mem["top"].__setitem__(0, i)), 4)
    assert hist.tolist() == [6] * 16 and top[0] == 3
print("smoke test passed")
