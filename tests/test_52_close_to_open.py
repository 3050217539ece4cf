"""Close-to-open between two mounts (issue 14, item 1): after A's fsync returns, B's next
open of the file returns A's contents and A's size, even when B has the old pages in its
page cache and the old attributes cached from a recent stat."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from netmemfs.fs import ATTR_TIMEOUT_S
from netmemfs.pages import PAGE_SIZE
from tests.helpers import MountProc, ServerProc, stamp_page, wait_for

MountFactory = Callable[..., MountProc]
TRIALS = 16


def _write_and_fsync(path: Path, data: bytes) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(len(data))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _after(seconds: float) -> Callable[[], bool]:
    """A condition that holds once seconds have passed from now."""
    at = time.monotonic() + seconds
    return lambda: time.monotonic() > at


def _pages(gen: int, n: int) -> bytes:
    return b"".join(stamp_page("f", p, gen) for p in range(n))


def test_the_next_open_reads_the_new_contents(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """The issue's pattern: B reads f, A rewrites it (same size) and fsyncs, B opens f
    again; TRIALS times, each must read the new bytes."""
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    stale = []
    for gen in range(1, TRIALS + 1):
        _write_and_fsync(a.path("f"), _pages(gen, 8))
        with open(b.path("f"), "rb") as f:
            got = f.read()
        if got != _pages(gen, 8):
            stale.append(gen)
        os.stat(b.path("f"))  # B's attributes are fresh when A writes next
    assert not stale, f"B's open read old bytes after A's fsync in trials {stale}"


def test_the_next_open_after_a_lookup_reads_the_new_contents(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """As above, with B's cached name expired, so that B's open starts with a lookup
    (which refreshes what the daemon knows of f before open compares it: the way the
    issue found B reading old bytes, 5 of 6 trials on the code before inodes)."""
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    stale = []
    for gen in range(1, 4):
        _write_and_fsync(a.path("f"), _pages(gen, 8))
        # The kernel keeps B's name of f for ATTR_TIMEOUT_S; no event says when it
        # lapses, so the wait is for the time itself.
        wait_for(_after(ATTR_TIMEOUT_S * 1.1), "B's cached name of f to lapse")
        with open(b.path("f"), "rb") as f:
            got = f.read()
        if got != _pages(gen, 8):
            stale.append(gen)
    assert not stale, f"B's open read old bytes after A's fsync in trials {stale}"


def test_the_next_open_sees_the_new_size(server: ServerProc, mount_factory: MountFactory) -> None:
    """A makes the file, shrinks it, then grows it; B, which stat'ed it (or found it
    missing) just before, opens it and reads exactly the new contents, to the new end.
    B asks the server of every missing name (--negative-timeout 0), so even the first
    open, of a name it had just found missing, finds A's file; with the default it may
    take up to a second (test_51's test of missing names)."""
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, "--negative-timeout", "0", name="b")
    for gen, n in enumerate([8, 2, 12, 1, 9], start=1):
        os.stat(b.path("f")) if b.path("f").exists() else None
        _write_and_fsync(a.path("f"), _pages(gen, n))
        with open(b.path("f"), "rb") as f:
            got = f.read()
        assert len(got) == n * PAGE_SIZE, f"gen {gen}: B read {len(got)} bytes, not {n} pages"
        assert got == _pages(gen, n), f"gen {gen}: B read old bytes"
