"""The mount daemon: connects to the server, recovers the journal, mounts and serves.

Where it sits: above the doors (fs.py) and remote.py; cli.py starts it. It also starts
the private in-memory server a mount without --server uses, and tunes the mount's
readahead.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import ssl
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import trio

from netmemfs import fs, journal, kdoor
from netmemfs._trio_util import open_quiet_nursery
from netmemfs.agent import AttachPoint
from netmemfs.errors import NetmemError
from netmemfs.remote import RemoteStore

log = logging.getLogger("netmemfs.daemon")

READ_AHEAD_KB = 4096


@dataclass
class MountOptions:
    mountpoint: Path
    server: str | None
    cache_dir: Path
    timeout_s: float
    token: bytes | None
    tls: ssl.SSLContext | None
    allow_other: bool
    cache_bytes: int
    serve_device: Path | None = None  # also the provider of kmod/'s device


class MountError(NetmemError):
    """The mount could not be set up; the message says why and what to do."""


def default_cache_dir(mountpoint: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = str(mountpoint.resolve()).strip("/").replace("/", "_") or "root"
    return base / "netmemfs" / "mounts" / key


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    # prctl(PR_SET_PDEATHSIG, SIGTERM): the private server ends with its daemon, even a
    # daemon killed by SIGKILL. Arguments are plain ints; libc is the running one.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def start_private_server() -> tuple[subprocess.Popen[bytes], str]:
    """A netmemfs-server in memory on 127.0.0.1, for a mount without --server."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netmemfs_server", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_set_pdeathsig,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    proc.stdout.close()
    if "listening on" not in line:
        proc.kill()
        raise MountError(f"the private page server did not start: {line.strip() or 'no output'}")
    return proc, line.rsplit(" ", 1)[1].strip()


def clear_stale_mount(mountpoint: Path) -> None:
    """A daemon that died leaves its mount behind ("Transport endpoint is not
    connected"); take it away so the new daemon can mount there."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"cannot use mount point {mountpoint}: {e.strerror}") from e
        log.warning("%s holds the mount of a daemon that died; unmounting it", mountpoint)
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)


def lock_cache_dir(cache_dir: Path) -> int:
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(
            f"cache dir {cache_dir} is in use by another netmemfs mount; give each mount "
            "its own --cache-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _tune_readahead(mountpoint: Path) -> None:
    """FUSE's max_readahead can only lower readahead; the mount's backing device sets it."""
    st = os.stat(mountpoint)
    path = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        path.write_text(str(READ_AHEAD_KB))
    except OSError as e:
        log.info(
            "could not raise readahead at %s (%s); sequential reads will be slower",
            path,
            e.strerror,
        )


async def run(opts: MountOptions, ready_fd: int | None) -> None:
    """Mount and serve until unmounted (or SIGTERM/SIGINT)."""
    address = opts.server
    private = None
    if address is None:
        private, address = start_private_server()
        log.info("started a private in-memory page server on %s", address)
    try:
        with ExitStack() as stack:
            device = None
            if opts.serve_device is not None:
                try:
                    device = stack.enter_context(kdoor.open_device(opts.serve_device))
                except kdoor.DeviceError as e:
                    raise MountError(str(e)) from None
            await _serve_mount(opts, address, device, ready_fd)
    finally:
        if private is not None:
            private.terminate()
            private.wait(10)


async def _serve_mount(
    opts: MountOptions, address: str, device: int | None, ready_fd: int | None
) -> None:
    """The mount's life, with its server: the file door, the attach point for anonymous
    regions, and (device, if given) the kernel module's requests."""
    async with RemoteStore.connect(
        address, token=opts.token, tls=opts.tls, retry_for_s=opts.timeout_s
    ) as store:
        journal_dir = opts.cache_dir / "journal"
        recovered = journal.recover(journal_dir)
        ops = fs.NetmemFS(
            store, journal_dir, timeout_s=opts.timeout_s, cache_bytes=opts.cache_bytes
        )
        if recovered:
            await ops.resend_recovered(recovered)
        clear_stale_mount(opts.mountpoint)
        fs.mount(ops, opts.mountpoint, allow_other=opts.allow_other)
        # True once the kernel has ended the session (fusermount3 -u, umount): then
        # there is nothing left to unmount.
        unmounted = False
        terminated = False
        attach = AttachPoint(opts.cache_dir / "regions", allow_other=opts.allow_other)
        try:
            await attach.bind()
            ops.attach_path = attach.address
            async with open_quiet_nursery() as nursery:

                async def on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                        async for sig in sigs:
                            log.info("signal %d: unmounting", sig)
                            nonlocal terminated
                            terminated = True
                            fs.terminate()
                            return

                async def started() -> None:
                    # os.stat of the mount point is answered by our own loop: thread.
                    await trio.to_thread.run_sync(_tune_readahead, opts.mountpoint)
                    if ready_fd is not None:
                        os.write(ready_fd, b"ready\n")
                        os.close(ready_fd)
                    log.info("mounted %s (server %s)", opts.mountpoint, address)

                nursery.start_soon(on_signal)
                nursery.start_soon(started)
                nursery.start_soon(attach.serve, store)
                if device is not None:
                    nursery.start_soon(kdoor.DeviceProvider(store, device).serve)
                await fs.serve()
                unmounted = not terminated
                nursery.cancel_scope.cancel()
        finally:
            attach.close()
            fs.close(unmount=not unmounted)
            # Writes never fsynced die with the mount; sealed commits that failed
            # stay, to be sent again by the next mount with this cache dir.
            journal.drop_unsynced(journal_dir)
