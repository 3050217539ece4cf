"""The agent: the network side of an anonymous region (the uffd door, issue 4).

Where it sits: beside fs.py, above remote.py and journal.py. libnetmem (lib/netmem.c)
serves a region's faults in a native thread of the mapping process and asks this agent,
over one Unix socket (lib/netmem_wire.h), for pages, hands it pages written (evicted or
synced) and asks it to commit. The agent keeps what it was handed in a journal (as the
mount does for a file) and commits it as one transaction, exactly once; a fetch sees the
journal's pages before the server's.

With the OPEN reply the agent hands libnetmem a second server connection, handshake
done, on which the handler reads pages that are not in this journal itself.

`netmemfs agent --fd 3 --server HOST:PORT` is the private agent libnetmem starts for a
region; it serves that one socket and exits when it closes (the mapping process ended or
unmapped: changes not synced are dropped). A mount daemon serves regions the same way on
its AttachPoint, one connection per region.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import math
import os
import shutil
import socket
import ssl
import struct
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path

import trio

from netmemfs._trio_util import open_quiet_nursery, send_parts
from netmemfs.connect import connect_store
from netmemfs.core import FileCore, resolve
from netmemfs.errors import NetmemError, NotHeld
from netmemfs.pages import PAGE_SIZE, Buffer
from netmemfs.protocol import Notice
from netmemfs.store import Handover, InodeStat, Store

log = logging.getLogger("netmemfs.agent")

HEADER = struct.Struct("<IIQQII")  # op, status, id, first, count, len: netmem_wire.h
assert HEADER.size == 32
OP_OPEN, OP_FETCH, OP_STAGE, OP_COMMIT, OP_REDIAL, OP_INVALIDATE = 1, 2, 3, 4, 5, 6
# An OPEN's status bit: the library reads pages from Redis itself (lib/netmem_wire.h).
OPEN_READS_RESP = 1
OP_LOCK, OP_UNLOCK = 7, 8
# A mount daemon's socket only, as a connection's first message: the reply's payload is
# the daemon's status (`netmemfs status --json`), then the connection ends.
OP_STATUS = 9
# To the region's handler, unasked: its counts come back (struct nm_wire_stats).
OP_STATS = 10
HANDLER_STATS = struct.Struct("<8Q")
HANDLER_STATS_FIELDS = (
    *("faults", "fetches", "direct_fetches", "evictions", "evicted", "spilled"),
    *("resident", "budget"),
)
LOCK_ARGS = struct.Struct("<QII")  # struct nm_wire_lock: length, exclusive, wait_ms
MAX_PAGES = 256  # NM_WIRE_MAX_PAGES


def bitmap_bytes(count: int) -> int:
    return (count + 63) // 64 * 8


class WireError(NetmemError):
    """The region's side sent something this agent cannot take."""

    errno = errno.EPROTO


class _Socket:
    """Whole messages in and out of the region's socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.stream = trio.SocketStream(sock)
        # Replies wait here for the writer task, so the reader never waits on a send:
        # the handler may be blocked sending us pages while its socket's receive side is
        # full of our replies (each side must keep reading). The queue is bounded by the
        # requests the handler has in flight.
        self._out_send, self._out_receive = trio.open_memory_channel[
            tuple[list[Buffer], int | None]
        ](math.inf)

    async def write_replies(self) -> None:
        """Send queued replies until finish() (then the rest) or the peer goes away."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async for parts, fd in self._out_receive:
                if fd is None:
                    await send_parts(self.stream, parts)
                    continue
                try:
                    # The descriptor rides with the message's first byte.
                    data = b"".join(parts)
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
                    sent = await self.sock.sendmsg([data], rights)
                finally:
                    os.close(fd)  # the peer has its own copy now (or none)
                await send_parts(self.stream, [data[sent:]])

    def finish(self) -> None:
        self._out_send.close()

    async def _read_exactly(self, n: int) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self.sock.recv_into(view[got:])
            if k == 0:
                return None
            got += k
        return buf

    async def receive(self) -> tuple[tuple[int, int, int, int, int, int], bytearray] | None:
        """The next message, or None at EOF."""
        head = await self._read_exactly(HEADER.size)
        if head is None:
            return None
        h = HEADER.unpack(head)
        length = h[5]
        if length > bitmap_bytes(MAX_PAGES) + MAX_PAGES * PAGE_SIZE:
            raise WireError(f"a message of {length} bytes is larger than any allowed")
        payload = await self._read_exactly(length) if length else bytearray()
        if payload is None:
            return None
        return h, payload

    def reply(
        self,
        op: int,
        req_id: int,
        first: int,
        count: int,
        parts: Sequence[Buffer],
        status: int = 0,
        fd: int | None = None,
    ) -> None:
        """Queue a reply; fd, if given, goes with it (SCM_RIGHTS) and is closed here."""
        length = sum(len(p) for p in parts)
        head = HEADER.pack(op, status, req_id, first, count, length)
        self._out_send.send_nowait(([head, *parts], fd))

    def error(self, op: int, req_id: int, e: BaseException, what: str) -> None:
        code = getattr(e, "errno", None) or errno.EIO
        self.reply(op, req_id, 0, 0, [f"{what}: {e}".encode()], status=code)


