"""A server with fewer free slots than the pool's max_size (SQLSTATE 53300).

The pool caps itself at the connections it has, logs one WARNING, serves every caller from
its queue, and tries its full size again after a back-off; the budget check at open already
warned.  Real server, a non-superuser role (superusers may take the reserved slots), and
superuser connections held by the test to fill the server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import poolguard
from poolguard import BudgetWarning, ConfigurationError, PoolConnectError, _toomany, testing
from poolguard._budget import ServerLimits
from poolguard._toomany import Backoff, is_too_many_connections, refusal_text
from poolguard.testing import PostgresServer

MAX_CONNECTIONS = 12
RESERVED = 3  # superuser_reserved_connections in the harness
USABLE = MAX_CONNECTIONS - RESERVED  # what a non-superuser role can ever have
THREADS, REQUESTS = 30, 10

REFUSALS = [
    'connection failed: connection to server at "127.0.0.1", port 5 failed: FATAL:  sorry, '
    "too many clients already",
    "FATAL:  remaining connection slots are reserved for non-replication superuser connections",
    "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute",
    'FATAL:  too many connections for role "app"',
    'FATAL:  too many connections for database "app"',
]


@dataclass
class Full:
    """The small server, the app role's DSN, and the superuser connections filling it."""

    server: PostgresServer
    dsn: str = field(repr=False)
    held: list[psycopg.Connection[Any]] = field(default_factory=list)

    def hold(self, n: int) -> None:
        self.held += [self.server.connect() for _ in range(n)]

    def release(self) -> None:
        while self.held:
            self.held.pop().close()

    def backends(self, application_name: str) -> int:
        with self.server.connect() if not self.held else _nullcontext(self.held[0]) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            ).fetchone()
        return int(row[0]) if row else 0


@contextmanager
def _nullcontext(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    yield conn


@pytest.fixture(scope="module")
def small(postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    server = postgres_factory(max_connections=MAX_CONNECTIONS)
    with server.connect() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(
                sql.Literal(secrets.token_urlsafe(12))
            )
        )
        # Without it pg_stat_activity hides other roles' backend_type, and the budget does not
        # count the superuser connections the tests hold.
        conn.execute("GRANT pg_read_all_stats TO app")
    return server


@pytest.fixture
def full(small: PostgresServer) -> Iterator[Full]:
    password = secrets.token_urlsafe(12)
    with small.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE app PASSWORD {}").format(sql.Literal(password)))
    state = Full(small, make_conninfo(small.dsn, user="app", password=password), [])
    try:
        yield state
    finally:
        poolguard.reset()
        state.release()


def run_threads(request: Callable[[], None]) -> tuple[int, list[str]]:
    seen = testing.run_users(THREADS, REQUESTS, lambda user, i: request())
    return seen.ok, seen.failures


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING
    ]


# --- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize("message", REFUSALS)
def test_refusals_are_recognised(message: str) -> None:
    exc = psycopg.OperationalError(message)
    assert is_too_many_connections(exc)
    assert not refusal_text(exc).startswith("FATAL")


@pytest.mark.parametrize(
    "message",
    [
        'FATAL:  password authentication failed for user "app"',
        'FATAL:  database "nope" does not exist',
        "Connection refused",
        "no more connections allowed (max_client_conn)",  # PgBouncer's own limit: 08P01
    ],
)
def test_other_failures_are_not(message: str) -> None:
    assert not is_too_many_connections(psycopg.OperationalError(message))


