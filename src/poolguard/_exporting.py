"""What the exporters read: every live pool of every flavor, by name, through stats().

The flavors of one name (sync pool, asyncio twin, asyncpg pool) are one pool to whoever
watches: their stats() are merged, so gauges, counters and histogram buckets add up.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from ._metrics import merge
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
    """What grew since the last look, key by key, for exporters that add increments.

    A figure that went down (a pool closed or rebuilt, a fork) starts again from zero: all of
    it is new, as Prometheus treats a counter reset.
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, Any] = {}

    def counter(self, key: Hashable, value: float) -> float:
        last = self._last.get(key, 0)
        self._last[key] = value
        return value if value < last else value - last

    def timing(self, key: Hashable, timing: Mapping[str, Any]) -> list[tuple[int, int, float]]:
        """(bucket index, new samples, their sum) for each bucket that grew."""
        buckets, sums = timing["buckets"], timing["bucket_sums"]
        last = self._last.get(key)
        self._last[key] = (buckets, sums)
        if last is None or any(now < then for now, then in zip(buckets, last[0], strict=True)):
            last = ([0] * len(buckets), [0.0] * len(sums))
        return [
            (i, n - last[0][i], sums[i] - last[1][i])
            for i, n in enumerate(buckets)
            if n > last[0][i]
        ]

    def clear(self) -> None:
        self._last.clear()


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
