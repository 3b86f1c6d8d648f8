"""The prepared-statement trap, reproduced through the real PgBouncer 1.18 in transaction mode.

Same workload twice, 8 threads x 200 queries: psycopg_pool with psycopg's defaults (a
statement run 5 times gets prepared on whichever server connection PgBouncer lent) must fail
at least once, or the test proves nothing; poolguard's defaults must fail zero times.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg_pool
import pytest

import poolguard
from poolguard._trap import QUERIES, THREADS, Checkout, run_workload
from poolguard.testing import PgBouncerServer

pytestmark = [pytest.mark.pgbouncer, pytest.mark.slow]


def failed_and_messages(checkout: Checkout) -> tuple[int, list[str]]:
    """Run the shared workload; return the number of failed queries and their messages."""
    result = run_workload(checkout)
    assert result.ok + len(result.failures) == THREADS * QUERIES
    return len(result.failures), result.messages


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
    failed, messages = failed_and_messages(plain_pool.connection)
    assert failed >= 1, "the trap did not trigger: the comparison below would prove nothing"
    assert any("prepared statement" in m for m in messages), messages
    print(f"psycopg_pool defaults: {failed}/{THREADS * QUERIES} failed, e.g. {messages[:2]}")


def test_poolguard_defaults_do_not(guarded: str) -> None:
    failed, messages = failed_and_messages(lambda: poolguard.connection(guarded))
    assert (failed, messages) == (0, [])
