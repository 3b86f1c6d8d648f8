"""The connection and cursor classes poolguard's pools hand out.

They are psycopg's own classes with a little bookkeeping: which backend they talk to, where they
were taken (the ledger record), the last statement and when it ran, and whether the caller
changed anything that must not reach the next caller.  ``isinstance(conn, psycopg.Connection)``
stays true, so Django, SQLAlchemy and user code see nothing unusual.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable
from operator import attrgetter
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

import psycopg
import psycopg_pool
from psycopg.abc import Params, Query
from psycopg.pq import TransactionStatus
from psycopg.rows import Row

from . import _lost
from ._errors import ConnectionReclaimed
from ._guard import SessionStateGuard
from ._sqlstate_rules import leaves_session_state
from ._sqltokens import mask_literals

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._metrics import PoolMetrics
    from ._route import RouteState
    from ._slots import Member, Slots

# What a caller may change on the client side; restored on return when it differs.
_CLIENT_ATTRS = (
    "autocommit",
    "isolation_level",
    "read_only",
    "deferrable",
    "prepare_threshold",
    "row_factory",
    "cursor_factory",
    "server_cursor_factory",
)
_IDLE = TransactionStatus.IDLE
_PREPARE_THRESHOLD_AT = _CLIENT_ATTRS.index("prepare_threshold")
# One C-level call that reads them all: it runs on every return.
_read_client_state = attrgetter(*_CLIENT_ATTRS)


class Tracked:
    """Bookkeeping shared by the sync and async connection classes."""

    pg_backend_pid: int = 0
    pg_weak: Callable[[], Any] = staticmethod(lambda: None)
    _pg_connect_seconds: float = 0.0
    _pg_client_defaults: tuple[Any, ...] = ()
    #: The last statement text (never its parameters) and when it was sent.
    pg_last_sql: Any = None
    pg_last_active: float = 0.0
    #: Set when a statement left server-side session state behind (SET, LISTEN, temp table...).
    _pg_session_dirty: bool = False
    #: Warns about or refuses session-state SQL; None in session mode or with guard="off".
    _pg_guard: SessionStateGuard | None = None
    #: The budget slot this server connection holds until it closes (see _slots.py).
    _pg_slots: Slots | None = None
    #: The pool that opened it (its ledger says whether it is checked out).
    _pg_owner: Any = None

    def _pg_free_slot(self) -> None:
        slots, self._pg_slots = self._pg_slots, None
        if slots is not None:
            slots.give()

    #: The pool's mode now, shared by its connections (see _route.RouteState).
    pg_routes: RouteState | None = None

    def _pg_client_state(self) -> tuple[Any, ...]:
        return _read_client_state(self)

    def pg_attach(self, owner: Any, metrics: PoolMetrics, guard: SessionStateGuard | None) -> None:
        """Called once when the pool ``owner`` adds this new connection."""
        self._pg_owner = owner
        self.pg_backend_pid = self.pgconn.backend_pid  # type: ignore[attr-defined]
        self.pg_weak = weakref.ref(self)
        self._pg_client_defaults = self._pg_client_state()
        self._pg_guard = guard
        metrics.create_time.add(self._pg_connect_seconds)

    def pg_observe(self, query: Any) -> None:
        """Every statement passes here before it is sent (cursor.execute and friends)."""
        self.pg_last_sql = query
        self.pg_last_active = monotonic()
        if not isinstance(query, (str, bytes)):
            query = query.as_string(self)  # psycopg.sql.Composable: rare, not cached
        guard = self._pg_guard
        if guard is None:
            dirty = leaves_session_state(query)
        else:  # one cached lookup answers both "report it?" and "reset on return?"
            dirty = guard.observe(query, in_transaction=self._pg_in_transaction())
        if dirty:
            self._pg_session_dirty = True

    def _pg_observe_declare(self, name: str, withhold: bool, query: Any) -> None:
        """A named (server-side) cursor is about to be declared for ``query``."""
        guard = self._pg_guard
        if guard is not None:
            in_transaction = self._pg_in_transaction()
            guard.check_server_cursor(name, in_transaction=in_transaction, withhold=withhold)
        if withhold:  # it outlives the transaction, so it is session state
            self._pg_session_dirty = True
        self.pg_observe(query)

    def _pg_in_transaction(self) -> bool:
        """Will the next statement run inside a transaction block?"""
        return not self.autocommit or (  # type: ignore[attr-defined]
            self.pgconn.transaction_status != _IDLE  # type: ignore[attr-defined]
        )

    def pg_demote(self) -> None:
        """Transaction mode from now on (the pool switched): no more prepared statements, and
        the guard; its psycopg-prepared statements are never used again."""
        cast(Any, self).prepare_threshold = None  # psycopg's attribute, not Tracked's
        defaults = list(self._pg_client_defaults)
        defaults[_PREPARE_THRESHOLD_AT] = None  # what a return restores
        self._pg_client_defaults = tuple(defaults)
        routes = self.pg_routes
        self._pg_guard = routes.guard if routes is not None else None

    def pg_needs_reset(self) -> bool:
        return self._pg_session_dirty or self._pg_client_state() != self._pg_client_defaults

    #: Why poolguard took this connection back ("" while it is the holder's); see _Reclaimed.
    pg_reclaimed: str = ""

    def __del__(self, *args: Any) -> None:
        # Checked out and unreferenced: queued for the watchdog to free its slot (no I/O here).
        owner = self._pg_owner
        if owner is not None and _lost.adopt(owner, self):
            return
        self._pg_free_slot()  # dropped without close(): psycopg_pool discards broken ones so
        super().__del__(*args)  # type: ignore[misc]

    def _pg_client_changes(self) -> list[tuple[str, Any]]:
        """(attribute, default) for each client-side attribute the caller changed."""
        return [
            (name, default)
            for name, default in zip(_CLIENT_ATTRS, self._pg_client_defaults, strict=False)
            if getattr(self, name) != default
        ]


def needs_cleaning(conn: Tracked) -> bool:
    """Whether a returned connection needs more than going back on the shelf: the hot check."""
    return (
        conn.pgconn.transaction_status != _IDLE  # type: ignore[attr-defined]
        or conn._pg_session_dirty
        or _read_client_state(conn) != conn._pg_client_defaults
    )


# DISCARD ALL drops everything a session can carry (settings, LISTEN, advisory locks, temp
# tables, prepared statements, WITH HOLD cursors); psycopg notices it and forgets its own
# prepared statements too.  It refuses to run inside a transaction block, hence autocommit.
_RESET_SQL = b"DISCARD ALL"


# Every psycopg method that sends caller SQL is overridden below to pass it to pg_observe
# first: execute, executemany, stream and copy (conn.execute and pipelines go through the
# cursor's execute). A cursor_factory swapped for a class not derived from these is caught on
# return (see _unobserved) and the session reset.


class _ObservedStreamAndCopy:
    """stream() and copy(): plain methods in psycopg's sync and async cursors alike (they return
    an iterator and a context manager), so one definition serves both."""

    def stream(self, query: Query, params: Params | None = None, **kwargs: Any) -> Any:
        self._conn.pg_observe(query)  # type: ignore[attr-defined]
        return super().stream(query, params, **kwargs)  # type: ignore[misc]

    def copy(self, statement: Query, params: Params | None = None, **kwargs: Any) -> Any:
        self._conn.pg_observe(statement)  # type: ignore[attr-defined]
        return super().copy(statement, params, **kwargs)  # type: ignore[misc]


class GuardedCursor(_ObservedStreamAndCopy, psycopg.Cursor[Row]):
    """psycopg's cursor, telling its connection what it runs."""

    def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        self._conn.pg_observe(query)  # type: ignore[attr-defined]
        return super().executemany(query, params_seq, returning=returning)

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        self._conn.pg_observe(query)  # type: ignore[attr-defined]
        return super().execute(query, params, prepare=prepare, binary=binary)  # type: ignore[arg-type, misc]


