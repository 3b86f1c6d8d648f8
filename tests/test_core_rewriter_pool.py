"""configure(rewriter=True): prepared statements on, the embedded rewriter pooling transactions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg.conninfo import conninfo_to_dict

import poolguard
from poolguard import ConfigurationError
from poolguard.testing import PgBouncerServer, PostgresServer


def test_prepared_statements_need_session_mode_or_the_rewriter(
    pgbouncer_server: PgBouncerServer,
) -> None:
    with pytest.raises(ConfigurationError, match="rewriter=True"):
        poolguard.configure(pgbouncer_server.dsn, prepare_threshold=0)
    settings = poolguard.configure(pgbouncer_server.dsn, name="rw", rewriter=True).settings
    assert settings.prepare_threshold == 5  # psycopg's own default, back on


def test_rewriter_refuses_a_transaction_pooler_upstream(pgbouncer_server: PgBouncerServer) -> None:
    pool = poolguard.configure(pgbouncer_server.dsn, rewriter=True)
    with pytest.raises(ConfigurationError, match="transaction-mode pooler"), pool.connection():
        pass


def test_pool_behind_the_rewriter_prepares_without_errors(
    pg_dsn: str, postgres_server: PostgresServer
) -> None:
    # 12 app connections share the rewriter's 3 server connections.
    pool = poolguard.configure(pg_dsn, name="rw", rewriter=True, prepare_threshold=0, max_size=3)
    app_side = psycopg_pool.ConnectionPool(
        pool._target_conninfo(),
        min_size=0,
        max_size=12,
        kwargs={"prepare_threshold": 0},
        open=True,
    )
    errors: list[str] = []

    def user(n: int, take: Callable[[], Any]) -> None:
        for i in range(40):
            try:
                with take() as conn:
                    row = conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone()
                    assert row == (n + i,)
            except psycopg.Error as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=user, args=(n, pool.connection)) for n in range(4)]
    threads += [threading.Thread(target=user, args=(n, app_side.connection)) for n in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        app_side.close()
    assert errors == []
    with pool.connection() as conn:  # the statement really is prepared on the server
        conn.execute("SELECT %s::int + %s::int", (1, 2))
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert prepared is not None and prepared[0] >= 1
    dbname = conninfo_to_dict(pg_dsn)["dbname"]
    with postgres_server.connect() as admin:
        backends = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        ).fetchone()
    assert backends is not None and backends[0] <= 3
    assert postgres_server.password not in repr(pool)
