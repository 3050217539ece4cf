"""The write-back journal: pages written but not yet committed, on disk.

Where it sits: below the FUSE door (fs.py) and the anonymous regions' agent (agent.py),
beside remote.py; it imports neither trio nor pyfuse3, and does plain file I/O only. The
caller decides when to commit and how to send the commit (send_sealed).
docs/journal.md describes the files and records.

Each segment with uncommitted changes has, in the cache directory:

    <id>.active     records of pages written and size changes since the last seal
    <id>.sealed     at most one: a commit under way, or one that failed and waits to be
                    retried; it ends with a "begin" record naming the transaction

Records are framed by netmemfs.records (magic b"NMJR"); payloads:

    ["pages", first, data]        whole 4096-byte pages first, first+1, ...
    ["size", size]                the file's size became size bytes
    ["begin", txn, name, min_size, ino]  sealed: commit all of the above as transaction
                                  txn to inode ino (a file of a mount; name is its path,
                                  for messages), or, without ino, to segment name;
                                  min_size is the smallest size the file had since the
                                  previous commit

Sealing appends the begin record and renames <id>-<n>.active to <id>-<n>.sealed before
the commit is sent, so a daemon that dies at any moment finds, at the next start, either
no sealed file (the commit was acknowledged and trimmed, or never begun) or a sealed file
whose transaction it sends again under the same id: the server applies a transaction id
at most once, so the commit ends up applied exactly once, whole. Active files (writes
never fsynced) are dropped at start; docs/semantics.md says so.

A full, read-only or removed cache directory loses nothing silently: an append that
fails is undone (records are written at the known end, and a torn one is cut away), and
what the file cannot take is held in memory, within the mount's HoldBudget, until it
can; sealing writes it first, so an fsync fails until then (docs/journal.md, "Appends").

The journal is not fsynced. A daemon that dies leaves its writes in the kernel's page
cache, which the next daemon reads. Only a crash of the whole machine can lose or tear
journal files, and then every record is checksummed: a sealed file whose begin record
is missing or follows a damaged record is dropped, which for a commit that may or may
not have reached the server means "dropped or finished, never half done" all the same
(the server's commit is atomic and keyed by the transaction id). An fsync() the
application saw succeed was acknowledged by the server, so it needs no journal.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import mmap
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from netmemfs.errors import Conflict, Fenced, NetmemError, ProtocolError, ServerUnreachable
from netmemfs.ops import InodeOp, Truncate, WritePages
from netmemfs.pages import PAGE_SIZE, consecutive, pages_for
from netmemfs.protocol import PageRun
from netmemfs.records import encode_record, pwrite_all, read_records
from netmemfs.sizes import format_size

T = TypeVar("T")

log = logging.getLogger("netmemfs.journal")

MAGIC = b"NMJR"
MAX_RUN_PAGES = 1024  # pages per run handed to the server (4 MiB)


class JournalError(NetmemError):
    """The journal could not be written (the cache directory's disk is failing or gone),
    or a journal file read back is damaged."""


class JournalFull(JournalError):
    """The cache directory's disk is full."""

    errno = _errno.ENOSPC


class JournalReadOnly(JournalError):
    """The cache directory became read-only."""

    errno = _errno.EROFS


def journal_error(what: str, path: Path, e: OSError) -> JournalError:
    """The JournalError for an OSError met doing what to path (a file in a cache
    directory), with a message naming the directory and what the user can do."""
    where = path.parent
    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return JournalFull(
            f"cannot {what} {path}: {e.strerror}: the cache dir {where} is full; free "
            "space there (or mount with --cache-dir on a larger disk)"
        )
    if e.errno == _errno.EROFS:
        return JournalReadOnly(
            f"cannot {what} {path}: the cache dir {where} is read-only; make it writable"
        )
    if e.errno == _errno.ENOENT:
        return JournalError(
            f"cannot {what} {path}: the cache dir {where} is gone (removed while mounted); "
            "recreate it, or unmount and mount again"
        )
    return JournalError(f"cannot {what} {path}: {e.strerror}; check the disk of {where}")


class HoldBudget:
    """Memory for written pages that the journal could not take (its disk full or
    read-only), shared by the journals of one mount: the mount's --max-unjournaled.
    Past it a write is refused. Thread-safe: seal_finish gives memory back from a
    worker thread."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()

    def take(self, n: int, *, force: bool = False) -> bool:
        with self._lock:
            if not force and self.used_bytes + n > self.limit_bytes:
                return False
            self.used_bytes += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used_bytes -= n
            assert self.used_bytes >= 0


HOLD_RETRY_S = 0.5  # while holding pages, how often a write tries the disk again


@dataclass
class _File:
    """One journal file, the index of what it holds, and what it could not take.

    Records are written at `end`, never at the descriptor's position: a write cut short
    (disk full) is truncated away, so the file is as it was and the next record lands
    right after the last good one. The file is created at its first record.

    `held` is the memory layer: pages the file could not take, all newer than any page
    in the file. While anything is held (pages, or the last size change: `size_held`),
    every change goes to memory too, so that flush_held() writes them in order.
    """

    path: Path
    budget: HoldBudget
    fd: int | None = None
    end: int = 0
    pages: dict[int, int] = field(default_factory=dict)  # page -> offset of its data
    size: int | None = None  # last size change
    min_size: int | None = None  # smallest size recorded
    held: dict[int, bytes] = field(default_factory=dict)
    size_held: bool = False
    held_low: int | None = None  # smallest size set while holding, not yet written
    hold_cause: JournalError | None = None
    next_try: float = 0.0
    checksum: bool = True  # False: never read back after a crash (encode_record)

    def holding(self) -> bool:
        return bool(self.held) or self.size_held

    def append(self, payload: list[object]) -> int:
        """Append one record; return the offset where it ends (where page data, which
        comes last in its record, ends too). On failure the file is as it was."""
        parts = encode_record(MAGIC, payload, checksum=self.checksum)
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            n = pwrite_all(self.fd, parts, self.end)
        except OSError as e:
            if self.fd is not None:
                # Best effort: if this fails too, the torn bytes past `end` are
                # overwritten by the next record, and a reader stops at what is left.
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.end)
            raise journal_error("write the journal", self.path, e) from e
        self.end += n
        return self.end

    def read_page(self, page: int) -> bytes | None:
        # held before pages: flush_held() adds a page to `pages` before it leaves
        # `held`, so a reader in another thread sees one or the other, never neither.
        data = self.held.get(page)
        if data is not None:
            return data
        off = self.pages.get(page)
        if off is None:
            return None
        assert self.fd is not None
        return os.pread(self.fd, PAGE_SIZE, off)

    def index(self, first: int, n: int, start: int) -> None:
        """Pages first..first+n-1 are in the file, one after the other from start."""
        offsets = range(start, start + n * PAGE_SIZE, PAGE_SIZE)
        self.pages.update(zip(range(first, first + n), offsets, strict=True))

    def contents(self) -> dict[int, bytes]:
        """Every page the file holds, in it or in memory, newest content."""
        out = {}
        for p in set(self.pages) | set(self.held):
            data = self.read_page(p)
            assert data is not None
            out[p] = data
        return out

    def hold_size(self, size: int, cause: JournalError) -> None:
        self._start_holding(cause)
        self.size_held = True
        self.held_low = size if self.held_low is None else min(self.held_low, size)

    def hold_pages(self, first: int, data: bytes, cause: JournalError, *, force: bool) -> None:
        n = len(data) // PAGE_SIZE
        new = sum(1 for i in range(n) if first + i not in self.held)
        if not self.budget.take(new * PAGE_SIZE, force=force):
            if not self.budget.limit_bytes:
                raise type(cause)(str(cause))
            raise type(cause)(
                f"{cause}. The memory for written pages the journal cannot take "
                f"(--max-unjournaled {format_size(self.budget.limit_bytes)}) is used up, "
                f"so this write of {n} pages is refused"
            )
        self._start_holding(cause)
        for i in range(n):
            self.held[first + i] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]

    def _start_holding(self, cause: JournalError) -> None:
        if not self.holding():
            log.warning(
                "%s. Keeping written pages in memory (up to --max-unjournaled) until it "
                "can be written; fsync of the file fails until then",
                cause,
            )
        self.hold_cause = cause
        self.next_try = time.monotonic() + HOLD_RETRY_S

    def drop_from(self, keep: int) -> None:
        """Forget pages keep and above (the file shrank)."""
        for page in [p for p in self.pages if p >= keep]:
            del self.pages[page]
        gone = [p for p in self.held if p >= keep]
        for page in gone:
            del self.held[page]
        self.budget.give_back(len(gone) * PAGE_SIZE)

    def try_flush(self) -> bool:
        """Write what is held, unless a try failed less than HOLD_RETRY_S ago; True if
        nothing is held any more."""
        if not self.holding():
            return True
        if time.monotonic() < self.next_try:
            return False
        try:
            self.flush_held()
        except JournalError:
            self.next_try = time.monotonic() + HOLD_RETRY_S
            return False
        return True

    def flush_held(self) -> None:
        """Write what memory holds to the file, in order: the size changes (the lowest
        first, so that replay drops what a shrink dropped), then the pages. JournalError
        if the file still cannot take it; what was written by then stays written."""
        if self.size_held:
            assert self.size is not None
            if self.held_low is not None and self.held_low < self.size:
                self.append(["size", self.held_low])
            self.held_low = None
            self.append(["size", self.size])
            self.size_held = False
        for first, n in consecutive(sorted(self.held), MAX_RUN_PAGES):
            data = b"".join(self.held[first + i] for i in range(n))
            self.index(first, n, self.append(["pages", first, data]) - len(data))
            for i in range(n):
                del self.held[first + i]
            self.budget.give_back(n * PAGE_SIZE)
        self.hold_cause = None

    def recreate(self) -> None:
        """Copy the file, whose name was removed, to a new file of the same name; the
        new one takes its place (its offsets are the same)."""
        assert self.fd is not None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            off = 0
            while off < self.end:
                chunk = os.pread(self.fd, min(1 << 20, self.end - off), off)
                if not chunk:
                    raise OSError(_errno.EIO, f"{self.path} ended at {off} of {self.end}")
                pwrite_all(fd, [chunk], off)
                off += len(chunk)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        """Close and delete the file, and give back what it held."""
        self.close()
        self.path.unlink(missing_ok=True)
        self.budget.give_back(len(self.held) * PAGE_SIZE)
        self.held.clear()


@dataclass(frozen=True)
class SealedCommit:
    """What a sealed journal asks the server to do, as one transaction: to inode ino
    (inode_ops), or if ino is 0 to the segment name (resizes, runs)."""

    txn: bytes
    name: str
    resizes: list[tuple[str, int]]
    runs: list[PageRun]
    ino: int = 0

    def inode_ops(self) -> list[InodeOp]:
        """The commit as inode ops: the sizes first, then the pages (as Change wants
        them when it has to stage the pages)."""
        assert self.ino, "a segment's commit has no inode"
        ops: list[InodeOp] = [Truncate(self.ino, size) for _, size in self.resizes]
        return ops + [WritePages(self.ino, r.first, r.data) for r in self.runs]


class SegmentJournal:
    """The uncommitted changes of one file (segment).

    budget: memory for pages the cache directory cannot take (none by default: such
    a write fails at once)."""

    def __init__(
        self,
        directory: Path,
        committed_size: int,
        budget: HoldBudget | None = None,
        *,
        recoverable: bool = True,
    ) -> None:
        self.directory = directory
        # False: no recover() will read these files (a region's agent: its journal
        # dies with it), so records carry no checksum.
        self.recoverable = recoverable
        self.budget = budget or HoldBudget(0)
        self.id = uuid.uuid4().hex
        self.generation = 0
        self.committed_size = committed_size
        self.active = self._new_active()
        self.sealed: _File | None = None
        self.sealed_commit: SealedCommit | None = None
        self.discarded = False

    def _new_active(self) -> _File:
        self.generation += 1
        path = self.directory / f"{self.id}-{self.generation}.active"
        return _File(path, self.budget, checksum=self.recoverable)

    # --- what a reader sees ------------------------------------------------------

    @property
    def size(self) -> int:
        """The file's size including uncommitted changes."""
        for f in (self.active, self.sealed):
            if f is not None and f.size is not None:
                return f.size
        return self.committed_size

    def low_water(self) -> int:
        """The smallest size the file had since its last acknowledged commit: past it,
        what the server holds is not the file's any more (a shrink not committed yet)."""
        sizes = [self.committed_size]
        sizes += [f.min_size for f in (self.active, self.sealed) if f and f.min_size is not None]
        return min(sizes)

    def read_page(self, page: int) -> bytes | None:
        """The newest uncommitted content of page, or None if it has none."""
        data = self.active.read_page(page)
        if data is None and self.sealed is not None:
            data = self.sealed.read_page(page)
        return data

    def has_changes(self) -> bool:
        if self.discarded:
            return False
        f = self.active
        return bool(f.pages) or bool(f.held) or f.size is not None

    def settled(self) -> bool:
        """Nothing to commit: no change since the last commit, and none sealed."""
        return not self.has_changes() and self.sealed is None

    def dirty(self) -> tuple[int, int]:
        """(pages written and not yet committed, bytes of journal files holding
        changes): what a commit in progress sends and what was written since. A page
        written again after its commit began counts twice; no more work than a count."""
        if self.discarded:
            return 0, 0
        pages = nbytes = 0
        for f in (self.active, self.sealed):
            if f is not None:
                pages += len(f.pages) + len(f.held)
                nbytes += f.end
        return pages, nbytes

    # --- changes -----------------------------------------------------------------

    def write_page(self, page: int, data: bytes) -> None:
        self.write_pages(page, data)

    def write_pages(self, first: int, data: bytes, *, grow_to: int | None = None) -> None:
        """Record whole pages first, first+1, ... (one record, one write), then, if
        grow_to is past the size, the new size. A write that fails (JournalError)
        changes nothing: pages come first, and a size change cannot fail (if the file
        cannot take it, memory holds it)."""
        n = len(data) // PAGE_SIZE
        assert n and len(data) == n * PAGE_SIZE
        limit = max(self.size, grow_to or 0)
        if first + n > pages_for(limit):
            raise AssertionError(f"pages {first}+{n} past the end ({limit} bytes)")
        self._put_pages(self.active, first, data)
        if grow_to is not None and grow_to > self.size:
            self.set_size(grow_to)

    def _put_pages(self, f: _File, first: int, data: bytes, *, force: bool = False) -> None:
        if f.try_flush():
            try:
                start = f.append(["pages", first, data]) - len(data)
            except JournalError as e:
                cause = e
            else:
                f.index(first, len(data) // PAGE_SIZE, start)
                return
        else:
            assert f.hold_cause is not None
            cause = f.hold_cause
        f.hold_pages(first, data, cause, force=force)

    def _put_size(self, f: _File, size: int) -> None:
        if f.try_flush():
            try:
                f.append(["size", size])
            except JournalError as e:
                f.hold_size(size, e)
        else:
            assert f.hold_cause is not None
            f.hold_size(size, f.hold_cause)
        f.size = size

    def set_size(self, size: int) -> None:
        old = self.size
        f = self.active
        self._put_size(f, size)
        low = min(old, size) if f.min_size is None else min(f.min_size, size)
        f.min_size = low
        if size < old:
            f.drop_from(pages_for(size))
            tail = size % PAGE_SIZE
            if tail:
                # Bytes past the new end read as zeros if the file grows again.
                last = size // PAGE_SIZE
                data = self.read_page(last)
                if data is not None:
                    self._put_pages(f, last, data[:tail] + bytes(PAGE_SIZE - tail), force=True)

    # --- commit ------------------------------------------------------------------

    def seal_start(self) -> None:
        """Freeze the changes so far; later writes go to a new active file.

        Runs in the event loop and does not block; seal_finish() then makes it durable.
        Reads keep seeing the frozen pages (now `sealed`) until trim().
        """
        assert self.sealed is None
        self.sealed = self.active
        self.active = self._new_active()

    def seal_finish(self, txn: bytes, name: str, ino: int = 0) -> SealedCommit:
        """Write what memory holds, the begin record, and rename the file to .sealed,
        as transaction txn to inode ino (0: to segment name).

        Call from a worker thread (it reads the whole file back); nothing else changes
        `sealed` meanwhile (writes go to the active file). After a JournalError the
        file is as before the call (but for held pages it did write): retry.
        """
        f = self.sealed
        assert f is not None
        if self.sealed_commit is not None:
            return self.sealed_commit
        f.flush_held()
        min_size = f.min_size if f.min_size is not None else self.size
        end = f.end
        f.append(["begin", txn, name, min_size, *([ino] if ino else [])])
        sealed_path = f.path.with_suffix(".sealed")
        try:
            if not f.path.exists() and self.directory.is_dir():
                f.recreate()  # the directory was removed (and made again) meanwhile
            os.rename(f.path, sealed_path)
        except OSError as e:
            f.end = end  # the begin record goes, to be written again by the retry
            assert f.fd is not None
            with contextlib.suppress(OSError):
                os.ftruncate(f.fd, end)
            raise journal_error("seal the journal", f.path, e) from e
        f.path = sealed_path
        self.sealed_commit = _commit_of(f, txn, name, min_size, ino)
        return self.sealed_commit

    async def send_sealed(self, send: Callable[[SealedCommit], Awaitable[T]]) -> T:
        """Send the commit seal_finish() made with send, and settle the journal by the
        outcome: acknowledged, it is trimmed; refused (the server applied nothing), its
        pages go back in front of the newer ones (unseal); unknown (ServerUnreachable,
        ProtocolError: it may have landed), it stays sealed, to be sent again under the
        same transaction id. The exception, if any, goes on to the caller."""
        commit = self.sealed_commit
        assert commit is not None, "seal_finish() first"
        try:
            result = await send(commit)
        except (ServerUnreachable, ProtocolError):
            raise
        except (Fenced, Conflict):
            self.drop_sealed()  # under a lock since lost, or a lost race: never to land
            raise
        except NetmemError:
            self.unseal()
            raise
        self.trim()
        return result

    def drop_sealed(self) -> None:
        """The sealed commit was refused and must not be sent again: forget it."""
        f = self.sealed
        assert f is not None
        f.remove()
        self.sealed = None
        self.sealed_commit = None

    def trim(self) -> None:
        """The sealed commit was acknowledged: forget it; its last resize, if any, is
        now the committed size."""
        f, commit = self.sealed, self.sealed_commit
        assert f is not None and commit is not None
        f.remove()
        self.sealed = None
        self.sealed_commit = None
        if commit.resizes:
            self.committed_size = commit.resizes[-1][1]

    def unseal(self) -> None:
        """The sealed commit was refused, so it did not apply: put its changes back in
        front of the newer ones, for the next fsync to commit together (after the user
        made room, say). Nothing is lost if the cache directory is full: memory holds
        what the new file cannot take, past --max-unjournaled if need be."""
        old, newer = self.sealed, self.active
        assert old is not None
        pages = old.contents()
        size, low = old.size, old.min_size
        if newer.min_size is not None:
            keep = pages_for(newer.min_size)
            pages = {p: d for p, d in pages.items() if p < keep}
            low = newer.min_size if low is None else min(low, newer.min_size)
        if newer.size is not None:
            size = newer.size
        pages.update(newer.contents())
        for f in (old, newer):
            f.remove()
        merged = self._new_active()
        self.active, self.sealed, self.sealed_commit = merged, None, None
        if size is not None:
            self._put_size(merged, size)
        merged.min_size = low
        for first, n in consecutive(sorted(pages), MAX_RUN_PAGES):
            data = b"".join(pages[first + i] for i in range(n))
            self._put_pages(merged, first, data, force=True)

    def discard(self) -> None:
        """Drop every change and close the files; the journal is unusable afterwards."""
        if self.discarded:
            return
        self.discarded = True
        for f in (self.active, self.sealed):
            if f is not None:
                f.remove()
        self.sealed = None
        self.sealed_commit = None


def _commit_of(f: _File, txn: bytes, name: str, min_size: int, ino: int) -> SealedCommit:
    resizes = []
    npages = None
    if f.size is not None:
        # Shrinking first zeroes what a shrink then a growth left beyond the low mark.
        if min_size < f.size:
            resizes.append((name, min_size))
        resizes.append((name, f.size))
        npages = pages_for(f.size)
    runs = list(_runs(f, name, npages))
    return SealedCommit(txn, name, resizes, runs, ino)


def _runs(f: _File, name: str, npages: int | None) -> Iterator[PageRun]:
    """The file's pages (below npages, if given) as runs of pages consecutive both in
    number and in the file (those of one write are), each a view of a read-only mapping
    of the file, not a copy: the mapping lives as long as the views do. The file is only
    ever appended to, and a sealed file not at all, so the views never change."""
    if not f.pages:
        return
    assert f.fd is not None and not f.held, "flush_held() first"
    # MAP_POPULATE: the pages (just written, in the page cache) are mapped in one
    # call, not faulted in one by one as the commit's sending reads them.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    view = memoryview(mmap.mmap(f.fd, f.end, flags=flags, prot=mmap.PROT_READ))
    pages = sorted(p for p in f.pages if npages is None or p < npages)
    i = 0
    while i < len(pages):
        k = i
        while (
            k + 1 < len(pages)
            and pages[k + 1] == pages[k] + 1
            and f.pages[pages[k + 1]] == f.pages[pages[k]] + PAGE_SIZE
            and k + 1 - i < MAX_RUN_PAGES
        ):
            k += 1
        off = f.pages[pages[i]]
        yield PageRun(name, pages[i], view[off : off + (k - i + 1) * PAGE_SIZE])
        i = k + 1


def _load(path: Path) -> tuple[_File, tuple[bytes, str, int, int] | None]:
    """Index a journal file; the begin record's (txn, name, min_size, ino) if it has
    one (ino 0: a segment's).
    A record that passed its checksum yet is not one this module writes makes a
    JournalError: that is damage (or another program's file), not a torn tail."""
    fd = os.open(path, os.O_RDWR)
    f = _File(path, HoldBudget(0), fd)
    begin = None
    try:
        with open(path, "rb", buffering=0) as raw:
            for end, rec in read_records(raw, MAGIC):
                kind = _record_kind(rec)
                assert isinstance(rec, list)
                if kind == "pages":
                    n = len(rec[2]) // PAGE_SIZE
                    f.index(rec[1], n, end - n * PAGE_SIZE)
                elif kind == "size":
                    # As set_size did: a shrink drops the pages past the new end.
                    f.size = rec[1]
                    f.drop_from(pages_for(rec[1]))
                else:
                    begin = (bytes(rec[1]), rec[2], rec[3], rec[4] if len(rec) > 4 else 0)
                f.end = end
    except ValueError as e:
        f.close()
        raise JournalError(
            f"journal file {path} is damaged: {e}. Move it out of the cache directory to "
            "mount without it (what it held, never committed, is then lost)"
        ) from None
    return f, begin


def _record_kind(rec: object) -> str:
    """The kind of a journal record, after checking its fields; ValueError if it is
    not a record this module writes."""
    if not isinstance(rec, list) or not rec or not isinstance(rec[0], str):
        raise ValueError(f"a record is {type(rec).__name__}, not a tagged list")
    kind, fields = rec[0], rec[1:]
    if kind == "pages":
        ok = (
            len(fields) == 2
            and _is_count(fields[0])
            and isinstance(fields[1], bytes)
            and len(fields[1]) % PAGE_SIZE == 0
        )
    elif kind == "size":
        ok = len(fields) == 1 and _is_count(fields[0])
    elif kind == "begin":
        ok = (
            len(fields) in (3, 4)
            and isinstance(fields[0], bytes)
            and isinstance(fields[1], str)
            and all(_is_count(v) for v in fields[2:])
        )
    else:
        raise ValueError(f"unknown record kind {kind[:40]!r}")
    if not ok:
        raise ValueError(f"a {kind!r} record has fields of the wrong number or type")
    return kind


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def drop_unsynced(directory: Path) -> int:
    """Delete the active journals in directory (writes never fsynced); return how many."""
    gone = 0
    for path in directory.glob("*.active"):
        with contextlib.suppress(OSError):
            if path.stat().st_size:
                log.info("dropping %s: writes that were never fsynced", path.name)
                gone += 1
        path.unlink(missing_ok=True)
    return gone


def recover(directory: Path) -> list[tuple[SealedCommit, Path]]:
    """At start: the sealed commits a daemon that died left (to send again, then delete
    the path), after dropping every active journal (writes never fsynced)."""
    directory.mkdir(parents=True, exist_ok=True)
    drop_unsynced(directory)
    out = []
    for path in sorted(directory.iterdir()):
        if path.suffix == ".sealed":
            f, begin = _load(path)
            try:
                if begin is None:  # cannot happen: a file is renamed only after its begin
                    log.warning("dropping %s: it has no begin record", path.name)
                    path.unlink()
                    continue
                out.append((_commit_of(f, *begin), path))
            finally:
                f.close()
    return out
