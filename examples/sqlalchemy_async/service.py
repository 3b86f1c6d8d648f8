"""A plain asyncio service on poolguard's shared pool, with the asyncpg or psycopg driver.

    DATABASE_URL=postgresql://app:secret@localhost/app python examples/sqlalchemy_async/service.py
    DATABASE_URL=... python examples/sqlalchemy_async/service.py --driver psycopg

Twenty concurrent "requests" share poolguard's connections (max_size 4 by default): they queue
for one instead of each opening its own.  With asyncpg, statement caches are off while the pool
is in transaction mode, so the same code runs behind PgBouncer.  The shutdown hook closes the
loop-bound pools (``poolguard.sqlalchemy.aclose()``), as a FastAPI lifespan would.
"""

from __future__ import annotations

import argparse
import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import poolguard
import poolguard.sqlalchemy


async def handle(engine: AsyncEngine, n: int) -> int:
    """One request: a short transaction in a session of its own."""
    async with AsyncSession(engine) as session, session.begin():
        result = await session.execute(text("SELECT CAST(:n AS int) * 2"), {"n": n})
        return int(result.scalar_one())


async def main(driver: str) -> None:
    poolguard.configure()  # DATABASE_URL (or POOLGUARD_DSN)
    engine = poolguard.sqlalchemy.create_async_engine(f"postgresql+{driver}://")
    try:
        answers = await asyncio.gather(*(handle(engine, n) for n in range(20)))
        print(f"{len(answers)} requests served, sum {sum(answers)}")
        print(engine.sync_engine.pool.status())
    finally:  # the shutdown hook
        await engine.dispose()
        await poolguard.sqlalchemy.aclose()
        poolguard.reset()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", choices=["asyncpg", "psycopg"], default="asyncpg")
    asyncio.run(main(parser.parse_args().driver))
