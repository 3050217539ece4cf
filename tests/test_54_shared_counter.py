"""Locks across mounts (issue 14, item 3): the shared counter, a holder killed while
holding, and a commit made under a lost lock. The counting and the killed holder run on
each store (a netmemfs-server, a Redis, a Redis Cluster)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import netmemfs
from netmemfs.errors import Conflict, Fenced, WouldBlock
from netmemfs.locking import acquire, release
from tests.faultproxy import FaultProxy
from tests.helpers import MountProc, ServerProc, build_c_test, wait_for

MountFactory = Callable[..., MountProc]
ServerFactory = Callable[..., ServerProc]
PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent


def _counter(path: Path) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<q", f.read(8))[0])


def _run_workers(paths: Sequence[Path | str], n: int, mode: str) -> None:
    """Workers on paths (a mount's file; or SERVER:SEGMENT, an anonymous region, which
    counts under its own lock whatever mode says)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.counter_worker",
                str(p),
                str(n),
                mode if isinstance(p, Path) else "region",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in paths
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.strip() == "done", f"worker failed: {err[-2000:]}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _three(address: str, mount_factory: MountFactory) -> list[Path]:
    mounts = [mount_factory(address, name=n) for n in ("a", "b", "c")]
    path = mounts[0].path("counter")
    path.write_bytes(bytes(PAGE))
    _fsync(path)
    return [m.path("counter") for m in mounts]


def test_three_mounts_count_exactly_under_the_lock(
    any_store: str, mount_factory: MountFactory
) -> None:
    """Three processes on three mounts add 1 a thousand times each, each addition under
    an exclusive lock and committed at its release: the counter ends at exactly 3000."""
    paths = _three(any_store, mount_factory)
    started = time.monotonic()
    _run_workers(paths, 1000, "lock")
    took = time.monotonic() - started
    for p in paths:
        assert _counter(p) == 3000, f"{p}: {_counter(p)}"
    print(f"3000 locked increments on three mounts in {took:.1f} s")


def test_three_mounts_and_a_region_count_exactly_under_the_lock(
    any_store: str, mount_factory: MountFactory
) -> None:
    """As above, with a fourth process adding through an anonymous region of the same
    file (its lock taken through the region, netmem_lock): exactly 4000."""
    paths = _three(any_store, mount_factory)
    region = f"{any_store}:counter"
    started = time.monotonic()
    _run_workers([*paths, region], 1000, "lock")
    took = time.monotonic() - started
    for p in paths:
        assert _counter(p) == 4000, f"{p}: {_counter(p)}"
    print(f"4000 locked increments on three mounts and a region in {took:.1f} s")


