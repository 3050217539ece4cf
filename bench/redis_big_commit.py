"""How long the longest Redis call of a large commit blocks its node (issue 16, item 2).

    .venv/bin/python bench/redis_big_commit.py [--mib 1024] [--cluster]

Starts a redis-server (or, with --cluster, a Redis Cluster of 3 masters with a replica
each) on free loopback ports, with its slow log recording every call; commits --mib MiB
of pages to one file through the Redis store twice (the first commit fills it, the
second rewrites it: staged copies of existing chunks), and prints, per commit, the wall
time, and from SLOWLOG the number of calls of each function and the longest one: the
longest time a node did nothing else. Stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import stat
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import coredis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from netmemfs.connect import connect_store
from netmemfs.ops import MakeNode, WritePages
from netmemfs.pages import PAGE_SIZE
from netmemfs_server.store import ROOT_INO
from tests.redis_procs import RedisCluster, RedisProc, ask

SLOWLOG_LEN = 100_000


async def slowlog(ports: list[int]) -> dict[str, tuple[int, int]]:
    """Per command (an FCALL by its function): calls and the longest in us; then reset."""
    calls: dict[str, list[int]] = defaultdict(list)
    for port in ports:
        client: coredis.Redis[bytes] = coredis.Redis(port=port, decode_responses=False)
        async with client:
            for entry in await client.slowlog_get(SLOWLOG_LEN):
                words = [bytes(w) if not isinstance(w, str) else w.encode() for w in entry.command]
                name = words[0].upper()
                if name == b"FCALL" and len(words) > 1:
                    name = words[1]
                calls[name.decode()].append(entry.duration)
            await client.slowlog_reset()
    return {name: (len(d), max(d)) for name, d in calls.items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024, help="commit size (default 1024)")
    ap.add_argument("--cluster", action="store_true", help="a 3-master Redis Cluster")
    plot.add_argument(ap)
    args = ap.parse_args()
    longest_ms: dict[str, dict[str, float]] = {}  # call -> commit -> ms, for --png
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="netmemfs-bench-") as tmp:
        opts = ("--slowlog-log-slower-than", "0", "--slowlog-max-len", str(SLOWLOG_LEN))
        if args.cluster:
            cluster = RedisCluster(Path(tmp))
            procs = cluster.nodes
            url = cluster.url
        else:
            redis = RedisProc(Path(tmp), *opts)
            procs = [redis]
            url = redis.url
        try:
            ports = [p.port for p in procs]
            for port in ports:
                for key, value in zip(opts[::2], opts[1::2], strict=True):
                    ask(port, "CONFIG", "SET", key.removeprefix("--"), value)
            data = bytes(range(256)) * (size // 256)

            async def run() -> None:
                async with connect_store(url, retry_for_s=300) as store:
                    made = await store.change(
                        [MakeNode(ROOT_INO, "big", stat.S_IFREG | 0o644, size=size)]
                    )
                    ino = made.created[0]
                    for what in ("first commit", "rewrite"):
                        await slowlog(ports)
                        t0 = time.perf_counter()
                        await store.change([WritePages(ino, 0, data)])
                        took = time.perf_counter() - t0
                        print(
                            f"{what} of {args.mib} MiB: {took:.2f} s ({args.mib / took:.0f} MiB/s)"
                        )
                        for name, (n, longest) in sorted((await slowlog(ports)).items()):
                            print(f"  {name:12} {n:6} calls, longest {longest / 1000:8.2f} ms")
                            longest_ms.setdefault(name, {})[what] = longest / 1000
                    got = await store.read_inode(ino, size // PAGE_SIZE - 1, 1)
                    assert got.to_bytes() == data[-PAGE_SIZE:], "the last page is not as written"

            trio.run(run)
        finally:
            for p in procs:
                p.kill()
    if args.png is not None:
        longest = sorted(longest_ms, key=lambda k: -max(longest_ms[k].values()))[:8]
        written = plot.grouped(
            args.png,
            f"The 8 longest Redis calls while committing {args.mib} MiB "
            "(a node serves nothing else during one)",
            {name: longest_ms[name] for name in longest},
            unit="ms",
            reference=None,
            higher_is_better=False,
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
