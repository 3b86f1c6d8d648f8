"""``poolguard top``: one database as the server sees it, refreshed every second.

Connections by application, poolguard pool (from ``application_name``, so every host's pools
show), client host and state; the longest idle-in-transaction sessions with their last
statement (literals masked); sessions waiting for a lock and who blocks them; slots used out of
``max_connections``.  Given the metrics endpoints of app processes (``--metrics URL``, the
Prometheus text of poolguard.prometheus), their pool figures too; given statement-name
rewriters' admin consoles (``--rewriter DSN``), a section per proxy (built by _top_rewriter).
Nothing it prints carries a password: DSNs are shown redacted and statements have their
literals masked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ._errors import ConfigurationError
from ._metrics import BUCKETS, quantile
from ._settings import parse_dsn, redact_text
from ._sqltokens import mask_literals
from ._top_rewriter import RewriterWatch, render_section

#: application_name of top's own session: not "poolguard:…", so never counted as a pool.
APPLICATION_NAME = "poolguard-top"
_QUERY_CHARS = 120

_ACTIVITY = """
SELECT pid, datname, usename, coalesce(application_name, ''), host(client_addr),
       coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8,
       extract(epoch FROM now() - state_change)::float8, query,
       wait_event_type, pg_blocking_pids(pid)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
_LIMITS = """
SELECT name, setting::int FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')
"""


def pool_of(application_name: str) -> str | None:
    """The poolguard pool a session belongs to: ``poolguard:<pool>`` (its watchdog's too)."""
    if not application_name.startswith("poolguard:"):
        return None
    name = application_name[len("poolguard:") :]
    for helper in (":watchdog", ":exporter"):
        if name.endswith(helper):
            return name[: -len(helper)]
    return name


def server_snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What the server says: counts, idle transactions, lock waits, slots."""
    limits = dict(conn.execute(_LIMITS).fetchall())
    dbname = conn.info.dbname
    rows = conn.execute(_ACTIVITY).fetchall()
    here = [r for r in rows if r[1] == dbname]
    idle_tx = sorted(
        (r for r in here if r[5].startswith("idle in transaction")),
        key=lambda r: -(r[7] or 0.0),
    )
    reserved = limits.get("superuser_reserved_connections", 0) + limits.get(
        "reserved_connections", 0
    )
    return {
        "database": dbname,
        "slots": {
            "used": len(rows) + 1,  # every database's sessions share the slots; +1: this one
            "max_connections": limits.get("max_connections", 0),
            "reserved": reserved,
        },
        "by_application": dict(Counter(r[3] or "(none)" for r in here).most_common()),
        "by_pool": dict(Counter(p for r in here if (p := pool_of(r[3]))).most_common()),
        "by_client": dict(Counter(r[4] or "local" for r in here).most_common()),
        "by_state": dict(Counter(r[5] or "(unknown)" for r in here).most_common()),
        "idle_in_transaction": [
            {
                "pid": r[0],
                "application": r[3],
                "pool": pool_of(r[3]),
                "client": r[4] or "local",
                "state": r[5],
                "idle_seconds": round(r[7] or 0.0, 1),
                "transaction_seconds": round(r[6] or 0.0, 1),
                "query": mask_literals(" ".join((r[8] or "").split()), _QUERY_CHARS),
            }
            for r in idle_tx[:5]
        ],
        "lock_waits": [
            {
                "pid": r[0],
                "application": r[3],
                "waiting_seconds": round(r[7] or 0.0, 1),
                "blocked_by": list(r[10]),
                "query": mask_literals(" ".join((r[8] or "").split()), _QUERY_CHARS),
            }
            for r in here
            if r[9] == "Lock"
        ],
    }


def endpoint_figures(urls: Sequence[str]) -> dict[str, Any]:
    """Pool figures summed over the app processes' metrics endpoints (Prometheus text)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        raise SystemExit(
            "poolguard top --metrics needs prometheus_client: pip install 'poolguard[prometheus]'"
        ) from None
    pools: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except (OSError, ValueError) as exc:
            errors[url] = str(exc)
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                pool = sample.labels.get("pool")
                if pool is None:
                    continue
                figures = pools.setdefault(
                    pool,
                    {"in_use": 0, "waiting": 0, "leaks": 0, "timeouts": 0, "_buckets": {}},
                )
                name, value = sample.name, sample.value
                if name == "db_client_connection_count" and sample.labels.get("state") == "used":
                    figures["in_use"] += int(value)
                elif name == "db_client_connection_pending_requests":
                    figures["waiting"] += int(value)
                elif name == "poolguard_connection_leaks_total":
                    figures["leaks"] += int(value)
                elif name == "db_client_connection_timeouts_total":
                    figures["timeouts"] += int(value)
                elif name == "db_client_connection_wait_time_seconds_bucket":
                    le = float(sample.labels["le"])
                    figures["_buckets"][le] = figures["_buckets"].get(le, 0) + value
    for figures in pools.values():
        figures["p99_wait_seconds"] = _p99(figures.pop("_buckets"))
    return {"pools": pools, "unreachable": errors}


