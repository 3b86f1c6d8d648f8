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
from psycopg.conninfo import conninfo_to_dict

from ._budget import (
    LOCAL_SOCKET,
    Budget,
    BudgetUnavailable,
    compute_budget,
    error_reason,
    read_server_limits,
    resolve_processes_source,
)
from ._cli_help import DefaultsHelpFormatter
from ._errors import ConfigurationError
from ._pgbouncer import PgBouncerState, read_pgbouncer
from ._probe import APPLICATION_NAME, PoolerProbe, probe_pooler
from ._route import route_from_probe
from ._settings import TRUE_WORDS, Settings, parse_dsn, redact_conninfo, redact_text
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


def framework_settings(probe: PoolerProbe, budget: Budget | None, size: int) -> dict[str, str]:
    """The settings to use in each client, given what the probe found and the pool size."""
    pooled = probe.mode in ("transaction", "statement")
    pool_size = budget.pooler_pool_size if budget else "(max_connections - 5) / pairs"
    pooler = {
        "pgbouncer": f"default_pool_size = {pool_size} (default_pool_size x database/user "
        f"pairs <= {budget.usable if budget else 'max_connections - reserved'} usable server "
        "connections); migrations and LISTEN through the direct URL"
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
        "django": _DJANGO_SIZE.format(size=size)
        + "; not CONN_MAX_AGE > 0 under ASGI, where it leaks connections",
        "sqlalchemy": _SQLALCHEMY_SIZE.format(size=size),
        "psycopg": _PSYCOPG_SIZE.format(size=size) + " (prepared statements are fine)",
        "asyncpg": f"asyncpg.create_pool(dsn, max_size={size})",
        "prisma": f"DATABASE_URL=...?connection_limit={size}",
        "node-postgres": f"new Pool({{ max: {size} }})",
    }


_DJANGO_SIZE: Final = (
    "ENGINE 'poolguard.django' with OPTIONS={{'poolguard': {{'max_size': {size}}}}}, or the "
    "stock backend with OPTIONS={{'pool': {{'max_size': {size}}}}} (Django 5.1+)"
)
_SQLALCHEMY_SIZE: Final = "create_engine(url, pool_size={size}, max_overflow=0, pool_pre_ping=True)"
_PSYCOPG_SIZE: Final = (
    "poolguard.configure(dsn, max_size={size}), or psycopg_pool.ConnectionPool(dsn, "
    "max_size={size})"
)
#: Pools and poolers that can hold a fleet's budget centrally.
_CENTRAL_POOLERS: Final = "PgBouncer, PgDog or Supavisor"


def local_cores(conninfo: str) -> tuple[int | None, str]:
    """The server's core count when it runs on this machine (a local host or unix socket)."""
    host = conninfo_to_dict(conninfo).get("host") or ""
    hosts = {h for h in str(host).split(",") if h}
    if not hosts or all(h.startswith("/") or h in _LOCAL_HOSTS for h in hosts):
        cores = os.cpu_count()
        if cores:
            return cores, f"{cores} (the server is local: this machine's cpu count)"
    return None, "unknown (pass --cores N)"


_LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def diagnose(
    dsn: str,
    *,
    processes: int | None = None,
    max_size: int | None = None,
    idle_seconds: float = 5.0,
    headroom: int = 0,
    cores: int | None = None,
    pooler_dsn: str | None = None,
    pools: Sequence[tuple[str, int, str]] | None = None,
) -> dict[str, Any]:
    """Everything the doctor reports: the dict ``--json`` prints (docs/transaction-mode.md).

    `pools`: (label, max_size, application_name) of each pool a process of the app runs on
    this server (default: one pool of `max_size`, every ``poolguard:*`` session is the app's).
    `pooler_dsn`: a PgBouncer whose admin console says which server connections are its own,
    when `dsn` reaches PostgreSQL directly.
    """
    conninfo, hints = parse_dsn(dsn, "dsn")
    max_size = Settings.max_size if max_size is None else max_size
    if headroom < 0:
        raise ConfigurationError(f"headroom={headroom!r}: must be >= 0")
    if cores is not None and cores < 1:
        raise ConfigurationError(f"cores={cores!r}: must be >= 1")
    if pools is None:
        pools = [("default", max_size, "poolguard:*")]
    report: dict[str, Any] = {
        "target": redact_conninfo(conninfo),
        "problems": [],
        "warnings": [],
    }
    warnings: list[str] = report["warnings"]
    # The doctor runs outside the app's server, so nothing can be read from its process tree:
    # the count is declared (--processes, $WEB_CONCURRENCY) or assumed, and said so.
    processes, processes_source = resolve_processes_source(processes, detect=False)
    cores_source = f"{cores} (--cores)" if cores else ""
    if cores is None:
        cores, cores_source = local_cores(conninfo)
    report["cores"] = {"count": cores, "source": cores_source}
    # This connection failing means nothing can be checked (exit 2); anything failing after it
    # is reported as a warning and the rest of the report still runs.
    with psycopg.connect(
        conninfo, autocommit=True, prepare_threshold=None, application_name=APPLICATION_NAME
    ) as conn:
        report["server_version"] = conn.info.parameter_status("server_version") or ""
        try:
            probe = probe_pooler(conninfo)
        except psycopg.Error as exc:
            probe = PoolerProbe(evidence=[f"the probe failed: {error_reason(exc)}"])
            warnings.append(f"could not probe for a pooler: {error_reason(exc)}")
        bouncer = _read_bouncer(probe, conninfo, pooler_dsn, report)
        pooler_clients: tuple[str, ...] = ()
        if probe.proxied and bouncer is None:
            pooler_clients = _pooler_address(conn, report)
        budget: Budget | None = None
        try:
            limits = read_server_limits(
                conn,
                own_application_names=[app for _, _, app in pools],
                pooler_pids=bouncer.server_pids if bouncer else (),
                pooler_clients=pooler_clients,
                # The probe's sessions may still be closing on the server.
                skip_application_names=(APPLICATION_NAME,),
            )
            budget = _budget(limits, probe, bouncer, pools, processes, processes_source, headroom)
        except BudgetUnavailable as exc:
            warnings.append(str(exc))
        try:
            idle = idle_in_transaction(conn, idle_seconds)
        except psycopg.Error as exc:
            idle = []
            warnings.append(f"could not list sessions idle in transaction: {error_reason(exc)}")

    report["pooler"] = asdict(probe)
    route = route_from_probe(probe)
    report["auto_mode"] = {"path": route.path, "mode": route.mode}
    report["pgbouncer"] = bouncer.as_dict() if bouncer else None
    report["budget"] = budget.as_dict() if budget else None
    report["fleet"] = _fleet(budget)
    if hints.get("pgbouncer") in TRUE_WORDS and probe.mode not in ("transaction", "statement"):
        warnings.append("the URL says pgbouncer=true but no transaction pooler was detected")
    report["idle_in_transaction"] = [asdict(s) for s in idle]
    sizes = budget.suggested_sizes(cores) if budget else {label: m for label, m, _ in pools}
    report["suggested_max_size"] = sizes
    report["settings"] = framework_settings(probe, budget, min(sizes.values()))
    report["fixes"] = []
    _judge(report, probe, bouncer, budget, idle, idle_seconds, cores, sizes)
    report["exit_code"] = EXIT_PROBLEM if report["problems"] else EXIT_OK
    return report


def _read_bouncer(
    probe: PoolerProbe, conninfo: str, pooler_dsn: str | None, report: dict[str, Any]
) -> PgBouncerState | None:
    """PgBouncer's admin console: the pooler the DSN goes through, or --pooler."""
    if pooler_dsn:
        target = parse_dsn(pooler_dsn, "pooler")[0]
    elif probe.proxied:
        target = conninfo
    else:
        return None
    try:
        return read_pgbouncer(target)
    except psycopg.Error as exc:
        report["warnings"].append(
            f"could not read PgBouncer's admin console ({error_reason(exc)}): its pools and "
            "max_client_conn are not checked (add this user to stats_users to let the doctor "
            "read SHOW POOLS and SHOW CONFIG)"
        )
        return None


def _pooler_address(conn: psycopg.Connection[Any], report: dict[str, Any]) -> tuple[str, ...]:
    """Where the pooler connects from, as PostgreSQL sees this connection's server session."""
    row = conn.execute("SELECT host(inet_client_addr())", prepare=False).fetchone()
    address = (row[0] if row else None) or LOCAL_SOCKET
    report["warnings"].append(
        f"without the pooler's admin console, every session from its address {address} is "
        "counted as the pooler's"
    )
    return (address,)


