"""The FUSE door: files in a mount whose pages live on the page server.

Where it sits: at the top, beside the other doors; the only module that imports
pyfuse3. It turns FUSE requests into calls on the journal (journal.py) and the server
(remote.py), and NetmemErrors into errnos in one place (fuse_errors).

Every file, directory and symlink is an inode of the server, known here by the
server's inode number (never reused, the same in every mount); names are used only to
look up and to change directories, each change one transaction on the server. Reads of
a regular file are served from its journal (pages written here and not yet committed),
else from the server. Writes, including the kernel's writeback of mmap'ed pages, go to
the journal only. fsync commits the file's journal to its inode as one transaction, so
a file renamed meanwhile gets its pages, and a file removed meanwhile gets none (ESTALE),
never another file that took its name. The kernel checks permissions
(default_permissions) against the modes and owners the server stores.
docs/semantics.md states what each operation promises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from netmemfs._trio_util import open_quiet_nursery
from netmemfs.agent import AttachPoint
from netmemfs.cache import PageCache
from netmemfs.core import DoorCounters, FileCore, FileStatus, send
from netmemfs.errors import (
    NetmemError,
    NoSpace,
    SegmentExists,
    SegmentNotFound,
    ServerUnreachable,
    Stale,
    Unsupported,
)
from netmemfs.journal import HoldBudget, JournalError, SealedCommit, SegmentJournal
from netmemfs.ops import (
    InodeOp,
    Link,
    MakeNode,
    Move,
    Rmdir,
    SetAttr,
    Unlink,
    name_bytes,
    name_str,
)
from netmemfs.pages import MAX_NAME_BYTES, PAGE_SIZE, pages_for
from netmemfs.protocol import MAX_TARGET_BYTES, Notice
from netmemfs.store import ChangeResult, InodeStat, Store

log = logging.getLogger("netmemfs.fs")

ROOT = pyfuse3.ROOT_INODE
ATTR_TIMEOUT_S = 1.0
_ZERO_PAGE = bytes(PAGE_SIZE)
BLOCK_SIZE = 1 << 20  # st_blksize: what `cp` and friends should read at a time
DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_UNJOURNALED_BYTES = 64 << 20
READDIR_BATCH = 128  # directory entries whose attributes are fetched at once
DEFAULT_LEASE_S = 20.0  # until the server names its own (netmemfs-server --hold-lease)


# What fuse_errors() turns into an errno: a hot path may catch these itself and enter
# fuse_errors() only when one is raised (entering it costs a few microseconds).
FUSE_MAPPED = (NetmemError, trio.TooSlowError, OSError)


@contextmanager
def fuse_errors(what: str) -> Iterator[None]:
    """Turn NetmemErrors into the FUSEError pyfuse3 expects, with one log line that says
    what to do; anything else is a bug and propagates."""
    try:
        yield
    except NetmemError as e:
        if isinstance(e, ServerUnreachable | NoSpace | JournalError):
            log.error("%s: %s", what, e)
        elif isinstance(e, Unsupported):
            log.warning("%s: %s", what, e)
        raise pyfuse3.FUSEError(e.errno) from e
    except trio.TooSlowError as e:
        log.error(
            "%s: no answer from the server within --timeout; the operation failed with EIO",
            what,
        )
        raise pyfuse3.FUSEError(errno.EIO) from e
    except OSError as e:  # the cache dir's files (journal): disk full or failing
        log.error("%s: %s; check the disk of --cache-dir", what, e)
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from e


@dataclass
class _Inode:
    """An inode the kernel knows (looked up, not yet forgotten): what the server last
    said of it, and, for a regular file, its journal of uncommitted changes."""

    ino: int
    attrs: InodeStat
    path: str  # where it was last seen, for messages only
    core: FileCore | None  # regular files: journal, reads, commits
    lookups: int = 0
    opens: int = 0
    # When it was last changed here, not yet committed: shown as its mtime and ctime.
    dirty_ns: int = 0
    # A commit of it was refused for good and its pages may still be in the kernel's
    # cache (they are dropped in the background): drop them before telling a version.
    refused: bool = False

    @property
    def file(self) -> FileCore:
        if self.core is None:
            raise pyfuse3.FUSEError(errno.EISDIR if self.is_dir else errno.EINVAL)
        return self.core

    @property
    def journal(self) -> SegmentJournal | None:
        return None if self.core is None else self.core.journal

    @property
    def version(self) -> int:
        """The version this mount's view of it is of: a file's core follows its own
        commits, which the attributes last fetched do not know of."""
        return self.attrs.version if self.core is None else self.core.version

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attrs.mode)

    def idle(self) -> bool:
        settled = self.journal is None or self.journal.settled()
        return self.lookups <= 0 and self.opens == 0 and settled


@dataclass(frozen=True)
class _MountLock:
    ino: int
    owner: int  # the process (thread group) that took it


# getxattr names that take and release locks (netmemfs/locking.py; docs/semantics.md).
LOCK_XATTR = b"user.netmemfs.lock."
UNLOCK_XATTR = b"user.netmemfs.unlock."
# The version this mount's view of a file is of, and an expectation for its next commit.
VERSION_XATTR = b"user.netmemfs.version"
EXPECT_XATTR = b"user.netmemfs.expect."


def _process_of(tid: int) -> int:
    """The process a thread id belongs to (FUSE names the calling thread)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _text(name: bytes) -> str:
    """A name from the kernel as the store takes it (bytes that are not UTF-8
    surrogate-escaped); the server checks it, as it does a hostile client's."""
    if len(name) > MAX_NAME_BYTES:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    return name_str(bytes(name))


