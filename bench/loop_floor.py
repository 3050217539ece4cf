"""The floor a Python event loop puts under one request: a server answering 4 KiB to
each 40-byte request over loopback, one request in flight, written four ways.

    .venv/bin/python bench/loop_floor.py [--requests 10000]

  blocking  recv and send on a blocking socket (no event loop): the reference
  epoll     a non-blocking socket and select.epoll, the least an event loop must do
  asyncio   loop.sock_recv / sock_sendall
  trio      trio's socket recv / send, as netmemfs-server and the mount daemon use

The client is a plain blocking process. It prints the server's CPU time per round
trip (user and system, from os.times) and the ratio of each to blocking's; the
netmemfs server's own figure is bench/server.py's. It shows how much of a page's cost
on the per-page path (issue 15) is the loop before any of our code runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
from collections.abc import Callable

import plot  # bench/plot.py
import trio

REQUEST = b"r" * 40
REPLY = b"p" * 4120  # a page and its header


def client(port: int, n: int) -> None:
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        c.sendall(REQUEST)
        got = 0
        while got < len(REPLY):
            got += len(c.recv(65536))
    c.close()


def recv_request(s: socket.socket) -> None:
    got = 0
    while got < len(REQUEST):
        got += len(s.recv(len(REQUEST) - got))


def blocking(s: socket.socket, n: int) -> None:
    for _ in range(n):
        recv_request(s)
        s.sendall(REPLY)


def epoll(s: socket.socket, n: int) -> None:
    s.setblocking(False)
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN)
    for _ in range(n):
        got = 0
        while got < len(REQUEST):
            try:
                got += len(s.recv(len(REQUEST) - got))
            except BlockingIOError:
                ep.poll()
        s.send(REPLY)  # the socket buffer takes a page at once
    ep.close()


def with_asyncio(s: socket.socket, n: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        s.setblocking(False)
        for _ in range(n):
            got = 0
            while got < len(REQUEST):
                got += len(await loop.sock_recv(s, len(REQUEST) - got))
            await loop.sock_sendall(s, REPLY)

    asyncio.run(serve())


def with_trio(s: socket.socket, n: int) -> None:
    async def serve() -> None:
        ts = trio.socket.from_stdlib_socket(s)
        for _ in range(n):
            got = 0
            while got < len(REQUEST):
                got += len(await ts.recv(len(REQUEST) - got))
            await ts.send(REPLY)

    trio.run(serve)


def measure(server: Callable[[socket.socket, int], None], n: int) -> tuple[float, float]:
    """(user, system) CPU microseconds of the server per round trip."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pid = os.fork()
        if pid == 0:
            try:
                client(listener.getsockname()[1], n)
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = os.times()
        server(conn, n)
        t1 = os.times()
        conn.close()
        os.waitpid(pid, 0)
    return (t1.user - t0.user) * 1e6 / n, (t1.system - t0.system) * 1e6 / n


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=10000)
    plot.add_argument(ap)
    args = ap.parse_args()
    ways: dict[str, Callable[[socket.socket, int], None]] = {
        "blocking": blocking,
        "epoll": epoll,
        "asyncio": with_asyncio,
        "trio": with_trio,
    }
    results = {name: measure(fn, args.requests) for name, fn in ways.items()}
    ref = sum(results["blocking"])
    print(f"{args.requests} round trips, one in flight; server CPU us per round trip")
    print(f"{'loop':<10} {'user':>7} {'system':>7} {'total':>7} {'/blocking':>10}")
    for name, (user, system) in results.items():
        total = user + system
        print(f"{name:<10} {user:7.1f} {system:7.1f} {total:7.1f} {total / ref:10.2f}")
    if args.png is not None:
        written = plot.bars(
            args.png,
            f"Server CPU per 4 KiB round trip, {args.requests} requests, one in flight",
            {name: user + system for name, (user, system) in results.items()},
            unit="CPU us per round trip",
            reference="blocking",
            higher_is_better=False,
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
