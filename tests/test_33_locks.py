"""Locks the server grants (issue 14, item 3), through remote.py: exclusion, sharing,
first-come fairness, deadlines, leases, fencing, and bad requests."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from netmemfs.errors import Fenced, NotHeld, Stale, TooLarge, WouldBlock
from netmemfs.ops import Fence, MakeNode, WritePages
from netmemfs.pages import PAGE_SIZE
from netmemfs.remote import RemoteStore
from netmemfs.store import LockGrant
from netmemfs_server import locks
from netmemfs_server.locks import LockTable
from netmemfs_server.store import ROOT_INO
from tests.faultproxy import FaultProxy
from tests.helpers import ServerProc, run_trio, stamp_page

FILE = stat.S_IFREG | 0o644
ServerFactory = Callable[..., ServerProc]


async def _file(store: RemoteStore, name: str = "f") -> int:
    r = await store.change([MakeNode(ROOT_INO, name, FILE, size=4 * PAGE_SIZE)])
    return r.created[0]


@asynccontextmanager
async def _pair(address: str) -> AsyncIterator[tuple[RemoteStore, RemoteStore, int]]:
    """Two clients of the server at address, and a file the first made."""
    async with RemoteStore.connect(address) as a, RemoteStore.connect(address) as b:
        yield a, b, await _file(a)


def test_an_exclusive_lock_excludes_and_passes_on_at_release(server: ServerProc) -> None:
    async def main() -> None:
        async with _pair(server.address) as (a, b, f):
            held = await a.lock(f, 0, 0, exclusive=True, wait_s=0)
            with pytest.raises(WouldBlock, match="was not granted within 0 s"):
                await b.lock(f, 100, 1, exclusive=False, wait_s=0)
            got: list[LockGrant] = []
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    got.append(await b.lock(f, 0, PAGE_SIZE, exclusive=True, wait_s=10))

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert not got
                r = await a.change([WritePages(f, 0, stamp_page("f", 0, 1))])
                await a.unlock(held.token)
            assert got[0].token > held.token, "tokens grow"
            assert got[0].version == dict(r.inodes)[f], "granted after the commit before"

    run_trio(main)


def test_ranges_and_shared_locks_go_together(server: ServerProc) -> None:
    async def main() -> None:
        async with _pair(server.address) as (a, b, f):
            await a.lock(f, 0, PAGE_SIZE, exclusive=True, wait_s=0)
            await b.lock(f, PAGE_SIZE, PAGE_SIZE, exclusive=True, wait_s=0)
            await a.lock(f, 2 * PAGE_SIZE, 0, exclusive=False, wait_s=0)
            await b.lock(f, 3 * PAGE_SIZE, 10, exclusive=False, wait_s=0)
            with pytest.raises(WouldBlock):
                await b.lock(f, PAGE_SIZE - 1, 2, exclusive=False, wait_s=0)

    run_trio(main)


def test_a_writer_is_not_passed_by_readers_that_come_after_it(server: ServerProc) -> None:
    """A reads; B asks to write and waits; C asks to read after B: C must wait behind B
    although A's shared lock alone would let it in. Order of grants: B, then C."""

    async def main() -> None:
        async with (
            RemoteStore.connect(server.address) as a,
            RemoteStore.connect(server.address) as b,
            RemoteStore.connect(server.address) as c,
        ):
            f = await _file(a)
            reader = await a.lock(f, 0, 0, exclusive=False, wait_s=0)
            order: list[str] = []
            grants: dict[str, LockGrant] = {}
            b_granted = trio.Event()
            async with trio.open_nursery() as nursery:

                async def ask(name: str, store: RemoteStore, exclusive: bool) -> None:
                    grants[name] = await store.lock(f, 0, 0, exclusive=exclusive, wait_s=10)
                    order.append(name)
                    if name == "b":
                        b_granted.set()

                nursery.start_soon(ask, "b", b, True)
                # Once B waits at the server, a new shared request, which A's shared
                # lock alone would let in, is refused: it would pass B. Until then it
                # is granted (and given back).
                with trio.fail_after(10):
                    while True:
                        try:
                            probe = await a.lock(f, 0, 1, exclusive=False, wait_s=0)
                        except WouldBlock:
                            break
                        await a.unlock(probe.token)
                nursery.start_soon(ask, "c", c, False)
                await trio.testing.wait_all_tasks_blocked()
                assert order == []
                await a.unlock(reader.token)
                with trio.fail_after(10):
                    await b_granted.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert order == ["b"]
                await b.unlock(grants["b"].token)
            assert order == ["b", "c"]

    run_trio(main)


