"""Real PostgreSQL and PgBouncer servers for tests, and the pytest plugin that serves them.

poolguard tests itself against real servers, never mocks, and ships the harness so users can do
the same.  Installed as a pytest plugin (entry point ``poolguard``), it provides:

- ``postgres_server`` (session): a private PostgreSQL cluster on a free loopback port.
- ``pgbouncer_server`` (session): a real PgBouncer in transaction mode, scram auth, in front of it.
  Skipped when ``pgbouncer`` is not installed, unless ``POOLGUARD_REQUIRE_PGBOUNCER=1``.
- ``postgres_factory`` (session): start extra servers with other settings (``max_connections``...).
- ``pg_dsn`` (function): a fresh database for one test, dropped afterwards.
- the ``poolguard_no_leaks`` marker and ini option.

Outside pytest, :func:`start_postgres` and :func:`start_pgbouncer` do the same work, and
:func:`run_users` drives a concurrent load.  Modules: :mod:`.servers`, :mod:`.load`,
:mod:`.plugin` (imported by pytest only).
"""

from .load import Workload, run_users
from .servers import (
    PgBouncerServer,
    PostgresServer,
    ServerStartError,
    count_sessions,
    find_pgbouncer,
    find_postgres_bindir,
    free_port,
    start_pgbouncer,
    start_postgres,
)

__all__ = [
    "PgBouncerServer",
    "PostgresServer",
    "ServerStartError",
    "Workload",
    "count_sessions",
    "find_pgbouncer",
    "find_postgres_bindir",
    "free_port",
    "run_users",
    "start_pgbouncer",
    "start_postgres",
]

# The pytest11 entry point names this package; pytest then loads the plugin module from here,
# so importing poolguard.testing outside pytest never imports pytest.
pytest_plugins = ["poolguard.testing.plugin"]
