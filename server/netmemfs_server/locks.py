"""Byte-range locks the server grants (issue 14, item 3; docs/protocol.md, "Locks").

A lock is shared or exclusive, on bytes [start, end) of one inode, held by one
connection (its *holder*) for a lease that the holder renews; it ends when released,
when the lease runs out, or when the holder's connection closes. Each grant carries a
*fencing token*, a number never handed out twice: a commit that names a token (a
Fence op) is applied only while that grant lasts, so a holder that was paused or cut
off past its lease cannot overwrite its successor's work.

Requests wait in one queue per inode, first come first served: a request is granted
when it conflicts with no grant and with no request queued before it, so a writer
waiting behind readers is not passed by the readers that come after it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import trio

from netmemfs.errors import NotHeld, TooLarge, WouldBlock

log = logging.getLogger("netmemfs.server")

END = 1 << 64  # a lock of length 0 reaches past any end the file may get
MAX_LOCKS_PER_HOLDER = 65536  # granted and waiting, per connection
MAX_LOCKS_TOTAL = 1 << 20


@dataclass(eq=False)
class Grant:
    token: int
    ino: int
    start: int
    end: int
    exclusive: bool
    holder: object
    expires: float  # trio time

    def conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return (self.exclusive or exclusive) and self.start < end and start < self.end


@dataclass(eq=False)
class _Waiter:
    ino: int
    start: int
    end: int
    exclusive: bool
    holder: object
    granted: trio.Event = field(default_factory=trio.Event)
    grant: Grant | None = None

    def conflicts(self, other: _Waiter) -> bool:
        return (
            (self.exclusive or other.exclusive)
            and self.start < other.end
            and other.start < self.end
        )


class LockTable:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.granted: dict[int, list[Grant]] = {}
        self.queued: dict[int, list[_Waiter]] = {}
        self.tokens: dict[int, Grant] = {}
        self.per_holder: collections.Counter[object] = collections.Counter()
        self.total = 0
        # Tokens grow for ever, across restarts too (they start at the clock): a token
        # from before a restart is never handed out again.
        self._next_token = time.time_ns()
        self._wake = trio.Event()

    async def acquire(
        self, holder: object, ino: int, start: int, length: int, exclusive: bool, wait_s: float
    ) -> Grant:
        """A grant for holder, waiting up to wait_s for conflicting locks to go (and for
        the requests queued before it); WouldBlock if they have not by then."""
        end = start + length if length else END
        if self.per_holder[holder] >= MAX_LOCKS_PER_HOLDER or self.total >= MAX_LOCKS_TOTAL:
            raise TooLarge(
                f"a connection may hold or wait for {MAX_LOCKS_PER_HOLDER} locks, all "
                f"connections {MAX_LOCKS_TOTAL}; release some first"
            )
        w = _Waiter(ino, start, end, exclusive, holder)
        self.queued.setdefault(ino, []).append(w)
        self.per_holder[holder] += 1
        self.total += 1
        try:
            self._grant_queued(ino)
            if w.grant is None:
                with trio.move_on_after(max(wait_s, 0.0)):
                    await w.granted.wait()
        finally:
            if w.grant is None:  # not granted in time, or cancelled (the holder left)
                self._unqueue(w)
        if w.grant is None:
            kind = "an exclusive" if exclusive else "a shared"
            raise WouldBlock(
                f"{kind} lock on bytes {start}..{'end' if end == END else end - 1} of inode "
                f"{ino} was not granted within {wait_s:g} s: another client holds a "
                "conflicting lock (or waits for one ahead of this request); wait longer "
                "or try again"
            )
        return w.grant

    def release(self, holder: object, token: int) -> Grant:
        grant = self.tokens.get(token)
        if grant is None or grant.holder is not holder:
            raise NotHeld(
                f"lock token {token} is not held by this connection: released already, "
                "its lease ran out, or it was never granted here"
            )
        self._drop(grant)
        return grant

    def release_all(self, holder: object) -> None:
        """The holder's connection closed: its grants end now."""
        for grant in [g for g in self.tokens.values() if g.holder is holder]:
            self._drop(grant)

    def renew(self, holder: object) -> int:
        """Every grant of holder lasts a lease from now; how many it has."""
        until = trio.current_time() + self.lease_s
        n = 0
        for grant in self.tokens.values():
            if grant.holder is holder:
                grant.expires = until
                n += 1
        return n

    def check(self, ino: int, token: int) -> Grant | None:
        """The grant token stands for on ino, if it still lasts."""
        grant = self.tokens.get(token)
        if grant is None or grant.ino != ino or grant.expires <= trio.current_time():
            return None
        return grant

    async def keep_leases(self) -> None:
        """End grants whose lease ran out, as they run out; runs as long as the server."""
        while True:
            now = trio.current_time()
            for grant in [g for g in self.tokens.values() if g.expires <= now]:
                log.info(
                    "lock %d on inode %d: its lease of %g s ran out; it goes to the next "
                    "waiter, and a commit fenced by it is refused",
                    grant.token,
                    grant.ino,
                    self.lease_s,
                )
                self._drop(grant)
            earliest = min((g.expires for g in self.tokens.values()), default=now + 3600)
            self._wake = trio.Event()
            with trio.move_on_at(earliest):
                await self._wake.wait()

    def _grant_queued(self, ino: int) -> None:
        queue = self.queued.get(ino, [])
        granted = self.granted.setdefault(ino, [])
        blocked: list[_Waiter] = []
        for w in list(queue):
            if any(g.conflicts(w.start, w.end, w.exclusive) for g in granted) or any(
                b.conflicts(w) for b in blocked
            ):
                blocked.append(w)
                continue
            queue.remove(w)
            self._next_token += 1
            grant = Grant(
                self._next_token,
                ino,
                w.start,
                w.end,
                w.exclusive,
                w.holder,
                trio.current_time() + self.lease_s,
            )
            granted.append(grant)
            self.tokens[grant.token] = grant
            w.grant = grant
            w.granted.set()
            self._wake.set()  # keep_leases learns of the new expiry
        if not queue:
            self.queued.pop(ino, None)
        if not granted:
            del self.granted[ino]

    def _unqueue(self, w: _Waiter) -> None:
        queue = self.queued.get(w.ino, [])
        if w in queue:
            queue.remove(w)
        self.per_holder[w.holder] -= 1
        self.total -= 1
        if self.per_holder[w.holder] <= 0:
            del self.per_holder[w.holder]
        self._grant_queued(w.ino)  # those it blocked may go now

    def _drop(self, grant: Grant) -> None:
        del self.tokens[grant.token]
        self.granted[grant.ino].remove(grant)
        self.per_holder[grant.holder] -= 1
        self.total -= 1
        if self.per_holder[grant.holder] <= 0:
            del self.per_holder[grant.holder]
        self._grant_queued(grant.ino)
