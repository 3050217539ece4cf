"""Numbers a running component keeps about itself, and their export to Prometheus.

Each component counts in plain integers and Latency objects on its own trio thread
(the data path pays an increment, or a bisect for a duration) and has a statistics()
method that returns a frozen snapshot. A scrape of `--metrics HOST:PORT` is served by
prometheus-client's HTTP server on a thread of its own; it takes one snapshot through
the component's trio loop (so it never reads state half-changed) and turns it into
metric families: work bounded by the number of kinds of things counted, never by the
pages or requests behind them.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import trio

from netmemfs.errors import NetmemError
from netmemfs.sizes import parse_host_port

# prometheus-client is imported when metrics are served, not by every process that
# counts (a region's agent starts per map: its import would add some 50 ms).
if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the latency histograms' buckets: from a page fault served
# locally to a commit that waits on a slow disk.
LATENCY_BUCKETS_S = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)
RECENT_S = 60.0  # p50/p99 are over this last stretch of time
RECENT_MAX = 4096  # samples kept for them: the newest, when more came in RECENT_S


class MetricsError(NetmemError):
    """--metrics cannot be served as given."""

    code = "metrics"


@dataclasses.dataclass(frozen=True)
class LatencyStatistics:
    count: int  # since start
    sum_s: float
    # (upper bound in seconds, how many took at most that), bound by bound; the last
    # bound is infinity (== count).
    buckets: tuple[tuple[float, int], ...]
    # Over the last RECENT_S (the newest RECENT_MAX samples of it); None: none then.
    recent: int
    p50_s: float | None
    p99_s: float | None


class Latency:
    """Durations of one kind of operation: a histogram since start (for Prometheus)
    and the recent ones (for a status's p50/p99)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._sum_s = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=RECENT_MAX)

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self._sum_s += seconds
        self._recent.append((time.monotonic(), seconds))

    def statistics(self) -> LatencyStatistics:
        cumulative = []
        total = 0
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), self._counts, strict=True):
            total += n
            cumulative.append((bound, total))
        since = time.monotonic() - RECENT_S
        recent = sorted(s for t, s in self._recent if t >= since)
        p50 = p99 = None
        if recent:
            p50 = recent[(len(recent) - 1) // 2]
            p99 = recent[min(len(recent) - 1, (len(recent) * 99) // 100)]
        return LatencyStatistics(total, self._sum_s, tuple(cumulative), len(recent), p50, p99)


def counter(name: str, doc: str, value: float) -> Metric:
    """A counter; name without _total (prometheus-client adds it)."""
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def labelled(
    name: str, doc: str, kind: str, label: str, values: dict[str, int] | dict[str, float]
) -> Metric:
    """A counter (name without _total) or a gauge with one sample per label value."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    m = family(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        m.add_metric([key], value)
    return m


def histogram(name: str, doc: str, stats: LatencyStatistics) -> Metric:
    """A latency histogram in seconds."""
    from prometheus_client.core import HistogramMetricFamily

    buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in stats.buckets]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=stats.sum_s)


# One metric of a statistics snapshot: (name without the prefix, counter names without
# _total; "counter", "gauge" or "histogram"; the snapshot's field, dotted for one of a
# field; the help text; for a field that is a dict, the label its keys go under).
Spec = tuple[str, str, str, str] | tuple[str, str, str, str, str]


def families(prefix: str, specs: Sequence[Spec], stats: object) -> list[Metric]:
    """The metric families specs describe, of one snapshot; a field that is None (a
    bound not set, a door not served), or part of one that is, gives no family."""
    out = []
    for spec in specs:
        name, kind, field, doc = spec[:4]
        value: Any = stats
        for part in field.split("."):
            value = getattr(value, part) if value is not None else None
        if value is None:
            continue
        if kind == "histogram":
            out.append(histogram(prefix + name, doc, value))
        elif isinstance(value, dict):
            out.append(labelled(prefix + name, doc, kind, spec[4], value))  # type: ignore[misc]
        elif kind == "counter":
            out.append(counter(prefix + name, doc, value))
        else:
            out.append(gauge(prefix + name, doc, value))
    return out


class MetricsEndpoint:
    """An HTTP endpoint serving families() at /metrics, until close()."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.socket.getsockname()[:2]
        self.address = f"{host}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve_metrics(address: str, families: Callable[[], list[Metric]]) -> MetricsEndpoint:
    """Serve families() (called in the current trio run) on address ('HOST:PORT',
    port 0: any free one); MetricsError saying what to change if it cannot be."""
    try:
        host, port = parse_host_port(address, 0)
    except ValueError as e:
        raise MetricsError(f"--metrics {e}") from None
    from prometheus_client import start_http_server
    from prometheus_client.registry import Collector, CollectorRegistry

    token = trio.lowlevel.current_trio_token()

    class Snapshot(Collector):
        """The metric families of one snapshot, taken in the trio loop."""

        def collect(self) -> Iterable[Metric]:
            try:
                return trio.from_thread.run_sync(families, trio_token=token)
            except trio.RunFinishedError:
                return []  # the component is stopping

        def describe(self) -> Iterable[Metric]:
            return []  # names are known at collect time only: nothing checked earlier

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    try:
        httpd, thread = start_http_server(port, host, registry)
    except OSError as e:
        what = e.strerror or str(e)
        hint = (
            "another process listens there: pick another port with --metrics HOST:PORT"
            if port
            else "check the address"
        )
        raise MetricsError(
            f"cannot serve metrics on {host}:{port} (--metrics): {what}; {hint}"
        ) from None
    endpoint = MetricsEndpoint(httpd, thread)
    log.info("serving metrics on http://%s/metrics", endpoint.address)
    return endpoint
