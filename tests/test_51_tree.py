"""The mount as a file system (issue 13): directories, symlinks, hard links, modes,
owners and times stored on the server, as another mount sees them; permissions the
kernel enforces; and the identity of a file across renames and deletes by another mount."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netmemfs.pages import PAGE_SIZE
from tests.faultproxy import FaultProxy
from tests.helpers import MountProc, ServerProc, server_used_bytes, stamp_page, wait_for

MountFactory = Callable[..., MountProc]


def _write_and_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_a_tree_made_in_one_mount_is_seen_by_another(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    os.makedirs(a.path("d/e/f"))
    os.chmod(a.path("d/e"), 0o701)
    a.path("d/e/f/file").write_bytes(b"deep")
    os.symlink("e/f/file", a.path("d/ln"))
    os.link(a.path("d/e/f/file"), a.path("d/hard"))
    os.chown(a.path("d/hard"), 1234, 5678)
    os.utime(a.path("d/e/f/file"), ns=(1_000_000_000, 2_000_000_000))
    fd = os.open(a.path("d/e/f/file"), os.O_RDWR)
    os.fsync(fd)
    os.close(fd)

    assert sorted(os.listdir(b.path("d"))) == ["e", "hard", "ln"]
    assert b.path("d/e/f/file").read_bytes() == b"deep"
    assert os.readlink(b.path("d/ln")) == "e/f/file"
    assert b.path("d/ln").read_bytes() == b"deep"  # followed by the kernel
    st, hard = os.stat(b.path("d/e/f/file")), os.stat(b.path("d/hard"))
    assert st.st_ino == hard.st_ino and st.st_nlink == 2
    assert (hard.st_uid, hard.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    assert stat.S_IMODE(os.stat(b.path("d/e")).st_mode) == 0o701
    assert os.stat(b.path("d")).st_nlink == 3  # '.', its name, e's '..'
    assert os.stat(b.path("d/e/f")).st_ino == os.stat(a.path("d/e/f")).st_ino
    assert {".", ".."} <= set(
        subprocess.run(
            ["ls", "-a", str(b.path("d"))], capture_output=True, text=True, check=True
        ).stdout.split()
    )

    with pytest.raises(OSError) as e:
        os.rmdir(b.path("d/e"))
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(b.path("d"), b.path("d/e/into"))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.link(b.path("d/e"), b.path("dirlink"))
    assert e.value.errno == errno.EPERM
    os.rename(b.path("d/e"), b.path("moved"))
    os.unlink(b.path("d/hard"))
    assert os.stat(b.path("moved/f/file")).st_nlink == 1
    assert sorted(os.listdir(a.path("."))) == ["d", "moved"]
    assert a.path("moved/f/file").read_bytes() == b"deep"


def test_a_missing_name_is_cached_like_a_present_one(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """A name found missing stays known as missing for the entry timeout (one second),
    as a present one does (issue 15, item 5): looked for again with the server stalled,
    it is missing at once, where a lookup sent to the server would wait for --timeout
    and fail with EIO. A name made through this mount is there at once; one made by
    another mount is seen once the entry lapses."""
    proxy = FaultProxy(server.address)
    try:
        a = mount_factory(proxy.address, "--timeout", "5", name="a")
        b = mount_factory(server.address, name="b")
        a.path("d").mkdir()
        journal = a.path("d/db-journal")
        assert not journal.exists()
        proxy.stall()
        try:
            with pytest.raises(FileNotFoundError):
                os.lstat(journal)
        finally:
            proxy.resume()
        journal.write_bytes(b"made here")
        assert journal.read_bytes() == b"made here"
        os.unlink(journal)
        assert not journal.exists()
        _write_and_fsync(b.path("d/db-journal"), b"made there")
        wait_for(journal.exists, "another mount's new name to be seen here", timeout_s=10)
        assert journal.read_bytes() == b"made there"
    finally:
        proxy.close()


def test_mmap_and_fsync_in_a_subdirectory_and_st_blocks(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    os.makedirs(a.path("x/y"))
    pages = 40
    data = b"".join(stamp_page("m", n, 1) for n in range(pages))
    fd = os.open(a.path("x/y/m"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 100 * PAGE_SIZE)  # 60 pages stay holes
    with mmap.mmap(fd, pages * PAGE_SIZE) as m:
        m[:] = data
        m.flush()
    os.fsync(fd)
    os.close(fd)
    st = os.stat(b.path("x/y/m"))
    assert st.st_size == 100 * PAGE_SIZE and st.st_blocks == pages * PAGE_SIZE // 512
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert b.path("x/y/m").read_bytes()[: pages * PAGE_SIZE] == data


def test_permissions_are_enforced_for_other_users(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("switches to another user: run as root")
    a = mount_factory(server.address, "--allow-other", name="a")
    a.path("secret").write_bytes(b"s")
    os.chmod(a.path("secret"), 0o600)
    a.path("open").write_bytes(b"o")
    os.chmod(a.path("open"), 0o644)
    # The test's temp dir is root's alone: the other user gets the mount's root open.
    probe = (
        "import os, sys\n"
        "root = int(sys.argv[1])\n"
        "os.setgid(4321); os.setuid(4321)\n"
        "for name in sys.argv[2:]:\n"
        "    try:\n"
        "        fd = os.open(name, os.O_RDONLY, dir_fd=root)\n"
        "        print(name, os.read(fd, 10))\n"
        "    except OSError as e:\n"
        "        print(name, e.errno)\n"
    )
    root = os.open(a.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = subprocess.run(
            [sys.executable, "-c", probe, str(root), "secret", "open"],
            capture_output=True,
            text=True,
            check=True,
            pass_fds=(root,),
        )
    finally:
        os.close(root)
    assert r.stdout.split("\n")[:2] == [f"secret {errno.EACCES}", "open b'o'"], r.stdout


def test_unsynced_writes_follow_a_file_renamed_away_by_another_mount(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """A writes g, B renames g away and makes a new g, A fsyncs: A's pages land in the
    renamed file (its inode), never in B's new g."""
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    a.path("g").write_bytes(b"v1")
    fd = os.open(a.path("g"), os.O_RDWR)
    os.pwrite(fd, b"A's", 0)
    os.rename(b.path("g"), b.path("g.old"))
    _write_and_fsync(b.path("g"), b"B's new g")
    os.fsync(fd)
    os.close(fd)
    assert b.path("g").read_bytes() == b"B's new g"
    assert b.path("g.old").read_bytes() == b"A's"


