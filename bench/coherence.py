"""How soon another client's mapping sees a commit (issue 14), beside two processes on
one tmpfs file in the same run.

    .venv/bin/python bench/coherence.py [--commits 1000]

A writer process writes a new generation number into page 0 of a file and fsyncs it; a
reader process, which has the file mapped MAP_SHARED (and open: it never reopens it),
spins on the mapping until the page shows that generation and reports the moment
(CLOCK_MONOTONIC, shared by both processes). The figure is the time from the writer's
fsync returning to the reader's mapping showing the page, --commits times, one commit
at a time (the writer waits for the reader before the next).

netmemfs: a real netmemfs-server (memory mode) and two real mounts of it on this
machine, the writer in one, the reader in the other; the reader's mount learns of the
commit from the server (push invalidation) and drops the page, and the reader's next
touch faults it in again. tmpfs: the same two processes on one file in /dev/shm: the
local limit, where the mapping is the page itself (its figure is about how fast the
reader notices, and is 0 when it saw the page before fsync returned).

Then locks under contention: three processes, each on its own mount, take and release
an exclusive lock on one file (netmemfs.locking, no commit) --locks times each, all at
once; beside the same three processes taking flock(2) on one tmpfs file. Printed: lock
and release round trips per second, all processes together, and the p50/p99 of one
acquire+release.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from tests.helpers import MountProc, ServerProc

PAGE = 4096
PAGES = 4
WAIT_S = 10.0  # the reader gives up on one commit after this long
RECORD = struct.Struct("<qd")  # generation, when the reader saw it (monotonic seconds)


def reader(path: Path, commits: int, out: int, ready: int) -> None:
    """In the child: map path, then for each generation spin until page 0 shows it."""
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, PAGES * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
    os.write(ready, b"r")
    for gen in range(1, commits + 1):
        deadline = time.monotonic() + WAIT_S
        while struct.unpack_from("<q", m, 0)[0] < gen:
            if time.monotonic() > deadline:
                os.write(out, RECORD.pack(-gen, 0.0))
                os._exit(1)
            os.sched_yield()  # two cores: leave some to the daemons
        os.write(out, RECORD.pack(gen, time.monotonic()))
    m.close()
    os._exit(0)


def measure(writer_path: Path, reader_path: Path, commits: int) -> list[float]:
    """Seconds from each fsync's return to the reader's mapping showing its page."""
    with open(writer_path, "wb") as f:
        f.truncate(PAGES * PAGE)
        os.fsync(f.fileno())
    results_r, results_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(results_r)
        os.close(ready_r)
        try:
            reader(reader_path, commits, results_w, ready_w)
        finally:
            os._exit(2)
    os.close(results_w)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r", "the reader could not map the file"
    out: list[float] = []
    fd = os.open(writer_path, os.O_RDWR)
    filler = bytes(PAGE - 8)
    try:
        for gen in range(1, commits + 1):
            os.pwrite(fd, struct.pack("<q", gen) + filler, 0)
            os.fsync(fd)
            returned = time.monotonic()
            got, seen = RECORD.unpack(_read_exact(results_r, RECORD.size))
            if got != gen:
                raise SystemExit(f"the reader did not see generation {gen} within {WAIT_S} s")
            out.append(max(0.0, seen - returned))
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
        os.close(results_r)
        os.close(ready_r)
    return out


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = os.read(fd, n - len(data))
        if not part:
            raise SystemExit("the reader ended early")
        data += part
    return data


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def report(name: str, xs: list[float]) -> tuple[float, float]:
    p50, p99 = pct(xs, 0.5), pct(xs, 0.99)
    print(
        f"{name:9} p50 {p50 * 1e3:8.3f} ms   p99 {p99 * 1e3:8.3f} ms   "
        f"max {max(xs) * 1e3:8.3f} ms   mean {statistics.fmean(xs) * 1e3:8.3f} ms"
    )
    return p50, p99


def locker(path: str, n: int, kind: str, out: int) -> None:
    """In a child: n acquire+release pairs; writes each pair's seconds to out."""
    import fcntl

    from netmemfs.locking import acquire, release

    times = []
    fd = os.open(path, os.O_RDONLY)
    for _ in range(n):
        t0 = time.perf_counter()
        if kind == "netmemfs":
            release(acquire(path, wait_s=60))
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
        times.append(time.perf_counter() - t0)
    os.write(out, struct.pack(f"<{n}d", *times))
    os._exit(0)


