"""What the benchmarks share: their command line, a server to measure against, a timer."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import psycopg

from poolguard.testing import PostgresServer, start_postgres


def parse_args(doc: str | None, *, ops: int, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; best one wins")
    parser.add_argument("--ops", type=int, default=ops, help="operations per round")
    return parser.parse_args(argv)


def database() -> tuple[str, PostgresServer | None]:
    """DATABASE_URL, else a private server started now (the caller stops it)."""
    dsn = os.environ.get("DATABASE_URL")
    if dsn:
        return dsn, None
    server = start_postgres()
    return server.dsn, server


def per_op(fn: Callable[[], None], ops: int) -> float:
    """Seconds per call of ``fn``, over ``ops`` calls."""
    started = time.perf_counter()
    for _ in range(ops):
        fn()
    return (time.perf_counter() - started) / ops


def has_rows(conn: psycopg.Connection[Any], table: str, rows: int) -> bool:
    """Whether ``table`` exists with exactly ``rows`` rows (a benchmark's data, loaded before)."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if not (exists and exists[0]):
        return False
    have = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return bool(have and have[0] == rows)
