"""PgBouncer's admin console: its pools, limits and server connections, for the budget.

The console is the virtual database ``pgbouncer`` on the pooler's own port; users listed in
``admin_users`` or ``stats_users`` may run ``SHOW``. The doctor reads it with the credentials
it was given and says so when it may not. What it takes from it:

- ``SHOW CONFIG``: ``default_pool_size``, ``reserve_pool_size``, ``max_client_conn``;
- ``SHOW DATABASES``: each database's own ``pool_size`` and ``reserve_pool`` (they default to
  the settings above);
- ``SHOW POOLS``: the (database, user) pairs, waiting clients (``cl_waiting``) and the longest
  wait (``maxwait``);
- ``SHOW SERVERS``: ``remote_pid`` of each server connection, which is the backend pid
  PostgreSQL shows in ``pg_stat_activity``: the pooler's sessions are recognised exactly,
  whatever application_name they carry from their last client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg.conninfo import make_conninfo

__all__ = ["PgBouncerPool", "PgBouncerState", "read_pgbouncer"]

_ADMIN_DB: Final = "pgbouncer"


@dataclass(frozen=True, slots=True)
class PgBouncerPool:
    """One (database, user) pair of PgBouncer."""

    database: str
    user: str
    #: Server connections this pair may open: its pool_size plus its reserve pool.
    pool_size: int
    reserve: int
    cl_active: int
    cl_waiting: int
    servers: int
    #: Seconds the oldest waiting client has waited.
    maxwait: float


@dataclass(frozen=True, slots=True)
class PgBouncerState:
    """What the admin console said."""

    default_pool_size: int
    reserve_pool_size: int
    max_client_conn: int
    pools: tuple[PgBouncerPool, ...] = ()
    #: Backend pids of its server connections (SHOW SERVERS remote_pid).
    server_pids: tuple[int, ...] = field(default=())

    @property
    def pairs(self) -> int:
        return len(self.pools)

    @property
    def server_bound(self) -> int:
        """The most server connections its pools may open."""
        return sum(p.pool_size + p.reserve for p in self.pools)

    @property
    def cl_waiting(self) -> int:
        return sum(p.cl_waiting for p in self.pools)

    @property
    def maxwait(self) -> float:
        return max((p.maxwait for p in self.pools), default=0.0)

    @property
    def clients(self) -> int:
        return sum(p.cl_active + p.cl_waiting for p in self.pools)

    def bound_text(self) -> str:
        """How `server_bound` adds up, for the formula."""
        names = ", ".join(f"{p.database}/{p.user}" for p in self.pools) or "none yet"
        uniform = all(
            p.pool_size == self.default_pool_size and p.reserve == self.reserve_pool_size
            for p in self.pools
        )
        if uniform:
            text = f"default_pool_size {self.default_pool_size}"
            if self.reserve_pool_size:
                text = f"(default_pool_size {self.default_pool_size} + reserve_pool_size "
                text += f"{self.reserve_pool_size})"
            return f"{text} x pairs {self.pairs} ({names})"
        return " + ".join(
            f"pool_size {p.pool_size}"
            + (f" + reserve {p.reserve}" if p.reserve else "")
            + f" ({p.database}/{p.user})"
            for p in self.pools
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "default_pool_size": self.default_pool_size,
            "reserve_pool_size": self.reserve_pool_size,
            "max_client_conn": self.max_client_conn,
            "pairs": self.pairs,
            "server_bound": self.server_bound,
            "server_connections": len(self.server_pids),
            "clients": self.clients,
            "cl_waiting": self.cl_waiting,
            "maxwait": self.maxwait,
            "pools": [
                {
                    "database": p.database,
                    "user": p.user,
                    "pool_size": p.pool_size,
                    "reserve": p.reserve,
                    "cl_active": p.cl_active,
                    "cl_waiting": p.cl_waiting,
                    "servers": p.servers,
                    "maxwait": p.maxwait,
                }
                for p in self.pools
            ],
        }


def read_pgbouncer(conninfo: str, *, connect_timeout: int = 5) -> PgBouncerState:
    """Read PgBouncer's admin console through the pooler reached by `conninfo`.

    Raises psycopg.Error when the console refuses (not PgBouncer, or a user in neither
    admin_users nor stats_users).
    """
    admin = make_conninfo(conninfo, dbname=_ADMIN_DB, connect_timeout=connect_timeout)
    # The console speaks the simple query protocol only, and has no transactions.
    with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as conn:
        config = {str(row[0]): str(row[1]) for row in _show(conn, "CONFIG")}
        databases = {str(row["name"]): row for row in _show_dicts(conn, "DATABASES")}
        pools = _show_dicts(conn, "POOLS")
        servers = _show_dicts(conn, "SERVERS")
    default_pool_size = int(config.get("default_pool_size", "20"))
    reserve_pool_size = int(config.get("reserve_pool_size", "0"))
    found = []
    for row in pools:
        if row["database"] == _ADMIN_DB:
            continue
        db = databases.get(str(row["database"]), {})
        found.append(
            PgBouncerPool(
                database=str(row["database"]),
                user=str(row["user"]),
                pool_size=int(db.get("pool_size") or default_pool_size),
                reserve=int(db.get("reserve_pool") or 0),
                cl_active=int(row["cl_active"]),
                cl_waiting=int(row["cl_waiting"]),
                servers=sum(
                    int(row[k] or 0)
                    for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
                ),
                maxwait=float(row["maxwait"] or 0) + float(row.get("maxwait_us") or 0) / 1e6,
            )
        )
    return PgBouncerState(
        default_pool_size=default_pool_size,
        reserve_pool_size=reserve_pool_size,
        max_client_conn=int(config.get("max_client_conn", "100")),
        pools=tuple(found),
        server_pids=tuple(int(s["remote_pid"]) for s in servers if s.get("remote_pid")),
    )


def _show(conn: psycopg.Connection[Any], what: str) -> list[Any]:
    with conn.cursor() as cur:
        return cur.execute(f"SHOW {what}", prepare=False).fetchall()


def _show_dicts(conn: psycopg.Connection[Any], what: str) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(f"SHOW {what}", prepare=False)
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
