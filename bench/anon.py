"""Anonymous regions (issue 4) against plain anonymous memory, in the same run.

    .venv/bin/python bench/anon.py [--mib 1024] [--budget-mib 256] [--ops 20000]

Starts a netmemfs-server (memory mode) on 127.0.0.1, maps a region of --mib MiB with a
--budget-mib MiB budget through netmemfs.anon, and runs the same phases on it and on a
plain private anonymous mapping of the same size:

    seq write      1 MiB stores over the whole region (then, netmemfs only, a sync)
    seq read       1 MiB loads over the whole region
    rand read      --ops 4 KiB loads at uniformly random pages
    zipf read      --ops 4 KiB loads, pages drawn from zipf(0.99) (hot pages scattered)
    rand write     --ops 4 KiB stores at uniformly random pages, then a sync
    zipf write     --ops 4 KiB stores, zipf(0.99), then a sync
    walk read      on a fresh region: stores over all of it, no sync, then --ops 4 KiB
                   loads at uniformly random pages: past the budget, each fault brings
                   back a page that was let go written and not committed
    resync         netmemfs only, on a region of --resync-mib with --resync-budget-mib:
                   write it all and sync, then write it all again (timed: the region's
                   sequential write rate) and sync (timed): how fast a sync commits a
                   region rewritten past its budget, against that write rate

It prints MB/s, p50/p99 latency of each 4 KiB access (from Python: about 1 us of it is
the interpreter) and the netmemfs/plain ratios, then checks every page of the region
against what was written. For each random phase it also prints the CPU time (user +
system, from /proc) that each part of netmemfs spent per access: the region's fault
thread (libnetmem's, a thread of this process), its agent (a child process) and the
server; a write phase's sync is not in it.

The same phases also run on plain anonymous memory in a child process held to the
budget by a memory cgroup, swapping to zram (a compressed swap device in RAM): what the
kernel does with the same memory limit and no network, the reference for a region's
faults on pages it had to let go (netmemfs/zram ratios). That needs root, cgroup v1's
memory controller or cgroup v2, and the zram driver (/sys/class/zram-control); the
script makes a zram device of its own and removes it after, and says why if it cannot.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import mmap
import os
import random
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from netmemfs import anon
from tests.helpers import ServerProc, StealMeter, cpu_s, cpu_us_per

PAGE = 4096
CHUNK = 1 << 20


class Zipf:
    """Draws page numbers from zipf(s) over n pages, ranks scattered by a permutation."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self.cdf = list(itertools.accumulate(1.0 / (k**s) for k in range(1, n + 1)))
        self.total = self.cdf[-1]
        self.perm = list(range(n))
        rng.shuffle(self.perm)
        self.rng = rng

    def draw(self) -> int:
        rank = bisect.bisect_left(self.cdf, self.rng.random() * self.total)
        return self.perm[min(rank, len(self.perm) - 1)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def netmemfs_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of each part of netmemfs in this run: the server; the
    regions' agents (the other children of this process); the regions' fault threads
    (its threads but the main one, which runs this script)."""
    me = os.getpid()
    out = {"fault thread": 0.0, "agent": 0.0, "server": cpu_s(server_pid)}
    for task in Path(f"/proc/{me}/task").iterdir():
        tid = int(task.name)
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            if tid != me:
                out["fault thread"] += cpu_s(me, tid)
            for child in map(int, (task / "children").read_text().split()):
                if child != server_pid:  # the server is a child too
                    out["agent"] += cpu_s(child)
    return out


def run(
    mem: mmap.mmap,
    sync: Callable[[], None],
    ops: int,
    seed: int,
    samples: dict[str, list[float]],
    cpu: Callable[[], dict[str, float]] | None = None,
    cpu_per_op: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, tuple[float, float, float]], float, dict[int, bytes]]:
    """Phase -> (MB/s, p50 us, p99 us); the seconds the syncs took; the pages the
    random writes left (the rest hold the sequential pattern). Each timed phase's
    latencies (us) go to samples[phase]; with cpu (CPU seconds so far by part), each
    random phase's CPU us per access by part to cpu_per_op[phase] (its sync not
    included)."""
    size = len(mem)
    npages = size // PAGE
    out: dict[str, tuple[float, float, float]] = {}
    sync_s = 0.0
    block = bytes(range(256)) * (CHUNK // 256)

    t0 = time.perf_counter()
    for off in range(0, size, CHUNK):
        mem[off : off + CHUNK] = block
    out["seq write"] = (size / (time.perf_counter() - t0) / 1e6, 0.0, 0.0)
    t0 = time.perf_counter()
    sync()
    sync_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    for off in range(0, size, CHUNK):
        mem[off : off + CHUNK]
    out["seq read"] = (size / (time.perf_counter() - t0) / 1e6, 0.0, 0.0)

    rng = random.Random(seed)
    zipf = Zipf(npages, 0.99, rng)
    page = bytes(range(256)) * (PAGE // 256)
    clock = time.perf_counter_ns
    written: dict[int, bytes] = {}
    for kind in ("read", "write"):
        # Fresh draws for the writes: the pages just read are the resident ones.
        draws = {
            "rand": [rng.randrange(npages) for _ in range(ops)],
            "zipf": [zipf.draw() for _ in range(ops)],
        }
        for dist, pages in draws.items():
            lat = []
            stamps = [struct.pack("<QQ", p, i) + page[16:] for i, p in enumerate(pages)]
            cpu0 = cpu() if cpu else {}
            t0 = time.perf_counter()
            for p, data in zip(pages, stamps, strict=True):
                off = p * PAGE
                a = clock()
                if kind == "read":
                    mem[off : off + PAGE]
                else:
                    mem[off : off + PAGE] = data
                lat.append((clock() - a) / 1000)
            if kind == "write":
                written.update(zip(pages, stamps, strict=True))
            took = time.perf_counter() - t0
            if cpu and cpu_per_op is not None:
                cpu_per_op[f"{dist} {kind}"] = cpu_us_per(cpu0, cpu(), ops)
            out[f"{dist} {kind}"] = (ops * PAGE / took / 1e6, pct(lat, 0.5), pct(lat, 0.99))
            samples[f"{dist} {kind}"] = lat
        if kind == "write":
            t0 = time.perf_counter()
            sync()
            sync_s += time.perf_counter() - t0
    return out, sync_s, written


ZRAM_CONTROL = Path("/sys/class/zram-control")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


class NoZram(Exception):
    """The zram reference cannot run here; the message says why."""


@contextlib.contextmanager
def zram_swap(swap_bytes: int) -> Iterator[str]:
    """A zram device of swap_bytes made for the block and used as swap (its name)."""
    if os.geteuid() != 0:
        raise NoZram("needs root (a swap device and a memory cgroup)")
    if not ZRAM_CONTROL.is_dir():
        raise NoZram(f"no zram driver ({ZRAM_CONTROL} is missing; modprobe zram)")
    n = int((ZRAM_CONTROL / "hot_add").read_text())
    sysdir = Path(f"/sys/block/zram{n}")
    dev = Path(f"/dev/zram{n}")
    made_node = False
    swapped = False
    try:
        if not dev.exists():  # no udev here: make the node from the driver's numbers
            major, minor = map(int, (sysdir / "dev").read_text().split(":"))
            os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(major, minor))
            made_node = True
        (sysdir / "disksize").write_text(str(swap_bytes))
        subprocess.run(["mkswap", str(dev)], check=True, capture_output=True)
        subprocess.run(["swapon", "-p", "32767", str(dev)], check=True, capture_output=True)
        swapped = True
        algo = (sysdir / "comp_algorithm").read_text().split("[")[1].split("]")[0]
        yield f"{dev} ({algo})"
    except (OSError, subprocess.CalledProcessError) as e:
        raise NoZram(f"could not set up {dev} as swap: {e}") from e
    finally:
        if swapped:
            subprocess.run(["swapoff", str(dev)], capture_output=True)
        with contextlib.suppress(OSError):
            (ZRAM_CONTROL / "hot_remove").write_text(str(n))
        if made_node:
            with contextlib.suppress(OSError):
                dev.unlink()


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A memory cgroup holding its processes to limit bytes (swapping past it); the file
    a process writes its pid to, to join."""
    name = f"netmemfs-bench-{os.getpid()}"
    if (CGROUP_V1 / "memory.limit_in_bytes").exists():
        group = CGROUP_V1 / name
        group.mkdir()
        try:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            (group / "memory.swappiness").write_text("100")
            yield group / "cgroup.procs"
        finally:
            group.rmdir()
    elif "memory" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
        group = CGROUP_V2 / name
        group.mkdir()
        try:
            (group / "memory.max").write_text(str(limit))
            yield group / "cgroup.procs"
        finally:
            group.rmdir()
    else:
        raise NoZram("no memory cgroup controller")


