"""The doctor's connection math on live systems: a real PostgreSQL with max_connections=20,
a real PgBouncer, app sessions from two client addresses, and the advice with its numbers."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest

from poolguard._doctor import EXIT_OK, EXIT_PROBLEM, run_doctor
from poolguard.testing import PgBouncerServer, PostgresServer, find_pgbouncer, start_pgbouncer


def doctor_json(dsn: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = run_doctor(dsn, as_json=True, out=out, **kwargs)
    report = json.loads(out.getvalue())
    assert report["exit_code"] == code
    return code, report


def doctor_text(dsn: str, **kwargs: Any) -> str:
    out = io.StringIO()
    run_doctor(dsn, out=out, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def small_server(postgres_factory: Any) -> PostgresServer:
    """max_connections=20 with 3 superuser slots: 17 usable, as on a small hosted plan."""
    server: PostgresServer = postgres_factory(max_connections=20)
    return server


@pytest.fixture
def bouncer(small_server: PostgresServer) -> Iterator[PgBouncerServer]:
    if find_pgbouncer() is None:
        pytest.fail("pgbouncer is not installed")  # every test here needs it
    b = start_pgbouncer(small_server, default_pool_size=5, max_client_conn=20)
    try:
        yield b
    finally:
        b.stop()


def hold(stack: ExitStack, dsn: str, count: int, application_name: str) -> None:
    for _ in range(count):
        stack.enter_context(
            psycopg.connect(dsn, autocommit=True, application_name=application_name)
        )


def warm(bouncer: PgBouncerServer, servers: int) -> None:
    """Make PgBouncer open `servers` server connections: that many transactions at once."""
    with ExitStack() as stack:
        conns = [
            stack.enter_context(psycopg.connect(bouncer.dsn, prepare_threshold=None))
            for _ in range(servers)
        ]
        for conn in conns:
            conn.execute("SELECT 1")  # a transaction left open keeps its server linked
        for conn in conns:
            conn.commit()  # a client leaving mid-transaction would make PgBouncer drop it


pytestmark = pytest.mark.pgbouncer


def test_app_and_pooler_sessions_are_not_counted_as_others(
    small_server: PostgresServer, bouncer: PgBouncerServer
) -> None:
    """2 processes x 4 poolguard connections + PgBouncer's 5 on max_connections 20: fits."""
    warm(bouncer, 5)
    with ExitStack() as stack:
        hold(stack, small_server.dsn, 4, "poolguard:default")  # process 1
        hold(stack, small_server.dsn, 4, "poolguard:default")  # process 2
        code, report = doctor_json(
            small_server.url, processes=2, max_size=4, pooler_dsn=bouncer.url, cores=8
        )
        text = doctor_text(
            small_server.url, processes=2, max_size=4, pooler_dsn=bouncer.url, cores=8
        )
    budget = report["budget"]
    assert code == EXIT_OK, report["problems"]
    assert report["pgbouncer"]["server_connections"] == 5
    assert (budget["usable"], budget["demand"], budget["fits"]) == (17, 8, True)
    assert (budget["held_by_this_app"], budget["held_by_pooler"]) == (8, 5)
    assert budget["in_use_by_others"] == 0
    assert budget["pooler_bound"] == 5
    assert budget["per_process"] == 6
    assert report["problems"] == []
    assert not any(f["fix"] == "a pooler in front" for f in report["fixes"])
    assert budget["formula"].splitlines()[:5] == [
        "usable      = max_connections 20 - superuser_reserved_connections 3 - "
        "reserved_connections 0 - other apps 0 = 17",
        "this app    = 8 held now by its pools (part of its demand, not subtracted)",
        "pooler      = default_pool_size 5 x pairs 1 (poolguard/poolguard) = 5",
        "demand      = max_size 4 x processes 2 = 8",
        "total       = demand 8 + pooler 5 = 13 <= usable 17: fits",
    ]
    assert "per process = (usable 17 - pooler 5) / processes 2 = 6 (rounded down)" in text
    assert budget["advice"] == (
        "2 process(es) x max_size 4 = 8 fits: 8 of 17 usable connections (the pooler may hold 5)"
    )
    assert f"verdict     : {budget['advice']}" in text
    assert small_server.password not in text


