"""The Redis store: files, pages and commits kept in Redis (standalone, or a Redis Cluster).

Where it sits: beside remote.py, below the doors, which use it through store.Store.
Selected by a URL: `--server redis://HOST:PORT[,HOST:PORT...]` (a cluster's seed nodes,
or one standalone Redis); `rediss://` for TLS.

    async with RedisStore.connect("redis://127.0.0.1:6379") as store:
        st = await store.lookup(1, "seg0")
        got = await store.read_inode(st.ino, 0, 16)

The key layout is in docs/protocol.md ("Redis store"). In short: each regular file's
pages, size, version and committed-transaction table share one hash slot (the hash tag
`{P:ino}`), so a commit of a file is one call of the `nm_commit` function: it checks the
transaction id (exactly once), applies everything or nothing, and publishes a notice on
the file's shard channel. The namespace (directories, inode attributes, holds, orphans)
is in one slot of its own (`{P}`); a namespace transaction is computed here, by the
server's own rules (netmemfs_server.store) run over the records it touches, and applied
by `nm_ns` only if the namespace did not change meanwhile (else computed again).

Clients: the functions are called over lean connections of our own, one per node (raw
RESP, hiredis's Reader, requests pipelined: _Lanes), and notices heard the same way
(_Ears); coredis reads the cluster's shards, the namespace's records (pipelines), and
loads the functions. bench/redis_clients.py has what each way costs per call here. A
commit larger than INLINE_PAGES is staged chunk by chunk and applied by renames.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.resources
import itertools
import logging
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Union, cast

import coredis
import coredis.exceptions
import hiredis
import msgpack
import trio
from coredis._utils import hash_slot

from netmemfs._trio_util import (
    SMALL_RECEIVE_BYTES,
    lone_errors,
    open_quiet_nursery,
    receive_into_view,
    send_parts_locked,
    socket_of,
    tune_socket,
)
from netmemfs.errors import (
    NetmemError,
    NoSpace,
    NotHeld,
    NotPermitted,
    OutOfRange,
    ServerUnreachable,
    Stale,
    TooLarge,
    Unsupported,
    WouldBlock,
    error_for_code,
)
from netmemfs.ops import Expect, Fence, InodeOp, Reap, Truncate, WritePages
from netmemfs.pages import PAGE_SIZE, PageRun, check_entry_name, pages_for
from netmemfs.protocol import MAX_MESSAGE_PAGES, Notice
from netmemfs.sizes import parse_host_port
from netmemfs.store import (
    ChangeResult,
    CommitResult,
    Handover,
    InodeStat,
    LockGrant,
    PageRead,
    ServerStat,
)
from netmemfs_server.store import ROOT_INO, FileData, Inode, MemoryPageStore

log = logging.getLogger(__name__)

DEFAULT_REDIS_PORT = 6379
FORMAT = b"netmemfs-redis 2"
CHUNK_PAGES = 63  # pages per chunk key: 252 KiB, in jemalloc's 256 KiB class
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE
REMEMBER_TXNS = 1000  # per file, and for the namespace: a client retries only its last
NS_TRIES = 100  # namespace transactions computed again after a concurrent change
HOLD_LEASE_S = 30.0
# How long a commit waits for its replicas (WAIT) before it is reported as not known to
# have landed (and sent again, which Redis applies at most once).
DEFAULT_WAIT_MS = 2000
LOCK_LEASE_S = 10.0  # as netmemfs-server's default --lock-lease
LOCK_POLL_MIN_S = 0.002  # a lock not granted is asked for again after this, doubling
LOCK_POLL_MAX_S = 0.05
RECONNECT_S = 0.05  # a broken connection is opened again after this
DIAL_TIMEOUT_S = 10.0  # connect, TLS handshake and AUTH of one raw connection
LANE_RECEIVE_BYTES = 1 << 20  # a lane's receive buffer: a 1 MiB page run in few calls
# A commit of more pages than this is staged chunk by chunk (nm_stage) and applied by
# renames, so that no call blocks a Redis node long (docs/protocol.md).
INLINE_PAGES = 1024
STAGE_CALLS = 16  # staging calls in flight
STAGE_TTL_MS = 600_000  # a staged copy left by a dead client expires after this
# Evicting policies that may drop a page that was committed: refused at connect.
_EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")
# Errors a node gives while the cluster heals: the call is made again (until --timeout).
_TRANSIENT = ("CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN", "READONLY")
# The functions whose changes a commit's acknowledgement waits to see replicated.
_REPLICATED = frozenset(("nm_commit", "nm_ns", "nm_drop", "nm_claim"))

RedisClient = Union["coredis.Redis[bytes]", "coredis.RedisCluster[bytes]"]


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A Redis store's address: its seeds, TLS, and how many replicas must have a
    commit before it is acknowledged (None: 1 if every master has one, else 0)."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool
    replicas: int | None = None
    wait_ms: int = DEFAULT_WAIT_MS

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """redis://HOST:PORT[,HOST:PORT...][?replicas=N&wait_ms=MS], or rediss://."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("redis", "rediss"):
            raise ValueError(f"{url!r}: a Redis URL starts with redis:// or rediss://")
        rest, _, query = rest.partition("?")
        rest = rest.rstrip("/")
        if "@" in rest or "/" in rest:
            raise ValueError(
                f"{url!r}: give redis://HOST:PORT[,HOST:PORT...][?replicas=N&wait_ms=MS] "
                "(no user, password or database in the URL: the password goes in "
                "--token-file)"
            )
        options: dict[str, int] = {}
        for item in filter(None, query.split("&")):
            name, _, value = item.partition("=")
            if name not in ("replicas", "wait_ms") or not value.isdigit():
                raise ValueError(
                    f"{url!r}: {item!r} is not an option; the options are replicas=N (how "
                    "many replicas must have a commit before it is acknowledged) and "
                    "wait_ms=MS (how long to wait for them)"
                )
            options[name] = int(value)
        seeds = tuple(parse_host_port(part, DEFAULT_REDIS_PORT) for part in rest.split(","))
        return cls(
            seeds,
            scheme == "rediss",
            options.get("replicas"),
            options.get("wait_ms", DEFAULT_WAIT_MS),
        )

    def __str__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.seeds)
        return f"{'rediss' if self.tls else 'redis'}://{hosts}"


class Keys:
    """The key names (docs/protocol.md, "Redis store"). P: the prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        ns = f"{{{prefix}}}:"
        self.format = (ns + "fmt").encode()
        self.seq = (ns + "seq").encode()
        self.inodes = (ns + "i").encode()
        self.txns = (ns + "t").encode()
        self.txn_list = (ns + "tq").encode()
        self.next_ino = (ns + "next").encode()
        self.orphans = (ns + "o").encode()
        self.reaping = (ns + "r").encode()
        self.holds = (ns + "h").encode()

    def directory(self, ino: int) -> bytes:
        return f"{{{self.prefix}}}:d:{ino}".encode()

    def claim(self, name: bytes) -> bytes:
        return f"{{{self.prefix}}}:claim:{name.hex()}".encode()

    def file(self, ino: int, what: str) -> bytes:
        return f"{{{self.prefix}:{ino}}}:{what}".encode()

    def chunk(self, ino: int, c: int) -> bytes:
        return self.file(ino, f"c:{c}")


# --- inode records: the namespace's part of an inode -------------------------------------


def _pack(node: Inode) -> bytes:
    size0 = node.data.size if node.data is not None else 0
    return cast(
        bytes,
        msgpack.packb(
            [
                node.mode,
                node.uid,
                node.gid,
                node.atime_ns,
                node.mtime_ns,
                node.ctime_ns,
                node.nlink,
                node.parent,
                node.rdev,
                node.target,
                node.version,
                size0,
            ]
        ),
    )


def _unpack(ino: int, raw: bytes, entries: dict[str, int] | None) -> Inode:
    mode, uid, gid, atime, mtime, ctime, nlink, parent, rdev, target, version, size0 = (
        msgpack.unpackb(raw)
    )
    node = Inode(ino, mode, uid, gid)
    node.atime_ns, node.mtime_ns, node.ctime_ns = atime, mtime, ctime
    node.nlink, node.parent, node.rdev, node.target, node.version = (
        nlink,
        parent,
        rdev,
        target,
        version,
    )
    if node.data is not None:
        node.data = FileData(size0)
    if node.entries is not None:
        node.entries = dict(entries or {})
    return node


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Need(Exception):
    """A rule asked for an inode the view has not read yet."""

    def __init__(self, ino: int) -> None:
        self.ino = ino


class _Inodes(dict[int, Inode]):
    """The inodes a view has read; asking for another raises _Need (the view reads it
    and runs the rules again). absent: numbers read and found to be no inode."""

    def __init__(self) -> None:
        super().__init__()
        self.absent: set[int] = set()

    def __missing__(self, ino: int) -> Inode:
        raise _Need(ino)

    def get(self, ino: int, default: Any = None) -> Any:
        if ino in self:
            return self[ino]
        if ino in self.absent:
            return default
        raise _Need(ino)


class _View(MemoryPageStore):
    """The part of the namespace one transaction touches, read from Redis on demand,
    run by the server's own rules (MemoryPageStore's)."""

    def __init__(self, seq: bytes, next_ino: int) -> None:
        super().__init__()
        self.inodes = _Inodes()
        self.seq = seq
        self.next_ino = next_ino

    def load(self, ino: int, raw: bytes | None, entries: dict[bytes, bytes]) -> None:
        if raw is None:
            cast(_Inodes, self.inodes).absent.add(ino)
            return
        names = {_name(k): int(v) for k, v in entries.items()}
        node = _unpack(ino, raw, names)
        self.inodes[ino] = node
        if ino == ROOT_INO:
            self.root = node


def _run_view(view: _View, fn: Callable[[], object]) -> tuple[object, int | None]:
    """fn() over view, or the inode it still needs."""
    try:
        return fn(), None
    except _Need as need:
        return None, need.ino


def _error(e: coredis.exceptions.ResponseError, where: str) -> NetmemError:
    text = str(e)
    if isinstance(e, coredis.exceptions.ReadOnlyError):
        text = f"READONLY {text}"  # coredis keeps the code in the class, not the text
    return _reply_error(text, where)


class _Retry(NetmemError):
    """nm_commit asks to be called again: with the file's size (NMinit), with chunk
    keys up to a larger size (NMresize), or with its pages staged again (NMrestage)."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what} {detail}")
        self.what = what
        self.detail = detail


