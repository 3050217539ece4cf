"""The page server's network side: one task per connection, requests answered by id.

Where it sits: top of netmemfs_server (serve -> store -> log). It speaks the protocol
through netmemfs.protocol.Connection and keeps no page data of its own.

Reads and staging are answered inline, in arrival order. Commits (and the segment
operations, which are one-op commits) run in their own tasks so a commit waiting for the
disk does not hold up reads on the same connection; replies may therefore arrive out of
order, which the request ids allow. All commits of the server pass through one lock.

Every resource a client can make the server hold has a bound (Limits, each a command-line
option; docs/security.md adds them up): connections, the frame being received (small until
the handshake is done), the bytes of unanswered commits (past it the connection is not
read, which pushes back on the client), staged pages, and time: a connection idle for
idle_timeout_s, or a frame, a reply or the handshake taking slow_client_timeout_s, is
closed with an error that says which. A watchdog task per connection checks the times;
the path of a request only notes them (a cancel scope per receive and per send cost
about 10 us each on this machine, some 8% of a small read's server time).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from netmemfs import auth, metrics
from netmemfs._trio_util import (
    acquire_soon,
    open_quiet_nursery,
    receive_into,
    send_parts_locked,
    socket_of,
    tune_socket,
)
from netmemfs.errors import (
    AuthFailed,
    Busy,
    Conflict,
    Fenced,
    NetmemError,
    ProtocolError,
    RemoteProtocolError,
    TimedOut,
    TooLarge,
    VersionMismatch,
)
from netmemfs.metrics import Latency, LatencyStatistics

if TYPE_CHECKING:
    from prometheus_client.core import Metric  # imported when metrics are served
from netmemfs.ops import (
    Create,
    Delete,
    Expect,
    Fence,
    Op,
    Reap,
    Rename,
    Resize,
    Truncate,
    Write,
    WritePages,
    name_bytes,
    name_str,
)
from netmemfs.pages import PAGE_SIZE, Buffer, check_name
from netmemfs.protocol import (
    CLOSED,
    MAX_FRAME_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    Abort,
    Aborted,
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
    Message,
    Notice,
    PageRun,
    ReadDir,
    ReadInode,
    ReadLane,
    ReadLaneOpen,
    ReadPages,
    RenameSegment,
    Renew,
    Renewed,
    Reply,
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
from netmemfs_server.lane import LANE_REQUESTS, Lane, not_on_a_lane, read_reply
from netmemfs_server.locks import LockTable
from netmemfs_server.store import ATTR_FIELDS, Inode, Outcome, PageStore

log = logging.getLogger("netmemfs.server")

DEFAULT_PORT = 7733
# Per connection: commits running at once (the connection stops reading while that many
# wait, which pushes back on the client).
MAX_INFLIGHT_COMMITS = 16
AUTH_FAILURE_DELAY_S = 0.5
# Before the handshake is done a peer may send frames of this size at most: Hello and
# Authenticate are a few dozen bytes, and a stranger must not make us buffer 16 MiB.
HANDSHAKE_FRAME_BYTES = 1024
# How long a refusal (busy, timed out) may take to reach a peer before we just close.
FAREWELL_S = 1.0
# Replies held back while the reading loop answers a pipeline go out past this many bytes.
HELD_BYTES = 256 * 1024
# Entries in one ReadDir reply at most (a reply stays well below a frame's limit).
MAX_READDIR_ENTRIES = 1024
# Inodes one client may hold open (Hold), and all clients together.
MAX_HELD_PER_CLIENT = 1 << 20
MAX_HELD_TOTAL = 4 << 20
# Inodes one connection may subscribe to (Subscribe), and all connections together.
MAX_SUBSCRIBED_PER_CONNECTION = 1 << 20
MAX_SUBSCRIBED_TOTAL = 4 << 20
# Page runs one notice carries; past it (a client behind by many commits, or a commit
# of scattered pages) the notice says "all of it".
MAX_NOTICE_RUNS = 256


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may make the server hold; the defaults suit one machine."""

    max_connections: int = 256
    # Pages staged in one connection's open transactions (--max-transaction), and in
    # all connections' together (--max-staged-total).
    max_staged_bytes: int = 1 << 30
    max_staged_total_bytes: int = 4 << 30
    # Page data of a connection's commits received and not yet answered.
    max_inflight_bytes: int = 256 << 20
    max_frame_bytes: int = MAX_FRAME_BYTES
    idle_timeout_s: float = 3600.0
    slow_client_timeout_s: float = 30.0
    # How long a client's holds on open files last unless it renews them (--hold-lease).
    hold_lease_s: float = 20.0
    # How long a lock lasts unless its holder renews it (--lock-lease).
    lock_lease_s: float = 10.0

    def check(self) -> None:
        """ValueError naming the option, for limits that cannot work."""
        if self.max_connections < 1:
            raise ValueError("--max-connections must be at least 1")
        if not HANDSHAKE_FRAME_BYTES <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(
                f"--max-frame must be from {HANDSHAKE_FRAME_BYTES} to {MAX_FRAME_BYTES} bytes"
            )
        if self.max_inflight_bytes < self.max_frame_bytes:
            raise ValueError("--max-inflight must be at least --max-frame (one commit must fit)")
        if self.idle_timeout_s <= 0 or self.slow_client_timeout_s <= 0:
            raise ValueError("--idle-timeout and --slow-client-timeout must be positive")
        if self.hold_lease_s <= 0:
            raise ValueError("--hold-lease must be positive")
        if self.lock_lease_s <= 0:
            raise ValueError("--lock-lease must be positive")


