"""on_event hooks: typed events at the pool's decision points, one per kind per interval."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

import poolguard
import poolguard.testing
from poolguard import ConfigurationError, PoolEvent, PoolExhausted
from poolguard._events import Events, flush

EXAMPLES = Path(__file__).parent.parent / "examples" / "alerts"


class Recorder:
    def __init__(self) -> None:
        self.events: list[PoolEvent] = []

    def __call__(self, event: PoolEvent) -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[PoolEvent]:
        assert flush(10)
        return [e for e in self.events if e.kind == kind]


def storm(callers: int, timeout: float) -> int:
    """``callers`` threads that each wait ``timeout`` s for a connection; how many timed out."""
    timed_out = []
    start = threading.Barrier(callers)

    def caller() -> None:
        start.wait()
        try:
            with poolguard.connection("alerts", timeout=timeout):
                pass
        except PoolExhausted:
            timed_out.append(1)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return len(timed_out)


def test_exhaustion_storm_is_one_event_per_interval_naming_the_holder(pg_dsn: str) -> None:
    hook = Recorder()
    pool = poolguard.configure(
        pg_dsn, name="alerts", min_size=1, max_size=1, on_event=hook, event_interval=2.0
    )
    held = pool.getconn()  # the holder: this line must be in the event
    holder_line = f"test_metrics_events.py:{held_line()}"
    try:
        started = time.monotonic()
        assert storm(200, 0.3) == 200
        took = time.monotonic() - started
        # One event per interval: the storm takes well under the 2 s interval, so one event;
        # a loaded machine may stretch it into the next interval, and that one may send another.
        storm_events = hook.of("exhausted")
        assert 1 <= len(storm_events) <= 1 + int(took // 2.0), (len(storm_events), took)
        event = storm_events[0]
        assert event.pool == "alerts" and event.suppressed == 0
        assert event.site is not None and holder_line in event.site
        assert event.age is not None and event.age > 0.3
        assert event.details["in_use"] == 1 and event.details["max_size"] == 1
        assert "exhausted after 0.3 s" in event.message
        time.sleep(2.1)  # the next interval: the next timeout is news again, with the count
        assert storm(1, 0.05) == 1
        events = hook.of("exhausted")
        assert len(events) == len(storm_events) + 1
        # Each timeout was sent or counted in the next event sent (199 with one storm event).
        assert sum(1 + e.suppressed for e in events) == 201, [e.suppressed for e in events]
    finally:
        pool.putconn(held)
    assert pool.stats()["db.client.connection.timeouts"] == 201
    assert pool.stats()["db.client.connection.wait_time"]["count"] == 202


def held_line() -> int:
    """The line of ``pool.getconn()`` in the test above."""
    source = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "the holder: this line" in line)


def test_leak_idle_transaction_and_dirty_return_each_one_event(pg_dsn: str) -> None:
    hook = Recorder()
    pool = poolguard.configure(
        pg_dsn,
        name="alerts",
        leak_threshold=0.3,
        idle_in_transaction_threshold=0.2,
        watchdog_interval=0.05,
        on_event=[hook],
    )
    conn = pool.getconn()
    conn.execute("SELECT 'not shown' AS x")  # opens a transaction and leaves it idle
    deadline = time.monotonic() + 10
    while pool.stats()["poolguard.connection.leaks"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # more watchdog ticks: still one event of each kind
    pool.putconn(conn)
    [leak] = hook.of("leak")
    assert leak.site is not None and "test_metrics_events.py" in leak.site
    assert leak.age is not None and leak.age >= 0.3
    [idle] = hook.of("idle_in_transaction")
    assert "not shown" not in idle.details["statement"]
    [dirty] = hook.of("dirty_return")
    assert "rolled back" in dirty.message and dirty.site == leak.site
    assert json.loads(json.dumps(leak.as_dict()))["kind"] == "leak"


def test_refused_connection_event(postgres_server: Any) -> None:
    hook = Recorder()
    dsn = postgres_server.dsn.replace(f"password={postgres_server.password}", "password=wrong")
    pool = poolguard.configure(dsn, name="alerts", on_event=hook)
    with pytest.raises(poolguard.PoolConnectError):
        pool.open()
    [event] = hook.of("connection_refused")
    assert "cannot connect" in event.message and "wrong" not in event.message


def test_a_failing_hook_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: PoolEvent) -> None:
        raise RuntimeError("hook bug")

    events = Events("p", (broken,), 60.0)
    with caplog.at_level(logging.ERROR, logger="poolguard"):
        events.emit("leak", "connection not returned")
        assert flush(10)
    assert "on_event hook" in caplog.text and "hook bug" in caplog.text


def test_no_hooks_no_work() -> None:
    events = Events("p", (), 60.0)
    events.emit("leak", "x")
    assert events._last == {}


def test_on_event_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="on_event=42"):
        poolguard.configure("postgresql://localhost/x", on_event=42)
    with pytest.raises(ConfigurationError, match="event_interval"):
        poolguard.configure("postgresql://localhost/x", event_interval=-1)


def load_webhook_example() -> Any:
    spec = importlib.util.spec_from_file_location("webhook", EXAMPLES / "webhook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def chat_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            assert self.headers["Content-Type"] == "application/json"
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hooks/T000/B000/secret", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_webhook_example_posts_to_a_real_server(
    pg_dsn: str, chat_server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = chat_server
    webhook = load_webhook_example()
    pool = poolguard.configure(
        pg_dsn,
        name="alerts",
        max_size=1,
        on_event=webhook.chat_webhook(url, extra={"chat_id": 42}),
    )
    with pool.connection(), pytest.raises(PoolExhausted):
        poolguard.connection("alerts", timeout=0.1).__enter__()
    assert flush(10)
    [body] = received
    assert body["chat_id"] == 42
    assert body["text"].startswith("poolguard exhausted in pool 'alerts'")
    assert "test_metrics_events.py" in body["text"]


def test_webhook_failure_logs_the_host_not_the_token(caplog: pytest.LogCaptureFixture) -> None:
    webhook = load_webhook_example()
    from poolguard.testing import free_port

    hook = webhook.chat_webhook(f"http://127.0.0.1:{free_port()}/bot123:SECRET/sendMessage")
    with caplog.at_level(logging.WARNING, logger="poolguard.alerts"):
        hook(PoolEvent("leak", "p", "connection not returned"))
    assert "127.0.0.1" in caplog.text and "SECRET" not in caplog.text


def test_docs_show_the_webhook_example_as_shipped() -> None:
    page = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    shown = page.split("<!-- test: file=webhook.py -->\n```python\n", 1)[1].split("```\n", 1)[0]
    assert shown == (EXAMPLES / "webhook.py").read_text()


def test_full_server_gives_one_server_full_event(postgres_factory: Any) -> None:
    server = postgres_factory(max_connections=8)
    hook = Recorder()
    held = [server.connect() for _ in range(5)]  # 3 slots left, superuser ones included
    try:
        pool = poolguard.configure(
            server.dsn, name="alerts", min_size=1, max_size=6, budget="off", on_event=hook
        )

        def request() -> None:
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(0.05)")

        seen = poolguard.testing.run_users(8, 5, lambda user, i: request())
        assert (seen.ok, seen.failures) == (40, [])
        [event] = hook.of("server_full")
        assert "too many clients" in event.message
        assert 1 <= event.details["cap"] <= 3 and event.details["retry_in"] > 0
        stats = pool.stats()
        assert stats["poolguard.connection.server_refusals"] >= 1
        assert stats["poolguard.connection.capped"] == 1
    finally:
        poolguard.reset()
        for conn in held:
            conn.close()
