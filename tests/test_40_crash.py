"""Crash test: SIGKILL the data-dir server at random moments during a stream of commits.

After every restart the whole server must equal the state after the last acknowledged
commit, or after the one commit in flight applied whole (across all its segments).
Every page names its segment, number and generation, so a failure says which page is
stale or torn.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from pathlib import Path

from netmemfs.errors import NetmemError
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.helpers import ServerProc, describe_page, killed_after, run_trio, stamp_page

KILLS = int(os.environ.get("NETMEMFS_CRASH_KILLS", "50"))
SEGMENTS = {"a": 256, "b": 256, "c": 96, "big": 4200}  # big commits need staging
Model = dict[str, list[bytes | None]]


def _apply(model: Model, writes: list[PageRun]) -> Model:
    new = {name: list(pages) for name, pages in model.items()}
    for run in writes:
        for i in range(run.count):
            new[run.segment][run.first + i] = bytes(run.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
    return new


def _random_commit(rng: random.Random, gen: int) -> list[PageRun]:
    if rng.random() < 0.04:
        n = rng.randint(4097, SEGMENTS["big"])
        first = rng.randint(0, SEGMENTS["big"] - n)
        data = b"".join(stamp_page("big", first + i, gen) for i in range(n))
        return [PageRun("big", first, data)]
    writes = []
    for name in rng.sample(["a", "b", "c"], rng.randint(1, 3)):
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 32)
            first = rng.randint(0, SEGMENTS[name] - n)
            data = b"".join(stamp_page(name, first + i, gen) for i in range(n))
            writes.append(PageRun(name, first, data))
    return writes


def _differences(want: Model, got: dict[str, bytes]) -> list[str]:
    out = []
    for name, pages in want.items():
        for i, page in enumerate(pages):
            have = got[name][i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            if have != (page or bytes(PAGE_SIZE)):
                out.append(
                    f"{name} page {i}: want {describe_page(page or bytes(PAGE_SIZE))}, "
                    f"have {describe_page(have)}"
                )
    return out


class _CommitStream:
    """Commits one after another until the server is killed under it."""

    def __init__(self, srv: ServerProc, rng: random.Random, acked: Model, gen: int) -> None:
        self.srv, self.rng, self.acked, self.gen = srv, rng, acked, gen
        self.inflight: list[PageRun] | None = None
        self.count = 0

    async def run(self, kill_after_s: float) -> None:
        async with killed_after(self.srv, kill_after_s) as store:
            try:
                while True:
                    self.gen += 1
                    self.inflight = _random_commit(self.rng, self.gen)
                    await store.commit(self.inflight)
                    self.acked = _apply(self.acked, self.inflight)
                    self.inflight = None
                    self.count += 1
            except NetmemError:
                pass  # the server died under us, as planned


def test_kill_9_during_commits(server_factory: Callable[..., ServerProc], tmp_path: Path) -> None:
    seed = int(os.environ.get("NETMEMFS_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    seed_note = f"(NETMEMFS_CRASH_SEED={seed}, kills={KILLS})"
    srv = server_factory("--checkpoint-size", "3M", data_dir=tmp_path / "data")
    srv.expect_log("cutting a torn tail")
    acked: Model = {name: [None] * n for name, n in SEGMENTS.items()}

    async def setup() -> None:
        async with RemoteStore.connect(srv.address) as store:
            for name, n in SEGMENTS.items():
                await store.create(name, n * PAGE_SIZE)

    run_trio(setup)
    gen = 0
    stats = {"acked": 0, "inflight_landed": 0, "inflight_lost": 0}
    for kill in range(KILLS):
        stream = _CommitStream(srv, rng, acked, gen)
        run_trio(functools.partial(stream.run, kill_after_s=rng.uniform(0.002, 0.25)))
        acked, inflight, gen = stream.acked, stream.inflight, stream.gen
        stats["acked"] += stream.count
        srv.restart()

        async def read_all() -> dict[str, bytes]:
            async with RemoteStore.connect(srv.address) as store:
                return {name: await store.read_bytes(name, 0, n) for name, n in SEGMENTS.items()}

        got = run_trio(read_all)
        if not _differences(acked, got):
            if inflight is not None:
                stats["inflight_lost"] += 1
            continue
        assert inflight is not None, (
            f"kill {kill} {seed_note}: no commit was in flight, yet the state differs from the "
            "last acknowledged one:\n" + "\n".join(_differences(acked, got)[:20])
        )
        landed = _apply(acked, inflight)
        diffs = _differences(landed, got)
        assert not diffs, (
            f"kill {kill} {seed_note}: state is neither the last acknowledged commit nor the "
            f"in-flight commit (gen {gen}) applied whole:\n" + "\n".join(diffs[:20])
        )
        acked = landed
        stats["inflight_landed"] += 1
    print(f"crash test: {KILLS} kills, {stats}")
    assert stats["acked"] > KILLS, f"too few commits acknowledged to mean anything: {stats}"