def _budget(
    limits: Any,
    probe: PoolerProbe,
    bouncer: PgBouncerState | None,
    pools: Sequence[tuple[str, int, str]],
    processes: int,
    processes_source: str,
    headroom: int,
) -> Budget:
    through = probe.mode in ("transaction", "statement")
    bound = limits.pooler
    text = f"{limits.pooler} server connections held now"
    if bouncer is not None:
        bound = max(bouncer.server_bound, limits.pooler if not through else 0)
        text = bouncer.bound_text()
    elif through:
        text += " (pool sizes unknown without the admin console)"
    if probe.mode == "session" and bouncer is None:
        bound = 0  # a session pooler's server connections are its clients', counted as demand
    return compute_budget(
        limits,
        max_size=sum(size for _, size, _ in pools),
        processes=processes,
        headroom=headroom,
        pooler_bound=bound,
        pooler_text=text,
        pools=tuple((label, size) for label, size, _ in pools) if len(pools) > 1 else (),
        processes_source=processes_source,
        through_pooler=through,
        max_client_conn=bouncer.max_client_conn if bouncer and through else None,
        pooler_pairs=bouncer.pairs if bouncer else 0,
    )


def _fleet(budget: Budget | None) -> dict[str, Any] | None:
    """Every client host and application holding connections, with the app's total."""
    if budget is None:
        return None
    groups = budget.limits.groups
    app_hosts = sorted({g.client for g in groups if g.kind == "app"})
    return {
        "groups": [g.as_dict() for g in groups],
        "app_hosts": app_hosts,
        "app_total": budget.limits.own,
        "total": sum(g.count for g in groups),
        "usable": budget.usable,
    }


def _judge(
    report: dict[str, Any],
    probe: PoolerProbe,
    bouncer: PgBouncerState | None,
    budget: Budget | None,
    idle: Sequence[IdleSession],
    idle_seconds: float,
    cores: int | None,
    sizes: dict[str, int],
) -> None:
    """Problems, warnings and the fixes in the order the guides rank them."""
    problems: list[str] = report["problems"]
    warnings: list[str] = report["warnings"]
    fixes: list[dict[str, Any]] = report["fixes"]
    pooled = probe.mode in ("transaction", "statement")
    has_pooler = pooled or bouncer is not None or probe.proxied

    def fix(name: str, why: str, settings: dict[str, str] | None = None) -> None:
        fixes.append({"rank": len(fixes) + 1, "fix": name, "why": why, "settings": settings or {}})

    if budget is not None and not budget.fits:
        problems.append(budget.advice())
    size_text = ", ".join(f"{label} {n}" for label, n in sizes.items())
    busy_bound = cores * 2 if cores else None
    over_cores = (
        busy_bound is not None
        and budget is not None
        and not budget.through_pooler
        and budget.demand > busy_bound
    )
    if over_cores and budget is not None and busy_bound is not None:
        warnings.append(
            f"demand {budget.demand} > cores {cores} x 2 = {busy_bound}: PostgreSQL runs about "
            "cores x 2 busy connections at once, more only queue inside it"
        )
    if budget is not None and (not budget.fits or over_cores):
        n = min(sizes.values())
        if budget.through_pooler:
            if not budget.client_fits:
                fix(
                    "lower per-process pool sizes",
                    f"{budget.demand} clients > max_client_conn {budget.max_client_conn}: "
                    f"max_size {size_text} per process (or raise max_client_conn to "
                    f">= {budget.demand})",
                    _size_settings(n),
                )
        elif sum(sizes.values()) < budget.max_size:
            why = f"max_size {size_text} per process x {budget.processes} process(es)"
            why += f" fits the {budget.available} connections free for this app"
            if busy_bound is not None:
                why += f" and cores {cores} x 2 = {busy_bound}"
            fix("lower per-process pool sizes", why, _size_settings(n))
    if budget is not None and budget.limits.own > budget.demand:
        held = budget.limits.own
        warnings.append(
            f"this app holds {held} connections now but declares {budget.demand} "
            f"({budget.processes} process(es) x max_size {budget.max_size}): more processes run "
            "than declared, or processes open more than one pool"
        )
        fix(
            "one pool per process",
            f"{held} held > {budget.demand} declared: give each process one pool (one "
            "poolguard.configure() or one SQLAlchemy engine at import, not per request) and "
            "declare the real process count (--processes)",
        )
    if idle:
        problems.append(
            f"{len(idle)} session(s) idle in transaction for >= {idle_seconds:g} s: they hold "
            "a connection and locks while doing nothing (find the code that opens a "
            "transaction and waits; set idle_in_transaction_session_timeout)"
        )
        worst = "; ".join(
            f"pid {s.pid} app {s.application_name!r} {s.seconds:.1f} s: {s.query}" for s in idle[:3]
        )
        fix(
            "hunt idle-in-transaction sessions",
            f"the worst: {worst}",
            {
                "postgresql": "ALTER ROLE <app user> SET idle_in_transaction_session_timeout "
                f"= '{max(60, int(idle[0].seconds) // 2)}s'",
                "poolguard": "poolguard.configure(..., idle_in_transaction_threshold=5) logs the "
                "line that opened each such transaction",
            },
        )
    if budget is not None:
        _judge_pooler(budget, bouncer, has_pooler, warnings, fix, cores)
    if pooled and probe.prepared_statements != "safe":
        warnings.append(
            'prepared statements break behind this pooler ("prepared statement ... does not '
            'exist"): use the settings below, which turn them off'
        )


