"""All process-wide state: every pool of every flavor, by name, and the budget they share.

A pool name is served by up to three flavors: the sync pool that ``configure()`` creates (used
by ``connection()``, Django and SQLAlchemy's sync engines), its asyncio twin (``aconnection()``,
SQLAlchemy's psycopg async engines) and the asyncpg pool of SQLAlchemy's asyncpg engines.  They
are built from the name's one ``Settings`` and share one ``Slots`` budget: the server
connections a process holds for a name, across all flavors, never exceed ``max_size``.  The
embedded statement-name rewriters (``rewriter=True``) live here too, one per upstream, size
and ``rewriter_options``.

``configure()`` is idempotent: the same name with the same settings, from any thread or from a
module that ``importlib.reload()`` ran again, returns the pool that exists.  The same name with
different settings is an error, never a silent second pool.

After ``os.fork()`` one handler, registered here, resets the owners in this order: this
registry (fresh locks, fresh budgets), the pools (forget the parent's connections without
touching their sockets), the watchdog (its thread is gone), the rewriters (forgotten, never
stopped: their threads are the parent's), then the adapters' hooks (``at_fork``), in the order
they registered.  Each child then opens connections of its own on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from . import _pool, _watchdog
from ._errors import ConfigurationError
from ._pool import AsyncGuardedPool, GuardedPool, PoolCore
from ._probe import probe_pooler
from ._settings import Settings, build_settings
from ._slots import Slots

#: Flavor names, the keys of ``flavor()``.
ASYNC = "psycopg-async"
ASYNCPG = "asyncpg"

P = TypeVar("P", bound=PoolCore)

_lock = threading.RLock()
# name -> the configured (sync) pool: its settings are the name's settings.
_pools: dict[str, GuardedPool] = {}
# (name, flavor) -> the pool of that flavor, built from the configured pool's settings.
_flavors: dict[tuple[str, str], PoolCore] = {}
# name -> the connection budget every flavor of the name takes its server connections from.
_slots: dict[str, Slots] = {}
# Adapters' after-fork hooks (see at_fork), called last, in registration order.
_fork_hooks: list[Callable[[], None]] = []


def configure(dsn: str | None = None, *, name: str = "default", **options: Any) -> GuardedPool:
    """Create the pool called ``name``, or return it if it exists with the same settings."""
    settings = build_settings(dsn, name=name, **options)
    with _lock:
        pool = _pools.get(name)
        if pool is not None and not pool.closed:
            if pool.settings != settings:
                raise conflict(pool.settings, settings)
            return pool
        pool = _pools[name] = GuardedPool(settings, slots=_budget(settings), target=_target)
        _watchdog.watch(pool)
        return pool


def conflict(old: Settings, new: Settings) -> ConfigurationError:
    """The error for a second configuration of one name with other settings."""
    return ConfigurationError(
        f"pool {old.name!r} is already configured with different settings "
        f"({', '.join(old.differences(new))} differ): a second pool would double the "
        f"connections; pass the same settings everywhere, use another name=, or call "
        f"poolguard.reset() first (in tests)"
    )


def configured(name: str) -> GuardedPool | None:
    """The open (not closed) pool configured under ``name``, or None: adapters check it
    before they configure, to word a conflict in their own terms."""
    pool = _pools.get(name)
    return pool if pool is not None and not pool.closed else None


def _budget(settings: Settings) -> Slots:
    """The name's budget (lock held): a new one when the name is configured anew."""
    slots = _slots.get(settings.name)
    if slots is None or slots.limit != settings.max_size:
        slots = _slots[settings.name] = Slots(settings.name, settings.max_size)
    return slots


def get_pool(name: str = "default") -> GuardedPool:
    """The pool called ``name``; the default one is configured from the environment if needed."""
    pool = _pools.get(name)
    if pool is not None:
        return pool
    if name == "default" and (os.environ.get("POOLGUARD_DSN") or os.environ.get("DATABASE_URL")):
        return configure()
    raise ConfigurationError(
        f"pool {name!r} is not configured: call poolguard.configure(dsn, name={name!r}) at "
        "start-up (or set POOLGUARD_DSN / DATABASE_URL for the default pool)"
    )


def flavor(name: str, kind: str, build: Callable[..., P]) -> P:
    """Find or create the pool of flavor ``kind`` for ``name``.

    ``build(settings, slots=..., target=..., routes=...)`` makes it, from the settings of the pool
    configured under ``name`` and with the name's budget; a closed one, or one built from
    settings that were replaced since, is built again.
    """
    key = (name, kind)
    pool = _flavors.get(key)
    configured = get_pool(name)
    settings = configured.settings
    if pool is not None and not pool.closed and pool.settings is settings:
        return pool  # type: ignore[return-value]
    with _lock:
        pool = _flavors.get(key)
        if pool is None or pool.closed or pool.settings is not settings:
            # One path to the server per name: the flavors share what mode="auto" found.
            pool = _flavors[key] = build(
                settings, slots=_budget(settings), target=_target, routes=configured.routes
            )
            _watchdog.watch(pool)
        return pool  # type: ignore[return-value]


def get_async_pool(name: str = "default") -> AsyncGuardedPool:
    """The asyncio twin of the pool called ``name``, built from the same settings on first use."""
    return flavor(name, ASYNC, AsyncGuardedPool)


def flavors_of(name: str) -> dict[str, PoolCore]:
    """Every pool serving ``name`` now, by flavor ("psycopg" for the configured one)."""
    found: dict[str, PoolCore] = {}
    pool = _pools.get(name)
    if pool is not None:
        found["psycopg"] = pool
    found.update({kind: p for (n, kind), p in list(_flavors.items()) if n == name})
    return found