def test_a_file_deleted_and_made_again_is_read_anew_by_another_mount(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    _write_and_fsync(a.path("f"), b"one" * 1000)
    assert b.path("f").read_bytes() == b"one" * 1000  # in B's page cache now
    old = os.stat(b.path("f")).st_ino
    os.unlink(a.path("f"))
    _write_and_fsync(a.path("f"), b"two" * 1000)
    assert b.path("f").read_bytes() == b"two" * 1000
    assert os.stat(b.path("f")).st_ino != old  # a number is never used again


def test_a_file_removed_by_another_mount_keeps_working_where_it_is_open(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """B unlinks f and renames h over g while A has both open, one of them mapped: A's
    descriptors and mapping read, write and fsync the old files; their pages are freed
    when A closes them."""
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    _write_and_fsync(a.path("f"), stamp_page("f", 0, 1))
    _write_and_fsync(a.path("g"), stamp_page("g", 0, 1))
    _write_and_fsync(a.path("h"), stamp_page("h", 0, 1))
    f = os.open(a.path("f"), os.O_RDWR)
    g = os.open(a.path("g"), os.O_RDWR)
    m = mmap.mmap(g, PAGE_SIZE)
    try:
        os.unlink(b.path("f"))
        os.rename(b.path("h"), b.path("g"))
        assert sorted(os.listdir(b.mountpoint)) == ["g"]
        os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the server again
        assert os.pread(f, PAGE_SIZE, 0) == stamp_page("f", 0, 1)
        os.pwrite(f, stamp_page("f", 1, 2), PAGE_SIZE)
        os.fsync(f)
        os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(f, PAGE_SIZE, PAGE_SIZE) == stamp_page("f", 1, 2)
        assert m[:] == stamp_page("g", 0, 1)
        m[:] = stamp_page("g", 0, 2)
        m.flush()
        os.fsync(g)
        assert b.path("g").read_bytes() == stamp_page("h", 0, 1)  # B's g is h
    finally:
        m.close()
        os.close(f)
        os.close(g)
    # f (2 pages) and the old g (1 page) are freed; h (1 page, now g) stays.
    wait_for(lambda: server_used_bytes(server) == PAGE_SIZE, "A's last closes to free them")


def test_holds_of_a_dead_client_lapse_after_the_lease(
    server_factory: Callable[..., ServerProc], mount_factory: MountFactory
) -> None:
    srv = server_factory("--hold-lease", "1")
    a = mount_factory(srv.address, name="a")
    b = mount_factory(srv.address, name="b")
    _write_and_fsync(a.path("f"), stamp_page("f", 0, 1))
    fd = os.open(a.path("f"), os.O_RDONLY)
    try:
        os.unlink(b.path("f"))
        # A renews its hold (a third of the lease) while it lives: still there after
        # three leases.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert server_used_bytes(srv) == PAGE_SIZE
            time.sleep(0.2)
        a.kill()  # SIGKILL: it lets go of nothing
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount died with its daemon
            os.close(fd)
    wait_for(lambda: server_used_bytes(srv) == 0, "the lease to lapse and f to be freed")
