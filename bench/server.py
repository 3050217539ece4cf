"""Throughput of the page server over loopback, beside a plain socket in the same run.

    .venv/bin/python bench/server.py [--seconds 2] [--depth 8]

For 4 KiB, 64 KiB and 1 MiB batches it measures:
  plain   a plain TCP socket between two processes streaming batches one way (sendall,
          recv_into) from and into 256 MiB buffers: what loopback and Python can do
          moving that much memory with no protocol at all (the ratios are to this);
  plain-hot  the same, but one batch-sized buffer each side, reused (cache-hot): an
          upper bound no page server can reach, shown for reference;
  read    ReadPages requests of one batch each, `depth` in flight, through remote.py (over
          its read lane: the server answers them on a thread of its own, lane.py);
  commit  one transaction per batch, `depth` in flight, through remote.py;
against a real netmemfs-server process (memory mode). It prints MB/s and the ratio to plain,
and the server's CPU time per request (user + system, from /proc), which varies less from
run to run than throughput on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.helpers import ServerProc, StealMeter, cpu_s

BATCHES = [("4 KiB", 4 << 10), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20)]
SEGMENT_BYTES = 256 << 20


def plain_sink(port: int, batch: int, span: int) -> None:
    """Child process: receive until the sender stops, then acknowledge the byte count.

    Batches land one after another in a buffer of span bytes (1 batch: the same buffer
    every time, cache-hot; SEGMENT_BYTES: memory moving through, as for pages)."""
    buf = memoryview(bytearray(max(span, batch)))
    pos = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while n := s.recv_into(buf[pos : pos + batch]):
            got += n
            pos = (pos + n) % (len(buf) - batch + 1)
        s.sendall(got.to_bytes(8, "big"))


def plain_throughput(batch: int, seconds: float, span: int) -> float:
    """A plain socket between two processes streaming batches one way, from and into
    buffers of span bytes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, __file__, "--plain-sink", str(port), str(batch), str(span)],
            stdin=subprocess.DEVNULL,
        )
        conn, _ = listener.accept()
        data = memoryview(os.urandom(max(span, batch)))
        batches = len(data) // batch
        sent = 0
        i = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                conn.sendall(data[i * batch : (i + 1) * batch])
                i = (i + 1) % batches
            sent += 64 * batch
        conn.shutdown(socket.SHUT_WR)
        got = int.from_bytes(conn.recv(8), "big")
        dt = time.perf_counter() - t0
        conn.close()
        child.wait(30)
    assert got == sent, (got, sent)
    return sent / dt / 1e6


async def netmemfs_throughput(
    address: str, pid: int, batch: int, seconds: float, depth: int
) -> tuple[float, float, float, float]:
    """(read MB/s, server CPU us per read, commit MB/s, server CPU us per commit)"""
    pages = batch // PAGE_SIZE
    total_pages = SEGMENT_BYTES // PAGE_SIZE
    async with RemoteStore.connect(address) as store:
        name = f"bench{batch}"
        await store.create(name, SEGMENT_BYTES)
        payload = os.urandom(batch)

        async def run(kind: str) -> tuple[float, float]:
            done = 0
            deadline = trio.current_time() + seconds

            async def worker(w: int) -> None:
                nonlocal done
                page = (w * 7919 * pages) % total_pages
                while trio.current_time() < deadline:
                    page = (page + pages) % (total_pages - pages + 1)
                    if kind == "commit":
                        await store.commit([PageRun(name, page, payload)])
                    else:
                        r = await store.read_pages(name, page, pages)
                        assert sum(len(x.data) for x in r.runs) == batch
                    done += batch

            t0, c0 = trio.current_time(), cpu_s(pid)
            async with trio.open_nursery() as nursery:
                for w in range(depth):
                    nursery.start_soon(worker, w)
            cpu_us = (cpu_s(pid) - c0) * 1e6 / max(done // batch, 1)
            return done / (trio.current_time() - t0) / 1e6, cpu_us

        # Fill the segment so reads return data, not holes.
        fill = os.urandom(1 << 20)
        for first in range(0, total_pages, 256):
            await store.commit([PageRun(name, first, fill)])
        read, read_cpu = await run("read")
        commit, commit_cpu = await run("commit")
        await store.delete(name)
        return read, read_cpu, commit, commit_cpu


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    ap.add_argument("--depth", type=int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--plain-sink", nargs=3, type=int, help=argparse.SUPPRESS)
    plot.add_argument(ap)
    args = ap.parse_args()
    if args.plain_sink:
        plain_sink(*args.plain_sink)
        return
    import tempfile

    steal = StealMeter()
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProc(Path(tmp))
        try:
            print(
                f"netmemfs-server (memory) on {srv.address}; {args.depth} requests in flight; "
                f"{args.seconds:g} s per figure"
            )
            print(
                "plain-hot: the same batch buffer sent and received again and again (cache-hot)\n"
                f"plain: batches moved from and into {SEGMENT_BYTES >> 20} MiB buffers, as pages "
                "are; ratios are to this one"
            )
            print(
                f"{'batch':>8} {'plain-hot':>10} {'plain MB/s':>11} {'read MB/s':>10} "
                f"{'read/plain':>10} {'commit MB/s':>12} {'commit/plain':>12} "
                f"{'cpu us/read':>12} {'cpu us/commit':>14}"
            )
            for label, batch in BATCHES:
                hot = plain_throughput(batch, args.seconds, batch)
                plain = plain_throughput(batch, args.seconds, SEGMENT_BYTES)
                assert srv.proc is not None
                read, read_cpu, commit, commit_cpu = trio.run(
                    netmemfs_throughput, srv.address, srv.proc.pid, batch, args.seconds, args.depth
                )
                print(
                    f"{label:>8} {hot:10.0f} {plain:11.0f} {read:10.0f} {read / plain:10.2f} "
                    f"{commit:12.0f} {commit / plain:12.2f} {read_cpu:12.0f} {commit_cpu:14.0f}",
                    flush=True,
                )
                table[label] = {"plain": plain, "read": read, "commit": commit}
        finally:
            srv.kill()
    print(steal.line())
    if args.png is not None:
        written = plot.grouped(
            args.png,
            f"netmemfs-server over loopback, {args.depth} requests in flight",
            table,
            unit="MB/s",
            reference="plain",
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
