"""Layer 2: the store's inodes and directories (issue 13), without a network.

Every rule is checked where it lives, on the server's store, so a hostile client speaking
the protocol meets the same refusals as the mount. Errors carry the errno POSIX names.
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from netmemfs.errors import NetmemError
from netmemfs.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Create,
    Delete,
    Link,
    MakeNode,
    Move,
    Op,
    Reap,
    Rmdir,
    SetAttr,
    Truncate,
    Unlink,
    WritePages,
)
from netmemfs.pages import PAGE_SIZE
from netmemfs_server.log import LogPageStore
from netmemfs_server.store import CHECKPOINT_FIELDS, ROOT_INO, Inode, MemoryPageStore
from tests.helpers import stamp_page

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LINK = stat.S_IFLNK | 0o777


class Store:
    """A MemoryPageStore and the commits of one test, numbered."""

    def __init__(self, s: MemoryPageStore | None = None, log: LogPageStore | None = None):
        self.s = log if log else s or MemoryPageStore()
        self.log = log
        self.n = 0

    def commit(self, *ops: Op) -> tuple[int, ...]:
        """Apply ops as one transaction (logged first, as the server does, if there is a
        log); the inode numbers MakeNode handed out."""
        self.n += 1
        txn = f"txn-{self.n}".encode()
        settled = self.s.settle(ops)  # with the Reaps of orphans, no holders here
        if self.log is not None:
            self.log.append(txn, settled)
        self.s.apply(txn, settled)
        outcome = self.s.outcome(txn)
        assert outcome is not None
        return outcome.created

    def make(self, parent: int, name: str, mode: int = FILE, target: bytes = b"") -> int:
        return self.commit(MakeNode(parent, name, mode, target=target, time_ns=self.n + 1))[0]

    def refuses(self, code: int, *ops: Op) -> str:
        """ops are refused with errno code, and the store is as it was."""
        before = dump(self.s)
        with pytest.raises(NetmemError) as e:
            self.s.check(ops)
        assert e.value.errno == code, f"{type(e.value).__name__} ({e.value}), not {code}"
        assert dump(self.s) == before
        return str(e.value)

    def node(self, parent: int, name: str) -> Inode:
        return self.s.lookup(parent, name)


def dump(s: MemoryPageStore) -> object:
    """Everything the store holds, comparable."""
    inodes = {}
    for ino, n in s.inodes.items():
        pages = {}
        if n.data is not None:
            for first, data in n.data.read(0, -(-n.data.size // PAGE_SIZE)):
                for k in range(len(data) // PAGE_SIZE):
                    pages[first + k] = bytes(data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
        fields = tuple(getattr(n, f) for f in CHECKPOINT_FIELDS)
        inodes[ino] = (*fields, dict(n.entries) if n.entries is not None else None, pages)
    return inodes, s.next_ino, s.used_pages, dict(s.committed)


def test_numbers_are_never_handed_out_twice() -> None:
    st = Store()
    first = st.make(ROOT_INO, "g")
    st.commit(Unlink(ROOT_INO, "g", 2))
    again = st.make(ROOT_INO, "g")
    assert again != first and again > first
    # A check that failed hands out nothing either.
    st.refuses(errno.EEXIST, MakeNode(ROOT_INO, "x", FILE), MakeNode(ROOT_INO, "x", FILE))
    assert st.make(ROOT_INO, "y") == again + 1


def test_directories_nest_with_dot_dot_and_link_counts() -> None:
    st = Store()
    a = st.make(ROOT_INO, "a", DIR)
    b = st.make(a, "b", DIR)
    f = st.make(b, "f")
    assert st.node(b, "f").ino == f
    assert st.node(b, "..").ino == a and st.node(a, "..").ino == ROOT_INO
    assert st.node(ROOT_INO, "..").ino == ROOT_INO and st.node(a, ".").ino == a
    assert st.s.inodes[ROOT_INO].nlink == 3  # '.', its own '..' ... and a's '..'
    assert st.s.inodes[a].nlink == 3 and st.s.inodes[b].nlink == 2
    assert st.s.inodes[f].nlink == 1
    st.refuses(errno.ENOTEMPTY, Rmdir(a, "b"))
    st.refuses(errno.ENOTDIR, Rmdir(b, "f"))
    st.refuses(errno.EISDIR, Unlink(a, "b"))
    st.refuses(errno.EINVAL, Rmdir(b, "."))
    st.refuses(errno.ENOTEMPTY, Rmdir(b, ".."))
    st.refuses(errno.ENOTDIR, MakeNode(f, "x", FILE))
    st.commit(Unlink(b, "f"), Rmdir(a, "b"))
    assert st.s.inodes[a].nlink == 2 and b not in st.s.inodes and f not in st.s.inodes


def test_symlinks_and_special_files_keep_what_they_were_made_with() -> None:
    st = Store()
    ln = st.make(ROOT_INO, "l", LINK, target=b"../some/where")
    assert st.s.inodes[ln].target == b"../some/where" and st.s.inodes[ln].size == 13
    st.refuses(errno.ENAMETOOLONG, MakeNode(ROOT_INO, "m", LINK, target=b""))
    st.refuses(errno.ENAMETOOLONG, MakeNode(ROOT_INO, "m", LINK, target=b"x" * 4096))
    dev = st.commit(MakeNode(ROOT_INO, "d", stat.S_IFCHR | 0o600, rdev=0x0501))[0]
    assert st.s.inodes[dev].rdev == 0x0501 and stat.S_ISCHR(st.s.inodes[dev].mode)
    st.refuses(errno.EINVAL, MakeNode(ROOT_INO, "bad", 0o170000 | 0o644))


def test_hard_links_share_an_inode_until_the_last_name_goes() -> None:
    st = Store()
    d = st.make(ROOT_INO, "d", DIR)
    f = st.make(ROOT_INO, "f")
    st.commit(Truncate(f, PAGE_SIZE), WritePages(f, 0, stamp_page("f", 0, 1)))
    st.commit(Link(f, d, "g"))
    assert st.s.inodes[f].nlink == 2 and st.node(d, "g").ino == f
    st.commit(Unlink(ROOT_INO, "f"))
    assert st.s.read_inode(f, 0, 1)[1][0].data == stamp_page("f", 0, 1)
    assert st.s.used_pages == 1
    st.refuses(errno.EPERM, Link(d, ROOT_INO, "d2"))  # a directory takes no links
    st.refuses(errno.EEXIST, Link(f, d, "g"))
    st.commit(Unlink(d, "g"))
    assert f not in st.s.inodes and st.s.used_pages == 0
    st.refuses(errno.ESTALE, Link(f, d, "again"))


def test_a_commit_to_an_inode_that_is_gone_is_stale_and_lands_nowhere() -> None:
    """The identity bug of names: a client's writes to g, after another renamed g away
    and made a new g, must not land in the new g. By number they cannot: the old g's
    writes land in the renamed file, and once it is deleted they are refused."""
    st = Store()
    old = st.make(ROOT_INO, "g")
    st.commit(Truncate(old, PAGE_SIZE))
    st.commit(Move(ROOT_INO, "g", ROOT_INO, "g.old"))
    new = st.make(ROOT_INO, "g")
    st.commit(Truncate(new, PAGE_SIZE))
    st.commit(WritePages(old, 0, stamp_page("g", 0, 5)))
    assert st.s.read("g.old", 0, 1)[1][0].data == stamp_page("g", 0, 5)
    assert st.s.read("g", 0, 1)[1] == ()
    st.commit(Delete("g.old"))
    msg = st.refuses(errno.ESTALE, WritePages(old, 0, stamp_page("g", 0, 6)))
    assert f"inode {old}" in msg
    st.refuses(errno.ESTALE, Truncate(new, 0), SetAttr(old, mode=0o600))


def test_rename_follows_posix() -> None:
    st = Store()
    a, b = st.make(ROOT_INO, "a", DIR), st.make(ROOT_INO, "b", DIR)
    c = st.make(a, "c", DIR)
    f, g = st.make(a, "f"), st.make(b, "g")
    st.commit(Truncate(g, PAGE_SIZE), WritePages(g, 0, stamp_page("g", 0, 1)))
    # A file keeps its number across a rename, and replaces a file (freeing it).
    st.commit(Move(a, "f", b, "g"))
    assert st.node(b, "g").ino == f and g not in st.s.inodes and st.s.used_pages == 0
    # Two names of one inode: nothing happens.
    st.commit(Link(f, a, "f2"))
    st.commit(Move(a, "f2", b, "g"))
    assert st.node(a, "f2").ino == f and st.s.inodes[f].nlink == 2
    st.refuses(errno.EINVAL, Move(ROOT_INO, "a", c, "a"))  # into itself, below
    st.refuses(errno.EINVAL, Move(ROOT_INO, "a", a, "x"))  # into itself
    st.refuses(errno.EISDIR, Move(b, "g", ROOT_INO, "a"))  # a file over a directory
    st.refuses(errno.ENOTDIR, Move(a, "c", b, "g"))  # a directory over a file
    st.refuses(errno.ENOTEMPTY, Move(a, "c", ROOT_INO, "b"))  # over a non-empty one
    st.refuses(errno.EEXIST, Move(a, "f2", b, "g", RENAME_NOREPLACE))
    st.refuses(errno.ENOENT, Move(a, "nope", b, "x"))
    st.refuses(errno.ENOENT, Move(a, "c", b, "x", RENAME_EXCHANGE))
    st.refuses(errno.EINVAL, Move(a, "c", b, "x", RENAME_EXCHANGE | RENAME_NOREPLACE))
    st.refuses(errno.EINVAL, Move(a, ".", b, "x"))
    # A directory moves across parents: the link counts of '..' follow it.
    st.commit(Move(a, "c", b, "c"))
    assert st.node(b, "c").ino == c and st.s.inodes[c].parent == b
    assert st.s.inodes[a].nlink == 2 and st.s.inodes[b].nlink == 3
    # It replaces an empty directory.
    e = st.make(a, "e", DIR)
    st.commit(Move(b, "c", a, "e"))
    assert st.node(a, "e").ino == c and e not in st.s.inodes
    assert st.s.inodes[a].nlink == 3 and st.s.inodes[b].nlink == 2
    # Exchange swaps a directory and a file, across parents.
    st.commit(Move(a, "e", b, "g", RENAME_EXCHANGE))
    assert st.node(a, "e").ino == f and st.node(b, "g").ino == c
    assert st.s.inodes[c].parent == b
    assert st.s.inodes[a].nlink == 2 and st.s.inodes[b].nlink == 3


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("a/b", errno.EINVAL),
        ("a\0b", errno.EINVAL),
        ("", errno.EINVAL),
        (".", errno.EINVAL),
        ("..", errno.EINVAL),
        ("x" * 256, errno.ENAMETOOLONG),
        ("\udcff" * 256, errno.ENAMETOOLONG),
    ],
)
def test_bad_names_get_the_errno_posix_names(name: str, code: int) -> None:
    st = Store()
    f = st.make(ROOT_INO, "f")
    st.refuses(code, MakeNode(ROOT_INO, name, FILE))
    st.refuses(code, Link(f, ROOT_INO, name))
    if name not in (".", ".."):
        st.refuses(code, Move(ROOT_INO, "f", ROOT_INO, name))


def test_any_bytes_but_slash_and_nul_make_a_name() -> None:
    st = Store()
    for name in ("x" * 255, "\udcff\udcfe not utf-8", "tab\there", "ü"):
        ino = st.make(ROOT_INO, name)
        assert st.node(ROOT_INO, name).ino == ino


def test_setattr_keeps_the_type_and_moves_ctime() -> None:
    st = Store()
    f = st.make(ROOT_INO, "f")
    st.commit(SetAttr(f, mode=0o4711, uid=7, gid=8, atime_ns=11, mtime_ns=12, time_ns=99))
    n = st.s.inodes[f]
    assert n.mode == stat.S_IFREG | 0o4711 and (n.uid, n.gid) == (7, 8)
    assert (n.atime_ns, n.mtime_ns, n.ctime_ns) == (11, 12, 99)
    st.refuses(errno.EISDIR, Truncate(ROOT_INO, 0))


def test_a_failed_commit_of_many_ops_leaves_nothing(tmp_path: Path) -> None:
    st = Store(MemoryPageStore(capacity_bytes=2 * PAGE_SIZE))
    d = st.make(ROOT_INO, "d", DIR)
    ops: list[Op] = [
        MakeNode(d, "sub", DIR),
        Move(ROOT_INO, "d", ROOT_INO, "d2"),
        Create("seg", 3 * PAGE_SIZE),
    ]
    st.refuses(errno.ENOENT, *ops, Unlink(d, "missing"))
    st.refuses(errno.ESTALE, *ops, WritePages(d + 10, 0, b""))
    # Capacity: three new pages, two allowed; the file made in the same commit counts.
    fresh = d + 1
    st.refuses(
        errno.ENOSPC,
        MakeNode(d, "big", FILE),
        Truncate(fresh, 3 * PAGE_SIZE),
        WritePages(fresh, 0, b"".join(stamp_page("b", n, 1) for n in range(3))),
    )


def test_every_op_survives_the_log_and_a_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    durable = LogPageStore.open(data, capacity_bytes=None, checkpoint_bytes=1 << 40)
    commit = Store(log=durable).commit

    (d,) = commit(MakeNode(ROOT_INO, "d\udcff", DIR, uid=3, gid=4, time_ns=10))
    (f,) = commit(MakeNode(d, "f", FILE, time_ns=11))
    commit(Truncate(f, 2 * PAGE_SIZE, 12), WritePages(f, 1, stamp_page("f", 1, 1), 13))
    commit(Link(f, ROOT_INO, "hard", 14), MakeNode(ROOT_INO, "l", LINK, target=b"d/f"))
    commit(SetAttr(f, mode=0o600, mtime_ns=5, time_ns=15), Move(d, "f", ROOT_INO, "f2"))
    commit(Create("seg", PAGE_SIZE, 16), MakeNode(d, "e", DIR), Rmdir(d, "e", 17))
    commit(Unlink(ROOT_INO, "hard", 18), Move(ROOT_INO, "l", d, "l", RENAME_NOREPLACE, 19))
    want = dump(durable)
    durable.close()
    replayed = LogPageStore.open(data, capacity_bytes=None, checkpoint_bytes=1 << 40)
    assert dump(replayed) == want
    replayed.checkpoint()
    replayed.close()
    loaded = LogPageStore.open(data, capacity_bytes=None, checkpoint_bytes=1 << 40)
    assert dump(loaded) == want
    # Inode 6 was directory e, made and removed: its number is not handed out again.
    (after,) = Store(loaded).commit(MakeNode(ROOT_INO, "new", FILE))
    assert after == 7
    loaded.close()


def test_an_op_on_an_inode_its_own_commit_freed_is_refused_by_check() -> None:
    """check() must meet every error apply() would: here an inode whose last name an
    earlier op of the same commit removed (found by the namespace crash test, whose
    server then could not replay its log)."""
    st = Store()
    f = st.make(ROOT_INO, "f")
    st.refuses(errno.ESTALE, Unlink(ROOT_INO, "f"), Reap(f), Truncate(f, 0))
    st.refuses(errno.EPERM, Reap(f))  # it has a name
    st.refuses(  # linkat of a file with no name left: ENOENT, as Linux answers
        errno.ENOENT,
        Move(ROOT_INO, "f", ROOT_INO, "f"),
        Unlink(ROOT_INO, "f"),
        Link(f, ROOT_INO, "g"),
    )
    st.commit(Unlink(ROOT_INO, "f"))
    assert f not in st.s.inodes


def test_a_held_file_outlives_its_last_name_until_reaped(tmp_path: Path) -> None:
    """An inode whose last name goes while a client holds it stays, by number, through
    the log and a checkpoint: read, written and resized, but not found by name or linked
    to; a Reap frees it and its pages."""
    data = tmp_path / "data"
    durable = LogPageStore.open(data, capacity_bytes=None, checkpoint_bytes=1 << 40)
    st = Store(log=durable)
    (f,) = st.commit(MakeNode(ROOT_INO, "f", FILE))
    st.commit(Truncate(f, PAGE_SIZE), WritePages(f, 0, stamp_page("f", 0, 1)))
    ops = durable.settle([Unlink(ROOT_INO, "f")], held={f})
    assert ops == [Unlink(ROOT_INO, "f")]  # no Reap: it is held
    durable.append(b"unlink", ops)
    durable.apply(b"unlink", ops)
    assert durable.orphans == {f} and durable.inode(f).nlink == 0
    st.refuses(errno.ENOENT, Link(f, ROOT_INO, "back"))
    st.commit(Truncate(f, 2 * PAGE_SIZE), WritePages(f, 1, stamp_page("f", 1, 2)))
    assert durable.used_bytes == 2 * PAGE_SIZE
    durable.checkpoint()
    durable.close()
    loaded = LogPageStore.open(data, capacity_bytes=None, checkpoint_bytes=1 << 40)
    assert loaded.orphans == {f}
    assert loaded.read_inode(f, 1, 1)[1][0].data == stamp_page("f", 1, 2)
    with pytest.raises(NetmemError):
        loaded.lookup(ROOT_INO, "f")
    Store(loaded).commit(Reap(f))
    assert f not in loaded.inodes and not loaded.orphans and loaded.used_bytes == 0
    loaded.close()
