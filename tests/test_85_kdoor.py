"""The /dev/netmem daemon (netmemfs/kdoor.py) on this machine, without the module.

DeviceProvider reads requests from a file descriptor and writes answers to it; here it
is one end of a SOCK_SEQPACKET socket pair (one message per read, as the device gives),
and the test is the module at the other end: it sends the layouts of
include/netmem_uapi.h and reads the answers. The server is real, behind tests/faultproxy.
"""

from __future__ import annotations

import errno
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from netmemfs._trio_util import open_quiet_nursery
from netmemfs._uffd_cffi import ffi, lib
from netmemfs.connect import connect_store
from netmemfs.core import ROOT_INO
from netmemfs.kdoor import DeviceProvider, device_claim
from netmemfs.pages import PAGE_SIZE
from netmemfs.remote import RemoteStore
from netmemfs.store import Store
from tests.faultproxy import CHANGE, FaultProxy
from tests.helpers import ServerProc, describe_page, run_trio, stamp_page

SEGMENT = "k"
AREA = 1


@pytest.fixture
def proxy(server: ServerProc) -> Iterator[FaultProxy]:
    p = FaultProxy(server.address)
    yield p
    p.close()


def _msg(
    kind: int, req_id: int, *, commit: int = 0, count: int = 0, pages: int = 0, area: int = AREA
) -> bytes:
    m = ffi.new("struct netmem_msg *")
    m.id, m.type, m.area, m.commit, m.count = req_id, kind, area, commit, count
    m.size = 4 * PAGE_SIZE
    m.segment = SEGMENT.encode()
    payload = b""
    if kind == lib.NETMEM_MSG_COMMIT_PAGES:
        numbers = list(range(count)) + [0] * (lib.NETMEM_CHUNK_PAGES - count)
        payload = b"".join(n.to_bytes(8, "little") for n in numbers)
        payload += b"".join(stamp_page(SEGMENT, n, pages) for n in range(count))
        m.len = len(payload)
    return bytes(ffi.buffer(m)) + payload


@asynccontextmanager
async def _device(store: Store, **options: float) -> AsyncIterator[socket.socket]:
    """A DeviceProvider serving store on one end of a socket pair; the other end, where
    the test sends what the module would and reads the answers."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    with ours, theirs, tempfile.TemporaryDirectory(prefix="kdoor-journal-") as journal:
        provider = DeviceProvider(store, theirs.fileno(), Path(journal), **options)
        async with open_quiet_nursery() as nursery:
            nursery.start_soon(provider.serve)
            yield ours
            nursery.cancel_scope.cancel()


def _sync(ours: socket.socket, req_id: int, commit: int, count: int, gen: int) -> None:
    """Sync commit of pages 0..count-1 with generation gen: COMMIT_PAGES (request
    req_id), then COMMIT_END (req_id + 1)."""
    ours.send(_msg(lib.NETMEM_MSG_COMMIT_PAGES, req_id, commit=commit, count=count, pages=gen))
    ours.send(_msg(lib.NETMEM_MSG_COMMIT_END, req_id + 1, commit=commit, count=count))


async def _open_and_lose_sync_1(ours: socket.socket, proxy: FaultProxy) -> None:
    """Attach (request 1), then sync 1 of four pages (2, 3), whose commit the proxy
    drops on the way: it fails after the daemon's commit timeout."""
    ours.send(_msg(lib.NETMEM_MSG_OPEN, 1))
    assert await _answer(ours) == (1, 0)
    lost = proxy.arm(CHANGE, "drop")
    _sync(ours, 2, commit=1, count=4, gen=1)
    await trio.to_thread.run_sync(lost.wait)


