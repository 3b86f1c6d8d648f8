"""OpenTelemetry metrics for every poolguard pool: ``poolguard.otel.instrument()``.

Needs ``pip install 'poolguard[otel]'``.  Registers the semantic-convention instruments
(``db.client.connection.*``, attribute ``db.client.connection.pool.name``) and poolguard's own
counters (``poolguard.connection.*``) on the global meter provider, or on the one given.
Everything is read when the SDK collects, so instrumenting adds nothing to a checkout: gauges
and counters from stats(), and the three duration histograms from the pools' own buckets.
Samples a histogram has not seen yet are recorded then, bucket by bucket, as that many samples
of their mean (which lies inside the bucket): counts, buckets and sums are exact, and min/max
are those means.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "poolguard.otel needs the OpenTelemetry API: pip install 'poolguard[otel]'"
    ) from exc

from . import __version__
from ._exporting import Increase, stats_by_name
from ._metrics import BUCKETS, COUNTERS

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

#: (stats() key, instrument name, unit, description) of the observed up-down counters.
GAUGES = (
    ("db.client.connection.max", "{connection}", "The maximum number of open connections allowed"),
    (
        "db.client.connection.idle.max",
        "{connection}",
        "The maximum number of idle open connections allowed",
    ),
    (
        "db.client.connection.idle.min",
        "{connection}",
        "The minimum number of idle open connections allowed",
    ),
    (
        "db.client.connection.pending_requests",
        "{request}",
        "The number of current pending requests for an open connection",
    ),
)
#: Units of the monotonic counters, by stats() key.
COUNTER_UNITS = {
    "db.client.connection.timeouts": "{timeout}",
    "poolguard.connection.leaks": "{connection}",
    "poolguard.connection.reclaimed": "{connection}",
    "poolguard.connection.rollbacks_on_return": "{connection}",
    "poolguard.connection.discarded_on_return": "{connection}",
    "poolguard.connection.session_resets": "{reset}",
    "poolguard.connection.capped": "{event}",
    "poolguard.connection.server_refusals": "{connection}",
}
HISTOGRAMS = {
    "wait_time": "The time it took to obtain an open connection from the pool",
    "use_time": "The time between borrowing a connection and returning it to the pool",
    "create_time": "The time it took to create a new connection",
}


class Instrumentation:
    """The registered instruments; :meth:`uninstrument` stops them reporting."""

    def __init__(self, meter_provider: metrics.MeterProvider | None) -> None:
        meter = metrics.get_meter("poolguard", __version__, meter_provider=meter_provider)
        self.active = True
        self._lock = threading.Lock()
        self._increase = Increase()
        self._histograms = {
            timing: meter.create_histogram(
                f"db.client.connection.{timing}",
                unit="s",
                description=text,
                explicit_bucket_boundaries_advisory=BUCKETS,
            )
            for timing, text in HISTOGRAMS.items()
        }
        # Registered first: the SDK runs the callbacks before it reads the histograms, so the
        # samples recorded in this one are part of the same collection.
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in the state described "
            "by the state attribute",
        )
        for key, unit, text in GAUGES:
            meter.create_observable_up_down_counter(
                key, [self._reader(key)], unit=unit, description=text
            )
        for key, unit in COUNTER_UNITS.items():
            meter.create_observable_counter(
                key,
                [self._reader(key)],
                unit=unit,
                description=f"poolguard: {COUNTERS[key].replace('_', ' ')}"
                if key.startswith("poolguard.")
                else "The number of connection timeouts that have occurred trying to "
                "obtain a connection from the pool",
            )

    def _record(self) -> None:
        """Record into the histograms the samples the pools took since the last collection."""
        with self._lock:  # two readers collecting at once must not record a sample twice
            for name, grown in self._increase.collect().items():
                attributes = {POOL: name}
                for timing, histogram in self._histograms.items():
                    for _, count, total in grown[f"db.client.connection.{timing}"]:
                        mean = total / count
                        for _ in range(count):
                            histogram.record(mean, attributes)

    def _observe_count(self, options: CallbackOptions) -> Iterator[Observation]:
        if not self.active:
            return
        self._record()
        for name, stats in stats_by_name().items():
            for state, value in stats["db.client.connection.count"].items():
                yield Observation(value, {POOL: name, STATE: state})

    def _reader(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            if not self.active:
                return
            for name, stats in stats_by_name().items():
                yield Observation(stats.get(key, 0), {POOL: name})

        return observe

    def uninstrument(self) -> None:
        """Stop reporting (the instruments stay registered, silent)."""
        global _current
        self.active = False
        if _current is self:
            _current = None


_current: Instrumentation | None = None


def instrument(meter_provider: Any = None) -> Instrumentation:
    """Report every pool's metrics through OpenTelemetry; once per process (later calls
    return the first instrumentation).  ``meter_provider``: default, the global one."""
    global _current
    if _current is None:
        _current = Instrumentation(meter_provider)
    return _current
