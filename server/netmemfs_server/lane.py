"""Read lanes: connections that only read pages, each served by a thread of its own.

Where it sits: beside serve.py, which hands a connection over here once it has asked
for a lane (protocol ReadLane) and holds nothing else (no locks, subscriptions, claim,
staging or commits under way). What a read costs on the event loop is mostly the loop:
waking a task, a receive and a send through trio, the watchdog's bookkeeping (issue 15
measured 84 us of server CPU per 4 KiB read through trio against 39-42 us for the same
codec and store read on a blocking socket). A lane is that blocking socket.

What stays the same as on any connection: every answer (the same store reads, checks
and errors), the frame limit, and the three timeouts (--idle-timeout between requests,
--slow-client-timeout for a frame begun and for a reply not taken), enforced here with
socket timeouts instead of the watchdog. What differs: a lane answers ReadPages and
ReadInode only; any other request is answered with an error and ends it.

Threads: the store's pages change only under store.lock (MemoryPageStore.check and
apply take it), and a lane reads under it, so a read sees a commit whole or not at all.
The views a read returns stay valid after the lock is let go: a chunk some view looks at
is copied before a commit writes it (FileData._writable). The counters here are written
by this thread only; the server's thread reads them (PageServer.statistics).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from typing import NoReturn

from netmemfs.errors import NetmemError, ProtocolError, RemoteProtocolError, TimedOut
from netmemfs.pages import Buffer, check_name
from netmemfs.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Error,
    Message,
    Pages,
    ReadInode,
    ReadPages,
    Reply,
)
from netmemfs_server.store import PageStore

log = logging.getLogger("netmemfs.server")

RECEIVE_BYTES = 64 * 1024
# Replies held back while a pipeline of requests is answered go out past this many bytes.
HELD_BYTES = 256 * 1024
# Buffers per sendmsg at most (the kernel's IOV_MAX is 1024).
MAX_IOV = 512


class _End(Exception):
    """The lane is over (said why in the log, or the peer just went)."""


# What a lane answers; anything else ends it (not_on_a_lane).
LANE_REQUESTS = (ReadPages, ReadInode)


def read_reply(store: PageStore, msg: ReadPages | ReadInode) -> Pages:
    """The Pages answering a page read, on any connection (NetmemError if refused).
    A lane's thread calls it under store.lock; the event loop, whose thread is the
    only one that changes the store, without."""
    if type(msg) is ReadInode:
        version, runs = store.read_inode(msg.ino, msg.first, msg.count)
        return Pages(msg.req_id, "", msg.first, msg.count, version, runs)
    assert isinstance(msg, ReadPages)
    check_name(msg.segment)
    version, runs = store.read(msg.segment, msg.first, msg.count)
    return Pages(msg.req_id, msg.segment, msg.first, msg.count, version, runs)


def not_on_a_lane(kind: type[Message]) -> ProtocolError:
    return ProtocolError(
        f"{kind.__name__} on a read lane, which serves ReadPages and ReadInode only: "
        "send it on another connection"
    )


class Lane:
    """One read lane: serve() answers its requests until it ends."""

    def __init__(
        self,
        sock: socket.socket,
        conn: Connection,
        store: PageStore,
        peer: str,
        *,
        idle_timeout_s: float,
        slow_client_timeout_s: float,
        farewell_s: float,
    ) -> None:
        self.sock = sock
        self.conn = conn
        self.store = store
        self.peer = peer
        self.idle_s = idle_timeout_s
        self.slow_s = slow_client_timeout_s
        self.farewell_s = farewell_s  # what the error saying why it ends may take
        # Written by the lane's thread only, read by the server's (a size that never
        # changes for requests; errors' copy is taken whole, under the GIL).
        self.requests: dict[type[Message], int] = {ReadInode: 0, ReadPages: 0}
        self.errors: dict[str, int] = {}
        self.bytes_sent = 0
        self._stopped = threading.Event()
        # close() in the lane's thread and shutdown() in stop() never overlap: a
        # shutdown after the close could reach a descriptor opened since with the
        # same number.
        self._sock_lock = threading.Lock()
        # The socket blocks, with its timeouts in the kernel (SO_RCVTIMEO, SO_SNDTIMEO:
        # a call waits at most that long, then fails with EAGAIN): set only when they
        # change. Python's own socket timeouts cost a poll() before each call and an
        # fcntl() per change, which took a read lane from 60 to 97 us of CPU per read.
        sock.settimeout(None)
        self._timeouts: dict[int, float] = {}

    def stop(self) -> None:
        """From any thread: end serve() soon (its socket is shut down under it)."""
        self._stopped.set()
        with self._sock_lock, contextlib.suppress(OSError):  # closed already
            self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Answer requests until the peer closes, breaks a rule, times out, or stop()."""
        try:
            self._serve()
        except _End:
            pass
        except OSError as e:
            if not self._stopped.is_set():
                log.info("read lane from %s ended: %s", self.peer, e)
        finally:
            with self._sock_lock:
                self.sock.close()

    def _serve(self) -> None:
        conn = self.conn
        buf = bytearray(RECEIVE_BYTES)
        view = memoryview(buf)
        frame_started: float | None = None
        while True:
            out: list[Buffer] = []
            held = 0
            while True:
                try:
                    ev = conn.next_event()
                except RemoteProtocolError as e:
                    self._send([*out, *conn.send_parts(Error(0, e.code, str(e)))])
                    log.warning("closing read lane from %s: %s", self.peer, e)
                    raise _End from None
                if ev is NEED_DATA:
                    break
                if ev is CLOSED:
                    self._send(out)
                    raise _End
                assert isinstance(ev, Message)
                parts = conn.send_parts(self._answer(ev))
                out += parts
                held += sum(len(p) for p in parts)
                if not isinstance(ev, LANE_REQUESTS):
                    self._send(out)
                    log.warning(
                        "closing read lane from %s: it sent %s", self.peer, type(ev).__name__
                    )
                    raise _End
                if held >= HELD_BYTES:
                    self._send(out)
                    out, held = [], 0
            self._send(out)
            del out  # the views of the store's chunks go with it
            # The next request: --idle-timeout between messages, --slow-client-timeout
            # from when a message began.
            if conn.mid_frame():
                now = time.monotonic()
                if frame_started is None:
                    frame_started = now
                timeout = self.slow_s - (now - frame_started)
            else:
                frame_started = None
                timeout = self.idle_s
            if timeout <= 0:
                self._time_out(frame_started is not None)
            self._timeout(socket.SO_RCVTIMEO, timeout)
            try:
                n = self.sock.recv_into(buf)
            except BlockingIOError:  # SO_RCVTIMEO passed
                self._time_out(frame_started is not None)
            conn.receive_data(view[:n])

    def _answer(self, msg: Message) -> Reply:
        """The reply to msg, as a connection on the event loop would give it."""
        kind = type(msg)
        if kind in self.requests:
            self.requests[kind] += 1
        try:
            if not isinstance(msg, LANE_REQUESTS):
                raise not_on_a_lane(kind)
            with self.store.lock:
                return read_reply(self.store, msg)
        except NetmemError as e:
            self.errors[e.code] = self.errors.get(e.code, 0) + 1
            return Error(msg.req_id, e.code, str(e))

    def _timeout(self, option: int, seconds: float) -> None:
        """Calls of the kind option governs wait at most seconds (at least 1 ms)."""
        if self._timeouts.get(option) == seconds:
            return
        whole = max(seconds, 0.001)
        sec = int(whole)
        self.sock.setsockopt(
            socket.SOL_SOCKET, option, struct.pack("@ll", sec, int((whole - sec) * 1e6))
        )
        self._timeouts[option] = seconds

    def _time_out(self, mid_frame: bool) -> NoReturn:
        """End the lane for a timeout: a message begun and not finished, or none."""
        if mid_frame:
            why = f"a message begun and not finished within {self.slow_s:g} s"
            why += " (the server's --slow-client-timeout)"
        else:
            why = f"nothing sent for {self.idle_s:g} s (the server's --idle-timeout)"
        err = TimedOut(f"connection closed: {why}")
        log.info("closing read lane from %s: %s", self.peer, err)
        with contextlib.suppress(OSError):
            self._send(self.conn.send_parts(Error(0, err.code, str(err))), timeout=self.farewell_s)
        raise _End

    def _send(self, parts: list[Buffer], timeout: float | None = None) -> None:
        """Every byte of parts, within --slow-client-timeout (or timeout)."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        if not views:
            return
        limit = self.slow_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._timeout(socket.SO_SNDTIMEO, limit)
        at = 0
        while at < len(views):
            try:
                sent = self.sock.sendmsg(views[at : at + MAX_IOV])
            except BlockingIOError:  # SO_SNDTIMEO passed with nothing taken
                sent = 0
            self.bytes_sent += sent
            while at < len(views) and sent >= len(views[at]):
                sent -= len(views[at])
                at += 1
            if sent:
                views[at] = views[at][sent:]
            if at == len(views):
                break
            # Taken in part: the reply as a whole has limit seconds, so the next call
            # waits only for what is left of them.
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "closing read lane from %s: a reply was not taken within %g s "
                    "(the server's --slow-client-timeout)",
                    self.peer,
                    limit,
                )
                raise _End
            self._timeout(socket.SO_SNDTIMEO, left)