async def _server_pages(server: ServerProc) -> list[bytes]:
    async with RemoteStore.connect(server.address) as direct:
        got = await direct.read_bytes(SEGMENT, 0, 4)
    return [got[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in range(4)]


async def _answer(sock: socket.socket) -> tuple[int, int]:
    """The next answer: (request id, status)."""
    await trio.lowlevel.wait_readable(sock)
    r = ffi.from_buffer("struct netmem_reply *", sock.recv(ffi.sizeof("struct netmem_reply")))
    return int(r.id), int(r.status)


def test_the_syncs_of_an_area_land_in_order(server: ServerProc, proxy: FaultProxy) -> None:
    """Sync 1's commit is lost on the way (the server never sees it); sync 2 then
    passes, and the connection breaks. Were sync 2 sent at once, the client would send
    sync 1 again on the new connection and the older pages would land last. The
    daemon sends sync 2 only once sync 1 has landed or failed (here: after its
    commit timeout), so the server ends with sync 2's pages."""

    async def main() -> None:
        answers: dict[int, int] = {}
        async with (
            RemoteStore.connect(proxy.address) as store,
            _device(store, commit_timeout_s=2) as ours,
        ):
            await _open_and_lose_sync_1(ours, proxy)
            broken = proxy.arm(CHANGE, "reset-after")
            _sync(ours, 4, commit=2, count=4, gen=2)
            answers.update([await _answer(ours), await _answer(ours)])
            await trio.to_thread.run_sync(broken.wait)
        for n, page in enumerate(await _server_pages(server)):
            assert page == stamp_page(SEGMENT, n, 2), f"page {n}: {describe_page(page)}"
        assert answers[5] == 0, answers
        assert answers[3] != 0, "sync 1 was lost, yet reported committed"

    run_trio(main, timeout_s=60)


def test_areas_attaching_a_new_segment_at_once_all_succeed(server: ServerProc) -> None:
    """Four OPENs of a segment that does not exist yet: one creates it, the others
    find it created (the processes of a program that attach together)."""

    async def main() -> None:
        async with RemoteStore.connect(server.address) as store, _device(store) as ours:
            for i in range(4):
                ours.send(_msg(lib.NETMEM_MSG_OPEN, 10 + i, area=10 + i))
            answers = dict([await _answer(ours) for _ in range(4)])
        assert answers == dict.fromkeys(range(10, 14), 0), answers

    run_trio(main, timeout_s=60)


def test_a_sync_the_kernel_aborts_before_its_turn_is_never_sent(
    server: ServerProc, proxy: FaultProxy
) -> None:
    """Sync 1's commit is lost on the way, so sync 2 waits for its turn; the kernel
    gives sync 2 up (COMMIT_ABORT) and syncs again (sync 3, here of pages 0-1 only).
    Sync 2 must never reach the server, and gets no answer. Sync 1, whose outcome the
    daemon could not know, is sent again (the same transaction) before sync 3: pages 2-3
    are sync 1's, older than anything the kernel sends later."""

    async def main() -> None:
        async with (
            RemoteStore.connect(proxy.address) as store,
            _device(store, commit_timeout_s=2) as ours,
        ):
            await _open_and_lose_sync_1(ours, proxy)
            _sync(ours, 4, commit=2, count=4, gen=2)
            ours.send(_msg(lib.NETMEM_MSG_COMMIT_ABORT, 6, commit=2))
            _sync(ours, 7, commit=3, count=2, gen=3)
            answers = dict([await _answer(ours), await _answer(ours)])
            assert set(answers) == {3, 8}, answers
            assert answers[8] == 0, answers
        pages = await _server_pages(server)
        for n, want in enumerate([stamp_page(SEGMENT, 0, 3), stamp_page(SEGMENT, 1, 3)]):
            assert pages[n] == want, f"page {n}: {describe_page(pages[n])}"
        for n in (2, 3):
            assert pages[n] == stamp_page(SEGMENT, n, 1), f"page {n}: {describe_page(pages[n])}"

    run_trio(main, timeout_s=60)


def test_a_replaced_daemon_s_late_commit_never_lands_after_its_successor_s(
    server: ServerProc, proxy: FaultProxy
) -> None:
    """Daemon 1's commit of sync 1 is held up on its way to the server (daemon 1 was cut
    off, or paused). Daemon 2, started in its place, commits sync 2 of the same pages.
    When sync 1 then reaches the server it must be refused: both daemons claim the
    machine's name (device_claim), and daemon 2's claim fenced daemon 1's connection.
    Without that, the older pages land last, after daemon 2's sync was acknowledged."""

    async def main() -> None:
        claim = device_claim()
        async with (
            RemoteStore.connect(proxy.address, claim=claim) as store1,
            _device(store1) as old,
        ):
            old.send(_msg(lib.NETMEM_MSG_OPEN, 1))
            assert await _answer(old) == (1, 0)
            held = proxy.arm(CHANGE, "hold")
            _sync(old, 2, commit=1, count=4, gen=1)
            await trio.to_thread.run_sync(held.wait)
            async with (
                RemoteStore.connect(server.address, claim=claim) as store2,
                _device(store2) as new,
            ):
                _sync(new, 10, commit=2, count=4, gen=2)
                assert await _answer(new) == (11, 0)
            held.release()
            req_id, status = await _answer(old)
        assert req_id == 3
        assert status == -errno.ESTALE, f"daemon 1's late sync answered {status}"
        for n, page in enumerate(await _server_pages(server)):
            assert page == stamp_page(SEGMENT, n, 2), f"page {n}: {describe_page(page)}"

    run_trio(main, timeout_s=60)


def test_a_replaced_daemon_s_later_commit_is_refused_on_every_store(any_store: str) -> None:
    """The door on each store (issue 16): daemon 1 attaches an area and syncs it; daemon
    2, started in its place (the same claim, device_claim), syncs the same pages. A sync
    daemon 1 sends after that is refused (ESTALE), and the file keeps daemon 2's pages.
    On Redis, each file keeps the newest generation that committed to it
    (docs/semantics.md, "The Redis store"); without the check, daemon 1's older pages
    land last."""

    @asynccontextmanager
    async def daemon(open_id: int) -> AsyncIterator[socket.socket]:
        """A daemon of this machine (its claim) on the store, its area attached."""
        async with (
            connect_store(any_store, claim=device_claim(), retry_for_s=10) as store,
            _device(store) as sock,
        ):
            sock.send(_msg(lib.NETMEM_MSG_OPEN, open_id))
            assert await _answer(sock) == (open_id, 0)
            yield sock

    async def main() -> None:
        async with daemon(1) as old:
            _sync(old, 2, commit=1, count=4, gen=1)
            assert await _answer(old) == (3, 0)  # before its successor: it lands
            async with daemon(10) as new:
                _sync(new, 11, commit=1, count=4, gen=2)
                assert await _answer(new) == (12, 0)
                _sync(old, 4, commit=2, count=4, gen=3)
                req_id, status = await _answer(old)
                assert (req_id, status) == (5, -errno.ESTALE), "daemon 1's late sync"
                _sync(new, 13, commit=2, count=4, gen=4)  # the successor goes on
                assert await _answer(new) == (14, 0)
        async with connect_store(any_store, retry_for_s=10) as store:
            ino = (await store.lookup(ROOT_INO, SEGMENT)).ino
            got = (await store.read_inode(ino, 0, 4)).to_bytes()
        for n in range(4):
            page = got[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]
            assert page == stamp_page(SEGMENT, n, 4), f"page {n}: {describe_page(page)}"

    run_trio(main, timeout_s=90)
