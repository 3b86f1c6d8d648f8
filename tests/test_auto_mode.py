"""mode="auto": prepared statements where nothing can break them, transaction mode elsewhere.

Against real PostgreSQL, PgBouncer 1.18 in session and transaction mode, and a TCP relay that
moves a running pool from PostgreSQL to PgBouncer the way a failover would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import poolguard
from poolguard import ConfigurationError
from poolguard._route import find_route
from poolguard._settings import build_settings
from poolguard.testing import PgBouncerServer, PostgresServer, start_pgbouncer

pytestmark = pytest.mark.pgbouncer

LOOKUP = "SELECT %s::int + 1 AS auto_mode_lookup"
# A transaction pooler's server sessions may carry other clients' statements: only ours count.
PREPARED = (
    "SELECT name FROM pg_catalog.pg_prepared_statements WHERE statement LIKE '%auto_mode_lookup%'"
)


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


def test_find_route_postgres_itself_is_direct(postgres_server: PostgresServer) -> None:
    assert _route(postgres_server.dsn) == ("direct", "session")


def test_find_route_pgbouncer_in_session_mode_keeps_prepared_statements(
    session_bouncer: PgBouncerServer,
) -> None:
    assert _route(session_bouncer.dsn) == ("session", "session")


def test_find_route_pgbouncer_in_transaction_mode_is_a_transaction_pooler(
    pgbouncer_server: PgBouncerServer,
) -> None:
    assert _route(pgbouncer_server.dsn) == ("transaction", "transaction")


def test_auto_mode_settings() -> None:
    dsn = "postgresql://app@db/app"
    assert build_settings(dsn, mode="auto").prepare_threshold == 5  # psycopg's default
    assert build_settings(dsn, mode="auto", prepare_threshold=None).prepare_threshold is None
    assert build_settings(dsn, mode="auto", prepare_threshold=0).prepare_threshold == 0
    env = {"POOLGUARD_MODE": "auto"}
    assert build_settings(dsn, env=env).prepare_threshold == 5
    assert build_settings(dsn + "?pgbouncer=true", mode="auto").mode == "auto"
    with pytest.raises(ConfigurationError, match=r"mode='automatic'.*'auto'"):
        build_settings(dsn, mode="automatic")


def _switch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "switched to transaction mode" in r.getMessage()
    ]


def _prepared_in_one_transaction(name: str) -> list[str]:
    """Run LOOKUP past psycopg's threshold and read pg_prepared_statements, all on one server
    session (one transaction stays on one server even behind a transaction pooler)."""
    with poolguard.connection(name) as conn, conn.transaction():
        for i in range(8):
            conn.execute(LOOKUP, (i,)).fetchone()
        return [row[0] for row in conn.execute(PREPARED)]


@pytest.mark.parametrize(
    ("where", "path", "mode"),
    [
        ("postgres", "direct", "session"),
        ("session pgbouncer", "session", "session"),
        ("transaction pgbouncer", "transaction", "transaction"),
    ],
)
def test_auto_mode_picks_the_route_and_prepares_only_where_safe(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    where: str,
    path: str,
    mode: str,
) -> None:
    fixture = {
        "postgres": "postgres_server",
        "session pgbouncer": "session_bouncer",
        "transaction pgbouncer": "pgbouncer_server",
    }[where]
    server = request.getfixturevalue(fixture)
    caplog.set_level(logging.INFO, logger="poolguard")
    pool = poolguard.configure(server.dsn, name="auto", mode="auto", max_size=2)
    pool.open()

    assert pool.route is not None and pool.route.path == path
    assert pool.effective_mode == mode
    decided = [r.getMessage() for r in caplog.records if "mode='auto' uses" in r.getMessage()]
    assert len(decided) == 1 and f"uses {mode} mode: the path is {path} (" in decided[0]
    shown = poolguard.stats("auto")["poolguard.mode"]
    assert (shown["mode"], shown["path"], shown["switched"]) == (mode, path, False)
    assert shown["evidence"]
    text = str(poolguard.report("auto"))
    assert f"pool 'auto': mode='auto' uses {mode} mode: the path is {path} (" in text
    assert poolguard.report("auto").as_dict()["modes"]["auto"] == shown

    prepared = _prepared_in_one_transaction("auto")
    if mode == "session":
        assert prepared, f"no prepared statement in pg_prepared_statements through {where}"
    else:
        assert prepared == []
        with poolguard.connection("auto") as conn:
            assert conn.prepare_threshold is None
    assert not _switch_warnings(caplog)


def test_the_async_twin_decides_and_switches_too(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    poolguard.configure(postgres_server.dsn, name="twin", mode="auto", max_size=2)

    async def main() -> tuple[str, str]:
        pool = poolguard.get_async_pool("twin")
        async with pool.connection() as conn:
            before = pool.effective_mode
            for i in range(8):
                await conn.execute(LOOKUP, (i,))
            await conn.commit()
            conn.pgconn.exec_(b"DEALLOCATE ALL")
            cur = await conn.execute(LOOKUP, (41,))  # 26000, switched and retried
            assert await cur.fetchone() == (42,)
        return before, pool.effective_mode

    assert asyncio.run(main()) == ("session", "transaction")
    assert len(_switch_warnings(caplog)) == 1
    # One path per name: the sync pool of the name switched with its twin.
    assert poolguard.get_pool("twin").effective_mode == "transaction"
    with poolguard.connection("twin") as conn:
        assert conn.prepare_threshold is None
    shown = poolguard.stats("twin")["poolguard.mode"]
    assert (shown["mode"], shown["path"], shown["switched"]) == ("transaction", "transaction", True)


def test_auto_mode_keeps_an_explicit_prepare_threshold(postgres_server: PostgresServer) -> None:
    pool = poolguard.configure(postgres_server.dsn, name="p", mode="auto", prepare_threshold=None)
    with pool.connection() as conn:
        assert pool.effective_mode == "session"
        assert conn.prepare_threshold is None  # asked for: no prepared statements


def test_a_vanished_prepared_statement_switches_once_and_is_retried(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The statement path: 26000 on one of psycopg's statements, as a transaction pooler
    gives it (here: DEALLOCATE ALL behind psycopg's back, which psycopg cannot see)."""
    caplog.set_level(logging.INFO, logger="poolguard")
    pool = poolguard.configure(postgres_server.dsn, name="gone", mode="auto", max_size=2)
    for autocommit in (False, True):
        with pool.connection() as conn:
            conn.autocommit = autocommit
            for i in range(8):
                assert conn.execute(LOOKUP, (i,)).fetchone() == (i + 1,)
            conn.commit()  # idle: the next statement may be run again
            conn.pgconn.exec_(b"DEALLOCATE ALL")  # libpq directly: psycopg still believes
            assert conn.execute(LOOKUP, (41,)).fetchone() == (42,)  # 26000, retried
            assert conn.prepare_threshold is None
            conn.commit()
    assert pool.effective_mode == "transaction"
    assert pool.route is not None and pool.route.path == "transaction"
    assert "SQLSTATE 26000" in pool.route.evidence[0]
    assert len(_switch_warnings(caplog)) == 1
    assert poolguard.stats("gone")["poolguard.mode"]["switched"] is True
    with pool.connection() as a, pool.connection() as b:  # every connection, old and new
        assert a.prepare_threshold is None and b.prepare_threshold is None


