"""One budget per pool name across every flavor: the server never sees more than max_size.

One process drives pool "default" (max_size=4) four ways at once: poolguard.connection() from
threads, poolguard.aconnection() from asyncio tasks, a SQLAlchemy engine from threads and an
asyncpg AsyncEngine from asyncio tasks, 50 users each.  pg_stat_activity, sampled every 50 ms
over a connection of its own, must never show more than 4 sessions of the pool's
application_name, and every request must succeed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
import pytest
from sa_helpers import sa_url
from sqlalchemy import text

import poolguard
from poolguard.sqlalchemy import aclose, create_async_engine, create_engine

USERS = 50
REQUESTS = 4
MAX_SIZE = 4
WORK = "SELECT pg_sleep(0.002)"

pytestmark = pytest.mark.slow


class Sampler(threading.Thread):
    """Counts the pool's sessions in pg_stat_activity every 50 ms until stopped."""

    def __init__(self, dsn: str, application_name: str) -> None:
        super().__init__(name="sampler", daemon=True)
        self.dsn, self.application_name = dsn, application_name
        self.counts: list[int] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="sampler") as conn:
            self.ready.set()
            while not self.stop.is_set():
                row = conn.execute(
                    # This test's own database: on the shared server, earlier tests' pools of
                    # the same name may still be closing their sessions.
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                    "AND datname = current_database()",
                    [self.application_name],
                ).fetchone()
                assert row is not None
                self.counts.append(row[0])
                self.stop.wait(0.05)


def in_threads(request: Callable[[], None], errors: list[str], done: list[int]) -> None:
    def user() -> None:
        for _ in range(REQUESTS):
            try:
                request()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                done.append(1)

    users = [threading.Thread(target=user) for _ in range(USERS)]
    for t in users:
        t.start()
    for t in users:
        t.join()


def in_tasks(
    request: Callable[[], Coroutine[Any, Any, None]],
    close: Callable[[], Coroutine[Any, Any, None]],
    errors: list[str],
    done: list[int],
) -> None:
    async def user() -> None:
        for _ in range(REQUESTS):
            try:
                await request()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                done.append(1)

    async def main() -> None:
        try:
            await asyncio.gather(*(user() for _ in range(USERS)))
        finally:
            await close()

    asyncio.run(main())


def test_four_flavors_share_one_budget(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, max_size=MAX_SIZE, timeout=60)
    engine = create_engine(sa_url(pg_dsn))
    aengine = create_async_engine(sa_url(pg_dsn, "asyncpg"))

    def with_connection() -> None:
        with poolguard.connection() as conn:
            conn.execute(WORK)

    async def with_aconnection() -> None:
        async with poolguard.aconnection() as conn:
            await conn.execute(WORK)

    def with_engine() -> None:
        with engine.connect() as conn:
            conn.execute(text(WORK))

    async def with_asyncpg() -> None:
        async with aengine.connect() as conn:
            await conn.execute(text(WORK))

    async def close_twin() -> None:
        await poolguard.get_async_pool().close()

    errors: dict[str, list[str]] = {k: [] for k in ("sync", "async", "engine", "asyncpg")}
    done: dict[str, list[int]] = {k: [] for k in errors}
    sampler = Sampler(pg_dsn, pool.settings.application_name)
    sampler.start()
    assert sampler.ready.wait(10)
    loads = [
        threading.Thread(target=in_threads, args=(with_connection, errors["sync"], done["sync"])),
        threading.Thread(
            target=in_tasks, args=(with_aconnection, close_twin, errors["async"], done["async"])
        ),
        threading.Thread(target=in_threads, args=(with_engine, errors["engine"], done["engine"])),
        threading.Thread(
            target=in_tasks, args=(with_asyncpg, aclose, errors["asyncpg"], done["asyncpg"])
        ),
    ]
    started = time.monotonic()
    for t in loads:
        t.start()
    for t in loads:
        t.join(300)
    elapsed = time.monotonic() - started
    sampler.stop.set()
    sampler.join(10)
    engine.dispose()

    assert not any(t.is_alive() for t in loads), "the load did not finish in 300 s"
    assert {k: v[:3] for k, v in errors.items() if v} == {}
    assert {k: len(v) for k, v in done.items()} == dict.fromkeys(done, USERS * REQUESTS)
    assert len(sampler.counts) >= 5, f"only {len(sampler.counts)} samples in {elapsed:.1f} s"
    assert max(sampler.counts) <= MAX_SIZE, f"sessions seen: {sampler.counts}"
    assert max(sampler.counts) >= 2  # the sampler saw the load, not an idle pool
