"""Django's cursor classes, each telling its poolguard connection what it runs.

``_pg_observe`` keeps the last statement (leak reports show it) and feeds the session-state
guard; it costs one Python call per execute (benchmarks/bench_django.py measures it).
"""

from __future__ import annotations

import functools
from typing import Any

from django.db.backends.postgresql import base as pg  # type: ignore[import-untyped]


class _Observed:
    """Tells the poolguard connection each statement (last statement, session-state guard)."""

    _conn: Any

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        self._conn._pg_observe(query)
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        self._conn._pg_observe(query)
        return super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]


class Cursor(_Observed, pg.Cursor):  # type: ignore[misc]
    """Django's default cursor (client-side binding), observed."""


class ServerBindingCursor(_Observed, pg.ServerBindingCursor):  # type: ignore[misc]
    """Django's ``server_side_binding`` cursor, observed."""


@functools.cache
def observed(cursor_class: type) -> type:
    """``cursor_class`` (an ``OPTIONS["cursor_factory"]``) with statements observed."""
    if issubclass(cursor_class, _Observed):
        return cursor_class
    return type(cursor_class.__name__, (_Observed, cursor_class), {"__module__": __name__})
