"""Layer 3f: real Redis for the Redis store (issue 16): the harness that starts
redis-server processes, and what the store will rely on from Redis and coredis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import coredis
import hiredis
import pytest
import trio

from tests.helpers import run_trio
from tests.redis_procs import RedisCluster, RedisProc, ask


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    r = RedisProc(tmp_path)
    yield r
    r.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path)
    yield c
    c.kill()


def test_a_standalone_redis_serves_pages_to_coredis_and_hiredis(redis: RedisProc) -> None:
    page = os.urandom(4096)

    async def main() -> None:
        client = coredis.Redis(host="127.0.0.1", port=redis.port, decode_responses=False)
        async with client:
            await client.set(b"nm:page", page)
            assert await client.get(b"nm:page") == page
        # The lean path: a raw stream and hiredis's RESP reader.
        stream = await trio.open_tcp_stream("127.0.0.1", redis.port)
        async with stream:
            await stream.send_all(b"*2\r\n$3\r\nGET\r\n$7\r\nnm:page\r\n")
            reader = hiredis.Reader()
            while (reply := reader.gets()) is False:
                reader.feed(await stream.receive_some(65536))
            assert reply == page

    run_trio(main, 20)


def test_a_cluster_of_three_masters_with_a_replica_each(cluster: RedisCluster) -> None:
    """Three masters share the slots, each with a replica; keys sharing a hash tag (an
    inode's, as the store's layout will) share a slot, so one function call can apply
    a commit to all of them; coredis's cluster client routes each key to its master."""
    lines = ask(cluster.nodes[0].port, "CLUSTER", "NODES").splitlines()
    roles = sorted("replica" if "slave" in line.split()[2] else "master" for line in lines)
    assert roles == ["master"] * 3 + ["replica"] * 3, lines
    slot = {ask(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", f"{{i5}}:p{n}") for n in range(50)}
    assert len(slot) == 1
    spread = {ask(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", f"{{i{n}}}:p0") for n in range(50)}
    assert len(spread) > 1

    async def main() -> None:
        seeds = [coredis.connection.TCPLocation("127.0.0.1", n.port) for n in cluster.nodes[:2]]
        client: coredis.RedisCluster[bytes] = coredis.RedisCluster(
            startup_nodes=seeds, decode_responses=False
        )
        async with client:
            for n in range(100):
                await client.set(f"{{i{n}}}:meta".encode(), b"%d" % n)
            for n in range(100):
                assert await client.get(f"{{i{n}}}:meta".encode()) == b"%d" % n

    run_trio(main, 30)


def test_a_dead_node_is_gone_by_its_pid(tmp_path: Path) -> None:
    """The harness stops what it started: after kill() the process is reaped and its
    port refuses connections."""
    r = RedisProc(tmp_path)
    pid = r.proc.pid
    r.kill()
    assert r.proc.returncode is not None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "Could not connect" in ask(r.port, "PING")
