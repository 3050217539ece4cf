"""Layer 2c: the mount's journal alone (no FUSE, no server)."""

from __future__ import annotations

import shutil
from pathlib import Path

from netmemfs import journal
from netmemfs.journal import SegmentJournal
from netmemfs.pages import PAGE_SIZE
from netmemfs.records import RECORD, read_records
from tests.helpers import stamp_page


def _pages_of(commit: journal.SealedCommit) -> dict[int, bytes]:
    out = {}
    for run in commit.runs:
        for i in range(run.count):
            out[run.first + i] = bytes(run.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
    return out


def test_seal_commits_what_was_written_and_later_writes_wait(tmp_path: Path) -> None:
    j = SegmentJournal(tmp_path, committed_size=4 * PAGE_SIZE)
    j.write_page(1, stamp_page("s", 1, 1))
    j.write_page(1, stamp_page("s", 1, 2))  # the newest version wins
    j.write_page(3, stamp_page("s", 3, 2))
    j.seal_start()
    j.write_page(0, stamp_page("s", 0, 3))  # during the commit: belongs to the next
    commit = j.seal_finish(b"txn-1", "s")
    assert commit.resizes == []
    assert _pages_of(commit) == {1: stamp_page("s", 1, 2), 3: stamp_page("s", 3, 2)}
    assert j.read_page(1) == stamp_page("s", 1, 2)  # sealed pages stay readable
    assert j.read_page(0) == stamp_page("s", 0, 3)
    j.trim()
    assert j.read_page(1) is None and j.has_changes()
    j.seal_start()
    assert _pages_of(j.seal_finish(b"txn-2", "s")) == {0: stamp_page("s", 0, 3)}


def test_shrink_then_grow_commits_the_low_mark_first(tmp_path: Path) -> None:
    j = SegmentJournal(tmp_path, committed_size=8 * PAGE_SIZE)
    j.write_page(6, stamp_page("s", 6, 1))
    j.set_size(2 * PAGE_SIZE + 10)
    j.set_size(8 * PAGE_SIZE)
    j.seal_start()
    commit = j.seal_finish(b"t", "s")
    # The server first drops everything past the low mark, then grows back with zeros.
    assert commit.resizes == [("s", 2 * PAGE_SIZE + 10), ("s", 8 * PAGE_SIZE)]
    assert 6 not in _pages_of(commit)


def test_recover_resends_sealed_and_drops_unsynced(tmp_path: Path) -> None:
    j = SegmentJournal(tmp_path, committed_size=PAGE_SIZE)
    j.write_page(0, stamp_page("s", 0, 1))
    j.seal_start()
    j.write_page(0, stamp_page("s", 0, 2))  # never fsynced
    sealed = j.seal_finish(b"txn-9", "s")
    found = journal.recover(tmp_path)
    assert [(c.txn, c.name, _pages_of(c)) for c, _ in found] == [(b"txn-9", "s", _pages_of(sealed))]
    assert not list(tmp_path.glob("*.active"))


def test_a_sealed_file_cut_short_is_never_half_sent(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    j = SegmentJournal(tmp_path / "j", committed_size=8 * PAGE_SIZE)
    for p in range(5):
        j.write_page(p, stamp_page("s", p, 1))
    j.seal_start()
    whole = _pages_of(j.seal_finish(b"t", "s"))
    (path,) = (tmp_path / "j").glob("*.sealed")
    data = path.read_bytes()
    for cut in range(0, len(data) + 1, 97):
        d = tmp_path / f"c{cut}"
        shutil.copytree(tmp_path / "j", d)
        (next(d.glob("*.sealed"))).write_bytes(data[:cut])
        found = journal.recover(d)
        # Without its begin record a file is not sent at all; with it, whole.
        assert found == [] or _pages_of(found[0][0]) == whole
        shutil.rmtree(d)


def test_unseal_puts_refused_changes_back_before_newer_ones(tmp_path: Path) -> None:
    j = SegmentJournal(tmp_path, committed_size=8 * PAGE_SIZE)
    j.write_page(1, stamp_page("s", 1, 1))
    j.write_page(6, stamp_page("s", 6, 1))
    j.seal_start()
    j.seal_finish(b"t", "s")
    j.set_size(4 * PAGE_SIZE)  # after the refused commit: drops page 6
    j.write_page(2, stamp_page("s", 2, 2))
    j.unseal()
    assert j.sealed is None and list(tmp_path.glob("*.sealed")) == []
    j.seal_start()
    commit = j.seal_finish(b"t2", "s")
    assert _pages_of(commit) == {1: stamp_page("s", 1, 1), 2: stamp_page("s", 2, 2)}
    assert commit.resizes[-1] == ("s", 4 * PAGE_SIZE)


def test_a_journal_nothing_recovers_skips_the_checksums(tmp_path: Path) -> None:
    """A region's agent journal dies with it (recoverable=False): its records carry no
    CRC (computing one cost the agent about a tenth of a large sync), yet it reads and
    seals as a recoverable one does. A recoverable journal still checksums every record."""
    for recoverable in (False, True):
        d = tmp_path / str(recoverable)
        d.mkdir()
        j = SegmentJournal(d, committed_size=4 * PAGE_SIZE, recoverable=recoverable)
        j.write_pages(0, stamp_page("s", 0, 1) + stamp_page("s", 1, 1))
        j.write_page(3, stamp_page("s", 3, 1))
        assert j.read_page(1) == stamp_page("s", 1, 1)
        j.seal_start()
        commit = j.seal_finish(b"txn", "s")
        assert _pages_of(commit) == {p: stamp_page("s", p, 1) for p in (0, 1, 3)}
        (path,) = d.glob("*.sealed")
        data = path.read_bytes()
        crcs = []
        off = 0
        while off < len(data):
            _, length, crc = RECORD.unpack_from(data, off)
            crcs.append(crc)
            off += RECORD.size + length
        assert len(crcs) == 3  # two page records and the begin record
        assert all(c == 0 for c in crcs) != recoverable, crcs
        with path.open("rb") as f:
            assert len(list(read_records(f, journal.MAGIC))) == (3 if recoverable else 0)
