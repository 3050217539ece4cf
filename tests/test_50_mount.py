"""Layer 5: real mounts of a real server: files, mmap, fsync, and what another mount sees."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from netmemfs.pages import PAGE_SIZE
from tests.helpers import (
    MountProc,
    ServerProc,
    netmemfs_status,
    server_used_bytes,
    stamp_page,
    wait_for,
)

MountFactory = Callable[..., MountProc]


def _pattern(name: str, pages: int, gen: int) -> bytes:
    return b"".join(stamp_page(name, p, gen) for p in range(pages))


def test_python_mmap_fsync_then_another_mount_reads(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    pages = 300
    fd = os.open(a.path("seg0"), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, pages * PAGE_SIZE)
    with mmap.mmap(fd, pages * PAGE_SIZE) as m:
        m[:] = _pattern("seg0", pages, 1)
        m.flush()  # msync(MS_SYNC)
    os.fsync(fd)
    os.close(fd)
    assert b.path("seg0").read_bytes() == _pattern("seg0", pages, 1)
    assert sorted(os.listdir(b.mountpoint)) == ["seg0"]


def test_unsynced_writes_stay_local_and_umount_drops_them(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    with open(a.path("f"), "wb") as f:
        f.write(stamp_page("f", 0, 1))
        f.flush()
        os.fsync(f.fileno())
        f.write(stamp_page("f", 1, 1))  # never fsynced
    assert a.path("f").read_bytes() == stamp_page("f", 0, 1) + stamp_page("f", 1, 1)
    assert b.path("f").read_bytes() == stamp_page("f", 0, 1)
    a.umount()
    assert b.path("f").read_bytes() == stamp_page("f", 0, 1)
    assert list((a.cache_dir / "journal").iterdir()) == []  # nothing left on disk


C_WRITER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t pages = 64, size = pages * 4096;
	if (argc != 2) { fprintf(stderr, "usage: writer FILE\n"); return 2; }
	int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
	if (fd < 0 || ftruncate(fd, size) != 0) { perror("open/ftruncate"); return 1; }
	unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t i = 0; i < pages; i++)
		snprintf((char *)p + i * 4096, 4096, "c-page %zu", i);
	if (msync(p, size, MS_SYNC) != 0) { perror("msync"); return 1; }
	if (fsync(fd) != 0) { perror("fsync"); return 1; }
	munmap(p, size);
	close(fd);
	return 0;
}
"""


def test_c_program_writes_through_map_shared(
    server: ServerProc, mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "writer.c"
    src.write_text(C_WRITER)
    exe = tmp_path / "writer"
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src)], check=True)
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    subprocess.run([str(exe), str(a.path("cseg"))], check=True, timeout=60)
    data = b.path("cseg").read_bytes()
    assert len(data) == 64 * PAGE_SIZE
    for i in range(64):
        page = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        want = f"c-page {i}".encode()
        assert page[: len(want) + 1] == want + b"\0", f"page {i}: {page[:20]!r}"


def test_read_write_at_odd_offsets(server: ServerProc, mount_factory: MountFactory) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    ref = bytearray()
    fd = os.open(a.path("odd"), os.O_RDWR | os.O_CREAT)
    for off, n in [(0, 10), (4090, 20), (3 * PAGE_SIZE + 7, 9000), (100, 5000)]:
        chunk = bytes((off + i) % 251 for i in range(n))
        os.pwrite(fd, chunk, off)
        if len(ref) < off + n:
            ref.extend(bytes(off + n - len(ref)))
        ref[off : off + n] = chunk
    assert os.pread(fd, len(ref) + 100, 0) == bytes(ref)
    os.fsync(fd)
    os.close(fd)
    assert b.path("odd").read_bytes() == bytes(ref)
    assert os.stat(b.path("odd")).st_size == len(ref)


def test_truncate_and_grow(server: ServerProc, mount_factory: MountFactory) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    p = a.path("t")
    p.write_bytes(b"\xff" * (5 * PAGE_SIZE))
    fd = os.open(p, os.O_RDWR)
    os.fsync(fd)
    os.ftruncate(fd, PAGE_SIZE + 100)  # shrink into the middle of a page
    os.ftruncate(fd, 4 * PAGE_SIZE)  # grow again: the rest must read as zeros
    os.fsync(fd)
    os.close(fd)
    want = b"\xff" * (PAGE_SIZE + 100) + bytes(3 * PAGE_SIZE - 100)
    assert p.read_bytes() == want
    assert b.path("t").read_bytes() == want


def test_unlink_and_rename(server: ServerProc, mount_factory: MountFactory) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    for name in ("one", "two"):
        with open(a.path(name), "wb") as f:
            f.write(name.encode() * 100)
            f.flush()
            os.fsync(f.fileno())
    os.rename(a.path("one"), a.path("uno"))
    assert sorted(os.listdir(b.mountpoint)) == ["two", "uno"]
    assert b.path("uno").read_bytes() == b"one" * 100
    os.rename(b.path("uno"), b.path("two"))  # replaces two
    assert a.path("two").read_bytes() == b"one" * 100
    os.unlink(a.path("two"))
    assert os.listdir(b.mountpoint) == []
    with pytest.raises(FileNotFoundError):
        b.path("two").read_bytes()


