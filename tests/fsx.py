"""fsx, xfstests' file system exerciser, built from ../shared/suites and run on a file
(tests/test_59_fsx.py; by hand: python -m tests.fsx FILE [OPS]).

fsx mixes reads, writes, mmap reads and writes, truncates and copy_file_range on one
file at random and checks every byte against its own model; what the file system does not
support (fallocate, here) it finds out and leaves out. The archive is built into a
temporary directory (its code never enters the repository); the standalone build needs a
config.h, written here with a HAVE_ macro for each header this machine has.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import unpack_suite

HEADERS = {
    "ASSERT_H": "assert.h",
    "DIRENT_H": "dirent.h",
    "ERRNO_H": "errno.h",
    "ERR_H": "err.h",
    "LIBGEN_H": "libgen.h",
    "LINUX_FALLOC_H": "linux/falloc.h",
    "MALLOC_H": "malloc.h",
    "STDLIB_H": "stdlib.h",
    "STRINGS_H": "strings.h",
    "STRING_H": "string.h",
    "SYS_FCNTL_H": "fcntl.h",
    "SYS_IOCTL_H": "sys/ioctl.h",
    "SYS_MMAN_H": "sys/mman.h",
    "SYS_PARAM_H": "sys/param.h",
    "SYS_STATVFS_H": "sys/statvfs.h",
    "SYS_STAT_H": "sys/stat.h",
    "SYS_TIME_H": "sys/time.h",
    "SYS_TYPES_H": "sys/types.h",
    "SYS_WAIT_H": "sys/wait.h",
    "TIME_H": "time.h",
    "UNISTD_H": "unistd.h",
}
INCLUDE_DIRS = [Path("/usr/include"), Path("/usr/include/x86_64-linux-gnu")]


def build(into: Path) -> Path:
    """fsx built under into; its path."""
    unpack_suite("xfstests-fsx.tar.gz", into)
    src = into / "xfstests-fsx"
    have = [m for m, h in HEADERS.items() if any((d / h).exists() for d in INCLUDE_DIRS)]
    have.append("COPY_FILE_RANGE")  # glibc 2.27 and later
    (src / "build").mkdir()
    (src / "build" / "config.h").write_text("".join(f"#define HAVE_{m} 1\n" for m in have))
    binary = src / "fsx"
    cmd = ["gcc", "-O1", "-D_GNU_SOURCE", "-include", "getopt.h", "-Ibuild", "-Isrc"]
    cmd += ["-Iinclude", "-o", str(binary), "ltp/fsx.c"]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"fsx does not build:\n{r.stderr}")
    return binary


def run(fsx: Path, file: Path, ops: int, seed: int, timeout_s: float) -> tuple[bool, str]:
    """Run fsx on file: whether every operation matched its model, and its output."""
    r = subprocess.run(
        [str(fsx), "-q", "-N", str(ops), "-S", str(seed), str(file)],
        cwd=file.parent,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    out = r.stdout + r.stderr
    return r.returncode == 0 and f"All {ops} operations completed A-OK!" in out, out


if __name__ == "__main__":
    ops = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with tempfile.TemporaryDirectory(prefix="fsx-") as tmp:
        ok, out = run(build(Path(tmp)), Path(sys.argv[1]), ops, 1, 3600)
    print(out or ("A-OK" if ok else "failed"))
