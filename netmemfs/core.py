"""The door core: one regular file as every door serves it.

Where it sits: below the three doors (fs.py for files in the mount, agent.py for
anonymous regions, kdoor.py for /dev/netmem areas), above journal.py and remote.py; it
imports neither pyfuse3 nor cffi. A door turns its kernel interface's requests into
calls on a FileCore and its errors into errnos; the rules live here, once:

- resolve(): a path to the inode of a regular file, made with its size if absent
  (regions and areas name their file by path at map time, and keep its number);
- FileCore.read(): the pages the file shows: its journal's (written here, not yet
  committed) over the cache's over the server's, asked for by inode number;
- FileCore.commit(): what the journal holds, sealed and sent as one transaction to
  the inode (a Change: sizes, then pages), exactly once; a commit that failed with
  its outcome unknown is sent again, under the same id, before anything newer.

A commit to an inode that is gone (the file was removed or replaced and nobody holds
it) is refused by the server whole, so it never lands in another file: the changes are
dropped and Stale names the path (docs/semantics.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from netmemfs.cache import PageCache
from netmemfs.errors import (
    Conflict,
    Fenced,
    InvalidName,
    NetmemError,
    NotADirectory,
    OutOfRange,
    ProtocolError,
    SegmentExists,
    SegmentNotFound,
    ServerUnreachable,
    Stale,
)
from netmemfs.journal import HoldBudget, SealedCommit, SegmentJournal
from netmemfs.metrics import Latency
from netmemfs.ops import Expect, Fence, InodeOp, MakeNode
from netmemfs.pages import PAGE_SIZE, Buffer, consecutive, pages_for
from netmemfs.protocol import MAX_MESSAGE_PAGES
from netmemfs.store import ChangeResult, InodeStat, Store

log = logging.getLogger("netmemfs.core")

ROOT_INO = 1
MAX_PATH_BYTES = 4095  # PATH_MAX less its NUL


async def resolve(
    store: Store,
    path: str,
    size: int,
    *,
    uid: int = 0,
    gid: int = 0,
    create: bool = True,
) -> InodeStat:
    """The regular file at path (names separated by '/', from the root directory): if
    it is not there and create, made, size bytes of holes, owned by uid and gid, mode
    0644 (the directories on the way must be there); if it is there, it must have that
    size."""
    names = [n for n in path.split("/") if n]
    if not names or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InvalidName(f"{path!r} names no file: give a path of 1 to {MAX_PATH_BYTES} bytes")
    parent = ROOT_INO
    for i, name in enumerate(names[:-1]):
        st = await store.lookup(parent, name)
        if not stat.S_ISDIR(st.mode):
            raise NotADirectory(f"{'/'.join(names[: i + 1])!r} in {path!r} is not a directory")
        parent = st.ino
    try:
        st = await store.lookup(parent, names[-1])
    except SegmentNotFound:
        if not create:
            raise
        make = MakeNode(parent, names[-1], stat.S_IFREG | 0o644, uid, gid, size=size)
        try:
            (ino,) = (await store.change([make])).created
            return await store.getattr(ino)
        except SegmentExists:
            st = await store.lookup(parent, names[-1])  # made by someone else meanwhile
    if not stat.S_ISREG(st.mode):
        raise OutOfRange(f"{path!r} is not a regular file; map a file")
    if st.size != size:
        raise OutOfRange(
            f"segment {path!r} has {st.size} bytes on the server, not {size}: map it with "
            "its size, or use another name"
        )
    return st


class DoorCounters:
    """What a door's files have done since start (one object, shared by all the
    door's FileCores): pages read by where they came from, fetches from the store and
    commits with their times. Plain counts, kept on the door's trio thread."""

    def __init__(self) -> None:
        self.journal_pages = 0  # read from this door's own uncommitted changes
        self.cache_pages = 0  # from its cache of pages read before
        self.store_pages = 0  # from the store
        self.fetch_latency = Latency()  # per read that needed the store
        self.commits = 0
        self.committed_pages = 0
        self.commit_failures = 0  # not applied: sent again later, or refused for good
        self.commit_latency = Latency()  # sealing and sending, per transaction


@dataclasses.dataclass(frozen=True)
class FileStatus:
    """One file as a door sees it now (`netmemfs status`)."""

    path: str
    ino: int
    opens: int  # handles open on it through the door (0 where the door has none)
    dirty_pages: int  # written, not yet committed (journal.dirty())
    journal_bytes: int
    last_commit_at: float | None  # time.time() of the last commit applied
    last_commit_s: float | None  # how long it took
    committing_since: float | None  # time.time() a commit being sent now began
    committing_pages: int  # its pages (0: none under way)

    @classmethod
    def of(cls, core: FileCore, opens: int = 0) -> FileStatus:
        pages, nbytes = core.journal.dirty()
        at, took = core.last_commit if core.last_commit is not None else (None, None)
        since, sending = core.committing if core.committing is not None else (None, 0)
        return cls(core.path, core.ino, opens, pages, nbytes, at, took, since, sending)


