"""The Python + FUSE floor: a pyfuse3 file system with no network (issue 15, item 6).

    .venv/bin/python bench/nullfs.py MOUNTPOINT      (until unmounted or SIGTERM)

One flat directory of regular files kept in this process's memory: lookup, create,
getattr, setattr (size), open, read, write, fsync (a no-op) and unlink, with the same
FUSE options, request concurrency and readahead as `netmemfs mount`. What a netmemfs
mount does beyond this (its journal, its cache, the server) is what the benches'
netmemfs/nullfs ratio measures; bench/mmap_bench.py runs it beside the mount. It prints
"ready" once mounted.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netmemfs import daemon, fs

ROOT = pyfuse3.ROOT_INODE


class NullFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {}
        self.data: dict[int, bytearray] = {}
        self.next_ino = ROOT + 1
        self.t = time.time_ns()

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.entry_timeout = fs.ATTR_TIMEOUT_S
        a.attr_timeout = fs.ATTR_TIMEOUT_S
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = len(self.data[ino])
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.t
        a.st_blksize = 4096
        return a

    def _file(self, ino: int) -> bytearray:
        try:
            return self.data[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if inode != ROOT:
            self._file(inode)
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ino = self.names.get(name)
        if parent_inode != ROOT or ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino)

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ino = self.names.get(name)
        if ino is None:
            ino = self.names[name] = self.next_ino
            self.next_ino += 1
            self.data[ino] = bytearray()
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(ino)), self._attrs(ino)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            data = self._file(inode)
            if attr.st_size < len(data):
                del data[attr.st_size :]
            else:
                data.extend(bytes(attr.st_size - len(data)))
        return self._attrs(inode)

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        self._file(inode)
        fi = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode))
        fi.keep_cache = True
        return fi

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return bytes(self._file(fh)[off : off + size])

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        data = self._file(fh)
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        return len(buf)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        pass

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        ino = self.names.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        del self.data[ino]


async def serve(mountpoint: Path) -> None:
    options = set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=nullfs"}
    pyfuse3.init(NullFS(), str(mountpoint), options)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop() -> None:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

                async def started() -> None:
                    # A stat of the mount point: answered by the loop below, so not
                    # before it runs.
                    await trio.to_thread.run_sync(daemon._tune_readahead, mountpoint)
                    print("ready", flush=True)

                nursery.start_soon(stop)
                nursery.start_soon(started)
                await pyfuse3.main(min_tasks=4, max_tasks=fs.MAX_TASKS)
                nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(serve, Path(sys.argv[1]))