class Region:
    """One mapped region: its file (by inode number), its journal, its requests."""

    def __init__(
        self, io: _Socket, store: Store, file: InodeStat, path: str, journal_dir: Path
    ) -> None:
        self.io = io
        self.name = path
        self.npages = file.size // PAGE_SIZE
        # The journal dies with the region (a new agent removes what a dead one left):
        # nothing reads it back after a crash, so its records need no checksum.
        self.core = FileCore.of(store, file, path, journal_dir, recoverable=False)
        self.journal = self.core.journal
        self.locks: set[int] = set()  # tokens of the locks the region holds
        self.lock_lease_s = 10.0
        # What the handler last said of itself (OP_STATS), and who waits for an answer.
        self.handler: dict[str, int] | None = None
        self._stats_asked: dict[int, trio.Event] = {}
        self._stats_ids = itertools.count(1 << 62)  # apart from the handler's own ids

    async def ask_handler(self, timeout_s: float) -> dict[str, int] | None:
        """The handler's counts (faults, evictions, resident pages and the budget...),
        asked now; the last known (or None) if it does not answer within timeout_s (a
        library from before OP_STATS never does)."""
        req_id = next(self._stats_ids)
        done = self._stats_asked[req_id] = trio.Event()
        try:
            self.io.reply(OP_STATS, req_id, 0, 0, [])
            with trio.move_on_after(timeout_s):
                await done.wait()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the region is going away: what it said last
        finally:
            self._stats_asked.pop(req_id, None)
        return self.handler

    def changed(self, notice: Notice | None) -> None:
        """Another client committed to the region's file (None: we may have missed
        commits): tell the handler which pages to drop. It keeps what was written
        here; the agent's cached pages go too."""
        if self.core.cache is not None:
            self.core.cache.drop(self.core.ino)
        if notice is None or notice.whole:
            runs: Sequence[tuple[int, int]] = [(0, self.npages)]
        else:
            runs = notice.pages
            self.core.version = max(self.core.version, notice.version)
        for first, count in runs:
            if first < self.npages and count:
                self.io.reply(OP_INVALIDATE, 0, first, min(count, self.npages - first), [])

    async def serve(self) -> None:
        store = self.core.store
        # Other clients' commits to the file are told to the handler as they land
        # (push invalidation): its mapped pages follow them.
        store.listen(self.core.ino, self.changed)
        try:
            await self._serve()
        finally:
            store.unlisten(self.core.ino, self.changed)
            # A private agent's connection ends with it (and its locks with that); a
            # mount daemon's does not. Bounded: the server may be out of reach.
            with trio.move_on_after(2, shield=True):
                for token in list(self.locks):
                    with suppress(NetmemError):
                        await store.unlock(token)

    async def _serve(self) -> None:
        async with open_quiet_nursery() as nursery:
            nursery.start_soon(self._keep_locks)
            while True:
                msg = await self.io.receive()
                if msg is None:
                    nursery.cancel_scope.cancel()
                    return
                (op, _, req_id, first, count, _), payload = msg
                if op == OP_FETCH:
                    self._check_range(first, count)
                    nursery.start_soon(self.fetch, req_id, first, count)
                elif op == OP_STAGE:
                    self._check_range(first, count)
                    if len(payload) != count * PAGE_SIZE:
                        raise WireError(f"STAGE of {count} pages carried {len(payload)} bytes")
                    try:
                        self.journal.write_pages(first, bytes(payload))
                    except NetmemError as e:  # only failures are answered
                        self.io.error(OP_STAGE, req_id, e, f"staging pages {first}+{count}")
                elif op == OP_COMMIT:
                    # What was handed over before this message is what commits; the
                    # pages that arrive while it is under way are the next sync's.
                    self.core.seal()
                    nursery.start_soon(self.commit, req_id)
                elif op == OP_REDIAL:
                    nursery.start_soon(self.redial, req_id)
                elif op == OP_LOCK:
                    if len(payload) != LOCK_ARGS.size:
                        raise WireError(f"LOCK carried {len(payload)} bytes")
                    length, exclusive, wait_ms = LOCK_ARGS.unpack(payload)
                    nursery.start_soon(self.lock, req_id, first, length, exclusive, wait_ms)
                elif op == OP_UNLOCK:
                    nursery.start_soon(self.unlock, req_id, first)
                elif op == OP_STATS:
                    if len(payload) != HANDLER_STATS.size:
                        raise WireError(f"STATS carried {len(payload)} bytes")
                    values = HANDLER_STATS.unpack(payload)
                    self.handler = dict(zip(HANDLER_STATS_FIELDS, values, strict=True))
                    waiter = self._stats_asked.get(req_id)
                    if waiter is not None:
                        waiter.set()
                else:
                    raise WireError(f"unknown request {op}")

    def _check_range(self, first: int, count: int) -> None:
        if not 0 < count <= MAX_PAGES or first + count > self.npages:
            raise WireError(f"pages {first}+{count} are outside the region ({self.npages})")

    async def fetch(self, req_id: int, first: int, count: int) -> None:
        """Pages first..first+count-1: the journal's, else the server's; holes as bits."""
        try:
            pages = await self.core.read(first, count)
        except NetmemError as e:
            self.io.error(OP_FETCH, req_id, e, f"read of pages {first}..{first + count - 1}")
            return
        bits = 0
        parts: list[Buffer] = []
        for k, page in enumerate(pages):
            if page is not None:
                bits |= 1 << k
                parts.append(page)
        bitmap = bits.to_bytes(bitmap_bytes(count), "little")
        self.io.reply(OP_FETCH, req_id, first, count, [bitmap, *parts])

    async def lock(
        self, req_id: int, start: int, length: int, exclusive: int, wait_ms: int
    ) -> None:
        """A lock on the region's file for the region; the handler hears first of the
        pages to drop (entry consistency: the INVALIDATE goes before the reply)."""
        try:
            grant = await self.core.store.lock(
                self.core.ino, start, length, exclusive=bool(exclusive), wait_s=wait_ms / 1000
            )
        except NetmemError as e:
            self.io.error(OP_LOCK, req_id, e, f"lock on {self.name!r}")
            return
        self.locks.add(grant.token)
        self.core.fences.add(grant.token)
        self.lock_lease_s = grant.lease_s
        if grant.version != self.core.version:
            self.changed(None)
            self.core.version = grant.version
        self.io.reply(OP_LOCK, req_id, grant.token, 0, [])

    async def unlock(self, req_id: int, token: int) -> None:
        if token not in self.locks:
            self.io.error(OP_UNLOCK, req_id, NotHeld("not held by this region"), "unlock")
            return
        self.locks.discard(token)
        self.core.fences.discard(token)
        try:
            await self.core.store.unlock(token)
        except NetmemError as e:
            self.io.error(OP_UNLOCK, req_id, e, f"unlock of {token} on {self.name!r}")
            return
        self.io.reply(OP_UNLOCK, req_id, token, 0, [])

    async def _keep_locks(self) -> None:
        """Renew the region's locks a few times per lease while it holds any."""
        while True:
            await trio.sleep(self.lock_lease_s / 3)
            if self.locks:
                try:
                    await self.core.store.renew()
                except NetmemError as e:
                    log.warning("could not renew the locks of %r: %s", self.name, e)

    async def redial(self, req_id: int) -> None:
        """A new connection for the region's direct reads: the server closed the last
        one (its --idle-timeout, or a restart)."""
        try:
            handover = await self.core.store.open_handover(self.core.ino, again=True)
        except NetmemError as e:
            self.io.error(OP_REDIAL, req_id, e, "a new connection to the server")
            return
        self.io.reply(OP_REDIAL, req_id, 0, 0, [handover.speaks], fd=handover.fd)

    async def commit(self, req_id: int) -> None:
        try:
            await self.core.commit()
        except NetmemError as e:
            log.warning("commit to %r failed: %s", self.name, e)
            self.io.error(OP_COMMIT, req_id, e, f"commit to {self.name!r}")
            return
        self.io.reply(OP_COMMIT, req_id, 0, 0, [])


