"""``manage.py poolguard [status|report|doctor]``: the pools behind DATABASES.

- ``status`` (default): each alias's pool, its settings, and the server sessions that pools of
  this alias hold right now in every process (pg_stat_activity, by application_name);
- ``report``: the connections checked out in this process, with where they were taken;
- ``doctor``: poolguard's doctor on the alias's database (pooler detection, connection budget
  for ``--processes`` workers of ``max_size`` each, sessions idle in transaction).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError  # type: ignore[import-untyped]
from django.db import connections  # type: ignore[import-untyped]

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
            help="doctor: worker processes running this app (default: $WEB_CONCURRENCY or 1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        aliases = self._aliases(options["database"])
        action = options["action"]
        if action == "doctor":
            worst = 0
            for alias in aliases:
                settings = pool_for(alias).settings
                worst = max(
                    worst,
                    _doctor.run_doctor(
                        settings.conninfo,
                        options["processes"],
                        options["json"],
                        max_size=settings.max_size,
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
