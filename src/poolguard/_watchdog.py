"""The watchdog: one daemon thread per process that finds leaks and has lost slots taken back.

It reads every pool's ledger on a timer and never touches the hot path: getconn() and putconn()
do not know it exists.  Per tick, for each connection that is checked out, it looks at

- age: past ``leak_threshold`` one WARNING on ``poolguard.leaks`` (and one INFO if it comes back
  later); past ``leak_reclaim_after`` the connection is taken back;
- owner: a thread that has ended (or an asyncio task that has finished and not used the
  connection since) cannot return it, so the connection is taken back;
- transaction: open or failed with no statement for ``idle_in_transaction_threshold``: WARNING.

It decides; the pools act: ``pool.reclaim()`` closes a connection and frees its slot on the
pool's own terms (a sync pool at once, an async pool on its event loop).  A connection dropped
without being returned is queued by its ``__del__`` (see ``_lost``); the thread wakes on it at
once and has its pool free it.  Reclaiming always closes: the server then rolls back whatever was
open, so nobody is ever handed a connection with a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import TransactionStatus

from . import _lost
from ._ledger import Checkout
from ._settings import redact_text

if TYPE_CHECKING:
    from ._pool import PoolCore
    from ._settings import Settings

logger = logging.getLogger("poolguard.leaks")

_ACTIVE = TransactionStatus.ACTIVE
_INERROR = TransactionStatus.INERROR
_IN_TRANSACTION = (TransactionStatus.INTRANS, _INERROR)


@dataclass
class _Seen:
    """What the watchdog remembers about one checkout between ticks."""

    record: Checkout
    last_active: float
    #: Last time this checkout was seen running a statement (or first seen at all).
    busy_at: float
    leak_reported: bool = False
    reclaimed: bool = False
    #: The ``last_active`` of the idle transaction already warned about.
    idle_reported: float = -1.0
    #: When the owner was first seen gone, and its ``last_active`` then (tasks only).
    owner_gone: tuple[float, float] | None = None


# Process-wide state.  ``_lock`` starts and stops the thread.
_lock = threading.Lock()
_watched: weakref.WeakSet[PoolCore] = weakref.WeakSet()
_memory: weakref.WeakKeyDictionary[PoolCore, dict[int, _Seen]] = weakref.WeakKeyDictionary()
_thread: threading.Thread | None = None


def watch(pool: PoolCore) -> None:
    """Watch ``pool`` from now on (the registry calls it for every pool it builds)."""
    with _lock:
        _watched.add(pool)
        _start()


def _start() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_run, name="poolguard-watchdog", daemon=True)
        _thread.start()


def running() -> bool:
    """Whether the watchdog thread is alive (for tests and diagnostics)."""
    thread = _thread
    return thread is not None and thread.is_alive()


# --- the thread ---------------------------------------------------------------------------------


def _live_pools() -> list[PoolCore]:
    """Pools that are not closed and whose event loop (if any) is not closed."""
    return [p for p in list(_watched) if not p.closed and _alive(p)]


def _alive(pool: PoolCore) -> bool:
    """An async pool whose event loop is closed is dead: nothing can run its I/O any more."""
    loop = pool.event_loop()
    return loop is None or not loop.is_closed()


def _run() -> None:
    global _thread
    next_tick = monotonic()
    while True:
        lost = _lost.next_lost(max(0.0, next_tick - monotonic()))
        if lost is not None:
            _guarded(_collect_lost, *lost)
            del lost  # the queue's item must not outlive its handling
            continue
        now = monotonic()
        pools = _live_pools()
        if not pools:
            with _lock:
                if not _live_pools() and _lost.empty():
                    _thread = None
                    _memory.clear()
                    return
            continue
        for pool in pools:
            if pool.is_open():
                _guarded(pool.tidy)
                _guarded(_check_pool, pool, now)
        next_tick = now + min(p.settings.watchdog_interval for p in pools)


def _guarded(fn: Any, *args: Any) -> None:
    """Run one piece of the watchdog's work; a bug there must not kill the thread."""
    try:
        fn(*args)
    except Exception:
        logger.exception("poolguard watchdog: unexpected error (please report it)")


# --- one tick for one pool ----------------------------------------------------------------------


