"""poolguard.sqlalchemy engines against a real PostgreSQL: ORM and Core, sync and async.

Every engine here takes its connections from poolguard's pool, so the tests look at that pool
(ledger, stats, backend pids) to see that SQLAlchemy keeps nothing of its own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy
from sa_helpers import Base, Note, line_of_caller, sa_url
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import poolguard
import poolguard.sqlalchemy
from poolguard import ConfigurationError, PoolExhausted
from poolguard.sqlalchemy import SharedPool, create_async_engine, create_engine, direct_url
from poolguard.testing import PostgresServer

ASYNC_DRIVERS = ["psycopg", "asyncpg"]


def backend_pid(engine: sqlalchemy.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


# --- workloads -----------------------------------------------------------------------------------


def test_orm_session_and_core_sync(pg_dsn: str) -> None:
    engine = create_engine(sa_url(pg_dsn))
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all([Note(text=f"note {i}") for i in range(10)])
    with Session(engine) as session:
        notes = session.scalars(select(Note).where(Note.id <= 3).order_by(Note.id)).all()
        assert [n.text for n in notes] == ["note 0", "note 1", "note 2"]
        notes[0].text = "changed"
        session.commit()
    with engine.begin() as conn:
        conn.execute(Note.__table__.delete().where(Note.id > 5))
    with engine.connect() as conn:
        rows = conn.execute(select(Note.text).order_by(Note.id)).scalars().all()
    assert rows == ["changed", "note 1", "note 2", "note 3", "note 4"]
    stats = poolguard.stats()
    assert stats["db.client.connection.count"]["used"] == 0
    assert stats["db.client.connection.wait_time"]["count"] >= 5  # every checkout was poolguard's
    assert isinstance(engine.pool, SharedPool)


def test_failed_session_rolls_back_and_the_connection_is_clean(pg_dsn: str) -> None:
    engine = create_engine(sa_url(pg_dsn))
    Base.metadata.create_all(engine)
    with pytest.raises(sqlalchemy.exc.IntegrityError), Session(engine) as session:
        session.add_all([Note(id=1, text="a"), Note(id=1, text="b")])
        session.commit()
    with poolguard.connection() as conn:  # the same pool, so possibly the same connection
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (0,)


async def _async_workload(pg_dsn: str, driver: str) -> list[str]:
    engine = create_async_engine(sa_url(pg_dsn, driver))
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as session, session.begin():
        session.add_all([Note(text=f"n{i}") for i in range(5)])

    async def reader(i: int) -> str:
        async with AsyncSession(engine) as session:
            note = await session.get(Note, i + 1)
            assert note is not None
            return note.text

    texts = await asyncio.gather(*(reader(i) for i in range(5)))
    async with engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM notes"))).scalar_one()
    assert count == 5
    await engine.dispose()
    await poolguard.sqlalchemy.aclose()
    return list(texts)


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_orm_session_and_core_async(pg_dsn: str, driver: str) -> None:
    poolguard.configure(pg_dsn, max_size=3)
    assert asyncio.run(_async_workload(pg_dsn, driver)) == [f"n{i}" for i in range(5)]


def test_async_engine_uses_poolguards_async_pool(pg_dsn: str) -> None:
    async def body() -> None:
        engine = create_async_engine(sa_url(pg_dsn))
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            assert len(poolguard.get_async_pool().checkouts()) == 1
        assert len(poolguard.get_async_pool().checkouts()) == 0
        await poolguard.sqlalchemy.aclose()

    asyncio.run(body())


# --- one budget ----------------------------------------------------------------------------------


def test_two_engines_for_the_same_url_share_one_pool(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn, max_size=2, timeout=0.5)
    first, second = create_engine(sa_url(pg_dsn)), create_engine(sa_url(pg_dsn))
    assert first.pool.source.pool is second.pool.source.pool is poolguard.get_pool()
    with first.connect() as a, second.connect() as b:
        pids = {
            a.execute(text("SELECT pg_backend_pid()")).scalar_one(),
            b.execute(text("SELECT pg_backend_pid()")).scalar_one(),
        }
        assert len(pids) == 2
        with pytest.raises(PoolExhausted, match=r"2/2 connections in use.*test_sa_engine\.py"):
            poolguard.get_pool().getconn()  # raw psycopg code counts against the same budget
        with pytest.raises(sqlalchemy.exc.OperationalError) as info:
            first.connect()  # SQLAlchemy wraps the DBAPI-level error, as for any driver error
        assert isinstance(info.value.orig, PoolExhausted)
    assert {backend_pid(first), backend_pid(second)} <= pids  # no connection of their own


def test_engine_for_another_database_under_the_same_name_is_refused(
    pg_dsn: str, postgres_server: PostgresServer
) -> None:
    create_engine(sa_url(pg_dsn))
    other = sa_url(postgres_server.dsn)
    with pytest.raises(ConfigurationError, match=r"pool 'default' is configured for") as info:
        create_engine(other)
    assert postgres_server.password not in str(info.value)
    assert create_engine(other, name="other").pool.source.pool is poolguard.get_pool("other")


def test_url_none_uses_the_configured_pool_and_hides_the_password(pg_dsn: str) -> None:
    pool = poolguard.configure(pg_dsn, max_size=5)
    engine = create_engine()
    assert engine.pool.source.pool is pool
    assert engine.url.password is None
    password = str(sa_url(pg_dsn).password)
    assert password not in repr(engine) and password not in engine.pool.status()
    assert backend_pid(engine) > 0


def test_dispose_keeps_poolguards_connections(pg_dsn: str) -> None:
    """engine.dispose() forgets the engine's per-connection state and closes nothing shared."""
    poolguard.configure(pg_dsn, max_size=1)
    engine, other = create_engine(sa_url(pg_dsn)), create_engine(sa_url(pg_dsn))
    pid = backend_pid(engine)
    old_pool = engine.pool
    engine.dispose()
    assert engine.pool is not old_pool and isinstance(engine.pool, SharedPool)
    assert backend_pid(engine) == pid  # the same server connection, still open
    assert backend_pid(other) == pid
    engine.dispose(close=False)
    assert backend_pid(engine) == pid
    assert poolguard.stats()["db.client.connection.count"] == {"idle": 1, "used": 0}


