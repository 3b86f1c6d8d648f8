"""SharedPool: a SQLAlchemy Pool that holds no connections of its own.

Every checkout takes a connection from a poolguard pool and every checkin gives it back, so the
budget is poolguard's alone.  What SQLAlchemy keeps per DBAPI connection (its connection record:
the dialect's on-connect setup, ``record_info``, pre-ping state) is kept per *physical*
connection, so the dialect's one-time setup runs once per server connection, not per checkout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.pool import ConnectionPoolEntry, Pool
from sqlalchemy.util import concurrency

from .._pool import AsyncGuardedPool, GuardedPool, _PoolCore
from ._asyncpg import AsyncpgPool

logger = logging.getLogger("poolguard")

# Where a record keeps the physical connection it wraps (record_info outlives reconnects).
_RAW = "poolguard.connection"
# Bumped in a forked child: records from before the fork wrap the parent's connections.
_generation = 0
_shared_pools: weakref.WeakSet[SharedPool] = weakref.WeakSet()


class Source:
    """Where a SharedPool's connections come from: a sync poolguard pool."""

    pool: _PoolCore

    def __init__(self, pool: GuardedPool) -> None:
        self.pool = self._sync = pool

    def take(self) -> Any:
        return self._sync.getconn()

    def give(self, raw: Any) -> None:
        self._sync.putconn(raw)

    def wrap(self, dialect: Any, raw: Any) -> Any:
        """The DBAPI connection SQLAlchemy uses for ``raw``."""
        return raw


class AsyncSource(Source):
    """An asyncio poolguard pool, driven from SQLAlchemy's greenlet-run sync code."""

    def __init__(
        self, pool: AsyncGuardedPool | AsyncpgPool, adapter_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.pool = self._async = pool
        self.adapter_kwargs = adapter_kwargs or {}
        self._pending: set[asyncio.Future[None]] = set()

    def take(self) -> Any:
        return concurrency.await_(self._async.getconn())

    def give(self, raw: Any) -> None:
        if concurrency.in_greenlet():
            concurrency.await_(self._async.putconn(raw))
            return
        # The garbage collector returned a connection that was never closed: no greenlet to
        # await in, so hand it back on the pool's loop.
        loop = self._async._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._give_later, raw)

    def _give_later(self, raw: Any) -> None:
        task = asyncio.ensure_future(self._async.putconn(raw))
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
        _shared_pools.add(self)

    def _creator_for(self, record: ConnectionPoolEntry) -> Any:
        """SQLAlchemy's creator: the connection _do_get() took, or a replacement."""
        raw = getattr(self._handoff, "raw", None)
        if raw is not None:
            self._handoff.raw = None
        else:
            # The record is reconnecting while checked out (pre-ping failed, or it was
            # invalidated): its old connection is closed by now; poolguard discards it.
            old = _info(record).pop(_RAW, None)
            if old is not None:
                self._records.pop(id(old), None)
                self.source.give(old)
            raw = self.source.take()
            self._records[id(raw)] = record
        _info(record)[_RAW] = raw
        return self.source.wrap(self._dialect, raw)

    def _do_get(self) -> ConnectionPoolEntry:
        if self._generation != _generation:
            self._records.clear()
            self._generation = _generation
        raw = self.source.take()
        record = self._records.get(id(raw))
        if record is not None and _info(record).get(_RAW) is raw:
            return record
        self._forget_closed()
        self._handoff.raw = raw
        try:
            record = self._create_connection()
        except BaseException:
            self._handoff.raw = None
            self.source.give(raw)
            raise
        self._records[id(raw)] = record
        return record

    def _forget_closed(self) -> None:
        """Drop records whose connection poolguard closed (max_lifetime, max_idle)."""
        for key, record in list(self._records.items()):
            if _is_closed(_info(record).get(_RAW)):
                del self._records[key]

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        raw = _info(record).get(_RAW)
        if raw is None:
            return
        if self._generation != _generation:
            return  # the parent process's connection: never touch it
        if record.dbapi_connection is None:  # invalidated: closed, and poolguard discards it
            _info(record).pop(_RAW, None)
            self._records.pop(id(raw), None)
        self.source.give(raw)

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
            f"SharedPool over poolguard pool {pool.name!r}: "
            f"{len(pool.ledger)}/{pool.settings.max_size} in use"
        )


def _info(record: ConnectionPoolEntry) -> dict[Any, Any]:
    info = record.record_info
    assert info is not None  # None only for a connection detached from its record
    return info


def _is_closed(raw: Any) -> bool:
    if raw is None:
        return True
    if isinstance(raw, asyncpg.Connection):
        return bool(raw.is_closed())
    return bool(raw.closed)


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
