"""The admin console: the virtual database ``poolguard`` answering ``SHOW POOLS``, ``SHOW
CLIENTS``, ``SHOW SERVERS`` and ``SHOW STATS`` over the simple query protocol (as PgBouncer's
``pgbouncer`` database does), the same figures as Python rows for ``handle.stats()``, and
``query_stats``, which reads them from another process's console within a time limit.

Numbers are int8 columns and names text columns, so a driver such as psycopg returns ints.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import psycopg

from .._redact import redact_conninfo
from . import _protocol as p
from ._pools import Pools

if TYPE_CHECKING:
    from ._session import Session

Rows = list[dict[str, object]]
Stats = dict[str, Rows]

#: The SHOW commands, each the key of its rows in ``snapshot()``.
VIEWS = ("pools", "clients", "servers", "stats")

_INT8, _TEXT = 20, 25
# What a driver needs to hear at login; the rest of the server's settings do not apply here.
_CONSOLE_PARAMS = (
    "server_version",
    "server_encoding",
    "client_encoding",
    "DateStyle",
    "integer_datetimes",
    "standard_conforming_strings",
)


def snapshot(pools: Pools, sessions: Iterable[Session], now: float) -> Stats:
    """Every view's rows at loop time ``now`` (no I/O)."""
    clients: Rows = []
    per_pair: dict[tuple[str, str], list[int]] = {}  # active, waiting, idle clients
    # Each pool serves its waiters first in, first out: position 1 has waited longest.
    queued = {id(s): i for pair in pools.pairs.values() for i, s in enumerate(pair.pool.waiters, 1)}
    maxwait: dict[tuple[str, str], int] = {}
    for s in sessions:
        pair = s.pair
        if pair is None:
            continue
        counts = per_pair.setdefault((pair.user, pair.dbname), [0, 0, 0])
        backend = s.backend
        state = "active" if backend is not None else "waiting" if s.waiting else "idle"
        counts[("active", "waiting", "idle").index(state)] += 1
        wait_ms = int((now - s.wait_started) * 1000) if state == "waiting" else 0
        maxwait[pair.user, pair.dbname] = max(maxwait.get((pair.user, pair.dbname), 0), wait_ms)
        clients.append(
            {
                "user": pair.user,
                "database": pair.dbname,
                "state": state,
                "pid": s.pid,
                "server_pid": backend.pid if backend is not None else None,
                "queue": queued.get(id(s)),
                "wait_ms": wait_ms,
            }
        )
    pools_rows: Rows = []
    servers: Rows = []
    stats: Rows = []
    for (user, dbname), pair in pools.pairs.items():
        pool = pair.pool
        active = idle = prepared = 0
        for b in sorted(pool.members, key=lambda b: b.pid):
            busy = b.owner is not None
            active += busy
            idle += not busy
            prepared += len(b.statements)
            owner_pid = getattr(b.owner, "pid", None)
            servers.append(
                {
                    "user": user,
                    "database": dbname,
                    "state": "active" if busy else "idle",
                    "pid": b.pid,
                    "client_pid": owner_pid,
                    "prepared": len(b.statements),
                    "age": int(now - b.created),
                }
            )
        cl_active, cl_waiting, cl_idle = per_pair.get((user, dbname), [0, 0, 0])
        pools_rows.append(
            {
                "user": user,
                "database": dbname,
                "cl_active": cl_active,
                "cl_waiting": cl_waiting,
                "cl_idle": cl_idle,
                "sv_active": active,
                "sv_idle": idle,
                "sv_connecting": pool.connecting,
                "pool_size": pool.size,
                "pinned": pool.pinned,
                "maxwait_ms": maxwait.get((user, dbname), 0),
            }
        )
        stats.append(
            {
                "user": user,
                "database": dbname,
                "xact_count": pool.served,
                "statements": len(pair.registry),
                "server_prepared": prepared,
                "server_idle_closed": pair.closed_idle,
                "server_lifetime_closed": pair.closed_lifetime,
            }
        )
    return {"pools": pools_rows, "clients": clients, "servers": servers, "stats": stats}


