"""The wire protocol, sans-IO: bytes in, messages out, and back.

Where it sits: just above errors.py and pages.py; used by remote.py (client) and by
netmemfs_server (server). It imports neither trio nor socket and does no I/O; msgpack
stays inside this module. The frame layout is documented byte by byte in
docs/protocol.md.

    conn = Connection(Role.CLIENT)
    wire = conn.send(ReadPages(req_id=7, segment="seg0", first=42, count=16))
    conn.receive_data(chunk)            # b"" means EOF
    while (ev := conn.next_event()) is not NEED_DATA: ...

"Need more bytes" is not an error. Bytes from the peer that are not a valid message raise
RemoteProtocolError; trying to send something the protocol forbids raises
LocalProtocolError.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import msgpack

from netmemfs.errors import LocalProtocolError, RemoteProtocolError
from netmemfs.ops import INODE_OP_TAGS, INODE_OPS, InodeOp, WritePages, item_to_op, op_to_item
from netmemfs.pages import MAX_NAME_BYTES, PAGE_SIZE, Buffer
from netmemfs.pages import PageRun as PageRun  # re-exported: the wire's unit of pages

PROTOCOL_VERSION = 1
FRAME_HEADER = struct.Struct(">I")
# The largest page payload one message may carry, and the frame cap derived from it. A
# peer announcing a longer frame is cut off before anything is buffered.
MAX_MESSAGE_PAGES = 4096
MAX_FRAME_BYTES = MAX_MESSAGE_PAGES * PAGE_SIZE + 64 * 1024
MAX_TXN_ID_BYTES = 64
MAX_TARGET_BYTES = 4095  # a symlink's target: PATH_MAX less its NUL
MAX_NONCE_BYTES = 64
MAX_U64 = (1 << 64) - 1
# Socket buffer size both ends ask for: a 1 MiB message then moves in few system calls.
SOCKET_BUFFER_BYTES = 4 << 20


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Event(enum.Enum):
    """Sentinels next_event() returns besides messages."""

    NEED_DATA = "need-data"
    CLOSED = "closed"


NEED_DATA = Event.NEED_DATA
CLOSED = Event.CLOSED


# Field kinds: how each field is checked on decode. Every message lists its fields' kinds
# in declaration order in KINDS.
U64, STR, BYTES, BOOL, TXN, NONCE, PAGES, RUNS, STRS, VERSIONS = (
    "u64",
    "str",
    "bytes",
    "bool",
    "txn",
    "nonce",
    "pages",
    "runs",
    "strs",
    "versions",
)
# The inode requests': a name's bytes (0..MAX_NAME_BYTES; the store checks what a name
# may be); ops (netmemfs.ops items, inode ops only); directory entries; (ino, version)
# pairs; numbers.
NAME, OPS, ENTRIES, INO_VERSIONS, U64S = "name", "ops", "entries", "ino_versions", "u64s"
# A symlink's target, as Attrs carries it.
TARGET = "target"


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[int] = 0
    KINDS: ClassVar[tuple[str, ...]] = ()
    req_id: int


class Request(Message):
    """Sent by clients."""

    __slots__ = ()


class Reply(Message):
    """Sent by servers; req_id echoes the request's (0 for connection-level errors)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Hello(Request):
    TYPE = 1
    KINDS = (U64, U64, NONCE)
    version: int
    client_nonce: bytes


@dataclass(frozen=True, slots=True)
class Authenticate(Request):
    TYPE = 2
    KINDS = (U64, BYTES)
    proof: bytes


@dataclass(frozen=True, slots=True)
class ListSegments(Request):
    TYPE = 3
    KINDS = (U64,)


@dataclass(frozen=True, slots=True)
class StatSegment(Request):
    TYPE = 4
    KINDS = (U64, STR)
    name: str


@dataclass(frozen=True, slots=True)
class CreateSegment(Request):
    TYPE = 5
    KINDS = (U64, TXN, STR, U64)
    txn: bytes
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class ResizeSegment(Request):
    TYPE = 6
    KINDS = (U64, TXN, STR, U64)
    txn: bytes
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class RenameSegment(Request):
    TYPE = 7
    KINDS = (U64, TXN, STR, STR)
    txn: bytes
    name: str
    new_name: str


@dataclass(frozen=True, slots=True)
class DeleteSegment(Request):
    TYPE = 8
    KINDS = (U64, TXN, STR)
    txn: bytes
    name: str


