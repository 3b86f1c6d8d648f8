"""A stopped server is reported as a connect error naming host, port and reason, never as an
exhausted pool, and the pool is back within 2 s of the server."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from chaoshelpers import ServerControl

import poolguard
from poolguard import PoolConnectError, PoolExhausted

pytestmark = pytest.mark.chaos

CALLERS = 32
TIMEOUT = 2.0


def _call_all(pool: poolguard.GuardedPool) -> list[tuple[BaseException | None, float]]:
    results: list[tuple[BaseException | None, float]] = []
    lock = threading.Lock()

    def caller() -> None:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            with pool.connection(timeout=TIMEOUT) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            error = exc
        with lock:
            results.append((error, time.monotonic() - started))

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_stopped_server_gives_32_waiting_callers_the_connect_error_then_recovers(
    chaos_server: ServerControl, chaos_dsn: str
) -> None:
    server = chaos_server.server
    pool = poolguard.configure(chaos_dsn, min_size=0, max_size=8, timeout=TIMEOUT)
    pool.open()  # open and checked, with no connection yet: every caller must wait for one
    chaos_server.stop("fast")
    try:
        results = _call_all(pool)
    finally:
        chaos_server.start()
    up = time.monotonic()

    assert len(results) == CALLERS
    for error, elapsed in results:
        assert isinstance(error, PoolConnectError), repr(error)
        assert not isinstance(error, PoolExhausted)
        message = str(error)
        assert f"{server.host}:{server.port}" in message
        assert "Connection refused" in message
        assert server.password not in message
        assert elapsed <= TIMEOUT + 0.5, elapsed

    while True:  # recovery: the first checkout that works after the server is back
        try:
            with pool.connection(timeout=2.0) as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            assert time.monotonic() - up < 2.0
    recovered = time.monotonic() - up
    assert recovered < 2.0, recovered
    assert pool.stats()["db.client.connection.timeouts"] >= CALLERS


def test_all_connections_busy_is_still_exhausted(chaos_dsn: str) -> None:
    pool = poolguard.configure(chaos_dsn, min_size=0, max_size=2, timeout=0.3)
    with (
        pool.connection(),
        pool.connection(),
        pytest.raises(PoolExhausted, match="2/2 connections in use"),
    ):
        pool.getconn()
