"""Read lanes (issue 15, item 4): connections that only read pages, which the server
serves from a thread of its own instead of its event loop.

A lane must answer exactly as any connection does, keep every limit, see each commit
whole or not at all (the lane's thread reads while the loop's thread commits), and
count in the server's statistics. All against a real netmemfs-server.
"""

from __future__ import annotations

import signal
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from netmemfs import protocol as p
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.helpers import RawClient, ServerProc, Tls, run_trio, stamp_page, wait_for
from tests.test_92_hardening import _error_then_close, _until_closed
from tests.test_94_operations import metrics_address, scrape

REQUESTS = [
    p.ReadPages(10, "s", 0, 1),  # a stored page
    p.ReadPages(11, "s", 1, 3),  # a hole, then stored pages
    p.ReadPages(12, "s", 0, 9),  # past the end: out_of_range
    p.ReadPages(13, "nope", 0, 1),  # no such segment
    p.ReadPages(14, "a/b", 0, 1),  # a name no segment can have
    p.ReadPages(15, "s", 0, 5000),  # more pages than a message holds
    p.ReadInode(16, 2, 0, 4),  # the segment by number
    p.ReadInode(17, 1, 0, 1),  # a directory
    p.ReadInode(18, 999, 0, 1),  # no such inode
]


def _segment(address: str, tls: ssl.SSLContext | None = None) -> None:
    """Segment s: 4 pages, page 1 a hole."""

    async def main() -> None:
        async with RemoteStore.connect(address, tls=tls) as store:
            await store.create("s", 4 * PAGE_SIZE)
            await store.commit([PageRun("s", i, stamp_page("s", i, 1)) for i in (0, 2, 3)])

    run_trio(main)


