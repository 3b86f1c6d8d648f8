"""Leak detection against a real PostgreSQL: unreturned, garbage-collected, orphaned, idle in
transaction, reclaimed; report() and the server-side timeout.  Thresholds are fractions of a
second so the whole file stays fast."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

import poolguard
from polling import wait_for
from poolguard import (
    ConfigurationError,
    ConnectionLeakWarning,
    ConnectionReclaimed,
    PoolEvent,
    _watchdog,
)
from poolguard._events import flush
from recorded_ticks import WatchdogTicks

HERE = os.path.basename(__file__)
TICK = 0.05
# Seconds each wait below gives the watchdog or a signal handler.
WAIT = 5.0


def line_of_next() -> int:
    """The line number right after the caller's line (where the checkout happens)."""
    return sys._getframe(1).f_lineno + 1


def leak_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "poolguard.leaks" and r.levelno == level
    ]


@pytest.fixture
def leaks_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="poolguard.leaks")
    yield caplog


def configure(dsn: str, **options: Any) -> poolguard.GuardedPool:
    defaults: dict[str, Any] = {
        "min_size": 0,
        "max_size": 2,
        "timeout": 5,
        "leak_threshold": 0,
        "idle_in_transaction_threshold": 0,
        "watchdog_interval": TICK,
    }
    pool = poolguard.configure(dsn, **{**defaults, **options})
    pool.open()
    return pool


def test_unreturned_connection_reported_within_threshold_plus_a_tick(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture, watchdog_ticks: WatchdogTicks
) -> None:
    events: list[PoolEvent] = []
    pool = configure(pg_dsn, leak_threshold=0.3, on_event=events.append)
    taken = time.monotonic()  # no later than the checkout's own clock reading
    line = line_of_next()
    conn = pool.getconn()
    (checkout,) = pool.ledger.records()
    conn.execute("SELECT 42 AS the_leaky_statement", prepare=False)
    wait_for("a leak WARNING", lambda: bool(leak_records(leaks_log)), WAIT)
    assert time.monotonic() - taken >= 0.3
    assert flush(5)
    (event,) = [e for e in events if e.kind == "leak"]
    assert event.age is not None and event.age >= 0.3
    # Found at the first tick past the threshold: the tick before was still short of it, so the
    # report came within the threshold plus the tick the watchdog used (on a loaded machine a
    # tick can come later than watchdog_interval; that delay is the machine's, not the check's).
    before, found = watchdog_ticks.finding(pool, checkout.taken_at, event.age)
    assert before - checkout.taken_at < 0.3, (before - checkout.taken_at, found - before)
    (message,) = leak_records(leaks_log)
    assert f"{HERE}:{line} in test_unreturned" in message
    assert "SELECT 42 AS the_leaky_statement" in message
    assert f"backend pid {conn.info.backend_pid}" in message
    assert "thread 'MainThread'" in message
    assert "its owner is now at:" in message and "wait_for" in message  # the current stack
    assert pool.stats()["poolguard.connection.leaks"] == 1

    time.sleep(5 * TICK)  # more ticks: still one warning per leak
    assert len(leak_records(leaks_log)) == 1
    assert watchdog_ticks.usual_interval(pool) < 2 * TICK  # the tick is watchdog_interval
    pool.putconn(conn)
    wait_for("the return logged", lambda: bool(leak_records(leaks_log, logging.INFO)), WAIT)
    returned = leak_records(leaks_log, logging.INFO)
    assert f"{HERE}:{line}" in returned[0] and "was returned after" in returned[0]


def test_statement_parameters_never_reported(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, leak_threshold=0.1)
    conn = pool.getconn()
    conn.execute("SELECT %s::text, 'inline-secret' /* hunter2 */", ["hunter2-secret"])
    wait_for("a leak WARNING", lambda: bool(leak_records(leaks_log)), WAIT)
    assert "SELECT %s::text, '…'" in leak_records(leaks_log)[0]
    assert "inline-secret" not in leaks_log.text
    assert "hunter2" not in leaks_log.text
    pool.putconn(conn)


