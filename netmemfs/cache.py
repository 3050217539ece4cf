"""The mount daemon's cache of pages fetched from the server (LRU, bounded in bytes).

Where it sits: beside journal.py, below fs.py; pure data structure, no I/O. The kernel's
page cache is the first cache; this one keeps what the kernel dropped (memory pressure,
drop_caches, MADV_RANDOM faults) so that a page fetched once is not fetched again while
the file is unchanged. fs.py drops a file's pages whenever it may have changed: when
another client's commit is seen at open, and when this mount commits or truncates it.
"""

from __future__ import annotations

from collections import OrderedDict

from netmemfs.pages import PAGE_SIZE


class PageCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_pages = budget_bytes // PAGE_SIZE
        self._lru: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._by_file: dict[int, set[int]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, file: int, page: int) -> bytes | None:
        data = self._lru.get((file, page))
        if data is None:
            self.misses += 1
            return None
        self._lru.move_to_end((file, page))
        self.hits += 1
        return data

    def put(self, file: int, page: int, data: bytes) -> None:
        if self.budget_pages <= 0:
            return
        assert len(data) == PAGE_SIZE
        self._lru[(file, page)] = data
        self._lru.move_to_end((file, page))
        self._by_file.setdefault(file, set()).add(page)
        while len(self._lru) > self.budget_pages:
            (f, p), _ = self._lru.popitem(last=False)
            pages = self._by_file[f]
            pages.discard(p)
            if not pages:
                del self._by_file[f]

    def drop(self, file: int) -> None:
        for page in self._by_file.pop(file, ()):
            del self._lru[(file, page)]

    def __len__(self) -> int:
        return len(self._lru)
