"""Crash test of the mount: SIGKILL the daemon during a stream of fsyncs and namespace
changes, start it again with the same cache dir, and check the server holds, for every
file, exactly the last acknowledged commit or the one in flight applied whole, and a
namespace that is the last acknowledged one or that with the change in flight made."""

from __future__ import annotations

import os
import random
import selectors
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from netmemfs.connect import connect_store
from netmemfs.pages import PAGE_SIZE
from netmemfs_server.store import ROOT_INO
from tests.helpers import MountProc, describe_page, run_trio, stamp_page
from tests.mount_writer import NS, PAGES

# name in ns/ -> (kind "d", "f" or "l", which inode: the gen that made it; a hard link
# shares it)
Names = dict[str, tuple[str, int]]

KILLS = int(os.environ.get("NETMEMFS_MOUNT_KILLS", "20"))
FILES = ("f0", "f1", "f2")
Model = dict[str, dict[int, int]]  # file -> page -> generation (absent: zeros)


def _expected(model: Model, name: str) -> bytes:
    pages = model[name]
    return b"".join(
        stamp_page(name, p, pages[p]) if p in pages else bytes(PAGE_SIZE) for p in range(PAGES)
    )


def _server_state(address: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        async with connect_store(address) as store:
            out = {}
            for name in FILES:
                ino = (await store.lookup(ROOT_INO, name)).ino
                out[name] = (await store.read_inode(ino, 0, PAGES)).to_bytes()
            return out

    return run_trio(read)


def _kinds(names: Names) -> dict[str, str]:
    return {name: kind for name, (kind, _) in names.items()}


def _server_names(address: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        async with connect_store(address) as store:
            ns = await store.lookup(ROOT_INO, NS)
            kinds = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l"}
            return {n: kinds[stat.S_IFMT(m)] for n, _, m in await store.readdir(ns.ino)}

    return run_trio(read)


def _ns_apply(names: Names, gen: int, op: str, a: str, b: str) -> Names | None:
    """names after op (made in gen) as POSIX does it, or None if POSIX refuses it."""
    out = dict(names)
    kind = names[a][0] if a in names else None
    if op in ("mkdir", "create", "symlink"):
        if kind is not None:
            return None
        out[a] = ({"mkdir": "d", "create": "f", "symlink": "l"}[op], gen)
    elif op == "link":
        if kind not in ("f", "l") or b in names:
            return None
        out[b] = names[a]
    elif op in ("unlink", "rmdir"):
        if kind is None or (kind == "d") != (op == "rmdir"):
            return None
        del out[a]
    else:
        if kind is None:
            return None
        if names.get(b) == names[a]:
            return out  # two names of one inode (or one name): rename does nothing
        if b in names and (names[b][0] == "d") != (kind == "d"):
            return None
        out[b] = out.pop(a)
    return out


def _diff(want: bytes, got: bytes) -> str:
    for p in range(PAGES):
        a, b = want[p * PAGE_SIZE : (p + 1) * PAGE_SIZE], got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        if a != b:
            return f"page {p}: want {describe_page(a)}, have {describe_page(b)}"
    return "equal"


def test_kill_9_of_the_mount_daemon_during_fsyncs(
    any_store: str, mount_factory: Callable[..., MountProc], tmp_path: Path
) -> None:
    seed = int(os.environ.get("NETMEMFS_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    note = f"(NETMEMFS_CRASH_SEED={seed})"
    mnt = mount_factory(any_store, "--timeout", "2")
    mnt.expect_log("holds the mount of a daemon that died")
    for name in FILES:
        with open(mnt.path(name), "wb") as f:
            f.truncate(PAGES * PAGE_SIZE)
            f.flush()
            os.fsync(f.fileno())
    os.mkdir(mnt.path(NS))
    model: Model = {name: {} for name in FILES}
    names: Names = {}
    ns_stats = {"acked": 0, "refused": 0, "inflight_landed": 0, "inflight_dropped": 0}
    gen = 0
    stats = {"acked": 0, "inflight_landed": 0, "inflight_dropped": 0}
    for kill in range(KILLS):
        writer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.mount_writer",
                str(mnt.mountpoint),
                str(rng.randrange(1 << 30)),
                str(gen),
            ],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert writer.stdout is not None
        fd = writer.stdout.fileno()
        # Read the writer's reports (raw: no buffer may hide a line) until a random
        # moment, then kill the daemon; the moment of the crash is what varies.
        raw = b""
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        ready_by = time.monotonic() + 30
        while b"ready\n" not in raw:
            assert sel.select(max(0, ready_by - time.monotonic())), "writer never got ready"
            chunk = os.read(fd, 65536)
            assert chunk, "writer died before it got ready"
            raw += chunk
        t_kill = time.monotonic() + rng.uniform(0.02, 0.4)
        while (left := t_kill - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            raw += chunk
        mnt.kill()
        while chunk := os.read(fd, 65536):
            raw += chunk
        sel.close()
        writer.stdout.close()
        assert writer.wait(60) is not None
        lines = raw.decode().splitlines()
        inflight: tuple[str, int, list[int]] | None = None
        ns_inflight: tuple[int, str, str, str] | None = None
        for line in lines:
            word, *rest = line.split()
            if word == "nsbegin":
                ns_inflight = (int(rest[0]), rest[1], rest[2], rest[3])
                gen = max(gen, int(rest[0]))
            elif word in ("nsacked", "nsrefused"):
                assert ns_inflight is not None
                after = _ns_apply(names, *ns_inflight)
                assert (after is None) == (word == "nsrefused"), (
                    f"kill {kill} {note}: the mount answered {ns_inflight} with {line!r} in {names}"
                )
                names = names if after is None else after
                ns_inflight = None
                ns_stats["acked" if after is not None else "refused"] += 1
            elif word == "begin":
                inflight = (rest[0], int(rest[1]), [int(x) for x in rest[2:]])
                gen = max(gen, int(rest[1]))
            elif word == "acked":
                assert inflight is not None and inflight[1] == int(rest[1])
                name, g, pages = inflight
                for p in pages:
                    model[name][p] = g
                inflight = None
                stats["acked"] += 1
        mnt.start()  # same cache dir: a sealed commit is finished now
        got_names = _server_names(any_store)
        if got_names != _kinds(names):
            made = _ns_apply(names, *ns_inflight) if ns_inflight is not None else None
            assert made is not None and got_names == _kinds(made), (
                f"kill {kill} {note}: ns/ holds {got_names}: neither the last acknowledged "
                f"{names} nor that with {ns_inflight} made"
            )
            names = made
            ns_stats["inflight_landed"] += 1
        elif ns_inflight is not None:
            ns_stats["inflight_dropped"] += 1
        got = _server_state(any_store)
        for name in FILES:
            want = _expected(model, name)
            if got[name] == want:
                continue
            assert inflight is not None and inflight[0] == name, (
                f"kill {kill} {note}: {name} is not its last acknowledged commit and had "
                f"none in flight: {_diff(want, got[name])}"
            )
        if inflight is not None:
            name, g, pages = inflight
            landed = {**model[name], **dict.fromkeys(pages, g)}
            if got[name] == _expected({name: landed}, name):
                model[name] = landed
                stats["inflight_landed"] += 1
            else:
                assert got[name] == _expected(model, name), (
                    f"kill {kill} {note}: {name} is neither its last acknowledged commit nor "
                    f"the one in flight (gen {g}) applied whole: "
                    f"{_diff(_expected({name: landed}, name), got[name])}"
                )
                stats["inflight_dropped"] += 1
    print(f"mount crash test: {KILLS} kills, {stats}, namespace: {ns_stats}")
    assert stats["acked"] >= KILLS, f"too few commits acknowledged to mean anything: {stats}"
    assert ns_stats["acked"] >= KILLS, f"too few namespace changes acknowledged: {ns_stats}"
