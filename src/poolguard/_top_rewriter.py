"""The rewriter sections of ``poolguard top``: each proxy's admin console read and summed per
(user, database) pool, with what only two refreshes tell (the transaction rate).

A console that cannot be reached, refuses the login or does not answer in time gives its
section a one-line error; the DSN is shown without its password, and every error text is
redacted against it.
"""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._settings import parse_dsn, redact_text
from .rewriter import admin_stats

#: The console's database when the DSN names none (the rewriter's default console name).
CONSOLE_DATABASE = "poolguard"
#: Seconds a console has to answer (connection, login and queries): a refresh waits for the
#: slowest, so a stopped rewriter costs each refresh this much and shows as its error line.
CONSOLE_TIMEOUT = 2
#: How many of the longest-waiting clients a section lists.
LONGEST_WAITING = 5


# libpq's "connection failed: connection to server at "h", port 1 failed: " in front of why.
_WHERE = re.compile(r"^(?:connection failed: )?connection to server (?:at|on socket) .*? failed: ")


def console_conninfo(dsn: str) -> str:
    """``dsn`` as conninfo for the console: its database defaults to ``poolguard``.

    Raises ConfigurationError, naming ``--rewriter`` and without the password, if it is not a
    valid URL or conninfo string."""
    conninfo, _ = parse_dsn(dsn, "--rewriter")
    if not conninfo_to_dict(conninfo).get("dbname"):
        conninfo = make_conninfo(conninfo, dbname=CONSOLE_DATABASE)
    return conninfo


def _target(conninfo: str) -> str:
    params = conninfo_to_dict(conninfo)
    return (
        f"{params.get('user', '')}@{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        f"/{params.get('dbname', '')}"
    )


class RewriterWatch:
    """One proxy's console, sampled at each refresh; remembers the previous sample."""

    def __init__(self, dsn: str) -> None:
        self.given = dsn  # as typed: errors are redacted against both forms
        self.conninfo = console_conninfo(dsn)
        self.target = _target(self.conninfo)
        self._served: dict[tuple[str, str], int] = {}
        self._served_at: float | None = None

    def sample(self) -> dict[str, Any]:
        """The section's figures now, or its target and a one-line ``error``."""
        try:
            stats = admin_stats(self.conninfo, timeout=CONSOLE_TIMEOUT)
        except psycopg.Error as exc:
            # The rates start over: the proxy may have restarted meanwhile.
            self._served, self._served_at = {}, None
            return {"target": self.target, "error": self._one_line(exc), "pools": [], "waiting": []}
        return self._figures(stats, time.monotonic())

    def _one_line(self, exc: Exception) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        # The section's heading names the console already: keep what went wrong.
        text = _WHERE.sub("", text, count=1)
        return redact_text(text, self.given, self.conninfo)

    def _figures(self, stats: dict[str, list[dict[str, Any]]], now: float) -> dict[str, Any]:
        prepared: dict[tuple[str, str], list[int]] = {}
        for row in stats["servers"]:
            prepared.setdefault((row["user"], row["database"]), []).append(row["prepared"])
        served = {(r["user"], r["database"]): r["xact_count"] for r in stats["stats"]}
        statements = {(r["user"], r["database"]): r["statements"] for r in stats["stats"]}
        elapsed = now - self._served_at if self._served_at is not None else None

        waiting = sorted(
            (
                {
                    "pid": r["pid"],
                    "user": r["user"],
                    "database": r["database"],
                    "queue": r["queue"],
                    "waiting_seconds": r["wait_ms"] / 1000,
                }
                for r in stats["clients"]
                if r["state"] == "waiting"
            ),
            key=lambda w: (-w["waiting_seconds"], w["queue"] or 1 << 30, w["pid"]),
        )

        pools = []
        for row in stats["pools"]:
            pair = (row["user"], row["database"])
            count = served.get(pair, 0)
            before = self._served.get(pair)
            # A count that went down belongs to a restarted proxy: no rate from it.
            delta = count - before if before is not None and count >= before else None
            pools.append(
                {
                    "user": row["user"],
                    "database": row["database"],
                    "clients_active": row["cl_active"],
                    "clients_waiting": row["cl_waiting"],
                    "clients_idle": row["cl_idle"],
                    "servers_busy": row["sv_active"],
                    "servers_idle": row["sv_idle"],
                    "servers_connecting": row["sv_connecting"],
                    "pool_size": row["pool_size"],
                    "pinned": row["pinned"],
                    "max_wait_seconds": row["maxwait_ms"] / 1000,
                    "transactions": count,
                    "transactions_since_last": delta,
                    "transactions_per_second": (
                        round(delta / elapsed, 1) if delta is not None and elapsed else None
                    ),
                    "statements": statements.get(pair, 0),
                    "prepared_per_server": prepared.get(pair, []),
                }
            )
        self._served, self._served_at = served, now
        return {
            "target": self.target,
            "error": None,
            "pools": pools,
            "waiting": waiting[:LONGEST_WAITING],
        }


def render_section(section: dict[str, Any]) -> list[str]:
    """One proxy's section as lines of plain text, the table within 80 columns."""
    lines = [f"rewriter {section['target']}:"]
    if section["error"] is not None:
        return [*lines, f"  error: {section['error']}"]
    lines += [
        f"  {'':22s} {'clients':^14s}  {'servers':^9s}  {'max':>6s}",
        f"  {'user/database':22s}  act wait idle   busy idle    wait    xacts  xact/s  "
        "prepared/server",
    ]
    for p in section["pools"]:
        rate = p["transactions_per_second"]
        lines.append(
            f"  {p['user'] + '/' + p['database']:22.22s} {p['clients_active']:4d} "
            f"{p['clients_waiting']:4d} {p['clients_idle']:4d}   {p['servers_busy']:4d} "
            f"{p['servers_idle']:4d} {p['max_wait_seconds']:6.1f}s "
            f"{p['transactions']:8d} {'-' if rate is None else f'{rate:.1f}':>7s}  "
            f"{','.join(map(str, p['prepared_per_server'])) or '-'}"
        )
    if not section["pools"]:
        lines.append("  no pools yet")
    for w in section["waiting"]:
        lines.append(
            f"  waiting #{w['queue'] or '?'}: client {w['pid']} {w['user']}/{w['database']}, "
            f"waiting {w['waiting_seconds']:.1f} s"
        )
    return lines
