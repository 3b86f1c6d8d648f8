"""What the exporters read: every live pool of every flavor, by name, through stats().

The flavors of one name (sync pool, asyncio twin, asyncpg pool) are one pool to whoever
watches: their stats() are merged, so gauges, counters and histogram buckets add up.
"""

from __future__ import annotations

from typing import Any

from ._metrics import TIMINGS, merge
from ._pool import live_pools


def stats_by_name() -> dict[str, dict[str, Any]]:
    """{pool name: merged stats()} for every pool of this process that is not closed."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pool in live_pools():
        by_name.setdefault(pool.name, []).append(pool.stats())
    return {name: merge(snapshots) for name, snapshots in sorted(by_name.items())}


def drain_samples() -> dict[str, dict[str, list[float]]]:
    """{pool name: {timing: raw samples since the last drain}} (taps must be on)."""
    drained: dict[str, dict[str, list[float]]] = {}
    for pool in live_pools():
        per_timing = drained.setdefault(pool.name, {t: [] for t in TIMINGS})
        for timing in TIMINGS:
            per_timing[timing].extend(getattr(pool.metrics, timing).drain())
    return drained
