"""The mount daemon's cache of pages fetched from the server (LRU, bounded in bytes).

Where it sits: beside journal.py, below fs.py; pure data structure, no I/O. The kernel's
page cache is the first cache; this one keeps what the kernel dropped (memory pressure,
drop_caches, MADV_RANDOM faults) so that a page fetched once is not fetched again while
the file is unchanged. fs.py drops a file's pages whenever it may have changed: when
another client's commit is seen at open or notified. A commit of this mount's forgets
only the pages it wrote (and those past a size it cut) when it is the file's only change
since the pages were read (core.py), else drops the file's pages too.

It keeps runs of pages as the server sent them (views of the received frames, so
caching copies nothing) and evicts whole runs, least recently used first. A page sent
again in a newer run is found there; the older run still counts until it is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from netmemfs.pages import PAGE_SIZE, Buffer


@dataclass(frozen=True, slots=True)
class _Run:
    file: int
    first: int
    data: memoryview

    @property
    def count(self) -> int:
        return len(self.data) // PAGE_SIZE


class PageCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_pages = budget_bytes // PAGE_SIZE
        self._runs: OrderedDict[int, _Run] = OrderedDict()
        self._index: dict[tuple[int, int], int] = {}  # (file, page) -> run id
        self._by_file: dict[int, set[int]] = {}
        self._next_id = 0
        self.pages = 0  # pages held by the runs, superseded ones included
        self.hits = 0
        self.misses = 0

    def get(self, file: int, page: int) -> memoryview | None:
        rid = self._index.get((file, page))
        if rid is None:
            self.misses += 1
            return None
        run = self._runs[rid]
        self._runs.move_to_end(rid)
        self.hits += 1
        off = (page - run.first) * PAGE_SIZE
        return run.data[off : off + PAGE_SIZE]

    def put(self, file: int, first: int, data: Buffer) -> None:
        """Keep pages first, first+1, ... of file (data: whole pages, not copied)."""
        run = _Run(file, first, memoryview(data).toreadonly())
        if self.budget_pages <= 0 or run.count > self.budget_pages:
            return
        rid = self._next_id
        self._next_id += 1
        self._runs[rid] = run
        self._by_file.setdefault(file, set()).add(rid)
        for page in range(first, first + run.count):
            self._index[(file, page)] = rid
        self.pages += run.count
        while self.pages > self.budget_pages:
            old, _ = next(iter(self._runs.items()))
            self._remove(old)

    def _remove(self, rid: int) -> None:
        run = self._runs.pop(rid)
        for page in range(run.first, run.first + run.count):
            if self._index.get((run.file, page)) == rid:
                del self._index[(run.file, page)]
        rids = self._by_file[run.file]
        rids.discard(rid)
        if not rids:
            del self._by_file[run.file]
        self.pages -= run.count

    def forget(self, file: int, runs: Iterable[tuple[int, int]], cut: int | None = None) -> None:
        """Forget pages of file: those of runs (first, count), and from page cut on (a
        size cut there: pages past it read as holes now). The file's other pages
        stay; a run none of whose pages is found any more is let go."""
        touched: set[int] = set()
        for first, count in runs:
            for page in range(first, first + count):
                rid = self._index.pop((file, page), None)
                if rid is not None:
                    touched.add(rid)
        if cut is not None:
            for rid in self._by_file.get(file, ()):
                run = self._runs[rid]
                for page in range(max(cut, run.first), run.first + run.count):
                    if self._index.get((file, page)) == rid:
                        del self._index[(file, page)]
                        touched.add(rid)
        for rid in touched:
            run = self._runs[rid]
            pages = range(run.first, run.first + run.count)
            if all(self._index.get((file, page)) != rid for page in pages):
                self._remove(rid)

    def drop(self, file: int) -> None:
        for rid in list(self._by_file.get(file, ())):
            self._remove(rid)

    def __len__(self) -> int:
        return len(self._index)
