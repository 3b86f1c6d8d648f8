"""What the exporters read: every live pool of every flavor, by name, through stats().

The flavors of one name (sync pool, asyncio twin, asyncpg pool) are one pool to whoever
watches: their stats() are merged, so gauges, counters and histogram buckets add up.
"""

from __future__ import annotations

from typing import Any

from ._metrics import COUNTERS, TIMINGS, merge
from ._pool import live_pools
from ._settings import Settings
from ._watchdog import server_query


def stats_by_name() -> dict[str, dict[str, Any]]:
    """{pool name: merged stats()} for every pool of this process that is not closed."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pool in live_pools():
        by_name.setdefault(pool.name, []).append(pool.stats())
    return {name: merge(snapshots) for name, snapshots in sorted(by_name.items())}


def settings_by_name() -> dict[str, Settings]:
    """{pool name: its settings} (the flavors of one name share them)."""
    return {pool.name: pool.settings for pool in live_pools()}


class Increase:
    """What grew since the last look, pool by pool, summed by pool name: for exporters that
    add increments (Prometheus counters, OpenTelemetry histograms).

    Each pool's figures only grow, so per pool the increase is a difference; summing first
    would not do, since a closed flavor would make a name's totals go down.  A pool whose
    figures went down was rebuilt (a fork gives it new metrics): all of it is new.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[int, str], Any] = {}

    def collect(self) -> dict[str, dict[str, Any]]:
        """{pool name: {counter key: increase, timing key: [(bucket, new samples, their sum)]}}
        since the previous call, for every live pool."""
        grown: dict[str, dict[str, Any]] = {}
        last, self._last = self._last, {}
        for pool in live_pools():
            token = id(pool.metrics)
            stats = pool.stats()
            into = grown.setdefault(pool.name, {})
            for key in COUNTERS:
                value = stats.get(key, 0)
                before = last.get((token, key), 0)
                self._last[token, key] = value
                into[key] = into.get(key, 0) + (value if value < before else value - before)
            for key in TIMING_KEYS:
                buckets, sums = stats[key]["buckets"], stats[key]["bucket_sums"]
                seen = last.get((token, key))
                self._last[token, key] = (buckets, sums)
                if seen is None or any(n < m for n, m in zip(buckets, seen[0], strict=True)):
                    seen = ([0] * len(buckets), [0.0] * len(sums))
                per_bucket = into.setdefault(key, {})
                for i, n in enumerate(buckets):
                    if n > seen[0][i]:
                        count, total = per_bucket.get(i, (0, 0.0))
                        per_bucket[i] = (count + n - seen[0][i], total + sums[i] - seen[1][i])
        for into in grown.values():
            for key in TIMING_KEYS:
                into[key] = [(i, n, total) for i, (n, total) in sorted(into[key].items())]
        return grown

    def clear(self) -> None:
        self._last.clear()


#: stats() keys of the three timings.
TIMING_KEYS = tuple(f"db.client.connection.{timing}" for timing in TIMINGS)


def server_slots(settings: Settings) -> tuple[int, int] | None:
    """(client sessions, slots for clients) of the pool's server, over a short connection of
    its own (so the pool's wait and use figures stay the app's); None if it cannot be read.

    Slots for clients: max_connections less the reserved ones.  Behind a pooler the query
    runs on the server through it, and counts every database's sessions, as the limit does.
    """
    rows = server_query(settings, "exporter", _SLOTS)
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


_SLOTS = """
SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       current_setting('max_connections')::int
       - current_setting('superuser_reserved_connections')::int
       - coalesce(current_setting('reserved_connections', true), '0')::int
"""
