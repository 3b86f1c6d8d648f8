"""Django for the tests in this folder, configured in this process only when one of them runs.

Settings are built by a session fixture (Django can be configured once per process), never from
DJANGO_SETTINGS_MODULE, so pytest-django stays inert for the rest of the suite.  Aliases:

- ``default``: poolguard.django, session mode, direct to PostgreSQL;
- ``aged``: the same with ``CONN_MAX_AGE = 60`` and no leak warnings;
- ``watched``: ``CONN_MAX_AGE = 60`` with the default leak warnings;
- ``leaky``: the same with a 0.3 s leak threshold;
- ``impatient``: the same with the server ending transactions idle for 1 s;
- ``stock``: Django's own backend with ``CONN_MAX_AGE = 60``, for comparisons;
- ``bouncer``: poolguard.django in transaction mode through PgBouncer, with a direct DSN
  (only when PgBouncer is installed).

Tests that need their own process (servers, Django's test runner) use ``run_django()``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from djhelpers import DB_NAME, HERE, db_entry, django_env

from poolguard.testing import PgBouncerServer, PostgresServer


@pytest.fixture
def run_django() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``args`` (after the interpreter) with the test app's settings; fail on a timeout."""

    def run(
        args: list[str], databases: dict[str, Any], timeout: float = 120, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=HERE,
            env=django_env(databases, **extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def django_databases(
    postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """Configure Django in this process on a fresh database; the tables of djapp exist."""
    import django
    from django.conf import settings

    postgres_server.create_database(DB_NAME)
    dbs = {
        "default": db_entry(postgres_server, DB_NAME, mode="session", max_size=4),
        "aged": {
            **db_entry(postgres_server, DB_NAME, mode="session", leak_threshold=0),
            "CONN_MAX_AGE": 60,
        },
        "watched": {**db_entry(postgres_server, DB_NAME, mode="session"), "CONN_MAX_AGE": 60},
        "leaky": db_entry(
            postgres_server, DB_NAME, mode="session", leak_threshold=0.3, watchdog_interval=0.05
        ),
        "impatient": db_entry(
            postgres_server, DB_NAME, mode="session", idle_in_transaction_session_timeout=1
        ),
        "stock": {
            **db_entry(postgres_server, DB_NAME, "django.db.backends.postgresql"),
            "CONN_MAX_AGE": 60,
        },
    }
    try:
        bouncer: PgBouncerServer = request.getfixturevalue("pgbouncer_server")
    except pytest.skip.Exception:
        pass
    else:
        dbs["bouncer"] = db_entry(
            bouncer,
            DB_NAME,
            mode="transaction",
            max_size=2,
            direct_dsn=postgres_server.url.rsplit("/", 1)[0] + "/" + DB_NAME,
        )
    if settings.configured:
        pytest.fail("Django was configured before tests/django/conftest.py could do it")
    sys.path.insert(0, str(HERE))
    import djapp.settings as base

    settings.configure(
        **{k: getattr(base, k) for k in dir(base) if k.isupper()} | {"DATABASES": dbs}
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", run_syncdb=True, verbosity=0)
    try:
        yield dbs
    finally:
        connections.close_all()
        from poolguard.django.base import DatabaseWrapper

        for alias in dbs:
            wrapper = connections[alias]
            if isinstance(wrapper, DatabaseWrapper):
                wrapper.close_pool()
        postgres_server.drop_database(DB_NAME)
