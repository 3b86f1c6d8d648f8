"""SharedPool: a SQLAlchemy Pool that holds no connections of its own.

Every checkout takes a connection from a poolguard pool and every checkin gives it back, so the
budget is poolguard's alone.  What SQLAlchemy keeps per DBAPI connection (its connection record:
the dialect's on-connect setup, ``record_info``, pre-ping state) is kept per *physical*
connection, so the dialect's one-time setup runs once per server connection, not per checkout.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

from sqlalchemy.pool import ConnectionPoolEntry, Pool
from sqlalchemy.util import concurrency

from .. import _state
from .._pool import AsyncGuardedPool, GuardedPool, PoolCore
from ._asyncpg import AsyncpgPool, asyncpg_pool

# Where a record keeps the physical connection it wraps (record_info outlives reconnects).
_RAW = "poolguard.connection"
# Bumped in a forked child: records from before the fork wrap the parent's connections.
_generation = 0


class Source:
    """Where a SharedPool's connections come from: the sync poolguard pool called ``name``.

    The pool is looked up on each checkout, so an engine made at import time keeps working
    after ``poolguard.reset()`` (tests) or a closed pool (it is configured again from ``dsn``).
    Each connection goes back to the pool it came from.
    """

    def __init__(self, name: str, dsn: str | None) -> None:
        self.name = name
        self._dsn = dsn

    def sync_pool(self) -> GuardedPool:
        pool = _state.configured(self.name)
        if pool is None:
            pool = (
                _state.configure(self._dsn, name=self.name)
                if self._dsn
                else _state.get_pool(self.name)
            )
        return pool

    @property
    def pool(self) -> PoolCore:
        """The pool that checkouts use now."""
        return self.sync_pool()

    def take(self) -> tuple[Any, Any]:
        pool = self.sync_pool()
        return pool.getconn(), pool

    def give(self, raw: Any, pool: Any) -> None:
        pool.putconn(raw)

    def wrap(self, dialect: Any, raw: Any) -> Any:
        """The DBAPI connection SQLAlchemy uses for ``raw``."""
        return raw


class AsyncSource(Source):
    """The psycopg async twin or the asyncpg pool of ``name``, driven from SQLAlchemy's
    greenlet-run sync code."""

    def __init__(
        self, name: str, dsn: str | None, *, asyncpg: bool, adapter_kwargs: dict[str, Any]
    ) -> None:
        super().__init__(name, dsn)
        self._asyncpg = asyncpg
        self.adapter_kwargs = adapter_kwargs
        self._pending: set[asyncio.Future[None]] = set()

    @property
    def pool(self) -> AsyncGuardedPool | AsyncpgPool:
        self.sync_pool()  # configured again from the URL after a reset
        return asyncpg_pool(self.name) if self._asyncpg else _state.get_async_pool(self.name)

    def take(self) -> tuple[Any, Any]:
        pool = self.pool
        return concurrency.await_(pool.getconn()), pool

    def give(self, raw: Any, pool: Any) -> None:
        if concurrency.in_greenlet():
            concurrency.await_(pool.putconn(raw))
            return
        # The garbage collector returned a connection that was never closed: no greenlet to
        # await in, so hand it back on the pool's loop.
        loop = pool.event_loop()
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._give_later, raw, pool)

    def _give_later(self, raw: Any, pool: Any) -> None:
        task = asyncio.ensure_future(pool.putconn(raw))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def wrap(self, dialect: Any, raw: Any) -> Any:
        async def ready() -> Any:
            return raw

        return dialect.dbapi.connect(async_creator_fn=ready, **self.adapter_kwargs)


class SharedPool(Pool):
    """Checkout and checkin delegated to a poolguard pool; see docs/sqlalchemy.md."""

    def __init__(self, source: Source, **kw: Any) -> None:
        super().__init__(cast(Any, self._creator_for), **kw)
        self.source = source
        self._records: dict[int, ConnectionPoolEntry] = {}
        self._handoff = threading.local()
        self._generation = _generation

    def _creator_for(self, record: ConnectionPoolEntry) -> Any:
        """SQLAlchemy's creator: the connection _do_get() took, or a replacement."""
        taken = getattr(self._handoff, "taken", None)
        if taken is not None:
            self._handoff.taken = None
        else:
            # The record is reconnecting while checked out (pre-ping failed, or it was
            # invalidated): its old connection is closed by now; poolguard discards it.
            old = _info(record).pop(_RAW, None)
            if old is not None:
                self._records.pop(id(old[0]), None)
                self.source.give(*old)
            taken = self.source.take()
            self._records[id(taken[0])] = record
        _info(record)[_RAW] = taken
        return self.source.wrap(self._dialect, taken[0])

    def _do_get(self) -> ConnectionPoolEntry:
        if self._generation != _generation:
            self._records.clear()
            self._generation = _generation
        taken = self.source.take()
        record = self._records.get(id(taken[0]))
        if record is not None and _info(record).get(_RAW) == taken:
            return record
        self._forget_closed()
        self._handoff.taken = taken
        try:
            record = self._create_connection()
        except BaseException:
            self._handoff.taken = None
            self.source.give(*taken)
            raise
        self._records[id(taken[0])] = record
        return record

    def _forget_closed(self) -> None:
        """Drop records whose connection poolguard closed (max_lifetime, max_idle)."""
        for key, record in list(self._records.items()):
            taken = _info(record).get(_RAW)
            if taken is None or _is_closed(taken[0]):
                self._records.pop(key, None)  # another thread may have dropped it already

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        taken = _info(record).get(_RAW)
        if taken is None:
            return
        if self._generation != _generation:
            return  # the parent process's connection: never touch it
        if record.dbapi_connection is None:  # invalidated: closed, and poolguard discards it
            _info(record).pop(_RAW, None)
            self._records.pop(id(taken[0]), None)
        self.source.give(*taken)

    def dispose(self) -> None:
        """Forget this engine's per-connection state; poolguard's connections stay open."""
        self._records.clear()

    def recreate(self) -> SharedPool:
        return type(self)(
            self.source,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            pre_ping=self._pre_ping,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        pool = self.source.pool
        return (
            f"SharedPool over poolguard pool {self.source.name!r}: "
            f"{len(pool.ledger)}/{pool.settings.max_size} in use"
        )


def _info(record: ConnectionPoolEntry) -> dict[Any, Any]:
    info = record.record_info
    assert info is not None  # None only for a connection detached from its record
    return info


def _is_closed(raw: Any) -> bool:
    closed = getattr(raw, "closed", None)  # psycopg's attribute; asyncpg has a method
    return bool(raw.is_closed() if closed is None else closed)


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


_state.at_fork(_after_fork_in_child)
