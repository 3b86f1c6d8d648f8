"""poolguard's asyncpg pool (behind create_async_engine's asyncpg dialect) on its own."""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
import pytest
from sa_helpers import line_of_caller, sa_url
from sqlalchemy import text

import poolguard
import poolguard.sqlalchemy
from poolguard import ConfigurationError, PoolConnectError, PoolExhausted
from poolguard.sqlalchemy import AsyncpgPool, create_async_engine
from poolguard.sqlalchemy._asyncpg import asyncpg_pool


def test_budget_exhaustion_names_the_holders_line(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn, max_size=1, timeout=0.3)
    engine = create_async_engine(sa_url(pg_dsn, "asyncpg"))

    async def body() -> tuple[int, str]:
        line = line_of_caller()
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            # asyncpg's adapter wraps only asyncpg's errors: poolguard's arrive as they are
            with pytest.raises(PoolExhausted) as info:
                async with engine.connect():
                    pass
        await poolguard.sqlalchemy.aclose()
        return line, str(info.value)

    line, message = asyncio.run(body())
    assert "1/1 connections in use" in message
    assert f"test_sa_asyncpg_pool.py:{line} in body" in message


def test_returned_inside_a_transaction_is_rolled_back_with_a_warning(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = asyncpg_pool(poolguard.configure(pg_dsn, max_size=1).name)

    async def body() -> tuple[int, int, bool]:
        conn = await pool.getconn()
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE t (x int)")
        first = conn.get_server_pid()
        await pool.putconn(conn)
        again = await pool.getconn()
        in_tx = again.is_in_transaction()
        exists = await again.fetchval("SELECT to_regclass('pg_temp.t') IS NOT NULL")
        await pool.putconn(again)
        await pool.close()
        return first, again.get_server_pid(), in_tx or exists

    with caplog.at_level(logging.WARNING, logger="poolguard"):
        first, second, dirty = asyncio.run(body())
    assert first == second and not dirty
    assert any("inside an open transaction" in r.getMessage() for r in caplog.records)
    assert pool.metrics.rollbacks_on_return == 1


def test_connections_past_max_lifetime_are_replaced(pg_dsn: str) -> None:
    pool = asyncpg_pool(poolguard.configure(pg_dsn, max_size=1, max_lifetime=0.2).name)

    async def body() -> tuple[int, int]:
        conn = await pool.getconn()
        first = conn.get_server_pid()
        await pool.putconn(conn)
        time.sleep(0.3)
        conn = await pool.getconn()
        second = conn.get_server_pid()
        await pool.putconn(conn)
        await pool.close()
        return first, second

    first, second = asyncio.run(body())
    assert first != second


def test_foreign_connection_and_unsuitable_dsn_are_refused(pg_dsn: str) -> None:
    pool = asyncpg_pool(poolguard.configure(pg_dsn).name)
    assert isinstance(pool, AsyncpgPool)

    async def body() -> None:
        with pytest.raises(psycopg.ProgrammingError, match="did not give out"):
            await pool.putconn(object())

    asyncio.run(body())
    poolguard.reset()
    poolguard.configure(pg_dsn + " options='-c geqo=off'")  # TLS parameters are accepted
    with pytest.raises(ConfigurationError, match="options"):
        create_async_engine("postgresql+asyncpg://")


def test_wrong_password_is_a_connect_error_without_the_password(pg_dsn: str) -> None:
    url = sa_url(pg_dsn, "asyncpg").set(password="not-the-Password-42")
    engine = create_async_engine(url)

    async def body() -> str:
        with pytest.raises(PoolConnectError) as info:
            async with engine.connect():
                pass
        return str(info.value)

    message = asyncio.run(body())
    assert "cannot connect" in message and "not-the-Password-42" not in message
