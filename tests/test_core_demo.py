"""The demo's PgBouncer scene: the trap with psycopg's defaults, then poolguard's, side by side."""

from __future__ import annotations

import io
import os

import pytest

from poolguard import _demo
from poolguard.testing import PostgresServer, find_pgbouncer


def test_scene_is_listed_even_without_pgbouncer() -> None:
    assert _demo.pgbouncer_scene in [scene for _, scene in _demo.SCENES]


def test_without_pgbouncer_the_scene_says_it_was_skipped_and_how_to_see_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_demo.testing, "find_pgbouncer", lambda: None)
    out = io.StringIO()
    _demo.pgbouncer_scene("host=127.0.0.1 password=x dbname=app", out)
    text = out.getvalue()
    assert "skipped: PgBouncer is not installed" in text
    assert "apt-get install pgbouncer" in text and "run `poolguard demo` again" in text


def test_scene_needs_tcp_and_a_password() -> None:
    out = io.StringIO()
    _demo.pgbouncer_scene("host=/var/run/postgresql dbname=app", out)
    assert "skipped: PgBouncer needs a TCP DSN with a password" in out.getvalue()


@pytest.mark.pgbouncer
def test_scene_shows_the_trap_and_the_fix(postgres_server: PostgresServer) -> None:
    if find_pgbouncer() is None:
        if os.environ.get("POOLGUARD_REQUIRE_PGBOUNCER") == "1":
            pytest.fail("POOLGUARD_REQUIRE_PGBOUNCER=1 but pgbouncer is not installed")
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    out = io.StringIO()
    _demo.pgbouncer_scene(postgres_server.dsn, out)
    text = out.getvalue()
    header, failed = (
        next(line for line in text.splitlines() if key in line)
        for key in ("psycopg_pool + psycopg defaults", "requests failed")
    )
    assert header.index("psycopg_pool") < header.index("poolguard defaults")
    trapped, guarded = (int(n) for n in failed.split()[-2:])
    assert trapped >= 1 and guarded == 0
    assert 'prepared statement "_pg3_' in text
    assert postgres_server.password not in text
