"""``ENGINE = "poolguard.django"``: Django's PostgreSQL backend on poolguard's pool.

Django keeps one ``DatabaseWrapper`` per thread (per request context under ASGI).  With this
backend the wrapper never opens a server connection of its own: it checks one out of the
process-wide pool ``django:<alias>`` when Django first needs it and gives it back whenever Django
would close it, and at every request boundary whatever ``CONN_MAX_AGE`` says.  A connection then
lives in the pool, not in a thread or a request, which is what keeps ASGI, thread pools and
forked workers inside the connection budget.  docs/django.md describes the settings.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import django  # type: ignore[import-untyped]
import psycopg
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.db import DEFAULT_DB_ALIAS, connections  # type: ignore[import-untyped]
from django.db.backends.base.base import NO_DB_ALIAS  # type: ignore[import-untyped]
from django.db.backends.postgresql import base as pg  # type: ignore[import-untyped]
from django.db.backends.postgresql.psycopg_any import (  # type: ignore[import-untyped]
    get_adapters_template,
)
from django.utils.asyncio import async_unsafe  # type: ignore[import-untyped]
from django.utils.functional import cached_property  # type: ignore[import-untyped]

from .. import _state
from .._connection import GuardedConnection, mark_dirty
from .._errors import ConfigurationError
from .._pool import GuardedPool
from ._asgi import awaiting_site, in_asgi_request, needs_site
from ._cursors import CursorDebugWrapper, CursorWrapper
from ._errors import ErrorWrapper
from ._options import Resolved, resolve
from ._process import process_kind
from .checks import DatabaseValidation
from .checks import register as register_checks

if django.VERSION < (5, 2):
    raise ImproperlyConfigured(
        f"poolguard.django needs Django 5.2 or newer; this is Django {django.get_version()}"
    )

logger = logging.getLogger("poolguard.django")
register_checks()  # poolguard.W001 must run even when the app poolguard.django is not installed
_IDLE = psycopg.pq.TransactionStatus.IDLE


# alias -> (resolved settings, pool): the pool that serves each alias now.  A DATABASES entry whose
# connection settings change (the test runner renames NAME to the test database) gets a new
# pool, and the old one is closed: never two live pools for one alias.
_current: dict[str, tuple[Any, GuardedPool]] = {}
# (alias, settings snapshot) -> Resolved: parsing runs once per distinct DATABASES entry, not
# once per request (Django builds a new wrapper per thread and per ASGI request).
_resolved: dict[tuple[Any, ...], Resolved] = {}
_lock = threading.Lock()
# Every wrapper, so a forked child can drop the connections it inherited (see _after_fork).
_wrappers: weakref.WeakSet[DatabaseWrapper] = weakref.WeakSet()


class DatabaseWrapper(pg.DatabaseWrapper):  # type: ignore[misc]
    """Django's PostgreSQL DatabaseWrapper whose connections come from poolguard's pool."""

    connection: Any  # the psycopg connection in use, None between checkouts
    health_check_done: bool  # Django's: the once-per-request health check has run
    validation_class = DatabaseValidation

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        super().__init__(settings_dict, alias)
        #: The pool the current connection came from; None for a direct connection.
        self._pg_source: GuardedPool | None = None
        #: Set by direct_connection(): connect around the pool, to the direct DSN if any.
        self._pg_direct = False
        _wrappers.add(self)

    # --- settings ------------------------------------------------------------------------

    def _pg_resolved(self) -> Resolved:
        sd = self.settings_dict
        kind = process_kind()
        key = (
            self.alias, sd["NAME"], sd["USER"], sd["PASSWORD"], sd["HOST"], sd["PORT"],
            repr(sd["OPTIONS"]), sd["CONN_MAX_AGE"], sd["CONN_HEALTH_CHECKS"], sd["AUTOCOMMIT"],
            kind,
        )  # fmt: skip
        found = _resolved.get(key)
        if found is None:
            found = resolve(self.alias, sd, self.get_connection_params(), kind)
            if len(_resolved) > 256:  # bounded: tests build many short-lived variants
                _resolved.clear()
            _resolved[key] = found
        return found

    @property
    def pool(self) -> GuardedPool | None:
        """The poolguard pool this alias uses (None when it connects directly)."""
        if self.alias == NO_DB_ALIAS or self._pg_direct:
            return None
        return self._pg_pool(self._pg_resolved())

    def _pg_pool(self, resolved: Resolved) -> GuardedPool:
        entry = _current.get(self.alias)
        if entry is not None and entry[0] is resolved and not entry[1].closed:
            return entry[1]
        with _lock:
            return self._pg_open_pool(resolved)

    def _pg_open_pool(self, resolved: Resolved) -> GuardedPool:
        settings = resolved.settings
        name = settings.name
        wanted = {
            "autocommit": self.settings_dict["AUTOCOMMIT"],
            "cursor_factory": resolved.cursor_class,
        }
        existing = _state.configured(name)
        if existing is not None:
            changed = existing.settings.differences(settings) + [
                key for key, value in wanted.items() if existing.connect_kwargs.get(key) != value
            ]
            if changed:
                logger.info(
                    "pool %r: the DATABASES entry changed (%s); closing the old pool",
                    name,
                    ", ".join(changed),
                )
                existing.close()
        try:
            pool = _state.configure(settings.conninfo, name=name, **resolved.options)
        except ConfigurationError as exc:
            raise ImproperlyConfigured(f"DATABASES[{self.alias!r}]: {exc}") from None
        if not pool.is_open():
            # Django's loaders (jsonb and inet as text, its range dumper, the time zone).
            context = get_adapters_template(_use_tz(), self.timezone)
            pool.set_connect_kwargs({**wanted, "context": context})
        _current[self.alias] = (resolved, pool)
        return pool

    def close_pool(self) -> None:
        """Close this alias's pool (Django's test runner does, before it drops a database)."""
        with _lock:
            entry = _current.pop(self.alias, None)
        if entry is not None:
            entry[1].close()

    # --- connections ---------------------------------------------------------------------

    @async_unsafe  # type: ignore[untyped-decorator]
    def get_new_connection(self, conn_params: dict[str, Any]) -> psycopg.Connection[Any]:
        isolation = self._pg_isolation_level()
        pool = self.pool
        if pool is None:
            conn = self._pg_connect_direct(conn_params)
        else:
            conn = pool.getconn()
            try:
                record = pool.ledger.record(id(conn))
                if record is not None and needs_site(record.code):  # an async view's ORM call
                    site = awaiting_site()
                    if site is not None:
                        pool.ledger.move(id(conn), *site)
                self._pg_prepare(conn)
            except BaseException:
                pool.putconn(conn)
                raise
            self._pg_source = pool
        if isolation is not None:
            conn.isolation_level = isolation
        return conn

    def _pg_isolation_level(self) -> Any:
        """Django's isolation_level option, checked the way Django checks it."""
        value = self.settings_dict["OPTIONS"].get("isolation_level")
        if value is None:
            self.isolation_level = pg.IsolationLevel.READ_COMMITTED
            return None
        try:
            self.isolation_level = pg.IsolationLevel(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['isolation_level']: Invalid transaction "
                f"isolation level {value} specified. Use one of the psycopg.IsolationLevel values."
            ) from None
        return self.isolation_level

    def _pg_prepare(self, conn: psycopg.Connection[Any], *, fresh: bool = True) -> None:
        """Make a pooled connection match this wrapper: time zone, role.

        The checks are local (the server reports TimeZone on every change), so the usual cost
        is nothing; the statements bypass poolguard's observation because PgBouncer carries
        TimeZone across transactions and the role only exists in session mode.
        """
        tz = self.timezone_name
        statements: list[tuple[Any, list[Any]]] = []
        if tz and conn.info.parameter_status("TimeZone") != tz:
            statements.append((self.ops.set_time_zone_sql(), [tz]))
        role = self._pg_resolved().assume_role if fresh else None
        if role:
            # Not ops.compose_sql(): it would ask this wrapper for a connection, and there is
            # none yet (this runs inside get_new_connection).
            statements.append(("SET ROLE %s", [role]))
        if statements:
            with psycopg.ClientCursor(conn) as cursor:
                for sql, params in statements:
                    cursor.execute(sql, params)
            if fresh and not conn.autocommit:  # never commit a transaction Django has open
                conn.commit()
            if role:
                # Other wrappers of this alias may want another role or none: the pool runs
                # DISCARD ALL on return, and the next checkout sets the role again.
                mark_dirty(conn)

    def _pg_connect_direct(self, conn_params: dict[str, Any]) -> psycopg.Connection[Any]:
        """A connection of its own: for the no-database alias and inside direct_connection()."""
        params = {k: v for k, v in conn_params.items() if k != "poolguard"}
        resolved = self._pg_resolved()
        direct = resolved.settings.direct_conninfo
        if direct:
            # The direct DSN says where (host, port, user); the database stays Django's, so the
            # test runner's test database is the one migrated.
            dbname = params.pop("dbname", None)
            for key in ("host", "port", "user", "password", "service"):
                params.pop(key, None)
            params = {**params, "conninfo": direct}
            if dbname is not None:
                params["dbname"] = dbname
        params["cursor_factory"] = resolved.cursor_class
        self._pg_source = None
        return GuardedConnection.connect(**params)

    def ensure_timezone(self) -> bool:
        # Django's own pooled backend closes the pool here; checking the one connection in
        # hand is enough, because every checkout checks again (_pg_prepare).
        if self.connection is None:
            return False
        if self._pg_source is None:
            return bool(self._configure_timezone(self.connection))
        before = self.connection.info.parameter_status("TimeZone")
        self._pg_prepare(self.connection, fresh=False)
        return bool(before != self.connection.info.parameter_status("TimeZone"))

    def _close(self) -> None:
        conn = self.connection
        pool = self._pg_source
        if conn is None or pool is None:
            super()._close()
            return
        self._pg_source = None
        self.connection = None  # back in the pool: this wrapper must not touch it again
        if conn.isolation_level is not None and conn.info.transaction_status == _IDLE:
            conn.isolation_level = None  # what get_new_connection set: keep the fast return
        with self.wrap_database_errors:
            pool.putconn(conn)

    def close_if_unusable_or_obsolete(self) -> None:
        # Called at the start and end of every request.  A pooled connection goes back to the
        # pool then, unless persistent connections are asked for (CONN_MAX_AGE != 0) and giving
        # it back would help nobody right now (_pg_keep_across_requests); Django's own checks
        # (autocommit restored, errors, CONN_MAX_AGE reached) then decide, as for its backend.
        if self._pg_source is not None and not self._pg_keep_across_requests():
            self.close()
        else:
            super().close_if_unusable_or_obsolete()

    def _pg_keep_across_requests(self) -> bool:
        """Keep the connection for this thread's next request: nothing else waits for it."""
        pool = self._pg_source
        if (
            pool is None
            or self.settings_dict["CONN_MAX_AGE"] == 0
            # The watchdog would take a connection parked between requests for a leak; with its
            # leak checks off (test runs turn them off) persistence is the caller's choice.
            or pool.settings.leak_threshold
            or pool.settings.leak_reclaim_after
            or self.in_atomic_block
            or self.connection.info.transaction_status != _IDLE
            # Under ASGI this wrapper serves one request and is then dropped, connection and all.
            or in_asgi_request()
        ):
            return False
        stats = pool.stats()
        idle = stats["db.client.connection.count"]["idle"]
        used = stats["db.client.connection.count"]["used"]
        room: bool = idle > 0 or used < stats["db.client.connection.max"]
        return room and stats["db.client.connection.pending_requests"] == 0

    def close_if_health_check_failed(self) -> None:
        # Django's check, once per request, for a connection kept across requests; one fresh
        # from the pool was checked by the pool (health_check, from CONN_HEALTH_CHECKS).
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        if not self.is_usable():
            self.connection.close()  # never back on the shelf: the pool drops a closed one
            self.close()
        self.health_check_done = True

    @cached_property  # type: ignore[untyped-decorator]
    def wrap_database_errors(self) -> ErrorWrapper:
        return ErrorWrapper(self)

    def make_cursor(self, cursor: Any) -> Any:
        return CursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> Any:
        return CursorDebugWrapper(cursor, self)

    @async_unsafe  # type: ignore[untyped-decorator]
    def chunked_cursor(self) -> Any:
        # Derived from the pool's effective mode on every call (mode="auto" decides it when
        # the pool opens and may switch it later), never written into settings_dict (which
        # Django shares between every wrapper of the alias and keeps when the mode changes).
        # Behind a transaction pooler a server-side cursor may only live inside one
        # transaction: outside atomic() Django declares it WITH HOLD, and the next FETCH may
        # reach another server session.  A client-side cursor reads the same rows.
        if self.alias != NO_DB_ALIAS and not self.in_atomic_block:
            self.ensure_connection()  # an auto pool finds its mode as it opens
            pool = self._pg_source
            if pool is not None and pool.effective_mode == "transaction":
                return self.cursor()
        return super().chunked_cursor()