@dataclass(frozen=True, slots=True)
class ReadPages(Request):
    TYPE = 9
    KINDS = (U64, STR, U64, U64)
    segment: str
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class StagePages(Request):
    TYPE = 10
    KINDS = (U64, TXN, STR, U64, PAGES)
    txn: bytes
    segment: str
    first: int
    data: Buffer = field(repr=False)


@dataclass(frozen=True, slots=True)
class Commit(Request):
    """Resize segments, then write the pages staged under txn and the inline writes,
    all or nothing."""

    TYPE = 11
    KINDS = (U64, TXN, VERSIONS, RUNS)
    txn: bytes
    resizes: tuple[tuple[str, int], ...]
    writes: tuple[PageRun, ...]


@dataclass(frozen=True, slots=True)
class Abort(Request):
    TYPE = 12
    KINDS = (U64, TXN)
    txn: bytes


@dataclass(frozen=True, slots=True)
class StatServer(Request):
    TYPE = 13
    KINDS = (U64,)


@dataclass(frozen=True, slots=True)
class Lookup(Request):
    """The inode name stands for in directory parent ('.' and '..' too)."""

    TYPE = 14
    KINDS = (U64, U64, NAME)
    parent: int
    name: bytes


@dataclass(frozen=True, slots=True)
class GetAttr(Request):
    TYPE = 15
    KINDS = (U64, U64)
    ino: int


@dataclass(frozen=True, slots=True)
class ReadDir(Request):
    """Up to limit entries of directory ino, in byte order of their names, from the first
    name after `after` (b"": from the start)."""

    TYPE = 16
    KINDS = (U64, U64, NAME, U64)
    ino: int
    after: bytes
    limit: int


@dataclass(frozen=True, slots=True)
class ReadInode(Request):
    """Pages first..first+count-1 of regular file ino; the reply is Pages (segment "")."""

    TYPE = 17
    KINDS = (U64, U64, U64, U64)
    ino: int
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class Change(Request):
    """Inode ops (netmemfs.ops) as one transaction, exactly once, all or nothing."""

    TYPE = 18
    KINDS = (U64, TXN, OPS)
    txn: bytes
    ops: tuple[InodeOp, ...]


@dataclass(frozen=True, slots=True)
class StageInode(Request):
    """Pages of regular file ino staged under txn (answered by Staged): the Change with
    that txn writes them after its own ops, in the order they were staged."""

    TYPE = 19
    KINDS = (U64, TXN, U64, U64, PAGES)
    txn: bytes
    ino: int
    first: int
    data: Buffer = field(repr=False)


@dataclass(frozen=True, slots=True)
class Hold(Request):
    """Client `client` (an id it chose, the same on every connection) holds exactly the
    inodes inos open, until it says otherwise or its lease lapses: an inode held loses
    its last name without being freed. Sent again within the lease to keep it."""

    TYPE = 20
    KINDS = (U64, TXN, U64S)
    client: bytes
    inos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Claim(Request):
    """This connection now speaks for `name` (an id the client picks, the same on all
    its connections): every other connection that claimed the name is fenced, and a
    commit of its not yet applied is refused (`fenced`). A client that reconnects, or a
    daemon that replaces a dead one, claims its name first, so a commit its predecessor
    had sent cannot land after its own."""

    TYPE = 21
    KINDS = (U64, TXN)
    name: bytes


@dataclass(frozen=True, slots=True)
class Subscribe(Request):
    """Tell this connection of every commit of another connection's that changes one of
    the inodes inos (a Notice each), replacing what it subscribed to before."""

    TYPE = 22
    KINDS = (U64, U64S)
    inos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Lock(Request):
    """A shared or exclusive lock on bytes start..start+length-1 of inode ino (length
    0: to any end), for this connection; waits up to wait_ms for it (0: try once)."""

    TYPE = 23
    KINDS = (U64, U64, U64, U64, BOOL, U64)
    ino: int
    start: int
    length: int
    exclusive: bool
    wait_ms: int


@dataclass(frozen=True, slots=True)
class Unlock(Request):
    TYPE = 24
    KINDS = (U64, U64)
    token: int


@dataclass(frozen=True, slots=True)
class Renew(Request):
    """Every lock this connection holds lasts a lease from now."""

    TYPE = 25
    KINDS = (U64,)


@dataclass(frozen=True, slots=True)
class ReadLane(Request):
    """From its reply on, this connection only reads pages (ReadPages, ReadInode; any
    other request ends it): the server may serve it apart from its other connections,
    without their per-message costs. Page reads need no other request in between."""

    TYPE = 26
    KINDS = (U64,)


@dataclass(frozen=True, slots=True)
class HelloReply(Reply):
    TYPE = 64
    KINDS = (U64, U64, NONCE, BOOL)
    version: int
    server_nonce: bytes
    auth_required: bool


