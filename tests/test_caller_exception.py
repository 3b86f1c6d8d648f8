"""``with poolguard.connection()`` never replaces the block's own exception.

A rollback that fails while the block is raising is logged (with the checkout site) and the
connection is discarded; a commit that fails on success still raises.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import psycopg
import pytest

import poolguard
from poolguard.testing import PostgresServer


class Deadline(Exception):
    """What a request deadline or Celery's SoftTimeLimitExceeded raises from a signal handler."""


@pytest.fixture
def alarm() -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Deadline("request deadline")

    previous = signal.signal(signal.SIGALRM, fire)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_signal_handler_exception_mid_query_reaches_the_caller(
    pg_dsn: str, alarm: None, caplog: pytest.LogCaptureFixture
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with (
        caplog.at_level(logging.WARNING, logger="poolguard"),
        pytest.raises(Deadline, match="request deadline"),
        poolguard.connection() as conn,
    ):
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        conn.execute("SELECT pg_sleep(2)")
    assert conn.closed  # a connection with a query in flight is never shelved
    assert any("still running" in m and __file__.rsplit("/", 1)[1] in m for m in _warnings(caplog))
    with pool.connection(timeout=5) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_error_after_backend_terminated_reaches_the_caller(
    pg_dsn: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with (
        caplog.at_level(logging.WARNING, logger="poolguard"),
        pytest.raises(ValueError, match="the block's own error"),
        poolguard.connection() as conn,
    ):
        conn.execute("SELECT 1")  # a transaction is open
        with postgres_server.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        raise ValueError("the block's own error")
    assert conn.closed
    logged = _warnings(caplog)
    assert any(
        "rollback failed" in m and "ValueError propagates" in m and "test_caller_exception" in m
        for m in logged
    ), logged
    with pool.connection(timeout=5) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_failed_commit_on_success_still_raises(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with pool.connection() as conn:
        conn.execute("CREATE TABLE once (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(psycopg.errors.UniqueViolation), pool.connection() as conn:
        conn.execute("INSERT INTO once VALUES (1), (1)")  # checked at COMMIT
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM once").fetchone() == (0,)


def test_rollback_on_error_is_quiet_when_it_works(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=1, max_size=1)
    with (
        caplog.at_level(logging.WARNING, logger="poolguard"),
        pytest.raises(KeyError),
        pool.connection() as conn,
    ):
        conn.execute("SELECT 1")
        raise KeyError("x")
    assert _warnings(caplog) == []
    assert pool.stats()["poolguard.connection.rollbacks_on_return"] == 0
    with pool.connection() as again:
        assert again is conn  # rolled back and shelved, not discarded


async def _async_cases(pg_dsn: str, server: PostgresServer) -> list[Any]:
    poolguard.configure(pg_dsn, min_size=1, max_size=1)
    pool = poolguard.get_async_pool()
    seen: list[Any] = []
    # A deadline mid-query: asyncio delivers it as a cancellation of the awaiting task.
    try:
        async with asyncio.timeout(0.3), pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(2)")
    except TimeoutError as exc:
        seen.append(exc)
    # The backend dies, then the block raises on its own.
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            with server.connect() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            raise ValueError("the block's own error")
    except ValueError as exc:
        seen.append(exc)
        seen.append(conn.closed)
    async with pool.connection(timeout=5) as fresh:
        seen.append(await (await fresh.execute("SELECT 1")).fetchone())
    await pool.close()
    return seen


def test_async_caller_exception_wins(
    pg_dsn: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        timeout, value, closed, row = asyncio.run(_async_cases(pg_dsn, postgres_server))
    assert isinstance(timeout, TimeoutError)
    assert isinstance(value, ValueError) and str(value) == "the block's own error"
    assert closed is True
    assert row == (1,)
    assert any("ValueError propagates" in m for m in _warnings(caplog))
