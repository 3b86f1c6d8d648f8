"""Fixtures of the chaos tests: one restartable server, a fresh database per test."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from chaoshelpers import ServerControl

from poolguard.testing import PostgresServer


@pytest.fixture(scope="package")
def chaos_server(
    postgres_factory: Callable[..., PostgresServer],
) -> Iterator[ServerControl]:
    """One server for the chaos scenarios, which stop and restart it; never shared elsewhere."""
    # A commit acknowledged to the client must survive an immediate shutdown (a crash, for
    # PostgreSQL): the test servers' default synchronous_commit=off would lose the last ones.
    server = postgres_factory(max_connections=40, settings={"synchronous_commit": "on"})
    control = ServerControl(server)
    try:
        yield control
    finally:
        control.close()


@pytest.fixture
def chaos_dsn(chaos_server: ServerControl) -> Iterator[str]:
    """A fresh database on the chaos server, with a ``commits`` table for lost-commit checks."""
    chaos_server.wait_ready()
    name = f"chaos_{os.getpid()}_{time.monotonic_ns()}"
    dsn = chaos_server.server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE commits (id text PRIMARY KEY, worker int)")
    try:
        yield dsn
    finally:
        chaos_server.wait_ready()
        chaos_server.server.drop_database(name)
