"""A leaked asyncpg connection is seen like any other: report(), stats(), the watchdog, the
poolguard_no_leaks marker, and closed by reset() / aclose_all()."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sa_helpers import line_of_caller, sa_url
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError

import poolguard
from poolguard.sqlalchemy import create_async_engine
from poolguard.testing import count_sessions

pytest_plugins = ["pytester"]


async def wait_for(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("closer", ["aclose_all", "reset"])
def test_held_asyncpg_connection_is_reported_counted_warned_and_closed(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, closer: str
) -> None:
    pool = poolguard.configure(
        pg_dsn, max_size=2, leak_threshold=0.3, watchdog_interval=0.05
    )  # fmt: skip
    engine = create_async_engine(sa_url(pg_dsn, "asyncpg"))
    app = pool.settings.application_name

    async def body() -> tuple[int, str, dict[str, object], int, int]:
        line = line_of_caller()
        held = await engine.connect()
        await held.execute(text("SELECT 1"))
        await wait_for(lambda: any("not returned" in r.getMessage() for r in caplog.records))
        listing = str(poolguard.report())
        counts = poolguard.stats()
        before = await asyncio.to_thread(count_sessions, pg_dsn, app)
        if closer == "aclose_all":
            await poolguard.aclose_all()
        else:  # from another thread, while this loop runs
            await asyncio.to_thread(poolguard.reset)
        deadline = time.monotonic() + 5  # a terminated backend leaves pg_stat_activity soon
        while (after := await asyncio.to_thread(count_sessions, pg_dsn, app)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        with pytest.raises(InterfaceError, match="closed"):  # the holder's late use fails
            await held.close()
        return line, listing, counts, before, after

    with caplog.at_level(logging.WARNING, logger="poolguard.leaks"):
        line, listing, counts, before, after = asyncio.run(body())
    site = f"test_sa_asyncpg_leaks.py:{line} in body"
    assert "1 connection(s) checked out" in listing and site in listing
    assert counts["db.client.connection.count"] == {"idle": 0, "used": 1}
    flavors = counts["poolguard.flavors"]
    assert isinstance(flavors, dict)
    assert flavors["asyncpg"]["db.client.connection.count"]["used"] == 1
    warnings = [r.getMessage() for r in caplog.records if "not returned" in r.getMessage()]
    assert len(warnings) == 1 and site in warnings[0]
    assert (before, after) == (1, 0)


INNER = """
import asyncio
import os

import pytest
from sqlalchemy import text

import poolguard
from poolguard.sqlalchemy import create_async_engine

KEEP = []


@pytest.mark.poolguard_no_leaks
def test_leaky():
    poolguard.configure(os.environ["LEAK_DSN"], min_size=0)
    engine = create_async_engine(os.environ["LEAK_URL"])

    async def body():
        conn = await engine.connect()
        await conn.execute(text("SELECT 1"))
        KEEP.append(conn)

    asyncio.run(body())
"""


def test_marker_fails_a_test_that_leaks_an_asyncpg_connection(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEAK_DSN", pg_dsn)
    url = sa_url(pg_dsn, "asyncpg").render_as_string(hide_password=False)
    monkeypatch.setenv("LEAK_URL", url)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test left 1 poolguard connection(s) checked out:*",
            "*pool 'default': taken at test_inner.py:19 in body by task *",
        ]
    )
