"""Test helpers: real server processes, page patterns that name themselves, waiting."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO, TypeVar

import pytest
import trio
import trustme

from netmemfs import protocol
from netmemfs.pages import PAGE_SIZE
from netmemfs.remote import RemoteStore, tls_client_context

T = TypeVar("T")

START_TIMEOUT_S = 20.0
_LISTENING = re.compile(rb"netmemfs-server listening on ([\d.]+):(\d+)")
# Log lines a test did not ask for fail it (S3QL's checklogs).
_UNEXPECTED = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")


def stamp_page(segment: str, page: int, generation: int) -> bytes:
    """A page that says which segment, page and generation it belongs to."""
    head = f"nm|{segment}|{page}|{generation}|".encode()
    return (head * (PAGE_SIZE // len(head) + 1))[:PAGE_SIZE]


def describe_page(data: bytes) -> str:
    if data == bytes(PAGE_SIZE):
        return "a hole (zeros)"
    head = data[:64].split(b"|")
    if len(head) >= 4 and head[0] == b"nm":
        return f"segment {head[1].decode()!r} page {head[2].decode()} gen {head[3].decode()}"
    return f"unrecognised bytes {data[:24]!r}"


def run_trio(fn: Callable[[], Awaitable[T]], timeout_s: float = 60.0) -> T:
    async def main() -> T:
        with trio.fail_after(timeout_s):
            return await fn()

    return trio.run(main)


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll cond until true or the deadline; no fixed sleeps in tests."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def read_line(stream: IO[bytes], timeout_s: float) -> bytes:
    """The next line a child process writes to stream (a pipe), read a byte at a time
    so that nothing after it is taken; short (no newline) if the child closed it or
    none came within timeout_s."""
    fd = stream.fileno()
    out = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not out.endswith(b"\n"):
            if not sel.select(max(0.0, deadline - time.monotonic())):
                return out
            chunk = os.read(fd, 1)
            if not chunk:
                return out
            out += chunk
    return out


class LogChecked:
    """A process whose log (at log_path) may hold no warning a test did not declare."""

    log_path: Path
    expected_log: list[re.Pattern[str]]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def expect_log(self, pattern: str) -> None:
        """Allow log lines matching pattern (warnings the test provokes on purpose)."""
        self.expected_log.append(re.compile(pattern))

    def unexpected_log_lines(self) -> list[str]:
        return [
            line
            for line in self.log_text().splitlines()
            if _UNEXPECTED.search(line) and not any(p.search(line) for p in self.expected_log)
        ]


class ServerProc(LogChecked):
    """A real netmemfs-server process on 127.0.0.1 with an ephemeral port."""

    def __init__(self, workdir: Path, *args: str, data_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.args = list(args)
        self.data_dir = data_dir
        self.expected_log: list[re.Pattern[str]] = []
        self.log_path = workdir / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "netmemfs_server", "--listen", "127.0.0.1:0", *self.args]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        assert self.proc.stdout is not None
        started = time.monotonic()
        line = read_line(self.proc.stdout, START_TIMEOUT_S)
        if not line.endswith(b"\n"):
            # Short before the deadline: the server closed its output (it exited).
            exited = time.monotonic() - started < START_TIMEOUT_S
            self.kill()
            if exited:
                raise AssertionError(f"server exited at start:\n{self.log_text()}")
            raise AssertionError(f"server did not start within {START_TIMEOUT_S} s")
        self.proc.stdout.close()  # the server prints nothing after this line
        m = _LISTENING.search(line)
        assert m, line
        self.port = int(m.group(2))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc is not None:
            self.proc.wait(10)

    def restart(self, *, same_port: bool = False) -> None:
        """Kill -9 and start again on the same data dir (and port, if asked)."""
        self.kill()
        if same_port:
            self.args += ["--listen", f"127.0.0.1:{self.port}"]  # the last --listen wins
        self.start()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def wait_for_async(
    cond: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0
) -> None:
    """Poll an async condition until true or the deadline (for state in another process)."""
    delay = 0.001
    with trio.move_on_after(timeout_s) as scope:
        while True:
            if await cond():
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class MountProc(LogChecked):
    """A real `netmemfs mount` (daemon in the background) in a temp dir."""

    def __init__(self, workdir: Path, server: str | None, *args: str, name: str = "mnt") -> None:
        self.mountpoint = workdir / name
        self.cache_dir = workdir / f"{name}-cache"
        self.log_path = self.cache_dir / "daemon.log"
        self.mountpoint.mkdir(exist_ok=True)
        self.server = server
        self.args = list(args)
        self.expected_log: list[re.Pattern[str]] = []
        if server is not None and server.startswith(("redis://", "rediss://")):
            # The tests' redis-servers keep nothing on disk (tests/redis_procs.py): the
            # mount says at each start that a power loss would lose commits.
            self.expect_log("appendonly no, appendfsync .*: a commit it acknowledged is lost")
        self.earlier_logs = ""  # of earlier daemons: each mount starts a new daemon.log
        self.pid = 0
        self.start()

    def log_text(self) -> str:
        return self.earlier_logs + super().log_text()

    def start(self) -> None:
        self.earlier_logs = self.log_text()
        cmd = [sys.executable, "-m", "netmemfs", "mount", str(self.mountpoint)]
        cmd += ["--cache-dir", str(self.cache_dir), *self.args]
        if self.server is not None:
            cmd += ["--server", self.server]
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        assert r.returncode == 0, f"mount failed:\n{r.stdout}{r.stderr}"
        self.pid = int((self.cache_dir / "lock").read_text().split()[0])

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def kill(self) -> None:
        """SIGKILL the daemon and take its dead mount away."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(self.pid), f"daemon {self.pid} to die")
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)

    def umount(self) -> None:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "netmemfs",
                "umount",
                str(self.mountpoint),
                "--cache-dir",
                str(self.cache_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not pid_alive(self.pid), f"daemon {self.pid} to exit after umount")

    def cleanup(self) -> None:
        """Leave no daemon and no mount behind, dead ones (ENOTCONN) included."""
        if pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        try:
            mounted = os.path.ismount(self.mountpoint)
            os.stat(self.mountpoint)
        except OSError:
            mounted = True  # a dead FUSE mount answers ENOTCONN
        if mounted:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)


