"""Exactly once: a commit retried after a lost reply, or replayed on purpose, lands once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from netmemfs.errors import Fenced
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from netmemfs.store import CommitResult
from tests.faultproxy import COMMIT, FaultProxy
from tests.helpers import ServerProc, run_trio, stamp_page, wait_for_async


async def _wait_version(store: RemoteStore, name: str, version: int) -> None:
    async def reached() -> bool:
        return (await store.stat(name)).version >= version

    await wait_for_async(reached, f"{name!r} to reach version {version}")


def test_commit_whose_reply_was_lost_is_retried_once(server: ServerProc) -> None:
    proxy = FaultProxy(server.address)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async with (
                RemoteStore.connect(proxy.address, retry_for_s=10) as store,
                RemoteStore.connect(server.address) as direct,
            ):
                await store.create("s", 4 * PAGE_SIZE)
                await store.commit([PageRun("s", 0, stamp_page("s", 0, 1))])
                proxy.drop_replies = True
                txn = store.new_txn()
                results: list[CommitResult] = []
                done = trio.Event()

                async def commit() -> None:
                    page = stamp_page("s", 1, 2)
                    results.append(await store.commit([PageRun("s", 1, page)], txn=txn))
                    done.set()

                nursery.start_soon(commit)
                # The server applied it; the reply is lost in the proxy.
                await _wait_version(direct, "s", 3)
                # Cut first: a reply still on its way must die with the old link. No
                # await between these lines, so the reconnect's handshake is not dropped.
                proxy.reset_all()
                proxy.drop_replies = False
                with trio.fail_after(10):
                    await done.wait()
                assert results[0].replayed, "the retry must be recognised as a replay"
                assert results[0].versions == {"s": 3}
                assert store.reconnects == 1
                assert (await direct.stat("s")).version == 3  # applied exactly once
                got = (await direct.read_pages("s", 0, 2)).to_bytes()
                assert got == stamp_page("s", 0, 1) + stamp_page("s", 1, 2)
            nursery.cancel_scope.cancel()

    try:
        run_trio(main)
    finally:
        proxy.close()


def test_replayed_txn_ids_apply_nothing_after_reconnect_and_restart(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    srv = server_factory(data_dir=tmp_path / "d")

    async def main() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("s", 2 * PAGE_SIZE)
            txn = store.new_txn()
            first = await store.commit([PageRun("s", 0, stamp_page("s", 0, 1))], txn=txn)
            assert not first.replayed
            await store.force_reconnect()
            again = await store.commit([PageRun("s", 0, stamp_page("s", 0, 99))], txn=txn)
            assert again.replayed and again.versions == first.versions
            # A replayed segment operation is recognised too.
            create_txn = store.new_txn()
            await store.create("t", 0, txn=create_txn)
            assert (await store.create("t", 0, txn=create_txn)).replayed

            srv.restart(same_port=True)
            after = await store.commit([PageRun("s", 0, stamp_page("s", 0, 98))], txn=txn)
            assert after.replayed and after.versions == first.versions
            assert (await store.read_pages("s", 0, 1)).to_bytes() == stamp_page("s", 0, 1)
            assert (await store.stat("s")).version == first.versions["s"]

    run_trio(main)


def test_a_claim_fences_the_connection_that_held_the_name(server: ServerProc) -> None:
    """A sends a commit that reaches the server late (held in the proxy); meanwhile B
    claims the same name and commits newer pages. A's commit must be refused (Fenced),
    and so must anything else A sends: B replaced it. A store that claims another name,
    or none, is not touched."""
    proxy = FaultProxy(server.address)

    async def main() -> None:
        async with (
            RemoteStore.connect(proxy.address, claim=b"writer") as a,
            RemoteStore.connect(server.address, claim=b"someone else") as other,
        ):
            await a.create("s", 4 * PAGE_SIZE)
            held = proxy.arm(COMMIT, "hold")
            outcome: list[BaseException | CommitResult] = []
            done = trio.Event()

            async def late() -> None:
                try:
                    outcome.append(await a.commit([PageRun("s", 0, stamp_page("s", 0, 1))]))
                except Fenced as e:
                    outcome.append(e)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(late)
                await trio.to_thread.run_sync(held.wait)
                async with RemoteStore.connect(server.address, claim=b"writer") as b:
                    await b.commit([PageRun("s", 0, stamp_page("s", 0, 2))])
                    held.release()
                    with trio.fail_after(10):
                        await done.wait()
                    assert isinstance(outcome[0], Fenced), outcome
                    assert "claimed b'writer'" in str(outcome[0]), outcome[0]
                    with pytest.raises(Fenced):
                        await a.commit([PageRun("s", 1, stamp_page("s", 1, 1))])
                    await other.commit([PageRun("s", 2, stamp_page("s", 2, 3))])
                    got = (await b.read_pages("s", 0, 3)).to_bytes()
        assert got == stamp_page("s", 0, 2) + bytes(PAGE_SIZE) + stamp_page("s", 2, 3)
        proxy.close()

    run_trio(main, timeout_s=60)