@dataclass(frozen=True)
class ServerStatistics:
    """PageServer.statistics(): counts since start, then the state now."""

    uptime_s: float
    connections: int  # open now
    connections_total: int  # accepted since start
    refused_connections: int  # past --max-connections
    requests: dict[str, int]  # by message type
    errors: dict[str, int]  # error replies by code (refusals by limit among them)
    bytes_received: int
    bytes_sent: int
    commits: int  # applied
    replayed_commits: int  # answered from the transaction table (sent again)
    commit_latency: LatencyStatistics  # a commit's own time, lock wait included
    staged_bytes: int  # staged pages of open transactions
    inodes: int
    used_bytes: int  # page data stored
    capacity_bytes: int | None  # --max-memory
    locks: int  # held or waited for
    subscriptions: int
    durable: bool
    log_bytes: int  # since the last checkpoint
    checkpoints: int  # since start
    checkpoint_age_s: float | None


SERVER_METRICS: tuple[metrics.Spec, ...] = (
    ("uptime_seconds", "gauge", "uptime_s", "Seconds since the server started."),
    ("connections", "gauge", "connections", "Client connections open now."),
    ("connections", "counter", "connections_total", "Client connections accepted."),
    (
        "refused_connections",
        "counter",
        "refused_connections",
        "Connections refused past --max-connections.",
    ),
    ("requests", "counter", "requests", "Requests received, by message type.", "type"),
    (
        "errors",
        "counter",
        "errors",
        "Error replies sent, by error code (refusals by a limit among them).",
        "code",
    ),
    ("received_bytes", "counter", "bytes_received", "Bytes received from clients."),
    ("sent_bytes", "counter", "bytes_sent", "Bytes sent to clients."),
    ("commits", "counter", "commits", "Transactions applied."),
    (
        "replayed_commits",
        "counter",
        "replayed_commits",
        "Transactions sent again and answered from the transaction table.",
    ),
    (
        "commit_duration_seconds",
        "histogram",
        "commit_latency",
        "Time to apply a transaction (log write and fsync included).",
    ),
    ("staged_bytes", "gauge", "staged_bytes", "Pages staged by open transactions."),
    ("inodes", "gauge", "inodes", "Inodes stored."),
    ("used_bytes", "gauge", "used_bytes", "Page data stored."),
    ("capacity_bytes", "gauge", "capacity_bytes", "--max-memory."),
    ("locks", "gauge", "locks", "Byte-range locks held or waited for."),
    ("subscriptions", "gauge", "subscriptions", "Inodes subscribed to, all connections."),
    ("log_bytes", "gauge", "log_bytes", "Bytes of log since the last checkpoint."),
    ("checkpoints", "counter", "checkpoints", "Checkpoints written since start."),
    (
        "checkpoint_age_seconds",
        "gauge",
        "checkpoint_age_s",
        "Seconds since the last checkpoint.",
    ),
)


def server_families(st: ServerStatistics) -> list[Metric]:
    """st as Prometheus metric families (netmemfs_server_*)."""
    return metrics.families("netmemfs_server_", SERVER_METRICS, st)


class _Close(Exception):
    """End this connection after the reply already sent."""


