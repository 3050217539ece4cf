"""pjdfstest on tmpfs (the control) and on a real mount, in one run (issue 13).

The issue's goal is 97% of the 238 test files on the mount. This test measures every
run, prints the counts and the failing files, and holds the mount to what it passed when
FLOOR was last raised, so that a change cannot lose ground unseen.
.ci/run installs the build tools and sets NETMEMFS_REQUIRE_SUITES=1, so a missing one
fails there instead of skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import pjdfstest
from tests.helpers import MountProc, ServerProc, build_suite

# Test files the mount passes (2026-12-02, segments by name: 94 of 238; 2026-12-06, on
# inodes: all 238).
FLOOR = 238


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("pjdfstest checks owners and modes: run as root")
    return build_suite(pjdfstest.build, tmp_path_factory.mktemp("pjdfstest"))


def test_tmpfs_passes_every_file(suite: Path, tmpfs: Path) -> None:
    got = pjdfstest.run(suite, tmpfs)
    failed = sorted(name for name, ok in got.items() if not ok)
    print(f"pjdfstest on tmpfs: {len(got) - len(failed)} of {len(got)} files pass")
    assert len(got) == 238 and not failed, f"the control fails: {failed}"


def test_the_mount_keeps_what_it_passes(
    suite: Path, server: ServerProc, mount_factory: Callable[..., MountProc]
) -> None:
    # As the issue asks: in a directory of the mount, which other users may enter
    # (pjdfstest switches to other uids; the kernel checks their access).
    mnt = mount_factory(server.address, "--allow-other")
    where = mnt.mountpoint / "pjd"
    where.mkdir()
    got = pjdfstest.run(suite, where)
    passed = sum(got.values())
    failing = sorted(n for n, ok in got.items() if not ok)
    print(f"pjdfstest on the mount: {passed} of {len(got)} files pass; failing: {failing}")
    assert passed >= FLOOR, (
        f"the mount passes {passed} of {len(got)} pjdfstest files, fewer than the {FLOOR} "
        f"it passed before; failing: {failing}"
    )
