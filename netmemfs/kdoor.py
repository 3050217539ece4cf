"""The kernel module's door: serve /dev/netmem's page faults and syncs (issue 5).

Where it sits: beside fs.py and agent.py, above remote.py. kmod/netmem.c turns a fault on
a mapped /dev/netmem area into a request; this module is the page provider that reads
those requests from the device (NETMEM_IOC_PROVIDE) and writes the answers back:

    OPEN          find the area's file by path (its "segment"), or make it with the
                  area's size; the area reads and commits by its inode number from then
    FETCH         one page: its data, or "hole" (the kernel leaves the page zeroed)
    COMMIT_PAGES  pages of a sync, 64 at a time, kept here until...
    COMMIT_END    ...written to the area's journal and committed as one transaction
                  (core.FileCore, as the other doors commit: exactly once, by inode)
    COMMIT_ABORT  the kernel gave up on a sync: drop it unless it is on its way

The layouts come from include/netmem_uapi.h through the cffi module. Requests are
answered concurrently; the kernel matches answers by id, except that the syncs of one
area are committed one after the other, in the order their COMMIT_END arrived: sync N
has landed or failed before sync N+1 is sent, so an older sync the kernel gave up on can
never land after a newer one (the journal's rule: a commit whose outcome is unknown, one
that timed out say, is sent again under its own id before anything newer). A sync the
kernel aborts before its turn is dropped; one already on its way lands or fails before
the area's next.

The module names an area's file by path in every request; the daemon keeps the inode it
found at OPEN for each area (by the module's area id). A daemon started while areas are
mapped (a restart) finds their files by path again, at their first request, without
making them: a file removed meanwhile is then stale (docs/kmod.md). The journal is not
kept across daemons: the kernel keeps the pages of a sync that failed dirty, and sends
them again. So that a commit a dead (or cut-off) daemon had sent cannot land after its
successor's, every daemon of a machine claims one name at the server (device_claim,
protocol Claim): the server refuses what the older connection had not yet applied.

The daemon names the store it serves when it becomes the provider (store_name): the
module serves an area only by daemons of the store that attached it, so a daemon started
for another server never sees, or commits to, the areas of the first.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio

from netmemfs._trio_util import open_quiet_nursery
from netmemfs._uffd_cffi import ffi, lib
from netmemfs.connect import connect_store
from netmemfs.core import DoorCounters, FileCore, resolve
from netmemfs.errors import NetmemError
from netmemfs.pages import PAGE_SIZE, consecutive
from netmemfs.protocol import Notice
from netmemfs.store import Store

log = logging.getLogger("netmemfs.kdoor")

DEFAULT_DEVICE = Path("/dev/netmem")
_MSG = ffi.sizeof("struct netmem_msg")
_NUMBERS = lib.NETMEM_CHUNK_PAGES * 8


class DeviceError(NetmemError):
    """/dev/netmem cannot be served; the message says why and what to do."""


# How soon an invalidation that a sync of its area put off is asked for again.
INVALIDATE_RETRY_S = 0.02

# Areas whose file the daemon keeps (one FileCore each); past it, idle ones are
# forgotten, to be found by path again at their next request.
MAX_AREAS = 65536


@dataclass
class _Commit:
    """The pages of one sync of one area, as they arrive."""

    segment: str
    pages: dict[int, bytes] = field(default_factory=dict)


def store_name(server: str) -> str:
    """The name the module knows a store by (NETMEM_IOC_PROVIDE): server as written, or
    a digest of it if it does not fit the module's 63 printable bytes."""
    raw = server.encode()
    if 0 < len(raw) < lib.NETMEM_SEGMENT_MAX and server.isprintable() and "/" not in server:
        return server
    return "sha256-" + hashlib.sha256(raw).hexdigest()[:40]


def device_claim() -> bytes:
    """The name this machine's device daemons claim at a server (protocol Claim), the
    same for each of them: the machine's id, or this boot's where it has none."""
    for source in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            ident = Path(source).read_text().strip()
        except OSError:
            continue
        if ident:
            return b"netmem-device:" + ident.encode()[:48]
    raise DeviceError(
        "this machine has neither /etc/machine-id nor a boot id, which name its device "
        "daemon at the server; create /etc/machine-id (systemd-machine-id-setup)"
    )