def _judge_pooler(
    budget: Budget,
    bouncer: PgBouncerState | None,
    has_pooler: bool,
    warnings: list[str],
    fix: Any,
    cores: int | None,
) -> None:
    if bouncer is not None and bouncer.cl_waiting:
        warnings.append(
            f"{bouncer.cl_waiting} client(s) waiting for a server connection in PgBouncer, the "
            f"longest {bouncer.maxwait:.1f} s (cl_waiting, maxwait): its pools are too small or "
            "transactions too slow"
        )
    if budget.through_pooler:
        if not budget.server_fits:
            fix(
                "lower the pooler's pool size",
                f"its pools may open {budget.pooler_bound} server connections, {budget.usable} "
                "are usable",
                {"pgbouncer": f"default_pool_size = {budget.pooler_pool_size}"},
            )
        return
    hosts = {g.client for g in budget.limits.groups if g.kind == "app"}
    outgrown = len(hosts) > 1 and (not budget.fits or budget.limits.own > budget.available)
    if has_pooler or (budget.fits and not outgrown):
        return  # never advise a pooler that is there, nor one nobody needs
    if budget.per_process >= 2 and not outgrown:
        return  # lowering the pool sizes is enough
    pool_size = budget.pooler_pool_size
    if cores:
        pool_size = min(pool_size, cores * 2)
    why = (
        f"the fleet ({len(hosts)} hosts, {budget.limits.own} connections held now) has "
        f"outgrown per-process pools: a central pooler ({_CENTRAL_POOLERS}) should hold the "
        f"{budget.usable} usable connections"
        if outgrown
        else f"{budget.processes} process(es) leave {budget.per_process} connection(s) each: "
        "a pooler in transaction mode lets them share the server's connections"
    )
    fix(
        "a pooler in front",
        why,
        {
            "pgbouncer": f"pool_mode = transaction; default_pool_size = {pool_size}; "
            f"max_client_conn = {max(budget.demand, 100)}",
            "poolguard": "mode='transaction' (the default) with DATABASE_URL on the pooler and "
            "direct_dsn=DIRECT_URL for migrations",
        },
    )


def _size_settings(size: int) -> dict[str, str]:
    return {
        "django": _DJANGO_SIZE.format(size=size),
        "sqlalchemy": _SQLALCHEMY_SIZE.format(size=size),
        "psycopg": _PSYCOPG_SIZE.format(size=size),
    }


