"""Anonymous regions backed by a server segment: the uffd door (issue 4), from Python.

    import netmemfs.anon
    with netmemfs.anon.map(256 << 20, segment="seg0", budget=32 << 20) as region:
        view = memoryview(region)          # or numpy.frombuffer(region, dtype=...)
        view[0:5] = b"hello"               # pages fault in from the server
        region.sync()                      # every page written, one transaction

The region object has the buffer protocol: memoryview(), numpy, struct.pack_into and
file.readinto() use it directly. Its faults are served by libnetmem's native thread
(lib/netmem.c, compiled into netmemfs._netmem_cffi), never by this interpreter, so
touching the region while holding the GIL cannot stall the handler; the network side is
a `netmemfs agent` process. See docs/anon.md for the semantics.

close() refuses (BufferError) while views of the region are alive, as mmap does.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from netmemfs._netmem_cffi import ffi, lib
from netmemfs.errors import NetmemError, NoSpace, SegmentNotFound, Stale, WouldBlock
from netmemfs.pages import MAX_NAME_BYTES, PAGE_SIZE
from netmemfs.uffd import UffdUnavailable

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class RegionError(NetmemError):
    """An anonymous region could not be mapped or synced; errno says how."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err  # type: ignore[misc]


def _raise(what: str) -> None:
    err = ffi.errno or errno.EIO
    message = ffi.string(lib.netmem_error()).decode(errors="replace")
    cls = {
        errno.EPERM: UffdUnavailable,
        errno.ENOSPC: NoSpace,
        errno.ENOENT: SegmentNotFound,
        errno.ESTALE: Stale,
    }
    if err in cls:
        raise cls[err](f"{what}: {message}")
    raise RegionError(f"{what}: {message}", err)


def _agent() -> str:
    """The `netmemfs` program beside this interpreter (a venv's), else the one in PATH."""
    here = Path(sys.executable).parent / "netmemfs"
    return str(here) if here.exists() else shutil.which("netmemfs") or "netmemfs"


@dataclasses.dataclass(frozen=True)
class RegionStatistics:
    """Region.statistics(): counts since the map, then pages held now."""

    faults: int  # page faults the fault thread answered
    fetches: int  # runs of pages it asked for, from the agent or the server
    direct_fetches: int  # of those, read from the server by the fault thread itself
    evictions: int  # runs of pages the budget evicted
    evicted: int  # pages the budget evicted
    spilled: int  # pages in the spill file now (evicted written, not yet synced)
    resident: int  # pages resident now
    budget: int  # pages the budget allows


