"""In-memory page store: inodes, their pages, versions and the committed-transaction table.

Where it sits: below serve.py, above nothing but netmemfs.errors/pages/protocol; log.py
wraps it for durability. It does no I/O and never awaits, so each public method runs
whole between two checkpoints of the trio loop.

Every file, directory, symlink and special file is an inode with a 64-bit number that is
never handed out twice (next_ino only grows, and is kept in checkpoints). Directories map
names to inode numbers; inode 1 is the root. The segments of the protocol are the regular
files of the root directory: the segment ops (Create, Resize, Rename, Delete, Write)
address them by name, the inode ops (MakeNode ... WritePages) by number, with names only
in the ops that change a directory.

Pages live in fixed chunks of CHUNK_PAGES pages (one bytearray each) with an integer bit
mask saying which pages are stored; a page never written costs nothing and is reported as
a hole. Mutations come as a list of ops: `check(ops)` raises if any would fail and leaves
everything as it was; `apply(txn, ops)` then cannot fail, so a commit lands whole or not
at all. Both run the same code (one implementation per rule): check runs the ops for real
but writes no page data, and undoes every change before it returns.
"""

from __future__ import annotations

import bisect
import dataclasses
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from netmemfs.errors import (
    InvalidMove,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotPermitted,
    OutOfRange,
    SegmentExists,
    SegmentNotFound,
    Stale,
    TooLarge,
    TooManyLinks,
)
from netmemfs.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Create,
    Delete,
    Expect,
    Fence,
    Link,
    MakeNode,
    Move,
    Op,
    Reap,
    Rename,
    Resize,
    Rmdir,
    SetAttr,
    Unlink,
    Write,
    WritePages,
)
from netmemfs.pages import (
    PAGE_SIZE,
    Buffer,
    PageRun,
    check_entry_name,
    check_name,
    check_size,
    pages_for,
)
from netmemfs.protocol import MAX_MESSAGE_PAGES, Attrs

CHUNK_PAGES = 64
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE
FULL_MASK = (1 << CHUNK_PAGES) - 1
# How many committed transaction ids are remembered for exactly-once replies. A client
# retries only its last few commits, so this bounds memory without weakening that.
MAX_REMEMBERED_TXNS = 100_000
ROOT_INO = 1
LINK_MAX = 65_000  # hard links to one inode (ext4's limit)
SYMLINK_MAX = 4095  # bytes of a symlink's target (PATH_MAX less its NUL)
_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR)
) | {stat.S_IFBLK}