def _check_pool(pool: PoolCore, now: float) -> None:
    s = pool.settings
    memory = _memory.setdefault(pool, {})
    owners = Owners(pool)
    # (headline, conn, record) of this tick's warnings: logged together after one look at
    # pg_stat_activity, so a burst of leaks costs one short connection, not one each.
    warn: list[tuple[str, Any, Checkout]] = []
    for record in pool.ledger.records():  # a copy: the hot path adds and removes meanwhile
        conn = record.connection()
        if conn is None:  # being collected: _lost has it
            continue
        seen = memory.get(record.conn_id)
        status, last_active = pool.conn_status(conn), pool.conn_last_active(conn)
        if seen is None or seen.record.token is not record.token:
            seen = memory[record.conn_id] = _Seen(record, last_active, now)
        if status == _ACTIVE or last_active != seen.last_active:
            seen.busy_at, seen.last_active = now, last_active
        age = now - record.taken_at
        if _owner_is_gone(owners, record.owner, seen, last_active, now):
            what = owners.describe(record.owner)
            _reclaim(pool, record, f"its owner ({what}) ended without returning it", seen)
            continue
        if s.leak_reclaim_after and age >= s.leak_reclaim_after:
            _reclaim(pool, record, f"held past leak_reclaim_after={s.leak_reclaim_after:g} s", seen)
            continue
        if s.leak_threshold and age >= s.leak_threshold and not seen.leak_reported:
            seen.leak_reported = True
            pool.metrics.leaks += 1
            pool.events.emit(
                "leak",
                "connection not returned",
                record.site,
                age,
                backend_pid=record.backend_pid,
                statement=pool.conn_statement(conn),
            )
            warn.append(
                (
                    f"connection not returned after {age:.1f} s "
                    f"(leak_threshold={s.leak_threshold:g} s)",
                    conn,
                    record,
                )
            )
        if (
            s.idle_in_transaction_threshold
            and status in _IN_TRANSACTION
            and seen.idle_reported != seen.last_active
        ):
            idle = now - max(seen.busy_at, seen.last_active, record.taken_at)
            if idle >= s.idle_in_transaction_threshold:
                seen.idle_reported = seen.last_active
                kind = "a failed transaction" if status == _INERROR else "a transaction"
                pool.events.emit(
                    "idle_in_transaction",
                    f"connection idle in {kind} for {idle:.1f} s",
                    record.site,
                    now - record.taken_at,
                    idle=idle,
                    backend_pid=record.backend_pid,
                    statement=pool.conn_statement(conn),
                )
                warn.append(
                    (
                        f"connection idle in {kind} for {idle:.1f} s "
                        f"(idle_in_transaction_threshold={s.idle_in_transaction_threshold:g} s)",
                        conn,
                        record,
                    )
                )
    if warn:
        server = server_activity(s, [record.backend_pid for _, _, record in warn])
        for headline, conn, record in warn:
            logger.warning(
                "pool %r: %s, %s",
                pool.name,
                headline,
                _describe(pool, conn, record, owners, server),
            )
    for conn_id, seen in list(memory.items()):
        if not pool.ledger.holds(seen.record):
            del memory[conn_id]
            if seen.leak_reported and not seen.reclaimed:
                logger.info(
                    "pool %r: the connection reported as leaked (taken at %s) was returned "
                    "after about %.1f s",
                    pool.name,
                    seen.record.site,
                    now - seen.record.taken_at,
                )


class Owners:
    """Who is alive right now: threads (sync pools) or the event loop's tasks (async pools)."""

    def __init__(self, pool: PoolCore) -> None:
        self.loop = pool.event_loop()
        self.is_async = pool.is_async
        self.threads: dict[int | None, threading.Thread | None] = {
            t.ident: t for t in threading.enumerate()
        }
        for ident in sys._current_frames():  # threads started outside the threading module
            self.threads.setdefault(ident, None)
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        if self.loop is not None and not self.loop.is_closed():
            try:  # all_tasks() copes with the loop's thread changing the set meanwhile
                self.tasks = {id(t): t for t in asyncio.all_tasks(self.loop)}
            except RuntimeError:
                self.loop = None  # unknown this tick: treat every owner as alive

    def alive(self, owner: int) -> bool:
        if not self.is_async:
            return owner in self.threads
        return self.loop is None or owner in self.tasks

    def describe(self, owner: int) -> str:
        if self.is_async:
            task = self.tasks.get(owner)
            return f"task {task.get_name()!r}" if task else f"task 0x{owner:x} (finished)"
        thread = self.threads.get(owner)
        return f"thread {thread.name!r}" if thread else f"thread {owner} (ended)"

    def stack(self, owner: int) -> list[str]:
        """The owner's current stack, innermost call last, formatted like a traceback."""
        if not self.is_async:
            frame = sys._current_frames().get(owner)
            return traceback.format_stack(frame) if frame is not None else []
        task = self.tasks.get(owner)
        if task is None:
            return []
        if self.loop is not None and asyncio.current_task(self.loop) is task:
            thread_id = getattr(self.loop, "_thread_id", None)  # running now: its thread's stack
            frame = sys._current_frames().get(thread_id) if thread_id else None
            if frame is not None:
                return traceback.format_stack(frame)
        return _coroutine_stack(task.get_coro())


def _coroutine_stack(coro: Any) -> list[str]:
    """A suspended coroutine's await chain, outermost first (Task.get_stack shows one frame)."""
    frames: list[tuple[Any, int]] = []
    while coro is not None and len(frames) < 50:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return traceback.StackSummary.extract(frames).format()


