"""Layer 5c: a Redis Cluster loses masters under a stream of commits (issue 16, item 4).

Two mounts and one anonymous region commit generations of their files while, round
after round, a master of the cluster (3 masters, a replica each) is SIGKILLed; its
replica takes over, and the killed node is started again (it rejoins as a replica and
syncs). Each commit is acknowledged only once a replica has it (WAIT), so a failover
loses nothing acknowledged: at the end every file holds exactly its writer's last
acknowledged generation, and no writer or mount was restarted.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import trio

from netmemfs.connect import connect_store
from netmemfs.ops import MakeNode, WritePages
from netmemfs.pages import PAGE_SIZE
from netmemfs_server.store import ROOT_INO
from tests.helpers import MountProc, describe_page, pid_alive, run_trio, stamp_page, wait_for
from tests.redis_procs import RedisCluster, RedisProc, ask

ROUNDS = int(os.environ.get("NETMEMFS_FAILOVER_ROUNDS", "10"))
PAGES = 16
ROOT = Path(__file__).resolve().parent.parent

# A writer: generation after generation of every page of one file (a mount's, through
# write and fsync; or a region's, through sync), each committed before the next; a
# failed commit is asked again (the mount or region keeps it) until it is acknowledged.
# It stops after an acknowledgement once the stop file exists.
WRITER = r"""
import errno, os, sys
from tests.helpers import stamp_page
kind, where, name, stop, pages = sys.argv[1:6]
pages = int(pages)
gen = 0
def content(gen):
    return b"".join(stamp_page(name, p, gen) for p in range(pages))
if kind == "mount":
    fd = os.open(where, os.O_RDWR)
    def commit(data):
        os.pwrite(fd, data, 0)
        while True:
            try:
                os.fsync(fd)
                return
            except OSError as e:
                print("retry", errno.errorcode.get(e.errno, e.errno), flush=True)
else:
    from netmemfs import anon
    region = anon.map(pages * 4096, segment=name, server=where)
    def commit(data):
        region[:] = data
        while True:
            try:
                region.sync()
                return
            except anon.RegionError as e:
                print("retry", e, flush=True)
while not os.path.exists(stop):
    gen += 1
    commit(content(gen))
    print("acked", gen, flush=True)
