"""``manage.py poolguard [status|report|doctor]``: the pools behind DATABASES.

- ``status`` (default): each alias's pool, its settings, and the server sessions that pools of
  this alias hold right now in every process (pg_stat_activity, by application_name);
- ``report``: the connections checked out in this process, with where they were taken;
- ``doctor``: poolguard's doctor once per server (host and port) the aliases use: pooler
  detection, sessions idle in transaction, and one connection budget for every alias on that
  server together (``--processes`` workers, each holding the ``max_size`` of every alias).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError  # type: ignore[import-untyped]
from django.db import connections  # type: ignore[import-untyped]
from psycopg.conninfo import conninfo_to_dict

from .... import _doctor, _report
from ...base import DatabaseWrapper, pool_for


class Command(BaseCommand):  # type: ignore[misc]
    help = "Show poolguard's pools for DATABASES: status (default), report or doctor."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "action", nargs="?", default="status", choices=["status", "report", "doctor"]
        )
        parser.add_argument(
            "--database", help="one alias (default: every alias with ENGINE poolguard.django)"
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument(
            "--processes",
            type=int,
            help="doctor: worker processes running this app, on every host (default: "
            "$WEB_CONCURRENCY, else 1)",
        )
        parser.add_argument(
            "--headroom",
            type=int,
            default=0,
            help="doctor: connections to leave free for migrations, a shell, cron jobs "
            "(default: 0)",
        )
        parser.add_argument(
            "--cores",
            type=int,
            help="doctor: the server's CPU cores, for the cores x 2 bound (default: this "
            "machine's when the server is local)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        aliases = self._aliases(options["database"])
        action = options["action"]
        if action == "doctor":
            worst = 0
            for server_aliases in _by_server(aliases).values():
                first = pool_for(server_aliases[0]).settings
                pools = []
                for alias in server_aliases:
                    s = pool_for(alias).settings
                    pools.append((alias, s.max_size, s.application_name))
                worst = max(
                    worst,
                    _doctor.run_doctor(
                        first.conninfo,
                        options["processes"],
                        options["json"],
                        pools=pools,
                        headroom=options["headroom"],
                        cores=options["cores"],
                        out=self.stdout,
                    ),
                )
            if worst:
                raise CommandError(f"poolguard doctor found problems (exit code {worst})")
            return
        found = {
            alias: self._status(alias) if action == "status" else self._report(alias)
            for alias in aliases
        }
        if options["json"]:
            self.stdout.write(json.dumps(found, indent=2, default=str))
        else:
            for text in found.values():
                self.stdout.write(text["text"])

    def _aliases(self, database: str | None) -> list[str]:
        if database:
            if database not in connections:
                raise CommandError(f"no DATABASES entry {database!r}")
            if not isinstance(connections[database], DatabaseWrapper):
                raise CommandError(f"DATABASES[{database!r}] does not use poolguard.django")
            return [database]
        aliases = [a for a in connections if isinstance(connections[a], DatabaseWrapper)]
        if not aliases:
            raise CommandError("no DATABASES entry uses ENGINE 'poolguard.django'")
        return aliases

    def _status(self, alias: str) -> dict[str, Any]:
        pool = pool_for(alias)
        s = pool.settings
        with connections[alias].cursor() as cursor:  # counts itself: one active session
            cursor.execute(
                "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity "
                "WHERE application_name = %s GROUP BY 1 ORDER BY 1",
                [s.application_name],
            )
            sessions = dict(cursor.fetchall())
        connections[alias].close()
        settings = {
            "mode": s.mode,
            "min_size": s.min_size,
            "max_size": s.max_size,
            "timeout": s.timeout,
            "max_lifetime": s.max_lifetime,
            "health_check": s.health_check,
            "direct_dsn": bool(s.direct_conninfo),
        }
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        held = ", ".join(f"{n} {state}" for state, n in sessions.items()) or "none"
        text = (
            f"{alias}: pool {pool.name!r} -> {s.redacted_dsn}\n"
            f"  {shown}\n"
            f"  server sessions of application_name {s.application_name!r} (all processes, "
            f"this command's included): {held}\n"
        )
        return {
            "text": text,
            "pool": pool.name,
            "dsn": s.redacted_dsn,
            "settings": settings,
            "server_sessions": sessions,
            "stats": pool.stats(),
        }

    def _report(self, alias: str) -> dict[str, Any]:
        report = _report.report(pool_for(alias).name, server=True)
        return {"text": f"{alias}: {report}\n", **report.as_dict()}


def _by_server(aliases: list[str]) -> dict[tuple[str, str], list[str]]:
    """Aliases grouped by the server (host, port) they reach: they share its connections."""
    found: dict[tuple[str, str], list[str]] = {}
    for alias in aliases:
        params = conninfo_to_dict(pool_for(alias).settings.conninfo)
        key = (str(params.get("host") or ""), str(params.get("port") or "5432"))
        found.setdefault(key, []).append(alias)
    return found
