"""No session state survives a return: every way of leaving state, sync and async, max_size=1.

Each case leaves state on the one server connection through one psycopg entry point, returns
it, and the next borrower (the very same backend) must see a session like a fresh one: default
settings and role, no advisory locks, no LISTEN, no temp tables, no prepared statements, no
open cursors. The guard is off: the reset is about the next borrower, whatever guard= says.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import poolguard
from poolguard import SessionStateError

ROUNDS = 3

# (case id, steps). A step is (how, sql, params): "execute" (cursor.execute), "conn" (the
# connection's execute), "executemany", "stream", "copy" (COPY ... TO STDOUT, read to the
# end), "named" (a named cursor inside the transaction), "held" (a named WITH HOLD cursor),
# "pipeline" (conn.execute inside conn.pipeline()), "client_cursor" (the caller swaps
# cursor_factory for psycopg.ClientCursor, whose statements poolguard never sees).
CASES: list[tuple[str, list[tuple[str, str, Any]]]] = [
    ("SET", [("execute", "SET statement_timeout = '4321ms'", None)]),
    ("SET search_path", [("conn", "SET search_path = pg_temp, public", None)]),
    ("SET ROLE", [("execute", "SET ROLE reset_probe", None)]),
    ("set_config literal", [("execute", "SELECT set_config('app.tenant', '42', false)", None)]),
    (
        "set_config is_local parameter",
        [("execute", "SELECT set_config('app.tenant', %s, %s)", ("42", False))],
    ),
    (
        "set_config in a CTE",
        [
            (
                "execute",
                "WITH s AS (SELECT set_config('statement_timeout', %s, %s)) SELECT * FROM s",
                ("4321ms", False),
            )
        ],
    ),
    ("LISTEN", [("execute", "LISTEN reset_probe", None)]),
    ("temp table", [("execute", "CREATE TEMP TABLE reset_probe (x int)", None)]),
    ("PREPARE", [("execute", "PREPARE reset_probe AS SELECT 1", None)]),
    ("WITH HOLD cursor (SQL)", [("execute", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", None)]),
    ("WITH HOLD cursor (named)", [("held", "SELECT 1", None)]),
    ("advisory lock via SELECT", [("execute", "SELECT pg_advisory_lock(7001)", None)]),
    (
        "DO block",
        [
            (
                "execute",
                "DO $$BEGIN PERFORM set_config('app.tenant', '42', false); "
                "PERFORM pg_advisory_lock(7002); END$$",
                None,
            )
        ],
    ),
    ("plpgsql function", [("execute", "SELECT reset_probe_leave_state()", None)]),
    (
        "executemany",
        [
            ("executemany", "SELECT set_config('app.tenant', %s, false)", [("1",), ("2",)]),
            ("executemany", "LISTEN reset_probe", [()]),
        ],
    ),
    ("stream", [("stream", "SELECT pg_advisory_lock(7003)", None)]),
    (
        "copy",
        [("copy", "COPY (SELECT set_config('app.tenant', '42', false)) TO STDOUT", None)],
    ),
    ("named cursor", [("named", "SELECT pg_advisory_lock(7004)", None)]),
    ("pipeline", [("pipeline", "SELECT set_config('statement_timeout', '4321ms', false)", None)]),
    ("unobserved cursor class", [("client_cursor", "SET statement_timeout = '4321ms'", None)]),
]

# What a fresh session looks like, in one round trip.
PROBE = """
SELECT pg_backend_pid(),
       current_setting('statement_timeout'),
       current_setting('search_path'),
       coalesce(current_setting('app.tenant', true), ''),
       current_user = session_user,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
       (SELECT count(*) FROM pg_prepared_statements),
       (SELECT count(*) FROM pg_cursors)
"""
CLEAN = ("0", '"$user", public', "", True, 0, 0, 0, 0, 0)

SETUP = """
CREATE FUNCTION reset_probe_leave_state() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('app.tenant', '42', false);
    PERFORM pg_advisory_lock(7005);
END$$;
DO $$BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reset_probe') THEN
        CREATE ROLE reset_probe;
    END IF;
END$$;
"""


@pytest.fixture
def dsn(pg_dsn: str) -> Iterator[str]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    yield pg_dsn


def _held_sync(conn: psycopg.Connection[Any], sql: str) -> None:
    """Open a WITH HOLD cursor and drop it unclosed, as a caller who forgot it would."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # psycopg's "deleted while open"
        named = conn.cursor("reset_probe_cur", withhold=True)
        named.execute(sql)
        named.fetchall()
        conn.commit()
        del named
        gc.collect()