def test_garbage_collected_connection_frees_its_slot_and_is_reported(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, max_size=1)

    def leaky_handler() -> None:
        conn = pool.getconn()
        conn.execute("SELECT 1")
        # returns without putconn(): the connection dies with this frame

    line = leaky_handler.__code__.co_firstlineno + 1
    with pytest.warns(ConnectionLeakWarning, match=rf"{HERE}:{line} in leaky_handler") as caught:
        leaky_handler()
    assert caught[0].filename == __file__ and caught[0].lineno == line
    started = time.monotonic()
    with pool.connection(timeout=3) as conn:  # the only slot is free again
        conn.execute("SELECT 1")
    assert time.monotonic() - started < 2.0  # includes opening the replacement connection
    (message,) = leak_records(leaks_log)
    assert f"{HERE}:{line} in leaky_handler" in message and "garbage-collected" in message
    stats = pool.stats()
    assert stats["poolguard.connection.leaks"] == 1
    assert stats["poolguard.connection.reclaimed"] == 1
    assert len(pool.ledger) == 0


def test_connection_in_a_reference_cycle_is_collected_too(pg_dsn: str) -> None:
    pool = configure(pg_dsn, max_size=1)

    class Holder:
        pass

    holder = Holder()
    holder.me = holder  # type: ignore[attr-defined]
    holder.conn = pool.getconn()  # type: ignore[attr-defined]
    del holder
    with pytest.warns(ConnectionLeakWarning, match="garbage-collected"):
        gc.collect()
    with pool.connection(timeout=3) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_dead_threads_connection_is_reclaimed(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, max_size=1)
    kept: list[psycopg.Connection[Any]] = []

    def worker() -> None:
        conn = pool.getconn()
        conn.execute("SELECT 1")
        kept.append(conn)  # still referenced, but its owner is about to end

    thread = threading.Thread(target=worker, name="doomed-worker")
    thread.start()
    thread.join()
    with pool.connection(timeout=3) as conn:  # served once the orphan is reclaimed
        conn.execute("SELECT 1")
    (message,) = leak_records(leaks_log)
    assert "ended without returning it" in message and "in worker" in message
    with pytest.raises(ConnectionReclaimed, match=r"reclaimed by poolguard after \d+\.\d s"):
        kept[0].execute("SELECT 1")
    pool.putconn(kept[0])  # a late return is accepted quietly
    assert pool.stats()["poolguard.connection.reclaimed"] == 1


def test_idle_transaction_reported_with_its_last_statement(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture, watchdog_ticks: WatchdogTicks
) -> None:
    events: list[PoolEvent] = []
    pool = configure(pg_dsn, idle_in_transaction_threshold=0.3, on_event=events.append)
    with pool.connection() as idle_conn:
        idle_conn.autocommit = True
        idle_conn.execute("SELECT 'not in a transaction'")
        line = line_of_next()
        with pool.connection() as conn:
            checkout = next(r for r in pool.ledger.records() if r.connection() is conn)
            conn.execute("UPDATE pg_class SET relname = relname WHERE false")
            conn.execute("SELECT 'the last one' AS marker")
            wait_for("a leak WARNING", lambda: bool(leak_records(leaks_log)), WAIT)
            time.sleep(3 * TICK)
    assert flush(5)
    (event,) = [e for e in events if e.kind == "idle_in_transaction"]
    idle = event.details["idle"]
    assert idle >= 0.3
    assert event.age is not None
    # Found at the first tick at which the idle stretch it measured passed the threshold.
    before, found = watchdog_ticks.finding(pool, checkout.taken_at, event.age)
    assert idle - (found - before) < 0.3, (idle, found - before)
    assert watchdog_ticks.usual_interval(pool) < 2 * TICK
    (message,) = leak_records(leaks_log)  # one per idle stretch, none for the autocommit one
    assert "idle in a transaction" in message
    assert "last statement: SELECT '…' AS marker" in message  # literals masked
    assert f"{HERE}:{line} in test_idle" in message  # where it was taken
    assert "server: idle in transaction" in message  # cross-checked with pg_stat_activity


