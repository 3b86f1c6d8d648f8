"""GuardedPool and AsyncGuardedPool: psycopg_pool pools with a ledger, metrics and a clean return.

The decisions (what to log, when a connection is dirty, how to word an error) live once in
``_PoolCore``; the two public classes only do the I/O, one with ``await`` and one without.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Callable, Generator, Mapping
from time import monotonic
from types import MappingProxyType, TracebackType
from typing import Any

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

from . import _watchdog
from ._budget import check_budget_on_open
from ._connection import AsyncGuardedConnection, GuardedConnection, Tracked, _needs_cleaning
from ._errors import PoolConnectError, PoolExhausted
from ._events import Events
from ._guard import SessionStateGuard
from ._ledger import Checkout, Ledger, caller_site
from ._metrics import PoolMetrics
from ._settings import Settings, redact_text
from ._toomany import Backoff, Step, is_too_many_connections, limit_text, refusal_text

logger = logging.getLogger("poolguard")

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN
_IN_TRANSACTION = (TransactionStatus.INTRANS, TransactionStatus.INERROR)

# Every pool ever built in this process, so a fork can make all of them forget the parent's
# connections (see _forget_after_fork).
_all_pools: weakref.WeakSet[_PoolCore] = weakref.WeakSet()
# In a forked child, the parent's psycopg pools: kept referenced so that they are never garbage
# collected there (their __del__ would signal and join worker threads the child does not have).
_inherited: list[object] = []


class _PoolCore:
    """What GuardedPool and AsyncGuardedPool share: settings, ledger, metrics and decisions."""

    #: Extra psycopg.connect() arguments an adapter sets before the pool opens (the Django
    #: backend passes Django's adapters context, its cursor class and autocommit).
    connect_kwargs: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.name
        self.ledger = Ledger()
        self.metrics = PoolMetrics()
        self.events = Events(self.name, settings.on_event, settings.event_interval)
        self._closed = False
        self._full = Backoff(self.name, settings.max_size)
        self._guard = (
            SessionStateGuard(settings.guard)
            if settings.mode == "transaction" and settings.guard != "off"
            else None
        )
        _all_pools.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._inner_pool() else "not opened")
        return (
            f"<{type(self).__name__} {self.name!r} {self.settings.redacted_dsn!r} {state}, "
            f"{len(self.ledger)}/{self.settings.max_size} in use>"
        )

    def _inner_pool(
        self,
    ) -> psycopg_pool.ConnectionPool[Any] | psycopg_pool.AsyncConnectionPool[Any] | None:
        raise NotImplementedError

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pool without touching its sockets.

        Closing would send Terminate on sockets the parent still uses; psycopg itself never
        closes a connection that was opened by another process when it is garbage collected.
        """
        self.ledger = Ledger()
        self.metrics = PoolMetrics()
        self.events = Events(self.name, self.settings.on_event, self.settings.event_interval)
        self._full = Backoff(self.name, self.settings.max_size)

    def _inner_options(self, on_refused: Callable[..., Any]) -> dict[str, Any]:
        s = self.settings
        return {
            # _pg_on_refused: GuardedConnection.connect hands a refused attempt to the pool
            # (see _server_full); it never reaches libpq.
            "kwargs": {
                **self._connect_args(),
                **self.connect_kwargs,
                "_pg_on_refused": on_refused,
            },
            "min_size": s.min_size,
            "max_size": s.max_size,
            "timeout": s.timeout,
            "max_waiting": s.max_waiting,
            "max_idle": s.max_idle,
            "max_lifetime": s.max_lifetime,
            "name": f"poolguard:{s.name}",
            "open": False,
        }

    #: The ``options`` startup parameter that sets idle_in_transaction_session_timeout; None
    #: until first used, {} once a pooler refused it (see _options_refused).
    _startup: dict[str, str] | None = None

    def _connect_args(self) -> dict[str, Any]:
        if self._startup is None:
            self._startup = _watchdog.startup_options(self.settings)
        return {**self.settings.connection_kwargs(), **self._startup}

    def _options_refused(self, exc: Exception) -> bool:
        """The probe met a pooler that rejects ``options``: go on without it (docs/leaks.md)."""
        if self._startup is None or not _watchdog.options_rejected(exc):
            return False
        if not self._startup:  # a concurrent probe (async first use) already switched it off
            return True
        self._startup = {}
        logger.info(
            "pool %r: %s refuses the options startup parameter (PgBouncer before 1.20), so "
            "idle_in_transaction_session_timeout is not set per connection: set it for the "
            "role, or idle_transaction_timeout in pgbouncer.ini",
            self.name,
            self.settings.target,
        )
        return True

    def _target_conninfo(self) -> str:
        """Where connections go: the DSN, or the embedded rewriter in front of it."""
        if not self.settings.rewriter:
            return self.settings.conninfo
        from ._state import rewriter_dsn  # _state imports this module

        return rewriter_dsn(self.settings)

    def _connect_error(self, exc: Exception) -> PoolConnectError:
        if is_too_many_connections(exc):
            error = PoolConnectError(
                f"pool {self.name!r} cannot connect to {self.settings.target}: the server has no "
                f"connection slot left (SQLSTATE 53300, {limit_text(self._full.limits)}: "
                f"{refusal_text(exc)}); close idle connections elsewhere, lower max_size x "
                "processes, raise max_connections, or put PgBouncer in front (`poolguard "
                "doctor` shows the budget)"
            )
        else:
            message = redact_text(str(exc).strip(), self.settings.conninfo)
            error = PoolConnectError(
                f"pool {self.name!r} cannot connect to {self.settings.target}: {message} "
                "(check the host, port, user, password and database in the DSN)"
            )
        self.events.emit("connection_refused", str(error))
        return error

    def _probe_now(self, *, check_budget: bool = False) -> None:
        """Connect once outside the pool; raise PoolConnectError with the server's reason.

        At open (`check_budget`) the same connection checks the connection budget, before
        the pool opens any connection of its own.  Sync only: the async pool runs it in a
        thread, once per open.
        """
        try:
            conn = psycopg.connect(self._target_conninfo(), **self._connect_args())
        except psycopg.OperationalError as exc:
            if self._options_refused(exc):
                return self._probe_now(check_budget=check_budget)
            raise self._connect_error(exc) from None
        try:
            if check_budget:
                s = self.settings
                budget = check_budget_on_open(
                    conn,
                    pool_name=self.name,
                    max_size=s.max_size,
                    processes=s.processes,
                    application_name=s.application_name,
                    action=s.budget,
                )
                if budget is not None:  # kept to name the limit if the server refuses later
                    self._full.limits = budget.limits
        finally:
            conn.close()

    def _refused(
        self,
        exc: psycopg.OperationalError,
        inner: psycopg_pool.ConnectionPool[Any] | psycopg_pool.AsyncConnectionPool[Any] | None,
    ) -> Step | None:
        """A pool connect failed: the back-off step if the server is full (53300), else None."""
        if inner is None or self._closed or not is_too_many_connections(exc):
            return None
        live = inner.get_stats().get("pool_available", 0) + len(self.ledger)
        self.metrics.server_refusals += 1
        step = self._full.refused(exc, live, monotonic())
        if step is not None and step.cap is not None:
            self.events.emit("server_full", refusal_text(exc), cap=step.cap, retry_in=step.delay)
        return step

    def _closed_while_full(self) -> psycopg_pool.PoolClosed:
        # psycopg_pool logs it once (the attempt in flight at close), instead of the refusal.
        return psycopg_pool.PoolClosed(
            f"pool {self.name!r} was closed while it waited for a free server slot"
        )

    def _on_connect(self, conn: Tracked) -> None:
        conn._pg_attach(self.metrics, self._guard)
        self._full.connected()

    def _record_checkout(self, conn: Tracked, started: float, depth: int, owner: int) -> None:
        now = monotonic()
        self.metrics.wait_time.add(now - started)
        code, line = caller_site(depth + 1)
        self.ledger.out[id(conn)] = (now, owner, code, line, conn._pg_backend_pid, conn._pg_weak)

    def _record_return(self, conn: Tracked) -> Checkout | None:
        entry = self.ledger.out.pop(id(conn), None)
        if entry is None:
            if not isinstance(conn, Tracked):
                raise psycopg.ProgrammingError(
                    f"pool {self.name!r}: putconn() got a connection no poolguard pool gave out"
                )
            if _watchdog.returned_unknown(conn):  # reclaimed meanwhile: slot already free
                return None
            # Shelving it again would hand one connection to two callers.
            raise psycopg.ProgrammingError(
                f"pool {self.name!r}: putconn() got a connection that is not checked out "
                "(returned twice, or taken before os.fork() in the parent process)"
            )
        self.metrics.use_time.add(monotonic() - entry[0])
        return Checkout(id(conn), entry) if _needs_cleaning(conn) else None

    def _cleaning(self, conn: Tracked, record: Checkout) -> Generator[str, Exception | None, None]:
        """The return-path decisions for a connection that is not simply clean, written once.

        Yields the I/O each pool must do on ``conn`` ("rollback", "_pg_reset" or "close") and is
        sent back the psycopg error it raised, or None; GuardedPool and AsyncGuardedPool only
        run the steps, with and without ``await``.  A closed or busy connection is left to
        psycopg_pool, which discards it and opens a replacement.
        """
        status = conn.pgconn.transaction_status  # type: ignore[attr-defined]
        if status == _UNKNOWN:
            self._log_discard(record, "that was closed or broken")
            return
        if status in _IN_TRANSACTION:
            self._log_dirty_return(status, record)
            if (failed := (yield "rollback")) is not None:
                self._log_discard(record, f"whose rollback failed: {failed}")
                yield "close"
                return
        elif status != _IDLE:  # a query still running: psycopg_pool closes the connection
            self._log_discard(record, "returned while a query was still running")
            return
        if conn._pg_needs_reset():
            self.metrics.session_resets += 1
            if (failed := (yield "_pg_reset")) is not None:
                self._log_discard(record, f"whose reset failed: {failed}")
                yield "close"

    def _exhausted(self, timeout: float, pending: int) -> PoolExhausted:
        self.metrics.timeouts += 1
        self.metrics.wait_time.add(timeout)  # a wait that timed out is a wait: p99 must see it
        oldest = self.ledger.oldest()
        where = (
            f"; oldest checkout {oldest.age:.1f} s at {oldest.site} ({oldest.owner_name()})"
            if oldest
            else ""
        )
        error = PoolExhausted(
            f"pool {self.name!r} exhausted after {timeout:.1f} s: "
            f"{len(self.ledger)}/{self.settings.max_size} connections in use, "
            f"{pending} waiting{where} (raise max_size, or find the holder with poolguard.report())"
        )
        if self.events.hooks:
            site, age = (oldest.site, oldest.age) if oldest else (None, None)
            self.events.emit(
                "exhausted",
                str(error),
                site,
                age,
                in_use=len(self.ledger),
                max_size=self.settings.max_size,
                pending=pending,
            )
        return error

    def _log_dirty_return(self, status: int, record: Checkout) -> None:
        self.metrics.rollbacks_on_return += 1
        kind = "a failed" if status == TransactionStatus.INERROR else "an open"
        self.events.emit(
            "dirty_return",
            f"returned inside {kind} transaction; rolled back",
            record.site,
            record.age,
        )
        logger.warning(
            "pool %r: connection returned inside %s transaction (taken at %s, held %.2f s); "
            "rolled back",
            self.name,
            kind,
            record.site,
            record.age,
        )

    def _log_discard(self, record: Checkout, why: str) -> None:
        self.metrics.discarded_on_return += 1
        self.events.emit("discarded", f"discarding a connection {why}", record.site, record.age)
        logger.warning(
            "pool %r: discarding a connection %s (taken at %s)", self.name, why, record.site
        )

    def _timeout(self, timeout: float | None) -> float:
        return self.settings.timeout if timeout is None else timeout

    def stats(self) -> dict[str, Any]:
        """Current counts and timings under OpenTelemetry's ``db.client.connection.*`` names."""
        inner = self._inner_pool()
        raw = inner.get_stats() if inner is not None else {}
        used = len(self.ledger)
        snapshot = self.metrics.snapshot(
            name=self.name,
            idle=raw.get("pool_available", 0),
            used=used,
            max_size=self._full.cap or self.settings.max_size,  # lower while the server is full
            min_size=self.settings.min_size,
            pending=raw.get("requests_waiting", 0),
        )
        snapshot["poolguard.connection.capped"] = self._full.caps
        return snapshot

    def checkouts(self) -> list[Checkout]:
        """The connections out of the pool right now, oldest first."""
        return self.ledger.records()


