"""Runs inside the qemu guest that tests/kmod_vm.py boots: the kernel module's checks.

    python -m tests.kmod_guest KMOD_TEST_BINARY [CHECK...]

The guest's /init has loaded netmem.ko (timeout_ms=10000). This starts a real
netmemfs-server and `netmemfs serve-device` on the guest's loopback, drives
tests/c/kmod_test.c against /dev/netmem, and prints one line per check:
"KMOD-TEST PASS name" or "KMOD-TEST FAIL name: why", then "KMOD-SUMMARY ...".
Checks wait on conditions with deadlines, never on sleeps. Named checks: only those run
(by hand, while working on one; tests/kmod_vm.py's run_guest(only=...)).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from netmemfs._uffd_cffi import ffi, lib
from netmemfs.connect import connect_store
from netmemfs.core import ROOT_INO
from netmemfs.ops import MakeNode, WritePages
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.anon_worker import stamp
from tests.redis_procs import RedisProc

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
    def __init__(self, test_bin: str, only: list[str]) -> None:
        self.bin = test_bin
        self.only = set(only)
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

    def stop_provider(self) -> None:
        """No `serve-device` runs after this (the checks with TestProvider need that)."""
        if self.provider.poll() is None:
            self.provider.kill()
            self.provider.wait(DEADLINE_S)

    def check(self, name: str, fn: Callable[[], None]) -> None:
        if self.only and name not in self.only:
            return
        try:
            fn()
        except Exception as e:  # each check reports, the next one runs
            self.failed += 1
            why = f"{type(e).__name__}: {e}"
            if isinstance(e, subprocess.CalledProcessError) and e.stderr:
                why += f" It printed: {str(e.stderr).strip()[-1500:]!r}"
            print(f"KMOD-TEST FAIL {name}: {why}", flush=True)
        else:
            self.passed += 1
            print(f"KMOD-TEST PASS {name}", flush=True)

    def run(
        self,
        *args: str | int,
        stdin: bool = False,
        budget: int = 0,
        cgroup: Path | None = None,
    ) -> subprocess.Popen[str]:
        """kmod_test with args; budget: the area's, in bytes; cgroup: run it there."""

        def enter() -> None:  # pragma: no cover - between fork and exec
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        return subprocess.Popen(
            [self.bin, *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "KMOD_TEST_BUDGET": str(budget)},
            preexec_fn=enter if cgroup is not None else None,
        )

    def ok(self, *args: str | int) -> None:
        p = self.run(*args)
        out, _ = p.communicate(timeout=DEADLINE_S)
        assert p.returncode == 0, (
            f"kmod_test {' '.join(map(str, args))}: exit {p.returncode}: {out}"
        )

    def server_pages(self, segment: str, npages: int = SIZE // PAGE) -> bytes:
        async def read() -> bytes:
            async with RemoteStore.connect(self.address) as store:
                return await store.read_bytes(segment, 0, npages)

        return trio.run(read)

    def check_workers_synced(self, segment: str, each: int, final: list[int]) -> None:
        """Worker i's pages (each of them, from i * each on) hold its last synced
        generation final[i] on the server, and the kernel logged no warning."""
        got = self.server_pages(segment, each * len(final))
        for i, gen in enumerate(final):
            for n in range(each * i, each * i + each):
                page = got[n * PAGE : (n + 1) * PAGE]
                assert page == stamp(n, gen), (
                    f"page {n} of worker {i}: not its last sync (generation {gen})"
                )
        log = self.dmesg()
        assert "WARNING" not in log and "BUG" not in log, log[-2000:]

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


class Msg:
    """A request the module handed the test's provider."""

    def __init__(self, raw: bytes) -> None:
        m = ffi.from_buffer("struct netmem_msg *", raw)
        self.id, self.type, self.page = int(m.id), int(m.type), int(m.page)
        self.area, self.commit = int(m.area), int(m.commit)
        self.count, self.length = int(m.count), int(m.len)
        self.payload = raw[ffi.sizeof("struct netmem_msg") :][: self.length]

    def numbers(self) -> list[int]:
        """A COMMIT_PAGES message's NETMEM_CHUNK_PAGES page numbers."""
        n = lib.NETMEM_CHUNK_PAGES
        return list(memoryview(self.payload[: n * 8]).cast("Q"))

    def page_data(self, k: int) -> bytes:
        start = lib.NETMEM_CHUNK_PAGES * 8 + k * PAGE
        return self.payload[start : start + PAGE]


class TestProvider:
    """The test as the module's daemon: it sees exactly what the module hands a
    daemon, and answers what a real one would not. No other provider may run."""

    def __init__(self, store: str = "test") -> None:
        self.fd = os.open("/dev/netmem", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(self.fd, lib.NETMEM_IOC_PROVIDE, provide_arg(store))
        self.pages: dict[int, bytes] = {}  # what syncs handed over, by page

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def readable(self, timeout_s: float = DEADLINE_S) -> bool:
        return bool(select.select([self.fd], [], [], timeout_s)[0])

    def read(self) -> Msg:
        if not self.readable():
            raise AssertionError("no request from the module")
        return Msg(os.read(self.fd, lib.NETMEM_MSG_BYTES))

    def reply(self, msg: Msg, status: int = 0, data: bytes | None = None) -> None:
        r = ffi.new("struct netmem_reply *")
        r.id, r.status = msg.id, status
        r.flags = 0 if data is not None or status else lib.NETMEM_REPLY_HOLE
        os.write(self.fd, bytes(ffi.buffer(r)) + (data or b""))

    def answer(self, msg: Msg) -> None:
        """As a daemon would, from the pages syncs handed over."""
        if msg.type == lib.NETMEM_MSG_FETCH:
            self.reply(msg, 0, self.pages.get(msg.page))
        elif msg.type == lib.NETMEM_MSG_COMMIT_PAGES:
            numbers = msg.numbers()
            for k in range(msg.count):
                self.pages[numbers[k]] = msg.page_data(k)
        else:
            self.reply(msg)

    def serve_until(self, kind: int) -> Msg:
        """Answer requests as a daemon would until one of type kind comes; return it
        unanswered."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"no request of type {kind} from the module")
            msg = self.read()
            if msg.type == kind:
                return msg
            self.answer(msg)

    @contextlib.contextmanager
    def serving(self, on: Callable[[Msg], bool]) -> Iterator[None]:
        """Answer requests in a thread while the body runs, as serve_until_exit does."""
        stop = threading.Event()
        failed: list[BaseException] = []

        def loop() -> None:
            try:
                while not stop.is_set():
                    if self.readable(0.05):
                        msg = Msg(os.read(self.fd, lib.NETMEM_MSG_BYTES))
                        if not on(msg):
                            self.answer(msg)
            except BaseException as e:  # reported by the body's thread
                failed.append(e)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(DEADLINE_S)
        if failed:
            raise failed[0]

    def serve_until_exit(self, proc: subprocess.Popen[str], on: Callable[[Msg], bool]) -> None:
        """Answer requests until proc exits; on(msg) first, which returns True if it
        answered msg itself."""
        deadline = time.monotonic() + DEADLINE_S
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("the program did not finish")
            if self.readable(0.05):
                msg = Msg(os.read(self.fd, lib.NETMEM_MSG_BYTES))
                if not on(msg):
                    self.answer(msg)


def provide_arg(store: str) -> bytes:
    """NETMEM_IOC_PROVIDE's argument: the store the provider serves."""
    p = ffi.new("struct netmem_provide *")
    p.store = store.encode()
    return bytes(ffi.buffer(p))


def say(p: subprocess.Popen[str], line: str = "go") -> None:
    assert p.stdin is not None
    p.stdin.write(line + "\n")
    p.stdin.flush()


def _drop_cap_sys_admin() -> None:  # pragma: no cover - between fork and exec
    # prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN): root's program then runs without it.
    if ctypes.CDLL(None, use_errno=True).prctl(24, 21, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def _state(pid: int) -> str:
    """The state letter of pid ("" once reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return ""


def populate(address: str) -> None:
    """Segment "pre": even pages hold generation 1, odd pages are holes."""

    async def go() -> None:
        async with RemoteStore.connect(address) as store:
            await store.create("pre", SIZE)
            runs = [PageRun("pre", n, stamp(n, 1)) for n in range(0, SIZE // PAGE, 2)]
            await store.commit(runs, txn=store.new_txn())

    trio.run(go)


def main(test_bin: str, only: list[str]) -> int:
    g = Guest(test_bin, only)
    populate(g.address)

    g.check("fault_in_server_pages_and_holes", lambda: g.ok("read", "pre", SIZE, 1, 2))
    g.check("read_only_shared_mapping", lambda: g.ok("readonly", "pre", SIZE, 1, 2))

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

    def area_of_a_file_in_a_directory() -> None:
        """The segment is a path: the daemon finds (or makes) the file in a directory,
        and the area's sync lands in it."""

        async def mkdir() -> None:
            async with RemoteStore.connect(g.address) as store:
                await store.change([MakeNode(1, "kd", stat.S_IFDIR | 0o755)])

        async def read() -> bytes:
            async with RemoteStore.connect(g.address) as store:
                d = await store.lookup(1, "kd")
                f = await store.lookup(d.ino, "f")
                return (await store.read_inode(f.ino, 0, SIZE // PAGE)).to_bytes()

        trio.run(mkdir)
        g.ok("write", "kd/f", SIZE, 4)
        assert trio.run(read) == b"".join(stamp(n, 4) for n in range(SIZE // PAGE))

    g.check("an_area_of_a_file_in_a_directory", area_of_a_file_in_a_directory)

    def an_area_follows_other_clients_commits() -> None:
        """Another client commits generation 2 of pages 1.. of a mapped area's file: the
        server tells the daemon, which has the module drop those clean pages, so the
        mapping shows them without mapping again; page 0, written in the area and not
        synced, stays as written."""

        async def commit() -> None:
            async with RemoteStore.connect(g.address) as store:
                f = await store.lookup(1, "fol")
                data = b"".join(stamp(n, 2) for n in range(1, SIZE // PAGE))
                await store.change([WritePages(f.ino, 1, data)])

        g.ok("write", "fol", SIZE, 1)
        p = g.run("follow", "fol", SIZE, 1, stdin=True)
        try:
            assert first_line(p, "kmod_test follow") == "mapped\n"
            trio.run(commit)
            say(p)
            out, _ = p.communicate(timeout=DEADLINE_S)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0 and out == "followed\n", f"exit {p.returncode}: {out}"

    g.check("an_area_follows_other_clients_commits", an_area_follows_other_clients_commits)

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

    def syncs_survive_daemon_restarts() -> None:
        """Four processes sync generations of their own pages of one segment while
        the daemon is killed and started again 10 times: every sync that returned 0
        is whole on the server, the last one of each process is what it holds, no
        worker hangs, and the kernel logs no warning."""
        g.stop_provider()  # killed by the check before, unless only some checks run
        g.provider = g.start_provider()
        workers = [g.run("stress", "stress", SIZE, i, 16, stdin=True) for i in range(4)]
        synced = [0] * 4
        final = [0] * 4

        def follow(i: int, p: subprocess.Popen[str]) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                word, _, gen = line.partition(" ")
                if word == "synced":
                    synced[i] = int(gen)
                elif word == "final":
                    final[i] = int(gen)

        try:
            for p in workers:
                line = first_line(p, "kmod_test stress")
                assert line == "ready\n", f"a worker said {line!r}"
            readers = [
                threading.Thread(target=follow, args=(i, p), daemon=True)
                for i, p in enumerate(workers)
            ]
            for t in readers:
                t.start()
            for _ in range(10):
                marks = list(synced)

                def all_synced(marks: list[int] = marks) -> bool:
                    return all(s > m for s, m in zip(synced, marks, strict=True))

                wait_for(all_synced, "every worker to sync since the daemon last started")
                g.provider.kill()
                g.provider.wait(DEADLINE_S)
                g.provider = g.start_provider()
            for p in workers:
                assert p.stdin is not None
                p.stdin.write("stop\n")
                p.stdin.flush()
            for p in workers:
                p.wait(DEADLINE_S)
            for t in readers:
                t.join(DEADLINE_S)
            codes = [p.returncode for p in workers]
            assert codes == [0] * 4 and all(final), f"exits {codes}, final generations {final}"
            g.check_workers_synced("stress", 16, final)
        finally:
            for p in workers:
                if p.poll() is None:
                    p.kill()
            g.provider.kill()
            g.provider.wait(DEADLINE_S)

    g.check("syncs_survive_daemon_restarts", syncs_survive_daemon_restarts)

    def eviction_under_load() -> None:
        """Four processes write and sync 96 pages each, in areas whose budget is 64
        pages, so clean pages are dropped and fetched again all the time (and by the
        shrinker: drop_caches=2 between rounds). Every page ends as its process's last
        sync, and the kernel logs no warning."""
        g.stop_provider()  # killed by the check before, unless only some checks run
        g.provider = g.start_provider()
        n, size = 96, 4 * 96 * PAGE
        workers = [
            g.run("stress", "ev", size, i, n, stdin=True, budget=64 * PAGE) for i in range(4)
        ]
        try:
            for p in workers:
                assert first_line(p, "kmod_test stress") == "ready\n"
            for _ in range(5):
                for p in workers:
                    line = first_line(p, "kmod_test stress")
                    assert line.startswith("synced "), f"a worker said {line!r}"
                Path("/proc/sys/vm/drop_caches").write_text("2")
            final = []
            for p in workers:
                say(p, "stop")
                out, _ = p.communicate(timeout=DEADLINE_S)
                last = out.splitlines()[-1] if out else ""
                assert p.returncode == 0 and last.startswith("final "), (
                    f"exit {p.returncode}: {last}"
                )
                final.append(int(last.split()[1]))
            g.check_workers_synced("ev", n, final)
        finally:
            for p in workers:
                if p.poll() is None:
                    p.kill()
            g.stop_provider()

    g.check("eviction_under_load", eviction_under_load)

    def provide_needs_cap_sys_admin() -> None:
        code = (
            "import fcntl, os\n"
            "from netmemfs._uffd_cffi import lib\n"
            "fd = os.open('/dev/netmem', os.O_RDWR)\n"
            "try:\n"
            "    fcntl.ioctl(fd, lib.NETMEM_IOC_PROVIDE, bytes(64))\n"
            "    print('provided')\n"
            "except OSError as e:\n"
            "    print(e.errno)\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            preexec_fn=_drop_cap_sys_admin,
        )
        assert r.stdout.strip() == str(errno.EPERM), f"without CAP_SYS_ADMIN: {r.stdout}{r.stderr}"

    g.check("provide_needs_cap_sys_admin", provide_needs_cap_sys_admin)

    def poll_of_an_area_file() -> None:
        fd = os.open("/dev/netmem", os.O_RDWR)
        try:
            events = select.poll()
            events.register(fd, select.POLLIN | select.POLLOUT)
            got = dict(events.poll(0)).get(fd, 0)
        finally:
            os.close(fd)
        assert got & select.POLLERR and got & select.POLLHUP, f"poll gave {got:#x}"

    g.check("poll_of_a_file_with_no_queue_is_err_hup", poll_of_an_area_file)

    g.stop_provider()  # from here on the test is the daemon (TestProvider)

    def chunk_numbers_past_count_are_zero() -> None:
        """A sync of 67 pages: a chunk of 64, then one of 3 whose other 61 page
        numbers must be zeros (not the chunk before's, not stale heap: the guest
        boots with init_on_alloc=0). And a read into a bad buffer loses nothing."""
        tp = TestProvider()
        try:
            size = 67 * PAGE
            p = g.run("write", "z", size, 9)
            chunks: list[Msg] = []

            def on(msg: Msg) -> bool:
                if msg.type == lib.NETMEM_MSG_COMMIT_PAGES:
                    chunks.append(msg)
                return False

            # First: a read whose buffer the kernel cannot write. The request it
            # would have taken must still be there for the next read.
            assert tp.readable(), "no first request"
            libc = ctypes.CDLL(None, use_errno=True)
            n = libc.read(tp.fd, ctypes.c_void_p(8), ctypes.c_size_t(lib.NETMEM_MSG_BYTES))
            assert n == -1 and ctypes.get_errno() == errno.EFAULT, f"read into 8: {n}"
            tp.serve_until_exit(p, on)
            out = p.stdout.read() if p.stdout else ""
            assert p.returncode == 0, f"kmod_test write: exit {p.returncode}: {out}"
            assert [c.count for c in chunks] == [64, 3], [c.count for c in chunks]
            tail = chunks[1].numbers()[3:]
            assert tail == [0] * 61, f"page numbers past count: {tail[:8]}..."
        finally:
            tp.close()

    g.check("chunk_numbers_past_count_are_zero", chunk_numbers_past_count_are_zero)

    def daemon_errnos_are_checked() -> None:
        """-512 and below are the kernel's own: refused. ENOMEM from the daemon is
        SIGBUS, not VM_FAULT_OOM (which would have the task fault again for ever)."""
        tp = TestProvider()
        try:
            p = g.run("touch", "e", SIZE, 2, stdin=True)
            tp.answer(tp.read())  # the attach's OPEN
            fetches: list[Msg] = []
            refused: list[int] = []

            def on(msg: Msg) -> bool:
                if msg.type != lib.NETMEM_MSG_FETCH:
                    return False
                fetches.append(msg)
                if len(fetches) == 1:
                    try:
                        tp.reply(msg, -512)  # -ERESTARTSYS
                    except OSError as e:
                        refused.append(e.errno or 0)
                    with contextlib.suppress(OSError):  # gone if -512 was taken
                        tp.reply(msg, -errno.ENOMEM)
                    return True
                return False  # a fault retried: answered with a hole

            assert first_line(p, "kmod_test touch") == "mapped\n"
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
            tp.serve_until_exit(p, on)
            assert refused == [errno.EINVAL], f"a reply of -512 got {refused or 'accepted'}"
            assert p.returncode == -signal.SIGBUS, f"exit {p.returncode} after ENOMEM"
            assert len(fetches) == 1, f"{len(fetches)} fetches: the fault was retried"
        finally:
            tp.close()

    g.check("daemon_errnos_are_checked", daemon_errnos_are_checked)

    def mmap_is_not_blocked_by_a_slow_fault() -> None:
        """A thread waits in a fault for a page the daemon holds back; mmap() in
        another thread of the process, which wants the mmap lock for writing, does
        not wait for it (the fault let go of the lock, VM_FAULT_RETRY)."""
        tp = TestProvider()
        try:
            p = g.run("slowfault", "s", SIZE, stdin=True)
            tp.answer(tp.read())  # the attach's OPEN
            assert first_line(p, "kmod_test slowfault") == "mapped\n"
            fetch = tp.read()
            assert fetch.type == lib.NETMEM_MSG_FETCH and fetch.page == 1, vars(fetch)
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("go\n")
            p.stdin.flush()
            # Blocks until mmap returns; the fetch is answered only after.
            line = p.stdout.readline()
            assert line == "mmap done\n", f"mmap behind the fault: {line!r} (exit {p.poll()})"
            tp.reply(fetch, 0, stamp(1, 4))
            tp.serve_until_exit(p, lambda msg: False)
            out = p.stdout.read()
            assert p.returncode == 0 and "fault done" in out, f"exit {p.returncode}: {out}"
        finally:
            tp.close()

    g.check("mmap_is_not_blocked_by_a_slow_fault", mmap_is_not_blocked_by_a_slow_fault)

    def a_sync_waits_past_timeout_ms_for_its_commit() -> None:
        """COMMIT_END waits on sync_timeout_ms, not timeout_ms: the commit of a large
        sync takes longer than one page's fetch may. The test's provider holds the
        commit until a fault on another area, started after it, has timed out."""
        tp = TestProvider()
        try:
            writer = g.run("write", "l", SIZE, 8)
            end = tp.serve_until(lib.NETMEM_MSG_COMMIT_END)  # held: no answer yet
            toucher = g.run("touch", "t", SIZE, 0, stdin=True)
            tp.answer(tp.read())  # its OPEN
            assert first_line(toucher, "kmod_test touch") == "mapped\n"
            assert toucher.stdin is not None
            toucher.stdin.write("go\n")
            toucher.stdin.flush()
            fetch = tp.read()
            assert fetch.type == lib.NETMEM_MSG_FETCH, vars(fetch)
            toucher.communicate(timeout=DEADLINE_S)  # not answered: it times out
            assert toucher.returncode == -signal.SIGBUS, f"the toucher: {toucher.returncode}"
            assert writer.poll() is None, "the sync gave up at timeout_ms"
            tp.reply(end)
            tp.serve_until_exit(writer, lambda msg: False)
            assert writer.returncode == 0, f"kmod_test write: exit {writer.returncode}"
        finally:
            tp.close()

    g.check(
        "a_sync_waits_past_timeout_ms_for_its_commit", a_sync_waits_past_timeout_ms_for_its_commit
    )

    def killed_while_waiting_for_a_sync() -> None:
        """A task waiting for the area's lock behind a sync the daemon holds up
        leaves at SIGKILL, before that sync ends."""
        tp = TestProvider()
        try:
            p = g.run("forksync", "f", SIZE, stdin=True)
            end = tp.serve_until(lib.NETMEM_MSG_COMMIT_END)  # the parent's, held
            assert p.stdout is not None
            lines = [p.stdout.readline() for _ in range(2)]
            child = int(next(x for x in lines if x.startswith("child")).split()[1])
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
            wait_for(lambda: _state(child) == "D", "the child to wait for the area's lock")
            os.kill(child, signal.SIGKILL)
            wait_for(lambda: _state(child) in ("Z", "X", ""), "the killed child to exit")
            assert p.poll() is None, "the parent's sync ended first"
            tp.reply(end)
            tp.serve_until_exit(p, lambda msg: False)
            assert p.returncode == 0, f"the parent: exit {p.returncode}"
        finally:
            tp.close()

    g.check("killed_while_waiting_for_a_sync", killed_while_waiting_for_a_sync)

    def an_abandoned_sync_is_aborted() -> None:
        """A task killed while its sync waits for the commit: the module tells the
        daemon to give that sync up (COMMIT_ABORT, naming its area and number), and the
        late answer finds nothing to answer."""
        tp = TestProvider()
        try:
            p = g.run("write", "ab", SIZE, 8)
            end = tp.serve_until(lib.NETMEM_MSG_COMMIT_END)  # held
            p.kill()
            p.wait(DEADLINE_S)
            abort = tp.read()
            assert abort.type == lib.NETMEM_MSG_COMMIT_ABORT, f"type {abort.type}"
            assert (abort.area, abort.commit) == (end.area, end.commit), vars(abort)
            try:
                tp.reply(end)
            except OSError as e:
                assert e.errno == errno.ENOENT, e
            else:
                raise AssertionError("the answer to an abandoned sync was taken")
        finally:
            tp.close()

    g.check("an_abandoned_sync_is_aborted", an_abandoned_sync_is_aborted)

    def areas_are_served_only_by_their_store() -> None:
        """An area attached while store "a"'s daemon served the device is never served
        by a daemon of store "b" (SIGBUS, and b sees no request); a daemon of "a"
        started again serves it."""
        # Store a's daemon is there before the programs attach: with none, the
        # attach fails at once (ENXIO), so starting them first was a race.
        tp = TestProvider("a")
        procs: list[subprocess.Popen[str]] = []
        try:
            procs += [g.run("touch", "st", SIZE, 1, stdin=True) for _ in range(2)]
            areas_served_by_their_store(tp, procs)
        finally:
            tp.close()  # closed already unless starting a program failed
            for p in procs:
                if p.poll() is None:
                    p.kill()  # or it would hold the module at unload

    def areas_served_by_their_store(tp: TestProvider, procs: list[subprocess.Popen[str]]) -> None:
        try:
            for _ in procs:
                tp.answer(tp.read())  # the OPENs, in whatever order they come
            for p in procs:
                line = first_line(p, "kmod_test touch")
                assert line == "mapped\n", f"kmod_test touch said {line!r}"
        finally:
            tp.close()
        other = TestProvider("b")
        seen: list[int] = []

        def record(msg: Msg) -> bool:
            seen.append(msg.type)
            return False  # answered as a daemon would: a hole

        try:
            with other.serving(record):
                say(procs[0])
                procs[0].communicate(timeout=DEADLINE_S)
            assert not seen, f"store b's daemon got requests of types {seen}"
            assert procs[0].returncode == -signal.SIGBUS, f"exit {procs[0].returncode}"
        finally:
            other.close()
        assert "serves another store" in g.dmesg(), "no kernel log line for the refusal"
        again = TestProvider("a")
        try:
            say(procs[1])
            again.serve_until_exit(procs[1], lambda msg: False)  # a hole: exit 0
            assert procs[1].returncode == 0, f"exit {procs[1].returncode}"
        finally:
            again.close()

    g.check("areas_are_served_only_by_their_store", areas_are_served_only_by_their_store)

    def reread(
        tp: TestProvider, segment: str, npages: int, between: Callable[[], None], **run: Path | int
    ) -> tuple[int, int]:
        """kmod_test reread of npages, every page served as stamp(n, 3); between()
        runs between the passes. Returns the fetches of each pass."""
        fetched: collections.Counter[int] = collections.Counter()

        def on(msg: Msg) -> bool:
            if msg.type != lib.NETMEM_MSG_FETCH:
                return False
            fetched[msg.page] += 1
            tp.reply(msg, 0, stamp(msg.page, 3))
            return True

        p = g.run("reread", segment, npages * PAGE, 3, stdin=True, **run)  # type: ignore[arg-type]
        try:
            with tp.serving(on):
                assert first_line(p, "kmod_test reread") == "mapped\n"
                between()  # before pass 1 too: the cgroup check reads its start
                say(p)
                assert first_line(p, "kmod_test reread") == "pass1\n"
                first = sum(fetched.values())
                between()
                say(p)
                out, _ = p.communicate(timeout=DEADLINE_S)
            assert p.returncode == 0 and out == "pass2\n", f"exit {p.returncode}: {out}"
            return first, sum(fetched.values()) - first
        finally:
            if p.poll() is None:
                p.kill()

    def clean_pages_beyond_the_budget_are_dropped() -> None:
        """An area of 256 pages with a budget of 64: reading it twice fetches at least
        192 pages again. Dirty pages are not dropped: 256 written pages, more than the
        budget, are all committed by the sync."""
        tp = TestProvider()
        try:
            first, second = reread(tp, "bud", 256, lambda: None, budget=64 * PAGE)
            assert first == 256 and second >= 192, f"fetches: {first}, then {second}"
            p = g.run("write", "bud", 256 * PAGE, 4, budget=64 * PAGE)
            tp.serve_until_exit(p, lambda msg: False)  # also checks a new mapping
            out = p.stdout.read() if p.stdout else ""
            assert p.returncode == 0, f"kmod_test write with a budget: {out}"
            assert len(tp.pages) == 256, f"the sync handed over {len(tp.pages)} pages"
        finally:
            tp.close()

    g.check("clean_pages_beyond_the_budget_are_dropped", clean_pages_beyond_the_budget_are_dropped)

    def memory_pressure_drops_clean_pages() -> None:
        """No budget: an area keeps what it fetched, until the shrinker is asked to
        free memory (drop_caches=2 calls every shrinker, as reclaim does)."""
        passes = [0]

        def drop_after_pass1() -> None:
            passes[0] += 1
            if passes[0] == 2:
                Path("/proc/sys/vm/drop_caches").write_text("2")

        tp = TestProvider()
        try:
            first, second = reread(tp, "shr", 256, lambda: None)
            assert (first, second) == (256, 0), f"without pressure: {first}, then {second}"
            first, second = reread(tp, "shr", 256, drop_after_pass1)
            assert first == 256 and second >= 128, f"fetches: {first}, then {second}"
        finally:
            tp.close()

    g.check("memory_pressure_drops_clean_pages", memory_pressure_drops_clean_pages)

    def pages_are_charged_to_the_memory_cgroup() -> None:
        """A task in a memory cgroup that faults in 1024 pages of an area is charged
        for them (__GFP_ACCOUNT): memory.current grows by at least 90% of 4 MiB."""
        root = Path("/sys/fs/cgroup")
        if not (root / "cgroup.controllers").exists():
            subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(root)], check=True)
        (root / "cgroup.subtree_control").write_text("+memory")
        group = root / "netmem-check"
        group.mkdir(exist_ok=True)
        marks: list[int] = []
        tp = TestProvider()
        try:
            reread(
                tp,
                "cg",
                1024,
                lambda: marks.append(int((group / "memory.current").read_text())),
                cgroup=group,
            )
        finally:
            tp.close()
        grew = marks[1] - marks[0]
        assert grew >= 0.9 * 1024 * PAGE, f"memory.current grew by {grew} bytes"
        group.rmdir()

    g.check("pages_are_charged_to_the_memory_cgroup", pages_are_charged_to_the_memory_cgroup)

    def dirty_pages_dropped_at_close_are_logged() -> None:
        """Pages written and never synced die with the area at the last close, and the
        kernel log says how many (docs/kmod.md says why they are not committed)."""
        tp = TestProvider()
        try:
            p = g.run("dropdirty", "dd", SIZE, 5)
            tp.serve_until_exit(p, lambda msg: False)
            assert p.returncode == 0, f"kmod_test dropdirty: exit {p.returncode}"
        finally:
            tp.close()
        line = "segment dd: 5 pages written since the last sync were dropped at the last close"
        assert line in g.dmesg(), "no kernel log line with the count"

    g.check("dirty_pages_dropped_at_close_are_logged", dirty_pages_dropped_at_close_are_logged)

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
            # The daemon's status counts the device door's commit, and lists its area.
            status = subprocess.run(
                [sys.executable, "-m", "netmemfs", "status", "--json", str(mnt)],
                check=True,
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
            )
            got = json.loads(status.stdout)
            assert got["device"] is not None and got["device"]["commits"] >= 1, got["device"]
            assert "m" in [a["path"] for a in got["device_areas"]], got["device_areas"]
        finally:
            subprocess.run(
                [sys.executable, "-m", "netmemfs", "umount", str(mnt), "--cache-dir", str(cache)],
                check=True,
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
            )

    g.check("mount_daemon_serves_the_device", mount_daemon_serves_the_device)

    def the_device_on_a_redis_store() -> None:
        """The door on Redis (issue 16): `serve-device --server redis://...` in place of
        the netmemfs-server's daemon. A process writes and msyncs an area, a new process
        maps it again and reads what was synced, and Redis holds those pages. The
        server's daemon is as the checks before left it, after (unload_after_use needs
        no daemon to hold the device)."""
        was_serving = g.provider.poll() is None
        g.stop_provider()
        redis = RedisProc(Path("/run/redis"))
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "netmemfs", "serve-device", "--server", redis.url],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                first_line(p, "serve-device on Redis")
                g.ok("write", "r", SIZE, 8)
                g.ok("read", "r", SIZE, 8, 1)

                async def held() -> bytes:
                    async with connect_store(redis.url, retry_for_s=DEADLINE_S) as store:
                        ino = (await store.lookup(ROOT_INO, "r")).ino
                        return (await store.read_inode(ino, 0, SIZE // PAGE)).to_bytes()

                want = b"".join(stamp(n, 8) for n in range(SIZE // PAGE))
                assert trio.run(held) == want, "Redis does not hold what was synced"
            finally:
                p.kill()
                p.wait(DEADLINE_S)
        finally:
            redis.kill()
            if was_serving:
                g.provider = g.start_provider()

    g.check("the_device_on_a_redis_store", the_device_on_a_redis_store)

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
    sys.exit(main(sys.argv[1], sys.argv[2:]))
