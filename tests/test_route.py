"""mode="auto" finds where a DSN leads: PostgreSQL, a session pooler or a transaction pooler."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from poolguard._route import find_route
from poolguard.testing import PgBouncerServer, PostgresServer, start_pgbouncer

pytestmark = pytest.mark.pgbouncer


@pytest.fixture(scope="module")
def session_bouncer(postgres_server: PostgresServer) -> Iterator[PgBouncerServer]:
    bouncer = start_pgbouncer(postgres_server, pool_mode="session")
    try:
        yield bouncer
    finally:
        bouncer.stop()


def _route(dsn: str) -> tuple[str, str]:
    with psycopg.connect(dsn) as conn:
        route = find_route(conn, dsn)
    return route.path, route.mode


def test_postgres_itself_is_direct(postgres_server: PostgresServer) -> None:
    assert _route(postgres_server.dsn) == ("direct", "session")


def test_pgbouncer_in_session_mode_keeps_prepared_statements(
    session_bouncer: PgBouncerServer,
) -> None:
    assert _route(session_bouncer.dsn) == ("session", "session")


def test_pgbouncer_in_transaction_mode_is_a_transaction_pooler(
    pgbouncer_server: PgBouncerServer,
) -> None:
    assert _route(pgbouncer_server.dsn) == ("transaction", "transaction")
