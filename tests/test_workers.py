"""The worker count the budget check uses: read from real gunicorn / uvicorn command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from poolguard._budget import resolve_processes_source
from poolguard._workers import detect_workers, workers_from_argv
from poolguard.testing import PostgresServer, free_port

APPS = Path(__file__).parent / "budget_apps"


@pytest.mark.parametrize(
    ("argv", "env", "count", "source"),
    [
        (
            ["/venv/bin/python", "/venv/bin/gunicorn", "-w", "3", "app:wsgi"],
            {},
            3,
            "gunicorn --workers 3",
        ),
        (["gunicorn", "--workers=5", "app:wsgi"], {}, 5, "gunicorn --workers 5"),
        (["gunicorn", "-w7", "app:wsgi"], {}, 7, "gunicorn --workers 7"),
        (
            ["gunicorn", "app:wsgi"],
            {"GUNICORN_CMD_ARGS": "--bind :80 -w 4"},
            4,
            "GUNICORN_CMD_ARGS --workers 4",
        ),
        (
            ["gunicorn", "-w", "2", "app:wsgi"],
            {"GUNICORN_CMD_ARGS": "-w 4"},
            2,
            "gunicorn --workers 2",
        ),
        (["gunicorn", "app:wsgi"], {}, 1, "gunicorn without --workers (its default: 1)"),
        (["python", "-m", "uvicorn", "--workers", "2", "app:asgi"], {}, 2, "uvicorn --workers 2"),
        (["uvicorn", "app:asgi"], {}, 1, "uvicorn without --workers (its default: 1)"),
        (
            ["celery", "-A", "proj", "worker", "--concurrency=6"],
            {},
            6,
            "celery worker --concurrency 6",
        ),
        (["celery", "-A", "proj", "worker", "-c", "3"], {}, 3, "celery worker --concurrency 3"),
    ],
)
def test_workers_from_argv(argv: list[str], env: dict[str, str], count: int, source: str) -> None:
    found = workers_from_argv(argv, env, cwd=Path("/nonexistent"))
    assert found is not None
    assert (found.count, found.source) == (count, source)


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "manage.py", "runserver"],
        ["celery", "-A", "proj", "beat"],
        ["gunicorn", "-w", "many", "app:wsgi"],  # not a number: gunicorn itself would refuse
    ],
)
def test_not_detected(argv: list[str]) -> None:
    found = workers_from_argv(argv, {}, cwd=Path("/nonexistent"))
    assert found is None or found.source.startswith("gunicorn without")


def test_web_concurrency_is_left_to_resolve_processes() -> None:
    # gunicorn and uvicorn read WEB_CONCURRENCY as their default: the budget uses it then.
    assert workers_from_argv(["gunicorn", "app:wsgi"], {"WEB_CONCURRENCY": "3"}) is None
    assert resolve_processes_source(None, {"WEB_CONCURRENCY": "3"}) == (3, "WEB_CONCURRENCY")


def test_gunicorn_config_file(tmp_path: Path) -> None:
    (tmp_path / "gunicorn.conf.py").write_text("bind = ':8000'\nworkers = 6\n")
    found = workers_from_argv(["gunicorn", "app:wsgi"], {}, cwd=tmp_path)
    assert found is not None and found.count == 6
    (tmp_path / "other.py").write_text("import os\nworkers = os.cpu_count() * 2\n")
    found = workers_from_argv(["gunicorn", "-c", "other.py", "app:wsgi"], {}, cwd=tmp_path)
    # An expression cannot be known without running the config: gunicorn's default is said.
    assert found is not None and found.source == "gunicorn without --workers (its default: 1)"


def test_this_test_process_is_not_a_web_server() -> None:
    assert detect_workers() is None
    assert resolve_processes_source(None, {}) == (
        1,
        "not detected: assumed 1 (declare processes= or --processes)",
    )


def run_app(
    argv: list[str], server: PostgresServer, out: Path, max_size: int, workers: int
) -> list[str]:
    env = {
        **os.environ,
        "BUDGET_APP_DSN": server.dsn,
        "BUDGET_APP_MAX_SIZE": str(max_size),
        "BUDGET_APP_OUT": str(out),
        "PYTHONPATH": str(APPS),
    }
    env.pop("WEB_CONCURRENCY", None)
    log = out / "server.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            argv, env=env, cwd=APPS, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while len(list(out.glob("*.txt"))) < workers and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(0.5)  # a worker too many would show up now
        return [p.read_text() for p in sorted(out.glob("*.txt"))]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def small_server(postgres_factory: Any) -> PostgresServer:
    server: PostgresServer = postgres_factory(max_connections=20)
    return server


@pytest.mark.slow
def test_uvicorn_workers_2_are_counted_in_the_budget_check(
    small_server: PostgresServer, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "uvicorn", "--workers", "2", "--port", str(free_port()),
            "--log-level", "warning", "budget_app:asgi"]  # fmt: skip
    # 9 fits one process of 17 usable; two processes need 18.
    results = run_app(argv, small_server, tmp_path, max_size=9, workers=2)
    assert len(results) == 2
    for text in results:
        assert "2 process(es) x max_size 9 = 18 exceeds the 17 usable connections" in text
        assert "processes   = 2: uvicorn --workers 2 (pid " in text


@pytest.mark.slow
def test_gunicorn_w_3_is_counted_in_the_budget_check(
    small_server: PostgresServer, tmp_path: Path
) -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    argv = [sys.executable, str(gunicorn), "-w", "3", "-b", f"127.0.0.1:{free_port()}",
            "budget_app:wsgi"]  # fmt: skip
    # 6 x 2 = 12 fits 17; 6 x 3 = 18 does not.
    results = run_app(argv, small_server, tmp_path, max_size=6, workers=3)
    assert len(results) == 3
    for text in results:
        assert "3 process(es) x max_size 6 = 18 exceeds the 17 usable connections" in text
        assert "processes   = 3: gunicorn --workers 3 (pid " in text
