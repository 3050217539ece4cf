"""userfaultfd from Python: a typed facade over netmemfs._uffd_cffi (the C in
netmemfs/_uffd_build.py, constants from include/netmem_uapi.h).

Where it sits: below the anonymous-region door (issue 4), beside journal.py and
remote.py; imports nothing above it. This module does not serve faults by itself; it
gives the door the kernel's operations with the kernel's names (copy, zeropage, wake,
writeprotect, poison) and turns the kernel's answers into outcomes or errors:

- EEXIST from copy/zeropage is an outcome (another fault installed the page), not an
  error; the caller must still wake the range (../shared/UFFD-PITFALLS.md).
- EAGAIN is an outcome too: the address space is changing; drain events, retry.
- A partial copy reports how much was copied; the caller retries the rest.
- Anything else (ENOENT included: a wrong range) raises UffdError naming the range.
"""

from __future__ import annotations

import enum
import errno
import os
import struct
from dataclasses import dataclass

from netmemfs._uffd_cffi import ffi, lib
from netmemfs.errors import NetmemError
from netmemfs.pages import PAGE_SIZE, Buffer

# Feature bits, as the kernel numbers them (see include/netmem_uapi.h).
FEATURE_PAGEFAULT_FLAG_WP: int = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
FEATURE_EVENT_FORK: int = lib.UFFD_FEATURE_EVENT_FORK
FEATURE_EVENT_REMAP: int = lib.UFFD_FEATURE_EVENT_REMAP
FEATURE_EVENT_REMOVE: int = lib.UFFD_FEATURE_EVENT_REMOVE
FEATURE_EVENT_UNMAP: int = lib.UFFD_FEATURE_EVENT_UNMAP
FEATURE_SIGBUS: int = lib.UFFD_FEATURE_SIGBUS
FEATURE_THREAD_ID: int = lib.UFFD_FEATURE_THREAD_ID
FEATURE_EXACT_ADDRESS: int = lib.UFFD_FEATURE_EXACT_ADDRESS
FEATURE_WP_UNPOPULATED: int = lib.UFFD_FEATURE_WP_UNPOPULATED
FEATURE_POISON: int = lib.UFFD_FEATURE_POISON
FEATURE_WP_ASYNC: int = lib.UFFD_FEATURE_WP_ASYNC
FEATURE_MOVE: int = lib.UFFD_FEATURE_MOVE

FEATURE_NAMES = {
    FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    FEATURE_EVENT_FORK: "EVENT_FORK",
    FEATURE_EVENT_REMAP: "EVENT_REMAP",
    FEATURE_EVENT_REMOVE: "EVENT_REMOVE",
    FEATURE_EVENT_UNMAP: "EVENT_UNMAP",
    FEATURE_SIGBUS: "SIGBUS",
    FEATURE_THREAD_ID: "THREAD_ID",
    FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS",
    FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    FEATURE_POISON: "POISON",
    FEATURE_WP_ASYNC: "WP_ASYNC",
    FEATURE_MOVE: "MOVE",
}

_MSG = struct.Struct("=B3xI24s")  # struct uffd_msg: event, reserved, the 24-byte arg
_PAGEFAULT = struct.Struct("=QQI4x")  # flags, address, ptid
_RANGE = struct.Struct("=QQ8x")  # remove/unmap: start, end
assert _MSG.size == lib.UFFD_MSG_BYTES == 32


class UffdError(NetmemError):
    """A userfaultfd operation failed in a way that is not an expected outcome."""


class UffdUnavailable(UffdError):
    errno = errno.EPERM


def explain_unavailable(dev_errno: int, sys_errno: int) -> str:
    """What failed when opening a userfaultfd, and how to enable one (the text libnetmem
    gives too: lib/uffd_open.h)."""
    buf = ffi.new("char[]", 1024)
    lib.nm_uffd_explain(buf, 1024, dev_errno, sys_errno)
    return str(ffi.string(buf).decode())


