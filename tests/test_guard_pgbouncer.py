"""The guard's claims about transaction pooling, checked against the real PgBouncer 1.18.

For each setting: client A runs a plain SET, then client B opens a transaction on the server
connection A just released, then A reads the setting back on another server connection. A
setting PgBouncer re-applies comes back intact and does not leak into B; any other one is lost
by A and leaks into B. The classifier must agree with what the server shows.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from poolguard._sqlstate_rules import classify
from poolguard.testing import PgBouncerServer

pytestmark = pytest.mark.pgbouncer


def connect(server: PgBouncerServer, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(server.dsn, prepare_threshold=None, **kwargs)


def pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def show(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize(
    ("statement", "name", "value"),
    [
        ("SET TIME ZONE 'Asia/Tokyo'", "TimeZone", "Asia/Tokyo"),
        ("SET application_name = 'guard-probe'", "application_name", "guard-probe"),
        ("SET DateStyle = 'SQL, DMY'", "DateStyle", "SQL, DMY"),
        ("SELECT set_config('TimeZone', 'Asia/Tokyo', false)", "TimeZone", "Asia/Tokyo"),
        ("SET search_path = leaky", "search_path", "leaky"),
        ("SET statement_timeout = '12345ms'", "statement_timeout", "12345ms"),
        ("SELECT set_config('search_path', 'leaky', false)", "search_path", "leaky"),
    ],
)
def test_classifier_matches_pgbouncer(
    pgbouncer_server: PgBouncerServer, statement: str, name: str, value: str
) -> None:
    with connect(pgbouncer_server, autocommit=True) as a, connect(pgbouncer_server) as b:
        a.execute(statement)
        released = pid(a)
        # B (not autocommit) opens a transaction; PgBouncer hands it the most recently
        # released server connection, which is A's.
        if pid(b) != released:
            pytest.skip("PgBouncer gave B another server connection; nothing to compare")
        leaked_into_b = show(b, name) == value
        a_on_other_server = pid(a) != released
        kept_by_a = show(a, name) == value
        b.rollback()
        # Put the server connection back as it was for the tests that share this PgBouncer.
        with connect(pgbouncer_server) as fix:
            if pid(fix) == released:
                fix.execute(f"RESET {name}")
                fix.commit()

    assert a_on_other_server
    survives_pooling = kept_by_a and not leaked_into_b
    (finding,) = classify(statement)
    assert finding.breaks_transaction_pooling is (not survives_pooling)
    assert finding.leaves_session_state is True