def _block_end(conn: Any, exc_type: type[BaseException] | None) -> str | None:
    """What ``with pool.connection()`` does to ``conn`` as the block ends: "commit" on success,
    "rollback" on error, None when no transaction is open.

    Once closed the status is UNKNOWN; a connection the watchdog reclaimed still gets "commit",
    which raises ConnectionReclaimed: the block's work was lost, and the caller must know.
    """
    if conn.pgconn.transaction_status == _IDLE:
        return None
    if conn.closed and not (exc_type is None and conn._pg_reclaimed):
        return None
    return "commit" if exc_type is None else "rollback"


class _Checkout:
    """``with pool.connection() as conn``: commit on success, roll back on error, return."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: GuardedPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout

    def __enter__(self) -> psycopg.Connection[Any]:
        self._conn = conn = self._pool.getconn(self._timeout, _depth=2)
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        try:
            if step := _block_end(conn, exc_type):
                getattr(conn, step)()
        finally:
            self._pool.putconn(conn)


class GuardedPool(_PoolCore):
    """A process-wide, guarded pool of psycopg connections.  Build it with poolguard.configure()."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._inner: psycopg_pool.ConnectionPool[Any] | None = None
        self._open_lock = threading.Lock()
        #: Set by close(): ends a back-off wait at once (see _server_full).
        self._closing = threading.Event()

    def _inner_pool(self) -> psycopg_pool.ConnectionPool[Any] | None:
        return self._inner

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        _inherited.append(self._inner)
        self._inner = None
        self._open_lock = threading.Lock()
        self._closing = threading.Event()

    def open(self) -> None:
        """Connect now instead of on first use; raises PoolConnectError if the server refuses."""
        self._ensure_open()

    def _ensure_open(self) -> psycopg_pool.ConnectionPool[Any]:
        with self._open_lock:
            if self._closed:
                raise psycopg_pool.PoolClosed(f"pool {self.name!r} is closed")
            if self._inner is None:
                # One direct attempt first, so a wrong password or an unreachable host is an
                # immediate, precise error instead of a checkout timeout later.
                self._probe_now(check_budget=True)
                inner: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
                    self._target_conninfo(),
                    connection_class=GuardedConnection,
                    configure=self._on_connect,
                    check=psycopg_pool.ConnectionPool.check_connection
                    if self.settings.health_check
                    else None,
                    **self._inner_options(self._server_full),
                )
                inner.open(wait=False)
                self._inner = inner
                _watchdog.watch(self)
            return self._inner

    def _server_full(self, exc: psycopg.OperationalError) -> bool:
        """A pool worker's connect was refused: wait out a full server; True to retry now.

        Runs in the psycopg_pool worker that was growing the pool (or replacing a
        connection), which keeps that worker busy for the back-off: while it waits, psycopg_pool
        starts no other growth and callers queue for the connections the pool has.
        """
        inner = self._inner
        step = self._refused(exc, inner)
        if step is None or inner is None:
            return False
        if step.cap is not None:
            inner.resize(min(self.settings.min_size, step.cap), step.cap)
        if self._closing.wait(step.delay):
            raise self._closed_while_full()
        if self._full.lift(step):
            inner.resize(self.settings.min_size, self.settings.max_size)
        return True

    def connection(self, timeout: float | None = None) -> _Checkout:
        """``with pool.connection() as conn:`` commits on success and rolls back on error."""
        return _Checkout(self, timeout)

    def getconn(self, timeout: float | None = None, *, _depth: int = 1) -> psycopg.Connection[Any]:
        """Take a connection; hand it back with putconn().  Prefer connection()."""
        inner = self._inner or self._ensure_open()
        started = monotonic()
        try:
            conn: GuardedConnection = inner.getconn(timeout)
        except psycopg_pool.PoolTimeout:
            raw = inner.get_stats()
            if not raw.get("pool_size"):  # not one connection: the server is the problem
                self._probe_now()
            raise self._exhausted(self._timeout(timeout), raw.get("requests_waiting", 0)) from None
        self._record_checkout(conn, started, _depth + 1, threading.get_ident())
        return conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        """Give a connection back: roll back what is open, reset what changed, then pool it."""
        record = self._record_return(conn)  # type: ignore[arg-type]
        if record is not None:  # the rare path: something must be cleaned first
            self._clean(conn, record)  # type: ignore[arg-type]
        inner = self._inner
        if inner is not None and conn._pool is inner:
            inner.putconn(conn)
        else:
            conn.close()  # from before a fork, or from a pool that is gone

    def _clean(self, conn: GuardedConnection, record: Checkout) -> None:
        steps = self._cleaning(conn, record)
        step = next(steps, None)
        while step is not None:
            try:
                getattr(conn, step)()
                failed = None
            except psycopg.Error as exc:
                failed = exc
            step = _send(steps, failed)

    def close(self, timeout: float = 5.0) -> None:
        """Close every connection; connections still checked out are closed when returned."""
        with self._open_lock:
            self._closed = True
            inner, self._inner = self._inner, None
        self._closing.set()
        if inner is not None:
            inner.close(timeout)


