"""poolguard: one guarded PostgreSQL connection pool per process.

Set up once at start-up::

    import poolguard
    poolguard.configure()          # DSN from POOLGUARD_DSN or DATABASE_URL

then anywhere::

    with poolguard.connection() as conn:
        conn.execute("SELECT 1")
"""

from __future__ import annotations

from typing import Any

from ._budget import BudgetUnavailable, BudgetWarning
from ._errors import (
    ConfigurationError,
    ConnectionReclaimed,
    PoolConnectError,
    PoolExhausted,
    PoolGuardWarning,
)
from ._events import PoolEvent
from ._guard import SessionStateError, SessionStateWarning
from ._lost import ConnectionLeakWarning
from ._pool import AsyncCheckoutBlock, AsyncGuardedPool, CheckoutBlock, GuardedPool
from ._report import Report, report, report_on_signal
from ._settings import Settings
from ._state import aclose_all, close_all, configure, flavors_of, get_async_pool, get_pool, reset
from ._stats import combine

__all__ = [
    "AsyncGuardedPool",
    "BudgetUnavailable",
    "BudgetWarning",
    "ConfigurationError",
    "ConnectionLeakWarning",
    "ConnectionReclaimed",
    "GuardedPool",
    "PoolConnectError",
    "PoolEvent",
    "PoolExhausted",
    "PoolGuardWarning",
    "Report",
    "SessionStateError",
    "SessionStateWarning",
    "Settings",
    "aclose_all",
    "aconnection",
    "close_all",
    "configure",
    "connection",
    "get_async_pool",
    "get_pool",
    "report",
    "report_on_signal",
    "reset",
    "stats",
]

__version__ = "0.1.0.dev0"


def connection(name: str = "default", timeout: float | None = None) -> CheckoutBlock:
    """``with poolguard.connection() as conn:`` a connection from the pool called ``name``."""
    return get_pool(name).connection(timeout)


def aconnection(name: str = "default", timeout: float | None = None) -> AsyncCheckoutBlock:
    """``async with poolguard.aconnection() as conn:`` the asyncio twin of connection()."""
    return get_async_pool(name).connection(timeout)


def stats(name: str = "default") -> dict[str, Any]:
    """Counts and timings of the pool called ``name``: the sum over every flavor serving it
    (sync, asyncio twin, asyncpg), each flavor's own under ``"poolguard.flavors"``."""
    get_pool(name)  # a clear error if the name is not configured
    return combine({kind: pool.stats() for kind, pool in flavors_of(name).items()})


for _cls in (AsyncGuardedPool, GuardedPool, PoolEvent, Report, Settings):
    _cls.__module__ = "poolguard"