class AsyncGuardedCursor(_ObservedStreamAndCopy, psycopg.AsyncCursor[Row]):
    """psycopg's async cursor, telling its connection what it runs."""

    async def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        self._conn.pg_observe(query)  # type: ignore[attr-defined]
        return await super().executemany(query, params_seq, returning=returning)

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        self._conn.pg_observe(query)  # type: ignore[attr-defined]
        return await super().execute(query, params, prepare=prepare, binary=binary)  # type: ignore[arg-type, misc]


class GuardedServerCursor(psycopg.ServerCursor[Row]):
    """psycopg's named cursor, checked by the guard before it is declared."""

    def execute(
        self, query: Query, params: Params | None = None, *, binary: bool | None = None, **kw: Any
    ) -> Self:
        self._conn._pg_observe_declare(self.name, self.withhold, query)  # type: ignore[attr-defined]
        return super().execute(query, params, binary=binary, **kw)


class AsyncGuardedServerCursor(psycopg.AsyncServerCursor[Row]):
    """psycopg's async named cursor, checked by the guard before it is declared."""

    async def execute(
        self, query: Query, params: Params | None = None, *, binary: bool | None = None, **kw: Any
    ) -> Self:
        self._conn._pg_observe_declare(self.name, self.withhold, query)  # type: ignore[attr-defined]
        return await super().execute(query, params, binary=binary, **kw)


