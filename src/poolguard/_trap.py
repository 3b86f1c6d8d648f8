"""The prepared-statement trap workload, shared by tests/test_pgbouncer_trap.py and the demo.

A few threads run a few distinct statements, each many times, through whatever checkout they
are given.  With psycopg's default ``prepare_threshold=5`` a statement run five times on one
client connection is prepared (``_pg3_0``...) on the server connection a transaction-mode
pooler lent for that transaction; the next transaction may land on another server connection
(``prepared statement "_pg3_0" does not exist``) or find another client's statement of the
same name there (``... already exists``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

THREADS: Final = 8
QUERIES: Final = 200
#: Distinct statements, each repeated past psycopg's prepare_threshold (5).
STATEMENTS: Final = (
    "SELECT %s::int + 1",
    "SELECT count(*) FROM generate_series(1, %s::int)",
    "SELECT %s::text || 'x'",
)

Checkout = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


@dataclass
class TrapResult:
    """What one run of the workload saw."""

    ok: int = 0
    #: The first line of each failed query's error, in the order they happened.
    failures: list[str] = field(default_factory=list)
    #: Seconds per successful query.
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def messages(self) -> list[str]:
        """The distinct failure messages, sorted."""
        return sorted(set(self.failures))


def run_workload(
    checkout: Checkout, *, threads: int = THREADS, queries: int = QUERIES
) -> TrapResult:
    """Run `threads` x `queries` single-statement transactions, each through ``checkout()``."""
    result = TrapResult()
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(seed: int) -> None:
        start.wait()
        for i in range(queries):
            sql = STATEMENTS[(seed + i) % len(STATEMENTS)]
            began = time.perf_counter()
            try:
                with checkout() as conn:
                    conn.execute(sql, (i + 1,)).fetchone()
            except psycopg.Error as exc:
                with lock:
                    result.failures.append(str(exc).splitlines()[0])
            else:
                elapsed = time.perf_counter() - began
                with lock:
                    result.ok += 1
                    result.latencies.append(elapsed)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    began = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    result.seconds = time.perf_counter() - began
    return result
