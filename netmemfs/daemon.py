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
import shutil
import signal
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import trio

from netmemfs import fs, journal, kdoor, status
from netmemfs._trio_util import open_quiet_nursery
from netmemfs.agent import AttachPoint
from netmemfs.connect import connect_store
from netmemfs.errors import NetmemError
from netmemfs.metrics import MetricsError, serve_metrics
from netmemfs.store import Store

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
    unjournaled_bytes: int = fs.DEFAULT_UNJOURNALED_BYTES
    serve_device: Path | None = None  # also the provider of kmod/'s device
    negative_timeout_s: float = fs.ATTR_TIMEOUT_S  # how long a missing name stays known
    metrics: str | None = None  # HOST:PORT where Prometheus metrics are served


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


PRIVATE_SERVER_WAIT_S = 10.0  # for the private server of a daemon that died to exit


def start_private_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A netmemfs-server on 127.0.0.1 for a mount without --server, durable in data_dir
    (so a daemon's death, or an unmount, loses nothing that was committed)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _wait_unlocked(data_dir / "lock", PRIVATE_SERVER_WAIT_S)
    dirs = ["--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        # -P: the installed package, not a checkout in the current directory.
        [sys.executable, "-P", "-m", "netmemfs_server", "--listen", "127.0.0.1:0", *dirs],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_set_pdeathsig,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    proc.stdout.close()
    if "listening on" not in line:
        proc.kill()
        raise MountError(
            f"the private page server (data in {data_dir}) did not start: "
            f"{line.strip() or 'see its lines above'}"
        )
    return proc, line.rsplit(" ", 1)[1].strip()


def _wait_unlocked(path: Path, timeout_s: float) -> None:
    """Wait until nobody holds the flock of path: the private server of a daemon that
    was killed gets SIGTERM from the kernel (PDEATHSIG) and may still be exiting."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MountError(
                        f"{path.parent} is in use by another netmemfs-server; is another "
                        "mount using this --cache-dir?"
                    ) from None
                time.sleep(0.05)  # another process's exit: polling is all there is
    finally:
        os.close(fd)  # releases the lock for the server


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
        private, address = start_private_server(opts.cache_dir / "server")
        log.info(
            "started a private page server on %s (data in %s)", address, opts.cache_dir / "server"
        )
    try:
        with ExitStack() as stack:
            device = None
            if opts.serve_device is not None:
                try:
                    # The private server's address changes from run to run; its data
                    # directory does not.
                    store = opts.server or f"private:{opts.cache_dir / 'server'}"
                    device = stack.enter_context(kdoor.open_device(opts.serve_device, store))
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
    async with open_quiet_nursery() as outer:
        notice = trio.CancelScope()
        outer.start_soon(_say_waiting, notice, address, opts.timeout_s, ready_fd)
        async with connect_store(
            address,
            token=opts.token,
            tls=opts.tls,
            retry_for_s=opts.timeout_s,
            # The device's daemon, replaced, must not be overtaken by its own past.
            claim=kdoor.device_claim() if device is not None else None,
        ) as store:
            notice.cancel()
            await _serve_connected(opts, store, address, device, ready_fd)
        outer.cancel_scope.cancel()


WAITING_NOTICE_S = 1.0  # a mount still connecting after this long says so
HANDLER_ANSWER_S = 1.0  # how long a status waits for a region's handler to answer


async def _say_waiting(
    scope: trio.CancelScope, address: str, timeout_s: float, ready_fd: int | None
) -> None:
    with scope:
        await trio.sleep(WAITING_NOTICE_S)
        text = f"waiting for the server {address} (for up to {timeout_s:g} s, --timeout)"
        log.info("%s", text)
        if ready_fd is not None:
            os.write(ready_fd, f"waiting {text}\n".encode())


async def _serve_connected(
    opts: MountOptions,
    store: Store,
    address: str,
    device: int | None,
    ready_fd: int | None,
) -> None:
    """The mount's life once its server answered."""
    journal_dir = opts.cache_dir / "journal"
    recovered = journal.recover(journal_dir)
    ops = fs.NetmemFS(
        store,
        journal_dir,
        timeout_s=opts.timeout_s,
        cache_bytes=opts.cache_bytes,
        unjournaled_bytes=opts.unjournaled_bytes,
        negative_timeout_s=opts.negative_timeout_s,
        # Only its mounter can enter a mount without allow_other: a user's files show
        # as theirs, whoever the server says made them (the root's owner is root).
        owner=None if os.getuid() == 0 or opts.allow_other else (os.getuid(), os.getgid()),
    )
    if recovered:
        await ops.resend_recovered(recovered)
    await ops.adopt_root()
    started_at = time.time()
    provider = None
    if device is not None:
        # The kernel keeps a failed sync's pages dirty: its journal is not kept across
        # daemons.
        device_journal = opts.cache_dir / "device"
        shutil.rmtree(device_journal, ignore_errors=True)
        device_journal.mkdir()
        provider = kdoor.DeviceProvider(
            store, device, device_journal, commit_timeout_s=opts.timeout_s
        )

    def statistics(*, per_file: bool = True) -> status.MountStatistics:
        """The daemon's numbers; per_file False: totals only (a metrics scrape, which
        holds up the event loop while it runs)."""
        return status.mount_statistics(
            mountpoint=opts.mountpoint,
            server=address,
            started_at=started_at,
            connected=store.connected,
            reconnects=store.reconnects,
            counters=ops.counters,
            cache=ops.cache,
            files=ops.files() if per_file else [],
            dirty=ops.dirty(),
            regions=attach.regions,
            device=provider,
        )

    async def status_json() -> bytes:
        # Each region's handler is asked first: its budget use lives in the mapping
        # process. One that does not answer soon is shown with what it last said.
        async with trio.open_nursery() as nursery:
            for region in list(attach.regions):
                nursery.start_soon(region.ask_handler, HANDLER_ANSWER_S)
        return status.as_json(statistics())

    attach = AttachPoint(
        opts.cache_dir / "regions", allow_other=opts.allow_other, status=status_json
    )
    endpoint = None
    if opts.metrics is not None:
        try:
            endpoint = serve_metrics(
                opts.metrics, lambda: status.mount_families(statistics(per_file=False))
            )
        except MetricsError as e:
            raise MountError(str(e)) from None
    try:
        clear_stale_mount(opts.mountpoint)
        fs.mount(ops, opts.mountpoint, allow_other=opts.allow_other)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        raise
    # True once the kernel has ended the session (fusermount3 -u, umount): then
    # there is nothing left to unmount.
    unmounted = False
    terminated = False
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

            ops.background = nursery
            nursery.start_soon(on_signal)
            nursery.start_soon(started)
            nursery.start_soon(attach.serve, store)
            nursery.start_soon(ops.keep_holds)
            nursery.start_soon(ops.keep_coherent)
            nursery.start_soon(ops.keep_locks)
            if provider is not None:
                nursery.start_soon(provider.serve)
            await fs.serve()
            unmounted = not terminated
            nursery.cancel_scope.cancel()
    finally:
        if endpoint is not None:
            endpoint.close()
        attach.close()
        fs.close(unmount=not unmounted)
        # Writes never fsynced die with the mount; sealed commits that failed
        # stay, to be sent again by the next mount with this cache dir.
        journal.drop_unsynced(journal_dir)