def test_a_closed_connection_loses_its_locks_at_once(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as b:
            f = await _file(b)
            async with RemoteStore.connect(server.address) as a:
                await a.lock(f, 0, 0, exclusive=True, wait_s=0)
                with pytest.raises(WouldBlock):
                    await b.lock(f, 0, 0, exclusive=True, wait_s=0)
            # a's connection closed: b gets the lock well within the lease (10 s)
            with trio.fail_after(5):
                await b.lock(f, 0, 0, exclusive=True, wait_s=5)

    run_trio(main)


def test_a_lease_runs_out_and_a_commit_under_it_is_fenced(
    server_factory: ServerFactory,
) -> None:
    """A holds the lock through a proxy that then stops every byte (A is cut off, not
    dead: its connection stays). After the lease (1 s here) B gets the lock and
    commits; when A's link comes back, A's commit fenced by its old token is refused,
    and B's page stays. A commit fenced by a lock that still lasts lands."""
    server = server_factory("--lock-lease", "1")
    proxy = FaultProxy(server.address)

    async def main() -> None:
        async with (
            RemoteStore.connect(proxy.address) as a,
            RemoteStore.connect(server.address) as b,
        ):
            f = await _file(a)
            old = await a.lock(f, 0, 0, exclusive=True, wait_s=0)
            assert old.lease_s == 1.0
            proxy.stall()
            new = await b.lock(f, 0, 0, exclusive=True, wait_s=10)
            await b.change([Fence(f, new.token), WritePages(f, 0, stamp_page("f", 0, 2))])
            proxy.resume()
            with pytest.raises(Fenced, match=f"lock {old.token} on inode {f}"):
                await a.change([Fence(f, old.token), WritePages(f, 0, stamp_page("f", 0, 1))])
            got = await b.read_inode(f, 0, 1)
            assert got.to_bytes() == stamp_page("f", 0, 2)
            with pytest.raises(NotHeld):
                await a.unlock(old.token)

    try:
        run_trio(main)
    finally:
        proxy.close()


def test_renewing_keeps_a_lock_past_its_lease(server_factory: ServerFactory) -> None:
    """A renews its lock every 0.2 s of a 1 s lease; B, asking for 2.5 s, never gets it.
    (Time is what a lease is about: this test waits for it.)"""
    server = server_factory("--lock-lease", "1")

    async def main() -> None:
        async with _pair(server.address) as (a, b, f):
            await a.lock(f, 0, 0, exclusive=True, wait_s=0)
            async with trio.open_nursery() as nursery:

                async def renew() -> None:
                    while True:
                        assert await a.renew() == 1.0
                        await trio.sleep(0.2)

                nursery.start_soon(renew)
                with pytest.raises(WouldBlock):
                    await b.lock(f, 0, 0, exclusive=True, wait_s=2.5)
                nursery.cancel_scope.cancel()

    run_trio(main)


def test_bad_lock_requests_are_refused(server: ServerProc) -> None:
    async def main() -> None:
        async with _pair(server.address) as (a, b, f):
            held = await a.lock(f, 0, 0, exclusive=True, wait_s=0)
            with pytest.raises(NotHeld, match=f"lock token {held.token} is not held"):
                await b.unlock(held.token)  # not b's
            with pytest.raises(NotHeld):
                await a.unlock(12345)  # never granted
            with pytest.raises(Stale):
                await a.lock(999_999, 0, 0, exclusive=True, wait_s=0)
            with pytest.raises(Fenced):
                await b.change([Fence(f, 12345), WritePages(f, 0, bytes(PAGE_SIZE))])
            await a.unlock(held.token)
            with pytest.raises(NotHeld):
                await a.unlock(held.token)  # twice
            assert await a.renew() == 10.0  # holds nothing: renews nothing, still answers

    run_trio(main)


def test_a_holder_cannot_hold_or_queue_more_than_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(locks, "MAX_LOCKS_PER_HOLDER", 3)

    async def main() -> None:
        table = LockTable(10.0)
        for i in range(3):
            await table.acquire("a", 1, i, 1, True, 0)
        with pytest.raises(TooLarge, match="may hold or wait for 3 locks"):
            await table.acquire("a", 1, 9, 1, True, 0)
        await table.acquire("b", 1, 9, 1, True, 0)  # another holder is not affected
        table.release_all("a")
        assert table.per_holder == {"b": 1}
        await table.acquire("a", 1, 0, 1, True, 0)

    run_trio(main)
