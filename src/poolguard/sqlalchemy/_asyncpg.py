"""AsyncpgPool: poolguard's pool of asyncpg connections, for SQLAlchemy's asyncpg dialect.

asyncpg connections are not psycopg connections, so they cannot come from AsyncGuardedPool.
This pool is sized and timed by the settings of the poolguard pool with the same name
(max_size, min_size, timeout, max_waiting, connect_timeout, max_idle, max_lifetime,
application_name), writes the same ledger records and metrics, and gives the same errors.  Like
the psycopg async twin of a pool, it is a separate set of connections: a process that drives
one name through both psycopg and asyncpg may hold max_size of each (docs/sqlalchemy.md).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from time import monotonic
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from .._errors import ConfigurationError
from .._ledger import Checkout, caller_site
from .._pool import _PoolCore
from .._settings import Settings, redact_text

# libpq parameters asyncpg's connect() takes under the same name.
_ASYNCPG_PARAMS = {"host", "port", "user", "password", "dbname", "passfile"}
_lock = threading.Lock()
_pools: dict[str, AsyncpgPool] = {}


def asyncpg_pool(settings: Settings) -> AsyncpgPool:
    """The asyncpg pool for ``settings.name``; rebuilt when that name's settings changed."""
    pool = _pools.get(settings.name)
    if pool is not None and not pool._closed and pool.settings is settings:
        return pool
    with _lock:
        pool = _pools.get(settings.name)
        if pool is None or pool._closed or pool.settings is not settings:
            pool = _pools[settings.name] = AsyncpgPool(settings)
        return pool


def _connect_kwargs(settings: Settings) -> dict[str, Any]:
    params = conninfo_to_dict(settings.conninfo)
    unsupported = sorted(set(params) - _ASYNCPG_PARAMS - {"application_name", "connect_timeout"})
    if unsupported:
        raise ConfigurationError(
            f"pool {settings.name!r}: the asyncpg dialect cannot use the DSN parameter(s) "
            f"{', '.join(unsupported)}; use the postgresql+psycopg driver, or remove them"
        )
    kwargs: dict[str, Any] = {k: v for k, v in params.items() if k in _ASYNCPG_PARAMS}
    if "dbname" in kwargs:
        kwargs["database"] = kwargs.pop("dbname")
    if "port" in kwargs:
        kwargs["port"] = int(kwargs["port"])
    kwargs["timeout"] = settings.connect_timeout
    kwargs["server_settings"] = {"application_name": settings.application_name}
    # asyncpg's own statement cache prepares named statements that a transaction-mode pooler
    # hands to other clients' server connections; SQLAlchemy's adapter cache is set separately.
    kwargs["statement_cache_size"] = 0 if settings.mode == "transaction" else 100
    return kwargs


class AsyncpgPool(_PoolCore):
    """A small LIFO pool of asyncpg connections with poolguard's ledger, bound to one loop."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._connect_kwargs = _connect_kwargs(settings)
        self._reset_state()

    def _reset_state(self) -> None:
        # (connection, opened at, idle since); the right end is the most recently returned.
        self._idle: deque[tuple[asyncpg.Connection, float, float]] = deque()
        self._born: dict[int, float] = {}
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0

    def _inner_pool(self) -> None:
        return None

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        self._reset_state()  # the parent's sockets are left alone: it still uses them

    def _bind_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise psycopg_pool.PoolClosed(f"pool {self.name!r} is closed")
        if self._slots is None or self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise psycopg.InterfaceError(
                    f"asyncpg pool {self.name!r} belongs to another running event loop: use it "
                    "from that loop, or give each loop its own pool name"
                )
            self._reset_state()  # connections of a finished loop cannot be used or closed
            self._slots = asyncio.Semaphore(self.settings.max_size)
            self._loop = loop
        return self._slots

    async def getconn(self, timeout: float | None = None, *, _depth: int = 1) -> Any:
        """Take a connection; hand it back with putconn()."""
        slots = self._bind_loop()
        timeout = self._timeout(timeout)
        started = monotonic()
        if (
            self.settings.max_waiting
            and slots.locked()
            and self._waiting >= self.settings.max_waiting
        ):
            raise self._exhausted(0.0, self._waiting)
        self._waiting += 1
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except TimeoutError:
            raise self._exhausted(timeout, self._waiting - 1) from None
        finally:
            self._waiting -= 1
        try:
            conn = self._reuse() or await self._connect()
        except BaseException:
            slots.release()
            raise
        now = monotonic()
        self.metrics.wait_time.add(now - started)
        code, line = caller_site(_depth + 1)
        owner = id(asyncio.current_task())
        self.ledger.out[id(conn)] = (
            now,
            owner,
            code,
            line,
            conn.get_server_pid(),
            weakref.ref(conn),
        )
        return conn

    def _reuse(self) -> asyncpg.Connection | None:
        s, now = self.settings, monotonic()
        while self._idle and now - self._idle[0][2] > s.max_idle and len(self._born) > s.min_size:
            self._discard(self._idle.popleft()[0])
        while self._idle:
            conn, born, _ = self._idle.pop()
            if not conn.is_closed() and now - born <= s.max_lifetime:
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> asyncpg.Connection:
        started = monotonic()
        try:
            conn: asyncpg.Connection = await asyncpg.connect(**self._connect_kwargs)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            message = redact_text(str(exc).strip(), self.settings.conninfo)
            raise self._connect_error(psycopg.OperationalError(message)) from None
        self.metrics.create_time.add(monotonic() - started)
        self._born[id(conn)] = monotonic()
        return conn

    def _discard(self, conn: asyncpg.Connection) -> None:
        self._born.pop(id(conn), None)
        conn.terminate()  # no await: a stale connection gets no goodbye

    async def putconn(self, conn: Any) -> None:
        """Give a connection back: roll back what is open, then pool it."""
        entry = self.ledger.out.pop(id(conn), None)
        if entry is None:
            if self._born.get(id(conn)) is None:
                raise psycopg.ProgrammingError(
                    f"pool {self.name!r}: putconn() got a connection this pool did not give out"
                )
            return
        self.metrics.use_time.add(monotonic() - entry[0])
        try:
            if not conn.is_closed() and conn.is_in_transaction():
                status = psycopg.pq.TransactionStatus.INTRANS
                self._log_dirty_return(status, Checkout(id(conn), entry))
                try:
                    await conn.execute("ROLLBACK")
                except (OSError, asyncpg.PostgresError) as exc:
                    self._log_discard(Checkout(id(conn), entry), f"whose rollback failed: {exc}")
                    conn.terminate()
            born = self._born.get(id(conn), 0.0)
            if self._closed and not conn.is_closed():
                self._born.pop(id(conn), None)
                await conn.close()
            elif conn.is_closed() or monotonic() - born > self.settings.max_lifetime:
                self._discard(conn)
            else:
                self._idle.append((conn, born, monotonic()))
        finally:
            if self._slots is not None:
                self._slots.release()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the idle connections; connections still out are closed when returned."""
        self._closed = True
        idle, self._idle = self._idle, deque()
        for conn, _, _ in idle:
            self._born.pop(id(conn), None)
            try:
                await asyncio.wait_for(conn.close(), timeout)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError):
                conn.terminate()

    def stats(self) -> dict[str, Any]:
        return self.metrics.snapshot(
            name=self.name,
            idle=len(self._idle),
            used=len(self.ledger),
            max_size=self.settings.max_size,
            min_size=self.settings.min_size,
            pending=self._waiting,
        )
