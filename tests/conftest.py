from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.helpers import LogChecked, MountProc, ServerProc
from tests.redis_procs import RedisCluster, RedisProc

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


STORES = ("netmemfs-server", "redis", "redis-cluster")


@pytest.fixture(params=STORES)
def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, server_factory: Callable[..., ServerProc]
) -> Iterator[str]:
    """The address of a real store of each kind in turn, for --server and the APIs: a
    netmemfs-server, a standalone Redis, a Redis Cluster of 3 masters with a replica
    each (all started here, stopped by PID afterwards)."""
    if request.param == "netmemfs-server":
        yield server_factory().address
        return
    if request.param == "redis":
        redis = RedisProc(tmp_path)
        try:
            yield redis.url
        finally:
            redis.kill()
        return
    cluster = RedisCluster(tmp_path)
    try:
        yield cluster.url
    finally:
        cluster.kill()


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
