"""A data directory written before inodes (format 1) is converted at start (issue 13).

tests/fixtures/datadir-v1 was written by the server of commit 69455ce (its README says
how): a checkpoint with three segments and a log after it that deletes one,
renames one, and makes a segment of the deleted one's name again. A real
netmemfs-server starts on a copy, and what it serves is what that server served.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from netmemfs.pages import PAGE_SIZE
from netmemfs.records import encode_record, read_records
from netmemfs.remote import RemoteStore
from netmemfs_server.log import CKPT_MAGIC
from tests.helpers import ServerProc, run_trio

FIXTURE = Path(__file__).parent / "fixtures" / "datadir-v1"


def _page(tag: str, n: int) -> bytes:
    b = f"{tag} page {n}".encode()
    return b + bytes(PAGE_SIZE - len(b))


def _format(data: Path) -> int:
    with open(data / "checkpoint", "rb") as f:
        for _, rec in read_records(f, CKPT_MAGIC):
            assert isinstance(rec, list) and rec[0] == "head"
            return int(rec[1])
    raise AssertionError("an empty checkpoint")


def _served(address: str) -> dict[str, tuple[int, int, bytes]]:
    """Each segment: (size, version, its bytes)."""

    async def main() -> dict[str, tuple[int, int, bytes]]:
        out = {}
        async with RemoteStore.connect(address) as store:
            for name in await store.list_segments():
                st = await store.stat(name)
                npages = -(-st.size // PAGE_SIZE)
                out[name] = (st.size, st.version, await store.read_bytes(name, 0, npages))
        return out

    return run_trio(main, timeout_s=30)


def test_a_format_1_data_dir_is_converted_and_serves_the_same(
    tmp_path: Path, server_factory: Callable[..., ServerProc]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    assert _format(data) == 1
    server = server_factory(data_dir=data)
    got = _served(server.address)
    assert got == {
        "beta": (100, 2, _page("beta", 0)),
        "renamed": (2 * PAGE_SIZE + 10, 3, _page("alpha", 0) + _page("alpha", 1) + bytes(4096)),
        "gone": (2 * PAGE_SIZE, 1, bytes(PAGE_SIZE) + _page("gone2", 1)),
    }
    assert _format(data) == 2, "the data dir was not converted at start"
    assert "converted" in server.log_text()

    async def replay() -> bool:
        async with RemoteStore.connect(server.address) as store:
            r = await store.commit([], resizes=[("beta", 1)], txn=b"fixture-txn-0007")
            return r.replayed

    assert run_trio(replay, timeout_s=30), "the exactly-once table was lost in the conversion"
    server.kill()
    again = server_factory(data_dir=data)
    assert _served(again.address) == got


def test_a_data_dir_of_a_newer_format_is_refused(
    tmp_path: Path, server_factory: Callable[..., ServerProc]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "checkpoint", "wb") as f:
        f.writelines(encode_record(CKPT_MAGIC, ["head", 3, 0, 1, 2]))
        f.writelines(encode_record(CKPT_MAGIC, ["end"]))
    with pytest.raises(AssertionError, match="written by a newer netmemfs-server"):
        server_factory(data_dir=data)
