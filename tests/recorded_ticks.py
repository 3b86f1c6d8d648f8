"""The watchdog's ticks as it ran them, for tests of "reported within threshold + one tick".

That promise is about the watchdog's ticks, not about the test's wall clock: on a loaded
machine ticks come later than ``watchdog_interval``, and a report's log line later still (it
asks pg_stat_activity over a new connection first).  So tests record the clock reading each
tick used and check that a finding came on the first tick past its threshold.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from poolguard import _watchdog


class WatchdogTicks:
    """The ``time.monotonic()`` reading of every tick the watchdog ran, per pool."""

    def __init__(self) -> None:
        self.of: dict[Any, list[float]] = defaultdict(list)

    def finding(self, pool: Any, taken_at: float, age: float) -> tuple[float, float]:
        """(the tick before, the tick) for the tick that found a checkout taken at
        ``taken_at`` to be ``age`` s old (a PoolEvent's ``age``: the tick's reading minus
        ``taken_at``, so the same subtraction finds that tick).  The tick before is -inf when
        there was none (a watchdog thread that started late finds it on its first tick)."""
        ticks = [float("-inf"), *self.of[pool]]
        found = [i for i, now in enumerate(ticks) if abs(now - taken_at - age) < 1e-9]
        assert found, f"no tick saw age {age}: ages at the ticks {[t - taken_at for t in ticks]}"
        return ticks[found[0] - 1], ticks[found[0]]

    def usual_interval(self, pool: Any) -> float:
        """The median time between two ticks: ``watchdog_interval`` give or take, unless the
        watchdog used another interval (a late tick on a loaded machine moves the median
        little)."""
        ticks = list(self.of[pool])
        assert len(ticks) >= 3, ticks
        return statistics.median(b - a for a, b in itertools.pairwise(ticks))


@pytest.fixture
def watchdog_ticks(monkeypatch: pytest.MonkeyPatch) -> Iterator[WatchdogTicks]:
    ticks = WatchdogTicks()
    check_pool = _watchdog._check_pool

    def recording(pool: Any, now: float) -> None:
        ticks.of[pool].append(now)
        check_pool(pool, now)

    monkeypatch.setattr(_watchdog, "_check_pool", recording)
    yield ticks
