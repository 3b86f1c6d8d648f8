"""The connection budget: how many real connections each process may hold.

PostgreSQL refuses a connection outright (SQLSTATE 53300) once ``max_connections`` is reached,
minus the slots kept for superusers (``superuser_reserved_connections``) and, from PostgreSQL
16, for roles with pg_use_reserved_connections (``reserved_connections``). Every process of an
application owns its own pool, so the figure that must fit is ``max_size x processes``, next to
what a pooler's server connections and other applications take. The math is pure
(:func:`compute_budget`); :func:`read_server_limits` fetches the figures from a live
connection, directly or through a pooler, and sorts the sessions it sees into this app's, the
pooler's and everyone else's.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import psycopg

from ._errors import ConfigurationError, PoolGuardWarning
from ._workers import detect_workers

__all__ = [
    "Budget",
    "BudgetUnavailable",
    "BudgetWarning",
    "ServerLimits",
    "SessionGroup",
    "check_budget_on_open",
    "compute_budget",
    "read_server_limits",
    "resolve_processes",
    "resolve_processes_source",
]

logger = logging.getLogger("poolguard")

#: The environment variable Gunicorn, Uvicorn and most PaaS buildpacks *read* as their default
#: worker count (nothing sets it for you).
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
_SESSIONS_QUERY: Final = (
    "SELECT pid, host(client_addr), application_name, state, "
    "EXTRACT(EPOCH FROM now() - backend_start)::float8, pid = pg_catalog.pg_backend_pid() "
    "FROM pg_catalog.pg_stat_activity "
    "WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL))"
)
# PostgreSQL's default, assumed only when the server will not say.
_DEFAULT_SUPERUSER_RESERVED: Final = 3
#: Where a unix-socket session comes from (pg_stat_activity's client_addr is NULL).
LOCAL_SOCKET: Final = "local socket"


class BudgetUnavailable(psycopg.OperationalError):
    """max_connections could not be read from the server; the message says why."""


class BudgetWarning(PoolGuardWarning):
    """max_size x processes does not fit the server's connection limit."""


BudgetUnavailable.__module__ = "poolguard"
BudgetWarning.__module__ = "poolguard"


@dataclass(frozen=True, slots=True)
class SessionGroup:
    """Server sessions from one client address with one application_name."""

    #: "app" (this application's pools), "pooler" (a pooler's server connections) or "other".
    kind: str
    #: The client address, or LOCAL_SOCKET.
    client: str
    application_name: str
    count: int
    #: Sessions per state ("active", "idle", "idle in transaction", ...).
    states: Mapping[str, int] = field(default_factory=dict)
    #: Seconds since the oldest of them connected.
    oldest_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "client": self.client,
            "application_name": self.application_name,
            "count": self.count,
            "states": dict(self.states),
            "oldest_seconds": self.oldest_seconds,
        }


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The server's connection figures at one moment."""

    max_connections: int
    superuser_reserved_connections: int
    #: PostgreSQL 16+; 0 on older servers, which have no such setting.
    reserved_connections: int = 0
    #: Client connections open now that belong to other applications (neither this app's
    #: pools nor a pooler's server connections).
    in_use: int = 0
    #: What could not be read and was assumed instead, for display.
    notes: tuple[str, ...] = ()
    #: Connections this application's pools hold now (all processes, all hosts).
    own: int = 0
    #: A pooler's server connections open now.
    pooler: int = 0
    #: Every session seen, grouped by kind, client address and application_name.
    groups: tuple[SessionGroup, ...] = ()


