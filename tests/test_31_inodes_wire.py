"""The inode requests over the wire (issue 13): a real netmemfs-server, through remote.py,
and as a hostile client sending raw frames."""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from netmemfs.errors import NetmemError, Stale
from netmemfs.ops import (
    RENAME_EXCHANGE,
    Link,
    MakeNode,
    Move,
    Reap,
    Rmdir,
    SetAttr,
    Truncate,
    Unlink,
    WritePages,
)
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import MAX_MESSAGE_PAGES, Change, Error, Lookup, encode
from netmemfs.remote import RemoteStore
from netmemfs_server.store import ROOT_INO
from tests.helpers import RawClient, ServerProc, run_trio, stamp_page

FILE = stat.S_IFREG | 0o640
DIR = stat.S_IFDIR | 0o750


def test_a_tree_is_made_read_and_changed_through_the_wire(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            r = await store.change([MakeNode(ROOT_INO, "d", DIR, uid=5, gid=6)])
            (d,) = r.created
            r = await store.change(
                [
                    MakeNode(d, "f", FILE),
                    MakeNode(d, "l", stat.S_IFLNK | 0o777, target=b"f"),
                    MakeNode(d, "sub", DIR),
                ]
            )
            f, ln, sub = r.created
            await store.change(
                [Truncate(f, 2 * PAGE_SIZE), WritePages(f, 1, stamp_page("f", 1, 1))]
            )
            st = await store.lookup(d, "f")
            assert (st.ino, st.size, st.nlink, st.stored_pages) == (f, 2 * PAGE_SIZE, 1, 1)
            assert stat.S_IMODE(st.mode) == 0o640 and st.mtime_ns > 0 and st.ctime_ns > 0
            assert (await store.getattr(d)).uid == 5 and (await store.getattr(d)).nlink == 3
            assert (await store.lookup(d, "l")).target == b"f"
            assert (await store.lookup(sub, "..")).ino == d
            names = await store.readdir(d)
            assert names == [("f", f, FILE), ("l", ln, stat.S_IFLNK | 0o777), ("sub", sub, DIR)]
            got = await store.read_inode(f, 0, 2)
            assert got.to_bytes() == bytes(PAGE_SIZE) + stamp_page("f", 1, 1)
            await store.change([Link(f, ROOT_INO, "hard"), Move(d, "f", sub, "g")])
            assert (await store.getattr(f)).nlink == 2
            await store.change([Move(d, "l", sub, "g", RENAME_EXCHANGE)])
            assert (await store.lookup(sub, "g")).ino == ln
            await store.change([SetAttr(f, mode=0o600, uid=9)])
            st = await store.lookup(d, "l")
            assert (st.ino, stat.S_IMODE(st.mode), st.uid) == (f, 0o600, 9)

    run_trio(main, timeout_s=30)


def test_errors_arrive_typed_with_their_errno(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            (d,) = (await store.change([MakeNode(ROOT_INO, "d", DIR)])).created
            (f,) = (await store.change([MakeNode(d, "f", FILE)])).created
            cases: list[tuple[object, int]] = [
                ([Rmdir(ROOT_INO, "d")], errno.ENOTEMPTY),
                ([Unlink(ROOT_INO, "d")], errno.EISDIR),
                ([Link(d, ROOT_INO, "x")], errno.EPERM),
                ([Move(ROOT_INO, "d", d, "x")], errno.EINVAL),
                ([MakeNode(ROOT_INO, "a/b", FILE)], errno.EINVAL),
                ([MakeNode(ROOT_INO, "x" * 256, FILE)], errno.ENAMETOOLONG),
                ([MakeNode(d, "f", FILE)], errno.EEXIST),
                ([MakeNode(f, "x", FILE)], errno.ENOTDIR),
            ]
            for ops, code in cases:
                with pytest.raises(NetmemError) as e:
                    await store.change(ops)  # type: ignore[arg-type]
                assert e.value.errno == code, (ops, e.value)
            await store.change([Unlink(d, "f")])
            with pytest.raises(Stale, match=f"inode {f}"):
                await store.change([WritePages(f, 0, stamp_page("f", 0, 1))])
            with pytest.raises(Stale):
                await store.getattr(f)

    run_trio(main, timeout_s=30)


def test_a_change_sent_twice_happens_once(server: ServerProc) -> None:
    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            first = await store.change([MakeNode(ROOT_INO, "once", FILE)], txn=b"t-once")
            again = await store.change([MakeNode(ROOT_INO, "once", FILE)], txn=b"t-once")
            assert again.replayed and again.created == first.created
            assert [n for n, _, _ in await store.readdir(ROOT_INO)] == ["once"]

    run_trio(main, timeout_s=30)


def test_the_tree_survives_a_restart(
    tmp_path: Path, server_factory: Callable[..., ServerProc]
) -> None:
    data = tmp_path / "data"
    server = server_factory(data_dir=data)

    async def make() -> tuple[int, ...]:
        async with RemoteStore.connect(server.address) as store:
            (d,) = (await store.change([MakeNode(ROOT_INO, "d\udcff", DIR)])).created
            r = await store.change([MakeNode(d, "f", FILE), MakeNode(d, "gone", FILE)])
            await store.change([Unlink(d, "gone")])
            return (d, *r.created)

    d, f, gone = run_trio(make, timeout_s=30)
    server.kill()
    server = server_factory(data_dir=data)

    async def check() -> None:
        async with RemoteStore.connect(server.address) as store:
            assert await store.readdir(ROOT_INO) == [("d\udcff", d, DIR)]
            assert [(n, i) for n, i, _ in await store.readdir(d)] == [("f", f)]
            (new,) = (await store.change([MakeNode(d, "new", FILE)])).created
            assert new > gone, "a number was handed out again after a restart"

    run_trio(check, timeout_s=30)


def test_a_hostile_client_meets_the_same_refusals(server: ServerProc) -> None:
    """Raw frames, not remote.py: a Change holding a segment op is not a Change; a name
    with '/' and an unknown name get the refusals the store gives (it checks names, not
    the mount)."""
    raw = RawClient(server.address)
    raw.hello()
    frame = bytearray(encode(Change(2, b"hostile", (MakeNode(ROOT_INO, "x", FILE),))))
    at = frame.index(b"\xa2mk")  # the op's tag, "mk", becomes "c " (a segment op's)
    frame[at : at + 3] = b"\xa2c "
    raw.send_raw(bytes(frame))
    got = raw.receive()
    assert isinstance(got, Error) and got.code == "protocol", got
    raw.close()
    server.expect_log("malformed message")
    raw = RawClient(server.address)
    raw.hello()
    raw.send(Change(3, b"h2", (MakeNode(ROOT_INO, "a/b", FILE),)))
    got = raw.receive()
    assert isinstance(got, Error) and got.code == "invalid_name", got
    raw.send(Lookup(4, ROOT_INO, b"y" * 255))
    got = raw.receive()
    assert isinstance(got, Error) and got.code == "not_found", got
    raw.close()
    # Reap is the server's own op: a client may not free an inode someone holds.
    raw = RawClient(server.address)
    raw.hello()
    raw.send_raw(encode(Change(5, b"h3", (Reap(ROOT_INO),))))  # type: ignore[arg-type]
    got = raw.receive()
    assert isinstance(got, Error) and got.code == "protocol", got
    raw.close()


def test_a_change_larger_than_a_message_is_staged_and_lands_whole(server: ServerProc) -> None:
    """More pages than one frame carries: staged (StageInode), applied after the change's
    own ops, all at once; to an inode gone meanwhile, none of it."""

    pages = MAX_MESSAGE_PAGES + 7
    data = b"".join(stamp_page("big", n, 1) for n in range(pages))

    async def main() -> None:
        async with RemoteStore.connect(server.address) as store:
            (f,) = (await store.change([MakeNode(ROOT_INO, "big", FILE)])).created
            await store.change([Truncate(f, pages * PAGE_SIZE), WritePages(f, 0, data)])
            st = await store.getattr(f)
            assert (st.size, st.stored_pages) == (pages * PAGE_SIZE, pages)
            got = await store.read_inode(f, MAX_MESSAGE_PAGES, 7)
            assert got.to_bytes() == data[MAX_MESSAGE_PAGES * PAGE_SIZE :]
            await store.change([Unlink(ROOT_INO, "big")])
            with pytest.raises(Stale):
                await store.change([Truncate(f, pages * PAGE_SIZE), WritePages(f, 0, data)])
            with pytest.raises(NetmemError, match="must end with its writes"):
                await store.change([WritePages(f, 0, data), Truncate(f, 0)])
            assert (await store.server_stat()).used_bytes == 0

    run_trio(main, timeout_s=60)
