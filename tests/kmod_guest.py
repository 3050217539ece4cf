"""Runs inside the qemu guest that tests/kmod_vm.py boots: the kernel module's checks.

    python -m tests.kmod_guest KMOD_TEST_BINARY

The guest's /init has loaded netmem.ko (timeout_ms=10000). This starts a real
netmemfs-server and `netmemfs serve-device` on the guest's loopback, drives
tests/c/kmod_test.c against /dev/netmem, and prints one line per check:
"KMOD-TEST PASS name" or "KMOD-TEST FAIL name: why", then "KMOD-SUMMARY ...".
Checks wait on conditions with deadlines, never on sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.anon_worker import stamp

PAGE = 4096
SIZE = 64 * PAGE
DEADLINE_S = 60.0


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    delay = 0.001
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)  # polling a condition, not coordinating
        delay = min(delay * 2, 0.05)


def first_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"{what} ended before it was ready (exit {proc.wait()})")
    return line


class Guest:
    def __init__(self, test_bin: str) -> None:
        self.bin = test_bin
        self.failed = 0
        self.passed = 0
        self.server = subprocess.Popen(
            [sys.executable, "-m", "netmemfs_server", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        m = re.search(r"listening on (\S+)", first_line(self.server, "the server"))
        assert m, "the server did not say where it listens"
        self.address = m.group(1)
        self.provider = self.start_provider()

    def start_provider(self) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "netmemfs", "serve-device", "--server", self.address],
            stdout=subprocess.PIPE,
            text=True,
        )
        first_line(p, "serve-device")
        return p

    def check(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # each check reports, the next one runs
            self.failed += 1
            print(f"KMOD-TEST FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            self.passed += 1
            print(f"KMOD-TEST PASS {name}", flush=True)

    def run(self, *args: str | int, stdin: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.bin, *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def ok(self, *args: str | int) -> None:
        p = self.run(*args)
        out, _ = p.communicate(timeout=DEADLINE_S)
        assert p.returncode == 0, (
            f"kmod_test {' '.join(map(str, args))}: exit {p.returncode}: {out}"
        )

    def server_pages(self, segment: str) -> bytes:
        async def read() -> bytes:
            async with RemoteStore.connect(self.address) as store:
                return await store.read_bytes(segment, 0, SIZE // PAGE)

        return trio.run(read)

    def dmesg(self) -> str:
        return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout

    def sigbus_when_touched(self, page: int, before_touch: Callable[[], None]) -> None:
        p = self.run("touch", "pre", SIZE, page, stdin=True)
        line = first_line(p, "kmod_test touch")
        assert line == "mapped\n", line
        before_touch()
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=DEADLINE_S)
        assert p.returncode == -signal.SIGBUS, f"exit {p.returncode}, not SIGBUS: {out}"


def populate(address: str) -> None:
    """Segment "pre": even pages hold generation 1, odd pages are holes."""

    async def go() -> None:
        async with RemoteStore.connect(address) as store:
            await store.create("pre", SIZE)
            runs = [PageRun("pre", n, stamp(n, 1)) for n in range(0, SIZE // PAGE, 2)]
            await store.commit(runs, txn=store.new_txn())

    trio.run(go)


def main(test_bin: str) -> int:
    g = Guest(test_bin)
    populate(g.address)

    g.check("fault_in_server_pages_and_holes", lambda: g.ok("read", "pre", SIZE, 1, 2))

    def write_sync_fresh_mapping() -> None:
        g.ok("write", "w", SIZE, 5)  # writes, msyncs, maps again, checks
        got = g.server_pages("w")
        want = b"".join(stamp(n, 5) for n in range(SIZE // PAGE))
        assert got == want, "the server does not hold what was synced"
        g.ok("read", "w", SIZE, 5, 1)  # a new process, a new area

    g.check("write_msync_visible_to_a_fresh_mapping", write_sync_fresh_mapping)

    def two_processes() -> None:
        procs = [g.run("read", "pre", SIZE, 1, 2) for _ in range(2)]
        for p in procs:
            out, _ = p.communicate(timeout=DEADLINE_S)
            assert p.returncode == 0, out

    g.check("two_processes_map_one_segment", two_processes)

    def resync() -> None:
        g.ok("write", "w", SIZE, 6)
        g.ok("read", "w", SIZE, 6, 1)

    g.check("second_sync_commits_the_new_writes", resync)
    g.check("malformed_ioctls_get_errors", lambda: g.ok("ioctls", "bad"))

    def stalled() -> None:
        try:
            g.sigbus_when_touched(3, lambda: os.kill(g.provider.pid, signal.SIGSTOP))
        finally:
            os.kill(g.provider.pid, signal.SIGCONT)
        assert "did not answer in time" in g.dmesg(), "no kernel log line for the timeout"

    g.check("stalled_daemon_gives_sigbus_after_the_timeout", stalled)

    holder = g.run("hold", "pre", SIZE, stdin=True)
    first_line(holder, "kmod_test hold")

    def unload_refused() -> None:
        r = subprocess.run(["rmmod", "netmem"], capture_output=True, text=True)
        assert r.returncode != 0, "rmmod succeeded with the device mapped"
        assert Path("/dev/netmem").exists()

    g.check("unload_refused_while_mapped", unload_refused)

    def killed() -> None:
        def kill() -> None:
            g.provider.kill()
            g.provider.wait(DEADLINE_S)

        g.sigbus_when_touched(5, kill)
        log = g.dmesg()
        assert "closed /dev/netmem" in log, "no kernel log line for the daemon's end"
        assert re.search(r"fault on page 5 of segment pre .*SIGBUS", log), "no fault line"
        p = g.run("read", "pre", SIZE, 1, 2)
        out, _ = p.communicate(timeout=DEADLINE_S)
        assert p.returncode == 1 and "No such device" in out, f"attach without daemon: {out}"

    g.check("killed_daemon_gives_sigbus", killed)

    def mount_daemon_serves_the_device() -> None:
        """`netmemfs mount --serve-device`: one daemon for the file door and the module."""
        mnt, cache = Path("/run/nm"), Path("/run/nm-cache")
        mnt.mkdir()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "netmemfs",
                "mount",
                str(mnt),
                "--server",
                g.address,
                "--cache-dir",
                str(cache),
                "--serve-device",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        try:
            g.ok("read", "pre", SIZE, 1, 2)
            g.ok("write", "m", SIZE, 7)
            with open(mnt / "m", "rb") as f:  # the file door sees the area's commit
                for n in range(SIZE // PAGE):
                    assert f.read(PAGE) == stamp(n, 7), f"page {n} of m through the mount"
        finally:
            subprocess.run(
                [sys.executable, "-m", "netmemfs", "umount", str(mnt), "--cache-dir", str(cache)],
                check=True,
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
            )

    g.check("mount_daemon_serves_the_device", mount_daemon_serves_the_device)

    def unload() -> None:
        assert holder.stdin is not None
        holder.stdin.write("done\n")
        holder.stdin.flush()
        holder.wait(DEADLINE_S)
        subprocess.run(["rmmod", "netmem"], check=True, capture_output=True)
        wait_for(lambda: not Path("/dev/netmem").exists(), "/dev/netmem to go away")
        assert "BUG" not in g.dmesg() and "WARNING" not in g.dmesg(), g.dmesg()[-2000:]

    g.check("unload_after_use", unload)
    g.server.kill()
    print(f"KMOD-SUMMARY passed={g.passed} failed={g.failed}", flush=True)
    return 1 if g.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
