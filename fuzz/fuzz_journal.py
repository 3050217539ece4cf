"""Coverage-guided fuzzing of the readers of what netmemfs left on disk: the mount's
journal (netmemfs.journal, read back by recover() after a crash) and the server's log
(netmemfs_server.log, replayed at start).

    .venv/bin/python fuzz/fuzz_journal.py -max_total_time=60     # atheris (libFuzzer) flags

A checksum guards every record, so random bytes would stop the reader at the first one.
The harness therefore builds the file itself: the first byte picks the reader, the rest
is a list of payloads ([u16 length][bytes] each, sealed with a valid checksum) and a raw
tail (a torn write). The readers must accept the file or refuse it with their own error
(JournalError, CorruptDataDir); any other exception is a crash. Inputs that once
crashed live in fuzz/regressions/journal/ and run in the test suite
(tests/test_46_fuzz_regressions.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

from netmemfs import journal
from netmemfs.records import RECORD
from netmemfs_server import log as server_log
from netmemfs_server.store import MemoryPageStore

MAX_PAYLOADS = 64
_TMP_DIR: Path | None = None


def _tmp() -> Path:
    """Where inputs are written: $NETMEMFS_FUZZ_DIR, else a temporary directory made
    at the first input and removed at exit (importing this module makes nothing)."""
    global _TMP_DIR
    if _TMP_DIR is None:
        given = os.environ.get("NETMEMFS_FUZZ_DIR")
        if given:
            _TMP_DIR = Path(given)
            _TMP_DIR.mkdir(parents=True, exist_ok=True)
        else:
            _TMP_DIR = Path(tempfile.mkdtemp(prefix="netmemfs-fuzz-"))
            atexit.register(shutil.rmtree, _TMP_DIR, True)
    return _TMP_DIR


def build_file(magic: bytes, body: bytes) -> bytes:
    """The file the input stands for: checksummed records, then the raw tail."""
    out = bytearray()
    i = 0
    for _ in range(MAX_PAYLOADS):
        if i + 2 > len(body):
            break
        (n,) = struct.unpack_from(">H", body, i)
        if i + 2 + n > len(body):
            break
        payload = body[i + 2 : i + 2 + n]
        out += RECORD.pack(magic, len(payload), zlib.crc32(payload)) + payload
        i += 2 + n
    out += body[i:]
    return bytes(out)


def one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        path = _tmp() / "seg.sealed"
        path.write_bytes(build_file(journal.MAGIC, data[1:]))
        try:
            for commit, _ in journal.recover(_tmp()):
                assert all(r.count * 4096 == len(r.data) for r in commit.runs)
        except journal.JournalError:
            pass
        finally:
            for p in _tmp().iterdir():
                p.unlink()
    else:
        path = _tmp() / "log.00000000"
        path.write_bytes(build_file(server_log.LOG_MAGIC, data[1:]))
        try:
            server_log._replay_log(path, MemoryPageStore(), last=True)
        except server_log.CorruptDataDir:
            pass
        finally:
            path.unlink(missing_ok=True)


def main() -> None:
    import atheris  # only the fuzzer needs it; the regression test does not

    logging.disable(logging.WARNING)  # "cutting a torn tail" for most inputs
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
