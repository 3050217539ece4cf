"""What a new user meets: the README's commands, mistakes at the command line, a daemon
killed and mounted again, and what the tools leave behind.

Each test runs the real programs as a user would (the console scripts in .venv/bin,
the C library as installed), and reads what they print.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import MountProc, ServerProc, pid_alive, wait_for
from tests.test_70_anon import ROOT, Worker, _agent_pid, _python

MountFactory = Callable[..., MountProc]
BIN = Path(sys.executable).parent  # the venv's console scripts
MiB = 1 << 20


def _netmemfs(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "netmemfs"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


def _dead(mountpoint: Path) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _daemon_pid(cache_dir: Path) -> int:
    return int((cache_dir / "lock").read_text().split()[0])


def _private_servers(data_dir: Path) -> list[int]:
    """Pids of netmemfs-server processes using data_dir."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if b"netmemfs_server" in argv and str(data_dir).encode() in argv:
                    out.append(int(d.name))
    return [p for p in out if pid_alive(p)]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """A user's environment with its own home, and ~/nm; any mount there is taken away
    at teardown, and its daemon and private server killed."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["HOME"] = str(tmp_path / "home")
    mountpoint = tmp_path / "home" / "nm"
    mountpoint.mkdir(parents=True)
    yield env, mountpoint
    cache = tmp_path / "home" / ".cache" / "netmemfs" / "mounts"
    for lock in cache.glob("*/lock"):
        with contextlib.suppress(ValueError, IndexError, ProcessLookupError):
            os.kill(_daemon_pid(lock.parent), signal.SIGKILL)
        for pid in _private_servers(lock.parent / "server"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def test_the_readme_mount_comes_back_after_kill_9(home: tuple[dict[str, str], Path]) -> None:
    """README: `.venv/bin/netmemfs mount ~/nm`; the daemon is killed; the same command,
    run once the dead mount answers ENOTCONN, clears it, and the fsynced data is there."""
    env, mountpoint = home
    r = _netmemfs("mount", str(mountpoint), env=env)
    assert r.returncode == 0, r.stderr
    cache_dir = Path(re.search(r"log (\S+)/daemon\.log", r.stdout)[1])  # type: ignore[index]
    fd = os.open(mountpoint / "seg0", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, MiB)
    with mmap.mmap(fd, MiB) as m:
        m[:5] = b"hello"
        m.flush()
    os.fsync(fd)
    os.close(fd)
    (mountpoint / "unsynced").write_bytes(b"never fsynced")
    os.kill(_daemon_pid(cache_dir), signal.SIGKILL)
    # The kernel answers from cached attributes for a second; then ENOTCONN.
    wait_for(lambda: _dead(mountpoint), "the dead mount to answer ENOTCONN")
    r = _netmemfs("mount", str(mountpoint), env=env)
    assert r.returncode == 0, f"{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr
    with open(mountpoint / "seg0", "rb") as f:
        assert f.read(5) == b"hello"
    assert os.path.getsize(mountpoint / "seg0") == MiB
    assert sorted(os.listdir(mountpoint)) == ["seg0", "unsynced"]  # created at once
    assert (mountpoint / "unsynced").read_bytes() == b""  # its write was never fsynced
    with open(mountpoint / "after", "wb") as f:
        f.write(b"works")
        f.flush()
        os.fsync(f.fileno())
    assert (mountpoint / "after").read_bytes() == b"works"
    r = _netmemfs("umount", str(mountpoint), env=env)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not _private_servers(cache_dir / "server"), "the private server to exit")
    # What was committed outlives the mount: the private server keeps it in the cache dir.
    r = _netmemfs("mount", str(mountpoint), env=env)
    assert r.returncode == 0, r.stderr
    assert (mountpoint / "after").read_bytes() == b"works"
    assert _netmemfs("umount", str(mountpoint), env=env).returncode == 0


def test_mounting_twice_says_it_is_mounted(
    server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    a = mount_factory(server.address)
    for cache in (a.cache_dir, tmp_path / "other-cache"):
        r = _netmemfs(
            "mount", str(a.mountpoint), "--server", server.address, "--cache-dir", str(cache)
        )
        assert r.returncode == 2
        assert r.stderr == (
            f"netmemfs: {a.mountpoint} is already mounted by netmemfs; to mount it again, "
            f"unmount it first (netmemfs umount {a.mountpoint})\n"
        )
    mounts = Path("/proc/self/mountinfo").read_text().count(f" {a.mountpoint} ")
    assert mounts == 1


def test_a_directory_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("mine")
    r = _netmemfs("mount", str(tmp_path / "full"))
    assert r.returncode == 2
    assert "is not empty" in r.stderr and "choose an empty directory" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = _netmemfs("mount", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist; create it first" in r.stderr
    assert "an empty directory" in _netmemfs("mount", "--help").stdout


def test_a_bad_server_address_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = _netmemfs("mount", str(tmp_path / "mnt"), "--server", "127.0.0.1:abc")
    srv = subprocess.run(
        [str(BIN / "netmemfs-server"), "--listen", "127.0.0.1:abc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == srv.returncode == 2
    assert r.stderr.removeprefix("netmemfs: --server ") == srv.stderr.removeprefix(
        "netmemfs-server: --listen "
    )
    assert r.stderr.count("\n") == 1 and "port must be a number" in r.stderr


def test_an_unreachable_server_is_announced_and_each_failure_shows_its_own_log(
    tmp_path: Path,
) -> None:
    (tmp_path / "mnt").mkdir()
    cache = tmp_path / "cache"
    outs = []
    for server in ("127.0.0.1:1", "127.0.0.1:2"):
        r = _netmemfs(
            "mount", str(tmp_path / "mnt"), "--server", server, "--timeout", "2",
            "--cache-dir", str(cache),
        )  # fmt: skip
        assert r.returncode == 1
        lines = r.stderr.splitlines()
        assert lines[0] == f"netmemfs: waiting for the server {server} (for up to 2 s, --timeout)"
        assert lines[1] == f"netmemfs: mounting {tmp_path / 'mnt'} failed:"
        assert f"cannot reach netmemfs server {server}" in r.stderr
        outs.append(r.stderr)
    assert "127.0.0.1:1" not in outs[1], "the second failure shows the first one's log"
    assert sorted(p.name for p in cache.glob("daemon.log*")) == ["daemon.log", "daemon.log.1"]


def test_no_drop_line_for_a_journal_that_holds_nothing(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address)
    with open(a.path("f"), "wb") as f:
        f.write(b"x" * 10)
        f.flush()
        os.fsync(f.fileno())
    assert a.path("f").read_bytes() == b"x" * 10
    os.stat(a.path("f"))
    a.umount()
    a.start()
    assert a.path("f").read_bytes() == b"x" * 10
    a.umount()
    assert "dropping" not in a.log_text()
    assert list((a.cache_dir / "journal").iterdir()) == []


def test_versions() -> None:
    want = importlib.metadata.version("netmemfs")
    for prog in ("netmemfs", "netmemfs-server"):
        r = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == f"{prog} {want}\n"


def test_the_daemon_runs_the_installed_package_not_the_current_directory(
    server: ServerProc, tmp_path: Path
) -> None:
    """A directory that holds a `netmemfs` package (a checkout whose C modules are not
    built in place, say) must not be imported by the daemon started from it."""
    shadow = tmp_path / "checkout"
    (shadow / "netmemfs").mkdir(parents=True)
    (shadow / "netmemfs" / "__init__.py").write_text(
        "raise ImportError('the netmemfs package of the current directory was imported')\n"
    )
    (shadow / "netmemfs_server").mkdir()
    (shadow / "netmemfs_server" / "__init__.py").write_text("raise ImportError('shadowed')\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    try:
        r = _netmemfs("mount", str(mnt), "--cache-dir", str(cache), cwd=shadow)
        assert r.returncode == 0, r.stderr
        (mnt / "f").write_bytes(b"ok")
        assert (mnt / "f").read_bytes() == b"ok"
        assert _netmemfs("umount", str(mnt), "--cache-dir", str(cache)).returncode == 0
    finally:
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(_daemon_pid(cache), signal.SIGKILL)
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


@pytest.mark.skipif(
    not Path("/usr/local/lib/pkgconfig/netmem.pc").exists(),
    reason="libnetmem is not installed (scripts/setup installs it when run as root)",
)
def test_the_c_library_finds_its_agent_on_path(server: ServerProc, tmp_path: Path) -> None:
    """Built with pkg-config as C users do; it holds no path of this checkout, finds
    `netmemfs` on PATH, and says what to do when it cannot."""
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "netmem"], capture_output=True, text=True, check=True
    ).stdout.split()
    exe = tmp_path / "anon_test"
    src = ROOT / "tests" / "c" / "anon_test.c"
    subprocess.run(
        ["gcc", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src), *flags], check=True
    )
    installed = Path("/usr/local/lib/libnetmem.so.1").read_bytes()
    assert str(BIN).encode() not in installed, "the library names this checkout's agent"
    env = {k: v for k, v in os.environ.items() if k != "NETMEMFS_BIN"}
    argv = [str(exe), "write", server.address, "pc", str(MiB), str(MiB), "1"]
    env["PATH"] = f"{BIN}:/usr/bin:/bin"
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    env["PATH"] = "/usr/bin:/bin"
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert "cannot start the netmemfs agent" in r.stderr and "NETMEMFS_BIN" in r.stderr, r.stderr


def test_the_next_agent_removes_the_journal_dir_of_a_killed_one(
    server: ServerProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    w = Worker(_python("touch", server, "k", MiB, 0, 0), stdin=True)
    agent = _agent_pid(w.proc.pid)
    assert len(list(tmp.glob("netmemfs-anon-*"))) == 1
    os.kill(agent, signal.SIGKILL)
    w.proc.kill()
    w.proc.communicate(timeout=30)
    wait_for(lambda: not pid_alive(agent), "the agent to die")
    assert len(list(tmp.glob("netmemfs-anon-*"))) == 1, "SIGKILL left nothing to clean"
    r = subprocess.run(
        _python("write", server, "k2", MiB, 0, 1), capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0 and "synced" in r.stdout, r.stderr
    assert list(tmp.iterdir()) == []


def test_the_fuzz_harness_leaves_no_temporary_directory(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("NETMEMFS_FUZZ_DIR", None)
    code = (
        "import sys; sys.path.insert(0, 'fuzz'); import fuzz_journal as j; j.one_input(b'\\x01a')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_module_test_names_every_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests import kmod_vm

    def no_kernel() -> kmod_vm.Kernel:
        raise kmod_vm.Missing("no kernel")

    monkeypatch.setattr(kmod_vm, "find_kernel", no_kernel)
    monkeypatch.setattr(kmod_vm, "BUSYBOX", tmp_path / "no-busybox")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(kmod_vm.Missing) as e:
        kmod_vm.check_prerequisites()
    for package in (
        "linux-image-amd64",
        "linux-headers-amd64",
        "busybox-static",
        "qemu-system-x86",
    ):
        assert package in str(e.value)
    assert shutil.which("qemu-system-x86_64") is None


def _sleeping(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    return False


def test_umount_waits_out_a_busy_moment(server: ServerProc, mount_factory: MountFactory) -> None:
    """A file still open when `umount` starts (as one just closed is, until the daemon
    has answered its release): umount asks again until it is closed, then succeeds; a
    file that stays open makes it fail within UMOUNT_BUSY_S, saying so."""
    a = mount_factory(server.address)
    f = open(a.path("f"), "wb")  # noqa: SIM115  (closed halfway through)
    cmd = [str(BIN / "netmemfs"), "umount", str(a.mountpoint), "--cache-dir", str(a.cache_dir)]
    umount = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # umount sleeps only between two tries of a busy mount: one has been made.
        wait_for(
            lambda: _sleeping(umount.pid) or umount.poll() is not None,
            "umount to find the mount busy",
            timeout_s=20,
        )
        f.close()
        _, err = umount.communicate(timeout=30)
        assert umount.returncode == 0, err
    finally:
        f.close()
        if umount.poll() is None:
            umount.kill()
    wait_for(lambda: not pid_alive(a.pid), "the daemon to exit after umount")
    a.start()
    with open(a.path("g"), "wb"):
        r = _netmemfs("umount", str(a.mountpoint), "--cache-dir", str(a.cache_dir))
    assert r.returncode == 1 and "busy" in r.stderr, r.stderr
    a.umount()
