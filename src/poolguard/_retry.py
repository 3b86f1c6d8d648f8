"""Run a statement once more after an error that says a prepared statement, not the SQL, failed.

The statement never ran, so running it again loses nothing, provided the connection was idle
before it: in autocommit, or the first statement of the transaction psycopg opened for it
(rolled back first).  Inside a transaction the caller started, earlier statements would be
lost, so the error goes to the caller as it came.

- 26000 "prepared statement "_pg3_0" does not exist" and 42P05 "... already exists" on one
  of psycopg's own statements: a pooler now answers in front of the server (a failover, a new
  sidecar).  An auto pool switches to transaction mode (RouteState.switch) and the statement
  runs unprepared; on a pool configured with mode="session" the error is the caller's.
- 0A000 "cached plan must not change result type": DDL changed what a prepared statement
  returns (pgbouncer#1038).  The connection's prepared statements are dropped: a rollback or a
  DEALLOCATE ALL, both of which make psycopg forget its own; it prepares them again later.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg.abc import Params, Query
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.rows import Row

from ._connection import AsyncGuardedCursor, GuardedCursor

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncRetryingCursor", "RetryingCursor", "retry_steps"]

logger = logging.getLogger("poolguard")

_IDLE = TransactionStatus.IDLE
_INERROR = TransactionStatus.INERROR
_PIPELINE_OFF = PipelineStatus.OFF
_GONE: Final = frozenset({"26000", "42P05"})  # does not exist / already exists
_STALE_PLAN: Final = "0A000"
_STALE_PLAN_MESSAGE: Final = "cached plan must not change result type"
# psycopg names the statements it prepares "_pg3_<n>"; the app's own PREPARE names are not ours
# to retry around.
_PSYCOPG_NAME: Final = '"_pg3_'
_DEALLOCATE_ALL: Final = b"DEALLOCATE ALL"


def retry_steps(conn: Any, exc: psycopg.Error, was_idle: bool) -> tuple[str, ...] | None:
    """What to do before running the failed statement again, or None to raise ``exc``.

    Steps: "rollback" (the failed implicit transaction) and "deallocate" (DEALLOCATE ALL).
    Switches an auto pool to transaction mode when the error says a pooler answers.
    """
    if not was_idle or conn.prepare_threshold is None:  # nothing of psycopg's prepared
        return None
    if conn.pgconn.pipeline_status != _PIPELINE_OFF:
        return None  # later statements of the pipeline failed with it
    message = exc.diag.message_primary or ""
    rollback = ("rollback",) if conn.pgconn.transaction_status == _INERROR else ()
    if exc.sqlstate in _GONE and _PSYCOPG_NAME in message:
        routes = conn.pg_routes
        if routes is None or not routes.auto:
            return None
        routes.switch(f"a statement failed with SQLSTATE {exc.sqlstate} ({message})")
        conn.pg_demote()
        return rollback
    if exc.sqlstate == _STALE_PLAN and message == _STALE_PLAN_MESSAGE:
        logger.info(
            "a prepared statement's result type changed (DDL): its connection's prepared "
            "statements are dropped and the statement runs again"
        )
        return rollback or ("deallocate",)
    return None


def _was_idle(conn: Any) -> bool:
    return bool(conn.pgconn.transaction_status == _IDLE)


class RetryingCursor(GuardedCursor[Row]):
    """GuardedCursor that runs a statement once more after a prepared-statement error."""

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        conn = self._conn
        idle = _was_idle(conn)
        try:
            return super().execute(query, params, prepare=prepare, binary=binary)
        except psycopg.Error as exc:
            steps = retry_steps(conn, exc, idle)
            if steps is None:
                raise
            try:
                for step in steps:
                    if step == "rollback":
                        conn.rollback()
                    else:
                        psycopg.Cursor(conn).execute(_DEALLOCATE_ALL)
            except psycopg.Error:
                raise exc from None  # the caller's error, not the clean-up's
        return super().execute(query, params, prepare=prepare, binary=binary)


class AsyncRetryingCursor(AsyncGuardedCursor[Row]):
    """AsyncGuardedCursor that runs a statement once more after a prepared-statement error."""

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        conn = self._conn
        idle = _was_idle(conn)
        try:
            return await super().execute(query, params, prepare=prepare, binary=binary)
        except psycopg.Error as exc:
            steps = retry_steps(conn, exc, idle)
            if steps is None:
                raise
            try:
                for step in steps:
                    if step == "rollback":
                        await conn.rollback()
                    else:
                        await psycopg.AsyncCursor(conn).execute(_DEALLOCATE_ALL)
            except psycopg.Error:
                raise exc from None
        return await super().execute(query, params, prepare=prepare, binary=binary)
