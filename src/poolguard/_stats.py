"""stats() of a pool name: one snapshot per flavor, and their sum.

The flavors of a name share one budget, so the sum keeps the name's ``max`` and ``idle.min``
(not their multiple); counts add up; for timing summaries ``count`` and ``sum`` add up and the
percentiles and ``max`` are the largest of the flavors' (an upper bound, not a merged
distribution).
"""

from __future__ import annotations

from typing import Any

# Keys that describe the name, not one flavor: taken from the first snapshot.
_SHARED = (
    "db.client.connection.pool.name",
    "db.client.connection.max",
    "db.client.connection.idle.min",
    "poolguard.mode",  # one decision per name, shared by its flavors
)


def combine(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sum of per-flavor snapshots, with each one under ``"poolguard.flavors"``."""
    total: dict[str, Any] = {}
    for snapshot in parts.values():
        for key, value in snapshot.items():
            if key in _SHARED:
                total.setdefault(key, value)
            elif key not in total:
                total[key] = dict(value) if isinstance(value, dict) else value
            else:
                total[key] = _add(total[key], value)
    total["poolguard.flavors"] = parts
    return total


def _add(a: Any, b: Any) -> Any:
    if not isinstance(a, dict):
        return a + b
    if "p50" in a:  # a timing summary
        return {k: a[k] + b[k] if k in ("count", "sum") else max(a[k], b[k]) for k in a}
    return {k: _add(a[k], b[k]) if k in b else a[k] for k in a}