def test_without_the_lock_the_same_counting_loses_increments(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """The same three processes without the lock (each still commits every addition):
    additions are lost, which is what the lock is for."""
    paths = _three(server.address, mount_factory)
    _run_workers(paths, 1000, "nolock")
    wait_for(lambda: len({_counter(p) for p in paths}) == 1, "the mounts to agree")
    final = _counter(paths[0])
    assert final < 3000, f"no increment lost without the lock ({final}): the test proves nothing"
    print(f"without the lock the counter ended at {final} of 3000")


def test_a_holder_killed_while_holding_hands_the_lock_on(
    any_store: str, mount_factory: MountFactory
) -> None:
    """A process on mount A holds the lock and is SIGKILLed; a process on mount B that
    waits for it gets it within the lease (at once: the daemon sees the holder die)."""
    paths = _three(any_store, mount_factory)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, netmemfs.locking as l; l.acquire(sys.argv[1]); print('held', "
            "flush=True); sys.stdin.read()",
            str(paths[0]),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(WouldBlock):
            acquire(paths[1], wait_s=0)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        held = acquire(paths[1], wait_s=10)
        waited = time.monotonic() - started
        release(held)
    finally:
        holder.kill()
        holder.communicate()
    assert waited < 10, f"the next waiter waited {waited:.1f} s"


def test_a_commit_under_a_lost_lock_is_refused(
    server_factory: ServerFactory, mount_factory: MountFactory
) -> None:
    """Mount A reaches the server through a proxy. A's process takes the lock and writes;
    then the proxy stops every byte (A is cut off, not dead). After the lease (1 s) a
    process on B takes the lock, writes and commits. When A's link comes back, A's
    commit made under its old lock is refused (fsync fails, Fenced) and B's value
    stays; A's mount then shows B's value."""
    server = server_factory("--lock-lease", "1")
    proxy = FaultProxy(server.address)
    try:
        a = mount_factory(proxy.address, name="a")
        b = mount_factory(server.address, name="b")
        a.expect_log("commit to .counter. dropped: .*made under lock")
        a.expect_log("could not renew")
        pa, pb = a.path("counter"), b.path("counter")
        pa.write_bytes(bytes(PAGE))
        _fsync(pa)
        with pytest.raises(Fenced), netmemfs.lock(pa, 0, PAGE):
            with open(pa, "r+b") as f:
                f.write(struct.pack("<q", 111))
            proxy.stall()
            with netmemfs.lock(pb, 0, PAGE, wait_s=20), open(pb, "r+b") as f:
                f.write(struct.pack("<q", 222))
            proxy.resume()
        assert _counter(pb) == 222
        wait_for(lambda: _counter(pa) == 222, "A to show B's value")
    finally:
        proxy.close()


def test_the_lock_command_counts_exactly(server: ServerProc, mount_factory: MountFactory) -> None:
    """`netmemfs lock FILE -- CMD` on three mounts at once, 20 times each, CMD adding 1
    to a number kept as text in FILE (cat, then echo >): the number ends at 60."""
    mounts = [mount_factory(server.address, name=n) for n in ("a", "b", "c")]
    mounts[0].path("n").write_text("0\n")
    _fsync(mounts[0].path("n"))  # else the other mounts start from an empty file
    netmemfs_cmd = str(Path(sys.executable).parent / "netmemfs")
    loops = [
        subprocess.Popen(
            [
                "sh",
                "-c",
                'for i in $(seq 20); do "$0" lock "$1" -- sh -c \'n=$(cat "$0"); '
                'echo $((n+1)) > "$0"\' "$1" || exit 1; done',
                netmemfs_cmd,
                str(m.path("n")),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in mounts
    ]
    for loop in loops:
        _, err = loop.communicate(timeout=600)
        assert loop.returncode == 0, err
    for m in mounts:
        assert m.path("n").read_text() == "60\n"


def test_the_lock_command_passes_on_the_status_and_says_why_it_failed(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    a.path("f").write_bytes(b"x")
    netmemfs_cmd = str(Path(sys.executable).parent / "netmemfs")
    status = subprocess.run([netmemfs_cmd, "lock", str(a.path("f")), "--", "sh", "-c", "exit 7"])
    assert status.returncode == 7
    held = acquire(a.path("f"))
    try:
        r = subprocess.run(
            [netmemfs_cmd, "lock", "--wait", "0", str(b.path("f")), "--", "true"],
            capture_output=True,
            text=True,
        )
    finally:
        release(held)
    assert r.returncode == 1
    assert "was not granted in time: another client holds it" in r.stderr, r.stderr
    r = subprocess.run([netmemfs_cmd, "lock", str(a.path("f"))], capture_output=True, text=True)
    assert r.returncode == 2 and "give a command after --" in r.stderr


def test_the_c_api_counts_exactly_beside_python(
    server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    """netmem_lock_file/netmem_unlock_file (libnetmem, built as a user builds: -lnetmem):
    a C process on mount A and a Python one on mount B add 300 each: 600."""
    binary = build_c_test("counter_test", tmp_path)
    paths = _three(server.address, mount_factory)
    c = subprocess.Popen(
        [str(binary), str(paths[0]), "300", "lock"], stdout=subprocess.PIPE, text=True
    )
    _run_workers([paths[1]], 300, "lock")
    out, _ = c.communicate(timeout=600)
    assert c.returncode == 0 and out.strip() == "done 0"
    assert _counter(paths[2]) == 600
    elsewhere = tmp_path / "not-netmemfs"
    elsewhere.write_bytes(bytes(8))
    r = subprocess.run([str(binary), str(elsewhere), "1", "lock"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "is not a file of a netmemfs mount" in r.stderr, r.stderr


def test_an_optimistic_commit_loses_to_a_commit_that_came_first(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """A reads f at version v and changes it; B commits meanwhile; A's commit_if(v) is
    refused with the current version, its change is dropped (not sent by a later
    fsync either), and A reads B's contents; retried from there, it lands."""
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    pa, pb = a.path("f"), b.path("f")
    pa.write_bytes(b"0" * PAGE)
    _fsync(pa)
    v = netmemfs.version(pa)
    assert netmemfs.commit_if(pa, v) == v  # nothing changed: nothing to refuse
    with open(pa, "r+b") as f:
        f.write(b"A")
    with open(pb, "r+b") as f:
        f.write(b"B")
    _fsync(pb)
    with pytest.raises(Conflict) as refused:
        netmemfs.commit_if(pa, v)
    assert refused.value.current == netmemfs.version(pb) != v
    assert pa.read_bytes()[:1] == b"B"
    _fsync(pa)  # the refused change is gone, not committed by a plain fsync
    assert pb.read_bytes()[:2] == b"B0"
    now = netmemfs.version(pa)
    with open(pa, "r+b") as f:
        f.write(b"BA")
    after = netmemfs.commit_if(pa, now)
    assert after > now
    wait_for(lambda: pb.read_bytes()[:2] == b"BA", "B to read A's retried commit")


def test_optimistic_counting_from_c_is_exact(
    any_store: str, mount_factory: MountFactory, tmp_path: Path
) -> None:
    """netmem_file_version/netmem_commit_if: two C processes on two mounts add 1 to a
    counter 200 times each with no lock, retrying on conflict: 400 exactly."""
    binary = build_c_test("counter_test", tmp_path)
    paths = _three(any_store, mount_factory)
    procs = [
        subprocess.Popen(
            [str(binary), str(p), "200", "optimistic"], stdout=subprocess.PIPE, text=True
        )
        for p in paths[:2]
    ]
    retries = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        retries += int(out.split()[-1])
    assert _counter(paths[2]) == 400
    print(f"400 optimistic increments, {retries} conflicts retried")
