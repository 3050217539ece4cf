"""Hardening (issue 6): TLS, authentication, and the server's per-client limits.

Each limit is set low on a real server, a client is pushed past it, and the test checks
the error it gets names the limit, and that a second client on the same server is not
affected. docs/security.md says what each limit protects.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from netmemfs import auth
from netmemfs import protocol as p
from netmemfs.errors import AuthFailed, InvalidName, ServerUnreachable
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from netmemfs_server.serve import AUTH_FAILURE_DELAY_S
from tests.helpers import (
    MountProc,
    RawClient,
    ServerProc,
    Tls,
    run_trio,
    stamp_page,
    wait_for,
    wait_for_async,
)
from tests.test_30_server import _server_cli, _token_file

ROOT = Path(__file__).resolve().parent.parent
MOUNT = (sys.executable, "-m", "netmemfs", "mount")


def _list_works(
    address: str, *, token: bytes | None = None, tls: ssl.SSLContext | None = None
) -> None:
    """A client (retrying for 5 s) is served: the server is well after the test's abuse."""

    async def go() -> None:
        async with RemoteStore.connect(address, token=token, tls=tls, retry_for_s=5) as store:
            await store.list_segments()

    run_trio(go)


def _until_closed(raw: RawClient) -> list[p.Message]:
    """Everything the server sends until it closes the connection."""
    got: list[p.Message] = []
    while True:
        ev = raw.receive()
        if ev is p.CLOSED:
            return got
        assert isinstance(ev, p.Message)
        got.append(ev)


def _error_then_close(raw: RawClient) -> p.Error:
    got = _until_closed(raw)
    assert len(got) == 1 and isinstance(got[0], p.Error), got
    return got[0]


# --- TLS ---------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)


def test_tls_with_a_token_commits_and_reads(
    server_factory: Callable[..., ServerProc], tls: Tls, tmp_path: Path
) -> None:
    token_file = _token_file(tmp_path)
    srv = server_factory(*tls.server_args(), "--token-file", str(token_file))
    srv.expect_log("wrong or missing token")
    token = token_file.read_bytes()
    data = b"".join(stamp_page("tls", n, 1) for n in range(8))

    async def main() -> None:
        async with RemoteStore.connect(srv.address, token=token, tls=tls.context()) as store:
            await store.create("tls", len(data))
            await store.commit([PageRun("tls", 0, data)])
            assert await store.read_bytes("tls", 0, 8) == data
        # The token is checked inside TLS as it is over plain TCP.
        with pytest.raises(AuthFailed, match="wrong or missing token"):
            async with RemoteStore.connect(
                srv.address, token=b"y" * 20, tls=tls.context(), retry_for_s=0
            ):
                pass

    run_trio(main)


def test_tls_refusals_say_what_to_do(
    server_factory: Callable[..., ServerProc], tls: Tls, tmp_path: Path
) -> None:
    srv = server_factory(*tls.server_args())
    (tmp_path / "other").mkdir()
    other = Tls(tmp_path / "other")

    async def main() -> None:
        # A CA that did not sign the server's certificate: refused at once, not retried.
        t0 = time.monotonic()
        with pytest.raises(AuthFailed, match="--tls-ca names the CA"):
            async with RemoteStore.connect(srv.address, tls=other.context(), retry_for_s=30):
                pass
        assert time.monotonic() - t0 < 10, "a certificate refusal must not be retried"
        # Plain TCP to a TLS server.
        with pytest.raises(ServerUnreachable, match="give --tls-ca"):
            async with RemoteStore.connect(srv.address, retry_for_s=0):
                pass

    run_trio(main)
    _list_works(srv.address, tls=tls.context())


def test_mount_and_region_over_tls(
    server_factory: Callable[..., ServerProc],
    mount_factory: Callable[..., MountProc],
    tls: Tls,
) -> None:
    srv = server_factory(*tls.server_args())
    mount = mount_factory(srv.address, "--tls-ca", str(tls.ca_file))
    page = stamp_page("m", 0, 1)
    with open(mount.path("m"), "w+b") as f:
        f.write(page)
        f.flush()
        os.fsync(f.fileno())
    # A region with its own agent, which is given the CA by the environment.
    program = (
        "from netmemfs import anon\n"
        "from tests.helpers import stamp_page\n"
        f"with anon.map(256 * 4096, segment='r', server={srv.address!r}) as r:\n"
        "    for n in range(256):\n"
        "        r[n * 4096 : (n + 1) * 4096] = stamp_page('r', n, 1)\n"
        "    r.sync()\n"
        f"with anon.map(256 * 4096, segment='r', server={srv.address!r}, budget=1 << 19) as r:\n"
        "    assert all(r[n * 4096 : (n + 1) * 4096] == stamp_page('r', n, 1)"
        " for n in range(256))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NETMEMFS_TLS_CA": str(tls.ca_file)}
    r = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0 and r.stdout == "ok\n", (r.returncode, r.stdout, r.stderr)

    async def check() -> None:
        async with RemoteStore.connect(srv.address, tls=tls.context()) as store:
            assert await store.read_bytes("m", 0, 1) == page
            assert await store.read_bytes("r", 3, 1) == stamp_page("r", 3, 1)

    run_trio(check)


