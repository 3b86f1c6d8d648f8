"""A FastAPI service on poolguard: lifespan, a connection dependency, and SQLAlchemy with asyncpg.

    pip install "poolguard[fastapi]"
    DATABASE_URL=postgresql+asyncpg://app:secret@localhost/app uvicorn app:app --workers 2

DATABASE_URL may name a driver (postgresql+asyncpg://, the usual FastAPI form): poolguard drops
it for psycopg.  Each uvicorn worker process has its own pools; poolguard's connection budget
counts the workers (uvicorn's --workers, else WEB_CONCURRENCY, which uvicorn reads and never
sets) to check workers x max_size against the server at start-up.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlalchemy
from fastapi import Depends, FastAPI
from psycopg import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import poolguard
import poolguard.sqlalchemy

engine: AsyncEngine | None = None
Session: async_sessionmaker[Any] = async_sessionmaker(expire_on_commit=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global engine
    poolguard.configure()  # DATABASE_URL; POOLGUARD_MAX_SIZE etc. from the environment
    engine = poolguard.sqlalchemy.create_async_engine("postgresql+asyncpg://")
    Session.configure(bind=engine)
    yield
    # Shutdown: the async pools belong to this event loop, so close them on it (aclose_all,
    # not close_all, which could only schedule that from inside the running loop).
    await engine.dispose()
    await poolguard.aclose_all()


app = FastAPI(lifespan=lifespan)


async def db() -> AsyncIterator[AsyncConnection[Any]]:
    """A psycopg connection for one request: committed on success, rolled back on error."""
    async with poolguard.aconnection() as conn:
        yield conn


@app.get("/psycopg/{n}")
async def with_psycopg(
    n: int, conn: Annotated[AsyncConnection[Any], Depends(db)]
) -> dict[str, int]:
    cursor = await conn.execute("SELECT %s::int * 2", (n,))
    row = await cursor.fetchone()
    return {"n": n, "double": row[0] if row else -1}


@app.get("/orm/{n}")
async def with_sqlalchemy(n: int) -> dict[str, int]:
    async with Session() as session:  # asyncpg, through poolguard's pool
        double = await session.scalar(sqlalchemy.text("SELECT CAST(:n AS int) * 2"), {"n": n})
    return {"n": n, "double": int(double)}


@app.get("/checked-out")
async def checked_out() -> dict[str, int]:
    """This worker's connections out right now (0 between requests: nothing leaks)."""
    return {"pid": os.getpid(), "checked_out": len(poolguard.report())}
