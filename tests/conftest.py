"""Shared test setup: every test starts and ends with an empty pool registry.

The real-server fixtures (postgres_server, pgbouncer_server, postgres_factory, pg_dsn) come from
poolguard.testing, loaded as a pytest plugin through the package's entry point.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import poolguard

# A fixture for tests of the watchdog's timing (tests/test_leaks*.py).
from recorded_ticks import watchdog_ticks  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A developer's DATABASE_URL must not leak into tests that check where DSNs come from.
    for var in ("DATABASE_URL", "POOLGUARD_DSN", "DIRECT_URL"):
        monkeypatch.delenv(var, raising=False)
    poolguard.reset()
    yield
    poolguard.reset()
