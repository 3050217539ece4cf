"""Layer 5: the mount when its cache dir's disk fills up or turns read-only.

A small tmpfs (or a read-only bind mount) the test makes itself stands for the disk.
Each test keeps a model of what every write that returned success put where, and
compares the server's bytes with it, byte for byte, once the disk has room again: no
write the kernel or a program handed over may be lost, and no fsync may return 0
before its pages are on the server.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netmemfs.pages import PAGE_SIZE
from netmemfs.remote import RemoteStore
from tests.helpers import MountProc, ServerProc, describe_page, run_trio, stamp_page, wait_for

MountFactory = Callable[..., MountProc]
Model = dict[int, int]  # page -> generation of the last write that returned success

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: run as root")


@pytest.fixture
def mounts_made() -> Iterator[list[Path]]:
    """Mounts a test makes (tmpfs, bind); taken away at teardown, after the netmemfs
    mounts (this fixture is set up before mount_factory, so torn down after it)."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"


def _small_disk(mounts_made: list[Path], journal: Path, size: str) -> None:
    journal.mkdir(parents=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(journal))
    mounts_made.append(journal)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about leave_bytes free on disk."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\xbb" * max(0, free - leave_bytes))
    return ballast


def _expected(name: str, model: Model, pages: int) -> bytes:
    return b"".join(
        stamp_page(name, p, model[p]) if p in model else bytes(PAGE_SIZE) for p in range(pages)
    )


