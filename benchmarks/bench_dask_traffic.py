"""What the Dask backend really moves: the bytes that cross the network
against ``bytes_shipped``, and the peak memory of a worker (and of the
client) while the whole snapshot goes out. Starts a LocalCluster of 2
worker processes on loopback.

Network bytes are the loopback interface's transmit counter, so they are
exact only in a network namespace of their own (as root):

    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_dask_traffic.py'

Elsewhere other programs' loopback traffic adds to them. Memory is each
process's peak resident set (VmHWM, reset before the batch).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from pagefork import App
from pagefork._sizes import parse_size


def loopback_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # transmitted bytes
    return 0


def peak_memory(reset: bool = False) -> tuple[int, int]:
    """(resident, peak resident) bytes of this process; ``reset`` starts a new peak."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["VmRSS"][0]) << 10, int(fields["VmHWM"][0]) << 10


def measure(client, size: int, data: str) -> dict[str, float]:
    """One App of ``size`` bytes filled with ``data`` ("random": incompressible,
    "pattern": compresses well): its first batch (the whole snapshot to both
    workers), then a batch with a 1 MiB argument and 256 KiB results."""
    out: dict[str, float] = {}
    with App(size, backend="dask", client=client) as app:
        a = app.alloc("a", size, np.uint8)
        if data == "random":
            a[:] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        else:
            a.view(np.int64)[:] = np.arange(size // 8) // 3
        workers = client.run(peak_memory, True)
        mine = peak_memory(True)
        before = loopback_bytes()
        app.parallel(lambda mem, i, n: None, 2)
        out["first: crossed"] = loopback_bytes() - before
        out["first: bytes_shipped"] = app.last_batch.bytes_shipped
        grown = [client.run(peak_memory)[w][1] - workers[w][0] for w in workers]
        out["first: worker peak growth / App"] = max(grown) / size
        out["first: client peak growth / App"] = (peak_memory()[1] - mine[0]) / size
        blob = os.urandom(1 << 20)
        reply = os.urandom(256 << 10)
        before = loopback_bytes()
        app.parallel(lambda mem, i, n, b, r: r, 2, args=(blob, reply))
        out["later: crossed"] = loopback_bytes() - before
        out["later: bytes_shipped"] = app.last_batch.bytes_shipped
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="256MiB")
    args = parser.parse_args()
    import distributed

    size = parse_size(args.size)
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None,
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as client:
        for data in ("random", "pattern"):
            result = measure(client, size, data)
            print(f"{size >> 20} MiB App, {data} data")
            for key, value in result.items():
                print(f"  {key:<34}{value:>16,.2f}" if value < 100 else f"  {key:<34}{value:>16,.0f}")
            for phase in ("first", "later"):
                ratio = result[f"{phase}: crossed"] / result[f"{phase}: bytes_shipped"]
                print(f"  {phase}: crossed / bytes_shipped{ratio:>18.2f}")


if __name__ == "__main__":
    main()
