"""examples/django_app under real gunicorn (WSGI, preload) and uvicorn (ASGI), 2 workers each:
100 concurrent clients on sync or async views and a locking one, 0 errors, the stock exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from exhelpers import EXAMPLES, example_env, hammer, serve

from poolguard.testing import PostgresServer

pytest.importorskip("django")
pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn")

HERE = EXAMPLES / "django_app"
SERVERS = {
    "wsgi": ["gunicorn", "shop.wsgi", "--bind", "127.0.0.1:{port}"],
    "asgi": ["uvicorn", "shop.asgi:application", "--host", "127.0.0.1", "--port", "{port}"],
}


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=HERE, env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def shop(small_db: str) -> dict[str, str]:
    """The example's environment, its tables migrated and one product with 1000 in stock."""
    env = example_env(small_db, WEB_CONCURRENCY="2", PYTHONFAULTHANDLER="1")
    manage(env, "migrate", "--verbosity", "0")
    seed = "from shop.models import Product; Product.objects.create(name='apple', stock=1000)"
    manage(env, "shell", "-c", seed)
    return env


def drive(kind: str, views: list[str], env: dict[str, str], server: PostgresServer, db: str,
          log: Path) -> None:  # fmt: skip
    with serve(SERVERS[kind], HERE, env, log, "/") as app:
        load = hammer(app.url, views, 100, server, db)
        print(f"django {kind}: {load}")
        assert (load.ok, load.errors) == (200, []), kind
        assert load.peak_sessions <= 8, (kind, load.peak_sessions)  # 2 workers x max_size 4
    assert "Traceback" not in app.output(), app.output()[-3000:]
    with server.connect(db) as conn:
        # Every /buy/ decremented under select_for_update, none lost: 100 clients.
        assert conn.execute("SELECT stock FROM shop_product").fetchone() == (900,)


def test_django_example_under_gunicorn(
    small_server: PostgresServer, small_db: str, shop: dict[str, str], tmp_path: Path
) -> None:
    db = small_db.rsplit("/", 1)[1]
    drive("wsgi", ["/", "/buy/1/"], shop, small_server, db, tmp_path / "gunicorn.log")


def test_django_example_under_uvicorn(
    small_server: PostgresServer, small_db: str, shop: dict[str, str], tmp_path: Path
) -> None:
    db = small_db.rsplit("/", 1)[1]
    drive("asgi", ["/async/", "/buy/1/"], shop, small_server, db, tmp_path / "uvicorn.log")