class GuardedConnection(Tracked, psycopg.Connection[Any]):
    """A psycopg connection owned by a GuardedPool."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        """psycopg's connect; ``_pg_on_refused`` (the pool's) may wait out a full server, retry."""
        on_refused: Callable[[psycopg.OperationalError], bool] | None
        on_refused = kwargs.pop("_pg_on_refused", None)
        slot: tuple[Slots, Member] | None = kwargs.pop("_pg_slot", None)
        kwargs.setdefault("cursor_factory", GuardedCursor)
        if slot is not None and not slot[0].take(slot[1]):
            raise _no_slot(slot[0])
        try:
            while True:
                started = monotonic()
                try:
                    conn = super().connect(conninfo, **kwargs)
                    break
                except psycopg.OperationalError as exc:
                    if on_refused is None or not on_refused(exc):
                        raise
        except BaseException:
            if slot is not None:
                slot[0].give()
            raise
        conn.server_cursor_factory = GuardedServerCursor
        conn._pg_connect_seconds = monotonic() - started
        conn._pg_slots = slot[0] if slot is not None else None
        return conn

    def close(self) -> None:
        super().close()
        self._pg_free_slot()

    def pg_reset(self) -> None:
        for name, default in self._pg_client_changes():
            if _unobserved(self, name):
                self._pg_session_dirty = True
            # set_autocommit() and friends exist for the four transaction characteristics.
            setter = getattr(self, f"set_{name}", None)
            setter(default) if setter else setattr(self, name, default)
        if self._pg_session_dirty:
            autocommit = self.autocommit
            self.autocommit = True
            self.execute(_RESET_SQL)
            self.autocommit = autocommit
            self._pg_session_dirty = False


# psycopg_pool's maintenance worker coroutine (it runs every connect of an async pool).
_WORKER_CODE = psycopg_pool.AsyncConnectionPool.worker.__func__.__code__  # type: ignore[attr-defined]


def _cancel_worker_again() -> None:
    """A connect in psycopg_pool's worker was cancelled: cancel the worker once more.

    The worker runs each task under ``except CancelledError`` so that one failed attempt cannot
    kill it; a cancellation meant for the worker itself (the loop shutting down, as at the end of
    ``asyncio.run()``) is swallowed when it lands inside a connect, and the worker then waits on
    its queue for ever, and asyncio.run() with it.  Delivered again, it finds the worker at its
    queue, outside that handler, and ends it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() and task.get_coro().cr_code is _WORKER_CODE:  # type: ignore[union-attr]
        asyncio.get_running_loop().call_soon(task.cancel)


class AsyncGuardedConnection(Tracked, psycopg.AsyncConnection[Any]):
    """A psycopg async connection owned by an AsyncGuardedPool."""

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        """psycopg's connect; ``_pg_on_refused`` (the pool's) may wait out a full server, retry."""
        try:
            return await cls._pg_connect(conninfo, **kwargs)
        except asyncio.CancelledError:
            _cancel_worker_again()
            raise

    @classmethod
    async def _pg_connect(cls, conninfo: str, **kwargs: Any) -> Self:
        on_refused: Callable[[psycopg.OperationalError], Awaitable[bool]] | None
        on_refused = kwargs.pop("_pg_on_refused", None)
        slot: tuple[Slots, Member] | None = kwargs.pop("_pg_slot", None)
        kwargs.setdefault("cursor_factory", AsyncGuardedCursor)
        if slot is not None and not await slot[0].atake(slot[1]):
            raise _no_slot(slot[0])
        try:
            while True:
                started = monotonic()
                try:
                    conn = await super().connect(conninfo, **kwargs)
                    break
                except psycopg.OperationalError as exc:
                    if on_refused is None or not await on_refused(exc):
                        raise
        except BaseException:
            if slot is not None:
                slot[0].give()
            raise
        conn.server_cursor_factory = AsyncGuardedServerCursor
        conn._pg_connect_seconds = monotonic() - started
        conn._pg_slots = slot[0] if slot is not None else None
        return conn

    async def close(self) -> None:
        await super().close()
        self._pg_free_slot()

    async def pg_reset(self) -> None:
        for name, default in self._pg_client_changes():
            if _unobserved(self, name):
                self._pg_session_dirty = True
            # On AsyncConnection these four have awaitable setters and read-only properties.
            setter = getattr(self, f"set_{name}", None)
            await setter(default) if setter else setattr(self, name, default)
        if self._pg_session_dirty:
            autocommit = self.autocommit
            await self.set_autocommit(True)
            await self.execute(_RESET_SQL)
            await self.set_autocommit(autocommit)
            self._pg_session_dirty = False