@dataclass(frozen=True, slots=True)
class AuthReply(Reply):
    TYPE = 65
    KINDS = (U64, BYTES)
    proof: bytes


@dataclass(frozen=True, slots=True)
class SegmentList(Reply):
    TYPE = 66
    KINDS = (U64, STRS)
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SegmentInfo(Reply):
    TYPE = 67
    KINDS = (U64, STR, U64, U64, U64)
    name: str
    size: int
    version: int
    stored_pages: int


@dataclass(frozen=True, slots=True)
class Pages(Reply):
    """Reply to ReadPages: the runs hold the stored pages; every other page is a hole."""

    TYPE = 68
    KINDS = (U64, STR, U64, U64, U64, RUNS)
    segment: str
    first: int
    count: int
    version: int
    runs: tuple[PageRun, ...]


@dataclass(frozen=True, slots=True)
class Staged(Reply):
    TYPE = 69
    KINDS = (U64, TXN, U64)
    txn: bytes
    staged_bytes: int


@dataclass(frozen=True, slots=True)
class Held(Reply):
    """Reply to Hold: the holds last lease_ms from now."""

    TYPE = 76
    KINDS = (U64, U64)
    lease_ms: int


@dataclass(frozen=True, slots=True)
class Claimed(Reply):
    """Reply to Claim: fenced says whether another connection held the name."""

    TYPE = 77
    KINDS = (U64, BOOL)
    fenced: bool


@dataclass(frozen=True, slots=True)
class Subscribed(Reply):
    """Reply to Subscribe: how many inodes the connection is subscribed to now."""

    TYPE = 78
    KINDS = (U64, U64)
    count: int


@dataclass(frozen=True, slots=True)
class Notice(Reply):
    """Unasked (req_id 0), to a connection subscribed to ino: a commit of another
    connection's changed it, and it is at version now. pages: the runs (first page,
    count) the commit wrote; empty: its attributes alone changed. whole: anything may
    have changed (its size, or more than one notice carries, or commits this
    connection fell behind on): drop all of it."""

    TYPE = 79
    KINDS = (U64, U64, U64, INO_VERSIONS, BOOL)
    ino: int
    version: int
    pages: tuple[tuple[int, int], ...]
    whole: bool


@dataclass(frozen=True, slots=True)
class Locked(Reply):
    """Reply to Lock: granted, with its fencing token (never handed out twice), its
    lease, and the inode's version when it was granted."""

    TYPE = 80
    KINDS = (U64, U64, U64, U64)
    token: int
    lease_ms: int
    version: int


@dataclass(frozen=True, slots=True)
class Unlocked(Reply):
    TYPE = 81
    KINDS = (U64,)


@dataclass(frozen=True, slots=True)
class Renewed(Reply):
    """Reply to Renew: how many locks the connection holds, and their lease from now."""

    TYPE = 82
    KINDS = (U64, U64, U64)
    count: int
    lease_ms: int


@dataclass(frozen=True, slots=True)
class ReadLaneOpen(Reply):
    """Reply to ReadLane: the connection reads pages only, from now on."""

    TYPE = 83
    KINDS = (U64,)


@dataclass(frozen=True, slots=True)
class Committed(Reply):
    """The versions are those the commit produced; replayed says it had happened before."""

    TYPE = 70
    KINDS = (U64, TXN, VERSIONS, BOOL)
    txn: bytes
    versions: tuple[tuple[str, int], ...]
    replayed: bool


@dataclass(frozen=True, slots=True)
class Aborted(Reply):
    TYPE = 71
    KINDS = (U64, TXN)
    txn: bytes


@dataclass(frozen=True, slots=True)
class ServerInfo(Reply):
    TYPE = 72
    KINDS = (U64, U64, U64, U64)
    capacity_bytes: int
    used_bytes: int
    segments: int


@dataclass(frozen=True, slots=True)
class Attrs(Reply):
    """An inode: mode holds its type; times in ns since the epoch; size in bytes (a
    symlink's: its target's length)."""

    TYPE = 73
    KINDS = (U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, TARGET)
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


@dataclass(frozen=True, slots=True)
class Entries(Reply):
    """Names of a directory with their inodes and modes; done: no name comes after."""

    TYPE = 74
    KINDS = (U64, ENTRIES, BOOL)
    entries: tuple[tuple[bytes, int, int], ...]
    done: bool


