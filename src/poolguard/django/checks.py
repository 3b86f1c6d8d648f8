"""System check ``poolguard.W001``: a direct DSN that ``migrate`` would not use.

``manage.py migrate`` connects to the direct DSN only through the wrapped command that the app
``poolguard.django`` provides.  Without the app in INSTALLED_APPS, a project that set DIRECT_URL
(or ``OPTIONS["poolguard"]["direct_dsn"]``) migrates through the transaction pooler without a
word.  The app's own modules are never imported in that case, so the check is registered by the
engine module (which Django imports for any ``ENGINE = "poolguard.django"`` connection) and is
also the backend's database validation, which ``migrate`` and ``check --database`` always run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from django.apps import apps  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]
from django.core import checks  # type: ignore[import-untyped]
from django.db.backends.base.validation import (  # type: ignore[import-untyped]
    BaseDatabaseValidation,
)

ENGINE = "poolguard.django"
APP = "poolguard.django"


def _direct_source(entry: Mapping[str, Any]) -> str | None:
    ours = (entry.get("OPTIONS") or {}).get("poolguard") or {}
    if isinstance(ours, Mapping) and ours.get("direct_dsn"):
        return "OPTIONS['poolguard']['direct_dsn']"
    return next((v for v in ("POOLGUARD_DIRECT_DSN", "DIRECT_URL") if os.environ.get(v)), None)


def direct_dsn_unused(aliases: Iterable[str]) -> list[checks.CheckMessage]:
    """W001 for each poolguard alias with a direct DSN, when the app is not installed."""
    if apps.is_installed(APP):
        return []
    found = []
    for alias in aliases:
        entry = settings.DATABASES.get(alias) or {}
        source = _direct_source(entry) if entry.get("ENGINE") == ENGINE else None
        if source:
            found.append(
                checks.Warning(
                    f"DATABASES[{alias!r}] has a direct DSN ({source}), but 'manage.py migrate' "
                    "will not use it: migrations go through DATABASES' HOST, which may be a "
                    "transaction-mode pooler",
                    hint=f"add {APP!r} to INSTALLED_APPS (its migrate command connects to the "
                    "direct DSN), or remove the direct DSN",
                    obj=f"DATABASES[{alias!r}]",
                    id="poolguard.W001",
                )
            )
    return found


def check_direct_dsn(
    app_configs: Any = None, databases: Iterable[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Every alias the database validation below does not cover in this run."""
    covered = set(databases or ())
    return direct_dsn_unused(a for a in settings.DATABASES if a not in covered)


class DatabaseValidation(BaseDatabaseValidation):  # type: ignore[misc]
    """The backend's validation: Django runs it for the databases a command names."""

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        return [*super().check(**kwargs), *direct_dsn_unused([self.connection.alias])]


def register() -> None:
    """Register the check (the registry is a set: calling this again changes nothing)."""
    checks.register(check_direct_dsn)
