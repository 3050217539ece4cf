"""Small trio helpers shared by the client-side modules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from netmemfs.errors import NetmemError
from netmemfs.protocol import Buffer, Connection, coalesce


@asynccontextmanager
async def open_quiet_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose lone error comes out as itself, not wrapped in an ExceptionGroup.

    Background tasks of ours catch their own expected errors, so a group almost always
    holds one exception from the body; callers then catch NetmemError as usual. A group
    of several is re-raised as it is, unless all are Cancelled-free NetmemErrors, where
    the first stands for them all.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
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


async def receive_into(stream: trio.abc.ReceiveStream, conn: Connection) -> None:
    """Read what the peer sent next into conn (b"" at EOF), large frames in place."""
    view = conn.receive_buffer()
    if view is not None and isinstance(stream, trio.SocketStream):
        try:
            # view is a slice of the frame buffer conn owns; recv_into writes at most
            # len(view) bytes into it, and conn.received() is told how many.
            n = await stream.socket.recv_into(view)
        except OSError as e:
            raise trio.BrokenResourceError(f"receive failed: {e}") from e
        finally:
            view.release()
        conn.received(n)
    else:
        if view is not None:
            view.release()
        conn.receive_data(await stream.receive_some(SMALL_RECEIVE_BYTES))


# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512


async def send_parts(stream: trio.abc.SendStream, parts: Sequence[Buffer]) -> None:
    """Write parts in order, gathered into as few system calls as the kernel allows."""
    if not isinstance(stream, trio.SocketStream):
        for part in coalesce(parts):
            await stream.send_all(part)
        return
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    sock = stream.socket
    try:
        while views:
            # Each view stays alive in `views` until the kernel has copied all of it.
            sent = await sock.sendmsg(views[:_MAX_IOV])
            while sent and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]
    except OSError as e:
        raise trio.BrokenResourceError(f"send failed: {e}") from e