class NetmemFS(pyfuse3.Operations):
    def __init__(
        self,
        store: Store,
        cache_dir: Path,
        *,
        timeout_s: float,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        unjournaled_bytes: int = DEFAULT_UNJOURNALED_BYTES,
        owner: tuple[int, int] | None = None,
        negative_timeout_s: float = ATTR_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.negative_timeout_s = negative_timeout_s
        # Pages the kernel handed over that the cache dir cannot take: kept, not dropped.
        self.hold = HoldBudget(unjournaled_bytes)
        # Where work that must wait until a request is answered runs (set by the daemon).
        self.background: trio.Nursery | None = None
        self.cache = PageCache(cache_bytes)
        self.store = store
        self.counters = DoorCounters()  # of every file's FileCore
        self.cache_dir = cache_dir
        self.timeout_s = timeout_s
        # Inode numbers are the server's: never reused, the same in every mount.
        self.inodes: dict[int, _Inode] = {}
        # (uid, gid) every inode is shown with (a mount only its non-root mounter can
        # use), or None: as stored.
        self.owner = owner
        # The root's user.netmemfs.agent attribute: where libnetmem maps regions this
        # daemon serves (agent.AttachPoint), if it serves them.
        self.attach_path: bytes | None = None
        # Holds: the server keeps an inode this mount has open alive, by number, after
        # its last name goes, as long as we renew our holds within its lease.
        self.client_id = os.urandom(16)
        self.held: frozenset[int] = frozenset()  # as the server last heard
        self.lease_s = DEFAULT_LEASE_S
        self._holds_changed = trio.Event()
        self._holds_lock = trio.Lock()
        # Push invalidation: the server tells us of other clients' commits to the files
        # open here (we subscribe to what we hold); keep_coherent drops what they
        # changed. The inodes heard of and not yet handled.
        self.heard: set[int] = set()
        # Locks held through this mount, by token: for which file and process.
        self.locks: dict[int, _MountLock] = {}
        self.lock_lease_s = DEFAULT_LEASE_S
        self._locks_changed = trio.Event()
        self._watched: set[int] = set()  # processes whose exit releases their locks
        self.heard_everything = False  # a reconnect: notices may have been missed
        self._heard_event = trio.Event()
        store.on_notice = self._hear

    def files(self) -> list[FileStatus]:
        """The regular files this mount knows that are open, or have changes not yet
        committed, or were committed to through it."""
        out = []
        for node in self.inodes.values():
            if node.core is None:
                continue
            f = FileStatus.of(node.core, node.opens)
            if f.opens or f.dirty_pages or f.journal_bytes or f.last_commit_at is not None:
                out.append(f)
        return out

    def dirty(self) -> tuple[int, int]:
        """(pages written and not yet committed, journal bytes holding them), all files:
        a sum, no list (what a metrics scrape needs)."""
        pages = nbytes = 0
        for node in self.inodes.values():
            if node.core is not None:
                p, n = node.core.journal.dirty()
                pages += p
                nbytes += n
        return pages, nbytes

    def _open_inodes(self) -> frozenset[int]:
        return frozenset(ino for ino, node in self.inodes.items() if node.opens > 0)

    async def _send_holds(self) -> None:
        """Tell the server which inodes are open here now: they are held, and this mount
        hears of other clients' commits to them (both requests sent together)."""
        async with self._holds_lock:
            want = self._open_inodes()

            async def hold() -> None:
                self.lease_s = await self.store.hold(self.client_id, want)

            with self._deadline():
                async with trio.open_nursery() as both:
                    both.start_soon(hold)
                    if want != self.store.wanted:
                        both.start_soon(self.store.subscribe, want)
            self.held = want

    def _hear(self, notice: Notice | None) -> None:
        """From the store's reader: note it for keep_coherent (nothing here may wait)."""
        if notice is None:
            self.heard_everything = True
        else:
            self.heard.add(notice.ino)
        self._heard_event.set()

    async def keep_coherent(self) -> None:
        """Drop what other clients' commits changed, as the server tells of them, from
        this daemon's cache and the kernel's page cache (mapped pages too: the next
        access faults and reads the new data); runs as long as the mount. Pages written
        here and not yet committed stay: the kernel hands them to us first, and the
        journal's pages win over the server's until their own commit."""
        while True:
            await self._heard_event.wait()
            self._heard_event = trio.Event()
            heard, self.heard = self.heard, set()
            if self.heard_everything:
                self.heard_everything = False
                heard = set(self._open_inodes())
            for ino in heard:
                node = self.inodes.get(ino)
                if node is not None:  # else forgotten here meanwhile
                    await self._catch_up(node)

    async def _catch_up(self, node: _Inode) -> None:
        """Drop node's pages from this daemon's cache and the kernel's (mapped pages
        too), then fetch its size and version. The pages go before the version moves
        on: a lock granted at the new version (_lock) then finds nothing old left."""
        self.cache.drop(node.ino)
        await self._invalidate(node.ino)
        try:
            await self._refresh(node)
        except pyfuse3.FUSEError as e:
            log.info("could not refresh %r after another client's commit: %s", node.path, e)

    async def _opened(self, node: _Inode) -> None:
        """node was opened: held on the server before the open is answered, so that a
        removal by anyone after this leaves it readable and writable here."""
        node.opens += 1
        # A send under way may carry the set from before this open (a close's): then
        # `held` still names the inode, yet the server is about to hear it let go.
        if node.ino not in self.held or self._holds_lock.locked():
            try:
                with fuse_errors(f"open of {node.path!r} (its hold on the server)"):
                    await self._send_holds()
            except BaseException:
                node.opens -= 1  # not open after all
                raise

    async def keep_holds(self) -> None:
        """Renew the holds a few times per lease, and send them soon after a change
        (a file closed); runs as long as the mount. A failure is logged and tried again:
        past the lease, files removed while open here are freed (docs/semantics.md)."""
        while True:
            with trio.move_on_after(self.lease_s / 3):
                await self._holds_changed.wait()
            self._holds_changed = trio.Event()
            try:
                await self._send_holds()
            except (NetmemError, trio.TooSlowError) as e:
                log.warning(
                    "could not renew the holds on %d open files (%s); trying again",
                    len(self._open_inodes()),
                    e or "no answer within --timeout",
                )

    async def adopt_root(self) -> None:
        """Know the root before the kernel asks for anything (it never looks it up)."""
        with fuse_errors("stat of the root directory"), self._deadline():
            self._adopt(await self.store.getattr(ROOT), "").lookups += 1

    # --- helpers -------------------------------------------------------------------

    def _deadline(self) -> AbstractContextManager[trio.CancelScope]:
        return trio.fail_after(self.timeout_s)

    def _attrs(self, node: _Inode) -> pyfuse3.EntryAttributes:
        st = node.attrs
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.ino)
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT_S
        a.attr_timeout = ATTR_TIMEOUT_S
        a.st_mode = st.mode
        a.st_nlink = st.nlink
        a.st_size = node.journal.size if node.journal is not None else st.size
        a.st_rdev = st.rdev
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = st.stored_pages * (PAGE_SIZE // 512)
        a.st_uid, a.st_gid = self.owner or (st.uid, st.gid)
        a.st_atime_ns = st.atime_ns
        a.st_mtime_ns = max(st.mtime_ns, node.dirty_ns)
        a.st_ctime_ns = max(st.ctime_ns, node.dirty_ns)
        return a

    def _inode(self, ino: int) -> _Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _adopt(self, st: InodeStat, path: str) -> _Inode:
        """The inode st describes, made known or refreshed from what the server said."""
        node = self.inodes.get(st.ino)
        if node is None:
            core = None
            if stat.S_ISREG(st.mode):
                core = FileCore.of(
                    self.store,
                    st,
                    path,
                    self.cache_dir,
                    hold=self.hold,
                    cache=self.cache,
                    timeout_s=self.timeout_s,
                    counters=self.counters,
                )
            node = self.inodes[st.ino] = _Inode(st.ino, st, path, core)
            return node
        j = node.journal
        if j is not None and j.settled():
            j.committed_size = st.size
            node.dirty_ns = 0
        if node.version != st.version:
            self.cache.drop(st.ino)  # another client committed to it
        node.attrs = st
        if path:
            node.path = path
        if node.core is not None:
            node.core.version = st.version
            node.core.path = node.path
        return node

    async def _refresh(self, node: _Inode) -> _Inode:
        """node as the server holds it now; ESTALE if it is gone."""
        with fuse_errors(f"stat of {node.path!r}"), self._deadline():
            st = await self.store.getattr(node.ino)
        return self._adopt(st, "")

    def _path(self, parent: int, name: str) -> str:
        """The path of name in directory parent, from the mount's root, for messages
        (as far as this mount has seen the tree)."""
        where = self.inodes.get(parent)
        return f"{where.path}/{name}" if where is not None and where.path else name

    async def _lookup(self, parent: int, name: str) -> _Inode:
        path = self._path(parent, name)
        with fuse_errors(f"lookup of {path!r}"), self._deadline():
            st = await self.store.lookup(parent, name)
        return self._adopt(st, path)

    async def _change(self, what: str, ops: Sequence[InodeOp]) -> ChangeResult:
        with fuse_errors(what), self._deadline():
            return await self.store.change(ops)

    async def _made(self, parent: int, name: str, op: MakeNode) -> _Inode:
        """Make the inode op describes; the new inode, known to the kernel."""
        r = await self._change(f"making {name!r}", [op])
        with fuse_errors(f"stat of new {name!r}"), self._deadline():
            st = await self.store.getattr(r.created[0])
        node = self._adopt(st, self._path(parent, name))
        node.lookups += 1
        return node

    def _new_owner(self, parent: int, ctx: pyfuse3.RequestContext) -> tuple[int, int, int]:
        """(uid, gid, extra mode bits) of a new inode in parent: a set-group-ID directory
        gives its group, and to a new directory its set-group-ID bit."""
        d = self.inodes.get(parent)
        if d is not None and d.attrs.mode & stat.S_ISGID:
            return ctx.uid, d.attrs.gid, stat.S_ISGID
        return ctx.uid, ctx.gid, 0

    # --- namespace -----------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            node = await self._lookup(parent_inode, _text(name))
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
            if not self.negative_timeout_s:
                raise
            # A name that does not exist is cached like one that does (inode 0: the
            # kernel keeps the negative entry for entry_timeout), so a program that
            # looks for a missing file again and again (SQLite's -journal) does not
            # ask the server each time. The kernel drops the entry itself when a name
            # is made through this mount; one made by another client is seen when the
            # entry lapses (--negative-timeout).
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = pyfuse3.InodeT(0)
            missing.entry_timeout = self.negative_timeout_s
            return missing
        node.lookups += 1
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            node = self.inodes.get(ino)
            if node is None:
                continue
            node.lookups -= n
            if node.idle():
                if node.journal is not None:
                    node.journal.discard()
                del self.inodes[ino]

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        if node is None:
            with fuse_errors(f"stat of inode {inode}"), self._deadline():
                node = self._adopt(await self.store.getattr(inode), "")
            return self._attrs(node)
        try:
            node = await self._refresh(node)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ESTALE:
                raise
            # Removed on the server while the kernel holds it (open, say): as it was
            # last seen, with no links.
            node.attrs = dataclasses.replace(node.attrs, nlink=0)
        return self._attrs(node)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        if fields.update_size:
            await self._truncate(node, attr.st_size)
        change = SetAttr(
            node.ino,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        if change != SetAttr(node.ino):
            if fields.update_mtime and node.core is not None:
                # The commit of earlier writes would date the file anew: commit them
                # first, so that the time set is the one that stays (as NFS does).
                await self._commit(node)
            await self._change(f"setattr of {node.path!r}", [change])
        return self._attrs(await self._refresh(node))

    async def _truncate(self, node: _Inode, size: int) -> None:
        journal = node.file.journal
        if node.file.gone:
            raise pyfuse3.FUSEError(errno.ESTALE)
        with fuse_errors(f"truncate of {node.path!r} to {size}"):
            old = journal.size
            if size > old and old % PAGE_SIZE:
                await self._complete_last_page(node)
            tail = size % PAGE_SIZE
            last = None
            if size < old and tail and journal.read_page(size // PAGE_SIZE) is None:
                # Keep the new last page whole in the journal, zeros past the end
                # (set_size zeroes the tail of a page the journal already holds).
                last = await self._read_pages(node, size // PAGE_SIZE, 1)
            if last is not None:
                # Before the size: a page the journal refuses changes nothing, and
                # set_size cannot fail (no await between the two).
                journal.write_page(size // PAGE_SIZE, last[:tail] + bytes(PAGE_SIZE - tail))
            journal.set_size(size)
        node.dirty_ns = time.time_ns()

    async def _complete_last_page(self, node: _Inode) -> None:
        """Before growing a file whose last page is partial, make sure the journal holds
        that page whole, so the bytes past the old end are zeros (the server's may not
        be, if the file was shrunk since)."""
        journal = node.file.journal
        size = journal.size
        last = size // PAGE_SIZE
        if journal.read_page(last) is None:
            data = await self._read_pages(node, last, 1)
            tail = size % PAGE_SIZE
            journal.write_page(last, data[:tail] + bytes(PAGE_SIZE - tail))

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        text = _text(name)
        uid, gid, _ = self._new_owner(parent_inode, ctx)
        op = MakeNode(parent_inode, text, mode, uid, gid, rdev=rdev)
        return self._attrs(await self._made(parent_inode, text, op))

    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        text = _text(name)
        uid, gid, extra = self._new_owner(parent_inode, ctx)
        op = MakeNode(parent_inode, text, stat.S_IFDIR | (mode & 0o7777) | extra, uid, gid)
        return self._attrs(await self._made(parent_inode, text, op))

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        text = _text(name)
        if len(target) > MAX_TARGET_BYTES:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        uid, gid, _ = self._new_owner(parent_inode, ctx)
        op = MakeNode(parent_inode, text, stat.S_IFLNK | 0o777, uid, gid, target=bytes(target))
        return self._attrs(await self._made(parent_inode, text, op))

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._refresh(self._inode(inode))
        if not stat.S_ISLNK(node.attrs.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.attrs.target

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        text = _text(new_name)
        await self._change(
            f"link of {node.path!r} as {text!r}", [Link(inode, new_parent_inode, text)]
        )
        node = await self._refresh(node)
        node.lookups += 1
        return self._attrs(node)

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        text = _text(name)
        await self._change(f"unlink of {text!r}", [Unlink(parent_inode, text)])

    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        text = _text(name)
        await self._change(f"rmdir of {text!r}", [Rmdir(parent_inode, text)])

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        # A file keeps its inode, and its uncommitted pages go on to it by number,
        # whatever its name now is.
        old, new = _text(name_old), _text(name_new)
        op = Move(parent_inode_old, old, parent_inode_new, new, flags)
        await self._change(f"rename of {old!r} to {new!r}", [op])

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = await self._refresh(self._inode(inode))
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        d = self._inode(fh)
        with fuse_errors(f"listing {d.path!r}"), self._deadline():
            listing = await self.store.readdir(d.ino)
            entries = [(".", d.ino), ("..", 0)] + [(n, i) for n, i, _ in listing]
            window = entries[start_id : start_id + READDIR_BATCH]
            stats: dict[str, InodeStat] = {}

            async def stat_of(name: str, ino: int) -> None:
                with contextlib.suppress(Stale, SegmentNotFound):  # removed since
                    stats[name] = await (
                        self.store.lookup(d.ino, "..") if name == ".." else self.store.getattr(ino)
                    )

            async with open_quiet_nursery() as nursery:  # requests pipelined on one link
                for name, ino in window:
                    nursery.start_soon(stat_of, name, ino)
        for i, (name, _) in enumerate(window, start_id):
            # pyfuse3 answers with readdirplus: each entry the kernel takes but '.' and
            # '..' counts as a lookup, and its attributes are cached like a lookup's. The
            # kernel asks again from the next id for what did not fit, or lay past this
            # window.
            st = stats.get(name)
            if st is None:
                continue
            dot = name in (".", "..")
            node = self._adopt(st, "" if dot else self._path(d.ino, name))
            attrs = self._attrs(node)
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name_bytes(name)), attrs, i + 1):
                break
            if not dot:
                node.lookups += 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if inode == ROOT and name == AttachPoint.XATTR and self.attach_path is not None:
            return self.attach_path
        if name.startswith(LOCK_XATTR):
            return await self._lock(self._inode(inode), name[len(LOCK_XATTR) :], ctx.pid)
        if name.startswith(UNLOCK_XATTR):
            return await self._unlock(self._inode(inode), name[len(UNLOCK_XATTR) :], ctx.pid)
        if name == VERSION_XATTR:
            node = self._inode(inode)
            if node.refused:
                # A refused commit's pages may still be in the kernel's cache: the
                # version must not be newer than what a read shows.
                node.refused = False
                await self._invalidate(node.ino)
            return str(node.version).encode()
        if name.startswith(EXPECT_XATTR):
            # The next commit of the file applies only at this version (optimistic).
            try:
                version = int(name[len(EXPECT_XATTR) :].decode())
            except ValueError:
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            self._inode(inode).file.expect = version
            return b"0"
        raise pyfuse3.FUSEError(errno.ENODATA)

    # --- locks (netmemfs/locking.py is the caller's side) --------------------------------

    async def _lock(self, node: _Inode, request: bytes, tid: int) -> bytes:
        """A lock for the process that asked, granted by the server: "x" or "s", start,
        length, wait in ms, dot-separated. Returns its token, in decimal. The view of the
        file here is brought up to date with the commits made under the locks before
        (entry consistency) before the answer goes back."""
        try:
            kind, start, length, wait_ms = request.decode().split(".")
            exclusive = {"x": True, "s": False}[kind]
            first, count, wait_s = int(start), int(length), int(wait_ms) / 1000
        except (ValueError, KeyError):
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        owner = _process_of(tid)
        core = node.file
        what = f"{'exclusive' if exclusive else 'shared'} lock on {node.path!r}"
        with fuse_errors(what):
            grant = await self.store.lock(
                node.ino, first, count, exclusive=exclusive, wait_s=wait_s
            )
        self.locks[grant.token] = _MountLock(node.ino, owner)
        core.fences.add(grant.token)
        self.lock_lease_s = grant.lease_s
        self._locks_changed.set()
        if self.background is not None and owner not in self._watched:
            self._watched.add(owner)
            self.background.start_soon(self._release_at_exit, owner)
        if grant.version != node.version or node.refused:
            node.refused = False
            await self._catch_up(node)
        return str(grant.token).encode()

    async def _unlock(self, node: _Inode, request: bytes, tid: int) -> bytes:
        try:
            token = int(request.decode())
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        held = self.locks.get(token)
        if held is None or held.ino != node.ino or held.owner != _process_of(tid):
            log.info("unlock of %s on %r: not a lock this process holds", token, node.path)
            raise pyfuse3.FUSEError(errno.ENOLCK)
        await self._let_go(token)
        return b"0"

    async def _let_go(self, token: int) -> None:
        held = self.locks.pop(token)
        node = self.inodes.get(held.ino)
        if node is not None and node.core is not None:
            node.core.fences.discard(token)
        with fuse_errors(f"unlock of lock {token}"), self._deadline():
            await self.store.unlock(token)

    async def _release_at_exit(self, pid: int) -> None:
        """Release what process pid holds when it exits (a process killed while holding
        a lock must not keep it for a lease)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        try:
            if fd is not None:
                await trio.lowlevel.wait_readable(fd)
        finally:
            if fd is not None:
                os.close(fd)
            self._watched.discard(pid)
        for token in [t for t, held in self.locks.items() if held.owner == pid]:
            log.info("process %d ended holding lock %d; released", pid, token)
            with contextlib.suppress(pyfuse3.FUSEError):
                await self._let_go(token)

    async def keep_locks(self) -> None:
        """Renew the locks held here a few times per lease; runs as long as the mount. A
        lock not renewed in time is lost at the server, and commits fenced by it are
        refused (the process learns at its fsync)."""
        while True:
            if not self.locks:
                await self._locks_changed.wait()
                self._locks_changed = trio.Event()
                continue
            await trio.sleep(self.lock_lease_s / 3)
            try:
                with self._deadline():
                    await self.store.renew()
            except (NetmemError, trio.TooSlowError) as e:
                log.warning(
                    "could not renew %d locks (%s); past their lease they are lost",
                    len(self.locks),
                    e or "no answer within --timeout",
                )

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        if inode == ROOT and self.attach_path is not None:
            return [pyfuse3.XAttrNameT(AttachPoint.XATTR)]
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with fuse_errors("statfs"), self._deadline():
            info = await self.store.server_stat()
        capacity = info.capacity_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = PAGE_SIZE
        s.f_blocks = capacity // PAGE_SIZE
        s.f_bfree = s.f_bavail = max(0, capacity - info.used_bytes) // PAGE_SIZE
        s.f_files = info.segments
        s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = MAX_NAME_BYTES
        return s

    # --- files ---------------------------------------------------------------------

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = _text(name)
        uid, gid, _ = self._new_owner(parent_inode, ctx)
        op = MakeNode(parent_inode, text, stat.S_IFREG | (mode & 0o7777), uid, gid)
        try:
            node = await self._made(parent_inode, text, op)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            node = await self._lookup(parent_inode, text)  # made meanwhile elsewhere
            node.lookups += 1
        await self._opened(node)
        return self._file_info(node.ino, keep_cache=False), self._attrs(node)

    def _file_info(self, ino: int, *, keep_cache: bool) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(ino))
        fi.keep_cache = keep_cache
        return fi

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        # Close-to-open: what another mount committed since we last looked is seen now.
        # An inode removed meanwhile answers ESTALE, on which the kernel looks the path
        # up again, finding whatever file has the name now.
        before = node.version
        node = await self._refresh(node)
        changed = node.version != before
        if changed:
            # The kernel may hold the old attributes (a stat within ATTR_TIMEOUT_S):
            # its reads would stop at the old size. Attributes only: the kernel takes
            # no lock of the inode for that, so it is safe from inside a request.
            with contextlib.suppress(OSError):  # the kernel forgot the inode meanwhile
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)
        await self._opened(node)
        if flags & os.O_TRUNC:
            await self._truncate(node, 0)
        return self._file_info(inode, keep_cache=not changed)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        node = self.inodes.get(fh)
        if node is not None:
            node.opens -= 1
            if node.opens == 0:
                self._holds_changed.set()  # sent by keep_holds, not before the reply

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        node = self._inode(fh)
        journal = node.file.journal
        end = min(off + size, journal.size)
        if off >= end:
            return b""
        first = off // PAGE_SIZE
        count = pages_for(end) - first
        try:  # errors to errno by fuse_errors, entered only when one is raised
            data = await self._read_pages(node, first, count)
        except FUSE_MAPPED:
            with fuse_errors(f"read of {node.path!r} at {off}"):
                raise
        start = off - first * PAGE_SIZE
        return data[start : start + end - off]

    async def _read_pages(self, node: _Inode, first: int, count: int) -> bytes:
        """Pages first..first+count-1 as the file shows them (holes as zeros)."""
        # What the journal and the cache hold needs no deadline: a read they answer
        # whole enters no scope at all (a scope cost a cache hit about a quarter).
        pages, fetch = node.file.local(first, count)
        if fetch:
            with self._deadline():
                await node.file.fetch(pages, first, fetch)
        # One copy of each page, into the reply.
        return b"".join(_ZERO_PAGE if page is None else page for page in pages)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        node = self._inode(fh)
        journal = node.file.journal
        if node.file.gone:
            raise pyfuse3.FUSEError(errno.ESTALE)
        end = off + len(buf)
        try:  # errors to errno by fuse_errors, entered only when one is raised
            if end > journal.size and journal.size % PAGE_SIZE:
                await self._complete_last_page(node)
            first = off // PAGE_SIZE
            last = (end - 1) // PAGE_SIZE
            head, tail = off - first * PAGE_SIZE, (last + 1) * PAGE_SIZE - end
            if not head and not tail:
                data = buf
            else:
                # Partial first or last page: complete it from what the file holds.
                whole = bytearray(await self._read_pages(node, first, 1)) + bytes(
                    (last - first) * PAGE_SIZE
                )
                if last != first and tail:
                    whole[-PAGE_SIZE:] = await self._read_pages(node, last, 1)
                whole[head : head + len(buf)] = buf
                data = bytes(whole)
            # One call: a write the journal refuses changes neither pages nor size.
            try:
                journal.write_pages(first, data, grow_to=end)
            except JournalError:
                self._forget_cached_pages(fh)
                raise
        except FUSE_MAPPED:
            with fuse_errors(f"write to {node.path!r} at {off}"):
                raise
        node.dirty_ns = time.time_ns()
        return len(buf)

    def _forget_cached_pages(self, ino: int) -> None:
        """A write was refused: if it was the kernel's writeback of a mapping, the
        kernel now holds those pages clean, showing data that is stored nowhere. Drop
        the file's page cache so that readers see what the file really holds (the
        kernel reports the failed writeback at the next fsync of each descriptor).
        After this request is answered: the kernel waits for it to invalidate."""
        if self.background is not None:
            self.background.start_soon(self._invalidate, ino)

    async def _invalidate(self, ino: int) -> None:
        with contextlib.suppress(OSError):  # the kernel forgot the inode meanwhile
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, pyfuse3.InodeT(ino), False)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        node = self._inode(fh)
        if node.core is not None:
            await self._commit(node)

    async def _commit(self, node: _Inode) -> None:
        """Commit what the journal holds of node, as one transaction. One the server
        refused for good (a lost lock, a lost optimistic race) is dropped here: the
        file then shows what the server holds."""
        try:
            with fuse_errors(f"fsync of {node.path!r}"):
                await node.file.commit()  # its sending bounded by --timeout
        except pyfuse3.FUSEError as e:
            if e.errno in (errno.ESTALE, errno.ECANCELED) and not node.file.gone:
                with contextlib.suppress(pyfuse3.FUSEError):
                    await self._refresh(node)
                node.refused = True  # until its pages are dropped
                self._forget_cached_pages(node.ino)
            raise

    async def resend_recovered(self, commits: list[tuple[SealedCommit, Path]]) -> None:
        """At start: finish the commits a dead daemon left sealed."""
        for commit, path in commits:
            try:
                with self._deadline():
                    r = await send(self.store, commit)
            except (Stale, SegmentNotFound, SegmentExists) as e:
                log.error("dropping the recovered commit to %r: %s", commit.name, e)
            else:
                log.info(
                    "finished a commit to %r left by a previous daemon (%s)",
                    commit.name,
                    "it had already landed" if r.replayed else "sent now",
                )
            path.unlink()


__all__ = ["NetmemFS", "fuse_errors"]


# --- mounting (pyfuse3's session lives here, the only module that imports it) ----------

# Concurrent FUSE requests: enough for the kernel's readahead and writeback to overlap
# with round trips to the server.
MAX_TASKS = 32


def mount(ops: NetmemFS, mountpoint: Path, *, allow_other: bool) -> None:
    options = set(pyfuse3.default_options)
    # The kernel checks access by the modes and owners we report (the server stores
    # them); without it, any user that may enter the mount could open any file.
    options |= {"fsname=netmemfs", "subtype=netmemfs", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, str(mountpoint), options)


async def serve() -> None:
    """Serve requests until the file system is unmounted or terminate() is called."""
    await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)


def terminate() -> None:
    pyfuse3.terminate()


def close(*, unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)
