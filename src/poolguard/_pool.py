"""GuardedPool and AsyncGuardedPool: psycopg_pool pools with a ledger, metrics and a clean return.

The decisions (what to log, when a connection is dirty, how to word an error) live once in
``PoolCore``; the two public classes only do the I/O, one with ``await`` and one without.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Generator, Mapping
from time import monotonic
from types import MappingProxyType, TracebackType
from typing import Any, Literal, cast

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

from ._budget import check_budget_on_open
from ._connection import (
    AsyncGuardedConnection,
    GuardedConnection,
    Tracked,
    last_statement,
    mark_reclaimed,
    needs_cleaning,
    release_slot,
)
from ._errors import PoolConnectError, PoolExhausted
from ._events import Events
from ._guard import SessionStateGuard
from ._ledger import TAKEN_AT, Checkout, Ledger, caller_site
from ._metrics import PoolMetrics
from ._outage import RETRY_CAP, Outage
from ._redact import redact_text
from ._retry import AsyncRetryingCursor, RetryingCursor
from ._route import (
    DIRECT_CHECK_SQL,
    Route,
    RouteState,
    announced_elsewhere,
    find_route,
    rewriter_route,
)
from ._settings import Settings
from ._slots import Slots
from ._startup import options_rejected, startup_options
from ._toomany import Backoff, Step, is_too_many_connections, limit_text, refusal_text

logger = logging.getLogger("poolguard")

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN
_IN_TRANSACTION = (TransactionStatus.INTRANS, TransactionStatus.INERROR)

# Every pool ever built in this process, so a fork can make all of them forget the parent's
# connections (see _forget_after_fork).
_all_pools: weakref.WeakSet[PoolCore] = weakref.WeakSet()
# In a forked child, the parent's psycopg pools: kept referenced so that they are never garbage
# collected there (their __del__ would signal and join worker threads the child does not have).
_inherited: list[object] = []
# Arbitrates a reclaim (the watchdog's decision, see reclaim()) against a racing putconn() by
# the holder: one of them takes the checkout, the other sees it gone.
_reclaiming = threading.Lock()


class PoolCore:
    """What GuardedPool and AsyncGuardedPool share: settings, ledger, metrics and decisions."""

    #: Extra psycopg.connect() arguments an adapter sets before the pool opens (the Django
    #: backend passes Django's adapters context, its cursor class and autocommit).
    connect_kwargs: Mapping[str, Any] = MappingProxyType({})

    def __init__(
        self,
        settings: Settings,
        *,
        slots: Slots | None = None,
        target: Callable[[Settings], str] | None = None,
        routes: RouteState | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.ledger = Ledger()
        self.metrics = PoolMetrics()
        self.events = Events(self.name, settings.on_event, settings.event_interval)
        self._closed = False
        #: The budget shared with the other flavors of this name (a private one when built
        #: outside poolguard's registry).
        self.slots = slots if slots is not None else Slots(settings.name, settings.max_size)
        self.slots.join(self)
        self._target = target
        self._fresh_state()
        self._full = Backoff(self.name, settings.max_size)
        self._outage = Outage()
        #: The mode connections run in now, shared by the flavors of a name (mode="auto"
        #: decides it at open; see _route.py).
        self.routes = routes if routes is not None else RouteState(settings.name, settings.mode)
        if self.routes.guard is None and settings.guard != "off":
            self.routes.guard = SessionStateGuard(settings.guard)
        _all_pools.add(self)

    @property
    def route(self) -> Route | None:
        """What mode="auto" found the path to PostgreSQL to be, and why (else None)."""
        return self.routes.route

    @property
    def effective_mode(self) -> str:
        """The mode the pool's connections use now, "session" or "transaction".  Adapters
        read it (server-side cursors, statement caches) rather than ``settings.mode``."""
        return self.routes.mode

    @property
    def _guard(self) -> SessionStateGuard | None:
        guard: SessionStateGuard | None = self.routes.guard
        return guard if self.routes.mode == "transaction" else None

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

    @property
    def closed(self) -> bool:
        """True once close() was called: the registry builds a new pool on next use."""
        return self._closed

    def is_closed(self) -> bool:
        return self._closed

    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop an async flavor is bound to (None for a sync pool)."""
        return None

    def close(self, timeout: float = 5.0) -> Any:
        """Close every connection (a coroutine for the async flavors)."""
        raise NotImplementedError

    def release_idle(self) -> None:
        """Close one idle connection soon, for another flavor of the name (see _slots.py)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Close without I/O (its event loop is gone or not running): connections die with it."""
        self._closed = True

    def is_open(self) -> bool:
        """Whether the pool has opened (and not closed): it may hold connections now."""
        return not self._closed and self._inner_pool() is not None

    def _pending(self, raw: Mapping[str, int]) -> int:
        """Callers waiting for a connection now."""
        return raw.get("requests_waiting", 0)

    def _ready_count(self) -> int:
        """Idle connections the pool keeps outside psycopg_pool (GuardedPool's _ready)."""
        return 0

    def tidy(self) -> None:
        """Called by the watchdog every tick (see GuardedPool.tidy)."""

    def has_demand(self) -> bool:
        inner = self._inner_pool()
        return inner is not None and bool(self._pending(inner.get_stats()))

    def set_connect_kwargs(self, kwargs: Mapping[str, Any]) -> bool:
        """Extra psycopg.connect() arguments (an adapter's); False if the pool is open already,
        which keeps the arguments its connections were made with."""
        if self._inner_pool() is not None:
            return False
        self.connect_kwargs = MappingProxyType(dict(kwargs))
        return True

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pool without touching its sockets.

        Closing would send Terminate on sockets the parent still uses; psycopg itself never
        closes a connection that was opened by another process when it is garbage collected.
        """
        self.ledger = Ledger()
        self.metrics = PoolMetrics()
        self.events = Events(self.name, self.settings.on_event, self.settings.event_interval)
        self._full = Backoff(self.name, self.settings.max_size)
        self._outage = Outage()
        self._fresh_state()

    def _fresh_state(self) -> None:
        """A flavor's own state, new (at construction, and in a forked child)."""

    def _inner_options(self, on_refused: Callable[..., Any]) -> dict[str, Any]:
        s = self.settings
        return {
            # _pg_on_refused: GuardedConnection.connect hands a refused attempt to the pool
            # (see _server_full); it never reaches libpq.
            "kwargs": {
                **self._connect_args(),
                **self._cursor_args(),
                **self.connect_kwargs,
                "_pg_on_refused": on_refused,
                "_pg_slot": (self.slots, self),
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
            self._startup = startup_options(self.settings)
        args = {**self.settings.connection_kwargs(), **self._startup}
        if self.routes.auto and self.routes.mode == "transaction":
            args["prepare_threshold"] = None  # undecided, or a pooler: no prepared statements
        return args

    #: The cursor class of a pool whose connections may prepare statements (see _retry.py).
    _retrying_cursor: type = RetryingCursor

    def _cursor_args(self) -> dict[str, Any]:
        if self.settings.prepare_threshold is None:
            return {}
        return {"cursor_factory": self._retrying_cursor}

    def _options_refused(self, exc: Exception) -> bool:
        """The probe met a pooler that rejects ``options``: go on without it (docs/leaks.md)."""
        if self._startup is None or not options_rejected(exc):
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
        if self._target is None:
            return self.settings.conninfo
        return self._target(self.settings)

    def _connect_error(self, exc: BaseException) -> PoolConnectError:
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
        thread, once per open.  It takes a slot of the budget like any connection; with none
        free, other flavors of the name are connected, so there is nothing to learn.
        """
        if not self.slots.take_now():
            return None
        try:
            conn = psycopg.connect(self._target_conninfo(), **self._connect_args())
        except psycopg.OperationalError as exc:
            self.slots.give()
            if self._options_refused(exc):
                return self._probe_now(check_budget=check_budget)
            raise self._connect_error(exc) from None
        except BaseException:
            self.slots.give()
            raise
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
                if self.routes.auto:
                    self.routes.decided(self._find_route(conn))
        finally:
            conn.close()
            self.slots.give()

    def _refused(
        self,
        exc: psycopg.OperationalError,
        inner: psycopg_pool.ConnectionPool[Any] | psycopg_pool.AsyncConnectionPool[Any] | None,
    ) -> Step | None:
        """A pool connect failed: the step before the same attempt retries, or None to fail it.

        A full server (53300) with connections to serve from caps the pool (see _toomany);
        any other failure is an outage (see _outage): remembered for the callers that time
        out meanwhile, and retried within a second so the pool is back soon after the server.
        """
        if inner is None or self._closed:
            return None
        if is_too_many_connections(exc):
            self.metrics.server_refusals += 1
            live = (
                inner.get_stats().get("pool_available", 0) + self._ready_count() + len(self.ledger)
            )
            if (step := self._full.refused(exc, live, monotonic())) is not None:
                if step.cap is not None:
                    self.events.emit(
                        "server_full", refusal_text(exc), cap=step.cap, retry_in=step.delay
                    )
                return step
        delay, first = self._outage.failed(exc, monotonic())
        if first:
            logger.warning("%s; retrying every %g s at most", self._connect_error(exc), RETRY_CAP)
        return Step(delay, None, 0)

    def _closed_while_full(self) -> psycopg_pool.PoolClosed:
        # psycopg_pool logs it once (the attempt in flight at close), instead of the refusal.
        return psycopg_pool.PoolClosed(
            f"pool {self.name!r} was closed while it waited to connect "
            "(the server was full or did not answer)"
        )

    def _find_route(self, conn: psycopg.Connection[Any]) -> Route:
        if self.settings.rewriter:
            return rewriter_route()
        try:
            return find_route(conn, self._target_conninfo())
        except psycopg.Error as exc:
            return Route("unknown", (f"the probe failed ({type(exc).__name__}): assumed a pooler",))

    def _direct_check_due(self) -> bool:
        """Each new connection of an auto pool that found PostgreSQL itself is checked."""
        route = self.routes.route
        return route is not None and route.path == "direct" and self.routes.mode == "session"

    def _checked_direct(self, conn: Tracked, server_pid: object) -> None:
        announced = conn.pgconn.backend_pid  # type: ignore[attr-defined]
        if announced_elsewhere(announced, server_pid):
            self.routes.switch(
                f"a new connection announced backend pid {announced} but the server process "
                f"is {server_pid}: a pooler now answers at {self.settings.target}"
            )

    def _attach(self, conn: Tracked) -> None:
        if self.routes.switched:
            cast(Any, conn).prepare_threshold = None
        conn.pg_routes = self.routes
        conn.pg_attach(self, self.metrics, self._guard)
        self._full.connected()
        if (down := self._outage.connected(monotonic())) is not None:
            logger.info("pool %r: connected again after %.1f s", self.name, down)

    def _demote(self, conn: Tracked) -> None:
        """The first checkout of a connection since the pool switched to transaction mode."""
        if cast(Any, conn).prepare_threshold is not None:
            conn.pg_demote()

    def _record_checkout(self, conn: Tracked, started: float, depth: int, owner: int) -> None:
        now = monotonic()
        self.metrics.wait_time.add(now - started)
        code, line = caller_site(depth + 1)
        self.ledger.take(id(conn), now, owner, code, line, conn.pg_backend_pid, conn.pg_weak)

    def _record_return(self, conn: Tracked) -> Checkout | Literal[False] | None:
        """The checkout ``conn`` ends; None when it goes straight back, the record when it must
        be cleaned first, False when poolguard reclaimed it meanwhile (nothing left to do)."""
        entry = self.ledger.give_back(id(conn))
        if entry is None:
            if not isinstance(conn, Tracked):
                raise psycopg.ProgrammingError(
                    f"pool {self.name!r}: putconn() got a connection no poolguard pool gave out"
                )
            if self._returned_reclaimed(conn):  # its slot is free already
                return False
            # Shelving it again would hand one connection to two callers.
            raise psycopg.ProgrammingError(
                f"pool {self.name!r}: putconn() got a connection that is not checked out "
                "(returned twice, or taken before os.fork() in the parent process)"
            )
        self.metrics.use_time.add(monotonic() - entry[TAKEN_AT])
        return Checkout(id(conn), entry) if needs_cleaning(conn) else None

    def _returned_reclaimed(self, conn: Tracked) -> bool:
        """putconn() found no checkout: whether poolguard reclaimed it (then accept it quietly;
        False means the caller has a bug).  The lock waits out a reclaim in progress."""
        with _reclaiming:
            reclaimed = conn.pg_reclaimed
        if reclaimed:
            logger.info("a reclaimed connection was returned by its holder (%s)", reclaimed)
        return bool(reclaimed)

    # --- what the watchdog asks of a pool (it decides, the pool does the I/O) ---------------

    #: Whether checkouts belong to asyncio tasks (else to threads).
    is_async = False

    def conn_status(self, conn: Any) -> int:
        """The connection's transaction status (psycopg.pq.TransactionStatus)."""
        return int(conn.pgconn.transaction_status)

    def conn_last_active(self, conn: Any) -> float:
        """When the connection last sent a statement (monotonic)."""
        return float(conn.pg_last_active)

    def conn_statement(self, conn: Any) -> str:
        """The last statement, shortened and masked, for reports."""
        return last_statement(conn)

    def reclaim(self, record: Checkout, message: str, claimed: Callable[[], None]) -> None:
        """Take a checked-out connection back from its holder: close it and free its slot.

        Nothing happens if a statement is running or the holder returns it first; otherwise
        ``claimed()`` runs once the checkout is the pool's, and every later use by the holder
        raises ConnectionReclaimed(``message``).
        """
        raise NotImplementedError

    def drop_lost(self, conn: Any) -> None:
        """Close a connection that was garbage-collected while checked out; free its slot."""
        raise NotImplementedError

    def _claim(self, conn: Any, record: Checkout, message: str) -> bool:
        """Take ``record`` from under its holder (``_reclaiming`` held): putconn() or we win."""
        if self.conn_status(conn) == TransactionStatus.ACTIVE:
            return False
        if not self.ledger.claim(record):
            return False  # returned (and maybe taken again) meanwhile
        mark_reclaimed(conn, message)
        return True

    def _cleaning(
        self, conn: Tracked, record: Checkout, raised: BaseException | None = None
    ) -> Generator[str, Exception | None, None]:
        """The return-path decisions for a connection that is not simply clean, written once.

        Yields the I/O each pool must do on ``conn`` ("rollback", "pg_reset" or "close") and is
        sent back the psycopg error it raised, or None; GuardedPool and AsyncGuardedPool only
        run the steps, with and without ``await``.  A closed or busy connection is left to
        psycopg_pool, which discards it and opens a replacement.  ``raised``: the exception
        that ended a ``with`` block, whose rollback is the normal path, not a misuse; it is
        never replaced, so a failed rollback is only logged.
        """
        status = conn.pgconn.transaction_status  # type: ignore[attr-defined]
        if status == _UNKNOWN:
            self._log_discard(record, "that was closed or broken", raised)
            release_slot(conn)
            return
        if status in _IN_TRANSACTION:
            if raised is None:
                self._log_dirty_return(status, record)
            if (failed := (yield "rollback")) is not None:
                self._log_discard(record, f"whose rollback failed: {failed}", raised)
                yield "close"
                return
        elif status != _IDLE:  # a query still running: psycopg_pool closes the connection
            self._log_discard(record, "returned while a query was still running", raised)
            return
        if conn.pg_needs_reset():
            self.metrics.session_resets += 1
            if (failed := (yield "pg_reset")) is not None:
                self._log_discard(record, f"whose reset failed: {failed}", raised)
                yield "close"

    def _timed_out(self, timeout: float, pending: int) -> PoolExhausted | PoolConnectError:
        """A caller waited ``timeout`` s in vain: why, as the exception to raise.

        PoolExhausted only when every connection the pool may have is checked out; otherwise
        the pool could not open one, and the caller learns why (no I/O here: the reason is the
        pool's own last failed attempt).
        """
        if len(self.ledger) >= (self._full.cap or self.settings.max_size):
            return self._exhausted(timeout, pending)
        if (reason := self._outage.reason) is not None:
            self._count_timeout(timeout)
            return self._connect_error(reason)
        if self.slots.free() <= 0:  # the name's budget is held by its other flavors
            return self._exhausted(timeout, pending)
        self._count_timeout(timeout)
        return PoolConnectError(
            f"pool {self.name!r} got no connection within {timeout:.1f} s: "
            f"{len(self.ledger)}/{self.settings.max_size} in use, and opening a new one to "
            f"{self.settings.target} has not finished (the server is slow or does not answer; "
            f"connect_timeout={self.settings.connect_timeout:g} s, see docs/settings.md)"
        )

    def _count_timeout(self, timeout: float) -> None:
        self.metrics.timeouts += 1
        self.metrics.wait_time.add(timeout)  # a wait that timed out is a wait: p99 must see it

    def _exhausted(self, timeout: float, pending: int) -> PoolExhausted:
        self._count_timeout(timeout)
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

    def _log_discard(self, record: Checkout, why: str, raised: BaseException | None = None) -> None:
        self.metrics.discarded_on_return += 1
        self.events.emit("discarded", f"discarding a connection {why}", record.site, record.age)
        after = f"; the block's {type(raised).__name__} propagates" if raised is not None else ""
        logger.warning(
            "pool %r: discarding a connection %s (taken at %s)%s",
            self.name,
            redact_text(why, self.settings.conninfo),
            record.site,
            after,
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
            idle=raw.get("pool_available", 0) + self._ready_count(),
            used=used,
            max_size=self._full.cap or self.settings.max_size,  # lower while the server is full
            min_size=self.settings.min_size,
            pending=self._pending(raw),
        )
        snapshot["poolguard.connection.capped"] = self._full.caps
        snapshot["poolguard.mode"] = self.routes.as_dict()
        return snapshot

    def checkouts(self) -> list[Checkout]:
        """The connections out of the pool right now, oldest first."""
        return self.ledger.records()


def _block_end(conn: Any, exc_type: type[BaseException] | None) -> str | None:
    """What ``with pool.connection()`` does to ``conn`` as the block ends: "commit" on success,
    None when no transaction is open or when the block raised.

    A block that raised is rolled back by putconn(), which logs a failed rollback and discards
    the connection instead of raising: the block's own exception must reach the caller (a
    signal handler's deadline mid-query would otherwise come back as "another command is
    already in progress").  Once closed the status is UNKNOWN; a connection the watchdog
    reclaimed still gets "commit", which raises ConnectionReclaimed: the block's work was lost,
    and the caller must know.  A failed commit raises too.
    """
    if exc_type is not None or conn.pgconn.transaction_status == _IDLE:
        return None
    if conn.closed and not conn.pg_reclaimed:
        return None
    return "commit"


class CheckoutBlock:
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
            self._pool.putconn(conn, _raised=exc)


def _retire(conn: Any) -> None:
    """Make psycopg_pool close ``conn`` when it comes back instead of keeping it idle.

    psycopg_pool has no public call for "close this one": a connection past its lifetime is
    the one it closes quietly (INFO) on return, so the budget slot goes to another flavor.
    """
    conn._expire_at = 0.0


def _wait_for_min_size(slots: Slots, min_size: int) -> bool:
    """Open a pool waiting for min_size connections only when the budget has them free now
    (another flavor may hold the slots; the pool then grows when they come back)."""
    return 0 < min_size <= slots.free()


class GuardedPool(PoolCore):
    """A process-wide, guarded pool of psycopg connections.  Build it with poolguard.configure()."""

    def _fresh_state(self) -> None:
        self._inner: psycopg_pool.ConnectionPool[Any] | None = None
        self._open_lock = threading.Lock()
        #: Clean connections returned since the watchdog's last tick, handed out again first
        #: (LIFO) without a round trip through psycopg_pool, which counts them as checked
        #: out meanwhile; tidy() gives them back to it every tick.
        self._ready: list[GuardedConnection] = []
        #: Callers waiting in psycopg_pool's getconn(): a return goes to them, not to _ready.
        self._inner_waiters = 0
        self._waiters_lock = threading.Lock()
        #: Set by close(): ends a back-off wait at once (see _server_full).
        self._closing = threading.Event()

    def _inner_pool(self) -> psycopg_pool.ConnectionPool[Any] | None:
        return self._inner

    def _ready_count(self) -> int:
        return len(self._ready)

    def _pending(self, raw: Mapping[str, int]) -> int:
        # psycopg_pool's requests_waiting keeps a caller that timed out until a connection is
        # returned to it, which _ready may delay for a watchdog tick: count live callers.
        return self._inner_waiters

    def _forget_after_fork(self) -> None:
        _inherited.extend((self._inner, self._ready))
        super()._forget_after_fork()

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
                # Waiting for min_size makes the first checkout use the connection the pool
                # opened, rather than find the pool empty and grow it past min_size.
                if _wait_for_min_size(self.slots, self.settings.min_size):
                    # A slow server or a busy budget: getconn() waits as usual.
                    with contextlib.suppress(psycopg_pool.PoolTimeout):
                        inner.open(wait=True, timeout=self.settings.timeout)
                else:
                    inner.open(wait=False)
                self._inner = inner
            return self._inner

    def release_idle(self) -> None:
        inner = self._inner
        if inner is None:
            return
        self.tidy()
        if inner.get_stats().get("pool_available"):
            threading.Thread(
                target=self._release_one, args=(inner,), name="poolguard-release", daemon=True
            ).start()

    def _release_one(self, inner: psycopg_pool.ConnectionPool[Any]) -> None:
        try:  # an idle one or nothing: a wait would start the pool growing
            conn = inner.getconn(timeout=0.001)
        except psycopg.Error:  # PoolTimeout: none idle after all
            return
        _retire(conn)
        inner.putconn(conn)

    def _server_full(self, exc: psycopg.OperationalError) -> bool:
        """A pool worker's connect failed: wait out a full or unreachable server; True to retry.

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

    def _on_connect(self, conn: GuardedConnection) -> None:
        if self._direct_check_due():
            autocommit = conn.autocommit
            conn.autocommit = True  # no BEGIN: one round trip, the connection left idle
            try:
                row = psycopg.Cursor(conn).execute(DIRECT_CHECK_SQL, prepare=False).fetchone()
            finally:
                conn.autocommit = autocommit
            self._checked_direct(conn, row[0] if row else None)
        self._attach(conn)

    def connection(self, timeout: float | None = None) -> CheckoutBlock:
        """``with pool.connection() as conn:`` commits on success and rolls back on error."""
        return CheckoutBlock(self, timeout)

    def getconn(self, timeout: float | None = None, *, _depth: int = 1) -> psycopg.Connection[Any]:
        """Take a connection; hand it back with putconn().  Prefer connection()."""
        started = monotonic()
        try:
            conn = self._ready.pop()
        except IndexError:
            conn = self._from_inner(timeout)
        if self.routes.switched:
            self._demote(conn)
        self._record_checkout(conn, started, _depth + 1, threading.get_ident())
        return conn

    def _from_inner(self, timeout: float | None) -> GuardedConnection:
        inner = self._inner or self._ensure_open()
        with self._waiters_lock:
            self._inner_waiters += 1
        try:
            # Checked again now that putconn() can see this caller: a connection it put in
            # _ready before is taken here, one it puts there after goes to psycopg_pool.
            try:
                return self._ready.pop()
            except IndexError:
                pass
            try:
                conn: GuardedConnection = inner.getconn(timeout)
            except psycopg_pool.PoolTimeout:
                pending = self._pending(inner.get_stats())
                raise self._timed_out(self._timeout(timeout), pending) from None
            return conn
        finally:
            with self._waiters_lock:
                self._inner_waiters -= 1

    def putconn(
        self, conn: psycopg.Connection[Any], *, _raised: BaseException | None = None
    ) -> None:
        """Give a connection back: roll back what is open, reset what changed, then pool it."""
        record = self._record_return(conn)  # type: ignore[arg-type]
        if record is not None:  # the rare path: something must be cleaned first
            if record is False:
                return
            self._clean(conn, record, _raised)  # type: ignore[arg-type]
            self._to_inner(conn)
        elif self.slots.waiting and self.slots.pressure(self):
            _retire(conn)
            self._to_inner(conn)
        elif self._closed or not self._use_ready:
            self._to_inner(conn)
        else:
            self._ready.append(conn)  # type: ignore[arg-type]
            if self._inner_waiters:  # a caller started waiting in psycopg_pool meanwhile
                self._hand_over()

    def _hand_over(self) -> None:
        """Move one connection from _ready to psycopg_pool, for a caller waiting there."""
        try:
            conn = self._ready.pop()
        except IndexError:
            return  # the caller found it in _ready itself
        self._to_inner(conn)

    @property
    def _use_ready(self) -> bool:
        # psycopg_pool checks a connection on each checkout when health_check is on: every
        # checkout goes through it then.
        return not self.settings.health_check

    def tidy(self) -> None:
        """Give the connections in _ready back to psycopg_pool (the watchdog, every tick), so
        its max_lifetime, max_idle and statistics apply to them."""
        while True:
            try:
                conn = self._ready.pop()
            except IndexError:
                return
            self._to_inner(conn)

    def _to_inner(self, conn: psycopg.Connection[Any]) -> None:
        inner = self._inner
        if inner is None:
            conn.close()  # the pool is closed
            return
        try:
            inner.putconn(conn)
        except ValueError:  # psycopg_pool: not one of its connections (a pool closed since)
            conn.close()

    def reclaim(self, record: Checkout, message: str, claimed: Callable[[], None]) -> None:
        conn = record.connection()
        if conn is None:
            return
        lock: threading.Lock = conn.lock
        if not lock.acquire(blocking=False):
            return  # a statement is running: not idle after all, look again next tick
        try:
            with _reclaiming:  # held until the slot is back: a racing putconn() waits for it
                if not self._claim(conn, record, message):
                    return
                claimed()
                self.drop_lost(conn)
        finally:
            lock.release()

    def drop_lost(self, conn: Any) -> None:
        conn.close()  # psycopg_pool then opens a replacement
        self._to_inner(conn)

    def _clean(
        self, conn: GuardedConnection, record: Checkout, raised: BaseException | None
    ) -> None:
        steps = self._cleaning(conn, record, raised)
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
            self.tidy()
            inner, self._inner = self._inner, None
        self._closing.set()
        if inner is not None:
            inner.close(timeout)


class AsyncCheckoutBlock:
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
            await self._pool.putconn(conn, _raised=exc)


class AsyncGuardedPool(PoolCore):
    """The asyncio twin of GuardedPool, bound to the event loop that first uses it."""

    def _fresh_state(self) -> None:
        self._inner: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        #: Set by close(): ends a back-off wait at once; made with each inner pool, on its loop.
        self._closing: asyncio.Event | None = None

    def _inner_pool(self) -> psycopg_pool.AsyncConnectionPool[Any] | None:
        return self._inner

    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def abandon(self) -> None:
        self._closed = True
        _inherited.append(self._inner)  # never closed from here: its loop cannot run it
        self._inner = None

    def _forget_after_fork(self) -> None:
        _inherited.append(self._inner)
        super()._forget_after_fork()

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
        if _wait_for_min_size(self.slots, self.settings.min_size):
            with contextlib.suppress(psycopg_pool.PoolTimeout):
                await inner.open(wait=True, timeout=self.settings.timeout)
        else:
            await inner.open(wait=False)
        self._inner, self._loop = inner, loop

    def release_idle(self) -> None:
        inner, loop = self._inner, self._loop
        if inner is not None and loop is not None and inner.get_stats().get("pool_available"):
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                asyncio.run_coroutine_threadsafe(self._release_one(inner), loop)

    async def _release_one(self, inner: psycopg_pool.AsyncConnectionPool[Any]) -> None:
        try:
            conn = await inner.getconn(timeout=0.001)
        except psycopg.Error:  # PoolTimeout: none idle after all
            return
        _retire(conn)
        await inner.putconn(conn)

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

    _retrying_cursor = AsyncRetryingCursor

    async def _on_connect_async(self, conn: AsyncGuardedConnection) -> None:
        if self._direct_check_due():
            autocommit = conn.autocommit
            await conn.set_autocommit(True)
            try:
                cur = await psycopg.AsyncCursor(conn).execute(DIRECT_CHECK_SQL, prepare=False)
                row = await cur.fetchone()
            finally:
                await conn.set_autocommit(autocommit)
            self._checked_direct(conn, row[0] if row else None)
        self._attach(conn)

    def connection(self, timeout: float | None = None) -> AsyncCheckoutBlock:
        """``async with pool.connection() as conn:`` commits on success, rolls back on error."""
        return AsyncCheckoutBlock(self, timeout)

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
            pending = self._pending(inner.get_stats())
            raise self._timed_out(self._timeout(timeout), pending) from None
        if self.routes.switched:
            self._demote(conn)
        self._record_checkout(conn, started, _depth + 1, id(asyncio.current_task()))
        return conn

    async def putconn(
        self, conn: psycopg.AsyncConnection[Any], *, _raised: BaseException | None = None
    ) -> None:
        """Give a connection back: roll back what is open, reset what changed, then pool it."""
        record = self._record_return(conn)  # type: ignore[arg-type]
        if record is not None:  # the rare path: something must be cleaned first
            if record is False:
                return
            await self._clean(conn, record, _raised)  # type: ignore[arg-type]
        if self.slots.waiting and self.slots.pressure(self):
            _retire(conn)
        await self._to_inner(conn)

    async def _to_inner(self, conn: psycopg.AsyncConnection[Any]) -> None:
        inner = self._inner
        if inner is None:
            await conn.close()
            return
        try:
            await inner.putconn(conn)
        except ValueError:  # psycopg_pool: not one of its connections (a pool closed since)
            await conn.close()

    is_async = True

    def reclaim(self, record: Checkout, message: str, claimed: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                asyncio.run_coroutine_threadsafe(self._reclaim(record, message, claimed), loop)

    async def _reclaim(self, record: Checkout, message: str, claimed: Callable[[], None]) -> None:
        # On the pool's event loop: everything up to the first await runs without the holder.
        conn = record.connection()
        if conn is None or conn.lock.locked():
            return
        with _reclaiming:
            if not self._claim(conn, record, message):
                return
        claimed()
        await self._close_and_return(conn)

    async def _close_and_return(self, conn: Any) -> None:
        await conn.close()
        await self._to_inner(conn)

    def drop_lost(self, conn: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self._close_and_return(conn), loop)
                return
        conn.pgconn.finish()  # its loop is gone, and its pool with it
        release_slot(conn)

    async def _clean(
        self, conn: AsyncGuardedConnection, record: Checkout, raised: BaseException | None
    ) -> None:
        steps = self._cleaning(conn, record, raised)
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


def forget_all_after_fork() -> None:
    """In a forked child (called by _state's fork handler): every pool drops the parent's
    connections without touching their sockets."""
    for pool in list(_all_pools):
        pool._forget_after_fork()


def live_pools() -> list[PoolCore]:
    """Every pool of this process that is not closed, of every flavor (what exporters read)."""
    return [pool for pool in list(_all_pools) if not pool._closed]
