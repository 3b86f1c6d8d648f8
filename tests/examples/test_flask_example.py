"""examples/flask_app under real gunicorn (preload, 2 gthread workers): 200 clients, 0 errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from exhelpers import EXAMPLES, example_env, hammer, serve

from poolguard.testing import PostgresServer

pytest.importorskip("flask")
pytest.importorskip("gunicorn")


def test_flask_example_under_gunicorn_serves_200_concurrent_clients(
    small_server: PostgresServer, small_db: str, tmp_path: Path
) -> None:
    db = small_db.rsplit("/", 1)[1]
    env = example_env(small_db, WEB_CONCURRENCY="2", POOLGUARD_MAX_SIZE="4")
    here = EXAMPLES / "flask_app"
    init = subprocess.run(
        ["flask", "--app", "app", "init-db"], cwd=here, env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert init.returncode == 0 and "visits table ready" in init.stdout, init.stderr
    argv = ["gunicorn", "app:app", "--bind", "127.0.0.1:{port}"]
    with serve(argv, here, env, tmp_path / "gunicorn.log", "/double/1") as app:
        load = hammer(app.url, ["/double/{i}", "POST /visit/{i}"], 200, small_server, db)
        print(f"flask: {load}")
        assert (load.ok, load.errors) == (400, [])
        assert load.peak_sessions <= 8, load.peak_sessions  # 2 workers x max_size 4
    with small_server.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT n) FROM visits").fetchone() == (
            200,
            200,
        )
    assert "Traceback" not in app.output(), app.output()[-3000:]
