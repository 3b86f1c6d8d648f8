"""Pool metrics named after OpenTelemetry's ``db.client.connection.*`` semantic conventions.

Durations go into fixed-bucket histograms (seconds, 1 ms .. 30 s): adding a sample is at most
one bisect and two additions on the hot path, and bucket counts add up across pools,
processes and hosts, which a window of recent samples cannot.  Percentiles are read from the
buckets only when someone asks for them.  Exporters read the same figures (see _exporting).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any, Final

#: Upper bounds (seconds, inclusive) of the histogram buckets; one more bucket holds the rest.
#: From 1 ms (a free connection) to 30 s (past any sane request timeout); 100 ms, the usual
#: alert threshold for client waits, is a bound so that alert reads exact counts.
BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Names of the three timings in stats() and in the exporters.
TIMINGS: Final = ("wait_time", "use_time", "create_time")
#: poolguard's own counters: stats() key -> short name used by the exporters.
COUNTERS: Final = {
    "db.client.connection.timeouts": "timeouts",
    "poolguard.connection.leaks": "leaks",
    "poolguard.connection.reclaimed": "reclaimed",
    "poolguard.connection.rollbacks_on_return": "rollbacks_on_return",
    "poolguard.connection.discarded_on_return": "discarded_on_return",
    "poolguard.connection.session_resets": "session_resets",
    "poolguard.connection.capped": "capped",
    "poolguard.connection.server_refusals": "server_refusals",
}


class Timings:
    """A fixed-bucket histogram of durations in seconds: per bucket a count and a sum; the max
    (exact from 1 ms up; 1 ms when every sample was shorter).

    The per-bucket sums cost the same as one running total, and let an exporter replay the
    samples it has not seen yet as ``count`` samples of their mean: that mean lies inside the
    bucket, so counts, buckets and sum stay exact without keeping any raw sample.
    """

    __slots__ = ("buckets", "fast", "fast_sum", "max", "sums")

    def __init__(self) -> None:
        # The first bucket lives in two plain attributes (see add); its list slots stay 0.
        self.fast = 0
        self.fast_sum = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sums = [0.0] * (len(BUCKETS) + 1)
        self.max = 0.0

    def add(
        self, seconds: float, _bucket: Any = bisect_left, _bounds: tuple[float, ...] = BUCKETS
    ) -> None:
        # Twice per checkout, so every step counts: the defaults save global lookups, and a
        # free pool's waits (the common case) take the first bucket without a bisect or a max.
        if seconds <= 0.001:
            self.fast += 1
            self.fast_sum += seconds
            return
        i = _bucket(_bounds, seconds)
        self.buckets[i] += 1
        self.sums[i] += seconds
        if seconds > self.max:
            self.max = seconds

    @property
    def count(self) -> int:
        return self.fast + sum(self.buckets)

    def summary(self) -> dict[str, Any]:
        buckets, sums = list(self.buckets), list(self.sums)
        buckets[0], sums[0] = self.fast, self.fast_sum
        # Samples under 1 ms do not update max (see add): when they are all there is, the
        # max reported is that bucket's bound.
        top = self.max or (BUCKETS[0] if buckets[0] else 0.0)
        return summarize(buckets, sums, top)


def summarize(buckets: list[int], sums: list[float], top: float) -> dict[str, Any]:
    """stats()' shape of one timing: count, sum, p50/p95/p99 (from the buckets), max, and
    per bucket the count and the sum of its samples."""
    return {
        "count": sum(buckets),
        "sum": sum(sums),
        "p50": quantile(buckets, 0.50, top),
        "p95": quantile(buckets, 0.95, top),
        "p99": quantile(buckets, 0.99, top),
        "max": top,
        "buckets": list(buckets),
        "bucket_sums": list(sums),
    }


def quantile(buckets: list[int], q: float, top: float = 0.0) -> float:
    """The q-quantile of a bucketed histogram, interpolated inside its bucket (as Prometheus'
    histogram_quantile does); never above the largest sample ``top`` when that is known."""
    count = sum(buckets)
    if not count:
        return 0.0
    rank = q * count
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            lower = BUCKETS[i - 1] if i else 0.0
            upper = BUCKETS[i] if i < len(BUCKETS) else max(top, BUCKETS[-1])
            value = lower + (upper - lower) * (rank - seen) / n
            return min(value, top) if top else value
        seen += n
    return top


class PoolMetrics:
    """Counters and timings of one pool; plain attributes, updated without locks.

    Updates race only in the sense that two threads may add to a counter at once; CPython's GIL
    makes each ``+= 1`` on an attribute nearly atomic, and metrics tolerate a rare lost count
    better than the hot path tolerates a lock.
    """

    def __init__(self) -> None:
        self.wait_time = Timings()
        self.use_time = Timings()
        self.create_time = Timings()
        self.timeouts = 0
        self.rollbacks_on_return = 0
        self.discarded_on_return = 0
        self.session_resets = 0
        self.leaks = 0
        self.reclaimed = 0
        self.server_refusals = 0

    def snapshot(
        self, *, name: str, idle: int, used: int, max_size: int, min_size: int, pending: int
    ) -> dict[str, Any]:
        return {
            "db.client.connection.pool.name": name,
            "db.client.connection.count": {"idle": idle, "used": used},
            "db.client.connection.max": max_size,
            # psycopg_pool keeps up to max_size connections idle: there is no separate bound.
            "db.client.connection.idle.max": max_size,
            "db.client.connection.idle.min": min_size,
            "db.client.connection.pending_requests": pending,
            "db.client.connection.timeouts": self.timeouts,
            "db.client.connection.wait_time": self.wait_time.summary(),
            "db.client.connection.use_time": self.use_time.summary(),
            "db.client.connection.create_time": self.create_time.summary(),
            "poolguard.connection.rollbacks_on_return": self.rollbacks_on_return,
            "poolguard.connection.discarded_on_return": self.discarded_on_return,
            "poolguard.connection.session_resets": self.session_resets,
            "poolguard.connection.leaks": self.leaks,
            "poolguard.connection.reclaimed": self.reclaimed,
            "poolguard.connection.server_refusals": self.server_refusals,
        }


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One stats() dict from several pools' (the flavors of one name, or many processes'):
    counts, counters and bucket counts add up; percentiles are read from the summed buckets."""
    items = list(snapshots)
    if not items:
        raise ValueError("merge() needs at least one stats() snapshot")
    merged: dict[str, Any] = dict(items[0])
    for key, value in items[0].items():
        if isinstance(value, bool) or key == "db.client.connection.pool.name":
            continue
        if isinstance(value, (int, float)):
            merged[key] = sum(s.get(key, 0) for s in items)
        elif key == "db.client.connection.count":
            merged[key] = {
                state: sum(s[key].get(state, 0) for s in items) for state in ("idle", "used")
            }
        elif isinstance(value, dict) and "buckets" in value:
            timings = [s[key] for s in items]
            merged[key] = summarize(
                [sum(col) for col in zip(*(t["buckets"] for t in timings), strict=True)],
                [sum(col) for col in zip(*(t["bucket_sums"] for t in timings), strict=True)],
                max(t["max"] for t in timings),
            )
    return merged
