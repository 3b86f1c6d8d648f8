"""The examples run as a user would run them: as scripts, configured by the environment.

The Alembic one (alembic from PyPI, a test dependency) migrates through DIRECT_URL while
DATABASE_URL points at the real PgBouncer; the ORM script (its own table) and the asyncio
service then run through PgBouncer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from poolguard.testing import PgBouncerServer, PostgresServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(argv: list[str], **env: str) -> str:
    done = subprocess.run(
        argv,
        # PgBouncer's server connections keep the last application_name they were given, and
        # other tests count the server's 'poolguard:default' backends.
        env={
            **os.environ,
            "PYTHONWARNINGS": "error",
            "POOLGUARD_APPLICATION_NAME": "sa-examples-test",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.pgbouncer
def test_alembic_migrates_through_the_direct_url_then_the_apps_run(
    pg_dsn: str, pgbouncer_server: PgBouncerServer, postgres_server: PostgresServer
) -> None:
    pytest.importorskip("alembic")
    dbname = str(conninfo_to_dict(pg_dsn)["dbname"])
    pooled = make_conninfo(pgbouncer_server.dsn, dbname=dbname)
    ini = str(EXAMPLES / "sqlalchemy_alembic" / "alembic.ini")
    alembic = [sys.executable, "-m", "alembic", "-c", ini]
    run([*alembic, "upgrade", "head"], DATABASE_URL=pooled, DIRECT_URL=pg_dsn)
    with postgres_server.connect(dbname) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
        assert conn.execute("SELECT to_regclass('example_notes') IS NOT NULL").fetchone() == (True,)

    out = run([sys.executable, str(EXAMPLES / "sqlalchemy_orm" / "notes.py")], DATABASE_URL=pooled)
    assert "3 notes" in out and "psycopg sees 3 notes" in out
    assert "checked out now: 0" in out
    service = str(EXAMPLES / "sqlalchemy_async" / "service.py")
    for driver in ("asyncpg", "psycopg"):
        out = run([sys.executable, service, "--driver", driver], DATABASE_URL=pooled)
        assert "20 requests served, sum 380" in out, out


@pytest.mark.pgbouncer
def test_alembic_without_a_direct_url(
    pg_dsn: str, pgbouncer_server: PgBouncerServer, postgres_server: PostgresServer
) -> None:
    """Behind the transaction pooler it says what to set; on a direct DSN it needs nothing."""
    pytest.importorskip("alembic")
    ini = str(EXAMPLES / "sqlalchemy_alembic" / "alembic.ini")
    argv = [sys.executable, "-m", "alembic", "-c", ini, "upgrade", "head"]
    pooled = make_conninfo(pgbouncer_server.dsn, dbname=str(conninfo_to_dict(pg_dsn)["dbname"]))
    done = subprocess.run(
        argv,
        env={**os.environ, "DATABASE_URL": pooled},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "a transaction-mode pooler: set DIRECT_URL" in done.stderr, done.stderr[-2000:]
    run(argv, DATABASE_URL=pg_dsn)  # probed: direct, so the pool's own DSN is used


def test_orm_and_alembic_examples_run_in_either_order(pg_dsn: str) -> None:
    pytest.importorskip("alembic")
    out = run([sys.executable, str(EXAMPLES / "sqlalchemy_orm" / "notes.py")], DATABASE_URL=pg_dsn)
    assert "3 notes" in out
    ini = str(EXAMPLES / "sqlalchemy_alembic" / "alembic.ini")
    run([sys.executable, "-m", "alembic", "-c", ini, "upgrade", "head"], DATABASE_URL=pg_dsn)
