from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import MountProc, ServerProc


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """Start real servers; each is killed at teardown, and its log must hold no
    warning the test did not declare with expect_log()."""
    started: list[ServerProc] = []

    def make(*args: str, data_dir: Path | None = None) -> ServerProc:
        srv = ServerProc(tmp_path, *args, data_dir=data_dir)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.kill()
    for srv in started:
        bad = srv.unexpected_log_lines()
        assert not bad, "unexpected server log lines:\n" + "\n".join(bad)


@pytest.fixture
def server(server_factory: Callable[..., ServerProc]) -> ServerProc:
    return server_factory()


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., MountProc]]:
    """Real mounts (daemons in the background); unmounted at teardown even on failure,
    and their logs must hold no warning the test did not declare."""
    made: list[MountProc] = []

    def make(server: str | None, *args: str, name: str = "mnt") -> MountProc:
        m = MountProc(tmp_path, server, *args, name=name)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
    for m in made:
        bad = m.unexpected_log_lines()
        assert not bad, f"unexpected log lines of {m.mountpoint}:\n" + "\n".join(bad)
