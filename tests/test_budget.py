"""The connection budget: pure math table-driven, and the figures read from real servers."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from poolguard import ConfigurationError
from poolguard._budget import (
    BudgetUnavailable,
    BudgetWarning,
    ServerLimits,
    check_budget_on_open,
    compute_budget,
    read_server_limits,
    resolve_processes,
)
from poolguard.testing import PgBouncerServer, PostgresServer

# (max_connections, superuser_reserved, reserved, in_use, headroom, processes, max_size,
#  expected usable, expected per_process, expected fits)
MATH = [
    (100, 3, 0, 0, 0, 1, 4, 97, 97, True),
    (100, 3, 0, 0, 0, 4, 10, 97, 24, True),
    (100, 3, 0, 0, 0, 4, 25, 97, 24, False),
    (100, 3, 0, 0, 0, 4, 24, 97, 24, True),  # exactly at the edge: 96 <= 97
    (20, 3, 0, 0, 0, 4, 4, 17, 4, True),  # Heroku-sized server, poolguard's default max_size
    (20, 3, 0, 0, 0, 4, 5, 17, 4, False),
    (20, 3, 0, 5, 0, 4, 4, 12, 3, False),  # others already hold 5
    (100, 3, 5, 10, 0, 8, 10, 82, 10, True),  # PG16 reserved_connections
    (100, 3, 5, 10, 2, 8, 10, 80, 10, True),  # headroom for migrations
    (100, 3, 5, 10, 3, 8, 10, 79, 9, False),
    (10, 3, 0, 7, 0, 2, 1, 0, 0, False),  # nothing left at all
    (10, 3, 0, 20, 0, 1, 1, 0, 0, False),  # over-subscribed via superusers: never negative
    (5, 3, 0, 0, 0, 3, 1, 2, 0, False),  # fewer slots than processes
    (500, 3, 0, 120, 0, 16, 20, 377, 23, True),
]


@pytest.mark.parametrize(
    (
        "max_conn",
        "su",
        "reserved",
        "in_use",
        "headroom",
        "processes",
        "max_size",
        "usable",
        "per_process",
        "fits",
    ),
    MATH,
)
def test_budget_math(
    max_conn: int,
    su: int,
    reserved: int,
    in_use: int,
    headroom: int,
    processes: int,
    max_size: int,
    usable: int,
    per_process: int,
    fits: bool,
) -> None:
    limits = ServerLimits(max_conn, su, reserved, in_use)
    budget = compute_budget(limits, max_size=max_size, processes=processes, headroom=headroom)
    assert (budget.usable, budget.per_process, budget.fits) == (usable, per_process, fits)
    assert budget.demand == max_size * processes
    formula = budget.formula()
    assert f"max_connections {max_conn}" in formula
    assert f"superuser_reserved_connections {su}" in formula
    assert f"other apps {in_use}" in formula
    assert f"= {usable}\n" in formula
    assert f"max_size {max_size} x processes {processes} = {max_size * processes}" in formula
    assert ("fits" if fits else "does NOT fit") in formula.splitlines()[1]
    advice = budget.advice()
    if not fits and per_process:
        assert f"max_size <= {per_process}" in advice
    if not per_process:
        assert "no connection slot" in advice
    assert budget.as_dict()["per_process"] == per_process


def test_formula_example_reads_as_documented() -> None:
    budget = compute_budget(ServerLimits(100, 3, 0, 12), max_size=10, processes=4)
    assert budget.formula() == (
        "usable      = max_connections 100 - superuser_reserved_connections 3 - "
        "reserved_connections 0 - other apps 12 = 85\n"
        "demand      = max_size 10 x processes 4 = 40 <= usable 85: fits\n"
        "per process = usable 85 / processes 4 = 21 (rounded down)\n"
        "processes   = 4: declared"
    )


@pytest.mark.parametrize(
    ("argument", "env", "expected"),
    [
        (None, {}, 1),
        (None, {"WEB_CONCURRENCY": "4"}, 4),
        (None, {"WEB_CONCURRENCY": " 8 "}, 8),
        (None, {"WEB_CONCURRENCY": ""}, 1),
        (2, {"WEB_CONCURRENCY": "8"}, 2),  # the argument wins
    ],
)
def test_resolve_processes(argument: int | None, env: dict[str, str], expected: int) -> None:
    assert resolve_processes(argument, env) == expected
    budget = compute_budget(ServerLimits(100, 3), max_size=1, processes=argument, environ=env)
    assert budget.processes == expected


@pytest.mark.parametrize(
    ("argument", "env", "match"),
    [
        (None, {"WEB_CONCURRENCY": "four"}, "WEB_CONCURRENCY='four'"),
        (None, {"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY='0'"),
        (None, {"WEB_CONCURRENCY": "-2"}, "WEB_CONCURRENCY='-2'"),
        (0, {}, "processes=0"),
        (True, {}, "processes=True"),
    ],
)
def test_resolve_processes_rejects(argument: Any, env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        resolve_processes(argument, env)


def test_compute_budget_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigurationError, match="max_size=0"):
        compute_budget(ServerLimits(100, 3), max_size=0, processes=1)
    with pytest.raises(ConfigurationError, match="headroom=-1"):
        compute_budget(ServerLimits(100, 3), max_size=1, processes=1, headroom=-1)


def test_read_limits_from_postgres(postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as conn:
        before = read_server_limits(conn)
        assert before.max_connections == 100
        assert before.superuser_reserved_connections == 3  # PostgreSQL's default
        assert before.reserved_connections == 0  # not a setting before PostgreSQL 16
        assert before.notes == ()
        with (
            postgres_server.connect(application_name="budget-sibling"),
            postgres_server.connect(application_name="budget-sibling"),
            postgres_server.connect(application_name="budget-other"),
        ):
            during = read_server_limits(conn)
            siblings_excluded = read_server_limits(conn, exclude_application_name="budget-sibling")
        assert during.in_use - before.in_use == 3
        assert siblings_excluded.in_use - before.in_use == 1


def test_read_limits_counts_sessions_a_plain_role_cannot_see_into(
    postgres_factory: Callable[..., PostgresServer],
) -> None:
    """Without pg_read_all_stats, other users' sessions hide their backend_type: still counted."""
    # A server of its own: on the shared one, other tests' pools open and close connections
    # in the background between the two readings.
    pg_dsn = postgres_factory().dsn
    role = f"plain_{secrets.token_hex(4)}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
    plain = make_conninfo(pg_dsn, user=role, password="pw")
    try:
        with psycopg.connect(plain, autocommit=True) as conn:
            before = read_server_limits(conn)
            with psycopg.connect(pg_dsn), psycopg.connect(pg_dsn):  # superuser sessions
                during = read_server_limits(conn)
        assert during.in_use - before.in_use == 2
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_read_limits_keeps_the_callers_transaction(postgres_server: PostgresServer) -> None:
    with postgres_server.connect(autocommit=False) as conn:
        conn.execute("SELECT 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        read_server_limits(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()


def test_read_limits_degrades_when_catalogs_are_refused(pg_dsn: str) -> None:
    # A role that may not read pg_settings or pg_stat_activity stands in for a pooler or a
    # managed service that refuses them: SHOW still answers. The grants are per database, and
    # pg_dsn is a fresh one dropped after the test.
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS budget_restricted")
        admin.execute("CREATE ROLE budget_restricted LOGIN PASSWORD 'pw'")
        admin.execute("REVOKE SELECT ON pg_catalog.pg_settings FROM PUBLIC")
        admin.execute("REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC")
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, user="budget_restricted", password="pw")
        with psycopg.connect(dsn, autocommit=True) as conn:
            limits = read_server_limits(conn)
        assert limits.max_connections == 100
        assert limits.superuser_reserved_connections == 3
        assert limits.in_use == 0
        assert any("pg_settings unreadable" in n for n in limits.notes)
        assert any("pg_stat_activity unreadable" in n for n in limits.notes)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("DROP ROLE budget_restricted")


