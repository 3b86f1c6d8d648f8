"""Leak detection for AsyncGuardedPool against a real PostgreSQL: the asyncio twin of
test_leaks.py (owners are tasks; reclaiming runs on the pool's event loop)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

import poolguard
from poolguard import ConnectionLeakWarning, ConnectionReclaimed, PoolEvent
from poolguard._events import flush
from recorded_ticks import WatchdogTicks

HERE = os.path.basename(__file__)
TICK = 0.05


def line_of_next() -> int:
    return sys._getframe(1).f_lineno + 1


def leak_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "poolguard.leaks" and r.levelno == level
    ]


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


def async_pool(dsn: str, **options: Any) -> poolguard.AsyncGuardedPool:
    defaults: dict[str, Any] = {
        "min_size": 0,
        "max_size": 2,
        "timeout": 5,
        "leak_threshold": 0,
        "idle_in_transaction_threshold": 0,
        "watchdog_interval": TICK,
    }
    poolguard.configure(dsn, **{**defaults, **options})
    return poolguard.get_async_pool()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


@pytest.fixture(autouse=True)
def _leaks_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="poolguard.leaks")


def test_unreturned_connection_reported_with_the_task_and_line(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, watchdog_ticks: WatchdogTicks
) -> None:
    events: list[PoolEvent] = []
    pool = async_pool(pg_dsn, leak_threshold=0.3, on_event=events.append)

    async def main() -> None:
        taken = time.monotonic()  # no later than the checkout's own clock reading
        line = line_of_next()
        conn = await pool.getconn()
        (checkout,) = pool.ledger.records()
        await conn.execute("SELECT 'async leak'")
        await wait_for(lambda: leak_records(caplog))
        assert time.monotonic() - taken >= 0.3
        assert flush(5)
        (event,) = [e for e in events if e.kind == "leak"]
        assert event.age is not None and event.age >= 0.3
        # Found at the first tick past the threshold (see test_leaks.py's twin).
        before, _ = watchdog_ticks.finding(pool, checkout.taken_at, event.age)
        assert before - checkout.taken_at < 0.3
        (message,) = leak_records(caplog)
        assert f"{HERE}:{line} in main" in message
        assert "last statement: SELECT '…'" in message
        assert "by task 'Task-" in message
        assert "its owner is now at:" in message and "in wait_for" in message
        await pool.putconn(conn)
        await wait_for(lambda: leak_records(caplog, logging.INFO))

    run(main())
    assert pool.stats()["poolguard.connection.leaks"] == 1
    assert watchdog_ticks.usual_interval(pool) < 2 * TICK


def test_garbage_collected_connection_frees_its_slot(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = async_pool(pg_dsn, max_size=1)

    async def leaky_handler() -> None:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")

    line = leaky_handler.__code__.co_firstlineno + 1

    async def main() -> None:
        with pytest.warns(ConnectionLeakWarning, match=rf"{HERE}:{line} in leaky_handler"):
            await leaky_handler()
        started = time.monotonic()
        async with pool.connection(timeout=3) as conn:
            await conn.execute("SELECT 1")
        assert time.monotonic() - started < 2.0  # includes opening the replacement connection

    run(main())
    (message,) = leak_records(caplog)
    assert "garbage-collected" in message and f"{HERE}:{line}" in message
    assert pool.stats()["poolguard.connection.reclaimed"] == 1


def test_finished_tasks_connection_is_reclaimed(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = async_pool(pg_dsn, max_size=1)
    kept: list[psycopg.AsyncConnection[Any]] = []

    async def worker() -> None:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")
        kept.append(conn)  # referenced still, but this task is about to finish

    async def main() -> None:
        await asyncio.create_task(worker(), name="doomed-task")
        async with pool.connection(timeout=3) as conn:
            await conn.execute("SELECT 1")
        with pytest.raises(ConnectionReclaimed, match="reclaimed by poolguard after"):
            await kept[0].execute("SELECT 1")
        await pool.putconn(kept[0])

    run(main())
    (message,) = leak_records(caplog)
    assert "ended without returning it" in message and "in worker" in message


def test_connection_handed_to_another_task_is_not_reclaimed_while_in_use(pg_dsn: str) -> None:
    pool = async_pool(pg_dsn)

    async def main() -> None:
        # asyncio.wait_for runs getconn() in a task of its own on Python 3.11.
        conn = await asyncio.create_task(pool.getconn())
        for _ in range(20):  # keeps using it over many ticks
            await conn.execute("SELECT 1")
            await asyncio.sleep(TICK / 2)
        await pool.putconn(conn)

    run(main())
    assert pool.stats()["poolguard.connection.reclaimed"] == 0


def test_idle_transaction_reported_with_its_last_statement(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = async_pool(pg_dsn, idle_in_transaction_threshold=0.3)

    async def main() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 'async marker'")
            await wait_for(lambda: leak_records(caplog))

    run(main())
    (message,) = leak_records(caplog)
    assert "idle in a transaction" in message
    assert "last statement: SELECT '…'" in message


def test_reclaim_keeps_a_pool_of_two_serving(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    pool = async_pool(pg_dsn, max_size=2, leak_reclaim_after=0.3, timeout=3)

    async def main() -> None:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE t (x int)")
        leaked = [await pool.getconn(), await pool.getconn()]
        for conn in leaked:
            await conn.execute("INSERT INTO t VALUES (1)")
        pids = {conn.info.backend_pid for conn in leaked}
        for _ in range(6):
            async with pool.connection() as conn:
                assert conn.info.transaction_status == TransactionStatus.IDLE
                assert conn.info.backend_pid not in pids
                cur = await conn.execute("SELECT count(*) FROM t")
                assert await cur.fetchone() == (0,)
        await wait_for(lambda: all(conn.closed for conn in leaked))  # 6 may need one reclaim
        for conn in leaked:
            with pytest.raises(ConnectionReclaimed):
                await conn.commit()
            await pool.putconn(conn)

    run(main())
    assert pool.stats()["poolguard.connection.reclaimed"] == 2


def test_server_timeout_kills_idle_transaction_and_pool_keeps_serving(pg_dsn: str) -> None:
    pool = async_pool(pg_dsn, max_size=1, idle_in_transaction_session_timeout=0.3)

    async def main() -> None:
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                await asyncio.sleep(0.8)
                await conn.execute("SELECT 2")
        async with pool.connection(timeout=3) as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)

    run(main())


def test_watchdog_stops_once_the_async_pools_loop_is_gone(pg_dsn: str) -> None:
    from poolguard import _watchdog

    pool = async_pool(pg_dsn)

    async def main() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        assert _watchdog.running()

    run(main())
    poolguard.reset()  # forgets async pools without closing them: their loop is closed
    deadline = time.monotonic() + 2
    while _watchdog.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _watchdog.running()


def test_pool_exhausted_names_the_holding_task(pg_dsn: str) -> None:
    pool = async_pool(pg_dsn, max_size=1)

    async def main() -> None:
        conn = await pool.getconn()
        with pytest.raises(poolguard.PoolExhausted, match=r"in main \(task holder-task\)"):
            await pool.getconn(timeout=0.3)
        await pool.putconn(conn)

    async def outer() -> None:
        await asyncio.create_task(main(), name="holder-task")

    run(outer())
