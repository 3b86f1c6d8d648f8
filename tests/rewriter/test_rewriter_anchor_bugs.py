"""Regression tests for open bugs of other poolers, each driven directly and through the
rewriter with the same messages (or the same real client) and compared."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
from rawpg import SYNC, RawClient, bind, close, describe, execute, parse, query, replies, rows
from test_rewriter_statements import both

from poolguard.rewriter import RewriterHandle
from poolguard.testing import PostgresServer, find_postgres_bindir


def test_pgbouncer_1118_reusing_a_statement_name(pg_dsn: str, proxy: RewriterHandle) -> None:
    """pgx closes and re-parses a cached statement name in one pipeline; a name parsed twice
    without Close is PostgreSQL's own 42P05, never a proxy error."""
    both(
        pg_dsn,
        proxy,
        (parse(b"stmtcache_1", b"select 1"), bind(b"stmtcache_1"), execute(), SYNC),
        (
            close(b"stmtcache_1"),
            parse(b"stmtcache_1", b"select 2"),
            bind(b"stmtcache_1"),
            execute(),
            SYNC,
        ),
        (parse(b"stmtcache_1", b"select 2"), SYNC),
        (bind(b"stmtcache_1"), execute(), SYNC),
    )


def test_pgbouncer_1038_cached_plan_after_ddl_on_the_same_connection(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    proxy = make_rewriter(pool_size=1)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("create table t (x int)")
        admin.execute("insert into t values (1)")
        with RawClient(pg_dsn) as direct, RawClient(proxy.dsn) as via:
            for c in (direct, via):
                c.run(parse(b"ps1", b"select * from t"), describe(b"ps1"), SYNC)
            admin.execute("alter table t alter column x type bigint")
            for batch in [
                (bind(b"ps1"), execute(), SYNC),
                (parse(b"ps2", b"select * from t"), bind(b"ps2"), execute(), SYNC),
            ]:
                assert replies(via.run(*batch)) == replies(direct.run(*batch))


def test_pgbouncer_991_sql_deallocate_of_a_protocol_statement(
    pg_dsn: str, proxy: RewriterHandle
) -> None:
    both(
        pg_dsn,
        proxy,
        (parse(b"s", b"select 1"), bind(b"s"), execute(), SYNC),
        (query(b"DEALLOCATE s"),),
        (bind(b"s"), execute(), SYNC),
        (parse(b"s", b"select 3"), bind(b"s"), execute(), SYNC),
        (query(b"DEALLOCATE ALL"),),
        (bind(b"s"), execute(), SYNC),
    )


def test_pgcat_611_pgbench_prepared_with_several_commands_outside_a_transaction(
    make_rewriter: Callable[..., RewriterHandle],
    pg_dsn: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    proxy = make_rewriter(pool_size=2)
    bindir = find_postgres_bindir()
    env = dict(os.environ, PGPASSWORD=postgres_server.password)
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    base = ["-h", "127.0.0.1", "-U", postgres_server.user]
    subprocess.run(
        [str(bindir / "pgbench"), "-i", "-q", *base, "-p", str(postgres_server.port), dbname],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    script = tmp_path / "select-2.sql"
    script.write_text(
        "\\set aid random(1, 100000)\n"
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid and 1 != 0;\n"
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid and 2 != 0;\n"
    )
    env["PGPASSWORD"] = proxy.password
    argv = ["-M", "prepared", "-f", str(script), "-c", "8", "-t", "25", "-p", str(proxy.port)]
    out = subprocess.run(
        [str(bindir / "pgbench"), *argv, *base, dbname],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    done = re.search(r"actually processed: (\d+)/(\d+)", out.stdout)
    assert done is not None and done.group(1) == done.group(2) == "200"


def test_supavisor_1174_bare_describe_of_a_statement_from_an_earlier_transaction(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    """Describe (no Bind, no Execute) of a statement prepared in an earlier transaction, on a
    server connection that has never seen it: PostgreSQL describes it, never 26000."""
    proxy = make_rewriter(pool_size=2)
    with RawClient(pg_dsn) as direct, RawClient(proxy.dsn) as via, RawClient(proxy.dsn) as hog:
        hog.run(query(b"begin"))
        first = (parse(b"d", b"select $1::int + 1 as n", (23,)), SYNC)
        assert replies(via.run(*first)) == replies(direct.run(*first))
        hog.run(query(b"commit"))
        hog.run(query(b"begin"))  # takes the backend `via` used, so its Describe goes elsewhere
        for batch in [(describe(b"d"), SYNC), (describe(b"d"), bind(b"d", b"41"), execute(), SYNC)]:
            want, got = direct.run(*batch), via.run(*batch)
            assert replies(got) == replies(want)
            assert [b for k, b in got if k == b"T"] == [b for k, b in want if k == b"T"]
        hog.run(query(b"commit"))


def test_odyssey_1345_statements_never_share_a_server_statement_by_collision(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    """Each distinct (text, parameter types) gets its own server statement, however many
    there are and however alike they look: 600 statements over 3 clients and 2 backends."""
    proxy = make_rewriter(pool_size=2, max_prepared=50)
    clients = [RawClient(proxy.dsn) for _ in range(3)]
    try:
        for i in range(200):
            for n, c in enumerate(clients):
                sql = f"select {i} + {n * 1000} as v -- {'x' * (i % 7)}".encode()
                name = f"q{i}".encode()
                got = c.run(parse(name, sql), bind(name), execute(), SYNC)
                assert rows(got) == [[str(i + n * 1000)]]
        for types, want in [((23,), "integer"), ((20,), "bigint"), ((25,), "text")]:
            sql = b"select pg_typeof($1)::text"
            got = clients[0].run(parse(b"t", sql, types), bind(b"t", b"1"), execute(), SYNC)
            clients[0].run(close(b"t"), SYNC)
            assert rows(got) == [[want]]
    finally:
        for c in clients:
            c.close()
