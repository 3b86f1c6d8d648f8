"""poolguard.otel against the OpenTelemetry SDK's in-memory reader and a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import poolguard

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import poolguard.otel

POOL = "db.client.connection.pool.name"


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation = poolguard.otel.instrument(meter_provider=provider)
    try:
        yield reader
    finally:
        instrumentation.uninstrument()
        provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """{instrument name: metric} of one collection."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def points(metric: Any, pool: str) -> list[Any]:
    return [p for p in metric.data.data_points if p.attributes.get(POOL) == pool]


def test_exhaustion_and_leak_reported_by_every_instrument(
    reader: InMemoryMetricReader, pg_dsn: str
) -> None:
    poolguard.configure(
        pg_dsn,
        name="otel",
        min_size=1,
        max_size=1,
        timeout=1.0,
        leak_threshold=0.5,
        watchdog_interval=0.05,
    )
    served = 5
    for _ in range(served):
        with poolguard.connection("otel") as conn:
            conn.execute("SELECT 1")

    holder_has_it = threading.Event()
    release = threading.Event()

    def holder() -> None:  # the leak: keeps the only connection past leak_threshold
        conn = poolguard.get_pool("otel").getconn()
        holder_has_it.set()
        release.wait(10)
        poolguard.get_pool("otel").putconn(conn)

    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with poolguard.connection("otel", timeout=1.5):
                pass
        except poolguard.PoolExhausted as exc:
            errors.append(exc)

    held = threading.Thread(target=holder)
    held.start()
    assert holder_has_it.wait(5)
    waiting = threading.Thread(target=waiter)
    waiting.start()
    deadline = time.monotonic() + 1.0
    while poolguard.stats("otel")["db.client.connection.pending_requests"] < 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.01)
    during = collect(reader)
    assert points(during["db.client.connection.pending_requests"], "otel")[0].value == 1
    waiting.join(10)
    assert len(errors) == 1
    deadline = time.monotonic() + 5
    while poolguard.stats("otel")["poolguard.connection.leaks"] < 1:
        assert time.monotonic() < deadline, "the watchdog never reported the leak"
        time.sleep(0.05)
    release.set()
    held.join(10)

    metrics = collect(reader)
    requests_made = served + 2  # the holder's checkout and the waiter's timed-out one
    expected_units = {
        "db.client.connection.count": "{connection}",
        "db.client.connection.max": "{connection}",
        "db.client.connection.idle.max": "{connection}",
        "db.client.connection.idle.min": "{connection}",
        "db.client.connection.pending_requests": "{request}",
        "db.client.connection.timeouts": "{timeout}",
        "db.client.connection.create_time": "s",
        "db.client.connection.wait_time": "s",
        "db.client.connection.use_time": "s",
        "poolguard.connection.leaks": "{connection}",
        "poolguard.connection.reclaimed": "{connection}",
        "poolguard.connection.rollbacks_on_return": "{connection}",
        "poolguard.connection.discarded_on_return": "{connection}",
        "poolguard.connection.session_resets": "{reset}",
        "poolguard.connection.capped": "{event}",
        "poolguard.connection.server_refusals": "{connection}",
    }
    for name, unit in expected_units.items():
        assert name in metrics, f"{name} not exported"
        assert metrics[name].unit == unit, name
        assert points(metrics[name], "otel"), f"{name} has no point for pool 'otel'"

    count = {
        p.attributes["db.client.connection.state"]: p.value
        for p in points(metrics["db.client.connection.count"], "otel")
    }
    assert count == {"idle": 1, "used": 0}

    def value(name: str) -> Any:
        return points(metrics[name], "otel")[0].value

    assert value("db.client.connection.max") == 1
    assert value("db.client.connection.idle.max") == 1
    assert value("db.client.connection.idle.min") == 1
    assert value("db.client.connection.pending_requests") == 0
    assert value("db.client.connection.timeouts") == 1
    assert value("poolguard.connection.leaks") == 1
    assert value("poolguard.connection.reclaimed") == 0

    wait = points(metrics["db.client.connection.wait_time"], "otel")[0]
    assert wait.count == requests_made
    assert wait.sum >= 1.5  # the timed-out wait is in it
    assert tuple(wait.explicit_bounds) == poolguard._metrics.BUCKETS
    use = points(metrics["db.client.connection.use_time"], "otel")[0]
    assert use.count == served + 1
    assert use.sum >= 1.0  # the holder kept it past the leak threshold and the waiter's timeout
    create = points(metrics["db.client.connection.create_time"], "otel")[0]
    assert create.count >= 1
    # Every instrument carries the pool name, and only the count carries a state.
    for name, metric in metrics.items():
        for point in metric.data.data_points:
            keys = set(point.attributes)
            expected = {POOL, "db.client.connection.state"} if name.endswith(".count") else {POOL}
            assert keys == expected, (name, keys)


def test_async_and_sync_flavors_of_one_name_are_one_pool(
    reader: InMemoryMetricReader, pg_dsn: str
) -> None:
    import asyncio

    poolguard.configure(pg_dsn, name="both", min_size=0, max_size=2)
    with poolguard.connection("both") as conn:
        conn.execute("SELECT 1")

    async def use_async() -> dict[str, Any]:
        for _ in range(3):
            async with poolguard.aconnection("both") as aconn:
                await aconn.execute("SELECT 1")
        try:
            return collect(reader)
        finally:
            await poolguard.get_async_pool("both").close()

    metrics = asyncio.run(use_async())
    wait = points(metrics["db.client.connection.wait_time"], "both")[0]
    assert wait.count == 4
    count = {
        p.attributes["db.client.connection.state"]: p.value
        for p in points(metrics["db.client.connection.count"], "both")
    }
    assert count == {"idle": 2, "used": 0}  # one idle connection in each flavor
    assert points(metrics["db.client.connection.max"], "both")[0].value == 4


def test_asyncpg_flavor_is_reported_with_its_timed_out_wait(
    reader: InMemoryMetricReader, pg_dsn: str
) -> None:
    import asyncio

    pytest.importorskip("asyncpg")
    from poolguard.sqlalchemy._asyncpg import asyncpg_pool

    poolguard.configure(pg_dsn, name="apg", max_size=1)
    pool = asyncpg_pool("apg")

    async def body() -> dict[str, Any]:
        for _ in range(3):
            await pool.putconn(await pool.getconn())
        held = await pool.getconn()
        with pytest.raises(poolguard.PoolExhausted):
            await pool.getconn(timeout=0.05)
        try:
            return collect(reader)
        finally:
            await pool.putconn(held)
            await pool.close()

    metrics = asyncio.run(body())
    wait = points(metrics["db.client.connection.wait_time"], "apg")[0]
    assert wait.count == 5  # 3 + the holder's + the timed-out one
    assert points(metrics["db.client.connection.timeouts"], "apg")[0].value == 1
    used = {
        p.attributes["db.client.connection.state"]: p.value
        for p in points(metrics["db.client.connection.count"], "apg")
    }
    assert used["used"] == 1
