"""Child process of the mount crash test: commits generations of pages to files in a
mount, and between them changes the names in its directory ns/ (mkdir, create, symlink,
link, unlink, rmdir, rename), printing what it is about to do and what was acknowledged,
until it fails."""

from __future__ import annotations

import errno
import mmap
import os
import random
import sys

from tests.helpers import stamp_page

PAGES = 32
NS = "ns"  # the directory whose names the writer changes (each op one transaction)
NAMES = ("a", "b", "c", "d")
NS_OPS = ("mkdir", "create", "symlink", "link", "unlink", "rmdir", "rename")


def ns_op(rng: random.Random) -> tuple[str, str, str]:
    """A namespace op on NAMES (valid or not: a refused one changes nothing)."""
    return rng.choice(NS_OPS), rng.choice(NAMES), rng.choice(NAMES)


def do_ns_op(ns: int, op: str, a: str, b: str) -> None:
    """op on names in the directory open as ns. Through that fd, not a path: once the
    test has killed the daemon and lazily unmounted the mount, a path would name the
    empty directory beneath (ENOENT, taken for the mount's answer); the fd still names
    the dead mount (ENOTCONN)."""
    if op == "mkdir":
        os.mkdir(a, dir_fd=ns)
    elif op == "create":
        os.close(os.open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=ns))
    elif op == "symlink":
        os.symlink(b, a, dir_fd=ns)
    elif op == "link":
        os.link(a, b, src_dir_fd=ns, dst_dir_fd=ns, follow_symlinks=False)
    elif op == "unlink":
        os.unlink(a, dir_fd=ns)
    elif op == "rmdir":
        os.rmdir(a, dir_fd=ns)
    else:
        os.rename(a, b, src_dir_fd=ns, dst_dir_fd=ns)


def main() -> None:
    mountpoint, seed, first_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    files = {}
    maps = {}
    for name in ("f0", "f1", "f2"):
        fd = os.open(os.path.join(mountpoint, name), os.O_RDWR)
        files[name] = fd
        maps[name] = mmap.mmap(fd, PAGES * 4096)
    ns = os.open(os.path.join(mountpoint, NS), os.O_RDONLY | os.O_DIRECTORY)
    gen = first_gen
    print("ready", flush=True)
    try:
        while True:
            gen += 1
            if gen % 3 == 0:
                op, a, b = ns_op(rng)
                print("nsbegin", gen, op, a, b, flush=True)
                try:
                    do_ns_op(ns, op, a, b)
                except OSError as e:
                    if e.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
                        raise  # the daemon is gone
                    print("nsrefused", gen, e.errno, flush=True)
                else:
                    print("nsacked", gen, flush=True)
                continue
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
