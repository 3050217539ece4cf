"""Layer 3g: capacity on a Redis Cluster (issue 16). Three masters of 256 MiB each hold
600 MiB of files, more than any one of them could; a fourth master joined with
`redis-cli --cluster add-node` takes slots by `rebalance` while a client reads every
page, and every page stays readable, through the store and through a fresh mount."""

from __future__ import annotations

import logging
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from coredis._utils import hash_slot

from netmemfs import anon
from netmemfs.connect import connect_store
from netmemfs.ops import MakeNode, WritePages
from netmemfs.pages import PAGE_SIZE
from netmemfs.store import Store
from netmemfs_server.store import ROOT_INO
from tests.helpers import MountProc, describe_page, run_trio, stamp_page
from tests.redis_procs import RedisCluster, RedisProc, ask, redis_exe

MiB = 1 << 20
FILES = 300
PAGES = 512  # 2 MiB a file, 600 MiB in all: 78% of the three masters' 768 MiB
MAXMEMORY = 256 * MiB
REBALANCE_TIMEOUT_S = 300.0
log = logging.getLogger(__name__)


def _content(name: str) -> bytes:
    return b"".join(stamp_page(name, p, 1) for p in range(PAGES))


def _names() -> list[str]:
    return [f"f{i:03d}" for i in range(FILES)]


def _used_memory(node: RedisProc) -> int:
    for line in ask(node.port, "INFO", "MEMORY").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise AssertionError(f"no used_memory in INFO MEMORY of {node.address}")


async def _check_file(store: Store, name: str, ino: int) -> None:
    want = _content(name)
    got = b""
    for first in range(0, PAGES, 256):
        got += (await store.read_inode(ino, first, 256)).to_bytes()
    if got != want:
        p = next(
            p
            for p in range(PAGES)
            if got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] != want[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        )
        raise AssertionError(
            f"{name} page {p}: {describe_page(got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])}"
        )


def test_three_masters_hold_600_mib_and_a_fourth_takes_slots_while_reading(
    tmp_path: Path, mount_factory: Callable[..., MountProc]
) -> None:
    cluster = RedisCluster(
        tmp_path, masters=3, replicas=0, node_args=("--maxmemory", str(MAXMEMORY))
    )
    try:

        async def fill() -> dict[str, int]:
            inos = {}
            async with connect_store(cluster.url) as store:
                for name in _names():
                    made = await store.change(
                        [MakeNode(ROOT_INO, name, stat.S_IFREG | 0o644, size=PAGES * PAGE_SIZE)]
                    )
                    inos[name] = made.created[0]
                    await store.change([WritePages(inos[name], 0, _content(name))])
            return inos

        inos = run_trio(fill, 600)
        used = [_used_memory(n) for n in cluster.nodes]
        log.info("used_memory per master after 600 MiB: %s MiB", [u // MiB for u in used])
        # No one master could hold it all, and every one holds part of it.
        assert all(40 * MiB < u <= MAXMEMORY for u in used), used
        assert sum(used) >= FILES * PAGES * PAGE_SIZE

        new = cluster.add_master()
        rebalance: subprocess.Popen[str] = subprocess.Popen(
            [
                redis_exe("redis-cli"),
                *("--cluster", "rebalance", cluster.nodes[0].address),
                "--cluster-use-empty-masters",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reads_during = 0
        passes_after = 0

        async def read_while_rebalancing() -> None:
            nonlocal reads_during, passes_after
            deadline = time.monotonic() + REBALANCE_TIMEOUT_S
            async with connect_store(cluster.url) as store:
                while passes_after < 1:
                    assert time.monotonic() < deadline, "rebalance still running"
                    running = rebalance.poll() is None
                    for name in _names():
                        await _check_file(store, name, inos[name])
                        if rebalance.poll() is None:
                            reads_during += 1
                    if not running:
                        passes_after += 1

        started = time.monotonic()
        try:
            run_trio(read_while_rebalancing, REBALANCE_TIMEOUT_S + 60)
        finally:
            if rebalance.poll() is None:
                rebalance.kill()
            out = rebalance.communicate()[0]
        took = time.monotonic() - started
        assert rebalance.returncode == 0, f"redis-cli --cluster rebalance failed:\n{out}"
        moved = int(ask(new.port, "DBSIZE"))
        log.info(
            "rebalance: %d keys onto the new master; %d files read whole while it ran; "
            "%.1f s for it and a pass after",
            moved,
            reads_during,
            took,
        )
        assert moved > 0, f"the new master {new.address} took no keys:\n{out}"
        assert reads_during > 0, "no file was read while the rebalance ran"

        # Through a door: a fresh mount (no cache yet) reads every file whole.
        m = mount_factory(cluster.url, name="after")
        m.expect_log("has no replica: its files are lost if it dies")
        for name in _names():
            assert m.path(name).read_bytes() == _content(name), name
    finally:
        cluster.kill()


def test_a_region_s_direct_reads_follow_its_file_to_another_master(tmp_path: Path) -> None:
    """A region reads its committed pages straight from the master serving its file;
    when the file's slot moves to another master (MOVED), the fetch under way goes
    through the agent, the next one gets a connection to the new master, and from then
    on every fetch is direct again. Every page reads back right throughout."""
    cluster = RedisCluster(tmp_path, masters=3, replicas=0)
    size, budget = 4 * MiB, 1 * MiB
    pages = size // PAGE_SIZE

    def read_all(region: anon.Region) -> None:
        for p in range(pages):
            got = region[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
            assert got == stamp_page("moving", p, 1), f"page {p}: {describe_page(got)}"

    try:
        with anon.map(size, segment="moving", server=cluster.url, budget=budget) as region:
            for p in range(pages):
                region[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = stamp_page("moving", p, 1)
            region.sync()
        with anon.map(size, segment="moving", server=cluster.url, budget=budget) as region:
            read_all(region)
            before = region.statistics()
            assert before.direct_fetches == before.fetches > 0, before
            meta = next(
                k
                for n in cluster.nodes
                for k in ask(n.port, "--scan", "--pattern", "{nm:*}:m").split()
            )
            slot = hash_slot(meta.encode())
            src = cluster.master_of(slot)
            cluster.move_slot(slot, next(n for n in cluster.nodes if n is not src))
            read_all(region)  # the first fetch hears MOVED
            moved = region.statistics()
            # Some went through the agent: the one told MOVED, the one asking REDIAL.
            through_agent = (moved.fetches - before.fetches) - (
                moved.direct_fetches - before.direct_fetches
            )
            assert through_agent >= 1, (before, moved)
            read_all(region)
            after = region.statistics()
            assert after.fetches - moved.fetches >= (size - budget) // PAGE_SIZE // 64, after
            assert after.direct_fetches - moved.direct_fetches == after.fetches - moved.fetches
    finally:
        cluster.kill()
