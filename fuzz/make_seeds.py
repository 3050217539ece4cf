"""Write the seed corpora of the fuzz targets: real files, cut into the harnesses' form.

    .venv/bin/python fuzz/make_seeds.py       # fills fuzz/corpus/{frames,journal}/

Seeds are made, not kept: fuzz/run makes them before each run.
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

from netmemfs import journal
from netmemfs import protocol as p
from netmemfs.ops import Create, Op, Resize, Write
from netmemfs.records import read_records
from netmemfs_server import log as server_log

HERE = Path(__file__).resolve().parent


def _as_input(kind: int, path: Path, magic: bytes) -> bytes:
    out = bytearray([kind])
    with open(path, "rb") as f:
        assert any(True for _ in read_records(f, magic)), f"{path} holds no record"
    raw = path.read_bytes()
    i = 0
    while i + 12 <= len(raw):
        (n,) = struct.unpack_from(">I", raw, i + 4)
        out += struct.pack(">H", n) + raw[i + 12 : i + 12 + n]
        i += 12 + n
    return bytes(out)


def main() -> int:
    frames = HERE / "corpus" / "frames"
    jour = HERE / "corpus" / "journal"
    frames.mkdir(parents=True, exist_ok=True)
    jour.mkdir(parents=True, exist_ok=True)
    client = p.Connection(p.Role.CLIENT)
    page = bytes(range(256)) * 16
    requests = [
        p.Hello(1, p.PROTOCOL_VERSION, b"n" * 32),
        p.ReadPages(2, "seg0", 0, 16),
        p.StagePages(3, b"t" * 16, "seg0", 4, page * 2),
        p.Commit(4, b"t" * 16, (("seg0", 8 * 4096),), (p.PageRun("seg0", 0, page),)),
        p.CreateSegment(5, b"u" * 16, "a", 4096),
        p.ListSegments(6),
    ]
    # Odd first byte: the server's side reads requests; 64 << 1 cuts them in 64 bytes.
    (frames / "requests").write_bytes(bytes([129]) + b"".join(map(client.send, requests)))
    server = p.Connection(p.Role.SERVER)
    replies = [
        p.Pages(2, "seg0", 0, 4, 3, (p.PageRun("seg0", 1, page),)),
        p.Error(0, "busy", "too many"),
        p.SegmentList(6, ("a", "seg0")),
    ]
    (frames / "replies").write_bytes(bytes([128]) + b"".join(map(server.send, replies)))

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "j").mkdir()
        j = journal.SegmentJournal(d / "j", 0)
        j.set_size(8 * 4096)
        j.write_pages(0, page * 3)
        j.set_size(5 * 4096)
        j.write_page(4, page)
        j.seal_start()
        j.seal_finish(b"x" * 16, "seg0")
        sealed = next((d / "j").glob("*.sealed"))
        (jour / "journal").write_bytes(_as_input(1, sealed, journal.MAGIC))

        store = server_log.LogPageStore.open(
            d / "data", capacity_bytes=None, checkpoint_bytes=1 << 30
        )
        ops: list[Op] = [Create("s", 0), Resize("s", 3 * 4096), Write(p.PageRun("s", 0, page * 2))]
        store.append(b"y" * 16, ops)
        store.apply(b"y" * 16, ops)
        store.close()
        log_file = next((d / "data").glob("log.*"))
        (jour / "log").write_bytes(_as_input(0, log_file, server_log.LOG_MAGIC))
    return 0


if __name__ == "__main__":
    sys.exit(main())
