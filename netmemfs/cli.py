"""`netmemfs`: the client command line (mount, umount, demo)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import trio

from netmemfs import __version__, kdoor, status
from netmemfs._trio_util import open_quiet_nursery
from netmemfs.agent import run_private
from netmemfs.auth import read_token_file
from netmemfs.connect import check_address
from netmemfs.daemon import MountOptions, default_cache_dir, lock_cache_dir
from netmemfs.daemon import run as daemon_run
from netmemfs.errors import NetmemError
from netmemfs.fs import ATTR_TIMEOUT_S, DEFAULT_CACHE_BYTES, DEFAULT_UNJOURNALED_BYTES
from netmemfs.locking import lock
from netmemfs.pages import PAGE_SIZE
from netmemfs.progress import Progress
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore, tls_client_context
from netmemfs.sizes import format_size, parse_size
from netmemfs.status import mount_type

DESCRIPTION = """\
netmemfs: memory that a process maps, whose pages live on a netmemfs-server.

commands:
  mount    mount the server's segments as files: mmap one, write, fsync to commit
  umount   unmount (writes never fsynced are dropped, as a crash would)
  demo     create a segment, commit pages to it and read them back, printing each step
  serve-device  serve the kernel module's /dev/netmem (root; docs/kmod.md)
  agent    (started by libnetmem) serve one anonymous region's pages over a socket

examples:
  netmemfs mount /mnt/nm                         # a private server on this machine
  netmemfs mount /mnt/nm --server memhost:7733   # pages live on memhost
  netmemfs mount /mnt/nm --server redis://10.0.0.5:6379,10.0.0.6:6379
                                                 # pages live in a Redis Cluster
  python3 -c 'import mmap,os; fd=os.open("/mnt/nm/seg0",os.O_RDWR|os.O_CREAT); ...'
  netmemfs umount /mnt/nm

`netmemfs COMMAND --help` says more of each command.
"""

MOUNT_DESCRIPTION = """\
Mount a netmemfs server's segments as files under MOUNTPOINT. Each file is one segment:
read, write, truncate and mmap(MAP_SHARED) it like any file. Writes (and pages written
through a mapping) are kept in a journal under --cache-dir until fsync (or msync(MS_SYNC)
then fsync), which commits all of that file's changes to the server as one transaction,
all or nothing. A process opening the file later, on any mount of the same server, sees
what was committed.

--server names a netmemfs-server (HOST[:PORT]) or a Redis: redis://HOST:PORT for a
standalone Redis, redis://HOST:PORT,HOST:PORT... for a Redis Cluster's seed nodes,
rediss:// for TLS; --token-file then holds its password (PASSWORD, or USER PASSWORD for
a Redis ACL user). Redis must not evict keys (maxmemory-policy noeviction).

Without --server a private page server is started on 127.0.0.1 for this mount; it
keeps what was committed in the cache dir (<cache-dir>/server), so the files are there
again at the next mount with the same cache dir. The command returns once the mount is
ready and the daemon keeps serving in the background; `netmemfs umount MOUNTPOINT` ends
it. If the daemon dies (even kill -9), run the same mount command again: it clears the
dead mount and finishes a commit that was under way.