@pytest.mark.pgbouncer
def test_read_limits_through_pgbouncer(pgbouncer_server: PgBouncerServer) -> None:
    with psycopg.connect(pgbouncer_server.dsn, autocommit=True, prepare_threshold=None) as conn:
        limits = read_server_limits(conn)
    assert limits.max_connections == 100
    assert limits.superuser_reserved_connections == 3
    assert limits.notes == ()


def test_unreadable_max_connections_is_reported() -> None:
    class Refusing:
        """Stands in for a connection whose every query is refused."""

        autocommit = False

        def transaction(self) -> Any:
            raise psycopg.errors.InsufficientPrivilege("permission denied")

    with pytest.raises(BudgetUnavailable, match=r"cannot read max_connections.*42501"):
        read_server_limits(Refusing())  # type: ignore[arg-type]


def test_check_on_open_warns_once_with_the_formula(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with postgres_server.connect() as conn:
        with pytest.warns(BudgetWarning, match="set max_size <= 1") as caught:
            budget = check_budget_on_open(conn, pool_name="web", max_size=4, processes=50)
        assert budget is not None and not budget.fits
        assert len(caught) == 1
        assert "demand      = max_size 4 x processes 50 = 200 >" in str(caught[0].message)
        (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
        assert record.name == "poolguard"
        assert "pool 'web'" in record.getMessage()
        with pytest.raises(ConfigurationError, match=r"pool 'web'(.|\n)*exceeds"):
            check_budget_on_open(conn, pool_name="web", max_size=4, processes=50, action="raise")
        assert check_budget_on_open(conn, pool_name="web", max_size=4, action="off") is None
        fitting = check_budget_on_open(conn, pool_name="web", max_size=4, processes=2)
        assert fitting is not None and fitting.fits


def test_check_on_open_does_not_count_sibling_processes(postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as conn:
        base = check_budget_on_open(
            conn, pool_name="web", max_size=1, application_name="poolguard:siblings"
        )
        with (
            postgres_server.connect(application_name="poolguard:siblings"),
            postgres_server.connect(application_name="poolguard:siblings"),
        ):
            during = check_budget_on_open(
                conn, pool_name="web", max_size=1, application_name="poolguard:siblings"
            )
        assert base is not None and during is not None
        assert during.limits.in_use == base.limits.in_use


@pytest.mark.pgbouncer
def test_check_on_open_skips_behind_a_pooler(
    pgbouncer_server: PgBouncerServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="poolguard")
    with psycopg.connect(pgbouncer_server.dsn, autocommit=True, prepare_threshold=None) as conn:
        assert check_budget_on_open(conn, pool_name="web", max_size=4, processes=50) is None
    assert "a pooler sits in front of the server; budget not checked" in caplog.text