@dataclass(frozen=True, slots=True)
class Changed(Reply):
    """inodes: every inode the change touched and its new version; created: the numbers
    MakeNode handed out, in op order; replayed: it had happened before."""

    TYPE = 75
    KINDS = (U64, TXN, INO_VERSIONS, U64S, BOOL)
    txn: bytes
    inodes: tuple[tuple[int, int], ...]
    created: tuple[int, ...]
    replayed: bool


@dataclass(frozen=True, slots=True)
class Error(Reply):
    TYPE = 127
    KINDS = (U64, STR, STR)
    code: str
    message: str


REQUESTS: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Authenticate,
        ListSegments,
        StatSegment,
        CreateSegment,
        ResizeSegment,
        RenameSegment,
        DeleteSegment,
        ReadPages,
        StagePages,
        Commit,
        Abort,
        StatServer,
        Lookup,
        GetAttr,
        ReadDir,
        ReadInode,
        Change,
        StageInode,
        Hold,
        Claim,
        Subscribe,
        Lock,
        Unlock,
        Renew,
        ReadLane,
    )
}
REPLIES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        HelloReply,
        AuthReply,
        SegmentList,
        SegmentInfo,
        Pages,
        Staged,
        Committed,
        Aborted,
        ServerInfo,
        Attrs,
        Entries,
        Changed,
        Held,
        Claimed,
        Subscribed,
        Notice,
        Locked,
        Unlocked,
        Renewed,
        ReadLaneOpen,
        Error,
    )
}


# --- encoding -------------------------------------------------------------------------

# Frames at least this long are received into a buffer of their own and decoded in place.
LARGE_FRAME_BYTES = 64 * 1024
# Payloads at least this long are passed through as they are (no copy) rather than
# packed; see _bin_header.
_PASSTHROUGH_BYTES = 512


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def pack_parts(obj: object, out: list[Buffer]) -> None:
    """Append the msgpack encoding of obj to out, passing large byte strings through.

    obj is built of lists, tuples, ints, bools, strs and bytes-like values. Byte strings
    of _PASSTHROUGH_BYTES or more are appended as the very objects given, after their
    header, so page data is copied only when the parts are finally written.
    """
    if isinstance(obj, list | tuple) and all(type(item) is int for item in obj):
        out.append(msgpack.packb(obj))  # one part, not one per number (u64s)
    elif isinstance(obj, list | tuple):
        out.append(_array_header(len(obj)))
        for item in obj:
            pack_parts(item, out)
    elif isinstance(obj, bytes | bytearray | memoryview) and len(obj) >= _PASSTHROUGH_BYTES:
        out.append(_bin_header(len(obj)))
        out.append(obj)
    elif isinstance(obj, bytearray | memoryview):
        out.append(msgpack.packb(bytes(obj)))
    else:
        out.append(msgpack.packb(obj))


def unpack(data: Buffer) -> object:
    """Decode one msgpack value from untrusted bytes; RemoteProtocolError if it is not."""
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise _bad(f"not msgpack ({type(e).__name__}: {e})") from None


def unpack_in_place(data: Buffer) -> object:
    """Decode the msgpack subset this protocol uses, byte strings of a page or more as
    memoryviews of data (no copy). RemoteProtocolError on anything else."""
    view = memoryview(data)
    try:
        obj, pos = _unpack_at(view, 0, 0)
    except (IndexError, ValueError) as e:  # past the end; bad UTF-8
        raise _bad(f"not msgpack ({type(e).__name__}: {e})") from None
    if pos != len(view):
        raise _bad(f"{len(view) - pos} bytes after the message")
    return obj


_MAX_DEPTH = 8
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARRAY = {0xDC: 2, 0xDD: 4}


def _unpack_at(b: memoryview, pos: int, depth: int) -> tuple[object, int]:
    t = b[pos]
    pos += 1
    if t <= 0x7F:
        return t, pos
    n = -1
    if t in _UINT:
        size = _UINT[t]
        if pos + size > len(b):
            raise IndexError("truncated integer")
        return int.from_bytes(b[pos : pos + size], "big"), pos + size
    if t == 0xC2 or t == 0xC3:
        return t == 0xC3, pos
    if t == 0xC0:
        return None, pos
    if 0x90 <= t <= 0x9F or t in _ARRAY:
        if t in _ARRAY:
            size = _ARRAY[t]
            n, pos = int.from_bytes(b[pos : pos + size], "big"), pos + size
        else:
            n = t & 0x0F
        if depth >= _MAX_DEPTH:
            raise _bad(f"arrays nested more than {_MAX_DEPTH} deep")
        if n > len(b) - pos:
            raise IndexError(f"array of {n} items in {len(b) - pos} bytes")
        items = []
        for _ in range(n):
            item, pos = _unpack_at(b, pos, depth + 1)
            items.append(item)
        return items, pos
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
    elif t in _STR:
        size = _STR[t]
        n, pos = int.from_bytes(b[pos : pos + size], "big"), pos + size
    if n >= 0:
        if pos + n > len(b):
            raise IndexError("truncated string")
        return str(b[pos : pos + n], "utf-8"), pos + n
    if t in _BIN:
        size = _BIN[t]
        n, pos = int.from_bytes(b[pos : pos + size], "big"), pos + size
        if pos + n > len(b):
            raise IndexError("truncated byte string")
        data = b[pos : pos + n]
        return (data if n >= PAGE_SIZE else bytes(data)), pos + n
    raise _bad(f"msgpack type byte 0x{t:02x} is not used by this protocol")


