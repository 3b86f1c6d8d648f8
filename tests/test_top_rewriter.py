"""``poolguard top --rewriter``: a real rewriter in front of a real PostgreSQL, clients held in a
transaction and waiting for its one server connection, and top reading the admin console."""

from __future__ import annotations

import io
import json
import math
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from polling import wait_for
from poolguard import rewriter
from poolguard._redact import redact_conninfo
from poolguard._top import main
from poolguard._top_rewriter import CONSOLE_TIMEOUT, RewriterWatch, console_conninfo
from stopped_rewriter import StoppingRelay, stopping_relay
from test_redaction import SHAPES as DSN_SHAPES
from test_redaction import assert_clean, captured_logs, passwords
from test_top import terminal


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[rewriter.RewriterHandle]:
    """A rewriter with one server connection per pool, so a second client has to wait."""
    handle = rewriter.start(pg_dsn, pool_size=1, isolate=False)
    try:
        yield handle
    finally:
        handle.stop()


def console(handle: rewriter.RewriterHandle, **changes: Any) -> str:
    return make_conninfo(handle.dsn, dbname=handle.admin_database, **changes)


def client(handle: rewriter.RewriterHandle, prepares: bool = False) -> psycopg.Connection[Any]:
    # Without ``prepares``, no statement is prepared (prepare=True included).
    threshold = 5 if prepares else None
    return psycopg.connect(handle.dsn, autocommit=True, prepare_threshold=threshold)


def waiting_clients(handle: rewriter.RewriterHandle) -> int:
    return sum(r["state"] == "waiting" for r in handle.stats()["clients"])


def top(*args: str) -> str:
    out = io.StringIO()
    assert main([*args], out=out) == 0
    return out.getvalue()


def test_figures_of_a_pool_with_a_transaction_and_waiting_clients(
    proxy: rewriter.RewriterHandle, pg_dsn: str
) -> None:
    url = console(proxy)
    idle = client(proxy)
    # Two refreshes around three transactions: the count, the difference and a rate.
    watch = RewriterWatch(url)
    first = watch.sample()
    [pool] = first["pools"]
    assert pool["transactions_since_last"] is None and pool["transactions_per_second"] is None
    for i in range(3):
        idle.execute("select %s::int", (i,))
    second = watch.sample()
    [pool] = second["pools"]
    assert pool["transactions"] == first["pools"][0]["transactions"] + 3
    assert pool["transactions_since_last"] == 3 and pool["transactions_per_second"] > 0

    holder = client(proxy, prepares=True)
    holder.execute("BEGIN")
    holder.execute("select %s::int", (1,), prepare=True)  # one statement prepared server-side
    waiters = [client(proxy), client(proxy)]
    threads = []
    try:
        for n, conn in enumerate(waiters, 1):
            thread = threading.Thread(target=conn.execute, args=("select 1",))
            thread.start()
            threads.append(thread)
            wait_for(f"{n} clients waiting", lambda n=n: waiting_clients(proxy) == n)
        time.sleep(0.3)

        found = json.loads(top(pg_dsn, "--json", "--rewriter", url))
        assert found["database"] == conninfo_to_dict(pg_dsn)["dbname"]  # the server part too
        [section] = found["rewriters"]
        assert section["error"] is None
        assert section["target"] == (
            f"{proxy.user}@{proxy.host}:{proxy.port}/{proxy.admin_database}"
        )
        [pool] = section["pools"]
        assert (pool["user"], pool["database"]) == (proxy.user, proxy.dbname)
        assert (pool["clients_active"], pool["clients_waiting"], pool["clients_idle"]) == (
            1,
            2,
            1,
        )
        assert (pool["servers_busy"], pool["servers_idle"], pool["pool_size"]) == (1, 0, 1)
        assert pool["prepared_per_server"] == [1] and pool["statements"] == 1
        assert pool["transactions"] == second["pools"][0]["transactions"]  # one still open
        # The first waiter is first in the queue.
        pids = [conn.info.backend_pid for conn in waiters]
        assert [(w["pid"], w["queue"]) for w in section["waiting"]] == [(pids[0], 1), (pids[1], 2)]

        # The same as text, next to the database section.
        text = top(pg_dsn, "--once", "--rewriter", url)
        assert "slots:" in text and f"rewriter {section['target']}:" in text
        lines = text.splitlines()
        row = lines[lines.index(f"rewriter {section['target']}:") + 3]
        assert row.split()[0] == f"{proxy.user}/{proxy.dbname}"[:22], row
        assert row.split()[1:6] == ["1", "2", "1", "1", "0"], row
        assert row.split()[-1] == "1", row  # prepared per server
        assert f"waiting #1: client {pids[0]} " in text and f"waiting #2: client {pids[1]} " in text

        # Waits are the proxy's own figures: they grow between refreshes, the first waiter's
        # the longest.
        time.sleep(0.5)
        later = watch.sample()
        first, second_waiter = later["waiting"]
        assert first["queue"] == 1 and first["waiting_seconds"] >= second_waiter["waiting_seconds"]
        # (whole milliseconds, so 0.49: the 0.5 s sleep less truncation)
        assert second_waiter["waiting_seconds"] >= section["waiting"][1]["waiting_seconds"] + 0.49
        # (each SHOW is its own snapshot, read a moment apart)
        assert later["pools"][0]["max_wait_seconds"] == pytest.approx(
            first["waiting_seconds"], abs=0.1
        )
    finally:
        holder.execute("COMMIT")
        for thread in threads:
            thread.join(10)
        for conn in [holder, idle, *waiters]:
            conn.close()
    done = watch.sample()
    assert done["waiting"] == [] and done["pools"][0]["clients_waiting"] == 0
    # BEGIN..COMMIT and the two waiters' statements: three more, all since the last sample.
    assert done["pools"][0]["transactions"] == second["pools"][0]["transactions"] + 3


