"""The process-wide registry: one pool per name, across threads, reloads and forks."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

import poolguard
from poolguard import ConfigurationError
from poolguard.testing import PostgresServer


def test_racing_configure_from_threads_yields_one_pool(pg_dsn: str) -> None:
    start = threading.Barrier(16)
    results: list[poolguard.GuardedPool] = []

    def configure() -> None:
        start.wait()
        results.append(poolguard.configure(pg_dsn, max_size=3))

    threads = [threading.Thread(target=configure) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    assert len({id(pool) for pool in results}) == 1
    assert poolguard.get_pool() is results[0]


def test_same_name_different_settings_is_an_error(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn, max_size=3)
    with pytest.raises(ConfigurationError, match=r"already configured.*max_size differ"):
        poolguard.configure(pg_dsn, max_size=4)
    other = poolguard.configure(pg_dsn, name="reports", max_size=4)
    assert other is poolguard.get_pool("reports") is not poolguard.get_pool()


def test_get_pool_of_unknown_name_says_how_to_configure() -> None:
    with pytest.raises(ConfigurationError, match=r"configure\(dsn, name='nope'\)"):
        poolguard.get_pool("nope")


def test_default_pool_configures_itself_from_database_url(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    with poolguard.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reload_of_user_module_keeps_the_pool(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "user_app_settings.py").write_text(
        "import os, poolguard\npool = poolguard.configure(os.environ['APP_DSN'], max_size=2)\n"
    )
    monkeypatch.setenv("APP_DSN", pg_dsn)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("user_app_settings")
    try:
        first = module.pool
        with first.connection() as conn:
            conn.execute("SELECT 1")
        reloaded = importlib.reload(module)
        assert reloaded.pool is first
        assert len([p for p in poolguard._state.pools() if p.name == "default"]) == 1
        with reloaded.pool.connection() as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        sys.modules.pop("user_app_settings", None)


def _parent_backends(server: PostgresServer, dsn: str) -> set[int]:
    """Backends of the default pool in this test's own database (other tests share the server)."""
    dbname = conninfo_to_dict(dsn)["dbname"]
    with server.connect() as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = 'poolguard:default' AND datname = %s",
            (dbname,),
        ).fetchall()
    return {row[0] for row in rows}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_fresh_connections_and_parent_keeps_working(
    pg_dsn: str, postgres_server: PostgresServer
) -> None:
    pool = poolguard.configure(pg_dsn, min_size=2, max_size=2)
    pool.open()
    held = [pool.getconn(), pool.getconn()]  # both parent connections exist and are known
    parent = {conn.info.backend_pid for conn in held}
    for conn in held:
        pool.putconn(conn)
    assert _parent_backends(postgres_server, pg_dsn) == parent
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report its backend pids, then exit without cleanup handlers
        code = 1
        try:
            import gc

            pids = set()
            for _ in range(3):
                with pool.connection() as conn:
                    pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            gc.collect()  # whatever the child inherited must not close the parent's sockets
            os.write(write_end, ",".join(map(str, sorted(pids))).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    child_pids = {int(p) for p in os.read(read_end, 1000).decode().split(",") if p}
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_pids and not child_pids & parent
    # Every backend of the parent survived the child, and each still answers the parent.
    assert parent <= _parent_backends(postgres_server, pg_dsn)
    held = [pool.getconn(), pool.getconn()]
    try:
        answered = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in held}  # type: ignore[index]
    finally:
        for conn in held:
            pool.putconn(conn)
    assert answered == parent
