"""A TCP proxy between client and server that fails on command (never on a timer)."""

from __future__ import annotations

import trio


class FaultProxy:
    """Forwards 127.0.0.1:<port> to the target; tests flip its switches.

    drop_replies: bytes from the server are read and thrown away (the client sees a
    server that went silent). reset(): every open connection is cut at once.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.drop_replies = False
        self.connections = 0
        self._streams: list[trio.SocketStream] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        self.connections += 1
        self._streams += [client, server]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, False, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, True, nursery.cancel_scope)
        finally:
            for s in (client, server):
                if s in self._streams:
                    self._streams.remove(s)
                s.socket.close()  # synchronous: a cancelled await here would leak the other

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, replies: bool, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                if replies and self.drop_replies:
                    continue
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def reset(self) -> None:
        """Cut every connection now, both sides."""
        for s in list(self._streams):
            s.socket.close()
        self._streams.clear()