def zram_reference(
    size: int, budget: int, ops: int, seed: int, samples: dict[str, list[float]]
) -> tuple[dict[str, tuple[float, float, float]] | None, str]:
    """The phases on plain anonymous memory held to budget and swapping to zram, in a
    child process: (results or None, what ran or why not); its latencies go to
    samples."""
    try:
        with zram_swap(2 * size) as dev, memory_cgroup(budget) as procs:
            argv = [sys.executable, __file__, "--zram-child", str(procs), "--mib", str(size >> 20)]
            argv += ["--ops", str(ops), "--seed", str(seed)]
            child = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if child.returncode != 0:
                raise NoZram(f"the child failed: {child.stderr.strip()[-500:]}")
            got = json.loads(child.stdout)
            samples.update(got["samples"])
            return {k: (v[0], v[1], v[2]) for k, v in got["results"].items()}, dev
    except (NoZram, OSError) as e:
        return None, f"not run: {e}"


def resync(region: anon.Region) -> tuple[float, float, float]:
    """Write region all over and sync; write it all over again (MB/s), sync again
    (MB/s); check a page per MiB. (rewrite MB/s, its sync's MB/s, first sync s)."""
    size = len(region)
    rates = []
    first_sync = 0.0
    for gen in (1, 2):
        block = bytes([gen]) * CHUNK
        t0 = time.perf_counter()
        for off in range(0, size, CHUNK):
            region[off : off + CHUNK] = block
        wrote = time.perf_counter() - t0
        t0 = time.perf_counter()
        region.sync()
        synced = time.perf_counter() - t0
        if gen == 1:
            first_sync = synced
        else:
            rates = [size / wrote / 1e6, size / synced / 1e6]
    for off in range(0, size, CHUNK):
        if region[off : off + PAGE] != bytes([2]) * PAGE:
            raise SystemExit(f"resync: the page at byte {off} lost its second write")
    return rates[0], rates[1], first_sync


