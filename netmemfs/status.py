"""A mount daemon's numbers: its statistics(), their Prometheus families, and
`netmemfs status`, which asks a running daemon for them over its own socket.

The daemon answers a STATUS request on the socket where it serves anonymous regions
(agent.AttachPoint); `netmemfs status` asks each daemon's socket on the machine (found
in /proc/net/unix) and takes the answer whose mount point it is. So a status query
reaches exactly the daemon serving the mount, is admitted as a region is (its user, or
root), never touches the mount itself, and is never a guess from files left behind.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netmemfs.core import DoorCounters, FileStatus
from netmemfs.errors import NetmemError
from netmemfs.metrics import LatencyStatistics, Spec, families

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from netmemfs.agent import Region
    from netmemfs.cache import PageCache
    from netmemfs.kdoor import DeviceProvider

STATUS_TIMEOUT_S = 10.0  # a daemon that does not answer within this is reported as stuck


class StatusError(NetmemError):
    """No status could be had from the mount; the message says why and what to do."""

    code = "status"


@dataclasses.dataclass(frozen=True)
class DoorStatistics:
    """What one door's files did since start: DoorCounters, snapshotted."""

    journal_pages: int
    cache_pages: int
    store_pages: int
    fetch_latency: LatencyStatistics
    commits: int
    committed_pages: int
    commit_failures: int
    commit_latency: LatencyStatistics

    @classmethod
    def of(cls, c: DoorCounters) -> DoorStatistics:
        return cls(
            c.journal_pages,
            c.cache_pages,
            c.store_pages,
            c.fetch_latency.statistics(),
            c.commits,
            c.committed_pages,
            c.commit_failures,
            c.commit_latency.statistics(),
        )


@dataclasses.dataclass(frozen=True)
class RegionStatus:
    """An anonymous region served by the daemon: its agent side's counts, and what its
    handler in the mapping process said of itself when asked (agent.Region.ask_handler)."""

    file: FileStatus
    fetched_pages: int  # pages the region asked the daemon for (not read directly)
    commits: int
    # What its handler (libnetmem, in the mapping process) said when asked: faults,
    # fetches, direct_fetches, evictions, evicted, spilled, resident and budget (pages);
    # None if it did not answer (a library from before it could).
    handler: dict[str, int] | None


@dataclasses.dataclass(frozen=True)
class MountStatistics:
    """A mount daemon's statistics(): counts since start, then the state now."""

    mountpoint: str
    server: str
    pid: int
    uptime_s: float
    store_connected: bool  # the store answered last time it was asked
    store_reconnects: int
    files: DoorStatistics  # the file door's
    cache_hits: int
    cache_misses: int
    cache_pages: int
    cache_budget_pages: int
    dirty_pages: int  # all files: written, not yet committed
    journal_bytes: int
    open_files: tuple[FileStatus, ...]  # open, changed or committed to here
    regions: tuple[RegionStatus, ...]
    # The kernel module's door (--serve-device), if the daemon serves it: what its
    # areas did, and each area's file.
    device: DoorStatistics | None
    device_areas: tuple[FileStatus, ...]

    @property
    def region_count(self) -> int:
        return len(self.regions)


def mount_statistics(
    *,
    mountpoint: Path,
    server: str,
    started_at: float,
    connected: bool,
    reconnects: int,
    counters: DoorCounters,
    cache: PageCache,
    files: list[FileStatus],
    dirty: tuple[int, int],
    regions: set[Region],
    device: DeviceProvider | None = None,
) -> MountStatistics:
    return MountStatistics(
        mountpoint=str(mountpoint),
        server=server,
        pid=os.getpid(),
        uptime_s=time.time() - started_at,
        store_connected=connected,
        store_reconnects=reconnects,
        files=DoorStatistics.of(counters),
        cache_hits=cache.hits,
        cache_misses=cache.misses,
        cache_pages=cache.pages,
        cache_budget_pages=cache.budget_pages,
        dirty_pages=dirty[0],
        journal_bytes=dirty[1],
        open_files=tuple(sorted(files, key=lambda f: f.path)),
        regions=tuple(
            RegionStatus(
                FileStatus.of(r.core),
                r.core.counters.store_pages,
                r.core.counters.commits,
                r.handler,
            )
            for r in sorted(regions, key=lambda r: r.name)
        ),
        device=DoorStatistics.of(device.counters) if device is not None else None,
        device_areas=(
            tuple(FileStatus.of(core) for _, core in sorted(device.areas.items()))
            if device is not None
            else ()
        ),
    )


