"""Checkout + SELECT 1 through poolguard.sqlalchemy's engine vs a default QueuePool engine.

Run on demand:  python benchmarks/bench_sqlalchemy.py [--rounds 7] [--ops 3000]
Both engines use the psycopg driver against the same server (DATABASE_URL, else a private one
from poolguard.testing) in the same run, interleaved round by round; the best round of each is
compared.  Cases: checkout and return alone (the pools' own cost), Core
(``with engine.connect()``) and ORM (``with Session(engine)``) running SELECT 1, and the Core
case on an AsyncEngine over psycopg.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import sqlalchemy
from _common import database, parse_args, per_op
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine
from sqlalchemy.orm import Session

import poolguard
import poolguard.sqlalchemy

SELECT_1 = text("SELECT 1")


def sa_url(dsn: str) -> URL:
    p = conninfo_to_dict(dsn)
    return URL.create(
        "postgresql+psycopg",
        username=str(p.get("user", "")) or None,
        password=str(p["password"]) if p.get("password") else None,
        host=str(p.get("host", "")) or None,
        port=int(p["port"]) if p.get("port") else None,
        database=str(p.get("dbname", "")) or None,
    )


def per_op_async(fn: Callable[[], Awaitable[None]], ops: int) -> Callable[[], float]:
    async def run() -> float:
        started = time.perf_counter()
        for _ in range(ops):
            await fn()
        return (time.perf_counter() - started) / ops

    return lambda: asyncio.get_event_loop().run_until_complete(run())


def checkout(engine: sqlalchemy.Engine) -> Callable[[], None]:
    def op() -> None:
        with engine.connect():
            pass

    return op


def core(engine: sqlalchemy.Engine) -> Callable[[], None]:
    def op() -> None:
        with engine.connect() as conn:
            conn.execute(SELECT_1).scalar()

    return op


def orm(engine: sqlalchemy.Engine) -> Callable[[], None]:
    def op() -> None:
        with Session(engine) as session:
            session.execute(SELECT_1).scalar()

    return op


def async_core(engine: AsyncEngine) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        async with engine.connect() as conn:
            (await conn.execute(SELECT_1)).scalar()

    return op


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=3000, argv=argv)

    dsn, server = database()
    url = sa_url(dsn)
    # One caller at a time: QueuePool opens one connection and reuses it; poolguard's pool
    # (FIFO) would rotate over min_size server processes, so keep it at one as well.
    poolguard.configure(dsn, min_size=1, max_size=4)
    ours = poolguard.sqlalchemy.create_engine()
    theirs = sqlalchemy.create_engine(url, pool_size=4, max_overflow=0)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    ours_async = poolguard.sqlalchemy.create_async_engine()
    theirs_async = sa_create_async_engine(url, pool_size=4, max_overflow=0)

    ops = args.ops
    cases: list[tuple[str, Callable[[], float], Callable[[], float]]] = [
        (
            "checkout+return only",
            lambda: per_op(checkout(theirs), ops * 5),
            lambda: per_op(checkout(ours), ops * 5),
        ),
        (
            "Core connect+SELECT 1",
            lambda: per_op(core(theirs), ops),
            lambda: per_op(core(ours), ops),
        ),
        ("ORM Session+SELECT 1", lambda: per_op(orm(theirs), ops), lambda: per_op(orm(ours), ops)),
        (
            "async Core+SELECT 1",
            per_op_async(async_core(theirs_async), ops),
            per_op_async(async_core(ours_async), ops),
        ),
    ]
    try:
        for _, theirs_fn, ours_fn in cases:  # warm up: connections, dialect initialize, caches
            theirs_fn()
            ours_fn()
        for label, theirs_fn, ours_fn in cases:
            theirs_best = ours_best = float("inf")
            for _ in range(args.rounds):
                theirs_best = min(theirs_best, theirs_fn())
                ours_best = min(ours_best, ours_fn())
            print(
                f"{label:22s} QueuePool {theirs_best * 1e6:7.1f} us/op   "
                f"poolguard {ours_best * 1e6:7.1f} us/op   ratio {ours_best / theirs_best:.3f}"
            )
    finally:
        loop.run_until_complete(theirs_async.dispose())
        loop.run_until_complete(ours_async.dispose())
        loop.run_until_complete(poolguard.sqlalchemy.aclose())
        loop.close()
        theirs.dispose()
        poolguard.reset()
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
