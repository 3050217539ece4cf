"""The changes a commit carries: one schema for the server's store, its log and the wire.

Where it sits: below protocol.py and the server's store.py and log.py; imports nothing
of ours but errors.py and pages.py. A segment op names a regular file of the root
directory; an inode op names inodes by number, and a name only where a directory
changes. Each op is written as a list `[tag, fields..., t]` (op_to_item), in log records
and in Change requests alike (docs/protocol.md lists the tags); `t` is the time in ns the
server stamped on it. item_to_op reads one back and raises ValueError, TypeError or
AssertionError for anything that is not an op.
"""

from __future__ import annotations

from dataclasses import dataclass

from netmemfs.pages import Buffer, PageRun

RENAME_NOREPLACE = 1  # Move flags, Linux's values
RENAME_EXCHANGE = 2


# --- segment ops: regular files of the root directory, by name --------------------------


@dataclass(frozen=True, slots=True)
class Create:
    name: str
    size: int
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Resize:
    name: str
    size: int
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Rename:
    name: str
    new_name: str
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    name: str
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Write:
    run: PageRun
    time_ns: int = 0


# --- inode ops: names only where a directory changes ------------------------------------


@dataclass(frozen=True, slots=True)
class MakeNode:
    """A new inode named name in directory parent: mode's type (S_IFREG, S_IFDIR,
    S_IFLNK, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK) and permission bits; target: a
    symlink's; rdev: a device's number; size: a regular file's, in bytes (all holes)."""

    parent: int
    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    target: bytes = b""
    rdev: int = 0
    time_ns: int = 0
    size: int = 0


@dataclass(frozen=True, slots=True)
class Link:
    ino: int
    parent: int
    name: str
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Unlink:
    """Remove name (not a directory) from parent."""

    parent: int
    name: str
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Rmdir:
    parent: int
    name: str
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    """rename(2): flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE."""

    parent: int
    name: str
    new_parent: int
    new_name: str
    flags: int = 0
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class SetAttr:
    """Change what is not None: mode's permission bits (the type stays), owner, times."""

    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class WritePages:
    ino: int
    first: int
    data: Buffer
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Truncate:
    ino: int
    size: int
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Reap:
    """Free inode ino, which has no name left and no client holding it open. The
    server's own op, added to the transaction that took the last name (or later, when
    the last holder let go): a client's Change may not carry it."""

    ino: int
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Fence:
    """Apply this transaction only while lock token `token` on inode ino is held (a
    commit made under a lock whose lease ran out is refused). A check the server makes
    and drops: it is never logged."""

    ino: int
    token: int
    time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Expect:
    """Apply this transaction only if inode ino is still at version (an optimistic
    commit: refused with `conflict` if another commit came first). A check the server
    makes and drops, like Fence."""

    ino: int
    version: int
    time_ns: int = 0


SegmentOp = Create | Resize | Rename | Delete | Write
InodeOp = MakeNode | Link | Unlink | Rmdir | Move | SetAttr | WritePages | Truncate | Fence | Expect
Op = SegmentOp | InodeOp | Reap
INODE_OPS = (MakeNode, Link, Unlink, Rmdir, Move, SetAttr, WritePages, Truncate, Fence, Expect)
# What a Change request may carry (the segment ops have requests of their own).
INODE_OP_TAGS = frozenset(("mk", "ln", "ul", "rd", "mv", "sa", "wp", "tr", "fe", "ex"))


def name_bytes(name: str) -> bytes:
    """Names go to disk as their bytes (a name need not be UTF-8: surrogate-escaped)."""
    return name.encode("utf-8", "surrogateescape")


def name_str(raw: object) -> str:
    if isinstance(raw, str):  # format 1 wrote segment names as text
        return raw
    assert isinstance(raw, bytes)
    return raw.decode("utf-8", "surrogateescape")