Versions = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one commit did. versions: the segments the segment ops touched, by name, with
    their new versions (what the protocol's Committed reply carries); inodes: every inode
    the commit changed, with its new version; created: the numbers MakeNode handed out,
    in op order."""

    versions: Versions = ()
    inodes: tuple[tuple[int, int], ...] = ()
    created: tuple[int, ...] = ()


class FileData:
    """The size and pages of a regular file."""

    __slots__ = ("chunks", "masks", "size", "stored_pages")

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.chunks: dict[int, bytearray] = {}
        self.masks: dict[int, int] = {}
        self.stored_pages = 0

    def is_stored(self, page: int) -> bool:
        return bool(self.masks.get(page // CHUNK_PAGES, 0) >> (page % CHUNK_PAGES) & 1)

    def count_unstored(self, first: int, count: int) -> int:
        """How many of pages first..first+count-1 are not stored yet."""
        missing = 0
        for ci, lo, hi in _chunk_spans(first, count):
            span = ((1 << (hi - lo)) - 1) << lo
            missing += (hi - lo) - (self.masks.get(ci, 0) & span).bit_count()
        return missing

    def write(self, first: int, data: memoryview) -> int:
        """Store whole pages; return how many were not stored before."""
        added = 0
        pos = 0
        for ci, lo, hi in _chunk_spans(first, len(data) // PAGE_SIZE):
            chunk = self._writable(ci)
            n = (hi - lo) * PAGE_SIZE
            chunk[lo * PAGE_SIZE : lo * PAGE_SIZE + n] = data[pos : pos + n]
            pos += n
            span = ((1 << (hi - lo)) - 1) << lo
            old = self.masks.get(ci, 0)
            added += (hi - lo) - (old & span).bit_count()
            self.masks[ci] = old | span
        self.stored_pages += added
        return added

    def _writable(self, ci: int) -> bytearray:
        """Chunk ci, ready to be changed in place without touching data lent out.

        read() lends views of chunks rather than copies. A bytearray with a live view
        cannot change size, so a one-byte append fails exactly when some view (a reply
        still being sent) may be looking at it; then the chunk is copied, and the
        reader keeps the old bytes, which nobody changes any more (copy-on-write).
        """
        chunk = self.chunks.get(ci)
        if chunk is None:
            chunk = self.chunks[ci] = bytearray(CHUNK_BYTES)
            return chunk
        try:
            chunk.append(0)
        except BufferError:
            chunk = self.chunks[ci] = bytearray(chunk)
        else:
            chunk.pop()
        return chunk

    def read(self, first: int, count: int) -> Iterator[tuple[int, memoryview]]:
        """Yield (page, data) for each run of stored pages in the range.

        data is a read-only view of the store, not a copy: it stays as it is even if a
        commit changes those pages later (see _writable), and should be dropped once
        sent, since a chunk with a view alive is copied on its next write.
        """
        for ci, lo, hi in _chunk_spans(first, count):
            mask = self.masks.get(ci, 0)
            if not mask:
                continue
            chunk = memoryview(self.chunks[ci]).toreadonly()
            base = ci * CHUNK_PAGES
            if mask == FULL_MASK:
                yield base + lo, chunk[lo * PAGE_SIZE : hi * PAGE_SIZE]
                continue
            p = lo
            while p < hi:
                if not mask >> p & 1:
                    p += 1
                    continue
                start = p
                while p < hi and mask >> p & 1:
                    p += 1
                yield base + start, chunk[start * PAGE_SIZE : p * PAGE_SIZE]

    def read_page(self, page: int) -> memoryview | None:
        """Page page as read() would give it (a read-only view of the store), or None
        for a hole."""
        ci, at = divmod(page, CHUNK_PAGES)
        if not self.masks.get(ci, 0) >> at & 1:
            return None
        return memoryview(self.chunks[ci]).toreadonly()[at * PAGE_SIZE : (at + 1) * PAGE_SIZE]

    def truncate(self, size: int) -> int:
        """Drop everything at and past size bytes; return how many pages were freed."""
        keep = pages_for(size)
        freed = 0
        for ci in [c for c in self.masks if (c + 1) * CHUNK_PAGES > keep]:
            lo = max(0, keep - ci * CHUNK_PAGES)
            mask = self.masks[ci]
            kept = mask & ((1 << lo) - 1)
            freed += mask.bit_count() - kept.bit_count()
            if kept:
                self.masks[ci] = kept
                self._writable(ci)[lo * PAGE_SIZE :] = bytes(CHUNK_BYTES - lo * PAGE_SIZE)
            else:
                del self.masks[ci]
                del self.chunks[ci]
        tail = size % PAGE_SIZE
        if tail and self.is_stored(size // PAGE_SIZE):
            # Bytes past the end of a partial last page read as zeros if the segment grows.
            chunk = self._writable(size // PAGE_SIZE // CHUNK_PAGES)
            start = (size // PAGE_SIZE % CHUNK_PAGES) * PAGE_SIZE + tail
            end = start - tail + PAGE_SIZE
            chunk[start:end] = bytes(end - start)
        self.stored_pages -= freed
        return freed

    def chunk_items(self) -> Iterator[tuple[int, int, bytearray]]:
        for ci in sorted(self.masks):
            yield ci, self.masks[ci], self.chunks[ci]

    def load_chunk(self, ci: int, mask: int, data: bytes) -> None:
        if len(data) != CHUNK_BYTES or not 0 < mask <= FULL_MASK:
            raise ValueError(f"chunk {ci}: bad length {len(data)} or mask")
        self.chunks[ci] = bytearray(data)
        self.masks[ci] = mask
        self.stored_pages += mask.bit_count()


def _chunk_spans(first: int, count: int) -> Iterator[tuple[int, int, int]]:
    """Split pages first..first+count-1 into (chunk index, lo, hi) within each chunk."""
    page = first
    end = first + count
    while page < end:
        ci, lo = divmod(page, CHUNK_PAGES)
        hi = min(CHUNK_PAGES, lo + (end - page))
        yield ci, lo, hi
        page += hi - lo


# What a client sees of an inode: the fields of the protocol's Attrs reply, in its order.
ATTR_FIELDS = tuple(f.name for f in dataclasses.fields(Attrs) if f.name != "req_id")
# What a checkpoint keeps of one (its pages and names follow in records of their own).
CHECKPOINT_FIELDS = (
    *(f for f in ATTR_FIELDS if f not in ("stored_pages", "target")),
    "parent",
    "target",
)


class Inode:
    """One file, directory, symlink or special file. data: a regular file's size and
    pages; entries: a directory's names; parent: a directory's '..' (the root's is
    itself); target: a symlink's."""

    __slots__ = (
        "atime_ns",
        "ctime_ns",
        "data",
        "entries",
        "gid",
        "ino",
        "mode",
        "mtime_ns",
        "nlink",
        "parent",
        "rdev",
        "target",
        "uid",
        "version",
    )

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, time_ns: int = 0):
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.atime_ns = self.mtime_ns = self.ctime_ns = time_ns
        self.version = 0
        self.rdev = 0
        self.target = b""
        self.parent = 0
        self.data: FileData | None = FileData() if stat.S_ISREG(mode) else None
        self.entries: dict[str, int] | None = {} if stat.S_ISDIR(mode) else None
        self.nlink = 2 if self.entries is not None else 1

    @property
    def size(self) -> int:
        if self.data is not None:
            return self.data.size
        return len(self.target)

    @property
    def stored_pages(self) -> int:
        return self.data.stored_pages if self.data is not None else 0


