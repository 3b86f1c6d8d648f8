"""Real drivers through the rewriter: psycopg, asyncpg, pgbench; COPY, cancel, TLS refusal,
settings replay, authentication, limits, and clients that vanish mid-request."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from rawpg import SYNC, RawClient, bind, execute, kinds, parse, query, rows

from poolguard.rewriter import RewriterHandle, UpstreamError, start
from poolguard.rewriter import _protocol as p
from poolguard.testing import PostgresServer

CLIENTS = 50


def test_psycopg_many_clients_over_four_connections(
    make_rewriter: Callable[..., RewriterHandle], pg_dsn: str
) -> None:
    proxy = make_rewriter(pool_size=4)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("create table t (id int primary key, v text)")
        c.execute("insert into t select g, 'v' || g from generate_series(1, 100) g")

    async def client(n: int) -> int:
        done = 0
        async with await psycopg.AsyncConnection.connect(proxy.dsn, prepare_threshold=0) as conn:
            for i in range(10):
                async with conn.transaction():
                    cur = await conn.execute("select v from t where id = %s", (1 + (n + i) % 100,))
                    assert await cur.fetchone() == (f"v{1 + (n + i) % 100}",)
                    cur = await conn.execute("select count(*) from t where id <= %s", (n,))
                    assert await cur.fetchone() == (min(n, 100),)
                cur = await conn.execute("select %s::int + %s::int", (n, i))
                assert await cur.fetchone() == (n + i,)
                done += 1
        return done

    async def main() -> list[int]:
        return await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    assert asyncio.run(main()) == [10] * CLIENTS
    with psycopg.connect(proxy.dsn) as c:
        backends = c.execute(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and backend_type = 'client backend'"
        ).fetchone()
    assert backends is not None and backends[0] <= 4


def test_asyncpg_many_clients_with_its_statement_cache(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=4)

    async def client(n: int) -> int:
        conn = await asyncpg.connect(proxy.url)
        try:
            done = 0
            for i in range(10):
                assert await conn.fetchval("select $1::int * 2", n) == 2 * n
                async with conn.transaction():
                    row = await conn.fetchrow("select $1::text as a, $2::int as b", str(i), n)
                    assert row is not None and (row["a"], row["b"]) == (str(i), n)
                done += 1
            return done
        finally:
            await conn.close()

    async def main() -> list[int]:
        return await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    assert asyncio.run(main()) == [10] * CLIENTS


def _pgbench() -> str:
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout
    path = Path(bindir.strip()) / "pgbench"
    if not path.exists():
        found = shutil.which("pgbench")
        if found is None:
            pytest.skip("pgbench is not installed")
        return found
    return str(path)


def test_pgbench_prepared_50_clients_over_4_connections(
    make_rewriter: Callable[..., RewriterHandle], pg_dsn: str
) -> None:
    pgbench = _pgbench()
    init = subprocess.run([pgbench, "-i", "-q", "-s", "1", pg_dsn], capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    proxy = make_rewriter(pool_size=4)
    env = {**os.environ, "PGPASSWORD": proxy.password}
    args = ["-h", proxy.host, "-p", str(proxy.port), "-U", proxy.user, proxy.dbname]
    for script in ("-S", "-N"):  # read-only and a multi-statement transaction
        run = subprocess.run(
            [pgbench, "-M", "prepared", script, "-c", str(CLIENTS), "-j", "2", "-t", "20", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"number of transactions actually processed: {CLIENTS * 20}/" in run.stdout
        failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
        assert failed is not None and failed.group(1) == "0"


def test_cached_plan_must_not_change_result_type_recovers(
    proxy: RewriterHandle, pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("create table r (a int)")
        c.execute("insert into r values (1)")

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url)
        try:
            assert [tuple(r) for r in await conn.fetch("select * from r")] == [(1,)]
            with psycopg.connect(pg_dsn, autocommit=True) as c:
                c.execute("alter table r add column b int default 7")
            # asyncpg re-prepares on "cached plan must not change result type"; through the
            # proxy that must reach a fresh server statement, not the stale shared one.
            assert [tuple(r) for r in await conn.fetch("select * from r")] == [(1, 7)]
            assert [tuple(r) for r in await conn.fetch("select * from r")] == [(1, 7)]
        finally:
            await conn.close()

    asyncio.run(main())
    with RawClient(proxy.dsn) as raw:  # a client that prepares the same SQL now also gets 2 columns
        got = raw.run(parse(b"s", b"select * from r"), bind(b"s"), execute(), SYNC)
        assert rows(got) == [["1", "7"]]


def test_copy_in_and_out(proxy: RewriterHandle) -> None:
    with psycopg.connect(proxy.dsn, prepare_threshold=0) as conn:
        conn.execute("create table c (id int, s text)")
        with conn.cursor().copy("copy c from stdin") as copy:
            for i in range(1000):
                copy.write_row((i, f"row {i}"))
        conn.commit()
        out = bytearray()
        with conn.cursor().copy("copy (select * from c order by id) to stdout") as copy:
            for chunk in copy:
                out += chunk
        assert out.count(b"\n") == 1000 and out.startswith(b"0\trow 0\n")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # noqa: SIM117
            with conn.cursor().copy("copy c from stdin") as copy:
                copy.write(b"not-a-number\tx\n")
        conn.rollback()
        assert conn.execute("select count(*) from c").fetchone() == (1000,)


def test_cancel_is_routed_to_the_right_backend(proxy: RewriterHandle) -> None:
    with (
        psycopg.connect(proxy.dsn, autocommit=True) as busy,
        psycopg.connect(proxy.dsn, autocommit=True) as bystander,
    ):
        timer = threading.Timer(0.5, busy.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            busy.execute("select pg_sleep(20)")
        assert time.monotonic() - started < 10
        timer.join()
        assert busy.execute("select 1").fetchone() == (1,)
        assert bystander.execute("select 2").fetchone() == (2,)


def test_ssl_request_is_answered_no(proxy: RewriterHandle) -> None:
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn + " sslmode=require")
    with psycopg.connect(proxy.dsn + " sslmode=prefer") as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_settings_follow_the_client_to_each_backend(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=1)
    with (
        psycopg.connect(proxy.dsn, application_name="app-a", autocommit=True) as a,
        psycopg.connect(proxy.dsn, application_name="app-b", autocommit=True) as b,
    ):
        assert a.info.parameter_status("application_name") == "app-a"
        for _ in range(2):
            assert a.execute("show application_name").fetchone() == ("app-a",)
            assert b.execute("show application_name").fetchone() == ("app-b",)
        a.execute("set timezone = 'Asia/Tokyo'")
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        b.execute("select 1")
        assert a.execute("show timezone").fetchone() == ("Asia/Tokyo",)
        assert b.execute("show timezone").fetchone() != ("Asia/Tokyo",)
        assert a.info.parameter_status("server_version")


def test_wrong_password_is_refused_and_never_logged(
    proxy: RewriterHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poolguard")
    bad = proxy.dsn.replace(proxy.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad)
    with pytest.raises(psycopg.OperationalError, match="does not exist") as refused:
        psycopg.connect(proxy.dsn + " dbname=no_such_db")
    assert "SQLSTATE 3D000" in str(refused.value)  # the upstream's own answer, passed on
    assert "not-the-password" not in caplog.text and proxy.password not in caplog.text
    assert proxy.password not in repr(proxy)
    with psycopg.connect(proxy.dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_unreachable_upstream_fails_fast_with_a_clear_message() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match=f"could not connect to upstream .*:{port}"):
        start(f"postgresql://u:secret-pw@127.0.0.1:{port}/db")


def test_oversized_and_malformed_messages_end_only_that_client(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(max_message_size=64 * 1024)
    with psycopg.connect(proxy.dsn, autocommit=True) as other:
        with RawClient(proxy.dsn) as big:
            big.send(query(b"select '" + b"x" * 100_000 + b"'"))
            kind, body = big.read()
            assert kind == b"E" and p.parse_error_fields(body)["C"] == "54000"
            with pytest.raises(ConnectionError):
                big.read()
        with RawClient(proxy.dsn) as bad:
            bad.send(p.frame(b"P", b"no terminators"))
            kind, body = bad.read()
            assert kind == b"E" and p.parse_error_fields(body)["C"] == "08P01"
        with RawClient(proxy.dsn) as odd:
            odd.send(p.frame(b"Y", b""))
            assert odd.read()[0] == b"E"
        assert other.execute("select 'still fine'").fetchone() == ("still fine",)


def _assert_clean(proxy: RewriterHandle) -> None:
    """The pool's only backend has no transaction open and no stray replies pending."""
    with RawClient(proxy.dsn) as c:
        got = c.run(query(b"select now() = statement_timestamp(), count(*) from pg_locks"))
        assert kinds(got) == "TDCZ"
        assert got[-1][1] == b"I"
        assert rows(got)[0][0] == "t"  # a fresh transaction, not one left open
        assert rows(c.run(query(b"select 1"))) == [["1"]]