def _no_slot(slots: Slots) -> psycopg.OperationalError:
    return psycopg.OperationalError(
        f"pool {slots.name!r} was closed while a connection waited for a slot of its budget"
    )


_STATES: dict[int, str] = {
    TransactionStatus.IDLE: "idle",
    TransactionStatus.ACTIVE: "active",
    TransactionStatus.INTRANS: "idle in transaction",
    TransactionStatus.INERROR: "idle in transaction (aborted)",
    TransactionStatus.UNKNOWN: "closed",
}
_STATEMENT_CHARS = 300


def last_statement(conn: Tracked) -> str:
    """The last statement on one line, shortened, string literals masked; never parameters."""
    query = conn.pg_last_sql
    if query is None:
        return "(none)"
    if isinstance(query, bytes):
        text = query.decode("utf-8", "replace")
    elif isinstance(query, str):
        text = query
    else:  # psycopg.sql.Composable: its Literal parts become quoted literals, masked below
        try:
            text = query.as_string(conn)
        except Exception:
            text = f"<{type(query).__name__}>"
    return mask_literals(" ".join(text.split()), _STATEMENT_CHARS)


def state_text(status: int) -> str:
    """active / idle in transaction / idle in transaction (aborted) / idle / closed."""
    return _STATES.get(status, "unknown")


def release_slot(conn: Tracked) -> None:
    """Give back the budget slot of a connection that is closed or broken (psycopg_pool drops
    a broken one without closing it, and it may stay referenced for a while)."""
    conn._pg_free_slot()


def mark_dirty(conn: Any) -> None:
    """Tell the pool that ``conn`` carries session state: it runs DISCARD ALL on return."""
    conn._pg_session_dirty = True


_OBSERVED_CURSORS = (
    GuardedCursor,
    AsyncGuardedCursor,
    GuardedServerCursor,
    AsyncGuardedServerCursor,
)


def _unobserved(conn: Tracked, attribute: str) -> bool:
    """Did the caller swap in a cursor class whose statements pg_observe never saw?"""
    if attribute not in ("cursor_factory", "server_cursor_factory"):
        return False
    factory = getattr(conn, attribute)
    return not (isinstance(factory, type) and issubclass(factory, _OBSERVED_CURSORS))


class _Reclaimed:
    """What a reclaimed connection becomes: every use raises ConnectionReclaimed.

    The watchdog swaps the class of a connection it takes back (same layout, still an
    instance of the class it was), so the hot path never checks a flag.
    """

    def _pg_refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionReclaimed(self.pg_reclaimed)  # type: ignore[attr-defined]

    cursor = execute = commit = rollback = transaction = pipeline = _pg_refuse
    pg_observe = _pg_refuse


class ReclaimedConnection(_Reclaimed, GuardedConnection):
    """A GuardedConnection that poolguard took back."""


class AsyncReclaimedConnection(_Reclaimed, AsyncGuardedConnection):
    """An AsyncGuardedConnection that poolguard took back."""


def mark_reclaimed(conn: Tracked, message: str) -> None:
    """Turn a connection poolguard took back into one whose every use raises ``message``."""
    conn.pg_reclaimed = message
    conn.__class__ = (
        AsyncReclaimedConnection
        if isinstance(conn, psycopg.AsyncConnection)
        else ReclaimedConnection
    )
