"""``poolguard doctor``: look at a database (or the pooler in front of it) before launch day.

It connects, then reports: the connection budget with the numbers filled in; whether a
transaction-mode pooler sits in between, found by probing rather than asked of the user;
sessions idle in transaction; the prepared-statement risk; and the settings to use in each
common client. The exit code gates a deploy: 0 healthy, 1 a problem found, 2 could not check.
The pooler probe itself lives in ``_probe`` (the pools use it too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, TextIO

import psycopg

from ._budget import (
    Budget,
    BudgetUnavailable,
    _reason,
    compute_budget,
    read_server_limits,
    resolve_processes,
)
from ._errors import ConfigurationError
from ._probe import APPLICATION_NAME, PoolerProbe, probe_pooler
from ._settings import _TRUE, Settings, parse_dsn, redact_conninfo, redact_text
from ._sqltokens import mask_literals

__all__ = ["diagnose", "main", "run_doctor"]

EXIT_OK: Final = 0
EXIT_PROBLEM: Final = 1
EXIT_UNCHECKED: Final = 2

_IDLE_QUERY: Final = (
    "SELECT pid, EXTRACT(EPOCH FROM now() - state_change)::float8, application_name, usename, "
    "datname, state, query FROM pg_catalog.pg_stat_activity "
    "WHERE state LIKE 'idle in transaction%%' AND pid <> pg_catalog.pg_backend_pid() "
    "AND now() - state_change >= make_interval(secs => %s) ORDER BY state_change"
)


@dataclass
class IdleSession:
    pid: int
    seconds: float
    application_name: str
    user: str
    database: str
    state: str
    #: Literals masked, truncated: safe to print.
    query: str


def idle_in_transaction(conn: psycopg.Connection[Any], min_seconds: float) -> list[IdleSession]:
    """Sessions idle inside an open transaction for at least `min_seconds`, oldest first."""
    rows = conn.execute(_IDLE_QUERY, (min_seconds,), prepare=False).fetchall()
    return [
        IdleSession(
            pid=pid,
            seconds=round(seconds, 1),
            application_name=app or "",
            user=user or "",
            database=db or "",
            state=state,
            query=mask_literals(query or "", 200),
        )
        for pid, seconds, app, user, db, state, query in rows
    ]


def framework_settings(probe: PoolerProbe, budget: Budget | None) -> dict[str, str]:
    """The settings to use in each client, given what the probe found."""
    size = budget.per_process if budget and budget.per_process else Settings.max_size
    pooled = probe.mode in ("transaction", "statement")
    if pooled:
        # Behind the pooler an app's pool only bounds its clients of the pooler; the server
        # slots are the pooler's to share, so the budget sizes the pooler instead.
        size = Settings.max_size
    pooler = {
        "pgbouncer": "default_pool_size x database/user pairs "
        f"<= {budget.usable if budget else 'max_connections - reserved'} usable server "
        "connections; migrations and LISTEN through the direct URL"
    }
    if pooled and probe.prepared_statements == "safe":
        return pooler | {
            "note": "this pooler keeps prepared statements working; other session state "
            "(SET, LISTEN, advisory locks, temp tables) still breaks: keep poolguard's guard on",
            "poolguard": f"poolguard.configure(DATABASE_URL, max_size={size}) (mode='transaction')",
        }
    if pooled:
        return pooler | {
            "poolguard": "poolguard.configure(DATABASE_URL) with mode='transaction' (the "
            f"default); max_size={size}; direct_dsn=DIRECT_URL for migrations",
            "django": "ENGINE 'poolguard.django', or with django.db.backends.postgresql: "
            "OPTIONS={'prepare_threshold': None} and DISABLE_SERVER_SIDE_CURSORS=True; run "
            "migrations against the direct database URL",
            "sqlalchemy": "psycopg: create_engine(url, connect_args={'prepare_threshold': None}, "
            f"pool_size={size}, max_overflow=0, pool_pre_ping=True); asyncpg: "
            "connect_args={'statement_cache_size': 0, 'prepared_statement_cache_size': 0}",
            "psycopg": "psycopg.connect(dsn, prepare_threshold=None); psycopg_pool: "
            f"ConnectionPool(dsn, kwargs={{'prepare_threshold': None}}, max_size={size})",
            "asyncpg": f"asyncpg.create_pool(dsn, statement_cache_size=0, max_size={size})",
            "prisma": f"DATABASE_URL=...?pgbouncer=true&connection_limit={size}; "
            "directUrl = env('DIRECT_URL') for migrations",
            "node-postgres": f"new Pool({{ max: {size} }}) and never pass `name` in a query "
            "config (a named query is a prepared statement)",
        }
    return {
        "poolguard": f"poolguard.configure(DATABASE_URL, mode='session', max_size={size})",
        "django": "ENGINE 'poolguard.django' with OPTIONS={'poolguard': {'mode': 'session', "
        f"'max_size': {size}}}}}, or the stock backend with OPTIONS={{'pool': {{'max_size': "
        f"{size}}}}} (Django 5.1+); not CONN_MAX_AGE > 0 under ASGI, where it leaks connections",
        "sqlalchemy": f"create_engine(url, pool_size={size}, max_overflow=0, pool_pre_ping=True)",
        "psycopg": f"psycopg_pool.ConnectionPool(dsn, max_size={size}) (prepared statements "
        "are fine)",
        "asyncpg": f"asyncpg.create_pool(dsn, max_size={size})",
        "prisma": f"DATABASE_URL=...?connection_limit={size}",
        "node-postgres": f"new Pool({{ max: {size} }})",
    }


def diagnose(
    dsn: str,
    *,
    processes: int | None = None,
    max_size: int | None = None,
    idle_seconds: float = 5.0,
) -> dict[str, Any]:
    """Everything the doctor reports: the dict ``--json`` prints (docs/transaction-mode.md)."""
    conninfo, hints = parse_dsn(dsn, "dsn")
    max_size = Settings.max_size if max_size is None else max_size
    report: dict[str, Any] = {
        "target": redact_conninfo(conninfo),
        "problems": [],
        "warnings": [],
    }
    warnings: list[str] = report["warnings"]
    processes = resolve_processes(processes)  # a bad --processes / WEB_CONCURRENCY: exit 2
    # This connection failing means nothing can be checked (exit 2); anything failing after it
    # is reported as a warning and the rest of the report still runs.
    with psycopg.connect(
        conninfo, autocommit=True, prepare_threshold=None, application_name=APPLICATION_NAME
    ) as conn:
        report["server_version"] = conn.info.parameter_status("server_version") or ""
        try:
            probe = probe_pooler(conninfo)
        except psycopg.Error as exc:
            probe = PoolerProbe(evidence=[f"the probe failed: {_reason(exc)}"])
            warnings.append(f"could not probe for a pooler: {_reason(exc)}")
        budget: Budget | None = None
        try:
            limits = read_server_limits(conn)
            budget = compute_budget(limits, max_size=max_size, processes=processes)
        except BudgetUnavailable as exc:
            warnings.append(str(exc))
        try:
            idle = idle_in_transaction(conn, idle_seconds)
        except psycopg.Error as exc:
            idle = []
            warnings.append(f"could not list sessions idle in transaction: {_reason(exc)}")

    report["pooler"] = asdict(probe)
    report["budget"] = budget.as_dict() if budget else None
    if hints.get("pgbouncer") in _TRUE and probe.mode not in ("transaction", "statement"):
        warnings.append("the URL says pgbouncer=true but no transaction pooler was detected")
    report["idle_in_transaction"] = [asdict(s) for s in idle]
    report["settings"] = framework_settings(probe, budget)
    _judge(report, probe, budget, idle, idle_seconds)
    report["exit_code"] = EXIT_PROBLEM if report["problems"] else EXIT_OK
    return report


def _judge(
    report: dict[str, Any],
    probe: PoolerProbe,
    budget: Budget | None,
    idle: Sequence[IdleSession],
    idle_seconds: float,
) -> None:
    problems: list[str] = report["problems"]
    warnings: list[str] = report["warnings"]
    pooled = probe.mode in ("transaction", "statement")
    if budget is not None and not budget.fits:
        if pooled:
            # Clients of a transaction pooler do not take server slots one for one; the
            # pooler's own pools (default_pool_size) are what must fit.
            warnings.append(
                f"{budget.advice()} (behind a transaction pooler this bounds the pooler's "
                "default_pool_size x databases x users, not the app's pools)"
            )
        else:
            problems.append(budget.advice())
    if idle:
        problems.append(
            f"{len(idle)} session(s) idle in transaction for >= {idle_seconds:g} s: they hold "
            "a connection and locks while doing nothing (find the code that opens a "
            "transaction and waits; set idle_in_transaction_session_timeout)"
        )
    if pooled and probe.prepared_statements != "safe":
        warnings.append(
            'prepared statements break behind this pooler ("prepared statement ... does not '
            'exist"): use the settings below, which turn them off'
        )


def render_text(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"poolguard doctor: {report['target']} (PostgreSQL {report.get('server_version')})"]
    pooler = report["pooler"]
    lines += ["", f"Pooler: {pooler['mode']}" + (" (proxied)" if pooler["proxied"] else "")]
    lines += [f"  - {e}" for e in pooler["evidence"]]
    lines.append(f"  prepared statements: {pooler['prepared_statements']}")
    budget = report.get("budget")
    lines += ["", "Connection budget:"]
    if budget:
        lines += [f"  {line}" for line in budget["formula"].splitlines()]
        lines += [f"  note: {n}" for n in budget["notes"]]
    else:
        lines.append("  unavailable (see warnings)")
    idle = report["idle_in_transaction"]
    lines += ["", f"Idle in transaction: {len(idle) or 'none'}"]
    for s in idle:
        lines.append(
            f"  pid {s['pid']}  {s['seconds']:.1f} s  app={s['application_name']!r}  "
            f"user={s['user']}  query: {s['query']}"
        )
    lines += ["", "Settings to use:"]
    lines += [f"  {name:14} {text}" for name, text in report["settings"].items()]
    for title, key in (("Warnings", "warnings"), ("Problems", "problems")):
        if report[key]:
            lines += ["", f"{title}:"] + [f"  - {item}" for item in report[key]]
    lines += ["", "Result: " + ("PROBLEMS FOUND" if report["problems"] else "OK")]
    return "\n".join(lines) + "\n"


def run_doctor(
    dsn: str | None = None,
    processes: int | None = None,
    as_json: bool = False,
    *,
    max_size: int | None = None,
    idle_seconds: float = 5.0,
    out: TextIO | None = None,
) -> int:
    """Diagnose `dsn` (default: $POOLGUARD_DSN, then $DATABASE_URL), print, return the exit code."""
    out = sys.stdout if out is None else out
    dsn = dsn or os.environ.get("POOLGUARD_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        return _fail(
            out, as_json, "no database given: pass a DSN or set POOLGUARD_DSN or DATABASE_URL"
        )
    try:
        report = diagnose(dsn, processes=processes, max_size=max_size, idle_seconds=idle_seconds)
    except (ConfigurationError, psycopg.Error) as exc:
        return _fail(
            out, as_json, f"cannot check {_safe_target(dsn)}: {redact_text(str(exc), dsn)}"
        )
    out.write(json.dumps(report, indent=2) + "\n" if as_json else render_text(report))
    return int(report["exit_code"])


def _safe_target(dsn: str) -> str:
    try:
        return redact_conninfo(parse_dsn(dsn, "dsn")[0])
    except ConfigurationError:
        return "the database"


def _fail(out: TextIO, as_json: bool, message: str) -> int:
    if as_json:
        out.write(json.dumps({"error": message, "exit_code": EXIT_UNCHECKED}) + "\n")
    else:
        out.write(f"poolguard doctor: {message}\n")
    return EXIT_UNCHECKED


def main(argv: Sequence[str] | None = None) -> int:
    """``poolguard doctor [DSN] [--processes N] [--max-size N] [--idle-seconds S] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="poolguard doctor",
        description="Check a PostgreSQL database (or the pooler in front of it) for connection "
        "budget, transaction-pooler and idle-transaction problems.",
    )
    parser.add_argument(
        "dsn", nargs="?", help="URL or conninfo (default: $POOLGUARD_DSN, $DATABASE_URL)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="worker processes each running a pool (default: $WEB_CONCURRENCY or 1)",
    )
    parser.add_argument(
        "--max-size", type=int, help=f"pool max_size per process (default: {Settings.max_size})"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="report sessions idle in transaction at least this long (default: 5)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (see docs/transaction-mode.md)"
    )
    args = parser.parse_args(argv)
    return run_doctor(
        args.dsn,
        args.processes,
        args.json,
        max_size=args.max_size,
        idle_seconds=args.idle_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