class _Run:
    """One run of ops against the store: for real (apply), or to check them (dry), in
    which case no page data is written and undo() puts everything back."""

    def __init__(self, store: MemoryPageStore, *, dry: bool) -> None:
        self.s = store
        self.dry = dry
        self.undo_log: list[Callable[[], None]] = []
        self.new_pages = 0
        self.names: dict[str, None] = {}  # segments touched by segment ops, by final name
        self.touched: dict[int, None] = {}
        self.created: list[int] = []
        self.orphaned: dict[int, None] = {}  # inodes this run took the last name of

    def undo(self) -> None:
        for action in reversed(self.undo_log):
            action()

    # -- changes, each with its undo --

    def _set(self, obj: object, attr: str, value: object) -> None:
        if self.dry:
            old = getattr(obj, attr)
            self.undo_log.append(lambda: setattr(obj, attr, old))
        setattr(obj, attr, value)

    def _bind(self, d: Inode, name: str, ino: int) -> None:
        entries = d.entries
        assert entries is not None
        if self.dry:
            old = entries.get(name)
            if old is None:
                self.undo_log.append(lambda: entries.__delitem__(name))
            else:
                self.undo_log.append(lambda: entries.__setitem__(name, old))
        entries[name] = ino

    def _unbind(self, d: Inode, name: str) -> None:
        entries = d.entries
        assert entries is not None
        ino = entries.pop(name)
        if self.dry:
            self.undo_log.append(lambda: entries.__setitem__(name, ino))

    def _touch(self, node: Inode, t: int, *, data: bool = False) -> None:
        """node changed at t: ctime (and mtime if its contents changed), version."""
        self._set(node, "ctime_ns", t)
        if data:
            self._set(node, "mtime_ns", t)
        self.touched[node.ino] = None

    def _drop_link(self, node: Inode, t: int) -> None:
        """One name of node is gone. After the last it is an orphan: it lives on, by
        number only, until a Reap frees it (the server adds one at once unless a client
        holds it open)."""
        self._set(node, "nlink", node.nlink - (2 if node.entries is not None else 1))
        self._touch(node, t)
        if node.nlink > 0:
            return
        ino = node.ino
        self.s.orphans.add(ino)
        self.orphaned[ino] = None
        if self.dry:
            self.undo_log.append(lambda: self.s.orphans.discard(ino))

    def _reap(self, op: Reap) -> None:
        node = self.inode(op.ino)
        if node.nlink > 0 or node.ino == ROOT_INO:
            raise NotPermitted(f"inode {op.ino} has a name; only an orphan is reaped")
        ino = node.ino
        del self.s.inodes[ino]
        self.s.orphans.discard(ino)
        self.touched.pop(ino, None)
        self.orphaned.pop(ino, None)
        if self.dry:
            self.undo_log.append(lambda: self.s.inodes.__setitem__(ino, node))
            self.undo_log.append(lambda: self.s.orphans.add(ino))
        else:
            self.s.used_pages -= node.stored_pages

    def _living(self, d: Inode) -> Inode:
        """d, a directory that may get a new name: not one removed while in use."""
        if d.nlink == 0:
            raise SegmentNotFound(f"directory {d.ino} was removed; nothing can be made in it")
        return d

    # -- lookups --

    def inode(self, ino: int) -> Inode:
        node = self.s.inodes.get(ino)
        if node is None:
            raise Stale(
                f"inode {ino} no longer exists (deleted by this or another client); "
                "open the file again by its name"
            )
        return node

    def directory(self, ino: int) -> Inode:
        d = self.inode(ino)
        if d.entries is None:
            raise NotADirectory(f"inode {ino} is not a directory")
        return d

    def entry(self, d: Inode, name: str) -> Inode:
        assert d.entries is not None
        ino = d.entries.get(name)
        if ino is None:
            raise SegmentNotFound(f"{name!r} does not exist in directory {d.ino}")
        return self.s.inodes[ino]

    def segment(self, name: str) -> Inode:
        return self.s.segment(name)

    # -- the ops --

    def run(self, op: Op) -> None:
        if isinstance(op, Write):
            self._write(self.segment(op.run.segment), op.run.first, op.run.data, op.time_ns)
            self.names[op.run.segment] = None
        elif isinstance(op, Create):
            check_name(op.name)
            check_size(op.size)
            root = self.s.root
            assert root.entries is not None
            if op.name in root.entries:
                raise SegmentExists(f"segment {op.name!r} already exists")
            node = self._make(root, op.name, stat.S_IFREG | 0o644, 0, 0, op.time_ns)
            assert node.data is not None
            self._set(node.data, "size", op.size)
            self.names[op.name] = None
        elif isinstance(op, Resize):
            check_name(op.name)
            check_size(op.size)
            self._truncate(self.segment(op.name), op.size, op.time_ns)
            self.names[op.name] = None
        elif isinstance(op, Rename):
            check_name(op.name)
            check_name(op.new_name)
            self.segment(op.name)
            if op.name != op.new_name:
                root = self.s.root
                assert root.entries is not None
                target = root.entries.get(op.new_name)
                if target is not None and self.s.inodes[target].data is None:
                    raise IsADirectory(f"{op.new_name!r} is not a segment; cannot replace it")
                self._move(root, op.name, root, op.new_name, 0, op.time_ns)
                self.names.pop(op.name, None)
            self.names[op.new_name] = None
        elif isinstance(op, Delete):
            check_name(op.name)
            self.segment(op.name)
            self._unlink(self.s.root, op.name, op.time_ns)
            self.names.pop(op.name, None)
        elif isinstance(op, MakeNode):
            self._make_node(op)
        elif isinstance(op, Link):
            self._link(op)
        elif isinstance(op, Unlink):
            d = self.directory(op.parent)
            check_entry_name(op.name)
            if self.entry(d, op.name).entries is not None:
                raise IsADirectory(f"{op.name!r} is a directory: remove it with rmdir")
            self._unlink(d, op.name, op.time_ns)
        elif isinstance(op, Rmdir):
            self._rmdir(op)
        elif isinstance(op, Move):
            self._checked_move(op)
        elif isinstance(op, SetAttr):
            self._setattr(op)
        elif isinstance(op, WritePages):
            self._write(self._file(op.ino), op.first, op.data, op.time_ns)
        elif isinstance(op, Reap):
            self._reap(op)
        elif isinstance(op, Fence | Expect):
            # The server checks fences against its locks and drops them before a
            # transaction reaches the store; one that got here is a bug, not input.
            raise AssertionError("a Fence or Expect reached the store")
        else:
            self._truncate(self._file(op.ino), op.size, op.time_ns)

    def _file(self, ino: int) -> Inode:
        node = self.inode(ino)
        if node.data is None:
            if node.entries is not None:
                raise IsADirectory(f"inode {ino} is a directory, not a file")
            raise OutOfRange(f"inode {ino} is not a regular file; it has no pages")
        return node

    def _write(self, node: Inode, first: int, data: Buffer, t: int) -> None:
        fd = node.data
        assert fd is not None
        count = len(data) // PAGE_SIZE
        if len(data) % PAGE_SIZE or first < 0:
            raise OutOfRange(f"a write to inode {node.ino} is not of whole pages")
        if first + count > pages_for(fd.size):
            raise OutOfRange(
                f"write to pages {first}..{first + count - 1} of inode {node.ino} goes past "
                f"its end ({fd.size} bytes); resize it first"
            )
        self._touch(node, t, data=True)
        if self.dry:
            self.new_pages += fd.count_unstored(first, count)
            return
        with memoryview(data) as view:
            self.s.used_pages += fd.write(first, view)

    def _truncate(self, node: Inode, size: int, t: int) -> None:
        fd = node.data
        assert fd is not None
        check_size(size)
        if size < fd.size and not self.dry:
            self.s.used_pages -= fd.truncate(size)
        self._set(fd, "size", size)
        self._touch(node, t, data=True)

    def _make(self, d: Inode, name: str, mode: int, uid: int, gid: int, t: int) -> Inode:
        ino = self.s.next_ino
        self._set(self.s, "next_ino", ino + 1)
        node = Inode(ino, mode, uid, gid, t)
        self.s.inodes[ino] = node
        if self.dry:
            self.undo_log.append(lambda: self.s.inodes.__delitem__(ino))
        self._bind(d, name, ino)
        self._touch(d, t, data=True)
        self.touched[ino] = None
        self.created.append(ino)
        return node

    def _make_node(self, op: MakeNode) -> None:
        d = self._living(self.directory(op.parent))
        check_entry_name(op.name)
        kind = stat.S_IFMT(op.mode)
        if kind not in _TYPES:
            raise OutOfRange(f"mode {op.mode:o} names no kind of file")
        if kind == stat.S_IFLNK and not 0 < len(op.target) <= SYMLINK_MAX:
            raise NameTooLong(f"a symlink's target must be 1..{SYMLINK_MAX} bytes")
        assert d.entries is not None
        if op.name in d.entries:
            raise SegmentExists(f"{op.name!r} already exists in directory {d.ino}")
        node = self._make(d, op.name, kind | (op.mode & 0o7777), op.uid, op.gid, op.time_ns)
        node.target = op.target if kind == stat.S_IFLNK else b""
        node.rdev = op.rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        if op.size:
            if node.data is None:
                raise OutOfRange(f"{op.name!r} is not a regular file; it takes no size")
            check_size(op.size)
            node.data.size = op.size
        if node.entries is not None:
            node.parent = d.ino
            self._set(d, "nlink", d.nlink + 1)

    def _link(self, op: Link) -> None:
        node = self.inode(op.ino)
        d = self._living(self.directory(op.parent))
        if node.nlink == 0:
            raise SegmentNotFound(f"inode {op.ino} has no name left to link to")
        check_entry_name(op.name)
        if node.entries is not None:
            raise NotPermitted(f"inode {op.ino} is a directory; directories take no links")
        if node.nlink >= LINK_MAX:
            raise TooManyLinks(f"inode {op.ino} has {LINK_MAX} links, the most it may")
        assert d.entries is not None
        if op.name in d.entries:
            raise SegmentExists(f"{op.name!r} already exists in directory {d.ino}")
        self._bind(d, op.name, node.ino)
        self._set(node, "nlink", node.nlink + 1)
        self._touch(node, op.time_ns)
        self._touch(d, op.time_ns, data=True)

    def _unlink(self, d: Inode, name: str, t: int) -> None:
        node = self.entry(d, name)
        self._unbind(d, name)
        self._touch(d, t, data=True)
        if node.entries is not None:
            self._set(d, "nlink", d.nlink - 1)  # its '..' is gone
        self._drop_link(node, t)

    def _rmdir(self, op: Rmdir) -> None:
        d = self.directory(op.parent)
        if op.name == ".":
            raise InvalidMove("rmdir of '.': remove the directory by its name")
        if op.name == "..":
            raise NotEmpty("rmdir of '..': its directory is not empty")
        check_entry_name(op.name)
        node = self.entry(d, op.name)
        if node.entries is None:
            raise NotADirectory(f"{op.name!r} is not a directory: remove it with unlink")
        if node.entries:
            raise NotEmpty(f"directory {op.name!r} holds {len(node.entries)} names")
        self._unlink(d, op.name, op.time_ns)

    def _checked_move(self, op: Move) -> None:
        d = self.directory(op.parent)
        nd = self._living(self.directory(op.new_parent))
        for name in (op.name, op.new_name):
            if name in (".", ".."):
                raise InvalidMove(f"rename of {name!r} is not allowed")
            check_entry_name(name)
        if op.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or op.flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise InvalidMove(f"rename flags {op.flags:#x} are not RENAME_NOREPLACE or _EXCHANGE")
        node = self.entry(d, op.name)
        assert nd.entries is not None
        target_ino = nd.entries.get(op.new_name)
        target = None if target_ino is None else self.s.inodes[target_ino]
        if op.flags & RENAME_EXCHANGE:
            if target is None:
                raise SegmentNotFound(f"{op.new_name!r} does not exist to exchange with")
        elif target is not None and op.flags & RENAME_NOREPLACE:
            raise SegmentExists(f"{op.new_name!r} exists (RENAME_NOREPLACE)")
        if target is node:
            return  # two names of one inode: rename does nothing
        for moving, into in ((node, nd), (target, d) if op.flags & RENAME_EXCHANGE else (None, d)):
            if moving is not None and moving.entries is not None and self._inside(into, moving):
                raise InvalidMove(f"cannot move directory {moving.ino} into itself")
        if target is not None and not op.flags & RENAME_EXCHANGE:
            if node.entries is not None and target.entries is None:
                raise NotADirectory(f"{op.new_name!r} is not a directory; cannot replace it")
            if node.entries is None and target.entries is not None:
                raise IsADirectory(f"{op.new_name!r} is a directory; cannot replace it")
            if target.entries:
                raise NotEmpty(f"directory {op.new_name!r} is not empty; cannot replace it")
        self._move(d, op.name, nd, op.new_name, op.flags, op.time_ns)

    def _inside(self, d: Inode, ancestor: Inode) -> bool:
        """Whether directory d is ancestor or below it."""
        node = d
        while True:
            if node is ancestor:
                return True
            if node.ino == ROOT_INO:
                return False
            node = self.s.inodes[node.parent]

    def _move(self, d: Inode, name: str, nd: Inode, new_name: str, flags: int, t: int) -> None:
        assert d.entries is not None and nd.entries is not None
        node = self.s.inodes[d.entries[name]]
        target_ino = nd.entries.get(new_name)
        if flags & RENAME_EXCHANGE:
            assert target_ino is not None
            target = self.s.inodes[target_ino]
            self._bind(d, name, target.ino)
            self._bind(nd, new_name, node.ino)
            self._reparent(target, nd, d)
            self._touch(target, t)
        else:
            if target_ino is not None:
                self._unlink(nd, new_name, t)
            self._unbind(d, name)
            self._bind(nd, new_name, node.ino)
        self._reparent(node, d, nd)
        self._touch(node, t)
        self._touch(d, t, data=True)
        self._touch(nd, t, data=True)

    def _reparent(self, node: Inode, old: Inode, new: Inode) -> None:
        if node.entries is None or old is new:
            return
        self._set(node, "parent", new.ino)
        self._set(old, "nlink", old.nlink - 1)
        self._set(new, "nlink", new.nlink + 1)

    def _setattr(self, op: SetAttr) -> None:
        node = self.inode(op.ino)
        if op.mode is not None:
            self._set(node, "mode", stat.S_IFMT(node.mode) | (op.mode & 0o7777))
        if op.uid is not None:
            self._set(node, "uid", op.uid)
        if op.gid is not None:
            self._set(node, "gid", op.gid)
        if op.atime_ns is not None:
            self._set(node, "atime_ns", op.atime_ns)
        if op.mtime_ns is not None:
            self._set(node, "mtime_ns", op.mtime_ns)
        self._touch(node, op.time_ns)


