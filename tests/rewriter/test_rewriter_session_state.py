"""What a client sees of its session through the rewriter is what it would see directly:
failed transactions, result types after DDL, its own startup settings (and nobody else's),
LISTEN/NOTIFY, SQL-level PREPARE, the login timeout and the server's own FATAL errors."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import psycopg
import pytest
from rawpg import SYNC, RawClient, bind, describe, errors, execute, parse, query, replies, rows
from test_rewriter_statements import both

from poolguard.rewriter import RewriterHandle
from poolguard.rewriter import _protocol as p

# --- failed transactions --------------------------------------------------------------------


def test_named_parse_of_rollback_in_a_failed_transaction(
    pg_dsn: str, proxy: RewriterHandle
) -> None:
    """pgJDBC ends a failed transaction with a named Parse of ROLLBACK: PostgreSQL accepts it
    (and COMMIT) there and answers any other Parse with 25P02."""
    both(
        pg_dsn,
        proxy,
        (query(b"begin"),),
        (query(b"select 1/0"),),
        (parse(b"other", b"select 1"), bind(b"other"), execute(), SYNC),
        (parse(b"S_1", b"ROLLBACK"), bind(b"S_1"), execute(), SYNC),
        (query(b"begin"),),
        (query(b"select 1/0"),),
        (parse(b"S_2", b"COMMIT"), bind(b"S_2"), execute(), SYNC),
        (parse(b"other", b"select 2"), bind(b"other"), execute(), SYNC),
        (query(b"begin"),),
        (query(b"select 1/0"),),
        (bind(b"S_1"), execute(), SYNC),  # the prepared ROLLBACK, bound again
        (bind(b"other"), execute(), SYNC),
    )


def test_failed_transaction_message_is_postgres_own(pg_dsn: str, proxy: RewriterHandle) -> None:
    for dsn in (pg_dsn, proxy.dsn):
        with RawClient(dsn) as c:
            c.run(query(b"begin"))
            c.run(query(b"select 1/0"))
            got = c.run(parse(b"x", b"select 1"), bind(b"x"), execute(), SYNC)
            assert errors(got) == [
                (
                    "25P02",
                    "current transaction is aborted, commands ignored until end of "
                    "transaction block",
                )
            ]


# --- result types after DDL -----------------------------------------------------------------


def test_statement_bound_on_another_backend_after_ddl_gets_0A000(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    """The statement was prepared and described on one server connection; after ALTER TABLE
    it is bound on another. PostgreSQL answers 0A000 (drivers then prepare again); the proxy
    must too, never rows of a shape the client was not told."""
    proxy = make_rewriter(pool_size=2)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("create table r (a int)")
        admin.execute("insert into r values (1)")
        direct, via = RawClient(pg_dsn), RawClient(proxy.dsn)
        blocker = RawClient(proxy.dsn)
        try:
            blocker.run(query(b"begin"))  # holds one backend: `via` prepares on the other
            prepare = (parse(b"s", b"select * from r"), describe(b"s"), SYNC)
            want, got = direct.run(*prepare), via.run(*prepare)
            assert replies(got) == replies(want)
            blocker.run(query(b"commit"))
            admin.execute("alter table r add column b int default 7")
            # Now the backend `via` used is taken first, so `via` binds on the other one.
            blocker.run(query(b"begin"))
            use = (bind(b"s"), execute(), SYNC)
            want, got = direct.run(*use), via.run(*use)
            assert errors(want) == errors(got)
            assert errors(got) == [("0A000", "cached plan must not change result type")]
            # The driver's answer: prepare again under a new name, and get the new shape.
            again = (parse(b"s2", b"select * from r"), bind(b"s2"), execute(), SYNC)
            want, got = direct.run(*again), via.run(*again)
            assert rows(got) == rows(want) == [["1", "7"]]
            blocker.run(query(b"commit"))
        finally:
            for c in (direct, via, blocker):
                c.close()


# --- per-client startup settings ------------------------------------------------------------


def test_startup_statement_timeout_stays_with_its_client(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    """A setting the server does not report (statement_timeout) from client A's startup
    packet must not reach client B on the same (only) server connection."""
    proxy = make_rewriter(pool_size=1)
    with RawClient(proxy.dsn, statement_timeout="1500") as a:
        assert rows(a.run(query(b"show statement_timeout"))) == [["1500ms"]]
        with psycopg.connect(proxy.dsn, autocommit=True) as b:
            assert b.execute("show statement_timeout").fetchone() == ("0",)
            b.execute("select pg_sleep(2)")  # would be cancelled with 57014 under A's value
        assert rows(a.run(query(b"show statement_timeout"))) == [["1500ms"]]
        got = a.run(query(b"select pg_sleep(2)"))
        assert [e[0] for e in errors(got)] == ["57014"]


def test_list_valued_search_path_from_startup(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    """pgJDBC's currentSchema=s,public arrives as search_path=s,public: a list, not one name."""
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("create schema s")
        admin.execute("create table s.only_in_s (v int)")
        admin.execute("insert into s.only_in_s values (42)")
    proxy = make_rewriter(pool_size=1)
    seen = []
    for dsn in (pg_dsn, proxy.dsn):
        with RawClient(dsn, search_path="s,public") as c, RawClient(dsn) as other:
            other.run(query(b"select 1"))  # takes the backend in between (through the proxy)
            assert rows(c.run(query(b"select v from only_in_s"))) == [["42"]]
            seen.append(
                (
                    rows(c.run(query(b"show search_path"))),
                    rows(other.run(query(b"show search_path"))),
                    [e[0] for e in errors(other.run(query(b"select v from only_in_s")))],
                )
            )
    assert seen[1] == seen[0]
    assert seen[0][2] == ["42P01"]  # the other client does not see schema s


