"""Child process of the mount crash test: commits generations of pages to files in a
mount, printing what it is about to commit and what was acknowledged, until it fails."""

from __future__ import annotations

import mmap
import os
import random
import sys

from tests.helpers import stamp_page

PAGES = 32


def main() -> None:
    mountpoint, seed, first_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    files = {}
    maps = {}
    for name in ("f0", "f1", "f2"):
        fd = os.open(os.path.join(mountpoint, name), os.O_RDWR)
        files[name] = fd
        maps[name] = mmap.mmap(fd, PAGES * 4096)
    gen = first_gen
    print("ready", flush=True)
    try:
        while True:
            gen += 1
            name = rng.choice(sorted(files))
            pages = sorted(rng.sample(range(PAGES), rng.randint(1, 12)))
            for p in pages:
                if gen % 2:
                    os.pwrite(files[name], stamp_page(name, p, gen), p * 4096)
                else:
                    maps[name][p * 4096 : (p + 1) * 4096] = stamp_page(name, p, gen)
            print("begin", name, gen, *pages, flush=True)
            if gen % 2 == 0:
                maps[name].flush()  # msync(MS_SYNC), then fsync
            os.fsync(files[name])
            print("acked", name, gen, flush=True)
    except (OSError, ValueError) as e:
        print("stopped", type(e).__name__, e, flush=True)


if __name__ == "__main__":
    main()