def contend(paths: list[Path], n: int, kind: str) -> tuple[float, list[float]]:
    """Pairs per second of all processes together, and each pair's seconds."""
    children = []
    started = time.perf_counter()
    for p in paths:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            try:
                locker(str(p), n, kind, w)
            finally:
                os._exit(2)
        os.close(w)
        children.append((pid, r))
    times: list[float] = []
    for pid, r in children:
        data = _read_exact(r, 8 * n)
        times += struct.unpack(f"<{n}d", data)
        os.waitpid(pid, 0)
        os.close(r)
    return len(times) / (time.perf_counter() - started), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=1000, help="commits measured (default 1000)")
    ap.add_argument(
        "--locks", type=int, default=1000, help="lock+release pairs per process (default 1000)"
    )
    plot.add_argument(ap)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="coherence-") as tmp:
        srv = ServerProc(Path(tmp))
        a = MountProc(Path(tmp), srv.address, name="a")
        b = MountProc(Path(tmp), srv.address, name="b")
        c = MountProc(Path(tmp), srv.address, name="c")
        try:
            (a.mountpoint / "f").write_bytes(bytes(PAGES * PAGE))
            os.stat(b.mountpoint / "f")
            ours = measure(a.mountpoint / "f", b.mountpoint / "f", args.commits)
            lock_rate, lock_times = contend(
                [m.mountpoint / "f" for m in (a, b, c)], args.locks, "netmemfs"
            )
        finally:
            for m in (c, b, a):
                m.cleanup()
            srv.kill()
    with tempfile.TemporaryDirectory(prefix="coherence-", dir="/dev/shm") as shm:
        local = measure(Path(shm) / "f", Path(shm) / "f", args.commits)
        flock_rate, flock_times = contend([Path(shm) / "f"] * 3, args.locks, "flock")

    print(f"fsync returned -> another process's mapping shows the page, {args.commits} commits")
    n50, n99 = report("netmemfs", ours)
    t50, t99 = report("tmpfs", local)
    floor = 1e-6  # tmpfs is often 0: ratios against at least a microsecond
    print(
        f"ratio netmemfs/tmpfs: p50 {n50 / max(t50, floor):.0f}x, "
        f"p99 {n99 / max(t99, floor):.0f}x (against at least 1 us)"
    )
    print(f"\nlock + release, 3 processes contending, {args.locks} pairs each")
    print(f"netmemfs  {lock_rate:9.0f} pairs/s  ", end="")
    report("", lock_times)
    print(f"flock     {flock_rate:9.0f} pairs/s  ", end="")
    report("", flock_times)
    print(f"ratio netmemfs/flock: {lock_rate / flock_rate:.4f}x the rate")
    if args.png is not None:
        us = 1e6
        written = plot.cdf(
            plot.path_for(args.png, "visible"),
            f"fsync returned -> another process's mapping shows the page ({args.commits} commits)",
            {"tmpfs": [x * us for x in local], "netmemfs": [x * us for x in ours]},
            reference="tmpfs",
        )
        print(f"wrote {written}")
        written = plot.cdf(
            plot.path_for(args.png, "locks"),
            f"lock + release, 3 processes contending, {args.locks} pairs each",
            {"flock": [x * us for x in flock_times], "netmemfs": [x * us for x in lock_times]},
            reference="flock",
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
