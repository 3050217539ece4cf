"""Crash test: SIGKILL the process that owns a region while it syncs (issue 4).

Each round a worker maps the segment (8 MiB, 2 MiB budget, so pages are evicted and
staged before the sync), stamps every page with the round's generation, and syncs; the
test kills it at a random moment after it said "syncing". The segment must then hold
one generation whole: the last one known synced, or a later one, never a mix.
NETMEMFS_ANON_KILLS sets the rounds (20), NETMEMFS_CRASH_SEED replays a run.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections import Counter

from netmemfs import anon
from tests.anon_worker import PAGE, describe, stamp
from tests.helpers import ServerProc, pid_alive, wait_for
from tests.test_70_anon import Worker, _agent_pid, _python

KILLS = int(os.environ.get("NETMEMFS_ANON_KILLS", "20"))
SIZE, BUDGET = 8 << 20, 2 << 20


def _generation(server: ServerProc, low: int, high: int) -> int:
    """The one generation every page of the segment holds (0: never synced)."""
    with anon.map(SIZE, segment="crash", server=server.address) as region:
        first = region[0:PAGE]
        gen = 0 if first == bytes(PAGE) else int.from_bytes(first[8:16], "little")
        assert low <= gen <= high, f"page 0 has gen {gen}; expected {low}..{high}"
        for n in range(SIZE // PAGE):
            page = region[n * PAGE : (n + 1) * PAGE]
            want = bytes(PAGE) if gen == 0 else stamp(n, gen)
            assert page == want, f"torn: page 0 has gen {gen}, page {n} has {describe(page)}"
    return gen


def _gone(pid: int) -> bool:
    return not pid_alive(pid)


def _sync_seconds(server: ServerProc) -> float:
    """How long one sync of the crash region takes here (to aim the kills)."""
    w = Worker(_python("write", server, "timing", SIZE, BUDGET, 1))
    assert w.proc.stdout is not None
    assert w.proc.stdout.readline() == "syncing\n"
    t0 = time.monotonic()
    assert w.proc.stdout.readline() == "synced\n"
    took = time.monotonic() - t0
    code, _, err = w.run_sampling()
    assert code == 0, err
    return took


def test_kill_owner_during_sync(server: ServerProc) -> None:
    seed = int(os.environ.get("NETMEMFS_CRASH_SEED", str(random.randrange(1 << 30))))
    print(f"NETMEMFS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    # An agent cut off mid-commit leaves the server half a frame: expected, and dropped.
    server.expect_log(r"connection closed in the middle of a frame")
    aim = _sync_seconds(server) * 1.5
    confirmed = 0  # the last generation whose sync the worker reported done
    outcomes: Counter[str] = Counter()
    for gen in range(1, KILLS + 1):
        w = Worker(_python("write", server, "crash", SIZE, BUDGET, gen))
        assert w.proc.stdout is not None
        assert w.proc.stdout.readline() == "syncing\n", f"round {gen}: the worker failed"
        agent = _agent_pid(w.proc.pid)
        time.sleep(rng.uniform(0, aim))  # where to inject the crash, not coordination
        w.proc.send_signal(signal.SIGKILL)
        out, _ = w.proc.communicate(timeout=30)
        if "synced" in out:
            confirmed = gen
        # The agent sees its socket close and exits; only then is the round over.
        wait_for(functools.partial(_gone, agent), f"agent {agent} to exit")
        got = _generation(server, confirmed, gen)
        outcomes["new" if got == gen else "old"] += 1
        confirmed = got
    print(f"rounds: {dict(outcomes)}")