def test_settings_with_backslashes_survive_standard_conforming_strings_off(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=1)
    with (
        RawClient(proxy.dsn, application_name="a\\b'c") as a,
        RawClient(proxy.dsn, standard_conforming_strings="off") as off,
    ):
        for _ in range(2):
            assert rows(off.run(query(b"show standard_conforming_strings"))) == [["off"]]
            assert rows(a.run(query(b"show application_name"))) == [["a\\b'c"]]
            assert rows(a.run(query(b"show standard_conforming_strings"))) == [["on"]]


# --- LISTEN / NOTIFY ------------------------------------------------------------------------


def test_listen_receives_every_notification_like_a_direct_connection(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    proxy = make_rewriter(pool_size=2)
    for dsn in (pg_dsn, proxy.dsn):
        with (
            psycopg.connect(dsn, autocommit=True) as listener,
            psycopg.connect(dsn, autocommit=True) as sender,
        ):
            listener.execute("listen ch")
            for i in range(5):
                sender.execute("select 1")  # other traffic on the pool in between
                sender.execute("select pg_notify('ch', %s)", (str(i),))
            got = [n.payload for n in listener.notifies(timeout=5, stop_after=5)]
            assert got == ["0", "1", "2", "3", "4"], dsn
            listener.execute("unlisten *")
    assert proxy._proxy.pool.pinned == 0


def test_listen_beyond_the_pool_is_refused_at_once(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=2)
    with (
        psycopg.connect(proxy.dsn, autocommit=True) as first,
        psycopg.connect(proxy.dsn, autocommit=True) as second,
    ):
        first.execute("listen a")
        with pytest.raises(psycopg.errors.TooManyConnections, match="raise pool_size"):
            second.execute("listen b")
        assert second.execute("select 1").fetchone() == (1,)  # still served by the other one
    # The listener's connection went back clean: nobody listens on the server any more.
    deadline = time.monotonic() + 5
    while proxy._proxy.pool.pinned and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy._proxy.pool.pinned == 0
    with psycopg.connect(proxy.dsn, autocommit=True) as a, psycopg.connect(proxy.dsn) as b:
        b.execute("select 1")  # hold one backend so `a` checks the other as well
        assert a.execute("select pg_listening_channels()").fetchall() == []
        b.rollback()
        assert a.execute("select pg_listening_channels()").fetchall() == []


# --- SQL-level PREPARE / EXECUTE / DEALLOCATE -----------------------------------------------


def test_sql_prepare_execute_deallocate_across_transactions(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    proxy = make_rewriter(pool_size=2)
    results = {}
    for dsn in (pg_dsn, proxy.dsn):
        with (
            psycopg.connect(dsn, autocommit=True) as c,
            psycopg.connect(dsn, autocommit=True) as other,
        ):
            c.execute("prepare twice(int) as select $1 * 2")
            got = []
            for i in range(5):
                other.execute("select 1")
                got.append(c.execute(f"execute twice({i})").fetchone())
            c.execute("deallocate twice")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                c.execute("execute twice(1)")
            c.execute("prepare thrice(int) as select $1 * 3")
            c.execute("discard all")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                c.execute("execute thrice(1)")
            results[dsn] = got
    assert results[proxy.dsn] == results[pg_dsn] == [(0,), (2,), (4,), (6,), (8,)]
    assert proxy._proxy.pool.pinned == 0


# --- login timeout --------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at", ["nothing", "half a startup packet", "the password"])
def test_a_client_that_does_not_log_in_is_closed_after_the_timeout(
    make_rewriter: Callable[..., RewriterHandle], stop_at: str
) -> None:
    proxy = make_rewriter(login_timeout=0.5)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        startup = p.build_startup({"user": proxy.user, "database": proxy.dbname})
        if stop_at == "half a startup packet":
            sock.sendall(startup[:6])
        elif stop_at == "the password":
            sock.sendall(startup)
            kind = sock.recv(1)
            assert kind == b"R"  # asked for SASL; the client never answers
        started = time.monotonic()
        while sock.recv(4096):  # until the proxy closes the connection
            pass
        waited = time.monotonic() - started
    assert waited < 5
    with psycopg.connect(proxy.dsn) as conn:  # a client that logs in is unaffected
        time.sleep(0.8)
        assert conn.execute("select 1").fetchone() == (1,)


def test_login_timeout_is_validated(pg_dsn: str) -> None:
    from poolguard import rewriter

    with pytest.raises(ValueError, match="login_timeout must be > 0"):
        rewriter.start(pg_dsn, login_timeout=0)


# --- the server's own errors ----------------------------------------------------------------


def test_terminated_server_reaches_an_idle_in_transaction_client_as_57P01(
    pg_dsn: str, proxy: RewriterHandle
) -> None:
    """At shutdown (or pg_terminate_backend) PostgreSQL sends FATAL 57P01 to every session,
    also one idle in a transaction: the client must get exactly that."""
    with RawClient(proxy.dsn) as c, psycopg.connect(pg_dsn, autocommit=True) as admin:
        c.run(query(b"begin"))
        pid = int(rows(c.run(query(b"select pg_backend_pid()")))[0][0] or 0)
        admin.execute("select pg_terminate_backend(%s)", (pid,))
        kind, body = c.read()
        fields = p.parse_error_fields(body)
        assert (kind, fields["V"], fields["C"]) == (b"E", "FATAL", "57P01")
        with pytest.raises(ConnectionError):
            c.read()
    with psycopg.connect(proxy.dsn) as conn:  # the proxy itself carries on
        assert conn.execute("select 1").fetchone() == (1,)
