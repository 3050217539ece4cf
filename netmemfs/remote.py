"""The client side of the page server: trio streams, pipelining, retries, reconnects.

Where it sits: below the doors (fs.py, the uffd and /dev/netmem doors) and journal.py,
above protocol.py. It imports no door; nothing below it imports it.

    async with RemoteStore.connect("127.0.0.1:7733") as store:
        await store.create("seg0", 1 << 20)
        await store.commit([PageRun("seg0", 0, page)])
        pages = await store.read_pages("seg0", 0, 16)

One connection carries many requests at once, matched to replies by id. When it breaks,
the next request reconnects (backoff from RECONNECT_MIN_S doubling to RECONNECT_MAX_S)
and requests that were waiting are sent again, until retry_for_s has passed since the
request began; then ServerUnreachable. Re-sending is safe: reads change nothing and every
mutation carries a transaction id the server applies at most once.
"""

from __future__ import annotations

import itertools
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TypeVar

import trio

from netmemfs import auth
from netmemfs._trio_util import (
    open_quiet_nursery,
    receive_into,
    send_parts_locked,
    socket_of,
    tune_socket,
)
from netmemfs.errors import (
    AuthFailed,
    Busy,
    LocalProtocolError,
    NetmemError,
    ProtocolError,
    RemoteProtocolError,
    ServerUnreachable,
    error_for_code,
)
from netmemfs.ops import InodeOp, WritePages, name_bytes, name_str
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import (
    CLOSED,
    MAX_MESSAGE_PAGES,
    NEED_DATA,
    PROTOCOL_VERSION,
    Abort,
    Attrs,
    Authenticate,
    AuthReply,
    Change,
    Changed,
    Claim,
    Claimed,
    Commit,
    Committed,
    Connection,
    CreateSegment,
    DeleteSegment,
    Entries,
    Error,
    GetAttr,
    Held,
    Hello,
    HelloReply,
    Hold,
    ListSegments,
    Lock,
    Locked,
    Lookup,
    Notice,
    PageRun,
    Pages,
    ReadDir,
    ReadInode,
    ReadLane,
    ReadLaneOpen,
    ReadPages,
    RenameSegment,
    Renew,
    Renewed,
    Reply,
    Request,
    ResizeSegment,
    Role,
    SegmentInfo,
    SegmentList,
    ServerInfo,
    Staged,
    StageInode,
    StagePages,
    StatSegment,
    StatServer,
    Subscribe,
    Subscribed,
    Unlock,
    Unlocked,
)
from netmemfs.sizes import parse_host_port
from netmemfs.store import (
    ChangeResult,
    CommitResult,
    Handover,
    InodeStat,
    LockGrant,
    PageRead,
    SegmentStat,
    ServerStat,
)

log = logging.getLogger("netmemfs.remote")

DEFAULT_PORT = 7733
RECEIVE_BYTES = 1 << 20
RECONNECT_MIN_S = 0.02
RECONNECT_MAX_S = 1.0
# A commit whose pages fit in one message goes as one Commit; a larger one is staged in
# messages of at most this many pages, then committed.
STAGE_PAGES = 1024

T = TypeVar("T")


class _LinkLost(Exception):
    pass


class _Waiter:
    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    async def wait(self) -> Reply:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