If the cache dir's disk fills up or turns read-only, written pages it cannot take are
kept in memory (up to --max-unjournaled) and every fsync of their file fails with
ENOSPC or EROFS until there is room again; past that bound writes fail with the same
errno. Nothing a write() or a mapping handed over is dropped without an error.
"""


def _seconds(text: str) -> float:
    """A number of seconds from 0 to a day, for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from 0 to 86400; write e.g. 1 or 0.5"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netmemfs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser(
        "mount",
        help="mount a server's segments as files",
        description=MOUNT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    m.add_argument(
        "--server",
        metavar="ADDRESS",
        help="HOST[:PORT] of a netmemfs-server (port 7733 by default), or redis://HOST:PORT"
        "[,HOST:PORT...] (a Redis or a Redis Cluster's seeds); default: a private one",
    )
    m.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="journal and log of this mount (default ~/.cache/netmemfs/mounts/<mountpoint>); "
        "reuse it after a crash and commits under way are finished",
    )
    m.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long an operation waits for an unreachable server before failing with "
        "EIO (default %(default)g)",
    )
    m.add_argument(
        "--cache-size",
        type=parse_size,
        default=DEFAULT_CACHE_BYTES,
        metavar="SIZE",
        help="memory for pages fetched from the server, kept while the file is unchanged "
        f"(default {format_size(DEFAULT_CACHE_BYTES)}; 0 turns it off)",
    )
    m.add_argument(
        "--max-unjournaled",
        type=parse_size,
        default=DEFAULT_UNJOURNALED_BYTES,
        metavar="SIZE",
        help="memory for written pages the cache dir cannot take (disk full or read-only), "
        "kept until it can; fsync fails until then, and past SIZE writes fail "
        f"(default {format_size(DEFAULT_UNJOURNALED_BYTES)})",
    )
    m.add_argument(
        "--negative-timeout",
        type=_seconds,
        default=ATTR_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a name found missing is known as missing without asking the server "
        "(default %(default)g, as for names that exist): a program that looks for a "
        "missing file again and again (SQLite's -journal) is not slowed by the network, "
        "but a file another client makes may be seen here that much later; 0 asks every "
        "time",
    )
    m.add_argument("--token-file", type=Path, metavar="FILE", help="the server's token")
    _add_tls_ca(m)
    m.add_argument("--allow-other", action="store_true", help="let other users use the mount too")
    m.add_argument(
        "--serve-device",
        type=Path,
        nargs="?",
        const=Path("/dev/netmem"),
        metavar="DEVICE",
        help="also be the page provider of the kernel module's device (default "
        "/dev/netmem; root only; docs/kmod.md)",
    )
    m.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (pages read from the "
        "journal, cache and store, fetch and commit latency, dirty pages, reconnects; "
        "docs/operations.md lists them). Anyone who can reach the port can read them: "
        "keep it on loopback or a monitoring network",
    )
    m.add_argument(
        "-f", "--foreground", action="store_true", help="serve in this process, log to stderr"
    )
    m.add_argument("-v", "--verbose", action="store_true", help="log more")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    cf = sub.add_parser(
        "config",
        help="compiler flags for C programs that use libnetmem (like pkg-config)",
        description="Print what a C compiler needs to build against the libnetmem built "
        "into this installation (`pip install` builds it into the package): "
        "gcc prog.c $(netmemfs config --cflags --libs). The program then finds the "
        "library by its run path, and its agent as `netmemfs` on PATH (or $NETMEMFS_BIN). "
        "A system-wide install (scripts/setup as root) is found with `pkg-config netmem` "
        "instead.",
    )
    cf.add_argument("--cflags", action="store_true", help="the include flags")
    cf.add_argument("--libs", action="store_true", help="the link flags (with a run path)")
    cf.add_argument("--libdir", action="store_true", help="the directory of libnetmem.so")
    st = sub.add_parser(
        "status",
        help="what a mount's daemon is doing: dirty pages, commits, latencies, regions",
        description="Ask the daemon serving MOUNTPOINT (over its own socket, never from "
        "files left behind) for its state: its store, per file the pages written and not "
        "yet committed and the journal bytes holding them, the last commit and how long it "
        "took, the cache hit rate, fetch and commit latency p50/p99 over the last minute, "
        "the anonymous regions it serves. Exits 1 with a line saying what to do if there "
        "is no running daemon there.",
    )
    st.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    u = sub.add_parser(
        "umount",
        help="unmount",
        description="Unmount MOUNTPOINT and wait for its daemon to exit. Writes that were "
        "never fsynced are dropped.",
    )
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.add_argument("--cache-dir", type=Path, metavar="DIR", help="as given to mount")
    lk = sub.add_parser(
        "lock",
        help="run a command holding a lock on a file of a mount (like flock(1))",
        description="Take a lock on FILE (a file of a netmemfs mount) from the server, so "
        "that every mount on every machine sees it; run COMMAND; commit the file (as fsync "
        "would: what COMMAND wrote to it from this machine lands under the lock); release "
        "the lock. Exits with COMMAND's status, or 1 if the lock was not granted within "
        "--wait or was lost before the commit (then nothing of the commit landed). Taking "
        "the lock brings this machine's view of FILE up to date with every commit made "
        "under it before. Example: netmemfs lock /mnt/nm/counter -- sh -c 'n=$(cat "
        "/mnt/nm/counter); echo $((n+1)) > /mnt/nm/counter'",
    )
    lk.add_argument("file", type=Path, metavar="FILE")
    lk.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    lk.add_argument("--shared", action="store_true", help="a shared lock (default: exclusive)")
    lk.add_argument("--start", type=int, default=0, help="first byte locked (default 0)")
    lk.add_argument("--length", type=int, default=0, help="bytes locked (default 0: to any end)")
    lk.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="S",
        help="give up if not granted within S seconds (default %(default)g; 0: try once)",
    )
    lk.add_argument(
        "--no-commit", action="store_true", help="release without committing FILE first"
    )
    demo = sub.add_parser(
        "demo",
        help="write, commit and read back a segment",
        description="Create a segment, commit pages to it as one transaction, read them back "
        "and check them. Without --server a private in-memory server is started on 127.0.0.1.",
    )
    demo.add_argument("--server", metavar="HOST[:PORT]", help="use this netmemfs-server")
    demo.add_argument("--token-file", type=Path, metavar="FILE", help="the server's token")
    _add_tls_ca(demo)
    demo.add_argument("--segment", default="demo", help="segment name (default %(default)s)")
    demo.add_argument(
        "--pages", type=int, default=2048, help="pages to write (default %(default)s = 8 MiB)"
    )
    d = sub.add_parser(
        "serve-device",
        help="serve the kernel module's /dev/netmem with a server's pages",
        description="Become the page provider of /dev/netmem (kmod/netmem.c): fetch the "
        "pages that faults on mapped areas ask for, and commit what their syncs hand over, "
        "with the server's pages. Runs in the foreground until interrupted; while it is "
        "not running, faults that need a page get SIGBUS. Needs root (the device is "
        "0600). See docs/kmod.md.",
    )
    d.add_argument("--device", type=Path, default=Path("/dev/netmem"), help="default %(default)s")
    d.add_argument(
        "--server",
        metavar="HOST[:PORT]",
        default="127.0.0.1:7733",
        help="the netmemfs-server (default %(default)s)",
    )
    d.add_argument("--token-file", type=Path, metavar="FILE", help="the server's token")
    _add_tls_ca(d)
    d.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long to retry the server (default %(default)s s)",
    )
    a = sub.add_parser(
        "agent",
        help="serve one anonymous region (started by libnetmem, not by hand)",
        description="The network side of an anonymous region mapped with libnetmem "
        "(netmem_map in C, netmemfs.anon.map in Python): serves the region's requests on "
        "the Unix socket FD until it closes. The library starts it; see docs/anon.md.",
    )
    a.add_argument("--fd", type=int, required=True, help="the region's socket")
    a.add_argument(
        "--server",
        required=True,
        metavar="ADDRESS",
        help="the netmemfs-server (HOST[:PORT]) or Redis (redis://HOST:PORT[,...])",
    )
    a.add_argument(
        "--timeout-ms", type=int, default=30000, metavar="MS", help="server retry period"
    )
    a.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("NETMEMFS_TOKEN_FILE"),
        metavar="FILE",
        help="the server's token (default $NETMEMFS_TOKEN_FILE)",
    )
    _add_tls_ca(a, default=os.environ.get("NETMEMFS_TLS_CA"), env="$NETMEMFS_TLS_CA")
    return p


