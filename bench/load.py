"""Load: many clients doing mixed page reads and commits against one server, then a check
of every committed page; beside a plain request/reply server measured in the same run.

    .venv/bin/python bench/load.py [--clients 32] [--seconds 60] [--procs 2] [--data-dir]

Each client owns a segment of --pages pages and, until the time is up, either reads a
run of 1-16 random pages (70%) or commits one (30%), each page stamped with (segment,
page, generation). Every read is checked against what the client knows it committed;
at the end every page of every segment is read back on fresh connections and compared
with the last acknowledged generation: a page older than that is lost, one that is not a
stamp of its own page is corrupted. Clients run as trio tasks in --procs processes.

The reference ("plain") is the same clients and the same byte counts per request and
reply against a server that only frames and answers (no pages, no commits), also in
Python and trio: what the loopback, the interpreter and the request pattern allow.

It prints operations per second, MB/s of page data, p50/p99 latency of reads and
commits, errors, lost and corrupted pages, the ratios to plain, and the server's peak
resident memory (VmHWM) beside the bound docs/security.md gives.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plot  # bench/plot.py

from netmemfs.errors import NetmemError
from netmemfs.pages import PAGE_SIZE
from netmemfs.protocol import PageRun
from netmemfs.remote import RemoteStore
from tests.helpers import ServerProc, describe_page, stamp_page

READ_SHARE = 0.7
MAX_RUN = 16
HEADER = struct.Struct(">II")  # plain reference: reply bytes asked for, payload bytes
Result = dict[str, Any]  # one client's figures, as JSON between processes


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- the netmemfs clients --------------------------------------------------------------


async def _client(address: str, name: str, pages: int, deadline: float, out: Result) -> None:
    rng = random.Random(name)
    gen = [0] * pages  # last acknowledged generation of each page (0: never written)
    maybe: dict[int, int] = {}  # page -> generation of a commit whose outcome is unknown
    reads: list[float] = []
    commits: list[float] = []
    errors = 0
    bad_reads = 0
    async with RemoteStore.connect(address, retry_for_s=10) as store:
        await store.create(name, pages * PAGE_SIZE)
        while time.monotonic() < deadline:
            n = rng.randint(1, MAX_RUN)
            first = rng.randrange(0, pages - n + 1)
            t0 = time.perf_counter()
            try:
                if rng.random() < READ_SHARE:
                    got = (await store.read_pages(name, first, n)).to_bytes()
                    reads.append(time.perf_counter() - t0)
                    for i in range(n):
                        p = first + i
                        data = got[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                        if not _is(data, name, p, gen[p], maybe.get(p)):
                            bad_reads += 1
                else:
                    new = [gen[first + i] + 1 for i in range(n)]
                    data = b"".join(stamp_page(name, first + i, new[i]) for i in range(n))
                    for i in range(n):
                        maybe[first + i] = new[i]
                    await store.commit([PageRun(name, first, data)])
                    commits.append(time.perf_counter() - t0)
                    for i in range(n):
                        gen[first + i] = new[i]
                        maybe.pop(first + i, None)
            except NetmemError as e:
                errors += 1
                out.setdefault("error_samples", []).append(f"{name}: {e}")
    out.update(reads=reads, commits=commits, errors=errors, bad_reads=bad_reads)
    out["gen"] = gen
    out["maybe"] = {str(k): v for k, v in maybe.items()}


def _is(data: bytes, name: str, page: int, gen: int, maybe: int | None) -> bool:
    ok = [gen] if maybe is None else [gen, maybe]
    return any(data == (stamp_page(name, page, g) if g else bytes(PAGE_SIZE)) for g in ok)


async def _verify(address: str, results: list[Result], pages: int) -> tuple[int, int, list[str]]:
    lost = corrupted = 0
    samples: list[str] = []
    async with RemoteStore.connect(address) as store:
        for r in results:
            name = r["name"]
            got = await store.read_bytes(name, 0, pages)
            for p in range(pages):
                data = got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
                g = r["gen"][p]
                m = r["maybe"].get(str(p))
                if _is(data, name, p, g, m):
                    continue
                older = any(
                    data == (stamp_page(name, p, k) if k else bytes(PAGE_SIZE)) for k in range(g)
                )
                if older:
                    lost += 1
                else:
                    corrupted += 1
                if len(samples) < 5:
                    samples.append(f"{name} page {p}: want gen {g}, have {describe_page(data)}")
    return lost, corrupted, samples


# --- the plain reference ---------------------------------------------------------------


async def _plain_server(port_out: list[int], ready: threading.Event) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                while len(buf) < HEADER.size:
                    chunk = await stream.receive_some(1 << 16)
                    if not chunk:
                        return
                    buf += chunk
                reply, payload = HEADER.unpack_from(buf)
                while len(buf) < HEADER.size + payload:
                    chunk = await stream.receive_some(1 << 20)
                    if not chunk:
                        return
                    buf += chunk
                del buf[: HEADER.size + payload]
                await stream.send_all(bytes(reply))
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port_out.append(listeners[0].socket.getsockname()[1])
    ready.set()
    await trio.serve_listeners(handle, listeners)


async def _plain_client(port: int, name: str, deadline: float, out: Result) -> None:
    rng = random.Random(name)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reads: list[float] = []
    commits: list[float] = []
    page = stamp_page(name, 0, 1)
    async with stream:
        while time.monotonic() < deadline:
            n = rng.randint(1, MAX_RUN)
            is_read = rng.random() < READ_SHARE
            reply, payload = (n * PAGE_SIZE, 64) if is_read else (64, n * PAGE_SIZE)
            t0 = time.perf_counter()
            body = bytes(64) if is_read else b"".join(page for _ in range(n))
            await stream.send_all(HEADER.pack(reply, payload) + body[:payload])
            got = 0
            while got < reply:
                got += len(await stream.receive_some(reply - got))
            (reads if is_read else commits).append(time.perf_counter() - t0)
    out.update(reads=reads, commits=commits, errors=0, bad_reads=0)


# --- a worker process ------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    results: list[Result] = [{"name": f"load{c:03d}"} for c in args.client_ids]
    deadline = time.monotonic() + args.seconds

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for r in results:
                if args.plain_port:
                    nursery.start_soon(_plain_client, args.plain_port, r["name"], deadline, r)
                else:
                    nursery.start_soon(_client, args.address, r["name"], args.pages, deadline, r)

    trio.run(main)
    Path(args.out).write_text(json.dumps(results))


def _run_clients(args: argparse.Namespace, address: str, plain_port: int) -> list[Result]:
    ids = list(range(args.clients))
    procs = []
    outs = []
    for k in range(args.procs):
        mine = ids[k :: args.procs]
        if not mine:
            continue
        out = tempfile.mktemp(prefix="netmemfs-load-", suffix=".json")
        outs.append(out)
        cmd = [sys.executable, __file__, "--worker", "--out", out, "--address", address]
        cmd += ["--seconds", str(args.seconds), "--pages", str(args.pages)]
        cmd += ["--plain-port", str(plain_port), "--client-ids", ",".join(map(str, mine))]
        procs.append(subprocess.Popen(cmd))
    for p in procs:
        if p.wait(args.seconds + 300) != 0:
            raise SystemExit(f"a load worker failed (exit {p.returncode})")
    results: list[Result] = []
    for out in outs:
        results += json.loads(Path(out).read_text())
        os.unlink(out)
    return results


def _summary(results: list[Result], seconds: float) -> dict[str, float]:
    reads = [x for r in results for x in r["reads"]]
    commits = [x for r in results for x in r["commits"]]
    ops = len(reads) + len(commits)
    # Page data moved: the mean run is (1 + MAX_RUN) / 2 pages either way.
    mb = ops * (1 + MAX_RUN) / 2 * PAGE_SIZE / 1e6
    return {
        "ops_s": ops / seconds,
        "mb_s": mb / seconds,
        "read_p50_us": _quantile(reads, 0.5) * 1e6,
        "read_p99_us": _quantile(reads, 0.99) * 1e6,
        "commit_p50_us": _quantile(commits, 0.5) * 1e6,
        "commit_p99_us": _quantile(commits, 0.99) * 1e6,
        "errors": sum(r["errors"] for r in results),
        "bad_reads": sum(r["bad_reads"] for r in results),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0, help="per phase (default 60)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--pages", type=int, default=256, help="pages per client's segment")
    ap.add_argument("--data-dir", action="store_true", help="a durable server (fsync per commit)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--plain-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument(
        "--client-ids", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS
    )
    plot.add_argument(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0

    # The plain reference first, in a thread of this process (its own trio loop).
    port: list[int] = []
    ready = threading.Event()
    threading.Thread(target=trio.run, args=(_plain_server, port, ready), daemon=True).start()
    ready.wait(10)
    plain_results = _run_clients(args, "", port[0])
    plain = _summary(plain_results, args.seconds)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data" if args.data_dir else None
        srv = ServerProc(Path(tmp), data_dir=data_dir)
        try:
            rss_samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.5):
                    rss_samples.append(srv.rss_bytes())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            results = _run_clients(args, srv.address, 0)
            stop.set()
            sampler.join()
            net = _summary(results, args.seconds)
            lost, corrupted, samples = trio.run(_verify, srv.address, results, args.pages)
            assert srv.proc is not None
            status = Path(f"/proc/{srv.proc.pid}/status").read_text()
            hwm = next(
                int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmHWM:")
            )
        finally:
            srv.kill()

    mode = "durable (--data-dir)" if args.data_dir else "memory"
    print(
        f"{args.clients} clients in {args.procs} processes, {args.seconds:g} s per side, "
        f"{args.pages} pages per segment, {int(READ_SHARE * 100)}% reads of 1-{MAX_RUN} pages; "
        f"server: {mode}, loopback"
    )
    print(f"{'':14}{'plain':>12}{'netmemfs':>12}{'ratio':>8}")
    for key, label in [
        ("ops_s", "ops/s"),
        ("mb_s", "MB/s"),
        ("read_p50_us", "read p50 us"),
        ("read_p99_us", "read p99 us"),
        ("commit_p50_us", "commit p50 us"),
        ("commit_p99_us", "commit p99 us"),
    ]:
        ratio = net[key] / plain[key] if plain[key] else float("nan")
        print(f"{label:14}{plain[key]:12.1f}{net[key]:12.1f}{ratio:8.2f}")
    pages_total = args.clients * args.pages
    print(f"errors {int(net['errors'])}, reads that saw a wrong page {int(net['bad_reads'])}")
    print(f"verify: {pages_total} pages, lost {lost}, corrupted {corrupted}")
    for s in samples:
        print("  ", s)
    for r in results:
        for e in r.get("error_samples", [])[:3]:
            print("   error:", e)
    data_mb = pages_total * PAGE_SIZE / 2**20
    sampled = max(rss_samples, default=0) / 2**20
    print(
        f"server peak RSS {hwm / 2**20:.1f} MiB (sampled max {sampled:.1f} MiB) "
        f"for {data_mb:.1f} MiB of pages stored"
    )
    if args.png is not None:
        for kind in ("reads", "commits"):
            written = plot.cdf(
                plot.path_for(args.png, kind),
                f"{kind} under load: {args.clients} clients, server {mode}",
                {
                    "plain": [x * 1e6 for r in plain_results for x in r[kind]],
                    "netmemfs": [x * 1e6 for r in results for x in r[kind]],
                },
                reference="plain",
            )
            print(f"wrote {written}")
        written = plot.grouped(
            plot.path_for(args.png, "throughput"),
            f"{args.clients} clients, server {mode}",
            {"ops/s": {"plain": plain["ops_s"], "netmemfs": net["ops_s"]}},
            unit="operations per second",
            reference="plain",
        )
        print(f"wrote {written}")
    ok = lost == 0 and corrupted == 0 and net["bad_reads"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