class PageStore(Protocol):
    """What the server (serve.py) asks of a page store, and all it asks: reads, the
    checks a commit needs, and commit() itself. Two stores have it: MemoryPageStore
    (memory mode) and log.LogPageStore (the same, plus a log on disk a commit reaches
    first). A new store (compressed, remote, counted) is one new class."""

    capacity_bytes: int | None
    orphans: set[int]
    # True: commit() waits for a disk (the server runs each in a task of its own).
    durable: bool
    inodes: dict[int, Inode]
    # A durable store's log: its bytes since the last checkpoint, how many checkpoints
    # it wrote since start, and when the last one was written (time.time(); None: no
    # checkpoint, or no disk).
    log_bytes: int
    checkpoints: int
    checkpointed_at: float | None
    # Held while what reads see changes (check, apply): read lanes (lane.py) read
    # from threads of their own, under it.
    lock: threading.Lock

    @property
    def segments(self) -> dict[str, Inode]: ...
    @property
    def used_bytes(self) -> int: ...
    def segment(self, name: str) -> Inode: ...
    def inode(self, ino: int) -> Inode: ...
    def lookup(self, parent: int, name: str) -> Inode: ...
    def list_directory(
        self, ino: int, after: str, limit: int
    ) -> tuple[list[tuple[str, int, int]], bool]: ...
    def read(self, name: str, first: int, count: int) -> tuple[int, tuple[PageRun, ...]]: ...
    def read_inode(self, ino: int, first: int, count: int) -> tuple[int, tuple[PageRun, ...]]: ...
    def outcome(self, txn: bytes) -> Outcome | None: ...
    def settle(self, ops: Sequence[Op], held: Container[int] = ()) -> list[Op]: ...

    async def commit(self, txn: bytes, ops: Sequence[Op]) -> None:
        """Make ops (settle()d, with nothing changed since) transaction txn: on disk
        first if the store keeps one, then in what reads see. The caller holds the
        server's commit lock and shields the call from cancellation."""

    async def maintain(self) -> None:
        """Work a commit leaves for later (a log's checkpoint), after its notices."""