def _add_tls_ca(p: argparse.ArgumentParser, default: str | None = None, env: str = "") -> None:
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=default,
        metavar="PEM",
        help="reach the server over TLS, trusting the CA certificates in PEM (the server "
        "runs with --tls-cert; its certificate must name the host given to --server)"
        + (f" (default {env})" if env else ""),
    )


def _access(args: argparse.Namespace) -> tuple[bytes | None, ssl.SSLContext | None]:
    """The token and TLS context the command line asks for."""
    token = read_token_file(args.token_file) if args.token_file else None
    tls = tls_client_context(args.tls_ca) if args.tls_ca else None
    return token, tls


async def _demo(
    address: str | None,
    token: bytes | None,
    tls: ssl.SSLContext | None,
    name: str,
    pages: int,
) -> None:
    async with open_quiet_nursery() as nursery:
        if address is None:
            from netmemfs_server.serve import PageServer
            from netmemfs_server.store import MemoryPageStore

            port = await nursery.start(PageServer(MemoryPageStore()).serve, "127.0.0.1", 0)
            address = f"127.0.0.1:{port}"
            print(f"started an in-memory page server on {address}")
        async with RemoteStore.connect(address, token=token, tls=tls, retry_for_s=5) as store:
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


def _mount_options(args: argparse.Namespace) -> MountOptions:
    mountpoint = args.mountpoint.absolute()
    token, tls = _access(args)
    return MountOptions(
        mountpoint=mountpoint,
        server=args.server,
        cache_dir=(args.cache_dir or default_cache_dir(mountpoint)).absolute(),
        timeout_s=args.timeout,
        token=token,
        tls=tls,
        allow_other=args.allow_other,
        cache_bytes=args.cache_size,
        unjournaled_bytes=args.max_unjournaled,
        negative_timeout_s=args.negative_timeout,
        serve_device=args.serve_device.absolute() if args.serve_device else None,
        metrics=args.metrics,
    )


