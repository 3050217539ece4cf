"""A process that adds 1 to a counter in a mapped page of a netmemfs file, N times:
    python -m tests.counter_worker PATH N lock|nolock
    python -m tests.counter_worker SERVER:SEGMENT N region
With "lock", each addition happens under an exclusive netmemfs lock and is committed at
its release; with "nolock", it is written and committed (fsync) without one; with
"region", the page is an anonymous region of the server's file SEGMENT, locked and
synced through the region. Prints "done" and exits 0."""

from __future__ import annotations

import mmap
import os
import struct
import sys

import netmemfs
from netmemfs import anon

PAGE = 4096


def main() -> None:
    path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "region":
        server, _, segment = path.rpartition(":")
        with anon.map(PAGE, segment=segment, server=server) as region:
            for _ in range(n):
                with region.lock(0, PAGE, exclusive=True, wait_s=120):
                    (value,) = struct.unpack_from("<q", region, 0)
                    struct.pack_into("<q", region, 0, value + 1)
        print("done", flush=True)
        return
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    for _ in range(n):
        if mode == "lock":
            with netmemfs.lock(path, 0, PAGE, exclusive=True, wait_s=120):
                (value,) = struct.unpack_from("<q", m, 0)
                struct.pack_into("<q", m, 0, value + 1)
        else:
            (value,) = struct.unpack_from("<q", m, 0)
            struct.pack_into("<q", m, 0, value + 1)
            os.fsync(fd)
    m.close()
    os.close(fd)
    print("done", flush=True)


if __name__ == "__main__":
    main()