def _check_pages(data: Buffer, what: str) -> None:
    if not data or len(data) % PAGE_SIZE:
        raise LocalProtocolError(f"{what}: {len(data)} bytes is not a whole number of pages")
    if len(data) > MAX_MESSAGE_PAGES * PAGE_SIZE:
        raise LocalProtocolError(f"{what}: at most {MAX_MESSAGE_PAGES} pages per message")


def _wire_payload(kind: str, value: object) -> tuple[object, int]:
    """A PAGES, RUNS or OPS field as it goes on the wire, and its bytes of page data;
    LocalProtocolError if it is not whole pages within the limits."""
    if kind == PAGES:
        assert isinstance(value, bytes | bytearray | memoryview)
        _check_pages(value, "page data")
        return value, len(value)
    if kind == RUNS:
        assert isinstance(value, tuple | list)
        total = 0
        for run in value:
            assert isinstance(run, PageRun)
            n = len(run.data)
            if not n or n % PAGE_SIZE or n > MAX_MESSAGE_PAGES * PAGE_SIZE:
                _check_pages(run.data, f"run at page {run.first} of {run.segment!r}")
            total += n
        _check_total(total, LocalProtocolError)
        return [(run.segment, run.first, run.data) for run in value], total
    assert kind == OPS and isinstance(value, tuple | list)
    total = sum(len(op.data) for op in value if isinstance(op, WritePages))
    _check_total(total, LocalProtocolError)
    return [op_to_item(op) for op in value], total


# Field names per message class, in wire order (dataclasses.fields per message is slow).
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {}
# Messages whose page payloads add up to less than this are packed in one call and their
# pages copied; larger ones are packed by parts and their pages passed through.
_COPY_BELOW = 32 * 1024
_PAYLOAD_KINDS = frozenset((PAGES, RUNS, OPS))


def encode_parts(msg: Message) -> list[Buffer]:
    """The frame for msg as a list of buffers to write in order.

    Page payloads of _COPY_BELOW bytes or more appear in the list as the very objects
    the message holds, so a caller that writes the parts one by one (or joins them once)
    copies page data only once; smaller messages are packed in one call.
    """
    cls = type(msg)
    values: list[object]
    if cls is Pages:
        assert isinstance(msg, Pages)
        runs, payload = _wire_payload(RUNS, msg.runs)
        values = [Pages.TYPE, msg.req_id, msg.segment, msg.first, msg.count, msg.version, runs]
    elif cls is ReadInode:
        assert isinstance(msg, ReadInode)
        values, payload = [ReadInode.TYPE, msg.req_id, msg.ino, msg.first, msg.count], 0
    else:
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
        values = [msg.TYPE]
        payload = 0
        for kind, name in zip(cls.KINDS, names, strict=True):
            value = getattr(msg, name)
            if kind in _PAYLOAD_KINDS:
                value, n = _wire_payload(kind, value)
                payload += n
            values.append(value)
    out: list[Buffer]
    if payload < _COPY_BELOW:
        out = [b"", msgpack.packb(values)]
    else:
        out = [b""]
        pack_parts(values, out)
    length = sum(len(p) for p in out)
    if length > MAX_FRAME_BYTES:
        raise LocalProtocolError(
            f"{type(msg).__name__} would need a {length}-byte frame; the limit is "
            f"{MAX_FRAME_BYTES} (at most {MAX_MESSAGE_PAGES} pages per message)"
        )
    out[0] = FRAME_HEADER.pack(length)
    return out


def encode(msg: Message) -> bytes:
    return b"".join(encode_parts(msg))


# --- decoding -------------------------------------------------------------------------


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed message: {what}")


def _check_u64s(*values: object) -> None:
    """Each of values is an unsigned 64-bit integer (one call for a message's numbers)."""
    for v in values:
        if type(v) is not int or not 0 <= v <= MAX_U64:
            raise _bad(f"expected an unsigned 64-bit integer, got {type(v).__name__}")


