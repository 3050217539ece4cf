"""In-memory page store: segments, their pages, versions and the committed-transaction table.

Where it sits: below serve.py, above nothing but netmemfs.errors/pages/protocol; log.py
wraps it for durability. It does no I/O and never awaits, so each public method runs
whole between two checkpoints of the trio loop.

Pages live in fixed chunks of CHUNK_PAGES pages (one bytearray each) with an integer bit
mask saying which pages are stored; a page never written costs nothing and is reported as
a hole. Mutations come as a list of ops: `check(ops)` raises if any would fail, touching
nothing; `apply(txn, ops)` then cannot fail, so a commit lands whole or not at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from netmemfs.errors import NoSpace, OutOfRange, SegmentExists, SegmentNotFound, TooLarge
from netmemfs.pages import PAGE_SIZE, check_name, check_size, pages_for
from netmemfs.protocol import MAX_MESSAGE_PAGES, PageRun

CHUNK_PAGES = 64
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE
FULL_MASK = (1 << CHUNK_PAGES) - 1
# How many committed transaction ids are remembered for exactly-once replies. A client
# retries only its last few commits, so this bounds memory without weakening that.
MAX_REMEMBERED_TXNS = 100_000

Versions = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Create:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Resize:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Rename:
    name: str
    new_name: str


@dataclass(frozen=True, slots=True)
class Delete:
    name: str


@dataclass(frozen=True, slots=True)
class Write:
    run: PageRun


Op = Create | Resize | Rename | Delete | Write


class Segment:
    __slots__ = ("chunks", "masks", "size", "stored_pages", "version")

    def __init__(self, size: int, version: int = 0) -> None:
        self.size = size
        self.version = version
        self.chunks: dict[int, bytearray] = {}
        self.masks: dict[int, int] = {}
        self.stored_pages = 0

    def is_stored(self, page: int) -> bool:
        return bool(self.masks.get(page // CHUNK_PAGES, 0) >> (page % CHUNK_PAGES) & 1)

    def count_unstored(self, first: int, count: int) -> int:
        """How many of pages first..first+count-1 are not stored yet."""
        missing = 0
        for ci, lo, hi in _chunk_spans(first, count):
            span = ((1 << (hi - lo)) - 1) << lo
            missing += (hi - lo) - (self.masks.get(ci, 0) & span).bit_count()
        return missing

    def write(self, first: int, data: memoryview) -> int:
        """Store whole pages; return how many were not stored before."""
        added = 0
        pos = 0
        for ci, lo, hi in _chunk_spans(first, len(data) // PAGE_SIZE):
            chunk = self._writable(ci)
            n = (hi - lo) * PAGE_SIZE
            chunk[lo * PAGE_SIZE : lo * PAGE_SIZE + n] = data[pos : pos + n]
            pos += n
            span = ((1 << (hi - lo)) - 1) << lo
            old = self.masks.get(ci, 0)
            added += (hi - lo) - (old & span).bit_count()
            self.masks[ci] = old | span
        self.stored_pages += added
        return added

    def _writable(self, ci: int) -> bytearray:
        """Chunk ci, ready to be changed in place without touching data lent out.

        read() lends views of chunks rather than copies. A bytearray with a live view
        cannot change size, so a one-byte append fails exactly when some view (a reply
        still being sent) may be looking at it; then the chunk is copied, and the
        reader keeps the old bytes, which nobody changes any more (copy-on-write).
        """
        chunk = self.chunks.get(ci)
        if chunk is None:
            chunk = self.chunks[ci] = bytearray(CHUNK_BYTES)
            return chunk
        try:
            chunk.append(0)
        except BufferError:
            chunk = self.chunks[ci] = bytearray(chunk)
        else:
            chunk.pop()
        return chunk

    def read(self, first: int, count: int) -> Iterator[tuple[int, memoryview]]:
        """Yield (page, data) for each run of stored pages in the range.

        data is a read-only view of the store, not a copy: it stays as it is even if a
        commit changes those pages later (see _writable), and should be dropped once
        sent, since a chunk with a view alive is copied on its next write.
        """
        for ci, lo, hi in _chunk_spans(first, count):
            mask = self.masks.get(ci, 0)
            if not mask:
                continue
            chunk = memoryview(self.chunks[ci]).toreadonly()
            base = ci * CHUNK_PAGES
            if mask == FULL_MASK:
                yield base + lo, chunk[lo * PAGE_SIZE : hi * PAGE_SIZE]
                continue
            p = lo
            while p < hi:
                if not mask >> p & 1:
                    p += 1
                    continue
                start = p
                while p < hi and mask >> p & 1:
                    p += 1
                yield base + start, chunk[start * PAGE_SIZE : p * PAGE_SIZE]

    def truncate(self, size: int) -> int:
        """Drop everything at and past size bytes; return how many pages were freed."""
        keep = pages_for(size)
        freed = 0
        for ci in [c for c in self.masks if (c + 1) * CHUNK_PAGES > keep]:
            lo = max(0, keep - ci * CHUNK_PAGES)
            mask = self.masks[ci]
            kept = mask & ((1 << lo) - 1)
            freed += mask.bit_count() - kept.bit_count()
            if kept:
                self.masks[ci] = kept
                self._writable(ci)[lo * PAGE_SIZE :] = bytes(CHUNK_BYTES - lo * PAGE_SIZE)
            else:
                del self.masks[ci]
                del self.chunks[ci]
        tail = size % PAGE_SIZE
        if tail and self.is_stored(size // PAGE_SIZE):
            # Bytes past the end of a partial last page read as zeros if the segment grows.
            chunk = self._writable(size // PAGE_SIZE // CHUNK_PAGES)
            start = (size // PAGE_SIZE % CHUNK_PAGES) * PAGE_SIZE + tail
            end = start - tail + PAGE_SIZE
            chunk[start:end] = bytes(end - start)
        self.stored_pages -= freed
        return freed

    def chunk_items(self) -> Iterator[tuple[int, int, bytearray]]:
        for ci in sorted(self.masks):
            yield ci, self.masks[ci], self.chunks[ci]

    def load_chunk(self, ci: int, mask: int, data: bytes) -> None:
        if len(data) != CHUNK_BYTES or not 0 < mask <= FULL_MASK:
            raise ValueError(f"chunk {ci}: bad length {len(data)} or mask")
        self.chunks[ci] = bytearray(data)
        self.masks[ci] = mask
        self.stored_pages += mask.bit_count()


def _chunk_spans(first: int, count: int) -> Iterator[tuple[int, int, int]]:
    """Split pages first..first+count-1 into (chunk index, lo, hi) within each chunk."""
    page = first
    end = first + count
    while page < end:
        ci, lo = divmod(page, CHUNK_PAGES)
        hi = min(CHUNK_PAGES, lo + (end - page))
        yield ci, lo, hi
        page += hi - lo


class MemoryPageStore:
    """All segments in memory. capacity_bytes bounds stored page data (None: no bound)."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.segments: dict[str, Segment] = {}
        self.used_pages = 0
        self.committed: OrderedDict[bytes, Versions] = OrderedDict()

    # --- reads ---------------------------------------------------------------------

    def segment(self, name: str) -> Segment:
        seg = self.segments.get(name)
        if seg is None:
            raise SegmentNotFound(f"segment {name!r} does not exist; create it first")
        return seg

    def read(self, name: str, first: int, count: int) -> tuple[int, tuple[PageRun, ...]]:
        """(version, runs of stored pages) for pages first..first+count-1 of name."""
        seg = self.segment(name)
        if count > MAX_MESSAGE_PAGES:
            raise TooLarge(
                f"read of {count} pages of {name!r}: at most {MAX_MESSAGE_PAGES} per request"
            )
        npages = pages_for(seg.size)
        if first + count > npages:
            raise OutOfRange(
                f"read of pages {first}..{first + count - 1} of {name!r} goes past its end "
                f"({npages} pages, {seg.size} bytes); resize it first or read less"
            )
        runs = tuple(PageRun(name, p, data) for p, data in seg.read(first, count))
        return seg.version, runs

    @property
    def used_bytes(self) -> int:
        return self.used_pages * PAGE_SIZE

    def lookup_txn(self, txn: bytes) -> Versions | None:
        return self.committed.get(txn)

    # --- mutations -----------------------------------------------------------------

    def check(self, ops: Sequence[Op], *, enforce_capacity: bool = True) -> None:
        """Raise the error applying ops would meet; change nothing.

        Ops are checked in order against a simulated namespace, so a transaction may
        create a segment and write to it. Capacity is counted conservatively: pages
        freed by the same transaction are not credited.
        """
        sizes: dict[str, int | None] = {}  # simulated: name -> size, None if gone
        fresh: set[str] = set()  # names whose pages in the store are not theirs

        def size_of(name: str) -> int:
            if name in sizes:
                size = sizes[name]
            else:
                seg = self.segments.get(name)
                size = None if seg is None else seg.size
            if size is None:
                raise SegmentNotFound(f"segment {name!r} does not exist; create it first")
            return size

        new_pages = 0
        for op in ops:
            if isinstance(op, Write):
                run = op.run
                check_name(run.segment)
                size = size_of(run.segment)
                if run.first + run.count > pages_for(size):
                    raise OutOfRange(
                        f"write to pages {run.first}..{run.first + run.count - 1} of "
                        f"{run.segment!r} goes past its end ({size} bytes); resize it first"
                    )
                seg = self.segments.get(run.segment)
                if run.segment in fresh or seg is None:
                    new_pages += run.count
                else:
                    new_pages += seg.count_unstored(run.first, run.count)
            elif isinstance(op, Create):
                check_name(op.name)
                check_size(op.size)
                exists = (
                    sizes[op.name] is not None if op.name in sizes else op.name in self.segments
                )
                if exists:
                    raise SegmentExists(f"segment {op.name!r} already exists")
                sizes[op.name] = op.size
                fresh.add(op.name)
            elif isinstance(op, Resize):
                check_name(op.name)
                check_size(op.size)
                size_of(op.name)
                sizes[op.name] = op.size
            elif isinstance(op, Rename):
                check_name(op.name)
                check_name(op.new_name)
                size = size_of(op.name)
                if op.name != op.new_name:
                    sizes[op.new_name] = size
                    sizes[op.name] = None
                    fresh.add(op.new_name)
            elif isinstance(op, Delete):
                check_name(op.name)
                size_of(op.name)
                sizes[op.name] = None
        cap = self.capacity_bytes
        needed = (self.used_pages + new_pages) * PAGE_SIZE
        if enforce_capacity and cap is not None and new_pages and needed > cap:
            raise NoSpace(
                f"commit needs {new_pages * PAGE_SIZE} more bytes but the server holds "
                f"{self.used_bytes} of its {cap}-byte --max-memory; delete or shrink "
                "segments, or restart the server with a larger --max-memory"
            )

    def apply(self, txn: bytes, ops: Sequence[Op]) -> Versions:
        """Apply ops that check() accepted; record txn; return the new versions.

        Must follow check(ops) with no await in between: the check is only valid for the
        state it saw.
        """
        touched: dict[str, None] = {}
        for op in ops:
            if isinstance(op, Write):
                seg = self.segments[op.run.segment]
                with memoryview(op.run.data) as view:
                    self.used_pages += seg.write(op.run.first, view)
                touched[op.run.segment] = None
            elif isinstance(op, Create):
                self.segments[op.name] = Segment(op.size)
                touched[op.name] = None
            elif isinstance(op, Resize):
                seg = self.segments[op.name]
                if op.size < seg.size:
                    self.used_pages -= seg.truncate(op.size)
                seg.size = op.size
                touched[op.name] = None
            elif isinstance(op, Rename):
                if op.name != op.new_name:
                    old = self.segments.pop(op.new_name, None)
                    if old is not None:
                        self.used_pages -= old.stored_pages
                    self.segments[op.new_name] = self.segments.pop(op.name)
                    touched.pop(op.name, None)
                touched[op.new_name] = None
            elif isinstance(op, Delete):
                self.used_pages -= self.segments.pop(op.name).stored_pages
                touched.pop(op.name, None)
        versions = []
        for name in touched:
            done = self.segments.get(name)
            if done is not None:
                done.version += 1
                versions.append((name, done.version))
        result = tuple(versions)
        self.remember(txn, result)
        return result

    def remember(self, txn: bytes, versions: Versions) -> None:
        self.committed[txn] = versions
        while len(self.committed) > MAX_REMEMBERED_TXNS:
            self.committed.popitem(last=False)
