"""Fault injection under load: every scenario asserts 0 lost commits, 0 dirty sessions, the
right error types, recovery within a bound, and no password in any error or log line.

Four threads commit one uniquely-identified row per transaction through poolguard; every fifth
transaction leaves session state behind (SET, search_path, an advisory lock, set_config); each
checkout first reads the session and compares it with a fresh one's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from chaoshelpers import (
    BouncerControl,
    Outcome,
    ServerControl,
    cancel_queries,
    defaults,
    fill_server,
    lost_commits,
    run_load,
    terminate_backends,
)
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import poolguard
from poolguard.testing import start_pgbouncer

pytestmark = pytest.mark.chaos

#: Seconds after the fault ends by which a commit must succeed again.
RECOVERY = 2.0
#: What a caller may see while the server is away: the driver's connection errors, poolguard's
#: connect error, a statement the server cancelled or refused (admin shutdown, cancel).
EXPECTED = (psycopg.OperationalError, psycopg.errors.QueryCanceled)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def check(
    outcome: Outcome,
    dsn: str,
    password: str,
    logs: pytest.LogCaptureFixture,
    *,
    fault: bool = True,
    allow_errors: bool = True,
) -> None:
    assert outcome.transactions > 0
    assert outcome.hung == 0
    assert lost_commits(dsn, outcome.committed) == set()
    assert outcome.dirty == []
    unexpected = [e for e in outcome.errors if not isinstance(e, EXPECTED)]
    assert unexpected == [], unexpected
    if not allow_errors:
        assert outcome.errors == []
    if fault:
        recovery = outcome.recovery()
        assert recovery is not None and recovery <= RECOVERY, recovery
    for text in [*map(str, outcome.errors), *map(repr, outcome.errors), logs.text]:
        assert password not in text


def _pool(dsn: str, **options: Any) -> poolguard.GuardedPool:
    options = {"mode": "session", "min_size": 4, "max_size": 4, "timeout": 3.0, **options}
    pool = poolguard.configure(dsn, connect_timeout=2, **options)
    pool.open()
    return pool


def _dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_under_load(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture, mode: str
) -> None:
    pool = _pool(chaos_dsn)
    outcome = run_load(
        pool.connection, expected=defaults(chaos_dsn), fault=lambda: chaos_server.restart(mode)
    )
    check(outcome, chaos_dsn, chaos_server.server.password, logs)


def test_terminated_backends(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture
) -> None:
    pool = _pool(chaos_dsn)
    admin = chaos_server.server.dsn
    outcome = run_load(
        pool.connection,
        expected=defaults(chaos_dsn),
        fault=lambda: terminate_backends(admin, _dbname(chaos_dsn)),
    )
    check(outcome, chaos_dsn, chaos_server.server.password, logs)


def test_server_full(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture
) -> None:
    pool = _pool(chaos_dsn, min_size=1)
    admin = chaos_server.server.dsn
    # The pool has one connection when the server fills up: it caps itself and serves from it.
    outcome = run_load(
        pool.connection,
        expected=defaults(chaos_dsn),
        fault=lambda: fill_server(admin, 2.0),
        fault_at=0.0,
        seconds=4.0,
    )
    check(outcome, chaos_dsn, chaos_server.server.password, logs, allow_errors=False)


def test_server_stopped_for_a_while(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture
) -> None:
    import time

    def outage() -> None:
        chaos_server.stop("fast")
        time.sleep(1.5)
        chaos_server.start()

    pool = _pool(chaos_dsn, timeout=1.0)
    outcome = run_load(pool.connection, expected=defaults(chaos_dsn), fault=outage, seconds=5.0)
    check(outcome, chaos_dsn, chaos_server.server.password, logs)
    assert any(isinstance(e, poolguard.PoolConnectError) for e in outcome.errors)
    assert not any(isinstance(e, poolguard.PoolExhausted) for e in outcome.errors)


def test_cancelled_statements(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture
) -> None:
    pool = _pool(chaos_dsn)
    admin = chaos_server.server.dsn
    outcome = run_load(
        pool.connection,
        expected=defaults(chaos_dsn),
        fault=lambda: cancel_queries(admin, _dbname(chaos_dsn), 1.5),
        work_sql="SELECT pg_sleep(0.005)",
    )
    check(outcome, chaos_dsn, chaos_server.server.password, logs)
    assert any(isinstance(e, psycopg.errors.QueryCanceled) for e in outcome.errors)


def test_dirty_returns_on_one_connection(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture
) -> None:
    pool = _pool(chaos_dsn, min_size=1, max_size=1)
    outcome = run_load(pool.connection, expected=defaults(chaos_dsn), seconds=2.0, dirty_every=2)
    check(outcome, chaos_dsn, chaos_server.server.password, logs, fault=False, allow_errors=False)
    assert pool.stats()["poolguard.connection.session_resets"] > 0


def _child(dsn: str, expected: tuple[Any, ...], path: str) -> None:
    pool = poolguard.get_pool()
    outcome = run_load(pool.connection, expected=expected, workers=2, seconds=2.0)
    with open(path, "w") as out:
        out.write(f"{len(outcome.errors)} {len(outcome.dirty)}\n")
        out.write("\n".join(sorted(outcome.committed)))
    os._exit(0)


def test_fork_with_four_children(
    chaos_server: ServerControl,
    chaos_dsn: str,
    logs: pytest.LogCaptureFixture,
    tmp_path: Any,
) -> None:
    pool = _pool(chaos_dsn, min_size=2, max_size=2)
    expected = defaults(chaos_dsn)
    with pool.connection() as conn:  # the parent's connections exist before the fork
        conn.execute("SELECT 1")
    fork = multiprocessing.get_context("fork")
    paths = [str(tmp_path / f"child{i}") for i in range(4)]
    children = [fork.Process(target=_child, args=(chaos_dsn, expected, p)) for p in paths]
    for child in children:
        child.start()
    parent = run_load(pool.connection, expected=expected, workers=2, seconds=2.0)
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    committed = set(parent.committed)
    for path in paths:
        with open(path) as result:
            errors, dirty = map(int, result.readline().split())
            ids = set(result.read().split())
        assert errors == 0 and dirty == 0
        assert len(ids) > 0
        committed |= ids
    check(parent, chaos_dsn, chaos_server.server.password, logs, fault=False, allow_errors=False)
    assert lost_commits(chaos_dsn, committed) == set()


@pytest.mark.pgbouncer
def test_pgbouncer_restart(
    chaos_server: ServerControl, chaos_dsn: str, logs: pytest.LogCaptureFixture
) -> None:
    from poolguard.testing import find_pgbouncer

    if find_pgbouncer() is None:
        if os.environ.get("POOLGUARD_REQUIRE_PGBOUNCER") == "1":
            pytest.fail("POOLGUARD_REQUIRE_PGBOUNCER=1 but pgbouncer is not installed")
        pytest.skip("pgbouncer is not installed")
    bouncer = start_pgbouncer(chaos_server.server, default_pool_size=4)
    control = BouncerControl(bouncer.port)
    try:
        dsn = make_conninfo(bouncer.dsn, dbname=_dbname(chaos_dsn))
        # Behind a transaction pooler session state is the guard's business, not the reset's:
        # the load leaves none here.
        pool = poolguard.configure(
            dsn, guard="off", min_size=4, max_size=4, timeout=3.0, connect_timeout=2
        )
        pool.open()
        outcome = run_load(
            pool.connection, expected=defaults(chaos_dsn), fault=control.restart, dirty_every=0
        )
        check(outcome, chaos_dsn, chaos_server.server.password, logs)
    finally:
        poolguard.reset()
        control.close()
        bouncer.stop()