def server_used_bytes(server: ServerProc) -> int:
    """The bytes of page data srv stores, as it says."""

    async def ask() -> int:
        async with RemoteStore.connect(server.address) as store:
            return (await store.server_stat()).used_bytes

    return run_trio(ask)


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process pid so far, or of its thread tid (for
    benchmarks)."""
    stat = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: Mapping[str, int]) -> dict[str, float]:
    """cpu_s of each named process."""
    return {name: cpu_s(pid) for name, pid in pids.items()}


def cpu_us_per(before: Mapping[str, float], after: Mapping[str, float], n: int) -> dict[str, float]:
    """CPU microseconds per operation of each part, from two readings n operations
    apart (cpu_of, or any name -> CPU seconds)."""
    return {part: (after[part] - before[part]) * 1e6 / n for part in before}


def steal_ticks() -> tuple[int, int]:
    """(ticks the hypervisor took from this machine's CPUs, all ticks) so far, summed
    over the CPUs, from /proc/stat's first line (for benchmarks)."""
    return parse_steal(Path("/proc/stat").read_text())


def parse_steal(proc_stat: str) -> tuple[int, int]:
    # "cpu user nice system idle iowait irq softirq steal guest guest_nice": guest time
    # is counted in user already, so the total stops at steal.
    ticks = [int(x) for x in proc_stat.split("\n", 1)[0].split()[1:9]]
    return ticks[7], sum(ticks)


class StealMeter:
    """How much CPU time the hypervisor took while a benchmark ran: on a shared virtual
    machine, the runs it took much from are the noisy ones."""

    def __init__(self) -> None:
        self.start = steal_ticks()

    def line(self) -> str:
        stolen, total = (b - a for a, b in zip(self.start, steal_ticks(), strict=True))
        share = 100 * stolen / total if total else 0.0
        return (
            f"host: {share:.1f}% of the CPUs' time was stolen by the hypervisor during this "
            "run (/proc/stat); figures from runs with more of it are noisier"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class RawClient:
    """A blocking socket speaking frames by hand, for bad input and pipelining."""

    def __init__(self, address: str) -> None:
        host, port = address.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = protocol.Connection(protocol.Role.CLIENT)

    def send(self, *msgs: protocol.Request) -> None:
        self.sock.sendall(b"".join(self.conn.send(m) for m in msgs))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> protocol.Message | protocol.Event:
        while True:
            ev = self.conn.next_event()
            if ev is not protocol.NEED_DATA:
                return ev
            try:
                self.conn.receive_data(self.sock.recv(1 << 20))
            except ConnectionResetError:
                self.conn.receive_data(b"")

    def hello(self) -> None:
        self.send(protocol.Hello(1, protocol.PROTOCOL_VERSION, b"n" * 32))
        assert isinstance(self.receive(), protocol.HelloReply)

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def killed_after(srv: ServerProc, after_s: float) -> AsyncIterator[RemoteStore]:
    """A client of srv, which is killed (SIGKILL) after_s from now, a random moment the
    crash tests choose, not coordination. The body runs until the server's death stops
    it (the client gives up within 0.2 s)."""

    async def killer() -> None:
        await trio.sleep(after_s)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGKILL)

    async with (
        RemoteStore.connect(srv.address, retry_for_s=0.2) as store,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(killer)
        yield store


class SuiteMissing(Exception):
    """What an external test suite (../shared/suites) needs is not here; the message
    names the package or file."""


SUITES = Path(__file__).resolve().parent.parent.parent / "shared" / "suites"


def unpack_suite(archive: str, into: Path) -> None:
    """Unpack ../shared/suites/archive under into (a temp dir: never the checkout)."""
    path = SUITES / archive
    if not path.is_file():
        raise SuiteMissing(f"no {path}: the suites archive belongs beside the checkout")
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")


def build_suite(build: Callable[[Path], T], into: Path) -> T:
    """build(into), or skip the test saying what is missing; in CI, which sets
    NETMEMFS_REQUIRE_SUITES=1, fail instead."""
    try:
        return build(into)
    except SuiteMissing as e:
        if os.environ.get("NETMEMFS_REQUIRE_SUITES") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


def build_c_test(name: str, out_dir: Path) -> Path:
    """tests/c/<name>.c, built the way a user builds: `gcc prog.c -lnetmem`."""
    out = out_dir / name
    source = Path(__file__).resolve().parent / "c" / f"{name}.c"
    gcc = ["gcc", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(source), "-lnetmem"]
    subprocess.run(gcc, check=True)
    return out


class Tls:
    """A CA of the test's own (trustme) and a server certificate for 127.0.0.1 it signed,
    as files in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1")
        self.cert = tmp_path / "server.pem"
        self.key = tmp_path / "server.key"
        self.ca_file = tmp_path / "ca.pem"
        cert.cert_chain_pems[0].write_to_path(str(self.cert))
        for extra in cert.cert_chain_pems[1:]:
            with open(self.cert, "ab") as f:
                f.write(extra.bytes())
        cert.private_key_pem.write_to_path(str(self.key))
        self.key.chmod(0o600)
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))

    def context(self) -> ssl.SSLContext:
        return tls_client_context(self.ca_file)


def netmemfs_status(mountpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`netmemfs status MOUNTPOINT ARGS...`, run as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "netmemfs", "status", str(mountpoint), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
