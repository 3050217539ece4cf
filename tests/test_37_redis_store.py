"""Layer 3g: the doors on each store (issue 16): a netmemfs-server, a standalone Redis and
a Redis Cluster (3 masters, a replica each), all real processes. The mount crash test
(test_55) runs on each store too; the Redis store's refusals are here."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from netmemfs import anon
from netmemfs.agent import HEADER, OP_OPEN, OPEN_READS_RESP
from netmemfs.connect import connect_store
from netmemfs.errors import (
    AuthFailed,
    NetmemError,
    NoSpace,
    NotPermitted,
    OutOfRange,
)
from netmemfs.ops import MakeNode, Truncate, WritePages
from netmemfs.pages import PAGE_SIZE
from netmemfs.redis_store import RedisStore
from netmemfs.remote import RemoteStore, tls_client_context
from netmemfs_server.store import ROOT_INO
from tests.helpers import MountProc, Tls, describe_page, run_trio, stamp_page
from tests.redis_procs import RedisCluster, RedisProc, ask

MiB = 1 << 20
MountFactory = Callable[..., MountProc]


def _pattern(name: str, pages: int, gen: int) -> bytes:
    return b"".join(stamp_page(name, p, gen) for p in range(pages))


def test_a_mount_round_trip(any_store: str, mount_factory: MountFactory) -> None:
    """Files written through a mapping and fsynced on one mount are what another mount
    reads; names change atomically; a shrink and a growth read zeros; a file opened
    again after another mount's commit shows that commit (close-to-open)."""
    a = mount_factory(any_store, name="a")
    b = mount_factory(any_store, name="b")
    pages = 300  # several 64-page chunks
    fd = os.open(a.path("seg0"), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, pages * PAGE_SIZE)
    with mmap.mmap(fd, pages * PAGE_SIZE) as m:
        m[:] = _pattern("seg0", pages, 1)
        m.flush()
    os.fsync(fd)
    os.close(fd)
    assert b.path("seg0").read_bytes() == _pattern("seg0", pages, 1)
    # Another commit on a; b opens the file again and sees it.
    with open(a.path("seg0"), "r+b") as f:
        f.seek(70 * PAGE_SIZE)
        f.write(stamp_page("seg0", 70, 2))
        f.truncate(100 * PAGE_SIZE + 10)
        f.flush()
        os.fsync(f.fileno())
    want = bytearray(_pattern("seg0", 100, 1) + stamp_page("seg0", 100, 1)[:10])
    want[70 * PAGE_SIZE : 71 * PAGE_SIZE] = stamp_page("seg0", 70, 2)
    assert b.path("seg0").read_bytes() == want
    with open(a.path("seg0"), "r+b") as f:
        f.truncate(101 * PAGE_SIZE)  # grows again: past the old end, zeros
        os.fsync(f.fileno())
    assert b.path("seg0").read_bytes() == want + bytes(PAGE_SIZE - 10)
    assert os.stat(b.path("seg0")).st_size == 101 * PAGE_SIZE
    # Names: a directory, a rename into it, a hard link, a symlink, then all removed.
    os.mkdir(a.path("d"))
    os.rename(a.path("seg0"), a.path("d/x"))
    os.link(a.path("d/x"), a.path("hard"))
    os.symlink("d/x", a.path("soft"))
    assert sorted(os.listdir(b.mountpoint)) == ["d", "hard", "soft"]
    assert os.readlink(b.path("soft")) == "d/x"
    assert os.stat(b.path("d/x")).st_nlink == 2
    assert b.path("hard").read_bytes() == want + bytes(PAGE_SIZE - 10)
    with pytest.raises(OSError) as e:
        os.rmdir(a.path("d"))
    assert e.value.errno == 39  # ENOTEMPTY: the rule is the server's, on every store
    for name in ("d/x", "hard", "soft"):
        os.unlink(a.path(name))
    os.rmdir(a.path("d"))
    assert os.listdir(b.mountpoint) == []