class Outcome(enum.Enum):
    DONE = "done"  # installed (see count for a partial copy)
    EXISTS = "exists"  # someone else installed the page: wake the range anyway
    AGAIN = "again"  # the address space is changing: drain events, retry


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    count: int = 0  # bytes handled when DONE


@dataclass(frozen=True, slots=True)
class PageFault:
    address: int
    write: bool
    wp: bool
    thread: int


@dataclass(frozen=True, slots=True)
class RangeEvent:
    kind: str  # "remove" or "unmap"
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class OtherEvent:
    kind: int


Event = PageFault | RangeEvent | OtherEvent


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret
        raise UffdError(f"{what}: {os.strerror(err)} (errno {err})")
    return ret


class Userfaultfd:
    """One userfaultfd after its API handshake. Not thread-safe; close() it."""

    def __init__(self, fd: int, features: int, ioctls: int, how: str) -> None:
        self.fd = fd
        self.features = features
        self.ioctls = ioctls
        self.how = how

    @classmethod
    def open(cls, features: int = 0, *, user_mode_only: bool = False) -> Userfaultfd:
        """Open one asking for features; raise UffdUnavailable (saying how to enable it)
        when neither /dev/userfaultfd nor the system call is allowed."""
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        if user_mode_only:
            flags |= lib.UFFD_USER_MODE_ONLY
        dev_errno, sys_errno, how = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
        fd = lib.nm_uffd_open(flags, dev_errno, sys_errno, how)
        if fd < 0:
            raise UffdUnavailable(explain_unavailable(dev_errno[0], sys_errno[0]))
        got, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        ret = lib.nm_uffd_api(fd, features, got, ioctls)
        if ret < 0:
            os.close(fd)
            missing = features & ~probe_features()
            names = [n for bit, n in FEATURE_NAMES.items() if missing & bit]
            raise UffdUnavailable(
                f"userfaultfd refused the features {names or hex(features)}: "
                f"{os.strerror(-ret)}; this kernel lacks them"
            )
        return cls(
            fd, int(got[0]), int(ioctls[0]), "/dev/userfaultfd" if how[0] == 1 else "syscall"
        )

    def has(self, feature: int) -> bool:
        return self.features & feature == feature

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, start: int, length: int, *, missing: bool = True, wp: bool = False) -> int:
        """Register [start, start+length) (page-aligned); return the ioctls allowed."""
        mode = (lib.UFFDIO_REGISTER_MODE_MISSING if missing else 0) | (
            lib.UFFDIO_REGISTER_MODE_WP if wp else 0
        )
        ioctls = ffi.new("uint64_t *")
        _check(
            lib.nm_uffd_register(self.fd, start, length, mode, ioctls),
            _what("register", start, length),
        )
        return int(ioctls[0])

    def unregister(self, start: int, length: int) -> None:
        _check(lib.nm_uffd_unregister(self.fd, start, length), _what("unregister", start, length))

    def copy(self, dst: int, data: Buffer, *, wake: bool = True, wp: bool = False) -> Result:
        """Install data (whole pages) at dst, which must lie in a registered range."""
        mode = (0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE) | (
            lib.UFFDIO_COPY_MODE_WP if wp else 0
        )
        # from_buffer keeps data alive and pinned for the duration of the call; the
        # kernel reads len(data) bytes from it and writes only into dst's range.
        src = ffi.from_buffer(data)
        return _outcome(
            lib.nm_uffd_copy(self.fd, dst, src, len(data), mode), "copy", dst, len(data)
        )

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> Result:
        mode = 0 if wake else lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        return _outcome(
            lib.nm_uffd_zeropage(self.fd, start, length, mode), "zeropage", start, length
        )

    def wake(self, start: int, length: int) -> None:
        _check(lib.nm_uffd_wake(self.fd, start, length), _what("wake", start, length))

    def writeprotect(self, start: int, length: int, protect: bool, *, wake: bool = True) -> None:
        mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            0 if wake else lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        )
        ret = lib.nm_uffd_writeprotect(self.fd, start, length, mode)
        _check(ret, _what("writeprotect", start, length))

    def poison(self, start: int, length: int) -> Result:
        """Make the range raise SIGBUS on access (the fail-closed answer)."""
        return _outcome(lib.nm_uffd_poison(self.fd, start, length, 0), "poison", start, length)

    def read_events(self, max_events: int = 64) -> list[Event]:
        """The events waiting now ([] if none; the fd is non-blocking)."""
        while True:
            try:
                raw = os.read(self.fd, max_events * _MSG.size)
                break
            except BlockingIOError:
                return []
            except InterruptedError:  # a signal (a profiler's SIGPROF): read again
                continue
        events: list[Event] = []
        for off in range(0, len(raw), _MSG.size):
            kind, _, arg = _MSG.unpack_from(raw, off)
            if kind == lib.UFFD_EVENT_PAGEFAULT:
                flags, address, ptid = _PAGEFAULT.unpack(arg)
                events.append(
                    PageFault(
                        address,
                        bool(flags & lib.UFFD_PAGEFAULT_FLAG_WRITE),
                        bool(flags & lib.UFFD_PAGEFAULT_FLAG_WP),
                        ptid,
                    )
                )
            elif kind in (lib.UFFD_EVENT_REMOVE, lib.UFFD_EVENT_UNMAP):
                start, end = _RANGE.unpack(arg)
                name = "remove" if kind == lib.UFFD_EVENT_REMOVE else "unmap"
                events.append(RangeEvent(name, start, end))
            else:
                events.append(OtherEvent(kind))
        return events


