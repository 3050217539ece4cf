"""The one exception hierarchy of netmemfs.

Where it sits: below everything; imported by every layer, imports nothing of ours.
Each class carries the errno a door (FUSE, the C library) turns it into, and the wire
code the server sends in an error reply, so a server-side failure arrives at the client
as the same class. Messages name the segment, page or server and say what to do.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar


class NetmemError(Exception):
    """Base of every error netmemfs raises on purpose."""

    errno: ClassVar[int] = _errno.EIO
    code: ClassVar[str] = "internal"


class SegmentNotFound(NetmemError):
    errno = _errno.ENOENT
    code = "not_found"


class SegmentExists(NetmemError):
    errno = _errno.EEXIST
    code = "exists"


class InvalidName(NetmemError):
    errno = _errno.EINVAL
    code = "invalid_name"


class OutOfRange(NetmemError):
    """A page or size outside what the segment or the protocol allows."""

    errno = _errno.EINVAL
    code = "out_of_range"


class NoSpace(NetmemError):
    errno = _errno.ENOSPC
    code = "no_space"


class TooLarge(NetmemError):
    """A message, transaction or request past a configured limit."""

    errno = _errno.E2BIG
    code = "too_large"


class Busy(NetmemError):
    """The server is at a limit that frees up by itself (--max-connections)."""

    errno = _errno.EAGAIN
    code = "busy"


class TimedOut(NetmemError):
    """A peer was idle, or too slow to send or take a message, past a configured timeout."""

    errno = _errno.ETIMEDOUT
    code = "timeout"


class UnknownTransaction(NetmemError):
    errno = _errno.EINVAL
    code = "unknown_txn"


class AuthFailed(NetmemError):
    errno = _errno.EACCES
    code = "auth"


class ServerUnreachable(NetmemError):
    """No connection could be made or kept within the retry window."""

    errno = _errno.EIO
    code = "unreachable"


class ProtocolError(NetmemError):
    errno = _errno.EPROTO
    code = "protocol"


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid message."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug of ours)."""


class VersionMismatch(ProtocolError):
    code = "version"


class Stale(NetmemError):
    """An inode that no longer exists: deleted, by this client or another. A commit to it
    is refused, so it can never land in another file."""

    errno = _errno.ESTALE
    code = "stale"


class Fenced(NetmemError):
    """A commit from a connection whose claim another connection has since taken
    (protocol Claim): its sender was replaced, and its late commit must not land."""

    errno = _errno.ESTALE
    code = "fenced"


class Conflict(NetmemError):
    """An optimistic commit (Expect) found the file at another version than it was
    based on: another commit came first. current: that version (when known)."""

    errno = _errno.ECANCELED
    code = "conflict"

    def __init__(self, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.current = current


class WouldBlock(NetmemError):
    """A lock was not granted within the time the request would wait."""

    errno = _errno.EAGAIN
    code = "would_block"


class NotHeld(NetmemError):
    """A lock released or renewed that the client does not hold (any more)."""

    errno = _errno.ENOLCK
    code = "not_held"


class Unsupported(NetmemError):
    """The store the client uses cannot do this (yet): a Redis store and locks, say.
    The message names the store and what to use instead."""

    errno = _errno.EOPNOTSUPP
    code = "unsupported"


class NotADirectory(NetmemError):
    errno = _errno.ENOTDIR
    code = "not_dir"


class IsADirectory(NetmemError):
    errno = _errno.EISDIR
    code = "is_dir"


class NotEmpty(NetmemError):
    errno = _errno.ENOTEMPTY
    code = "not_empty"


class NameTooLong(NetmemError):
    errno = _errno.ENAMETOOLONG
    code = "name_too_long"


class NotPermitted(NetmemError):
    """What POSIX forbids outright, such as a hard link to a directory."""

    errno = _errno.EPERM
    code = "not_permitted"


class TooManyLinks(NetmemError):
    errno = _errno.EMLINK
    code = "too_many_links"


class InvalidMove(NetmemError):
    """A rename POSIX refuses with EINVAL: a directory into itself, '.' or '..'."""

    errno = _errno.EINVAL
    code = "invalid_move"


class ServerError(NetmemError):
    """The server failed in a way it could not classify; see its log."""

    code = "internal"


_BY_CODE: dict[str, type[NetmemError]] = {
    cls.code: cls
    for cls in (
        SegmentNotFound,
        SegmentExists,
        InvalidName,
        OutOfRange,
        NoSpace,
        TooLarge,
        Busy,
        TimedOut,
        UnknownTransaction,
        AuthFailed,
        ProtocolError,
        VersionMismatch,
        Stale,
        Fenced,
        Conflict,
        WouldBlock,
        NotHeld,
        Unsupported,
        NotADirectory,
        IsADirectory,
        NotEmpty,
        NameTooLong,
        NotPermitted,
        TooManyLinks,
        InvalidMove,
        ServerError,
    )
}


def error_for_code(code: str) -> type[NetmemError]:
    """The class a wire error code stands for; unknown codes become ServerError."""
    return _BY_CODE.get(code, ServerError)
