"""ENGINE "poolguard.django" in this process: settings, ORM, transactions, request boundaries."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from poolguard.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("django_databases")


def entry(**options: Any) -> dict[str, Any]:
    settings = {
        "ENGINE": "poolguard.django",
        "NAME": "app",
        "USER": "u",
        "PASSWORD": "s3cret-pw",
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "OPTIONS": options,
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "AUTOCOMMIT": True,
        "TIME_ZONE": None,
        "ATOMIC_REQUESTS": False,
        "TEST": {},
    }
    return settings


def resolved(settings: dict[str, Any], alias: str = "cfg") -> Any:
    from poolguard.django.base import DatabaseWrapper

    return DatabaseWrapper(settings, alias)._pg_resolved()


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"poolguard": {"max_size": 0}}, ["['OPTIONS']['poolguard']", "max_size"]),
        ({"poolguard": {"max_sise": 3}}, ["'max_sise'", "did you mean 'max_size'"]),
        ({"poolguard": {"mode": "statement"}}, ["mode"]),
        ({"poolguard": 4}, ["['OPTIONS']['poolguard'] must be a dict"]),
        ({"poolguard": {"name": "x"}}, ["['poolguard']['name']", "django:cfg"]),
        (
            {"pool": {"max_size": 3}, "poolguard": {"max_size": 2}},
            ["['pool']['max_size'] = 3", "['poolguard']['max_size'] = 2"],
        ),
        ({"pool": {"max_size": 2, "num_workers": 3}}, ["['pool']['num_workers']"]),
        ({"assume_role": "owner"}, ["['assume_role']", "mode'] = 'session'"]),
        ({"sslmod": "require"}, ["DATABASES['cfg']['OPTIONS']", "sslmod"]),
        ({"pool": True, "max_age": 10}, ["['pool']", "doesn't support persistent connections"]),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], names: list[str]) -> None:
    from django.core.exceptions import ImproperlyConfigured

    settings = entry(**options)
    settings["CONN_MAX_AGE"] = settings["OPTIONS"].pop("max_age", 0)
    with pytest.raises(ImproperlyConfigured) as info:
        resolved(settings)
    message = str(info.value)
    for name in names:
        assert name in message
    assert "s3cret-pw" not in message


def test_options_and_django_settings_mapped() -> None:
    r = resolved(entry(poolguard={"max_size": 3, "mode": "session"}, connect_timeout="7"))
    assert (r.settings.max_size, r.settings.mode, r.settings.connect_timeout) == (3, "session", 7)
    assert r.settings.name == "django:cfg"
    assert "s3cret-pw" not in repr(r.settings)
    # Django's own pool sizes carry over, so switching ENGINE is the whole change.
    assert resolved(entry(pool={"min_size": 0, "max_size": 2})).settings.max_size == 2
    both = entry(pool={"max_size": 2}, poolguard={"mode": "session", "max_size": 2})
    assert (resolved(both).settings.max_size, resolved(both).settings.mode) == (2, "session")
    aged = {**entry(), "CONN_MAX_AGE": 45, "CONN_HEALTH_CHECKS": True}
    assert (resolved(aged).settings.max_lifetime, resolved(aged).settings.health_check) == (
        45,
        True,
    )
    explicit = {**entry(poolguard={"max_lifetime": 600}), "CONN_MAX_AGE": 45}
    assert resolved(explicit).settings.max_lifetime == 600


def test_cursor_classes_are_djangos_and_statements_observed(
    postgres_server: PostgresServer,
) -> None:
    """cursor_factory is exactly what Django would use (identity checks hold); every statement
    through Django's cursor wrapper still reaches the connection's bookkeeping."""
    from django.db.backends.postgresql import base as pg
    from djhelpers import db_entry

    from poolguard.django.base import DatabaseWrapper

    class MyCursor(pg.Cursor):  # type: ignore[misc]
        pass

    assert resolved(entry()).cursor_class is pg.Cursor
    assert resolved(entry(server_side_binding=True)).cursor_class is pg.ServerBindingCursor
    assert resolved(entry(cursor_factory=MyCursor)).cursor_class is MyCursor

    settings = {**entry(), **db_entry(postgres_server, postgres_server.dbname, mode="session")}
    settings["OPTIONS"]["cursor_factory"] = MyCursor
    wrapper = DatabaseWrapper(settings, "cursors")
    try:
        for debug in (False, True):
            wrapper.force_debug_cursor = debug
            with wrapper.cursor() as cursor:
                assert wrapper.connection.cursor_factory is MyCursor
                cursor.execute("SELECT %s", [f"debug={debug}"])
                assert wrapper.connection.pg_last_sql == "SELECT %s"
                cursor.executemany("SELECT %s", [[1], [2]])
                assert wrapper.connection.pg_last_sql == "SELECT %s"
                cursor.execute("SELECT 2")
                assert wrapper.connection.pg_last_sql == "SELECT 2"
    finally:
        wrapper.close()
        wrapper.close_pool()


def test_server_side_cursors_follow_the_mode_and_settings_stay_as_written(
    postgres_server: PostgresServer,
) -> None:
    """Transaction mode reads through a client-side cursor outside atomic() and never writes
    DISABLE_SERVER_SIDE_CURSORS into the entry: the same alias back in session mode (and in
    atomic(), where the cursor dies with the transaction) gets server-side cursors again."""
    from djhelpers import db_entry

    from poolguard.django.base import DatabaseWrapper

    settings = {**entry(), **db_entry(postgres_server, postgres_server.dbname, max_size=1)}
    settings["OPTIONS"]["poolguard"]["mode"] = "transaction"
    written = repr(settings)

    def declared(mode: str, atomic: bool) -> list[str]:
        settings["OPTIONS"]["poolguard"]["mode"] = mode
        wrapper = DatabaseWrapper(settings, "modes")
        try:
            if atomic:
                wrapper.set_autocommit(False)
                wrapper.in_atomic_block = True
            with wrapper.chunked_cursor() as cursor:
                cursor.execute("SELECT 1")
                rows = wrapper.connection.execute("SELECT name FROM pg_cursors").fetchall()
                assert cursor.fetchall() == [(1,)]
            if atomic:
                wrapper.in_atomic_block = False
                wrapper.rollback()
                wrapper.set_autocommit(True)
            return [name for (name,) in rows]
        finally:
            wrapper.close()
            wrapper.close_pool()

    assert declared("transaction", atomic=False) == []
    assert len(declared("transaction", atomic=True)) == 1
    assert len(declared("session", atomic=False)) == 1
    assert len(declared("auto", atomic=False)) == 1  # PostgreSQL itself: session mode
    assert declared("transaction", atomic=False) == []
    settings["OPTIONS"]["poolguard"]["mode"] = "transaction"
    assert repr(settings) == written
    assert "DISABLE_SERVER_SIDE_CURSORS" not in settings


# --- the ORM through the pool --------------------------------------------------------------


def test_orm_atomic_select_for_update_and_return_to_pool() -> None:
    from django.db import connection, transaction
    from djapp.models import Item

    from poolguard.django import pool_for

    connection.close()
    pool = pool_for("default")
    item = Item.objects.create(name="orm", data={"k": [1, 2]})
    assert type(connection.connection).__name__ == "GuardedConnection"
    with transaction.atomic():
        locked = Item.objects.select_for_update().get(pk=item.pk)
        locked.value = 7
        locked.save()
        with pytest.raises(RuntimeError), transaction.atomic():  # a savepoint, rolled back
            Item.objects.filter(pk=item.pk).update(value=99)
            raise RuntimeError
    again = Item.objects.get(pk=item.pk)
    assert (again.value, again.data, again.created.tzinfo is not None) == (7, {"k": [1, 2]}, True)
    assert connection.connection.pg_last_sql.startswith("SELECT")  # statements are observed
    assert pool.stats()["db.client.connection.count"]["used"] == 1
    connection.close()
    stats = pool.stats()
    assert stats["db.client.connection.count"]["used"] == 0
    # Autocommit, cursor class and isolation level matched the pool's defaults: no reset work.
    assert stats["poolguard.connection.session_resets"] == 0
    assert stats["poolguard.connection.rollbacks_on_return"] == 0


def test_request_boundary_keeps_a_persistent_connection_only_while_nobody_needs_it() -> None:
    from django.core.signals import request_finished, request_started
    from django.db import connections
    from djapp.models import Item

    # "watched" keeps leak_threshold: a connection held between requests would read as a leak.
    for alias, kept in (("aged", True), ("stock", True), ("default", False), ("watched", False)):
        wrapper = connections[alias]
        request_started.send(sender=None)
        Item.objects.using(alias).count()
        request_finished.send(sender=None)
        assert (wrapper.connection is not None) is kept, alias
    connections["stock"].close()
    aged = connections["aged"]
    assert aged.pool.settings.max_lifetime == 60  # CONN_MAX_AGE is also the pool's max_lifetime
    kept_conn = aged.connection
    request_started.send(sender=None)
    Item.objects.using("aged").count()
    assert aged.connection is kept_conn  # the same session across the boundary
    pool = aged.pool
    others = [pool.getconn() for _ in range(pool.settings.max_size - 1)]
    try:
        request_finished.send(sender=None)  # the pool is full now: giving it back helps
        assert aged.connection is None
    finally:
        for conn in others:
            pool.putconn(conn)


def hold_line() -> int:
    from djapp import views

    text = Path(views.__file__).read_text().splitlines()
    return next(n for n, line in enumerate(text, 1) if "HOLD-LINE" in line)


@contextlib.contextmanager
def holding(alias: str) -> Iterator[None]:
    """GET /hold/?db=alias in a thread; the view holds its connection until the block ends."""
    from django.db import connections
    from django.test import Client
    from djapp import views

    views.held.clear()
    views.release.clear()
    errors: list[BaseException] = []

    def request() -> None:
        try:
            assert Client().get(f"/hold/?db={alias}").status_code == 200
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=request, name="hold-request")
    thread.start()
    try:
        assert views.held.wait(10)
        yield
    finally:
        views.release.set()
        thread.join(10)
    assert not errors


def test_checkout_site_is_the_view_line() -> None:
    from poolguard.django import pool_for

    with holding("default"):
        (record,) = pool_for("default").checkouts()
        assert record.site.endswith(f"djapp{os.sep}views.py:{hold_line()} in hold")
        assert record.owner_name() == "hold-request"
    assert pool_for("default").checkouts() == []


def test_leaking_view_is_reported_with_its_line(caplog: pytest.LogCaptureFixture) -> None:
    import poolguard

    site = f"djapp{os.sep}views.py:{hold_line()} in hold"
    with caplog.at_level("WARNING", logger="poolguard.leaks"), holding("leaky"):
        (report,) = poolguard.report("django:leaky")
        assert report.taken_at.endswith(site)
        assert report.owner.startswith("thread 'hold-request'")
        deadline = time.monotonic() + 5
        while "leak_threshold" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    (warning,) = [r for r in caplog.records if "leak_threshold" in r.getMessage()]
    assert site in warning.getMessage()
    assert "django:leaky" in warning.getMessage()


def test_checkout_site_of_an_async_orm_call_is_the_awaiting_line() -> None:
    """The ORM runs in a sync_to_async thread; the site is the coroutine's line, not the pool's."""
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections
    from djapp.models import Item

    from poolguard.django import pool_for

    async def async_view() -> list[str]:
        await Item.objects.acount()  # ASYNC-LINE: the checkout happens in a worker thread
        return [c.site for c in pool_for("default").checkouts()]

    async def main() -> list[str]:
        try:
            return await async_view()
        finally:
            await sync_to_async(connections.close_all)()  # same worker thread as acount()

    line = next(
        n
        for n, text in enumerate(Path(__file__).read_text().splitlines(), 1)
        if "ASYNC-LINE: the" in text
    )
    (site,) = asyncio.run(main())
    assert site.endswith(f"test_django_backend.py:{line} in async_view")
    assert pool_for("default").checkouts() == []


def test_thread_that_never_closes_is_reported_at_its_line() -> None:
    import gc

    from djapp.models import Item

    from poolguard import ConnectionLeakWarning
    from poolguard.django import pool_for

    def forgetful() -> None:
        Item.objects.count()  # FORGETFUL-LINE: no connection.close() before the thread ends

    line = next(
        n
        for n, text in enumerate(Path(__file__).read_text().splitlines(), 1)
        if "FORGETFUL-LINE: no" in text
    )
    pool = pool_for("default")
    with pytest.warns(ConnectionLeakWarning, match=rf"test_django_backend.py:{line} in forgetful"):
        thread = threading.Thread(target=forgetful)
        thread.start()
        thread.join(10)
        del thread
        gc.collect()
    deadline = time.monotonic() + 5  # the watchdog frees the slot on its next round
    while pool.checkouts() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.site for c in pool.checkouts()] == []


def test_fork_child_never_uses_the_parents_socket() -> None:
    import os

    from django.db import connections

    def backend_pid(alias: str) -> int:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    parents = {alias: backend_pid(alias) for alias in ("default", "stock")}
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            inherited = connections["default"].connection is None
            pids = {alias: backend_pid(alias) for alias in ("default", "stock")}
            connections["default"].close()
            os.write(write_end, f"{inherited},{pids['default']},{pids['stock']}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    inherited, default_pid, stock_pid = os.read(read_end, 200).decode().split(",")
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert inherited == "True"
    assert int(default_pid) != parents["default"]
    # The stock backend's child talked over the parent's socket (Django ticket 36957): the
    # comparison shows what the test would catch.
    assert int(stock_pid) == parents["stock"]
    connections["stock"].close()  # its protocol state is not to be trusted any more
    assert backend_pid("default") == parents["default"]  # the parent's session is intact
    connections["default"].close()


# --- transaction mode through PgBouncer ----------------------------------------------------


@pytest.fixture
def bouncer(django_databases: dict[str, Any]) -> str:
    if "bouncer" not in django_databases:
        pytest.skip("pgbouncer is not installed")
    return "bouncer"


@pytest.mark.pgbouncer
def test_transaction_mode_through_pgbouncer(bouncer: str, postgres_server: PostgresServer) -> None:
    from django.db import connections, transaction
    from djapp.models import Item

    wrapper = connections[bouncer]
    Item.objects.using(bouncer).bulk_create(Item(name=f"b{i}") for i in range(30))
    with transaction.atomic(using=bouncer):
        locked = list(Item.objects.using(bouncer).select_for_update().filter(name="b1"))
        assert len(locked) == 1
    with wrapper.cursor():
        pass
    assert not isinstance(wrapper.chunked_cursor().cursor, psycopg.ServerCursor)
    names = [i.name for i in Item.objects.using(bouncer).filter(name__startswith="b").iterator()]
    assert len(names) == 30
    assert wrapper.connection.info.port != postgres_server.port  # through PgBouncer
    wrapper.close()


@pytest.mark.pgbouncer
def test_migrate_runs_on_the_direct_dsn(bouncer: str, postgres_server: PostgresServer) -> None:
    from django.core.management import call_command
    from django.db import connections

    from poolguard.django import direct_connection

    wrapper = connections[bouncer]
    ports: list[int] = []
    with direct_connection(bouncer):
        with wrapper.cursor():
            ports.append(wrapper.connection.info.port)
        assert wrapper.pool is None
    assert ports == [postgres_server.port]
    call_command("migrate", database=bouncer, run_syncdb=True, verbosity=0)
    assert wrapper.connection is None  # migrate's direct connection is closed afterwards
    with wrapper.cursor():
        assert wrapper.connection.info.port != postgres_server.port
    wrapper.close()


# --- the server's idle-in-transaction timeout ---------------------------------------------


def test_idle_timeout_error_in_a_request_names_the_setting() -> None:
    """The server ends a transaction idle past the timeout poolguard set; the error says so."""
    from django.db import InternalError, connections
    from django.test import Client

    client = Client()
    assert "count" in client.get("/pause/?db=impatient&seconds=0.1").json()
    with pytest.raises(InternalError) as info:
        client.get("/pause/?db=impatient&seconds=2")
    message = str(info.value)
    assert "terminating connection due to idle-in-transaction timeout" in message
    assert "poolguard set idle_in_transaction_session_timeout=1 s" in message
    assert "DATABASES['impatient']['OPTIONS']['poolguard']" in message
    assert isinstance(info.value.__cause__, psycopg.errors.IdleInTransactionSessionTimeout)
    # The dead session never goes back on the shelf: the next request gets a working one.
    assert "count" in client.get("/pause/?db=impatient&seconds=0").json()
    connections["impatient"].close()


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["manage.py", "migrate"], "command"),
        (["/srv/app/manage.py", "shell"], "command"),
        (["/venv/bin/django-admin", "process_queue"], "command"),
        (["/usr/lib/python3/site-packages/django/__main__.py", "dbshell"], "command"),
        (["manage.py", "runserver", "0:8000"], "serving"),
        (["manage.py"], "serving"),
        (["/venv/bin/gunicorn", "app.wsgi"], "serving"),
        (["/venv/bin/uvicorn", "migrate"], "serving"),
    ],
)
def test_process_kind_from_the_command_line(argv: list[str], kind: str) -> None:
    from poolguard.django._process import process_kind

    assert process_kind(argv) == kind


def test_process_kind_in_djangos_test_environment() -> None:
    from django.test.utils import setup_test_environment, teardown_test_environment

    from poolguard.django._process import process_kind

    assert process_kind(["/venv/bin/gunicorn", "app.wsgi"]) == "serving"
    setup_test_environment()
    try:
        assert process_kind(["/venv/bin/gunicorn", "app.wsgi"]) == "tests"
        settings = resolved(entry(poolguard={"leak_threshold": 5})).settings
        assert settings.leak_threshold == 0
        assert settings.idle_in_transaction_threshold == 0
        assert settings.idle_in_transaction_session_timeout == 0
    finally:
        teardown_test_environment()
    assert process_kind(["/venv/bin/gunicorn", "app.wsgi"]) == "serving"