@pytest.mark.parametrize(
    "leftover",
    [
        [query(b"begin"), query(b"select 1")],  # idle in transaction
        [parse(b"s", b"select pg_sleep(0.3)"), bind(b"s"), execute()],  # pipeline, no Sync
        [query(b"begin"), parse(b"", b"select 1/0"), bind(b""), execute()],  # failed, no Sync
        [query(b"create temp table x (a int)"), query(b"copy x from stdin"), b"d\0\0\0\x061\n"],
    ],
    ids=["in-transaction", "mid-pipeline", "failed-pipeline", "mid-copy"],
)
def test_client_disconnecting_mid_request_leaves_no_dirty_connection(
    make_rewriter: Callable[..., RewriterHandle], leftover: list[bytes]
) -> None:
    proxy = make_rewriter(pool_size=1)
    c = RawClient(proxy.dsn)
    c.send(*leftover)
    time.sleep(0.1)
    c.sock.close()  # no Terminate: the connection just drops
    _assert_clean(proxy)


def test_unix_socket_in_a_private_folder_trusts_clients(
    make_rewriter: Callable[..., RewriterHandle], tmp_path: Path
) -> None:
    folder = tmp_path / "sock"
    proxy = make_rewriter(listen=f"{folder}:6543")
    assert folder.stat().st_mode & 0o777 == 0o700
    conninfo = f"host={folder} port=6543 user={proxy.user} dbname={proxy.dbname}"
    with psycopg.connect(conninfo, prepare_threshold=0) as conn:  # no password
        assert conn.execute("select %s::int", (3,)).fetchone() == (3,)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(ValueError, match="mode 0700"):
        make_rewriter(listen=str(loose))


