"""Prometheus metrics for every poolguard pool, multiprocess mode (gunicorn) included.

Needs ``pip install 'poolguard[prometheus]'``.  One line at start-up::

    poolguard.prometheus.instrument()

then expose them with :func:`wsgi_app`, :func:`asgi_app` or :func:`django_view` (or any
prometheus_client exposition).  Names follow OpenTelemetry's, the Prometheus way: base units in
the name, ``_total`` on counters, labels ``pool`` and ``state``.

Why values are pushed rather than collected: in prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, one process per gunicorn worker) a scrape is answered by one
worker that reads the other workers' files; custom collectors and ``set_function`` only ever
show that one worker.  So a daemon thread in each process copies its pools' figures into
ordinary metrics every ``interval`` seconds (gauges as ``livesum``, so a scrape sums the live
workers; counters and histograms by their increase), and each exposition below pushes its
own process's figures first.  Without multiprocess mode the same metrics are plain ones.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "poolguard.prometheus needs prometheus_client: pip install 'poolguard[prometheus]'"
    ) from exc

from ._exporting import Increase, server_slots, settings_by_name, stats_by_name
from ._metrics import BUCKETS, COUNTERS

#: stats() key of each gauge -> Prometheus name (no unit: they count connections or requests).
GAUGES = {
    "db.client.connection.max": "db_client_connection_max",
    "db.client.connection.idle.max": "db_client_connection_idle_max",
    "db.client.connection.idle.min": "db_client_connection_idle_min",
    "db.client.connection.pending_requests": "db_client_connection_pending_requests",
}
#: stats() key of each counter -> Prometheus name (prometheus_client adds ``_total``).
COUNTER_NAMES = {key: key.replace(".", "_") for key in COUNTERS}
#: stats() key of each histogram -> Prometheus name (seconds, the base unit).
HISTOGRAMS = {
    "db.client.connection.wait_time": "db_client_connection_wait_time_seconds",
    "db.client.connection.use_time": "db_client_connection_use_time_seconds",
    "db.client.connection.create_time": "db_client_connection_create_time_seconds",
}
COUNT = "db_client_connection_count"
#: The server's figures, read every ``server_interval`` s: sessions, and slots for clients.
SERVER = ("poolguard_server_connections", "poolguard_server_connections_max")


def metric_names() -> set[str]:
    """Every series name this exporter writes (for alert rules and dashboards)."""
    names = {COUNT, *GAUGES.values(), *SERVER}
    names |= {f"{name}_total" for name in COUNTER_NAMES.values()}
    for name in HISTOGRAMS.values():
        names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


class Exporter:
    """The metrics of one registry and the thread that keeps them current."""

    def __init__(
        self, registry: CollectorRegistry, interval: float, server_interval: float
    ) -> None:
        self.interval = interval
        self.server_interval = server_interval
        self.registry = registry
        live: Any = {"multiprocess_mode": "livesum"}
        self._count = Gauge(
            COUNT, "Connections by state (idle, used)", ["pool", "state"], registry=registry, **live
        )
        self._gauges = {
            key: Gauge(name, f"OpenTelemetry {key}", ["pool"], registry=registry, **live)
            for key, name in GAUGES.items()
        }
        self._counters = {
            key: Counter(name, f"poolguard {key}", ["pool"], registry=registry)
            for key, name in COUNTER_NAMES.items()
        }
        # Every worker sees the same server: the highest live figure, not the sum.
        server: Any = {"multiprocess_mode": "livemax"}
        self._server = (
            Gauge(
                SERVER[0],
                "Client sessions on the pool's server",
                ["pool"],
                registry=registry,
                **server,
            ),
            Gauge(
                SERVER[1],
                "max_connections less reserved slots",
                ["pool"],
                registry=registry,
                **server,
            ),
        )
        self._histograms = {
            key: Histogram(
                name, f"OpenTelemetry {key}", ["pool"], buckets=BUCKETS, registry=registry
            )
            for key, name in HISTOGRAMS.items()
        }
        _check_histogram_layout(next(iter(self._histograms.values())))
        self._lock = threading.Lock()
        self._increase = Increase()
        self._names: set[str] = set()
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart, after stop()) the push thread."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolguard-prometheus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_server_check = 0.0
        while not self._stop.wait(self.interval):
            self.push()
            if self.server_interval and time.monotonic() >= next_server_check:
                next_server_check = time.monotonic() + self.server_interval
                self.push_server()

    def push_server(self) -> None:
        """Read each pool's server slots now (a short connection per pool name)."""
        for name, settings in settings_by_name().items():
            slots = server_slots(settings)
            if slots is not None:
                self._server[0].labels(name).set(slots[0])
                self._server[1].labels(name).set(slots[1])

    def push(self) -> None:
        """Copy this process's pool figures into the metrics now."""
        with self._lock:
            current = stats_by_name()
            for name in self._names - current.keys():  # closed since: its gauges drop to 0
                for state in ("idle", "used"):
                    self._count.labels(name, state).set(0)
                for gauge in self._gauges.values():
                    gauge.labels(name).set(0)
            self._names = set(current)
            for name, stats in current.items():
                for state, value in stats["db.client.connection.count"].items():
                    self._count.labels(name, state).set(value)
                for key, gauge in self._gauges.items():
                    gauge.labels(name).set(stats.get(key, 0))
            for name, grown in self._increase.collect().items():
                for key, counter in self._counters.items():
                    child = counter.labels(name)  # a 0 series from the start, for alerts
                    if grown[key]:
                        child.inc(grown[key])
                for key, histogram in self._histograms.items():
                    bins: Any = histogram.labels(name)
                    # prometheus_client has no public "add n samples to bucket i"; a child keeps
                    # one value per bucket (not cumulative, +Inf last: our layout, checked at
                    # start) and one for the sum, each with inc() (a file in multiprocess mode).
                    for i, count, total in grown[key]:
                        bins._buckets[i].inc(count)
                        bins._sum.inc(total)

    def _after_fork_in_child(self) -> None:
        # The child's pools start from zero and prometheus_client starts its files afresh.
        self._lock = threading.Lock()
        self._increase.clear()
        self._names.clear()
        self.start()

    def stop(self) -> None:
        """Stop the thread (the metrics stay registered)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _check_histogram_layout(histogram: Histogram) -> None:
    child = histogram.labels("_layout_check")
    if len(getattr(child, "_buckets", ())) != len(BUCKETS) + 1 or not hasattr(child, "_sum"):
        raise RuntimeError(
            f"prometheus_client {getattr(prometheus_client, '__version__', '?')} keeps histogram "
            "buckets in an unknown layout: pin prometheus-client to a version poolguard supports"
        )
    histogram.remove("_layout_check")


_current: Exporter | None = None
_lock = threading.Lock()


def instrument(
    registry: CollectorRegistry | None = None,
    interval: float = 1.0,
    server_interval: float = 15.0,
) -> Exporter:
    """Export every pool's metrics through prometheus_client (once per process; later calls
    return the first exporter).  ``interval``: seconds between two pushes of this process's
    figures; a scrape through this module's apps is always current for the process it hits.
    ``server_interval``: seconds between two reads of the server's slots (0: never)."""
    global _current
    with _lock:
        if _current is None:
            _current = Exporter(registry or prometheus_client.REGISTRY, interval, server_interval)
        return _current


def uninstrument() -> None:
    """Stop the exporter and unregister its metrics (for tests)."""
    global _current
    with _lock:
        exporter, _current = _current, None
    if exporter is not None:
        exporter.stop()
        for metric in (
            exporter._count,
            *exporter._gauges.values(),
            *exporter._counters.values(),
            *exporter._histograms.values(),
            *exporter._server,
        ):
            exporter.registry.unregister(metric)


def exposition() -> tuple[bytes, str]:
    """(body, content type) of a scrape: this process pushed first; every worker's figures in
    multiprocess mode."""
    if _current is not None:
        _current.push()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app that answers every request with the metrics (mount it at /metrics)."""
    body, content_type = exposition()
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """An ASGI app that answers every HTTP request with the metrics (FastAPI: app.mount)."""
    if scope["type"] != "http":
        return
    body, content_type = exposition()
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def django_view(request: Any) -> Any:
    """A Django view: ``path("metrics", poolguard.prometheus.django_view)``."""
    from django.http import HttpResponse  # type: ignore[import-untyped]

    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: drop a dead worker's live gauges (gunicorn.conf.py:
    ``from poolguard.prometheus import child_exit``)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    if _current is not None:
        _current._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
