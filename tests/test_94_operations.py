"""Operating netmemfs (issue 17): Prometheus metrics from a real server and a real mount,
scraped by a real Prometheus (Debian's), and `netmemfs status` of a running mount.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netmemfs import anon
from netmemfs.pages import PAGE_SIZE
from tests.faultproxy import CHANGE, FaultProxy
from tests.helpers import (
    LogChecked,
    MountProc,
    ServerProc,
    pid_alive,
    read_line,
    wait_for,
)
from tests.helpers import netmemfs_status as status

_METRICS_AT = re.compile(r"serving metrics on http://([\d.]+:\d+)/metrics")


def metrics_address(proc: LogChecked) -> str:
    """Where proc (started with --metrics 127.0.0.1:0) serves its metrics, as it logs."""
    found: list[str] = []

    def logged() -> bool:
        m = _METRICS_AT.search(proc.log_text())
        if m:
            found.append(m.group(1))
        return bool(m)

    wait_for(logged, "the metrics address in the log")
    return found[0]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


def sample(text: str, name: str) -> float:
    """The value of an unlabelled sample in an exposition."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no {name} in:\n{text}"
    return float(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping targets every second;
    stopped by PID."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            message = "no prometheus: apt-get install prometheus (.ci/run does)"
            if os.environ.get("NETMEMFS_REQUIRE_OPS_TOOLS") == "1":
                pytest.fail(message)
            pytest.skip(message)
        config = workdir / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{address}']\n"
            for job, address in targets.items()
        )
        config.write_text(
            f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}"
        )
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_for(self._ready, "prometheus to be ready", timeout_s=60)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        got = self.query(expr)
        if not got:
            return None
        value = got[0]["value"]
        assert isinstance(value, list)
        return float(value[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Prometheus]]:
    started: list[Prometheus] = []

    def make(targets: dict[str, str]) -> Prometheus:
        p = Prometheus(tmp_path, targets)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def promtool_complaints(exposition: str) -> str:
    exe = shutil.which("promtool")
    assert exe is not None, "promtool comes with prometheus: apt-get install prometheus"
    r = subprocess.run(
        [exe, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    return "" if r.returncode == 0 and not r.stdout.strip() else r.stdout + r.stderr


def test_prometheus_sees_the_commit_counters_grow(
    server_factory: Callable[..., ServerProc],
    mount_factory: Callable[..., MountProc],
    prometheus_factory: Callable[[dict[str, str]], Prometheus],
) -> None:
    server = server_factory("--metrics", "127.0.0.1:0")
    mount = mount_factory(server.address, "--metrics", "127.0.0.1:0")
    at_server, at_mount = metrics_address(server), metrics_address(mount)
    prom = prometheus_factory({"server": at_server, "mount": at_mount})
    server_commits = "netmemfs_server_commits_total"
    mount_commits = "netmemfs_mount_commits_total"

    def scraped() -> bool:
        return prom.value(server_commits) is not None and prom.value(mount_commits) is not None

    wait_for(scraped, "prometheus's first scrape of both", timeout_s=30)
    before_server, before_mount = prom.value(server_commits), prom.value(mount_commits)
    assert before_server is not None and before_mount is not None
    with open(mount.path("f"), "wb") as f:
        for _ in range(3):
            f.write(os.urandom(8 * PAGE_SIZE))
            f.flush()
            os.fsync(f.fileno())

    def grew() -> bool:
        s, m = prom.value(server_commits), prom.value(mount_commits)
        return s is not None and m is not None and s >= before_server + 3 and m >= before_mount + 3

    wait_for(grew, "prometheus to see 3 more commits from the server and the mount", 30)
    # The histograms and per-type counters come through too.
    assert (prom.value("netmemfs_mount_commit_duration_seconds_count") or 0) >= 3
    assert (prom.value('netmemfs_server_requests_total{type="Change"}') or 0) >= 3
    assert prom.value('up{job="server"}') == 1 and prom.value('up{job="mount"}') == 1
    for address in (at_server, at_mount):
        assert promtool_complaints(scrape(address)) == "", address


def test_server_counts_refusals_by_limit(server_factory: Callable[..., ServerProc]) -> None:
    server = server_factory("--metrics", "127.0.0.1:0", "--max-connections", "1")
    server.expect_log("refusing connection from .*--max-connections")
    at = metrics_address(server)
    host, port = server.address.split(":")
    with socket.create_connection((host, int(port))) as first:
        wait_for(lambda: sample(scrape(at), "netmemfs_server_connections") == 1, "1 connection")
        with socket.create_connection((host, int(port))) as second:
            second.settimeout(10)
            while second.recv(4096):  # the server says why, then closes
                pass
        assert first.fileno() >= 0
    text = scrape(at)
    assert sample(text, "netmemfs_server_refused_connections_total") == 1
    assert sample(text, "netmemfs_server_connections_total") == 1


def file_status(mountpoint: Path, name: str) -> dict[str, object]:
    r = status(mountpoint, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    files = [f for f in got["open_files"] if f["path"] == name]
    assert len(files) == 1, got["open_files"]
    file: dict[str, object] = files[0]
    return file


def test_status_shows_dirty_pages_falling_to_zero_at_fsync(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    mount = mount_factory(server.address)
    with open(mount.path("w"), "wb") as f:
        f.write(os.urandom(64 * PAGE_SIZE))
        f.flush()  # in the daemon's journal now, not committed
        before = file_status(mount.mountpoint, "w")
        assert before["dirty_pages"] == 64, before
        assert (
            isinstance(before["journal_bytes"], int) and before["journal_bytes"] >= 64 * PAGE_SIZE
        )
        assert before["last_commit_at"] is None
        os.fsync(f.fileno())
        after = file_status(mount.mountpoint, "w")
        assert after["dirty_pages"] == 0 and after["journal_bytes"] == 0, after
        assert after["last_commit_at"] is not None and after["last_commit_s"] is not None
    human = status(mount.mountpoint)
    assert human.returncode == 0, human.stderr
    assert re.search(r"^w +\d+ +\d+ +0 +0 +\S+ s ago", human.stdout, re.M), human.stdout
    assert "commits     1 (0 failed)" in human.stdout, human.stdout


def test_status_and_metrics_refusals_are_one_clear_line(
    tmp_path: Path, server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    # Not a netmemfs mount.
    r = status(tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "is not a netmemfs mount" in r.stderr, r.stderr
    # A metrics port in use: the server and the mount each refuse to start, saying so.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        srv = subprocess.run(
            [sys.executable, "-m", "netmemfs_server", "--listen", "127.0.0.1:0", "--metrics", busy],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert srv.returncode == 1
        assert f"cannot serve metrics on {busy} (--metrics): Address already in use" in srv.stderr
        assert srv.stderr.strip().count("\n") == 0, srv.stderr
        (tmp_path / "m2").mkdir()
        mnt = subprocess.run(
            [
                *(sys.executable, "-m", "netmemfs", "mount", str(tmp_path / "m2")),
                *("--server", server.address, "--cache-dir", str(tmp_path / "m2-cache")),
                *("--metrics", busy),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert mnt.returncode == 1
        assert f"cannot serve metrics on {busy} (--metrics)" in mnt.stderr, mnt.stderr
        assert not os.path.ismount(tmp_path / "m2")
    # A dead daemon.
    mount = mount_factory(server.address)
    os.kill(mount.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(mount.pid), "the daemon to die")
    r = status(mount.mountpoint)
    assert r.returncode == 1
    assert "the mount's daemon is gone" in r.stderr and "netmemfs umount" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_umount_says_which_commit_it_waits_for(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    proxy = FaultProxy(server.address)
    try:
        mount = mount_factory(proxy.address)
        f = open(mount.path("big"), "wb")  # noqa: SIM115 - closed by the writer thread
        f.write(os.urandom(64 * PAGE_SIZE))
        f.flush()
        # The commit reaches the server when released; the daemon's other requests pass.
        held = proxy.arm(CHANGE, "hold-alone")

        def commit_and_close() -> None:
            os.fsync(f.fileno())
            f.close()

        writer = threading.Thread(target=commit_and_close)
        writer.start()
        held.wait()
        with subprocess.Popen(
            [
                *(sys.executable, "-m", "netmemfs", "umount", str(mount.mountpoint)),
                *("--cache-dir", str(mount.cache_dir)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as umount:
            try:
                assert umount.stderr is not None
                line = read_line(umount.stderr, 30).decode()
                assert "umount waiting for the commit of 64 pages to 'big'" in line, line
                assert umount.poll() is None  # still waiting: the commit is not done
                held.release()
                writer.join(30)
                assert not writer.is_alive()
                assert umount.wait(60) == 0, umount.stderr.read()
            finally:
                if umount.poll() is None:
                    umount.kill()
        assert not os.path.ismount(mount.mountpoint)
    finally:
        proxy.close()


def test_server_logs_its_recovery_progress(
    tmp_path: Path, server_factory: Callable[..., ServerProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    server = server_factory(data_dir=data)
    for segment in ("a", "b", "c"):
        r = subprocess.run(
            [
                *(sys.executable, "-m", "netmemfs", "demo", "--server", server.address),
                *("--segment", segment, "--pages", "2048"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr
    monkeypatch.setenv("NETMEMFS_PROGRESS_S", "0")  # a line per record read
    server.restart()
    lines = re.findall(
        rf"recovering {re.escape(str(data))}: (\d+)% \(\S+ \S+ of \S+ \S+, \S+ \S+/s\)",
        server.log_text(),
    )
    shares = [int(x) for x in lines]
    assert len(shares) >= 3 and shares == sorted(shares) and shares[-1] == 100, lines
    assert re.search(rf"recovering {re.escape(str(data))}: done, ", server.log_text())


def test_status_says_when_the_store_is_not_connected(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    mount = mount_factory(server.address, "--timeout", "2")

    def connected() -> bool:
        r = status(mount.mountpoint, "--json")
        assert r.returncode == 0, r.stderr
        answer: bool = json.loads(r.stdout)["store_connected"]
        return answer

    assert connected()
    mount.expect_log(r"ERROR lookup of 'missing-while-down': no answer from the server")
    mount.expect_log(r"ERROR stat of '': no answer from the server")  # the lookup's
    mount.expect_log(r"WARNING could not renew the holds")
    server.kill()
    with pytest.raises(OSError):
        os.stat(mount.path("missing-while-down"))  # asks the server: it is gone
    assert not connected()
    human = status(mount.mountpoint)
    assert "NOT CONNECTED: reconnecting" in human.stdout, human.stdout
    server.restart(same_port=True)
    with pytest.raises(FileNotFoundError):  # asks again, and the server answers
        os.stat(mount.path("missing-after"))
    assert connected()


def test_status_shows_a_region_s_budget_use(
    server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    """A region served by the mount's daemon is listed with what its handler (in the
    mapping process) says: resident pages against the budget, faults."""
    mount = mount_factory(server.address)
    size, budget = 512 * PAGE_SIZE, 128 * PAGE_SIZE  # the smallest budget: 512 KiB
    with anon.map(size, segment="r", server=mount.mountpoint, budget=budget) as region:
        region[:] = b"r" * size  # every page faulted in; the budget evicts past 128
        r = status(mount.mountpoint, "--json")
        assert r.returncode == 0, r.stderr
        (listed,) = json.loads(r.stdout)["regions"]
        handler = listed["handler"]
        assert handler is not None, listed
        assert handler["budget"] == 128 and 0 < handler["resident"] <= 128, handler
        # A fault brings in a run of pages; the budget let most of them go again.
        assert handler["faults"] > 0 and handler["evicted"] >= 384, handler
        human = status(mount.mountpoint).stdout
        assert re.search(r"^r \(region, \d+ of 128 pages resident, \d+ faults", human, re.M), human
