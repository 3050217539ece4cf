"""Durable page store: a write-ahead log plus checkpoints in a data directory.

Where it sits: below serve.py, beside store.py (it replays into a MemoryPageStore and
never touches the network). The on-disk format is described in docs/protocol.md
("Data directory"). Files in DIR:

    checkpoint        the whole state as of the end of log generation C (may be absent)
    log.<gen>         commit records appended after that, one file per generation

Each record is framed by netmemfs.records: magic (4 bytes), payload length (u32 BE),
CRC-32 of the payload (u32 BE), payload (msgpack). A commit is one record, fsynced
before it is acknowledged, so after a crash it is either wholly in the log or it is the
torn tail that recovery cuts off.
Checkpoints are written to checkpoint.tmp, fsynced, renamed over checkpoint and the
directory fsynced; only then are the logs it covers removed.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import trio

from netmemfs.errors import NetmemError, ServerError
from netmemfs.ops import Op, as_int, item_to_op, name_bytes, name_str, op_to_item
from netmemfs.progress import Progress
from netmemfs.records import encode_record, pwrite_all, read_records
from netmemfs_server.store import CHECKPOINT_FIELDS, ROOT_INO, Inode, MemoryPageStore, Outcome

log = logging.getLogger("netmemfs.server.log")

LOG_MAGIC = b"NMLG"
CKPT_MAGIC = b"NMCK"
# 1: segments by name (before inodes); 2: inodes. Format 1 is read and converted at start.
FORMAT_VERSION = 2
TXNS_PER_CHECKPOINT_RECORD = 4096
_LOG_NAME = re.compile(r"^log\.(\d{16})$")


class CorruptDataDir(NetmemError):
    """The data directory holds damage that is not a torn tail: refuse to guess."""


class NewerFormat(CorruptDataDir):
    """The data directory was written by a newer netmemfs-server."""


def _log_path(data_dir: Path, gen: int) -> Path:
    return data_dir / f"log.{gen:016d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- ops <-> records -------------------------------------------------------------------


def ops_to_payload(txn: bytes, ops: Sequence[Op]) -> list[object]:
    return ["commit", txn, [op_to_item(op) for op in ops]]


def payload_to_ops(obj: object) -> tuple[bytes, list[Op]]:
    try:
        assert isinstance(obj, list) and len(obj) == 3
        kind, txn, items = obj
        assert kind == "commit" and isinstance(txn, bytes)
        return txn, [item_to_op(item) for item in items]
    except (ValueError, TypeError, IndexError, AssertionError) as e:
        raise CorruptDataDir(f"a log record that passed its checksum is not a commit: {e}") from e


# --- the store -------------------------------------------------------------------------


class LogPageStore(MemoryPageStore):
    """The memory store, whose every commit reaches a log on disk first; checkpoints
    of the whole state keep the log short. Made by open(), which recovers it.

    Not thread-safe: commit() and maintain() run append() and checkpoint() one at a time
    (the server's commit lock), in worker threads; the event loop meanwhile only reads.
    """

    durable = True

    def __init__(self, data_dir: Path, capacity_bytes: int | None, checkpoint_bytes: int):
        """An empty store over data_dir's log (open() fills it, then _open_log)."""
        super().__init__(capacity_bytes)
        self.data_dir = data_dir
        self.gen = 0
        self.checkpoint_bytes = checkpoint_bytes
        self._fd = -1
        self.log_bytes = 0
        self._broken: str | None = None

    def _open_log(self, gen: int) -> None:
        self.gen = gen
        path = _log_path(self.data_dir, gen)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.log_bytes = os.fstat(self._fd).st_size

    @classmethod
    def open(
        cls, data_dir: Path, *, capacity_bytes: int | None, checkpoint_bytes: int
    ) -> LogPageStore:
        """Recover the state in data_dir (creating it if need be) and open it for appends."""
        data_dir.mkdir(parents=True, exist_ok=True)
        store = cls(data_dir, capacity_bytes, checkpoint_bytes)
        covered, fmt = 0, FORMAT_VERSION
        ckpt = data_dir / "checkpoint"
        gens = sorted(int(m.group(1)) for p in data_dir.iterdir() if (m := _LOG_NAME.match(p.name)))
        ckpt_bytes = ckpt.stat().st_size if ckpt.exists() else 0
        sizes = {g: _log_path(data_dir, g).stat().st_size for g in gens}
        # An upper bound: logs the checkpoint covers are only removed below.
        total = ckpt_bytes + sum(sizes.values())
        with Progress(f"recovering {data_dir}", total, logger=log) as progress:
            if ckpt.exists():
                covered, fmt = _load_checkpoint(ckpt, store, progress.update)
                store.checkpointed_at = ckpt.stat().st_mtime
            (data_dir / "checkpoint.tmp").unlink(missing_ok=True)
            for gen in gens:
                if gen <= covered:
                    _log_path(data_dir, gen).unlink()
            live = [g for g in gens if g > covered]
            progress.total = ckpt_bytes + sum(sizes[g] for g in live)
            base = ckpt_bytes
            for i, gen in enumerate(live):
                path = _log_path(data_dir, gen)
                _replay_log(path, store, last=i == len(live) - 1, on_record=_at(progress, base))
                base += sizes[gen]
        store._open_log(live[-1] if live else covered + 1)
        _fsync_dir(data_dir)
        log.info(
            "recovered %d inodes, %d pages from %s (checkpoint covers log %d, replayed %d logs)",
            len(store.inodes),
            store.used_pages,
            data_dir,
            covered,
            len(live),
        )
        if fmt < FORMAT_VERSION:
            # Written at once, so the directory is in today's format from here on.
            store.checkpoint()
            log.info(
                "converted %s from format %d to %d: each segment is a file of the root directory",
                data_dir,
                fmt,
                FORMAT_VERSION,
            )
        return store

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ServerError(
                f"the data directory {self.data_dir} could not be written ({self._broken}); "
                "commits are refused until the server is restarted"
            )

    def append(self, txn: bytes, ops: Sequence[Op]) -> None:
        """Write one commit record and fsync it. Blocking: call from a worker thread."""
        self._check_usable()
        parts = encode_record(LOG_MAGIC, ops_to_payload(txn, ops))
        try:
            n = pwrite_all(self._fd, parts, self.log_bytes)  # the file ends at log_bytes
            os.fsync(self._fd)
        except OSError as e:
            self._cut_back(e)
            raise ServerError(
                f"could not append to the log in {self.data_dir}: {e.strerror}; "
                "free space there and retry the commit"
            ) from e
        self.log_bytes += n

    def _cut_back(self, err: OSError) -> None:
        """Remove a partial record after a failed write, or stop taking commits."""
        try:
            os.ftruncate(self._fd, self.log_bytes)
            os.fsync(self._fd)
        except OSError as e2:
            self._broken = f"{err.strerror}, then {e2.strerror} while undoing it"
            log.error("log %d is unusable: %s", self.gen, self._broken)

    def wants_checkpoint(self) -> bool:
        return self.log_bytes >= self.checkpoint_bytes

    def checkpoint(self) -> None:
        """Write the whole state, then start a new log. Blocking: call from a thread.

        The event loop may read `mem` meanwhile but nothing may change it.
        """
        self._check_usable()
        old_gen = self.gen
        tmp = self.data_dir / "checkpoint.tmp"
        with open(tmp, "wb") as f:
            for record in _checkpoint_records(self, old_gen):
                f.writelines(encode_record(CKPT_MAGIC, record))
            f.flush()
            os.fsync(f.fileno())
        new_fd = os.open(
            _log_path(self.data_dir, old_gen + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        os.replace(tmp, self.data_dir / "checkpoint")
        _fsync_dir(self.data_dir)
        os.close(self._fd)
        self._fd, self.gen, self.log_bytes = new_fd, old_gen + 1, 0
        _log_path(self.data_dir, old_gen).unlink()
        self.checkpoints += 1
        self.checkpointed_at = time.time()

    async def commit(self, txn: bytes, ops: Sequence[Op]) -> None:
        # The log first (its fsync is the durability), then what reads see: a
        # record appended but not applied would be applied twice after a retry,
        # which the caller's shield rules out.
        await trio.to_thread.run_sync(self.append, txn, ops)
        self.apply(txn, ops)

    async def maintain(self) -> None:
        if not self.wants_checkpoint():
            return
        try:
            await trio.to_thread.run_sync(self.checkpoint)
        except OSError as e:
            log.error(
                "checkpoint of %s failed (%s); the log keeps growing until one succeeds: "
                "free space there",
                self.data_dir,
                e,
            )

    def close(self) -> None:
        os.close(self._fd)


ENTRIES_PER_CHECKPOINT_RECORD = 4096


def _checkpoint_records(mem: MemoryPageStore, covers_gen: int) -> Iterator[object]:
    """Format 2: every inode (a file's chunks follow it), then each directory's names,
    then the remembered transactions."""
    yield ["head", FORMAT_VERSION, covers_gen, len(mem.inodes), mem.next_ino]
    for node in mem.inodes.values():
        yield ["inode", *(getattr(node, f) for f in CHECKPOINT_FIELDS)]
        if node.data is not None:
            for ci, mask, chunk in node.data.chunk_items():
                yield ["chunk", ci, mask, chunk]
    for ino, node in mem.inodes.items():
        names = list((node.entries or {}).items())
        for i in range(0, len(names), ENTRIES_PER_CHECKPOINT_RECORD):
            part = names[i : i + ENTRIES_PER_CHECKPOINT_RECORD]
            yield ["entries", ino, [[name_bytes(n), e] for n, e in part]]
    txns = list(mem.committed.items())
    for i in range(0, len(txns), TXNS_PER_CHECKPOINT_RECORD):
        batch = txns[i : i + TXNS_PER_CHECKPOINT_RECORD]
        yield [
            "txns",
            [
                [t, [list(v) for v in o.versions], [list(v) for v in o.inodes], list(o.created)]
                for t, o in batch
            ],
        ]
    yield ["end"]


def _at(progress: Progress, base: int) -> Callable[[int], None]:
    """A record ended at this offset of a file that starts base bytes into the work."""
    return lambda end: progress.update(base + end)


def _load_checkpoint(
    path: Path, mem: MemoryPageStore, on_record: Callable[[int], None] = lambda end: None
) -> tuple[int, int]:
    """Load path into mem (empty); (the log generation it covers, its format). Format
    1's segments become regular files of the root directory, numbered in their order.
    on_record: told the offset where each record read ends."""
    covers = -1
    fmt = 0
    node: Inode | None = None
    ended = False
    with open(path, "rb") as f:
        try:
            for end, rec in read_records(f, CKPT_MAGIC):
                on_record(end)
                assert isinstance(rec, list)
                tag = rec[0]
                if tag == "head":
                    fmt = rec[1]
                    if fmt > FORMAT_VERSION:
                        raise NewerFormat(
                            f"{path} has format {fmt}, written by a newer netmemfs-server; "
                            f"this one reads formats 1 to {FORMAT_VERSION}: upgrade it"
                        )
                    covers = rec[2]
                    if fmt >= 2:
                        mem.next_ino = as_int(rec[4])
                elif tag == "inode":
                    node = _load_inode(mem, rec)
                elif tag == "seg" and fmt == 1:
                    node = _load_segment(mem, rec)
                elif tag == "chunk":
                    assert node is not None and node.data is not None
                    node.data.load_chunk(rec[1], rec[2], rec[3])
                    mem.used_pages += rec[2].bit_count()
                elif tag == "entries":
                    entries = mem.inodes[rec[1]].entries
                    assert entries is not None
                    entries.update((name_str(n), as_int(e)) for n, e in rec[2])
                elif tag == "txns":
                    for t, *rest in rec[1]:
                        vs = rest[0]
                        inodes, created = (rest[1], rest[2]) if fmt >= 2 else ((), ())
                        outcome = Outcome(
                            tuple((n, v) for n, v in vs),
                            tuple((i, v) for i, v in inodes),
                            tuple(created),
                        )
                        mem.remember(t, outcome)
                elif tag == "end":
                    ended = True
        except (AssertionError, ValueError, TypeError, IndexError, KeyError) as e:
            raise CorruptDataDir(f"{path} is damaged ({e!r}); restore it from a backup") from e
    if covers < 0 or not ended:
        raise CorruptDataDir(
            f"{path} is incomplete or damaged (checkpoints are renamed into place only "
            "when whole, so this is not a crash); restore it from a backup"
        )
    # Orphans (no name left, some client held them) are kept like any inode.
    mem.orphans = {ino for ino, n in mem.inodes.items() if n.nlink == 0 and ino != ROOT_INO}
    return int(covers), fmt


def _load_inode(mem: MemoryPageStore, rec: list[object]) -> Inode:
    values = dict(zip(CHECKPOINT_FIELDS, rec[1:], strict=True))
    target = values.pop("target")
    assert isinstance(target, bytes)
    n = {k: as_int(v) for k, v in values.items()}
    node = Inode(n["ino"], n["mode"], n["uid"], n["gid"])
    node.target = target
    for f in ("atime_ns", "mtime_ns", "ctime_ns", "nlink", "version", "rdev", "parent"):
        setattr(node, f, n[f])
    if node.data is not None:
        node.data.size = n["size"]
    if node.ino == ROOT_INO:
        mem.root = node
    mem.inodes[node.ino] = node
    return node


def _load_segment(mem: MemoryPageStore, rec: list[object]) -> Inode:
    """Format 1's segment rec: a regular file of the root directory, with a new number."""
    _, name, size, version = rec
    node = Inode(mem.next_ino, stat.S_IFREG | 0o644)
    mem.next_ino += 1
    assert node.data is not None
    node.data.size, node.version = as_int(size), as_int(version)
    mem.inodes[node.ino] = node
    assert mem.root.entries is not None
    mem.root.entries[name_str(name)] = node.ino
    return node


def _replay_log(
    path: Path,
    mem: MemoryPageStore,
    *,
    last: bool,
    on_record: Callable[[int], None] = lambda end: None,
) -> None:
    size = path.stat().st_size
    end = 0
    with open(path, "rb") as f:
        for end, rec in read_records(f, LOG_MAGIC):
            on_record(end)
            txn, ops = payload_to_ops(rec)
            try:
                mem.check(ops, enforce_capacity=False)
            except NetmemError as e:
                raise CorruptDataDir(f"{path}: a logged commit no longer applies: {e}") from e
            mem.apply(txn, ops)
    if end == size:
        return
    if not last:
        raise CorruptDataDir(
            f"{path} is damaged at byte {end} of {size}, yet a later log exists, so this is "
            "not a torn tail from a crash; restore the data directory from a backup"
        )
    log.warning(
        "cutting a torn tail of %d bytes off %s (a commit never acknowledged)", size - end, path
    )
    with open(path, "r+b") as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
