"""Checksummed records in an append-only file: the framing of the server's log and
checkpoints and of the mount's journal.

Where it sits: beside protocol.py, whose msgpack helpers it uses; no I/O of its own but
the plain os calls its callers ask for.

    magic (4 bytes) | payload length (u32 BE) | CRC-32 of the payload (u32 BE) | payload

A reader stops at the first record that is short, has the wrong magic or fails its
checksum: after a crash that is the torn tail of an append that never finished.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from netmemfs.errors import RemoteProtocolError
from netmemfs.pages import Buffer
from netmemfs.protocol import pack_parts, unpack

RECORD = struct.Struct(">4sII")
MAX_RECORD_BYTES = 1 << 30


def encode_record(magic: bytes, payload: object, *, checksum: bool = True) -> list[Buffer]:
    """The record's bytes, as parts. checksum=False writes 0 for the CRC and spares
    computing it: only for files nobody reads back with read_records (which would stop
    at such a record as at a torn one)."""
    parts: list[Buffer] = []
    pack_parts(payload, parts)
    crc = 0
    length = 0
    for part in parts:
        if checksum:
            crc = zlib.crc32(part, crc)
        length += len(part)
    return [RECORD.pack(magic, length, crc), *parts]


def pwrite_all(fd: int, parts: Sequence[Buffer], offset: int) -> int:
    """Write parts at offset (not at the descriptor's position, which a write cut short
    would leave past the last good byte); return how many bytes. On OSError some of
    them may have been written: the caller truncates back to offset."""
    total = sum(len(p) for p in parts)
    done = os.pwritev(fd, parts, offset) if len(parts) <= 512 else 0
    if done < total:
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            n = os.pwrite(fd, rest, offset + done)
            done += n
            rest = rest[n:]
    return total


def read_records(f: BinaryIO, magic: bytes) -> Iterator[tuple[int, object]]:
    """Yield (end offset, payload) for each whole, valid record; stop at the first that
    is not (a torn or damaged tail). The caller compares the last end with the size."""
    offset = 0
    while True:
        head = f.read(RECORD.size)
        if len(head) < RECORD.size:
            return
        got_magic, length, crc = RECORD.unpack(head)
        if got_magic != magic or length > MAX_RECORD_BYTES:
            return
        payload = f.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        try:
            obj = unpack(payload)
        except RemoteProtocolError:
            return
        offset += RECORD.size + length
        yield offset, obj
