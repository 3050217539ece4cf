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

It prints MB/s, p50/p99 latency of each 4 KiB access (from Python: about 1 us of it is
the interpreter) and the netmemfs/plain ratios, then checks every page of the region
against what was written.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import mmap
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netmemfs import anon
from tests.helpers import ServerProc

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


def run(
    mem: mmap.mmap, sync: Callable[[], None], ops: int, seed: int
) -> tuple[dict[str, tuple[float, float, float]], float, dict[int, bytes]]:
    """Phase -> (MB/s, p50 us, p99 us); the seconds the syncs took; the pages the
    random writes left (the rest hold the sequential pattern)."""
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
            out[f"{dist} {kind}"] = (ops * PAGE / took / 1e6, pct(lat, 0.5), pct(lat, 0.99))
        if kind == "write":
            t0 = time.perf_counter()
            sync()
            sync_s += time.perf_counter() - t0
    return out, sync_s, written


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024, help="region size in MiB (default 1024)")
    ap.add_argument("--budget-mib", type=int, default=256, help="resident budget (default 256)")
    ap.add_argument("--ops", type=int, default=20000, help="random 4 KiB accesses per phase")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    size, budget = args.mib << 20, args.budget_mib << 20

    plain = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base, _, _ = run(plain, lambda: None, args.ops, args.seed)
    plain.close()

    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProc(Path(tmp))
        try:
            with anon.map(size, segment="bench", server=srv.address, budget=budget) as region:
                net, sync_s, written = run(region, region.sync, args.ops, args.seed)
                peak = region.resident()
            # Every page, read back by a fresh mapping: what the syncs committed.
            with anon.map(size, segment="bench", server=srv.address, budget=budget) as again:
                ok = check(again, written)
        finally:
            srv.kill()

    print(
        f"{args.mib} MiB region, {args.budget_mib} MiB budget, {args.ops} random ops per "
        "phase; server on loopback; latencies in us per 4 KiB access"
    )
    print(
        f"{'phase':<12} {'plain MB/s':>11} {'netmemfs':>10} {'ratio':>7}   "
        f"{'plain p50/p99':>14} {'netmemfs p50/p99':>17}"
    )
    for key, (mbs, p50, p99) in base.items():
        n_mbs, n_p50, n_p99 = net[key]
        lat = f"{p50:6.1f}/{p99:<7.1f} {n_p50:8.1f}/{n_p99:<8.1f}" if p50 else ""
        print(f"{key:<12} {mbs:11.1f} {n_mbs:10.1f} {n_mbs / mbs:7.3f}   {lat}")
    print(f"syncs took {sync_s:.2f} s in all; resident at the end {peak >> 20} MiB")
    print("verify: every page as written" if ok else "verify: FAILED")
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
