"""AsyncpgPool: poolguard's pool of asyncpg connections, for SQLAlchemy's asyncpg dialect.

asyncpg connections are not psycopg connections, so they cannot come from AsyncGuardedPool.
This pool is sized and timed by the settings of the poolguard pool with the same name
(max_size, min_size, timeout, max_waiting, connect_timeout, max_idle, max_lifetime,
application_name), writes the same ledger records and metrics, and gives the same errors.  Its
server connections take their slots from the name's one budget (see poolguard/_slots.py), so a
process that drives one name through psycopg and asyncpg still holds at most max_size.

asyncpg itself is imported on first use, so ``import poolguard.sqlalchemy`` works without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any
from urllib.parse import urlencode

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from .. import _state
from .._errors import ConfigurationError
from .._ledger import TAKEN_AT, Checkout, caller_site
from .._pool import PoolCore
from .._settings import Settings, redact_text

# libpq parameters asyncpg's connect() takes under the same name.
_ASYNCPG_PARAMS = {"host", "port", "user", "password", "dbname", "passfile"}
# libpq's TLS parameters, which asyncpg reads (with libpq's meaning) from a DSN's query string.
_ASYNCPG_TLS_PARAMS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
)


def asyncpg_pool(name: str) -> AsyncpgPool:
    """The asyncpg pool of ``name``; rebuilt when that name's settings changed."""
    return _state.flavor(name, _state.ASYNCPG, AsyncpgPool)


def _driver() -> Any:
    """The asyncpg module, imported when the first asyncpg pool is built."""
    try:
        return importlib.import_module("asyncpg")
    except ImportError:
        raise ConfigurationError(
            "the postgresql+asyncpg driver needs asyncpg: pip install 'poolguard[asyncpg]' "
            "(or use postgresql+psycopg)"
        ) from None


def _connect_kwargs(settings: Settings) -> dict[str, Any]:
    params = conninfo_to_dict(settings.conninfo)
    understood = (
        _ASYNCPG_PARAMS | set(_ASYNCPG_TLS_PARAMS) | {"application_name", "connect_timeout"}
    )
    unsupported = sorted(set(params) - understood)
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
    tls = {k: str(params[k]) for k in _ASYNCPG_TLS_PARAMS if k in params}
    if tls:
        # Explicit keyword arguments win over the DSN in asyncpg, so the DSN carries only these.
        kwargs["dsn"] = "postgresql://?" + urlencode(tls)
    kwargs["timeout"] = settings.connect_timeout
    kwargs["server_settings"] = {"application_name": settings.application_name}
    # asyncpg's own statement cache prepares named statements that a transaction-mode pooler
    # hands to other clients' server connections; SQLAlchemy's adapter cache is set separately.
    return kwargs