def render_text(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"poolguard doctor: {report['target']} (PostgreSQL {report.get('server_version')})"]
    pooler = report["pooler"]
    lines += ["", f"Pooler: {pooler['mode']}" + (" (proxied)" if pooler["proxied"] else "")]
    lines += [f"  - {e}" for e in pooler["evidence"]]
    lines.append(f"  prepared statements: {pooler['prepared_statements']}")
    auto = report["auto_mode"]
    lines.append(f"  mode='auto' would run in {auto['mode']} mode (path: {auto['path']})")
    bouncer = report.get("pgbouncer")
    if bouncer:
        lines.append(
            f"  PgBouncer: default_pool_size {bouncer['default_pool_size']}, "
            f"reserve_pool_size {bouncer['reserve_pool_size']}, max_client_conn "
            f"{bouncer['max_client_conn']}, pairs {bouncer['pairs']}, server connections "
            f"{bouncer['server_connections']}, clients {bouncer['clients']}, cl_waiting "
            f"{bouncer['cl_waiting']}, maxwait {bouncer['maxwait']:.1f} s"
        )
    budget = report.get("budget")
    lines += ["", "Connection budget:"]
    if budget:
        lines += [f"  {line}" for line in budget["formula"].splitlines()]
        lines.append(f"  cores       = {report['cores']['source']}")
        lines.append(f"  verdict     : {budget['advice']}")
        lines += [f"  note: {n}" for n in budget["notes"]]
    else:
        lines.append("  unavailable (see warnings)")
    fleet = report.get("fleet")
    if fleet:
        lines += ["", f"Fleet: {fleet['total']} session(s) from {len(fleet['groups'])} group(s)"]
        lines += [group_line(g) for g in fleet["groups"]]
        lines.append(
            f"  this app: {fleet['app_total']} connection(s) from {len(fleet['app_hosts'])} "
            f"host(s) of usable {fleet['usable']}"
        )
    idle = report["idle_in_transaction"]
    lines += ["", f"Idle in transaction: {len(idle) or 'none'}"]
    for s in idle:
        lines.append(
            f"  pid {s['pid']}  {s['seconds']:.1f} s  app={s['application_name']!r}  "
            f"user={s['user']}  query: {s['query']}"
        )
    if report["fixes"]:
        lines += ["", "Fix order:"]
        for f in report["fixes"]:
            lines.append(f"  {f['rank']}. {f['fix']}: {f['why']}")
            lines += [f"     {name:11} {text}" for name, text in f["settings"].items()]
    lines += ["", "Settings to use:"]
    lines += [f"  {name:14} {text}" for name, text in report["settings"].items()]
    for title, key in (("Warnings", "warnings"), ("Problems", "problems")):
        if report[key]:
            lines += ["", f"{title}:"] + [f"  - {item}" for item in report[key]]
    lines += ["", "Result: " + ("PROBLEMS FOUND" if report["problems"] else "OK")]
    return "\n".join(lines) + "\n"


def group_line(group: dict[str, Any]) -> str:
    """One line of the fleet table."""
    states = ", ".join(f"{n} {state}" for state, n in group["states"].items())
    return (
        f"  {group['kind']:6} {group['client']:15} {group['application_name']!r:28} "
        f"{group['count']:4}  ({states}; oldest {group['oldest_seconds']:.0f} s)"
    )


def run_doctor(
    dsn: str | None = None,
    processes: int | None = None,
    as_json: bool = False,
    *,
    out: TextIO | None = None,
    **options: Any,
) -> int:
    """Diagnose `dsn` (default: $POOLGUARD_DSN, then $DATABASE_URL), print, return the exit code.

    `options` are :func:`diagnose`'s keywords (max_size, idle_seconds, headroom, cores,
    pooler_dsn, pools).
    """
    out = sys.stdout if out is None else out
    dsn = dsn or os.environ.get("POOLGUARD_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        return _fail(
            out, as_json, "no database given: pass a DSN or set POOLGUARD_DSN or DATABASE_URL"
        )
    try:
        report = diagnose(dsn, processes=processes, **options)
    except (ConfigurationError, psycopg.Error) as exc:
        message = redact_text(str(exc), dsn, options.get("pooler_dsn") or dsn)
        return _fail(out, as_json, f"cannot check {_safe_target(dsn)}: {message}")
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
    """``poolguard doctor [DSN] [options]``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="poolguard doctor",
        description="Check a PostgreSQL database (or the pooler in front of it) for connection "
        "budget, transaction-pooler and idle-transaction problems.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "dsn", nargs="?", help="URL or conninfo (default: $POOLGUARD_DSN, then $DATABASE_URL)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="worker processes each running a pool, on every host (default: $WEB_CONCURRENCY, "
        "else 1)",
    )
    parser.add_argument(
        "--max-size", type=int, default=Settings.max_size, help="pool max_size per process"
    )
    parser.add_argument(
        "--headroom",
        type=int,
        default=0,
        help="connections to leave free for migrations, a shell, cron jobs",
    )
    parser.add_argument(
        "--cores",
        type=int,
        help="the server's CPU cores, for the cores x 2 bound (default: this machine's when "
        "the server is local, else unknown)",
    )
    parser.add_argument(
        "--pooler",
        metavar="PGBOUNCER_DSN",
        help="a PgBouncer in front of the same server whose admin console to read, when DSN "
        "reaches PostgreSQL directly (default: none)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="report sessions idle in transaction at least this long",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (see docs/transaction-mode.md) instead of text (default: text)",
    )
    args = parser.parse_args(argv)
    return run_doctor(
        args.dsn,
        args.processes,
        args.json,
        max_size=args.max_size,
        idle_seconds=args.idle_seconds,
        headroom=args.headroom,
        cores=args.cores,
        pooler_dsn=args.pooler,
    )


if __name__ == "__main__":
    sys.exit(main())