def test_an_unreachable_console_is_one_line_and_the_rest_still_shows(
    proxy: rewriter.RewriterHandle, pg_dsn: str
) -> None:
    closed = make_conninfo(console(proxy), port=proxy.port + 1, password="closed-port-pw")
    found = json.loads(top(pg_dsn, "--json", "--rewriter", closed, "--rewriter", console(proxy)))
    bad, good = found["rewriters"]
    assert bad["error"] and "\n" not in bad["error"] and bad["pools"] == []
    assert bad["target"] == f"{proxy.user}@{proxy.host}:{proxy.port + 1}/{proxy.admin_database}"
    assert good["error"] is None and len(good["pools"]) == 1
    assert found["slots"]["used"] >= 1
    text = top(pg_dsn, "--once", "--rewriter", closed)
    assert f"rewriter {bad['target']}:\n  error: " in text and "slots:" in text
    assert "closed-port-pw" not in json.dumps(found) + text


@dataclass
class Stopping:
    dsn: str  # the console, through the relay
    handle: rewriter.RewriterHandle
    relay: StoppingRelay


@pytest.fixture
def stopping(pg_dsn: str) -> Iterator[Stopping]:
    """A rewriter in a process of its own, stopped (SIGSTOP) once it has let a console client
    in: the client's queries go unanswered."""
    handle = rewriter.start(pg_dsn, pool_size=1)
    try:
        with stopping_relay((handle.host, handle.port), handle.pid) as relay:
            dsn = make_conninfo(
                console(handle), host=relay.host, port=relay.port, sslmode="disable"
            )
            yield Stopping(dsn, handle, relay)
    finally:
        handle.stop()


# Time a loaded machine may add to a call that gives up after its timeout: what is tested is
# that it gives up at all (before the fix it waited as long as the process stayed stopped).
MARGIN = 2.0


