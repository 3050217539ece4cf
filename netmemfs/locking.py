"""Locks and optimistic commits across machines on files of a netmemfs mount
(docs/semantics.md, "Locks across machines" and "Optimistic commits").

    import netmemfs

    with netmemfs.lock("/mnt/nm/counter", 0, 4096, exclusive=True):
        ...  # read and write the range (through a mapping or read/write)
    # leaving the block commits the file (fsync) under the lock, then releases it

The server grants the lock; every mount sees it. Taking it brings this machine's view
of the file up to date with everything committed under the locks before it; a commit
made while holding it names it, so if the lock is lost (its lease ran out while this
machine was cut off) the commit is refused and the fsync fails, rather than overwrite
the next holder's work. The lock belongs to this process: it is released when the
process exits, however it exits.

The mount daemon takes it on the process's behalf: the request is a getxattr of
`user.netmemfs.lock.<x|s>.<start>.<length>.<wait ms>` on the file, answered with the
token; `user.netmemfs.unlock.<token>` releases it. So any program can, in any language
(C: netmem_lock_file in netmem.h).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from netmemfs.errors import Conflict, Fenced, NetmemError, NotHeld, WouldBlock

LOCK_XATTR = "user.netmemfs.lock."
UNLOCK_XATTR = "user.netmemfs.unlock."
VERSION_XATTR = "user.netmemfs.version"
EXPECT_XATTR = "user.netmemfs.expect."
DEFAULT_WAIT_S = 60.0


@dataclass(frozen=True)
class Held:
    """A lock this process holds: its fencing token."""

    path: str
    token: int


def acquire(
    path: str | os.PathLike[str],
    start: int = 0,
    length: int = 0,
    *,
    exclusive: bool = True,
    wait_s: float = DEFAULT_WAIT_S,
) -> Held:
    """Lock bytes start..start+length-1 of the file at path (length 0: to any end),
    waiting up to wait_s (WouldBlock past that; 0: try once)."""
    if start < 0 or length < 0 or wait_s < 0:
        raise ValueError("start, length and wait_s must not be negative")
    kind = "x" if exclusive else "s"
    name = f"{LOCK_XATTR}{kind}.{start}.{length}.{int(wait_s * 1000)}"
    try:
        token = os.getxattr(path, name)
    except OSError as e:
        raise _error(e, path, f"{'an exclusive' if exclusive else 'a shared'} lock") from None
    return Held(os.fspath(path), int(token))


def release(held: Held) -> None:
    try:
        os.getxattr(held.path, f"{UNLOCK_XATTR}{held.token}")
    except OSError as e:
        raise _error(e, held.path, f"lock {held.token}") from None


@contextmanager
def lock(
    path: str | os.PathLike[str],
    start: int = 0,
    length: int = 0,
    *,
    exclusive: bool = True,
    wait_s: float = DEFAULT_WAIT_S,
    commit: bool = True,
) -> Iterator[Held]:
    """Hold a lock for the block; on leaving it, commit the file (commit=True: its
    changes made by this machine, mappings included, land under the lock) and release.
    A commit refused because the lock was lost raises Fenced; the lock is released
    either way."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held = acquire(path, start, length, exclusive=exclusive, wait_s=wait_s)
        try:
            yield held
            if commit:
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise _error(e, path, f"the commit under lock {held.token}") from None
        except BaseException:
            # What went wrong first is what the caller hears of (a lost lock cannot
            # be released either).
            with contextlib.suppress(NetmemError):
                release(held)
            raise
        release(held)
    finally:
        os.close(fd)


def version(path: str | os.PathLike[str]) -> int:
    """The version of the file that this machine's view of it shows (what reads and
    mappings here return). Pass it to commit_if after changing the file."""
    try:
        return int(os.getxattr(path, VERSION_XATTR))
    except OSError as e:
        raise _error(e, path, "the version") from None


def commit_if(path: str | os.PathLike[str], based_on: int) -> int:
    """Commit the file's changes made on this machine (as fsync does) only if no other
    commit came since version based_on; the new version. Conflict (with .current) if
    one did: the changes are dropped, and the file here shows the current contents,
    to read again and retry from."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            os.getxattr(path, f"{EXPECT_XATTR}{based_on}")
            os.fsync(fd)
        except OSError as e:
            if e.errno != errno.ECANCELED:
                raise _error(e, path, "the commit") from None
            current = version(path)
            raise Conflict(
                f"commit to {os.fspath(path)} refused: it was based on version {based_on}, "
                f"and another commit made it {current}; the changes are dropped: read the "
                "file again and retry",
                current,
            ) from None
    finally:
        os.close(fd)
    return version(path)


def _error(e: OSError, path: str | os.PathLike[str], what: str) -> NetmemError:
    where = os.fspath(path)
    if e.errno == errno.EAGAIN:
        return WouldBlock(f"{what} on {where} was not granted in time: another client holds it")
    if e.errno == errno.ENOLCK:
        return NotHeld(f"{what} on {where} is not held by this process (lost or released)")
    if e.errno == errno.ESTALE:
        return Fenced(
            f"{what} on {where} was refused: the lock was lost (its lease ran out) and may "
            "be another client's now; the changes made under it are dropped"
        )
    if e.errno in (errno.ENOTSUP, errno.ENODATA):
        return NetmemError(
            f"{where} cannot be locked: it is not a file of a netmemfs mount, or its "
            "mount's store does not support locks (a Redis store: the mount's log says so)"
        )
    return NetmemError(f"{what} on {where} failed: {e.strerror}")
