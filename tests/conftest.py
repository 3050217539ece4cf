from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.helpers import LogChecked, MountProc, ServerProc

# C programs linked with libnetmem find their agent as `netmemfs` on PATH, as a user's
# with the venv activated would: the venv of this interpreter.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _assert_quiet_logs(procs: Sequence[LogChecked]) -> None:
    """Every process's log holds no warning its test did not declare (expect_log)."""
    for proc in procs:
        bad = proc.unexpected_log_lines()
        assert not bad, f"unexpected lines in {proc.log_path}:\n" + "\n".join(bad)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """Start real servers; each is killed at teardown, even when the test failed."""
    started: list[ServerProc] = []

    def make(*args: str, data_dir: Path | None = None) -> ServerProc:
        srv = ServerProc(tmp_path, *args, data_dir=data_dir)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.kill()
    _assert_quiet_logs(started)


@pytest.fixture
def server(server_factory: Callable[..., ServerProc]) -> ServerProc:
    return server_factory()


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., MountProc]]:
    """Real mounts (daemons in the background); unmounted at teardown even on failure."""
    made: list[MountProc] = []

    def make(server: str | None, *args: str, name: str = "mnt") -> MountProc:
        m = MountProc(tmp_path, server, *args, name=name)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
    _assert_quiet_logs(made)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own, the control beside the mount for the external suites."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the control needs root")
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "netmemfs-control", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
