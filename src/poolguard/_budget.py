"""The connection budget: how many real connections each process may hold.

PostgreSQL refuses a connection outright (SQLSTATE 53300) once ``max_connections`` is reached,
minus the slots kept for superusers (``superuser_reserved_connections``) and, from PostgreSQL
16, for roles with pg_use_reserved_connections (``reserved_connections``). Every process of an
application owns its own pool, so the figure that must fit is ``max_size x processes``. The
math is pure (:func:`compute_budget`); :func:`read_server_limits` fetches the figures from a
live connection, directly or through a pooler.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import psycopg

from ._errors import ConfigurationError, PoolGuardWarning

__all__ = [
    "Budget",
    "BudgetUnavailable",
    "BudgetWarning",
    "ServerLimits",
    "check_budget_on_open",
    "compute_budget",
    "read_server_limits",
    "resolve_processes",
]

logger = logging.getLogger("poolguard")

#: The environment variable Gunicorn, Uvicorn and most PaaS buildpacks use for worker count.
PROCESSES_ENV: Final = "WEB_CONCURRENCY"

_SETTINGS_QUERY: Final = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE name IN "
    "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
)
# Only client backends take max_connections slots; autovacuum, WAL senders and background
# workers have their own limits. The caller's own backend is not "someone else". A role
# without pg_read_all_stats sees other users' sessions with backend_type NULL, but still
# with their database (server processes have none): those count too, erring on the safe
# side (a hidden autovacuum worker is counted as a client).
_IN_USE_QUERY: Final = (
    "SELECT count(*) FROM pg_catalog.pg_stat_activity "
    "WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL)) "
    "AND pid <> pg_catalog.pg_backend_pid() "
    "AND application_name IS DISTINCT FROM %s"
)
# PostgreSQL's default, assumed only when the server will not say.
_DEFAULT_SUPERUSER_RESERVED: Final = 3


class BudgetUnavailable(psycopg.OperationalError):
    """max_connections could not be read from the server; the message says why."""


class BudgetWarning(PoolGuardWarning):
    """max_size x processes does not fit the server's connection limit."""


BudgetUnavailable.__module__ = "poolguard"
BudgetWarning.__module__ = "poolguard"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The server's connection figures at one moment."""

    max_connections: int
    superuser_reserved_connections: int
    #: PostgreSQL 16+; 0 on older servers, which have no such setting.
    reserved_connections: int = 0
    #: Client connections open now that belong to someone else (other apps, other processes
    #: of this one, a pooler's server connections).
    in_use: int = 0
    #: What could not be read and was assumed instead, for display.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Budget:
    """The result of :func:`compute_budget`; every figure a report needs."""

    limits: ServerLimits
    processes: int
    max_size: int
    #: Slots deliberately left free (migrations, a shell, cron jobs).
    headroom: int = 0

    @property
    def usable(self) -> int:
        """Slots an application may take now, never negative."""
        lim = self.limits
        free = (
            lim.max_connections
            - lim.superuser_reserved_connections
            - lim.reserved_connections
            - lim.in_use
            - self.headroom
        )
        return max(0, free)

    @property
    def per_process(self) -> int:
        """The largest max_size each process can have so that all of them fit."""
        return self.usable // self.processes

    @property
    def demand(self) -> int:
        return self.max_size * self.processes

    @property
    def fits(self) -> bool:
        return self.demand <= self.usable

    def formula(self) -> str:
        """The math with the numbers filled in, one step per line."""
        lim = self.limits
        terms = [
            f"max_connections {lim.max_connections}",
            f"superuser_reserved_connections {lim.superuser_reserved_connections}",
            f"reserved_connections {lim.reserved_connections}",
            f"in use by others {lim.in_use}",
        ]
        if self.headroom:
            terms.append(f"headroom {self.headroom}")
        verdict = "fits" if self.fits else "does NOT fit"
        relation = "<=" if self.fits else ">"
        return "\n".join(
            [
                f"usable      = {' - '.join(terms)} = {self.usable}",
                f"per process = usable {self.usable} / processes {self.processes} "
                f"= {self.per_process} (rounded down)",
                f"demand      = max_size {self.max_size} x processes {self.processes} "
                f"= {self.demand} {relation} usable {self.usable}: {verdict}",
            ]
        )

    def advice(self) -> str:
        """One sentence on what to do, for a warning or the doctor."""
        if self.fits:
            return (
                f"{self.processes} process(es) x max_size {self.max_size} = {self.demand} "
                f"fits in {self.usable} usable connections"
            )
        if self.per_process == 0:
            return (
                f"no connection slot is left for {self.processes} process(es): only "
                f"{self.usable} usable; free connections, raise max_connections, or put a "
                "pooler (PgBouncer in transaction mode) in front"
            )
        return (
            f"{self.processes} process(es) x max_size {self.max_size} = {self.demand} exceeds "
            f"the {self.usable} usable connections: set max_size <= {self.per_process}, run "
            "fewer processes, or put a pooler (PgBouncer in transaction mode) in front"
        )

    def as_dict(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "max_connections": lim.max_connections,
            "superuser_reserved_connections": lim.superuser_reserved_connections,
            "reserved_connections": lim.reserved_connections,
            "in_use_by_others": lim.in_use,
            "headroom": self.headroom,
            "usable": self.usable,
            "processes": self.processes,
            "max_size": self.max_size,
            "demand": self.demand,
            "per_process": self.per_process,
            "fits": self.fits,
            "formula": self.formula(),
            "notes": list(lim.notes),
        }