def _u64(v: object) -> int:
    _check_u64s(v)
    return cast(int, v)


def _str(v: object) -> str:
    if type(v) is not str:
        raise _bad(f"expected a string, got {type(v).__name__}")
    return v


def _bytes(v: object, limit: int | None = None) -> bytes:
    if type(v) is not bytes:
        raise _bad(f"expected bytes, got {type(v).__name__}")
    if limit is not None and not 0 < len(v) <= limit:
        raise _bad(f"expected 1..{limit} bytes, got {len(v)}")
    return v


def _pages(v: object) -> Buffer:
    data = v if type(v) is memoryview else _bytes(v)
    if not data or len(data) % PAGE_SIZE:
        raise _bad(f"page data of {len(data)} bytes is not a whole number of pages")
    _check_total(len(data), RemoteProtocolError)
    return data


def _check_total(nbytes: int, error: type[Exception]) -> None:
    if nbytes > MAX_MESSAGE_PAGES * PAGE_SIZE:
        raise error(
            f"{nbytes // PAGE_SIZE} pages in one message; at most {MAX_MESSAGE_PAGES} per message"
        )


def _list(v: object) -> list[object]:
    if type(v) is not list:
        raise _bad(f"expected an array, got {type(v).__name__}")
    return v


def _decode_field(kind: str, v: object) -> object:
    if kind == U64:
        return _u64(v)
    if kind == STR:
        return _str(v)
    if kind == BOOL:
        if type(v) is not bool:
            raise _bad(f"expected a boolean, got {type(v).__name__}")
        return v
    if kind == BYTES:
        return _bytes(v)
    if kind == TXN:
        return _bytes(v, MAX_TXN_ID_BYTES)
    if kind == NONCE:
        return _bytes(v, MAX_NONCE_BYTES)
    if kind == PAGES:
        return _pages(v)
    if kind == RUNS:
        runs = []
        for item in _list(v):
            parts = _list(item)
            if len(parts) != 3:
                raise _bad("a page run has 3 fields")
            runs.append(PageRun(_str(parts[0]), _u64(parts[1]), _pages(parts[2])))
        _check_total(sum(len(r.data) for r in runs), RemoteProtocolError)
        return tuple(runs)
    if kind == STRS:
        return tuple(_str(x) for x in _list(v))
    if kind == VERSIONS:
        out = []
        for item in _list(v):
            pair = _list(item)
            if len(pair) != 2:
                raise _bad("a version entry has 2 fields")
            out.append((_str(pair[0]), _u64(pair[1])))
        return tuple(out)
    if kind == NAME:
        return _name(v)
    if kind == TARGET:
        if type(v) is not bytes or len(v) > MAX_TARGET_BYTES:
            raise _bad(f"a symlink target is 0..{MAX_TARGET_BYTES} bytes")
        return v
    if kind == OPS:
        return _ops(v)
    if kind == ENTRIES:
        entries = []
        for item in _list(v):
            parts = _list(item)
            if len(parts) != 3:
                raise _bad("a directory entry has 3 fields")
            entries.append((_name(parts[0]), _u64(parts[1]), _u64(parts[2])))
        return tuple(entries)
    if kind == INO_VERSIONS:
        pairs = []
        for item in _list(v):
            pair = _list(item)
            if len(pair) != 2:
                raise _bad("an inode version has 2 fields")
            pairs.append((_u64(pair[0]), _u64(pair[1])))
        return tuple(pairs)
    if kind == U64S:
        return tuple(_u64(x) for x in _list(v))
    raise AssertionError(kind)  # pragma: no cover


def _name(v: object) -> bytes:
    if type(v) is not bytes or len(v) > MAX_NAME_BYTES:
        raise _bad(f"a name is 0..{MAX_NAME_BYTES} bytes")
    return v


def _ops(v: object) -> tuple[InodeOp, ...]:
    ops: list[InodeOp] = []
    for item in _list(v):
        parts = _list(item)
        if not parts or parts[0] not in INODE_OP_TAGS:
            raise _bad(f"an op of a Change is one of {sorted(INODE_OP_TAGS)}")
        try:
            op = item_to_op(parts)
        except (ValueError, TypeError, AssertionError) as e:
            raise _bad(f"a {parts[0]!r} op: {e}") from None
        assert isinstance(op, INODE_OPS)
        if isinstance(op, WritePages):
            _pages(op.data)
        ops.append(op)
    total = sum(len(op.data) for op in ops if isinstance(op, WritePages))
    _check_total(total, RemoteProtocolError)
    return tuple(ops)