_OPEN: list[RawClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(address: str, tls: ssl.SSLContext | None = None) -> RawClient:
    """A connection after Hello, closed after the test."""
    raw = RawClient(address)
    _OPEN.append(raw)
    if tls is not None:
        raw.sock = tls.wrap_socket(raw.sock, server_hostname=address.split(":")[0])
    raw.hello()
    return raw


def _lane(address: str, tls: ssl.SSLContext | None = None) -> RawClient:
    raw = _client(address, tls)
    raw.send(p.ReadLane(1))
    assert raw.receive() == p.ReadLaneOpen(1)
    return raw


def _answers(raw: RawClient, requests: list[p.Request]) -> list[p.Message]:
    raw.send(*requests)  # pipelined: one write
    got = []
    for _ in requests:
        ev = raw.receive()
        assert isinstance(ev, p.Message), ev
        got.append(ev)
    return got


def test_a_lane_answers_every_read_as_any_connection_does(server: ServerProc) -> None:
    _segment(server.address)
    plain = _client(server.address)
    expected = _answers(plain, REQUESTS)
    kinds = [type(m).__name__ + (f":{m.code}" if isinstance(m, p.Error) else "") for m in expected]
    assert kinds == [
        "Pages",
        "Pages",
        "Error:out_of_range",
        "Error:not_found",
        "Error:invalid_name",
        "Error:too_large",
        "Pages",
        "Error:is_dir",
        "Error:stale",
    ], kinds
    lane = _lane(server.address)
    assert _answers(lane, REQUESTS) == expected
    assert _answers(lane, REQUESTS[:2]) == expected[:2]  # and again: the lane goes on


def test_over_tls_the_loop_serves_a_lane_alike(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """Only the event loop speaks a TLS stream: there it serves the lane itself, with
    the same answers and the same end at any other request."""
    tls = Tls(tmp_path)
    srv = server_factory(*tls.server_args())
    srv.expect_log("closing read lane")
    _segment(srv.address, tls.context())
    expected = _answers(_client(srv.address, tls.context()), REQUESTS)
    lane = _lane(srv.address, tls.context())
    assert _answers(lane, REQUESTS) == expected
    lane.send(p.StatServer(3), p.ReadPages(4, "s", 0, 1))
    got = _until_closed(lane)
    assert len(got) == 1 and isinstance(got[0], p.Error) and got[0].code == "protocol", got
    assert "StatServer on a read lane" in got[0].message, got


def test_a_lane_ends_at_any_other_request_with_an_error_that_says_so(
    server: ServerProc,
) -> None:
    _segment(server.address)
    server.expect_log("closing read lane")
    lane = _lane(server.address)
    lane.send(p.ReadPages(2, "s", 0, 1), p.StatServer(3), p.ReadPages(4, "s", 0, 1))
    got = _until_closed(lane)
    assert [type(m) for m in got] == [p.Pages, p.Error], got
    err = got[1]
    assert isinstance(err, p.Error) and err.req_id == 3 and err.code == "protocol", err
    assert "StatServer on a read lane" in err.message and "another connection" in err.message


def test_only_a_connection_that_holds_nothing_becomes_a_lane(server: ServerProc) -> None:
    _segment(server.address)
    raw = _client(server.address)
    raw.send(p.Subscribe(2, (2,)), p.ReadLane(3))
    assert isinstance(raw.receive(), p.Subscribed)
    err = raw.receive()
    assert isinstance(err, p.Error) and err.code == "protocol", err
    assert "holds subscriptions" in err.message and "new connection" in err.message, err
    # The connection goes on as it was.
    assert (
        _answers(raw, [p.ReadPages(4, "s", 0, 1)])[0]
        == _answers(_lane(server.address), [p.ReadPages(4, "s", 0, 1)])[0]
    )


def test_a_lane_keeps_the_idle_and_slow_client_timeouts(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--idle-timeout", "1", "--slow-client-timeout", "1")
    srv.expect_log("closing read lane")
    idle = _lane(srv.address)
    err = _error_then_close(idle)
    assert err.code == "timeout" and "--idle-timeout" in err.message, err

    slow = _lane(srv.address)
    frame = slow.conn.send(p.ReadPages(2, "s", 0, 1))
    slow.send_raw(frame[:5])  # a message begun, never finished
    err = _error_then_close(slow)
    assert err.code == "timeout" and "--slow-client-timeout" in err.message, err

    # Replies never taken: 128 MiB asked for, nothing read.
    big = p.MAX_MESSAGE_PAGES

    async def fill() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("big", big * PAGE_SIZE)
            await store.commit([PageRun("big", 0, bytes(range(256)) * (big * PAGE_SIZE // 256))])

    run_trio(fill)
    stuck = _lane(srv.address)
    stuck.send(*(p.ReadPages(10 + i, "big", 0, big) for i in range(8)))
    wait_for(
        lambda: "a reply was not taken within 1 s" in srv.log_text(),
        "the server to close the lane whose replies are not taken",
    )


def test_a_lane_keeps_the_frame_limit(server: ServerProc) -> None:
    server.expect_log("closing read lane")
    lane = _lane(server.address)
    lane.send_raw((p.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    err = _error_then_close(lane)
    assert err.code == "protocol" and "limit" in err.message, err


def test_a_lane_sees_each_commit_whole(server: ServerProc) -> None:
    """A writer commits 64 MiB at a time (staged), every page stamped with its round,
    while a lane reads them back 16 MiB per request: each read shows one round, the one
    its version says. The server's own thread applies each commit while the lane's
    thread reads (lane.py); a commit takes long enough to apply that, without the store's
    lock, the interpreter switches threads in the middle of it."""
    pages = 4 * p.MAX_MESSAGE_PAGES
    rounds = 12

    def stamp(r: int, n: int) -> bytes:
        return r.to_bytes(8, "big") * (n * PAGE_SIZE // 8)

    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            await store.create("w", pages * PAGE_SIZE)
            first = await store.commit([PageRun("w", 0, stamp(0, pages))])
            base = dict(first.versions)["w"]
            done = False
            reads = 0

            async def writer() -> None:
                nonlocal done
                for r in range(1, rounds + 1):
                    await store.commit([PageRun("w", 0, stamp(r, pages))])
                done = True

            async def reader(at: int) -> None:
                nonlocal reads
                n = p.MAX_MESSAGE_PAGES
                while not done:
                    got = await store.read_pages("w", at, n)
                    data = got.to_bytes()
                    r = int.from_bytes(data[:8], "big")
                    assert data == stamp(r, n), f"a read mixed rounds (version {got.version})"
                    assert got.version == base + r, (got.version, base, r)
                    reads += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                for at in range(0, pages, p.MAX_MESSAGE_PAGES):
                    nursery.start_soon(reader, at)
            assert store._lane is not None, "the reads did not go over a lane"
            assert reads > 0

    run_trio(main)


def test_lane_reads_count_in_the_server_s_metrics(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--metrics", "127.0.0.1:0")
    _segment(srv.address)
    at = metrics_address(srv)

    def reads() -> float:
        line = 'netmemfs_server_requests_total{type="ReadPages"} '
        text = scrape(at)
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    before = reads()
    lane = _lane(srv.address)
    _answers(lane, [p.ReadPages(i, "s", 0, 1) for i in range(2, 12)])
    assert reads() == before + 10  # counted while the lane is open
    lane.close()
    gauge = "netmemfs_server_connections "
    wait_for(lambda: f"\n{gauge}0.0" in scrape(at), "the server to see the lane closed")
    assert reads() == before + 10  # and once, after


def test_the_server_stops_at_sigterm_with_a_lane_open(server: ServerProc) -> None:
    _segment(server.address)
    lane = _lane(server.address)
    assert isinstance(_answers(lane, [p.ReadPages(2, "s", 0, 1)])[0], p.Pages)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(20)  # raises if it does not stop: the lane's thread must not hold it
    assert _until_closed(lane) == []


def test_many_readers_share_one_lane_and_a_cancelled_one_hands_on_its_turn(
    server: ServerProc,
) -> None:
    """remote.py's lane has no reader task: whoever waits receives for everyone. 40
    tasks read at once, some cancelled while waiting (their turn to receive must pass
    on, or the rest would wait for ever), then the lane is cut under them and every
    read still gets its own page."""
    n = 64

    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            await store.create("m", n * PAGE_SIZE)
            await store.commit([PageRun("m", i, stamp_page("m", i, 1)) for i in range(n)])
            got = 0
            cancelled = 0

            async def reads(k: int) -> None:
                nonlocal got, cancelled
                for j in range(12):
                    page = (k * 7 + j) % n
                    if (k + j) % 5 == 0:
                        with trio.move_on_after(0) as scope:  # cancelled at its first wait
                            await store.read_pages("m", page, 1)
                        cancelled += scope.cancelled_caught
                        continue
                    r = await store.read_pages("m", page, 1)
                    assert r.to_bytes() == stamp_page("m", page, 1), (k, j)
                    got += 1
                    if k == 0 and j == 6:
                        await store.force_reconnect()  # cut both links under the others

            # Three times: whether a cancelled requester was receiving at that moment
            # depends on timing.
            for _ in range(3):
                got = cancelled = 0
                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        for k in range(40):
                            nursery.start_soon(reads, k)
                assert got == 40 * 12 - 96 and cancelled > 0, (got, cancelled)
            assert store._lane is not None

    run_trio(main)
