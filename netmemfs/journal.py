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
    ["begin", txn, name, min_size]  sealed: commit all of the above as transaction txn
                                  to segment name; min_size is the smallest size the file
                                  had since the previous commit

Sealing appends the begin record and renames <id>-<n>.active to <id>-<n>.sealed before
the commit is sent, so a daemon that dies at any moment finds, at the next start, either
no sealed file (the commit was acknowledged and trimmed, or never begun) or a sealed file
whose transaction it sends again under the same id: the server applies a transaction id
at most once, so the commit ends up applied exactly once, whole. Active files (writes
never fsynced) are dropped at start; docs/semantics.md says so.

The journal is not fsynced. A daemon that dies leaves its writes in the kernel's page
cache, which the next daemon reads. Only a crash of the whole machine can lose or tear
journal files, and then every record is checksummed: a sealed file whose begin record
is missing or follows a damaged record is dropped, which for a commit that may or may
not have reached the server means "dropped or finished, never half done" all the same
(the server's commit is atomic and keyed by the transaction id). An fsync() the
application saw succeed was acknowledged by the server, so it needs no journal.
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from netmemfs.errors import NetmemError, ProtocolError, ServerUnreachable
from netmemfs.pages import PAGE_SIZE, pages_for
from netmemfs.protocol import PageRun
from netmemfs.records import encode_record, read_records, write_all

T = TypeVar("T")

log = logging.getLogger("netmemfs.journal")

MAGIC = b"NMJR"
MAX_RUN_PAGES = 1024  # pages per run handed to the server (4 MiB)


class JournalError(NetmemError):
    """The journal could not be written (the cache directory's disk is full or failing),
    or a journal file read back is damaged."""


@dataclass
class _File:
    """One journal file and the index of what it holds."""

    path: Path
    fd: int
    end: int = 0
    pages: dict[int, int] = field(default_factory=dict)  # page -> offset of its data
    size: int | None = None  # last size record
    min_size: int | None = None  # smallest size recorded

    def append(self, payload: list[object]) -> int:
        """Append one record; return the offset where it ends (where page data, which
        comes last in its record, ends too)."""
        parts = encode_record(MAGIC, payload)
        try:
            n = write_all(self.fd, parts)
        except OSError as e:
            raise JournalError(
                f"cannot write the journal {self.path}: {e.strerror}; free space in the "
                "cache directory (--cache-dir)"
            ) from e
        self.end += n
        return self.end

    def read_page(self, page: int) -> bytes | None:
        off = self.pages.get(page)
        if off is None:
            return None
        return os.pread(self.fd, PAGE_SIZE, off)

    def close(self) -> None:
        os.close(self.fd)


def _open_new(path: Path) -> _File:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise JournalError(
            f"cannot create the journal {path}: {e.strerror}; check the cache directory "
            "(--cache-dir)"
        ) from e
    return _File(path, fd)


@dataclass(frozen=True)
class SealedCommit:
    """What a sealed journal asks the server to do, as one transaction."""

    txn: bytes
    name: str
    resizes: list[tuple[str, int]]
    runs: list[PageRun]


class SegmentJournal:
    """The uncommitted changes of one file (segment)."""

    def __init__(self, directory: Path, committed_size: int) -> None:
        self.directory = directory
        self.id = uuid.uuid4().hex
        self.generation = 0
        self.committed_size = committed_size
        self.active = self._new_active()
        self.sealed: _File | None = None
        self.sealed_commit: SealedCommit | None = None
        self.discarded = False

    def _new_active(self) -> _File:
        self.generation += 1
        return _open_new(self.directory / f"{self.id}-{self.generation}.active")

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
        return bool(self.active.pages) or self.active.size is not None

    # --- changes -----------------------------------------------------------------

    def write_page(self, page: int, data: bytes) -> None:
        self.write_pages(page, data)

    def write_pages(self, first: int, data: bytes) -> None:
        """Record whole pages first, first+1, ... (one record, one write)."""
        n = len(data) // PAGE_SIZE
        assert n and len(data) == n * PAGE_SIZE
        if first + n > pages_for(self.size):
            raise AssertionError(f"pages {first}+{n} past the end ({self.size} bytes)")
        f = self.active
        start = f.append(["pages", first, data]) - len(data)
        for i in range(n):
            f.pages[first + i] = start + i * PAGE_SIZE

    def set_size(self, size: int) -> None:
        old = self.size
        f = self.active
        f.append(["size", size])
        f.size = size
        low = min(old, size) if f.min_size is None else min(f.min_size, size)
        f.min_size = low
        if size < old:
            keep = pages_for(size)
            for page in [p for p in f.pages if p >= keep]:
                del f.pages[page]
            tail = size % PAGE_SIZE
            if tail:
                # Bytes past the new end read as zeros if the file grows again.
                last = size // PAGE_SIZE
                data = self.read_page(last)
                if data is not None:
                    self.write_page(last, data[:tail] + bytes(PAGE_SIZE - tail))

    # --- commit ------------------------------------------------------------------

    def seal_start(self) -> None:
        """Freeze the changes so far; later writes go to a new active file.

        Runs in the event loop and does not block; seal_finish() then makes it durable.
        Reads keep seeing the frozen pages (now `sealed`) until trim().
        """
        assert self.sealed is None
        self.sealed = self.active
        self.active = self._new_active()

    def seal_finish(self, txn: bytes, name: str) -> SealedCommit:
        """Write the begin record and rename the file to .sealed, as transaction txn.

        Call from a worker thread (it reads the whole file back); nothing else touches
        `sealed` meanwhile (writes go to the active file). Retry after a JournalError.
        """
        f = self.sealed
        assert f is not None
        if self.sealed_commit is not None:
            return self.sealed_commit
        min_size = f.min_size if f.min_size is not None else self.size
        f.append(["begin", txn, name, min_size])
        sealed_path = f.path.with_suffix(".sealed")
        try:
            os.rename(f.path, sealed_path)
        except OSError as e:
            raise JournalError(f"cannot seal the journal {f.path}: {e.strerror}") from e
        f.path = sealed_path
        self.sealed_commit = _commit_of(f, txn, name, min_size)
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
        except NetmemError:
            self.unseal()
            raise
        self.trim()
        return result

    def trim(self) -> None:
        """The sealed commit was acknowledged: forget it; its last resize, if any, is
        now the committed size."""
        f, commit = self.sealed, self.sealed_commit
        assert f is not None and commit is not None
        f.close()
        f.path.unlink()
        self.sealed = None
        self.sealed_commit = None
        if commit.resizes:
            self.committed_size = commit.resizes[-1][1]

    def unseal(self) -> None:
        """The sealed commit was refused, so it did not apply: put its changes back in
        front of the newer ones, for the next fsync to commit together (after the user
        made room, say)."""
        old, newer = self.sealed, self.active
        assert old is not None
        merged = self._new_active()
        pages: dict[int, bytes] = {p: os.pread(old.fd, PAGE_SIZE, o) for p, o in old.pages.items()}
        size, low = old.size, old.min_size
        if newer.min_size is not None:
            keep = pages_for(newer.min_size)
            pages = {p: d for p, d in pages.items() if p < keep}
            low = newer.min_size if low is None else min(low, newer.min_size)
        if newer.size is not None:
            size = newer.size
        for p, o in newer.pages.items():
            pages[p] = os.pread(newer.fd, PAGE_SIZE, o)
        if size is not None:
            merged.append(["size", size])
        merged.size, merged.min_size = size, low
        for p in sorted(pages):
            merged.pages[p] = merged.append(["pages", p, pages[p]]) - PAGE_SIZE
        for f in (old, newer):
            f.close()
            f.path.unlink()
        self.active, self.sealed, self.sealed_commit = merged, None, None

    def discard(self) -> None:
        """Drop every change and close the files; the journal is unusable afterwards."""
        if self.discarded:
            return
        self.discarded = True
        for f in (self.active, self.sealed):
            if f is not None:
                f.close()
                f.path.unlink(missing_ok=True)
        self.sealed = None
        self.sealed_commit = None


def _commit_of(f: _File, txn: bytes, name: str, min_size: int) -> SealedCommit:
    resizes = []
    npages = None
    if f.size is not None:
        # Shrinking first zeroes what a shrink then a growth left beyond the low mark.
        if min_size < f.size:
            resizes.append((name, min_size))
        resizes.append((name, f.size))
        npages = pages_for(f.size)
    runs = list(_runs(f, name, npages))
    return SealedCommit(txn, name, resizes, runs)


def _runs(f: _File, name: str, npages: int | None) -> Iterator[PageRun]:
    """The file's pages (below npages, if given) as runs of pages consecutive both in
    number and in the file (those of one write are), each a view of a read-only mapping
    of the file, not a copy: the mapping lives as long as the views do. The file is only
    ever appended to, and a sealed file not at all, so the views never change."""
    if not f.pages:
        return
    view = memoryview(mmap.mmap(f.fd, f.end, prot=mmap.PROT_READ))
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


def _load(path: Path) -> tuple[_File, tuple[bytes, str, int] | None]:
    """Index a journal file; the begin record's (txn, name, min_size) if it has one.
    A record that passed its checksum yet is not one this module writes makes a
    JournalError: that is damage (or another program's file), not a torn tail."""
    fd = os.open(path, os.O_RDWR)
    f = _File(path, fd)
    begin = None
    try:
        with open(path, "rb", buffering=0) as raw:
            for end, rec in read_records(raw, MAGIC):
                kind = _record_kind(rec)
                assert isinstance(rec, list)
                if kind == "pages":
                    first, n = rec[1], len(rec[2]) // PAGE_SIZE
                    for i in range(n):
                        f.pages[first + i] = end - (n - i) * PAGE_SIZE
                elif kind == "size":
                    f.size = rec[1]
                else:
                    begin = (bytes(rec[1]), rec[2], rec[3])
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
            len(fields) == 3
            and isinstance(fields[0], bytes)
            and isinstance(fields[1], str)
            and _is_count(fields[2])
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
        log.info("dropping %s: writes that were never fsynced", path.name)
        path.unlink()
        gone += 1
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
                txn, name, min_size = begin
                out.append((_commit_of(f, txn, name, min_size), path))
            finally:
                f.close()
    return out