class FileCore:
    """A regular file's pages and commits, by inode number. version: the server's, as
    the door last saw it (pages cached under an older one are not used); cache: pages
    read from the server (None: none kept); timeout_s: how long one commit's sending may
    take before trio.TooSlowError (its outcome is then unknown: it stays sealed, to be
    sent again first)."""

    def __init__(
        self,
        store: Store,
        ino: int,
        path: str,
        journal: SegmentJournal,
        *,
        version: int = 0,
        cache: PageCache | None = None,
        timeout_s: float = math.inf,
        counters: DoorCounters | None = None,
    ) -> None:
        self.store = store
        self.counters = counters or DoorCounters()
        # The last commit that was applied: when it was (time.time()) and how long it
        # took, in seconds.
        self.last_commit: tuple[float, float] | None = None
        # The commit being sent now: since when (time.time()) and its pages.
        self.committing: tuple[float, int] | None = None
        self.ino = ino
        self.path = path
        self.journal = journal
        self.version = version
        self.cache = cache
        self.timeout_s = timeout_s
        self.commit_lock = trio.Lock()
        # The server refused a commit as stale: the inode is gone, and so are the
        # changes; every later change is refused too.
        self.gone = False
        # Tokens of the locks on this file held through this door: every commit names
        # them (Fence), so one made after such a lock was lost is refused, not applied.
        self.fences: set[int] = set()
        # An optimistic commit: the next commit applies only if the file is still at
        # this version (Expect), else it is refused (Conflict) and its changes dropped.
        self.expect: int | None = None

    @classmethod
    def of(
        cls,
        store: Store,
        st: InodeStat,
        path: str,
        journal_dir: Path,
        *,
        hold: HoldBudget | None = None,
        cache: PageCache | None = None,
        timeout_s: float = math.inf,
        recoverable: bool = True,
        counters: DoorCounters | None = None,
    ) -> FileCore:
        """The file st describes (as the server said it is now), with a new journal in
        journal_dir (hold: memory for pages that directory cannot take; recoverable:
        False if no recover() will read it, as SegmentJournal says)."""
        journal = SegmentJournal(journal_dir, st.size, hold, recoverable=recoverable)
        return cls(
            store,
            st.ino,
            path,
            journal,
            version=st.version,
            cache=cache,
            timeout_s=timeout_s,
            counters=counters,
        )

    async def read(self, first: int, count: int) -> list[Buffer | None]:
        """Pages first..first+count-1 as the file shows them; None for a hole."""
        pages, fetch = self.local(first, count)
        if fetch:
            await self.fetch(pages, first, fetch)
        return pages

    def local(self, first: int, count: int) -> tuple[list[Buffer | None], list[int]]:
        """Pages first..first+count-1 as far as this door knows them without the
        server (None for a hole, and for the pages it does not know), and the numbers
        of the pages only the server has: fetch() fills those in."""
        journal = self.journal
        pages: list[Buffer | None] = [journal.read_page(first + i) for i in range(count)]
        # Only pages the server has for this file can be asked for: past its size, or
        # past a shrink not committed yet, they are holes.
        server_pages = pages_for(journal.low_water())
        fetch = []
        mine = cached_n = 0
        for i, page in enumerate(pages):
            if page is not None:
                mine += 1
                continue
            p = first + i
            if p >= server_pages:
                continue
            cached = self.cache.get(self.ino, p) if self.cache is not None else None
            if cached is None:
                fetch.append(p)
            else:
                pages[i] = cached
                cached_n += 1
        counters = self.counters
        counters.journal_pages += mine
        counters.cache_pages += cached_n
        counters.store_pages += len(fetch)
        return pages, fetch

    async def fetch(self, pages: list[Buffer | None], first: int, fetch: list[int]) -> None:
        """Fill in pages (first..., as local() gave them) from the server's pages
        `fetch`; a page written meanwhile is taken from the journal instead."""
        journal = self.journal
        started = time.perf_counter()
        for p, n in consecutive(fetch):
            for q in range(p, p + n, MAX_MESSAGE_PAGES):
                got = await self.store.read_inode(self.ino, q, min(MAX_MESSAGE_PAGES, p + n - q))
                for run in got.runs:
                    view = memoryview(run.data)
                    for k in range(run.count):
                        pages[run.first - first + k] = view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
                    if self.cache is not None and got.version == self.version:
                        self.cache.put(self.ino, run.first, run.data)  # else: it changed
        self.counters.fetch_latency.observe(time.perf_counter() - started)
        # A page written while we waited for the server: the journal's is newer.
        for p in fetch:
            newer = journal.read_page(p)
            if newer is not None:
                pages[p - first] = newer

    def seal(self) -> None:
        """What the journal holds now is what the next commit() sends (later writes go
        to the one after); nothing if a commit is already sealed or nothing changed."""
        if self.journal.sealed is None and self.journal.has_changes():
            self.journal.seal_start()

    async def commit(self) -> None:
        """Commit every change made so far: a commit sealed earlier (sent again under its
        own id if it failed with its outcome unknown), then the rest, each one
        transaction. Stale if the inode is gone (the changes are then dropped)."""
        if self.gone:
            raise self._stale()
        async with self.commit_lock:
            await self._send_sealed()
            self.seal()
            await self._send_sealed()

    async def _send_sealed(self) -> None:
        journal = self.journal
        if journal.sealed is None:
            return
        t0 = time.perf_counter()
        txn = self.store.new_txn()
        commit = await trio.to_thread.run_sync(journal.seal_finish, txn, self.path, self.ino)
        t1 = time.perf_counter()
        pages = sum(r.count for r in commit.runs)
        self.committing = (time.time(), pages)
        try:
            # Not around seal_finish: a worker thread cannot be called back, and a
            # second one must not seal the same file meanwhile.
            with trio.fail_after(self.timeout_s):
                result = await journal.send_sealed(self.send)
        except (ServerUnreachable, ProtocolError, trio.TooSlowError):
            self.counters.commit_failures += 1
            raise  # its outcome unknown: sent again as it was (expectation and all)
        except Stale:
            self.counters.commit_failures += 1
            self.gone = True
            self.expect = None
            journal.discard()
            log.error("%s", self._stale())
            raise self._stale() from None
        except (Fenced, Conflict) as e:
            self.counters.commit_failures += 1
            # Made under a lock that another client may hold now, or an optimistic
            # commit that lost its race: its pages are dropped (send_sealed did), not
            # sent again, and cached pages may be old.
            self.expect = None
            if self.cache is not None:
                self.cache.drop(self.ino)
            if isinstance(e, Fenced):
                log.error("commit to %r dropped: %s", self.path, e)
            else:
                log.info("optimistic commit to %r refused: %s", self.path, e)
            raise
        except NetmemError:
            self.counters.commit_failures += 1
            self.expect = None
            raise
        finally:
            self.committing = None
        took = time.perf_counter() - t0
        counters = self.counters
        counters.commits += 1
        counters.committed_pages += pages
        counters.commit_latency.observe(took)
        self.last_commit = (time.time(), took)
        self.expect = None
        before = self.version
        self.version = result.inodes.get(self.ino, self.version)
        if self.cache is not None:
            if self.version == before + 1:
                # Only this commit changed the file since the cached pages were read (a
                # version grows by one per commit): the pages it did not write, below
                # any size it cut, are still the server's.
                sizes = [size for _, size in commit.resizes]
                cut = pages_for(min(sizes)) if sizes else None
                self.cache.forget(self.ino, ((r.first, r.count) for r in commit.runs), cut)
            else:
                self.cache.drop(self.ino)  # another client's commit came between
        log.debug(
            "committed %d pages of %r: sealed in %.1f ms, sent in %.1f ms",
            pages,
            self.path,
            (t1 - t0) * 1000,
            (time.perf_counter() - t1) * 1000,
        )

    async def send(self, commit: SealedCommit) -> ChangeResult:
        return await send(self.store, commit, sorted(self.fences), self.expect)

    def _stale(self) -> Stale:
        return Stale(
            f"commit to {self.path!r} failed: the file (inode {self.ino}) no longer exists "
            "on the server (removed or replaced since it was opened or mapped, and nobody "
            "holds it); its changes are dropped"
        )


async def send(
    store: Store,
    commit: SealedCommit,
    fences: Sequence[int] = (),
    expect: int | None = None,
) -> ChangeResult:
    """Send a sealed commit: to its inode, or, left by a daemon from before inodes,
    to its segment by name. fences: lock tokens it is made under (applied only while
    each lasts); expect: the version it is based on (applied only if still current)."""
    if commit.ino:
        checks: list[InodeOp] = [Fence(commit.ino, token) for token in fences]
        if expect is not None:
            checks.append(Expect(commit.ino, expect))
        return await store.change([*checks, *commit.inode_ops()], txn=commit.txn)
    r = await store.commit(commit.runs, resizes=commit.resizes, txn=commit.txn)
    return ChangeResult(r.txn, {}, (), r.replayed)