def test_two_processes_map_the_same_file(server: ServerProc, mount_factory: MountFactory) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    path = a.path("shared")
    with open(path, "wb") as f:
        f.truncate(16 * PAGE_SIZE)
    # A child maps the file, writes odd pages and syncs; we map it too and write even ones.
    child = textwrap.dedent(
        f"""
        import mmap, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        m = mmap.mmap(fd, {16 * PAGE_SIZE})
        sys.stdout.write("mapped\\n"); sys.stdout.flush()
        sys.stdin.readline()
        for p in range(1, 16, 2):
            m[p * {PAGE_SIZE}:(p + 1) * {PAGE_SIZE}] = bytes([p]) * {PAGE_SIZE}
        m.flush(); os.fsync(fd)
        sys.stdout.write("done\\n"); sys.stdout.flush()
        sys.stdin.readline()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        _drive_child(proc, path)
    data = b.path("shared").read_bytes()
    assert [data[p * PAGE_SIZE] for p in range(16)] == list(range(16))


def _drive_child(proc: subprocess.Popen[str], path: Path) -> None:
    assert proc.stdin and proc.stdout
    assert proc.stdout.readline() == "mapped\n"
    fd = os.open(path, os.O_RDWR)
    with mmap.mmap(fd, 16 * PAGE_SIZE) as m:
        for p in range(0, 16, 2):
            m[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes([p]) * PAGE_SIZE
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"
        # Both processes share the page cache: we see the child's pages at once.
        for p in range(16):
            assert m[p * PAGE_SIZE] == p, f"page {p}"
        m.flush()
        os.fsync(fd)
    os.close(fd)
    proc.stdin.write("bye\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0


def test_what_is_not_supported_says_so(server: ServerProc, mount_factory: MountFactory) -> None:
    """pyfuse3 passes no fallocate: the kernel answers EOPNOTSUPP (docs/semantics.md)."""
    a = mount_factory(server.address)
    a.path("f").write_bytes(b"x")
    r = subprocess.run(["fallocate", "-l", "1M", str(a.path("f"))], capture_output=True, text=True)
    assert r.returncode == 1 and "Operation not supported" in r.stderr, r.stderr


def test_server_full_makes_fsync_fail_with_enospc(
    server_factory: Callable[..., ServerProc], mount_factory: MountFactory
) -> None:
    srv = server_factory("--max-memory", "64K")
    a = mount_factory(srv.address)
    a.expect_log("fsync of 'big'.*--max-memory")
    st = os.statvfs(a.mountpoint)
    assert st.f_blocks * st.f_frsize == 64 * 1024
    fd = os.open(a.path("big"), os.O_RDWR | os.O_CREAT)
    os.write(fd, bytes(32 * PAGE_SIZE))
    with pytest.raises(OSError) as e:
        os.fsync(fd)
    assert e.value.errno == errno.ENOSPC
    os.ftruncate(fd, 8 * PAGE_SIZE)  # shrink below the limit: the retry now fits
    os.fsync(fd)
    os.close(fd)
    assert os.stat(a.path("big")).st_size == 8 * PAGE_SIZE


def test_unreachable_server_gives_eio_after_timeout_and_keeps_the_pages(
    server_factory: Callable[..., ServerProc], mount_factory: MountFactory, tmp_path: Path
) -> None:
    srv = server_factory(data_dir=tmp_path / "data")
    a = mount_factory(srv.address, "--timeout", "1")
    a.expect_log("cannot reach netmemfs server|lost the connection|within --timeout")
    fd = os.open(a.path("f"), os.O_RDWR | os.O_CREAT)
    os.write(fd, stamp_page("f", 0, 1))
    srv.kill()
    with pytest.raises(OSError) as e:
        os.fsync(fd)
    assert e.value.errno == errno.EIO
    srv.restart(same_port=True)
    os.fsync(fd)  # the journal kept the pages: this try commits them
    os.close(fd)
    b = mount_factory(srv.address, name="b")
    assert b.path("f").read_bytes() == stamp_page("f", 0, 1)


def test_mount_without_server_starts_a_private_one(mount_factory: MountFactory) -> None:
    a = mount_factory(None)
    a.path("x").write_bytes(b"hello")
    assert a.path("x").read_bytes() == b"hello"
    a.umount()


def test_mount_help_teaches() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "netmemfs", "mount", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    for word in ("--server", "--cache-dir", "--timeout", "fsync", "umount"):
        assert word in r.stdout


def test_uncommitted_shrink_then_grow_reads_zeros(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address)
    p = a.path("z")
    p.write_bytes(b"\xee" * (6 * PAGE_SIZE))
    fd = os.open(p, os.O_RDWR)
    os.fsync(fd)
    assert os.pread(fd, PAGE_SIZE, 4 * PAGE_SIZE) == b"\xee" * PAGE_SIZE  # now cached
    os.ftruncate(fd, PAGE_SIZE + 5)
    os.ftruncate(fd, 6 * PAGE_SIZE)
    # Not committed yet: the server still has the old pages, which must not show.
    want = b"\xee" * (PAGE_SIZE + 5) + bytes(5 * PAGE_SIZE - 5)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 6 * PAGE_SIZE, 0) == want
    os.close(fd)


def _fetched(mount: MountProc) -> int:
    """Pages this mount's files have fetched from the server so far (netmemfs status)."""
    r = netmemfs_status(mount.mountpoint, "--json")
    assert r.returncode == 0, r.stderr
    fetched: int = json.loads(r.stdout)["files"]["store_pages"]
    return fetched


def test_a_commit_keeps_the_cached_pages_it_did_not_write(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """The daemon's cache keeps a file's pages across this mount's own commit, but for
    the pages it wrote and those past a size it cut: nobody else committed between (the
    version moved by one), so the rest are still the server's. Reading the file again
    fetches only those (every commit dropped all 64 before). Another mount's commit in
    between still drops them: its page shows."""
    a = mount_factory(server.address, name="a")
    fd = os.open(a.path("c"), os.O_RDWR | os.O_CREAT)
    old = [stamp_page("c", i, 1) for i in range(64)]
    os.pwrite(fd, b"".join(old), 0)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 64 * PAGE_SIZE, 0) == b"".join(old)  # fetched: now cached
    before = _fetched(a)
    new = [stamp_page("c", 0, 2), *old[1:60]]  # page 0 rewritten, 60..63 cut off
    os.pwrite(fd, new[0], 0)
    os.ftruncate(fd, 60 * PAGE_SIZE)
    os.fsync(fd)
    os.ftruncate(fd, 64 * PAGE_SIZE)  # the cut pages must read as zeros, not as cached
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 64 * PAGE_SIZE, 0) == b"".join(new) + bytes(4 * PAGE_SIZE)
    # Page 0 and the four cut pages (holes on the server now), not the other 59.
    assert _fetched(a) - before == 5, "pages fetched again after this mount's commits"

    b = mount_factory(server.address, name="b")
    with open(b.path("c"), "r+b") as f:
        f.seek(PAGE_SIZE)
        f.write(stamp_page("c", 1, 3))
        f.flush()
        os.fsync(f.fileno())
    os.pwrite(fd, stamp_page("c", 2, 3), 2 * PAGE_SIZE)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 3 * PAGE_SIZE, 0) == new[0] + stamp_page("c", 1, 3) + stamp_page("c", 2, 3)
    os.close(fd)


