"""The doctor's connection math on live systems: a real PostgreSQL with max_connections=20,
a real PgBouncer, app sessions from two client addresses, and the advice with its numbers."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from poolguard._doctor import EXIT_OK, EXIT_PROBLEM, local_cores, run_doctor
from poolguard.testing import PgBouncerServer, PostgresServer, find_pgbouncer, start_pgbouncer
from test_doctor import doctor_json


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


@pytest.mark.pgbouncer
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


@pytest.mark.pgbouncer
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


@pytest.mark.pgbouncer
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


@pytest.mark.pgbouncer
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


@pytest.mark.pgbouncer
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


def unix_socket_dsn(server: PostgresServer) -> str:
    """The same server over its unix socket: pg_stat_activity shows no client address."""
    return make_conninfo(server.dsn, host=str(server.socket_dir))


def test_fleet_groups_by_client_address(small_server: PostgresServer) -> None:
    with ExitStack() as stack:
        hold(stack, small_server.dsn, 3, "poolguard:default")  # host A: TCP 127.0.0.1
        hold(stack, unix_socket_dsn(small_server), 2, "poolguard:default")  # host B: socket
        hold(stack, small_server.dsn, 1, "cron-report")  # another app
        code, report = doctor_json(small_server.url, processes=2, max_size=4, cores=8)
        text = doctor_text(small_server.url, processes=2, max_size=4, cores=8)
    fleet = report["fleet"]
    groups = {(g["kind"], g["client"], g["application_name"]): g for g in fleet["groups"]}
    assert set(groups) == {
        ("app", "127.0.0.1", "poolguard:default"),
        ("app", "local socket", "poolguard:default"),
        ("other", "127.0.0.1", "cron-report"),
    }
    assert groups[("app", "127.0.0.1", "poolguard:default")]["count"] == 3
    assert groups[("app", "local socket", "poolguard:default")]["count"] == 2
    assert groups[("app", "local socket", "poolguard:default")]["states"] == {"idle": 2}
    assert groups[("other", "127.0.0.1", "cron-report")]["count"] == 1
    assert (fleet["app_total"], fleet["total"], fleet["usable"]) == (5, 6, 16)
    assert fleet["app_hosts"] == ["127.0.0.1", "local socket"]
    assert report["budget"]["in_use_by_others"] == 1
    assert code == EXIT_OK
    assert "this app: 5 connection(s) from 2 host(s) of usable 16" in text
    assert "Fleet: 6 session(s) from 3 group(s)" in text


def test_a_fleet_that_outgrew_per_process_pools_is_told_to_use_a_central_pooler(
    small_server: PostgresServer,
) -> None:
    with ExitStack() as stack:
        hold(stack, small_server.dsn, 6, "poolguard:default")
        hold(stack, unix_socket_dsn(small_server), 6, "poolguard:default")
        code, report = doctor_json(small_server.url, processes=2, max_size=10, cores=8)
    budget = report["budget"]
    assert code == EXIT_PROBLEM
    assert (budget["demand"], budget["usable"], budget["per_process"]) == (20, 17, 8)
    assert report["problems"][0] == (
        "2 process(es) x max_size 10 = 20 exceeds the 17 usable connections: set max_size <= 8 "
        "or run fewer processes"
    )
    fixes = report["fixes"]
    assert [f["fix"] for f in fixes] == ["lower per-process pool sizes", "a pooler in front"]
    assert fixes[0]["why"] == (
        "max_size default 8 per process x 2 process(es) fits the 17 connections free for this "
        "app and cores 8 x 2 = 16"
    )
    assert fixes[1]["why"] == (
        "the fleet (2 hosts, 12 connections held now) has outgrown per-process pools: a central "
        "pooler (PgBouncer, PgDog or Supavisor) should hold the 17 usable connections"
    )
    assert fixes[1]["settings"]["pgbouncer"] == (
        "pool_mode = transaction; default_pool_size = 15; max_client_conn = 100"
    )


def test_idle_in_transaction_fix_names_the_worst_sessions(small_server: PostgresServer) -> None:
    with ExitStack() as stack:
        older = stack.enter_context(
            psycopg.connect(small_server.dsn, application_name="billing-worker")
        )
        older.execute("UPDATE pg_catalog.pg_class SET relname = relname WHERE false")
        time.sleep(0.4)
        newer = stack.enter_context(psycopg.connect(small_server.dsn, application_name="web"))
        newer.execute("SELECT 'secret-value'")
        time.sleep(0.3)
        code, report = doctor_json(small_server.url, idle_seconds=0.2, cores=8)
        older.rollback()
        newer.rollback()
        pids = older.info.backend_pid, newer.info.backend_pid
    assert code == EXIT_PROBLEM
    (fix,) = [f for f in report["fixes"] if f["fix"] == "hunt idle-in-transaction sessions"]
    idle = report["idle_in_transaction"]
    assert [s["application_name"] for s in idle] == ["billing-worker", "web"]  # oldest first
    assert fix["why"].startswith(
        f"the worst: pid {pids[0]} app 'billing-worker' {idle[0]['seconds']:.1f} s:"
    )
    assert f"pid {pids[1]} app 'web'" in fix["why"]
    assert "secret-value" not in json.dumps(report)
    assert fix["settings"]["postgresql"] == (
        "ALTER ROLE <app user> SET idle_in_transaction_session_timeout = '60s'"
    )
    assert report["problems"] == [
        "2 session(s) idle in transaction for >= 0.2 s: they hold a connection and locks while "
        "doing nothing (find the code that opens a transaction and waits; set "
        "idle_in_transaction_session_timeout)"
    ]


def test_cores_bound_lowers_the_suggested_pool_size(small_server: PostgresServer) -> None:
    code, report = doctor_json(small_server.url, processes=2, max_size=4, cores=2)
    assert code == EXIT_OK  # it fits the slots; cores only make more connections queue
    assert report["cores"] == {"count": 2, "source": "2 (--cores)"}
    assert (
        "demand 8 > cores 2 x 2 = 4: PostgreSQL runs about cores x 2 busy connections at "
        "once, more only queue inside it" in report["warnings"]
    )
    assert report["suggested_max_size"] == {"default": 2}
    (fix,) = report["fixes"]
    assert fix["why"] == (
        "max_size default 2 per process x 2 process(es) fits the 17 connections free for this "
        "app and cores 2 x 2 = 4"
    )
    assert "max_size=2" in report["settings"]["psycopg"]
    # The server is on this machine: without --cores the doctor counts its cores.
    _, local = doctor_json(small_server.url, processes=2, max_size=4)
    cpus = os.cpu_count()
    assert local["cores"] == {
        "count": cpus,
        "source": f"{cpus} (the server is local: this machine's cpu count)",
    }


def test_cores_are_unknown_for_a_remote_server() -> None:
    assert local_cores("host=db.example.com dbname=app") == (None, "unknown (pass --cores N)")
    assert local_cores("host=/var/run/postgresql dbname=app")[0] == os.cpu_count()


def test_more_connections_held_than_declared_asks_for_one_pool_per_process(
    small_server: PostgresServer,
) -> None:
    with ExitStack() as stack:
        hold(stack, small_server.dsn, 6, "poolguard:default")
        code, report = doctor_json(small_server.url, processes=1, max_size=4, cores=8)
    assert code == EXIT_OK
    assert (
        "this app holds 6 connections now but declares 4 (1 process(es) x max_size 4): more "
        "processes run than declared, or processes open more than one pool"
    ) in report["warnings"]
    (fix,) = report["fixes"]
    assert fix["fix"] == "one pool per process"
    assert fix["why"].startswith("6 held > 4 declared: give each process one pool")


def test_a_single_host_is_told_to_lower_sizes_before_adding_a_pooler(
    small_server: PostgresServer,
) -> None:
    # 4 x 8 = 32 > 17, but 4 each still fits: lowering the sizes is enough.
    code, report = doctor_json(small_server.url, processes=4, max_size=8, cores=8)
    assert code == EXIT_PROBLEM
    assert [f["fix"] for f in report["fixes"]] == ["lower per-process pool sizes"]
    assert report["suggested_max_size"] == {"default": 4}
    # 17 processes x 1 = 17 fits, 18 leave none: only a pooler lets them share.
    code, report = doctor_json(small_server.url, processes=18, max_size=1, cores=8)
    assert code == EXIT_PROBLEM
    assert report["problems"][0] == (
        "no connection slot is left for 18 process(es): only 17 of 17 usable connections are "
        "free for this app; free connections or raise max_connections"
    )
    (fix,) = report["fixes"]
    assert fix["fix"] == "a pooler in front"
    assert fix["why"] == (
        "18 process(es) leave 0 connection(s) each: a pooler in transaction mode lets them "
        "share the server's connections"
    )
    assert fix["settings"]["pgbouncer"] == (
        "pool_mode = transaction; default_pool_size = 15; max_client_conn = 100"
    )


def test_a_pooler_without_an_admin_console_is_counted_by_its_address(
    small_server: PostgresServer,
) -> None:
    # poolguard's own rewriter is a transaction pooler with no PgBouncer console: the doctor
    # counts the sessions from its address as the pooler's and says so.
    from poolguard import rewriter

    handle = rewriter.start(small_server.dsn, pool_size=3)
    try:
        code, report = doctor_json(handle.dsn, processes=2, max_size=4, cores=8)
    finally:
        handle.stop()
    budget = report["budget"]
    assert report["pooler"]["mode"] == "transaction"
    assert report["pgbouncer"] is None
    assert any(w.startswith("could not read PgBouncer's admin console") for w in report["warnings"])
    assert (
        "without the pooler's admin console, every session from its address 127.0.0.1 is "
        "counted as the pooler's"
    ) in report["warnings"]
    assert budget["in_use_by_others"] == 0 and budget["usable"] == 17
    assert budget["pooler_bound"] == budget["held_by_pooler"] >= 1
    assert budget["formula"].splitlines()[1] == (
        f"server side = {budget['held_by_pooler']} server connections held now (pool sizes "
        f"unknown without the admin console) = {budget['pooler_bound']} <= usable 17: fits "
        f"({budget['held_by_pooler']} open now)"
    )
    assert budget["formula"].splitlines()[2] == (
        "client side = max_size 4 x processes 2 = 8: max_client_conn unknown, not checked"
    )
    assert code == EXIT_OK


def test_pooler_option_that_is_not_pgbouncer_is_a_warning(small_server: PostgresServer) -> None:
    code, report = doctor_json(small_server.url, pooler_dsn=small_server.url, cores=8)
    assert code == EXIT_OK
    assert report["pgbouncer"] is None
    assert any(w.startswith("could not read PgBouncer's admin console") for w in report["warnings"])
    assert small_server.password not in json.dumps(report)
