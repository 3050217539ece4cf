"""Layer 2b: the durable log, recovery from torn tails, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from netmemfs.ops import Create, Op, Write
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs_server.log import CorruptDataDir, LogPageStore
from netmemfs_server.store import MemoryPageStore
from tests.helpers import stamp_page


def _open(d: Path, checkpoint_bytes: int = 1 << 30) -> LogPageStore:
    return LogPageStore.open(d, capacity_bytes=None, checkpoint_bytes=checkpoint_bytes)


def _commit(store: LogPageStore, txn: bytes, ops: list[Op]) -> None:
    ops = store.settle(ops)
    store.append(txn, ops)
    store.apply(txn, ops)


def _snapshot(mem: MemoryPageStore) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for name, seg in mem.segments.items():
        _, runs = mem.read(name, 0, -(-seg.size // PAGE_SIZE))
        data = b"".join(bytes([r.first % 256]) + r.data for r in runs)
        out[name] = (seg.size, seg.version, data)
    return out


def _gen_ops(gen: int) -> list[Op]:
    pages = b"".join(stamp_page("s", p, gen) for p in range(gen % 3, gen % 3 + 2))
    return [Write(PageRun("s", gen % 3, pages))]


def test_truncation_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    d = tmp_path / "d"
    store = _open(d)
    _commit(store, b"t0", [Create("s", 8 * PAGE_SIZE)])
    _commit(store, b"t1", _gen_ops(1))
    before = _snapshot(store)
    size_before = (d / f"log.{store.gen:016d}").stat().st_size
    _commit(store, b"t2", _gen_ops(2))
    after = _snapshot(store)
    log_name = f"log.{store.gen:016d}"
    store.close()
    full = (d / log_name).read_bytes()
    step = 1 if len(full) - size_before < 200 else 37  # every byte near the header
    cuts = sorted(
        set(range(size_before, len(full) + 1, step))
        | set(range(size_before, size_before + 64))
        | {len(full)}
    )
    for cut in cuts:
        copy = tmp_path / f"c{cut}"
        shutil.copytree(d, copy)
        with open(copy / log_name, "r+b") as f:
            f.truncate(cut)
        got = _snapshot(_open(copy))
        assert got == (after if cut == len(full) else before), f"cut at byte {cut}"
        shutil.rmtree(copy)


def test_a_flipped_byte_in_the_tail_drops_only_that_commit(tmp_path: Path) -> None:
    store = _open(tmp_path)
    _commit(store, b"t0", [Create("s", 8 * PAGE_SIZE)])
    before = _snapshot(store)
    _commit(store, b"t1", _gen_ops(1))
    path = tmp_path / f"log.{store.gen:016d}"
    store.close()
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(raw)
    assert _snapshot(_open(tmp_path)) == before


def test_checkpoints_keep_state_and_exactly_once_table(tmp_path: Path) -> None:
    store = _open(tmp_path, checkpoint_bytes=3 * PAGE_SIZE)
    _commit(store, b"t0", [Create("s", 8 * PAGE_SIZE)])
    for gen in range(1, 12):
        _commit(store, b"t%d" % gen, _gen_ops(gen))
        if store.wants_checkpoint():
            store.checkpoint()
    assert store.checkpoints >= 3
    want = _snapshot(store)
    store.close()
    again = _open(tmp_path)
    assert _snapshot(again) == want
    assert again.lookup_txn(b"t5") == (("s", 6),)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("log.")) == [
        f"log.{again.gen:016d}"
    ]


def test_damage_before_the_last_log_refuses_to_start(tmp_path: Path) -> None:
    store = _open(tmp_path)
    _commit(store, b"t0", [Create("s", 8 * PAGE_SIZE)])
    _commit(store, b"t1", _gen_ops(1))
    first = tmp_path / f"log.{store.gen:016d}"
    store.close()
    (tmp_path / f"log.{store.gen + 1:016d}").write_bytes(b"")
    raw = bytearray(first.read_bytes())
    raw[-5] ^= 0xFF
    first.write_bytes(raw)
    with pytest.raises(CorruptDataDir, match="not a torn tail"):
        _open(tmp_path)
