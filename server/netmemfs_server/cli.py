"""`netmemfs-server`: the command line of the page server."""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import sys
from pathlib import Path

import trio

from netmemfs import __version__
from netmemfs._trio_util import open_quiet_nursery
from netmemfs.auth import read_token_file
from netmemfs.errors import NetmemError
from netmemfs.metrics import MetricsError, serve_metrics
from netmemfs.sizes import parse_host_port, parse_size
from netmemfs_server.log import LogPageStore
from netmemfs_server.serve import DEFAULT_PORT, Limits, PageServer, server_families
from netmemfs_server.store import MemoryPageStore, PageStore

DESCRIPTION = """\
Serve netmemfs pages over TCP. Clients (`netmemfs mount --server HOST`) read pages from
this server and commit their writes to it as atomic transactions.

Pages are kept in memory. With --data-dir every commit is also appended to a log there
and fsynced before it is acknowledged, so a restart (even after kill -9) comes back with
every acknowledged commit and no half-applied one.

Every client connection is bounded (--max-connections, --max-frame, --max-inflight,
--max-transaction, --max-staged-total, --idle-timeout, --slow-client-timeout); a client
past a bound gets an error that names the option, and other clients are not affected.
docs/security.md says what each protects and what they add up to.

examples:
  netmemfs-server                                  # in memory, on 127.0.0.1:7733
  netmemfs-server --data-dir /var/lib/netmemfs --max-memory 8G
  netmemfs-server --listen 0.0.0.0:7733 --token-file /etc/netmemfs/token
  netmemfs-server --listen 0.0.0.0:7733 --token-file T --tls-cert cert.pem --tls-key key.pem
  netmemfs-server --data-dir /var/lib/netmemfs --metrics 127.0.0.1:9733   # Prometheus
"""


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain TCP; ValueError saying what is wrong."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together; give both")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load --tls-cert {cert} / --tls-key {key}: {e}") from e
    return ctx


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netmemfs-server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help="address to listen on (default %(default)s; port 0 picks a free one and prints it)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep a durable log and checkpoints in DIR (default: memory only, lost on exit)",
    )
    p.add_argument(
        "--max-memory",
        type=parse_size,
        metavar="SIZE",
        help="refuse commits that would store more page data than SIZE (e.g. 8G); "
        "default: no limit",
    )
    p.add_argument(
        "--max-transaction",
        type=parse_size,
        default=parse_size("1G"),
        metavar="SIZE",
        help="largest transaction a connection may stage, held in memory until it commits "
        "(default 1G; an fsync or sync of more pages than this fails)",
    )
    p.add_argument(
        "--max-staged-total",
        type=parse_size,
        default=Limits().max_staged_total_bytes,
        metavar="SIZE",
        help="pages staged by all connections together; staging past it is refused "
        "(the commit fails and can be retried) (default 4G)",
    )
    p.add_argument(
        "--checkpoint-size",
        type=parse_size,
        default=parse_size("256M"),
        metavar="SIZE",
        help="with --data-dir, write a checkpoint and start a new log once the log "
        "reaches SIZE (default 256M)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="require clients to prove they know the token in FILE (mode 0600); the "
        "token never crosses the network",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve TLS with this certificate (chain) file; goes with --tls-key. Clients "
        "then need --tls-ca naming a CA that signed it",
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    limits = Limits()
    p.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        metavar="N",
        help="connections served at once; more are told the server is busy and closed "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-frame",
        type=parse_size,
        default=limits.max_frame_bytes,
        metavar="SIZE",
        help="largest message a client may send; a larger one closes its connection with "
        "an error (default, and the most: 16M + 64K, the largest netmemfs clients send, so "
        "a lower value refuses their large commits; before the handshake every client is "
        "held to 1K)",
    )
    p.add_argument(
        "--max-inflight",
        type=parse_size,
        default=limits.max_inflight_bytes,
        metavar="SIZE",
        help="page data of one connection's commits received and not yet answered; past "
        "it the server reads nothing more from that client until replies go out "
        "(default 256M)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=limits.idle_timeout_s,
        metavar="SECONDS",
        help="close a connection that sends nothing for this long; clients reconnect "
        "when they need to (default %(default)g)",
    )
    p.add_argument(
        "--slow-client-timeout",
        type=float,
        default=limits.slow_client_timeout_s,
        metavar="SECONDS",
        help="close a connection that takes longer than this to finish its handshake, "
        "the rest of a message, or to take a reply (default %(default)g)",
    )
    p.add_argument(
        "--hold-lease",
        type=float,
        default=limits.hold_lease_s,
        metavar="SECONDS",
        help="a file removed while a client has it open lives on for that client; if the "
        "client goes silent (dies, or the network parts it from us) for this long, its "
        "holds lapse and such files are freed (default %(default)g)",
    )
    p.add_argument(
        "--lock-lease",
        type=float,
        default=limits.lock_lease_s,
        metavar="SECONDS",
        help="a lock (netmemfs lock, netmemfs.lock, netmem_lock) whose holder goes silent "
        "for this long (a machine that hangs, or that the network parts from us) is taken "
        "from it and given to the next waiter; commits it then makes under that lock are "
        "refused. A holder whose connection closes (a process or daemon that dies) loses "
        "its locks at once (default %(default)g)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without --token-file",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (connections, requests "
        "and bytes by type, commits and their latency, refusals by limit, log size, "
        "checkpoint age; docs/operations.md lists them). Anyone who can reach the port "
        "can read them: keep it on loopback or a monitoring network. Port 0: any free "
        "port, logged at start",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="netmemfs-server: %(levelname)s %(message)s",
    )
    try:
        host, port = parse_host_port(args.listen, DEFAULT_PORT)
    except ValueError as e:
        print(f"netmemfs-server: --listen {e}", file=sys.stderr)
        return 2
    token = None
    try:
        if args.token_file is not None:
            token = read_token_file(args.token_file)
    except NetmemError as e:
        print(f"netmemfs-server: {e}", file=sys.stderr)
        return 2
    try:
        tls = _tls_context(args.tls_cert, args.tls_key)
        limits = Limits(
            max_connections=args.max_connections,
            max_staged_bytes=args.max_transaction,
            max_staged_total_bytes=args.max_staged_total,
            max_inflight_bytes=args.max_inflight,
            max_frame_bytes=args.max_frame,
            idle_timeout_s=args.idle_timeout,
            slow_client_timeout_s=args.slow_client_timeout,
            hold_lease_s=args.hold_lease,
            lock_lease_s=args.lock_lease,
        )
        limits.check()
    except ValueError as e:
        print(f"netmemfs-server: {e}", file=sys.stderr)
        return 2
    if token is None and not args.insecure and not _is_loopback(host):
        print(
            f"netmemfs-server: refusing to listen on {host}, which other machines can reach, "
            "without --token-file FILE (or --insecure to accept anyone who can connect)",
            file=sys.stderr,
        )
        return 2
    store: PageStore
    try:
        if args.data_dir is not None:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(args.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(
                    f"netmemfs-server: {args.data_dir} is in use by another netmemfs-server",
                    file=sys.stderr,
                )
                return 1
            store = LogPageStore.open(
                args.data_dir,
                capacity_bytes=args.max_memory,
                checkpoint_bytes=args.checkpoint_size,
            )
        else:
            store = MemoryPageStore(args.max_memory)
    except (NetmemError, OSError) as e:
        print(f"netmemfs-server: cannot open {args.data_dir}: {e}", file=sys.stderr)
        return 1
    server = PageServer(store, token, limits=limits, tls=tls)

    async def run() -> None:
        endpoint = None
        if args.metrics is not None:
            endpoint = serve_metrics(args.metrics, lambda: server_families(server.statistics()))
        try:
            async with open_quiet_nursery() as nursery:
                bound = await nursery.start(server.serve, host, port)
                print(f"netmemfs-server listening on {host}:{bound}", flush=True)
        finally:
            if endpoint is not None:
                endpoint.close()

    try:
        trio.run(run)
    except MetricsError as e:
        print(f"netmemfs-server: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"netmemfs-server: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netmemfs-server: interrupted; stopping", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