def test_forked_child_gets_its_own_connections_and_leaves_the_parents_alone(
    pg_dsn: str,
) -> None:
    poolguard.configure(pg_dsn, max_size=1)  # one connection: the parent's, before and after
    engine = create_engine(sa_url(pg_dsn))
    parent_pid = backend_pid(engine)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read)
            os.write(write, str(backend_pid(engine)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reported and int(reported) != parent_pid
    assert backend_pid(engine) == parent_pid  # the child neither used nor closed it


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value", "setting"),
    [
        ("pool_size", 20, "max_size"),
        ("max_overflow", 10, "max_size"),
        ("pool_timeout", 5, "timeout"),
        ("pool_recycle", 3600, "max_lifetime"),
        ("poolclass", sqlalchemy.pool.QueuePool, None),
        ("pool_use_lifo", True, None),
        ("creator", lambda: None, None),
        ("connect_args", {"connect_timeout": 3}, "connect_timeout"),
        ("json_serializer", repr, None),
    ],
)
def test_pool_arguments_are_refused_with_the_setting_to_use(
    argument: str, value: Any, setting: str | None
) -> None:
    url = "postgresql+psycopg://app:s3cret-pw@127.0.0.1:1/app"
    with pytest.raises(ConfigurationError, match=rf"^{argument}=") as info:
        create_engine(url, **{argument: value})
    message = str(info.value)
    assert "s3cret-pw" not in message
    if setting:
        assert setting in message


@pytest.mark.parametrize("url", ["postgresql+psycopg2://u@h/d", "sqlite://", "mysql://u@h/d"])
def test_drivers_poolguard_cannot_pool_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"postgresql\+psycopg://"):
        create_engine(url)


def test_prepared_statements_is_for_asyncpg_only() -> None:
    with pytest.raises(ConfigurationError, match="prepare_threshold"):
        create_async_engine("postgresql+psycopg://u@127.0.0.1:1/d", prepared_statements=True)


def test_engine_isolation_level_applies_on_every_checkout_and_stays_in_the_engine(
    pg_dsn: str,
) -> None:
    poolguard.configure(pg_dsn, max_size=1)
    engine = create_engine(sa_url(pg_dsn), isolation_level="REPEATABLE READ")
    show = text("SHOW transaction_isolation")
    for _ in range(3):  # the same server connection each time
        with engine.connect() as conn:
            assert conn.execute(show).scalar_one() == "repeatable read"
    with poolguard.connection() as conn:
        assert conn.execute("SHOW transaction_isolation").fetchone() == ("read committed",)


