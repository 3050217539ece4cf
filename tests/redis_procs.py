"""Real redis-server processes for tests (issue 16): a standalone one, and a cluster
made with `redis-cli --cluster create`, on free loopback ports, stopped by PID.

Debian's redis-server and redis-cli (scripts/setup installs them). Every server runs
without persistence in a directory of its own under the test's tmp dir; its log is
there too (redis.log), and a failure to start says where.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import wait_for

START_TIMEOUT_S = 15.0
CLUSTER_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_exe(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise AssertionError(f"no {name} on PATH: scripts/setup installs Debian's redis-server")
    return exe


def ask(port: int, *args: str, timeout_s: float = 2.0, cli: Sequence[str] = ()) -> str:
    """One command to 127.0.0.1:port through redis-cli (cli: more of its options, like
    --tls); its output, stripped."""
    done = subprocess.run(
        [redis_exe("redis-cli"), "-p", str(port), *cli, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return (done.stdout + done.stderr).strip()


class RedisProc:
    """A real redis-server on 127.0.0.1 and a free port; cluster=True: a cluster node
    (cluster-enabled, its nodes.conf in its own directory). args: more of redis-server's
    options, like ("--requirepass", "secret"). tls: (certificate, key, CA) files: it
    listens with TLS only."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        cluster: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.port = _free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.log_path = self.dir / "redis.log"
        cmd = [redis_exe("redis-server"), "--bind", "127.0.0.1"]
        self.cli: list[str] = []
        if tls is None:
            cmd += ["--port", str(self.port)]
        else:
            cert, key, ca = (str(f) for f in tls)
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            cmd += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca]
            self.cli = ["--tls", "--cacert", ca]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        cmd += ["--logfile", str(self.log_path), "--daemonize", "no"]
        cmd += ["--repl-diskless-sync-delay", "0", *args]
        if cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            # Its bus port given, not port + 10000 (which may be taken, or past 65535).
            self.bus_port = _free_port()
            cmd += ["--cluster-node-timeout", "2000", "--cluster-port", str(self.bus_port)]
            if tls is not None:
                cmd += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        self.cmd = cmd
        self.start()

    def start(self) -> None:
        """Start it (again, after kill(): a cluster node rejoins from its nodes.conf)."""
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        what = f"redis-server on port {self.port} to answer PING (its log: {self.log_path})"
        try:
            wait_for(
                lambda: (
                    self.proc.poll() is not None
                    or self.ask("PING") in ("PONG", "NOAUTH Authentication required.")
                ),
                what,
                START_TIMEOUT_S,
            )
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: it exited with {self.proc.returncode}")
        except AssertionError:
            self.kill()
            raise

    def ask(self, *args: str, timeout_s: float = 2.0) -> str:
        """One command to it through redis-cli; its output, stripped."""
        return ask(self.port, *args, timeout_s=timeout_s, cli=self.cli)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """It as --server names a Redis."""
        return f"redis://{self.address}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class RedisCluster:
    """masters * (1 + replicas) cluster nodes, joined by `redis-cli --cluster create`;
    ready when every node says cluster_state:ok with all 16384 slots assigned, sees
    every replica as one, and every replica has finished its first sync. node_args:
    more redis-server options for every node, like ("--maxmemory", "256mb")."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_args: tuple[str, ...] = (),
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.node_args = node_args
        self.tls = tls
        self.nodes: list[RedisProc] = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(RedisProc(workdir, *node_args, cluster=True, tls=tls))
            done = subprocess.run(
                [redis_exe("redis-cli"), *self.nodes[0].cli, "--cluster", "create"]
                + [n.address for n in self.nodes]
                + ["--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=CLUSTER_TIMEOUT_S,
            )
            if done.returncode != 0:
                raise AssertionError(f"redis-cli --cluster create failed:\n{done.stdout}")
            try:
                wait_for(
                    lambda: all(self._ready(n, masters * replicas) for n in self.nodes),
                    f"the cluster of {self.seeds} to be ready",
                    CLUSTER_TIMEOUT_S,
                )
            except AssertionError as e:
                states = {n.port: n.ask("CLUSTER", "INFO") for n in self.nodes}
                raise AssertionError(f"{e}: {states}") from None
        except BaseException:
            self.kill()
            raise

    def add_master(self) -> RedisProc:
        """A new, empty master joined with `redis-cli --cluster add-node`; returns once
        every node lists it as a master. It serves no slot until a rebalance."""
        node = RedisProc(self.workdir, *self.node_args, cluster=True, tls=self.tls)
        self.nodes.append(node)
        done = subprocess.run(
            [
                *(redis_exe("redis-cli"), *node.cli, "--cluster", "add-node"),
                *(node.address, self.nodes[0].address),
            ],
            capture_output=True,
            text=True,
            timeout=CLUSTER_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise AssertionError(f"redis-cli --cluster add-node failed:\n{done.stdout}")
        wait_for(
            lambda: all(
                f"{node.address}@" in n.ask("CLUSTER", "NODES")
                and "cluster_state:ok" in n.ask("CLUSTER", "INFO")
                for n in self.nodes
            ),
            f"every node of the cluster to know the new master {node.address}",
            CLUSTER_TIMEOUT_S,
        )
        return node

    def master_of(self, slot: int, seen_by: RedisProc | None = None) -> RedisProc:
        """The master serving slot, as seen_by's (else the first node's) CLUSTER NODES
        says."""
        for line in (seen_by or self.nodes[0]).ask("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2].split(","):
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no master serves slot {slot}")

    def move_slot(self, slot: int, to: RedisProc) -> None:
        """Move one hash slot and its keys to the master `to`, the steps redis-cli's
        reshard takes (IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE); returns once every
        node says `to` serves it."""
        src = self.master_of(slot)
        src_id, to_id = src.ask("CLUSTER", "MYID"), to.ask("CLUSTER", "MYID")
        for node, how, other in ((to, "IMPORTING", src_id), (src, "MIGRATING", to_id)):
            out = node.ask("CLUSTER", "SETSLOT", str(slot), how, other)
            assert out == "OK", f"CLUSTER SETSLOT {slot} {how} on {node.address}: {out}"
        while keys := src.ask("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
            out = src.ask(
                "MIGRATE",
                "127.0.0.1",
                str(to.port),
                "",
                "0",
                "5000",
                "KEYS",
                *keys,
            )
            assert out == "OK", f"MIGRATE of slot {slot} from {src.address}: {out}"
        for node in self.nodes:
            node.ask("CLUSTER", "SETSLOT", str(slot), "NODE", to_id)
        wait_for(
            lambda: all(self.master_of(slot, n) is to for n in self.nodes),
            f"every node to see slot {slot} on {to.address}",
            CLUSTER_TIMEOUT_S,
        )

    @staticmethod
    def _ready(node: RedisProc, replicas: int) -> bool:
        """node sees all slots served and every replica as one (roles spread by gossip
        after `create` returns)."""
        info = node.ask("CLUSTER", "INFO")
        if "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
            return False
        flags = [line.split()[2] for line in node.ask("CLUSTER", "NODES").splitlines()]
        if sum("slave" in f.split(",") for f in flags) != replicas:
            return False
        # A replica serves once its first sync is done (a master's WAIT counts it then).
        role = node.ask("INFO", "REPLICATION")
        return "role:master" in role or "master_link_status:up" in role

    @property
    def seeds(self) -> str:
        """The nodes as a --server list would name them: HOST:PORT,HOST:PORT,..."""
        return ",".join(n.address for n in self.nodes)

    @property
    def url(self) -> str:
        """It as --server names a Redis Cluster: two seeds (the client finds the rest)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://" + ",".join(n.address for n in self.nodes[:2])

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
