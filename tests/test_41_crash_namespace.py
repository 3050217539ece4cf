"""Crash test of the namespace: SIGKILL the data-dir server at random moments during a
stream of Change transactions (mkdir, create, symlink, link, unlink, rmdir, rename,
exchange, writes), issue 13.

The model is a MemoryPageStore of our own that takes the same changes. After every
restart the server's tree (each path's inode number, mode, link count, size, target)
must equal the model after the last acknowledged change, or after the one in flight,
applied whole: never half a rename. Inode numbers must match too, so a replay hands out
the numbers the first run did.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

from netmemfs.errors import NetmemError
from netmemfs.ops import (
    RENAME_EXCHANGE,
    InodeOp,
    Link,
    MakeNode,
    Move,
    Rmdir,
    Truncate,
    Unlink,
    WritePages,
)
from netmemfs.pages import PAGE_SIZE
from netmemfs.remote import RemoteStore
from netmemfs_server.store import ROOT_INO, MemoryPageStore
from tests.helpers import ServerProc, killed_after, run_trio, stamp_page

KILLS = int(os.environ.get("NETMEMFS_CRASH_KILLS", "50")) // 2
NAMES = ["a", "b", "c", "d", "e"]  # few, so names collide and renames replace
Tree = dict[str, tuple[int, int, int, int, bytes]]


def _model_tree(s: MemoryPageStore) -> Tree:
    out: Tree = {}

    def walk(ino: int, path: str) -> None:
        n = s.inodes[ino]
        out[path or "/"] = (ino, n.mode, n.nlink, n.size, n.target)
        for name, child in (n.entries or {}).items():
            walk(child, f"{path}/{name}")

    walk(ROOT_INO, "")
    return out


async def _server_tree(store: RemoteStore) -> Tree:
    out: Tree = {}

    async def walk(ino: int, path: str) -> None:
        st = await store.getattr(ino)
        out[path or "/"] = (st.ino, st.mode, st.nlink, st.size, st.target)
        if stat.S_ISDIR(st.mode):
            for name, child, _ in await store.readdir(ino):
                await walk(child, f"{path}/{name}")

    await walk(ROOT_INO, "")
    return out


def _random_change(rng: random.Random, model: MemoryPageStore, gen: int) -> list[InodeOp]:
    """1-3 ops the model accepts as one transaction."""
    while True:
        ops = [_random_op(rng, model, gen) for _ in range(rng.randint(1, 3))]
        try:
            model.check(ops)
        except NetmemError:
            continue
        return ops


def _random_op(rng: random.Random, model: MemoryPageStore, gen: int) -> InodeOp:
    dirs = [i for i, n in model.inodes.items() if n.entries is not None]
    named = [(d, name) for d in dirs for name in model.inodes[d].entries or {}]
    files = [i for i, n in model.inodes.items() if n.data is not None]
    d, name = rng.choice(dirs), rng.choice(NAMES)
    kind = rng.random()
    if kind < 0.2:
        return MakeNode(d, name, stat.S_IFDIR | 0o755)
    if kind < 0.4:
        return MakeNode(d, name, stat.S_IFREG | 0o644)
    if kind < 0.45:
        return MakeNode(d, name, stat.S_IFLNK | 0o777, target=f"t{gen}".encode())
    if kind < 0.55 and files:
        return Link(rng.choice(files), d, name)
    if kind < 0.65 and files:
        f = rng.choice(files)
        return Truncate(f, rng.randint(0, 3) * PAGE_SIZE)
    if kind < 0.7 and files:
        f = rng.choice(files)
        return WritePages(f, 0, stamp_page(f"i{f}", 0, gen))
    if kind < 0.8 and named:
        src = rng.choice(named)
        return Move(*src, d, name, RENAME_EXCHANGE if rng.random() < 0.2 else 0)
    if named:
        src = rng.choice(named)
        return Rmdir(*src) if rng.random() < 0.5 else Unlink(*src)
    return MakeNode(d, name, stat.S_IFDIR | 0o755)


class _ChangeStream:
    def __init__(self, srv: ServerProc, rng: random.Random, model: MemoryPageStore) -> None:
        self.srv, self.rng, self.acked = srv, rng, model
        self.inflight: list[InodeOp] | None = None
        self.count = 0

    async def run(self, kill_after_s: float, gen: int) -> None:
        async with killed_after(self.srv, kill_after_s) as store:
            try:
                while True:
                    gen += 1
                    self.inflight = _random_change(self.rng, self.acked, gen)
                    await store.change(self.inflight)
                    self.acked.apply(f"m{gen}".encode(), self.acked.settle(self.inflight))
                    self.inflight = None
                    self.count += 1
            except NetmemError:
                pass  # the server died under us, as planned


def test_kill_9_during_namespace_changes(
    server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    seed = int(os.environ.get("NETMEMFS_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    note = f"(NETMEMFS_CRASH_SEED={seed}, kills={KILLS})"
    srv = server_factory("--checkpoint-size", "64K", data_dir=tmp_path / "data")
    srv.expect_log("cutting a torn tail")
    model = MemoryPageStore()
    stats = {"acked": 0, "inflight_landed": 0, "inflight_lost": 0}
    for kill in range(KILLS):
        stream = _ChangeStream(srv, rng, model)
        gen = 1000 * kill
        run_trio(functools.partial(stream.run, rng.uniform(0.002, 0.2), gen))
        model, inflight = stream.acked, stream.inflight
        stats["acked"] += stream.count
        srv.restart()

        async def read_tree() -> Tree:
            async with RemoteStore.connect(srv.address) as store:
                return await _server_tree(store)

        got = run_trio(read_tree)
        if got == _model_tree(model):
            stats["inflight_lost"] += inflight is not None
            continue
        assert inflight is not None, (
            f"kill {kill} {note}: no change was in flight, yet the tree differs from the "
            f"last acknowledged one:\n{_diff(_model_tree(model), got)}"
        )
        landed = copy.deepcopy(model)
        landed.apply(b"landed", landed.settle(inflight))
        assert got == _model_tree(landed), (
            f"kill {kill} {note}: the tree is neither the last acknowledged change nor the "
            f"one in flight ({inflight}) applied whole:\n{_diff(_model_tree(landed), got)}"
        )
        model = landed
        stats["inflight_landed"] += 1
    print(f"namespace crash test: {KILLS} kills, {stats}")
    assert stats["acked"] > KILLS, f"too few changes acknowledged to mean anything: {stats}"


def _diff(want: Tree, got: Tree) -> str:
    paths = [p for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)]
    return "\n".join(f"  {p}: want {want.get(p)}, have {got.get(p)}" for p in paths[:20])
