"""Layer 3: a real netmemfs-server process, through remote.py and through raw sockets."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio

from netmemfs import protocol as p
from netmemfs.errors import (
    AuthFailed,
    InvalidName,
    NoSpace,
    OutOfRange,
    SegmentExists,
    SegmentNotFound,
    ServerUnreachable,
)
from netmemfs.pages import PAGE_SIZE
from netmemfs.remote import RemoteStore
from tests.helpers import RawClient, ServerProc, run_trio, stamp_page


def _pages(seg: str, first: int, n: int, gen: int) -> bytes:
    return b"".join(stamp_page(seg, first + i, gen) for i in range(n))


def test_round_trip_sparse_reads_and_versions(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            r = await store.create("seg0", 100 * PAGE_SIZE)
            assert r.versions == {"seg0": 1}
            data = _pages("seg0", 10, 5, 1)
            c = await store.commit(
                [p.PageRun("seg0", 10, data), p.PageRun("seg0", 50, data[:PAGE_SIZE])]
            )
            assert c.versions == {"seg0": 2} and not c.replayed
            got = await store.read_pages("seg0", 0, 100)
            # Holes are not sent: only the stored pages travel.
            assert [(run.first, run.count) for run in got.runs] == [(10, 5), (50, 1)]
            assert got.version == 2
            flat = got.to_bytes()
            assert flat[10 * PAGE_SIZE : 15 * PAGE_SIZE] == data
            assert flat[:PAGE_SIZE] == bytes(PAGE_SIZE)
            st = await store.stat("seg0")
            assert (st.size, st.version, st.stored_pages) == (100 * PAGE_SIZE, 2, 6)
            info = await store.server_stat()
            assert (info.used_bytes, info.segments) == (6 * PAGE_SIZE, 1)

    run_trio(main)


def test_large_commit_is_staged_and_atomic(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            n = 3 * p.MAX_MESSAGE_PAGES + 5  # forces staging over several messages
            await store.create("big", n * PAGE_SIZE)
            data = _pages("big", 0, n, 1)
            await store.commit([p.PageRun("big", 0, data)])
            assert await store.read_bytes("big", 0, n) == data
            # A staged commit whose last part is past the end lands not at all.
            with pytest.raises(OutOfRange):
                await store.commit(
                    [
                        p.PageRun("big", 0, _pages("big", 0, n, 2)),
                        p.PageRun("big", n, data[:PAGE_SIZE]),
                    ]
                )
            assert await store.read_bytes("big", 0, n) == data

    run_trio(main)


def test_pipelined_requests_are_answered_by_id(server: ServerProc) -> None:
    async def setup() -> None:
        async with RemoteStore.connect(server.address) as store:
            await store.create("s", 64 * PAGE_SIZE)
            await store.commit([p.PageRun("s", 0, _pages("s", 0, 64, 1))])

    run_trio(setup)
    raw = RawClient(server.address)
    raw.hello()
    # Sixty-four requests in one write, then every answer matched by its id.
    raw.send(*(p.ReadPages(100 + i, "s", i, 1) for i in range(64)))
    seen = {}
    for _ in range(64):
        ev = raw.receive()
        assert isinstance(ev, p.Pages)
        seen[ev.req_id] = ev.runs[0].data
    assert seen == {100 + i: stamp_page("s", i, 1) for i in range(64)}
    raw.close()

    async def concurrent() -> None:
        async with RemoteStore.connect(server.address) as store:
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = (await store.read_pages("s", i, 1)).to_bytes()

            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(one, i)
            assert results == {i: stamp_page("s", i, 1) for i in range(64)}

    run_trio(concurrent)


def test_resize_rename_delete(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            await store.create("a", 8 * PAGE_SIZE)
            await store.commit([p.PageRun("a", 0, _pages("a", 0, 8, 1))])
            await store.resize("a", 3 * PAGE_SIZE)
            assert (await store.stat("a")).stored_pages == 3
            await store.resize("a", 8 * PAGE_SIZE)
            assert (await store.read_pages("a", 0, 8)).stored() == {0, 1, 2}
            await store.rename("a", "b")
            assert await store.list_segments() == ["b"]
            with pytest.raises(SegmentNotFound, match="'a' does not exist"):
                await store.stat("a")
            with pytest.raises(SegmentExists):
                await store.create("b", 0)
            await store.delete("b")
            assert await store.list_segments() == []
            with pytest.raises(SegmentNotFound):
                await store.commit([p.PageRun("b", 0, bytes(PAGE_SIZE))])
            with pytest.raises(InvalidName, match="'/'"):
                await store.create("x/y", 0)

    run_trio(main)


def test_capacity_refusal_is_an_error_not_a_crash(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--max-memory", "64K")

    async def main() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("a", 1 << 20)
            await store.commit([p.PageRun("a", 0, _pages("a", 0, 16, 1))])
            with pytest.raises(NoSpace, match="--max-memory"):
                await store.commit([p.PageRun("a", 16, _pages("a", 16, 1, 1))])
            # Rewrites of stored pages need no space; deleting frees it.
            await store.commit([p.PageRun("a", 0, _pages("a", 0, 16, 2))])
            await store.resize("a", 8 * PAGE_SIZE)
            await store.commit([p.PageRun("a", 0, _pages("a", 0, 8, 3))])
            assert (await store.server_stat()).capacity_bytes == 64 * 1024

    run_trio(main)
    assert srv.alive()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00\x00\x02\xc1\xc1", "not msgpack"),
        (struct.pack(">I", 1 << 31), "limit"),
        (struct.pack(">I", 3) + msgpack.packb([99, 1]), "unknown message type"),
        (struct.pack(">I", 2) + msgpack.packb([3]), "fields"),
    ],
)
def test_bad_frames_close_only_that_connection(
    server: ServerProc, data: bytes, reason: str
) -> None:
    server.expect_log(f"closing connection from 127.0.0.1:\\d+: .*{reason}")
    good = RawClient(server.address)
    good.hello()
    bad = RawClient(server.address)
    bad.hello()
    rss = server.rss_bytes()
    bad.send_raw(data)
    ev = bad.receive()
    assert isinstance(ev, p.Error) and ev.code == "protocol" and reason in ev.message
    assert bad.receive() is p.CLOSED
    good.send(p.ListSegments(9))
    assert isinstance(good.receive(), p.SegmentList)
    assert server.rss_bytes() < rss + (16 << 20)  # the 2 GiB announced were never allocated
    bad.close()
    good.close()


def test_handshake_rules(server: ServerProc) -> None:
    server.expect_log("refusing connection from 127.0.0.1:\\d+")
    raw = RawClient(server.address)
    raw.send(p.ListSegments(1))
    ev = raw.receive()
    assert isinstance(ev, p.Error) and "first message must be Hello" in ev.message
    assert raw.receive() is p.CLOSED
    raw.close()
    raw = RawClient(server.address)
    raw.send(p.Hello(1, 999, b"n"))
    ev = raw.receive()
    assert isinstance(ev, p.Error) and ev.code == "version" and "999" in ev.message
    assert raw.receive() is p.CLOSED
    raw.close()


def test_typed_errors_keep_the_connection(server: ServerProc) -> None:
    raw = RawClient(server.address)
    raw.hello()
    raw.send(
        p.ReadPages(2, "nope", 0, 1),
        p.Commit(3, b"t", (), (p.PageRun("nope", 0, bytes(PAGE_SIZE)),)),
        p.CreateSegment(4, b"c", "s", PAGE_SIZE),
    )
    replies = {}
    for _ in range(3):
        ev = raw.receive()
        assert isinstance(ev, p.Message)
        replies[ev.req_id] = ev
    assert isinstance(replies[2], p.Error) and replies[2].code == "not_found"
    assert isinstance(replies[3], p.Error) and replies[3].code == "not_found"
    assert isinstance(replies[4], p.Committed)
    raw.send(p.ReadPages(5, "s", 1, 1), p.ReadPages(6, "s", 0, p.MAX_MESSAGE_PAGES + 1))
    for want in (5, 6):
        ev = raw.receive()
        assert isinstance(ev, p.Error) and ev.req_id == want
        assert ev.code == ("out_of_range" if want == 5 else "too_large")
    raw.send(p.Abort(7, b"never-staged"))
    assert isinstance(raw.receive(), p.Aborted)
    raw.close()


def test_staged_pages_die_with_the_connection(server: ServerProc) -> None:
    raw = RawClient(server.address)
    raw.hello()
    raw.send(p.CreateSegment(1, b"c", "s", 4 * PAGE_SIZE))
    assert isinstance(raw.receive(), p.Committed)
    raw.send(p.StagePages(2, b"t1", "s", 0, _pages("s", 0, 2, 1)))
    assert isinstance(raw.receive(), p.Staged)
    raw.close()
    raw = RawClient(server.address)
    raw.hello()
    raw.send(p.Commit(3, b"t1", (), (p.PageRun("s", 3, stamp_page("s", 3, 1)),)))
    ev = raw.receive()
    assert isinstance(ev, p.Committed)
    raw.send(p.ReadPages(4, "s", 0, 4))
    ev = raw.receive()
    assert isinstance(ev, p.Pages)
    assert [(r.first, r.count) for r in ev.runs] == [(3, 1)]  # nothing staged survived
    raw.close()


def _token_file(tmp_path: Path, text: bytes = b"0123456789abcdef0123") -> Path:
    path = tmp_path / "token"
    path.write_bytes(text)
    path.chmod(0o600)
    return path


def test_token_challenge_response(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    token_file = _token_file(tmp_path)
    srv = server_factory("--token-file", str(token_file))
    srv.expect_log("refusing connection from 127.0.0.1:\\d+: wrong or missing token")
    token = token_file.read_bytes()

    async def main() -> None:
        async with RemoteStore.connect(srv.address, token=token) as store:
            await store.create("s", 0)
        with pytest.raises(AuthFailed, match="requires a token"):
            async with RemoteStore.connect(srv.address, retry_for_s=0):
                pass
        with pytest.raises(AuthFailed, match="wrong or missing token"):
            async with RemoteStore.connect(srv.address, token=b"x" * 20, retry_for_s=0):
                pass

    run_trio(main)
    # The token itself never crosses the wire: a raw client sees only nonces and HMACs.
    raw = RawClient(srv.address)
    raw.send(p.Hello(1, p.PROTOCOL_VERSION, b"n" * 32))
    ev = raw.receive()
    assert isinstance(ev, p.HelloReply) and ev.auth_required and token not in ev.server_nonce
    raw.send(p.ListSegments(2))  # skipping authentication is refused
    ev = raw.receive()
    assert isinstance(ev, p.Error) and ev.code == "auth"
    raw.close()


def _server_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netmemfs_server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_non_loopback_listen_needs_a_token(tmp_path: Path) -> None:
    r = _server_cli("--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "--token-file" in r.stderr and "--insecure" in r.stderr
    loose = _token_file(tmp_path)
    loose.chmod(0o644)
    r = _server_cli("--listen", "127.0.0.1:0", "--token-file", str(loose))
    assert r.returncode == 2 and "chmod 600" in r.stderr
    short = _token_file(tmp_path, b"short")
    r = _server_cli("--listen", "127.0.0.1:0", "--token-file", str(short))
    assert r.returncode == 2 and "at least 16" in r.stderr


def test_help_teaches() -> None:
    r = _server_cli("--help")
    assert r.returncode == 0
    for word in ("--data-dir", "--max-memory", "--listen", "--token-file", "examples:"):
        assert word in r.stdout


def test_data_dir_is_locked_against_a_second_server(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    server_factory(data_dir=tmp_path / "d")
    r = _server_cli("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 1 and "in use by another" in r.stderr


def test_unreachable_server_is_a_typed_error_naming_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused

        async def main() -> None:
            with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{port}.*retried for 0.3 s"):
                async with RemoteStore.connect(f"127.0.0.1:{port}", retry_for_s=0.3):
                    pass

        run_trio(main)


def test_client_survives_server_restart(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    srv = server_factory(data_dir=tmp_path / "d")

    async def main() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("s", PAGE_SIZE)
            await store.commit([p.PageRun("s", 0, stamp_page("s", 0, 1))])
            assert (await store.read_pages("s", 0, 1)).to_bytes() == stamp_page("s", 0, 1)
            srv.restart(same_port=True)
            # Both connections come back: the read lane, and the main one.
            got = await store.read_pages("s", 0, 1)
            assert got.to_bytes() == stamp_page("s", 0, 1)
            assert (await store.stat("s")).size == PAGE_SIZE
            assert store.reconnects == 2

    run_trio(main)
    assert os.path.exists(tmp_path / "d" / "lock")


def test_commit_resizes_and_writes_together(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            await store.create("s", PAGE_SIZE)
            # Grow and write past the old end in one transaction.
            r = await store.commit(
                [p.PageRun("s", 3, stamp_page("s", 3, 1))], resizes=[("s", 4 * PAGE_SIZE)]
            )
            assert r.versions == {"s": 2}
            assert (await store.stat("s")).size == 4 * PAGE_SIZE
            # A failing write undoes the resize with it.
            with pytest.raises(OutOfRange):
                await store.commit(
                    [p.PageRun("s", 9, stamp_page("s", 9, 1))], resizes=[("s", 8 * PAGE_SIZE)]
                )
            assert (await store.stat("s")).size == 4 * PAGE_SIZE

    run_trio(main)
