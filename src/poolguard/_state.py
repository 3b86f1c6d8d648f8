"""All process-wide state: the registry of pools, one per name.

``configure()`` is idempotent: the same name with the same settings, from any thread or from a
module that ``importlib.reload()`` ran again, returns the pool that exists.  The same name with
different settings is an error, never a silent second pool.  After ``os.fork()`` the registry
keeps its pools, and each of them opens fresh connections on first use in the child (see
``_pool._forget_after_fork``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ._errors import ConfigurationError
from ._pool import AsyncGuardedPool, GuardedPool
from ._settings import Settings, build_settings

_lock = threading.Lock()
_pools: dict[str, GuardedPool] = {}
_async_pools: dict[str, AsyncGuardedPool] = {}


def configure(dsn: str | None = None, *, name: str = "default", **options: Any) -> GuardedPool:
    """Create the pool called ``name``, or return it if it exists with the same settings."""
    settings = build_settings(dsn, name=name, **options)
    with _lock:
        pool = _pools.get(name)
        if pool is not None and not pool._closed:
            if pool.settings != settings:
                raise _conflict(pool.settings, settings)
            return pool
        pool = _pools[name] = GuardedPool(settings)
        return pool


def _conflict(old: Settings, new: Settings) -> ConfigurationError:
    return ConfigurationError(
        f"pool {old.name!r} is already configured with different settings "
        f"({', '.join(old.differences(new))} differ): a second pool would double the "
        f"connections; pass the same settings everywhere, use another name=, or call "
        f"poolguard.reset() first (in tests)"
    )


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


def get_async_pool(name: str = "default") -> AsyncGuardedPool:
    """The asyncio twin of the pool called ``name``, built from the same settings on first use."""
    pool = _async_pools.get(name)
    if pool is not None and not pool._closed:
        return pool
    settings = get_pool(name).settings
    with _lock:
        pool = _async_pools.get(name)
        if pool is None or pool._closed:
            pool = _async_pools[name] = AsyncGuardedPool(settings)
        return pool


# Embedded statement-name rewriters, one per upstream conninfo, shared by the pools that use
# rewriter=True.  Typed loosely so that importing poolguard never imports the rewriter.
_rewriters: dict[str, Any] = {}
_rewriters_lock = threading.Lock()


def rewriter_dsn(settings: Settings) -> str:
    """The DSN of the embedded rewriter in front of ``settings.conninfo``, started on first use."""
    with _rewriters_lock:
        handle = _rewriters.get(settings.conninfo)
        if handle is None:
            _refuse_transaction_pooler_upstream(settings)
            from .rewriter import start

            handle = _rewriters[settings.conninfo] = start(
                settings.conninfo, pool_size=settings.max_size
            )
        return str(handle.dsn)


def _refuse_transaction_pooler_upstream(settings: Settings) -> None:
    """The rewriter is a transaction pooler: it must own its server connections.

    Behind another transaction pooler, the server connections it tracks statements on are
    shared underneath it, and its prepared statements go missing.
    """
    from ._probe import probe_pooler

    found = probe_pooler(settings.conninfo)
    if found.mode in ("transaction", "statement"):
        raise ConfigurationError(
            f"pool {settings.name!r}: rewriter=True needs a DSN that reaches PostgreSQL directly "
            f"(or a session-mode pooler), but {settings.target} is a {found.mode}-mode pooler: "
            "point the DSN at PostgreSQL (the rewriter does the transaction pooling), or drop "
            "rewriter=True"
        )


def pools() -> list[GuardedPool | AsyncGuardedPool]:
    """Every pool of this process."""
    return [*_pools.values(), *_async_pools.values()]


def reset() -> None:
    """Close and forget every sync pool and forget the async ones (for tests)."""
    with _lock:
        closing = list(_pools.values())
        _pools.clear()
        _async_pools.clear()
    for pool in closing:
        pool.close()
    with _rewriters_lock:
        rewriters = list(_rewriters.values())
        _rewriters.clear()
    for handle in rewriters:
        handle.stop()


def _after_fork_in_child() -> None:
    global _lock, _rewriters_lock
    _lock = threading.Lock()  # the parent's may have been held by a thread the child lacks
    _rewriters_lock = threading.Lock()
    # The parent's rewriters run on threads the child does not have, over shared sockets:
    # forget them (never stop them from here); the child starts its own on first use.
    _inherited_rewriters.extend(_rewriters.values())
    _rewriters.clear()


_inherited_rewriters: list[Any] = []


os.register_at_fork(after_in_child=_after_fork_in_child)
