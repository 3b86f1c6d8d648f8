"""Faults: PostgreSQL restarted under load, clients that vanish mid-batch or mid-transaction
holding a row lock, truncated packets. Other clients carry on, no server connection is left in
a transaction or holding locks, and the proxy recovers without being restarted."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from rawpg import SYNC, RawClient, bind, execute, parse, query

from poolguard import rewriter
from poolguard.rewriter import RewriterHandle
from poolguard.rewriter import _protocol as p
from poolguard.testing import PostgresServer


def _server_side_clean(admin: psycopg.Connection[tuple[object, ...]], dbname: str) -> None:
    """No session of the database is in a transaction or holds a lock (waits up to 10 s for
    the proxy's cleanup, which runs when it notices the client left)."""
    deadline = time.monotonic() + 10
    while True:
        busy = admin.execute(
            "select pid, state from pg_stat_activity where datname = %s and pid <> "
            "pg_backend_pid() and (state like 'idle in transaction%%' or state = 'active')",
            (dbname,),
        ).fetchall()
        locks = admin.execute(
            "select l.pid, l.locktype from pg_locks l join pg_stat_activity a using (pid) "
            "where a.datname = %s and l.pid <> pg_backend_pid() and l.locktype <> 'virtualxid'",
            (dbname,),
        ).fetchall()
        if (not busy and not locks) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert busy == [] and locks == []


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def test_client_vanishing_mid_transaction_releases_its_row_lock(
    pg_dsn: str, proxy: RewriterHandle
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("create table acct (id int primary key, v int)")
        admin.execute("insert into acct values (1, 0)")
        holder = RawClient(proxy.dsn)
        holder.run(query(b"begin"))
        holder.run(query(b"update acct set v = v + 1 where id = 1"))
        holder.sock.close()  # gone without Terminate, the row still locked
        with psycopg.connect(proxy.dsn, autocommit=True) as other:
            other.execute("set lock_timeout = '5s'")
            other.execute("update acct set v = v + 10 where id = 1")
            assert other.execute("select v from acct").fetchone() == (10,)  # rolled back
            other.execute("reset lock_timeout")
        _server_side_clean(admin, _dbname(pg_dsn))


def test_client_vanishing_mid_batch_commits_nothing(pg_dsn: str, proxy: RewriterHandle) -> None:
    """Extended-protocol messages without their Sync: PostgreSQL aborts them when the client
    goes away, and so must the proxy (a Sync of its own would commit them)."""
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("create table batch (id int)")
        for dsn in (pg_dsn, proxy.dsn):
            c = RawClient(dsn)
            c.run(parse(b"ins", b"insert into batch values ($1::int)", (23,)), SYNC)
            msgs = [bind(b"ins", str(i).encode()) + execute() for i in range(50)]
            c.send(*msgs, p.FLUSH_MSG)
            time.sleep(0.3)  # the inserts have run, uncommitted
            c.sock.close()
        _server_side_clean(admin, _dbname(pg_dsn))
        assert admin.execute("select count(*) from batch").fetchone() == (0,)


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_truncated_message_then_disconnect_leaves_nothing_behind(
    pg_dsn: str, proxy: RewriterHandle, cut: int
) -> None:
    with RawClient(proxy.dsn) as bystander:
        c = RawClient(proxy.dsn)
        c.run(query(b"begin"))
        msg = query(b"select pg_sleep(0)")
        c.send(msg[:cut])
        time.sleep(0.1)
        c.sock.close()
        assert bystander.run(query(b"select 1"))[0][0] == b"T"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        _server_side_clean(admin, _dbname(pg_dsn))


def test_cancel_and_ssl_requests_from_strangers_are_harmless(proxy: RewriterHandle) -> None:
    with psycopg.connect(proxy.dsn, autocommit=True) as conn:
        for packet in (p.build_cancel(1, 12345), p.build_cancel(999, 0)):
            with socket.create_connection((proxy.host, proxy.port)) as s:
                s.sendall(packet)
                assert s.recv(10) == b""  # closed without an answer, like PostgreSQL
        with socket.create_connection((proxy.host, proxy.port)) as s:
            s.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # SSLRequest
            assert s.recv(1) == b"N"
            s.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # twice, then garbage
            assert s.recv(1) == b"N"
            s.sendall(b"\xff" * 64)
        assert conn.execute("select 1").fetchone() == (1,)


def _pg_ctl(server: PostgresServer, admin_dsn: str, *args: str) -> None:
    """Run pg_ctl on ``server``'s data directory as the user that owns it."""
    with psycopg.connect(admin_dsn) as c:
        datadir = str(c.execute("show data_directory").fetchone()[0])  # type: ignore[index]
    owner = os.stat(datadir).st_uid
    kwargs = {"user": owner} if owner != os.getuid() else {}
    # The restarted postmaster outlives pg_ctl: it must not hold pipes of ours open.
    log = os.path.join(datadir, "pg_ctl.log")
    subprocess.run(
        [str(server.bindir / "pg_ctl"), *args, "-D", datadir, "-w", "-t", "60", "-l", log],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=90,
        cwd="/",
        **kwargs,  # type: ignore[arg-type]
    )


def test_postgres_restart_under_load_recovers_without_restarting_the_proxy(
    postgres_factory: Callable[..., PostgresServer], tmp_path: Path
) -> None:
    server = postgres_factory()
    handle = rewriter.start(server.dsn, pool_size=3, isolate=False)
    stop = threading.Event()
    restarted = threading.Event()
    after: dict[int, int] = {}
    odd: list[BaseException] = []

    def load(n: int) -> None:
        conn: psycopg.Connection[tuple[object, ...]] | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(handle.dsn, autocommit=True, connect_timeout=5)
                with conn.transaction():
                    assert conn.execute("select %s::int", (n,)).fetchone() == (n,)
                if restarted.is_set():
                    after[n] = after.get(n, 0) + 1
            except psycopg.OperationalError:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            except BaseException as exc:  # anything else is a proxy bug
                odd.append(exc)
                return
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=load, args=(n,)) for n in range(6)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        _pg_ctl(server, server.dsn, "restart", "-m", "fast")
        restarted.set()
        deadline = time.monotonic() + 30
        while len(after) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        handle.stop()
        _pg_ctl(server, server.dsn, "stop", "-m", "fast")
    assert odd == []
    assert sorted(after) == list(range(6)), f"clients served after the restart: {after}"