class _AsyncCheckout:
    """``async with pool.connection() as conn``: commit on success, roll back on error, return."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: AsyncGuardedPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._conn = conn = await self._pool.getconn(self._timeout, _depth=2)
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        try:
            if step := _block_end(conn, exc_type):
                await getattr(conn, step)()
        finally:
            await self._pool.putconn(conn)


class AsyncGuardedPool(_PoolCore):
    """The asyncio twin of GuardedPool, bound to the event loop that first uses it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._inner: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        #: Set by close(): ends a back-off wait at once; made with each inner pool, on its loop.
        self._closing: asyncio.Event | None = None

    def _inner_pool(self) -> psycopg_pool.AsyncConnectionPool[Any] | None:
        return self._inner

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        _inherited.append(self._inner)
        self._inner = None
        self._loop = None
        self._opening = None

    async def open(self) -> None:
        """Connect now instead of on first use; raises PoolConnectError if the server refuses."""
        await self._ensure_open()

    async def _ensure_open(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise psycopg_pool.PoolClosed(f"pool {self.name!r} is closed")
        if self._inner is not None and self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise psycopg.InterfaceError(
                    f"async pool {self.name!r} belongs to another running event loop: use it "
                    "from that loop, or give each loop its own pool name"
                )
            self._inner = None  # its loop is gone, and its connections with it
        if self._inner is None:
            # One opener per loop: twenty tasks arriving at once probe and check the budget once.
            if self._opening is None or self._opening[0] is not loop:
                self._opening = (loop, asyncio.Lock())
            async with self._opening[1]:
                if self._inner is None:
                    await self._open_in(loop)
        assert self._inner is not None
        return self._inner

    async def _open_in(self, loop: asyncio.AbstractEventLoop) -> None:
        await asyncio.to_thread(self._probe_now, check_budget=True)
        inner: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            self._target_conninfo(),
            connection_class=AsyncGuardedConnection,
            configure=self._on_connect_async,
            check=psycopg_pool.AsyncConnectionPool.check_connection
            if self.settings.health_check
            else None,
            **self._inner_options(self._server_full),
        )
        self._closing = asyncio.Event()
        await inner.open(wait=False)
        self._inner, self._loop = inner, loop
        _watchdog.watch(self)

    async def _server_full(self, exc: psycopg.OperationalError) -> bool:
        """The async twin of GuardedPool._server_full."""
        inner, closing = self._inner, self._closing
        step = self._refused(exc, inner)
        if step is None or inner is None or closing is None:
            return False
        if step.cap is not None:
            await inner.resize(min(self.settings.min_size, step.cap), step.cap)
        try:
            await asyncio.wait_for(closing.wait(), step.delay)
        except TimeoutError:
            pass
        else:
            raise self._closed_while_full()
        if self._full.lift(step):
            await inner.resize(self.settings.min_size, self.settings.max_size)
        return True

    async def _on_connect_async(self, conn: AsyncGuardedConnection) -> None:
        self._on_connect(conn)

    def connection(self, timeout: float | None = None) -> _AsyncCheckout:
        """``async with pool.connection() as conn:`` commits on success, rolls back on error."""
        return _AsyncCheckout(self, timeout)

    async def getconn(
        self, timeout: float | None = None, *, _depth: int = 1
    ) -> psycopg.AsyncConnection[Any]:
        """Take a connection; hand it back with putconn().  Prefer connection()."""
        inner = self._inner
        if inner is None or self._loop is not asyncio.get_running_loop():
            inner = await self._ensure_open()
        started = monotonic()
        try:
            conn: AsyncGuardedConnection = await inner.getconn(timeout)
        except psycopg_pool.PoolTimeout:
            raw = inner.get_stats()
            if not raw.get("pool_size"):  # not one connection: the server is the problem
                await asyncio.to_thread(self._probe_now)
            raise self._exhausted(self._timeout(timeout), raw.get("requests_waiting", 0)) from None
        self._record_checkout(conn, started, _depth + 1, id(asyncio.current_task()))
        return conn

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give a connection back: roll back what is open, reset what changed, then pool it."""
        record = self._record_return(conn)  # type: ignore[arg-type]
        if record is not None:  # the rare path: something must be cleaned first
            await self._clean(conn, record)  # type: ignore[arg-type]
        inner = self._inner
        if inner is not None and conn._pool is inner:
            await inner.putconn(conn)
        else:
            await conn.close()

    async def _clean(self, conn: AsyncGuardedConnection, record: Checkout) -> None:
        steps = self._cleaning(conn, record)
        step = next(steps, None)
        while step is not None:
            try:
                await getattr(conn, step)()
                failed = None
            except psycopg.Error as exc:
                failed = exc
            step = _send(steps, failed)

    async def close(self, timeout: float = 5.0) -> None:
        """Close every connection; connections still checked out are closed when returned."""
        self._closed = True
        inner, self._inner = self._inner, None
        if self._closing is not None:
            self._closing.set()
        if inner is not None:
            await inner.close(timeout)


def _send(steps: Generator[str, Exception | None, None], failed: Exception | None) -> str | None:
    """Tell a _cleaning() generator how its last step went; its next step, or None when done."""
    try:
        return steps.send(failed)
    except StopIteration:
        return None


def _forget_all_after_fork() -> None:
    for pool in list(_all_pools):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)


def live_pools() -> list[_PoolCore]:
    """Every pool of this process that is not closed, of every flavor (what exporters read)."""
    return [pool for pool in list(_all_pools) if not pool._closed]