def outcome_within(seconds: float, call: Callable[[], Any]) -> Any:
    """What ``call`` returned or raised, which it must do within ``seconds``."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # on a failure, resumed at teardown
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return outcome[0]


def test_a_stopped_rewriter_times_out_naming_its_console(stopping: Stopping) -> None:
    started = time.monotonic()
    failed = outcome_within(2 + MARGIN, lambda: rewriter.admin_stats(stopping.dsn, timeout=2))
    elapsed = time.monotonic() - started
    assert stopping.relay.stopped.is_set()  # after the login: the SHOW queries went unanswered
    assert isinstance(failed, psycopg.errors.ConnectionTimeout), failed
    assert isinstance(failed, psycopg.OperationalError)  # what callers of psycopg catch
    assert elapsed >= 2  # the whole timeout was given
    message = str(failed)
    assert "no answer within 2 s" in message, message
    assert redact_conninfo(stopping.dsn) in message and "password=***" in message
    assert "not stopped" in message  # what to check
    assert stopping.handle.password not in message

    # Stopped before the connection: the login is what goes unanswered.
    direct = console(stopping.handle)
    failed = outcome_within(2 + MARGIN, lambda: rewriter.admin_stats(direct, timeout=2))
    assert isinstance(failed, psycopg.errors.ConnectionTimeout), failed
    assert str(failed).startswith("no answer within 2 s") and "password=***" in str(failed)
    assert stopping.handle.password not in str(failed)


@pytest.mark.parametrize("timeout", [0, -1, True, "2", math.nan, math.inf])
def test_a_timeout_that_is_not_seconds_is_refused(timeout: Any) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be a number of seconds > 0, got "):
        rewriter.admin_stats("host=127.0.0.1 port=1 dbname=poolguard", timeout=timeout)


def test_top_shows_a_stopped_rewriter_as_one_line_next_to_the_rest(
    stopping: Stopping, proxy: rewriter.RewriterHandle, pg_dsn: str
) -> None:
    text = outcome_within(
        CONSOLE_TIMEOUT + MARGIN,
        lambda: top(pg_dsn, "--once", "--rewriter", stopping.dsn, "--rewriter", console(proxy)),
    )
    assert isinstance(text, str), text
    assert stopping.relay.stopped.is_set()
    lines = text.splitlines()
    heading = lines.index(
        f"rewriter {stopping.handle.user}@{stopping.relay.host}:{stopping.relay.port}"
        f"/{stopping.handle.admin_database}:"
    )
    error = lines[heading + 1]
    assert error.startswith(f"  error: no answer within {CONSOLE_TIMEOUT:g} s"), error
    assert "password=***" in error and stopping.handle.password not in text
    # The section is that one line; the database and the other rewriter are there in full.
    good = f"rewriter {proxy.user}@{proxy.host}:{proxy.port}/{proxy.admin_database}:"
    assert lines[heading + 2 : heading + 4] == ["", good]
    assert lines[heading + 6].split()[0] == f"{proxy.user}/{proxy.dbname}"[:22]
    assert "slots:" in text


def test_rewriters_only_and_the_console_database_by_default(
    proxy: rewriter.RewriterHandle,
) -> None:
    # No database DSN (none in the environment either): only the rewriter's section.
    url = (
        f"postgresql://{quote(proxy.user)}:{quote(proxy.password, safe='')}"
        f"@{proxy.host}:{proxy.port}"
    )
    assert conninfo_to_dict(console_conninfo(url))["dbname"] == "poolguard"
    text = top("--once", "--rewriter", url)
    assert text.splitlines()[0].startswith("poolguard top  ") and "slots:" not in text
    assert f"rewriter {proxy.user}@{proxy.host}:{proxy.port}/poolguard:" in text
    assert proxy.password not in text


def test_a_bad_rewriter_dsn_is_refused_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--once", "--rewriter", "postgresql://app:s3cret-pw@h:notaport/poolguard"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--rewriter has port" in err and "s3cret-pw" not in err


def examples(count: int) -> settings:
    # The rewriter fixture is shared by all examples of a test: it holds no per-example state.
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


SHAPES: list[tuple[str, Callable[[rewriter.RewriterHandle, str], str]]] = [
    (
        "url",
        lambda h, pw: (
            f"postgresql://{h.user}:{quote(pw, safe='')}@{h.host}:{h.port}/{h.admin_database}"
        ),
    ),
    ("conninfo", lambda h, pw: console(h, password=pw)),
]


@examples(60)
@given(pw=passwords, shape=st.sampled_from(SHAPES))
def test_a_wrong_password_is_reported_redacted(
    proxy: rewriter.RewriterHandle,
    pw: str,
    shape: tuple[str, Callable[[rewriter.RewriterHandle, str], str]],
) -> None:
    dsn = shape[1](proxy, pw)
    with captured_logs() as logs:
        as_json = top("--json", "--rewriter", dsn)
        text = top("--once", "--rewriter", dsn)
    [section] = json.loads(as_json)["rewriters"]
    assert "password authentication failed" in section["error"], section
    assert section["target"] == f"{proxy.user}@{proxy.host}:{proxy.port}/{proxy.admin_database}"
    assert f"  error: {section['error']}" in text
    assert_clean(pw, as_json, text, logs.getvalue())


def test_live_view_refreshes_the_rate_next_to_a_refusing_console(
    proxy: rewriter.RewriterHandle, tmp_path: Path
) -> None:
    refused = console(proxy, password="live-wrong-pw")
    top_args = ["top", "--interval", "0.5", "--rewriter", console(proxy), "--rewriter", refused]
    command = shlex.join([sys.executable, "-m", "poolguard.cli", *top_args])
    stop = threading.Event()

    def traffic() -> None:
        with client(proxy) as conn:
            while not stop.wait(0.02):
                conn.execute("select 1")

    def row(screen: str) -> list[str]:
        mine = f"  {proxy.user}/"
        found = [line.split() for line in screen.splitlines() if line.startswith(mine)]
        return found[0] if found else []

    busy = threading.Thread(target=traffic)
    busy.start()
    try:
        with terminal(command, tmp_path) as screen_now:
            deadline = time.monotonic() + 15
            screen = ""
            # A rate needs two refreshes: "-" first, then a figure.
            while len(row(screen)) < 9 or row(screen)[8] in ("-", "0.0"):
                assert time.monotonic() < deadline, f"top never showed a rate:\n{screen}"
                time.sleep(0.2)
                screen = screen_now()
            assert float(row(screen)[8]) > 0
            assert "error: FATAL: password authentication failed" in screen
            assert "live-wrong-pw" not in screen and proxy.password not in screen
            xacts = int(row(screen)[7])
            time.sleep(1.2)
            assert int(row(screen_now())[7]) > xacts
    finally:
        stop.set()
        busy.join(10)


@examples(100)
@given(pw=passwords, shape=st.sampled_from(DSN_SHAPES))
def test_no_password_from_any_rewriter_dsn_shape(
    pw: str,
    shape: tuple[str, Callable[[str], str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Malformed DSNs are refused naming --rewriter; well-formed ones point at a closed port."""
    dsn = shape[1](pw)
    out = io.StringIO()
    with captured_logs() as logs:
        try:
            code = main(["--json", "--rewriter", dsn], out=out)
        except SystemExit as exited:
            code = exited.code
    err = capsys.readouterr().err
    if code == 0:
        [section] = json.loads(out.getvalue())["rewriters"]
        assert section["error"], section
    else:
        assert code == 2 and "--rewriter" in err, err
    assert_clean(pw, out.getvalue(), err, logs.getvalue())
