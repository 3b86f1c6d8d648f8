"""The prepared-statement trap, reproduced through the real PgBouncer 1.18 in transaction mode.

Same workload twice, 8 threads x 200 queries: psycopg_pool with psycopg's defaults (a
statement run 5 times gets prepared on whichever server connection PgBouncer lent) must fail
at least once, or the test proves nothing; poolguard's defaults must fail zero times.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import psycopg
import psycopg_pool
import pytest

import poolguard
from poolguard.testing import PgBouncerServer

THREADS = 8
QUERIES = 200
# A few distinct statements, each repeated past psycopg's prepare_threshold (5).
STATEMENTS = [
    "SELECT %s::int + 1",
    "SELECT count(*) FROM generate_series(1, %s::int)",
    "SELECT %s::text || 'x'",
]

pytestmark = [pytest.mark.pgbouncer, pytest.mark.slow]

Checkout = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


def run_workload(checkout: Checkout) -> tuple[int, list[str]]:
    """Run the workload; return the number of failed queries and their distinct messages."""
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        start.wait()
        for i in range(QUERIES):
            sql = STATEMENTS[(seed + i) % len(STATEMENTS)]
            try:
                with checkout() as conn:
                    conn.execute(sql, (i + 1,)).fetchone()
            except psycopg.Error as exc:
                with lock:
                    failures.append(str(exc).splitlines()[0])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(failures), sorted(set(failures))


@pytest.fixture
def plain_pool(pgbouncer_server: PgBouncerServer) -> Iterator[psycopg_pool.ConnectionPool]:
    pool = psycopg_pool.ConnectionPool(
        pgbouncer_server.dsn, min_size=THREADS, max_size=THREADS, open=False
    )
    pool.open(wait=True)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def guarded(pgbouncer_server: PgBouncerServer) -> Iterator[str]:
    name = "pgbouncer-trap"
    poolguard.configure(pgbouncer_server.url, name=name, max_size=THREADS)
    try:
        yield name
    finally:
        poolguard.reset()


def test_psycopg_defaults_fall_into_the_trap(plain_pool: psycopg_pool.ConnectionPool) -> None:
    failed, messages = run_workload(plain_pool.connection)
    assert failed >= 1, "the trap did not trigger: the comparison below would prove nothing"
    assert any("prepared statement" in m for m in messages), messages
    print(f"psycopg_pool defaults: {failed}/{THREADS * QUERIES} failed, e.g. {messages[:2]}")


def test_poolguard_defaults_do_not(guarded: str) -> None:
    failed, messages = run_workload(lambda: poolguard.connection(guarded))
    assert (failed, messages) == (0, [])