@contextmanager
def open_device(path: Path, store: str) -> Iterator[int]:
    """The device, opened as its page provider for store (store_name)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceError(
            f"{path} does not exist: load the module first (insmod kmod/netmem.ko; docs/kmod.md)"
        ) from None
    except PermissionError:
        raise DeviceError(f"{path} is mode 0600: serve it as root") from None
    try:
        provide = ffi.new("struct netmem_provide *")
        provide.store = store_name(store).encode()
        try:
            fcntl.ioctl(fd, lib.NETMEM_IOC_PROVIDE, bytes(ffi.buffer(provide)))
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceError(f"another daemon already serves {path}; stop it first") from None
            raise DeviceError(f"cannot serve {path}: {e.strerror}") from None
        yield fd
    finally:
        os.close(fd)


class DeviceProvider:
    """Answers the module's requests with one server's pages."""

    def __init__(
        self,
        store: Store,
        fd: int,
        journal_dir: Path,
        *,
        commit_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.fd = fd
        self.journal_dir = journal_dir
        self.areas: dict[int, FileCore] = {}  # by the module's area id
        self.counters = DoorCounters()  # of every area's FileCore
        self.commits: dict[tuple[int, int], _Commit] = {}
        # How long one commit may take before the sync fails (its outcome is then
        # unknown; the kernel marks the pages dirty again, and the next sync of the
        # area is committed after this one is given up).
        self.commit_timeout_s = commit_timeout_s
        # area -> set when the area's last commit so far has landed or failed
        self.last_commit: dict[int, trio.Event] = {}
        # (area, commit) -> the scope of a commit waiting for its turn, which an abort
        # cancels
        self.queued: dict[tuple[int, int], trio.CancelScope] = {}
        # area -> its listener of other clients' commits (Store.listen)
        self.listening: dict[int, Callable[[Notice | None], None]] = {}
        self.nursery: trio.Nursery | None = None  # serve()'s

    async def serve(self) -> None:
        """Read and answer requests until cancelled (or the device fails)."""
        buf = bytearray(lib.NETMEM_MSG_BYTES)
        async with open_quiet_nursery() as nursery:
            self.nursery = nursery
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    n = os.readv(self.fd, [buf])
                except BlockingIOError:
                    continue
                if n < _MSG:
                    raise DeviceError(f"the module sent a request of {n} bytes")
                msg = ffi.from_buffer("struct netmem_msg *", buf)
                req_id, kind, area = int(msg.id), int(msg.type), int(msg.area)
                segment = ffi.string(msg.segment).decode("utf-8", "replace")
                if kind == lib.NETMEM_MSG_OPEN:
                    nursery.start_soon(self._open, req_id, area, segment, int(msg.size))
                elif kind == lib.NETMEM_MSG_FETCH:
                    nursery.start_soon(
                        self._fetch, req_id, area, segment, int(msg.size), int(msg.page)
                    )
                elif kind == lib.NETMEM_MSG_COMMIT_PAGES:
                    self._stage(area, int(msg.commit), segment, int(msg.count), buf)
                elif kind == lib.NETMEM_MSG_COMMIT_END:
                    key = (area, int(msg.commit))
                    commit = self.commits.pop(key, _Commit(segment))
                    # The order is taken here, in the reading loop, not by the tasks.
                    before = self.last_commit.get(area)
                    done = self.last_commit[area] = trio.Event()
                    scope = self.queued[key] = trio.CancelScope()
                    nursery.start_soon(
                        self._commit_after,
                        key,
                        scope,
                        before,
                        done,
                        req_id,
                        commit,
                        int(msg.count),
                        int(msg.size),
                    )
                elif kind == lib.NETMEM_MSG_COMMIT_ABORT:
                    self._abort((area, int(msg.commit)), segment)
                else:
                    log.error("ignoring a request of unknown type %d from the module", kind)

    def _reply(
        self, req_id: int, status: int = 0, data: bytes = b"", *, hole: bool = False
    ) -> None:
        """Answer request req_id: status is 0 or an errno; data is a fetched page."""
        reply = ffi.new("struct netmem_reply *")
        reply.id = req_id
        reply.status = -status
        reply.flags = lib.NETMEM_REPLY_HOLE if hole else 0
        out = bytes(ffi.buffer(reply)) + data
        try:
            os.write(self.fd, out)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            # The faulting task gave up (timeout, killed) before the answer came.
            log.info("request %d was withdrawn before its answer", req_id)

    async def _open(self, req_id: int, area: int, segment: str, size: int) -> None:
        try:
            await self._file(area, segment, size, create=True)
        except NetmemError as e:
            log.warning("cannot attach an area to segment %r: %s", segment, e)
            self._reply(req_id, e.errno)
            return
        self._reply(req_id)

    async def _file(self, area: int, segment: str, size: int, *, create: bool) -> FileCore:
        """The file of area: found at its OPEN, or (an area this daemon did not see
        attach) found by path now, never made."""
        core = self.areas.get(area)
        if core is not None:
            return core
        st = await resolve(self.store, segment, size, create=create)
        core = self.areas.get(area)  # found meanwhile by another request of the area
        if core is None:
            self._forget_idle()
            core = FileCore.of(
                self.store,
                st,
                segment,
                self.journal_dir,
                timeout_s=self.commit_timeout_s,
                counters=self.counters,
            )
            self.areas[area] = core
            # Other clients' commits to the file drop the area's clean pages.
            self.listening[area] = self._listener(area, core)
            self.store.listen(core.ino, self.listening[area])
        return core

    def _listener(self, area: int, core: FileCore) -> Callable[[Notice | None], None]:
        def changed(notice: Notice | None) -> None:
            runs = [(0, 1 << 62)] if notice is None or notice.whole else list(notice.pages)
            if self.nursery is not None:
                with suppress(RuntimeError):  # the daemon is ending
                    self.nursery.start_soon(self._invalidate, area, runs)

        return changed

    async def _invalidate(self, area: int, runs: list[tuple[int, int]]) -> None:
        """Have the module drop the area's clean pages in runs; while a sync of the area
        holds them (EBUSY), ask again, for up to the commit timeout."""
        arg = ffi.new("struct netmem_invalidate *")
        arg.area = area
        deadline = trio.current_time() + self.commit_timeout_s
        for first, count in runs:
            arg.first, arg.count = first, count
            while True:
                try:
                    fcntl.ioctl(self.fd, lib.NETMEM_IOC_INVALIDATE, bytes(ffi.buffer(arg)))
                    break
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        return  # the area is gone
                    if e.errno != errno.EBUSY or trio.current_time() > deadline:
                        log.warning(
                            "could not drop pages %d+%d of area %d after another "
                            "client's commit: %s",
                            first,
                            count,
                            area,
                            e.strerror,
                        )
                        return
                # A sync of the area keeps its pages until it knows its outcome.
                await trio.sleep(INVALIDATE_RETRY_S)

    def _forget_idle(self) -> None:
        """Keep at most MAX_AREAS files: forget the oldest with nothing to commit."""
        excess = len(self.areas) - MAX_AREAS + 1
        for area, core in list(self.areas.items()):
            if excess <= 0:
                return
            if core.journal.settled() and not core.commit_lock.locked():
                core.journal.discard()
                del self.areas[area]
                self.store.unlisten(core.ino, self.listening.pop(area))
                excess -= 1

    async def _fetch(self, req_id: int, area: int, segment: str, size: int, page: int) -> None:
        try:
            core = await self._file(area, segment, size, create=False)
            (data,) = await core.read(page, 1)
        except NetmemError as e:
            log.warning("fetch of page %d of %r failed: %s", page, segment, e)
            self._reply(req_id, e.errno)
            return
        if data is not None:
            self._reply(req_id, 0, bytes(data))
        else:
            self._reply(req_id, hole=True)  # the kernel's page stays zeroed

    def _stage(self, area: int, commit: int, segment: str, count: int, buf: bytearray) -> None:
        staged = self.commits.get((area, commit))
        if staged is None:
            # An earlier sync of this area that never reached COMMIT_END (the kernel
            # gave up on it) will not: drop its pages.
            for key in [k for k in self.commits if k[0] == area]:
                del self.commits[key]
            staged = self.commits[(area, commit)] = _Commit(segment)
        view = memoryview(buf)
        numbers = view[_MSG : _MSG + _NUMBERS].cast("Q")
        data = _MSG + _NUMBERS
        for k in range(count):
            start = data + k * PAGE_SIZE
            staged.pages[int(numbers[k])] = bytes(view[start : start + PAGE_SIZE])

    def _abort(self, key: tuple[int, int], segment: str) -> None:
        """The kernel gave up on sync key[1] of area key[0] and marked its pages dirty
        again: drop what is not sent. A commit already on its way cannot be called back;
        it lands or fails before the area's next one, which carries the pages anew."""
        staged = self.commits.pop(key, None)
        scope = self.queued.pop(key, None)
        if scope is not None:
            scope.cancel()
            log.info("sync %d of %r was given up by the kernel; dropped", key[1], segment)
        elif staged is None and key[0] in self.last_commit:
            log.info(
                "sync %d of %r was given up by the kernel while its commit was on the way; "
                "it lands or fails before the next sync of the area",
                key[1],
                segment,
            )

    async def _commit_after(
        self,
        key: tuple[int, int],
        scope: trio.CancelScope,
        before: trio.Event | None,
        done: trio.Event,
        req_id: int,
        commit: _Commit,
        count: int,
        size: int,
    ) -> None:
        """Commit once the area's commit before this one has landed or failed, unless
        the kernel aborts it first (nothing is answered then: nobody waits)."""
        area = key[0]
        try:
            with scope:
                if before is not None:
                    await before.wait()
            if self.queued.pop(key, None) is None:
                return  # aborted (on the way now, an abort cannot find it)
            await self._commit(req_id, area, commit, count, size)
        finally:
            self.queued.pop(key, None)
            done.set()
            if self.last_commit.get(area) is done:
                del self.last_commit[area]

    async def _commit(self, req_id: int, area: int, commit: _Commit, count: int, size: int) -> None:
        if len(commit.pages) != count:
            log.error(
                "a sync of %r announced %d pages, %d arrived; refusing it",
                commit.segment,
                count,
                len(commit.pages),
            )
            self._reply(req_id, errno.EIO)
            return
        try:
            core = await self._file(area, commit.segment, size, create=False)
            # Into the journal, then one commit of what it holds (after a commit that
            # failed with its outcome unknown, if there is one: it goes first).
            for first, n in consecutive(sorted(commit.pages)):
                data = b"".join(commit.pages[first + k] for k in range(n))
                core.journal.write_pages(first, data)
            core.seal()
            await core.commit()
        except trio.TooSlowError:
            log.warning(
                "commit of %d pages to %r had no answer within %g s; the sync fails "
                "(the kernel keeps the pages dirty for the next one)",
                count,
                commit.segment,
                self.commit_timeout_s,
            )
            self._reply(req_id, errno.ETIMEDOUT)
            return
        except NetmemError as e:
            log.warning("commit of %d pages to %r failed: %s", count, commit.segment, e)
            self._reply(req_id, e.errno)
            return
        self._reply(req_id)


async def run(
    device: Path,
    server: str,
    token: bytes | None,
    tls: ssl.SSLContext | None,
    timeout_s: float,
) -> None:
    """Serve device with server's pages until cancelled."""
    with (
        open_device(device, server) as fd,
        tempfile.TemporaryDirectory(prefix="netmemfs-device-") as journal_dir,
    ):
        connect = connect_store(
            server, token=token, tls=tls, retry_for_s=timeout_s, claim=device_claim()
        )
        async with connect as store:
            print(f"serving {device} with pages of {server}", flush=True)
            provider = DeviceProvider(store, fd, Path(journal_dir), commit_timeout_s=timeout_s)
            await provider.serve()
