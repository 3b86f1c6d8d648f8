"""``poolguard top`` against a real server with two app processes and an idle transaction."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from poolguard._top import main, pool_of
from poolguard.testing import free_port

APPS = Path(__file__).parent / "apps"
SECRET = "card-4111-1111"


@contextlib.contextmanager
def app_process(dsn: str, name: str) -> Iterator[str]:
    """A poolguard app process with pool ``name``; yields its metrics URL."""
    port = free_port()
    with subprocess.Popen(
        [sys.executable, str(APPS / "top_app.py"), name, str(port)],
        env={**os.environ, "POOLGUARD_DSN": dsn},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline().strip() == "ready"
            yield f"http://127.0.0.1:{port}/metrics"
        finally:
            proc.stdin.close()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


@pytest.fixture
def scene(pg_dsn: str) -> Iterator[tuple[str, list[str], int]]:
    """Two app processes (pools 'orders' and 'billing'), one session idle in a transaction
    holding a row lock, and one session waiting for that lock."""
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE cards (id int PRIMARY KEY, note text)")
        setup.execute("INSERT INTO cards VALUES (1, '')")
    blocked_done = threading.Event()

    def blocked(dsn: str) -> None:
        with psycopg.connect(dsn, application_name="billing-job", autocommit=True) as conn:
            conn.execute("UPDATE cards SET note = 'later' WHERE id = 1")  # waits for the lock
        blocked_done.set()

    with (
        app_process(pg_dsn, "orders") as orders,
        app_process(pg_dsn, "billing") as billing,
        psycopg.connect(pg_dsn, application_name="reporting-script") as idle,
    ):
        idle.execute(f"UPDATE cards SET note = '{SECRET}' WHERE id = 1")  # takes the row lock
        idle.execute(f"SELECT '{SECRET}' AS card")  # then sits idle in its transaction
        waiter = threading.Thread(target=blocked, args=(pg_dsn,), daemon=True)
        waiter.start()
        time.sleep(1.2)
        try:
            yield pg_dsn, [orders, billing], idle.info.backend_pid
        finally:
            idle.rollback()
            waiter.join(10)
    assert blocked_done.is_set()


def test_pool_of() -> None:
    assert pool_of("poolguard:orders") == "orders"
    assert pool_of("poolguard:orders:watchdog") == "orders"
    assert pool_of("psql") is None


def test_once_json_shows_pools_idle_transaction_and_slots(
    scene: tuple[str, list[str], int],
) -> None:
    dsn, urls, idle_pid = scene
    out = io.StringIO()
    assert main([dsn, "--once", "--json", "--metrics", *urls], out=out) == 0
    text = out.getvalue()
    found = json.loads(text)
    assert found["by_pool"]["orders"] >= 2 and found["by_pool"]["billing"] >= 2
    assert found["by_application"]["reporting-script"] == 1
    assert found["by_application"]["billing-job"] == 1
    assert found["by_state"]["idle in transaction"] == 1
    [idle] = found["idle_in_transaction"]
    assert idle["pid"] == idle_pid and idle["idle_seconds"] >= 1.0
    assert idle["query"].startswith("SELECT '") and idle["query"].endswith("AS card")
    [waiting] = found["lock_waits"]
    assert waiting["application"] == "billing-job" and waiting["blocked_by"] == [idle_pid]
    assert waiting["query"].startswith("UPDATE cards SET note = '")
    slots = found["slots"]
    assert slots["max_connections"] >= 10 and 5 <= slots["used"] < slots["max_connections"]
    apps = found["apps"]["pools"]
    assert apps["orders"]["in_use"] == 1 and apps["billing"]["in_use"] == 1
    assert apps["orders"]["waiting"] == 0 and apps["orders"]["leaks"] == 0
    assert 0 < apps["orders"]["p99_wait_seconds"] < 1
    password = conninfo_to_dict(dsn)["password"]
    assert SECRET not in text and str(password) not in text


@contextlib.contextmanager
def terminal(command: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """``command`` (top's live view) in a detached 160x50 tmux terminal; yields a function
    that returns the screen. Leaving the block without an error checks that ``q`` quits."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed (.ci/run installs it)")
        pytest.skip("needs tmux")
    socket = str(tmp_path / "tmux.sock")

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", socket, *args], capture_output=True, text=True, timeout=10
        ).stdout

    tmux("new-session", "-d", "-x", "160", "-y", "50", "-s", "top", command)
    try:
        yield lambda: tmux("capture-pane", "-p", "-t", "top")
        tmux("send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 10
        while "top" in tmux("list-sessions"):
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.2)
    finally:
        tmux("kill-server")


def test_live_view_in_a_terminal(scene: tuple[str, list[str], int], tmp_path: Path) -> None:
    dsn, urls, idle_pid = scene
    command = " ".join(
        [sys.executable, "-m", "poolguard.cli", "top", f'"{dsn}"', "--metrics", *urls]
    )
    with terminal(command, tmp_path) as screen_now:
        deadline = time.monotonic() + 15
        screen = ""
        while "billing" not in screen or "app pools" not in screen:
            assert time.monotonic() < deadline, f"top never drew its screen:\n{screen}"
            time.sleep(0.3)
            screen = screen_now()
        assert "orders=" in screen and "billing=" in screen
        assert f"pid {idle_pid}" in screen and "AS card" in screen, screen
        assert "idle in transaction=1" in screen
        assert f"blocked by {idle_pid}" in screen
        assert "slots:" in screen and "q: quit" in screen
        assert SECRET not in screen and str(conninfo_to_dict(dsn)["password"]) not in screen
        first = screen
        time.sleep(2.2)  # refreshed every second: the idle age moves on
        assert screen_now() != first


def test_a_refused_login_is_reported_without_the_password(
    postgres_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = make_conninfo(postgres_server.dsn, password="hunter2-not-it")
    assert main([dsn, "--once"]) == 1
    err = capsys.readouterr().err
    assert "password authentication failed" in err and "hunter2-not-it" not in err
