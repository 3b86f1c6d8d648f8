"""What the exporters read: every live pool of every flavor, by name, through stats().

The flavors of one name (sync pool, asyncio twin, asyncpg pool) are one pool to whoever
watches: their stats() are merged, so gauges, counters and histogram buckets add up.
"""

from __future__ import annotations

from typing import Any

from ._metrics import TIMINGS, merge
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


def drain_samples() -> dict[str, dict[str, list[float]]]:
    """{pool name: {timing: raw samples since the last drain}} (taps must be on)."""
    drained: dict[str, dict[str, list[float]]] = {}
    for pool in live_pools():
        per_timing = drained.setdefault(pool.name, {t: [] for t in TIMINGS})
        for timing in TIMINGS:
            per_timing[timing].extend(getattr(pool.metrics, timing).drain())
    return drained


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
