"""The test app under real servers: uvicorn (ASGI, async views) and gunicorn --preload (fork)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from djhelpers import HERE, db_entry, django_env

from poolguard.testing import PostgresServer, free_port

pytestmark = pytest.mark.slow

REQUESTS = 200
BUDGET = 4  # the pool's max_size: the most connections one server process may open


@pytest.fixture(scope="module")
def small_server(postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """max_connections=20: 17 for clients once the 3 superuser slots are set aside."""
    server = postgres_factory(max_connections=20)
    server.create_database("app")
    dbs = {"default": db_entry(server, "app")}
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--run-syncdb", "-v", "0"],
        cwd=HERE, env=django_env(dbs), check=True, timeout=120,
    )  # fmt: skip
    return server


@contextlib.contextmanager
def serve(argv: list[str], port: int, databases: dict[str, Any]) -> Iterator[None]:
    # A file, not a pipe: a server logging hundreds of tracebacks would block on a full pipe.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=HERE, env=django_env(databases), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"{argv[0]} did not start:\n{log.read().decode()[-3000:]}")
                time.sleep(0.1)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


class ConnectionCounter(threading.Thread):
    """Samples how many client sessions the server has on one database, every 5 ms."""

    def __init__(self, server: PostgresServer, dbname: str) -> None:
        super().__init__(daemon=True)
        self.server, self.dbname = server, dbname
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.server.connect("postgres") as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = %s AND backend_type = 'client backend'",
                    [self.dbname],
                ).fetchone()
                self.samples.append(int(row[0]) if row else 0)
                time.sleep(0.005)

    def __enter__(self) -> ConnectionCounter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(10)


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks = []
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            chunks.append(body[:size])
            body = body[size + 2 :]
        body = b"".join(chunks)
    return status, body


def concurrent_gets(port: int, path: str, n: int) -> list[tuple[int, bytes]]:
    async def main() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(_get(port, path) for _ in range(n)))

    return asyncio.run(main())


def asgi_run(server: PostgresServer, db: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(statuses, connection-count samples) of 200 concurrent async requests under uvicorn."""
    port = free_port()
    argv = ["uvicorn", "djapp.asgi:application", "--port", str(port), "--log-level", "error"]
    with serve(argv, port, {"default": db}), ConnectionCounter(server, "app") as counter:
        concurrent_gets(port, "/aitems/", 1)  # warm up: imports, first connection
        responses = concurrent_gets(port, "/aitems/", REQUESTS)
        time.sleep(0.2)
    return [status for status, _ in responses], counter.samples


def test_asgi_200_concurrent_async_requests_stay_within_budget(
    small_server: PostgresServer,
) -> None:
    pytest.importorskip("uvicorn")
    statuses, samples = asgi_run(small_server, db_entry(small_server, "app", max_size=BUDGET))
    assert statuses == [200] * REQUESTS
    assert samples and max(samples) <= BUDGET


def test_asgi_stock_backend_with_persistent_connections_piles_them_up(
    small_server: PostgresServer,
) -> None:
    """The same load, Django's own backend, CONN_MAX_AGE=60: Django ticket 33497, reproduced."""
    pytest.importorskip("uvicorn")
    stock = {**db_entry(small_server, "app", "django.db.backends.postgresql"), "CONN_MAX_AGE": 60}
    statuses, samples = asgi_run(small_server, stock)
    # Each request context keeps its own connection: the count grows past any per-process
    # budget until the server refuses clients (17 slots), and requests fail.
    assert max(samples) > BUDGET
    assert statuses.count(200) < REQUESTS


def test_gunicorn_preload_workers_never_share_the_masters_socket(
    small_server: PostgresServer,
) -> None:
    pytest.importorskip("gunicorn")
    port = free_port()
    db = db_entry(small_server, "app", max_size=2)
    argv = [
        # Sync workers serve in their main thread: the thread whose wrapper, inherited from the
        # master, still holds the master's connection.
        "gunicorn", "--preload", "--workers", "2", "--bind",
        f"127.0.0.1:{port}", "--log-level", "warning", "djapp.wsgi_preload:application",
    ]  # fmt: skip
    with serve(argv, port, {"default": db}), small_server.connect("postgres") as conn:
        master_pids = {
            int(row[0])
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'app' "
                "AND application_name = 'poolguard:django:default'"
            )
        }
        responses = concurrent_gets(port, "/pid/", 40)
    # Workers connect lazily, so every session on 'app' before the first request is the master's
    # (wsgi_preload.py took one; its pool may have opened one more to stay at min_size).
    assert master_pids
    assert [status for status, _ in responses] == [200] * 40
    pids = {json.loads(body)["pid"] for _, body in responses}
    assert pids and not pids & master_pids
    assert len(pids) <= 2 * 2  # two workers, at most max_size=2 each


def test_runserver_autoreload(small_server: PostgresServer, tmp_path: Path) -> None:
    """runserver's reloader restarts the serving process; each generation has its own pool."""
    shutil.copytree(
        HERE / "djapp", tmp_path / "djapp", ignore=shutil.ignore_patterns("__pycache__")
    )
    port = free_port()
    db = db_entry(small_server, "app", max_size=2)
    env = {**django_env({"default": db}), "PYTHONPATH": str(tmp_path)}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:

            def served_by() -> int:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with contextlib.suppress(OSError, ValueError):
                        status, body = asyncio.run(_get(port, "/pid/"))
                        if status == 200:
                            return int(json.loads(body)["process"])
                    time.sleep(0.2)
                log.seek(0)
                pytest.fail(f"runserver did not answer:\n{log.read().decode()[-3000:]}")

            first = served_by()
            # The stat reloader compares modification times once a second, against a first
            # reading it takes when it starts watching a file: a touch before that reading
            # (its thread late on a loaded machine) goes unseen, so touch until it restarts.
            deadline = time.monotonic() + 30
            second = first
            while second == first and time.monotonic() < deadline:
                (tmp_path / "djapp" / "urls.py").touch()
                time.sleep(0.3)
                second = served_by()
        finally:
            proc.terminate()
            proc.wait(15)
    assert second != first  # a new serving process
    with small_server.connect("postgres") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            ["poolguard:django:default"],
        ).fetchone()
    assert row == (0,)  # nothing left behind by either generation
