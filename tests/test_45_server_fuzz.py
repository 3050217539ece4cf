"""Hostile bytes at a live server: garbage and mutated valid frames. Afterwards the server
must still answer a normal client, must have logged no internal error, and its memory must
not have grown past a bound."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netmemfs import protocol as p
from netmemfs.pages import PAGE_SIZE
from tests.helpers import RawClient, ServerProc
from tests.test_10_protocol import requests

RSS_GROWTH_BOUND = 96 << 20


def _hostile(draw: st.DrawFn) -> tuple[bool, bytes]:
    say_hello = draw(st.booleans())
    kind = draw(st.sampled_from(["garbage", "mutated", "length", "truncated"]))
    if kind == "garbage":
        return say_hello, draw(st.binary(min_size=1, max_size=2048))
    frame = bytearray(p.Connection(p.Role.CLIENT).send(draw(requests)))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] = draw(st.integers(0, 255))
    elif kind == "length":
        frame[:4] = draw(st.integers(0, (1 << 32) - 1)).to_bytes(4, "big")
    else:
        frame = frame[: draw(st.integers(0, len(frame) - 1))]
    return say_hello, bytes(frame)


hostile = st.composite(_hostile)()


def _drain(sock: socket.socket) -> None:
    """Read until the server closes or stops talking for a while; never hang."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
    except (TimeoutError, ConnectionResetError):
        pass


def test_hostile_bytes_leave_the_server_serving(server: ServerProc) -> None:
    server.expect_log(r"(closing|refusing) connection from 127\.0\.0\.1:\d+")
    good = RawClient(server.address)
    good.hello()
    good.send(p.CreateSegment(1, b"keep", "keep", 4 * PAGE_SIZE))
    assert isinstance(good.receive(), p.Committed)
    rss_before = server.rss_bytes()
    ids = iter(range(10, 1 << 30))

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(hostile)
    def attack(case: tuple[bool, bytes]) -> None:
        say_hello, data = case
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            if say_hello:
                sock.sendall(p.Connection(p.Role.CLIENT).send(p.Hello(0, p.PROTOCOL_VERSION, b"n")))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            _drain(sock)
        finally:
            sock.close()
        req = next(ids)
        good.send(p.StatSegment(req, "keep"))
        ev = good.receive()
        assert isinstance(ev, p.SegmentInfo) and ev.req_id == req, ev

    attack()
    assert server.alive()
    growth = server.rss_bytes() - rss_before
    assert growth < RSS_GROWTH_BOUND, f"server RSS grew by {growth >> 20} MiB"
    good.close()
