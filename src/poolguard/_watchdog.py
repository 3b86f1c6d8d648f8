"""The watchdog: one daemon thread per process that finds leaks and takes lost slots back.

It reads every pool's ledger on a timer and never touches the hot path: getconn() and putconn()
do not know it exists.  Per tick, for each connection that is checked out, it looks at

- age: past ``leak_threshold`` one WARNING on ``poolguard.leaks`` (and one INFO if it comes back
  later); past ``leak_reclaim_after`` the connection is closed and its slot freed;
- owner: a thread that has ended (or an asyncio task that has finished and not used the
  connection since) cannot return it, so the connection is reclaimed;
- transaction: open or failed with no statement for ``idle_in_transaction_threshold``: WARNING.

A connection dropped without being returned is resurrected by its ``__del__`` into a queue
(see ``adopt_lost``); the thread wakes on it at once, closes it and hands it back through the
pool's public ``putconn()`` so psycopg_pool replaces it.  Reclaiming always closes: the server
then rolls back whatever was open, so nobody is ever handed a connection with a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import traceback
import warnings
import weakref
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ._errors import PoolGuardWarning
from ._ledger import Entry, format_site
from ._settings import redact_text
from ._sqltokens import mask_literals

if TYPE_CHECKING:
    from ._connection import Tracked
    from ._pool import _PoolCore
    from ._settings import Settings

logger = logging.getLogger("poolguard.leaks")

_ACTIVE = TransactionStatus.ACTIVE
_INERROR = TransactionStatus.INERROR
_IN_TRANSACTION = (TransactionStatus.INTRANS, _INERROR)
_STATES = {
    TransactionStatus.IDLE: "idle",
    TransactionStatus.ACTIVE: "active",
    TransactionStatus.INTRANS: "idle in transaction",
    TransactionStatus.INERROR: "idle in transaction (aborted)",
    TransactionStatus.UNKNOWN: "closed",
}
_STATEMENT_CHARS = 300


class ConnectionLeakWarning(PoolGuardWarning):
    """A checked-out connection was garbage-collected without being returned to its pool."""


ConnectionLeakWarning.__module__ = "poolguard"


@dataclass
class _Seen:
    """What the watchdog remembers about one checkout between ticks."""

    entry: Entry
    last_active: float
    #: Last time this checkout was seen running a statement (or first seen at all).
    busy_at: float
    leak_reported: bool = False
    reclaimed: bool = False
    #: The ``last_active`` of the idle transaction already warned about.
    idle_reported: float = -1.0
    #: When the owner was first seen gone, and its ``last_active`` then (tasks only).
    owner_gone: tuple[float, float] | None = None


# Process-wide state.  ``_lock`` starts the thread and arbitrates a reclaim against a racing
# putconn(); SimpleQueue is the one queue whose put() is safe inside __del__ (no lock taken).
_lock = threading.Lock()
_lost: queue.SimpleQueue[tuple[_PoolCore, Tracked]] = queue.SimpleQueue()
_watched: weakref.WeakSet[_PoolCore] = weakref.WeakSet()
_memory: weakref.WeakKeyDictionary[_PoolCore, dict[int, _Seen]] = weakref.WeakKeyDictionary()
_thread: threading.Thread | None = None


def watch(pool: _PoolCore) -> None:
    """Called when a pool opens: make sure the watchdog thread runs (it exits when idle)."""
    global _thread
    with _lock:
        _watched.add(pool)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="poolguard-watchdog", daemon=True)
            _thread.start()


def running() -> bool:
    """Whether the watchdog thread is alive (for tests and diagnostics)."""
    thread = _thread
    return thread is not None and thread.is_alive()


# --- the thread ---------------------------------------------------------------------------------


def _open_pools() -> list[_PoolCore]:
    return [
        p for p in list(_watched) if not p._closed and p._inner_pool() is not None and _alive(p)
    ]


def _alive(pool: _PoolCore) -> bool:
    """An async pool whose event loop is closed is dead: nothing can run its I/O any more."""
    loop: asyncio.AbstractEventLoop | None = getattr(pool, "_loop", None)
    return loop is None or not loop.is_closed()


def _run() -> None:
    global _thread
    next_tick = monotonic()
    while True:
        try:
            pool, conn = _lost.get(timeout=max(0.0, next_tick - monotonic()))
        except queue.Empty:
            pass
        else:
            _guarded(_collect_lost, pool, conn)
            del pool, conn  # the queue's item must not outlive its handling
            continue
        now = monotonic()
        pools = _open_pools()
        if not pools:
            with _lock:
                if not _open_pools() and _lost.empty():
                    _thread = None
                    _memory.clear()
                    return
            continue
        for pool in pools:
            _guarded(_check_pool, pool, now)
        next_tick = now + min(p.settings.watchdog_interval for p in pools)


def _guarded(fn: Any, *args: Any) -> None:
    """Run one piece of the watchdog's work; a bug there must not kill the thread."""
    try:
        fn(*args)
    except Exception:
        logger.exception("poolguard watchdog: unexpected error (please report it)")