def walk(
    mem: mmap.mmap,
    ops: int,
    seed: int,
    samples: dict[str, list[float]],
    cpu: Callable[[], dict[str, float]] | None = None,
    cpu_per_op: dict[str, dict[str, float]] | None = None,
) -> tuple[float, float, float]:
    """Write every page of mem (never synced), then time ops random page loads, each
    checked: (MB/s, p50 us, p99 us); the latencies go to samples["walk read"], and
    with cpu the CPU us per load by part to cpu_per_op["walk read"], as run() does."""
    npages = len(mem) // PAGE
    for p in range(npages):
        mem[p * PAGE : p * PAGE + 8] = struct.pack("<Q", p ^ 0x5A5A)
    rng = random.Random(seed + 1)
    pages = [rng.randrange(npages) for _ in range(ops)]
    clock = time.perf_counter_ns
    lat = []
    cpu0 = cpu() if cpu else {}
    t0 = time.perf_counter()
    for p in pages:
        a = clock()
        got = mem[p * PAGE : p * PAGE + 8]
        lat.append((clock() - a) / 1000)
        if got != struct.pack("<Q", p ^ 0x5A5A):
            raise SystemExit(f"walk: page {p} lost its unsynced write")
    took = time.perf_counter() - t0
    if cpu and cpu_per_op is not None:
        cpu_per_op["walk read"] = cpu_us_per(cpu0, cpu(), ops)
    samples["walk read"] = lat
    return ops * PAGE / took / 1e6, pct(lat, 0.5), pct(lat, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024, help="region size in MiB (default 1024)")
    ap.add_argument("--budget-mib", type=int, default=256, help="resident budget (default 256)")
    ap.add_argument("--ops", type=int, default=20000, help="random 4 KiB accesses per phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-zram", action="store_true", help="skip the zram reference")
    ap.add_argument("--resync-mib", type=int, default=512, help="resync region (default 512)")
    ap.add_argument(
        "--resync-budget-mib", type=int, default=128, help="resync budget (default 128)"
    )
    ap.add_argument("--zram-child", type=Path, help=argparse.SUPPRESS)
    plot.add_argument(ap)
    args = ap.parse_args()
    steal = StealMeter()
    # Latencies (us) of each timed phase, by who ran it, for --png.
    samples: dict[str, dict[str, list[float]]] = {"plain": {}, "zram": {}, "netmemfs": {}}
    size, budget = args.mib << 20, args.budget_mib << 20
    if args.zram_child:
        # In the cgroup before the region exists, so that all of it is charged there.
        args.zram_child.write_text(str(os.getpid()))
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        out, _, _ = run(mem, lambda: None, args.ops, args.seed, samples["zram"])
        mem.close()
        with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as fresh:
            out["walk read"] = walk(fresh, args.ops, args.seed, samples["zram"])
        print(json.dumps({"results": out, "samples": samples["zram"]}))
        return

    plain = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base, _, _ = run(plain, lambda: None, args.ops, args.seed, samples["plain"])
    plain.close()
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as fresh:
        base["walk read"] = walk(fresh, args.ops, args.seed, samples["plain"])
    zram, zram_what = (
        (None, "not run (--no-zram)")
        if args.no_zram
        else zram_reference(size, budget, args.ops, args.seed, samples["zram"])
    )

    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProc(Path(tmp))
        assert srv.proc is not None  # started by ServerProc()
        server_pid = srv.proc.pid

        def cpu() -> dict[str, float]:
            return netmemfs_cpu(server_pid)

        cpu_per_op: dict[str, dict[str, float]] = {}
        try:
            with anon.map(size, segment="bench", server=srv.address, budget=budget) as region:
                net, sync_s, written = run(
                    region, region.sync, args.ops, args.seed, samples["netmemfs"], cpu, cpu_per_op
                )
                peak = region.resident()
            with anon.map(size, segment="walk", server=srv.address, budget=budget) as fresh:
                # Dropped unsynced.
                net["walk read"] = walk(
                    fresh, args.ops, args.seed, samples["netmemfs"], cpu, cpu_per_op
                )
            # Every page, read back by a fresh mapping: what the syncs committed.
            with anon.map(size, segment="bench", server=srv.address, budget=budget) as again:
                ok = check(again, written)
            rs_size, rs_budget = args.resync_mib << 20, args.resync_budget_mib << 20
            with anon.map(rs_size, segment="resync", server=srv.address, budget=rs_budget) as rs:
                rewrite, resync_mbs, first_sync = resync(rs)
        finally:
            srv.kill()

    print(
        f"{args.mib} MiB region, {args.budget_mib} MiB budget, {args.ops} random ops per "
        "phase; server on loopback; latencies in us per 4 KiB access"
    )
    print(f"zram: plain memory held to the budget by a memory cgroup, swapping to {zram_what}")
    print(
        f"{'phase':<12} {'plain MB/s':>11} {'zram':>8} {'netmemfs':>10} {'/plain':>7} "
        f"{'/zram':>6}   {'plain p50/p99':>14} {'zram p50/p99':>14} {'netmemfs p50/p99':>17} "
        f"{'p50/zram':>8}"
    )
    for key, (mbs, p50, p99) in base.items():
        n_mbs, n_p50, n_p99 = net[key]
        z_mbs, z_p50, z_p99 = zram[key] if zram else (float("nan"),) * 3
        lat = (
            f"{p50:6.1f}/{p99:<7.1f} {z_p50:6.1f}/{z_p99:<7.1f} {n_p50:8.1f}/{n_p99:<8.1f} "
            f"{n_p50 / z_p50:8.1f}"
            if p50
            else ""
        )
        print(
            f"{key:<12} {mbs:11.1f} {z_mbs:8.1f} {n_mbs:10.1f} {n_mbs / mbs:7.3f} "
            f"{n_mbs / z_mbs:6.2f}   {lat}"
        )
    print(f"syncs took {sync_s:.2f} s in all; resident at the end {peak >> 20} MiB")
    parts = list(next(iter(cpu_per_op.values())))
    print(
        "CPU us per 4 KiB access (user + system, from /proc), netmemfs's parts:\n"
        f"  {'phase':<12}" + "".join(f" {part:>13}" for part in parts)
    )
    for phase, by_part in cpu_per_op.items():
        print(f"  {phase:<12}" + "".join(f" {by_part[part]:13.1f}" for part in parts))
    print(
        f"resync: {args.resync_mib} MiB region, {args.resync_budget_mib} MiB budget: "
        f"rewrite {rewrite:.0f} MB/s, its sync {resync_mbs:.0f} MB/s = "
        f"{resync_mbs / rewrite:.2f}x the rewrite (first sync {first_sync:.2f} s)"
    )
    print("verify: every page as written" if ok else "verify: FAILED")
    print(steal.line())
    if args.png is not None:
        for phase in samples["netmemfs"]:
            series = {who: got[phase] for who, got in samples.items() if phase in got}
            reference = "zram" if "zram" in series else "plain"
            written_to = plot.cdf(
                plot.path_for(args.png, phase.replace(" ", "-")),
                f"{phase}: 4 KiB accesses, {args.mib} MiB region, {args.budget_mib} MiB budget",
                series,
                reference=reference,
            )
            print(f"wrote {written_to}")
        table = {
            key: {"plain": mbs, **({"zram": zram[key][0]} if zram else {}), "netmemfs": net[key][0]}
            for key, (mbs, _, _) in base.items()
        }
        written_to = plot.grouped(
            plot.path_for(args.png, "throughput"),
            f"Anonymous region phases, {args.mib} MiB region, {args.budget_mib} MiB budget",
            table,
            unit="MB/s",
            reference="plain",
        )
        print(f"wrote {written_to}")
    if not ok:
        sys.exit(1)


def check(region: mmap.mmap, written: dict[int, bytes]) -> bool:
    """Every page: the random writes' last stamp, else the sequential pattern."""
    pattern = bytes(range(256)) * (PAGE // 256)
    for p in range(len(region) // PAGE):
        if region[p * PAGE : (p + 1) * PAGE] != written.get(p, pattern):
            print(f"page {p} differs")
            return False
    return True


if __name__ == "__main__":
    main()
