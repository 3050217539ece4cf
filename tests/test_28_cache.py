"""Layer 2d: the daemon's page cache alone."""

from __future__ import annotations

from netmemfs.cache import PageCache
from netmemfs.pages import PAGE_SIZE
from tests.helpers import stamp_page


def _get(c: PageCache, file: int, page: int) -> bytes | None:
    got = c.get(file, page)
    return None if got is None else bytes(got)


def _run(file: int, first: int, n: int, gen: int) -> bytes:
    return b"".join(stamp_page(str(file), first + i, gen) for i in range(n))


def test_runs_are_found_by_page_and_evicted_whole_lru() -> None:
    c = PageCache(8 * PAGE_SIZE)
    c.put(1, 0, _run(1, 0, 4, 1))
    c.put(1, 10, _run(1, 10, 4, 1))
    assert _get(c, 1, 2) == stamp_page("1", 2, 1)  # run 0..3 is now the most recent
    c.put(2, 0, _run(2, 0, 4, 1))  # over budget: evicts the least recent run (10..13)
    assert _get(c, 1, 11) is None
    assert _get(c, 1, 3) == stamp_page("1", 3, 1)
    assert _get(c, 2, 0) == stamp_page("2", 0, 1)
    assert c.pages == 8


def test_newer_runs_win_and_drop_forgets_a_file() -> None:
    c = PageCache(64 * PAGE_SIZE)
    c.put(1, 0, _run(1, 0, 4, 1))
    c.put(1, 2, _run(1, 2, 4, 2))
    assert _get(c, 1, 1) == stamp_page("1", 1, 1)
    assert _get(c, 1, 3) == stamp_page("1", 3, 2)
    c.put(2, 0, _run(2, 0, 1, 1))
    c.drop(1)
    assert _get(c, 1, 3) is None and _get(c, 2, 0) == stamp_page("2", 0, 1)
    assert c.pages == 1


def test_a_zero_budget_keeps_nothing() -> None:
    c = PageCache(0)
    c.put(1, 0, _run(1, 0, 1, 1))
    assert _get(c, 1, 0) is None and len(c) == 0


def test_forget_drops_the_pages_named_and_those_past_a_cut() -> None:
    c = PageCache(64 * PAGE_SIZE)
    c.put(1, 0, _run(1, 0, 8, 1))
    c.put(1, 20, _run(1, 20, 2, 1))
    c.put(2, 0, _run(2, 0, 8, 1))
    c.forget(1, [(2, 1), (20, 2)], cut=6)
    assert [p for p in range(8) if _get(c, 1, p) is None] == [2, 6, 7]
    assert _get(c, 1, 20) is None and _get(c, 1, 21) is None
    assert c.pages == 16  # the run of 20..21 lost every page: let go
    assert all(_get(c, 2, p) == stamp_page("2", p, 1) for p in range(8))