def test_server_connection_killed_by_the_server(
    make_rewriter: Callable[..., RewriterHandle], pg_dsn: str
) -> None:
    proxy = make_rewriter(pool_size=1)
    with psycopg.connect(proxy.dsn, autocommit=True) as victim:
        pid = victim.execute("select pg_backend_pid()").fetchone()
        victim.execute("begin")
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", pid)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
    # The pool replaces the dead connection for the next client.
    with psycopg.connect(proxy.dsn, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        idle_pid = conn.execute("select pg_backend_pid()").fetchone()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:  # now kill it while idle in the pool
        admin.execute("select pg_terminate_backend(%s)", idle_pid)
    time.sleep(0.2)
    with psycopg.connect(proxy.dsn, autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_queries_pipelined_behind_the_password_are_answered(proxy: RewriterHandle) -> None:
    extra = parse(b"s", b"select 7") + bind(b"s") + execute() + SYNC + query(b"select 8")
    with RawClient(proxy.dsn, after_password=extra) as c:
        assert rows(c.until_ready(2)) == [["7"], ["8"]]


def test_a_startup_setting_the_server_rejects_is_dropped_with_a_warning(
    proxy: RewriterHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.rewriter")
    with RawClient(proxy.dsn, TimeZone="No/Such_Zone", DateStyle="German") as c:
        got = c.run(query(b"show datestyle"))
        assert kinds(got).replace("S", "") == "TDCZ"  # no error; S: DateStyle's canonical form
        assert rows(got) == [["German, DMY"]]
        assert rows(c.run(query(b"select 1"))) == [["1"]]
    assert "could not apply client setting TimeZone='No/Such_Zone'" in caplog.text


def test_psycopg_pipeline_mode_and_statement_cache_eviction(proxy: RewriterHandle) -> None:
    # prepared_max=2 makes psycopg close statements it evicts from its own cache.
    with psycopg.connect(proxy.dsn, prepare_threshold=0, autocommit=True) as conn:
        conn.prepared_max = 2
        conn.execute("create table pl (id int primary key, v int)")
        with conn.pipeline():
            conn.cursor().executemany(
                "insert into pl values (%s, %s)", [(i, i * i) for i in range(50)]
            )
            cur = conn.execute("select count(*) from pl")
        assert cur.fetchone() == (50,)
        for i in range(20):  # five statements cycling through a cache of two
            sql = ["select v from pl where id = %s", "select %s::int", "select -%s::int"][i % 3]
            assert conn.execute(sql, (i % 5,)).fetchone() is not None
            assert conn.execute("select v + %s from pl where id = 1", (i,)).fetchone() == (1 + i,)
            assert conn.execute("select %s::text", (str(i),)).fetchone() == (str(i),)
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute("insert into pl values (%s, %s)", (1, 1))
            conn.execute("select 1")
        assert conn.execute("select count(*) from pl").fetchone() == (50,)


def test_asyncpg_small_statement_cache_closes_and_reprepares(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=2, max_prepared=3)

    async def main() -> None:
        conns = [await asyncpg.connect(proxy.url, statement_cache_size=2) for _ in range(3)]
        try:
            for i in range(30):
                c = conns[i % 3]
                assert await c.fetchval(f"select $1::int + {i % 7}", i) == i + i % 7
            async with conns[0].transaction():
                stmt = await conns[0].prepare("select $1::int * 10")
                assert await stmt.fetchval(4) == 40
                assert await stmt.fetchval(5) == 50
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


def test_sidecar_cli_serves_until_sigterm(pg_dsn: str) -> None:
    import signal
    import sys

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "poolguard.rewriter", "--upstream", pg_dsn]
    proc = subprocess.Popen(
        [*cmd, "--listen", f"127.0.0.1:{port}", "--pool-size", "2", "--max-message-size", "2048"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = conninfo_to_dict(pg_dsn)
        dsn = make_conninfo(pg_dsn, host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(dsn, prepare_threshold=0, connect_timeout=2) as conn:
                    assert conn.execute("select %s::int", (5,)).fetchone() == (5,)
                    # --max-message-size reached the proxy: a 3 kB query ends this client.
                    with pytest.raises(psycopg.Error) as too_big:
                        conn.execute("select %s::text", ("x" * 3000,))
                    assert too_big.value.sqlstate == "54000"
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "rewriter listening on 127.0.0.1" in err
    assert str(info["password"]) not in err
    nopw = subprocess.run(
        [*cmd[:-1], make_conninfo(pg_dsn, password=""), "--listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PGPASSWORD"},
    )
    assert nopw.returncode == 2 and "has no password" in nopw.stderr


def test_clients_wait_for_existing_connections_when_the_server_refuses_more(
    postgres_factory: Callable[..., PostgresServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = postgres_factory(max_connections=3, settings={"superuser_reserved_connections": "0"})
    proxy = start(server.dsn, pool_size=6, isolate=False)  # its log is read below
    try:

        async def client(n: int) -> int:
            async with await psycopg.AsyncConnection.connect(proxy.dsn, autocommit=True) as conn:
                cur = await conn.execute("select %s::int, pg_sleep(0.05)", (n,))
                row = await cur.fetchone()
                return row[0] if row else -1

        async def main() -> list[int]:
            return await asyncio.gather(*(client(n) for n in range(12)))

        assert asyncio.run(main()) == list(range(12))
    finally:
        proxy.stop()
    assert "too many clients" in caplog.text  # the pool did try to grow past the server's limit