print("done", flush=True)
"""


class Writer:
    def __init__(self, kind: str, where: str, name: str, stop: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, kind, where, name, str(stop), str(PAGES)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.acked = 0
        self.retries = 0
        self.last_retry = ""
        self.done = False
        self.errors: list[str] = []  # its stderr (and its agent's), kept read
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors = [*self.errors[-50:], line]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "acked" and rest.isdigit():
                self.acked = int(rest)
            elif word == "retry":
                self.retries += 1
                self.last_retry = rest
            elif word == "done":
                self.done = True

    def close(self) -> None:
        """Kill it if it still runs; its pipes closed once its readers saw their end."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.thread.join(timeout=30)
        self.drain.join(timeout=30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def alive(self) -> bool:
        return self.proc.poll() is None or self.done


def _masters(cluster: RedisCluster) -> list[RedisProc]:
    return [
        n
        for n in cluster.nodes
        if n.proc.poll() is None and "role:master" in ask(n.port, "INFO", "REPLICATION")
    ]


def _caught_up(writers: list[Writer], marks: list[int]) -> bool:
    return all(w.acked >= m or not w.alive() for w, m in zip(writers, marks, strict=True))


def _taken_over(cluster: RedisCluster, victim: RedisProc, masters: int) -> bool:
    """A replica of victim (killed) is master in its place, and the cluster serves."""
    ok = any(
        "cluster_state:ok" in ask(n.port, "CLUSTER", "INFO")
        for n in cluster.nodes
        if n is not victim
    )
    return ok and len(_masters(cluster)) == masters


def _healthy(cluster: RedisCluster, masters: int) -> bool:
    """Every node up, all slots served, as many masters as before, and every replica
    synced with its master."""
    nodes = [n for n in cluster.nodes if n.proc.poll() is None]
    if len(nodes) != len(cluster.nodes):
        return False
    for n in nodes:
        info = ask(n.port, "CLUSTER", "INFO")
        if "cluster_state:ok" not in info:
            return False
        role = ask(n.port, "INFO", "REPLICATION")
        if "role:slave" in role and "master_link_status:up" not in role:
            return False
    return len(_masters(cluster)) == masters


def test_masters_killed_under_commits_lose_nothing_acknowledged(
    tmp_path: Path, mount_factory: Callable[..., MountProc]
) -> None:
    seed = int(os.environ.get("NETMEMFS_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    note = f"(NETMEMFS_CRASH_SEED={seed})"
    cluster = RedisCluster(tmp_path / "cluster")
    writers: list[Writer] = []
    try:
        url = cluster.url + os.environ.get("NETMEMFS_FAILOVER_URL_OPTIONS", "")
        a = mount_factory(url, "--timeout", "30", name="a")
        b = mount_factory(url, "--timeout", "30", name="b")
        for m in (a, b):
            # Commits wait for a replica while one is being promoted or resynced.
            m.expect_log("replicas it must reach|unreachable|no answer|failed|retry")
        for m, name in ((a, "f0"), (b, "f1")):
            with open(m.path(name), "wb") as f:
                f.truncate(PAGES * PAGE_SIZE)
                f.flush()
                os.fsync(f.fileno())
        stop = tmp_path / "stop"
        writers = [
            Writer("mount", str(a.path("f0")), "f0", stop),
            Writer("mount", str(b.path("f1")), "f1", stop),
            Writer("region", url, "r0", stop),
        ]
        masters = len(_masters(cluster))
        for rnd in range(ROUNDS):
            marks = [w.acked + 2 for w in writers]
            try:
                wait_for(
                    functools.partial(_caught_up, writers, marks),
                    f"round {rnd}: every writer to commit twice more {note}",
                    120,
                )
            except AssertionError as e:
                states = [(w.name, w.acked, w.retries, w.alive(), w.last_retry) for w in writers]
                raise AssertionError(f"{e}: (name, acked, retries, alive, last) {states}") from None
            for w in writers:
                assert w.alive(), f"writer {w.name} died: {''.join(w.errors)}"
            victim = rng.choice(_masters(cluster))
            victim.kill()
            wait_for(
                functools.partial(_taken_over, cluster, victim, masters),
                f"round {rnd}: a replica of {victim.address} to take over {note}",
                60,
            )
            victim.start()
            wait_for(
                lambda: _healthy(cluster, masters),
                f"round {rnd}: {victim.address} to rejoin as a replica {note}",
                60,
            )
        stop.touch()
        for w in writers:
            w.proc.wait(timeout=120)
            w.thread.join(timeout=10)
            assert w.done, (
                f"writer {w.name} did not finish: {w.proc.stderr and w.proc.stderr.read()}"
            )
        for m in (a, b):
            assert pid_alive(m.pid), "a mount's daemon died"

        async def read() -> dict[str, bytes]:
            async with connect_store(url) as store:
                out = {}
                for w in writers:
                    ino = (await store.lookup(ROOT_INO, w.name)).ino
                    out[w.name] = (await store.read_inode(ino, 0, PAGES)).to_bytes()
                return out

        got = run_trio(read, 60)
        for w in writers:
            assert w.acked > 2 * ROUNDS, f"{w.name} committed only {w.acked} times"
            for p in range(PAGES):
                page = got[w.name][p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
                assert page == stamp_page(w.name, p, w.acked), (
                    f"{w.name} page {p} is {describe_page(page)}, not generation "
                    f"{w.acked}, its last acknowledged {note}"
                )
        assert a.path("f0").read_bytes() == b"".join(
            stamp_page("f0", p, writers[0].acked) for p in range(PAGES)
        )
        print(
            f"{ROUNDS} masters killed; commits acknowledged: "
            + ", ".join(f"{w.name} {w.acked} ({w.retries} retried)" for w in writers)
        )
    finally:
        for w in writers:
            w.close()
        cluster.kill()


def _master_and_replica(cluster: RedisCluster, key: str) -> tuple[RedisProc, RedisProc]:
    """The master that serves key, and its replica."""
    port = cluster.nodes[0].port
    slot = int(ask(port, "CLUSTER", "KEYSLOT", key))
    lines = [line.split() for line in ask(port, "CLUSTER", "NODES").splitlines()]
    by_port = {n.port: n for n in cluster.nodes}

    def node(words: list[str]) -> RedisProc:
        return by_port[int(words[1].split("@")[0].rsplit(":", 1)[1])]

    for words in lines:
        if "master" not in words[2]:
            continue
        for r in words[8:]:
            lo, _, hi = r.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                replica = next(w for w in lines if w[3] == words[0])
                return node(words), node(replica)
    raise AssertionError(f"no master serves slot {slot}")


def test_a_commit_is_acknowledged_only_once_a_replica_has_it(tmp_path: Path) -> None:
    """The replica of the file's master is stopped (SIGSTOP) and cut off while a commit is
    made: the master applies it, but it is not acknowledged; the master is killed and
    the replica, continued, takes over without it; the commit, sent again under its id,
    lands there and only then is acknowledged. (With ?replicas=0 in the URL the commit
    is acknowledged at once and lost at the failover: this test fails.)"""
    cluster = RedisCluster(tmp_path / "cluster")
    url = cluster.url + os.environ.get("NETMEMFS_FAILOVER_URL_OPTIONS", "")

    async def main() -> None:
        async with connect_store(url, retry_for_s=60) as store:
            made = await store.change(
                [MakeNode(ROOT_INO, "f", stat.S_IFREG | 0o644, size=PAGE_SIZE)]
            )
            ino = made.created[0]
            await store.change([WritePages(ino, 0, stamp_page("f", 0, 1))])
            meta = f"{{nm:{ino}}}:m"
            master, replica = _master_and_replica(cluster, meta)
            # The replica stopped, and cut off: nothing sent from now on reaches it.
            os.kill(replica.proc.pid, signal.SIGSTOP)
            assert ask(master.port, "CLIENT", "KILL", "TYPE", "replica") == "1"
            acked: list[int] = []

            async def commit() -> None:
                await store.change([WritePages(ino, 0, stamp_page("f", 0, 2))])
                acked.append(1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit)
                await trio.to_thread.run_sync(
                    wait_for,
                    lambda: ask(master.port, "HGET", meta, "version") == "2",
                    "the master to apply the commit",
                )
                master.kill()
                os.kill(replica.proc.pid, signal.SIGCONT)
                await trio.to_thread.run_sync(
                    wait_for,
                    lambda: "role:master" in ask(replica.port, "INFO", "REPLICATION"),
                    "the replica to take over",
                    60,
                )
                master.start()  # it rejoins as the new master's replica
            assert acked, "the commit was never acknowledged"
            got = await store.read_inode(ino, 0, 1)
            assert got.to_bytes() == stamp_page("f", 0, 2), (
                f"an acknowledged commit was lost in the failover: the file holds "
                f"{describe_page(got.to_bytes())}"
            )

    try:
        run_trio(main, 120)
    finally:
        cluster.kill()