def _mountpoint_problem(mountpoint: Path) -> str | None:
    """Why netmemfs cannot mount on mountpoint, or None. The mount of a netmemfs
    daemon that died (it answers ENOTCONN) is no problem: the new daemon clears it."""
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN and mount_type(mountpoint) == "fuse.netmemfs":
            return None
        if e.errno == errno.ENOENT:
            return f"mount point {mountpoint} does not exist; create it first (mkdir {mountpoint})"
        return f"cannot use mount point {mountpoint}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"mount point {mountpoint} is not a directory"
    if os.path.ismount(mountpoint):
        kind = mount_type(mountpoint)
        if kind == "fuse.netmemfs":
            return (
                f"{mountpoint} is already mounted by netmemfs; to mount it again, unmount "
                f"it first (netmemfs umount {mountpoint})"
            )
        return f"{mountpoint} is already a mount point ({kind}); choose an empty directory"
    with os.scandir(mountpoint) as entries:
        if any(entries):
            return (
                f"mount point {mountpoint} is not empty; its files would be hidden while "
                "mounted: choose an empty directory"
            )
    return None


def _mount(args: argparse.Namespace) -> int:
    opts = _mount_options(args)
    problem = _mountpoint_problem(opts.mountpoint)
    if problem:
        print(f"netmemfs: {problem}", file=sys.stderr)
        return 2
    if args.foreground:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s netmemfs: %(levelname)s %(message)s",
            force=True,
        )
        lock = lock_cache_dir(opts.cache_dir)
        try:
            trio.run(daemon_run, opts, args.ready_fd)
        finally:
            os.close(lock)
        return 0
    opts.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = opts.cache_dir / "daemon.log"
    # One log per mount: the previous one is kept as daemon.log.1, so that a failure
    # shows this attempt's lines and the log does not grow forever.
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size:
            os.replace(log_path, log_path.with_name("daemon.log.1"))
    # -P: the installed netmemfs, not a checkout that happens to be the current dir.
    cmd = [sys.executable, "-P", "-m", "netmemfs", *(argv_of_mount(args, opts))]
    r, w = os.pipe()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [*cmd, "--foreground", "--ready-fd", str(w)],
            pass_fds=(w,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    os.close(w)
    ready = False
    with os.fdopen(r, "rb") as pipe:
        for line in pipe:  # EOF when the daemon is ready or has died
            if line.startswith(b"waiting "):
                print(f"netmemfs: {line[8:].decode(errors='replace').strip()}", file=sys.stderr)
            elif line.startswith(b"ready"):
                ready = True
                break
    if ready:
        print(f"netmemfs: mounted {opts.mountpoint} (daemon pid {proc.pid}, log {log_path})")
        return 0
    proc.wait(30)
    tail = log_path.read_text(errors="replace").splitlines()[-8:]
    print(f"netmemfs: mounting {opts.mountpoint} failed:", *tail, sep="\n  ", file=sys.stderr)
    return 1


def argv_of_mount(args: argparse.Namespace, opts: MountOptions) -> list[str]:
    out = ["mount", str(opts.mountpoint), "--cache-dir", str(opts.cache_dir)]
    out += ["--timeout", str(opts.timeout_s), "--cache-size", str(opts.cache_bytes)]
    out += ["--max-unjournaled", str(opts.unjournaled_bytes)]
    out += ["--negative-timeout", str(opts.negative_timeout_s)]
    if args.server:
        out += ["--server", args.server]
    if args.token_file:
        out += ["--token-file", str(args.token_file.absolute())]
    if args.tls_ca:
        out += ["--tls-ca", str(args.tls_ca.absolute())]
    if args.allow_other:
        out.append("--allow-other")
    if opts.serve_device:
        out += ["--serve-device", str(opts.serve_device)]
    if opts.metrics:
        out += ["--metrics", opts.metrics]
    if args.verbose:
        out.append("--verbose")
    return out


UMOUNT_BUSY_S = 5.0  # how long `umount` asks again while the kernel says the mount is busy
UMOUNT_ASK_S = 0.25  # how often it asks the daemon what is under way meanwhile


def _under_way(mountpoint: Path) -> tuple[list[str], list[str]]:
    """What the daemon of mountpoint is committing now (described), and the files open
    through it; nothing if it cannot say."""
    try:
        got = status.query(mountpoint)
    except NetmemError:
        return [], []
    now = time.time()
    commits = [
        f"the commit of {f['committing_pages']} pages to {f['path']!r} (under way for "
        f"{now - f['committing_since']:.1f} s)"
        for f in got["open_files"]
        if f["committing_since"] is not None
    ]
    return commits, [repr(f["path"]) for f in got["open_files"] if f["opens"]]


def _umount(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.absolute()
    cache_dir = args.cache_dir or default_cache_dir(mountpoint)
    pid = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((cache_dir / "lock").read_text().split()[0])
    dead = False
    try:
        os.lstat(mountpoint)
    except OSError as e:
        dead = e.errno == errno.ENOTCONN  # its daemon died: take the mount away lazily
    if not dead and not os.path.ismount(mountpoint):
        print(f"netmemfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    flags = "-uz" if dead else "-u"
    # A file closed just before may still be held by the kernel until the daemon has
    # answered its release: busy for a moment, so ask again, for a bounded time; and
    # for as long as a commit is under way (its fsync holds the file open), saying so.
    busy_deadline = time.monotonic() + UMOUNT_BUSY_S
    next_ask = 0.0
    open_files: list[str] = []
    waiting: Progress | None = None
    try:
        while True:
            r = subprocess.run(
                ["fusermount3", flags, str(mountpoint)], capture_output=True, text=True
            )
            if r.returncode == 0 or "busy" not in r.stderr:
                break
            now = time.monotonic()
            if now >= next_ask:
                next_ask = now + UMOUNT_ASK_S
                commits, open_files = _under_way(mountpoint)
                if commits:
                    busy_deadline = now + UMOUNT_BUSY_S
                    what = f"netmemfs: umount waiting for {'; '.join(commits)}"
                    if waiting is None:
                        waiting = Progress(what, None, at_once=True)
                    waiting.update(0, what)
            if now > busy_deadline:
                break
            time.sleep(0.05)  # the kernel gives no event to wait on
    finally:
        if waiting is not None:
            waiting.close()
    if r.returncode != 0:
        held = f"; open in it: {', '.join(open_files)}" if open_files else ""
        print(
            f"netmemfs: cannot unmount {mountpoint}: {r.stderr.strip()}{held}\n"
            "  (if it is busy, close the files and mappings in it first)",
            file=sys.stderr,
        )
        return 1
    deadline = time.monotonic() + 30
    while pid is not None and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # a process we did not start: polling is all there is
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


LIBNETMEM_DIR = Path(__file__).resolve().parent / "_lib"


def _config(args: argparse.Namespace) -> int:
    lib = LIBNETMEM_DIR
    if not (lib / "libnetmem.so").is_file():
        print(
            f"netmemfs config: no libnetmem in this installation ({lib} has none): install "
            "netmemfs with pip (`pip install .` builds it), or use a system-wide one "
            "(`pkg-config --cflags --libs netmem`, which scripts/setup installs as root)",
            file=sys.stderr,
        )
        return 1
    words = []
    if args.cflags:
        words.append(f"-I{lib / 'include'}")
    if args.libs:
        words += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lnetmem", "-pthread"]
    if args.libdir:
        words.append(str(lib))
    if not words:
        print("netmemfs config: say what to print: --cflags, --libs or --libdir", file=sys.stderr)
        return 2
    print(" ".join(words))
    return 0


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # argparse keeps its subcommands nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _lock(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("netmemfs lock: give a command after --", file=sys.stderr)
        return 2
    with lock(
        args.file,
        args.start,
        args.length,
        exclusive=not args.shared,
        wait_s=args.wait,
        commit=not args.no_commit,
    ):
        try:
            status = subprocess.run(cmd).returncode
        except OSError as e:
            print(f"netmemfs lock: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
            status = 127
    return status if status >= 0 else 128 - status


# `netmemfs mount`'s options that mount(8)'s -o may give, with _ for -: name=value ...
MOUNT_HELPER_OPTIONS = (
    *("cache_dir", "timeout", "cache_size", "max_unjournaled", "negative_timeout"),
    *("token_file", "tls_ca", "metrics"),
)
MOUNT_HELPER_FLAGS = ("allow_other", "verbose")  # ... and flags
# Options mount(8), fstab and systemd use that mean nothing to netmemfs (or that its
# FUSE mount always has): accepted and dropped.
MOUNT_HELPER_IGNORED = {
    *("defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group"),
    *("_netdev", "nofail", "dev", "nodev", "suid", "nosuid", "exec", "noexec"),
    *("atime", "noatime", "relatime", "strictatime", "diratime", "nodiratime"),
    *("async", "sync", "default_permissions"),
}
# The private server a mount without --server starts: fstab's SOURCE for it.
LOCAL_SOURCE = "local"


def mount_helper_argv(source: str, mountpoint: str, options: list[str]) -> list[str]:
    """`netmemfs mount`'s arguments for mount(8)'s SOURCE MOUNTPOINT -o OPTIONS;
    ValueError naming an option it does not know."""
    out = ["mount", mountpoint]
    if source != LOCAL_SOURCE:
        out += ["--server", source]
    for group in options:
        for option in filter(None, group.split(",")):
            name, eq, value = option.partition("=")
            if option in MOUNT_HELPER_IGNORED or name.startswith(("x-", "comment")):
                continue
            if name == "ro":
                raise ValueError(
                    "mount option 'ro': netmemfs mounts are read-write only; remove it"
                )
            flag = "--" + name.replace("_", "-")
            if name in MOUNT_HELPER_FLAGS and not eq:
                out.append(flag)
            elif name in MOUNT_HELPER_OPTIONS and eq and value:
                out += [flag, value]
            else:
                known = sorted([*(f"{k}=..." for k in MOUNT_HELPER_OPTIONS), *MOUNT_HELPER_FLAGS])
                raise ValueError(
                    f"unknown mount option {option!r}; netmemfs takes {', '.join(known)} "
                    "(and ignores the usual ones such as _netdev, nofail, noauto, x-systemd.*)"
                )
    return out


def mount_helper(argv: list[str] | None = None) -> int:
    """mount.netmemfs: what mount(8) runs for an fstab line of type netmemfs (or, through
    mount.fuse, of type fuse.netmemfs, which runs `netmemfs SOURCE MOUNTPOINT -o ...`):
    SOURCE MOUNTPOINT [-o OPTIONS] [-s] [-f] [-n] [-v]."""
    p = argparse.ArgumentParser(
        prog="mount.netmemfs",
        description="Mount a netmemfs file system from /etc/fstab (mount -t netmemfs, or "
        "-t fuse.netmemfs). SOURCE is the --server address (HOST:PORT, or redis://...), "
        f"or '{LOCAL_SOURCE}' for a private server; -o takes netmemfs mount's options "
        "with _ for - (cache_dir=DIR, token_file=FILE, timeout=S, cache_size=SIZE, "
        "allow_other, ...). Example fstab line: memhost:7733 /mnt/nm fuse.netmemfs "
        "_netdev,token_file=/etc/netmemfs/token,cache_dir=/var/cache/netmemfs/nm 0 0",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-s", action="store_true", help="sloppy: ignored")
    p.add_argument("-f", dest="fake", action="store_true", help="check the options only")
    p.add_argument("-n", action="store_true", help="no mtab: ignored")
    p.add_argument("-v", action="store_true", help="ignored")
    p.add_argument("-t", metavar="TYPE", help="ignored")
    args = p.parse_args(argv)
    try:
        mount_argv = mount_helper_argv(args.source, args.mountpoint, args.options)
    except ValueError as e:
        print(f"mount.netmemfs: {e}", file=sys.stderr)
        return 2
    if args.fake:
        return 0
    return main(mount_argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in _commands(parser):
        # `netmemfs SOURCE MOUNTPOINT -o OPTIONS`: how mount.fuse runs a fuse.netmemfs
        # line of /etc/fstab (as it runs sshfs for fuse.sshfs).
        return mount_helper(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="netmemfs: %(levelname)s %(message)s")
    if getattr(args, "server", None):
        try:
            check_address(args.server)
        except ValueError as e:
            print(f"netmemfs: --server {e}", file=sys.stderr)
            return 2
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "umount":
            return _umount(args)
        if args.command == "config":
            return _config(args)
        if args.command == "status":
            got = status.query(args.mountpoint.absolute())
            print(
                json.dumps(got, indent=2) if args.json else status.render(got),
                end="\n" if args.json else "",
            )
            return 0
        if args.command == "lock":
            return _lock(args)
        if args.command == "agent":
            token, tls = _access(args)
            timeout_s = max(args.timeout_ms, 1) / 1000
            trio.run(run_private, args.fd, args.server, token, tls, timeout_s)
        if args.command == "serve-device":
            token, tls = _access(args)
            trio.run(kdoor.run, args.device, args.server, token, tls, args.timeout)
        if args.command == "demo":
            token, tls = _access(args)
            trio.run(_demo, args.server, token, tls, args.segment, args.pages)
    except NetmemError as e:
        print(f"netmemfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
