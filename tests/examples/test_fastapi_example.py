"""examples/fastapi_app under real uvicorn (2 workers): 200 concurrent clients, 0 errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from exhelpers import EXAMPLES, example_env, hammer, serve

from poolguard.testing import PostgresServer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_fastapi_example_serves_200_concurrent_clients(
    small_server: PostgresServer, small_db: str, tmp_path: Path
) -> None:
    db = small_db.rsplit("/", 1)[1]
    env = example_env(
        small_db.replace("postgresql://", "postgresql+asyncpg://"),  # the usual FastAPI form
        WEB_CONCURRENCY="2",  # uvicorn reads it for --workers; poolguard for its budget
        POOLGUARD_MAX_SIZE="3",
    )
    argv = ["uvicorn", "app:app", "--host", "127.0.0.1", "--port", "{port}"]
    with serve(argv, EXAMPLES / "fastapi_app", env, tmp_path / "uvicorn.log", "/psycopg/1") as app:
        load = hammer(app.url, ["/psycopg/{i}", "/orm/{i}"], 200, small_server, db)
        print(f"fastapi: {load}")
        assert (load.ok, load.errors) == (400, [])
        # 2 workers x max_size 3: psycopg's asyncio side and asyncpg share one budget per name.
        assert load.peak_sessions <= 6, load.peak_sessions
        for _ in range(4):
            assert '"checked_out":0' in __import__("httpx").get(app.url + "/checked-out").text
    assert "Traceback" not in app.output(), app.output()[-3000:]
    assert app.output().count("Application shutdown complete.") == 2  # the lifespan exit ran
