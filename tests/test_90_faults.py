"""Network faults between the doors and the server, injected by tests/faultproxy.py.

The proxy is told when to fail (the next ReadPages, the next Commit), so each test is
deterministic: a reset during a page fetch is retried and costs only a delay; a reset
during a commit (before the server has it, after it has it with the reply lost, or
mid-frame) lands the commit exactly once; a stall longer than the timeout gives EIO
(mount) or SIGBUS (anonymous region), never a hang, and the mount works again after.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.faultproxy import CHANGE, READ_INODE, FaultProxy
from tests.helpers import MountProc, ServerProc, describe_page, run_trio, stamp_page

PAGES = 64
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def proxy(server: ServerProc) -> Iterator[FaultProxy]:
    p = FaultProxy(server.address)
    yield p
    p.close()


def _put(server: ServerProc, segment: str, gen: int) -> None:
    """segment holds PAGES pages of generation gen on the server."""

    async def go() -> None:
        async with RemoteStore.connect(server.address) as store:
            data = b"".join(stamp_page(segment, n, gen) for n in range(PAGES))
            await store.create(segment, PAGES * 4096)
            await store.commit([PageRun(segment, 0, data)], txn=store.new_txn())

    run_trio(go)


def _version(server: ServerProc, segment: str) -> int:
    async def go() -> int:
        async with RemoteStore.connect(server.address) as store:
            return (await store.stat(segment)).version

    return run_trio(go)


def _server_pages(server: ServerProc, segment: str) -> bytes:
    async def go() -> bytes:
        async with RemoteStore.connect(server.address) as store:
            return await store.read_bytes(segment, 0, PAGES)

    return run_trio(go)


def _check(data: bytes, segment: str, gen: int) -> None:
    for n in range(PAGES):
        got = data[n * 4096 : (n + 1) * 4096]
        assert got == stamp_page(segment, n, gen), f"page {n}: {describe_page(got)}"


def test_mount_reset_during_a_fetch_is_only_a_delay(
    server: ServerProc, proxy: FaultProxy, mount_factory: Callable[..., MountProc]
) -> None:
    _put(server, "f", 1)
    mount = mount_factory(proxy.address, "--cache-size", "0")
    rule = proxy.arm(READ_INODE, "reset")
    _check(mount.path("f").read_bytes(), "f", 1)
    rule.wait()
    assert proxy.connections >= 2, "the daemon never reconnected"


def test_mount_delayed_fetch_is_only_a_delay(
    server: ServerProc, proxy: FaultProxy, mount_factory: Callable[..., MountProc]
) -> None:
    _put(server, "d", 1)
    mount = mount_factory(proxy.address, "--timeout", "10", "--cache-size", "0")
    rule = proxy.arm(READ_INODE, "delay", delay_s=1.0)
    _check(mount.path("d").read_bytes(), "d", 1)
    rule.wait()


def test_mount_dropped_fetch_times_out_and_the_read_is_retried(
    server: ServerProc, proxy: FaultProxy, mount_factory: Callable[..., MountProc]
) -> None:
    """A request the server never hears of: the daemon gives that FUSE read EIO after
    --timeout (and logs it); the kernel, whose readahead it was, reads the pages again
    one by one, so the program gets its data, late. The mount is not wedged."""
    _put(server, "x", 1)
    mount = mount_factory(proxy.address, "--timeout", "2", "--cache-size", "0")
    mount.expect_log("within --timeout")
    rule = proxy.arm(READ_INODE, "drop")
    _check(mount.path("x").read_bytes(), "x", 1)
    rule.wait()
    assert "no answer from the server within --timeout" in mount.log_text()


@pytest.mark.parametrize("action", ["reset", "reset-after", "cut"])
def test_mount_reset_during_a_commit_lands_it_once(
    server: ServerProc,
    proxy: FaultProxy,
    mount_factory: Callable[..., MountProc],
    action: str,
) -> None:
    _put(server, "c", 1)
    if action == "cut":
        server.expect_log("middle of a frame")
    before = _version(server, "c")
    mount = mount_factory(proxy.address)
    fd = os.open(mount.path("c"), os.O_RDWR)
    try:
        os.write(fd, b"".join(stamp_page("c", n, 2) for n in range(PAGES)))
        rule = proxy.arm(CHANGE, action)
        os.fsync(fd)  # retried under the same transaction id
        rule.wait()
    finally:
        os.close(fd)
    assert _version(server, "c") == before + 1, "the commit landed more or less than once"
    _check(_server_pages(server, "c"), "c", 2)


def test_mount_stall_past_the_timeout_gives_eio_then_recovers(
    server: ServerProc, proxy: FaultProxy, mount_factory: Callable[..., MountProc]
) -> None:
    _put(server, "s", 1)
    mount = mount_factory(proxy.address, "--timeout", "2", "--cache-size", "0")
    mount.expect_log("lost the connection|within --timeout|cannot reach|timed out")
    proxy.stall()
    try:
        with pytest.raises(OSError) as e:
            mount.path("s").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        proxy.resume()
    # No remount: the next read goes through.
    _check(mount.path("s").read_bytes(), "s", 1)


def _region_reader(address: str, segment: str) -> str:
    """Maps segment and reads every page: the child's program (prints what it saw)."""
    return (
        "from netmemfs import anon\n"
        "from tests.helpers import stamp_page, describe_page\n"
        f"with anon.map({PAGES * 4096}, segment={segment!r}, server={address!r},"
        " budget=512 * 1024, timeout=3) as r:\n"
        "    print('mapped', flush=True)\n"
        "    input()\n"
        f"    for n in range({PAGES}):\n"
        "        page = r[n * 4096 : (n + 1) * 4096]\n"
        f"        assert page == stamp_page({segment!r}, n, 1), describe_page(page)\n"
        "    print('ok', flush=True)\n"
    )