def _reply_error(text: str, where: str) -> NetmemError:
    if text.startswith("OOM"):
        return NoSpace(
            f"{where}: Redis is out of memory ({text}); raise its maxmemory, add a master "
            "(redis-cli --cluster add-node, then rebalance), or delete files"
        )
    if text.startswith("NOPERM") or "no permissions to" in text:
        return NotPermitted(
            f"{where}: Redis's ACL refused it ({text}); netmemfs needs every command it "
            "uses on its keys and channels: ACL SETUSER <user> on ~{nm* &{nm* +@all "
            "(nm being the key prefix)"
        )
    if text.startswith("READONLY"):
        return NotPermitted(
            f"{where}: this Redis is a read-only replica ({text}); give --server its master "
            "(INFO replication on the replica names it: master_host, master_port), or, for "
            "a Redis Cluster, the seeds of its nodes (netmemfs finds the masters)"
        )
    if text.startswith(("NMinit ", "NMresize ", "NMrestage ")):
        code, _, detail = text[2:].partition(" ")
        return _Retry(code, detail)
    if text.startswith("NM"):
        code, _, msg = text[2:].partition(" ")
        return error_for_code(code)(f"{where}: {msg}")
    return NetmemError(f"{where}: Redis refused it: {text}")


class RedisStore:
    """A page store in Redis (store.Store)."""

    def __init__(
        self,
        client: RedisClient,
        address: RedisAddress,
        keys: Keys,
        *,
        cluster: bool,
        username: str | None = None,
        password: str | None = None,
        retry_for_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client = client
        self._tls = tls  # every connection's, when TLS: ours (_dial) and coredis's
        self._username = username
        self._password = password
        self.address = address
        self.keys = keys
        self.cluster = cluster
        self.on_notice: Callable[[Notice | None], None] | None = None
        self.wanted: frozenset[int] = frozenset()
        self.listeners: dict[int, list[Callable[[Notice | None], None]]] = {}
        self._client_id = os.urandom(8)
        self.reconnects = 0  # calls sent again after a connection broke (a failover?)
        self.connected = True  # the last call reached a node
        self._txn_seq = itertools.count(1)
        self._sizes: dict[int, int] = {}  # a file's size as last seen (its chunk keys)
        self.replicas = 0  # each commit waits until this many replicas have it
        self._nodes_seen: dict[tuple[str, int], None] = {}  # a cluster's, in order seen
        self.retry_for_s = retry_for_s
        self._ears = _Ears(self)
        self._slots = _Slots(self)
        self._lanes = _Lanes(self)
        self._owner = self._client_id.hex()  # who holds this client's locks
        self._lock_ids = itertools.count(1)
        self._locks: dict[int, tuple[int, int]] = {}  # our token -> (ino, Redis's token)
        # nm_commit's claim argument: "NAME GENERATION" (hex name) once connect() has
        # taken a generation of the name it was given, else "" (see claim()).
        self._claim = ""

    # --- connecting ------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        retry_for_s: float = 30.0,
        prefix: str = "nm",
        credentials: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        claim: bytes | None = None,
    ) -> AsyncIterator[RedisStore]:
        """Connect to the Redis (or Redis Cluster) at url, check that it may hold
        netmemfs pages, and load the store's functions. credentials: a password file's
        contents, PASSWORD or USER PASSWORD (a Redis ACL user). tls: how to check the
        nodes' certificates (--tls-ca); rediss:// without it checks them against the
        system's CAs. claim: a name this client speaks for (the kernel module's door,
        kdoor.device_claim): see claim()."""
        address = RedisAddress.parse(url)
        username = password = None
        if credentials is not None:
            username, password = _parse_credentials(credentials)
        if tls is None and address.tls:
            tls = ssl.create_default_context()
        cluster = await _is_cluster(address, username, password, retry_for_s, tls)
        if not cluster and len(address.seeds) > 1:
            raise NotPermitted(
                f"{url} names {len(address.seeds)} nodes, but they are not a Redis Cluster "
                "(cluster_enabled is 0): name a standalone Redis by one address"
            )
        client: RedisClient
        common: dict[str, Any] = {
            "decode_responses": False,
            "username": username,
            "password": password,
            "ssl": tls is not None,
            "ssl_context": tls,
            "connect_timeout": retry_for_s,
        }
        if cluster:
            seeds = [coredis.connection.TCPLocation(h, p) for h, p in address.seeds]
            client = coredis.RedisCluster(startup_nodes=seeds, **common)
        else:
            host, port = address.seeds[0]
            client = coredis.Redis(host=host, port=port, **common)
        # coredis runs its connections in a task group: its errors, and the caller's
        # from the body, come out of it grouped; lone_errors takes them out again.
        with lone_errors():
            async with client:
                store = cls(
                    client,
                    address,
                    Keys(prefix),
                    cluster=cluster,
                    username=username,
                    password=password,
                    retry_for_s=retry_for_s,
                    tls=tls,
                )
                async with open_quiet_nursery() as nursery:
                    try:
                        await store._prepare()
                        if claim is not None:
                            await store.claim(claim)
                        await nursery.start(store._ears.run)
                        yield store
                        nursery.cancel_scope.cancel()
                    finally:
                        store._lanes.close()

    async def _prepare(self) -> None:
        code = importlib.resources.files("netmemfs").joinpath("redis_functions.lua").read_text()
        where = f"preparing the Redis store at {self.address}"
        try:
            for node, policy in (await self._config("maxmemory-policy")).items():
                if policy in _EVICTING:
                    raise NotPermitted(
                        f"Redis node {node} has maxmemory-policy {policy}: it may evict "
                        "committed pages. Set `maxmemory-policy noeviction` on every node "
                        "(CONFIG SET maxmemory-policy noeviction, and in redis.conf)"
                    )
            try:
                await self.client.function_load(code, replace=True)
            except coredis.exceptions.ResponseError as e:
                if "already exists" not in str(e):
                    raise
                raise NotPermitted(
                    f"{where}: another netmemfs's functions are loaded there ({e}), for "
                    f"a key layout other than {FORMAT.decode()!r}; every client of one "
                    "store must run the same netmemfs release, or use another database"
                ) from None
            k = self.keys
            root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, time_ns=time.time_ns())
            root.parent = ROOT_INO
            found = await self.client.fcall(
                "nm_format",
                [k.format, k.inodes, k.next_ino, k.directory(ROOT_INO)],
                [FORMAT, _pack(root)],
            )
        except coredis.exceptions.ResponseError as e:
            raise _error(e, where) from None
        except (coredis.exceptions.ConnectionError, OSError) as e:
            raise self._unreachable(where, e) from None
        if found != FORMAT:
            raise NotPermitted(
                f"{where}: its key {k.format.decode()} holds {found!r}, not {FORMAT.decode()!r}: "
                "another program's keys or a newer netmemfs; use another database or prefix"
            )
        await self._check_durability()
        await self._sweep_reaping()

    async def claim(self, name: bytes) -> None:
        """Speak for name from now on, fencing every client that claimed it before: a
        commit of theirs to a file is refused (Fenced) once one of ours has reached that
        file (nm_commit keeps each name's newest generation per file). The generation is
        one INCR of the name's counter in the namespace's slot (nm_claim, acknowledged
        once the replicas commits wait for have it), taken once: a failover or a
        reconnection keeps it."""
        gen = await self._call(f"claim of {name!r}", "nm_claim", [self.keys.claim(name)], [])
        self._claim = f"{name.hex()} {int(gen)}"

    async def _check_durability(self) -> None:
        """Warn of settings under which an acknowledged commit can be lost, and decide
        how many replicas each commit waits for (the URL's replicas=, or 1 if every
        master has a replica)."""
        aof = await self._config("appendonly")
        fsync = await self._config("appendfsync")
        for node in aof:
            if aof[node] != "yes" or fsync.get(node) != "always":
                log.warning(
                    "Redis node %s has appendonly %s, appendfsync %s: a commit it "
                    "acknowledged is lost if it loses power. For commits that survive, set "
                    "`appendonly yes` and `appendfsync always` on every node",
                    node,
                    aof[node],
                    fsync.get(node),
                )
        if self.address.replicas is not None:
            self.replicas = self.address.replicas
            return
        replicas = []
        for host, port in await self._primaries():
            async with self._direct(host, port) as direct:
                info = await direct.info("replication")
            replicas.append(int(str(info.get("connected_slaves", 0))))
        self.replicas = 1 if replicas and min(replicas) > 0 else 0
        if self.replicas == 0 and self.cluster:
            log.warning(
                "a master of the Redis Cluster %s has no replica: its files are lost if "
                "it dies (add one with redis-cli --cluster add-node --cluster-slave)",
                self.address,
            )

    async def _config(self, name: str) -> dict[str, str]:
        """CONFIG GET name of each node (a cluster's masters), by address."""
        out = {}
        for host, port in await self._primaries():
            async with self._direct(host, port) as direct:
                got = await direct.config_get([name])
            out[f"{host}:{port}"] = _text(got.get(name.encode(), b""))
        return out

    async def _primaries(self) -> list[tuple[str, int]]:
        """The nodes that hold keys: a cluster's masters, or the one Redis."""
        if not self.cluster:
            return [self.address.seeds[0]]
        return sorted({master for _, master in await self._shards()})

    async def _shards(self) -> list[tuple[list[int], tuple[str, int]]]:
        """A cluster's shards: their slot ranges (lo, hi, lo, hi...) and master, as
        the first node that answers CLUSTER SHARDS says (nodes seen before first, then
        the seeds), asked again until retry_for_s has passed."""
        deadline = trio.current_time() + self.retry_for_s
        last: object = None
        while True:
            for node in [*self._nodes_seen, *self.address.seeds]:
                try:
                    reply, _ = await self._lanes.call(node, [b"CLUSTER", b"SHARDS"])
                except (OSError, trio.BrokenResourceError, _LaneLost, ServerUnreachable) as e:
                    last = e
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    last = reply
                    continue
                out = []
                for shard in map(_pairs, reply):
                    nodes = [_pairs(n) for n in shard[b"nodes"]]
                    for n in nodes:
                        self._nodes_seen[self._node_address(n)] = None
                    for n in nodes:
                        if n[b"role"] == b"master":
                            master = self._node_address(n)
                            out.append(([int(x) for x in shard[b"slots"]], master))
                return out
            if trio.current_time() >= deadline:
                raise ServerUnreachable(
                    f"no node of the Redis Cluster {self.address} says which node serves "
                    f"which slots ({last}); check that its nodes run"
                )
            await trio.sleep(RECONNECT_S)

    def _node_address(self, node: dict[bytes, Any]) -> tuple[str, int]:
        """A CLUSTER SHARDS node's address: its TLS port when we speak TLS (a node
        serving TLS only has no `port`)."""
        port = node.get(b"tls-port") if self._tls is not None else None
        return _text(node[b"ip"]), int(port if port is not None else node[b"port"])

    @asynccontextmanager
    async def _direct(self, host: str, port: int) -> AsyncIterator[coredis.Redis[bytes]]:
        """A connection to one node (for what a cluster client does not route)."""
        client: coredis.Redis[bytes] = coredis.Redis(
            host=host,
            port=port,
            decode_responses=False,
            username=self._username,
            password=self._password,
            ssl=self._tls is not None,
            ssl_context=self._tls,
        )
        with lone_errors():
            async with client:
                yield client

    def _unreachable(self, where: str, e: BaseException) -> ServerUnreachable:
        return ServerUnreachable(
            f"{where}: Redis at {self.address} is unreachable ({e}); check that it runs "
            "and that --server names it"
        )

    async def _call(
        self, where: str, fn: str, keys: Sequence[bytes], args: Sequence[object]
    ) -> Any:
        """FCALL fn on the node that serves keys (all in one slot), over a lean
        connection (raw RESP, pipelined), again after a break or a moved slot until
        retry_for_s has passed. Every function is safe to call twice: each checks its
        transaction id, or changes nothing, or (nm_lock) grants a lock that lapses."""
        command = [b"FCALL", fn.encode(), b"%d" % len(keys), *keys, *map(_arg, args)]
        # A change acknowledged only once enough replicas have it (WAIT, on the same
        # connection: it waits for the writes sent on it before).
        wait = (
            [b"WAIT", b"%d" % self.replicas, b"%d" % self.address.wait_ms]
            if self.replicas and fn in _REPLICATED
            else None
        )
        deadline = trio.current_time() + self.retry_for_s
        asking: tuple[str, int] | None = None
        while True:
            try:
                if asking is not None:
                    node, asking = asking, None
                    reply, acked = await self._lanes.call(node, command, asking=True, wait=wait)
                else:
                    node = await self._slots.node_of(keys[0])
                    reply, acked = await self._lanes.call(node, command, wait=wait)
            except (OSError, trio.BrokenResourceError, _LaneLost, ServerUnreachable) as e:
                # A node down (a failover under way?): ask for the shards again, retry.
                self.connected = False
                if trio.current_time() >= deadline:
                    raise self._unreachable(where, e) from None
                self.reconnects += 1
                self._slots.forget()
                await trio.sleep(RECONNECT_S)
                continue
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith(_TRANSIENT) and trio.current_time() < deadline:
                    # A failover under way (CLUSTERDOWN until a replica is promoted), a
                    # node loading or resyncing: the same call again, a little later.
                    self._slots.forget()
                    await trio.sleep(RECONNECT_S)
                    continue
                if text.startswith(("MOVED ", "ASK ")) and trio.current_time() < deadline:
                    host, _, port = text.split()[2].rpartition(":")
                    if text.startswith("MOVED "):
                        self._slots.forget()
                    else:
                        asking = (host, int(port))
                    continue
                raise _reply_error(text, f"{where} (Redis {node[0]}:{node[1]})")
            if wait is not None and not (isinstance(acked, int) and acked >= self.replicas):
                if trio.current_time() < deadline:
                    continue  # sent again: a replica catching up, or a failover under way
                raise ServerUnreachable(
                    f"{where}: Redis {node[0]}:{node[1]} applied it, but only {acked} of "
                    f"the {self.replicas} replicas it must reach had it within "
                    f"{self.address.wait_ms} ms, asked until --timeout; its outcome is "
                    "unknown, and a commit is sent again later (Redis applies it once). Check "
                    "the replicas, or lower replicas= in the --server URL"
                )
            self.connected = True
            return reply

    async def _read_now(self, keys: Sequence[bytes], args: Sequence[int]) -> list[Any] | None:
        """nm_read's answer, read without Lua: MULTI, HMGET of the data record, GETRANGE
        of each chunk, EXEC: as atomic as the function call, without copying the pages
        through Lua (redis-benchmark here: a 252 KiB chunk costs 0.08 ms this way, 0.47
        ms through nm_read). None if it did not work out at once (a moved slot, a break,
        a node loading): the caller then calls nm_read, which follows each of those."""
        commands = [[b"MULTI"], [b"HMGET", keys[0], b"size", b"version", b"gone"]]
        for k, key in enumerate(keys[1:]):
            commands.append([b"GETRANGE", key, b"%d" % args[2 * k], b"%d" % args[2 * k + 1]])
        commands.append([b"EXEC"])
        try:
            node = await self._slots.node_of(keys[0])
            replies = await self._lanes.call_many(node, commands)
        except (OSError, trio.BrokenResourceError, _LaneLost, ServerUnreachable):
            return None
        done = replies[-1]
        if any(isinstance(r, hiredis.ReplyError) for r in replies) or not isinstance(done, list):
            return None
        size, version, gone = done[0]
        return [
            -1 if size is None else int(size),
            int(version or 0),
            0 if gone is None else 1,
            *done[1:],
        ]

    async def _do(self, where: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """call() through coredis (reads, and changes that may be made twice), again
        after a broken connection (a failover, say) until retry_for_s has passed."""
        deadline = trio.current_time() + self.retry_for_s
        while True:
            try:
                return await call()
            except coredis.exceptions.ResponseError as e:
                if str(e).startswith(_TRANSIENT) and trio.current_time() < deadline:
                    await trio.sleep(RECONNECT_S)  # the cluster heals: as in _call
                    continue
                raise _error(e, where) from None
            except (coredis.exceptions.ConnectionError, OSError) as e:
                if trio.current_time() >= deadline:
                    raise self._unreachable(where, e) from None
                self.reconnects += 1
                await trio.sleep(RECONNECT_S)

    def new_txn(self) -> bytes:
        return self._client_id + next(self._txn_seq).to_bytes(8, "big")

    # --- reads -----------------------------------------------------------------------

    async def _meta(self, ino: int) -> tuple[bytes | None, dict[bytes, bytes]]:
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            rec = pipe.hget(k.inodes, str(ino).encode())
            entries = pipe.hgetall(k.directory(ino))
        return await rec, dict(await entries)

    async def _data(self, ino: int) -> list[bytes | None]:
        """size, version, stored, mtime, gone of file ino's data record."""
        fields = [b"size", b"version", b"stored", b"mtime", b"gone"]
        key = self.keys.file(ino, "m")
        got = await self._do(f"stat of inode {ino}", lambda: self.client.hmget(key, fields))
        return list(got)

    async def getattr(self, ino: int) -> InodeStat:
        where = f"stat of inode {ino}"
        raw, _ = await self._do(where, lambda: self._meta(ino))
        if raw is None:
            raise Stale(f"{where}: inode {ino} no longer exists; open the file again by its name")
        node = _unpack(ino, raw, None)
        size, version, stored, mtime_ns = node.size, node.version, 0, node.mtime_ns
        ctime_ns = node.ctime_ns
        if node.data is not None:
            d_size, d_version, d_stored, d_mtime, _ = await self._data(ino)
            version = int(d_version or 0)
            if d_size is not None:
                size, stored = int(d_size), int(d_stored or 0)
                self._sizes[ino] = size
                dm = int(d_mtime or 0)
                if dm > node.ctime_ns:  # a commit after the last change of attributes
                    mtime_ns = ctime_ns = dm
        return InodeStat(
            ino,
            node.mode,
            node.uid,
            node.gid,
            node.atime_ns,
            mtime_ns,
            ctime_ns,
            node.nlink,
            size,
            version,
            node.rdev,
            stored,
            node.target,
        )

    async def lookup(self, parent: int, name: str) -> InodeStat:
        where = f"lookup of {name!r} in directory {parent}"
        if name in (".", ".."):
            if name == ".":
                return await self.getattr(parent)
            raw, _ = await self._do(where, lambda: self._meta(parent))
            if raw is None:
                raise Stale(f"{where}: directory {parent} no longer exists")
            return await self.getattr(_unpack(parent, raw, None).parent)
        check_entry_name(name)
        raw, entries = await self._do(where, lambda: self._meta(parent))
        if raw is None:
            raise Stale(f"{where}: directory {parent} no longer exists")
        if not stat.S_ISDIR(msgpack.unpackb(raw)[0]):
            raise error_for_code("not_dir")(f"{where}: inode {parent} is not a directory")
        ino = entries.get(name.encode("utf-8", "surrogateescape"))
        if ino is None:
            raise error_for_code("not_found")(f"{name!r} does not exist in directory {parent}")
        return await self.getattr(int(ino))

    async def readdir(self, ino: int) -> list[tuple[str, int, int]]:
        where = f"listing directory {ino}"
        raw, entries = await self._do(where, lambda: self._meta(ino))
        if raw is None:
            raise Stale(f"{where}: directory {ino} no longer exists")
        names = sorted(entries.items())
        async with self.client.pipeline(transaction=False) as pipe:
            recs = [pipe.hget(self.keys.inodes, child) for _, child in names]
        out = []
        for (name, child), rec in zip(names, recs, strict=True):
            got = await rec
            if got is not None:
                out.append((_name(name), int(child), int(msgpack.unpackb(got)[0])))
        return out

    async def read_inode(self, ino: int, first: int, count: int) -> PageRead:
        where = f"read of pages {first}..{first + count - 1} of inode {ino}"
        if count > MAX_MESSAGE_PAGES:
            raise TooLarge(f"{where}: at most {MAX_MESSAGE_PAGES} per request")
        keys, args = [self.keys.file(ino, "m")], []
        for c, lo, hi in _chunk_spans(first, count):
            keys.append(self.keys.chunk(ino, c))
            args += [lo * PAGE_SIZE, hi * PAGE_SIZE - 1]
        got = await self._read_now(keys, args)
        if got is None:
            got = await self._call(where, "nm_read", keys, args)
        size, version, gone = int(got[0]), int(got[1]), int(got[2])
        if gone:
            raise Stale(f"{where}: the file was removed; open it again by its name")
        if size < 0:  # no data record: a file made with a size and never written
            st = await self.getattr(ino)
            size = st.size
        if first + count > pages_for(size):
            raise OutOfRange(
                f"{where} goes past its end ({pages_for(size)} pages, {size} bytes); read less"
            )
        self._sizes[ino] = size
        runs = []
        for (c, lo, _), data in zip(_chunk_spans(first, count), got[3:], strict=True):
            if data:
                runs.append(PageRun("", c * CHUNK_PAGES + lo, data))
        return PageRead("", first, count, version, tuple(_merge(runs)))

    async def server_stat(self) -> ServerStat:
        where = "stat of the Redis store"
        used = cap = 0
        for host, port in await self._primaries():
            async with self._direct(host, port) as direct:
                info = await self._do(where, lambda: direct.info("memory"))
            used += int(info.get("used_memory", 0))
            cap += int(info.get("maxmemory", 0))
        files = await self._do(where, lambda: self.client.hlen(self.keys.inodes))
        return ServerStat(cap, used, int(files))

    # --- commits -----------------------------------------------------------------------

    async def commit(
        self,
        writes: Sequence[PageRun],
        *,
        resizes: Sequence[tuple[str, int]] = (),
        txn: bytes | None = None,
    ) -> CommitResult:
        raise Unsupported(
            "a commit to a segment by name (a journal from before inodes) cannot go to a "
            "Redis store; commit it to the netmemfs-server it was made for first"
        )

    async def change(self, ops: Sequence[InodeOp], *, txn: bytes | None = None) -> ChangeResult:
        txn = txn or self.new_txn()
        data = (WritePages, Truncate, Expect, Fence)
        if ops and all(isinstance(op, data) for op in ops):
            inos = {op.ino for op in ops if isinstance(op, data)}
            if len(inos) == 1:
                return await self._commit_file(inos.pop(), ops, txn)
        if any(isinstance(op, data) for op in ops):
            raise Unsupported(
                "a Redis store commits one file's pages, or names, per transaction, not "
                f"both or several files at once ({len(ops)} ops)"
            )
        return await self._change_names(ops, txn)

    async def _commit_file(self, ino: int, ops: Sequence[InodeOp], txn: bytes) -> ChangeResult:
        where = f"commit to inode {ino}"
        # A fence names our lock (LockGrant.token); Redis knows it by its own token.
        fences = " ".join(
            str(self._locks.get(op.token, (ino, 0))[1]) for op in ops if isinstance(op, Fence)
        )
        expect = [op.version for op in ops if isinstance(op, Expect)]
        init = ""
        # The size up to which a shrink must name chunk keys; with no shrink, any.
        shrinks = any(isinstance(op, Truncate) for op in ops)
        declared = self._sizes.get(ino, 0) if shrinks else 1 << 53
        pages = sum(len(op.data) for op in ops if isinstance(op, WritePages)) // PAGE_SIZE
        staged: dict[int, bytes] | None = None  # chunk -> its staged copy's key
        base = 0  # the version the copies were staged at
        for _ in range(8):
            if pages > INLINE_PAGES and staged is None:
                base = int((await self._data(ino))[1] or 0)
                staged = await self._stage(ino, ops, txn, base, where)
            keys, args = self._commit_call(ino, ops, declared, staged, base)
            head = [txn, init, str(expect[-1]) if expect else "", REMEMBER_TXNS, declared]
            head += [self.keys.file(ino, "n"), fences, self._claim]
            try:
                got = await self._call(where, "nm_commit", keys, [*head, *args])
            except _Retry as e:
                if e.what == "resize":
                    declared = int(e.detail)  # it grew meanwhile: name more chunks
                elif e.what == "restage":
                    staged = None  # another commit came in between, or a copy expired
                else:
                    st = await self.getattr(ino)  # never written: its size is in its record
                    init = str(st.size)
                    declared = max(declared, st.size)
                continue
            version, size, replayed = (int(x) for x in got)
            self._sizes[ino] = size
            if staged:
                await self._free_set_aside(ino, staged, where)
            return ChangeResult(txn, {ino: version}, (), bool(replayed))
        raise error_for_code("busy")(
            f"{where}: the file kept changing while the commit was staged; try again"
        )

    async def _free_set_aside(self, ino: int, staged: dict[int, bytes], where: str) -> None:
        """Delete the chunks a staged commit replaced (nm_commit set them aside), a
        pipeline of UNLINKs: each frees one chunk, so no call holds the node long."""
        node = await self._slots.node_of(self.keys.file(ino, "m"))
        limit = trio.Semaphore(STAGE_CALLS)

        async def one(copy: bytes) -> None:
            async with limit:
                old = copy.replace(b"}:s:", b"}:g:", 1)
                try:
                    await self._lanes.call(node, [b"UNLINK", old])
                except (OSError, trio.BrokenResourceError, _LaneLost) as e:
                    log.info("%s: an old chunk was not deleted (%s); it expires in 60 s", where, e)

        async with open_quiet_nursery() as nursery:
            for copy in staged.values():
                nursery.start_soon(one, copy)

    async def _stage(
        self, ino: int, ops: Sequence[InodeOp], txn: bytes, base: int, where: str
    ) -> dict[int, bytes]:
        """Stage the writes of ops into copies of their chunks (nm_stage), STAGE_CALLS
        calls in flight; the keys of the copies, by chunk."""
        parts: dict[int, list[object]] = {}
        for op in ops:
            if isinstance(op, WritePages):
                view = memoryview(op.data)
                for c, lo, hi in _chunk_spans(op.first, len(view) // PAGE_SIZE):
                    at = (c * CHUNK_PAGES + lo - op.first) * PAGE_SIZE
                    parts.setdefault(c, []).extend(
                        [lo, bytes(view[at : at + (hi - lo) * PAGE_SIZE])]
                    )
        cuts = [op.size for op in ops if isinstance(op, Truncate)]
        cut = min(cuts) if cuts else -1
        tag = txn.hex()
        staged = {c: self.keys.file(ino, f"s:{tag}:{c}") for c in parts}
        limit = trio.Semaphore(STAGE_CALLS)

        async def one(c: int) -> None:
            async with limit:
                keys = [self.keys.file(ino, "m"), self.keys.chunk(ino, c), staged[c]]
                await self._call(where, "nm_stage", keys, [STAGE_TTL_MS, base, c, cut, *parts[c]])

        async with open_quiet_nursery() as nursery:
            for c in parts:
                nursery.start_soon(one, c)
        return staged

    def _commit_call(
        self,
        ino: int,
        ops: Sequence[InodeOp],
        declared: int,
        staged: dict[int, bytes] | None = None,
        base: int = 0,
    ) -> tuple[list[bytes], list[object]]:
        """nm_commit's keys and ops: truncates, then the writes (inline), or, for a
        commit staged, each staged chunk's rename."""
        k = self.keys
        keys = [k.file(ino, "m"), k.file(ino, "t"), k.file(ino, "tq"), k.file(ino, "l")]
        index: dict[bytes, int] = {}

        def key(name: bytes) -> int:
            if name not in index:
                keys.append(name)
                index[name] = len(keys)  # Lua counts from 1
            return index[name]

        args: list[object] = []
        size = declared
        for op in ops:
            if isinstance(op, Truncate):
                first_key = 0
                if op.size < size:
                    keep = pages_for(op.size)
                    c0 = max(keep - 1, 0) // CHUNK_PAGES
                    last = (pages_for(size) - 1) // CHUNK_PAGES
                    # The Lua side walks these in order from the first: they must be
                    # consecutive KEYS, so fresh entries (not the index of earlier ones).
                    first_key = len(keys) + 1
                    keys.extend(k.chunk(ino, c) for c in range(c0, last + 1))
                size = op.size
                args += [b"T", op.size, first_key]
            elif isinstance(op, WritePages) and staged is None:
                view = memoryview(op.data)
                for c, lo, hi in _chunk_spans(op.first, len(view) // PAGE_SIZE):
                    p = c * CHUNK_PAGES + lo
                    part = view[(p - op.first) * PAGE_SIZE : (p - op.first + hi - lo) * PAGE_SIZE]
                    args += [b"W", key(k.chunk(ino, c)), p, bytes(part)]
        for c, copy in (staged or {}).items():
            old = copy.replace(b"}:s:", b"}:g:", 1)
            args += [b"S", key(k.chunk(ino, c)), key(copy), c, base, key(old)]
        return keys, args

    async def hold(self, client: bytes, inos: Collection[int]) -> float:
        lease_ms = int(HOLD_LEASE_S * 1000)
        listed = " ".join(str(i) for i in sorted(inos))
        where = f"hold of {len(inos)} open files"
        await self._call(where, "nm_hold", [self.keys.holds], [client.hex(), lease_ms, listed])
        await self._reap_orphans()
        return HOLD_LEASE_S

    async def _held(self) -> set[int]:
        got = await self._call("reading holds", "nm_hold", [self.keys.holds], ["", 0, ""])
        return {int(x) for x in got}

    async def _reap_orphans(self) -> None:
        """Free the orphans no client holds any more."""
        key = self.keys.orphans
        orphans = await self._do("reading orphans", lambda: self.client.smembers(key))
        if not orphans:
            return
        free = {int(x) for x in orphans} - await self._held()
        if free:
            await self._change_names([Reap(ino) for ino in sorted(free)], self.new_txn())

    # --- the namespace -------------------------------------------------------------------

    async def _change_names(self, ops: Sequence[Any], txn: bytes) -> ChangeResult:
        where = f"change of {len(ops)} ops ({', '.join(type(op).__name__ for op in ops[:4])})"
        k = self.keys
        t = time.time_ns()
        ops = [dataclasses.replace(op, time_ns=t) for op in ops]
        for _ in range(NS_TRIES):
            seq, prior, nxt = await self._do(where, lambda: self._ns_head(txn))
            if prior is not None:
                return _result(txn, prior, replayed=True)
            view = _View(seq or b"0", int(nxt or 2))
            orphaned = await self._until_loaded(view, functools.partial(view.check, ops))
            held = await self._held() if orphaned else set()
            final = cast(
                list[Any],
                await self._until_loaded(view, functools.partial(view.settle, ops, held)),
            )
            before = {ino: _pack(node) for ino, node in view.inodes.items()}
            entries_before = {
                ino: dict(node.entries)
                for ino, node in view.inodes.items()
                if node.entries is not None
            }
            view.apply(txn, final)
            outcome = view.outcome(txn)
            assert outcome is not None
            result = msgpack.packb([list(map(list, outcome.inodes)), list(outcome.created)])
            reaped = [op.ino for op in final if isinstance(op, Reap)]
            keys, args = self._ns_call(view, before, entries_before, reaped)
            head = [view.seq, txn, result, view.next_ino, REMEMBER_TXNS]
            got = await self._call(where, "nm_ns", keys, [*head, *args])
            if got[0] == b"retry":
                continue
            if got[0] == b"replayed":
                return _result(txn, got[1], replayed=True)
            reaped_files = [ino for ino in reaped if stat.S_ISREG(msgpack.unpackb(before[ino])[0])]
            for ino in reaped_files:
                await self._drop(ino, msgpack.unpackb(before[ino])[11])
            if reaped:
                gone = [str(i) for i in reaped]
                await self._do(where, functools.partial(self.client.srem, k.reaping, gone))
            return _result(txn, result, replayed=False)
        raise error_for_code("busy")(
            f"{where}: the namespace changed under it {NS_TRIES} times; try again"
        )

    async def _ns_head(self, txn: bytes) -> tuple[Any, Any, Any]:
        """The namespace's sequence number, txn's result if it was applied, next ino."""
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            seq = pipe.get(k.seq)
            prior = pipe.hget(k.txns, txn)
            nxt = pipe.get(k.next_ino)
        return await seq, await prior, await nxt

    async def _until_loaded(self, view: _View, fn: Callable[[], object]) -> Any:
        """fn() over view, reading each inode it asks for that view has not read."""
        while True:
            got, need = _run_view(view, fn)
            if need is None:
                return got
            where = f"reading inode {need}"
            raw, entries = await self._do(where, functools.partial(self._meta, need))
            view.load(need, raw, entries)

    def _ns_call(
        self,
        view: _View,
        before: dict[int, bytes],
        entries_before: dict[int, dict[str, int]],
        reaped: list[int],
    ) -> tuple[list[bytes], list[object]]:
        k = self.keys
        keys = [k.seq, k.inodes, k.txns, k.txn_list, k.next_ino, k.orphans, k.reaping]
        after = {ino: _pack(node) for ino, node in view.inodes.items()}
        sets = [(ino, rec) for ino, rec in after.items() if before.get(ino) != rec]
        dels = [ino for ino in before if ino not in after]
        args: list[object] = [len(sets)]
        for ino, rec in sets:
            args += [ino, rec]
        args += [len(dels), *dels]
        orphans = sorted(view.orphans)
        args += [len(orphans), *orphans, len(reaped), *reaped, len(reaped), *reaped]
        for ino, node in view.inodes.items():
            if node.entries is None:
                continue
            old = entries_before.get(ino, {})
            changes: list[object] = []
            for name, child in node.entries.items():
                if old.get(name) != child:
                    changes += [name.encode("utf-8", "surrogateescape"), child]
            for name in old:
                if name not in node.entries:
                    changes += [name.encode("utf-8", "surrogateescape"), b""]
            if changes:
                keys.append(k.directory(ino))
                args += [len(changes) // 2, *changes]
        for ino in dels:
            if ino in entries_before:
                keys.append(k.directory(ino))
                args.append(b"D")
        return keys, args

    async def _drop(self, ino: int, size0: int) -> None:
        """Free the pages of file ino (reaped: no name, nobody holds it)."""
        d = await self._data(ino)
        size = max(size0, int(d[0] or 0), self._sizes.pop(ino, 0))
        keys = [self.keys.file(ino, "m")]
        keys += [self.keys.chunk(ino, c) for c in range(pages_for(size) // CHUNK_PAGES + 1)]
        await self._call(f"freeing inode {ino}", "nm_drop", keys, [])

    async def _sweep_reaping(self) -> None:
        """Files a client reaped and died before freeing their pages: free them."""
        where = "freeing reaped files"
        key = self.keys.reaping
        left = await self._do(where, lambda: self.client.smembers(key))
        for raw in left:
            await self._drop(int(raw), 0)
            await self._do(where, functools.partial(self.client.srem, key, [raw]))

    # --- notices and locks ---------------------------------------------------------------

    async def subscribe(self, inos: Collection[int]) -> None:
        """Hear of other clients' commits to exactly inos from now on (on_notice);
        returns once Redis has confirmed each file's subscription."""
        self.wanted = frozenset(inos)
        await self._ears.settle(self._want())

    def listen(self, ino: int, fn: Callable[[Notice | None], None]) -> None:
        """Call fn with each notice of another client's commit to ino (None when some
        may have been missed), until unlisten; subscribes in the background."""
        self.listeners.setdefault(ino, []).append(fn)
        self._ears.poke()

    def unlisten(self, ino: int, fn: Callable[[Notice | None], None]) -> None:
        fns = self.listeners.get(ino, [])
        if fn in fns:
            fns.remove(fn)
        if not fns:
            self.listeners.pop(ino, None)
        self._ears.poke()

    def _want(self) -> frozenset[int]:
        return self.wanted | frozenset(self.listeners)

    def _notice(self, notice: Notice) -> None:
        if self.on_notice is not None and notice.ino in self.wanted:
            self.on_notice(notice)
        for fn in list(self.listeners.get(notice.ino, [])):
            fn(notice)

    def _missed(self, inos: Collection[int]) -> None:
        """Commits to inos may have gone unheard (a connection broke, a slot moved)."""
        if self.on_notice is not None and not self.wanted.isdisjoint(inos):
            self.on_notice(None)
        for ino in inos:
            for fn in list(self.listeners.get(ino, [])):
                fn(None)

    async def lock(
        self, ino: int, start: int, length: int, *, exclusive: bool, wait_s: float
    ) -> LockGrant:
        """A lock on bytes start..start+length-1 of ino (length 0: to any end), kept in
        the file's slot for LOCK_LEASE_S unless renew() is called in time; asked again
        (every few ms) until wait_s has passed, then WouldBlock. Unlike the server's,
        requests are not queued: a waiting writer may be passed by later readers."""
        kind = "an exclusive" if exclusive else "a shared"
        last = start + length - 1 if length else "end"
        what = f"{kind} lock on bytes {start}..{last} of inode {ino}"
        k = self.keys
        keys = [k.file(ino, "l"), k.file(ino, "lt"), k.file(ino, "m")]
        args = [self._owner, int(LOCK_LEASE_S * 1000), start, start + length if length else -1]
        args.append("x" if exclusive else "s")
        deadline = trio.current_time() + max(wait_s, 0.0)
        delay = LOCK_POLL_MIN_S
        while True:
            token, version = (int(x) for x in await self._call(what, "nm_lock", keys, args))
            if token:
                break
            left = deadline - trio.current_time()
            if left <= 0:
                raise WouldBlock(
                    f"{what} was not granted within {wait_s:g} s: another client holds a "
                    "conflicting lock; wait longer or try again"
                )
            await trio.sleep(min(delay, left))
            delay = min(delay * 2, LOCK_POLL_MAX_S)
        local = next(self._lock_ids)
        self._locks[local] = (ino, token)
        return LockGrant(local, LOCK_LEASE_S, version)

    async def unlock(self, token: int) -> None:
        held = self._locks.pop(token, None)
        what = f"unlock of lock {token}"
        if held is None:
            raise NotHeld(f"{what}: not held by this client (released already, or never granted)")
        ino, redis_token = held
        got = await self._call(
            what, "nm_unlock", [self.keys.file(ino, "l")], [self._owner, redis_token]
        )
        if not int(got):
            raise NotHeld(
                f"{what}: its lease ran out before it was released, and another client may "
                "have held it since"
            )

    async def renew(self) -> float:
        """Every lock this client holds lasts a lease from now; the lease in seconds."""
        by_ino: dict[int, list[int]] = {}
        for ino, redis_token in self._locks.values():
            by_ino.setdefault(ino, []).append(redis_token)
        lease_ms = int(LOCK_LEASE_S * 1000)
        for ino, tokens in by_ino.items():
            lost = await self._call(
                f"renewal of locks on inode {ino}",
                "nm_renew",
                [self.keys.file(ino, "l")],
                [self._owner, lease_ms, *tokens],
            )
            if lost:
                # Kept in _locks: a commit fenced by one is refused (fenced) by Redis.
                log.warning(
                    "locks %s on inode %d ran out before they were renewed: commits made "
                    "under them will be refused",
                    [int(t) for t in lost],
                    ino,
                )
        return LOCK_LEASE_S

    async def open_handover(self, ino: int, *, again: bool = False) -> Handover:
        """A raw connection to the node serving ino's hash slot, authenticated, for a
        peer that reads the file's keys itself (libnetmem's direct reads, as
        _read_now does). again: the slot map is read anew first (the peer was told
        MOVED)."""
        if self._tls is not None:
            raise Unsupported(
                f"no connection to hand over: {self.address} is reached over TLS, which "
                "only this process speaks"
            )
        meta = self.keys.file(ino, "m")
        if again:
            self._slots.forget()
        node = await self._slots.node_of(meta)
        stream, _ = await _dial(self, node)
        tag = meta[: meta.index(b"}") + 1]
        return Handover(socket_of(stream).detach(), b"resp:" + tag)


class _Slots:
    """Which node serves a key: a cluster's slot map (CLUSTER SLOTS, read again after
    forget(): a break, MOVED), or the one Redis."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.map: list[tuple[int, int, tuple[str, int]]] | None = None

    def forget(self) -> None:
        self.map = None

    async def node_of(self, key: bytes) -> tuple[str, int]:
        store = self.store
        if not store.cluster:
            return store.address.seeds[0]
        if self.map is None:
            self.map = [
                (lo, hi, master)
                for ranges, master in await store._shards()
                for lo, hi in zip(ranges[::2], ranges[1::2], strict=True)
            ]
        slot = hash_slot(key)
        for lo, hi, node in self.map:
            if lo <= slot <= hi:
                return node
        raise ServerUnreachable(f"no node of {store.address} serves slot {slot}; is it whole?")


class _LaneLost(Exception):
    """A lane broke before its reply came."""


class _Waiter:
    """A batch of commands sent together, waiting for its `count` replies (one Event
    for the batch: each Event waited on costs a turn of trio's loop, even if set)."""

    __slots__ = ("count", "event", "left", "lost", "replies")

    def __init__(self, count: int) -> None:
        self.count = count
        # Set when its replies are all in, when the lane is lost, or to hand it the
        # turn to receive for everyone (then replaced by a new one).
        self.event = trio.Event()
        self.left = False  # its requester waits no more (done, or given up)
        self.replies: list[Any] = []
        self.lost: str | None = None

    @property
    def finished(self) -> bool:
        return self.lost is not None or len(self.replies) == self.count


class _Lane:
    """One raw connection to one node for the store's page reads and function calls:
    requests pipelined, replies matched in the order asked (as RESP answers them).
    There is no reader task: a requester waiting for its replies receives for
    everyone while nobody else does, and hands that turn on when its own are in, so a
    lone request costs no switch between tasks (as netmemfs-server's read lanes do)."""

    def __init__(
        self, node: tuple[str, int], stream: trio.abc.Stream, reader: hiredis.Reader
    ) -> None:
        self.node = node
        self.stream = stream
        self.reader = reader
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self.send_lock = trio.Lock()
        self.lost: str | None = None
        self.reading = False  # a requester is receiving now
        # On a plain connection, received into one kept buffer: a receive_some of
        # LANE_RECEIVE_BYTES allocates and frees that much each call (27 us more than
        # 64 KiB here, per page fetched).
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.view = memoryview(bytearray(LANE_RECEIVE_BYTES if self.sock else 0))

    def fail(self, why: str) -> None:
        self.lost = why
        while self.waiting:
            w = self.waiting.popleft()
            w.lost = why
            w.event.set()

    async def receive(self) -> None:
        """Wait for what comes next from the node, and give each whole reply in it to
        the batch it answers. Raises _LaneLost when the connection is of no more use."""
        try:
            if self.sock is not None:
                n = await receive_into_view(self.sock, self.view)
                # Any buffer will do (hiredis parses it with "s*"); its stub says bytes.
                self.reader.feed(self.view, 0, n)  # type: ignore[arg-type]
            else:
                data = await self.stream.receive_some(SMALL_RECEIVE_BYTES)
                n = len(data)
                self.reader.feed(bytes(data))
            if not n:
                raise _LaneLost("closed by Redis")
            while (reply := self.reader.gets()) is not False:
                if not self.waiting:
                    raise _LaneLost("Redis sent a reply nobody asked for")
                w = self.waiting[0]
                w.replies.append(reply)
                if len(w.replies) == w.count:
                    self.waiting.popleft()
                    w.event.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise _LaneLost(str(e) or type(e).__name__) from None
        except hiredis.ProtocolError as e:
            raise _LaneLost(f"Redis sent what is not RESP ({e})") from None

    def pass_turn(self) -> None:
        """Wake one requester still waiting, to receive in its turn."""
        for w in self.waiting:
            if not w.left and not w.event.is_set():
                w.event.set()
                return


class _Lanes:
    """The lean connections, one per node, opened when first needed (issue 16: the
    page path pays no client library per command; bench/redis_clients.py)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.lanes: dict[tuple[str, int], _Lane] = {}
        self.open_lock = trio.Lock()

    async def call(
        self,
        node: tuple[str, int],
        command: list[bytes],
        *,
        asking: bool = False,
        wait: list[bytes] | None = None,
    ) -> tuple[Any, Any]:
        """command's reply on node's lane; with wait, the WAIT sent right after it
        on the same connection, and its reply (else None)."""
        commands = [[b"ASKING"]] if asking else []
        commands.append(command)
        if wait is not None:
            commands.append(wait)
        replies = await self.call_many(node, commands)
        return replies[int(asking)], replies[-1] if wait is not None else None

    async def call_many(self, node: tuple[str, int], commands: list[list[bytes]]) -> list[Any]:
        """The replies to commands, sent together on node's lane, one after another."""
        lane = await self._lane(node)
        waiter = _Waiter(len(commands))
        data = b"".join(_resp(c) for c in commands)
        queued = False

        def queue() -> None:  # under the send lock: replies come in the order sent
            nonlocal queued
            if lane.lost is not None:
                raise _LaneLost(lane.lost)
            lane.waiting.append(waiter)
            queued = True

        try:
            await send_parts_locked(lane.send_lock, lane.stream, [data], queue)
        except BaseException as e:
            if queued:  # part of a request may be out: nothing after it can be trusted
                self._drop(lane, f"sending failed ({e!r})")
            raise
        try:
            while not waiter.finished:
                if not lane.reading:
                    lane.reading = True
                    try:
                        await lane.receive()
                    except _LaneLost as e:
                        self._drop(lane, str(e))
                    finally:
                        lane.reading = False
                    continue
                await waiter.event.wait()  # its replies, or the turn to receive
                if not waiter.finished:
                    waiter.event = trio.Event()
        finally:
            waiter.left = True
            if not lane.reading:
                # Our turn is over, or was handed to us as we were being cancelled:
                # someone still waiting takes it. (A batch given up on stays in line
                # and its replies are taken off the connection when they come.)
                lane.pass_turn()
        if waiter.lost is not None:
            raise _LaneLost(waiter.lost)
        return waiter.replies

    async def _lane(self, node: tuple[str, int]) -> _Lane:
        lane = self.lanes.get(node)
        if lane is not None and lane.lost is None:
            return lane
        async with self.open_lock:
            lane = self.lanes.get(node)
            if lane is not None and lane.lost is None:
                return lane
            stream, reader = await _dial(self.store, node)
            lane = _Lane(node, stream, reader)
            self.lanes[node] = lane
            return lane

    def _drop(self, lane: _Lane, why: str) -> None:
        if self.lanes.get(lane.node) is lane:
            del self.lanes[lane.node]
        if lane.lost is not None:
            return  # dropped already
        lane.fail(why)
        # Closed at once, below TLS if any (no close_notify for a broken lane): a
        # requester receiving on it gets ClosedResourceError.
        socket_of(lane.stream).close()

    def close(self) -> None:
        """Close every lane: the store is done with them (the caller may be cancelled,
        so nothing here waits)."""
        for lane in list(self.lanes.values()):
            self._drop(lane, "the store was closed")


async def _dial(store: RedisStore, node: tuple[str, int]) -> tuple[trio.abc.Stream, hiredis.Reader]:
    """A raw connection to node (TLS if the store's are), authenticated as the store
    is, and its RESP reader."""
    where = f"Redis {node[0]}:{node[1]}"
    with trio.move_on_after(DIAL_TIMEOUT_S):
        try:
            return await _dial_now(store, node, where)
        except OSError as e:
            raise ServerUnreachable(f"{where}: {e}; check that it runs") from None
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            cause = e.__cause__ if isinstance(e, trio.BrokenResourceError) else e
            raise ServerUnreachable(
                f"{where}: the TLS handshake failed ({cause or e}); check that it serves "
                "TLS (tls-port) and that --tls-ca holds the CA that signed its certificate"
            ) from None
    raise ServerUnreachable(
        f"{where} accepted the connection but did not finish its handshake within "
        f"{DIAL_TIMEOUT_S:.0f} s; check that it is a Redis, and TLS or not as the URL says"
    )


async def _connect(
    node: tuple[str, int], tls: ssl.SSLContext | None
) -> tuple[trio.SocketStream, trio.abc.Stream]:
    """A TCP connection to node and the stream to speak on: the same, or with tls its
    TLS stream, handshake done. On any failure the socket is closed."""
    sock_stream = await trio.open_tcp_stream(*node)
    try:
        tune_socket(sock_stream.socket)
        if tls is None:
            return sock_stream, sock_stream
        stream = trio.SSLStream(sock_stream, tls, server_hostname=node[0])
        await stream.do_handshake()
        return sock_stream, stream
    except BaseException:
        # Closed below the TLS layer: a broken handshake cannot close TLS in order.
        await _close_quietly(sock_stream)
        raise


async def _dial_now(
    store: RedisStore, node: tuple[str, int], where: str
) -> tuple[trio.abc.Stream, hiredis.Reader]:
    sock_stream, stream = await _connect(node, store._tls)
    try:
        reader = hiredis.Reader()
        if store._password is not None:
            auth = [b"AUTH", store._password.encode()]
            if store._username is not None:
                auth.insert(1, store._username.encode())
            await stream.send_all(_resp(auth))
            while (reply := reader.gets()) is False:
                data = await stream.receive_some(65536)
                if not data:
                    raise ServerUnreachable(f"{where} closed the connection")
                reader.feed(bytes(data))
            if isinstance(reply, hiredis.ReplyError):
                raise error_for_code("auth")(f"{where} refused our password: {reply}")
    except BaseException:
        await _close_quietly(sock_stream)
        raise
    return stream, reader


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()


def _resp(command: Sequence[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


def _arg(v: object) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    if isinstance(v, int | str):
        return str(v).encode()
    raise TypeError(f"{v!r} is not a Redis argument")


class _Ear:
    """One connection to one Redis node, subscribed (SSUBSCRIBE) to the notice channels
    of the files whose slots that node serves. RESP read with hiredis's Reader."""

    def __init__(
        self, node: tuple[str, int], stream: trio.abc.Stream, reader: hiredis.Reader
    ) -> None:
        self.node = node
        self.stream = stream
        self.reader = reader
        self.asked: set[int] = set()  # inodes subscribed to (sent)
        self.confirmed: set[int] = set()  # of those, confirmed by the node
        self.leaving: set[int] = set()  # unsubscribed by us, not yet confirmed

    async def send(self, *commands: tuple[bytes, ...]) -> None:
        await self.stream.send_all(b"".join(_resp(cmd) for cmd in commands))

    async def receive(self) -> Any:
        while (reply := self.reader.gets()) is False:
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError(f"Redis {self.node} closed the connection")
            self.reader.feed(bytes(data))
        return reply


class _Ears:
    """The connections that hear notices, kept matching the files wanted: opened per
    node as needed, resubscribed after a break (and the files' listeners told None once
    the new subscription is confirmed, as commits may have gone unheard)."""

    RETRY_S = 0.2

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.ears: dict[tuple[str, int], _Ear] = {}
        self.unsure: set[int] = set()  # to be told None once subscribed again
        self.changed = trio.Event()  # poked: the wanted set or the ears changed
        self.progress = trio.Event()  # a subscription was confirmed or failed
        self.nursery: trio.Nursery | None = None

    def poke(self) -> None:
        self.changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            while True:
                self.changed = trio.Event()
                try:
                    await self._match(self.store._want())
                except (NetmemError, OSError, trio.BrokenResourceError) as e:
                    log.info("notices: %s; trying again", e)
                    self._wake()
                    await trio.sleep(self.RETRY_S)
                    continue
                await self.changed.wait()

    def _wake(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    async def settle(self, want: frozenset[int]) -> None:
        """Wait until every file of want is heard (or raise after retry_for_s)."""
        self.poke()
        with trio.move_on_after(self.store.retry_for_s):
            while not want <= self._confirmed():
                await self.progress.wait()
            return
        raise ServerUnreachable(
            f"subscription to notices of {len(want)} files at Redis {self.store.address} "
            f"not confirmed within {self.store.retry_for_s:g} s"
        )

    def _confirmed(self) -> set[int]:
        return set().union(*(ear.confirmed for ear in self.ears.values()))

    async def _node_of(self, ino: int) -> tuple[str, int]:
        return await self.store._slots.node_of(self.store.keys.file(ino, "n"))

    async def _match(self, want: frozenset[int]) -> None:
        by_node: dict[tuple[str, int], set[int]] = {}
        for ino in want:
            by_node.setdefault(await self._node_of(ino), set()).add(ino)
        for node, ear in list(self.ears.items()):
            drop = ear.asked - by_node.get(node, set())
            if drop:
                ear.asked -= drop
                ear.confirmed -= drop
                ear.leaving |= drop
                await ear.send(*((b"SUNSUBSCRIBE", self._chan(i)) for i in drop))
        for node, inos in by_node.items():
            ear = self.ears.get(node) or await self._open(node)
            add = inos - ear.asked
            if add:
                ear.asked |= add
                ear.leaving -= add
                await ear.send(*((b"SSUBSCRIBE", self._chan(i)) for i in add))

    def _chan(self, ino: int) -> bytes:
        return self.store.keys.file(ino, "n")

    async def _open(self, node: tuple[str, int]) -> _Ear:
        stream, reader = await _dial(self.store, node)
        ear = _Ear(node, stream, reader)
        self.ears[node] = ear
        assert self.nursery is not None
        self.nursery.start_soon(self._hear, ear)
        return ear

    async def _hear(self, ear: _Ear) -> None:
        try:
            while True:
                msg = await ear.receive()
                if not isinstance(msg, list) or len(msg) < 3:
                    continue
                kind, chan = msg[0], msg[1]
                ino = self._ino_of(chan)
                if ino is None:
                    continue
                if kind == b"smessage":
                    notice = _decode_notice(ino, msg[2], self.store._client_id)
                    if notice is not None:
                        self.store._notice(notice)
                elif kind == b"ssubscribe":
                    if ino in ear.asked:
                        ear.confirmed.add(ino)
                        if ino in self.unsure:
                            self.unsure.discard(ino)
                            self.store._missed([ino])
                    self._wake()
                elif kind == b"sunsubscribe":
                    if ino in ear.leaving:
                        ear.leaving.discard(ino)
                    elif ino in ear.asked:
                        # Not asked for: the slot moved to another node. Subscribe there.
                        ear.asked.discard(ino)
                        ear.confirmed.discard(ino)
                        self.unsure.add(ino)
                        self.store._slots.forget()
                        self.poke()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.info("notices from Redis %s:%d stopped (%s); subscribing again", *ear.node, e)
        finally:
            if self.ears.get(ear.node) is ear:
                del self.ears[ear.node]
            self.unsure |= ear.asked
            self.store._slots.forget()
            with trio.CancelScope(shield=True):
                await ear.stream.aclose()
            self._wake()
            self.poke()

    def _ino_of(self, chan: bytes) -> int | None:
        prefix = f"{{{self.store.keys.prefix}:".encode()
        if not chan.startswith(prefix) or not chan.endswith(b"}:n"):
            return None
        digits = chan[len(prefix) : -3]
        return int(digits) if digits.isdigit() else None


def _decode_notice(ino: int, raw: bytes, own: bytes) -> Notice | None:
    """A commit's notice (None: the client's own commit, or not a notice)."""
    try:
        version, runs, whole, origin = msgpack.unpackb(raw, raw=True)
        if origin == own:
            return None
        pages = tuple((int(first), int(count)) for first, count in runs)
        return Notice(0, int(ino), int(version), pages, bool(whole))
    except (ValueError, TypeError, msgpack.UnpackException):
        log.warning("notices: a message on the channel of inode %d is not a notice", ino)
        return None


def _result(txn: bytes, raw: bytes, *, replayed: bool) -> ChangeResult:
    inodes, created = msgpack.unpackb(raw)
    return ChangeResult(txn, {i: v for i, v in inodes}, tuple(created), replayed)


def _pairs(flat: list[Any]) -> dict[bytes, Any]:
    """A RESP2 map (a flat list: key, value, key, value...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _chunk_spans(first: int, count: int) -> Iterator[tuple[int, int, int]]:
    """(chunk, first page in it, end page in it) covering pages first..first+count-1."""
    p, end = first, first + count
    while p < end:
        c = p // CHUNK_PAGES
        hi = min(end, (c + 1) * CHUNK_PAGES)
        yield c, p - c * CHUNK_PAGES, hi - c * CHUNK_PAGES
        p = hi


def _merge(runs: list[PageRun]) -> Iterator[PageRun]:
    """Runs that touch, as one (a read across chunks comes back one per chunk)."""
    start: PageRun | None = None
    parts: list[bytes] = []
    for run in runs:
        if start is not None and start.first + sum(map(len, parts)) // PAGE_SIZE == run.first:
            parts.append(bytes(run.data))
            continue
        if start is not None:
            yield PageRun("", start.first, b"".join(parts))
        start, parts = run, [bytes(run.data)]
    if start is not None:
        yield PageRun("", start.first, parts[0] if len(parts) == 1 else b"".join(parts))


async def _is_cluster(
    address: RedisAddress,
    username: str | None,
    password: str | None,
    retry_for_s: float,
    tls: ssl.SSLContext | None,
) -> bool:
    """Whether the first seed that answers is a Redis Cluster node."""
    deadline = trio.current_time() + retry_for_s
    last: BaseException | None = None
    while True:
        for host, port in address.seeds:
            probe: coredis.Redis[bytes] = coredis.Redis(
                host=host,
                port=port,
                username=username,
                password=password,
                ssl=tls is not None,
                ssl_context=tls,
                connect_timeout=max(0.1, deadline - trio.current_time()),
            )
            try:
                with lone_errors():
                    async with probe:
                        info = await probe.info("cluster")
                return str(info.get("cluster_enabled", 0)) == "1"
            except coredis.exceptions.AuthenticationError as e:
                raise error_for_code("auth")(
                    f"Redis at {host}:{port} refused our credentials ({e}); check the password file"
                ) from None
            except (coredis.exceptions.ConnectionError, OSError) as e:
                last = e
        if trio.current_time() >= deadline:
            host, port = address.seeds[0]
            why = await _diagnose(host, port, tls) or last
            if isinstance(why, ssl.SSLCertVerificationError):
                hint = "check that --tls-ca holds the CA that signed its certificate"
            elif tls is None:
                hint = (
                    "check that it runs and that --server names it (a Redis that "
                    "serves TLS only needs rediss://)"
                )
            else:
                hint = "check that it runs, serves TLS (tls-port), and that --server names it"
            raise ServerUnreachable(f"no Redis answers at {address} ({why}); {hint}")
        await trio.sleep(0.1)


async def _diagnose(host: str, port: int, tls: ssl.SSLContext | None) -> BaseException | None:
    """Why a connection to host:port fails, found by making one (and its TLS handshake)
    ourselves: coredis says only that it could not connect. None: it works."""
    try:
        with trio.fail_after(DIAL_TIMEOUT_S):
            sock_stream, _ = await _connect((host, port), tls)
            await _close_quietly(sock_stream)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
        return _root_cause(e)
    return None


def _root_cause(e: BaseException | None) -> BaseException | None:
    """The first error in e's chain (its causes and contexts) that says more than a
    client library's "unable to connect": a TLS or socket error, else e."""
    seen = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or (isinstance(seen, OSError) and seen.errno):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def _parse_credentials(raw: bytes) -> tuple[str | None, str]:
    """A password file's contents: one line, PASSWORD or USER PASSWORD."""
    words = raw.decode("utf-8", "replace").split()
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2:
        return words[0], words[1]
    raise error_for_code("auth")(
        "a Redis password file holds one line: PASSWORD, or USER PASSWORD (a Redis ACL user)"
    )