def _server_bytes(server: ServerProc, name: str) -> bytes:
    async def read() -> bytes:
        async with RemoteStore.connect(server.address) as store:
            st = await store.stat(name)
            return await store.read_bytes(name, 0, -(-st.size // PAGE_SIZE))

    return run_trio(read)


def _same(want: bytes, got: bytes) -> None:
    assert len(got) == len(want), f"{len(got)} bytes on the server, want {len(want)}"
    for p in range(len(want) // PAGE_SIZE):
        a, b = want[p * PAGE_SIZE : (p + 1) * PAGE_SIZE], got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        assert a == b, f"page {p}: want {describe_page(a)}, the server has {describe_page(b)}"


def _errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def _expect_disk_trouble(mnt: MountProc) -> None:
    mnt.expect_log(r"cache dir .* is (full|read-only)")
    mnt.expect_log(r"Keeping written pages in memory")


def test_writes_into_a_full_cache_disk(
    mounts_made: list[Path], server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "mnt-cache" / "journal"
    _small_disk(mounts_made, journal, "4M")
    mnt = mount_factory(server.address, "--max-unjournaled", "256K")
    _expect_disk_trouble(mnt)
    ballast = _fill(journal, 300 << 10)
    model: Model = {}
    fd = os.open(mnt.path("f"), os.O_RDWR | os.O_CREAT)
    refused = []
    for p in range(200):
        page = stamp_page("f", p, 1)
        err = _errno_of(lambda: os.pwrite(fd, page, p * PAGE_SIZE))  # noqa: B023 (called now)
        if err:
            refused.append((p, err))
        else:
            model[p] = 1
    assert refused, "the disk never filled: the test is wrong"
    assert {e for _, e in refused} == {errno.ENOSPC}, refused
    first_refused = refused[0][0]
    assert [p for p, _ in refused] == list(range(first_refused, 200))
    # A page already held in memory can be written again (it needs no more memory).
    held = first_refused - 1
    os.pwrite(fd, stamp_page("f", held, 2), held * PAGE_SIZE)
    model[held] = 2
    # The journal cannot take the held pages: fsync fails, and keeps failing.
    assert _errno_of(lambda: os.fsync(fd)) == errno.ENOSPC
    assert _errno_of(lambda: os.fsync(fd)) == errno.ENOSPC
    assert re.search(rf"cache dir {re.escape(str(journal))} is full", mnt.log_text())
    # Reads see every write that returned success, and nothing else.
    size = os.fstat(fd).st_size
    assert size == first_refused * PAGE_SIZE
    assert os.pread(fd, size, 0) == _expected("f", model, first_refused)
    ballast.unlink()
    for p in range(first_refused, first_refused + 20):
        os.pwrite(fd, stamp_page("f", p, 3), p * PAGE_SIZE)
        model[p] = 3
    os.fsync(fd)
    os.close(fd)
    _same(_expected("f", model, first_refused + 20), _server_bytes(server, "f"))


def test_map_shared_writeback_into_a_full_cache_disk(
    mounts_made: list[Path], server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "mnt-cache" / "journal"
    _small_disk(mounts_made, journal, "4M")
    mnt = mount_factory(server.address)
    _expect_disk_trouble(mnt)
    pages = 256
    fd = os.open(mnt.path("m"), os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, pages * PAGE_SIZE)
    os.fsync(fd)
    ballast = _fill(journal, 300 << 10)
    model: Model = {}
    with mmap.mmap(fd, pages * PAGE_SIZE) as m:
        for p in range(pages):
            m[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = stamp_page("m", p, 1)
            model[p] = 1
        # Writeback hands every page to the daemon, which keeps what the disk cannot
        # take; the sync cannot commit them, and says so.
        assert _errno_of(m.flush) == errno.ENOSPC
        assert _errno_of(lambda: os.fsync(fd)) == errno.ENOSPC
        ballast.unlink()
        m.flush()
    os.fsync(fd)
    os.close(fd)
    _same(_expected("m", model, pages), _server_bytes(server, "m"))


def test_a_cache_dir_turned_read_only(
    mounts_made: list[Path], server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    mnt = mount_factory(server.address)
    _expect_disk_trouble(mnt)
    journal = mnt.cache_dir / "journal"
    models: dict[str, Model] = {"f": {}, "g": {}}
    fd = os.open(mnt.path("f"), os.O_RDWR | os.O_CREAT)
    for p in range(8):
        os.pwrite(fd, stamp_page("f", p, 1), p * PAGE_SIZE)
        models["f"][p] = 1
    os.fsync(fd)
    os.pwrite(fd, stamp_page("f", 2, 2), 2 * PAGE_SIZE)
    models["f"][2] = 2
    # A read-only view of the same directory over it: files already open stay
    # writable, nothing can be created or renamed there.
    _run("mount", "--bind", str(journal), str(journal))
    mounts_made.append(journal)
    _run("mount", "-o", "remount,bind,ro", str(journal))
    os.pwrite(fd, stamp_page("f", 9, 3), 9 * PAGE_SIZE)
    models["f"][9] = 3
    assert _errno_of(lambda: os.fsync(fd)) == errno.EROFS
    gd = os.open(mnt.path("g"), os.O_RDWR | os.O_CREAT)  # its journal cannot be created
    for p in range(4):
        os.pwrite(gd, stamp_page("g", p, 1), p * PAGE_SIZE)
        models["g"][p] = 1
    assert _errno_of(lambda: os.fsync(gd)) == errno.EROFS
    assert _errno_of(lambda: os.fsync(fd)) == errno.EROFS
    assert re.search(rf"cache dir {re.escape(str(journal))} is read-only", mnt.log_text())
    _run("umount", str(journal))
    mounts_made.remove(journal)
    os.fsync(fd)
    os.fsync(gd)
    os.close(fd)
    os.close(gd)
    _same(_expected("f", models["f"], 10), _server_bytes(server, "f"))
    _same(_expected("g", models["g"], 4), _server_bytes(server, "g"))


def test_a_failed_append_leaves_the_journal_as_it_was(
    mounts_made: list[Path], tmp_path: Path
) -> None:
    """The journal alone: appends cut short by a full disk are undone, the next record
    lands right after the last good one, and the sealed file replays to the model."""
    from netmemfs import journal as j

    disk = tmp_path / "disk"
    _small_disk(mounts_made, disk, "1M")
    ballast = _fill(disk, 40 << 10)
    jr = j.SegmentJournal(disk, 0)
    model: Model = {}
    jr.set_size(64 * PAGE_SIZE)
    full = 0
    for p in range(64):
        try:
            jr.write_page(p, stamp_page("j", p, 1))
            model[p] = 1
        except j.JournalError as e:
            assert e.errno == errno.ENOSPC, e
            full += 1
            f = jr.active
            assert f.fd is not None and os.fstat(f.fd).st_size == f.end
    assert full, "the disk never filled: the test is wrong"
    ballast.unlink()
    for p in range(60, 64):
        jr.write_page(p, stamp_page("j", p, 2))
        model[p] = 2
    jr.seal_start()
    jr.seal_finish(b"t" * 16, "j")
    ((commit, _path),) = j.recover(disk)
    got = bytearray(64 * PAGE_SIZE)
    for run in commit.runs:
        got[run.first * PAGE_SIZE : run.first * PAGE_SIZE + len(run.data)] = run.data
    _same(_expected("j", model, 64), bytes(got))
    jr.discard()


def test_writeback_past_the_memory_bound_is_reported_and_not_shown(
    mounts_made: list[Path], server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    """Past --max-unjournaled the daemon refuses the kernel's writeback: every
    descriptor open then gets ENOSPC at its next fsync (the kernel's rule), and the
    mount stops showing the refused pages, which are stored nowhere."""
    journal = tmp_path / "mnt-cache" / "journal"
    _small_disk(mounts_made, journal, "4M")
    mnt = mount_factory(server.address, "--max-unjournaled", "64K")
    _expect_disk_trouble(mnt)
    mnt.expect_log(r"is used up, so this write of \d+ pages is refused")
    pages = 256
    fd = os.open(mnt.path("m"), os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, pages * PAGE_SIZE)
    os.fsync(fd)
    other = os.open(mnt.path("m"), os.O_RDONLY)
    ballast = _fill(journal, 300 << 10)
    with mmap.mmap(fd, pages * PAGE_SIZE) as m:
        for p in range(pages):
            m[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = stamp_page("m", p, 1)
        assert _errno_of(m.flush) == errno.ENOSPC
    assert _errno_of(lambda: os.fsync(other)) == errno.ENOSPC
    ballast.unlink()
    os.fsync(fd)  # commits what the journal and memory took
    stored = _server_bytes(server, "m")
    assert stored != _expected("m", dict.fromkeys(range(pages), 1), pages), "nothing refused"
    wait_for(
        lambda: os.pread(other, pages * PAGE_SIZE, 0) == stored,
        "the mount to show what the server holds, not the refused pages",
    )
    os.close(other)
    os.close(fd)


def test_a_cache_dir_removed_while_mounted(server: ServerProc, mount_factory: MountFactory) -> None:
    mnt = mount_factory(server.address)
    mnt.expect_log(r"cache dir .* is gone")
    mnt.expect_log(r"Keeping written pages in memory")
    journal = mnt.cache_dir / "journal"
    model: Model = {}
    fd = os.open(mnt.path("f"), os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, stamp_page("f", 0, 1), 0)
    model[0] = 1
    shutil.rmtree(journal)
    os.pwrite(fd, stamp_page("f", 1, 1), PAGE_SIZE)
    model[1] = 1
    assert _errno_of(lambda: os.fsync(fd)) == errno.EIO
    assert re.search(rf"cache dir {re.escape(str(journal))} is gone", mnt.log_text())
    journal.mkdir()
    os.fsync(fd)
    os.close(fd)
    _same(_expected("f", model, 2), _server_bytes(server, "f"))
