"""The page server's network side: one task per connection, requests answered by id.

Where it sits: top of netmemfs_server (serve -> store -> log). It speaks the protocol
through netmemfs.protocol.Connection and keeps no page data of its own.

Reads and staging are answered inline, in arrival order. Commits (and the segment
operations, which are one-op commits) run in their own tasks so a commit waiting for the
disk does not hold up reads on the same connection; replies may therefore arrive out of
order, which the request ids allow. All commits of the server pass through one lock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from netmemfs import auth
from netmemfs._trio_util import open_quiet_nursery, receive_into, send_parts, tune_socket
from netmemfs.errors import (
    AuthFailed,
    NetmemError,
    ProtocolError,
    RemoteProtocolError,
    TooLarge,
    VersionMismatch,
)
from netmemfs.pages import PAGE_SIZE, check_name
from netmemfs.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Abort,
    Aborted,
    Authenticate,
    AuthReply,
    Commit,
    Committed,
    Connection,
    CreateSegment,
    DeleteSegment,
    Error,
    Hello,
    HelloReply,
    ListSegments,
    Message,
    PageRun,
    Pages,
    ReadPages,
    RenameSegment,
    Reply,
    ResizeSegment,
    Role,
    SegmentInfo,
    SegmentList,
    ServerInfo,
    Staged,
    StagePages,
    StatSegment,
    StatServer,
)
from netmemfs_server.log import LogPageStore
from netmemfs_server.store import (
    Create,
    Delete,
    MemoryPageStore,
    Op,
    Rename,
    Resize,
    Versions,
    Write,
)

log = logging.getLogger("netmemfs.server")

DEFAULT_PORT = 7733
# Per connection: pages staged in open transactions, and commits running at once (the
# connection stops reading while that many wait, which pushes back on the client).
MAX_STAGED_BYTES = 1 << 30  # the default of --max-transaction
MAX_INFLIGHT_COMMITS = 16
AUTH_FAILURE_DELAY_S = 0.5


class _Close(Exception):
    """End this connection after the reply already sent."""


class PageServer:
    def __init__(
        self,
        mem: MemoryPageStore,
        durable: LogPageStore | None = None,
        token: bytes | None = None,
        *,
        max_staged_bytes: int = MAX_STAGED_BYTES,
    ) -> None:
        self.mem = mem
        self.max_staged_bytes = max_staged_bytes
        self.durable = durable
        self.token = token
        self._commit_lock = trio.Lock()
        self.connections = 0

    async def commit(self, txn: bytes, ops: Sequence[Op]) -> tuple[Versions, bool]:
        """Apply ops as transaction txn exactly once: (versions, replayed)."""
        async with self._commit_lock:
            prior = self.mem.lookup_txn(txn)
            if prior is not None:
                return prior, True
            self.mem.check(ops)
            durable = self.durable
            if durable is None:
                return self.mem.apply(txn, ops), False
            # Shielded so that the log and memory never disagree: a record appended but
            # not applied (cancelled in between) would be applied twice after a client
            # retry. Durability itself comes from the fsync inside append().
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(durable.append, txn, ops)
                # We hold the commit lock and reads change nothing, so the check above
                # still describes the state apply() sees.
                versions = self.mem.apply(txn, ops)
                if durable.wants_checkpoint():
                    try:
                        await trio.to_thread.run_sync(durable.checkpoint)
                    except OSError as e:
                        log.error(
                            "checkpoint of %s failed (%s); the log keeps growing until one "
                            "succeeds: free space there",
                            durable.data_dir,
                            e,
                        )
            return versions, False

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        task_status.started(bound)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        self.connections += 1
        tune_socket(stream.socket)
        try:
            await _Session(self, stream, peer).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Close):
            pass
        except RemoteProtocolError as e:
            log.warning("closing connection from %s: %s", peer, e)
        except Exception:
            log.exception("internal error serving %s; closing that connection only", peer)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)


class _Session:
    def __init__(self, server: PageServer, stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        self.mem = server.mem
        self.stream = stream
        self.peer = peer
        self.conn = Connection(Role.SERVER)
        self.send_lock = trio.Lock()
        self.state = "hello"
        self.server_nonce = auth.new_nonce()
        self.client_nonce = b""
        self.staged: dict[bytes, list[PageRun]] = {}
        self.staged_bytes = 0
        self.inflight = trio.Semaphore(MAX_INFLIGHT_COMMITS)

    async def send(self, msg: Reply) -> None:
        parts = self.conn.send_parts(msg)
        async with self.send_lock:
            await send_parts(self.stream, parts)

    async def run(self) -> None:
        async with open_quiet_nursery() as nursery:
            while True:
                while True:
                    try:
                        ev = self.conn.next_event()
                    except RemoteProtocolError as e:
                        await self.send(Error(0, e.code, str(e)))
                        raise
                    if ev is NEED_DATA:
                        break
                    if ev is CLOSED:
                        return  # the nursery lets running commits finish
                    assert isinstance(ev, Message)
                    await self.dispatch(ev, nursery)
                await receive_into(self.stream, self.conn)

    async def dispatch(self, msg: Message, nursery: trio.Nursery) -> None:
        if self.state != "ready":
            await self.handshake(msg)
            return
        try:
            if isinstance(msg, ReadPages):
                check_name(msg.segment)
                version, runs = self.mem.read(msg.segment, msg.first, msg.count)
                await self.send(Pages(msg.req_id, msg.segment, msg.first, msg.count, version, runs))
            elif isinstance(msg, StagePages):
                self.stage(msg)
                await self.send(Staged(msg.req_id, msg.txn, self.staged_bytes))
            elif isinstance(msg, Commit):
                staged = self.staged.pop(msg.txn, [])
                self.staged_bytes -= sum(len(r.data) for r in staged)
                ops: list[Op] = [Resize(name, size) for name, size in msg.resizes]
                ops += [Write(r) for r in staged]
                ops += [Write(r) for r in msg.writes]
                await self.start_commit(nursery, msg.req_id, msg.txn, ops)
            elif isinstance(msg, CreateSegment):
                await self.start_commit(nursery, msg.req_id, msg.txn, [Create(msg.name, msg.size)])
            elif isinstance(msg, ResizeSegment):
                await self.start_commit(nursery, msg.req_id, msg.txn, [Resize(msg.name, msg.size)])
            elif isinstance(msg, RenameSegment):
                op = Rename(msg.name, msg.new_name)
                await self.start_commit(nursery, msg.req_id, msg.txn, [op])
            elif isinstance(msg, DeleteSegment):
                await self.start_commit(nursery, msg.req_id, msg.txn, [Delete(msg.name)])
            elif isinstance(msg, Abort):
                dropped = self.staged.pop(msg.txn, [])
                self.staged_bytes -= sum(len(r.data) for r in dropped)
                await self.send(Aborted(msg.req_id, msg.txn))
            elif isinstance(msg, StatSegment):
                check_name(msg.name)
                seg = self.mem.segment(msg.name)
                await self.send(
                    SegmentInfo(msg.req_id, msg.name, seg.size, seg.version, seg.stored_pages)
                )
            elif isinstance(msg, ListSegments):
                await self.send(SegmentList(msg.req_id, tuple(sorted(self.mem.segments))))
            elif isinstance(msg, StatServer):
                cap = self.mem.capacity_bytes or 0
                info = ServerInfo(msg.req_id, cap, self.mem.used_bytes, len(self.mem.segments))
                await self.send(info)
            else:
                raise ProtocolError(f"{type(msg).__name__} is only valid during the handshake")
        except NetmemError as e:
            await self.send(Error(msg.req_id, e.code, str(e)))

    def stage(self, msg: StagePages) -> None:
        check_name(msg.segment)
        limit = self.server.max_staged_bytes
        if self.staged_bytes + len(msg.data) > limit:
            raise TooLarge(
                f"transaction would stage more than {limit} bytes on one connection "
                "(the server's --max-transaction); commit in smaller transactions"
            )
        self.staged.setdefault(msg.txn, []).append(PageRun(msg.segment, msg.first, msg.data))
        self.staged_bytes += len(msg.data)
        assert len(msg.data) % PAGE_SIZE == 0

    async def start_commit(
        self, nursery: trio.Nursery, req_id: int, txn: bytes, ops: list[Op]
    ) -> None:
        await self.inflight.acquire()
        nursery.start_soon(self.run_commit, req_id, txn, ops)

    async def run_commit(self, req_id: int, txn: bytes, ops: list[Op]) -> None:
        try:
            versions, replayed = await self.server.commit(txn, ops)
            reply: Reply = Committed(req_id, txn, versions, replayed)
        except NetmemError as e:
            reply = Error(req_id, e.code, str(e))
        finally:
            self.inflight.release()
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
            proof = auth.server_proof(token, self.server_nonce, self.client_nonce)
            await self.send(AuthReply(msg.req_id, proof))

    async def refuse(self, msg: Message, err: NetmemError) -> None:
        log.warning("refusing connection from %s: %s", self.peer, err)
        await self.send(Error(msg.req_id, err.code, str(err)))
        raise _Close
