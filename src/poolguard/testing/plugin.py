"""The pytest plugin: server fixtures and the ``poolguard_no_leaks`` leak check.

Loaded through the ``poolguard`` pytest11 entry point (via :mod:`poolguard.testing`).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .servers import (
    PgBouncerServer,
    PostgresServer,
    find_pgbouncer,
    start_pgbouncer,
    start_postgres,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster for the whole test session."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_factory() -> Iterator[Callable[..., PostgresServer]]:
    """Start extra clusters with other settings: ``postgres_factory(max_connections=20)``."""
    started: list[PostgresServer] = []

    def factory(**kwargs: Any) -> PostgresServer:
        server = start_postgres(**kwargs)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def pgbouncer_server(postgres_server: PostgresServer) -> Iterator[PgBouncerServer]:
    """A real PgBouncer in transaction mode in front of ``postgres_server``."""
    if find_pgbouncer() is None:
        if os.environ.get("POOLGUARD_REQUIRE_PGBOUNCER") == "1":
            pytest.fail("POOLGUARD_REQUIRE_PGBOUNCER=1 but pgbouncer is not installed")
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    bouncer = start_pgbouncer(postgres_server)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN of a fresh database on ``postgres_server``, dropped after the test."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    name = f"t_{slug}_{secrets.token_hex(3)}"
    dsn = postgres_server.create_database(name)
    try:
        yield dsn
    finally:
        postgres_server.drop_database(name)


# Leak checks for users' test suites: the marker (or the ini option, for every test) fails
# a test whose body leaves a poolguard connection checked out, naming where it was taken.
# It wraps the call phase only, so connections that fixtures hold are not counted.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "poolguard_no_leaks",
        "fail every test that leaves a poolguard connection checked out",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "poolguard_no_leaks: fail the test if it leaves a poolguard connection checked out "
        "or inside an open transaction; the failure names where it was taken",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if not (
        item.get_closest_marker("poolguard_no_leaks") or item.config.getini("poolguard_no_leaks")
    ):
        return (yield)
    # Imported only when a test asks for the check: pytest loads this plugin in every project
    # that has poolguard installed, and those that never use the check should not get the
    # pools' fork hooks and the watchdog module imported into their test run.
    from .._report import checkouts_now, leftovers

    before = checkouts_now()
    result = yield
    found = leftovers(before)
    if found:
        lines = [
            f"  pool {c.pool!r}: taken at {c.taken_at} by {c.owner}, {c.state}"
            f"{' (an open transaction)' if 'transaction' in c.state else ''}, "
            f"last statement: {c.last_statement}"
            for c in found
        ]
        pytest.fail(
            f"test left {len(found)} poolguard connection(s) checked out:\n" + "\n".join(lines),
            pytrace=False,
        )
    return result
