"""SQLite read transactions on a mount, beside tmpfs and nullfs, in the same run.

    .venv/bin/python bench/sqlite_bench.py [--rows 20000] [--reads 5000]

A database in SQLite's default journal mode (DELETE, a rollback journal) looks for its
`-journal` file at the start of every read transaction, to find one left by a crash: on a
network file system that is a lookup of a name that does not exist, each time (issue 15,
item 5). This bench makes a table of --rows rows of 100 bytes, then times --reads
transactions of one `SELECT ... WHERE k = ?` each (autocommit: each its own read
transaction) at random keys, on:

    tmpfs        /dev/shm: no FUSE
    nullfs       bench/nullfs.py: a pyfuse3 file system in memory, the Python+FUSE floor
    netmemfs     a mount of a real netmemfs-server on loopback, its defaults (missing
                 names cached for --negative-timeout, 1 s)
    netmemfs -n0 the same with --negative-timeout 0: every such lookup asks the server,
                 as every mount did before negative entries were cached

It prints reads per second and each ratio to nullfs, then checks every row.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py
from mmap_bench import nullfs  # bench/mmap_bench.py

from tests.helpers import MountProc, ServerProc, StealMeter

ROW_BYTES = 100


def value(k: int) -> bytes:
    return k.to_bytes(8, "little") * (ROW_BYTES // 8) + bytes(ROW_BYTES % 8)


def make(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        with db:
            db.executemany("INSERT INTO kv VALUES (?, ?)", ((k, value(k)) for k in range(rows)))
    finally:
        db.close()


def reads_per_s(path: Path, rows: int, reads: int, seed: int) -> float:
    """Read transactions per second: one SELECT each, at random keys, each checked."""
    rng = random.Random(seed)
    keys = [rng.randrange(rows) for _ in range(reads)]
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: a transaction each
    try:
        t0 = time.perf_counter()
        for k in keys:
            (got,) = db.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()
            if got != value(k):
                raise SystemExit(f"{path}: row {k} reads {got[:16]!r}...")
        took = time.perf_counter() - t0
        # Every row, as written.
        n = 0
        for k, v in db.execute("SELECT k, v FROM kv ORDER BY k"):
            if v != value(k):
                raise SystemExit(f"{path}: row {k} reads {v[:16]!r}...")
            n += 1
        if n != rows:
            raise SystemExit(f"{path}: {n} rows, not {rows}")
    finally:
        db.close()
    return reads / took


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=20000, help="rows in the table (default 20000)")
    ap.add_argument("--reads", type=int, default=5000, help="read transactions timed")
    ap.add_argument("--seed", type=int, default=1)
    plot.add_argument(ap)
    args = ap.parse_args()
    steal = StealMeter()
    rate: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        work = Path(tmp)

        def measure(name: str, directory: Path) -> None:
            path = directory / f"{name.replace(' ', '')}.db"  # the mounts share a server
            make(path, args.rows)
            rate[name] = reads_per_s(path, args.rows, args.reads, args.seed)

        measure("tmpfs", Path(shm))
        with nullfs(work / "null") as null:
            measure("nullfs", null)
        srv = ServerProc(work)
        try:
            for name, extra in (("netmemfs", []), ("netmemfs -n0", ["--negative-timeout", "0"])):
                mnt = MountProc(work, srv.address, *extra, name=name.replace(" ", ""))
                try:
                    measure(name, mnt.mountpoint)
                finally:
                    mnt.cleanup()
        finally:
            srv.kill()
    print(
        f"SQLite, journal_mode=DELETE: {args.reads} read transactions of one SELECT each, "
        f"random keys, {args.rows} rows of {ROW_BYTES} bytes; server and mounts on loopback"
    )
    print(f"{'where':<14} {'reads/s':>10} {'/nullfs':>8}")
    for name, r in rate.items():
        print(f"{name:<14} {r:10.0f} {r / rate['nullfs']:8.2f}")
    print("verify: every row of each database as written")
    print(steal.line())
    if args.png is not None:
        written = plot.bars(
            args.png,
            f"SQLite read transactions (journal_mode=DELETE), {args.rows} rows",
            rate,
            unit="transactions/s",
            reference="nullfs",
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
