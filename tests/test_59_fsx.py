"""fsx on tmpfs (the control) and on a real mount, 100,000 operations each with mmap reads
and writes, in one run (issue 13).

On the mount the file is in a subdirectory, as the issue asks.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import fsx
from tests.helpers import MountProc, ServerProc, build_suite

OPS = 100_000
TIMEOUT_S = 900  # about 100 s on the mount here, 4 s on tmpfs


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_suite(fsx.build, tmp_path_factory.mktemp("fsx"))


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("NETMEMFS_FSX_SEED") or random.randrange(1 << 31))
    print(f"fsx seed {s} (NETMEMFS_FSX_SEED)")
    return s


def test_fsx_on_tmpfs(binary: Path, tmpfs: Path, seed: int) -> None:
    ok, out = fsx.run(binary, tmpfs / "f", OPS, seed, TIMEOUT_S)
    assert ok, f"the control fails (seed {seed}):\n{out[-3000:]}"


def test_fsx_on_the_mount(
    binary: Path, server: ServerProc, mount_factory: Callable[..., MountProc], seed: int
) -> None:
    mnt = mount_factory(server.address)
    (mnt.mountpoint / "sub" / "dir").mkdir(parents=True)
    ok, out = fsx.run(binary, mnt.mountpoint / "sub" / "dir" / "f", OPS, seed, TIMEOUT_S)
    assert ok, f"fsx found a difference from its model (seed {seed}):\n{out[-3000:]}"