def _owner_is_gone(owners: Owners, owner: int, seen: _Seen, last_active: float, now: float) -> bool:
    if owners.alive(owner):
        seen.owner_gone = None
        return False
    if not owners.is_async:
        return True
    # A finished task may have handed the connection on (asyncio.wait_for and gather wrap a
    # coroutine in a task of their own before Python 3.12): reclaim only a connection that
    # ran no statement during a whole tick after its owner was seen finished.
    if seen.owner_gone is None or seen.owner_gone[1] != last_active:
        seen.owner_gone = (now, last_active)
        return False
    return True


# --- reports --------------------------------------------------------------------------------


def _describe(
    pool: PoolCore,
    conn: Any,
    record: Checkout,
    owners: Owners,
    server: dict[int, dict[str, Any]],
) -> str:
    stack = owners.stack(record.owner)
    where_now = ("; its owner is now at:\n" + "".join(stack[-8:]).rstrip()) if stack else ""
    row = server.get(record.backend_pid)
    seen_by_server = ""
    if row is not None:
        since = f" for {row['state_age']:.1f} s" if row["state_age"] is not None else ""
        seen_by_server = f"; server: {row['state']}{since}"
    return (
        f"taken at {record.site} by {owners.describe(record.owner)}, "
        f"backend pid {record.backend_pid}, last statement: {pool.conn_statement(conn)}"
        f"{seen_by_server}{where_now}"
    )


def server_query(
    settings: Settings, purpose: str, sql: str, params: list[Any] | None = None
) -> list[tuple[Any, ...]] | None:
    """Rows of one query over a short-lived connection beside the pool, named
    ``<application_name>:<purpose>`` (direct DSN if configured); None if it failed."""
    conninfo = settings.direct_conninfo or settings.conninfo
    try:
        with psycopg.connect(
            conninfo,
            autocommit=True,
            connect_timeout=2,
            application_name=f"{settings.application_name}:{purpose}"[:63],
        ) as conn:
            return conn.execute(sql, params).fetchall()
    except psycopg.Error as exc:
        logger.debug("%s query failed: %s", purpose, redact_text(str(exc), conninfo))
        return None


def server_activity(settings: Settings, pids: list[int]) -> dict[int, dict[str, Any]]:
    """What pg_stat_activity says about these backends, over a short-lived connection.

    Never called on the hot path: the watchdog and report() use it.  Behind a transaction-mode
    pooler the pids a client sees are the pooler's, so nothing matches (an empty answer);
    a direct DSN (``direct_dsn``) is used when configured.
    """
    if not pids:
        return {}
    rows = server_query(
        settings,
        "watchdog",
        "SELECT pid, state, extract(epoch FROM now() - xact_start)::float8,"
        " extract(epoch FROM now() - state_change)::float8, wait_event_type, wait_event"
        " FROM pg_stat_activity WHERE pid = ANY(%s)",
        [pids],
    )
    if rows is None:
        return {}
    return {
        row[0]: {
            "state": row[1],
            "transaction_age": row[2],
            "state_age": row[3],
            "wait_event": f"{row[4]}:{row[5]}" if row[4] else None,
        }
        for row in rows
    }


# --- taking connections back ----------------------------------------------------------------


def _reclaim(pool: PoolCore, record: Checkout, why: str, seen: _Seen) -> None:
    """Have the pool close a checked-out connection and free its slot, unless its holder
    returns it first."""
    message = (
        f"connection reclaimed by poolguard after {monotonic() - record.taken_at:.1f} s: {why} "
        f"(taken at {record.site})"
    )

    def claimed() -> None:  # the checkout is the pool's now: count it and say so
        seen.reclaimed = True
        pool.metrics.reclaimed += 1
        if not seen.leak_reported:  # one leak, counted once
            pool.metrics.leaks += 1
            pool.events.emit("leak", message, record.site, monotonic() - record.taken_at)
        logger.warning("pool %r: %s; its slot is free again", pool.name, message)

    pool.reclaim(record, message, claimed)


def _collect_lost(pool: PoolCore, conn: Any) -> None:
    record = pool.ledger.record(id(conn))
    if record is None or not pool.ledger.claim(record):
        return
    pool.metrics.leaks += 1
    pool.metrics.reclaimed += 1
    pool.events.emit(
        "leak",
        "connection garbage-collected without being returned",
        record.site,
        monotonic() - record.taken_at,
        backend_pid=record.backend_pid,
    )
    logger.warning(
        "pool %r: connection taken at %s was garbage-collected without being returned "
        "(held %.2f s, backend pid %s, last statement: %s); its slot is free again",
        pool.name,
        record.site,
        monotonic() - record.taken_at,
        record.backend_pid,
        pool.conn_statement(conn),
    )
    pool.drop_lost(conn)


def after_fork_in_child() -> None:
    """In a forked child (called by _state's fork handler): the parent's thread is gone; one
    starts again if some pool is alive."""
    global _lock, _thread
    _lock = threading.Lock()  # the parent's may have been held by a thread the child lacks
    _thread = None
    _memory.clear()
    _lost.after_fork_in_child()
    if _live_pools():
        _start()
