"""One budget under load: 50 threads x 20 requests against a server with max_connections=20.

Through poolguard's engine the load queues for poolguard's connections and succeeds.  The same
load through 4 default SQLAlchemy engines (one per "worker", QueuePool 5 + 10 overflow each, so
up to 60 connections) runs into the server's limit: the test asserts that it really does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy
from sa_helpers import sa_url
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import poolguard
from poolguard.sqlalchemy import create_engine
from poolguard.testing import PostgresServer

THREADS = 50
REQUESTS = 20
WORK = text("SELECT pg_sleep(0.005), count(*) FROM pg_stat_activity")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_server(postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    return postgres_factory(max_connections=20)


def run_load(request: Callable[[int], None]) -> tuple[int, list[str]]:
    """THREADS threads x REQUESTS calls of ``request(thread_number)``: (successes, errors)."""
    ok, errors, lock = 0, [], threading.Lock()
    start = threading.Barrier(THREADS)

    def user(n: int) -> None:
        nonlocal ok
        start.wait()
        for _ in range(REQUESTS):
            try:
                request(n)
            except DBAPIError as exc:
                with lock:
                    errors.append(str(exc.orig).splitlines()[0])
            else:
                with lock:
                    ok += 1

    with ThreadPoolExecutor(THREADS) as workers:
        for future in [workers.submit(user, n) for n in range(THREADS)]:
            future.result()
    return ok, errors


def server_connections(server: PostgresServer) -> int:
    with server.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
    assert row is not None
    return int(row[0]) - 1  # not this one


def test_poolguard_engine_serves_the_load_with_zero_errors(small_server: PostgresServer) -> None:
    poolguard.configure(small_server.dsn, max_size=8, timeout=30)
    engine = create_engine(sa_url(small_server.dsn))
    peak = 0

    def request(n: int) -> None:
        nonlocal peak
        with Session(engine) as session:
            session.execute(WORK)
            peak = max(peak, len(poolguard.get_pool().ledger))

    ok, errors = run_load(request)
    assert (ok, errors) == (THREADS * REQUESTS, [])
    assert peak <= 8
    assert server_connections(small_server) <= 8


def test_four_default_engines_run_out_of_server_connections(small_server: PostgresServer) -> None:
    """What the same load costs through SQLAlchemy's default pools: refused connections."""
    engines = [sqlalchemy.create_engine(sa_url(small_server.dsn)) for _ in range(4)]
    try:

        def request(n: int) -> None:
            with Session(engines[n % 4]) as session:
                session.execute(WORK)

        ok, errors = run_load(request)
        opened = sum(e.pool.checkedin() + e.pool.checkedout() for e in engines)
    finally:
        for engine in engines:
            engine.dispose()
    assert ok + len(errors) == THREADS * REQUESTS
    assert errors, "4 x (5 + 10) connections against max_connections=20 should be refused"
    assert all("too many clients" in e or "remaining connection slots" in e for e in errors), (
        sorted(set(errors))
    )
    failed = f"{len(errors)} of {THREADS * REQUESTS} requests failed"
    print(f"\n4 default engines: {failed}, {opened} connections pooled")
