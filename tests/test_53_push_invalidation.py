"""Push invalidation between mounts (issue 14, item 2): the server tells a mount of other
clients' commits to the files it has open, and the mount drops what changed from its
cache and the kernel's, so a mapping that stays mapped in B sees A's commits without
reopening. Without the notices B's mapping shows the old pages for ever: a mapped read
never asks the daemon anything. Each test runs on each store (a netmemfs-server, a
Redis, a Redis Cluster: their notices travel as sharded pub/sub)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from netmemfs.connect import connect_store
from netmemfs.pages import PAGE_SIZE
from netmemfs_server.store import ROOT_INO
from tests.helpers import MountProc, describe_page, run_trio, stamp_page, wait_for

MountFactory = Callable[..., MountProc]
PAGES = 8


def _write_pages(path: Path, first: int, data: bytes, *, size: int | None = None) -> None:
    """Write data at page first (and truncate to size first, if given), then fsync."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        os.pwrite(fd, data, first * PAGE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _mapped(path: Path, writable: bool = False) -> Iterator[mmap.mmap]:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(fd, PAGES * PAGE_SIZE, mmap.MAP_SHARED, prot)
        try:
            yield m
        finally:
            m.close()
    finally:
        os.close(fd)


def _page(m: mmap.mmap, n: int) -> bytes:
    return m[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]


def _shows(m: mmap.mmap, n: int, want: bytes) -> Callable[[], bool]:
    return lambda: _page(m, n) == want


def _wait_shows(m: mmap.mmap, n: int, want: bytes, what: str) -> None:
    try:
        wait_for(_shows(m, n, want), what)
    except AssertionError:
        raise AssertionError(f"{what}: page {n} shows {describe_page(_page(m, n))}") from None


async def _server_bytes(address: str, name: str, pages: int) -> bytes:
    async with connect_store(address) as store:
        ino = (await store.lookup(ROOT_INO, name)).ino
        return (await store.read_inode(ino, 0, pages)).to_bytes()


def _two(address: str, mount_factory: MountFactory) -> tuple[MountProc, MountProc]:
    a = mount_factory(address, name="a")
    b = mount_factory(address, name="b")
    _write_pages(a.path("f"), 0, b"".join(stamp_page("f", p, 0) for p in range(PAGES)))
    return a, b


def test_a_mapping_sees_another_mount_s_commits_without_reopening(
    any_store: str, mount_factory: MountFactory
) -> None:
    a, b = _two(any_store, mount_factory)
    with _mapped(b.path("f")) as m:
        assert _page(m, 3) == stamp_page("f", 3, 0)
        for gen in range(1, 11):
            _write_pages(a.path("f"), 3, stamp_page("f", 3, gen))
            _wait_shows(m, 3, stamp_page("f", 3, gen), f"B's mapping to show A's commit {gen}")
        assert _page(m, 4) == stamp_page("f", 4, 0)


def test_a_local_write_wins_until_its_own_commit(
    any_store: str, mount_factory: MountFactory
) -> None:
    """B writes page 1 through its mapping and does not sync; A commits pages 0 and 1.
    B sees A's page 0 and still its own page 1; once B syncs, the server holds A's page 0
    and B's page 1 (commits apply in order, B's last)."""
    a, b = _two(any_store, mount_factory)
    with _mapped(b.path("f"), writable=True) as m:
        m[PAGE_SIZE : 2 * PAGE_SIZE] = stamp_page("f", 1, 20)
        _write_pages(a.path("f"), 0, stamp_page("f", 0, 10) + stamp_page("f", 1, 10))
        _wait_shows(m, 0, stamp_page("f", 0, 10), "B's mapping to show A's page 0")
        assert _page(m, 1) == stamp_page("f", 1, 20), describe_page(_page(m, 1))
        m.flush()
    got = run_trio(lambda: _server_bytes(any_store, "f", 2))
    assert got == stamp_page("f", 0, 10) + stamp_page("f", 1, 20)


def test_a_mapping_sees_a_shrink_and_a_growth(any_store: str, mount_factory: MountFactory) -> None:
    """A cuts f to one page and grows it back: B's mapping shows zeros past page 0."""
    a, b = _two(any_store, mount_factory)
    with _mapped(b.path("f")) as m:
        assert _page(m, 5) == stamp_page("f", 5, 0)
        fd = os.open(a.path("f"), os.O_RDWR)
        try:
            os.ftruncate(fd, PAGE_SIZE)
            os.ftruncate(fd, PAGES * PAGE_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)
        _wait_shows(m, 5, bytes(PAGE_SIZE), "B's mapping to show the cut pages as zeros")
        assert _page(m, 0) == stamp_page("f", 0, 0)
        assert os.stat(b.path("f")).st_size == PAGES * PAGE_SIZE


def test_a_flood_of_commits_ends_with_the_last(any_store: str, mount_factory: MountFactory) -> None:
    """A commits page 2 300 times as fast as it can; B's mapping ends showing the last
    one (B's daemon may merge notices, never lose the last), and B's other pages and
    its daemon are as they were."""
    a, b = _two(any_store, mount_factory)
    with _mapped(b.path("f")) as m:
        fd = os.open(a.path("f"), os.O_RDWR)
        try:
            for gen in range(1, 301):
                os.pwrite(fd, stamp_page("f", 2, gen), 2 * PAGE_SIZE)
                os.fsync(fd)
                if gen % 50 == 0:
                    _page(m, 2)  # B reads meanwhile
        finally:
            os.close(fd)
        _wait_shows(m, 2, stamp_page("f", 2, 300), "B's mapping to show A's last commit")
        assert _page(m, 7) == stamp_page("f", 7, 0)
    assert b.path("f").stat().st_size == PAGES * PAGE_SIZE
