"""The FUSE door: files in a mount whose pages live on the page server.

Where it sits: at the top, beside the other doors; the only module that imports
pyfuse3. It turns FUSE requests into calls on the journal (journal.py) and the server
(remote.py), and NetmemErrors into errnos in one place (fuse_errors).

One file is one segment. Reads are served from the journal (pages written here and not
yet committed), else from the server. Writes, including the kernel's writeback of mmap'ed
pages, go to the journal only. fsync commits the file's journal to the server as one
transaction. Creating, deleting and renaming a file act on the server at once.
docs/semantics.md states what each operation promises.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from netmemfs._trio_util import open_quiet_nursery
from netmemfs.agent import AttachPoint
from netmemfs.cache import PageCache
from netmemfs.errors import (
    NetmemError,
    NoSpace,
    SegmentExists,
    SegmentNotFound,
    ServerUnreachable,
)
from netmemfs.journal import HoldBudget, JournalError, SealedCommit, SegmentJournal
from netmemfs.pages import MAX_NAME_BYTES, PAGE_SIZE, check_name, consecutive, pages_for
from netmemfs.protocol import MAX_MESSAGE_PAGES
from netmemfs.remote import CommitResult, RemoteStore, SegmentStat

log = logging.getLogger("netmemfs.fs")

ROOT = pyfuse3.ROOT_INODE
ATTR_TIMEOUT_S = 1.0
BLOCK_SIZE = 1 << 20  # st_blksize: what `cp` and friends should read at a time
DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_UNJOURNALED_BYTES = 64 << 20
READDIR_BATCH = 128  # directory entries whose attributes are fetched at once


@contextmanager
def fuse_errors(what: str) -> Iterator[None]:
    """Turn NetmemErrors into the FUSEError pyfuse3 expects, with one log line that says
    what to do; anything else is a bug and propagates."""
    try:
        yield
    except NetmemError as e:
        if isinstance(e, ServerUnreachable | NoSpace | JournalError):
            log.error("%s: %s", what, e)
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
    name: str
    journal: SegmentJournal
    version: int
    lookups: int = 0
    opens: int = 0
    commit_lock: trio.Lock = field(default_factory=trio.Lock)


class NetmemFS(pyfuse3.Operations):
    def __init__(
        self,
        store: RemoteStore,
        cache_dir: Path,
        *,
        timeout_s: float,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        unjournaled_bytes: int = DEFAULT_UNJOURNALED_BYTES,
    ) -> None:
        super().__init__()
        # Pages the kernel handed over that the cache dir cannot take: kept, not dropped.
        self.hold = HoldBudget(unjournaled_bytes)
        # Where work that must wait until a request is answered runs (set by the daemon).
        self.background: trio.Nursery | None = None
        self.cache = PageCache(cache_bytes)
        self.store = store
        self.cache_dir = cache_dir
        self.timeout_s = timeout_s
        self.inodes: dict[int, _Inode] = {}  # files the kernel knows (looked up)
        self.by_name: dict[str, int] = {}  # name -> its entry in inodes
        self.numbers: dict[str, int] = {}  # name -> inode number, stable for the mount
        self.next_inode = ROOT + 1
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started_ns = time.time_ns()
        # The root's user.netmemfs.agent attribute: where libnetmem maps regions this
        # daemon serves (agent.AttachPoint), if it serves them.
        self.attach_path: bytes | None = None

    # --- helpers -------------------------------------------------------------------

    def _deadline(self) -> AbstractContextManager[trio.CancelScope]:
        return trio.fail_after(self.timeout_s)

    def _attrs(self, ino: int, size: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT_S
        a.attr_timeout = ATTR_TIMEOUT_S
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
        a.st_size = size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (size + 511) // 512
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started_ns
        return a

    def _name(self, name: bytes) -> str:
        try:
            text = name.decode("utf-8")
            return check_name(text)
        except (UnicodeDecodeError, NetmemError) as e:
            raise pyfuse3.FUSEError(errno.EINVAL) from e

    def _inode(self, ino: int) -> _Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _number(self, name: str) -> int:
        ino = self.numbers.get(name)
        if ino is None:
            ino = self.numbers[name] = self.next_inode
            self.next_inode += 1
        return ino

    async def _lookup_name(self, name: str) -> int:
        """The inode for segment name, refreshed from the server."""
        with fuse_errors(f"lookup of {name!r}"):
            with self._deadline():
                st = await self.store.stat(name)
            return self._adopt(name, st)

    def _adopt(self, name: str, st: SegmentStat) -> int:
        """The inode for name, created or refreshed from what the server said of it."""
        ino = self.by_name.get(name)
        if ino is None:
            ino = self._number(name)
            journal = SegmentJournal(self.cache_dir, st.size, self.hold)
            self.inodes[ino] = _Inode(name, journal, st.version)
            self.by_name[name] = ino
        else:
            node = self.inodes[ino]
            if not node.journal.has_changes() and node.journal.sealed is None:
                node.journal.committed_size = st.size
                if node.version != st.version:
                    self.cache.drop(ino)  # another client committed to it
                node.version = st.version
        return ino

    # --- namespace -----------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(ROOT, 0)
        if len(name) > MAX_NAME_BYTES:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        ino = await self._lookup_name(self._name(name))
        node = self.inodes[ino]
        node.lookups += 1
        return self._attrs(ino, node.journal.size)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            node = self.inodes.get(ino)
            if node is None:
                continue
            node.lookups -= n
            idle = node.lookups <= 0 and node.opens == 0
            if idle and not node.journal.has_changes() and node.journal.sealed is None:
                node.journal.discard()
                del self.inodes[ino]
                if self.by_name.get(node.name) == ino:
                    del self.by_name[node.name]

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._attrs(ROOT, 0)
        node = self._inode(inode)
        return self._attrs(inode, node.journal.size)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._attrs(ROOT, 0)
        node = self._inode(inode)
        if fields.update_size and not node.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if fields.update_size:
            size = attr.st_size
            with fuse_errors(f"truncate of {node.name!r} to {size}"):
                old = node.journal.size
                if size > old and old % PAGE_SIZE:
                    await self._complete_last_page(node)
                tail = size % PAGE_SIZE
                last = None
                if size < old and tail and node.journal.read_page(size // PAGE_SIZE) is None:
                    # Keep the new last page whole in the journal, zeros past the end
                    # (set_size zeroes the tail of a page the journal already holds).
                    last = await self._read_pages(node, size // PAGE_SIZE, 1)
                if last is not None:
                    # Before the size: a page the journal refuses changes nothing, and
                    # set_size cannot fail (no await between the two).
                    node.journal.write_page(
                        size // PAGE_SIZE, last[:tail] + bytes(PAGE_SIZE - tail)
                    )
                node.journal.set_size(size)
        # Mode, owner and times are not kept: files are 0644 and owned by the mounter.
        return self._attrs(inode, node.journal.size)

    async def _complete_last_page(self, node: _Inode) -> None:
        """Before growing a file whose last page is partial, make sure the journal holds
        that page whole, so the bytes past the old end are zeros (the server's may not
        be, if the segment was shrunk since)."""
        size = node.journal.size
        last = size // PAGE_SIZE
        if node.journal.read_page(last) is None:
            data = await self._read_pages(node, last, 1)
            tail = size % PAGE_SIZE
            node.journal.write_page(last, data[:tail] + bytes(PAGE_SIZE - tail))

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        text = self._name(name)
        with fuse_errors(f"unlink of {text!r}"), self._deadline():
            await self.store.delete(text)
        ino = self.by_name.pop(text, None)
        self.numbers.pop(text, None)
        if ino is not None:
            self._orphan(self.inodes[ino])

    def _orphan(self, node: _Inode) -> None:
        """node's segment is gone: drop its changes; open handles now write nowhere
        (their writes fail with ENOENT)."""
        node.journal.discard()
        node.name = ""

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = self._name(name_old), self._name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        ino = self.by_name.get(old)
        if ino is not None:
            # A commit that failed earlier names the old segment: finish it first.
            node = self.inodes[ino]
            async with node.commit_lock:
                await self._retry_sealed(node)
        with fuse_errors(f"rename of {old!r} to {new!r}"), self._deadline():
            if flags & pyfuse3.RENAME_NOREPLACE and new in await self.store.list_segments():
                raise pyfuse3.FUSEError(errno.EEXIST)
            await self.store.rename(old, new)
        replaced = self.by_name.pop(new, None)
        if replaced is not None:
            self._orphan(self.inodes[replaced])
        self.numbers.pop(new, None)
        if ino is not None:
            del self.by_name[old]
            self.by_name[new] = ino
            self.numbers[new] = self.numbers.pop(old)
            self.inodes[ino].name = new

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(0)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        with fuse_errors("readdir"), self._deadline():
            names = sorted(await self.store.list_segments())
            window = names[start_id : start_id + READDIR_BATCH]
            stats: dict[str, SegmentStat] = {}

            async def stat(name: str) -> None:
                with contextlib.suppress(SegmentNotFound):  # deleted since the listing
                    stats[name] = await self.store.stat(name)

            async with open_quiet_nursery() as nursery:  # requests pipelined on one link
                for name in window:
                    nursery.start_soon(stat, name)
        for i, name in enumerate(window, start_id):
            # pyfuse3 answers with readdirplus: each entry the kernel takes counts as a
            # lookup, and its attributes are cached like a lookup's. The kernel asks
            # again from the next id for what did not fit, or lay past this window.
            if name not in stats:
                continue
            with fuse_errors(f"readdir entry {name!r}"):
                ino = self._adopt(name, stats[name])
            node = self.inodes[ino]
            attrs = self._attrs(ino, node.journal.size)
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name.encode()), attrs, i + 1):
                break
            node.lookups += 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if inode == ROOT and name == AttachPoint.XATTR and self.attach_path is not None:
            return self.attach_path
        raise pyfuse3.FUSEError(errno.ENODATA)

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

    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # one flat directory of segments

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    # --- files ---------------------------------------------------------------------

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        text = self._name(name)
        try:
            with fuse_errors(f"create of {text!r}"), self._deadline():
                await self.store.create(text, 0)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
        ino = await self._lookup_name(text)
        node = self.inodes[ino]
        node.lookups += 1
        node.opens += 1
        return self._file_info(ino, keep_cache=False), self._attrs(ino, node.journal.size)

    def _file_info(self, ino: int, *, keep_cache: bool) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(ino))
        fi.keep_cache = keep_cache
        return fi

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if not node.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # Close-to-open: what another mount committed since we last looked is seen now.
        before = node.version
        log.debug("open %r ino=%d version=%d", node.name, inode, before)
        await self._lookup_name(node.name)
        node.opens += 1
        if flags & os.O_TRUNC:
            with fuse_errors(f"truncate of {node.name!r}"):
                node.journal.set_size(0)
        return self._file_info(inode, keep_cache=node.version == before)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        node = self.inodes.get(fh)
        if node is not None:
            node.opens -= 1

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        node = self._inode(fh)
        if not node.name:
            raise pyfuse3.FUSEError(errno.ENOENT)  # deleted, here or by another client
        end = min(off + size, node.journal.size)
        if off >= end:
            return b""
        first = off // PAGE_SIZE
        count = pages_for(end) - first
        with fuse_errors(f"read of {node.name!r} at {off}"):
            data = await self._read_pages(node, first, count)
        start = off - first * PAGE_SIZE
        return data[start : start + end - off]

    async def _read_pages(self, node: _Inode, first: int, count: int) -> bytes:
        """Pages first..first+count-1 as the file shows them: journal, then server."""
        out = bytearray(count * PAGE_SIZE)
        missing: list[int] = []
        for i in range(count):
            data = node.journal.read_page(first + i)
            if data is None:
                missing.append(first + i)
            else:
                out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = data
        # Only pages the server has for this file can be asked for: past its size, or
        # past a shrink not committed yet, they are zeros.
        server_pages = pages_for(node.journal.low_water())
        ino = self.by_name.get(node.name, 0)
        fetch = []
        for p in missing:
            if p >= server_pages:
                continue
            cached = self.cache.get(ino, p)
            if cached is None:
                fetch.append(p)
            else:
                out[(p - first) * PAGE_SIZE : (p - first + 1) * PAGE_SIZE] = cached
        runs = consecutive(fetch)
        if runs:
            with self._deadline():
                for p, n in runs:
                    for q in range(p, p + n, MAX_MESSAGE_PAGES):
                        m = min(MAX_MESSAGE_PAGES, p + n - q)
                        got = await self.store.read_pages(node.name, q, m)
                        keep = got.version == node.version  # else it changed: do not keep
                        for run in got.runs:
                            off = (run.first - first) * PAGE_SIZE
                            out[off : off + len(run.data)] = run.data
                            if keep:
                                self.cache.put(ino, run.first, run.data)
            # A page written while we waited for the server: the journal's is newer.
            for p in missing:
                data = node.journal.read_page(p)
                if data is not None:
                    out[(p - first) * PAGE_SIZE : (p - first + 1) * PAGE_SIZE] = data
        return bytes(out)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        node = self._inode(fh)
        if not node.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        end = off + len(buf)
        with fuse_errors(f"write to {node.name!r} at {off}"):
            if end > node.journal.size and node.journal.size % PAGE_SIZE:
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
                node.journal.write_pages(first, data, grow_to=end)
            except JournalError:
                self._forget_cached_pages(fh)
                raise
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
        if not node.name:
            return
        with fuse_errors(f"fsync of {node.name!r}"):
            async with node.commit_lock:
                await self._retry_sealed(node)
                if node.journal.has_changes():
                    node.journal.seal_start()
                    await self._retry_sealed(node)

    async def _retry_sealed(self, node: _Inode) -> None:
        """Commit the sealed journal, if any (the caller holds node.commit_lock)."""
        journal = node.journal
        if journal.sealed is None:
            return
        txn = self.store.new_txn()
        t0 = time.perf_counter()
        commit = await trio.to_thread.run_sync(journal.seal_finish, txn, node.name)
        t1 = time.perf_counter()
        result = await journal.send_sealed(self._send)
        node.version = result.versions.get(commit.name, node.version)
        self.cache.drop(self.by_name.get(node.name, 0))  # cached pages may be older
        log.debug(
            "committed %d pages of %r: sealed in %.1f ms, sent in %.1f ms",
            sum(r.count for r in commit.runs),
            commit.name,
            (t1 - t0) * 1000,
            (time.perf_counter() - t1) * 1000,
        )

    async def _send(self, commit: SealedCommit) -> CommitResult:
        try:
            with self._deadline():
                r = await self.store.commit(commit.runs, resizes=commit.resizes, txn=commit.txn)
        except SegmentNotFound:
            log.error(
                "commit to %r failed: the segment no longer exists on the server (deleted "
                "or renamed by another client); its pages stay in the journal",
                commit.name,
            )
            raise
        return r

    async def resend_recovered(self, commits: list[tuple[SealedCommit, Path]]) -> None:
        """At start: finish the commits a dead daemon left sealed."""
        for commit, path in commits:
            try:
                r = await self._send(commit)
            except (SegmentNotFound, SegmentExists) as e:
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
    options |= {"fsname=netmemfs", "subtype=netmemfs"}
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