def _p99(cumulative: dict[float, float]) -> float:
    bounds = [*BUCKETS, float("inf")]
    counts = [cumulative.get(b, 0.0) for b in bounds]
    buckets = [int(c - (counts[i - 1] if i else 0)) for i, c in enumerate(counts)]
    return round(quantile(buckets, 0.99), 4)


def snapshot(
    dsn: str | None,
    metrics_urls: Sequence[str] = (),
    rewriters: Sequence[RewriterWatch] = (),
) -> dict[str, Any]:
    """One refresh: the server (unless ``dsn`` is None), the metrics endpoints, and each
    rewriter's section (read at the same time as the rest, so a slow console costs one
    console timeout, not one per section)."""
    with ThreadPoolExecutor(max_workers=max(len(rewriters), 1)) as pool:
        sections = [pool.submit(watch.sample) for watch in rewriters]
        found: dict[str, Any] = {}
        if dsn is not None:
            conninfo, _ = parse_dsn(dsn, "dsn")
            with psycopg.connect(
                conninfo, autocommit=True, application_name=APPLICATION_NAME, connect_timeout=5
            ) as conn:
                found = server_snapshot(conn)
            params = conninfo_to_dict(conninfo)
            found["target"] = (
                f"{params.get('user', '')}@{params.get('host', 'localhost')}:"
                f"{params.get('port', 5432)}/{found['database']}"
            )
        found["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if metrics_urls:
            found["apps"] = endpoint_figures(metrics_urls)
        if rewriters:
            found["rewriters"] = [section.result() for section in sections]
    return found


def render(found: dict[str, Any]) -> list[str]:
    """The snapshot as lines of plain text (what --once prints and the live view draws)."""
    # Without "slots" there was no database to show: rewriters only.
    lines = _server_lines(found) if "slots" in found else [f"poolguard top  {found['time']}"]
    apps = found.get("apps")
    if apps is not None:
        lines += ["", "app pools (metrics):  in use  waiting  p99 wait  leaks  timeouts"]
        for name, f in sorted(apps["pools"].items()):
            lines.append(
                f"  {name:19.19s} {f['in_use']:7d} {f['waiting']:8d} "
                f"{f['p99_wait_seconds'] * 1000:7.1f}ms {f['leaks']:6d} {f['timeouts']:9d}"
            )
        for url, error in apps["unreachable"].items():
            lines.append(f"  unreachable: {url} ({error})")
    for section in found.get("rewriters", ()):
        lines += ["", *render_section(section)]
    return lines


def _server_lines(found: dict[str, Any]) -> list[str]:
    slots = found["slots"]
    usable = slots["max_connections"] - slots["reserved"]
    free = usable - slots["used"]
    lines = [
        f"poolguard top  {found['target']}  {found['time']}",
        f"slots: {slots['used']}/{slots['max_connections']} used "
        f"({slots['reserved']} reserved, {free} free for clients)",
        "",
    ]
    for title, key in (
        ("pools", "by_pool"),
        ("applications", "by_application"),
        ("clients", "by_client"),
        ("states", "by_state"),
    ):
        items = found[key]
        shown = "  ".join(f"{name}={count}" for name, count in items.items()) or "-"
        lines.append(f"{title + ':':14s}{shown}")
    lines += ["", "idle in transaction (longest first):"]
    for row in found["idle_in_transaction"] or []:
        lines.append(
            f"  pid {row['pid']:<7} {row['application'] or '-':24.24s} {row['client']:15.15s} "
            f"idle {row['idle_seconds']:.1f} s (transaction {row['transaction_seconds']:.1f} s)"
        )
        lines.append(f"    {row['query']}")
    if not found["idle_in_transaction"]:
        lines.append("  none")
    lines += ["", "waiting for a lock:"]
    for row in found["lock_waits"]:
        blockers = ",".join(map(str, row["blocked_by"])) or "?"
        lines.append(
            f"  pid {row['pid']:<7} {row['application'] or '-':24.24s} "
            f"{row['waiting_seconds']:.1f} s, blocked by {blockers}"
        )
        lines.append(f"    {row['query']}")
    if not found["lock_waits"]:
        lines.append("  none")
    return lines


def _live(
    dsn: str | None, urls: Sequence[str], rewriters: Sequence[RewriterWatch], interval: float
) -> int:
    import curses
    import locale

    locale.setlocale(locale.LC_ALL, "")

    def loop(screen: Any) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        while True:
            try:
                lines = render(snapshot(dsn, urls, rewriters))
            except psycopg.Error as exc:
                lines = [f"poolguard top: {redact_text(str(exc), dsn or '')}"]
            screen.erase()
            height, width = screen.getmaxyx()
            for y, line in enumerate(lines[: height - 1]):
                # ASCII only: a multibyte mark throws curses' column count off in some terminals.
                screen.addnstr(y, 0, line.replace("…", "..."), width - 1)
            screen.addnstr(min(len(lines), height - 1), 0, "q: quit", width - 1)
            screen.refresh()
            if screen.getch() in (ord("q"), ord("Q")):
                return

    curses.wrapper(loop)
    return 0


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """``poolguard top [DSN] [--metrics URL ...] [--rewriter DSN ...] [--once] [--json]
    [--interval S]``."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="poolguard top",
        description="Live view of one database's connections, poolguard pools and slots, "
        "and of statement-name rewriters' pools.",
    )
    parser.add_argument(
        "dsn", nargs="?", help="URL or conninfo (default: $POOLGUARD_DSN, $DATABASE_URL)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=[],
        metavar="URL",
        help="app processes' metrics endpoints (poolguard.prometheus) to add their pool figures",
    )
    parser.add_argument(
        "--rewriter",
        action="append",
        default=[],
        metavar="DSN",
        help="a statement-name rewriter's admin console (URL or conninfo of its 'poolguard' "
        "database, the default when the DSN names none) to add its pools; repeatable",
    )
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)"
    )
    args = parser.parse_args(argv)
    dsn = args.dsn or os.environ.get("POOLGUARD_DSN") or os.environ.get("DATABASE_URL")
    if not dsn and not args.rewriter:
        parser.error(
            "no database: pass a DSN, or set POOLGUARD_DSN or DATABASE_URL (or watch only "
            "rewriters with --rewriter)"
        )
    try:
        rewriters = [RewriterWatch(given) for given in args.rewriter]
    except ConfigurationError as exc:
        parser.error(str(exc))
    if not (args.once or args.json):
        return _live(dsn, args.metrics, rewriters, args.interval)
    try:
        found = snapshot(dsn, args.metrics, rewriters)
    except psycopg.Error as exc:
        print(f"poolguard top: {redact_text(str(exc), dsn or '')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2), file=out)
    else:
        print("\n".join(render(found)), file=out)
    return 0
