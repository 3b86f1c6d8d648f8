"""The asyncpg dialect through the real PgBouncer 1.18 in transaction mode.

SQLAlchemy's defaults (asyncpg's statement cache, the adapter's prepared-statement cache, named
statements ``__asyncpg_stmt_N__``) fail as soon as two clients' statements meet on one server
connection.  poolguard's factory (caches off, unnamed statements) runs the same load cleanly.
The workload: more client connections than PgBouncer has server connections, each running a
few distinct statements many times, inside transactions and out.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from sa_helpers import sa_url
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

import poolguard
import poolguard.sqlalchemy
from poolguard.sqlalchemy import create_async_engine
from poolguard.testing import PgBouncerServer

pytestmark = [pytest.mark.pgbouncer, pytest.mark.slow]

CLIENTS = 10  # PgBouncer's default_pool_size in the fixture is 4
ROUNDS = 30
STATEMENTS = [
    "SELECT CAST(:n AS int) + 1",
    "SELECT count(*) FROM generate_series(1, CAST(:n AS int))",
    "SELECT CAST(:n AS int) * 2, 'x'",
]


async def run_load(engine: AsyncEngine) -> list[str]:
    errors: list[str] = []

    async def client(seed: int) -> None:
        for i in range(ROUNDS):
            sql = text(STATEMENTS[(seed + i) % len(STATEMENTS)])
            try:
                async with engine.connect() as conn:
                    await conn.execute(sql, {"n": i + 1})
                    await conn.commit()
            except DBAPIError as exc:
                errors.append(str(exc.orig).splitlines()[0])
            await asyncio.sleep(0)

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    await engine.dispose()
    return errors


def reconnect_servers(bouncer: PgBouncerServer) -> None:
    """Ask PgBouncer to replace its server connections (drops statements left on them)."""
    admin: Any = psycopg.connect(bouncer.dsn, dbname="pgbouncer", autocommit=True)
    with admin:
        admin.cursor().execute("RECONNECT")


def test_sqlalchemy_defaults_fail_behind_pgbouncer(pgbouncer_server: PgBouncerServer) -> None:
    engine = sa_create_async_engine(sa_url(pgbouncer_server.dsn, "asyncpg"), pool_size=CLIENTS)
    try:
        errors = asyncio.run(run_load(engine))
    finally:
        reconnect_servers(pgbouncer_server)
    assert errors, "named prepared statements should collide behind transaction pooling"
    assert all("prepared statement" in e for e in errors), sorted(set(errors))


def test_poolguard_factory_does_not_fail_behind_pgbouncer(
    pgbouncer_server: PgBouncerServer,
) -> None:
    # Its own application_name: PgBouncer's server connections keep the last one they were given,
    # and other tests count the server's 'poolguard:default' backends.
    poolguard.configure(
        pgbouncer_server.dsn, max_size=CLIENTS, timeout=30, application_name="sa-pgbouncer-test"
    )
    engine = create_async_engine(sa_url(pgbouncer_server.dsn, "asyncpg"))

    async def body() -> list[str]:
        try:
            return await run_load(engine)
        finally:
            await poolguard.sqlalchemy.aclose()

    assert asyncio.run(body()) == []
