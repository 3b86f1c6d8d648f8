"""Where a DSN comes from: SQLAlchemy-style URLs, POOLGUARD_DIRECT_DSN, and typos in POOLGUARD_*."""

from __future__ import annotations

import io
import json
import logging

import pytest
from psycopg.conninfo import conninfo_to_dict

import poolguard
from poolguard import _settings
from poolguard._doctor import run_doctor
from poolguard._settings import build_settings, parse_dsn
from poolguard.testing import PgBouncerServer, PostgresServer


def as_url(dsn: str, scheme: str) -> str:
    p = conninfo_to_dict(dsn)
    return f"{scheme}://{p['user']}:{p['password']}@{p['host']}:{p['port']}/{p['dbname']}"


@pytest.mark.parametrize(
    "scheme", ["postgresql+asyncpg", "postgresql+psycopg", "postgres", "POSTGRESQL+psycopg2"]
)
def test_driver_urls_mean_the_same_as_libpq_urls(scheme: str) -> None:
    expected = parse_dsn("postgresql://app:pw@db:6432/app?sslmode=require", "dsn")
    assert parse_dsn(f"{scheme}://app:pw@db:6432/app?sslmode=require", "dsn") == expected


def test_another_databases_url_is_refused_by_name() -> None:
    with pytest.raises(poolguard.ConfigurationError, match=r"dsn is a mysql\+pymysql:// URL"):
        parse_dsn("mysql+pymysql://app:pw@db/app", "dsn")
    with pytest.raises(poolguard.ConfigurationError, match="direct_dsn is a sqlite:// URL"):
        build_settings("postgresql://db/app", direct_dsn="sqlite:///x.db", env={})


def test_a_malformed_url_is_a_configuration_error_without_the_password() -> None:
    with pytest.raises(poolguard.ConfigurationError, match="not a valid PostgreSQL URL") as info:
        parse_dsn("postgresql+asyncpg://app:s3cr3t@[db/app", "dsn")
    assert "s3cr3t" not in str(info.value)


def test_database_url_with_asyncpg_driver_works_in_configure(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", as_url(pg_dsn, "postgresql+asyncpg"))
    with poolguard.configure().connection() as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (
            conninfo_to_dict(pg_dsn)["dbname"],
        )


def test_doctor_takes_a_driver_url(pg_dsn: str) -> None:
    out = io.StringIO()
    code = run_doctor(as_url(pg_dsn, "postgresql+asyncpg"), as_json=True, out=out)
    report = json.loads(out.getvalue())
    assert code == 0 and report["pooler"]["mode"] == "direct", report


def test_poolguard_direct_dsn_is_read_and_wins_over_direct_url() -> None:
    env = {"POOLGUARD_DIRECT_DSN": "postgresql+psycopg://d1/app", "DIRECT_URL": "host=d2"}
    assert conninfo_to_dict(build_settings("host=db", env=env).direct_conninfo)["host"] == "d1"
    del env["POOLGUARD_DIRECT_DSN"]
    assert conninfo_to_dict(build_settings("host=db", env=env).direct_conninfo)["host"] == "d2"
    explicit = build_settings("host=db", direct_dsn="host=d0", env=env)
    assert conninfo_to_dict(explicit.direct_conninfo)["host"] == "d0"


def test_unknown_variables_are_warned_about_once_with_a_suggestion(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_settings, "_warned_variables", set())
    env = {"POOLGUARD_MAXSIZE": "8", "POOLGUARD_WIBBLE": "1", "POOLGUARD_MAX_SIZE": "3"}
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        settings = build_settings("host=db", env=env)
        build_settings("host=db", env=env)
    assert settings.max_size == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "environment variable POOLGUARD_MAXSIZE is not a poolguard setting and is ignored "
        "(did you mean POOLGUARD_MAX_SIZE?)",
        "environment variable POOLGUARD_WIBBLE is not a poolguard setting and is ignored; "
        "docs/settings.md lists them",
    ]


def test_every_documented_variable_is_known(caplog: pytest.LogCaptureFixture) -> None:
    env = {v: "" for v in _settings.ENV_VARIABLES}
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        build_settings("host=db", env=env)
    assert not caplog.records


@pytest.mark.pgbouncer
def test_direct_url_falls_back_to_a_direct_dsn_only(
    pg_dsn: str, postgres_server: PostgresServer, pgbouncer_server: PgBouncerServer
) -> None:
    from psycopg.conninfo import make_conninfo

    pytest.importorskip("sqlalchemy")
    from poolguard.sqlalchemy import direct_url

    poolguard.configure(pg_dsn)
    url = direct_url()
    assert (url.host, url.port, url.database) == (
        postgres_server.host,
        postgres_server.port,
        conninfo_to_dict(pg_dsn)["dbname"],
    )
    assert url.password == postgres_server.password  # a URL for a tool to connect with
    pooled = make_conninfo(pgbouncer_server.dsn, dbname=conninfo_to_dict(pg_dsn)["dbname"])
    poolguard.configure(pooled, name="pooled")
    with pytest.raises(poolguard.ConfigurationError, match="-mode pooler: set DIRECT_URL"):
        direct_url("pooled")