class PageServer:
    def __init__(
        self,
        store: PageStore,
        token: bytes | None = None,
        *,
        limits: Limits = Limits(),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        limits.check()
        self.store = store
        self.limits = limits
        self.token = token
        self.tls = tls
        self._commit_lock = trio.Lock()
        self.connections = 0
        self.refused_busy = 0
        # What statistics() reports: counted where it happens, a few increments each.
        self.started_at = time.time()
        self.connections_total = 0
        self.requests: collections.Counter[type[Message]] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()  # by wire code
        self.bytes_received = 0  # of connections that closed; open ones add theirs
        self.bytes_sent = 0
        self.commits = 0
        self.replayed = 0
        self.commit_latency = Latency()
        self.sessions: set[_Session] = set()
        self.staged_bytes = 0  # all connections' staged pages
        # What each client holds open (Hold), and until when (trio time), by client id;
        # and how many clients hold each inode (what every commit asks: kept, not built
        # again per commit).
        self.holds: dict[bytes, tuple[frozenset[int], float]] = {}
        self.holders: collections.Counter[int] = collections.Counter()
        self.held_total = 0  # inodes in all holds together (MAX_HELD_TOTAL)
        # Which connection speaks for each claimed name (Claim); a connection a newer
        # claim replaced is fenced. One entry per live connection at most.
        self.claims: dict[bytes, _Session] = {}
        # Which connections hear of commits to each inode (Subscribe).
        self.subscribers: dict[int, set[_Session]] = {}
        self.subscribed_total = 0
        self.locks = LockTable(limits.lock_lease_s)
        # Orphans found at start are not reaped for a lease: their holders may not
        # have renewed their holds with this server yet.
        self._inherited = set(store.orphans)

    def statistics(self) -> ServerStatistics:
        """What the server has done since start, and holds now."""
        store = self.store
        now = time.time()
        # Open read lanes count in their own threads (lane.py); closed ones were added in.
        lanes = [s.lane for s in self.sessions if s.lane is not None]
        requests = self.requests.copy()
        errors = self.errors.copy()
        for lane in lanes:
            requests.update(lane.requests.copy())
            errors.update(lane.errors.copy())
        return ServerStatistics(
            uptime_s=now - self.started_at,
            connections=self.connections,
            connections_total=self.connections_total,
            refused_connections=self.refused_busy,
            requests={t.__name__: n for t, n in requests.items()},
            errors=dict(errors),
            bytes_received=self.bytes_received + sum(s.conn.bytes_received for s in self.sessions),
            bytes_sent=self.bytes_sent + sum(lane.bytes_sent for lane in lanes),
            commits=self.commits,
            replayed_commits=self.replayed,
            commit_latency=self.commit_latency.statistics(),
            staged_bytes=self.staged_bytes,
            inodes=len(store.inodes),
            used_bytes=store.used_bytes,
            capacity_bytes=store.capacity_bytes,
            locks=self.locks.total,
            subscriptions=self.subscribed_total,
            durable=store.durable,
            log_bytes=store.log_bytes,
            checkpoints=store.checkpoints,
            checkpoint_age_s=None if store.checkpointed_at is None else now - store.checkpointed_at,
        )

    async def commit(
        self, txn: bytes, ops: Sequence[Op], session: _Session | None = None
    ) -> tuple[Outcome, bool]:
        """Apply ops as transaction txn exactly once: (what it did, replayed). A commit
        from a session that a newer claim fenced is refused (Fenced), checked here, where
        nothing can come between the check and the change."""
        await acquire_soon(self._commit_lock)
        try:
            return await self._commit_locked(txn, ops, session)
        finally:
            self._commit_lock.release()

    async def _commit_locked(
        self, txn: bytes, ops: Sequence[Op], session: _Session | None
    ) -> tuple[Outcome, bool]:
        prior = self.store.outcome(txn)
        if prior is not None:
            return prior, True
        if session is not None and session.fenced_by is not None:
            raise Fenced(
                f"transaction refused: a newer connection from {session.fenced_by} "
                f"claimed {session.claim!r}, which this connection ({session.peer}) "
                "spoke for; its sender was replaced and must not commit any more"
            )
        ops = self._fenced(ops)
        # The server's clock dates every change (a client's times are not taken),
        # and the log keeps the dates, so a replay gives each inode the times it had.
        now = time.time_ns()
        ops = [dataclasses.replace(op, time_ns=now) for op in ops]
        # With a Reap of each inode left with no name that no client holds open.
        ops = self.store.settle(ops, self.holders)
        # Shielded so that a durable store's log and what reads see never disagree
        # (see PageStore.commit). We hold the commit lock and reads change nothing,
        # so the check above still describes the state the commit meets.
        with trio.CancelScope(shield=True):
            await self.store.commit(txn, ops)
            outcome = self._outcome(txn)
            self._notify(ops, outcome, session)
            await self.store.maintain()
        return outcome, False

    def _fenced(self, ops: Sequence[Op]) -> list[Op]:
        """ops without their checks: each Fence must name a lock that still lasts
        (Fenced if one does not: the commit was made under a lock since lost), each
        Expect the version its inode is at (Conflict if another commit came first)."""
        out: list[Op] = []
        for op in ops:
            if isinstance(op, Expect):
                current = self.store.inode(op.ino).version
                if current != op.version:
                    raise Conflict(
                        f"transaction refused: it was based on version {op.version} of "
                        f"inode {op.ino}, which another commit has since moved to version "
                        f"{current}; nothing of it applied: read the file again and retry",
                        current,
                    )
            elif not isinstance(op, Fence):
                out.append(op)
            elif self.locks.check(op.ino, op.token) is None:
                raise Fenced(
                    f"transaction refused: it was made under lock {op.token} on inode "
                    f"{op.ino}, which is no longer held (released, or its lease ran out "
                    "and it may have gone to another client); nothing of it applied, so "
                    "that it cannot overwrite the next holder's work"
                )
        return out

    def _notify(self, ops: Sequence[Op], outcome: Outcome, origin: _Session | None) -> None:
        """Queue a notice of what ops changed for every connection subscribed to an
        inode they touched, but the one that sent them (it knows)."""
        if not self.subscribers:
            return
        runs: dict[int, list[tuple[int, int]] | None] = {}
        whole = False  # segment ops name files, not inodes: say "all of it"
        for op in ops:
            if isinstance(op, WritePages):
                wrote = runs.setdefault(op.ino, [])
                if wrote is not None:
                    wrote.append((op.first, len(op.data) // PAGE_SIZE))
            elif isinstance(op, Truncate):
                runs[op.ino] = None
            elif isinstance(op, Write | Create | Resize | Rename | Delete):
                whole = True
        for ino, version in outcome.inodes:
            subs = self.subscribers.get(ino)
            if not subs:
                continue
            changed = None if whole else runs.get(ino, [])
            for session in subs:
                if session is not origin:
                    session.queue_notice(ino, version, changed)

    def subscribe(self, session: _Session, inos: frozenset[int]) -> None:
        """session hears of commits to inos (and no others) from now on."""
        total = self.subscribed_total - len(session.subscribed) + len(inos)
        if len(inos) > MAX_SUBSCRIBED_PER_CONNECTION or total > MAX_SUBSCRIBED_TOTAL:
            raise TooLarge(
                f"a connection may subscribe to {MAX_SUBSCRIBED_PER_CONNECTION} inodes, all "
                f"connections to {MAX_SUBSCRIBED_TOTAL}; this subscription of {len(inos)} "
                "would pass that"
            )
        self.unsubscribe(session)
        for ino in inos:
            self.subscribers.setdefault(ino, set()).add(session)
        session.subscribed = inos
        self.subscribed_total += len(inos)

    def unsubscribe(self, session: _Session) -> None:
        for ino in session.subscribed:
            subs = self.subscribers[ino]
            subs.discard(session)
            if not subs:
                del self.subscribers[ino]
        self.subscribed_total -= len(session.subscribed)
        session.subscribed = frozenset()

    def hold(self, client: bytes, inos: frozenset[int]) -> None:
        """client now holds inos (and no others) for a lease from now."""
        old = self.holds.get(client, (frozenset[int](), 0.0))[0]
        total = self.held_total - len(old) + len(inos)
        until = trio.current_time() + self.limits.hold_lease_s
        if len(inos) > MAX_HELD_PER_CLIENT or total > MAX_HELD_TOTAL:
            if old:
                self.holds[client] = (old, until)
            raise TooLarge(
                f"a client may hold {MAX_HELD_PER_CLIENT} inodes open, all clients "
                f"{MAX_HELD_TOTAL}; this hold of {len(inos)} would pass that"
            )
        self._let_go(client)
        if inos:
            self.holds[client] = (inos, until)
            self.holders.update(inos)
            self.held_total += len(inos)

    def _let_go(self, client: bytes) -> None:
        """client holds nothing any more."""
        inos = self.holds.pop(client, (frozenset[int](), 0.0))[0]
        self.holders.subtract(inos)
        for ino in inos:
            if self.holders[ino] <= 0:
                del self.holders[ino]
        self.held_total -= len(inos)

    async def reap(self) -> None:
        """Free the orphans no client holds any more (one transaction)."""
        free = sorted(
            ino
            for ino in self.store.orphans
            if ino not in self.holders and ino not in self._inherited
        )
        if free:
            await self.commit(b"reap-" + os.urandom(12), [Reap(ino) for ino in free])

    async def _keep_leases(self) -> None:
        """Drop the holds of clients that did not renew them within the lease, and free
        what they held, a few times per lease."""
        lease = self.limits.hold_lease_s
        started = trio.current_time()
        while True:
            await trio.sleep(lease / 4)
            if trio.current_time() > started + lease:
                self._inherited.clear()
            now = trio.current_time()
            for client, (_, until) in list(self.holds.items()):
                if until < now:
                    self._let_go(client)
            try:
                await self.reap()
            except NetmemError as e:  # the log's disk, say: tried again next time
                log.error("freeing inodes with no name and no holder failed: %s", e)

    def _outcome(self, txn: bytes) -> Outcome:
        outcome = self.store.outcome(txn)
        assert outcome is not None  # apply() just remembered it
        return outcome

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        tcp = await trio.open_tcp_listeners(port, host=host)
        bound = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
        if self.tls is not None:
            # The TLS handshake runs on the first receive, under the slow-client timeout.
            listeners = [trio.SSLListener(t, self.tls, https_compatible=False) for t in tcp]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_leases)
            nursery.start_soon(self.locks.keep_leases)
            task_status.started(bound)
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        sock = socket_of(stream)
        try:
            peer = "{}:{}".format(*sock.getpeername()[:2])
        except OSError:
            peer = "?"
        if self.connections >= self.limits.max_connections:
            await self._refuse_busy(stream, peer)
            return
        self.connections += 1
        self.connections_total += 1
        tune_socket(sock)
        session = _Session(self, stream, peer)
        self.sessions.add(session)
        try:
            await session.run()
        except trio.BrokenResourceError as e:
            if isinstance(e.__cause__, ssl.SSLError):
                log.info("TLS with %s failed: %s", peer, e.__cause__)
        except (trio.ClosedResourceError, _Close):
            pass
        except RemoteProtocolError as e:
            log.warning("closing connection from %s: %s", peer, e)
        except ExceptionGroup as group:
            # A client that goes away while a commit's reply is being sent fails the
            # receive loop and the reply at once: two disconnects, not a bug.
            _, rest = group.split((trio.BrokenResourceError, trio.ClosedResourceError, _Close))
            if rest is not None:
                log.error(
                    "internal error serving %s; closing that connection only",
                    peer,
                    exc_info=rest,
                )
        except Exception:
            log.exception("internal error serving %s; closing that connection only", peer)
        finally:
            self.connections -= 1
            self.sessions.discard(session)
            self.bytes_received += session.conn.bytes_received
            if session.lane is not None:  # its thread has ended (or ends without a reply)
                self.requests.update(session.lane.requests)
                self.errors.update(session.lane.errors)
                self.bytes_sent += session.lane.bytes_sent
            session.unstage(session.staged_bytes)  # open transactions die with it
            if session.claim is not None and self.claims.get(session.claim) is session:
                del self.claims[session.claim]
            self.unsubscribe(session)
            self.locks.release_all(session)
            await trio.aclose_forcefully(stream)

    async def _refuse_busy(self, stream: trio.abc.Stream, peer: str) -> None:
        """Tell a connection past --max-connections why it is closed, then close it."""
        self.refused_busy += 1
        if self.refused_busy == 1 or self.refused_busy % 1000 == 0:
            log.warning(
                "refusing connection from %s: %d connections open (--max-connections); "
                "%d refused so far",
                peer,
                self.connections,
                self.refused_busy,
            )
        err = Busy(
            f"the server has {self.connections} connections open, its --max-connections; "
            "try again later, or ask its operator to raise the limit"
        )
        frame = Connection(Role.SERVER).send(Error(0, err.code, str(err)))
        with (
            trio.move_on_after(FAREWELL_S),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(frame)
        await trio.aclose_forcefully(stream)


class _Session:
    def __init__(self, server: PageServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.limits = server.limits
        self.store = server.store
        self.stream = stream
        self.peer = peer
        self.conn = Connection(Role.SERVER, max_frame_bytes=HANDSHAKE_FRAME_BYTES)
        self.send_lock = trio.Lock()
        self.state = "hello"
        self.server_nonce = auth.new_nonce()
        self.client_nonce = b""
        self.staged: dict[bytes, list[Write | WritePages]] = {}  # by txn, in order
        self.staged_bytes = 0
        self.inflight = trio.Semaphore(MAX_INFLIGHT_COMMITS)
        self.inflight_bytes = 0
        self.inflight_changed = trio.Event()
        # What the watchdog reads (see _watchdog); setting them is all the hot path pays.
        self._opened = trio.current_time()
        self._waiting_since: float | None = None  # a receive under way, since then
        self._sending_since: float | None = None  # a reply under way, since then
        self._frame_started: float | None = None  # a message begun, first seen then
        self._last_commit_done = self._opened
        self._scope: trio.CancelScope | None = None
        self._timed_out: str | None = None
        self.claim: bytes | None = None  # the name this connection speaks for (Claim)
        self.fenced_by: str | None = None  # the peer whose claim replaced ours
        # Inodes this connection hears of (Subscribe), and the notices not yet sent: one
        # per inode, merged (page runs, or None: all of it), so they stay bounded by
        # the subscription however slowly the client reads.
        self.subscribed: frozenset[int] = frozenset()
        self._lock_waits: set[trio.CancelScope] = set()  # one per Lock request waiting
        self.notices: dict[int, tuple[int, list[tuple[int, int]] | None]] = {}
        self.notices_ready = trio.Event()
        # Replies held back while the reading loop answers what it has (send()).
        self._held: list[Buffer] | None = None
        self._held_bytes = 0
        # A read lane (ReadLane): wanted once answered; then served by lane, or (TLS)
        # here with reads_only.
        self.lane_wanted = False
        self.reads_only = False
        self.reads_only_broken = False
        self.lane: Lane | None = None

    async def send(self, msg: Reply) -> None:
        parts = self.conn.send_parts(msg)
        size = sum(len(p) for p in parts)
        self.server.bytes_sent += size
        if self._held is not None:
            # The reading loop is answering the requests it has: its replies go out
            # together when it has taken them all (one system call for a pipeline's
            # replies, which is most of a small read's cost), or at HELD_BYTES.
            self._held += parts
            self._held_bytes += size
            if self._held_bytes >= HELD_BYTES:
                await self._release_held(keep_holding=True)
            return
        await self._send_now(parts)

    async def _send_now(self, parts: list[Buffer]) -> None:
        self._sending_since = trio.current_time()
        try:
            await send_parts_locked(self.send_lock, self.stream, parts)
        finally:
            self._sending_since = None

    async def _release_held(self, *, keep_holding: bool = False) -> None:
        """Send the replies held back (see send), and hold no more unless keep_holding."""
        held = self._held
        self._held = [] if keep_holding else None
        self._held_bytes = 0
        if held:
            await self._send_now(held)

    async def _run_lane(self) -> bool:
        """Serve the rest of the connection as a read lane (lane.py), in a thread of
        its own, and say so; on a TLS connection, whose stream only this loop speaks,
        False: it goes on here, answering reads alone all the same."""
        self.lane_wanted = False
        self.reads_only = True
        if not isinstance(self.stream, trio.SocketStream):
            return False
        # The thread gets a blocking descriptor of its own (a dup: closing the stream
        # here later cannot close a number the thread still uses).
        sock = self.stream.socket
        dup = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
        dup.setblocking(True)
        self.lane = lane = Lane(
            dup,
            self.conn,
            self.store,
            self.peer,
            idle_timeout_s=self.limits.idle_timeout_s,
            slow_client_timeout_s=self.limits.slow_client_timeout_s,
            farewell_s=FAREWELL_S,
        )
        try:
            await trio.to_thread.run_sync(lane.serve, abandon_on_cancel=True)
        finally:
            lane.stop()  # after a cancel (the server stopping): the thread ends soon
        return True

    async def run(self) -> None:
        """Serve the connection until the peer closes it, breaks a rule, or the watchdog
        ends it for a timeout (then the peer is told which, if it can be)."""
        with trio.CancelScope() as scope:
            self._scope = scope
            async with open_quiet_nursery() as watch:
                watch.start_soon(self._watchdog)
                watch.start_soon(self._send_notices)
                try:
                    await self._serve()
                finally:
                    watch.cancel_scope.cancel()
        if self._timed_out is None:
            return
        err = TimedOut(f"connection closed: {self._timed_out}")
        if self._sending_since is None:  # no reply cut short: the stream can take one more
            log.info("closing connection from %s: %s", self.peer, err)
            with trio.move_on_after(FAREWELL_S):
                await self.send(Error(0, err.code, str(err)))
        else:
            log.warning("closing connection from %s: %s", self.peer, err)
        raise _Close

    async def _serve(self) -> None:
        async with open_quiet_nursery() as nursery:
            while True:
                self._held = []
                try:
                    open_ = await self._answer_received(nursery)
                finally:
                    # Also before a protocol error propagates: the replies before it,
                    # and its own, go out first.
                    await self._release_held()
                if not open_:
                    return
                if self.lane_wanted and await self._run_lane():
                    return
                self._waiting_since = trio.current_time()
                await receive_into(self.stream, self.conn)
                self._waiting_since = None

    async def _answer_received(self, nursery: trio.Nursery) -> bool:
        """Answer every request received whole so far; False if the peer closed."""
        while True:
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError as e:
                await self.send(Error(0, e.code, str(e)))
                raise
            if ev is NEED_DATA:
                return True
            if ev is CLOSED:
                # The nursery lets running commits finish; lock requests still
                # waiting are for nobody now.
                for scope in self._lock_waits:
                    scope.cancel()
                return False
            assert isinstance(ev, Message)
            self._frame_started = None
            await self.dispatch(ev, nursery)
            if self.lane_wanted:
                return True
            if self.reads_only_broken:
                log.warning("closing read lane from %s: it sent %s", self.peer, type(ev).__name__)
                return False

    def queue_notice(self, ino: int, version: int, runs: list[tuple[int, int]] | None) -> None:
        """Tell the client (soon) that ino is at version, runs of its pages changed."""
        queued = self.notices.get(ino)
        if queued is not None:
            old = queued[1]
            runs = None if old is None or runs is None else old + runs
        if runs is not None and len(runs) > MAX_NOTICE_RUNS:
            runs = None
        self.notices[ino] = (version, runs)
        self.notices_ready.set()

    async def _send_notices(self) -> None:
        """Send queued notices as they come; a client that does not take them is cut
        off by the watchdog (--slow-client-timeout), like one that does not take a reply."""
        while True:
            await self.notices_ready.wait()
            self.notices_ready = trio.Event()
            while self.notices:
                ino = next(iter(self.notices))
                version, runs = self.notices.pop(ino)
                pages = tuple(runs) if runs is not None else ()
                await self.send(Notice(0, ino, version, pages, runs is None))

    async def _watchdog(self) -> None:
        """End the connection when a timeout passes. It wakes a few times per timeout
        and reads the times the serving code notes, so the path of a request pays no
        cancel scope of its own; a timeout fires up to a quarter of itself late."""
        limits = self.limits
        period_s = min(limits.slow_client_timeout_s, limits.idle_timeout_s) / 4
        while True:
            await trio.sleep(period_s)
            why = self._overdue(trio.current_time())
            if why is not None:
                self._timed_out = why
                assert self._scope is not None
                self._scope.cancel()
                return

    def _overdue(self, now: float) -> str | None:
        """Which timeout has passed, if one has."""
        slow_s = self.limits.slow_client_timeout_s
        slow = "(the server's --slow-client-timeout)"
        sending = self._sending_since
        if sending is not None and now - sending > slow_s:
            return f"a reply was not taken within {slow_s:g} s {slow}"
        waiting = self._waiting_since
        if waiting is None:
            return None  # between two messages, or waiting for a commit's turn
        if self.state != "ready":
            if now - self._opened > slow_s:
                return f"no handshake within {slow_s:g} s {slow}"
            return None
        if self.conn.mid_frame():
            if self._frame_started is None:
                self._frame_started = now  # first seen now: the time counts from here
            if now - self._frame_started > slow_s:
                return f"a message begun and not finished within {slow_s:g} s {slow}"
            return None
        if self.inflight.value < MAX_INFLIGHT_COMMITS:
            return None  # its own commits are running: that is not idling
        idle_s = self.limits.idle_timeout_s
        if now - max(waiting, self._last_commit_done) > idle_s:
            return f"nothing sent for {idle_s:g} s (the server's --idle-timeout)"
        return None

    async def dispatch(self, msg: Message, nursery: trio.Nursery) -> None:
        if self.state != "ready":
            await self.handshake(msg)
            return
        handler = _HANDLERS.get(type(msg))
        self.server.requests[type(msg)] += 1
        try:
            if self.reads_only and not isinstance(msg, LANE_REQUESTS):
                self.reads_only_broken = True  # _answer_received ends the connection
                raise not_on_a_lane(type(msg))
            if handler is None:
                raise ProtocolError(f"{type(msg).__name__} is only valid during the handshake")
            await handler(self, msg, nursery)
        except NetmemError as e:
            self.server.errors[e.code] += 1
            await self.send(Error(msg.req_id, e.code, str(e)))

    # One handler per request (_HANDLERS); each answers, or raises a NetmemError that
    # dispatch answers for it.

    async def on_read_pages(self, msg: ReadPages, nursery: trio.Nursery) -> None:
        await self.send(read_reply(self.store, msg))

    async def on_stage_pages(self, msg: StagePages, nursery: trio.Nursery) -> None:
        self.stage(msg)
        await self.send(Staged(msg.req_id, msg.txn, self.staged_bytes))

    async def on_stage_inode(self, msg: StageInode, nursery: trio.Nursery) -> None:
        self.stage(msg)
        await self.send(Staged(msg.req_id, msg.txn, self.staged_bytes))

    async def on_commit(self, msg: Commit, nursery: trio.Nursery) -> None:
        staged = self.staged.pop(msg.txn, [])
        ops: list[Op] = [Resize(name, size) for name, size in msg.resizes]
        ops += staged
        ops += [Write(r) for r in msg.writes]
        # The staged pages stay counted as staged until the commit is done.
        inline_bytes = sum(len(r.data) for r in msg.writes)
        await self.start_commit(nursery, msg, ops, inline_bytes, _staged_bytes(staged))

    async def on_create(self, msg: CreateSegment, nursery: trio.Nursery) -> None:
        await self.start_commit(nursery, msg, [Create(msg.name, msg.size)])

    async def on_resize(self, msg: ResizeSegment, nursery: trio.Nursery) -> None:
        await self.start_commit(nursery, msg, [Resize(msg.name, msg.size)])

    async def on_rename(self, msg: RenameSegment, nursery: trio.Nursery) -> None:
        await self.start_commit(nursery, msg, [Rename(msg.name, msg.new_name)])

    async def on_delete(self, msg: DeleteSegment, nursery: trio.Nursery) -> None:
        await self.start_commit(nursery, msg, [Delete(msg.name)])

    async def on_abort(self, msg: Abort, nursery: trio.Nursery) -> None:
        self.unstage(_staged_bytes(self.staged.pop(msg.txn, [])))
        await self.send(Aborted(msg.req_id, msg.txn))

    async def on_stat(self, msg: StatSegment, nursery: trio.Nursery) -> None:
        check_name(msg.name)
        seg = self.store.segment(msg.name)
        await self.send(SegmentInfo(msg.req_id, msg.name, seg.size, seg.version, seg.stored_pages))

    async def on_list(self, msg: ListSegments, nursery: trio.Nursery) -> None:
        await self.send(SegmentList(msg.req_id, tuple(sorted(self.store.segments))))

    async def on_stat_server(self, msg: StatServer, nursery: trio.Nursery) -> None:
        cap = self.store.capacity_bytes or 0
        info = ServerInfo(msg.req_id, cap, self.store.used_bytes, len(self.store.segments))
        await self.send(info)

    async def on_lookup(self, msg: Lookup, nursery: trio.Nursery) -> None:
        node = self.store.lookup(msg.parent, name_str(msg.name))
        await self.send(_attrs(msg.req_id, node))

    async def on_getattr(self, msg: GetAttr, nursery: trio.Nursery) -> None:
        await self.send(_attrs(msg.req_id, self.store.inode(msg.ino)))

    async def on_readdir(self, msg: ReadDir, nursery: trio.Nursery) -> None:
        limit = min(msg.limit, MAX_READDIR_ENTRIES)
        entries, done = self.store.list_directory(msg.ino, name_str(msg.after), limit)
        out = tuple((name_bytes(name), ino, mode) for name, ino, mode in entries)
        await self.send(Entries(msg.req_id, out, done))

    async def on_read_inode(self, msg: ReadInode, nursery: trio.Nursery) -> None:
        await self.send(read_reply(self.store, msg))

    async def on_change(self, msg: Change, nursery: trio.Nursery) -> None:
        staged = self.staged.pop(msg.txn, [])
        inline = sum(len(op.data) for op in msg.ops if isinstance(op, WritePages))
        ops: list[Op] = [*msg.ops, *staged]
        await self.start_commit(nursery, msg, ops, inline, _staged_bytes(staged))

    async def on_hold(self, msg: Hold, nursery: trio.Nursery) -> None:
        self.server.hold(msg.client, frozenset(msg.inos))
        await self.server.reap()  # what it let go of, if nobody else holds it
        await self.send(Held(msg.req_id, int(self.limits.hold_lease_s * 1000)))

    async def on_subscribe(self, msg: Subscribe, nursery: trio.Nursery) -> None:
        self.server.subscribe(self, frozenset(msg.inos))
        await self.send(Subscribed(msg.req_id, len(self.subscribed)))

    async def on_lock(self, msg: Lock, nursery: trio.Nursery) -> None:
        self.store.inode(msg.ino)  # Stale if there is no such inode
        # Waits in a task of its own: this loop must go on reading (Unlock, Renew...).
        nursery.start_soon(self._lock, msg)

    async def _lock(self, msg: Lock) -> None:
        try:
            with trio.CancelScope() as scope:
                self._lock_waits.add(scope)
                try:
                    grant = await self.server.locks.acquire(
                        self, msg.ino, msg.start, msg.length, msg.exclusive, msg.wait_ms / 1000
                    )
                finally:
                    self._lock_waits.discard(scope)
            if scope.cancel_called:
                return  # the connection closed: release_all takes what was granted
            # The version after every commit made under the locks before this one.
            version = self.store.inode(msg.ino).version
        except NetmemError as e:
            await self.send(Error(msg.req_id, e.code, str(e)))
            return
        lease_ms = int(self.server.locks.lease_s * 1000)
        await self.send(Locked(msg.req_id, grant.token, lease_ms, version))

    async def on_unlock(self, msg: Unlock, nursery: trio.Nursery) -> None:
        self.server.locks.release(self, msg.token)
        await self.send(Unlocked(msg.req_id))

    async def on_renew(self, msg: Renew, nursery: trio.Nursery) -> None:
        n = self.server.locks.renew(self)
        await self.send(Renewed(msg.req_id, n, int(self.server.locks.lease_s * 1000)))

    async def on_read_lane(self, msg: ReadLane, nursery: trio.Nursery) -> None:
        held = [
            what
            for what, holds in (
                ("a claim", self.claim is not None),
                ("subscriptions", bool(self.subscribed)),
                ("locks", self.server.locks.per_holder[self] > 0),
                ("staged pages", bool(self.staged)),
                ("commits under way", self.inflight.value < MAX_INFLIGHT_COMMITS),
            )
            if holds
        ]
        if held:
            raise ProtocolError(
                f"ReadLane on a connection that holds {', '.join(held)}: a read lane "
                "holds nothing; open a new connection for it"
            )
        await self.send(ReadLaneOpen(msg.req_id))
        self.lane_wanted = True  # _serve hands the connection over once this is sent

    async def on_claim(self, msg: Claim, nursery: trio.Nursery) -> None:
        claims = self.server.claims
        old = claims.get(msg.name)
        if self.claim is not None and self.claim != msg.name:
            raise ProtocolError("a connection speaks for one name; connect again for another")
        if old is not None and old is not self:
            old.fenced_by = self.peer
            log.info(
                "connection from %s claimed %r: the one from %s is fenced",
                self.peer,
                msg.name,
                old.peer,
            )
        claims[msg.name] = self
        self.claim = msg.name
        await self.send(Claimed(msg.req_id, old is not None and old is not self))

    def stage(self, msg: StagePages | StageInode) -> None:
        if isinstance(msg, StagePages):
            check_name(msg.segment)
        assert len(msg.data) % PAGE_SIZE == 0
        limit = self.limits.max_staged_bytes
        if self.staged_bytes + len(msg.data) > limit:
            raise TooLarge(
                f"transaction would stage more than {limit} bytes on one connection "
                "(the server's --max-transaction); commit in smaller transactions"
            )
        total = self.server.staged_bytes
        limit = self.limits.max_staged_total_bytes
        if total + len(msg.data) > limit:
            raise TooLarge(
                f"the server holds {total} bytes of staged pages for all its clients, its "
                f"--max-staged-total of {limit}; retry once other commits have finished, "
                "or commit in smaller transactions"
            )
        op: Write | WritePages = (
            Write(PageRun(msg.segment, msg.first, msg.data))
            if isinstance(msg, StagePages)
            else WritePages(msg.ino, msg.first, msg.data)
        )
        self.staged.setdefault(msg.txn, []).append(op)
        self.staged_bytes += len(msg.data)
        self.server.staged_bytes += len(msg.data)

    def unstage(self, nbytes: int) -> None:
        """nbytes of this connection's staged pages were committed, aborted or dropped."""
        self.staged_bytes -= nbytes
        self.server.staged_bytes -= nbytes

    async def start_commit(
        self,
        nursery: trio.Nursery,
        msg: Commit | CreateSegment | ResizeSegment | RenameSegment | DeleteSegment | Change,
        ops: list[Op],
        inline_bytes: int = 0,
        staged_bytes: int = 0,
    ) -> None:
        """Run a commit in its own task. While the connection's unanswered commits hold
        --max-inflight bytes of pages they brought along (inline_bytes; pages staged
        before stay counted as staged until the commit is done), or MAX_INFLIGHT_COMMITS
        of them run, wait: this loop is what reads the connection, so the client is
        pushed back, not refused."""
        limit = self.limits.max_inflight_bytes
        while self.inflight_bytes and self.inflight_bytes + inline_bytes > limit:
            await self.inflight_changed.wait()
        await acquire_soon(self.inflight)
        self.inflight_bytes += inline_bytes
        if not self.server.store.durable:
            # In memory a commit never waits but for the commit lock: run it here,
            # sparing a task per commit (this connection's next request waits for it,
            # as it would for its turn at the lock).
            await self.run_commit(msg, ops, inline_bytes, staged_bytes)
        else:
            nursery.start_soon(self.run_commit, msg, ops, inline_bytes, staged_bytes)

    async def run_commit(
        self,
        msg: Commit | CreateSegment | ResizeSegment | RenameSegment | DeleteSegment | Change,
        ops: list[Op],
        inline_bytes: int,
        staged_bytes: int,
    ) -> None:
        req_id, txn = msg.req_id, msg.txn
        try:
            started = time.perf_counter()
            outcome, replayed = await self.server.commit(txn, ops, self)
            self.server.commit_latency.observe(time.perf_counter() - started)
            if replayed:
                self.server.replayed += 1
            else:
                self.server.commits += 1
            reply: Reply = (
                Changed(req_id, txn, outcome.inodes, outcome.created, replayed)
                if isinstance(msg, Change)
                else Committed(req_id, txn, outcome.versions, replayed)
            )
        except NetmemError as e:
            self.server.errors[e.code] += 1
            reply = Error(req_id, e.code, str(e))
        finally:
            self.inflight.release()
            self.inflight_bytes -= inline_bytes
            self.unstage(staged_bytes)
            self.inflight_changed.set()
            self.inflight_changed = trio.Event()
            self._last_commit_done = trio.current_time()
        await self.send(reply)

    async def handshake(self, msg: Message) -> None:
        token = self.server.token
        if self.state == "hello":
            if not isinstance(msg, Hello):
                await self.refuse(msg, ProtocolError("the first message must be Hello"))
            assert isinstance(msg, Hello)
            if msg.version != PROTOCOL_VERSION:
                await self.refuse(
                    msg,
                    VersionMismatch(
                        f"client speaks protocol {msg.version}, this server speaks "
                        f"{PROTOCOL_VERSION}; upgrade the older side"
                    ),
                )
            self.client_nonce = msg.client_nonce
            self.state = "ready" if token is None else "auth"
            if token is None:
                self.conn.max_frame_bytes = self.limits.max_frame_bytes
            await self.send(
                HelloReply(msg.req_id, PROTOCOL_VERSION, self.server_nonce, token is not None)
            )
        elif self.state == "auth":
            assert token is not None
            ok = isinstance(msg, Authenticate) and auth.proofs_match(
                msg.proof, auth.client_proof(token, self.server_nonce, self.client_nonce)
            )
            if not ok:
                await trio.sleep(AUTH_FAILURE_DELAY_S)
                await self.refuse(
                    msg, AuthFailed("wrong or missing token; check the client's --token-file")
                )
            self.state = "ready"
            self.conn.max_frame_bytes = self.limits.max_frame_bytes
            proof = auth.server_proof(token, self.server_nonce, self.client_nonce)
            await self.send(AuthReply(msg.req_id, proof))

    async def refuse(self, msg: Message, err: NetmemError) -> None:
        """Answer msg with err and close the connection."""
        log.warning("refusing connection from %s: %s", self.peer, err)
        await self.send(Error(msg.req_id, err.code, str(err)))
        raise _Close


def _staged_bytes(staged: list[Write | WritePages]) -> int:
    return sum(len(op.run.data) if isinstance(op, Write) else len(op.data) for op in staged)


def _attrs(req_id: int, node: Inode) -> Attrs:
    return Attrs(req_id, *(getattr(node, f) for f in ATTR_FIELDS))


_Handler = Callable[[_Session, Any, trio.Nursery], Awaitable[None]]
_HANDLERS: dict[type[Message], _Handler] = {
    ReadPages: _Session.on_read_pages,
    StagePages: _Session.on_stage_pages,
    Commit: _Session.on_commit,
    CreateSegment: _Session.on_create,
    ResizeSegment: _Session.on_resize,
    RenameSegment: _Session.on_rename,
    DeleteSegment: _Session.on_delete,
    Abort: _Session.on_abort,
    StatSegment: _Session.on_stat,
    ListSegments: _Session.on_list,
    StatServer: _Session.on_stat_server,
    Lookup: _Session.on_lookup,
    GetAttr: _Session.on_getattr,
    ReadDir: _Session.on_readdir,
    ReadInode: _Session.on_read_inode,
    Change: _Session.on_change,
    StageInode: _Session.on_stage_inode,
    Hold: _Session.on_hold,
    Claim: _Session.on_claim,
    Subscribe: _Session.on_subscribe,
    Lock: _Session.on_lock,
    Unlock: _Session.on_unlock,
    Renew: _Session.on_renew,
    ReadLane: _Session.on_read_lane,
}