class _Link:
    """One connection after its handshake; a reader task routes replies to waiters."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: Connection,
        on_notice: Callable[[Notice | None], None] | None = None,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.on_notice = on_notice  # called with each Notice the server sends
        self.pending: dict[int, _Waiter] = {}
        self.send_lock = trio.Lock()
        self.lost: str | None = None
        self.closed_why = "server closed the connection"  # or what its Error(0) said

    def start(self, msg: Request) -> _Waiter:
        """Register msg's id; its reply arrives in the waiter. Sending happens in send()."""
        waiter = _Waiter()
        self.pending[msg.req_id] = waiter
        return waiter

    async def send(self, msgs: Sequence[Request]) -> None:
        parts = []
        for m in msgs:
            parts += self.conn.send_parts(m)

        def usable() -> None:  # checked once this sender has the stream to itself
            if self.lost is not None:
                raise _LinkLost(self.lost)

        try:
            await send_parts_locked(self.send_lock, self.stream, parts, usable)
        except _LinkLost:
            raise
        except BaseException as e:
            # A frame cut short (cancelled, or the peer went away) leaves the stream
            # unusable: nobody may write after it.
            self.fail(f"send failed: {e!r}")
            if isinstance(e, trio.BrokenResourceError | trio.ClosedResourceError):
                raise _LinkLost(self.lost) from e
            raise

    async def request(self, msg: Request) -> Reply:
        waiter = self.start(msg)
        try:
            await self.send([msg])
            return await waiter.wait()
        finally:
            self.pending.pop(msg.req_id, None)

    def fail(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        for waiter in self.pending.values():
            # Every waiter with no reply (a lane's may have its event set already: the
            # turn to receive, see _LaneLink).
            if waiter.reply is None:
                waiter.error = _LinkLost(why)
                waiter.event.set()
        self.pending.clear()
        socket_of(self.stream).close()

    async def read_loop(self) -> None:
        """Receive and route replies until the link is lost (the main link's task)."""
        await self.receive_until(lambda: False)

    async def receive_until(self, done: Callable[[], bool]) -> None:
        """Receive and route replies until done() or the link is lost."""
        try:
            while not done():
                await receive_into(self.stream, self.conn)
                self.route()
        except (_LinkLost, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.fail(str(e) or self.closed_why)
        except RemoteProtocolError as e:
            log.error("server sent a malformed message (%s); reconnecting", e)
            self.fail(str(e))

    def route(self) -> None:
        """Hand every whole message received so far to its waiter (notices to
        on_notice); _LinkLost at the end of the stream."""
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                return
            if ev is CLOSED:
                raise _LinkLost(self.closed_why)
            assert isinstance(ev, Reply)
            if isinstance(ev, Notice):
                if self.on_notice is not None:
                    self.on_notice(ev)
                continue
            if isinstance(ev, Error) and ev.req_id == 0:
                self.closed_why = f"server ended the connection: {ev.message}"
                continue
            waiter = self.pending.pop(ev.req_id, None)
            if waiter is not None:  # else its requester was cancelled
                waiter.reply = ev
                waiter.event.set()


class _LaneLink(_Link):
    """A read lane's link, with no reader task: a requester waiting for its reply
    receives from the stream itself when nobody else is (routing every reply it finds),
    and hands that turn to another waiter when its own reply is in. A lone request then
    costs no switch between tasks (measured here: 150 -> 110 us of client CPU per 4 KiB
    read). A link lost is noticed by the next request, which is sent again on a new one
    (reads change nothing)."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection) -> None:
        super().__init__(stream, conn)
        self.reading = False  # some requester is receiving now

    async def request(self, msg: Request) -> Reply:
        waiter = self.start(msg)
        try:
            await self.send([msg])
            while waiter.reply is None and waiter.error is None:
                if self.lost is not None:  # lost while nobody received (or just now)
                    raise _LinkLost(self.lost)
                if not self.reading:
                    waiter.event = trio.Event()  # a turn handed to us is taken
                    await self._receive_for(waiter)
                    continue
                await waiter.event.wait()  # its reply, or the turn to receive
                if waiter.reply is None and waiter.error is None:
                    waiter.event = trio.Event()
            if waiter.error is not None:
                raise waiter.error
            assert waiter.reply is not None
            return waiter.reply
        finally:
            self.pending.pop(msg.req_id, None)
            if not self.reading:
                # Our turn to receive is over, or was handed to us while we were being
                # cancelled: someone still waiting takes it.
                self._pass_turn()

    async def _receive_for(self, waiter: _Waiter) -> None:
        self.reading = True
        try:
            await self.receive_until(lambda: waiter.reply is not None or waiter.error is not None)
        finally:
            self.reading = False  # request() hands the turn on

    def _pass_turn(self) -> None:
        """Wake one requester still waiting, to receive in its turn."""
        for other in self.pending.values():
            if not other.event.is_set():
                other.event.set()
                return


class RemoteStore:
    """A page server, reached over one reconnecting connection."""

    def __init__(
        self,
        address: str,
        nursery: trio.Nursery,
        *,
        token: bytes | None,
        tls: ssl.SSLContext | None,
        retry_for_s: float,
        claim: bytes | None = None,
    ) -> None:
        self.host, self.port = parse_host_port(address, DEFAULT_PORT)
        self.address = f"{self.host}:{self.port}"
        self.token = token
        self.tls = tls
        self.retry_for_s = retry_for_s
        # A name every connection of ours claims (protocol Claim) before its first
        # request: the connection before it, ours or a dead predecessor's, is fenced.
        self.claim = claim
        # What this store's connection hears of, and who is told: on_notice of every
        # Notice (and of None when a new connection may have missed some), for the
        # inodes of subscribe(); each listener (listen()) of those of its inode. The
        # server knows `subscribed`: the union.
        self.subscribed: frozenset[int] = frozenset()
        self.wanted: frozenset[int] = frozenset()
        self.on_notice: Callable[[Notice | None], None] | None = None
        self.listeners: dict[int, list[Callable[[Notice | None], None]]] = {}
        self._subscribe_lock = trio.Lock()
        self.reconnects = 0
        self._nursery = nursery
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._link_lock = trio.Lock()
        # Page reads go over a read lane of their own (protocol ReadLane), which the
        # server answers without its event loop's per-message costs; not over TLS
        # (served on the loop all the same there), nor once the server refused one.
        self._lane: _Link | None = None
        self._lane_lock = trio.Lock()
        self._lanes = tls is None
        self._client_id = os.urandom(8)
        self._txn_seq = itertools.count(1)

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.lost is None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str,
        *,
        token: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        retry_for_s: float = 30.0,
        claim: bytes | None = None,
    ) -> AsyncIterator[RemoteStore]:
        """Connect (retrying for up to retry_for_s), run the connection, close on exit.
        With tls (see tls_client_context), the connection is TLS and the server's
        certificate must be valid for the host in address. With claim, each connection
        claims that name first (protocol Claim): a commit an earlier connection under
        the name had sent, and the server had not yet applied, is refused from then on
        (use one name per sender that must not be overtaken by its own past)."""
        async with open_quiet_nursery() as nursery:
            store = cls(
                address, nursery, token=token, tls=tls, retry_for_s=retry_for_s, claim=claim
            )
            await store._get_link(trio.current_time() + retry_for_s, "connect")
            try:
                yield store
            finally:
                store.close()
                nursery.cancel_scope.cancel()

    def close(self) -> None:
        for link in (self._link, self._lane):
            if link is not None:
                link.fail("closed by the client")

    def new_txn(self) -> bytes:
        """A transaction id no other client or call of ours uses."""
        return self._client_id + next(self._txn_seq).to_bytes(8, "big")

    async def force_reconnect(self) -> None:
        """Drop the connection; the next request makes a new one (tests, recovery)."""
        for link in (self._link, self._lane):
            if link is not None:
                link.fail("reconnect requested")
        await trio.lowlevel.checkpoint()

    # --- connection management ---------------------------------------------------

    async def _get_link(self, deadline: float, what: str) -> _Link:
        link = self._link
        if link is not None and link.lost is None:
            return link
        async with self._link_lock:
            link = self._link
            if link is not None and link.lost is None:
                return link
            delay = RECONNECT_MIN_S
            while True:
                try:
                    link = await self._open_link(main=True)
                    break
                except (OSError, trio.BrokenResourceError, _LinkLost, Busy) as e:
                    _raise_if_tls_refused(e, self.address)
                    why = (
                        getattr(e, "strerror", None)
                        or str(e)
                        or str(e.__cause__ or "")
                        or type(e).__name__
                    )
                left = deadline - trio.current_time()
                if left <= 0:
                    raise ServerUnreachable(
                        f"cannot reach netmemfs server {self.address} for {what}: {why}; "
                        f"retried for {self.retry_for_s:g} s. Is netmemfs-server running "
                        "there, and is the address right?"
                    )
                await trio.sleep(min(delay, left))
                delay = min(delay * 2, RECONNECT_MAX_S)
            reconnected = self._link is not None
            if reconnected:
                self.reconnects += 1
            self._link = link
            self._nursery.start_soon(link.read_loop)
            if reconnected:
                self._notice(None)  # commits made while no connection was ours went unheard
            return link

    async def _get_lane(self, deadline: float, what: str) -> _Link:
        """The read lane, opened if need be; the main link instead if there can be no
        lane (TLS, a server that does not know ReadLane) or it cannot be opened now
        (then the main link's retries apply)."""
        lane = self._lane
        if lane is not None and lane.lost is None:
            return lane
        if not self._lanes:
            return await self._get_link(deadline, what)
        async with self._lane_lock:
            lane = self._lane
            if lane is not None and lane.lost is None:
                return lane
            try:
                lane = await self._open_link(lane=True)
            except (RemoteProtocolError, ProtocolError) as e:
                log.info("server %s has no read lanes (%s): reads share", self.address, e)
                self._lanes = False
                return await self._get_link(deadline, what)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, _LinkLost, Busy) as e:
                _raise_if_tls_refused(e, self.address)
                log.info("no read lane to %s for now (%s)", self.address, e)
                return await self._get_link(deadline, what)
            if self._lane is not None:
                self.reconnects += 1
            self._lane = lane  # no reader task: its requesters receive (_LaneLink)
            return lane

    async def open_handover(self, ino: int, *, again: bool = False) -> Handover:
        """A second connection, handshake done, detached from this store, for a peer
        that speaks the protocol itself (libnetmem's direct reads). The caller owns (and
        must close) the descriptor. Any of the server's files is read over it."""
        if self.tls is not None:
            raise ServerUnreachable(
                f"no plain connection to hand over: {self.address} is reached over TLS, "
                "which only this process speaks"
            )
        try:
            try:
                link = await self._open_link(lane=self._lanes)
            except (RemoteProtocolError, ProtocolError):
                if not self._lanes:
                    raise
                self._lanes = False  # a server without read lanes: a plain connection
                link = await self._open_link()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, _LinkLost) as e:
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ServerUnreachable(f"cannot open a connection to {self.address}: {why}") from e
        return Handover(socket_of(link.stream).detach(), b"")

    async def _open_link(self, *, main: bool = False, lane: bool = False) -> _Link:
        """A new connection, handshake done. The main one (not a handover) claims the
        store's name and subscribes to what the store is subscribed to; a lane is made a
        read lane (ReadLane)."""
        tcp = await trio.open_tcp_stream(self.host, self.port)
        tune_socket(tcp.socket)
        stream: trio.abc.Stream = tcp
        try:
            with trio.fail_after(max(self.retry_for_s, 1.0)):
                if self.tls is not None:
                    stream = trio.SSLStream(
                        tcp, self.tls, server_hostname=self.host, https_compatible=False
                    )
                    await stream.do_handshake()
                return await self._handshake(stream, main, lane)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def _handshake(self, stream: trio.abc.Stream, main: bool, lane: bool) -> _Link:
        conn = Connection(Role.CLIENT)
        nonce = auth.new_nonce()

        async def ask(msg: Request) -> Reply:
            await stream.send_all(conn.send(msg))
            while True:
                ev = conn.next_event()
                if ev is CLOSED:
                    raise _LinkLost(
                        "server closed the connection during the handshake"
                        + ("" if self.tls else " (if it serves TLS, give --tls-ca)")
                    )
                if ev is NEED_DATA:
                    conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
                    continue
                assert isinstance(ev, Reply)
                if isinstance(ev, Notice):  # may come before Subscribe's reply
                    self._notice(ev)
                    continue
                if isinstance(ev, Error):
                    raise error_for_code(ev.code)(f"server {self.address}: {ev.message}")
                return ev

        hello = await ask(Hello(0, PROTOCOL_VERSION, nonce))
        if not isinstance(hello, HelloReply):
            raise RemoteProtocolError(f"server {self.address} answered Hello with {hello!r}")
        if hello.auth_required:
            if self.token is None:
                raise AuthFailed(
                    f"server {self.address} requires a token; pass the token file its "
                    "operator gave you (--token-file)"
                )
            proof = auth.client_proof(self.token, hello.server_nonce, nonce)
            reply = await ask(Authenticate(0, proof))
            expected = auth.server_proof(self.token, hello.server_nonce, nonce)
            if not isinstance(reply, AuthReply) or not auth.proofs_match(reply.proof, expected):
                raise AuthFailed(
                    f"server {self.address} could not prove it knows the token; it may not "
                    "be the server you meant"
                )
        if main and self.claim is not None:
            claimed = await ask(Claim(0, self.claim))
            if not isinstance(claimed, Claimed):
                raise RemoteProtocolError(f"server {self.address} answered Claim with {claimed!r}")
        want = self.wanted | frozenset(self.listeners)
        if main and want:
            subscribed = await ask(Subscribe(0, tuple(sorted(want))))
            if not isinstance(subscribed, Subscribed):
                raise RemoteProtocolError(
                    f"server {self.address} answered Subscribe with {subscribed!r}"
                )
            self.subscribed = want
        if lane:
            opened = await ask(ReadLane(0))
            if not isinstance(opened, ReadLaneOpen):
                raise RemoteProtocolError(
                    f"server {self.address} answered ReadLane with {opened!r}"
                )
            return _LaneLink(stream, conn)
        return _Link(stream, conn, self._notice if main else None)

    def _notice(self, notice: Notice | None) -> None:
        if self.on_notice is not None and (notice is None or notice.ino in self.wanted):
            self.on_notice(notice)
        if notice is None:
            for fns in list(self.listeners.values()):
                for fn in fns:
                    fn(None)
        else:
            for fn in self.listeners.get(notice.ino, []):
                fn(notice)

    async def _with_link(
        self, what: str, body: Callable[[_Link], Awaitable[T]], *, lane: bool = False
    ) -> T:
        """Run body on a live link (the read lane with lane), again on a new one if the
        link breaks, until retry_for_s has passed."""
        deadline = trio.current_time() + self.retry_for_s
        while True:
            link = await (self._get_lane if lane else self._get_link)(deadline, what)
            try:
                return await body(link)
            except _LinkLost as e:
                if trio.current_time() >= deadline:
                    raise ServerUnreachable(
                        f"lost the connection to netmemfs server {self.address} during "
                        f"{what} ({e}) and could not get it back within {self.retry_for_s:g} s"
                    ) from None
                log.info("connection to %s lost during %s (%s); retrying", self.address, what, e)

    def _check(self, reply: Reply, expect: type[T], what: str) -> T:
        if isinstance(reply, Error):
            raise error_for_code(reply.code)(f"server {self.address}: {reply.message}")
        if not isinstance(reply, expect):
            raise RemoteProtocolError(
                f"server {self.address} answered {what} with {type(reply).__name__}"
            )
        return reply

    async def _call(
        self, what: str, make: Callable[[int], Request], expect: type[T], *, lane: bool = False
    ) -> T:
        async def body(link: _Link) -> Reply:
            return await link.request(make(next(self._ids)))

        return self._check(await self._with_link(what, body, lane=lane), expect, what)

    # --- operations --------------------------------------------------------------

    async def list_segments(self) -> list[str]:
        reply = await self._call("listing segments", ListSegments, SegmentList)
        return list(reply.names)

    async def stat(self, name: str) -> SegmentStat:
        r = await self._call(f"stat of {name!r}", lambda i: StatSegment(i, name), SegmentInfo)
        return SegmentStat(r.name, r.size, r.version, r.stored_pages)

    async def server_stat(self) -> ServerStat:
        r = await self._call("server stat", StatServer, ServerInfo)
        return ServerStat(r.capacity_bytes, r.used_bytes, r.segments)

    async def _mutate(
        self, what: str, make: Callable[[int, bytes], Request], txn: bytes | None
    ) -> CommitResult:
        txn = txn or self.new_txn()
        r = await self._call(what, lambda i: make(i, txn), Committed)
        return CommitResult(r.txn, dict(r.versions), r.replayed)

    async def create(self, name: str, size: int, *, txn: bytes | None = None) -> CommitResult:
        return await self._mutate(
            f"create {name!r}", lambda i, t: CreateSegment(i, t, name, size), txn
        )

    async def resize(self, name: str, size: int, *, txn: bytes | None = None) -> CommitResult:
        return await self._mutate(
            f"resize {name!r} to {size}", lambda i, t: ResizeSegment(i, t, name, size), txn
        )

    async def rename(self, name: str, new_name: str, *, txn: bytes | None = None) -> CommitResult:
        return await self._mutate(
            f"rename {name!r} to {new_name!r}",
            lambda i, t: RenameSegment(i, t, name, new_name),
            txn,
        )

    async def delete(self, name: str, *, txn: bytes | None = None) -> CommitResult:
        return await self._mutate(f"delete {name!r}", lambda i, t: DeleteSegment(i, t, name), txn)

    # --- inodes (names are str; bytes that are not UTF-8 surrogate-escaped) ---------

    async def lookup(self, parent: int, name: str) -> InodeStat:
        what = f"lookup of {name!r} in directory {parent}"
        r = await self._call(what, lambda i: Lookup(i, parent, name_bytes(name)), Attrs)
        return InodeStat.of(r)

    async def getattr(self, ino: int) -> InodeStat:
        return InodeStat.of(
            await self._call(f"stat of inode {ino}", lambda i: GetAttr(i, ino), Attrs)
        )

    async def readdir(self, ino: int) -> list[tuple[str, int, int]]:
        """Every (name, ino, mode) of directory ino, in byte order of the names."""
        out: list[tuple[str, int, int]] = []
        after = b""
        while True:

            def page(i: int, after: bytes = after) -> ReadDir:
                return ReadDir(i, ino, after, 1024)

            r = await self._call(f"listing directory {ino}", page, Entries)
            out += [(name_str(name), child, mode) for name, child, mode in r.entries]
            if r.done or not r.entries:
                return out
            after = r.entries[-1][0]

    async def hold(self, client: bytes, inos: Collection[int]) -> float:
        """Client `client` holds exactly inos open (each keeps living, by number, when
        its last name goes); the server's lease in seconds: send again within it."""
        what = f"hold of {len(inos)} open files"
        r = await self._call(what, lambda i: Hold(i, client, tuple(sorted(inos))), Held)
        return r.lease_ms / 1000

    async def subscribe(self, inos: Collection[int]) -> None:
        """Hear of other clients' commits to exactly inos from now on (on_notice), on
        this connection and each one after it."""
        old, self.wanted = self.wanted, frozenset(inos)
        try:
            await self._resubscribe()
        except BaseException:
            self.wanted = old  # refused (too many, say): what was asked before stands
            raise

    def listen(self, ino: int, fn: Callable[[Notice | None], None]) -> None:
        """Call fn with each Notice of a commit to ino by another client (and with None
        after a reconnect), until unlisten. The server is told in the background: this
        never waits for it (a server out of reach must not stall the caller)."""
        self.listeners.setdefault(ino, []).append(fn)
        self._update_subscription()

    def unlisten(self, ino: int, fn: Callable[[Notice | None], None]) -> None:
        fns = self.listeners.get(ino, [])
        if fn in fns:
            fns.remove(fn)
        if not fns:
            self.listeners.pop(ino, None)
        self._update_subscription()

    def _update_subscription(self) -> None:
        with suppress(RuntimeError):  # the store is closing: nothing to update
            self._nursery.start_soon(self._resubscribe_quietly)

    async def _resubscribe_quietly(self) -> None:
        try:
            await self._resubscribe()
        except NetmemError as e:
            # The next connection subscribes to what is wanted then, and tells the
            # listeners (None) that commits may have gone unheard.
            log.info("subscription not updated for now: %s", e)

    async def _resubscribe(self) -> None:
        # One at a time, the set taken inside: the last one sent is the newest.
        async with self._subscribe_lock:
            want = self.wanted | frozenset(self.listeners)
            if want == self.subscribed:
                return

            async def body(link: _Link) -> Reply:
                return await link.request(Subscribe(next(self._ids), tuple(sorted(want))))

            what = f"subscription to {len(want)} files"
            self._check(await self._with_link(what, body), Subscribed, what)
            # A reconnect from now on subscribes to these. (One in the middle of this
            # call subscribed to the old set and said so with on_notice(None).)
            self.subscribed = want

    async def lock(
        self, ino: int, start: int, length: int, *, exclusive: bool, wait_s: float
    ) -> LockGrant:
        """A lock on bytes start..start+length-1 of ino (length 0: to any end), held by
        this store's connection, waiting up to wait_s for it (WouldBlock past that). It
        ends with unlock, with the connection (a reconnect loses it: commits fenced by
        it are then refused), or past its lease unless renew() is called in time."""
        what = f"{'exclusive' if exclusive else 'shared'} lock on inode {ino}"
        wait_ms = max(0, int(wait_s * 1000))

        async def body(link: _Link) -> Reply:
            with trio.move_on_after(wait_s + self.retry_for_s):
                return await link.request(
                    Lock(next(self._ids), ino, start, length, exclusive, wait_ms)
                )
            link.fail(f"no answer to a lock request within {wait_s + self.retry_for_s:g} s")
            raise _LinkLost("the server did not answer a lock request")

        r = self._check(await self._with_link(what, body), Locked, what)
        return LockGrant(r.token, r.lease_ms / 1000, r.version)

    async def unlock(self, token: int) -> None:
        await self._call(f"unlock of lock {token}", lambda i: Unlock(i, token), Unlocked)

    async def renew(self) -> float:
        """Every lock this store holds lasts a lease from now; the lease in seconds."""
        r = await self._call("renewal of locks", Renew, Renewed)
        return r.lease_ms / 1000

    async def read_inode(self, ino: int, first: int, count: int) -> PageRead:
        """Pages first..first+count-1 of file ino (at most MAX_MESSAGE_PAGES)."""
        what = f"read of pages {first}..{first + count - 1} of inode {ino}"
        r = await self._call(what, lambda i: ReadInode(i, ino, first, count), Pages, lane=True)
        return PageRead(r.segment, r.first, r.count, r.version, r.runs)

    async def change(self, ops: Sequence[InodeOp], *, txn: bytes | None = None) -> ChangeResult:
        """Inode ops as one transaction, exactly once (sent again under the same id if
        the connection breaks): all of them or none. Page writes that do not fit one
        message are staged first (StageInode); they must then come after the other ops,
        which the server applies first."""
        txn = txn or self.new_txn()
        what = f"change of {len(ops)} ops ({', '.join(type(op).__name__ for op in ops[:4])})"
        pages = sum(len(op.data) for op in ops if isinstance(op, WritePages)) // PAGE_SIZE
        staged: list[WritePages] = []
        inline = tuple(ops)
        if pages > MAX_MESSAGE_PAGES:
            first_write = next(i for i, op in enumerate(ops) if isinstance(op, WritePages))
            staged = [op for op in ops[first_write:] if isinstance(op, WritePages)]
            if len(staged) != len(ops) - first_write:
                raise LocalProtocolError(
                    f"{what}: a change too large for one message must end with its writes"
                )
            inline = tuple(ops[:first_write])
        pieces = [
            WritePages(w.ino, r.first, r.data)
            for w in staged
            for r in _split([PageRun("", w.first, w.data)], STAGE_PAGES)
        ]

        def messages() -> list[Request]:
            msgs: list[Request] = [
                StageInode(next(self._ids), txn, p.ino, p.first, p.data) for p in pieces
            ]
            return [*msgs, Change(next(self._ids), txn, inline)]

        r = await self._staged_transaction(what, txn, messages, Changed, staged=bool(pieces))
        return ChangeResult(r.txn, dict(r.inodes), r.created, r.replayed)

    async def read_pages(self, name: str, first: int, count: int) -> PageRead:
        """Pages first..first+count-1 of name (at most MAX_MESSAGE_PAGES)."""
        what = f"read of pages {first}..{first + count - 1} of {name!r}"
        r = await self._call(what, lambda i: ReadPages(i, name, first, count), Pages, lane=True)
        return PageRead(r.segment, r.first, r.count, r.version, r.runs)

    async def read_bytes(self, name: str, first: int, count: int) -> bytes:
        """Like read_pages, any count, holes as zeros; large reads are pipelined."""
        if count <= MAX_MESSAGE_PAGES:
            return (await self.read_pages(name, first, count)).to_bytes()
        out = bytearray(count * PAGE_SIZE)

        async def part(start: int, n: int) -> None:
            data = (await self.read_pages(name, start, n)).to_bytes()
            off = (start - first) * PAGE_SIZE
            out[off : off + len(data)] = data

        async with open_quiet_nursery() as nursery:
            for start in range(first, first + count, MAX_MESSAGE_PAGES):
                nursery.start_soon(part, start, min(MAX_MESSAGE_PAGES, first + count - start))
        return bytes(out)

    async def commit(
        self,
        writes: Sequence[PageRun],
        *,
        resizes: Sequence[tuple[str, int]] = (),
        txn: bytes | None = None,
    ) -> CommitResult:
        """Resize segments (name, size bytes), then write all runs, as one transaction,
        exactly once: all of it lands or none.

        If the connection breaks, the whole transaction is sent again under the same id;
        the server applies it only if it had not already.
        """
        txn = txn or self.new_txn()
        total_pages = sum(r.count for r in writes)
        segments = sorted({r.segment for r in writes} | {name for name, _ in resizes})
        what = f"commit of {total_pages} pages to {', '.join(map(repr, segments)) or 'nothing'}"
        pieces = _split(writes, STAGE_PAGES) if total_pages > MAX_MESSAGE_PAGES else []

        def messages() -> list[Request]:
            msgs: list[Request] = [
                StagePages(next(self._ids), txn, p.segment, p.first, p.data) for p in pieces
            ]
            inline = () if pieces else tuple(writes)
            return [*msgs, Commit(next(self._ids), txn, tuple(resizes), inline)]

        r = await self._staged_transaction(what, txn, messages, Committed, staged=bool(pieces))
        return CommitResult(r.txn, dict(r.versions), r.replayed)

    async def _staged_transaction(
        self,
        what: str,
        txn: bytes,
        messages: Callable[[], list[Request]],
        expect: type[T],
        *,
        staged: bool,
    ) -> T:
        """Send messages() (stagings of txn, then the request that applies it) on one
        link, pipelined; built anew, with new ids, for each attempt. Staged pages left
        by a failure are aborted."""

        async def body(link: _Link) -> Reply:
            msgs = messages()
            replies = [link.start(m) for m in msgs]
            try:
                await link.send(msgs)
                for m, reply in zip(msgs[:-1], replies[:-1], strict=True):
                    self._check(await reply.wait(), Staged, f"{what} (staging {m.req_id})")
                return await replies[-1].wait()
            finally:
                for m in msgs:
                    link.pending.pop(m.req_id, None)

        try:
            return self._check(await self._with_link(what, body), expect, what)
        except NetmemError:
            if staged:
                await self._abort_quietly(txn)
            raise

    async def _abort_quietly(self, txn: bytes) -> None:
        link = self._link
        if link is None or link.lost is not None:
            return  # staged pages died with the connection
        with trio.move_on_after(1):
            with suppress(_LinkLost, ProtocolError, LocalProtocolError):
                await link.request(Abort(next(self._ids), txn))


def tls_client_context(ca_file: Path) -> ssl.SSLContext:
    """A TLS context trusting the certificates ca_file signs (the server's --tls-cert
    must be valid for the host the client names)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise NetmemError(
            f"cannot load the TLS CA file {ca_file}: {e}; give a PEM file of the CA "
            "that signed the server's certificate"
        ) from e
    return ctx


def _raise_if_tls_refused(e: BaseException, address: str) -> None:
    """A certificate the client does not trust is not retried: it will not change."""
    cause = e.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        raise AuthFailed(
            f"TLS to netmemfs server {address} refused: {cause.verify_message}; check "
            "that --tls-ca names the CA that signed the server's --tls-cert, and that the "
            "certificate is for the host you gave"
        ) from cause


def _split(writes: Sequence[PageRun], pages: int) -> list[PageRun]:
    out = []
    for run in writes:
        view = memoryview(run.data)
        for i in range(0, run.count, pages):
            n = min(pages, run.count - i)
            data = view[i * PAGE_SIZE : (i + n) * PAGE_SIZE]
            out.append(PageRun(run.segment, run.first + i, data))
    return out


__all__ = [
    "CommitResult",
    "PageRead",
    "RemoteStore",
    "SegmentStat",
    "ServerStat",
    "tls_client_context",
]