MOUNT_METRICS: tuple[Spec, ...] = (
    ("uptime_seconds", "gauge", "uptime_s", "Seconds since the mount daemon started."),
    (
        "store_connected",
        "gauge",
        "store_connected",
        "1 if the store answered last time it was asked, else 0.",
    ),
    (
        "store_reconnects",
        "counter",
        "store_reconnects",
        "Connections to the store lost and made again.",
    ),
    (
        "journal_read_pages",
        "counter",
        "files.journal_pages",
        "Pages read from this mount's own uncommitted changes.",
    ),
    ("cache_read_pages", "counter", "files.cache_pages", "Pages read from the page cache."),
    ("store_read_pages", "counter", "files.store_pages", "Pages read from the store."),
    (
        "fetch_duration_seconds",
        "histogram",
        "files.fetch_latency",
        "Time of a read that needed the store, from asking to having the pages.",
    ),
    ("commits", "counter", "files.commits", "Transactions committed (fsync, msync)."),
    ("committed_pages", "counter", "files.committed_pages", "Pages committed."),
    (
        "commit_failures",
        "counter",
        "files.commit_failures",
        "Commits not applied (sent again later, or refused for good).",
    ),
    (
        "commit_duration_seconds",
        "histogram",
        "files.commit_latency",
        "Time of a commit, from sealing the journal to the store's answer.",
    ),
    ("cache_hits", "counter", "cache_hits", "Page cache lookups that found the page."),
    ("cache_misses", "counter", "cache_misses", "Page cache lookups that did not."),
    ("cache_pages", "gauge", "cache_pages", "Pages held by the page cache."),
    ("dirty_pages", "gauge", "dirty_pages", "Pages written and not yet committed."),
    ("journal_bytes", "gauge", "journal_bytes", "Bytes of journal holding uncommitted changes."),
    ("regions", "gauge", "region_count", "Anonymous regions served by this daemon."),
    (
        "device_store_read_pages",
        "counter",
        "device.store_pages",
        "Pages the kernel module's areas read from the store (--serve-device).",
    ),
    ("device_commits", "counter", "device.commits", "Syncs of the module's areas committed."),
    (
        "device_commit_failures",
        "counter",
        "device.commit_failures",
        "Syncs of the module's areas not applied.",
    ),
    (
        "device_commit_duration_seconds",
        "histogram",
        "device.commit_latency",
        "Time of a commit of an area's sync.",
    ),
)


def mount_families(st: MountStatistics) -> list[Metric]:
    """st as Prometheus metric families (netmemfs_mount_*): totals only, no label per
    file (a file per series would grow without bound)."""
    return families("netmemfs_mount_", MOUNT_METRICS, st)


def as_json(st: MountStatistics) -> bytes:
    return json.dumps(dataclasses.asdict(st)).encode()


# --- the client: `netmemfs status` ---------------------------------------------------


def _resolved(path: Path) -> str:
    """path made absolute with its directory's symbolic links resolved, without
    looking at path itself: a mount point that is one cannot answer while its daemon
    waits for its store."""
    path = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(path.parent), path.name)


def mount_type(mountpoint: Path) -> str | None:
    """The file system type mounted at mountpoint (the last mount there), or None."""
    want = _resolved(mountpoint).replace("\\", "\\134").replace(" ", "\\040")
    want = want.replace("\t", "\\011").replace("\n", "\\012")
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == want and " - " in line:
                found = line.split(" - ", 1)[1].split()[0]
    return found


# The abstract names of mount daemons' sockets (agent.AttachPoint): "netmemfs-PID-...".
_DAEMON_SOCKET = re.compile(r"^@(netmemfs-\d+-[0-9a-f]+)$")


def _daemon_sockets() -> list[str]:
    """The abstract names of the mount daemons' sockets on this machine (in this
    network namespace), from /proc/net/unix."""
    names = []
    with open("/proc/net/unix") as f:
        next(f, None)  # the header
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and (m := _DAEMON_SOCKET.match(fields[7])):
                names.append(m.group(1))
    return sorted(set(names))


def _ask(name: str) -> bytes:
    """A daemon's status (JSON), asked on its socket; OSError or TimeoutError if it
    does not answer."""
    from netmemfs.agent import HEADER, OP_STATUS

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(STATUS_TIMEOUT_S)
    try:
        sock.connect(b"\0" + name.encode())
        sock.sendall(HEADER.pack(OP_STATUS, 0, 1, 0, 0, 0))
        op, status, _, _, _, length = HEADER.unpack(_receive(sock, HEADER.size))
        body = _receive(sock, length)
    finally:
        sock.close()
    if op != OP_STATUS or status != 0:
        raise OSError(errno.EPROTO, f"refused: {body[:200]!r}")
    return body


