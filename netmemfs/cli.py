"""`netmemfs`: the client command line.

Today it has `demo`, which starts a page server inside this process on loopback (or uses
--server) and walks one segment through create, write, commit and read back through
remote.py. The mount (`netmemfs mount`) arrives with the FUSE door.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import trio

from netmemfs._trio_util import open_quiet_nursery
from netmemfs.auth import read_token_file
from netmemfs.errors import NetmemError
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore

DESCRIPTION = """\
netmemfs: memory that a process maps, whose pages live on a netmemfs-server.

commands:
  demo     create a segment, commit pages to it and read them back, printing each step
           (without --server, a private in-memory server is started on 127.0.0.1)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netmemfs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="write, commit and read back a segment",
        description="Create a segment, commit pages to it as one transaction, read them back "
        "and check them. Without --server a private in-memory server is started on 127.0.0.1.",
    )
    demo.add_argument("--server", metavar="HOST[:PORT]", help="use this netmemfs-server")
    demo.add_argument("--token-file", type=Path, metavar="FILE", help="the server's token")
    demo.add_argument("--segment", default="demo", help="segment name (default %(default)s)")
    demo.add_argument(
        "--pages", type=int, default=2048, help="pages to write (default %(default)s = 8 MiB)"
    )
    return p


async def _demo(address: str | None, token: bytes | None, name: str, pages: int) -> None:
    async with open_quiet_nursery() as nursery:
        if address is None:
            from netmemfs_server.serve import PageServer
            from netmemfs_server.store import MemoryPageStore

            port = await nursery.start(PageServer(MemoryPageStore()).serve, "127.0.0.1", 0)
            address = f"127.0.0.1:{port}"
            print(f"started an in-memory page server on {address}")
        async with RemoteStore.connect(address, token=token, retry_for_s=5) as store:
            size = pages * PAGE_SIZE
            if name in await store.list_segments():
                await store.delete(name)
            await store.create(name, size)
            print(f"created segment {name!r}: {size} bytes ({pages} pages)")
            # Every page carries its own number, so any misplaced page would show.
            data = b"".join(
                (b"netmemfs page %08d " % p).ljust(PAGE_SIZE, b".") for p in range(pages)
            )
            t0 = time.perf_counter()
            result = await store.commit([PageRun(name, 0, data)])
            dt = time.perf_counter() - t0
            print(
                f"committed {pages} pages as one transaction in {dt * 1000:.1f} ms "
                f"({size / dt / 1e6:.0f} MB/s): version {result.versions[name]}"
            )
            t0 = time.perf_counter()
            back = await store.read_bytes(name, 0, pages)
            dt = time.perf_counter() - t0
            print(f"read {pages} pages back in {dt * 1000:.1f} ms ({size / dt / 1e6:.0f} MB/s)")
            if back != data:
                raise NetmemError("the pages read back differ from those committed")
            holes = await store.read_pages(name, 0, 1)
            print(f"verified: all {pages} pages match; page 0 starts {holes.to_bytes()[:22]!r}")
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="netmemfs: %(levelname)s %(message)s")
    try:
        if args.command == "demo":
            token = read_token_file(args.token_file) if args.token_file else None
            trio.run(_demo, args.server, token, args.segment, args.pages)
    except NetmemError as e:
        print(f"netmemfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
