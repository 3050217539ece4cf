"""Subscriptions and notices (issue 14, item 2) at the server: who hears of a commit,
what the notice says, and how notices stay bounded for a client that does not read."""

from __future__ import annotations

import stat

import pytest
import trio
import trio.testing

from netmemfs.errors import TooLarge
from netmemfs.ops import MakeNode, SetAttr, Truncate, WritePages
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import Notice
from netmemfs.remote import RemoteStore
from netmemfs_server import serve
from netmemfs_server.serve import MAX_NOTICE_RUNS, PageServer, _Session
from netmemfs_server.store import ROOT_INO, MemoryPageStore
from tests.helpers import ServerProc, run_trio, stamp_page

FILE = stat.S_IFREG | 0o644


class _Heard:
    """What a store was told, with a way to wait for the next notice."""

    def __init__(self, store: RemoteStore) -> None:
        self.notices: list[Notice | None] = []
        self.event = trio.Event()
        store.on_notice = self.hear

    def hear(self, n: Notice | None) -> None:
        self.notices.append(n)
        self.event.set()

    async def next(self) -> Notice | None:
        with trio.fail_after(10):
            while not self.notices:
                self.event = trio.Event()
                await self.event.wait()
        return self.notices.pop(0)


def test_a_subscriber_hears_of_other_connections_commits(server: ServerProc) -> None:
    async def main() -> None:
        async with (
            RemoteStore.connect(server.address) as a,
            RemoteStore.connect(server.address) as b,
        ):
            (f,) = (await b.change([MakeNode(ROOT_INO, "f", FILE, size=8 * PAGE_SIZE)])).created
            (g,) = (await b.change([MakeNode(ROOT_INO, "g", FILE, size=PAGE_SIZE)])).created
            heard = _Heard(a)
            await a.subscribe([f])
            await b.subscribe([f])  # b's own commits are not told to b
            r = await b.change(
                [WritePages(f, 2, stamp_page("f", 2, 1) * 2), WritePages(f, 6, bytes(PAGE_SIZE))]
            )
            version = dict(r.inodes)[f]
            assert await heard.next() == Notice(0, f, version, ((2, 2), (6, 1)), False)
            await b.change([WritePages(g, 0, bytes(PAGE_SIZE))])  # not subscribed: nothing
            r = await b.change([SetAttr(f, mode=0o600)])
            assert await heard.next() == Notice(0, f, dict(r.inodes)[f], (), False)
            r = await b.change([Truncate(f, PAGE_SIZE)])
            assert await heard.next() == Notice(0, f, dict(r.inodes)[f], (), True)
            await a.change([WritePages(f, 0, bytes(PAGE_SIZE))])  # a's own: not told
            await a.subscribe([])
            await b.change([WritePages(f, 0, bytes(PAGE_SIZE))])
            r = await a.change([SetAttr(g, mode=0o600)])  # a round trip after b's commit
            assert heard.notices == [], heard.notices
            assert b.subscribed == frozenset([f])

    run_trio(main)


def test_a_reconnect_subscribes_again_and_says_notices_may_be_lost(server: ServerProc) -> None:
    async def main() -> None:
        async with (
            RemoteStore.connect(server.address) as a,
            RemoteStore.connect(server.address) as b,
        ):
            (f,) = (await b.change([MakeNode(ROOT_INO, "f", FILE, size=PAGE_SIZE)])).created
            heard = _Heard(a)
            await a.subscribe([f])
            await a.force_reconnect()
            await a.getattr(f)  # makes the new connection
            assert await heard.next() is None
            r = await b.change([WritePages(f, 0, bytes(PAGE_SIZE))])
            assert await heard.next() == Notice(0, f, dict(r.inodes)[f], ((0, 1),), False)

    run_trio(main)


def test_a_subscription_is_bounded(server: ServerProc, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as a:
            too_many = range(1, serve.MAX_SUBSCRIBED_PER_CONNECTION + 2)
            with pytest.raises(TooLarge, match="subscribe to 1048576 inodes"):
                await a.subscribe(too_many)
            await a.subscribe([ROOT_INO])  # the connection still serves

    run_trio(main)


def test_notices_for_a_slow_reader_merge_per_inode() -> None:
    """A client that does not read its notices costs one queued notice per inode it
    subscribed to: later commits merge into it, and past MAX_NOTICE_RUNS runs it says
    "all of it" rather than growing."""

    async def main() -> None:
        server = PageServer(MemoryPageStore())
        session = _Session(server, trio.testing.memory_stream_pair()[0], "test")
        for page in range(MAX_NOTICE_RUNS):
            session.queue_notice(7, page + 1, [(page, 1)])
        want = [(p, 1) for p in range(MAX_NOTICE_RUNS)]
        assert session.notices == {7: (MAX_NOTICE_RUNS, want)}
        session.queue_notice(7, 1000, [(999, 1)])
        session.queue_notice(8, 5, [])
        session.queue_notice(7, 1001, [(0, 1)])
        assert session.notices == {7: (1001, None), 8: (5, [])}

    run_trio(main)
