"""Anonymous regions and other clients' commits (issue 14, item 2): the server tells a
region's agent of commits to the region's file, the agent tells the handler, and the
handler drops those pages, so the next touch fetches the new data, while pages written
in the region and not yet synced stay (the local write wins until its own sync).
Without the notices a resident page keeps its old data for as long as it stays."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from netmemfs import anon
from tests.anon_worker import describe, stamp
from tests.helpers import MountProc, ServerProc, wait_for

MiB = 1 << 20
PAGE = 4096
PAGES = MiB // PAGE


def _commit_pages(path: Path, first: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, first * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _page(region: anon.Region, n: int) -> bytes:
    return region[n * PAGE : (n + 1) * PAGE]


def _wait_shows(region: anon.Region, n: int, want: bytes, what: str) -> None:
    try:
        wait_for(lambda: _page(region, n) == want, what)
    except AssertionError:
        raise AssertionError(f"{what}: page {n} shows {describe(_page(region, n))}") from None


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "via-agent"])
def test_a_region_sees_a_mount_s_commits_while_mapped(
    server: ServerProc,
    mount_factory: Callable[..., MountProc],
    monkeypatch: pytest.MonkeyPatch,
    direct: str,
) -> None:
    monkeypatch.setenv("NETMEM_DIRECT", direct)
    m = mount_factory(server.address)
    with anon.map(MiB, segment="shared", server=server.address, budget=MiB) as region:
        for n in range(PAGES):
            region[n * PAGE : (n + 1) * PAGE] = stamp(n, 1)
        region.sync()
        for gen in range(2, 12):
            _commit_pages(m.path("shared"), 3, stamp(3, gen))
            _wait_shows(region, 3, stamp(3, gen), f"the region to show the mount's commit {gen}")
        assert _page(region, 4) == stamp(4, 1)


def test_a_region_keeps_its_unsynced_writes_over_another_commit(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    """The region writes page 5 and does not sync; the mount commits pages 5 and 6. The
    region shows the mount's page 6 and its own page 5; after its sync the server holds
    both (the region's page 5 last)."""
    m = mount_factory(server.address)
    with anon.map(MiB, segment="shared", server=server.address, budget=MiB) as region:
        for n in range(PAGES):
            region[n * PAGE : (n + 1) * PAGE] = stamp(n, 1)
        region.sync()
        region[5 * PAGE : 6 * PAGE] = stamp(5, 20)
        _commit_pages(m.path("shared"), 5, stamp(5, 10) + stamp(6, 10))
        _wait_shows(region, 6, stamp(6, 10), "the region to show the mount's page 6")
        assert _page(region, 5) == stamp(5, 20), describe(_page(region, 5))
        region.sync()
    with open(m.path("shared"), "rb") as f:
        f.seek(5 * PAGE)
        assert f.read(2 * PAGE) == stamp(5, 20) + stamp(6, 10)


def test_a_region_served_by_a_mount_sees_another_mount_s_commits(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    with anon.map(MiB, segment="shared", server=a.mountpoint, budget=MiB) as region:
        for n in range(PAGES):
            region[n * PAGE : (n + 1) * PAGE] = stamp(n, 1)
        region.sync()
        _commit_pages(b.path("shared"), 7, stamp(7, 2))
        _wait_shows(region, 7, stamp(7, 2), "the region to show mount B's commit")


def test_two_regions_in_two_processes_see_each_other(server: ServerProc) -> None:
    """Region X (a worker process) writes and syncs generation 2 of every page; region Y
    here, mapped all along with generation 1 resident, shows generation 2."""
    import subprocess
    import sys

    with anon.map(MiB, segment="shared", server=server.address, budget=MiB) as region:
        for n in range(PAGES):
            region[n * PAGE : (n + 1) * PAGE] = stamp(n, 1)
        region.sync()
        assert _page(region, 9) == stamp(9, 1)
        root = Path(__file__).resolve().parent.parent
        argv = ["write", server.address, "shared", str(MiB), str(MiB), "2"]
        subprocess.run(
            [sys.executable, "-m", "tests.anon_worker", *argv],
            cwd=root,
            check=True,
            capture_output=True,
            timeout=120,
        )
        for n in (0, 9, PAGES - 1):
            _wait_shows(region, n, stamp(n, 2), "region Y to show region X's sync")