def resolve_processes(
    processes: int | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """The number of processes sharing the server: `processes`, else $WEB_CONCURRENCY, else 1."""
    if processes is not None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigurationError(
                f"processes={processes!r}: must be a whole number >= 1 (the worker processes "
                "that each open their own pool)"
            )
        return processes
    raw = (os.environ if environ is None else environ).get(PROCESSES_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(
            f"{PROCESSES_ENV}={raw!r}: must be a whole number >= 1 (the number of worker "
            "processes); fix the variable or pass processes= explicitly"
        )
    return int(raw)


def compute_budget(
    limits: ServerLimits,
    *,
    max_size: int,
    processes: int | None = None,
    headroom: int = 0,
    environ: Mapping[str, str] | None = None,
) -> Budget:
    """Fit `max_size` connections per process x `processes` into the server's limits."""
    if max_size < 1:
        raise ConfigurationError(f"max_size={max_size!r}: must be >= 1")
    if headroom < 0:
        raise ConfigurationError(f"headroom={headroom!r}: must be >= 0")
    return Budget(limits, resolve_processes(processes, environ), max_size, headroom)


def read_server_limits(
    conn: psycopg.Connection[Any], *, exclude_application_name: str | None = None
) -> ServerLimits:
    """Read the connection figures through `conn` (direct, or through a pooler).

    `exclude_application_name`: connections with this application_name are not counted as in
    use by others (the sibling processes of a pool about to be sized).
    Raises :class:`BudgetUnavailable` when max_connections cannot be read at all; other
    figures that cannot be read are assumed and listed in ``notes``.
    """
    notes: list[str] = []
    settings: dict[str, int] = {}
    try:
        rows = _query(conn, _SETTINGS_QUERY)
        settings = {str(name): int(value) for name, value in rows}
    except psycopg.Error as exc:
        # Some poolers or restricted roles refuse pg_settings; SHOW is the same data.
        notes.append(f"pg_settings unreadable ({_reason(exc)}); used SHOW")
        for name in ("max_connections", "superuser_reserved_connections"):
            try:
                settings[name] = int(_query(conn, f"SHOW {name}")[0][0])
            except psycopg.Error as show_exc:
                if name == "max_connections":
                    raise BudgetUnavailable(
                        f"cannot read max_connections through this connection "
                        f"({_reason(show_exc)}); run `poolguard doctor` against the "
                        "direct DSN to see the budget"
                    ) from show_exc
    if "max_connections" not in settings:
        raise BudgetUnavailable("the server did not report max_connections")
    if "superuser_reserved_connections" not in settings:
        notes.append(
            f"superuser_reserved_connections unreadable; assumed {_DEFAULT_SUPERUSER_RESERVED}"
        )
    try:
        in_use = int(_query(conn, _IN_USE_QUERY, (exclude_application_name,))[0][0])
    except psycopg.Error as exc:
        in_use = 0
        notes.append(f"pg_stat_activity unreadable ({_reason(exc)}); assumed 0 in use")
    return ServerLimits(
        max_connections=settings["max_connections"],
        superuser_reserved_connections=settings.get(
            "superuser_reserved_connections", _DEFAULT_SUPERUSER_RESERVED
        ),
        reserved_connections=settings.get("reserved_connections", 0),
        in_use=in_use,
        notes=tuple(notes),
    )


def check_budget_on_open(
    conn: psycopg.Connection[Any],
    *,
    pool_name: str,
    max_size: int,
    processes: int | None = None,
    application_name: str | None = None,
    action: Literal["warn", "raise", "off"] = "warn",
) -> Budget | None:
    """The pool's open-time check: warn (or raise ConfigurationError) when the pool does not fit.

    `conn` is any connection the pool just opened; `application_name` is the pool's, so the
    connections of sibling processes (already counted by `processes`) are not also counted as
    someone else's. Returns None when nothing was checked: action "off", figures unreadable,
    or a pooler in between (its clients do not take server slots one for one).
    """
    if action == "off":
        return None
    try:
        row = _query(conn, "SELECT pg_catalog.pg_backend_pid()")[0]
        if row[0] != conn.info.backend_pid:
            logger.info(
                "pool %r: a pooler sits in front of the server; budget not checked", pool_name
            )
            return None
        limits = read_server_limits(conn, exclude_application_name=application_name)
    except (BudgetUnavailable, psycopg.Error) as exc:
        logger.info("pool %r: connection budget not checked: %s", pool_name, _reason(exc))
        return None
    budget = compute_budget(limits, max_size=max_size, processes=processes)
    if budget.fits:
        logger.info("pool %r: %s", pool_name, budget.advice())
        return budget
    message = f"pool {pool_name!r}: {budget.advice()}\n{budget.formula()}"
    if action == "raise":
        raise ConfigurationError(message)
    logger.warning("%s", message)
    warnings.warn(message, BudgetWarning, stacklevel=2)
    return budget


def _query(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[Any]:
    # prepare=False because a pooler may sit in between.
    if conn.autocommit:
        # Each statement is its own transaction: a refusal leaves nothing to clean up, and a
        # statement-mode pooler would refuse (and drop the connection on) a BEGIN.
        with conn.cursor() as cur:
            return cur.execute(query, params, prepare=False).fetchall()
    # A savepoint, or a transaction of its own, so a refused query leaves the caller's
    # transaction usable.
    with conn.transaction(), conn.cursor() as cur:
        return cur.execute(query, params, prepare=False).fetchall()


def _reason(exc: psycopg.Error) -> str:
    """The first line of a server error, without connection details."""
    text = str(exc).strip().splitlines()
    sqlstate = getattr(exc, "sqlstate", None)
    first = text[0] if text else type(exc).__name__
    return f"{sqlstate}: {first}" if sqlstate else first
