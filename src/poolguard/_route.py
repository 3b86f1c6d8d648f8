"""``mode="auto"``: what the path to PostgreSQL allows, found once when a pool opens.

Directly, through a session-mode pooler or through poolguard's own rewriter, a server
connection belongs to one client for its whole life: server-side prepared statements and
cursors are safe there, and prepared statements make a primary-key lookup about 1.4x faster.
Behind a transaction- or statement-mode pooler they break ("prepared statement "_pg3_0" does
not exist"), so the pool keeps transaction mode.  What cannot be told counts as a pooler.

The decision costs one query on the connection the pool opens anyway to check the budget; only
when something other than PostgreSQL answers it does the two-connection pooler probe run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Final, Literal

import psycopg

from ._probe import PoolerProbe, probe_first_hop, probe_pooler

__all__ = [
    "DIRECT_CHECK_SQL",
    "Route",
    "RouteState",
    "announced_elsewhere",
    "find_route",
    "rewriter_route",
    "route_from_probe",
]

logger = logging.getLogger("poolguard")

#: Paths on which a server connection stays with one client: prepared statements are safe.
_KEEPS_SERVER: Final = frozenset({"direct", "session", "rewriter"})

#: Run on each new connection of a pool that found PostgreSQL directly: a pooler that appears
#: at the same address later (a failover, a new sidecar) announces a pid of its own.
DIRECT_CHECK_SQL: Final = b"SELECT pg_catalog.pg_backend_pid()"


@dataclass(frozen=True)
class Route:
    """Where a pool's connections go, and why poolguard thinks so."""

    #: "direct", "session" (a session-mode pooler), "rewriter", "transaction", "statement" or
    #: "unknown".
    path: str
    evidence: tuple[str, ...] = ()

    @property
    def mode(self) -> Literal["session", "transaction"]:
        """The mode this path allows: "session" keeps prepared statements and server cursors."""
        return "session" if self.path in _KEEPS_SERVER else "transaction"

    def describe(self) -> str:
        reasons = "; ".join(self.evidence) or "no evidence"
        return f"{self.path} ({reasons})"


def rewriter_route() -> Route:
    return Route(
        "rewriter",
        ("poolguard's embedded rewriter keeps each client's prepared statements",),
    )


def find_route(conn: psycopg.Connection[object], conninfo: str) -> Route:
    """Decide on ``conn`` (open, idle, autocommit or not) where ``conninfo`` leads."""
    first = PoolerProbe()
    probe_first_hop(conn, first)
    if not first.proxied:
        return Route(
            "direct",
            (
                f"the server process {conn.info.backend_pid} answers the connection itself",
                *first.evidence,
            ),
        )
    try:
        found = probe_pooler(conninfo)
    except psycopg.Error as exc:  # whatever the pooler did, prepared statements are not safe
        return Route(
            "unknown",
            (*first.evidence, f"the pooler probe failed ({type(exc).__name__}): assumed a pooler"),
        )
    return route_from_probe(found)


def route_from_probe(found: PoolerProbe) -> Route:
    """The route the two-connection pooler probe (the doctor's) found."""
    known = ("direct", "session", "transaction", "statement")
    return Route(found.mode if found.mode in known else "unknown", tuple(found.evidence))


def announced_elsewhere(announced_pid: int, server_pid: object) -> bool:
    """True when a connection's announced pid is not its server process: a pooler answers."""
    return server_pid is None or int(str(server_pid)) != announced_pid


class RouteState:
    """The mode one pool's connections run in now, shared by the pool and its connections.

    A pool configured with mode="transaction" or "session" keeps it.  An auto pool starts in
    transaction mode (nothing is known yet), takes the route found when it opens, and switches
    to transaction mode once, for good, when a pooler shows up under it (:meth:`switch`).
    """

    __slots__ = ("_lock", "auto", "guard", "mode", "name", "route", "switched")

    def __init__(self, name: str, requested: str) -> None:
        self.name = name
        self.auto = requested == "auto"
        #: The mode connections use now; read on every decision, written only under _lock.
        self.mode: Literal["session", "transaction"] = (
            "session" if requested == "session" else "transaction"
        )
        #: What an auto pool found (None for a configured mode, and before the first open).
        self.route: Route | None = None
        #: Set once an auto pool left session mode: checkouts then look at each connection.
        self.switched = False
        #: The session-state guard connections use in transaction mode (None: guard="off").
        self.guard: Any = None
        self._lock = threading.Lock()

    def decided(self, route: Route) -> None:
        """An auto pool's probe found ``route`` (on each open; the first switch sticks)."""
        with self._lock:
            if self.switched:
                return
            self.route, self.mode = route, route.mode
        logger.info(
            "pool %r: mode='auto' uses %s mode: the path is %s",
            self.name,
            route.mode,
            route.describe(),
        )

    def switch(self, why: str) -> bool:
        """A pooler answers where PostgreSQL did: transaction mode from now on.

        True for the call that switched (it logs the one WARNING), False when the pool was in
        transaction mode already or is not an auto pool.
        """
        with self._lock:
            if not self.auto or self.mode == "transaction":
                return False
            before = self.route.describe() if self.route else "not probed"
            self.route = Route("transaction", (why, f"at open: {before}"))
            self.mode = "transaction"
            self.switched = True
        logger.warning(
            "pool %r: %s; mode='auto' switched to transaction mode (no prepared statements, "
            "no server-side cursors outside transactions) for the rest of this process",
            self.name,
            why,
        )
        return True

    def as_dict(self) -> dict[str, object]:
        """For stats() and report(): the effective mode and why."""
        route = self.route
        return {
            "mode": self.mode,
            "path": route.path if route else None,
            "evidence": list(route.evidence) if route else [],
            "switched": self.switched,
        }