def merge(views: Iterable[Stats]) -> Stats:
    """One proxy's views from its workers' (see ``_fleet``): their clients and servers
    together, and per (user, database) the sum of their pools and stats rows (``maxwait_ms``:
    the longest wait)."""
    views = list(views)
    merged: Stats = {}
    for view in ("pools", "stats"):
        by_pair: dict[tuple[object, object], dict[str, object]] = {}
        for rows in views:
            for row in rows.get(view, []):
                total = by_pair.setdefault((row["user"], row["database"]), {})
                for column, value in row.items():
                    if column in total and isinstance(value, int):
                        before = _int(total[column])
                        value = max(before, value) if column == "maxwait_ms" else before + value
                    total[column] = value
        merged[view] = list(by_pair.values())
    merged["clients"] = sorted(
        (row for rows in views for row in rows.get("clients", [])), key=lambda r: _int(r["pid"])
    )
    merged["servers"] = sorted(
        (row for rows in views for row in rows.get("servers", [])),
        key=lambda r: (str(r["user"]), str(r["database"]), _int(r["pid"])),
    )
    return merged


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _columns(rows: Rows, view: str) -> list[str]:
    if rows:
        return list(rows[0])
    return list(_EMPTY[view])


# Column names of each view when it has no rows (a RowDescription is still due).
_EMPTY: dict[str, tuple[str, ...]] = {
    "pools": (
        "user", "database", "cl_active", "cl_waiting", "cl_idle", "sv_active", "sv_idle",
        "sv_connecting", "pool_size", "pinned", "maxwait_ms",
    ),
    "clients": ("user", "database", "state", "pid", "server_pid", "queue", "wait_ms"),
    "servers": ("user", "database", "state", "pid", "client_pid", "prepared", "age"),
    "stats": (
        "user", "database", "xact_count", "statements", "server_prepared", "server_idle_closed",
        "server_lifetime_closed",
    ),
}  # fmt: skip
_INT_COLUMNS = {
    "cl_active", "cl_waiting", "cl_idle", "sv_active", "sv_idle", "sv_connecting", "pool_size",
    "pinned", "maxwait_ms", "pid", "server_pid", "queue", "wait_ms", "client_pid", "prepared",
    "age", "xact_count", "statements", "server_prepared", "server_idle_closed",
    "server_lifetime_closed",
}  # fmt: skip


def result_set(view: str, rows: Rows) -> bytes:
    """RowDescription, DataRows and CommandComplete of one SHOW."""
    names = _columns(rows, view)
    desc = struct.pack("!h", len(names))
    for name in names:
        oid, size = (_INT8, 8) if name in _INT_COLUMNS else (_TEXT, -1)
        desc += name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, oid, size, -1, 0)
    out = [p.frame(b"T", desc)]
    for row in rows:
        body = struct.pack("!h", len(names))
        for name in names:
            value = row[name]
            if value is None:
                body += struct.pack("!i", -1)
            else:
                data = str(value).encode()
                body += struct.pack("!i", len(data)) + data
        out.append(p.frame(b"D", body))
    out.append(p.command_complete(b"SHOW"))
    return b"".join(out)