async def open_region(
    io: _Socket,
    store: Store,
    journal_dir: Path,
    status: Callable[[], Awaitable[bytes]] | None = None,
) -> Region | None:
    """Answer the region's OPEN: find its file by path, or make it; the reply carries
    its inode number, by which the region reads and commits from now on. status: what
    answers a STATUS instead (a mount daemon's), if anything."""
    msg = await io.receive()
    if msg is None:
        return None
    (op, can_read, req_id, size, _, _), payload = msg
    if op == OP_STATUS and status is not None:
        io.reply(OP_STATUS, req_id, 0, 0, [await status()])
        return None
    if op != OP_OPEN:
        raise WireError(f"expected OPEN, got request {op}")
    try:
        path = payload.decode()
        file = await resolve(store, path, size, uid=os.getuid(), gid=os.getgid())
    except (NetmemError, UnicodeDecodeError) as e:
        io.error(OP_OPEN, req_id, e, "cannot open the segment")
        return None
    # A connection of the region's own, for reading pages without this process in
    # the way; without one, every read comes through here (slower, still right).
    handover: Handover | None = None
    try:
        handover = await store.open_handover(file.ino)
        if handover.speaks and not can_read & OPEN_READS_RESP:
            os.close(handover.fd)
            handover = None
            log.info(
                "no direct connection for the region: its libnetmem reads from a "
                "netmemfs-server only (an older release); reads go through the agent"
            )
    except NetmemError as e:
        log.info("no direct connection for the region (%s); reads go through the agent", e)
    io.reply(
        OP_OPEN,
        req_id,
        file.ino,
        0,
        [handover.speaks] if handover else [],
        fd=handover.fd if handover else None,
    )
    return Region(io, store, file, path, journal_dir)


