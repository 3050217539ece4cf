"""Layer 2: the in-memory page store, without a network."""

from __future__ import annotations

import pytest

from netmemfs.errors import InvalidName, NoSpace, OutOfRange, SegmentExists, SegmentNotFound
from netmemfs.ops import Create, Delete, Op, Rename, Resize, Write
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs_server.store import CHUNK_PAGES, MemoryPageStore
from tests.helpers import stamp_page


def _w(seg: str, first: int, *gens: int) -> Write:
    return Write(
        PageRun(seg, first, b"".join(stamp_page(seg, first + i, g) for i, g in enumerate(gens)))
    )


def _commit(store: MemoryPageStore, txn: bytes, *ops: Op) -> None:
    """As the server commits: checked, orphans no client holds reaped."""
    store.apply(txn, store.settle(ops))


def test_holes_runs_and_chunk_boundaries() -> None:
    s = MemoryPageStore()
    _commit(s, b"1", Create("a", 4 * CHUNK_PAGES * PAGE_SIZE))
    first = CHUNK_PAGES - 2
    _commit(s, b"2", _w("a", first, 1, 1, 1, 1), _w("a", first + 6, 1))
    version, runs = s.read("a", 0, 3 * CHUNK_PAGES)
    assert version == 2
    got = {r.first + i for r in runs for i in range(r.count)}
    assert got == {first, first + 1, first + 2, first + 3, first + 6}
    for r in runs:
        for i in range(r.count):
            page = r.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            assert page == stamp_page("a", r.first + i, 1)
    assert s.used_pages == 5
    # One page at a time (a fault's read, which takes a path of its own): the same.
    for p in range(3 * CHUNK_PAGES):
        _, one = s.read("a", p, 1)
        assert [(r.first, bytes(r.data)) for r in one] == (
            [(p, stamp_page("a", p, 1))] if p in got else []
        ), p


def test_a_failing_op_leaves_the_whole_commit_unapplied() -> None:
    s = MemoryPageStore()
    _commit(s, b"1", Create("a", 8 * PAGE_SIZE))
    ops: list[Op] = [_w("a", 0, 2), Create("b", PAGE_SIZE), _w("a", 8, 2)]  # last is past the end
    with pytest.raises(OutOfRange, match="past its end"):
        s.check(ops)
    assert s.read("a", 0, 1)[1] == ()
    assert "b" not in s.segments


def test_create_write_rename_delete_in_one_transaction() -> None:
    s = MemoryPageStore()
    _commit(s, b"1", Create("a", PAGE_SIZE), _w("a", 0, 1), Rename("a", "b"), Create("a", 0))
    assert sorted(s.segments) == ["a", "b"]
    assert s.read("b", 0, 1)[1][0].data == stamp_page("a", 0, 1)
    with pytest.raises(SegmentExists):
        s.check([Create("b", 0)])
    with pytest.raises(SegmentNotFound):
        s.check([Delete("zz")])
    _commit(s, b"2", Delete("b"))
    assert s.used_pages == 0


def test_rename_replaces_the_target_and_frees_it() -> None:
    s = MemoryPageStore()
    _commit(s, b"1", Create("a", PAGE_SIZE), Create("b", PAGE_SIZE), _w("a", 0, 1), _w("b", 0, 7))
    _commit(s, b"2", Rename("a", "b"))
    assert list(s.segments) == ["b"]
    assert s.read("b", 0, 1)[1][0].data == stamp_page("a", 0, 1)
    assert s.used_pages == 1


def test_shrink_frees_pages_and_zeroes_the_partial_tail() -> None:
    s = MemoryPageStore()
    size = 3 * CHUNK_PAGES * PAGE_SIZE
    _commit(s, b"1", Create("a", size), Write(PageRun("a", 0, b"\xff" * size)))
    _commit(s, b"2", Resize("a", PAGE_SIZE + 100))
    assert s.used_pages == 2
    _commit(s, b"3", Resize("a", size))
    _, runs = s.read("a", 0, 4)
    assert [(r.first, r.count) for r in runs] == [(0, 2)]
    page1 = runs[0].data[PAGE_SIZE:]
    assert page1[:100] == b"\xff" * 100 and page1[100:] == bytes(PAGE_SIZE - 100)


def test_capacity_refuses_new_pages_but_allows_rewrites() -> None:
    s = MemoryPageStore(capacity_bytes=4 * PAGE_SIZE)
    _commit(s, b"1", Create("a", 16 * PAGE_SIZE), _w("a", 0, 1, 1, 1, 1))
    _commit(s, b"2", _w("a", 0, 2, 2, 2, 2))  # same pages: no new space
    with pytest.raises(NoSpace, match="--max-memory"):
        s.check([_w("a", 4, 3)])


@pytest.mark.parametrize("name", ["", "a/b", "x\x00y", "tab\tname", ".", "..", "é" * 200])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        MemoryPageStore().check([Create(name, 0)])


def test_reads_past_the_end_are_refused() -> None:
    s = MemoryPageStore()
    _commit(s, b"1", Create("a", PAGE_SIZE + 1))
    assert s.read("a", 0, 2)[1] == ()
    with pytest.raises(OutOfRange):
        s.read("a", 1, 2)


def test_reads_lend_views_that_later_commits_do_not_change() -> None:
    s = MemoryPageStore()
    _commit(s, b"1", Create("a", 2 * CHUNK_PAGES * PAGE_SIZE), _w("a", 0, 1, 1))
    _, lent = s.read("a", 0, 2)
    assert isinstance(lent[0].data, memoryview)
    _commit(s, b"2", _w("a", 0, 2))  # copy-on-write: the lent view keeps generation 1
    _commit(s, b"3", Resize("a", 100))  # zeroing a tail in place must not reach it either
    assert bytes(lent[0].data) == stamp_page("a", 0, 1) + stamp_page("a", 1, 1)
    _, now = s.read("a", 0, 1)
    assert bytes(now[0].data)[:100] == stamp_page("a", 0, 2)[:100]
    assert bytes(now[0].data)[100:] == bytes(PAGE_SIZE - 100)
    del lent, now
    # With no view alive, writes go in place again (no copy).
    chunk = s.segments["a"].data.chunks[0]  # type: ignore[union-attr]
    _commit(s, b"4", _w("a", 0, 4))
    assert s.segments["a"].data.chunks[0] is chunk  # type: ignore[union-attr]
