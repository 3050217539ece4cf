"""What a 4 KiB GET costs each way a netmemfs process could talk to Redis (issue 16).

    .venv/bin/python bench/redis_clients.py [--gets 20000] [--depth 32]

Starts a redis-server of its own (Debian's, no persistence) on a free loopback port,
stores 4096 values of 4 KiB, and reads them back at random, one way at a time:

  redis-benchmark   Redis's own C client, one connection, one GET in flight: the
                    reference every ratio is to (its p50 latency)
  blocking+hiredis  a blocking socket, RESP parsed by hiredis's Reader, one in flight
  trio+hiredis      a trio SocketStream and hiredis's Reader, one in flight
  trio+hiredis xD   the same with --depth GETs in flight (pipelined)
  coredis           coredis's Redis client under trio, each GET awaited
  coredis pipe xD   coredis's pipeline, --depth GETs per execute

For each it prints the time per GET (p50 of single GETs; the mean per GET where they
are pipelined), the ratio to redis-benchmark's p50, and the CPU time per GET of this
process and of redis-server (user + system, from /proc). The server is stopped by PID.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import coredis
import hiredis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from tests.helpers import cpu_s
from tests.redis_procs import RedisProc

VALUE = 4096
KEYS = 4096


def command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def key(i: int) -> bytes:
    return b"nm:bench:%d" % i


def fill(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        reader = hiredis.Reader()
        s.sendall(b"".join(command(b"SET", key(i), bytes([i % 251]) * VALUE) for i in range(KEYS)))
        got = 0
        while got < KEYS:
            reader.feed(s.recv(1 << 16))
            while (reply := reader.gets()) is not False:
                assert reply == b"OK", reply
                got += 1


def benchmark_reference(port: int, gets: int) -> float:
    """redis-benchmark's p50 for GET of 4 KiB values, one connection: microseconds."""
    cmd = ["redis-benchmark", "-p", str(port), "-t", "get", "-d", str(VALUE), "-c", "1"]
    out = subprocess.run(
        [*cmd, "-n", str(gets), "--csv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    return float(rows[0]["p50_latency_ms"]) * 1000


def blocking_hiredis(port: int, keys: list[int]) -> list[float]:
    lat = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = hiredis.Reader()
        for i in keys:
            t = time.perf_counter_ns()
            s.sendall(command(b"GET", key(i)))
            while (reply := reader.gets()) is False:
                reader.feed(s.recv(1 << 16))
            lat.append((time.perf_counter_ns() - t) / 1000)
            assert len(reply) == VALUE
    return lat


async def trio_hiredis(port: int, keys: list[int], depth: int) -> list[float]:
    """One GET in flight (depth 1: latency of each), or depth in flight (the time of
    each batch, divided by depth)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = hiredis.Reader()
    lat = []
    async with stream:
        for start in range(0, len(keys), depth):
            batch = keys[start : start + depth]
            t = time.perf_counter_ns()
            await stream.send_all(b"".join(command(b"GET", key(i)) for i in batch))
            got = 0
            while got < len(batch):
                while (reply := reader.gets()) is False:
                    reader.feed(await stream.receive_some(1 << 16))
                assert len(reply) == VALUE
                got += 1
            lat.append((time.perf_counter_ns() - t) / 1000 / len(batch))
    return lat


async def coredis_awaited(port: int, keys: list[int]) -> list[float]:
    lat = []
    client = coredis.Redis(host="127.0.0.1", port=port, decode_responses=False)
    async with client:
        for i in keys:
            t = time.perf_counter_ns()
            value = await client.get(key(i))
            lat.append((time.perf_counter_ns() - t) / 1000)
            assert value is not None and len(value) == VALUE
    return lat


async def coredis_pipelined(port: int, keys: list[int], depth: int) -> list[float]:
    lat = []
    client = coredis.Redis(host="127.0.0.1", port=port, decode_responses=False)
    async with client:
        for start in range(0, len(keys), depth):
            batch = keys[start : start + depth]
            t = time.perf_counter_ns()
            async with client.pipeline(transaction=False) as pipe:
                requests = [pipe.get(key(i)) for i in batch]
            values = [await r for r in requests]
            lat.append((time.perf_counter_ns() - t) / 1000 / len(batch))
            assert all(v is not None and len(v) == VALUE for v in values)
    return lat


# Latencies (us per GET) of each way, for --png.
SAMPLES: dict[str, list[float]] = {}


def measure_all(
    port: int, pid: int, keys: list[int], depth: int
) -> list[tuple[str, float, float, float]]:
    """(way, us per GET, this process's CPU us per GET, the server's) for each way;
    redis-benchmark first."""
    fill(port)
    me = os.getpid()
    c0 = cpu_s(pid)
    ref = benchmark_reference(port, len(keys))
    rows = [("redis-benchmark", ref, float("nan"), (cpu_s(pid) - c0) * 1e6 / len(keys))]
    SAMPLES.clear()

    def measure(name: str, run: Callable[[], list[float]], mean: bool) -> None:
        s0, m0 = cpu_s(pid), cpu_s(me)
        lat = run()
        SAMPLES[name] = lat
        per = sum(lat) / len(lat) if mean else sorted(lat)[len(lat) // 2]
        cpu_me = (cpu_s(me) - m0) * 1e6 / len(keys)
        rows.append((name, per, cpu_me, (cpu_s(pid) - s0) * 1e6 / len(keys)))

    def under_trio(fn: Callable[[], Awaitable[list[float]]]) -> Callable[[], list[float]]:
        return lambda: trio.run(fn)

    d = depth
    measure("blocking+hiredis", lambda: blocking_hiredis(port, keys), False)
    measure("trio+hiredis", under_trio(lambda: trio_hiredis(port, keys, 1)), False)
    measure(f"trio+hiredis x{d}", under_trio(lambda: trio_hiredis(port, keys, d)), True)
    measure("coredis", under_trio(lambda: coredis_awaited(port, keys)), False)
    measure(f"coredis pipe x{d}", under_trio(lambda: coredis_pipelined(port, keys, d)), True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gets", type=int, default=20000, help="GETs per way (default 20000)")
    ap.add_argument("--depth", type=int, default=32, help="GETs in flight when pipelined")
    plot.add_argument(ap)
    args = ap.parse_args()
    rng = random.Random(1)
    keys = [rng.randrange(KEYS) for _ in range(args.gets)]
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProc(Path(tmp))
        try:
            rows = measure_all(redis.port, redis.proc.pid, keys, args.depth)
        finally:
            redis.kill()
    ref = rows[0][1]
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    print(
        f"4 KiB GETs of {KEYS} keys at random, {args.gets} per way, redis-server "
        f"{version.stdout.split()[2]} on loopback"
    )
    print(
        f"{'way':<20} {'us/GET':>8} {'/redis-benchmark':>17} {'client cpu us':>14} "
        f"{'server cpu us':>14}"
    )
    for name, per, cpu_me, cpu_srv in rows:
        print(f"{name:<20} {per:8.1f} {per / ref:17.2f} {cpu_me:14.1f} {cpu_srv:14.1f}")
    print(
        "us/GET: p50 of single GETs, or the mean per GET of pipelined batches; "
        "redis-benchmark's is its own p50 (its client is C); cpu: user + system per GET"
    )
    if args.png is not None:
        written = plot.cdf(
            plot.path_for(args.png, "latency"),
            f"4 KiB GETs from Python, {args.gets} per way (pipelined: per GET of a batch)",
            SAMPLES,
            marks={"redis-benchmark p50": ref},
        )
        print(f"wrote {written}")
        written = plot.bars(
            plot.path_for(args.png, "per-get"),
            "us per 4 KiB GET (p50, or the mean per GET of a pipelined batch)",
            {name: per for name, per, _, _ in rows},
            unit="us per GET",
            reference="redis-benchmark",
            higher_is_better=False,
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