@dataclass(frozen=True, slots=True)
class Budget:
    """The result of :func:`compute_budget`; every figure a report needs."""

    limits: ServerLimits
    processes: int
    #: Connections each process may open: the sum of its pools' max_size.
    max_size: int
    #: Slots deliberately left free (migrations, a shell, cron jobs).
    headroom: int = 0
    #: Server connections a pooler may hold (its configured pools when known, else what it
    #: holds now): they are not this app's to take.
    pooler_bound: int = 0
    #: How the pooler bound was found, for the formula.
    pooler_text: str = ""
    #: Where `processes` came from ("declared", "gunicorn --workers 3 (pid 12)", ...).
    processes_source: str = "declared"
    #: (pool label, max_size) when a process runs more than one pool on this server.
    pools: tuple[tuple[str, int], ...] = ()
    #: The app reaches the server through a transaction pooler: its pools are the pooler's
    #: clients, so the pooler's own pools (`pooler_bound`) must fit the server and the app's
    #: demand must fit the pooler's `max_client_conn` (when known).
    through_pooler: bool = False
    max_client_conn: int | None = None
    #: The pooler's (database, user) pairs, for its pool size advice.
    pooler_pairs: int = 0

    @property
    def usable(self) -> int:
        """Slots this app and its pooler may take, never negative."""
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
    def available(self) -> int:
        """Usable slots left for the app's own pools once the pooler's are set aside."""
        return max(0, self.usable - self.pooler_bound)

    @property
    def per_process(self) -> int:
        """The most connections each process can have so that all of them fit."""
        return self.available // self.processes

    @property
    def demand(self) -> int:
        return self.max_size * self.processes

    @property
    def server_fits(self) -> bool:
        """Through a pooler: the pooler's pools fit the server."""
        return self.pooler_bound <= self.usable

    @property
    def client_fits(self) -> bool:
        """Through a pooler: the app's connections fit the pooler's max_client_conn."""
        return self.max_client_conn is None or self.demand <= self.max_client_conn

    @property
    def fits(self) -> bool:
        if self.through_pooler:
            return self.server_fits and self.client_fits
        return self.demand <= self.available

    @property
    def pooler_pool_size(self) -> int:
        """The safe default_pool_size: (max_connections - 5) / pairs, within the usable slots."""
        pairs = max(1, self.pooler_pairs)
        return max(1, min(self.limits.max_connections - 5, self.usable) // pairs)

    def suggested_sizes(self, cores: int | None = None) -> dict[str, int]:
        """max_size per pool: the declared one when it fits, else scaled down to fit.

        Never more than declared (the doctor does not hand a process the whole server), and
        with `cores` never more than cores x 2 busy connections across all processes.
        """
        pools = self.pools or (("default", self.max_size),)
        if self.through_pooler:
            # Clients of a pooler are cheap; only its max_client_conn bounds them.
            limit = self.max_size
            if self.max_client_conn is not None:
                limit = min(limit, max(1, self.max_client_conn // self.processes))
            cores = None
        else:
            limit = min(self.max_size, self.per_process)
        if cores:
            limit = min(limit, max(1, cores * 2 // self.processes))
        if limit >= self.max_size:
            return dict(pools)
        return {label: max(1, size * limit // self.max_size) for label, size in pools}

    def formula(self) -> str:
        """The math with the numbers filled in, one step per line."""
        lim = self.limits
        terms = [
            f"max_connections {lim.max_connections}",
            f"superuser_reserved_connections {lim.superuser_reserved_connections}",
            f"reserved_connections {lim.reserved_connections}",
            f"other apps {lim.in_use}",
        ]
        if self.headroom:
            terms.append(f"headroom {self.headroom}")
        lines = [f"usable      = {' - '.join(terms)} = {self.usable}"]
        if lim.own:
            lines.append(
                f"this app    = {lim.own} held now by its pools (part of its demand, not "
                "subtracted)"
            )
        sizes = (
            " + ".join(f"{size} ({label})" for label, size in self.pools) + f" = {self.max_size}"
            if len(self.pools) > 1
            else f"{self.max_size}"
        )
        demand = f"max_size {sizes} x processes {self.processes} = {self.demand}"
        verdict = "fits" if self.fits else "does NOT fit"
        if self.through_pooler:
            fits, rel = ("fits", "<=") if self.server_fits else ("does NOT fit", ">")
            lines.append(
                f"server side = {self.pooler_text or 'pooler'} = {self.pooler_bound} {rel} "
                f"usable {self.usable}: {fits} ({lim.pooler} open now)"
            )
            if self.max_client_conn is None:
                lines.append(f"client side = {demand}: max_client_conn unknown, not checked")
            else:
                fits, rel = ("fits", "<=") if self.client_fits else ("does NOT fit", ">")
                lines.append(
                    f"client side = {demand} {rel} max_client_conn {self.max_client_conn}: {fits}"
                )
        elif self.pooler_bound or lim.pooler:
            relation = "<=" if self.fits else ">"
            lines += [
                f"pooler      = {self.pooler_text or f'{lim.pooler} server connections held now'}"
                f" = {self.pooler_bound}",
                f"demand      = {demand}",
                f"total       = demand {self.demand} + pooler {self.pooler_bound} = "
                f"{self.demand + self.pooler_bound} {relation} usable {self.usable}: {verdict}",
                f"per process = (usable {self.usable} - pooler {self.pooler_bound}) / processes "
                f"{self.processes} = {self.per_process} (rounded down)",
            ]
        else:
            relation = "<=" if self.fits else ">"
            lines += [
                f"demand      = {demand} {relation} usable {self.usable}: {verdict}",
                f"per process = usable {self.usable} / processes {self.processes} "
                f"= {self.per_process} (rounded down)",
            ]
        lines.append(f"processes   = {self.processes}: {self.processes_source}")
        return "\n".join(lines)

    def advice(self) -> str:
        """One sentence on what to do, for a warning or the doctor."""
        if self.through_pooler:
            return self._pooler_advice()
        if self.fits:
            return (
                f"{self.processes} process(es) x max_size {self.max_size} = {self.demand} "
                f"fits: {self.demand} of {self.usable} usable connections"
                + (f" (the pooler may hold {self.pooler_bound})" if self.pooler_bound else "")
            )
        if self.per_process == 0:
            return (
                f"no connection slot is left for {self.processes} process(es): only "
                f"{self.available} of {self.usable} usable connections are free for this app; "
                "free connections or raise max_connections"
            )
        return (
            f"{self.processes} process(es) x max_size {self.max_size} = {self.demand} exceeds "
            f"the {self.available} usable connections: set max_size <= {self.per_process} "
            "or run fewer processes"
        )

    def _pooler_advice(self) -> str:
        parts = []
        if self.server_fits:
            parts.append(
                f"the pooler's pools ({self.pooler_bound} server connections at most) fit "
                f"the {self.usable} usable connections"
            )
        else:
            parts.append(
                f"the pooler's pools may open {self.pooler_bound} server connections but only "
                f"{self.usable} are usable: set default_pool_size <= {self.pooler_pool_size} "
                f"((max_connections {self.limits.max_connections} - 5, at most usable "
                f"{self.usable}) / pairs {max(1, self.pooler_pairs)})"
            )
        if self.max_client_conn is not None and self.client_fits:
            parts.append(
                f"{self.processes} process(es) x max_size {self.max_size} = {self.demand} "
                f"clients fit max_client_conn {self.max_client_conn}"
            )
        elif self.max_client_conn is not None:
            parts.append(
                f"{self.processes} process(es) x max_size {self.max_size} = {self.demand} "
                f"clients exceed max_client_conn {self.max_client_conn}: the pooler refuses the "
                f"rest; set max_client_conn >= {self.demand} (clients are cheap for the pooler)"
            )
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "through_pooler": self.through_pooler,
            "max_client_conn": self.max_client_conn,
            "server_fits": self.server_fits,
            "client_fits": self.client_fits,
            "max_connections": lim.max_connections,
            "superuser_reserved_connections": lim.superuser_reserved_connections,
            "reserved_connections": lim.reserved_connections,
            "in_use_by_others": lim.in_use,
            "held_by_this_app": lim.own,
            "held_by_pooler": lim.pooler,
            "pooler_bound": self.pooler_bound,
            "headroom": self.headroom,
            "usable": self.usable,
            "available": self.available,
            "processes": self.processes,
            "processes_source": self.processes_source,
            "max_size": self.max_size,
            "pools": dict(self.pools),
            "demand": self.demand,
            "per_process": self.per_process,
            "fits": self.fits,
            "formula": self.formula(),
            "advice": self.advice(),
            "notes": list(lim.notes),
        }


def resolve_processes(
    processes: int | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """The number of processes sharing the server; see :func:`resolve_processes_source`."""
    return resolve_processes_source(processes, environ)[0]


def resolve_processes_source(
    processes: int | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    detect: bool = True,
) -> tuple[int, str]:
    """(processes, where the number came from).

    `processes` when given; else the worker count read from this process's server (gunicorn,
    uvicorn, celery: see ``_workers``); else $WEB_CONCURRENCY; else 1, said to be a guess.
    """
    if processes is not None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigurationError(
                f"processes={processes!r}: must be a whole number >= 1 (the worker processes "
                "that each open their own pool)"
            )
        return processes, "declared"
    env = os.environ if environ is None else environ
    found = detect_workers(environ=env) if detect else None
    if found is not None:
        return found.count, found.source
    raw = env.get(PROCESSES_ENV, "").strip()
    if not raw:
        return 1, "not detected: assumed 1 (declare processes= or --processes)"
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(
            f"{PROCESSES_ENV}={raw!r}: must be a whole number >= 1 (the number of worker "
            "processes); fix the variable or pass processes= explicitly"
        )
    return int(raw), PROCESSES_ENV


def compute_budget(
    limits: ServerLimits,
    *,
    max_size: int,
    processes: int | None = None,
    headroom: int = 0,
    environ: Mapping[str, str] | None = None,
    pooler_bound: int | None = None,
    pooler_text: str = "",
    pools: tuple[tuple[str, int], ...] = (),
    processes_source: str | None = None,
    through_pooler: bool = False,
    max_client_conn: int | None = None,
    pooler_pairs: int = 0,
) -> Budget:
    """Fit `max_size` connections per process x `processes` into the server's limits.

    `pooler_bound`: server connections a pooler may hold (default: what it holds now).
    """
    if max_size < 1:
        raise ConfigurationError(f"max_size={max_size!r}: must be >= 1")
    if headroom < 0:
        raise ConfigurationError(f"headroom={headroom!r}: must be >= 0")
    count, source = resolve_processes_source(processes, environ)
    return Budget(
        limits,
        count,
        max_size,
        headroom,
        pooler_bound=limits.pooler if pooler_bound is None else pooler_bound,
        pooler_text=pooler_text,
        processes_source=processes_source or source,
        pools=pools,
        through_pooler=through_pooler,
        max_client_conn=max_client_conn,
        pooler_pairs=pooler_pairs,
    )


def read_server_limits(
    conn: psycopg.Connection[Any],
    *,
    exclude_application_name: str | None = None,
    own_application_names: Collection[str] = (),
    pooler_pids: Collection[int] = (),
    pooler_clients: Collection[str] = (),
    skip_application_names: Collection[str] = (),
) -> ServerLimits:
    """Read the connection figures through `conn` (direct, or through a pooler).

    Sessions are sorted into this app's (application_name `exclude_application_name` or one
    of `own_application_names`; a name ending in ``*`` is a prefix), a pooler's (backend pid in
    `pooler_pids`, from its admin console, or client address in `pooler_clients`) and other
    apps'; only the last are ``in_use``. Sessions named in `skip_application_names` (the
    reader's own, closing as it reads) are not counted unless they are the pooler's.
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
        notes.append(f"pg_settings unreadable ({error_reason(exc)}); used SHOW")
        for name in ("max_connections", "superuser_reserved_connections"):
            try:
                settings[name] = int(_query(conn, f"SHOW {name}")[0][0])
            except psycopg.Error as show_exc:
                if name == "max_connections":
                    raise BudgetUnavailable(
                        f"cannot read max_connections through this connection "
                        f"({error_reason(show_exc)}); run `poolguard doctor` against the "
                        "direct DSN to see the budget"
                    ) from show_exc
    if "max_connections" not in settings:
        raise BudgetUnavailable("the server did not report max_connections")
    if "superuser_reserved_connections" not in settings:
        notes.append(
            f"superuser_reserved_connections unreadable; assumed {_DEFAULT_SUPERUSER_RESERVED}"
        )
    own_names = [*own_application_names]
    if exclude_application_name:
        own_names.append(exclude_application_name)
    try:
        sessions = _query(conn, _SESSIONS_QUERY)
    except psycopg.Error as exc:
        sessions = []
        notes.append(f"pg_stat_activity unreadable ({error_reason(exc)}); assumed 0 in use")
    groups = _group(
        sessions, own_names, set(pooler_pids), set(pooler_clients), set(skip_application_names)
    )
    counts = {kind: sum(g.count for g in groups if g.kind == kind) for kind in _KINDS}
    return ServerLimits(
        max_connections=settings["max_connections"],
        superuser_reserved_connections=settings.get(
            "superuser_reserved_connections", _DEFAULT_SUPERUSER_RESERVED
        ),
        reserved_connections=settings.get("reserved_connections", 0),
        in_use=counts["other"],
        notes=tuple(notes),
        own=counts["app"],
        pooler=counts["pooler"],
        groups=groups,
    )


_KINDS: Final = ("app", "pooler", "other")


def _is_own(application_name: str, own_names: Collection[str]) -> bool:
    return any(
        application_name.startswith(name[:-1]) if name.endswith("*") else application_name == name
        for name in own_names
    )


def _group(
    sessions: list[Any],
    own_names: Collection[str],
    pooler_pids: set[int],
    pooler_clients: set[str],
    skip: set[str],
) -> tuple[SessionGroup, ...]:
    found: dict[tuple[str, str, str], tuple[int, dict[str, int], float]] = {}
    for pid, client, app, state, age, mine in sessions:
        if mine and pid not in pooler_pids:
            continue  # the reader itself; through a pooler it is one of the pooler's servers
        client = client or LOCAL_SOCKET
        app = app or ""
        if pid in pooler_pids or client in pooler_clients:
            kind = "pooler"
        elif app in skip:
            continue
        elif _is_own(app, own_names):
            kind = "app"
        else:
            kind = "other"
        count, states, oldest = found.get((kind, client, app), (0, {}, 0.0))
        key_state = state or "unknown"
        states[key_state] = states.get(key_state, 0) + 1
        found[(kind, client, app)] = (count + 1, states, max(oldest, float(age or 0.0)))
    return tuple(
        SessionGroup(kind, client, app, count, states, round(oldest, 1))
        for (kind, client, app), (count, states, oldest) in sorted(
            found.items(), key=lambda item: (_KINDS.index(item[0][0]), -item[1][0], item[0])
        )
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
        logger.info("pool %r: connection budget not checked: %s", pool_name, error_reason(exc))
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


def error_reason(exc: psycopg.Error) -> str:
    """The first line of a server error, without connection details."""
    text = str(exc).strip().splitlines()
    sqlstate = getattr(exc, "sqlstate", None)
    first = text[0] if text else type(exc).__name__
    return f"{sqlstate}: {first}" if sqlstate else first
