"""Fixed-bucket timings: what stats() reports and how snapshots of several pools add up."""

from __future__ import annotations

import random

import pytest

from poolguard._metrics import BUCKETS, PoolMetrics, Timings, merge, quantile


def test_bucket_bounds_are_inclusive_like_prometheus_le() -> None:
    t = Timings()
    for seconds in (0.0, 0.001, 0.0010001, 30.0, 31.0):
        t.add(seconds)
    buckets = t.summary()["buckets"]
    assert buckets[0] == 2  # 0 and exactly 1 ms: le="0.001"
    assert buckets[1] == 1
    assert buckets[len(BUCKETS) - 1] == 1  # exactly 30 s
    assert buckets[-1] == 1  # +Inf
    assert t.count == 5 and t.max == 31.0


def test_percentiles_from_buckets_are_within_one_bucket_of_the_truth() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(-5, 1.2) for _ in range(20_000)]
    t = Timings()
    for s in samples:
        t.add(s)
    ordered = sorted(samples)
    for q in (0.5, 0.95, 0.99):
        true = ordered[int(q * len(ordered))]
        got = quantile(t.summary()["buckets"], q, t.max)
        i = next(i for i, b in enumerate(BUCKETS) if true <= b)
        lower = BUCKETS[i - 1] if i else 0.0
        assert lower <= got <= BUCKETS[i], (q, true, got)
    summary = t.summary()
    assert summary["p50"] <= summary["p95"] <= summary["p99"] <= summary["max"]
    assert summary["count"] == 20_000 and summary["sum"] == pytest.approx(sum(samples))


def test_max_under_one_millisecond_is_the_first_bound() -> None:
    t = Timings()
    t.add(0.0002)
    t.add(0.0004)
    summary = t.summary()
    assert summary["max"] == 0.001 and 0 < summary["p50"] <= summary["p99"] <= 0.001
    t.add(0.004)
    assert t.summary()["max"] == 0.004


def test_empty_and_overflow() -> None:
    assert quantile([0] * (len(BUCKETS) + 1), 0.99) == 0.0
    t = Timings()
    t.add(45.0)
    assert quantile(t.summary()["buckets"], 0.99, t.max) <= 45.0


def snapshot(waits: list[float], used: int, timeouts: int) -> dict[str, object]:
    m = PoolMetrics()
    for w in waits:
        m.wait_time.add(w)
    m.timeouts = timeouts
    return m.snapshot(name="p", idle=1, used=used, max_size=4, min_size=1, pending=2)


def test_merge_adds_counts_counters_and_buckets() -> None:
    a = snapshot([0.001] * 98, used=1, timeouts=0)
    b = snapshot([2.0, 2.0], used=3, timeouts=1)
    merged = merge([a, b])
    assert merged["db.client.connection.pool.name"] == "p"
    assert merged["db.client.connection.count"] == {"idle": 2, "used": 4}
    assert merged["db.client.connection.max"] == 8
    assert merged["db.client.connection.pending_requests"] == 4
    assert merged["db.client.connection.timeouts"] == 1
    wait = merged["db.client.connection.wait_time"]
    assert wait["count"] == 100 and wait["max"] == 2.0
    assert wait["bucket_sums"][0] == pytest.approx(0.098)
    assert wait["sum"] == pytest.approx(0.098 + 4.0)
    assert wait["p50"] <= 0.001 < 1.0 < wait["p99"] <= 2.0  # the slow 2 % set the p99
    with pytest.raises(ValueError):
        merge([])


def test_increase_per_pool_summed_by_name() -> None:
    """Exporters add what grew per pool: a closed flavor never makes a name count twice."""
    import asyncio

    import poolguard
    from poolguard._exporting import TIMING_KEYS, Increase
    from poolguard._metrics import PoolMetrics

    wait = TIMING_KEYS[0]
    sync = poolguard.configure("postgresql://nowhere.invalid/db", name="inc")  # never opened
    twin = poolguard.get_async_pool("inc")
    for seconds in (0.0002, 0.0004, 0.2):
        sync.metrics.wait_time.add(seconds)
    twin.metrics.wait_time.add(3.0)
    twin.metrics.leaks = 2
    seen = Increase()
    first = seen.collect()["inc"]
    assert [(i, n) for i, n, _ in first[wait]] == [(0, 2), (7, 1), (11, 1)]
    assert [total for _, _, total in first[wait]] == pytest.approx([0.0006, 0.2, 3.0])
    for i, n, total in first[wait]:  # each bucket's mean lies inside it: the replay is exact
        assert (BUCKETS[i - 1] if i else 0.0) < total / n <= BUCKETS[i]
    assert first["poolguard.connection.leaks"] == 2
    assert seen.collect()["inc"][wait] == []
    asyncio.run(twin.close())  # the async flavor goes away: nothing is counted again
    sync.metrics.wait_time.add(0.15)
    again = seen.collect()["inc"]
    assert again[wait] == [(7, 1, pytest.approx(0.15))]
    assert again["poolguard.connection.leaks"] == 0
    sync.metrics = PoolMetrics()  # rebuilt, as after a fork: everything in it is new
    sync.metrics.wait_time.add(0.0001)
    assert seen.collect()["inc"][wait] == [(0, 1, pytest.approx(0.0001))]