def _start_reader(proxy: FaultProxy, segment: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", _region_reader(proxy.address, segment)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "mapped\n", p.communicate(timeout=30)
    return p


def test_region_reset_during_a_fetch_is_only_a_delay(server: ServerProc, proxy: FaultProxy) -> None:
    _put(server, "r", 1)
    reader = _start_reader(proxy, "r")
    rule = proxy.arm(READ_INODE, "reset")
    out, err = reader.communicate("go\n", timeout=60)
    assert reader.returncode == 0 and out == "ok\n", (reader.returncode, out, err)
    rule.wait()


def test_region_stall_past_the_timeout_gives_sigbus(server: ServerProc, proxy: FaultProxy) -> None:
    _put(server, "t", 1)
    reader = _start_reader(proxy, "t")
    proxy.stall()
    try:
        out, err = reader.communicate("go\n", timeout=60)
    finally:
        proxy.resume()
    assert reader.returncode == -signal.SIGBUS, (reader.returncode, out, err)
    assert "failed" in err, err


def test_a_commit_through_a_region_survives_a_reset(server: ServerProc, proxy: FaultProxy) -> None:
    """A region's sync with the Commit reset after the server has it (reply lost). The
    region lives in a child: the proxy's threads need this process's GIL, which a
    thread faulting on a region here would hold."""
    program = (
        "from netmemfs import anon\n"
        "from tests.helpers import stamp_page\n"
        f"with anon.map({PAGES * 4096}, segment='w', server={proxy.address!r},"
        " budget=512 * 1024) as r:\n"
        f"    for n in range({PAGES}):\n"
        "        r[n * 4096 : (n + 1) * 4096] = stamp_page('w', n, 1)\n"
        "    r.sync()\n"
        "print('synced', flush=True)\n"
    )
    rule = proxy.arm(CHANGE, "reset-after")
    r = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 0 and r.stdout == "synced\n", (r.returncode, r.stdout, r.stderr)
    rule.wait()
    assert _version(server, "w") == 2, "created (1), then one commit (2)"
    _check(_server_pages(server, "w"), "w", 1)


def test_mount_rides_through_a_server_restart(
    server_factory: Callable[..., ServerProc],
    mount_factory: Callable[..., MountProc],
    tmp_path: Path,
) -> None:
    """A long run: commit, restart the server (durable, same port), go on, no remount."""
    srv = server_factory(data_dir=tmp_path / "data")
    mount = mount_factory(srv.address, "--cache-size", "0")
    mount.expect_log("lost the connection|cannot reach")
    for gen in range(1, 4):
        with open(mount.path("long"), "r+b" if gen > 1 else "w+b") as f:
            f.write(b"".join(stamp_page("long", n, gen) for n in range(PAGES)))
            f.flush()
            os.fsync(f.fileno())
        srv.restart(same_port=True)
        _check(mount.path("long").read_bytes(), "long", gen)
    _check(_server_pages(srv, "long"), "long", 3)
