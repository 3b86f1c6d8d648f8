"""The embedded rewriter in a supervised child process (the default): app threads holding the
GIL cannot stall it, it restarts if it dies, and it ends with the app."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psycopg
import pytest

from polling import process_running
from poolguard import rewriter
from poolguard.rewriter import RewriterHandle

# A client in another process: connects, says "go", then runs `select 1` for `seconds` and
# prints the slowest round trip.
_CLIENT = textwrap.dedent(
    """
    import sys, time, psycopg
    dsn, seconds = sys.argv[1], float(sys.argv[2])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select 1")
        print("go", flush=True)
        worst, end = 0.0, time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            conn.execute("select 1")
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.01)
    print(worst, flush=True)
    """
)


@pytest.fixture
def isolated(pg_dsn: str) -> Iterator[RewriterHandle]:
    handle = rewriter.start(pg_dsn, pool_size=2)
    try:
        yield handle
    finally:
        handle.stop()


def _hold_the_gil(seconds: float) -> None:
    """A C call that keeps the GIL, like a blocking libpq call made without releasing it."""
    libc = ctypes.PyDLL(ctypes.util.find_library("c"))  # PyDLL: the GIL is not released
    libc.usleep(int(seconds * 1_000_000))


def _worst_latency_while_holding_the_gil(handle: RewriterHandle) -> float:
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, handle.dsn, "3.5"], stdout=subprocess.PIPE, text=True
    )
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "go"
    time.sleep(0.3)
    _hold_the_gil(2.0)
    out, _ = client.communicate(timeout=30)
    assert client.returncode == 0
    return float(out.strip())


def test_an_app_thread_holding_the_gil_does_not_stall_other_clients(
    isolated: RewriterHandle, pg_dsn: str
) -> None:
    assert isolated.pid != os.getpid()
    worst = _worst_latency_while_holding_the_gil(isolated)
    assert worst < 0.5, f"slowest round trip {worst:.3f} s while the app held the GIL for 2 s"
    # The same app with the rewriter on one of its threads: the client waits out the GIL.
    in_process = rewriter.start(pg_dsn, pool_size=2, isolate=False)
    try:
        stalled = _worst_latency_while_holding_the_gil(in_process)
    finally:
        in_process.stop()
    assert stalled > 1.5


def test_a_rewriter_process_that_dies_is_restarted_on_the_same_address(
    isolated: RewriterHandle,
) -> None:
    first = isolated.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while isolated.pid == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isolated.pid != first
    with psycopg.connect(isolated.dsn, connect_timeout=10) as conn:  # the same DSN
        assert conn.execute("select 1").fetchone() == (1,)
    assert "running in a process" in repr(isolated)
    assert isolated.password not in repr(isolated)


def test_the_rewriter_process_stops_with_stop_and_with_its_app(pg_dsn: str) -> None:
    handle = rewriter.start(pg_dsn, pool_size=1)
    pid = handle.pid
    handle.stop()
    assert not process_running(pid)
    # An app killed outright: its rewriter notices its stdin closing and exits.
    app = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from poolguard import rewriter;"
            "h = rewriter.start(sys.argv[1], pool_size=1); print(h.pid, flush=True);"
            "time.sleep(60)",
            pg_dsn,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None
    child = int(app.stdout.readline())
    assert process_running(child)
    app.kill()
    app.wait()
    app.stdout.close()
    deadline = time.monotonic() + 10
    while process_running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_running(child)


def test_an_unreachable_upstream_fails_start_in_the_caller() -> None:
    with pytest.raises(rewriter.UpstreamError, match="could not connect"):
        rewriter.start("postgresql://nobody:x@127.0.0.1:1/db?connect_timeout=2")
    with pytest.raises(ValueError, match="pool_size"):
        rewriter.start("postgresql://nobody:x@127.0.0.1:1/db", pool_size=0)