def test_backoff_warns_once_caps_doubles_and_lifts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    full = Backoff("web", max_size=10)
    full.limits = ServerLimits(max_connections=12, superuser_reserved_connections=3)
    exc = psycopg.OperationalError("FATAL:  sorry, too many clients already")

    first = full.refused(exc, live=4, now=100.0)
    assert first is not None and (first.cap, first.delay) == (4, _toomany.FIRST_BACKOFF)
    assert full.cap == 4
    joined = full.refused(exc, live=3, now=101.0)  # another attempt, same back-off
    assert joined is not None and joined.cap is None
    assert joined.delay == pytest.approx(_toomany.FIRST_BACKOFF - 1)
    assert not full.lift(joined) and full.cap == 4  # only the owner lifts
    assert full.lift(first) and full.cap is None

    again = full.refused(exc, live=5, now=200.0)  # refused again right after: doubled
    assert again is not None and (again.cap, again.delay) == (5, 2 * _toomany.FIRST_BACKOFF)
    assert full.lift(again)
    full.connected()  # the retry got through: the next refusal starts over
    assert full.refused(exc, live=6, now=300.0).delay == _toomany.FIRST_BACKOFF  # type: ignore[union-attr]
    assert full.caps == 3

    records = [r for r in caplog.records if "refused a new connection" in r.getMessage()]
    assert [r.levelname for r in records] == ["WARNING", "INFO", "INFO"]
    assert "max_connections=12, 3 reserved" in records[0].getMessage()
    assert "capped at the 4 connection(s) it has instead of max_size 10" in records[0].getMessage()


def test_backoff_has_nothing_to_cap_without_a_connection() -> None:
    exc = psycopg.OperationalError("FATAL:  sorry, too many clients already")
    assert Backoff("web", max_size=4).refused(exc, live=0, now=1.0) is None


def test_backoff_is_bounded() -> None:
    full = Backoff("web", max_size=4)
    exc = psycopg.OperationalError("FATAL:  sorry, too many clients already")
    delays = []
    for now in range(0, 2000, 100):
        step = full.refused(exc, live=1, now=float(now))
        assert step is not None
        delays.append(step.delay)
        full.lift(step)
    assert max(delays) == _toomany.MAX_BACKOFF


# --- settings --------------------------------------------------------------------------------


def test_processes_and_budget_settings() -> None:
    settings = poolguard.configure("dbname=x", processes=3, budget="raise").settings
    assert (settings.processes, settings.budget) == (3, "raise")
    poolguard.reset()
    defaults = poolguard.configure("dbname=x").settings
    assert (defaults.processes, defaults.budget) == (None, "warn")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"processes": 0}, "processes=0 .* integer >= 1"),
        ({"processes": True}, "processes=True"),
        ({"budget": "loud"}, "budget='loud' .* 'warn', 'raise' or 'off'"),
    ],
)
def test_processes_and_budget_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        poolguard.configure("dbname=x", **options)


def test_processes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_PROCESSES", "6")
    monkeypatch.setenv("POOLGUARD_BUDGET", "off")
    settings = poolguard.configure("dbname=x").settings
    assert (settings.processes, settings.budget) == (6, "off")


# --- the budget at open ---------------------------------------------------------------------


def test_open_warns_when_the_budget_does_not_fit(
    full: Full, caplog: pytest.LogCaptureFixture
) -> None:
    full.hold(2)  # usable for others: 12 - 3 - 2 = 7
    pool = poolguard.configure(full.dsn, name="tight", max_size=4, processes=2)
    with pytest.warns(BudgetWarning, match=r"max_size 4 = 8 exceeds the 7 usable"):
        pool.open()
    (message,) = warnings_from(caplog, "poolguard")
    assert "max_size <= 3" in message and "demand      = max_size 4 x processes 2" in message
    assert full.server.password not in caplog.text


