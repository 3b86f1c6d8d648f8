"""Many asyncio clients on a small pool: poolguard.aconnection() vs psycopg_pool's async pool.

Run on demand:  python benchmarks/bench_async.py [--rounds 5] [--ops 10000]
``--ops`` tasks start at once and each runs ``SELECT 1`` on a connection of a 16-connection
pool; a round's throughput is tasks per second.  Both pools use the same server (DATABASE_URL,
else a private one from poolguard.testing) in the same run, interleaved round by round; the best
round of each is compared.  Target (issue 10): 0 errors, poolguard >= 0.95x psycopg_pool.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg_pool
from _common import database, parse_args

import poolguard

SIZE = 16
TARGET = 0.95


async def round_of(
    take: Callable[[], AbstractAsyncContextManager[Any]], tasks: int
) -> tuple[float, int]:
    """(tasks per second, errors) for ``tasks`` clients started at once."""

    async def client() -> None:
        async with take() as conn:
            await conn.execute("SELECT 1")

    started = time.perf_counter()
    results = await asyncio.gather(*(client() for _ in range(tasks)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    return tasks / elapsed, sum(isinstance(r, BaseException) for r in results)


async def run(dsn: str, rounds: int, tasks: int) -> tuple[float, float, int]:
    raw: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        dsn,
        min_size=SIZE,
        max_size=SIZE,
        timeout=120,
        kwargs={"prepare_threshold": None},
        open=False,
    )
    await raw.open(wait=True)
    poolguard.configure(dsn, name="bench", min_size=SIZE, max_size=SIZE, timeout=120)
    guarded = poolguard.get_async_pool("bench")
    await guarded.open()
    raw_best = guarded_best = 0.0
    errors = 0
    try:
        for _ in range(rounds):
            rate, failed = await round_of(raw.connection, tasks)
            raw_best, errors = max(raw_best, rate), errors + failed
            rate, failed = await round_of(lambda: poolguard.aconnection("bench"), tasks)
            guarded_best, errors = max(guarded_best, rate), errors + failed
    finally:
        await raw.close()
        await guarded.close()
    return raw_best, guarded_best, errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=10000, argv=argv)
    dsn, server = database()
    try:
        raw_best, guarded_best, errors = asyncio.run(run(dsn, args.rounds, args.ops))
    finally:
        poolguard.reset()
        if server:
            server.stop()
    ratio = guarded_best / raw_best
    print(
        f"{args.ops} asyncio clients, {SIZE} connections: psycopg_pool {raw_best:8.0f} /s   "
        f"poolguard {guarded_best:8.0f} /s   ratio {ratio:.3f}   errors {errors}"
    )
    ok = ratio >= TARGET and errors == 0
    print(
        f"throughput ratio {ratio:.3f} (target >= {TARGET}, 0 errors): {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