def test_listing_many_files(server: ServerProc, mount_factory: MountFactory) -> None:
    a = mount_factory(server.address, name="a")
    b = mount_factory(server.address, name="b")
    names = [f"file{i:04d}" for i in range(300)]  # more than one readdir window
    for i, name in enumerate(names):
        with open(a.path(name), "wb") as f:
            f.write(b"x" * i)
            f.flush()
            os.fsync(f.fileno())
    assert sorted(os.listdir(b.mountpoint)) == names
    with os.scandir(b.mountpoint) as entries:
        sizes = {e.name: e.stat().st_size for e in entries}
    assert sizes == {name: i for i, name in enumerate(names)}


def test_umount_takes_away_the_mount_of_a_dead_daemon(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    a = mount_factory(server.address)
    os.kill(a.pid, signal.SIGKILL)

    def dead() -> bool:
        try:
            os.stat(a.mountpoint)
        except OSError as e:
            return e.errno == errno.ENOTCONN
        return False

    wait_for(dead, "the dead mount to answer ENOTCONN")
    a.umount()
    assert os.listdir(a.mountpoint) == []
    r = subprocess.run(
        [sys.executable, "-m", "netmemfs", "umount", str(a.mountpoint)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "is not mounted" in r.stderr


def test_a_file_deleted_while_open_lives_until_closed(
    server: ServerProc, mount_factory: MountFactory
) -> None:
    """POSIX: a file removed while open keeps working through its descriptor, and is
    freed on the server at the last close."""
    a = mount_factory(server.address)
    fd = os.open(a.path("gone"), os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * PAGE_SIZE)
    os.fsync(fd)
    os.unlink(a.path("gone"))
    assert os.listdir(a.mountpoint) == []
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 10, 0) == b"x" * 10
    assert os.fstat(fd).st_nlink == 0
    os.pwrite(fd, b"y" * PAGE_SIZE, PAGE_SIZE)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 2 * PAGE_SIZE, 0) == b"x" * PAGE_SIZE + b"y" * PAGE_SIZE
    assert server_used_bytes(server) == 2 * PAGE_SIZE
    os.close(fd)
    wait_for(lambda: server_used_bytes(server) == 0, "the last close to free the file")
    a.path("gone").write_bytes(b"new")  # the name can be used again
    assert a.path("gone").read_bytes() == b"new"