def test_busy_transaction_is_not_idle(pg_dsn: str, leaks_log: pytest.LogCaptureFixture) -> None:
    pool = configure(pg_dsn, idle_in_transaction_threshold=0.3)
    with pool.connection() as conn:
        conn.execute("SELECT pg_sleep(0.6)")  # one long statement inside a transaction
        conn.execute("SELECT 1")
    time.sleep(2 * TICK)
    assert leak_records(leaks_log) == []


def test_failed_transaction_is_reported_as_failed(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, idle_in_transaction_threshold=0.2)
    conn = pool.getconn()
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    wait_for("a leak WARNING", lambda: bool(leak_records(leaks_log)), WAIT)
    assert "idle in a failed transaction" in leak_records(leaks_log)[0]
    assert "SELECT 1/0" in leak_records(leaks_log)[0]
    pool.putconn(conn)


def test_server_timeout_kills_idle_transaction_and_pool_keeps_serving(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, max_size=1, idle_in_transaction_session_timeout=0.3)
    with pool.connection() as conn:
        setting = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
        first_pid = conn.info.backend_pid
    assert setting == ("300ms",)
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout), pool.connection() as conn:
        conn.execute("SELECT 1")
        time.sleep(0.8)  # the server ends the session meanwhile
        conn.execute("SELECT 2")
    for _ in range(3):
        with pool.connection(timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid != first_pid


def test_server_timeout_zero_leaves_the_server_setting(pg_dsn: str) -> None:
    pool = configure(pg_dsn, idle_in_transaction_session_timeout=0)
    with pool.connection() as conn:
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("0",)


def test_thousand_short_checkouts_produce_no_report(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(
        pg_dsn, max_size=4, leak_threshold=0.5, idle_in_transaction_threshold=0.5,
        leak_reclaim_after=1.0, watchdog_interval=0.01,
    )  # fmt: skip

    def user() -> None:
        for _ in range(250):
            with pool.connection() as conn:
                conn.execute("SELECT 1")

    threads = [threading.Thread(target=user) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pool.metrics.use_time.count == 1000
    time.sleep(0.1)
    assert leaks_log.records == []
    stats = pool.stats()
    assert stats["poolguard.connection.leaks"] == stats["poolguard.connection.reclaimed"] == 0


def test_reclaim_keeps_a_pool_of_two_serving_and_never_hands_out_a_transaction(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, max_size=2, leak_reclaim_after=0.3, timeout=3)
    with pool.connection() as conn:
        conn.execute("CREATE TABLE t (x int)")
    leaked = [pool.getconn(), pool.getconn()]
    for conn in leaked:
        conn.execute("INSERT INTO t VALUES (1)")  # left uncommitted
    leaked_pids = {conn.info.backend_pid for conn in leaked}

    served = []
    for _ in range(6):
        with pool.connection() as conn:
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert conn.info.backend_pid not in leaked_pids
            served.append(conn.execute("SELECT count(*) FROM t").fetchone())
    assert served == [(0,)] * 6  # the leakers' open transactions were rolled back, not handed on
    # The 6 may need only one reclaim.
    wait_for("both leaked connections reclaimed", lambda: all(c.closed for c in leaked), WAIT)
    assert len([m for m in leak_records(leaks_log) if "leak_reclaim_after" in m]) == 2
    for conn in leaked:
        with pytest.raises(ConnectionReclaimed, match="reclaimed by poolguard after"):
            conn.execute("SELECT 1")
        with pytest.raises(ConnectionReclaimed):
            conn.commit()
        pool.putconn(conn)
    assert pool.stats()["poolguard.connection.reclaimed"] == 2
    assert pool.stats()["db.client.connection.count"]["used"] == 0


def test_with_block_whose_connection_was_reclaimed_raises_on_exit(pg_dsn: str) -> None:
    pool = configure(pg_dsn, leak_reclaim_after=0.2)
    with pytest.raises(ConnectionReclaimed), pool.connection() as conn:
        conn.execute("SELECT 1")
        # The work of this block was rolled back: say so.
        wait_for("the connection reclaimed", lambda: conn.closed, WAIT)


def test_a_running_statement_is_not_reclaimed(pg_dsn: str) -> None:
    pool = configure(pg_dsn, leak_reclaim_after=0.1)
    with pytest.raises(ConnectionReclaimed), pool.connection() as conn:
        assert conn.execute("SELECT 1 FROM pg_sleep(0.5)").fetchone() == (1,)  # not cut short
        # Reclaimed once the statement is done.
        wait_for("the connection reclaimed", lambda: conn.closed, WAIT)


def test_report_shows_every_checkout_with_its_owner_stack(pg_dsn: str) -> None:
    pool = configure(pg_dsn, max_size=3)
    release = threading.Event()
    ready = threading.Event()

    def hold_in_transaction() -> None:
        with pool.connection() as conn:
            conn.execute("SELECT 'held by a worker'")
            ready.set()
            release.wait(10)

    worker = threading.Thread(target=hold_in_transaction, name="holder")
    worker.start()
    try:
        ready.wait(5)
        mine = pool.getconn()
        mine.autocommit = True
        report = poolguard.report(server=True)
        assert [c.state for c in report] == ["idle in transaction", "idle"]
        held = report.checkouts[0]
        assert held.owner == "thread 'holder'" and held.owner_alive
        assert "in hold_in_transaction" in held.taken_at and HERE in held.taken_at
        assert held.last_statement == "SELECT '…'"
        assert any("release.wait(10)" in frame for frame in held.stack)  # its current stack
        assert held.server is not None and held.server["state"] == "idle in transaction"
        text = str(report)
        assert "2 connection(s) checked out" in text and "release.wait(10)" in text
        data = json.loads(json.dumps(report.as_dict()))
        assert data["checkouts"][0]["owner"] == "thread 'holder'"
        pool.putconn(mine)
    finally:
        release.set()
        worker.join()
    assert len(poolguard.report()) == 0


def test_report_on_signal_prints_the_report(pg_dsn: str) -> None:
    pool = configure(pg_dsn)
    out = io.StringIO()
    previous = poolguard.report_on_signal(signal.SIGUSR1, file=out)
    try:
        with pool.connection():
            os.kill(os.getpid(), signal.SIGUSR1)
            wait_for("the report printed", lambda: bool(out.getvalue()), WAIT)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert "1 connection(s) checked out" in out.getvalue()
    assert f"{HERE}:" in out.getvalue()


def test_watchdog_is_one_thread_and_stops_with_the_last_pool(pg_dsn: str) -> None:
    configure(pg_dsn, name="a")
    configure(pg_dsn, name="b")
    watchdogs = [t for t in threading.enumerate() if t.name == "poolguard-watchdog"]
    assert len(watchdogs) == 1 and watchdogs[0].daemon
    poolguard.reset()
    watchdogs[0].join(2)
    assert not _watchdog.running()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_watchdog_restarts_in_a_forked_child(pg_dsn: str) -> None:
    pool = configure(pg_dsn, max_size=1, leak_reclaim_after=0.2)
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    pid = os.fork()
    if pid == 0:  # the child: a leak here must be reclaimed by the child's own watchdog
        code = 1
        try:
            kept = pool.getconn()
            with pool.connection(timeout=3) as conn:
                conn.execute("SELECT 1")
            code = 0 if kept.closed and _watchdog.running() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pool.connection() as conn:  # the parent's pool is untouched
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_settings_defaults_and_validation(pg_dsn: str) -> None:
    settings = poolguard.Settings(conninfo=pg_dsn)
    assert settings.leak_threshold == 30.0
    assert settings.leak_reclaim_after == 0.0
    assert settings.idle_in_transaction_threshold == 5.0
    assert settings.idle_in_transaction_session_timeout == 60.0
    assert settings.watchdog_interval == 1.0
    with pytest.raises(ConfigurationError, match=r"leak_threshold=-1 .* seconds >= 0"):
        poolguard.configure(pg_dsn, leak_threshold=-1)
    with pytest.raises(ConfigurationError, match="watchdog_interval"):
        poolguard.configure(pg_dsn, watchdog_interval=0)
    with pytest.raises(ConfigurationError, match="leak_reclaim_after"):
        poolguard.configure(pg_dsn, leak_reclaim_after="soon")


@pytest.mark.pgbouncer
def test_behind_pgbouncer_the_refused_options_parameter_is_dropped(
    pgbouncer_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    pool = configure(pgbouncer_server.dsn, idle_in_transaction_session_timeout=30)
    with pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert any("refuses the options startup parameter" in r.getMessage() for r in caplog.records)


def test_leak_scene_for_the_demo_pins_the_handlers_line(pg_dsn: str) -> None:
    from poolguard._report import leak_scene

    text = leak_scene(pg_dsn, threshold=0.2)
    assert "taken at demo_app/views.py:2 in handle_order" in text
    assert "last statement: SELECT %s::int AS order_id" in text
    assert len(poolguard.get_pool("leak-demo").ledger) == 0  # it cleaned up after itself


def test_a_leak_reported_then_reclaimed_counts_once(
    pg_dsn: str, leaks_log: pytest.LogCaptureFixture
) -> None:
    pool = configure(pg_dsn, leak_threshold=0.1, leak_reclaim_after=0.3)
    conn = pool.getconn()
    wait_for("the connection reclaimed", lambda: conn.closed, WAIT)
    stats = pool.stats()
    assert (stats["poolguard.connection.leaks"], stats["poolguard.connection.reclaimed"]) == (1, 1)
    messages = leak_records(leaks_log)
    assert "not returned after" in messages[0] and "reclaimed by poolguard" in messages[1]
    pool.putconn(conn)
    time.sleep(3 * TICK)
    assert not any("was returned after" in m for m in leak_records(leaks_log, logging.INFO))


def test_reclaim_racing_with_returns_loses_no_slot_and_grows_nothing(pg_dsn: str) -> None:
    pool = configure(pg_dsn, max_size=3, leak_reclaim_after=0.05, watchdog_interval=0.01)
    dirty: list[int] = []
    reclaimed = 0
    lock = threading.Lock()

    def user(seed: int) -> None:
        nonlocal reclaimed
        for i in range(30):
            conn = pool.getconn(timeout=5)
            if conn.info.transaction_status != TransactionStatus.IDLE:
                dirty.append(conn.info.backend_pid)
            try:
                conn.execute("SELECT 1")  # opens a transaction
                time.sleep(0.03 + 0.005 * ((seed + i) % 8))  # around leak_reclaim_after
                conn.execute("SELECT 2")
            except ConnectionReclaimed:
                with lock:
                    reclaimed += 1
            pool.putconn(conn)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert dirty == []
    assert reclaimed > 0  # the race was exercised
    assert len(pool.ledger) == 0
    inner = pool._inner
    assert inner is not None
    wait_for("the pool back to 3", lambda: inner.get_stats()["pool_size"] <= 3, WAIT)
    held = [pool.getconn(timeout=3) for _ in range(3)]  # every slot is usable
    assert inner.get_stats()["pool_size"] == 3
    for conn in held:
        pool.putconn(conn)
