"""GuardedPool against a real PostgreSQL: bounded, clean on return, precise when it fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import poolguard
from poolguard import PoolConnectError, PoolExhausted, testing
from poolguard.testing import PostgresServer, free_port


def run_users(users: int, requests: int, request: Callable[[], None]) -> tuple[int, list[str]]:
    """Run ``users`` threads of ``requests`` calls each; return (successes, error messages)."""
    seen = testing.run_users(users, requests, lambda user, i: request())
    return seen.ok, seen.failures


@pytest.fixture(scope="module")
def small_server(postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """A server with max_connections=20, as on a small managed plan."""
    return postgres_factory(max_connections=20)


def test_50_threads_against_20_connections_zero_errors(small_server: PostgresServer) -> None:
    poolguard.configure(small_server.dsn, max_size=8, timeout=30)

    def request() -> None:
        with poolguard.connection() as conn:
            conn.execute("SELECT pg_sleep(0.002)")

    ok, errors = run_users(50, 20, request)
    assert (ok, errors) == (1000, [])
    stats = poolguard.stats()
    assert stats["db.client.connection.timeouts"] == 0
    assert stats["db.client.connection.wait_time"]["count"] == 1000


def test_connect_per_request_fails_on_the_same_server(small_server: PostgresServer) -> None:
    """The contrast: without a pool the same load exhausts max_connections (the bug is real)."""

    def request() -> None:
        with psycopg.connect(small_server.dsn, connect_timeout=10) as conn:
            conn.execute("SELECT pg_sleep(0.05)")

    ok, errors = run_users(50, 4, request)
    assert ok + len(errors) == 200
    assert errors, "50 concurrent connections against max_connections=20 should be refused"
    assert all("too many clients" in e or "remaining connection slots" in e for e in errors)


def test_application_name_shows_whose_connections_they_are(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn, name="billing")
    with poolguard.connection("billing") as conn:
        row = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row == ("poolguard:billing",)


def test_prepared_statements_are_off_by_default(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn)
    with poolguard.connection() as conn:
        for _ in range(10):
            conn.execute("SELECT %s::int", (1,))
        count = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert count == (0,)


def test_context_manager_commits_on_success_and_rolls_back_on_error(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn)
    with poolguard.connection() as conn:
        conn.execute("CREATE TABLE t (x int)")
    with poolguard.connection() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError), poolguard.connection() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        1 / 0  # noqa: B018
    with poolguard.connection() as conn:
        assert conn.execute("SELECT array_agg(x) FROM t").fetchone() == ([1],)


def test_returned_mid_transaction_is_rolled_back_and_next_caller_is_clean(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1, guard="off")
    conn = pool.getconn()
    conn.execute("CREATE TABLE IF NOT EXISTS t (x int)")
    conn.commit()
    conn.execute("SET statement_timeout = '1234ms'")
    conn.execute("INSERT INTO t VALUES (1)")  # left open
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        pool.putconn(conn)
    [record] = [r for r in caplog.records if "rolled back" in r.getMessage()]
    assert "test_core_pool.py" in record.getMessage()  # where it was taken
    assert "open transaction" in record.getMessage()

    with pool.connection() as again:
        assert again is conn  # max_size=1: the very same connection
        assert again.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert again.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert again.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert poolguard.stats()["poolguard.connection.rollbacks_on_return"] == 1


def test_failed_transaction_is_rolled_back_on_return(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    conn = pool.getconn()
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    pool.putconn(conn)
    with pool.connection() as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_client_side_changes_do_not_reach_the_next_caller(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with pool.connection() as conn:
        conn.autocommit = True
        conn.read_only = True
        conn.row_factory = dict_row  # type: ignore[assignment]
    with pool.connection() as conn:
        assert conn.autocommit is False
        assert conn.read_only is None
        assert conn.execute("SELECT 1 AS one").fetchone() == (1,)


def test_broken_connection_is_discarded_and_replaced(
    pg_dsn: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    conn = pool.getconn()
    victim = conn.info.backend_pid
    with postgres_server.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        pool.putconn(conn)
    assert any("discarding" in r.getMessage() for r in caplog.records)
    with pool.connection(timeout=10) as fresh:
        assert fresh.execute("SELECT pg_backend_pid()").fetchone() != (victim,)


def test_exhaustion_error_names_pool_counts_and_oldest_holder(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, name="tiny", min_size=1, max_size=1)
    holder = pool.getconn()  # the "leak": this line must appear in the error
    line = test_exhaustion_error_names_pool_counts_and_oldest_holder.__code__.co_firstlineno + 2
    time.sleep(0.2)
    try:
        with pytest.raises(PoolExhausted) as info, pool.connection(timeout=0.3):
            pass
    finally:
        pool.putconn(holder)
    message = str(info.value)
    assert "pool 'tiny' exhausted after 0.3 s" in message
    assert "1/1 connections in use" in message
    assert f"test_core_pool.py:{line}" in message
    assert isinstance(info.value, psycopg.OperationalError)  # existing handlers still catch it
    assert poolguard.stats("tiny")["db.client.connection.timeouts"] == 1


def test_unreachable_host_names_host_and_hides_password() -> None:
    port = free_port()
    pool = poolguard.configure(f"postgresql://app:s3cr3t-pw@127.0.0.1:{port}/db", connect_timeout=2)
    with pytest.raises(PoolConnectError) as info, pool.connection():
        pass
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "app@" in message
    assert "s3cr3t" not in message
    assert "s3cr3t" not in repr(pool)


def test_wrong_password_names_user_and_hides_password(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = f"postgresql://{postgres_server.user}:wrong-s3cr3t@127.0.0.1:{postgres_server.port}/x"
    with caplog.at_level(logging.DEBUG), pytest.raises(PoolConnectError) as info:
        poolguard.configure(dsn).open()
    message = str(info.value)
    assert "password authentication failed" in message
    assert postgres_server.user in message
    assert "wrong-s3cr3t" not in message + caplog.text


def test_no_password_in_repr_stats_logs_or_checkouts(
    pg_dsn: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = postgres_server.password
    with caplog.at_level(logging.DEBUG):
        pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
        conn = pool.getconn()
        conn.execute("BEGIN")
        shown = [repr(pool), str(pool.settings), repr(pool.settings), str(pool.stats())]
        shown += [f"{r.site} {r.owner_name()}" for r in pool.checkouts()]
        pool.putconn(conn)  # logs a rollback warning
    assert caplog.text
    for text in [*shown, caplog.text]:
        assert secret not in text


def test_stats_use_opentelemetry_names(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=2)
    with pool.connection():
        used = pool.stats()["db.client.connection.count"]["used"]
    stats: dict[str, Any] = poolguard.stats()
    assert used == 1
    assert stats["db.client.connection.count"]["used"] == 0
    assert stats["db.client.connection.max"] == 2
    assert stats["db.client.connection.pending_requests"] == 0
    for timing in ("wait_time", "use_time", "create_time"):
        summary = stats[f"db.client.connection.{timing}"]
        assert summary["count"] >= 1
        assert 0 <= summary["p50"] <= summary["p95"] <= summary["p99"] <= summary["max"]


def test_closed_pool_refuses_and_configure_makes_a_new_one(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn)
    with pool.connection():
        pass
    pool.close()
    with pytest.raises(psycopg.OperationalError, match="closed"), pool.connection():
        pass
    fresh = poolguard.configure(pg_dsn)
    assert fresh is not pool
    with fresh.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def _async_body(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    async with poolguard.aconnection() as conn:
        await conn.execute("CREATE TABLE a (x int)")
    apool = poolguard.get_async_pool()
    conn = await apool.getconn()
    await conn.execute("INSERT INTO a VALUES (1)")
    await apool.putconn(conn)  # mid-transaction: rolled back
    async with poolguard.aconnection() as conn:
        cur = await conn.execute("SELECT count(*) FROM a")
        assert await cur.fetchone() == (0,)
    holder = await apool.getconn()
    with pytest.raises(PoolExhausted, match=r"test_core_pool\.py"):
        async with apool.connection(timeout=0.2):
            pass
    await apool.putconn(holder)
    assert apool.stats()["poolguard.connection.rollbacks_on_return"] == 1
    assert pool.settings is apool.settings
    await apool.close()


def test_async_twin(pg_dsn: str) -> None:
    import asyncio

    asyncio.run(_async_body(pg_dsn))


def test_session_state_left_in_autocommit_is_discarded_on_return(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1, guard="off")
    with pool.connection() as conn:
        conn.autocommit = True
        conn.execute("SET work_mem = '7MB'")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        default = conn.execute("SELECT reset_val FROM pg_settings WHERE name = 'work_mem'")
        default_work_mem = default.fetchone()
    with pool.connection() as conn:
        assert conn.autocommit is False
        setting = conn.execute("SELECT setting FROM pg_settings WHERE name = 'work_mem'")
        assert setting.fetchone() == default_work_mem
        temp = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'")
        assert temp.fetchone() == (0,)
        assert conn.execute("SHOW application_name").fetchone() == ("poolguard:default",)
    assert poolguard.stats()["poolguard.connection.session_resets"] == 1


def test_guard_warns_in_transaction_mode_and_raises_when_asked(pg_dsn: str) -> None:
    from poolguard._guard import SessionStateError, SessionStateWarning

    poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with pytest.warns(SessionStateWarning, match="SET LOCAL"), poolguard.connection() as conn:
        conn.execute("SET search_path = public")
    poolguard.configure(pg_dsn, name="strict", guard="raise")
    with pytest.raises(SessionStateError), poolguard.connection("strict") as conn:
        conn.execute("SELECT pg_advisory_lock(1)")
    poolguard.configure(pg_dsn, name="direct", mode="session")
    with poolguard.connection("direct") as conn:  # session mode: no warning (filterwarnings=error)
        conn.execute("SET search_path = public")


def test_returning_twice_is_refused_and_never_hands_one_connection_to_two(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=2, max_size=2)
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(psycopg.ProgrammingError, match="not checked out"):
        pool.putconn(conn)
    first, second = pool.getconn(), pool.getconn()
    try:
        assert first is not second
    finally:
        pool.putconn(first)
        pool.putconn(second)


def test_with_hold_server_cursor_is_flagged_and_reset(pg_dsn: str) -> None:
    from poolguard._guard import SessionStateWarning

    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with (
        pytest.warns(SessionStateWarning),
        pool.connection() as conn,
        conn.cursor("held", withhold=True) as cur,
    ):
        cur.execute("SELECT generate_series(1, 3)")
        assert cur.fetchone() == (1,)
    # A plain named cursor inside a transaction: no warning (filterwarnings=error).
    with pool.connection() as conn, conn.cursor("plain") as cur:
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]
    assert poolguard.stats()["poolguard.connection.session_resets"] == 1


def test_async_pool_opens_once_when_many_tasks_arrive_together(
    pg_dsn: str, postgres_server: PostgresServer
) -> None:
    import asyncio

    poolguard.configure(pg_dsn, min_size=0, max_size=2, name="crowd")
    probes = 0
    original = poolguard.AsyncGuardedPool._probe_now

    def counting_probe(self: Any, **kwargs: Any) -> Any:
        nonlocal probes
        probes += 1
        return original(self, **kwargs)

    async def main() -> None:
        async def one() -> None:
            async with poolguard.aconnection("crowd") as conn:
                await conn.execute("SELECT 1")

        await asyncio.gather(*(one() for _ in range(20)))
        await poolguard.get_async_pool("crowd").close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(poolguard.AsyncGuardedPool, "_probe_now", counting_probe)
        asyncio.run(main())
    assert probes == 1


def test_connection_whose_rollback_fails_is_discarded_and_replaced(
    pg_dsn: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    conn = pool.getconn()
    conn.execute("SELECT 1")  # a transaction is now open on the client side
    victim = conn.info.backend_pid
    with postgres_server.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        pool.putconn(conn)  # the rollback meets a dead socket
    assert any("whose rollback failed" in r.getMessage() for r in caplog.records)
    assert conn.closed
    with pool.connection(timeout=10) as fresh:
        assert fresh.execute("SELECT pg_backend_pid()").fetchone() != (victim,)


def test_min_size_one_holds_one_connection_after_the_first_checkout(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=4)
    app = pool.settings.application_name
    with pool.connection() as conn:
        conn.execute("SELECT 1")
        assert testing.count_sessions(pg_dsn, app) == 1
    time.sleep(0.3)  # a growth the first checkout started would have connected by now
    assert testing.count_sessions(pg_dsn, app) == 1
    assert pool.stats()["db.client.connection.count"] == {"idle": 1, "used": 0}


def test_async_min_size_one_holds_one_connection_after_the_first_checkout(pg_dsn: str) -> None:
    import asyncio

    pool = poolguard.configure(pg_dsn, min_size=1, max_size=4)
    app = pool.settings.application_name

    async def main() -> tuple[int, int]:
        async with poolguard.aconnection() as conn:
            await conn.execute("SELECT 1")
            during = await asyncio.to_thread(testing.count_sessions, pg_dsn, app)
        await asyncio.sleep(0.3)
        after = await asyncio.to_thread(testing.count_sessions, pg_dsn, app)
        await poolguard.get_async_pool().close()
        return during, after

    assert asyncio.run(main()) == (1, 1)