async def _run_socket(
    sock: trio.socket.SocketType,
    journal_dir: Path,
    body: Callable[[_Socket], Awaitable[None]],
) -> None:
    """Run body on the region's socket; end quietly when the region's side goes away
    (what it did not sync is dropped with journal_dir)."""
    io = _Socket(sock)
    try:
        async with open_quiet_nursery() as nursery:
            nursery.start_soon(io.write_replies)
            try:
                await body(io)
            finally:
                io.finish()  # the writer sends what is queued, then ends
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass  # the mapping process went away
    except WireError as e:
        log.error("closing the region's connection: %s", e)
    finally:
        sock.close()
        shutil.rmtree(journal_dir, ignore_errors=True)


async def _serve_region(
    io: _Socket,
    store: Store,
    journal_dir: Path,
    status: Callable[[], Awaitable[bytes]] | None = None,
    regions: set[Region] | None = None,
) -> None:
    """Serve one region (or answer a STATUS: a mount daemon's); regions: where the
    live ones are listed."""
    region = await open_region(io, store, journal_dir, status)
    if region is not None:
        if regions is not None:
            regions.add(region)
        try:
            await region.serve()
        finally:
            region.journal.discard()
            if regions is not None:
                regions.discard(region)


async def run_private(
    fd: int, server: str, token: bytes | None, tls: ssl.SSLContext | None, timeout_s: float
) -> None:
    """Serve the one region on socket fd (libnetmem's end), then return."""
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    sweep_private_journals(Path(tempfile.gettempdir()))
    journal_dir, lock = make_private_journal(Path(tempfile.gettempdir()))

    async def body(io: _Socket) -> None:
        async with AsyncExitStack() as stack:
            try:
                store = await stack.enter_async_context(
                    connect_store(server, token=token, tls=tls, retry_for_s=timeout_s)
                )
            except NetmemError as e:
                msg = await io.receive()
                if msg is not None:
                    io.error(OP_OPEN, msg[0][2], e, f"cannot reach the server {server}")
                return
            await _serve_region(io, store, journal_dir)

    try:
        await _run_socket(sock, journal_dir, body)
    finally:
        os.close(lock)