def test_a_region_round_trip(any_store: str) -> None:
    """A region larger than its budget: written, synced, mapped again and read back
    (evicted pages come back; holes read as zeros), every page read by the fault thread
    straight from the store, no agent in between; a larger map of it is refused."""
    size, budget = 4 * MiB, 1 * MiB
    with anon.map(size, segment="region", server=any_store, budget=budget) as region:
        for p in range(0, size // PAGE_SIZE, 3):
            region[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = stamp_page("region", p, 1)
        region.sync()
        region[0:5] = b"HELLO"  # after the sync: dropped by close
    with anon.map(size, segment="region", server=any_store, budget=budget) as region:
        for p in range(size // PAGE_SIZE):
            want = stamp_page("region", p, 1) if p % 3 == 0 else bytes(PAGE_SIZE)
            assert region[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == want, f"page {p}"
        st = region.statistics()
        assert st.fetches > size // budget and st.direct_fetches == st.fetches, st
    with pytest.raises(NetmemError, match="has 4194304 bytes on the server"):
        anon.map(8 * MiB, segment="region", server=any_store)


def test_an_older_libnetmem_gets_no_connection_to_redis(tmp_path: Path) -> None:
    """The agent hands a region's library a connection to Redis only when its OPEN says
    it reads RESP (NM_OPEN_READS_RESP): a library of before would speak the server's
    protocol to Redis and stall. Spoken here as the library speaks to the agent."""
    redis = RedisProc(tmp_path)
    try:
        for status, direct in ((0, False), (OPEN_READS_RESP, True)):
            ours, theirs = socket.socketpair()
            agent = subprocess.Popen(
                [
                    *(sys.executable, "-m", "netmemfs", "agent", "--server", redis.url),
                    *("--fd", str(theirs.fileno())),
                ],
                pass_fds=[theirs.fileno()],
                stderr=subprocess.DEVNULL,
            )
            theirs.close()
            try:
                path = f"old-{status}".encode()
                ours.sendall(HEADER.pack(OP_OPEN, status, 1, MiB, 30000, len(path)) + path)
                ours.settimeout(30)
                data, fds, _, _ = socket.recv_fds(ours, HEADER.size + 256, 1)
                op, err, _, ino, _, length = HEADER.unpack(data[: HEADER.size])
                payload = data[HEADER.size : HEADER.size + length]
                for fd in fds:
                    os.close(fd)
                assert (op, err) == (OP_OPEN, 0), data
                if direct:
                    assert len(fds) == 1 and payload == f"resp:{{nm:{ino}}}".encode()
                else:
                    assert fds == [] and payload == b"", (fds, payload)
            finally:
                ours.close()
                agent.wait(timeout=30)
    finally:
        redis.kill()


def _force_reconnect(store: object, address: str) -> None:
    """Break every client connection of the store (the server's own reconnect, or
    Redis's CLIENT KILL on every node)."""
    if isinstance(store, RedisStore):
        hosts = address.removeprefix("redis://").split(",")
        ports = {int(h.rsplit(":", 1)[1]) for h in hosts}
        for port in list(ports):
            for line in ask(port, "CLUSTER", "NODES").splitlines():
                if "127.0.0.1:" in line:  # a cluster: every node, masters and replicas
                    ports.add(int(line.split()[1].split("@")[0].rsplit(":", 1)[1]))
        for port in ports:
            assert ask(port, "CLIENT", "KILL", "TYPE", "normal").isdigit()


def test_exactly_once_after_a_forced_reconnect(any_store: str) -> None:
    """The same transaction sent again after its connection was broken applies nothing
    and answers with the first result: a file's commit and a namespace change."""

    async def main() -> None:
        async with connect_store(any_store) as store:
            if isinstance(store, RemoteStore):
                await store.force_reconnect()
            made = await store.change([MakeNode(ROOT_INO, "once", stat.S_IFREG | 0o644, size=MiB)])
            ino = made.created[0]
            first = await store.change([WritePages(ino, 5, stamp_page("once", 5, 1))])
            _force_reconnect(store, any_store)
            if isinstance(store, RemoteStore):
                await store.force_reconnect()
            again = await store.change(
                [WritePages(ino, 5, stamp_page("once", 5, 2))], txn=first.txn
            )
            assert again.replayed and again.inodes == first.inodes
            got = await store.read_inode(ino, 5, 1)
            assert got.to_bytes() == stamp_page("once", 5, 1)
            assert got.version == first.inodes[ino]
            remade = await store.change(
                [MakeNode(ROOT_INO, "once", stat.S_IFREG | 0o644, size=MiB)], txn=made.txn
            )
            assert remade.replayed and remade.created == made.created
            assert [n for n, _, _ in await store.readdir(ROOT_INO)] == ["once"]

    run_trio(main, 60)


def test_a_commit_refused_by_its_last_op_changes_nothing(any_store: str) -> None:
    """A commit whose last op is refused (a write past the end a truncate before it
    set) is refused whole: its earlier write and truncate are not applied either."""

    async def main() -> None:
        async with connect_store(any_store) as store:
            made = await store.change(
                [MakeNode(ROOT_INO, "whole", stat.S_IFREG | 0o644, size=8 * PAGE_SIZE)]
            )
            ino = made.created[0]
            first = await store.change([WritePages(ino, 0, stamp_page("whole", 0, 1))])
            with pytest.raises(OutOfRange):
                await store.change(
                    [
                        WritePages(ino, 0, stamp_page("whole", 0, 2)),
                        Truncate(ino, PAGE_SIZE),
                        WritePages(ino, 5, stamp_page("whole", 5, 2)),
                    ]
                )
            st = await store.getattr(ino)
            assert (st.size, st.version) == (8 * PAGE_SIZE, first.inodes[ino])
            got = await store.read_inode(ino, 0, 1)
            assert got.to_bytes() == stamp_page("whole", 0, 1)

    run_trio(main, 60)


def _staged_keys(address: str) -> list[str]:
    """Keys of staged copies left on any node of the Redis at address."""
    ports = {int(h.rsplit(":", 1)[1]) for h in address.removeprefix("redis://").split(",")}
    for port in list(ports):
        for line in ask(port, "CLUSTER", "NODES").splitlines():
            if "127.0.0.1:" in line:
                ports.add(int(line.split()[1].split("@")[0].rsplit(":", 1)[1]))
    found = []
    for port in ports:
        found += ask(port, "--scan", "--pattern", "*:s:*").split()
    return found


def test_a_large_commit_lands_whole(any_store: str) -> None:
    """A commit of more pages than go in one call (on Redis: staged chunk by chunk, then
    applied by renames) lands whole, with a shrink and a growth in the same commit; on
    Redis no staged copy is left behind."""
    pages = 3000

    async def main() -> None:
        async with connect_store(any_store) as store:
            size = 4 * pages * PAGE_SIZE
            made = await store.change([MakeNode(ROOT_INO, "big", stat.S_IFREG | 0o644, size=size)])
            ino = made.created[0]
            first = b"".join(stamp_page("big", p, 1) for p in range(pages))
            await store.change([WritePages(ino, 0, first)])
            second = b"".join(stamp_page("big", p, 2) for p in range(1500, 1500 + 1100))
            cut = 1000 * PAGE_SIZE + 10
            await store.change(
                [Truncate(ino, cut), Truncate(ino, size), WritePages(ino, 1500, second)]
            )
            want = bytearray(size)
            want[:cut] = first[:cut]
            want[1500 * PAGE_SIZE : 2600 * PAGE_SIZE] = second
            got = bytearray()
            for p in range(0, size // PAGE_SIZE, 4096):
                got += (await store.read_inode(ino, p, min(4096, size // PAGE_SIZE - p))).to_bytes()
            for p in range(size // PAGE_SIZE):
                a, b = (
                    got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE],
                    want[p * PAGE_SIZE : (p + 1) * PAGE_SIZE],
                )
                assert a == b, (
                    f"page {p}: {describe_page(bytes(a))}, want {describe_page(bytes(b))}"
                )

    run_trio(main, 120)
    if any_store.startswith("redis://"):
        assert _staged_keys(any_store) == []


def test_pages_written_one_by_one_take_about_their_size_in_redis(tmp_path: Path) -> None:
    """Redis memory for a file's pages stays within 3% of their bytes however they were
    written: one page per commit, in order and backwards, and a large staged commit.
    (SETRANGE past a string's end allocates twice what it needs, and a 64-page chunk
    with its header takes jemalloc's 320 KiB class: 2.5x and 1.25x before layout 2.)"""
    redis = RedisProc(tmp_path)
    pages = 4 * 63 + 1

    async def main() -> dict[str, int]:
        inos = {}
        async with connect_store(redis.url) as store:
            for name, order in (
                ("forward", list(range(pages))),
                ("backward", list(reversed(range(pages)))),
            ):
                made = await store.change(
                    [MakeNode(ROOT_INO, name, stat.S_IFREG | 0o644, size=pages * PAGE_SIZE)]
                )
                inos[name] = made.created[0]
                for p in order:
                    await store.change([WritePages(inos[name], p, stamp_page(name, p, 1))])
            made = await store.change(
                [MakeNode(ROOT_INO, "staged", stat.S_IFREG | 0o644, size=2000 * PAGE_SIZE)]
            )
            inos["staged"] = made.created[0]
            await store.change([WritePages(inos["staged"], 0, _pattern("staged", 2000, 1))])
            for name, ino in inos.items():
                n = 2000 if name == "staged" else pages
                got = await store.read_inode(ino, 0, n)
                assert got.to_bytes() == _pattern(name, n, 1), name
        return inos

    try:
        inos = run_trio(main, 120)
        for name, ino in inos.items():
            keys = ask(redis.port, "--scan", "--pattern", f"{{nm:{ino}}}:c:*").split()
            used = sum(int(ask(redis.port, "MEMORY", "USAGE", k)) for k in keys)
            stored = (2000 if name == "staged" else pages) * PAGE_SIZE
            assert used <= stored * 1.03, f"{name}: {used} bytes of Redis for {stored} stored"
    finally:
        redis.kill()


# --- the Redis store's refusals --------------------------------------------------------


def test_an_evicting_redis_is_refused_naming_the_node(tmp_path: Path) -> None:
    redis = RedisProc(tmp_path, "--maxmemory-policy", "allkeys-lru")
    try:

        async def main() -> None:
            async with connect_store(redis.url, retry_for_s=5):
                pass

        with pytest.raises(NotPermitted) as e:
            run_trio(main, 30)
        msg = str(e.value)
        assert redis.address in msg and "allkeys-lru" in msg and "noeviction" in msg
    finally:
        redis.kill()


def test_a_wrong_password_is_refused(tmp_path: Path, mount_factory: MountFactory) -> None:
    """A password file (--token-file) with the right password mounts; a wrong one, or
    none, fails the mount with a line that names the Redis and the file."""
    secret = "correct-horse-battery-staple"
    redis = RedisProc(tmp_path, "--requirepass", secret)
    try:
        good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
        good.write_text(secret + "\n")
        bad.write_text("wrong-password-of-16+\n")
        for f in (good, bad):
            f.chmod(0o600)
        m = mount_factory(redis.url, "--token-file", str(good), name="good")
        m.path("f").write_bytes(b"x" * 10)
        assert m.path("f").read_bytes() == b"x" * 10

        async def main() -> None:
            async with connect_store(redis.url, token=bad.read_bytes(), retry_for_s=5):
                pass

        with pytest.raises(AuthFailed, match=f"127.0.0.1:{redis.port}"):
            run_trio(main, 30)
    finally:
        redis.kill()


def test_tls_and_an_acl_user(tmp_path: Path, mount_factory: MountFactory) -> None:
    """rediss:// with --tls-ca and an ACL user from the password file (USER PASSWORD),
    the default user switched off: a mount writes and reads over TLS. A redis:// URL
    for the TLS port, a CA that did not sign the certificate, and a user who may not
    load functions each fail at connect with a line saying what to check."""
    tls = Tls(tmp_path)
    redis = RedisProc(tmp_path, tls=(tls.cert, tls.key, tls.ca_file))
    secret = "an-acl-password-of-some-length"
    try:
        for acl in (
            ["nmuser", "on", f">{secret}", "~*", "&*", "+@all"],
            ["reader", "on", f">{secret}", "~*", "&*", "+@read", "+@connection", "+info"],
            ["default", "off"],
        ):
            assert redis.ask("ACL", "SETUSER", *acl) == "OK"
        creds = tmp_path / "redis.pw"
        creds.write_text(f"nmuser {secret}\n")
        creds.chmod(0o600)
        url = f"rediss://{redis.address}"
        m = mount_factory(url, "--token-file", str(creds), "--tls-ca", str(tls.ca_file))
        m.path("f").write_bytes(_pattern("f", 40, 1))
        assert m.path("f").read_bytes() == _pattern("f", 40, 1)

        def refusal(address: str, ca: Path | None, user: str) -> str:
            async def main() -> None:
                async with connect_store(
                    address,
                    token=f"{user} {secret}".encode(),
                    tls=tls_client_context(ca) if ca else None,
                    retry_for_s=2,
                ):
                    pass

            with pytest.raises(NetmemError) as e:
                run_trio(main, 30)
            return str(e.value)

        (tmp_path / "other").mkdir()
        other = Tls(tmp_path / "other")
        assert "certificate verify failed" in refusal(url, other.ca_file, "nmuser")
        noperm = refusal(url, tls.ca_file, "reader")
        assert "no permissions" in noperm and "ACL SETUSER <user> on" in noperm, noperm
        plain = refusal(f"redis://{redis.address}", None, "nmuser")
        assert redis.address in plain and "rediss://" in plain, plain
    finally:
        redis.kill()


def test_a_tls_redis_cluster(tmp_path: Path, mount_factory: MountFactory) -> None:
    """A Redis Cluster serving TLS only (tls-port, tls-cluster, tls-replication): the
    client finds the other nodes by their TLS ports and a mount writes files that land
    on several masters and reads them back."""
    tls = Tls(tmp_path)
    cluster = RedisCluster(tmp_path, masters=3, replicas=1, tls=(tls.cert, tls.key, tls.ca_file))
    try:
        m = mount_factory(cluster.url, "--tls-ca", str(tls.ca_file))
        for i in range(12):
            with open(m.path(f"f{i}"), "wb") as f:
                f.write(_pattern(f"f{i}", 20, 1))
                f.flush()
                os.fsync(f.fileno())
        for i in range(12):
            assert m.path(f"f{i}").read_bytes() == _pattern(f"f{i}", 20, 1)
        masters = [n for n in cluster.nodes if "role:master" in n.ask("INFO", "REPLICATION")]
        assert sum(int(n.ask("DBSIZE")) > 0 for n in masters) >= 2
    finally:
        cluster.kill()


def test_keys_of_another_program_are_refused(tmp_path: Path) -> None:
    redis = RedisProc(tmp_path)
    try:
        ask(redis.port, "SET", "{nm}:fmt", "someone else's")

        async def main() -> None:
            async with connect_store(redis.url, retry_for_s=5):
                pass

        with pytest.raises(NotPermitted, match="another program's keys"):
            run_trio(main, 30)
    finally:
        redis.kill()


def test_a_full_redis_fails_the_commit_with_no_space(tmp_path: Path) -> None:
    """A commit that Redis refuses for want of memory (maxmemory, noeviction) fails with
    ENOSPC, naming the node and what to do; the file keeps its last commit."""
    redis = RedisProc(tmp_path, "--maxmemory", "4mb")
    try:

        async def main() -> None:
            async with connect_store(redis.url) as store:
                made = await store.change(
                    [MakeNode(ROOT_INO, "full", stat.S_IFREG | 0o644, size=64 * MiB)]
                )
                ino = made.created[0]
                await store.change([WritePages(ino, 0, stamp_page("full", 0, 1))])
                big = b"".join(stamp_page("full", p, 2) for p in range(1000))
                with pytest.raises(NoSpace, match=f"{redis.address}.*out of memory") as e:
                    for first in range(0, 16000, 1000):
                        await store.change([WritePages(ino, first, big)])
                assert e.value.errno == errno.ENOSPC
                got = await store.read_inode(ino, 16000 - 1, 1)
                assert got.to_bytes() == bytes(PAGE_SIZE)

        run_trio(main, 60)
    finally:
        redis.kill()


def test_several_standalone_redis_are_not_a_cluster(tmp_path: Path) -> None:
    one, two = RedisProc(tmp_path), RedisProc(tmp_path)
    try:

        async def main() -> None:
            async with connect_store(f"redis://{one.address},{two.address}", retry_for_s=5):
                pass

        with pytest.raises(NotPermitted, match="not a Redis Cluster"):
            run_trio(main, 30)
    finally:
        one.kill()
        two.kill()


def _calls(redis: RedisProc) -> dict[str, int]:
    """Calls of each command so far, from INFO commandstats."""
    out = {}
    for line in redis.ask("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            out[name.removeprefix("cmdstat_")] = int(rest.split(",")[0].removeprefix("calls="))
    return out


def test_page_reads_run_no_lua(tmp_path: Path) -> None:
    """A read of a file's pages, from the mount's side (read_inode) and from a region's
    fault thread (libnetmem's direct reads), is MULTI/HMGET/GETRANGE/EXEC: no function
    call (nm_read copies the pages through Lua, 0.47 ms for 252 KiB against 0.08 ms)."""
    redis = RedisProc(tmp_path)
    try:
        pages = 200
        data = b"".join(stamp_page("lua", p, 1) for p in range(pages))

        async def write_then_read() -> None:
            async with connect_store(redis.url) as store:
                size = pages * PAGE_SIZE
                made = await store.change(
                    [MakeNode(ROOT_INO, "lua", stat.S_IFREG | 0o644, size=size)]
                )
                ino = made.created[0]
                await store.change([WritePages(ino, 0, data)])
                before = _calls(redis)
                got = (await store.read_inode(ino, 0, pages)).to_bytes()
                after = _calls(redis)
                assert got == data
                assert after.get("getrange", 0) > before.get("getrange", 0), after
                for fcall in ("fcall", "fcall_ro"):
                    assert after.get(fcall, 0) == before.get(fcall, 0), (fcall, before, after)

        run_trio(write_then_read, 60)
        before = _calls(redis)
        with anon.map(pages * PAGE_SIZE, segment="lua", server=redis.url, budget=0) as region:
            assert region[:] == data
            stats = region.statistics()
        after = _calls(redis)
        assert stats.direct_fetches == stats.fetches > 0, stats
        assert after.get("getrange", 0) > before.get("getrange", 0), after
        assert after.get("fcall_ro", 0) == before.get("fcall_ro", 0), (before, after)
    finally:
        redis.kill()


def test_batches_of_many_tasks_on_one_lane_get_their_own_replies(tmp_path: Path) -> None:
    """The page path's lane to a node is shared: each request is a batch of commands
    sent together (a read is MULTI, HMGET, GETRANGE, EXEC) and woken once, when its last
    reply is in. Eight tasks send batches of 1-4 commands at once, some with a 1.5 MiB
    reply that takes more than one receive (the lane's buffer is 1 MiB), and some given
    up on (cancelled) while they wait: every other batch gets its own replies, in its
    order, and none waits for ever."""
    redis = RedisProc(tmp_path)
    big = bytes(range(256)) * (6 * 1024)  # 1.5 MiB

    async def batches() -> None:
        async with connect_store(redis.url) as store:
            assert isinstance(store, RedisStore)
            node = await store._slots.node_of(b"lane-test")
            assert await store._lanes.call_many(node, [[b"SET", b"lane-test", big]]) == [b"OK"]

            async def ask(task: int) -> None:
                for i in range(150):
                    n = 1 + (task + i) % 4
                    commands = [[b"ECHO", b"%d:%d:%d" % (task, i, k)] for k in range(n)]
                    want: list[object] = [c[1] for c in commands]
                    if (task + i) % 5 == 0:
                        commands.insert(n // 2, [b"GET", b"lane-test"])
                        want.insert(n // 2, big)
                    if (task + i) % 7 == 0:
                        # Given up on while waiting (maybe while receiving for all):
                        # its replies must go to nobody else, the turn to another.
                        with trio.move_on_after(0):
                            await store._lanes.call_many(node, commands)
                        continue
                    assert await store._lanes.call_many(node, commands) == want

            async with trio.open_nursery() as nursery:
                for task in range(8):
                    nursery.start_soon(ask, task)

            # The one receiving for all is given up on while another waits, with no
            # request after it: the other takes the turn (a BLPOP holds the replies back).
            lane = await store._lanes._lane(node)
            scope = trio.CancelScope()
            echoed: list[object] = []

            async def blocked() -> None:
                with scope:
                    await store._lanes.call_many(node, [[b"BLPOP", b"lane-nothing", b"0.5"]])

            async def echo() -> None:
                echoed.extend(await store._lanes.call_many(node, [[b"ECHO", b"after"]]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked)
                await trio.testing.wait_all_tasks_blocked()
                assert lane.reading
                nursery.start_soon(echo)
                await trio.testing.wait_all_tasks_blocked()
                assert len(lane.waiting) == 2
                scope.cancel()
            assert echoed == [b"after"]

    try:
        run_trio(batches, 60)
    finally:
        redis.kill()


def test_a_read_only_replica_is_refused_naming_its_master(
    tmp_path: Path, mount_factory: MountFactory
) -> None:
    master = RedisProc(tmp_path / "master")
    replica = RedisProc(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    try:
        (tmp_path / "mnt").mkdir()
        r = subprocess.run(
            [
                *(sys.executable, "-m", "netmemfs", "mount", str(tmp_path / "mnt")),
                *("--server", replica.url, "--cache-dir", str(tmp_path / "cache")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1
        assert f"at {replica.url}: this Redis is a read-only replica" in r.stderr, r.stderr
        assert "give --server its master" in r.stderr, r.stderr
        assert not os.path.ismount(tmp_path / "mnt")
    finally:
        replica.kill()
        master.kill()


def test_a_cluster_replica_as_the_only_seed(tmp_path: Path, mount_factory: MountFactory) -> None:
    """A Redis Cluster reached through one of its replicas: the slot map it gives names
    the masters, and the mount works on them."""
    cluster = RedisCluster(tmp_path)
    try:
        replicas = [n for n in cluster.nodes if n.ask("ROLE").splitlines()[0] == "slave"]
        assert replicas, "the cluster has no replica"
        mount = mount_factory(replicas[0].url)
        with open(mount.path("f"), "wb") as f:
            f.write(b"through a replica's slot map")
            f.flush()
            os.fsync(f.fileno())
        assert mount.path("f").read_bytes() == b"through a replica's slot map"
    finally:
        cluster.kill()
