"""The benches' figures (issue 17, item 5): bench/plot.py writes PNGs that show the
samples and the ratios given, checked by reading the files back with matplotlib."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/NAME.py as a module (its own imports find bench/'s modules, as when run)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size(png: Path) -> tuple[int, int]:
    image = pytest.importorskip("matplotlib.image").imread(png)  # decodes it whole
    return int(image.shape[1]), int(image.shape[0])


def test_each_kind_of_figure_is_a_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plot = _bench("plot", monkeypatch)
    base = tmp_path / "bench.png"
    cdf = plot.cdf(
        plot.path_for(base, "faults"),
        "faults",
        {"zram": [3.0, 4.0, 5.0, 0.0], "netmemfs": [50.0, 60.0, 200.0]},
        reference="zram",
        marks={"floor": 20.0},
    )
    bars = plot.bars(
        plot.path_for(base, "bars"),
        "bars",
        {"plain": 100.0, "netmemfs": 50.0},
        unit="MB/s",
        reference="plain",
    )
    grouped = plot.grouped(
        plot.path_for(base, "grouped"),
        "grouped",
        {"seq": {"plain": 10.0, "netmemfs": 5.0}, "rand": {"plain": 2.0, "netmemfs": 1.0}},
        unit="MB/s",
        reference="plain",
    )
    assert [p.name for p in (cdf, bars, grouped)] == [
        "bench-faults.png",
        "bench-bars.png",
        "bench-grouped.png",
    ]
    for png in (cdf, bars, grouped):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        width, height = _size(png)
        assert width > 400 and height > 300, (png, width, height)


def test_every_bench_takes_png() -> None:
    """Each bench under bench/ (but the nullfs helper and plot itself) offers --png."""
    for path in sorted(BENCH.glob("*.py")):
        if path.stem in ("plot", "nullfs"):
            continue
        assert "plot.add_argument(ap)" in path.read_text(), f"{path.name} has no --png"


def test_stores_takes_redis_benchmarks_p50_not_another_column(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench/stores.py's reference is redis-benchmark's p50, found by its column's name
    (it once took the fourth column, the minimum, for it). The text is what Debian's
    redis-benchmark 7.0 printed here."""
    text = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
        '"p99_latency_ms","max_latency_ms"\n'
        '"GET","16666.67","0.050","0.024","0.047","0.079","0.135","1.727"\n'
    )
    assert _bench("stores", monkeypatch).p50_from_csv(text) == pytest.approx(47.0)


def test_the_uffd_floor_serves_faults_from_a_real_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/uffd_floor.c builds with the warnings as errors, and serves every fault of
    its region from a real redis-server (it checks each page it loads)."""
    from tests.redis_procs import RedisProc

    stores = _bench("stores", monkeypatch)
    exe = stores.build_uffd_floor(tmp_path)
    redis = RedisProc(tmp_path)
    try:
        p50 = stores.uffd_floor_p50(exe, redis.port, 64 * 4096, 300)
    finally:
        redis.kill()
    assert 0 < p50 < 100_000


def test_anon_counts_the_cpu_of_each_part_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/anon.py's CPU table: the server's CPU is its own (the server is a child of
    the bench too, and was once counted as an agent as well), another child's is the
    agent's, a thread's other than the main one is the fault thread's."""
    import subprocess
    import sys
    import threading
    import time

    from tests.helpers import read_line

    anon_bench = _bench("anon", monkeypatch)
    # Spins for 0.3 s of CPU, says so, then waits for its stdin to close.
    spin = "import sys,time\nwhile time.process_time() < 0.3: pass\nprint(1, flush=True)\n"
    spin += "sys.stdin.read()\n"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for code in (spin, "import sys\nsys.stdin.read()\n")  # the "server", an idle "agent"
    ]
    server = children[0]
    spun, done = threading.Event(), threading.Event()

    def fault_thread() -> None:  # spins for 0.2 s of CPU, then lives on until done
        while time.thread_time() < 0.2:
            pass
        spun.set()
        done.wait(60)

    try:
        before = anon_bench.netmemfs_cpu(server.pid)
        thread = threading.Thread(target=fault_thread)
        thread.start()
        assert server.stdout is not None
        assert read_line(server.stdout, 60) == b"1\n"
        assert spun.wait(60)
        after = anon_bench.netmemfs_cpu(server.pid)
        done.set()
        thread.join()
    finally:
        for child in children:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.close()
            child.wait(60)
            child.stdout.close()
    used = {part: after[part] - before[part] for part in before}
    assert used["server"] >= 0.25, used
    assert used["agent"] < 0.15, used  # the server's 0.3 s is not in it
    assert used["fault thread"] >= 0.15, used


def test_the_benches_read_the_hypervisor_s_steal_from_proc_stat() -> None:
    """Each bench prints the share of CPU time the hypervisor stole during its run
    (tests/helpers.StealMeter): steal is /proc/stat's eighth figure, and guest time (the
    ninth and tenth) is in user time already, so it is not counted twice. The line is
    this machine's, with its per-CPU lines after it."""
    from tests.helpers import StealMeter, parse_steal

    text = "cpu  3370982 0 764727 3714885 51470 0 58730 123237 7 9\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert parse_steal(text) == (123237, 8084031)
    assert "% of the CPUs' time was stolen" in StealMeter().line()