def _use_tz() -> bool:
    from django.conf import settings  # type: ignore[import-untyped]

    return bool(settings.USE_TZ)


@contextmanager
def direct_connection(using: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """Within the block, ``connections[using]`` bypasses the pool (``manage.py migrate`` does).

    It connects to the direct DSN (``OPTIONS["poolguard"]["direct_dsn"]`` or ``DIRECT_URL``),
    to the same database NAME: migrations want a real session, not a transaction-mode pooler.
    Without a direct DSN it changes nothing.
    """
    wrapper = connections[using]
    if (
        not isinstance(wrapper, DatabaseWrapper)
        or wrapper._pg_direct
        or not wrapper._pg_resolved().settings.direct_conninfo
    ):
        yield  # nothing to switch to: the pool's connections are the direct ones
        return
    wrapper.close()
    wrapper._pg_direct = True
    try:
        yield
    finally:
        wrapper.close()
        wrapper._pg_direct = False


def _after_fork() -> None:
    """In a forked child: forget every inherited connection without touching its socket."""
    global _lock
    _lock = threading.Lock()
    for wrapper in list(_wrappers):
        if wrapper.connection is not None:
            # Not close(): that would end the parent's session.  psycopg never closes, on
            # garbage collection, a connection another process opened.
            wrapper.connection = None
            wrapper._pg_source = None


_state.at_fork(_after_fork)


def pool_for(using: str = DEFAULT_DB_ALIAS) -> GuardedPool:
    """The poolguard pool behind ``DATABASES[using]``: ``.stats()``, ``.checkouts()``..."""
    pool = connections[using].pool
    if not isinstance(pool, GuardedPool):
        raise ImproperlyConfigured(f"DATABASES[{using!r}] does not use ENGINE 'poolguard.django'")
    return pool
