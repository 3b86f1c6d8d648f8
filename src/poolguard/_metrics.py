"""Pool metrics named after OpenTelemetry's ``db.client.connection.*`` semantic conventions.

Durations go into fixed-size reservoirs of the most recent samples: appending is one deque
operation on the hot path, and percentiles are computed only when someone asks for them.
"""

from __future__ import annotations

from collections import deque
from typing import Any

RESERVOIR_SIZE = 4096


class Timings:
    """Recent durations (seconds) plus an all-time count and sum."""

    __slots__ = ("count", "recent", "total")

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=RESERVOIR_SIZE)
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.count += 1
        self.total += seconds

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.recent)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0

        return {
            "count": self.count,
            "sum": self.total,
            "p50": pct(0.50),
            "p95": pct(0.95),
            "p99": pct(0.99),
            "max": ordered[-1] if ordered else 0.0,
        }


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

    def snapshot(
        self, *, name: str, idle: int, used: int, max_size: int, min_size: int, pending: int
    ) -> dict[str, Any]:
        return {
            "db.client.connection.pool.name": name,
            "db.client.connection.count": {"idle": idle, "used": used},
            "db.client.connection.max": max_size,
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
        }
