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