PRIVATE_PREFIX = "netmemfs-anon-"


def make_private_journal(base: Path) -> tuple[Path, int]:
    """A private agent's journal directory in base, and the descriptor of the flock
    it holds on its `lock` file while it lives (with its pid written after the lock
    is taken): how the next agent tells a live directory from a dead one."""
    journal_dir = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=base))
    lock = os.open(journal_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, f"{os.getpid()}\n".encode())
    return journal_dir, lock


def sweep_private_journals(base: Path) -> int:
    """Remove the journal directories of this user's private agents that died without
    cleaning up (SIGKILL): those whose lock nobody holds. What they held was never
    synced, so nothing is lost that a crash does not lose. Return how many."""
    gone = 0
    for d in base.glob(PRIVATE_PREFIX + "*"):
        try:
            if d.stat().st_uid != os.getuid():
                continue
            fd = os.open(d / "lock", os.O_RDONLY)
        except OSError:
            continue  # not ours, not an agent's, or just being made
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its agent lives
            # Locked by us: its agent is dead, or has not taken the lock yet (then it
            # has not written its pid either).
            if os.pread(fd, 32, 0).strip():
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed %s, left by an agent that died", d)
                gone += 1
        finally:
            os.close(fd)
    return gone


class AttachPoint:
    """A mount daemon's socket where libnetmem maps regions served by the daemon
    (netmem_map with the mount point as the server): each connection is one region,
    on the daemon's own server connection.

    The socket is in the abstract namespace (it goes away with the daemon, even one
    killed by SIGKILL, and leaves no file behind); the mount root names it in its
    user.netmemfs.agent attribute as "@name". Anyone in the network namespace can
    connect to an abstract socket, so the daemon checks the peer's credentials: only
    its own user and root, or anyone for a mount with --allow-other (as open as the
    mount itself)."""

    XATTR = b"user.netmemfs.agent"  # NETMEM_AGENT_XATTR in lib/netmem_wire.h

    def __init__(
        self,
        journal_base: Path,
        *,
        allow_other: bool,
        status: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.name = f"netmemfs-{os.getpid()}-{os.urandom(8).hex()}"
        self.journal_base = journal_base
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.allow_other = allow_other
        self.status = status  # the daemon's status, for a connection that asks for it
        self.regions: set[Region] = set()  # served now

    @property
    def address(self) -> bytes:
        """The attribute's value: "@" and the abstract name."""
        return b"@" + self.name.encode()

    async def bind(self) -> None:
        # Regions of a daemon that died left uncommitted pages only: dropped, as a
        # private agent's are.
        shutil.rmtree(self.journal_base, ignore_errors=True)
        self.journal_base.mkdir(parents=True, mode=0o700)
        await self.sock.bind("\0" + self.name)
        self.sock.listen(64)

    def _admitted(self, conn: trio.socket.SocketType) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if self.allow_other or uid in (0, os.getuid()):
            return True
        log.warning(
            "refused a region from pid %d (uid %d): this mount is private to uid %d "
            "(mount with --allow-other to share it)",
            pid,
            uid,
            os.getuid(),
        )
        return False

    async def serve(self, store: Store) -> None:
        """Accept regions until cancelled; their connections end with it."""
        async with open_quiet_nursery() as nursery:
            while True:
                conn, _ = await self.sock.accept()
                if not self._admitted(conn):
                    conn.close()
                    continue
                journal_dir = Path(tempfile.mkdtemp(prefix="region-", dir=self.journal_base))

                async def body(io: _Socket, journal_dir: Path = journal_dir) -> None:
                    await _serve_region(io, store, journal_dir, self.status, self.regions)

                nursery.start_soon(_run_socket, conn, journal_dir, body)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.journal_base, ignore_errors=True)