def decode_body(body: Buffer, table: dict[int, type[Message]]) -> Message:
    """Decode one frame body (without its length prefix) into a message from table.

    A body of LARGE_FRAME_BYTES or more must be a view of a buffer owned by this message
    alone: its page payloads are returned as views of it, not copies.
    """
    items = _list(unpack(body) if len(body) < LARGE_FRAME_BYTES else unpack_in_place(body))
    if not items or type(items[0]) is not int:
        raise _bad("a message starts with its type number")
    cls = table.get(items[0])
    if cls is None:
        raise _bad(f"unknown message type {items[0]}")
    if len(items) != 1 + len(cls.KINDS):
        raise _bad(f"{cls.__name__} has {len(cls.KINDS)} fields, got {len(items) - 1}")
    fast = _FAST_DECODERS.get(cls)
    if fast is not None:
        return fast(items)
    return _decode_general(cls, items)


def _decode_general(cls: type[Message], items: list[Any]) -> Message:
    """items (type number first, of the right length) checked field by field as
    cls.KINDS says, and made a cls."""
    values: list[Any] = [
        # The common case (a number in range) checked here, without a call.
        v if k == U64 and type(v) is int and 0 <= v <= MAX_U64 else _decode_field(k, v)
        for k, v in zip(cls.KINDS, items[1:], strict=True)
    ]
    return cls(*values)


def _decode_read_inode(items: list[Any]) -> Message:
    """ReadInode (U64 fields only): the checks _decode_field makes, without a call per
    field. items has the right length (decode_body checked it)."""
    _check_u64s(*items)
    return ReadInode(*items[1:])


def _decode_read_pages(items: list[Any]) -> Message:
    """ReadPages (U64, STR, U64, U64): the checks _decode_field makes, inline."""
    _, req_id, segment, first, count = items
    _check_u64s(req_id, first, count)
    if type(segment) is not str:
        raise _bad(f"expected a string, got {type(segment).__name__}")
    return ReadPages(req_id, segment, first, count)


def _decode_pages_reply(items: list[Any]) -> Message:
    """Pages, the page path's reply: the checks _decode_field makes for its kinds (U64,
    STR, U64, U64, U64, RUNS), inline. items has the right length."""
    _, req_id, segment, first, count, version, runs = items
    _check_u64s(req_id, first, count, version)
    if type(segment) is not str:
        raise _bad(f"expected a string, got {type(segment).__name__}")
    if type(runs) is not list:
        raise _bad(f"expected an array, got {type(runs).__name__}")
    out = []
    total = 0
    for item in runs:
        if type(item) is not list:
            raise _bad(f"expected an array, got {type(item).__name__}")
        if len(item) != 3:
            raise _bad("a page run has 3 fields")
        name, at, data = item
        if type(name) is not str:
            raise _bad(f"expected a string, got {type(name).__name__}")
        _check_u64s(at)
        if type(data) is not memoryview and type(data) is not bytes:
            raise _bad(f"expected bytes, got {type(data).__name__}")
        n = len(data)
        if not n or n % PAGE_SIZE:
            raise _bad(f"page data of {n} bytes is not a whole number of pages")
        total += n
        out.append(PageRun(name, at, data))
    _check_total(total, RemoteProtocolError)
    return Pages(req_id, segment, first, count, version, tuple(out))


# Decoders for the messages on the page path, each making exactly the checks of the
# general one (decode_body) with fewer calls; test_10 holds them to that on hostile input.
_FAST_DECODERS: dict[type[Message], Callable[[list[Any]], Message]] = {
    ReadInode: _decode_read_inode,
    ReadPages: _decode_read_pages,
    Pages: _decode_pages_reply,
}