# --- one tick for one pool ----------------------------------------------------------------------


def _check_pool(pool: _PoolCore, now: float) -> None:
    s = pool.settings
    memory = _memory.setdefault(pool, {})
    owners = Owners(pool)
    items = list(pool.ledger.out.items())  # a copy: the hot path adds and removes meanwhile
    # (headline, conn, entry) of this tick's warnings: logged together after one look at
    # pg_stat_activity, so a burst of leaks costs one short connection, not one each.
    warn: list[tuple[str, Tracked, Entry]] = []
    for conn_id, entry in items:
        conn = entry[5]()
        if conn is None:  # being collected: adopt_lost() has it
            continue
        seen = memory.get(conn_id)
        if seen is None or seen.entry is not entry:
            seen = memory[conn_id] = _Seen(entry, conn._pg_last_active, now)
        status = conn.pgconn.transaction_status
        if status == _ACTIVE or conn._pg_last_active != seen.last_active:
            seen.busy_at, seen.last_active = now, conn._pg_last_active
        age = now - entry[0]
        if _owner_is_gone(owners, entry[1], seen, conn, now):
            what = owners.describe(entry[1])
            _reclaim(pool, conn, entry, f"its owner ({what}) ended without returning it", seen)
            continue
        if s.leak_reclaim_after and age >= s.leak_reclaim_after:
            why = f"held past leak_reclaim_after={s.leak_reclaim_after:g} s"
            _reclaim(pool, conn, entry, why, seen)
            continue
        if s.leak_threshold and age >= s.leak_threshold and not seen.leak_reported:
            seen.leak_reported = True
            pool.metrics.leaks += 1
            pool.events.emit(
                "leak",
                "connection not returned",
                format_site(entry[2], entry[3]),
                age,
                backend_pid=entry[4],
                statement=last_statement(conn),
            )
            warn.append(
                (
                    f"connection not returned after {age:.1f} s "
                    f"(leak_threshold={s.leak_threshold:g} s)",
                    conn,
                    entry,
                )
            )
        if (
            s.idle_in_transaction_threshold
            and status in _IN_TRANSACTION
            and seen.idle_reported != seen.last_active
        ):
            idle = now - max(seen.busy_at, seen.last_active, entry[0])
            if idle >= s.idle_in_transaction_threshold:
                seen.idle_reported = seen.last_active
                kind = "a failed transaction" if status == _INERROR else "a transaction"
                pool.events.emit(
                    "idle_in_transaction",
                    f"connection idle in {kind} for {idle:.1f} s",
                    format_site(entry[2], entry[3]),
                    now - entry[0],
                    idle=idle,
                    backend_pid=entry[4],
                    statement=last_statement(conn),
                )
                warn.append(
                    (
                        f"connection idle in {kind} for {idle:.1f} s "
                        f"(idle_in_transaction_threshold={s.idle_in_transaction_threshold:g} s)",
                        conn,
                        entry,
                    )
                )
    if warn:
        server = server_activity(s, [entry[4] for _, _, entry in warn])
        for headline, conn, entry in warn:
            logger.warning(
                "pool %r: %s, %s", pool.name, headline, _describe(conn, entry, owners, server)
            )
    for conn_id, seen in list(memory.items()):
        if pool.ledger.out.get(conn_id) is not seen.entry:
            del memory[conn_id]
            if seen.leak_reported and not seen.reclaimed:
                logger.info(
                    "pool %r: the connection reported as leaked (taken at %s) was returned "
                    "after about %.1f s",
                    pool.name,
                    format_site(seen.entry[2], seen.entry[3]),
                    now - seen.entry[0],
                )


class Owners:
    """Who is alive right now: threads (sync pools) or the event loop's tasks (async pools)."""

    def __init__(self, pool: _PoolCore) -> None:
        self.loop: asyncio.AbstractEventLoop | None = getattr(pool, "_loop", None)
        self.is_async = hasattr(pool, "_loop")
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


