"""What the doors need from a page store: one interface, whichever store serves it.

Where it sits: between the door core (core.py and the doors: fs.py, agent.py, kdoor.py)
and the stores. remote.py's RemoteStore (a netmemfs-server) is the one store today; a
Redis store is next (issue 16). A door is typed against Store, never against a store's
class, so a second store is one new class. The results stores give are here too, plain
values with no store's types in them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from netmemfs.ops import InodeOp
from netmemfs.protocol import Attrs, Notice, PageRun, holes_and_runs


@dataclass(frozen=True, slots=True)
class SegmentStat:
    name: str
    size: int
    version: int
    stored_pages: int


@dataclass(frozen=True, slots=True)
class ServerStat:
    capacity_bytes: int  # 0: the server has no --max-memory
    used_bytes: int
    segments: int


@dataclass(frozen=True, slots=True)
class PageRead:
    """Pages first..first+count-1 of a segment: runs of stored pages; the rest are holes."""

    segment: str
    first: int
    count: int
    version: int
    runs: tuple[PageRun, ...]

    def to_bytes(self) -> bytes:
        return holes_and_runs(self.first, self.count, self.runs)

    def stored(self) -> set[int]:
        return {r.first + i for r in self.runs for i in range(r.count)}


@dataclass(frozen=True, slots=True)
class CommitResult:
    txn: bytes
    versions: dict[str, int]
    replayed: bool


@dataclass(frozen=True, slots=True)
class InodeStat:
    """An inode as the server holds it (mode has its type; times in ns)."""

    ino: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    size: int
    version: int
    rdev: int
    stored_pages: int
    target: bytes

    @classmethod
    def of(cls, r: Attrs) -> InodeStat:
        return cls(*(getattr(r, f) for f in cls.__slots__))


@dataclass(frozen=True, slots=True)
class LockGrant:
    """A lock granted: its fencing token, its lease (renew within it), and the file's
    version when it was granted (after every commit made under the locks before)."""

    token: int
    lease_s: float
    version: int


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """inodes: the version each touched inode has now; created: MakeNode's numbers."""

    txn: bytes
    inodes: dict[int, int]
    created: tuple[int, ...]
    replayed: bool


@dataclass(frozen=True, slots=True)
class Handover:
    """A connection for a peer that reads a file's pages itself (libnetmem's direct
    reads): fd, which the peer owns from then on, and what it speaks there: b"" for
    the netmemfs protocol to a netmemfs-server, b"resp:" + the file's key tag for
    RESP to the Redis node serving the file (docs/protocol.md, "Redis store")."""

    fd: int
    speaks: bytes


class Store(Protocol):
    """A page store as the doors use it: files by inode number, their pages, atomic
    exactly-once commits, notices of other clients' commits, and locks."""

    # Called with each notice of a commit to an inode of subscribe() (and with None
    # when some may have been missed: after a reconnect).
    on_notice: Callable[[Notice | None], None] | None
    wanted: frozenset[int]  # what subscribe() asked for last
    reconnects: int  # connections to the store lost and made again, since start

    @property
    def connected(self) -> bool:
        """Whether the store answered last time it was asked (False: a connection
        broke and none is made again yet)."""
        ...

    def new_txn(self) -> bytes:
        """A transaction id no other client or call of ours uses."""
        ...

    async def lookup(self, parent: int, name: str) -> InodeStat: ...
    async def getattr(self, ino: int) -> InodeStat: ...
    async def readdir(self, ino: int) -> list[tuple[str, int, int]]: ...
    async def read_inode(self, ino: int, first: int, count: int) -> PageRead: ...

    async def change(self, ops: Sequence[InodeOp], *, txn: bytes | None = None) -> ChangeResult:
        """ops as one transaction, exactly once (txn: the id to send it under again)."""
        ...

    async def commit(
        self,
        writes: Sequence[PageRun],
        *,
        resizes: Sequence[tuple[str, int]] = (),
        txn: bytes | None = None,
    ) -> CommitResult:
        """A segment's (by name: journals from before inodes) resizes and writes."""
        ...

    async def hold(self, client: bytes, inos: Collection[int]) -> float:
        """client holds exactly inos open; the lease in seconds."""
        ...

    async def subscribe(self, inos: Collection[int]) -> None: ...
    def listen(self, ino: int, fn: Callable[[Notice | None], None]) -> None: ...
    def unlisten(self, ino: int, fn: Callable[[Notice | None], None]) -> None: ...

    async def lock(
        self, ino: int, start: int, length: int, *, exclusive: bool, wait_s: float
    ) -> LockGrant: ...
    async def unlock(self, token: int) -> None: ...
    async def renew(self) -> float: ...

    async def server_stat(self) -> ServerStat: ...

    async def open_handover(self, ino: int, *, again: bool = False) -> Handover:
        """A connection of its own for a peer that reads inode ino's pages itself
        (libnetmem's direct reads). again: the last one was closed or sent elsewhere
        (a Redis slot that moved): find where the file is served now."""
        ...