@pytest.mark.parametrize("warmed", [0, 2, 5])
def test_behind_pgbouncer_the_server_side_bound_is_17_at_any_warm_up(
    bouncer: PgBouncerServer, warmed: int
) -> None:
    warm(bouncer, warmed)
    code, report = doctor_json(bouncer.url, processes=2, max_size=4)
    budget = report["budget"]
    assert report["pooler"]["mode"] == "transaction"
    assert budget["through_pooler"] is True
    assert budget["usable"] == 17
    assert budget["pooler_bound"] == 5  # default_pool_size 5 x 1 pair, whatever is open now
    assert budget["held_by_pooler"] >= warmed
    assert budget["in_use_by_others"] == 0
    server_side, client_side = budget["formula"].splitlines()[1:3]
    assert server_side == (
        "server side = default_pool_size 5 x pairs 1 (poolguard/poolguard) = 5 <= usable 17: "
        f"fits ({budget['held_by_pooler']} open now)"
    )
    assert client_side == ("client side = max_size 4 x processes 2 = 8 <= max_client_conn 20: fits")
    assert code == EXIT_OK


def test_behind_pgbouncer_never_advises_a_pooler_and_checks_max_client_conn(
    bouncer: PgBouncerServer,
) -> None:
    code, report = doctor_json(bouncer.url, processes=8, max_size=4)
    budget = report["budget"]
    assert code == EXIT_PROBLEM
    assert (budget["demand"], budget["max_client_conn"]) == (32, 20)
    assert budget["client_fits"] is False and budget["server_fits"] is True
    assert any(
        "8 process(es) x max_size 4 = 32 clients exceed max_client_conn 20" in p
        and "set max_client_conn >= 32" in p
        for p in report["problems"]
    )
    assert not any("pooler (PgBouncer" in p for p in report["problems"] + report["warnings"])
    assert [f["fix"] for f in report["fixes"]] == ["lower per-process pool sizes"]
    (fix,) = report["fixes"]
    assert "max_size default 2 per process" in fix["why"]  # 20 // 8
    assert "'max_size': 2" in fix["settings"]["django"]
    assert "pool_size=2, max_overflow=0" in fix["settings"]["sqlalchemy"]
    assert "max_size=2" in fix["settings"]["psycopg"]
    assert report["suggested_max_size"] == {"default": 2}


def test_pooler_pools_larger_than_the_server_are_a_problem(small_server: PostgresServer) -> None:
    big = start_pgbouncer(small_server, default_pool_size=25)
    try:
        code, report = doctor_json(big.url, processes=2, max_size=4)
    finally:
        big.stop()
    budget = report["budget"]
    assert code == EXIT_PROBLEM
    assert (budget["pooler_bound"], budget["usable"], budget["server_fits"]) == (25, 17, False)
    # The guides' safe rule: (max_connections 20 - 5) / 1 pair = 15, within usable 17.
    assert any("set default_pool_size <= 15" in p for p in report["problems"])
    (fix,) = [f for f in report["fixes"] if f["fix"] == "lower the pooler's pool size"]
    assert fix["settings"] == {"pgbouncer": "default_pool_size = 15"}
    assert report["settings"]["pgbouncer"].startswith("default_pool_size = 15 ")


def test_waiting_clients_in_pgbouncer_are_reported(small_server: PostgresServer) -> None:
    # The doctor goes to PostgreSQL directly and reads the busy pooler's console (--pooler):
    # through the pooler it would queue like the waiting client.
    one = start_pgbouncer(small_server, default_pool_size=1)
    try:
        with psycopg.connect(one.dsn, prepare_threshold=None) as holder:
            holder.execute("SELECT 1")  # holds the only server in an open transaction
            waiter = psycopg.connect(one.dsn, autocommit=True, prepare_threshold=None)
            waiter.pgconn.send_query(b"SELECT 1")  # queued behind the holder
            try:
                _, report = doctor_json(
                    small_server.url, processes=1, max_size=1, pooler_dsn=one.url, cores=8
                )
            finally:
                holder.rollback()
                waiter.close()
    finally:
        one.stop()
    assert report["pgbouncer"] is not None, report["warnings"]
    assert report["pgbouncer"]["cl_waiting"] >= 1
    assert any(
        "client(s) waiting for a server connection in PgBouncer" in w for w in report["warnings"]
    )