class MemoryPageStore:
    """Every inode in memory. capacity_bytes bounds stored page data (None: no bound)."""

    durable = False

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755)
        root.parent = ROOT_INO
        self.root = root
        self.inodes: dict[int, Inode] = {ROOT_INO: root}
        # Inodes with no name left (nlink 0), kept until a Reap: some client may hold
        # one open (serve.py's holds decide when to reap).
        self.orphans: set[int] = set()
        self.next_ino = ROOT_INO + 1  # never handed out before; only grows
        self.used_pages = 0
        self.committed: OrderedDict[bytes, Outcome] = OrderedDict()
        self.log_bytes = 0  # no log: see LogPageStore
        self.checkpoints = 0
        self.checkpointed_at: float | None = None
        # Taken by check() and apply(), which change inodes (check undoes its changes),
        # and by read lanes' reads, which run in threads of their own (lane.py).
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        """For copies (tests keep one as a model): all but the lock, which a copy gets
        new (__setstate__)."""
        state = self.__dict__.copy()
        del state["lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    # --- reads ---------------------------------------------------------------------

    @property
    def segments(self) -> dict[str, Inode]:
        """The regular files of the root directory, by name: the protocol's segments."""
        assert self.root.entries is not None
        files = ((name, self.inodes[ino]) for name, ino in self.root.entries.items())
        return {name: node for name, node in files if node.data is not None}

    def segment(self, name: str) -> Inode:
        """The regular file name of the root directory (on every read: no _Run)."""
        assert self.root.entries is not None
        ino = self.root.entries.get(name)
        node = None if ino is None else self.inodes[ino]
        if node is None or node.data is None:
            raise SegmentNotFound(f"segment {name!r} does not exist; create it first")
        return node

    def inode(self, ino: int) -> Inode:
        return _Run(self, dry=True).inode(ino)

    def lookup(self, parent: int, name: str) -> Inode:
        """The inode name stands for in directory parent."""
        run = _Run(self, dry=True)
        if name == ".":
            return run.directory(parent)
        if name == "..":
            return self.inodes[run.directory(parent).parent]
        check_entry_name(name)
        return run.entry(run.directory(parent), name)

    def list_directory(
        self, ino: int, after: str, limit: int
    ) -> tuple[list[tuple[str, int, int]], bool]:
        """Up to limit (name, ino, mode) of directory ino, in byte order of the names,
        from the first after `after` ("": the start); and whether that was the last."""
        d = _Run(self, dry=True).directory(ino)
        assert d.entries is not None
        key = after.encode("utf-8", "surrogateescape") if after else b""
        names = sorted(d.entries, key=lambda n: n.encode("utf-8", "surrogateescape"))
        start = bisect.bisect_right(names, key, key=lambda n: n.encode("utf-8", "surrogateescape"))
        part = names[start : start + limit]
        out = [(n, d.entries[n], self.inodes[d.entries[n]].mode) for n in part]
        return out, start + len(part) >= len(names)

    def read(self, name: str, first: int, count: int) -> tuple[int, tuple[PageRun, ...]]:
        """(version, runs of stored pages) for pages first..first+count-1 of name."""
        node = self.segment(name)
        return node.version, self._read(node, name, first, count)

    def read_inode(self, ino: int, first: int, count: int) -> tuple[int, tuple[PageRun, ...]]:
        """(version, runs of stored pages) of file ino; the runs name no segment."""
        node = self.inodes.get(ino)
        if node is None or node.data is None:
            node = _Run(self, dry=True)._file(ino)  # raises what is wrong with ino
        return node.version, self._read(node, "", first, count)

    def _read(self, node: Inode, name: str, first: int, count: int) -> tuple[PageRun, ...]:
        fd = node.data
        assert fd is not None
        if count > MAX_MESSAGE_PAGES:
            what = repr(name) if name else f"inode {node.ino}"
            raise TooLarge(
                f"read of {count} pages of {what}: at most {MAX_MESSAGE_PAGES} per request"
            )
        npages = pages_for(fd.size)
        if first + count > npages:
            what = repr(name) if name else f"inode {node.ino}"
            raise OutOfRange(
                f"read of pages {first}..{first + count - 1} of {what} goes past its end "
                f"({npages} pages, {fd.size} bytes); resize it first or read less"
            )
        if count == 1:  # a fault's read: the one page, or a hole
            data = fd.read_page(first)
            return () if data is None else (PageRun(name, first, data),)
        return tuple(PageRun(name, p, data) for p, data in fd.read(first, count))

    @property
    def used_bytes(self) -> int:
        return self.used_pages * PAGE_SIZE

    def lookup_txn(self, txn: bytes) -> Versions | None:
        outcome = self.committed.get(txn)
        return None if outcome is None else outcome.versions

    def outcome(self, txn: bytes) -> Outcome | None:
        return self.committed.get(txn)

    # --- mutations -----------------------------------------------------------------

    def settle(self, ops: Sequence[Op], held: Container[int] = ()) -> list[Op]:
        """ops as they are to be applied and logged: checked (raising what check raises),
        followed by a Reap of each inode they leave without a name that is not in held
        (inodes some client holds open)."""
        orphaned = self.check(ops)
        reaps: list[Op] = [Reap(ino) for ino in orphaned if ino not in held]
        if not reaps:
            return list(ops)
        out = [*ops, *reaps]
        self.check(out)
        return out

    def check(self, ops: Sequence[Op], *, enforce_capacity: bool = True) -> list[int]:
        """Raise the error applying ops would meet; change nothing. Return the inodes
        whose last name the ops take (orphans, for settle to reap).

        The ops run in order, for real but without page data, and are then undone, so
        a transaction may make a directory and a file in it, or create a segment and
        write to it. Capacity is counted conservatively: pages freed by the same
        transaction are not credited.
        """
        run = _Run(self, dry=True)
        with self.lock:
            try:
                for op in ops:
                    run.run(op)
            finally:
                run.undo()
        cap = self.capacity_bytes
        needed = (self.used_pages + run.new_pages) * PAGE_SIZE
        if enforce_capacity and cap is not None and run.new_pages and needed > cap:
            raise NoSpace(
                f"commit needs {run.new_pages * PAGE_SIZE} more bytes but the server holds "
                f"{self.used_bytes} of its {cap}-byte --max-memory; delete or shrink "
                "segments, or restart the server with a larger --max-memory"
            )
        return list(run.orphaned)

    def apply(self, txn: bytes, ops: Sequence[Op]) -> Versions:
        """Apply ops that check() accepted; record txn; return the new versions of the
        segments they touched (outcome(txn) has the rest).

        Must follow check(ops) with no await in between: the check is only valid for the
        state it saw.
        """
        run = _Run(self, dry=False)
        inodes = []
        with self.lock:
            for op in ops:
                run.run(op)
            for ino in run.touched:
                node = self.inodes.get(ino)
                if node is not None:
                    node.version += 1
                    inodes.append((ino, node.version))
        assert self.root.entries is not None
        versions = []
        for name in run.names:
            bound = self.root.entries.get(name)
            if bound is not None:
                versions.append((name, self.inodes[bound].version))
        outcome = Outcome(tuple(versions), tuple(inodes), tuple(run.created))
        self.remember(txn, outcome)
        return outcome.versions

    async def commit(self, txn: bytes, ops: Sequence[Op]) -> None:
        self.apply(txn, ops)

    async def maintain(self) -> None:
        pass

    def remember(self, txn: bytes, outcome: Outcome) -> None:
        self.committed[txn] = outcome
        while len(self.committed) > MAX_REMEMBERED_TXNS:
            self.committed.popitem(last=False)