class Console(asyncio.Protocol):
    """One admin client, logged in already; answers simple queries until it leaves."""

    def __init__(self, stats: Callable[[], Stats]) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.status = b"I"  # BEGIN/COMMIT are accepted (drivers send them) and do nothing
        self.skipping = False  # after an extended-protocol message, until Sync

    @classmethod
    def take_over(
        cls,
        transport: asyncio.Transport,
        buf: bytearray,
        stats: Callable[[], Stats],
        server_params: dict[str, str],
    ) -> Console:
        console = cls(stats)
        transport.set_protocol(console)
        console.transport = transport
        out = [p.AUTH_OK]
        for name in _CONSOLE_PARAMS:
            if name in server_params:
                out.append(p.parameter_status(name, server_params[name]))
        out += [p.backend_key_data(0, 0), p.ready_for_query(b"I")]
        transport.write(b"".join(out))
        if buf:
            console.data_received(bytes(buf))
        return console

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            msgs, used = p.split_messages(self.buf, 1 << 20)
        except p.ProtocolError as exc:
            self._write(p.error_response(exc.sqlstate, f"protocol violation: {exc}", "FATAL"))
            self._close()
            return
        del self.buf[:used]
        out: list[bytes] = []
        for kind, body in msgs:
            if kind == p.TERMINATE:
                self._write(b"".join(out))
                self._close()
                return
            if kind == p.QUERY:
                out.append(self._query(p.query_text(body).decode("utf-8", "replace")))
            elif kind == p.SYNC:
                self.skipping = False
                out.append(p.ready_for_query(self.status))
            elif not self.skipping and kind not in (p.FLUSH, p.COPY_DONE, p.COPY_FAIL):
                self.skipping = True
                out.append(
                    p.error_response(
                        "0A000", "the poolguard console answers only simple queries (SHOW ...)"
                    )
                )
        self._write(b"".join(out))

    def _query(self, sql: str) -> bytes:
        out = []
        commands = [c.strip() for c in sql.split(";") if c.strip()]
        if not commands:
            out.append(p.frame(b"I"))  # EmptyQueryResponse
        for command in commands:
            words = command.lower().split()
            if words in (["begin"], ["start", "transaction"]):
                self.status = b"T"
                out.append(p.command_complete(b"BEGIN"))
            elif words in (["commit"], ["rollback"], ["end"]):
                self.status = b"I"
                out.append(p.command_complete(words[0].upper().encode()))
            elif len(words) == 2 and words[0] == "show" and words[1] in VIEWS:
                out.append(result_set(words[1], self.stats()[words[1]]))
            else:
                out.append(
                    p.error_response(
                        "42601",
                        f"the poolguard console does not know {command[:60]!r}: try "
                        + ", ".join(f"SHOW {v.upper()}" for v in VIEWS),
                    )
                )
                break  # like PostgreSQL: the rest of a failed multi-statement query is skipped
        out.append(p.ready_for_query(self.status))
        return b"".join(out)

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def query_stats(conninfo: str, timeout: float = 10) -> Stats:
    """The console's views read over a connection (for a rewriter in another process).

    ``timeout`` (seconds) bounds the whole call: connection, login and the SHOW queries (libpq
    gives a connection attempt at least 2 s). A console that does not answer in time raises
    psycopg's ConnectionTimeout, naming the console without its password."""
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if not (number and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    deadline = time.monotonic() + timeout
    try:
        # libpq counts whole seconds, and 0 as forever and 1 as 2.
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=max(2, int(timeout)))
    except psycopg.errors.ConnectionTimeout:
        raise _no_answer(conninfo, timeout) from None
    with conn, _Deadline(conn.fileno(), deadline - time.monotonic()) as limit:
        stats: Stats = {}
        try:
            for view in VIEWS:
                cur = conn.execute(f"SHOW {view.upper()}")
                names = [d.name for d in cur.description or ()]
                stats[view] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except psycopg.Error:
            if limit.expired:
                raise _no_answer(conninfo, timeout) from None
            raise
        return stats


def _no_answer(conninfo: str, timeout: float) -> Exception:
    return psycopg.errors.ConnectionTimeout(
        f"no answer within {timeout:g} s (connection, login and SHOW queries): check that the "
        "rewriter process is running and not stopped (SIGSTOP, a debugger, a paused container) "
        f"and that the DSN points at its console: {redact_conninfo(conninfo)}"
    )


class _Deadline:
    """Ends a connection's reads at a deadline by shutting its socket down, which wakes a read
    waiting for a peer that will never answer: a stopped process keeps its sockets open and its
    kernel acknowledges what is sent to it, so neither TCP nor libpq ever gives up."""

    def __init__(self, fd: int, seconds: float) -> None:
        self.fd = fd
        self.expired = False
        self.lock = threading.Lock()
        self.done = False
        self.timer = threading.Timer(max(0.0, seconds), self.expire)
        self.timer.daemon = True

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Before the connection closes its descriptor, which the number may name next.
        with self.lock:
            self.done = True
        self.timer.cancel()

    def expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.expired = True
            # A duplicate shuts down the connection they share; the descriptor stays psycopg's.
            with socket.socket(fileno=os.dup(self.fd)) as sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # OSError: the peer has closed it already
