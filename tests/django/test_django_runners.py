"""Django's test runner and pytest-django, each in its own process, on the poolguard backend."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from djhelpers import db_entry

from poolguard.testing import PostgresServer

pytestmark = pytest.mark.slow

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_django_test_runner(run_django: Run, postgres_server: PostgresServer) -> None:
    """Test database, TestCase, TransactionTestCase, LiveServerTestCase's server thread."""
    dbs = {"default": db_entry(postgres_server, "djrunner", max_size=3)}
    result = run_django(["-m", "django", "test", "djapp.dj_tests", "-v", "2", "--noinput"], dbs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Ran 4 tests" in output
    assert "Creating test database for alias 'default'" in output


def test_pytest_django(run_django: Run, postgres_server: PostgresServer, tmp_path: Path) -> None:
    """django_db, transactional_db and live_server fixtures; the test database is dropped."""
    ini = tmp_path / "pytest.ini"
    ini.write_text(
        "[pytest]\nDJANGO_SETTINGS_MODULE = djapp.settings\npython_files = pt_checks.py\n"
        "filterwarnings = error\naddopts = -p no:cacheprovider\n"
    )
    dbs = {"default": db_entry(postgres_server, "djpytest", max_size=3)}
    result = run_django(["-m", "pytest", "-c", str(ini), "djapp/pt_checks.py", "-q"], dbs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "3 passed" in output
    with postgres_server.connect() as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'test_dj%'")
        assert left.fetchall() == []


def test_manage_py_poolguard(run_django: Run, postgres_server: PostgresServer) -> None:
    dbs = {
        "default": db_entry(postgres_server, postgres_server.dbname, max_size=3),
        "plain": db_entry(postgres_server, postgres_server.dbname, "django.db.backends.postgresql"),
    }
    outputs = {}
    for action in ("status", "report", "doctor"):
        result = run_django(["-m", "django", "poolguard", action], dbs)
        outputs[action] = result.stdout + result.stderr
        assert result.returncode == 0, outputs[action][-3000:]
        assert postgres_server.password not in outputs[action]
    assert "default: pool 'django:default'" in outputs["status"]
    assert "max_size=3" in outputs["status"]
    assert "plain" not in outputs["status"]  # the stock alias is not poolguard's
    assert "no connection is checked out" in outputs["report"]
    assert "Connection budget" in outputs["doctor"]
    refused = run_django(["-m", "django", "poolguard", "--database", "plain"], dbs)
    assert refused.returncode == 1
    assert "does not use poolguard.django" in refused.stderr


def test_example_project(postgres_server: PostgresServer) -> None:
    """examples/django_app: migrate, a sync and an async view, the poolguard command."""
    import os
    import sys

    example = Path(__file__).resolve().parents[2] / "examples" / "django_app"
    postgres_server.create_database("example_shop")
    env = {
        **os.environ,
        "DATABASE_URL": postgres_server.url.rsplit("/", 1)[0] + "/example_shop",
        "DJANGO_SETTINGS_MODULE": "shop.settings",
    }
    script = (
        "import django; django.setup()\n"
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0)\n"
        "from shop.models import Product\n"
        "Product.objects.create(name='apple', stock=3)\n"
        "from django.test import Client, AsyncClient\n"
        "import asyncio\n"
        "assert Client().get('/buy/1/').json() == {'name': 'apple', 'stock': 2}\n"
        "r = asyncio.run(AsyncClient().get('/async/'))\n"
        "assert r.json() == {'products': ['apple']}, r.content\n"
        "call_command('poolguard', 'status')\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=example, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert "pool 'django:default'" in output
    finally:
        postgres_server.drop_database("example_shop")


SLOW_MIGRATION = """\
import time

from django.db import migrations


def pause(apps, schema_editor):
    schema_editor.execute("SELECT 1")  # the migration's transaction is open from here
    time.sleep(2.5)  # a data step waiting on something else, longer than the timeout
    schema_editor.execute("SELECT 2")


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [migrations.RunPython(pause, migrations.RunPython.noop)]
"""


def test_migrate_outlasts_the_server_idle_timeout(
    run_django: Run, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """idle_in_transaction_session_timeout (1 s here) protects request serving, not migrate:
    a migration idle in its transaction for 2.5 s completes.  The same entry in a request
    handler gets the server's error (test_django_backend)."""
    import os

    app = tmp_path / "slowmig"
    (app / "migrations").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    (app / "migrations" / "0001_pause.py").write_text(SLOW_MIGRATION)
    (tmp_path / "slowmig_settings.py").write_text(
        "from djapp.settings import *  # noqa: F403\n"
        "INSTALLED_APPS = [*INSTALLED_APPS, 'slowmig']  # noqa: F405\n"
    )
    postgres_server.create_database("djslowmig")
    dbs = {
        "default": db_entry(
            postgres_server, "djslowmig", mode="session", idle_in_transaction_session_timeout=1
        )
    }
    path = os.pathsep.join([str(tmp_path), str(Path(__file__).parent)])
    try:
        result = run_django(
            ["-m", "django", "migrate", "slowmig", "-v", "1"],
            dbs,
            DJANGO_SETTINGS_MODULE="slowmig_settings",
            PYTHONPATH=path,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert "Applying slowmig.0001_pause... OK" in output
    finally:
        postgres_server.drop_database("djslowmig")


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_app"

SLOW_TESTCASE = """\
import time

from django.test import TestCase
from shop.models import Product


class SlowTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        Product.objects.create(name="pear", stock=1)

    def test_slow(self):
        # TestCase's transaction sits idle past the 5 s idle warning and the example's 5 s
        # leak_threshold: by design in a test, so nothing is reported.
        time.sleep(6.5)
        self.assertEqual(Product.objects.count(), 1)
"""

LEAKING_TEST = """\
import threading

import pytest
from shop.models import Product

stop = threading.Event()


@pytest.mark.poolguard_no_leaks
@pytest.mark.django_db
def test_clean():
    assert Product.objects.count() == 0


@pytest.mark.poolguard_no_leaks
@pytest.mark.django_db(transaction=True)
def test_leaks():
    started = threading.Event()

    def worker():
        Product.objects.count()  # this thread's connection, never closed
        started.set()
        stop.wait(30)

    threading.Thread(target=worker, daemon=True).start()
    assert started.wait(10)


def test_release():
    stop.set()
"""


def example_env(server: PostgresServer, database: str, extra_path: Path) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "DATABASE_URL": server.url.rsplit("/", 1)[0] + "/" + database,
        "DJANGO_SETTINGS_MODULE": "shop.settings",
        "PYTHONPATH": os.pathsep.join([str(extra_path), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "default",  # poolguard's ResourceWarnings would show
    }


def test_example_test_run_is_quiet(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """`manage.py test` with a slow TestCase: the runner's connections and TestCase's
    transaction raise no leak or idle warning."""
    import sys

    (tmp_path / "slow_shop_tests.py").write_text(SLOW_TESTCASE)
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "slow_shop_tests", "-v", "1", "--noinput"],
        cwd=EXAMPLE, env=example_env(postgres_server, "quiet_shop", tmp_path),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Ran 1 test" in output
    # poolguard's reports start with the pool's name; its ResourceWarnings name the package.
    for mark in ("pool 'django:default'", "poolguard", "idle in transaction"):
        assert mark not in output, output[-3000:]


def test_example_leak_fails_under_the_marker(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Quiet is not blind: a test that leaks a connection fails under poolguard_no_leaks."""
    import sys

    (tmp_path / "leak_checks.py").write_text(LEAKING_TEST)
    ini = tmp_path / "pytest.ini"
    ini.write_text(
        "[pytest]\nDJANGO_SETTINGS_MODULE = shop.settings\npython_files = leak_checks.py\n"
        "addopts = -p no:cacheprovider\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(EXAMPLE),
         str(tmp_path / "leak_checks.py"), "-q"],
        cwd=EXAMPLE, env=example_env(postgres_server, "leaky_shop", tmp_path),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "1 failed, 2 passed" in output, output[-3000:]
    assert "test_leaks - Failed: test left 1 poolguard connection(s) checked out" in output or (
        "test left 1 poolguard connection(s) checked out" in output and "FAILED" in output
    ), output[-3000:]
    assert "leak_checks.py" in output