def probe_features() -> int:
    """The feature bits this kernel offers (0 if userfaultfd cannot be opened)."""
    try:
        with Userfaultfd.open(0) as u:
            return u.features
    except UffdUnavailable:
        return 0


class AnonMapping:
    """A private anonymous mapping made with mmap(2), checked against MAP_FAILED."""

    def __init__(self, length: int) -> None:
        if length <= 0 or length % PAGE_SIZE:
            raise ValueError(f"mapping length {length} is not a positive number of pages")
        err = ffi.new("int *")
        ptr = lib.nm_mmap_anon(length, err)
        if ptr == ffi.NULL:
            raise UffdError(f"mmap of {length} bytes failed: {os.strerror(err[0])}")
        self._ptr = ptr
        self.address = int(ffi.cast("uintptr_t", ptr))
        self.length = length

    def buffer(self) -> memoryview:
        """The mapping's bytes. Valid until close(); touching an unserved page of a
        registered range blocks this thread until the fault is served."""
        return memoryview(ffi.buffer(self._ptr, self.length))

    def dontneed(self, offset: int, length: int) -> None:
        """madvise(MADV_DONTNEED): drop the pages; a registered range sees a REMOVE
        event (with FEATURE_EVENT_REMOVE) and later faults them in again.

        With that feature the call blocks until the uffd's reader has read the event:
        never call it from the thread that reads the events (it would wait forever).
        """
        ret = lib.nm_madvise(self._ptr + offset, length, lib.MADV_DONTNEED)
        _check(ret, _what("madvise", self.address + offset, length))

    def close(self) -> None:
        if self.length:
            _check(
                lib.nm_munmap(self._ptr, self.length), _what("munmap", self.address, self.length)
            )
            self.length = 0


def _what(op: str, start: int, length: int) -> str:
    return f"UFFDIO {op} of {length} bytes at {start:#x}"


def _outcome(ret: int, op: str, start: int, length: int) -> Result:
    if ret == -errno.EEXIST:
        return Result(Outcome.EXISTS)
    if ret == -errno.EAGAIN:
        return Result(Outcome.AGAIN)
    return Result(Outcome.DONE, _check(ret, _what(op, start, length)))