def _owner_is_gone(owners: Owners, owner: int, seen: _Seen, conn: Tracked, now: float) -> bool:
    if owners.alive(owner):
        seen.owner_gone = None
        return False
    if not owners.is_async:
        return True
    # A finished task may have handed the connection on (asyncio.wait_for and gather wrap a
    # coroutine in a task of their own before Python 3.12): reclaim only a connection that
    # ran no statement during a whole tick after its owner was seen finished.
    if seen.owner_gone is None or seen.owner_gone[1] != conn._pg_last_active:
        seen.owner_gone = (now, conn._pg_last_active)
        return False
    return True


# --- reports --------------------------------------------------------------------------------


def last_statement(conn: Tracked) -> str:
    """The last statement on one line, shortened, string literals masked; never parameters."""
    query = conn._pg_last_sql
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


def state_of(conn: Tracked) -> str:
    """active / idle in transaction / idle in transaction (aborted) / idle / closed."""
    return _STATES.get(conn.pgconn.transaction_status, "unknown")  # type: ignore[attr-defined]


def _describe(
    conn: Tracked, entry: Entry, owners: Owners, server: dict[int, dict[str, Any]]
) -> str:
    stack = owners.stack(entry[1])
    where_now = ("; its owner is now at:\n" + "".join(stack[-8:]).rstrip()) if stack else ""
    row = server.get(entry[4])
    seen_by_server = ""
    if row is not None:
        since = f" for {row['state_age']:.1f} s" if row["state_age"] is not None else ""
        seen_by_server = f"; server: {row['state']}{since}"
    return (
        f"taken at {format_site(entry[2], entry[3])} by {owners.describe(entry[1])}, "
        f"backend pid {entry[4]}, last statement: {last_statement(conn)}"
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


def _reclaim(pool: _PoolCore, conn: Tracked, entry: Entry, why: str, seen: _Seen) -> None:
    """Close a checked-out connection and free its slot, unless its holder returns it first."""
    message = (
        f"connection reclaimed by poolguard after {monotonic() - entry[0]:.1f} s: {why} "
        f"(taken at {format_site(entry[2], entry[3])})"
    )
    loop: asyncio.AbstractEventLoop | None = getattr(pool, "_loop", None)
    if hasattr(pool, "_loop"):
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(_areclaim(pool, conn, entry, message, seen), loop)
        return
    lock: threading.Lock = conn.lock  # type: ignore[attr-defined]
    if not lock.acquire(blocking=False):
        return  # a statement is running: not idle after all, look again next tick
    try:
        with _lock:  # held until the slot is back: a racing putconn() waits for it
            if not _claim(pool, conn, entry, message, seen):
                return
            _give_back(pool, conn)
    finally:
        lock.release()
    _log_reclaimed(pool, message, seen)


async def _areclaim(
    pool: _PoolCore, conn: Tracked, entry: Entry, message: str, seen: _Seen
) -> None:
    # On the pool's event loop: everything up to the first await runs without the holder.
    if conn.lock.locked():  # type: ignore[attr-defined]
        return
    with _lock:
        if not _claim(pool, conn, entry, message, seen):
            return
    inner = pool._inner_pool()
    give_back = inner is not None and conn._pool is inner  # type: ignore[attr-defined]
    conn._pool = None  # type: ignore[attr-defined]  # a putconn() by the holder only closes it
    await conn.close()  # type: ignore[attr-defined]
    if give_back:
        conn._pool = inner  # type: ignore[attr-defined]  # putconn() checks it before any await
        await inner.putconn(conn)  # type: ignore[misc, union-attr]
    _log_reclaimed(pool, message, seen)


def _claim(pool: _PoolCore, conn: Tracked, entry: Entry, message: str, seen: _Seen) -> bool:
    """Take the ledger entry from under the holder (``_lock`` held): putconn() or we win."""
    if conn.pgconn.transaction_status == _ACTIVE:  # type: ignore[attr-defined]
        return False
    from ._connection import mark_reclaimed  # here: _connection imports this module

    if pool.ledger.out.get(id(conn)) is not entry:
        return False  # returned (and maybe taken again) meanwhile
    del pool.ledger.out[id(conn)]
    mark_reclaimed(conn, message)
    seen.reclaimed = True
    return True


def _log_reclaimed(pool: _PoolCore, message: str, seen: _Seen) -> None:
    pool.metrics.reclaimed += 1
    if not seen.leak_reported:  # one leak, counted once
        pool.metrics.leaks += 1
        pool.events.emit(
            "leak", message, format_site(seen.entry[2], seen.entry[3]), monotonic() - seen.entry[0]
        )
    logger.warning("pool %r: %s; its slot is free again", pool.name, message)


def returned_unknown(conn: Tracked) -> bool:
    """putconn() found no ledger entry: if the watchdog took the connection, accept quietly.

    Returns whether it was such a reclaimed connection (False: the caller has a bug).

    The watchdog has already closed it and freed its slot; clearing ``_pool`` turns the rest
    of putconn() into closing a closed connection.  The lock waits out a reclaim in progress.
    """
    with _lock:
        reclaimed = conn._pg_reclaimed
    if reclaimed:
        conn._pool = None  # type: ignore[attr-defined]
        logger.info("a reclaimed connection was returned by its holder (%s)", reclaimed)
    return bool(reclaimed)


# --- connections garbage-collected while checked out -----------------------------------------


def adopt_lost(conn: Tracked) -> bool:
    """From ``__del__``: queue a checked-out connection nobody references; True if queued.

    No I/O and no lock here (``__del__`` may run in any thread, between any two bytecodes):
    the watchdog closes the connection and returns its slot.  The warning is issued here, in
    the thread that dropped the connection, so a test's ``-W error`` fails that very test.
    """
    if sys.is_finalizing():
        return False
    inner = getattr(conn, "_pool", None)
    for pool in list(_watched):
        entry = pool.ledger.out.get(id(conn))
        if entry is not None and pool._inner_pool() is inner:
            _lost.put((pool, conn))  # resurrects it until the watchdog is done
            code, line = entry[2], entry[3]
            warnings.warn_explicit(
                f"connection taken at {format_site(code, line)} was garbage-collected without "
                f"being returned to pool {pool.name!r} (held {monotonic() - entry[0]:.2f} s); "
                "poolguard freed its slot",
                ConnectionLeakWarning,
                code.co_filename if code else "<unknown>",
                line,
            )
            return True
    return False


def _collect_lost(pool: _PoolCore, conn: Tracked) -> None:
    entry = pool.ledger.out.pop(id(conn), None)
    if entry is None:
        return
    pool.metrics.leaks += 1
    pool.metrics.reclaimed += 1
    pool.events.emit(
        "leak",
        "connection garbage-collected without being returned",
        format_site(entry[2], entry[3]),
        monotonic() - entry[0],
        backend_pid=entry[4],
    )
    logger.warning(
        "pool %r: connection taken at %s was garbage-collected without being returned "
        "(held %.2f s, backend pid %s, last statement: %s); its slot is free again",
        pool.name,
        format_site(entry[2], entry[3]),
        monotonic() - entry[0],
        entry[4],
        last_statement(conn),
    )
    conn._pg_reclaimed = "connection was garbage-collected without being returned"
    loop: asyncio.AbstractEventLoop | None = getattr(pool, "_loop", None)
    if not hasattr(pool, "_loop"):
        _give_back(pool, conn)
    elif loop is not None and not loop.is_closed():
        asyncio.run_coroutine_threadsafe(_arelease(pool, conn), loop)
    else:
        conn.pgconn.finish()  # type: ignore[attr-defined]  # its loop is gone, and its pool


def _give_back(pool: _PoolCore, conn: Tracked) -> None:
    """Close a sync pool's connection and return its slot: psycopg_pool opens a new one."""
    conn.close()  # type: ignore[attr-defined]
    inner = pool._inner_pool()
    if inner is not None and conn._pool is inner:  # type: ignore[attr-defined]
        inner.putconn(conn)


async def _arelease(pool: _PoolCore, conn: Tracked) -> None:
    await conn.close()  # type: ignore[attr-defined]
    inner = pool._inner_pool()
    if inner is not None and conn._pool is inner:  # type: ignore[attr-defined]
        await inner.putconn(conn)  # type: ignore[misc]


# --- server side: idle_in_transaction_session_timeout -------------------------------------


def startup_options(settings: Settings) -> dict[str, str]:
    """The ``options`` startup parameter carrying idle_in_transaction_session_timeout."""
    seconds = settings.idle_in_transaction_session_timeout
    # The embedded rewriter pools server connections itself and refuses ``options`` (a
    # setting in it would follow one client onto shared connections): docs/leaks.md.
    if not seconds or settings.rewriter:
        return {}
    base = conninfo_to_dict(settings.conninfo).get("options") or ""
    option = f"-c idle_in_transaction_session_timeout={max(1, round(seconds * 1000))}"
    return {"options": f"{base} {option}".strip()}


def options_rejected(exc: Exception) -> bool:
    """Whether a pooler refused the ``options`` startup parameter (PgBouncer before 1.20)."""
    return "unsupported startup parameter" in str(exc) and "options" in str(exc)


def _after_fork_in_child() -> None:
    global _lock, _lost, _thread
    _lock = threading.Lock()  # the parent's may have been held by a thread the child lacks
    _lost = queue.SimpleQueue()
    _thread = None  # threads do not survive fork(); the next pool open starts one
    _memory.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
