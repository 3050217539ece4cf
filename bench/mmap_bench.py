"""mmap workload on a netmemfs file and on a tmpfs file, the same phases in one run.

(Named mmap_bench.py, not mmap.py: a module named mmap would shadow the standard one.)

    .venv/bin/python bench/mmap_bench.py [--mib 128] [--random-reads 20000]

Phases (each on both files):
  write+fsync  sequential page writes through a MAP_SHARED mapping, then msync + fsync
  seq read     after dropping the page cache, read the mapping from start to end
  rand read    after dropping the page cache again, 20,000 reads of one random page each
               (MADV_RANDOM); p50 and p99 latency of a single page fault
  rand write   random page writes through the mapping, then msync + fsync
  verify       read everything back through a fresh open and check every page
The netmemfs side is a real netmemfs-server (memory mode) and a real mount on this
machine; nullfs (bench/nullfs.py) is the same phases on a pyfuse3 file system that keeps
its files in memory, the Python+FUSE floor without a network. Dropping caches needs
root (/proc/sys/vm/drop_caches); without it the read phases measure the page cache and
the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from tests.helpers import MountProc, ServerProc, StealMeter, cpu_of, cpu_us_per

PAGE = 4096
CHUNK = 1 << 20


@contextlib.contextmanager
def nullfs(mountpoint: Path) -> Iterator[Path]:
    """bench/nullfs.py mounted at mountpoint for the block."""
    mountpoint.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "nullfs.py"), str(mountpoint)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("bench/nullfs.py did not mount")
        yield mountpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def page_bytes(i: int, gen: int) -> bytes:
    return (b"%08d:%08d|" % (i, gen)) * (PAGE // 18) + b"." * (PAGE % 18)


# Random read latencies (us) by file system, for --png.
SAMPLES: dict[str, list[float]] = {}


def run(
    path: Path,
    size: int,
    random_reads: int,
    seed: int,
    pids: dict[str, int] | None = None,
    label: str = "",
) -> dict[str, float]:
    """The phases on path; with pids (name -> process), also the CPU time each process
    spent per page of the sequential write+fsync, per random page fault and per page of
    the random write+fsync. The random reads' latencies go to SAMPLES[label]."""
    out: dict[str, float] = {}
    pids = pids or {}
    pages = size // PAGE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    content = b"".join(page_bytes(i, 1) for i in range(pages))  # made before timing
    with mmap.mmap(fd, size) as m:
        cpu0 = cpu_of(pids)
        t0 = time.perf_counter()
        for off in range(0, size, CHUNK):
            m[off : off + CHUNK] = content[off : off + CHUNK]
        m.flush()
        os.fsync(fd)
        out["write+fsync MB/s"] = size / (time.perf_counter() - t0) / 1e6
        for name, us in cpu_us_per(cpu0, cpu_of(pids), pages).items():
            out[f"cpu us/page write+fsync {name}"] = us
    os.close(fd)

    out["dropped"] = float(drop_caches())
    fd = os.open(path, os.O_RDWR)
    with mmap.mmap(fd, size) as m:
        m.madvise(mmap.MADV_SEQUENTIAL)
        t0 = time.perf_counter()
        total = 0
        for off in range(0, size, CHUNK):
            total += len(m[off : off + CHUNK])
        out["seq read MB/s"] = total / (time.perf_counter() - t0) / 1e6
    os.close(fd)

    drop_caches()
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    with mmap.mmap(fd, size) as m:
        m.madvise(mmap.MADV_RANDOM)
        lat = []
        cpu0 = cpu_of(pids)
        for _ in range(random_reads):
            off = rng.randrange(pages) * PAGE
            t = time.perf_counter_ns()
            m[off]
            lat.append(time.perf_counter_ns() - t)
        lat.sort()
        SAMPLES[label] = [x / 1000 for x in lat]
        out["rand read p50 us"] = lat[len(lat) // 2] / 1000
        out["rand read p99 us"] = lat[len(lat) * 99 // 100] / 1000
        out["rand read mean us"] = statistics.fmean(lat) / 1000
        for name, us in cpu_us_per(cpu0, cpu_of(pids), random_reads).items():
            out[f"cpu us/rand read {name}"] = us

        written = rng.sample(range(pages), min(pages, 4096))
        cpu0 = cpu_of(pids)
        t0 = time.perf_counter()
        for p in written:
            m[p * PAGE : (p + 1) * PAGE] = page_bytes(p, 2)
        m.flush()
        os.fsync(fd)
        out["rand write+fsync MB/s"] = len(written) * PAGE / (time.perf_counter() - t0) / 1e6
        for name, us in cpu_us_per(cpu0, cpu_of(pids), len(written)).items():
            out[f"cpu us/rand write {name}"] = us
    os.close(fd)

    drop_caches()
    changed = set(written)
    with open(path, "rb") as f:
        for start in range(0, pages, CHUNK // PAGE):
            data = f.read(CHUNK)
            for i in range(len(data) // PAGE):
                p = start + i
                want = page_bytes(p, 2 if p in changed else 1)
                if data[i * PAGE : (i + 1) * PAGE] != want:
                    raise SystemExit(f"verify failed at page {p} of {path}")
    out["verified"] = 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=128, help="file size in MiB (default 128)")
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--cache-size",
        default="256M",
        help="the mount's --cache-size (default 256M; 0: every page fault goes to the server)",
    )
    plot.add_argument(ap)
    args = ap.parse_args()
    steal = StealMeter()
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        srv = ServerProc(Path(tmp))
        mnt = MountProc(Path(tmp), srv.address, "--cache-size", args.cache_size)
        assert srv.proc is not None
        try:
            results = {
                "tmpfs": run(Path(shm) / "f", size, args.random_reads, args.seed, label="tmpfs"),
                "netmemfs": run(
                    mnt.path("f"),
                    size,
                    args.random_reads,
                    args.seed,
                    {"daemon": mnt.pid, "server": srv.proc.pid},
                    label="netmemfs",
                ),
            }
            with nullfs(Path(tmp) / "null") as null:
                results["nullfs"] = run(
                    null / "f", size, args.random_reads, args.seed, label="nullfs"
                )
        finally:
            mnt.cleanup()
            srv.kill()
    if not results["netmemfs"]["dropped"]:
        print("note: could not drop the page cache (not root): read phases hit the cache")
    print(
        f"{args.mib} MiB file, {args.random_reads} random reads; server and mount on loopback; "
        f"mount --cache-size {args.cache_size}"
    )
    print(
        f"{'phase':<24} {'tmpfs':>10} {'nullfs':>10} {'netmemfs':>10} "
        f"{'netmemfs/tmpfs':>15} {'netmemfs/nullfs':>16}"
    )
    for key in results["tmpfs"]:
        if key in ("dropped", "verified"):
            continue
        a, n, b = results["tmpfs"][key], results["nullfs"][key], results["netmemfs"][key]
        print(f"{key:<24} {a:10.1f} {n:10.1f} {b:10.1f} {b / a:15.3f} {b / n:16.3f}")
    print("CPU time per page (user + system, from /proc), netmemfs's processes:")
    for key, value in results["netmemfs"].items():
        if key.startswith("cpu "):
            print(f"  {key:<30} {value:8.1f}")
    print(
        "nullfs: bench/nullfs.py, a pyfuse3 file system in memory with the mount's FUSE "
        "options (the Python+FUSE floor, no network); for latencies a ratio above 1 is slower, "
        "for MB/s below 1"
    )
    print("verify: every page of the three files checked")
    print(steal.line())
    if args.png is not None:
        where = f"{args.mib} MiB file, mount --cache-size {args.cache_size}"
        written = plot.cdf(
            plot.path_for(args.png, "rand-read"),
            f"Random 4 KiB page faults through a mapping, caches dropped ({where})",
            {k: SAMPLES[k] for k in ("tmpfs", "nullfs", "netmemfs")},
            reference="nullfs",
        )
        print(f"wrote {written}")
        table = {
            key.removesuffix(" MB/s"): {
                fs: results[fs][key] for fs in ("tmpfs", "nullfs", "netmemfs")
            }
            for key in results["tmpfs"]
            if key.endswith("MB/s")
        }
        written = plot.grouped(
            plot.path_for(args.png, "throughput"),
            f"mmap phases ({where})",
            table,
            unit="MB/s",
            reference="nullfs",
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
