"""Throughput of the page server over loopback, beside a plain socket in the same run.

    .venv/bin/python bench/server.py [--seconds 2] [--depth 8]

For 4 KiB, 64 KiB and 1 MiB batches it measures:
  plain   a plain TCP socket between two processes streaming batches one way (sendall,
          recv_into): what loopback and Python can do with no protocol at all;
  read    ReadPages requests of one batch each, `depth` in flight, through remote.py;
  commit  one transaction per batch, `depth` in flight, through remote.py;
against a real netmemfs-server process (memory mode). It prints MB/s and the ratio to plain.
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

from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.helpers import ServerProc

BATCHES = [("4 KiB", 4 << 10), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20)]
SEGMENT_BYTES = 256 << 20


def plain_sink(port: int, batch: int) -> None:
    """Child process: receive until the sender stops, then acknowledge the byte count."""
    buf = bytearray(max(batch, 1 << 16))
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while n := s.recv_into(buf):
            got += n
        s.sendall(got.to_bytes(8, "big"))


def plain_throughput(batch: int, seconds: float) -> float:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, __file__, "--plain-sink", str(port), str(batch)],
            stdin=subprocess.DEVNULL,
        )
        conn, _ = listener.accept()
        data = os.urandom(batch)
        sent = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                conn.sendall(data)
            sent += 64 * batch
        conn.shutdown(socket.SHUT_WR)
        got = int.from_bytes(conn.recv(8), "big")
        dt = time.perf_counter() - t0
        conn.close()
        child.wait(30)
    assert got == sent, (got, sent)
    return sent / dt / 1e6


async def netmemfs_throughput(
    address: str, batch: int, seconds: float, depth: int
) -> tuple[float, float]:
    pages = batch // PAGE_SIZE
    total_pages = SEGMENT_BYTES // PAGE_SIZE
    async with RemoteStore.connect(address) as store:
        name = f"bench{batch}"
        await store.create(name, SEGMENT_BYTES)
        payload = os.urandom(batch)

        async def run(kind: str) -> float:
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

            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for w in range(depth):
                    nursery.start_soon(worker, w)
            return done / (trio.current_time() - t0) / 1e6

        # Fill the segment so reads return data, not holes.
        fill = os.urandom(1 << 20)
        for first in range(0, total_pages, 256):
            await store.commit([PageRun(name, first, fill)])
        read = await run("read")
        commit = await run("commit")
        await store.delete(name)
        return read, commit


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    ap.add_argument("--depth", type=int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--plain-sink", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_sink:
        plain_sink(*args.plain_sink)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProc(Path(tmp))
        try:
            print(
                f"netmemfs-server (memory) on {srv.address}; {args.depth} requests in flight; "
                f"{args.seconds:g} s per figure"
            )
            print(
                f"{'batch':>8} {'plain MB/s':>11} {'read MB/s':>10} {'read/plain':>10} "
                f"{'commit MB/s':>12} {'commit/plain':>12}"
            )
            for label, batch in BATCHES:
                plain = plain_throughput(batch, args.seconds)
                read, commit = trio.run(
                    netmemfs_throughput, srv.address, batch, args.seconds, args.depth
                )
                print(
                    f"{label:>8} {plain:11.0f} {read:10.0f} {read / plain:10.2f} "
                    f"{commit:12.0f} {commit / plain:12.2f}",
                    flush=True,
                )
        finally:
            srv.kill()


if __name__ == "__main__":
    main()