def op_to_item(op: Op) -> tuple[object, ...]:
    t = op.time_ns
    if isinstance(op, Write):
        return ("w", op.run.segment, op.run.first, op.run.data, t)
    if isinstance(op, Create):
        return ("c", op.name, op.size, t)
    if isinstance(op, Resize):
        return ("r", op.name, op.size, t)
    if isinstance(op, Rename):
        return ("m", op.name, op.new_name, t)
    if isinstance(op, Delete):
        return ("d", op.name, t)
    if isinstance(op, MakeNode):
        return (
            "mk",
            op.parent,
            name_bytes(op.name),
            op.mode,
            op.uid,
            op.gid,
            op.target,
            op.rdev,
            *([op.size] if op.size else []),
            t,
        )
    if isinstance(op, Link):
        return ("ln", op.ino, op.parent, name_bytes(op.name), t)
    if isinstance(op, Unlink):
        return ("ul", op.parent, name_bytes(op.name), t)
    if isinstance(op, Rmdir):
        return ("rd", op.parent, name_bytes(op.name), t)
    if isinstance(op, Move):
        return (
            "mv",
            op.parent,
            name_bytes(op.name),
            op.new_parent,
            name_bytes(op.new_name),
            op.flags,
            t,
        )
    if isinstance(op, SetAttr):
        return ("sa", op.ino, op.mode, op.uid, op.gid, op.atime_ns, op.mtime_ns, t)
    if isinstance(op, WritePages):
        return ("wp", op.ino, op.first, op.data, t)
    if isinstance(op, Reap):
        return ("rp", op.ino, t)
    if isinstance(op, Fence):
        return ("fe", op.ino, op.token, t)
    if isinstance(op, Expect):
        return ("ex", op.ino, op.version, t)
    return ("tr", op.ino, op.size, t)


_V1_FIELDS = {"w": 3, "c": 2, "r": 2, "m": 2, "d": 1}  # format 1: no time


def as_int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{v!r} is not a number")
    return v


def _opt(v: object) -> int | None:
    return None if v is None else as_int(v)


def item_to_op(item: list[object]) -> Op:
    """The op item stands for (a log record's, or a Change request's)."""
    tag, *f = item
    t = 0 if _V1_FIELDS.get(str(tag)) == len(f) else as_int(f.pop())
    if tag == "w":
        data = f[2]
        assert isinstance(data, bytes | memoryview)
        return Write(PageRun(name_str(f[0]), as_int(f[1]), data), t)
    if tag == "c":
        return Create(name_str(f[0]), as_int(f[1]), t)
    if tag == "r":
        return Resize(name_str(f[0]), as_int(f[1]), t)
    if tag == "m":
        return Rename(name_str(f[0]), name_str(f[1]), t)
    if tag == "d":
        return Delete(name_str(f[0]), t)
    if tag == "mk":
        parent, name, mode, uid, gid, target, rdev, *size = f  # size: only if not 0
        assert isinstance(target, bytes) and len(size) <= 1
        return MakeNode(
            as_int(parent),
            name_str(name),
            as_int(mode),
            as_int(uid),
            as_int(gid),
            target,
            as_int(rdev),
            t,
            as_int(size[0]) if size else 0,
        )
    if tag == "ln":
        return Link(as_int(f[0]), as_int(f[1]), name_str(f[2]), t)
    if tag == "ul":
        return Unlink(as_int(f[0]), name_str(f[1]), t)
    if tag == "rd":
        return Rmdir(as_int(f[0]), name_str(f[1]), t)
    if tag == "mv":
        return Move(as_int(f[0]), name_str(f[1]), as_int(f[2]), name_str(f[3]), as_int(f[4]), t)
    if tag == "sa":
        ino, mode, uid, gid, atime, mtime = f
        return SetAttr(as_int(ino), _opt(mode), _opt(uid), _opt(gid), _opt(atime), _opt(mtime), t)
    if tag == "wp":
        data = f[2]
        assert isinstance(data, bytes | memoryview)
        return WritePages(as_int(f[0]), as_int(f[1]), data, t)
    if tag == "tr":
        return Truncate(as_int(f[0]), as_int(f[1]), t)
    if tag == "rp":
        return Reap(as_int(f[0]), t)
    if tag == "fe":
        return Fence(as_int(f[0]), as_int(f[1]), t)
    if tag == "ex":
        return Expect(as_int(f[0]), as_int(f[1]), t)
    raise ValueError(f"unknown op {tag!r}")
