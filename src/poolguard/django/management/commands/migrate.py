"""``manage.py migrate`` through the direct DSN when the database is behind a pooler."""

from __future__ import annotations

from typing import Any

from django.core.management.commands import migrate  # type: ignore[import-untyped]

from ...base import direct_connection


class Command(migrate.Command):  # type: ignore[misc]
    help = migrate.Command.help + (
        " poolguard: connects to the direct DSN (OPTIONS['poolguard']['direct_dsn'] or "
        "DIRECT_URL) when one is set."
    )

    def handle(self, *args: Any, **options: Any) -> Any:
        with direct_connection(options["database"]):
            return super().handle(*args, **options)
