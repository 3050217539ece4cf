"""A TCP proxy between a netmemfs client and its server that fails on command (issue 6).

    proxy = FaultProxy(server.address)          # listens on 127.0.0.1, an ephemeral port
    mount = mount_factory(proxy.address)
    rule = proxy.arm(READ_PAGES, "reset")      # the next ReadPages frame resets its link
    ... read a page ...
    rule.wait()                                 # it happened (deadline, no sleeps)

It reads the client's stream frame by frame (u32 length, then a msgpack array whose
second byte is the message type; docs/protocol.md), so a rule fires on a named request:

    "reset"        drop the frame; reset both sides (RST)
    "reset-after"  forward the frame, then reset both sides: the server acts on it but
                   its reply is lost
    "cut"          forward half of the frame, then reset: a stream cut mid-frame
    "drop"         swallow the frame and keep the link: the server never hears of it
    "delay"        forward the frame after delay_s seconds (later frames wait behind it)
    "hold"         keep the frame (and later ones of its link) until rule.release(),
                   then forward it: a request that reaches the server late
    "hold-alone"   keep the frame until rule.release(), letting the link's later frames
                   pass it: one slow request (a large commit) among others that go on
                   (requests in flight together may reach a server in either order)

stall() stops every byte in both directions until resume(); reset_all() resets every
connection now; drop_replies, while true, throws away what the server sends (it acts on
requests, the client hears nothing). Otherwise the server's replies pass as they come.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from netmemfs import protocol

# Request types (docs/protocol.md); the mount's reads and commits address inodes.
READ_PAGES = protocol.ReadPages.TYPE
STAGE_PAGES = protocol.StagePages.TYPE
COMMIT = protocol.Commit.TYPE
READ_INODE = protocol.ReadInode.TYPE
CHANGE = protocol.Change.TYPE
ACTIONS = ("reset", "reset-after", "cut", "drop", "delay", "hold", "hold-alone")
DEADLINE_S = 30.0


@dataclass
class Rule:
    frame_type: int
    action: str
    delay_s: float = 0.0
    fired: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        """A "hold" rule's frame goes on to the server now."""
        self.released.set()

    def wait(self, timeout_s: float = DEADLINE_S) -> None:
        if not self.fired.wait(timeout_s):
            raise AssertionError(
                f"no request of type {self.frame_type} passed the proxy within {timeout_s} s"
            )


def _reset(sock: socket.socket) -> None:
    """Close with RST: the peer sees ECONNRESET, not an orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _Link:
    """One proxied connection: two pump threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = False
        self.lock = threading.Lock()
        self.up_lock = threading.Lock()  # one frame at a time to the server

    def start(self) -> None:
        for target in (self._up, self._down):
            threading.Thread(target=target, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        _reset(self.client)
        _reset(self.server)
        self.proxy.resets += 1

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        self.proxy._flowing.wait()
        try:
            sock.sendall(data)
        except OSError:
            self.reset()
            return False
        return True

    def _down(self) -> None:
        """Server to client, as it comes."""
        while not self.closed:
            try:
                data = self.server.recv(1 << 16)
            except OSError:
                data = b""
            if self.proxy.drop_replies and data:
                continue
            if not data or not self._send(self.client, data):
                self.reset()
                return

    def _send_released(self, rule: Rule, frame: bytes) -> None:
        rule.released.wait(DEADLINE_S)
        with self.up_lock:
            self._send(self.server, frame)

    def _up(self) -> None:
        """Client to server, whole frames, each checked against the rules."""
        buf = b""
        while not self.closed:
            try:
                data = self.client.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.reset()
                return
            buf += data
            while len(buf) >= 6:
                (length,) = struct.unpack_from(">I", buf)
                if len(buf) < 4 + length:
                    break
                frame, buf = buf[: 4 + length], buf[4 + length :]
                rule = self.proxy._take_rule(frame[5])
                if rule is not None and rule.action == "hold-alone":
                    rule.fired.set()
                    threading.Thread(
                        target=self._send_released, args=(rule, frame), daemon=True
                    ).start()
                    continue
                if rule is not None and rule.action in ("drop", "delay", "hold"):
                    rule.fired.set()
                    if rule.action == "drop":
                        continue
                    if rule.action == "hold":
                        rule.released.wait(DEADLINE_S)
                    else:
                        # Sleeping in this link's pump holds back only this link's
                        # requests.
                        time.sleep(rule.delay_s)  # the injected fault, not coordination
                    rule = None
                if rule is None:
                    with self.up_lock:
                        sent = self._send(self.server, frame)
                    if not sent:
                        return
                    continue
                if rule.action == "reset-after":
                    self._send(self.server, frame)
                elif rule.action == "cut":
                    self._send(self.server, frame[: len(frame) // 2])
                self.reset()
                rule.fired.set()
                return


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.links: list[_Link] = []
        self.connections = 0
        self.resets = 0
        self.drop_replies = False
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _reset(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, server)
            with self._lock:
                self.links.append(link)
                self.connections += 1
            link.start()

    def _take_rule(self, frame_type: int) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.frame_type == frame_type:
                    self._rules.remove(rule)
                    return rule
        return None

    def arm(self, frame_type: int, action: str, *, delay_s: float = 0.0) -> Rule:
        """Fail the next request of frame_type that passes, once."""
        assert action in ACTIONS, action
        assert (action == "delay") == (delay_s > 0), "delay_s goes with 'delay' alone"
        rule = Rule(frame_type, action, delay_s)
        with self._lock:
            self._rules.append(rule)
        return rule

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def reset_all(self) -> None:
        with self._lock:
            links = list(self.links)
        for link in links:
            link.reset()

    def close(self) -> None:
        self._stopped = True
        self.resume()
        self.listener.close()
        self.reset_all()
