"""Django's cursor wrappers, each telling its poolguard connection what it runs.

``pg_observe`` keeps the last statement (leak reports show it) and feeds the session-state
guard.  It sits in Django's CursorWrapper, the one layer every ORM and ``connection.cursor()``
statement passes, rather than in the psycopg cursor class: the connection's ``cursor_factory``
then stays exactly Django's (or ``OPTIONS["cursor_factory"]``), so code that checks it sees
what it configured.  It costs one Python call per execute (benchmarks/bench_django.py).
"""

from __future__ import annotations

from typing import Any

from django.db.backends import utils  # type: ignore[import-untyped]
from django.db.backends.postgresql import base as pg  # type: ignore[import-untyped]


class _Observing:
    """Tells the poolguard connection each statement (last statement, session-state guard)."""

    cursor: Any

    def execute(self, sql: Any, params: Any = None) -> Any:
        self.cursor.connection.pg_observe(sql)
        return super().execute(sql, params)  # type: ignore[misc]

    def executemany(self, sql: Any, param_list: Any) -> Any:
        self.cursor.connection.pg_observe(sql)
        return super().executemany(sql, param_list)  # type: ignore[misc]


class CursorWrapper(_Observing, utils.CursorWrapper):  # type: ignore[misc]
    """Django's cursor wrapper, observed."""


class CursorDebugWrapper(_Observing, pg.CursorDebugWrapper):  # type: ignore[misc]
    """Django's PostgreSQL cursor wrapper that logs queries (DEBUG, assertNumQueries), observed."""


def cursor_class(options: Any) -> type:
    """The psycopg cursor class Django itself would use for these ``OPTIONS``."""
    if options.get("cursor_factory") is not None:
        chosen: type = options["cursor_factory"]
        return chosen
    django_class: type = (
        pg.ServerBindingCursor if options.get("server_side_binding") is True else pg.Cursor
    )
    return django_class
