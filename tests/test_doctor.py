"""``poolguard doctor`` against the real PostgreSQL and the real PgBouncer."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from poolguard._doctor import EXIT_OK, EXIT_PROBLEM, EXIT_UNCHECKED, main, run_doctor
from poolguard.testing import (
    PgBouncerServer,
    PostgresServer,
    free_port,
    start_pgbouncer,
)


def doctor_json(dsn: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = run_doctor(dsn, as_json=True, out=out, **kwargs)
    report = json.loads(out.getvalue())
    assert report["exit_code"] == code
    return code, report


def test_direct_postgres(postgres_server: PostgresServer) -> None:
    code, report = doctor_json(postgres_server.url, processes=4)
    assert code == EXIT_OK, report["problems"]
    assert report["pooler"] == {
        "mode": "direct",
        "proxied": False,
        "prepared_statements": "safe",
        "evidence": [],
    }
    assert report["auto_mode"] == {"path": "direct", "mode": "session"}
    budget = report["budget"]
    assert budget["max_connections"] == 100
    assert budget["processes"] == 4
    assert budget["max_size"] == 4  # poolguard's default
    assert budget["fits"] is True
    assert "password" not in report["target"] or "***" in report["target"]
    assert postgres_server.password not in json.dumps(report)
    assert "prepare_threshold" not in report["settings"]["psycopg"]


def test_human_output(postgres_server: PostgresServer) -> None:
    out = io.StringIO()
    assert run_doctor(postgres_server.url, processes=2, out=out) == EXIT_OK
    text = out.getvalue()
    assert "Pooler: direct" in text
    assert "mode='auto' would run in session mode (path: direct)" in text
    assert "max_connections 100 - superuser_reserved_connections 3" in text
    assert "max_size 4 x processes 2 = 8 <= usable" in text
    assert "node-postgres" in text
    assert text.rstrip().endswith("Result: OK")
    assert postgres_server.password not in text


def test_budget_that_does_not_fit_is_a_problem(postgres_server: PostgresServer) -> None:
    code, report = doctor_json(postgres_server.url, processes=50, max_size=4)
    assert code == EXIT_PROBLEM
    assert report["budget"]["fits"] is False
    assert report["budget"]["demand"] == 200
    per_process = report["budget"]["per_process"]
    assert any(f"set max_size <= {per_process}" in p for p in report["problems"])
    assert f"max_size={per_process}" in report["settings"]["poolguard"]


@pytest.fixture
def idle_transaction(postgres_server: PostgresServer) -> Iterator[psycopg.Connection[Any]]:
    with postgres_server.connect(autocommit=False, application_name="doctor-idle-test") as conn:
        conn.execute("SELECT 'hunter2-literal' AS secret")
        yield conn
        conn.rollback()


def test_idle_in_transaction_is_a_problem(
    postgres_server: PostgresServer, idle_transaction: psycopg.Connection[Any]
) -> None:
    time.sleep(0.3)
    code, report = doctor_json(postgres_server.url, idle_seconds=0.2)
    assert code == EXIT_PROBLEM
    (session,) = [
        s for s in report["idle_in_transaction"] if s["application_name"] == "doctor-idle-test"
    ]
    assert session["pid"] == idle_transaction.info.backend_pid
    assert session["seconds"] >= 0.2
    assert session["state"] == "idle in transaction"
    assert session["query"] == "SELECT '…' AS secret"  # literals masked
    assert any("idle in transaction" in p for p in report["problems"])
    # Shorter than the threshold: listed nowhere, no problem.
    code, report = doctor_json(postgres_server.url, idle_seconds=3600)
    assert code == EXIT_OK
    assert report["idle_in_transaction"] == []


@pytest.mark.pgbouncer
def test_pgbouncer_transaction_mode_is_detected(pgbouncer_server: PgBouncerServer) -> None:
    code, report = doctor_json(pgbouncer_server.url, processes=4)
    pooler = report["pooler"]
    assert pooler["mode"] == "transaction"
    assert pooler["proxied"] is True
    assert pooler["prepared_statements"] == "unsafe"
    assert any("SQLSTATE 26000" in e for e in pooler["evidence"])
    assert report["auto_mode"] == {"path": "transaction", "mode": "transaction"}
    assert any("prepared statements break" in w for w in report["warnings"])
    assert "prepare_threshold': None" in report["settings"]["psycopg"]
    assert "statement_cache_size=0" in report["settings"]["asyncpg"]
    assert "pgbouncer=true" in report["settings"]["prisma"]
    assert "default_pool_size" in report["settings"]["pgbouncer"]
    assert report["budget"]["max_connections"] == 100  # read through the pooler
    assert code == EXIT_OK  # a risk the settings address, not a failure of the database


@pytest.mark.pgbouncer
@pytest.mark.parametrize(
    ("pool_mode", "default_pool_size", "mode", "prepared"),
    [
        ("session", 4, "session", "safe"),
        ("statement", 4, "statement", "unsafe"),
        # One server for all clients: the probe sees a client wait for another's transaction.
        ("transaction", 1, "transaction", "unknown"),
    ],
)
def test_other_pooler_modes_are_detected(
    postgres_server: PostgresServer,
    pgbouncer_server: PgBouncerServer,  # skips (or fails) like the other PgBouncer tests
    pool_mode: str,
    default_pool_size: int,
    mode: str,
    prepared: str,
) -> None:
    bouncer = start_pgbouncer(
        postgres_server, pool_mode=pool_mode, default_pool_size=default_pool_size
    )
    try:
        _, report = doctor_json(bouncer.url)
    finally:
        bouncer.stop()
    assert report["pooler"]["mode"] == mode
    assert report["pooler"]["proxied"] is True
    assert report["pooler"]["prepared_statements"] == prepared
    assert report["auto_mode"]["path"] == mode
    assert report["auto_mode"]["mode"] == ("session" if mode == "session" else "transaction")
    if default_pool_size == 1:
        assert (
            "a client waited for another client's transaction to end"
            in (report["pooler"]["evidence"])
        )


def test_pgbouncer_hint_without_a_pooler_is_a_warning(postgres_server: PostgresServer) -> None:
    _, report = doctor_json(postgres_server.url + "?pgbouncer=true")
    assert report["pooler"]["mode"] == "direct"
    assert any("pgbouncer=true" in w for w in report["warnings"])


def test_unreachable_server_exits_2_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    dsn = f"postgresql://someone:s3cret-pw@127.0.0.1:{free_port()}/db?connect_timeout=2"
    out = io.StringIO()
    assert run_doctor(dsn, out=out) == EXIT_UNCHECKED
    assert "s3cret-pw" not in out.getvalue()
    assert "cannot check" in out.getvalue()
    code, report = doctor_json(dsn)
    assert code == EXIT_UNCHECKED
    assert "s3cret-pw" not in report["error"]


def test_no_dsn_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POOLGUARD_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    out = io.StringIO()
    assert run_doctor(None, out=out) == EXIT_UNCHECKED
    assert "POOLGUARD_DSN or DATABASE_URL" in out.getvalue()


def test_main_parses_arguments(
    postgres_server: PostgresServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", postgres_server.url)
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert main(["--json", "--max-size", "2"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["budget"]["processes"], report["budget"]["max_size"]) == (3, 2)
    assert main([postgres_server.url, "--processes", "1000"]) == EXIT_PROBLEM
    assert "PROBLEMS FOUND" in capsys.readouterr().out


def test_full_server_is_reported_not_crashed(postgres_factory: Any) -> None:
    server = postgres_factory(max_connections=6)
    held = [server.connect() for _ in range(5)]  # the doctor's own connection takes the 6th
    try:
        code, report = doctor_json(server.url, processes=2)
    finally:
        for conn in held:
            conn.close()
    assert code == EXIT_PROBLEM
    assert report["pooler"]["mode"] == "unknown"
    assert any("could not probe for a pooler" in w for w in report["warnings"])
    assert report["budget"]["usable"] == 0
    assert any("no connection slot is left" in p for p in report["problems"])


def test_cli_version_and_defaults_in_every_help(capsys: pytest.CaptureFixture[str]) -> None:
    from poolguard import __version__
    from poolguard.cli import main as cli_main

    with pytest.raises(SystemExit) as exited:
        cli_main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"poolguard {__version__}\n"
    for argv, expected in [
        (["demo", "--help"], ["(default: 200)", "(default: 5)"]),
        (
            ["doctor", "--help"],
            [
                "(default: 4)",  # --max-size
                "(default: 0)",  # --headroom
                "(default: 5.0)",  # --idle-seconds
                "(default: $WEB_CONCURRENCY, else 1)",
                "(default: $POOLGUARD_DSN, then",
                "(default: none)",  # --pooler
                "(default: text)",  # --json
            ],
        ),
    ]:
        with pytest.raises(SystemExit):
            cli_main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for default in expected:
            assert default in text, (argv, default)
        assert "(default: None)" not in text


def test_headroom_is_left_free(postgres_server: PostgresServer) -> None:
    _, plain = doctor_json(postgres_server.url, processes=1, cores=8)
    code, report = doctor_json(postgres_server.url, processes=1, headroom=10, cores=8)
    assert code == EXIT_OK
    assert report["budget"]["headroom"] == 10
    assert report["budget"]["usable"] == plain["budget"]["usable"] - 10
    assert f"- headroom 10 = {report['budget']['usable']}\n" in report["budget"]["formula"]
    assert main([postgres_server.url, "--headroom", "-1"]) == EXIT_UNCHECKED
