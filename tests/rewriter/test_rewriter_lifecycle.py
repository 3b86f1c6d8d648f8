"""Server connections and pools that outlive their use: ``server_idle_timeout``,
``server_lifetime`` and ``pool_idle_timeout`` against a real PostgreSQL, seen from the server's
own pg_stat_activity, with timeouts of a fraction of a second."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rawpg import LoginRefused, RawClient

from polling import wait_for
from poolguard import rewriter
from poolguard.rewriter import RewriterHandle
from poolguard.testing import PostgresServer

Factory = Callable[..., RewriterHandle]
OFF = {"server_idle_timeout": 0, "server_lifetime": 0, "pool_idle_timeout": 0}


def server_pids(direct: psycopg.Connection[Any]) -> set[int]:
    """Backends connected to the direct connection's database, itself excepted."""
    rows = direct.execute(
        "select pid from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid()"
    ).fetchall()
    return {pid for (pid,) in rows}


@pytest.fixture
def direct(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection straight to PostgreSQL, to watch the rewriter's server connections."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    """The server connection the client's statement ran on, as PostgreSQL numbers it."""
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def proxy_pids(handle: RewriterHandle) -> set[int]:
    return {int(r["pid"]) for r in handle.stats()["servers"]}  # type: ignore[call-overload]


def stats_row(handle: RewriterHandle, dbname: str | None = None) -> dict[str, Any]:
    (row,) = [r for r in handle.stats()["stats"] if r["database"] == (dbname or handle.dbname)]
    return row


def test_idle_server_connections_are_closed_and_reopened_on_demand(
    make_rewriter: Factory, direct: psycopg.Connection[Any]
) -> None:
    handle = make_rewriter(pool_size=2, server_idle_timeout=1.0, server_lifetime=0)
    first, second = psycopg.connect(handle.dsn), psycopg.connect(handle.dsn)
    try:
        # Two transactions at once: the pool opens its second connection.
        opened = {backend_pid(first), backend_pid(second)}
        assert len(opened) == 2
        assert opened <= server_pids(direct)
        first.commit()
        second.commit()
        ages = {r["pid"]: r["age"] for r in handle.stats()["servers"]}
        assert set(ages) == opened and all(isinstance(age, int) for age in ages.values())
        wait_for("both idle connections closed", lambda: not opened & server_pids(direct))
        assert proxy_pids(handle) == set()
        row = stats_row(handle)
        assert row["server_idle_closed"] == 2 and row["server_lifetime_closed"] == 0
        # The clients stayed connected; the next transaction gets a new server connection.
        assert backend_pid(first) not in opened
        first.commit()
    finally:
        first.close()
        second.close()


def test_steady_light_use_keeps_one_connection_and_closes_the_spare(
    make_rewriter: Factory, direct: psycopg.Connection[Any]
) -> None:
    handle = make_rewriter(pool_size=2, server_idle_timeout=1.0, server_lifetime=0)
    with psycopg.connect(handle.dsn) as first, psycopg.connect(handle.dsn) as second:
        spare, used = backend_pid(first), backend_pid(second)  # two at once: both open
        first.commit()
        second.commit()  # given back last, so lent first
        second.autocommit = True
        seen = set()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # a query every 0.1 s for three timeouts
            seen.add(backend_pid(second))
            time.sleep(0.1)
        # Most recently used first: one connection served it all, the other went idle.
        assert seen == {used}
        alive = server_pids(direct)
        assert used in alive and spare not in alive
        assert stats_row(handle)["server_idle_closed"] == 1


def test_a_connection_past_its_lifetime_is_closed_only_once_released_then_replaced(
    make_rewriter: Factory, direct: psycopg.Connection[Any]
) -> None:
    handle = make_rewriter(pool_size=1, server_lifetime=0.5, server_idle_timeout=0)
    with psycopg.connect(handle.dsn) as conn:
        with conn.transaction():
            old = backend_pid(conn)
            conn.execute("create temp table t (x int) on commit drop")
            time.sleep(1.5)  # three lifetimes, inside one transaction
            # Marked for retirement, still serving its client: nothing was cut.
            assert stats_row(handle)["server_lifetime_closed"] == 1
            assert old in server_pids(direct)
            conn.execute("insert into t values (1)")
            assert conn.execute("select pg_backend_pid(), count(*) from t").fetchone() == (old, 1)
        wait_for("the retired connection closed", lambda: old not in server_pids(direct))
        assert backend_pid(conn) != old
        conn.commit()
    assert stats_row(handle)["server_lifetime_closed"] >= 1


def test_a_client_idle_in_transaction_or_pinned_is_never_cut(
    make_rewriter: Factory, direct: psycopg.Connection[Any]
) -> None:
    handle = make_rewriter(pool_size=2, server_idle_timeout=0.3, server_lifetime=0.3)
    in_tx = psycopg.connect(handle.dsn)
    listener = psycopg.connect(handle.dsn, autocommit=True)
    try:
        tx_pid = backend_pid(in_tx)
        listener.execute("listen lifecycle")  # pins its server connection between statements
        pinned_pid = backend_pid(listener)
        time.sleep(1.5)
        assert {tx_pid, pinned_pid} <= server_pids(direct)
        assert backend_pid(in_tx) == tx_pid
        in_tx.commit()
        assert backend_pid(listener) == pinned_pid
        heard: list[str] = []
        listener.add_notify_handler(lambda n: heard.append(n.payload))
        with psycopg.connect(handle.dsn, autocommit=True) as other:
            other.execute("notify lifecycle, 'still here'")
        wait_for("the notification", lambda: bool(listener.execute("select 1") and heard))
        assert heard == ["still here"]
        listener.execute("unlisten *")  # unpinned: now it is retired like any other
        wait_for(
            "both connections retired once given back",
            lambda: not {tx_pid, pinned_pid} & server_pids(direct),
        )
    finally:
        in_tx.close()
        listener.close()


def test_prepared_statements_survive_lifetime_recycling(
    make_rewriter: Factory, direct: psycopg.Connection[Any]
) -> None:
    handle = make_rewriter(pool_size=1, server_lifetime=0.4, server_idle_timeout=0)
    with psycopg.connect(handle.dsn, autocommit=True, prepare_threshold=0) as conn:
        pids: set[int] = set()
        deadline = time.monotonic() + 10.0
        i = 0
        while time.monotonic() < deadline and len(pids) < 3:
            row = conn.execute("select %s::int * 2, pg_backend_pid()", (i,)).fetchone()
            assert row is not None and row[0] == 2 * i
            text = conn.execute("select upper(%s::text)", (f"v{i}",)).fetchone()
            assert text == (f"V{i}",)
            pids.add(row[1])
            i += 1
            time.sleep(0.05)
        # The same two named statements, served by three server connections in turn.
        assert len(pids) >= 3, pids
        assert stats_row(handle)["server_lifetime_closed"] >= 2
        assert stats_row(handle)["statements"] >= 2
        alive = server_pids(direct)
        assert len(pids - alive) >= 2  # the older ones are gone upstream


# --- pools of other (user, database) pairs ---------------------------------------------------

CAROL = "carol-Secret-3"


@pytest.fixture(scope="module")
def cluster(postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """A private cluster with a passthrough user (carol) and a second database (other)."""
    server = postgres_factory()
    with server.connect() as admin:
        admin.execute(f"create role carol login password '{CAROL}'")
        admin.execute("create database other owner carol")
    return server


def pair_dsn(handle: RewriterHandle, user: str, dbname: str, password: str) -> str:
    return make_conninfo(
        host=handle.host,
        port=handle.port,
        user=user,
        dbname=dbname,
        password=password,
        connect_timeout=10,
    )


def pools_of(handle: RewriterHandle) -> set[tuple[str, str]]:
    return {(str(r["user"]), str(r["database"])) for r in handle.stats()["pools"]}


def test_an_unused_pair_is_dropped_and_made_anew_by_its_next_client(
    cluster: PostgresServer, make_rewriter: Factory
) -> None:
    handle = make_rewriter(
        cluster.dsn, server_idle_timeout=0.3, pool_idle_timeout=0.3, server_lifetime=0
    )
    default = (handle.user, handle.dbname)
    other = pair_dsn(handle, handle.user, "other", handle.password)
    with psycopg.connect(other, autocommit=True, prepare_threshold=0) as conn:
        for i in range(3):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        pair = handle._proxy.pools.pairs[(handle.user, "other")]
        served = stats_row(handle, "other")["xact_count"]
        assert served >= 3
        # A client that stays, even with no server connection left, keeps its pair.
        wait_for("the idle server connection closed", lambda: not pair.pool.members)
        time.sleep(1.0)
        assert handle._proxy.pools.pairs.get((handle.user, "other")) is pair
        assert conn.execute("select %s::int", (7,)).fetchone() == (7,)
        assert stats_row(handle, "other")["xact_count"] == served + 1
    wait_for("the pair dropped", lambda: (handle.user, "other") not in pools_of(handle))
    assert default in pools_of(handle)  # the upstream DSN's own pair always stays
    with psycopg.connect(other, autocommit=True, prepare_threshold=0) as conn:
        assert (handle.user, "other") in pools_of(handle)
        row = stats_row(handle, "other")
        assert row["xact_count"] == 0 and row["statements"] == 0  # a new pair, new statements
        assert conn.execute("select %s::int", (8,)).fetchone() == (8,)
        assert conn.execute("select current_database()::text").fetchone() == ("other",)
        assert handle._proxy.pools.pairs[(handle.user, "other")] is not pair


def test_a_dropped_passthrough_pair_checks_the_password_upstream_again(
    cluster: PostgresServer, make_rewriter: Factory
) -> None:
    handle = make_rewriter(
        cluster.dsn,
        auth_passthrough=True,
        server_idle_timeout=0.3,
        pool_idle_timeout=0.3,
        server_lifetime=0,
    )
    carol = pair_dsn(handle, "carol", "other", CAROL)
    with psycopg.connect(carol) as conn:
        assert conn.execute("select current_user::text").fetchone() == ("carol",)
    try:
        with cluster.connect() as admin:
            admin.execute("alter role carol password 'carol-New-4'")
        # Within a minute the pair would take the password it checked already; once dropped,
        # the upstream judges it again and refuses the old one.
        wait_for("carol's pair dropped", lambda: ("carol", "other") not in pools_of(handle))
        with pytest.raises(LoginRefused) as caught:
            RawClient(carol).close()
        assert caught.value.fields["C"] == "28P01"
        with psycopg.connect(pair_dsn(handle, "carol", "other", "carol-New-4")) as conn:
            assert conn.execute("select current_user::text").fetchone() == ("carol",)
    finally:
        with cluster.connect() as admin:
            admin.execute(f"alter role carol password '{CAROL}'")


def test_all_off_keeps_everything(make_rewriter: Factory, direct: psycopg.Connection[Any]) -> None:
    handle = make_rewriter(pool_size=1, **OFF)
    assert handle._proxy.reaper.limits.interval() is None
    with psycopg.connect(handle.dsn, autocommit=True) as conn:
        pid = backend_pid(conn)
    time.sleep(0.5)
    assert pid in server_pids(direct)
    assert proxy_pids(handle) == {pid}


def test_admin_console_shows_server_age_and_retired_counts(make_rewriter: Factory) -> None:
    handle = make_rewriter(pool_size=1)
    console = make_conninfo(handle.dsn, dbname=handle.admin_database)
    time.sleep(1.1)
    with psycopg.connect(console, autocommit=True) as conn:
        cur = conn.execute("SHOW SERVERS")
        names = [d.name for d in cur.description or ()]
        (server,) = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        assert server["age"] >= 1
        cur = conn.execute("SHOW STATS")
        names = [d.name for d in cur.description or ()]
        (stats,) = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        assert (stats["server_idle_closed"], stats["server_lifetime_closed"]) == (0, 0)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("server_idle_timeout", -1),
        ("server_lifetime", float("nan")),
        ("pool_idle_timeout", float("inf")),
        ("server_lifetime", "3600"),
        ("pool_idle_timeout", True),
    ],
)
def test_bad_settings_are_refused_by_name(pg_dsn: str, setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{setting} must be a number of seconds >= 0"):
        rewriter.start(pg_dsn, isolate=False, **{setting: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "value", "error"),
    [
        ("--server-lifetime", "-5", "server_lifetime must be a number of seconds >= 0"),
        ("--cleanup-timeout", "0", "cleanup_timeout must be > 0 seconds, got 0.0"),
        ("--max-message-size", "100", "max_message_size must be >= 1024 bytes, got 100"),
    ],
)
def test_cli_refuses_a_bad_value_by_its_setting(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, flag: str, value: str, error: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="poolguard.rewriter"):
        code = rewriter.main(["--upstream", pg_dsn, flag, value])
    assert code == 1
    assert error in caplog.text
    password = conninfo_to_dict(pg_dsn).get("password")
    assert not password or str(password) not in caplog.text


def test_settings_reach_a_rewriter_in_a_child_process(
    make_rewriter: Factory, direct: psycopg.Connection[Any]
) -> None:
    handle = make_rewriter(isolate=True, pool_size=1, server_idle_timeout=0.3)
    with psycopg.connect(handle.dsn, autocommit=True) as conn:
        pid = backend_pid(conn)
    wait_for("the child's idle connection closed", lambda: pid not in server_pids(direct))
    assert stats_row(handle)["server_idle_closed"] == 1