def test_server_refuses_half_a_tls_configuration(tls: Tls) -> None:
    r = _server_cli("--listen", "127.0.0.1:0", "--tls-cert", str(tls.cert))
    assert r.returncode == 2 and "--tls-key" in r.stderr


# --- authentication ----------------------------------------------------------------


def test_a_replayed_challenge_answer_is_refused_after_a_delay(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    token_file = _token_file(tmp_path)
    srv = server_factory("--token-file", str(token_file))
    srv.expect_log("wrong or missing token")
    token = token_file.read_bytes()
    nonce = b"c" * auth.NONCE_BYTES

    # A legitimate exchange, as an eavesdropper would record it.
    first = RawClient(srv.address)
    first.send(p.Hello(1, p.PROTOCOL_VERSION, nonce))
    hello = first.receive()
    assert isinstance(hello, p.HelloReply) and hello.auth_required
    proof = auth.client_proof(token, hello.server_nonce, nonce)
    first.send(p.Authenticate(2, proof))
    assert isinstance(first.receive(), p.AuthReply)
    first.close()

    # The same Hello and the recorded proof on a new connection: the server's nonce is new.
    replay = RawClient(srv.address)
    replay.send(p.Hello(1, p.PROTOCOL_VERSION, nonce))
    again = replay.receive()
    assert isinstance(again, p.HelloReply) and again.server_nonce != hello.server_nonce
    t0 = time.monotonic()
    replay.send(p.Authenticate(2, proof))
    err = _error_then_close(replay)  # refused, and nothing else is possible on it
    assert err.code == "auth", err
    assert time.monotonic() - t0 >= AUTH_FAILURE_DELAY_S * 0.9, "a failed proof is not delayed"
    replay.close()
    _list_works(srv.address, token=token)


def test_segment_names_are_checked_where_they_enter(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            for bad in ("a\nb", "x" * 300, "..", "", "a\x7fb"):
                with pytest.raises(InvalidName):
                    await store.create(bad, 0)

    run_trio(main)
    # In the mount a name is POSIX's: any bytes but '/' and NUL, at most 255 of them.
    mount = mount_factory(server.address)
    open(mount.path("odd\x01name"), "wb").close()
    with pytest.raises(OSError) as e:
        open(mount.path("x" * 256), "wb").close()
    assert e.value.errno == errno.ENAMETOOLONG
    # A region names its file by path; the directories on the way must exist.
    r = subprocess.run(
        [sys.executable, "-c", "from netmemfs import anon\n"
         f"anon.map(4096, segment='a/b', server={server.address!r})"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "'a' does not exist" in r.stderr, r.stderr


def test_the_mount_is_private_to_its_user(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    mount = mount_factory(server.address)
    (mount.path("f")).write_bytes(b"x")
    r = subprocess.run(
        ["ls", str(mount.path(""))],
        capture_output=True,
        text=True,
        timeout=30,
        user=65534,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr


# --- limits ------------------------------------------------------------------------


def test_connections_past_the_limit_are_told_the_server_is_busy(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--max-connections", "2")
    srv.expect_log("--max-connections")
    held = [RawClient(srv.address) for _ in range(2)]
    for raw in held:
        raw.hello()
    third = RawClient(srv.address)
    err = _error_then_close(third)
    assert err.code == "busy" and "--max-connections" in err.message, err
    third.close()

    async def refused() -> None:
        with pytest.raises(ServerUnreachable, match="max-connections"):
            async with RemoteStore.connect(srv.address, retry_for_s=0.3):
                pass

    run_trio(refused)
    held[0].send(p.ListSegments(5))  # those already in are served
    assert isinstance(held[0].receive(), p.SegmentList)
    held[1].close()
    _list_works(srv.address)  # a place freed is taken (retried within 5 s)
    held[0].close()


def test_a_frame_past_max_frame_closes_only_that_connection(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--max-frame", "64K", "--max-inflight", "64K")
    srv.expect_log("the limit is")
    raw = RawClient(srv.address)
    raw.hello()
    raw.send(p.StagePages(2, b"t" * 16, "s", 0, bytes(32 * PAGE_SIZE)))
    err = _error_then_close(raw)
    assert err.code == "protocol" and "the limit is 65536" in err.message, err
    raw.close()
    # Before the handshake the bound is 1 KiB, whatever --max-frame says.
    early = RawClient(srv.address)
    early.send_raw((4096).to_bytes(4, "big") + bytes(4096))
    err = _error_then_close(early)
    assert "the limit is 1024" in err.message, err
    early.close()
    _list_works(srv.address)


def test_pipelined_commits_past_max_inflight_are_slowed_not_refused(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--max-frame", "64K", "--max-inflight", "64K")
    pages = 12  # 48 KiB each: two never fit in --max-inflight at once

    async def main() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("s", 8 * pages * PAGE_SIZE)

            async def one(i: int) -> None:
                data = b"".join(stamp_page("s", i * pages + n, 1) for n in range(pages))
                await store.commit([PageRun("s", i * pages, data)])

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            got = await store.read_bytes("s", 0, 8 * pages)
            assert got == b"".join(stamp_page("s", n, 1) for n in range(8 * pages))
            assert (await store.stat("s")).version == 1 + 8

    run_trio(main)


def test_idle_connections_are_closed_and_clients_come_back(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--idle-timeout", "1")
    raw = RawClient(srv.address)
    raw.hello()
    err = _error_then_close(raw)  # after a second of nothing
    assert err.code == "timeout" and "--idle-timeout" in err.message, err
    raw.close()

    async def main() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("s", 0)
            link = store._link
            assert link is not None

            async def lost() -> bool:
                return link.lost is not None

            await wait_for_async(lost, "the server to end the idle connection", 20)
            assert link.lost is not None and "--idle-timeout" in link.lost
            await store.stat("s")  # a new connection, transparently
            assert store.reconnects == 1

    run_trio(main)


def test_slow_clients_are_closed(server_factory: Callable[..., ServerProc]) -> None:
    srv = server_factory("--slow-client-timeout", "1")
    srv.expect_log("reply was not taken")
    silent = RawClient(srv.address)  # says nothing at all
    err = _error_then_close(silent)
    assert "no handshake within 1 s" in err.message, err
    silent.close()

    half = RawClient(srv.address)
    half.hello()
    frame = half.conn.send(p.ListSegments(2))
    half.send_raw(frame[: len(frame) // 2])
    err = _error_then_close(half)
    assert err.code == "timeout" and "begun and not finished" in err.message, err
    half.close()

    # A client that asks and never reads: the server's send waits, then gives up.
    async def put() -> None:
        async with RemoteStore.connect(srv.address) as store:
            await store.create("big", 4096 * PAGE_SIZE)
            data = b"".join(stamp_page("big", n, 1) for n in range(1024))
            for first in range(0, 4096, 1024):
                await store.commit([PageRun("big", first, data)])

    run_trio(put)
    host, port = srv.address.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    conn = p.Connection(p.Role.CLIENT)
    sock.sendall(conn.send(p.Hello(1, p.PROTOCOL_VERSION, b"n" * 32)))
    sock.sendall(b"".join(conn.send(p.ReadPages(2 + i, "big", 0, 4096)) for i in range(8)))
    wait_for(
        lambda: "reply was not taken" in srv.log_text(), "the server to drop the non-reader", 30
    )
    sock.close()
    _list_works(srv.address)


def test_limits_are_checked_at_start() -> None:
    r = _server_cli("--listen", "127.0.0.1:0", "--max-frame", "1M", "--max-inflight", "64K")
    assert r.returncode == 2 and "--max-inflight must be at least --max-frame" in r.stderr


def test_staging_past_the_servers_total_is_refused_and_frees_with_the_connection(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory("--max-staged-total", "64K")
    holder = RawClient(srv.address)
    holder.hello()
    holder.send(p.StagePages(2, b"a" * 16, "s", 0, bytes(12 * PAGE_SIZE)))
    assert isinstance(holder.receive(), p.Staged)
    other = RawClient(srv.address)
    other.hello()
    other.send(p.StagePages(2, b"b" * 16, "s", 0, bytes(8 * PAGE_SIZE)))
    err = other.receive()
    assert isinstance(err, p.Error) and "--max-staged-total" in err.message, err
    holder.close()  # its open transaction dies with it, and frees the room

    def fits() -> bool:
        other.send(p.StagePages(3, b"b" * 16, "s", 0, bytes(8 * PAGE_SIZE)))
        return isinstance(other.receive(), p.Staged)

    wait_for(fits, "the closed connection's staged pages to be freed")
    other.close()


def test_mount_refuses_a_token_file_others_may_read(tmp_path: Path) -> None:
    loose = _token_file(tmp_path)
    loose.chmod(0o640)
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "netmemfs",
            "mount",
            str(tmp_path / "mnt"),
            "--server",
            "127.0.0.1:1",
            "--token-file",
            str(loose),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode != 0 and "chmod 600" in r.stderr, r.stderr
    assert not os.path.ismount(tmp_path / "mnt")
