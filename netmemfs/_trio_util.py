"""Small trio helpers shared by the client-side modules."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import overload

import trio

from netmemfs.errors import NetmemError
from netmemfs.pages import Buffer
from netmemfs.protocol import SOCKET_BUFFER_BYTES, Connection, coalesce


@asynccontextmanager
async def open_quiet_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose lone error comes out as itself, not wrapped in an ExceptionGroup.

    Background tasks of ours catch their own expected errors, so a group almost always
    holds one exception from the body; callers then catch NetmemError as usual. A group
    of several is re-raised as it is, unless all are Cancelled-free NetmemErrors, where
    the first stands for them all.
    """
    with lone_errors():
        async with trio.open_nursery() as nursery:
            yield nursery


@contextmanager
def lone_errors() -> Iterator[None]:
    """An ExceptionGroup raised inside comes out as its lone error (or its first, if
    all are NetmemErrors), like open_quiet_nursery's; for libraries' task groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1 or all(isinstance(e, NetmemError) for e in leaves):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            out.extend(_leaves(e))
        else:
            out.append(e)
    return out


# Reads outside a large frame are this long at most, so that little of a large frame is
# read before it is recognised and received in place.
SMALL_RECEIVE_BYTES = 64 * 1024
# writev takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512

# The two functions below drive a trio socket's descriptor with os.readv/os.writev and
# trio's readiness waits, instead of one trio call (and one trip through the scheduler)
# per system call: a 1 MiB frame then costs a few system calls and one checkpoint.
# The descriptor stays owned by the trio socket. Each os call reads sock.fileno() right
# before it with no await in between, so a socket closed meanwhile (fileno -1) is noticed
# and a descriptor number reused by a newer socket is never touched. trio keeps the
# descriptor non-blocking, so the calls never block the event loop.


def tune_socket(sock: trio.socket.SocketType) -> None:
    """Large buffers both ways, so a 1 MiB message moves in few system calls (the kernel
    caps them at net.core.[rw]mem_max)."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The TCP socket under a plain or a TLS stream."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream), stream
    return stream.socket


def _fd(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the connection was closed")
    return fd


@overload
def _read_now(sock: trio.socket.SocketType, view: memoryview) -> int | None: ...
@overload
def _read_now(sock: trio.socket.SocketType, view: None) -> bytes | None: ...
@overload
def _read_now(sock: trio.socket.SocketType, view: memoryview | None) -> int | bytes | None: ...
def _read_now(sock: trio.socket.SocketType, view: memoryview | None) -> int | bytes | None:
    """What has come on sock: read into view (how many bytes), or with no view up to
    SMALL_RECEIVE_BYTES of it; None if nothing has."""
    try:
        if view is not None:
            # readv writes at most len(view) bytes into view, a buffer the caller owns
            # and keeps alive through the call.
            return os.readv(_fd(sock), [view])
        return os.read(_fd(sock), SMALL_RECEIVE_BYTES)
    except BlockingIOError:
        return None
    except OSError as e:
        raise trio.BrokenResourceError(f"receive failed: {e.strerror}") from e


async def receive_into(stream: trio.abc.ReceiveStream, conn: Connection) -> None:
    """Read from stream into conn until a whole message (or EOF) is there, large frames
    straight into their own buffer."""
    if not isinstance(stream, trio.SocketStream):
        conn.receive_data(await stream.receive_some(SMALL_RECEIVE_BYTES))
        return
    sock = stream.socket
    waited = False
    while True:
        # view is the unfilled tail of the frame buffer conn owns; conn.received() is
        # told how much of it was filled.
        view = conn.receive_buffer()
        try:
            got = _read_now(sock, view)
        finally:
            if view is not None:
                view.release()
        if got is None:
            waited = True
            await trio.lowlevel.wait_readable(sock)
            continue
        if isinstance(got, int):
            n = got
            conn.received(n)
        else:
            n = len(got)
            conn.receive_data(got)
        if n == 0 or conn.message_ready():
            break
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def receive_into_view(sock: trio.socket.SocketType, view: memoryview) -> int:
    """Read what has come on sock into view (at least a byte, or 0 at EOF) and return
    how many bytes: one trip through the scheduler when it waits for them, as trio's
    recv_into takes a second one after."""
    waited = False
    while (n := _read_now(sock, view)) is None:
        waited = True
        await trio.lowlevel.wait_readable(sock)
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return n


async def acquire_soon(lock: trio.Lock | trio.Semaphore) -> None:
    """Acquire lock: at once, with no checkpoint, when it is free (a path taken per
    request then pays no trip through the scheduler); else wait as acquire() does."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def _write_now(sock: trio.socket.SocketType, views: list[memoryview], at: int) -> int:
    """Write views[at:] until done or the kernel would block; the index of the first
    view not wholly written (views[at] trimmed to the part still to send)."""
    while at < len(views):
        try:
            # Each view stays alive in `views` until the kernel has copied all of it.
            sent = os.writev(_fd(sock), views[at : at + _MAX_IOV])
        except BlockingIOError:
            return at
        except OSError as e:
            raise trio.BrokenResourceError(f"send failed: {e.strerror}") from e
        while sent and sent >= len(views[at]):
            sent -= len(views[at])
            at += 1
        if sent:
            views[at] = views[at][sent:]
    return at


async def _send_rest(sock: trio.socket.SocketType, views: list[memoryview], at: int) -> None:
    """Write views[at:], waiting for the socket to take them."""
    while at < len(views):
        await trio.lowlevel.wait_writable(sock)
        at = _write_now(sock, views, at)


async def send_parts(stream: trio.abc.SendStream, parts: Sequence[Buffer]) -> None:
    """Write parts in order, gathered into as few system calls as the kernel allows."""
    if not isinstance(stream, trio.SocketStream):
        for part in coalesce(parts):
            await stream.send_all(part)
        return
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    at = _write_now(stream.socket, views, 0)
    if at < len(views):
        await _send_rest(stream.socket, views, at)
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def send_parts_locked(
    lock: trio.Lock,
    stream: trio.abc.SendStream,
    parts: Sequence[Buffer],
    check: Callable[[], None] | None = None,
) -> None:
    """send_parts under lock (one writer at a time on stream), calling check first once
    the lock is held (it may raise to give up). When the lock is free and the kernel
    takes every byte at once, as it does a message of a few pages, this is one system
    call and no trip through the scheduler: no checkpoint, so the caller's loop must
    reach one elsewhere (as a receive does)."""
    if lock.locked() or not isinstance(stream, trio.SocketStream):
        async with lock:
            if check is not None:
                check()
            await send_parts(stream, parts)
        return
    # Free, and nothing here yields until the lock is taken below: nobody else writes.
    if check is not None:
        check()
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    at = _write_now(stream.socket, views, 0)
    if at == len(views):
        return
    lock.acquire_nowait()  # the rest waits for the socket: later writers queue behind
    try:
        await _send_rest(stream.socket, views, at)
    finally:
        lock.release()
