"""Helpers shared by the Django tests (a plain module: test files import it by name)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from poolguard.testing import PgBouncerServer, PostgresServer

HERE = Path(__file__).resolve().parent
DB_NAME = "django_inproc"


def db_entry(
    server: PostgresServer | PgBouncerServer,
    name: str,
    engine: str = "poolguard.django",
    **poolguard: Any,
) -> dict[str, Any]:
    """A DATABASES entry for ``server``; keyword arguments go to OPTIONS["poolguard"]."""
    entry: dict[str, Any] = {
        "ENGINE": engine,
        "NAME": name,
        "USER": server.user,
        "PASSWORD": server.password,
        "HOST": server.host,
        "PORT": server.port,
    }
    if engine == "poolguard.django":
        entry["OPTIONS"] = {"poolguard": poolguard}
    return entry


def django_env(databases: dict[str, Any], **extra: str) -> dict[str, str]:
    """Environment for a subprocess running the test app (tests/django/djapp)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "DJANGO_SETTINGS_MODULE": "djapp.settings",
        "POOLGUARD_DJANGO_DATABASES": json.dumps(databases),
        **extra,
    }
