"""The example projects run as a user would run them (real uvicorn, gunicorn and celery
processes on 127.0.0.1) against a max_connections=20 server; exhelpers.py drives them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from poolguard.testing import PostgresServer


@pytest.fixture(scope="session")
def small_server(postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """The server of a small plan: max_connections=20, 3 of them reserved for superusers."""
    return postgres_factory(max_connections=20)


@pytest.fixture
def small_db(small_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the small server, as a postgresql:// URL."""
    name = f"ex_{request.node.name.lower().replace('[', '_').replace(']', '')}"[:60]
    small_server.create_database(name)
    s = small_server
    try:
        yield f"postgresql://{s.user}:{s.password}@{s.host}:{s.port}/{name}"
    finally:
        small_server.drop_database(name)