class Region(mmap.mmap):
    """A mapped region: an mmap object (the buffer protocol, slicing, numpy) whose pages
    live on the server. Make one with map()."""

    segment: str
    _address: int

    def sync(self) -> None:
        """Commit every page written since the last sync, as one transaction. On error
        (RegionError with errno EIO, NoSpace) the pages stay for the next sync."""
        if lib.netmem_sync(self._ptr()) < 0:
            _raise(f"sync of segment {self.segment!r}")

    @contextmanager
    def lock(
        self,
        start: int = 0,
        length: int = 0,
        *,
        exclusive: bool = True,
        wait_s: float = 60.0,
        commit: bool = True,
    ) -> Iterator[int]:
        """Hold a lock on bytes start..start+length-1 of the region's file (length 0:
        to any end) for the block, the same lock every client of the server sees
        (docs/semantics.md). Taking it drops the pages other clients changed under the
        locks before; leaving the block syncs (commit=True: the sync lands under the
        lock, and Stale if the lock was lost) and releases it. Yields the token.
        WouldBlock if not granted within wait_s."""
        token = ffi.new("uint64_t *")
        wait_ms = max(0, int(wait_s * 1000))
        if lib.netmem_lock(self._ptr(), start, length, int(exclusive), wait_ms, token) < 0:
            if ffi.errno == errno.EAGAIN:
                message = ffi.string(lib.netmem_error()).decode(errors="replace")
                raise WouldBlock(f"lock on segment {self.segment!r}: {message}")
            _raise(f"lock on segment {self.segment!r}")
        ok = False
        try:
            yield int(token[0])
            ok = True
        finally:
            # Released either way; committed only if the block ended well.
            if lib.netmem_unlock(self._ptr(), token[0], int(commit and ok)) < 0 and ok:
                _raise(f"commit and release of lock {token[0]} on segment {self.segment!r}")

    def resident(self) -> int:
        """Bytes of the region resident now (what the budget caps), as the handler
        counts them."""
        return int(lib.netmem_resident(self._ptr()))

    def statistics(self) -> RegionStatistics:
        """What the region's fault thread has done since the map, and holds now."""
        out = ffi.new("struct netmem_stats *")
        if lib.netmem_stats(self._ptr(), out) < 0:
            _raise(f"statistics of segment {self.segment!r}")
        return RegionStatistics(
            **{f.name: int(getattr(out, f.name)) for f in dataclasses.fields(RegionStatistics)}
        )

    def close(self) -> None:
        """Unmap; changes not synced are dropped. Raises BufferError (and keeps the
        region) while views of it (memoryview, numpy arrays) are alive."""
        if self.closed:
            return
        try:
            # mmap's one way to ask whether views are alive: a resize to the same size
            # (a no-op mremap, the address stays) refuses while any is.
            self.resize(len(self))
        except BufferError:
            raise BufferError(
                f"cannot close the region of segment {self.segment!r} while views of it "
                "exist: release the memoryviews and numpy arrays taken from it first"
            ) from None
        if self._address:
            lib.netmem_unmap(self._ptr())
            self._address = 0
        super().close()

    def _ptr(self) -> Any:
        if not self._address:
            raise RegionError(f"the region of segment {self.segment!r} is closed", errno.EBADF)
        return ffi.cast("void *", self._address)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map(
    size: int,
    *,
    segment: str,
    server: str | os.PathLike[str] | None = None,
    budget: int = 0,
    timeout: float = 30.0,
) -> Region:
    """Map `size` bytes backed by `segment` (created if missing), with at most `budget`
    bytes resident (0: all of it). A fault the server cannot serve within `timeout`
    seconds gets SIGBUS.

    `segment` is the path of a regular file from the root of the server's tree (which
    a mount shows at its root): "seg0", or "dir/seg0" in a directory that exists. It is
    made with `size` bytes if missing; if there, it must have that size. The region
    keeps the file it found at map time, by inode number: renamed meanwhile, it reads
    and commits to it still; removed or replaced, its next sync raises Stale (ESTALE),
    naming the path, and drops the changes.

    `server` is "HOST:PORT" of a netmemfs-server (a private agent process serves the
    region), or the mount point of a running `netmemfs mount` (an absolute path: that
    mount's daemon serves the region, with its server and token). Default:
    $NETMEM_SERVER, else 127.0.0.1:7733."""
    if server is not None:
        server = os.fspath(server)
    if not 0 < len(os.fsencode(segment)) <= MAX_NAME_BYTES or "\0" in segment:
        raise RegionError(
            f"segment {segment[:40]!r}: give the path of a file from the root of the "
            f"server's tree (like 'seg0' or 'dir/seg0'), 1 to {MAX_NAME_BYTES} bytes",
            errno.EINVAL,
        )
    if size <= 0 or size % PAGE_SIZE:
        raise RegionError(f"size {size} is not a positive multiple of {PAGE_SIZE}", errno.EINVAL)
    region = Region(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    region.segment = segment
    region._address = 0
    with ffi.from_buffer(region) as buf:
        # Invariant: the mapping is private, anonymous, `size` bytes, and stays mapped
        # until close(), which unregisters it (netmem_unmap) before unmapping it.
        address = int(ffi.cast("uintptr_t", buf))
    opts = ffi.new("struct netmem_options *")
    c_segment = ffi.new("char[]", segment.encode())
    c_server = ffi.new("char[]", server.encode()) if server else ffi.NULL
    c_agent = ffi.new("char[]", _agent().encode())
    opts.segment = c_segment
    opts.server = c_server
    opts.agent = c_agent
    opts.size = size
    opts.budget = budget
    opts.timeout_ms = max(1, int(timeout * 1000))
    opts.addr = ffi.cast("void *", address)
    if lib.netmem_map_opts(opts) == ffi.NULL:
        region.close()
        _raise(f"cannot map segment {segment!r}")
    region._address = address
    return region
