"""fsx on tmpfs (the control) and on a real mount, 100,000 operations each with mmap reads
and writes, in one run (issue 13).

The issue asks for the file in a subdirectory of the mount; until the mount has
directories it is a file at the mount's root.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import fsx
from tests.helpers import MountProc, ServerProc

OPS = 100_000
TIMEOUT_S = 900  # about 100 s on the mount here, 4 s on tmpfs


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return fsx.build(tmp_path_factory.mktemp("fsx"))
    except fsx.Missing as e:
        if os.environ.get("NETMEMFS_REQUIRE_SUITES") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("NETMEMFS_FSX_SEED") or random.randrange(1 << 31))
    print(f"fsx seed {s} (NETMEMFS_FSX_SEED)")
    return s


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs for the control needs root")
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fsx", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_fsx_on_tmpfs(binary: Path, tmpfs: Path, seed: int) -> None:
    ok, out = fsx.run(binary, tmpfs / "f", OPS, seed, TIMEOUT_S)
    assert ok, f"the control fails (seed {seed}):\n{out[-3000:]}"


def test_fsx_on_the_mount(
    binary: Path, server: ServerProc, mount_factory: Callable[..., MountProc], seed: int
) -> None:
    mnt = mount_factory(server.address)
    ok, out = fsx.run(binary, mnt.mountpoint / "f", OPS, seed, TIMEOUT_S)
    assert ok, f"fsx found a difference from its model (seed {seed}):\n{out[-3000:]}"