def query(mountpoint: Path) -> dict[str, Any]:
    """The status of the daemon serving mountpoint, as its JSON; StatusError saying
    what is wrong (not a netmemfs mount, a dead daemon, ...) and what to do.

    Each mount daemon of this machine is asked on its own socket, and the one whose
    mount point this is answers: nothing touches the mount itself, which cannot answer
    while its store is out of reach."""
    from netmemfs.agent import AttachPoint

    where = str(mountpoint)
    kind = mount_type(mountpoint)
    if kind != "fuse.netmemfs":
        if not os.path.lexists(mountpoint):
            raise StatusError(f"{where} does not exist; give the mount point of a mount")
        what = f"a {kind} mount" if kind else "not a mount point"
        raise StatusError(
            f"{where} is not a netmemfs mount ({what}); give the mount point of a running "
            "`netmemfs mount`"
        )
    silent: list[str] = []
    for name in _daemon_sockets():
        try:
            body = _ask(name)
        except (OSError, TimeoutError) as e:
            silent.append(f"{name}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
            continue
        got: dict[str, Any] = json.loads(body)
        if _resolved(Path(str(got.get("mountpoint")))) == _resolved(mountpoint):
            return got
    try:
        # Not cached by the kernel (a stat may be, for a moment): a dead daemon's mount
        # answers ENOTCONN at once.
        os.getxattr(mountpoint, AttachPoint.XATTR)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StatusError(
                f"{where}: the mount's daemon is gone (the mount answers 'transport "
                f"endpoint is not connected'); unmount it (netmemfs umount {where}) and "
                "mount again; sealed commits are sent again by the next mount with the "
                "same --cache-dir"
            ) from None
    unanswered = f" (no answer from {'; '.join(silent)})" if silent else ""
    raise StatusError(
        f"{where}: no netmemfs daemon of yours serves it{unanswered}; it may be stuck or "
        "run by another user (its log is daemon.log in its --cache-dir)"
    )


def _receive(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "the daemon closed the connection")
        buf += chunk
    return bytes(buf)


def _budget(region: dict[str, Any]) -> str:
    """A region's row label: its budget use, as its handler last said."""
    h = region["handler"]
    if h is None:
        return "region"
    use = f"{h['resident']} of {h['budget']} pages resident" if h["budget"] else "no budget"
    return (
        f"region, {use}, {h['faults']} faults, {h['direct_fetches']} of {h['fetches']} reads direct"
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    return f"{now - at:.1f} s ago"


def render(st: dict[str, Any]) -> str:
    """A status as a person reads it."""
    now = time.time()
    f = st["files"]
    hits, misses = st["cache_hits"], st["cache_misses"]
    rate = f"{hits / (hits + misses):.0%}" if hits + misses else "-"
    fetch, commit = f["fetch_latency"], f["commit_latency"]
    state = "connected" if st["store_connected"] else "NOT CONNECTED: reconnecting"
    lines = [
        f"mount       {st['mountpoint']}  (daemon pid {st['pid']}, up {st['uptime_s']:.0f} s)",
        f"store       {st['server']}  ({state}, {st['store_reconnects']} reconnects)",
        f"dirty       {st['dirty_pages']} pages, {st['journal_bytes']} journal bytes",
        f"reads       {f['journal_pages']} pages from the journal, {f['cache_pages']} from "
        f"the cache, {f['store_pages']} from the store",
        f"cache       {rate} hit rate, {st['cache_pages']} of {st['cache_budget_pages']} pages",
        f"fetch       p50 {_ms(fetch['p50_s'])}, p99 {_ms(fetch['p99_s'])} "
        f"(last minute, {fetch['recent']} fetches)",
        f"commits     {f['commits']} ({f['commit_failures']} failed); p50 "
        f"{_ms(commit['p50_s'])}, p99 {_ms(commit['p99_s'])} (last minute)",
    ]
    rows = [("FILE", "INODE", "OPEN", "DIRTY PAGES", "JOURNAL BYTES", "LAST COMMIT", "TOOK")]
    files = [(x, x["path"] or "?", str(x["opens"])) for x in st["open_files"]]
    files += [(r["file"], f"{r['file']['path']} ({_budget(r)})", "-") for r in st["regions"]]
    files += [(x, f"{x['path']} (device area)", "-") for x in st["device_areas"]]
    for x, name, opens in files:
        rows.append(
            (
                name,
                str(x["ino"]),
                opens,
                str(x["dirty_pages"]),
                str(x["journal_bytes"]),
                _ago(x["last_commit_at"], now),
                _ms(x["last_commit_s"]),
            )
        )
    device = st["device"]
    if device is not None:
        lines.append(
            f"device      {device['store_pages']} pages read from the store, "
            f"{device['commits']} syncs committed ({device['commit_failures']} failed)"
        )
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.append("")
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
