"""Layer 6 (groundwork): FaultServer serving real userfaultfd faults from a page source.

The faults come from worker threads whose system calls make the kernel read registered
pages (write(2) from the region), so the serving trio loop never touches them itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import pytest
import trio

from netmemfs import uffd
from netmemfs.faults import FaultServer
from netmemfs.pages import PAGE_SIZE
from tests.helpers import run_trio, stamp_page, wait_for_async

pytestmark = pytest.mark.skipif(
    uffd.probe_features() == 0, reason="userfaultfd is not available to this user"
)
PAGES = 64


def _page(p: int) -> bytes | None:
    return None if p % 7 == 3 else stamp_page("anon", p, 1)  # every 7th page is a hole


def _expected(first: int, count: int) -> bytes:
    return b"".join(_page(p) or bytes(PAGE_SIZE) for p in range(first, first + count))


def _kernel_copy(m: uffd.AnonMapping, first: int, count: int) -> bytes:
    """Make the kernel read pages of m (write(2) into a temp file), return what it read."""
    with tempfile.TemporaryFile() as f:
        view = m.buffer()[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
        assert os.write(f.fileno(), view) == len(view)
        return os.pread(f.fileno(), len(view), 0)


async def kernel_copy(m: uffd.AnonMapping, first: int, count: int) -> bytes:
    """_kernel_copy in a worker thread the test may abandon: if a fault is never served,
    run_trio's deadline fails the test and the fixture closes the uffd, which releases
    the thread, instead of the whole run hanging."""
    return await trio.to_thread.run_sync(_kernel_copy, m, first, count, abandon_on_cancel=True)


class Setup:
    def __init__(self) -> None:
        self.u = uffd.Userfaultfd.open(uffd.FEATURE_EVENT_REMOVE)
        self.m = uffd.AnonMapping(PAGES * PAGE_SIZE)
        self.u.register(self.m.address, self.m.length)
        self.fetched: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None

    async def source(self, first: int, count: int) -> Sequence[bytes | None]:
        if self.gate is not None:
            await self.gate.wait()
        self.fetched.append((first, count))
        return [_page(p) for p in range(first, first + count)]

    def close(self) -> None:
        self.m.close()
        self.u.close()


@pytest.fixture
def setup() -> object:
    s = Setup()
    yield s
    s.close()


def test_sequential_faults_are_prefetched_and_holes_zeroed(setup: Setup) -> None:
    server = FaultServer(setup.u, setup.m.address, setup.m.length, setup.source)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            got = await kernel_copy(setup.m, 0, PAGES)
            assert got == _expected(0, PAGES)
            nursery.cancel_scope.cancel()

    run_trio(main, timeout_s=20)
    assert server.stats.fetches < PAGES // 4, server.stats  # prefetched, not page by page
    assert server.stats.pages_zeroed > 0 and server.stats.pages_copied > 0


def test_concurrent_faults_on_one_page_fetch_it_once(setup: Setup) -> None:
    server = FaultServer(setup.u, setup.m.address, setup.m.length, setup.source)
    setup.gate = trio.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            results: list[bytes] = []

            async def reader() -> None:
                results.append(await kernel_copy(setup.m, 10, 1))

            for _ in range(4):
                nursery.start_soon(reader)

            async def all_faulted() -> bool:
                return server.stats.faults >= 4

            await wait_for_async(all_faulted, "four faults on page 10")
            assert setup.gate is not None
            setup.gate.set()  # only now may the single fetch complete

            async def all_read() -> bool:
                return len(results) == 4

            await wait_for_async(all_read, "the four readers")
            assert results == [_expected(10, 1)] * 4
            nursery.cancel_scope.cancel()

    run_trio(main, timeout_s=20)
    assert [f for f in setup.fetched if f[0] <= 10 < f[0] + f[1]] == [(10, 1)]


def test_removed_pages_are_fetched_again(setup: Setup) -> None:
    server = FaultServer(setup.u, setup.m.address, setup.m.length, setup.source)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            assert await kernel_copy(setup.m, 20, 1) == _expected(20, 1)
            # A REMOVE event: madvise waits until the event is read, so never call it
            # from the loop that reads the events.
            await trio.to_thread.run_sync(
                setup.m.dontneed, 20 * PAGE_SIZE, PAGE_SIZE, abandon_on_cancel=True
            )

            async def forgotten() -> bool:
                return server.stats.removed_pages >= 1

            await wait_for_async(forgotten, "the REMOVE event")
            assert await kernel_copy(setup.m, 20, 1) == _expected(20, 1)
            nursery.cancel_scope.cancel()

    run_trio(main, timeout_s=20)
    assert [f for f in setup.fetched if f[0] <= 20 < f[0] + f[1]] == [(20, 1), (20, 1)]