async def _held_async(conn: psycopg.AsyncConnection[Any], sql: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        named = conn.cursor("reset_probe_cur", withhold=True)
        await named.execute(sql)
        await named.fetchall()
        await conn.commit()
        del named
        gc.collect()


def _run_sync(conn: psycopg.Connection[Any], steps: list[tuple[str, str, Any]]) -> None:
    for how, sql, params in steps:
        cur = conn.cursor()
        if how == "execute":
            cur.execute(sql, params)
        elif how == "conn":
            conn.execute(sql, params)
        elif how == "executemany":
            cur.executemany(sql, params)
        elif how == "stream":
            for _ in cur.stream(sql, params):
                pass
        elif how == "copy":
            with cur.copy(sql) as copy:
                for _ in copy:
                    pass
        elif how == "held":
            _held_sync(conn, sql)
        elif how == "named":
            with conn.cursor("reset_probe_cur") as named:
                named.execute(sql, params)
                named.fetchall()
        elif how == "pipeline":
            with conn.pipeline():
                conn.execute(sql, params)
        elif how == "client_cursor":
            conn.cursor_factory = psycopg.ClientCursor
            conn.execute(sql, params)


async def _run_async(conn: psycopg.AsyncConnection[Any], steps: list[tuple[str, str, Any]]) -> None:
    for how, sql, params in steps:
        cur = conn.cursor()
        if how == "execute":
            await cur.execute(sql, params)
        elif how == "conn":
            await conn.execute(sql, params)
        elif how == "executemany":
            await cur.executemany(sql, params)
        elif how == "stream":
            async for _ in cur.stream(sql, params):
                pass
        elif how == "copy":
            async with cur.copy(sql) as copy:
                async for _ in copy:
                    pass
        elif how == "held":
            await _held_async(conn, sql)
        elif how == "named":
            async with conn.cursor("reset_probe_cur") as named:
                await named.execute(sql, params)
                await named.fetchall()
        elif how == "pipeline":
            async with conn.pipeline():
                await conn.execute(sql, params)
        elif how == "client_cursor":
            conn.cursor_factory = psycopg.AsyncClientCursor
            await conn.execute(sql, params)


def _dirty(seen: tuple[Any, ...], pid: int) -> str:
    assert seen[0] == pid, "max_size=1 must hand out the same backend again"
    return "" if seen[1:] == CLEAN else f"{seen[1:]} != {CLEAN}"


@pytest.mark.parametrize(("case", "steps"), CASES, ids=[c for c, _ in CASES])
def test_next_borrower_sees_a_fresh_session_sync(
    dsn: str, case: str, steps: list[tuple[str, str, Any]]
) -> None:
    pool = poolguard.configure(dsn, name="reset", min_size=1, max_size=1, guard="off")
    dirty = []
    for _ in range(ROUNDS):
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            _run_sync(conn, steps)
        with pool.connection() as conn:
            found = _dirty(conn.execute(PROBE).fetchone() or (), pid)
        dirty += [found] if found else []
    assert not dirty, f"{case}: {len(dirty)} of {ROUNDS} next borrowers dirty: {dirty[0]}"


@pytest.mark.parametrize(("case", "steps"), CASES, ids=[c for c, _ in CASES])
def test_next_borrower_sees_a_fresh_session_async(
    dsn: str, case: str, steps: list[tuple[str, str, Any]]
) -> None:
    async def main() -> list[str]:
        poolguard.configure(dsn, name="reset", min_size=1, max_size=1, guard="off")
        pool = poolguard.get_async_pool("reset")
        dirty = []
        try:
            for _ in range(ROUNDS):
                async with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    await _run_async(conn, steps)
                async with pool.connection() as conn:
                    cur = await conn.execute(PROBE)
                    found = _dirty(await cur.fetchone() or (), pid)
                dirty += [found] if found else []
        finally:
            await pool.close()
        return dirty

    dirty = asyncio.run(main())
    assert not dirty, f"{case}: {len(dirty)} of {ROUNDS} next borrowers dirty: {dirty[0]}"


def test_raise_refuses_listen_through_executemany(dsn: str) -> None:
    pool = poolguard.configure(dsn, name="strict", min_size=1, max_size=1, guard="raise")
    with pool.connection() as conn:
        conn.autocommit = True
        with pytest.raises(SessionStateError, match="LISTEN"):
            conn.cursor().executemany("LISTEN reset_probe", [()])
        with pytest.raises(SessionStateError, match="advisory"):
            for _ in conn.cursor().stream("SELECT pg_advisory_lock(1)"):
                pass
        with pytest.raises(SessionStateError, match="set_config"):
            conn.cursor().copy("COPY (SELECT set_config('a.b', 'c', false)) TO STDOUT")
        assert conn.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