def test_no_server_side_prepared_statements(pg_dsn: str) -> None:
    engine = create_engine(sa_url(pg_dsn))
    with engine.connect() as conn:
        for _ in range(10):
            conn.execute(text("SELECT 1 + :x"), {"x": 1})
        assert conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar() == 0


def test_pre_ping_replaces_a_dead_connection(pg_dsn: str, postgres_server: PostgresServer) -> None:
    poolguard.configure(pg_dsn, max_size=1, min_size=1)
    engine = create_engine(sa_url(pg_dsn), pool_pre_ping=True)
    dead = backend_pid(engine)
    with postgres_server.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (dead,))
    time.sleep(0.2)
    assert backend_pid(engine) != dead  # no error: the ping found it and poolguard replaced it
    assert backend_pid(engine) > 0


def test_direct_url_for_migrations(pg_dsn: str) -> None:
    poolguard.configure(pg_dsn)
    assert direct_url().database == sa_url(pg_dsn).database  # probed: the DSN is direct
    poolguard.reset()
    poolguard.configure(pg_dsn, direct_dsn=pg_dsn)
    migrate = sqlalchemy.create_engine(direct_url(), poolclass=sqlalchemy.pool.NullPool)
    with migrate.connect() as conn:
        assert (
            conn.execute(text("SELECT current_database()")).scalar_one() == sa_url(pg_dsn).database
        )
    migrate.dispose()


# --- where a connection was taken ----------------------------------------------------------------


def test_checkout_site_of_an_open_session_is_the_apps_line(pg_dsn: str) -> None:
    engine = create_engine(sa_url(pg_dsn))
    session = Session(engine)
    line = line_of_caller()
    session.execute(text("SELECT 1"))
    with engine.connect() as conn:
        inner = line_of_caller()
        conn.execute(text("SELECT 1"))
        sites = [c.site for c in poolguard.get_pool().checkouts()]
    session.close()
    here = "test_checkout_site_of_an_open_session_is_the_apps_line"
    assert sites[0].endswith(f"test_sa_engine.py:{line} in {here}"), sites
    assert sites[1].endswith(f"test_sa_engine.py:{inner - 2} in {here}"), sites


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_checkout_site_of_an_open_async_session_is_the_apps_line(pg_dsn: str, driver: str) -> None:
    async def body() -> tuple[int, str]:
        engine = create_async_engine(sa_url(pg_dsn, driver))
        session = AsyncSession(engine)
        line = line_of_caller()
        await session.execute(text("SELECT 1"))
        sites = [c.site for c in engine.sync_engine.pool.source.pool.checkouts()]
        await session.close()
        await engine.dispose()
        await poolguard.sqlalchemy.aclose()
        return line, sites[0]

    line, site = asyncio.run(body())
    assert site.endswith(f"test_sa_engine.py:{line} in body"), site


def test_session_idle_in_transaction_is_reported_with_the_apps_line(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    poolguard.configure(pg_dsn, idle_in_transaction_threshold=0.2, watchdog_interval=0.05)
    engine = create_engine(sa_url(pg_dsn))
    session = Session(engine)
    line = line_of_caller()
    session.execute(text("SELECT 1"))
    with caplog.at_level(logging.WARNING, logger="poolguard.leaks"):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not caplog.records:
            time.sleep(0.05)
    session.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "poolguard.leaks"]
    assert messages, "the watchdog did not report the idle transaction"
    assert "idle in a transaction" in messages[0]
    assert f"test_sa_engine.py:{line} in " in messages[0]


def test_disconnect_without_pre_ping_fails_once_then_the_engine_recovers(
    pg_dsn: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    poolguard.configure(pg_dsn, max_size=1, min_size=1)
    engine = create_engine(sa_url(pg_dsn))
    dead = backend_pid(engine)
    with postgres_server.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (dead,))
    time.sleep(0.2)
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        with pytest.raises(sqlalchemy.exc.OperationalError) as info:
            backend_pid(engine)
        assert info.value.connection_invalidated
        assert backend_pid(engine) not in (dead, 0)
    assert poolguard.stats()["poolguard.connection.discarded_on_return"] == 1
    assert any("closed or broken" in r.getMessage() for r in caplog.records)


def test_connection_dropped_without_close_goes_back_to_poolguard(pg_dsn: str) -> None:
    engine = create_engine(sa_url(pg_dsn))
    conn = engine.connect()
    conn.execute(text("SELECT 1"))
    assert len(poolguard.get_pool().checkouts()) == 1
    del conn
    gc.collect()
    assert poolguard.get_pool().checkouts() == []
    assert backend_pid(engine) > 0
