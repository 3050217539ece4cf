"""A process that maps an anonymous region (tests/test_70_anon.py, test_75_anon_crash.py).

    python -m tests.anon_worker write  SERVER SEGMENT SIZE BUDGET GEN
    python -m tests.anon_worker verify SERVER SEGMENT SIZE BUDGET GEN
    python -m tests.anon_worker touch  SERVER SEGMENT SIZE BUDGET PAGE

It prints "mapped 0x<address>" once the region is mapped (the test samples the region's
resident memory there), then "syncing"/"synced" or "ok". `touch` waits for a line on
stdin, prints "touching" and reads PAGE: the test expects it to die of SIGBUS.
Pages carry the stamp of tests/c/stamp.h, so either language can check the other.
"""

from __future__ import annotations

import struct
import sys

from netmemfs import anon

PAGE = 4096
_TAILS = [bytes((k + i) & 0xFF for i in range(16, PAGE)) for k in range(256)]


def stamp(n: int, gen: int) -> bytes:
    return struct.pack("<QQ", n, gen) + _TAILS[(n * 31 + gen * 7) & 0xFF]


def describe(page: bytes) -> str:
    n, gen = struct.unpack_from("<QQ", page)
    return f"page {n} gen {gen}"


def main(argv: list[str]) -> int:
    mode, server, segment = argv[0], argv[1], argv[2]
    size, budget, arg = int(argv[3]), int(argv[4]), int(argv[5])
    with anon.map(size, segment=segment, server=server, budget=budget, timeout=3) as region:
        print(f"mapped {region._address:#x}", flush=True)
        if mode == "write":
            for n in range(size // PAGE):
                region[n * PAGE : (n + 1) * PAGE] = stamp(n, arg)
            print("syncing", flush=True)
            region.sync()
            print("synced", flush=True)
        elif mode == "verify":
            for n in range(size // PAGE):
                page = region[n * PAGE : (n + 1) * PAGE]
                if page != stamp(n, arg):
                    print(f"page {n}: want gen {arg}, have {describe(page)}", flush=True)
                    return 1
            print("ok", flush=True)
        elif mode == "touch":
            sys.stdin.readline()
            print("touching", flush=True)
            print(f"read {region[arg * PAGE]}", flush=True)  # expected: SIGBUS, no return
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