class Connection:
    """One end of a netmemfs connection: framing and message codec, no I/O.

    Bytes arrive through receive_data(). For a large frame (LARGE_FRAME_BYTES or more
    still missing) the caller may instead ask receive_buffer() for the place the rest of
    the frame goes, receive into it directly, and report received(n): page data then
    crosses from the kernel into its final buffer once, and the decoded message's page
    payloads are views of that buffer.
    """

    def __init__(self, role: Role, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._frame: bytearray | None = None  # a large frame being received in place
        self._fill = 0
        self._eof = False
        self.bytes_received = 0  # from the peer, framing included
        self._send_kind: type[Message] = Request if role is Role.CLIENT else Reply
        self._receive_table = REPLIES if role is Role.CLIENT else REQUESTS

    def send_parts(self, msg: Message) -> list[Buffer]:
        if not isinstance(msg, self._send_kind):
            raise LocalProtocolError(f"a {self.role.value} cannot send {type(msg).__name__}")
        return encode_parts(msg)

    def send(self, msg: Message) -> bytes:
        return b"".join(self.send_parts(msg))

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes read from the peer; b"" means the peer closed its side."""
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        frame = self._frame
        if frame is not None:
            take = min(len(data), len(frame) - self._fill)
            frame[self._fill : self._fill + take] = data[:take]
            self._fill += take
            data = data[take:]
        if data:
            self._buf += data

    def receive_buffer(self) -> memoryview | None:
        """A writable view for the rest of a large frame under way, else None."""
        if self._frame is None:
            if len(self._buf) < FRAME_HEADER.size:
                return None
            (length,) = FRAME_HEADER.unpack_from(self._buf)
            total = FRAME_HEADER.size + length
            if length > self.max_frame_bytes or total - len(self._buf) < LARGE_FRAME_BYTES:
                return None
            self._frame = bytearray(total)
            self._frame[: len(self._buf)] = self._buf
            self._fill = len(self._buf)
            self._buf.clear()
        return memoryview(self._frame)[self._fill :]

    def received(self, nbytes: int) -> None:
        """nbytes were written into the view receive_buffer() gave; 0 means EOF."""
        if nbytes == 0:
            self._eof = True
        else:
            assert self._frame is not None and self._fill + nbytes <= len(self._frame)
            self._fill += nbytes
            self.bytes_received += nbytes

    def mid_frame(self) -> bool:
        """Whether part of a frame has arrived and the rest has not."""
        return self._frame is not None or bool(self._buf)

    def message_ready(self) -> bool:
        """Whether next_event() has a whole frame (or the end of the stream) to give."""
        if self._eof:
            return True
        if self._frame is not None:
            return self._fill == len(self._frame)
        if len(self._buf) < FRAME_HEADER.size:
            return False
        (length,) = FRAME_HEADER.unpack_from(self._buf)
        return bool(length > self.max_frame_bytes or len(self._buf) >= FRAME_HEADER.size + length)

    def next_event(self) -> Message | Event:
        frame = self._frame
        if frame is not None:
            if self._fill == len(frame):
                self._frame = None
                return decode_body(memoryview(frame)[FRAME_HEADER.size :], self._receive_table)
        else:
            buf = self._buf
            if len(buf) >= FRAME_HEADER.size:
                (length,) = FRAME_HEADER.unpack_from(buf)
                if length > self.max_frame_bytes:
                    raise RemoteProtocolError(
                        f"frame of {length} bytes announced; the limit is {self.max_frame_bytes}"
                    )
                end = FRAME_HEADER.size + length
                if len(buf) >= end:
                    if length >= LARGE_FRAME_BYTES:
                        # Its own buffer, so page payloads can be views of it.
                        body: Buffer = bytearray(buf[FRAME_HEADER.size : end])
                        del buf[:end]
                        return decode_body(memoryview(body), self._receive_table)
                    with memoryview(buf) as view, view[FRAME_HEADER.size : end] as body:
                        msg = decode_body(body, self._receive_table)
                    del buf[:end]
                    return msg
        if self._eof:
            pending = len(self._buf) + (self._fill if frame is not None else 0)
            if pending:
                raise RemoteProtocolError(
                    f"connection closed in the middle of a frame ({pending} bytes pending)"
                )
            return CLOSED
        return NEED_DATA


def holes_and_runs(first: int, count: int, runs: Sequence[PageRun]) -> bytes:
    """Materialise a Pages reply as count pages of bytes, holes as zeros."""
    out = bytearray(count * PAGE_SIZE)
    for run in runs:
        off = (run.first - first) * PAGE_SIZE
        if off < 0 or off + len(run.data) > len(out):
            raise RemoteProtocolError(
                f"server sent pages {run.first}..{run.first + run.count - 1} of "
                f"{run.segment!r}, outside the requested {first}..{first + count - 1}"
            )
        out[off : off + len(run.data)] = run.data
    return bytes(out)


def coalesce(parts: Sequence[Buffer], direct_bytes: int = 64 * 1024) -> list[Buffer]:
    """Join runs of small parts so that a writer issues few calls; parts of direct_bytes
    or more are kept as they are (not copied)."""
    out: list[Buffer] = []
    small: list[Buffer] = []
    for part in parts:
        if len(part) >= direct_bytes:
            if small:
                out.append(b"".join(small))
                small = []
            out.append(part)
        else:
            small.append(part)
    if small:
        out.append(b"".join(small))
    return out