def pools() -> list[PoolCore]:
    """Every pool of this process, every flavor."""
    return _all_pools()


def _all_pools() -> list[PoolCore]:
    return [*_pools.values(), *_flavors.values()]


def at_fork(hook: Callable[[], None]) -> None:
    """Register an adapter's after-fork-in-child hook; it runs after the core's owners."""
    if hook not in _fork_hooks:
        _fork_hooks.append(hook)


# --- shutting down ------------------------------------------------------------------------


def reset() -> None:
    """Close and forget every pool of every flavor and every rewriter (tests, shutdown)."""
    close_all()


def close_all(timeout: float = 5.0) -> None:
    """Close every pool of every flavor (an app's shutdown hook, Django's ``atexit``).

    Async flavors are closed on their own event loop when it runs in another thread; when it
    is this thread's running loop, use ``aclose_all()`` instead (here they are only scheduled).
    """
    sync, others = _forget_all()
    for each in sync:
        each.close(timeout)
    for pool in others:
        _close_elsewhere(pool, timeout)
    _stop_rewriters()


async def aclose_all(timeout: float = 5.0) -> None:
    """``await poolguard.aclose_all()``: close_all() from async code (a FastAPI lifespan)."""
    sync, others = _forget_all()
    loop = asyncio.get_running_loop()
    for pool in others:
        if pool.event_loop() is loop:
            await pool.close(timeout)
        else:
            _close_elsewhere(pool, timeout)
    for each in sync:
        await asyncio.to_thread(each.close, timeout)
    await asyncio.to_thread(_stop_rewriters)


def _forget_all() -> tuple[list[GuardedPool], list[PoolCore]]:
    with _lock:
        sync, others = list(_pools.values()), list(_flavors.values())
        _pools.clear()
        _flavors.clear()
        _slots.clear()
    return sync, others


def _close_elsewhere(pool: PoolCore, timeout: float) -> None:
    """Close an event-loop-bound pool from outside its loop, as far as that is possible."""
    loop = pool.event_loop()
    if loop is None or loop.is_closed() or not loop.is_running():
        pool.abandon()  # no loop to run its I/O: drop what it holds
        return
    future = asyncio.run_coroutine_threadsafe(pool.close(timeout), loop)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return  # scheduled on this very loop: waiting here would deadlock it
    with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
        future.result(timeout + 1.0)


# --- embedded statement-name rewriters --------------------------------------------------------

# One per (upstream conninfo, size, options), shared by the pools that use rewriter=True: pools
# that tune it differently get one each, never one tuned for another. Typed loosely so that
# importing poolguard never imports the rewriter.
_rewriters: dict[tuple[str, int, tuple[tuple[str, Any], ...]], Any] = {}


def _target(settings: Settings) -> str:
    """Where a pool's connections go: the DSN, or the embedded rewriter in front of it."""
    return rewriter_dsn(settings) if settings.rewriter else settings.conninfo


def rewriter_dsn(settings: Settings) -> str:
    """The DSN of the embedded rewriter in front of ``settings.conninfo``, started on first use."""
    options = settings.rewriter_options
    key = (settings.conninfo, settings.max_size, tuple(sorted(options.items())))
    with _lock:
        handle = _rewriters.get(key)
        if handle is None:
            _refuse_transaction_pooler_upstream(settings)
            from .rewriter import start  # optional extra: imported only when it is used

            handle = _rewriters[key] = start(
                settings.conninfo, pool_size=settings.max_size, **options
            )
        return str(handle.dsn)


def _refuse_transaction_pooler_upstream(settings: Settings) -> None:
    """The rewriter is a transaction pooler: it must own its server connections.

    Behind another transaction pooler, the server connections it tracks statements on are
    shared underneath it, and its prepared statements go missing.
    """

    found = probe_pooler(settings.conninfo)
    if found.mode in ("transaction", "statement"):
        raise ConfigurationError(
            f"pool {settings.name!r}: rewriter=True needs a DSN that reaches PostgreSQL directly "
            f"(or a session-mode pooler), but {settings.target} is a {found.mode}-mode pooler: "
            "point the DSN at PostgreSQL (the rewriter does the transaction pooling), or drop "
            "rewriter=True"
        )


def _stop_rewriters() -> None:
    with _lock:
        handles = list(_rewriters.values())
        _rewriters.clear()
    for handle in handles:
        handle.stop()


# --- fork ---------------------------------------------------------------------------------------

# In a forked child, the parent's rewriter handles: kept referenced, never stopped there.
_inherited_rewriters: list[Any] = []


def _after_fork_in_child() -> None:
    global _lock
    # 1. This registry: the parent's lock may have been held by a thread the child lacks, and
    #    the parent's connections are not the child's sessions, so every name gets a fresh
    #    budget (connections from before the fork give their slot to the old one).
    _lock = threading.RLock()
    for name, old in list(_slots.items()):
        slots = _slots[name] = Slots(name, old.limit)
        for pool in _all_pools():
            if pool.name == name:
                pool.slots = slots
                slots.join(pool)
    # 2. The pools forget the parent's connections; 3. the watchdog's thread is gone.
    _pool.forget_all_after_fork()
    _watchdog.after_fork_in_child()
    # 4. The parent's rewriters run on threads the child does not have, over shared sockets.
    _inherited_rewriters.extend(_rewriters.values())
    _rewriters.clear()
    # 5. The adapters (SQLAlchemy's records, Django's wrappers).
    for hook in list(_fork_hooks):
        hook()


os.register_at_fork(after_in_child=_after_fork_in_child)
