"""configure(rewriter=True): prepared statements on, the embedded rewriter pooling transactions."""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import poolguard
from polling import wait_for
from poolguard import ConfigurationError, rewriter
from poolguard._settings import REWRITER_NOT_EMBEDDED, REWRITER_OPTIONS, build_settings
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


# --- rewriter_options: the embedded rewriter's own tunables ---------------------------------

DSN = "postgresql://app:s3cr3t-pw@127.0.0.1:1/shop"  # never reached: settings fail first


def console_of(pool: poolguard.GuardedPool) -> str:
    """The admin console of the embedded rewriter in front of ``pool``."""
    return make_conninfo(pool._target_conninfo(), dbname="poolguard")


def test_rewriter_options_reach_the_embedded_rewriter(pg_dsn: str) -> None:
    options = {"server_idle_timeout": 0.3, "max_prepared": 2}
    pool = poolguard.configure(pg_dsn, rewriter=True, max_size=2, rewriter_options=options)
    options["max_prepared"] = 400  # the caller's dict is not the pool's
    assert pool.settings.rewriter_options == {"server_idle_timeout": 0.3, "max_prepared": 2}
    console = console_of(pool)
    with pool.connection() as conn:  # one transaction: one server connection throughout
        for n in range(3):
            conn.execute(f"SELECT {n} AS n, %s::int", (n,), prepare=True)
        stats = rewriter.admin_stats(console)
    [server] = stats["servers"]
    [pair] = stats["stats"]
    assert pair["statements"] == 3 and server["prepared"] == 2  # max_prepared, not 500
    # Given back, the server connection is closed after 0.3 s idle (not 600 s).
    wait_for(
        "the idle server connection closed",
        lambda: rewriter.admin_stats(console)["stats"][0]["server_idle_closed"] >= 1,
    )
    assert rewriter.admin_stats(console)["servers"] == []


def test_pools_tuned_differently_get_a_rewriter_each(pg_dsn: str) -> None:
    tuned = {"server_lifetime": 900, "max_prepared": 50}
    first = poolguard.configure(pg_dsn, name="a", rewriter=True, rewriter_options=tuned)
    same = poolguard.configure(
        pg_dsn, name="b", rewriter=True, rewriter_options=dict(reversed(tuned.items()))
    )
    other = poolguard.configure(pg_dsn, name="c", rewriter=True)  # start()'s defaults
    assert first._target_conninfo() == same._target_conninfo()
    assert first._target_conninfo() != other._target_conninfo()
    with pytest.raises(ConfigurationError, match=r"\(rewriter_options differ\)"):
        poolguard.configure(pg_dsn, name="a", rewriter=True, rewriter_options={"max_prepared": 9})
    for pool in (first, other):
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"server_lifetime": -1},
            r"rewriter_options\['server_lifetime'\]=-1 for pool 'default' "
            r"is invalid: expected seconds >= 0 \(0: never\)",
        ),
        ({"server_idle_timeout": math.inf}, r"\['server_idle_timeout'\]=inf .* seconds >= 0"),
        ({"max_prepared": 0}, r"\['max_prepared'\]=0 .*: expected an integer >= 1"),
        ({"max_prepared": 2.5}, r"\['max_prepared'\]=2.5 .*: expected an integer >= 1"),
        ({"max_message_size": 100}, r"\['max_message_size'\]=100 .* >= 1024"),
        ({"login_timeout": 0}, r"\['login_timeout'\]=0 .*: expected seconds > 0"),
        ({"cleanup_timeout": "10"}, r"\['cleanup_timeout'\]='10' .*: expected seconds > 0"),
        ({"server_lifetime": True}, r"\['server_lifetime'\]=True .*: expected seconds"),
        ({"server_lifetme": 9}, r"no option 'server_lifetme' .*did you mean 'server_lifetime'"),
        ({"pool_size": 8}, r"\['pool_size'\] .* does not apply .*\(set max_size\)"),
        ({"listen": "127.0.0.1:6432"}, r"\['listen'\] .* does not apply to the embedded"),
        ({"pool_idle_timeout": 60}, r"\['pool_idle_timeout'\] .* never drops"),
        ({"userlist": "users.txt"}, r"\['userlist'\] .* run `poolguard proxy`"),
        ({"workers": 2}, r"\['workers'\] .* run `poolguard proxy --workers N`"),
        ("server_lifetime=900", r"rewriter_options='server_lifetime=900' .*: expected a dict"),
    ],
)
def test_bad_rewriter_options_are_refused_by_name(options: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as refused:
        poolguard.configure(DSN, rewriter=True, rewriter_options=options)
    assert "s3cr3t" not in str(refused.value)


def test_rewriter_options_need_the_rewriter() -> None:
    with pytest.raises(ConfigurationError, match=r"rewriter_options .* add rewriter=True"):
        poolguard.configure(DSN, rewriter_options={"server_lifetime": 900})
    assert build_settings(DSN).rewriter_options == {}  # none: start()'s defaults


def test_rewriter_options_from_the_environment() -> None:
    env = {"POOLGUARD_REWRITER": "true"}
    settings = build_settings(
        DSN, env={**env, "POOLGUARD_REWRITER_OPTIONS": " server_lifetime=900, login_timeout=2.5,"}
    )
    assert settings.rewriter_options == {"server_lifetime": 900, "login_timeout": 2.5}
    given = build_settings(DSN, env=env | {"POOLGUARD_REWRITER_OPTIONS": "max_prepared=9"})
    assert given.rewriter_options == {"max_prepared": 9}
    for raw in ("server_lifetime", "server_lifetime=soon", "=900"):
        with pytest.raises(ConfigurationError, match=r"POOLGUARD_REWRITER_OPTIONS=.*name=number"):
            build_settings(DSN, env={**env, "POOLGUARD_REWRITER_OPTIONS": raw})
    with pytest.raises(ConfigurationError, match=r"\['max_prepared'\]=0"):
        build_settings(DSN, env={**env, "POOLGUARD_REWRITER_OPTIONS": "max_prepared=0"})


def test_rewriter_options_are_start_arguments_and_start_takes_their_edges(pg_dsn: str) -> None:
    """Every start() argument is either taken (checked as start() checks it) or refused with a
    reason, and start() accepts the least value each option allows."""
    arguments = {
        name
        for name, p in inspect.signature(rewriter.start).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(REWRITER_OPTIONS) | set(REWRITER_NOT_EMBEDDED) == arguments
    assert not set(REWRITER_OPTIONS) & set(REWRITER_NOT_EMBEDDED)
    least = {
        "max_prepared": 1,
        "max_message_size": 1024,
        "cleanup_timeout": 0.001,
        "login_timeout": 0.001,
        "server_idle_timeout": 0,
        "server_lifetime": 0,
    }
    below = {
        "max_prepared": 0,
        "max_message_size": 1023,
        "cleanup_timeout": 0,
        "login_timeout": 0,
        "server_idle_timeout": -0.001,
        "server_lifetime": -1,
    }
    assert set(least) == set(below) == set(REWRITER_OPTIONS)
    build_settings(DSN, rewriter=True, rewriter_options=least)
    for name, value in below.items():
        with pytest.raises(ConfigurationError, match=rf"\['{name}'\]="):
            build_settings(DSN, rewriter=True, rewriter_options={name: value})
    rewriter.start(pg_dsn, isolate=False, **least).stop()