def test_open_counts_web_concurrency(full: Full, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    pool = poolguard.configure(full.dsn, name="wc", max_size=4, budget="raise")
    with pytest.raises(ConfigurationError, match=r"3 process\(es\) x max_size 4 = 12"):
        pool.open()
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    poolguard.reset()
    poolguard.configure(full.dsn, name="wc", max_size=4, budget="raise").open()  # 8 <= 9


def test_budget_off_checks_nothing(full: Full, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    poolguard.configure(full.dsn, name="off", max_size=50, budget="off").open()
    assert "usable" not in caplog.text


# --- 53300 while the pool grows -------------------------------------------------------------


def test_full_server_caps_the_pool_and_serves_every_request(
    full: Full, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    full.hold(4)  # the app role can now get USABLE - 4 = 5 connections
    pool = poolguard.configure(full.dsn, name="capped", max_size=10, min_size=1, timeout=30)
    with pytest.warns(BudgetWarning):
        pool.open()

    def request() -> None:
        with pool.connection() as conn:
            conn.execute("SELECT pg_sleep(0.01)")

    ok, errors = run_threads(request)
    stats = pool.stats()
    on_server = full.backends("poolguard:capped")
    psycopg_warnings = warnings_from(caplog, "psycopg.pool")
    pool.close()  # most likely inside the back-off: the waiting attempt gives up
    at_close = warnings_from(caplog, "psycopg.pool")[len(psycopg_warnings) :]

    assert (ok, errors) == (THREADS * REQUESTS, [])
    assert stats["poolguard.connection.capped"] >= 1
    assert 1 <= stats["db.client.connection.max"] <= USABLE - 4
    assert on_server <= USABLE - 4
    assert stats["db.client.connection.timeouts"] == 0
    capped = [m for m in warnings_from(caplog, "poolguard") if "refused a new connection" in m]
    assert len(capped) == 1, capped
    assert "max_connections=12, 3 reserved" in capped[0]
    assert "instead of max_size 10" in capped[0]
    assert psycopg_warnings == []
    assert len(at_close) <= 1 and all("was closed while it waited" in m for m in at_close)


def test_the_cap_is_lifted_after_the_back_off(
    full: Full, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_toomany, "FIRST_BACKOFF", 0.3)
    caplog.set_level(logging.INFO, logger="poolguard")
    full.hold(6)  # room for 3
    pool = poolguard.configure(full.dsn, name="lift", max_size=6, timeout=30, budget="off")

    def request() -> None:
        with pool.connection() as conn:
            conn.execute("SELECT pg_sleep(0.01)")

    assert run_threads(request) == (THREADS * REQUESTS, [])
    first_cap = pool.stats()["db.client.connection.max"]
    assert first_cap <= 3
    full.release()  # room for all 6 now
    for _ in range(100):  # the back-off running now ends, and the cap is lifted
        if pool.stats()["db.client.connection.max"] == 6:
            break
        time.sleep(0.1)
    assert run_threads(request) == (THREADS * REQUESTS, [])
    stats = pool.stats()
    assert stats["db.client.connection.max"] == 6
    assert full.backends("poolguard:lift") > first_cap
    assert "back-off over, trying max_size 6 again" in caplog.text
    capped = [m for m in warnings_from(caplog, "poolguard") if "refused" in m]
    assert len(capped) == 1
    assert warnings_from(caplog, "psycopg.pool") == []


def test_async_pool_caps_and_serves_every_request(
    full: Full, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    full.hold(4)

    async def main() -> tuple[int, list[str], dict[str, Any], list[str]]:
        poolguard.configure(full.dsn, name="acapped", max_size=10, timeout=30)
        apool = poolguard.get_async_pool("acapped")
        with pytest.warns(BudgetWarning):
            await apool.open()
        ok, errors = 0, []

        async def user() -> None:
            nonlocal ok
            for _ in range(REQUESTS):
                try:
                    async with apool.connection() as conn:
                        await conn.execute("SELECT pg_sleep(0.01)")
                except psycopg.Error as exc:
                    errors.append(str(exc).splitlines()[0])
                else:
                    ok += 1

        await asyncio.gather(*(user() for _ in range(THREADS)))
        stats = apool.stats()
        psycopg_warnings = warnings_from(caplog, "psycopg.pool")
        await apool.close()
        return ok, errors, stats, psycopg_warnings

    ok, errors, stats, psycopg_warnings = asyncio.run(main())
    assert (ok, errors) == (THREADS * REQUESTS, [])
    assert stats["poolguard.connection.capped"] >= 1
    assert 1 <= stats["db.client.connection.max"] <= USABLE - 4
    capped = [m for m in warnings_from(caplog, "poolguard") if "refused a new connection" in m]
    assert len(capped) == 1, capped
    assert psycopg_warnings == []


# --- 53300 at open ---------------------------------------------------------------------------


def test_open_on_a_full_server_names_the_limit(full: Full) -> None:
    full.hold(USABLE)
    pool = poolguard.configure(full.dsn, name="nope")
    with pytest.raises(PoolConnectError) as info:
        pool.open()
    message = str(info.value)
    assert "no connection slot left" in message
    assert "53300" in message and "max_connections" in message
    assert "remaining connection slots are reserved" in message
    assert "password" not in message and full.server.password not in message
