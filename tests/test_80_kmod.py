"""The kernel module (issue 5) in a real kernel: Debian's, booted in qemu.

Our machines cannot load modules, so tests/kmod_vm.py builds kmod/netmem.ko against
Debian's headers, boots Debian's kernel with an initramfs it makes, and runs
tests/kmod_guest.py inside: a real server, `netmemfs serve-device` and
tests/c/kmod_test.c on the guest's own loopback. The guest prints one line per check;
each test here reads one. .ci/run installs the packages and sets NETMEMFS_REQUIRE_KMOD=1,
so there a missing package fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.kmod_vm import (
    Kernel,
    Missing,
    build_module,
    check_prerequisites,
    find_kernels,
    results,
    run_guest,
)

CHECKS = [
    "fault_in_server_pages_and_holes",
    "read_only_shared_mapping",
    "write_msync_visible_to_a_fresh_mapping",
    "two_processes_map_one_segment",
    "second_sync_commits_the_new_writes",
    "malformed_ioctls_get_errors",
    "an_area_of_a_file_in_a_directory",
    "an_area_follows_other_clients_commits",
    "stalled_daemon_gives_sigbus_after_the_timeout",
    "unload_refused_while_mapped",
    "killed_daemon_gives_sigbus",
    "syncs_survive_daemon_restarts",
    "eviction_under_load",
    "provide_needs_cap_sys_admin",
    "poll_of_a_file_with_no_queue_is_err_hup",
    "chunk_numbers_past_count_are_zero",
    "daemon_errnos_are_checked",
    "mmap_is_not_blocked_by_a_slow_fault",
    "a_sync_waits_past_timeout_ms_for_its_commit",
    "killed_while_waiting_for_a_sync",
    "an_abandoned_sync_is_aborted",
    "areas_are_served_only_by_their_store",
    "clean_pages_beyond_the_budget_are_dropped",
    "memory_pressure_drops_clean_pages",
    "pages_are_charged_to_the_memory_cgroup",
    "dirty_pages_dropped_at_close_are_logged",
    "mount_daemon_serves_the_device",
    "the_device_on_a_redis_store",
    "unload_after_use",
]


# Every installed Debian kernel with its headers is booted; CI installs 6.1 and 6.12
# and names them in $NETMEMFS_KMOD_KERNELS ("6.1 6.12"), so a missing one fails there.
KERNELS: list[Kernel | None] = [*find_kernels()]


def test_every_required_kernel_is_installed() -> None:
    want = os.environ.get("NETMEMFS_KMOD_KERNELS", "").split()
    have = [k.version for k in KERNELS if k is not None]
    for series in want:
        assert any(v.startswith(series + ".") for v in have), (
            f"no {series} kernel with headers among {have}: apt-get install its "
            "linux-image and linux-headers packages (.ci/run does)"
        )


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[str]]]:
    """Every kernel's guest, booted at once: each console (boot to power-off) by kernel
    version. Each qemu emulates its guest on one host thread (kmod_vm.qemu_command), so
    two guests on this 2-core machine take about the time of one instead of twice it."""
    if os.geteuid() != 0:
        pytest.skip("the guest shares this machine's root read-only: run as root")
    try:
        check_prerequisites()
    except Missing as e:
        if os.environ.get("NETMEMFS_REQUIRE_KMOD") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    kernels = [k for k in KERNELS if k is not None]
    with ThreadPoolExecutor(max_workers=max(1, len(kernels))) as pool:
        yield {
            k.version: pool.submit(run_guest, tmp_path_factory.mktemp(f"vm-{k.version}"), k)
            for k in kernels
        }


@pytest.fixture(scope="module", params=KERNELS or [None], ids=lambda k: k.version if k else "none")
def console(request: pytest.FixtureRequest, guests: dict[str, Future[str]]) -> str:
    """The guest's console, from boot to power-off, for one kernel."""
    kernel: Kernel | None = request.param
    if kernel is None:  # no kernel at all: guests has failed or skipped already
        pytest.fail("no kernel to boot")
    return guests[kernel.version].result()


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k is not None], ids=lambda k: k.version)
def test_sparse_finds_nothing(kernel: Kernel, tmp_path: Path) -> None:
    if shutil.which("sparse") is None:
        if os.environ.get("NETMEMFS_REQUIRE_KMOD") == "1":
            pytest.fail("no sparse: apt-get install sparse")
        pytest.skip("no sparse: apt-get install sparse")
    build_module(kernel, tmp_path, sparse=True)


def _tail(console: str) -> str:
    return console[-4000:]


@pytest.mark.parametrize("check", CHECKS)
def test_in_the_guest(console: str, check: str) -> None:
    got = results(console)
    assert check in got, f"the guest never reported {check}; its console ends:\n{_tail(console)}"
    passed, why = got[check]
    assert passed, why


def test_the_guest_ran_every_check_and_powered_off(console: str) -> None:
    assert set(results(console)) == set(CHECKS), _tail(console)
    assert re.search(r"KMOD-SUMMARY passed=\d+ failed=0", console), _tail(console)
    assert "KMOD-VM: guest exited 0" in console, _tail(console)
    for bad in ("BUG:", "WARNING:", "Oops", "Kernel panic"):
        assert bad not in console, _tail(console)
