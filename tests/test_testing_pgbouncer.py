"""start_pgbouncer(processes=N): real PgBouncers on one TCP port (so_reuseport) that share the
clients and split the pool, so together they open no more server connections than one."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from poolguard.testing import PgBouncerServer, PostgresServer, start_pgbouncer

POOL = 3  # odd: the two processes get shares of 2 and 1
CLIENTS = 20


def console_rows(console: Any, command: str) -> list[dict[str, Any]]:
    with console.connect("pgbouncer", row_factory=dict_row) as conn:
        return list(conn.execute(command).fetchall())


def server_connections(upstream: PostgresServer, dbname: str) -> int:
    """Backends serving ``dbname`` (the proxies' server connections to the test database)."""
    with upstream.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND backend_type = 'client backend'",
            [dbname],
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.pgbouncer
def test_processes_share_the_port_and_split_the_pool(
    postgres_server: PostgresServer,
    pgbouncer_server: PgBouncerServer,  # skips (or fails) like the other PgBouncer tests
    pg_dsn: str,
) -> None:
    dbname = conninfo_to_dict(pg_dsn)["dbname"]
    assert isinstance(dbname, str)
    bouncer = start_pgbouncer(postgres_server, default_pool_size=POOL, processes=2)
    basedir = bouncer.socket_dirs[0].parent.parent
    pids = bouncer.pids
    try:
        assert len(pids) == 2
        consoles = bouncer.process_endpoints()
        configs = [{r["key"]: r["value"] for r in console_rows(c, "SHOW CONFIG")} for c in consoles]
        assert sorted(c["default_pool_size"] for c in configs) == ["1", "2"]
        assert [c["so_reuseport"] for c in configs] == ["1", "1"]
        assert len({c["unix_socket_dir"] for c in configs}) == 2
        assert len({c["pidfile"] for c in configs}) == 2
        assert len({c["logfile"] for c in configs}) == 2

        clients = [bouncer.connect(dbname) for _ in range(CLIENTS)]
        try:
            # Each process's own console counts the TCP clients it accepted. All 20 on one
            # process by chance: 2 in a million.
            accepted = [
                sum(r["database"] == dbname for r in console_rows(c, "SHOW CLIENTS"))
                for c in consoles
            ]
            assert sum(accepted) == CLIENTS
            assert min(accepted) > 0, accepted

            peak = 0
            done = threading.Event()

            def watch() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, server_connections(postgres_server, dbname))

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                with ThreadPoolExecutor(CLIENTS) as pool:
                    backends = list(
                        pool.map(
                            lambda conn: conn.execute(
                                "SELECT pg_backend_pid() FROM pg_sleep(0.1)"
                            ).fetchone(),
                            clients,
                        )
                    )
            finally:
                done.set()
                watcher.join()
        finally:
            for conn in clients:
                conn.close()
        assert all(row is not None for row in backends)
        assert len({row[0] for row in backends if row}) <= POOL
        assert 0 < peak <= POOL
        # Each process had more clients than its share waiting, so each filled its share.
        assert server_connections(postgres_server, dbname) == POOL
    finally:
        bouncer.stop()
    assert bouncer.pids == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not Path(basedir).exists()


@pytest.mark.parametrize(
    ("processes", "pool_size", "message"),
    [
        (3, 2, "processes=3 is more than default_pool_size=2"),
        (0, 4, "processes must be an integer >= 1, got 0"),
    ],
)
def test_bad_process_counts_are_refused(
    postgres_server: PostgresServer, processes: int, pool_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        start_pgbouncer(postgres_server, default_pool_size=pool_size, processes=processes)


@pytest.mark.pgbouncer
def test_one_process_takes_no_reuseport(pgbouncer_server: PgBouncerServer) -> None:
    (console,) = pgbouncer_server.process_endpoints()
    config = {r["key"]: r["value"] for r in console_rows(console, "SHOW CONFIG")}
    assert config["so_reuseport"] == "0"
    assert pgbouncer_server.pids and len(pgbouncer_server.pids) == 1
    with psycopg.connect(pgbouncer_server.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
