"""poolguard.prometheus under real gunicorn workers in prometheus_client's multiprocess mode."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("gunicorn")

from prometheus_client.parser import text_string_to_metric_families

from poolguard.testing import free_port

APPS = Path(__file__).parent / "apps"
WORKERS = 3


@contextlib.contextmanager
def serve(argv: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[int]:
    env = {**os.environ, "PYTHONPATH": str(APPS), **env}
    argv = [sys.executable, "-m", *argv]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{argv[2]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return bytes(response.read())


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one scrape."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(get(port, "/metrics").decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


@pytest.mark.slow
def test_gunicorn_three_workers_one_scrape_sums_them(pg_dsn: str, tmp_path: Path) -> None:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    port = free_port()
    argv = [
        "gunicorn", "--workers", str(WORKERS), "--bind", f"127.0.0.1:{port}",
        "--log-level", "warning", "prometheus_wsgi:app",
    ]  # fmt: skip
    env = {"POOLGUARD_DSN": pg_dsn, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    pool = (("pool", "web"),)
    with serve(argv, port, env, tmp_path / "gunicorn.log"):
        pids: set[int] = set()
        work = starve = 0
        # A sync worker serves one request at a time, so WORKERS requests that each hold their
        # connection for a moment, sent at once, reach WORKERS workers; sequential requests can
        # all land on one worker (the kernel wakes whichever is waiting in accept). Bounded.
        with ThreadPoolExecutor(WORKERS) as threads:
            for _ in range(20):
                held = threads.map(
                    lambda _: json.loads(get(port, "/work?hold=0.3")), range(WORKERS)
                )
                pids.update(answer["pid"] for answer in held)
                work += WORKERS
                if len(pids) == WORKERS:
                    break
        assert len(pids) == WORKERS, f"only {len(pids)} workers served"
        for _ in range(6):
            assert json.loads(get(port, "/starve")).get("timed_out") is True
            starve += 1
        # Each worker pushes its figures every 0.2 s (the one answering a scrape pushes first);
        # on a loaded machine a worker's push can come later: scrape until all are in, bounded.
        checkouts = work + 2 * starve  # a starve request takes one and times out on a second
        in_all = {
            "db_client_connection_use_time_seconds_count": work + starve,
            "db_client_connection_wait_time_seconds_count": checkouts,
        }
        deadline = time.monotonic() + 20
        metrics = scrape(port)
        while time.monotonic() < deadline and any(
            metrics.get(name, {}).get(pool) != value for name, value in in_all.items()
        ):
            time.sleep(0.2)
            metrics = scrape(port)

    assert metrics["db_client_connection_wait_time_seconds_count"][pool] == checkouts
    buckets = metrics["db_client_connection_wait_time_seconds_bucket"]
    assert buckets[(("le", "+Inf"), ("pool", "web"))] == checkouts
    assert buckets[(("le", "0.001"), ("pool", "web"))] < checkouts  # the 50 ms timeouts
    assert metrics["db_client_connection_wait_time_seconds_sum"][pool] >= starve * 0.05
    assert metrics["db_client_connection_timeouts_total"][pool] == starve
    assert metrics["db_client_connection_use_time_seconds_count"][pool] == work + starve
    # Gauges are summed over the live workers: max_size 1 each, one idle connection each.
    assert metrics["db_client_connection_max"][pool] == WORKERS
    assert metrics["db_client_connection_count"][(("pool", "web"), ("state", "idle"))] == WORKERS
    assert metrics["db_client_connection_count"][(("pool", "web"), ("state", "used"))] == 0
    assert metrics["db_client_connection_pending_requests"][pool] == 0
    assert metrics["poolguard_connection_leaks_total"][pool] == 0
    # The server's slots: the highest figure any live worker read.
    assert metrics["poolguard_server_connections"][pool] >= WORKERS
    with psycopg.connect(pg_dsn) as conn:
        limit = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - coalesce(current_setting('reserved_connections', true), '0')::int"
        ).fetchone()
    assert limit is not None
    assert metrics["poolguard_server_connections_max"][pool] == limit[0]


def test_asgi_app_under_uvicorn(pg_dsn: str, tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    port = free_port()
    argv = ["uvicorn", "--port", str(port), "--log-level", "warning", "prometheus_asgi:app"]
    with serve(argv, port, {"POOLGUARD_DSN": pg_dsn}, tmp_path / "uvicorn.log"):
        for _ in range(7):
            assert get(port, "/work") == b"ok"
        metrics = scrape(port)
    pool = (("pool", "asgi"),)
    assert metrics["db_client_connection_wait_time_seconds_count"][pool] == 7
    assert metrics["db_client_connection_use_time_seconds_count"][pool] == 7
    assert metrics["db_client_connection_count"][(("pool", "asgi"), ("state", "used"))] == 0


def test_django_view(pg_dsn: str, tmp_path: Path) -> None:
    """The view in a real Django request cycle (its test client), in a process of its own."""
    pytest.importorskip("django")
    script = tmp_path / "django_view.py"
    script.write_text(
        "import django\n"
        "from django.conf import settings\n"
        "from django.urls import path\n"
        "import poolguard, poolguard.prometheus\n"
        "urlpatterns = [path('metrics', poolguard.prometheus.django_view)]\n"
        "settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=['testserver'], DATABASES={})\n"
        "django.setup()\n"
        "from django.test import Client\n"
        "poolguard.prometheus.instrument()\n"
        "pool = poolguard.configure(name='dj')\n"
        "for _ in range(4):\n"
        "    with pool.connection() as conn:\n"
        "        conn.execute('SELECT 1')\n"
        "response = Client().get('/metrics')\n"
        "assert response.status_code == 200, response.status_code\n"
        "print(response['Content-Type'])\n"
        "print(response.content.decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        env={**os.environ, "POOLGUARD_DSN": pg_dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    content_type, _, body = done.stdout.partition("\n")
    assert content_type.startswith("text/plain")
    assert 'db_client_connection_wait_time_seconds_count{pool="dj"} 4.0' in body