class AsyncpgPool(PoolCore):
    """A small LIFO pool of asyncpg connections with poolguard's ledger, bound to one loop."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self._asyncpg = _driver()
        self._connect_kwargs = _connect_kwargs(settings)
        super().__init__(settings, **kwargs)

    def _fresh_state(self) -> None:
        # (connection, opened at, idle since); the right end is the most recently returned.
        self._idle: deque[tuple[Any, float, float]] = deque()
        self._born: dict[int, float] = {}
        #: Checkouts at once (max_size); the server connections are counted by self.slots.
        self._checkouts: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0
        #: Connections poolguard took back from their holder: their putconn() is accepted.
        self._reclaimed: weakref.WeakSet[Any] = weakref.WeakSet()

    def _inner_pool(self) -> None:
        return None

    # --- what the watchdog asks (see PoolCore) ---------------------------------------------

    is_async = True

    def conn_status(self, conn: Any) -> int:
        if conn.is_closed():
            return int(TransactionStatus.UNKNOWN)
        return int(
            TransactionStatus.INTRANS if conn.is_in_transaction() else TransactionStatus.IDLE
        )

    def conn_last_active(self, conn: Any) -> float:
        return 0.0  # asyncpg does not say: idle time counts from the checkout

    def conn_statement(self, conn: Any) -> str:
        return "(not recorded for asyncpg connections)"

    def reclaim(self, record: Checkout, message: str, claimed: Callable[[], None]) -> None:
        def on_loop() -> None:
            conn = record.connection()
            if conn is not None and self.ledger.claim(record):
                claimed()
                self._take_back(conn)

        self._on_loop(on_loop)

    def drop_lost(self, conn: Any) -> None:
        self._on_loop(lambda: self._take_back(conn))

    def _on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn)

    def _take_back(self, conn: Any) -> None:
        """Close a connection out of the pool and free its slots (on the pool's loop)."""
        self._reclaimed.add(conn)
        self._discard(conn)
        if self._checkouts is not None:
            self._checkouts.release()

    def is_open(self) -> bool:
        return not self._closed and self._checkouts is not None

    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def has_demand(self) -> bool:
        return self._waiting > 0

    def release_idle(self) -> None:
        loop = self._loop
        if self._idle and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._release_one)

    def _release_one(self) -> None:
        if self._idle:
            self._discard(self._idle.popleft()[0])

    def abandon(self) -> None:
        self._closed = True
        for conn, _, _ in self._idle:
            self._born.pop(id(conn), None)
            self.slots.give()  # its socket dies with its event loop
        self._idle = deque()

    def _bind_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise psycopg_pool.PoolClosed(f"pool {self.name!r} is closed")
        if self._checkouts is None or self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise psycopg.InterfaceError(
                    f"asyncpg pool {self.name!r} belongs to another running event loop: use it "
                    "from that loop, or give each loop its own pool name"
                )
            self._fresh_state()  # connections of a finished loop cannot be used or closed
            self._checkouts = asyncio.Semaphore(self.settings.max_size)
            self._loop = loop
        return self._checkouts

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
            conn = self._reuse() or await self._connect(started + timeout - monotonic())
        except BaseException:
            slots.release()
            raise
        now = monotonic()
        self.metrics.wait_time.add(now - started)
        code, line = caller_site(_depth + 1)
        owner = id(asyncio.current_task())
        self.ledger.take(id(conn), now, owner, code, line, conn.get_server_pid(), weakref.ref(conn))
        return conn

    def _reuse(self) -> Any:
        s, now = self.settings, monotonic()
        while self._idle and now - self._idle[0][2] > s.max_idle and len(self._born) > s.min_size:
            self._discard(self._idle.popleft()[0])
        while self._idle:
            conn, born, _ = self._idle.pop()
            if not conn.is_closed() and now - born <= s.max_lifetime:
                return conn
            self._discard(conn)
        return None

    def _statement_cache_size(self) -> int:
        # asyncpg's own statement cache prepares named statements that a transaction-mode
        # pooler hands to other clients' server connections; SQLAlchemy's adapter cache is set
        # separately.  Read per connection: the name's mode="auto" decision may come later.
        return 0 if self.effective_mode == "transaction" else 100

    async def _connect(self, timeout: float) -> Any:
        self._waiting += 1  # a caller waits for this connection: other flavors give way
        try:
            if not await self.slots.atake(self, max(0.0, timeout)):
                raise self._exhausted(self._timeout(None), self._waiting - 1)
        finally:
            self._waiting -= 1
        started = monotonic()
        try:
            conn = await self._asyncpg.connect(
                **self._connect_kwargs, statement_cache_size=self._statement_cache_size()
            )
        except (OSError, asyncio.TimeoutError, self._asyncpg.PostgresError) as exc:
            self.slots.give()
            message = redact_text(str(exc).strip(), self.settings.conninfo)
            raise self._connect_error(psycopg.OperationalError(message)) from None
        except BaseException:
            self.slots.give()
            raise
        self.metrics.create_time.add(monotonic() - started)
        self._born[id(conn)] = monotonic()
        return conn

    def _discard(self, conn: Any) -> None:
        if self._born.pop(id(conn), None) is not None:
            self.slots.give()
        conn.terminate()  # no await: a stale connection gets no goodbye

    async def putconn(self, conn: Any) -> None:
        """Give a connection back: roll back what is open, then pool it."""
        entry = self.ledger.give_back(id(conn))
        if entry is None:
            if conn in self._reclaimed:
                return  # poolguard closed it and freed its slot already
            if self._born.get(id(conn)) is None:
                raise psycopg.ProgrammingError(
                    f"pool {self.name!r}: putconn() got a connection this pool did not give out"
                )
            return
        self.metrics.use_time.add(monotonic() - entry[TAKEN_AT])
        try:
            if not conn.is_closed() and conn.is_in_transaction():
                status = psycopg.pq.TransactionStatus.INTRANS
                self._log_dirty_return(status, Checkout(id(conn), entry))
                try:
                    await conn.execute("ROLLBACK")
                except (OSError, self._asyncpg.PostgresError) as exc:
                    self._log_discard(Checkout(id(conn), entry), f"whose rollback failed: {exc}")
                    conn.terminate()
            born = self._born.get(id(conn), 0.0)
            if self._closed and not conn.is_closed():
                await self._close_one(conn, 5.0)
            elif (
                conn.is_closed()
                or monotonic() - born > self.settings.max_lifetime
                or (self.slots.waiting and self.slots.pressure(self))
            ):
                self._discard(conn)
            else:
                self._idle.append((conn, born, monotonic()))
        finally:
            if self._checkouts is not None:
                self._checkouts.release()

    async def close(self, timeout: float = 5.0) -> None:
        """Close every connection, the checked-out ones too (app shutdown, reset() in tests):
        a holder's later use fails, its putconn() is accepted."""
        self._closed = True
        idle, self._idle = self._idle, deque()
        for conn, _, _ in idle:
            await self._close_one(conn, timeout)
        for record in self.ledger.records():
            conn = record.connection()
            if conn is not None and self.ledger.claim(record):
                self._take_back(conn)

    async def _close_one(self, conn: Any, timeout: float) -> None:
        if self._born.pop(id(conn), None) is not None:
            self.slots.give()
        try:
            await asyncio.wait_for(conn.close(), timeout)
        except (OSError, asyncio.TimeoutError, self._asyncpg.PostgresError):
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
