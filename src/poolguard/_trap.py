"""The prepared-statement trap workload, shared by tests/test_pgbouncer_trap.py and the demo.

A few threads run a few distinct statements, each many times, through whatever checkout they
are given.  With psycopg's default ``prepare_threshold=5`` a statement run five times on one
client connection is prepared (``_pg3_0``...) on the server connection a transaction-mode
pooler lent for that transaction; the next transaction may land on another server connection
(``prepared statement "_pg3_0" does not exist``) or find another client's statement of the
same name there (``... already exists``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final

import psycopg

from .testing import Workload, run_users

THREADS: Final = 8
QUERIES: Final = 200
#: Distinct statements, each repeated past psycopg's prepare_threshold (5).
STATEMENTS: Final = (
    "SELECT %s::int + 1",
    "SELECT count(*) FROM generate_series(1, %s::int)",
    "SELECT %s::text || 'x'",
)

Checkout = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


def run_workload(checkout: Checkout, *, threads: int = THREADS, queries: int = QUERIES) -> Workload:
    """Run `threads` x `queries` single-statement transactions, each through ``checkout()``."""

    def query(seed: int, i: int) -> None:
        with checkout() as conn:
            conn.execute(STATEMENTS[(seed + i) % len(STATEMENTS)], (i + 1,)).fetchone()

    return run_users(threads, queries, query)
