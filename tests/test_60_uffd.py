"""Layer 6 (groundwork): the userfaultfd facade against the real kernel.

Faults are raised by the kernel on behalf of another thread (a write(2) to a pipe from a
registered page makes the kernel read that page), so the test's own thread never
touches an unserved page: it reads the fault event and serves it.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import pytest

from netmemfs import uffd
from netmemfs.pages import PAGE_SIZE
from tests.helpers import stamp_page

pytestmark = pytest.mark.skipif(
    uffd.probe_features() == 0, reason="userfaultfd is not available to this user"
)


@pytest.fixture
def region() -> Iterator[tuple[uffd.Userfaultfd, uffd.AnonMapping]]:
    u = uffd.Userfaultfd.open(uffd.FEATURE_EVENT_REMOVE)
    m = uffd.AnonMapping(16 * PAGE_SIZE)
    u.register(m.address, m.length)
    yield u, m
    m.close()
    u.close()


def _next_fault(u: uffd.Userfaultfd) -> uffd.PageFault:
    ready, _, _ = select.select([u.fd], [], [], 10)
    assert ready, "no fault arrived within 10 s"
    events = u.read_events()
    assert len(events) == 1 and isinstance(events[0], uffd.PageFault), events
    return events[0]


def _kernel_reads(m: uffd.AnonMapping, page: int) -> tuple[threading.Thread, list[bytes]]:
    """A thread that makes the kernel read one page of m (write(2) to a pipe)."""
    got: list[bytes] = []

    def run() -> None:
        r, w = os.pipe()
        try:
            view = m.buffer()[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            os.write(w, view)  # blocks in the kernel until the fault is served
            got.append(os.read(r, PAGE_SIZE))
        finally:
            os.close(r)
            os.close(w)

    t = threading.Thread(target=run)
    t.start()
    return t, got


def test_features_are_reported_and_named() -> None:
    feats = uffd.probe_features()
    with uffd.Userfaultfd.open(feats & uffd.FEATURE_WP_ASYNC) as u:
        assert u.how in ("/dev/userfaultfd", "syscall")
        assert u.features == feats


def test_a_missing_page_is_served_with_copy(
    region: tuple[uffd.Userfaultfd, uffd.AnonMapping],
) -> None:
    u, m = region
    t, got = _kernel_reads(m, 5)
    fault = _next_fault(u)
    assert fault.address & ~(PAGE_SIZE - 1) == m.address + 5 * PAGE_SIZE
    assert not fault.write
    r = u.copy(m.address + 5 * PAGE_SIZE, stamp_page("anon", 5, 1))
    assert r == uffd.Result(uffd.Outcome.DONE, PAGE_SIZE)
    t.join(10)
    assert got == [stamp_page("anon", 5, 1)]
    # Installing it again is an outcome, not an error: someone already did.
    assert u.copy(m.address + 5 * PAGE_SIZE, bytes(PAGE_SIZE)).outcome is uffd.Outcome.EXISTS


def test_a_hole_is_served_with_zeropage(
    region: tuple[uffd.Userfaultfd, uffd.AnonMapping],
) -> None:
    u, m = region
    t, got = _kernel_reads(m, 0)
    fault = _next_fault(u)
    start = fault.address & ~(PAGE_SIZE - 1)
    assert u.zeropage(start, PAGE_SIZE).outcome is uffd.Outcome.DONE
    t.join(10)
    assert got == [bytes(PAGE_SIZE)]


def test_wrong_ranges_raise_errors_naming_the_range(
    region: tuple[uffd.Userfaultfd, uffd.AnonMapping],
) -> None:
    u, m = region
    with pytest.raises(uffd.UffdError, match=r"copy of 4096 bytes at 0x"):
        u.copy(m.address + 1, bytes(PAGE_SIZE))  # not page-aligned: EINVAL
    with pytest.raises(uffd.UffdError, match="register"):
        u.register(m.address + 7, PAGE_SIZE)


def test_poisoned_pages_are_installed_as_poison(
    region: tuple[uffd.Userfaultfd, uffd.AnonMapping],
) -> None:
    u, m = region
    if not u.has(uffd.FEATURE_POISON):
        pytest.skip("this kernel has no UFFDIO_POISON")
    assert u.poison(m.address + 3 * PAGE_SIZE, PAGE_SIZE).count == PAGE_SIZE
    # The kernel reading it now fails (EFAULT) instead of waiting for a handler.
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            os.write(w, m.buffer()[3 * PAGE_SIZE : 4 * PAGE_SIZE])
    finally:
        os.close(r)
        os.close(w)


def test_the_message_says_how_to_enable_userfaultfd() -> None:
    text = uffd.explain_unavailable(13, 1)
    assert "/dev/userfaultfd: Permission denied" in text
    assert "vm.unprivileged_userfaultfd=1" in text and "CAP_SYS_PTRACE" in text
