"""SQLAlchemy engines whose connections come from poolguard's process-wide pool.

::

    from poolguard.sqlalchemy import create_engine, create_async_engine

    engine = create_engine("postgresql+psycopg://app:secret@db/app")
    aengine = create_async_engine("postgresql+asyncpg://app:secret@db/app")

Django, SQLAlchemy and raw psycopg code in one process then share one budget: the engine keeps
no connections of its own (no QueuePool stacked on poolguard's pool).  Pool sizing and timing
are poolguard settings (``poolguard.configure(..., max_size=8)``), so SQLAlchemy's pool
arguments are refused with the setting to use instead.  docs/sqlalchemy.md has the details:
pre-ping, ``engine.dispose()``, fork, the asyncpg dialect, and Alembic's direct connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import sqlalchemy
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from .. import _state
from .._errors import ConfigurationError
from .._pool import GuardedPool
from .._redact import redact_text, redact_value
from .._settings import Settings, parse_dsn
from ._asyncpg import AsyncpgPool, asyncpg_pool
from ._pool import AsyncSource, SharedPool, Source

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "AsyncpgPool",
    "SharedPool",
    "aclose",
    "create_async_engine",
    "create_engine",
    "direct_url",
]

# SQLAlchemy arguments that would configure a second pool, and what to set instead.
_REFUSED = {
    "pool_size": "max_size",
    "max_overflow": "max_size",
    "pool_timeout": "timeout",
    "pool_recycle": "max_lifetime",
    "pool_use_lifo": None,
    "poolclass": None,
    "pool": None,
    "creator": None,
    "async_creator": None,
}
# SQLAlchemy's pool arguments that keep their meaning, under Pool's own parameter names.
_POOL_ARGS = {
    "pool_pre_ping": "pre_ping",
    "pool_reset_on_return": "reset_on_return",
    "echo_pool": "echo",
    "pool_logging_name": "logging_name",
    "pool_events": "events",
}
# The psycopg dialect applies these through connect(context=...), which shared connections lack.
_PSYCOPG_CONNECT_ONLY = ("json_serializer", "json_deserializer", "native_inet_types")
# asyncpg dialect arguments that belong to SQLAlchemy's connection adapter, not to asyncpg.
_ASYNCPG_ADAPTER_ARGS = ("prepared_statement_cache_size", "prepared_statement_name_func")


def create_engine(url: str | URL | None = None, *, name: str = "default", **kw: Any) -> Engine:
    """A SQLAlchemy Engine over the poolguard pool called ``name`` (psycopg 3 driver).

    ``url``: the database, as for ``sqlalchemy.create_engine``; None (or a URL with only a
    driver, ``"postgresql+psycopg://"``) uses the pool that ``poolguard.configure()`` (or
    POOLGUARD_DSN / DATABASE_URL) set up.  The first engine for a name configures its pool
    from the URL; later ones must name the same database.  Other
    keyword arguments go to ``sqlalchemy.create_engine``, except pool arguments (refused with the
    poolguard setting to use) and ``pool_pre_ping``, ``pool_reset_on_return``, ``echo_pool``,
    ``pool_logging_name``, which keep their meaning.
    """
    sa_url, pool, dsn = _resolve(url, name, ("", "psycopg"), "create_engine")
    _check_psycopg_args(kw, pool.settings)
    shared = SharedPool(Source(name, dsn), **_pool_args(kw, pool.settings))
    return sqlalchemy.create_engine(sa_url, pool=shared, **_engine_args(kw))


def create_async_engine(
    url: str | URL | None = None,
    *,
    name: str = "default",
    prepared_statements: bool | None = None,
    **kw: Any,
) -> AsyncEngine:
    """An AsyncEngine over the poolguard pool called ``name``: psycopg (async) or asyncpg.

    psycopg connections come from ``poolguard.get_async_pool(name)``; asyncpg ones from a
    poolguard-managed asyncpg pool with the same settings.  ``prepared_statements`` (asyncpg
    only): None turns SQLAlchemy's and asyncpg's statement caches off when the pool's mode is
    "transaction" (a transaction-mode pooler hands statements to other clients) and leaves them
    on in "session" mode; True keeps them on (behind poolguard.rewriter or a pooler that tracks
    prepared statements).  Other arguments as for :func:`create_engine`.
    """
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    sa_url, pool, dsn = _resolve(
        url, name, ("", "psycopg", "psycopg_async", "asyncpg"), "create_async_engine"
    )
    settings = pool.settings
    asyncpg = sa_url.get_driver_name() == "asyncpg"
    if asyncpg:
        # The DSN must suit asyncpg: fail now rather than on first use.
        mode = asyncpg_pool(name).effective_mode
        adapter_kwargs = _asyncpg_adapter_args(kw, settings, prepared_statements, mode)
    else:
        if prepared_statements is not None:
            raise ConfigurationError(
                "prepared_statements= applies to the asyncpg driver; psycopg connections "
                f"follow pool {name!r}'s prepare_threshold setting"
            )
        _check_psycopg_args(kw, settings)
        adapter_kwargs = {}
    source = AsyncSource(name, dsn, asyncpg=asyncpg, adapter_kwargs=adapter_kwargs)
    shared = SharedPool(source, **_pool_args(kw, settings))
    return sa_create_async_engine(sa_url, pool=shared, **_engine_args(kw))


async def aclose(name: str = "default") -> None:
    """Close the pools of ``name`` bound to this event loop (psycopg async and asyncpg).

    Their connections belong to the loop that opened them: call this before that loop ends
    (an app's shutdown hook, the end of ``asyncio.run()``).  ``AsyncEngine.dispose()`` does not
    close them, because other engines and code of the process share them.
    """
    loop = asyncio.get_running_loop()
    for pool in _state.flavors_of(name).values():
        if pool.event_loop() is loop:
            await pool.close()


def direct_url(name: str = "default", driver: str = "psycopg") -> URL:
    """The pool's ``direct_dsn`` (DIRECT_URL) as a SQLAlchemy URL, for Alembic and other tools
    that need a session of their own (DDL, advisory locks) rather than a pooled connection.

    Without a direct DSN, the pool's own DSN is probed (two short connections): when it reaches
    PostgreSQL directly or through a session-mode pooler, that DSN is the direct one.  Behind a
    transaction-mode pooler this raises ConfigurationError saying to set DIRECT_URL.
    Use it with a plain ``sqlalchemy.create_engine(..., poolclass=NullPool)``.
    """
    settings = _state.get_pool(name).settings
    conninfo = settings.direct_conninfo
    if not conninfo:
        from .._probe import probe_pooler

        found = probe_pooler(settings.conninfo).mode
        if found not in ("direct", "session"):
            raise ConfigurationError(
                f"pool {name!r} has no direct_dsn and its DSN ({settings.target}) goes through "
                f"a {found}-mode pooler: set DIRECT_URL (or poolguard.configure(..., "
                "direct_dsn=...)) to a URL that reaches PostgreSQL without a transaction pooler"
            )
        conninfo = settings.conninfo
    return _url_from_conninfo(conninfo, f"postgresql+{driver}", password=True)


def _resolve(
    url: str | URL | None, name: str, drivers: tuple[str, ...], caller: str
) -> tuple[URL, GuardedPool, str | None]:
    """The engine's URL (no password), the poolguard pool behind it (configured if new), and
    the DSN to configure it again from after a reset (None: the configured pool's)."""
    try:
        sa_url = make_url(url if url is not None else "postgresql://")
    except ArgumentError as exc:  # SQLAlchemy quotes the whole string, password included
        raise ConfigurationError(
            f"poolguard.sqlalchemy.{caller}(): {redact_text(str(exc), str(url))}"
        ) from None
    driver = sa_url.get_driver_name() if "+" in sa_url.drivername else ""
    if sa_url.get_backend_name() != "postgresql" or driver not in drivers:
        allowed = ", ".join(f"postgresql+{d}://" for d in drivers if d)
        raise ConfigurationError(
            f"poolguard.sqlalchemy.{caller}() needs a PostgreSQL URL for a driver poolguard "
            f"pools ({allowed}), got {sa_url.drivername}://"
        )
    drivername = f"postgresql+{driver if driver in ('psycopg', 'asyncpg') else 'psycopg'}"
    if not (sa_url.host or sa_url.database or sa_url.query):  # a driver alone: the pool's URL
        pool = _state.get_pool(name)
        return _url_from_conninfo(pool.settings.conninfo, drivername), pool, None
    sa_url = sa_url.set(drivername=drivername)
    dsn = sa_url.set(drivername="postgresql").render_as_string(hide_password=False)
    existing = _state.configured(name)
    if existing is not None:
        if parse_dsn(dsn, "url")[0] != existing.settings.conninfo:
            raise ConfigurationError(
                f"{caller}(): pool {name!r} is configured for {existing.settings.redacted_dsn!r}, "
                f"not {sa_url.render_as_string(hide_password=True)!r}: pass url=None to use the "
                "configured pool, or name= another pool"
            )
        pool = existing
    else:
        pool = _state.configure(dsn, name=name)
    # The engine's URL shows in its repr and logs: no password, nor one in the query string.
    return sa_url.set(password=None).difference_update_query(["password"]), pool, dsn


def _url_from_conninfo(conninfo: str, drivername: str, *, password: bool = False) -> URL:
    params = conninfo_to_dict(conninfo)
    known = {"host", "port", "user", "password", "dbname"}
    return URL.create(
        drivername,
        username=params.get("user"),  # type: ignore[arg-type]
        password=params.get("password") if password else None,  # type: ignore[arg-type]
        host=params.get("host"),  # type: ignore[arg-type]
        port=int(params["port"]) if params.get("port") else None,  # type: ignore[arg-type]
        database=params.get("dbname"),  # type: ignore[arg-type]
        query={k: str(v) for k, v in params.items() if k not in known},
    )


def _refuse(argument: str, value: Any, settings: Settings, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"{argument}={redact_value(value)} is not accepted by poolguard.sqlalchemy: {why}"
        f" (engine over poolguard pool {settings.name!r})"
    )


def _pool_args(kw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Pop SharedPool's arguments from ``kw``; refuse the ones that would configure a pool."""
    for argument, setting in _REFUSED.items():
        if argument in kw:
            if setting is None:
                why = (
                    "the engine's connections come from poolguard's pool, which has no such option"
                )
            else:
                current = getattr(settings, setting)
                why = (
                    f"set poolguard's {setting} instead (now {current}): poolguard.configure(..., "
                    f"{setting}=...) or POOLGUARD_{setting.upper()}"
                )
            raise _refuse(argument, kw[argument], settings, why)
    return {ours: kw.pop(theirs) for theirs, ours in _POOL_ARGS.items() if theirs in kw}


def _engine_args(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` for SQLAlchemy, with an engine-wide isolation level applied per checkout."""
    if "connect_args" in kw:
        raise ConfigurationError(
            f"connect_args={redact_value(kw['connect_args'])} is not accepted by "
            "poolguard.sqlalchemy: the "
            "engine's connections come from poolguard's pool; put connection parameters in the "
            "URL (e.g. ?sslmode=require) or in poolguard settings (application_name, "
            "connect_timeout, prepare_threshold)"
        )
    if "isolation_level" in kw:
        # The dialect would set it once per server connection, and poolguard restores each
        # connection's defaults on return; as an execution option it is set per checkout.
        options = dict(kw.get("execution_options") or {})
        options.setdefault("isolation_level", kw.pop("isolation_level"))
        kw["execution_options"] = options
    return kw


def _check_psycopg_args(kw: dict[str, Any], settings: Settings) -> None:
    for argument in _PSYCOPG_CONNECT_ONLY:
        if argument in kw:
            raise _refuse(
                argument,
                kw[argument],
                settings,
                "the psycopg dialect applies it when it opens a connection, and poolguard opens "
                "the shared ones (register psycopg adapters globally instead)",
            )
    # Native hstore needs an adapter registered on each connection at connect time; the
    # dialect's own hstore parsing works on any connection.
    kw.setdefault("use_native_hstore", False)


def _asyncpg_adapter_args(
    kw: dict[str, Any], settings: Settings, prepared_statements: bool | None, mode: str
) -> dict[str, Any]:
    """SQLAlchemy's asyncpg adapter arguments: its statement cache, and statement names."""
    given = dict(kw.pop("connect_args", None) or {})
    unknown = set(given) - set(_ASYNCPG_ADAPTER_ARGS) - {"statement_cache_size"}
    if unknown or given.get("statement_cache_size", 0) != 0:
        raise _refuse(
            "connect_args",
            given,
            settings,
            "poolguard opens the asyncpg connections: only prepared_statement_cache_size and "
            "prepared_statement_name_func are accepted; put connection parameters in the URL",
        )
    if prepared_statements is None:
        prepared_statements = mode == "session"
    args: dict[str, Any] = {}
    if not prepared_statements:
        # Unnamed statements: each Parse replaces the last one on that server connection, so
        # no name can collide with another client's or be missing on another server.
        args = {"prepared_statement_cache_size": 0, "prepared_statement_name_func": _unnamed}
    args.update({k: v for k, v in given.items() if k in _ASYNCPG_ADAPTER_ARGS})
    return args


def _unnamed() -> str:
    return ""
