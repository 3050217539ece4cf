"""Serving the page faults of a userfaultfd-registered range from a page source.

Where it sits: below the anonymous-region door (issue 4), above uffd.py; uses trio, not
pyfuse3. The door gives it a Userfaultfd whose range is registered, and a page source
(the server, through remote.py); it keeps one state byte per page:

    MISSING -> FETCHING -> PRESENT        (a REMOVE/UNMAP event sends pages back to MISSING)

A fault on a FETCHING page waits for that fetch instead of fetching again. A fault right
after the previous one (sequential access) fetches PREFETCH_PAGES at once. Pages the
source reports as holes are installed with zeropage, without a transfer. The kernel's
answers are handled as ../shared/UFFD-PITFALLS.md asks: EEXIST means someone installed
the page, so wake the range; EAGAIN means the address space is changing, so drain the
events and retry (a bounded number of times); a partial copy is continued.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from netmemfs._trio_util import open_quiet_nursery
from netmemfs.pages import PAGE_SIZE
from netmemfs.uffd import Outcome, PageFault, RangeEvent, Userfaultfd

log = logging.getLogger("netmemfs.faults")

# (first page, count) -> one entry per page: its 4096 bytes, or None for a hole.
PageSource = Callable[[int, int], Awaitable[Sequence[bytes | None]]]

MISSING, FETCHING, PRESENT = 0, 1, 2
PREFETCH_PAGES = 32
MAX_CONCURRENT_FAULTS = 16
MAX_AGAIN_RETRIES = 100


@dataclass
class FaultStats:
    faults: int = 0
    fetches: int = 0
    pages_copied: int = 0
    pages_zeroed: int = 0
    already_present: int = 0
    retries: int = 0
    removed_pages: int = 0


class FaultServer:
    def __init__(
        self,
        uffd: Userfaultfd,
        base: int,
        length: int,
        source: PageSource,
        *,
        prefetch_pages: int = PREFETCH_PAGES,
    ) -> None:
        if base % PAGE_SIZE or length % PAGE_SIZE:
            raise ValueError("the range must be page-aligned")
        self.uffd = uffd
        self.base = base
        self.npages = length // PAGE_SIZE
        self.source = source
        self.prefetch_pages = prefetch_pages
        self.state = bytearray(self.npages)  # one byte per page: no object per page
        self._fetched: dict[int, trio.Event] = {}  # first page of a fetch -> done
        self._fetch_of: dict[int, int] = {}  # page -> first page of its fetch
        self._last_fault = -2
        self._limit = trio.Semaphore(MAX_CONCURRENT_FAULTS)
        self._requeue: trio.MemorySendChannel[int] | None = None
        self.stats = FaultStats()

    async def serve(self) -> None:
        """Serve faults until cancelled."""
        send, receive = trio.open_memory_channel[int](math.inf)
        self._requeue = send
        async with open_quiet_nursery() as nursery:
            nursery.start_soon(self._read_events)
            async for address in receive:
                await self._limit.acquire()
                nursery.start_soon(self._serve_fault, address)

    async def _read_events(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.uffd.fd)
            self._take_events()

    def _take_events(self) -> None:
        """Read what the uffd has: faults are queued, range events applied at once."""
        for ev in self.uffd.read_events():
            if isinstance(ev, PageFault):
                self.stats.faults += 1
                assert self._requeue is not None, "serve() is not running"
                self._requeue.send_nowait(ev.address)
            elif isinstance(ev, RangeEvent):
                self._forget(ev.start, ev.end)

    def _forget(self, start: int, end: int) -> None:
        """A REMOVE or UNMAP: those pages must be fetched again if touched."""
        lo = max(0, (start - self.base) // PAGE_SIZE)
        hi = min(self.npages, (end - self.base + PAGE_SIZE - 1) // PAGE_SIZE)
        for p in range(lo, hi):
            if self.state[p] == PRESENT:
                self.state[p] = MISSING
                self.stats.removed_pages += 1

    async def _serve_fault(self, address: int) -> None:
        try:
            page = (address - self.base) // PAGE_SIZE
            if not 0 <= page < self.npages:
                log.error("fault at %#x outside the served range; waking it", address)
                self.uffd.wake(address & ~(PAGE_SIZE - 1), PAGE_SIZE)
                return
            if self.state[page] == FETCHING:
                await self._fetched[self._fetch_of[page]].wait()
                self.uffd.wake(self.base + page * PAGE_SIZE, PAGE_SIZE)
                return
            sequential = page == self._last_fault + 1
            count = 1
            if sequential:
                while (
                    count < self.prefetch_pages
                    and page + count < self.npages
                    and self.state[page + count] == MISSING
                ):
                    count += 1
            self._last_fault = page + count - 1  # where a sequential reader goes next
            await self._fetch(page, count)
        finally:
            self._limit.release()

    async def _fetch(self, first: int, count: int) -> None:
        done = trio.Event()
        self._fetched[first] = done
        for p in range(first, first + count):
            self.state[p] = FETCHING
            self._fetch_of[p] = first
        try:
            self.stats.fetches += 1
            pages = await self.source(first, count)
            self._install(first, pages)
        except BaseException:
            for p in range(first, first + count):
                if self.state[p] == FETCHING:
                    self.state[p] = MISSING
            raise
        finally:
            for p in range(first, first + count):
                self._fetch_of.pop(p, None)
            del self._fetched[first]
            done.set()

    def _install(self, first: int, pages: Sequence[bytes | None]) -> None:
        """Install the fetched pages, runs of data with copy and holes with zeropage."""
        i = 0
        while i < len(pages):
            j = i
            hole = pages[i] is None
            while j + 1 < len(pages) and (pages[j + 1] is None) == hole:
                j += 1
            start = self.base + (first + i) * PAGE_SIZE
            length = (j - i + 1) * PAGE_SIZE
            data = None if hole else b"".join(p for p in pages[i : j + 1] if p is not None)
            self._install_run(start, length, data)
            for p in range(first + i, first + j + 1):
                self.state[p] = PRESENT
            i = j + 1

    def _install_run(self, start: int, length: int, data: bytes | None) -> None:
        done = 0
        for _ in range(MAX_AGAIN_RETRIES):
            if data is None:
                r = self.uffd.zeropage(start + done, length - done)
            else:
                r = self.uffd.copy(start + done, memoryview(data)[done:])
            if r.outcome is Outcome.DONE:
                if data is None:
                    self.stats.pages_zeroed += r.count // PAGE_SIZE
                else:
                    self.stats.pages_copied += r.count // PAGE_SIZE
                done += r.count
                if done >= length:
                    return
                continue  # a partial install: go on with the rest
            if r.outcome is Outcome.EXISTS:
                # Someone installed (part of) it; that does not prove the faulting
                # thread was woken, so wake the whole run. Pages still missing in it
                # will fault again and be fetched then.
                self.stats.already_present += 1
                self.uffd.wake(start, length)
                return
            # AGAIN: the address space is changing; take its events first (faults
            # among them are queued, never dropped), then retry.
            self.stats.retries += 1
            self._take_events()
        raise RuntimeError(f"install at {start:#x} kept answering EAGAIN")
