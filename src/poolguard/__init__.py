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
from ._pool import AsyncGuardedPool, GuardedPool, _AsyncCheckout, _Checkout
from ._report import Report, report, report_on_signal
from ._settings import Settings
from ._state import configure, get_async_pool, get_pool, reset
from ._watchdog import ConnectionLeakWarning

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
    "aconnection",
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


def connection(name: str = "default", timeout: float | None = None) -> _Checkout:
    """``with poolguard.connection() as conn:`` a connection from the pool called ``name``."""
    return get_pool(name).connection(timeout)


def aconnection(name: str = "default", timeout: float | None = None) -> _AsyncCheckout:
    """``async with poolguard.aconnection() as conn:`` the asyncio twin of connection()."""
    return get_async_pool(name).connection(timeout)


def stats(name: str = "default") -> dict[str, Any]:
    """Counts and timings of the pool called ``name`` (async twin's, if that is the one in use)."""
    from ._state import _async_pools

    pool: GuardedPool | AsyncGuardedPool = get_pool(name)
    twin = _async_pools.get(name)
    if twin is not None and pool._inner is None:
        pool = twin
    return pool.stats()


for _cls in (AsyncGuardedPool, GuardedPool, PoolEvent, Report, Settings):
    _cls.__module__ = "poolguard"