def test_inside_the_callers_transaction_the_error_is_the_callers(
    postgres_server: PostgresServer,
) -> None:
    pool = poolguard.configure(postgres_server.dsn, name="tx", mode="auto", max_size=1)
    with pool.connection() as conn:
        for i in range(8):
            conn.execute(LOOKUP, (i,))
        conn.commit()
        conn.pgconn.exec_(b"DEALLOCATE ALL")
        conn.execute("SELECT 1")  # the transaction's first statement: earlier work to lose
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute(LOOKUP, (1,))
    assert pool.effective_mode == "session"  # nothing was decided from the caller's error


def test_ddl_under_prepared_select_star_reaches_no_caller(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        admin.execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 100) g")
    pool = poolguard.configure(pg_dsn, name="ddl", mode="auto", max_size=2)
    errors: list[BaseException] = []
    widths: set[int] = set()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for column in range(6):
            for autocommit in (False, True):
                with pool.connection() as conn:
                    conn.autocommit = autocommit
                    for i in range(8):
                        try:
                            row = conn.execute("SELECT * FROM items WHERE id = %s", (i + 1,))
                            widths.add(len(row.fetchone() or ()))
                        except psycopg.Error as exc:
                            errors.append(exc)
            admin.execute(f"ALTER TABLE items ADD COLUMN c{column} int DEFAULT {column}")
    assert errors == []
    assert widths == set(range(2, 8))  # every new column was seen: no stale plan answered
    assert pool.effective_mode == "session"
    replanned = [r for r in caplog.records if "result type changed" in r.getMessage()]
    assert len(replanned) >= 5  # after every ALTER but the last, prepared plans went stale

    # Inside a transaction the caller began, its earlier statements would be lost: no retry.
    with pool.connection() as conn:
        for i in range(8):
            conn.execute("SELECT * FROM items WHERE id = %s", (i + 1,))
        conn.commit()
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("ALTER TABLE items ADD COLUMN late int")
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan"):
            conn.execute("SELECT * FROM items WHERE id = %s", (1,))


class _Relay:
    """A TCP relay the pool dials: forwards to one address, switched at runtime to another,
    dropping every connection it carries (what a failover does to established sessions)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def switch(self, target: tuple[str, int]) -> None:
        with self._lock:
            self.target = target
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        self.switch(self.target)


def test_pgbouncer_appearing_under_a_running_pool(
    postgres_server: PostgresServer,
    pgbouncer_server: PgBouncerServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    relay = _Relay((postgres_server.host, postgres_server.port))
    try:
        dsn = make_conninfo(postgres_server.dsn, host="127.0.0.1", port=relay.port)
        # PgBouncer 1.18 refuses the options startup parameter the pool would send.
        pool = poolguard.configure(
            dsn, name="moved", mode="auto", max_size=1, idle_in_transaction_session_timeout=0
        )
        pool.open()
        assert pool.route is not None and pool.route.path == "direct"

        def request(i: int) -> None:
            with poolguard.connection("moved") as conn:
                assert conn.execute(LOOKUP, (i,)).fetchone() == (i + 1,)

        for i in range(20):
            request(i)
        assert _prepared_in_one_transaction("moved")

        relay.switch((pgbouncer_server.host, pgbouncer_server.port))
        failed = 0
        for i in range(60):
            try:
                request(i)
            except psycopg.OperationalError:
                failed += 1  # the request in flight on a socket the relay dropped
        assert failed <= 1
        assert pool.effective_mode == "transaction"
        assert pool.route is not None and "announced backend pid" in pool.route.evidence[0]
        assert len(_switch_warnings(caplog)) == 1
        others = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING
            and r.name.startswith("poolguard")
            and "switched to transaction mode" not in r.getMessage()
        ]
        assert len(others) <= failed, others  # only the broken in-flight connection's discard
        assert _prepared_in_one_transaction("moved") == []
    finally:
        poolguard.reset()
        relay.stop()
