"""Several users and databases behind one rewriter (a pool per pair), its userlist and auth
passthrough, and the admin console's SHOW output, against a private PostgreSQL cluster with
two roles and two databases."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from frozen import frozen
from psycopg.conninfo import make_conninfo
from rawpg import LoginRefused, RawClient

from polling import wait_for
from poolguard import rewriter
from poolguard.rewriter import RewriterHandle
from poolguard.testing import PostgresServer

PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}


@dataclass
class Cluster:
    server: PostgresServer
    userlist: Path  # alice with her plain password, bob with his SCRAM secret; carol absent


@pytest.fixture(scope="module")
def cluster(
    postgres_factory: Callable[..., PostgresServer], tmp_path_factory: pytest.TempPathFactory
) -> Cluster:
    server = postgres_factory()
    with server.connect(autocommit=True) as admin:
        for role, password in PASSWORDS.items():
            admin.execute(f"create role {role} login password '{password}'")
        admin.execute("create database shop_a owner alice")
        admin.execute("create database shop_b owner bob")
        row = admin.execute("select rolpassword from pg_authid where rolname = 'bob'").fetchone()
        assert row is not None and row[0].startswith("SCRAM-SHA-256$")
        bob_secret = row[0]
    userlist = tmp_path_factory.mktemp("userlist") / "userlist.txt"
    userlist.write_text(
        '; users of the rewriter\n"alice" "'
        + PASSWORDS["alice"]
        + '"\n"bob" "'
        + bob_secret
        + '"\n'
    )
    return Cluster(server, userlist)


@pytest.fixture
def start_rewriter(
    cluster: Cluster, make_rewriter: Callable[..., RewriterHandle]
) -> Callable[..., RewriterHandle]:
    """Rewriters in front of the two-role cluster, stopped at teardown."""
    return functools.partial(make_rewriter, cluster.server.dsn)


def dsn(handle: RewriterHandle, user: str, dbname: str, password: str | None = None) -> str:
    return make_conninfo(
        host=handle.host,
        port=handle.port,
        user=user,
        dbname=dbname,
        password=password or PASSWORDS[user],
        connect_timeout=10,
    )


def refused(conninfo: str) -> dict[str, str]:
    """The ErrorResponse fields a login gets (psycopg keeps no SQLSTATE for login errors)."""
    with pytest.raises(LoginRefused) as caught:
        RawClient(conninfo).close()
    return caught.value.fields


def test_pairs_are_served_concurrently_each_as_its_own_user_and_database(
    cluster: Cluster, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    handle = start_rewriter(userlist=str(cluster.userlist), pool_size=2)
    pairs = [("alice", "shop_a"), ("bob", "shop_b"), ("alice", "shop_b")]
    errors: list[BaseException] = []
    rounds = 40

    def client(user: str, dbname: str) -> None:
        try:
            with psycopg.connect(dsn(handle, user, dbname), prepare_threshold=0) as conn:
                for i in range(rounds):
                    with conn.transaction():
                        got = conn.execute(
                            "select current_user::text, current_database()::text, %s::int",
                            (i,),
                        ).fetchone()
                        assert got == (user, dbname, i), got
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=pair) for pair in pairs for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    stats = handle.stats()
    pools = {(r["user"], r["database"]): r for r in stats["pools"]}
    for pair in pairs:
        assert pools[pair]["pool_size"] == 2
        assert 1 <= int(str(pools[pair]["sv_idle"])) <= 2  # each pair its own connections
    served = {(r["user"], r["database"]): r["xact_count"] for r in stats["stats"]}
    # Each transaction block is BEGIN + the query + COMMIT on one lent connection.
    for pair in pairs:
        assert served[pair] == 3 * rounds
    servers = [r for r in stats["servers"] if (r["user"], r["database"]) in pairs]
    assert servers and all(r["prepared"] == 1 for r in servers)  # per pair, one statement each


def test_wrong_password_and_unknown_users_and_databases_are_refused_like_postgres(
    cluster: Cluster, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    handle = start_rewriter(userlist=str(cluster.userlist))
    wrong = refused(dsn(handle, "alice", "shop_a", password="not-her-password"))
    assert wrong["C"] == "28P01" and wrong["S"] == "FATAL"
    assert wrong["M"] == 'password authentication failed for user "alice"'
    # A SCRAM-secret user with a wrong password, and a user the proxy has no entry for, get
    # exactly the same answer (no user enumeration).
    assert refused(dsn(handle, "bob", "shop_b", password="nope"))["C"] == "28P01"
    unknown = refused(dsn(handle, "carol", "shop_a"))
    assert unknown["C"] == "28P01" and "carol" in unknown["M"]
    no_db = refused(dsn(handle, "alice", "no_such_db"))
    assert no_db["C"] == "3D000"
    assert [r for r in handle.stats()["pools"] if r["database"] == "no_such_db"] == []
    # The SCRAM-secret user: the proxy never had the password, yet logs in upstream as bob.
    with psycopg.connect(dsn(handle, "bob", "shop_b")) as conn:
        assert conn.execute("select current_user::text").fetchone() == ("bob",)
    # Bob's password works only for bob.
    assert refused(dsn(handle, "alice", "shop_a", password=PASSWORDS["bob"]))["C"] == "28P01"


def test_auth_passthrough_lets_the_upstream_judge_the_password(
    cluster: Cluster, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    handle = start_rewriter(auth_passthrough=True)
    with psycopg.connect(dsn(handle, "carol", "shop_a")) as conn:
        assert conn.execute("select current_user::text, current_database()::text").fetchone() == (
            "carol",
            "shop_a",
        )
    wrong = refused(dsn(handle, "carol", "shop_a", password="guess"))
    assert wrong["C"] == "28P01"
    assert wrong["M"] == 'password authentication failed for user "carol"'
    assert refused(dsn(handle, "nobody", "shop_a", password="x"))["C"] == "28P01"
    # The admin console needs a password the proxy knows, not a passthrough one.
    assert refused(dsn(handle, "carol", handle.admin_database))["C"] == "42501"


def test_a_login_waiting_on_a_failed_upstream_check_joins_the_listed_pool(
    cluster: Cluster, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    """Two passthrough logins to a new pair: the first (wrong password) fails its upstream
    check while the second waits for it; the second's own check succeeds, and it must land in
    the pool the proxy lists (and that later logins share), not in a forgotten one."""
    handle = start_rewriter(auth_passthrough=True)
    pairs = handle._proxy.pools.pairs
    logins: dict[str, psycopg.Connection[Any] | Exception] = {}

    def login(name: str, password: str) -> None:
        try:
            logins[name] = psycopg.connect(dsn(handle, "carol", "shop_b", password=password))
        except psycopg.Error as exc:
            logins[name] = exc

    threads = [
        threading.Thread(target=login, args=("wrong", "guess")),
        threading.Thread(target=login, args=("right", PASSWORDS["carol"])),
    ]
    with frozen(cluster.server):  # the first check hangs upstream, holding the pair's lock
        threads[0].start()
        wait_for("the first login's check", lambda: ("carol", "shop_b") in pairs)
        pair = pairs["carol", "shop_b"]
        threads[1].start()
        wait_for("the second login to queue", lambda: pair.admitting == 2)
    for thread in threads:
        thread.join(30)
    assert isinstance(logins["wrong"], psycopg.OperationalError)
    right = logins["right"]
    assert isinstance(right, psycopg.Connection)
    with right, psycopg.connect(dsn(handle, "carol", "shop_b")) as later:
        assert pairs["carol", "shop_b"] is pair
        later.execute("select 1")
        row = [r for r in handle.stats()["pools"] if r["user"] == "carol"]
        assert [(r["database"], r["cl_idle"] + r["cl_active"]) for r in row] == [("shop_b", 2)]


def test_admin_console_show_output_matches_a_known_workload(
    cluster: Cluster, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    handle = start_rewriter(
        userlist=str(cluster.userlist), pool_sizes={"bob/shop_b": 3}, admin_users=["bob"]
    )
    alice = psycopg.connect(dsn(handle, "alice", "shop_a"), autocommit=True, prepare_threshold=0)
    bob = psycopg.connect(dsn(handle, "bob", "shop_b"), autocommit=True, prepare_threshold=0)
    try:
        for i in range(5):
            alice.execute("select %s::int", (i,))
        for i in range(3):
            bob.execute("select %s::text", (str(i),))
        bob.execute("select 2")
        # The upstream DSN's own database is called poolguard: the console moved aside.
        assert handle.admin_database == "poolguard_admin"
        console_dsn = make_conninfo(handle.dsn, dbname=handle.admin_database)
        with psycopg.connect(console_dsn, autocommit=True) as console:
            views = {}
            for view in ("pools", "clients", "servers", "stats"):
                cur = console.execute(f"SHOW {view.upper()}")
                names = [d.name for d in cur.description or ()]
                views[view] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            with pytest.raises(psycopg.errors.SyntaxError, match="SHOW POOLS"):
                console.execute("SHOW NONSENSE")
            assert console.execute("SHOW STATS").fetchall()  # still usable after an error
        pools = {(r["user"], r["database"]): r for r in views["pools"]}
        a, b = pools[("alice", "shop_a")], pools[("bob", "shop_b")]
        assert (a["cl_idle"], a["cl_active"], a["cl_waiting"]) == (1, 0, 0)
        assert (b["cl_idle"], b["cl_active"], b["cl_waiting"]) == (1, 0, 0)
        assert (a["pool_size"], b["pool_size"]) == (2, 3)
        assert (a["sv_active"], a["sv_idle"]) == (0, 1)
        stats = {(r["user"], r["database"]): r for r in views["stats"]}
        # Round trips that ended outside a transaction, as PgBouncer counts xact_count: with
        # prepare_threshold=0 psycopg's first run of a query is a Parse/Sync round trip, then
        # Bind/Execute/Sync; alice ran 1 query text 5 times, bob 2 texts 3 + 1 times.
        assert stats[("alice", "shop_a")]["xact_count"] == 1 + 5
        assert stats[("bob", "shop_b")]["xact_count"] == 2 + 4
        assert stats[("alice", "shop_a")]["server_prepared"] == 1
        assert stats[("bob", "shop_b")]["server_prepared"] == 2
        clients = sorted((r["user"], r["database"], r["state"]) for r in views["clients"])
        assert clients == [("alice", "shop_a", "idle"), ("bob", "shop_b", "idle")]
        servers = [r for r in views["servers"] if r["user"] == "bob"]
        assert [r["prepared"] for r in servers] == [2] and servers[0]["client_pid"] is None
        assert isinstance(servers[0]["pid"], int) and servers[0]["pid"] > 0
        # The embedded handle gives the same rows.
        assert handle.stats()["stats"] == views["stats"]
        # An admin from --admin-user; alice is not one.
        with psycopg.connect(dsn(handle, "bob", handle.admin_database), autocommit=True) as console:
            assert console.execute("SHOW POOLS").fetchall()
        assert refused(dsn(handle, "alice", handle.admin_database))["C"] == "42501"
    finally:
        alice.close()
        bob.close()


def test_stats_of_a_rewriter_in_its_child_process(
    cluster: Cluster, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    handle = start_rewriter(userlist=str(cluster.userlist), isolate=True)
    with psycopg.connect(dsn(handle, "alice", "shop_b"), autocommit=True) as conn:
        conn.execute("select 1")
        conn.execute("select 2")
        stats = handle.stats()
    served = {(r["user"], r["database"]): r["xact_count"] for r in stats["stats"]}
    assert served[("alice", "shop_b")] == 2
    assert served[(handle.user, handle.dbname)] == 0
    assert [(r["user"], r["state"]) for r in stats["clients"]] == [("alice", "idle")]


def test_bad_userlist_and_pool_sizes_name_the_problem(
    cluster: Cluster, tmp_path: Path, start_rewriter: Callable[..., RewriterHandle]
) -> None:
    bad = tmp_path / "userlist.txt"
    bad.write_text('"alice" "md5' + "0" * 32 + '"\n')
    with pytest.raises(ValueError, match=r"userlist.txt:1: user 'alice' has an md5 hash"):
        start_rewriter(userlist=str(bad))
    bad.write_text('"alice" secret\n')
    with pytest.raises(ValueError, match=r"userlist.txt:1: expected \"user\" \"password\""):
        start_rewriter(userlist=str(bad))
    with pytest.raises(ValueError, match="cannot be read"):
        start_rewriter(userlist=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="pool_sizes entry 'alice'"):
        start_rewriter(pool_sizes={"alice": 2})
    with pytest.raises(ValueError, match="admin_database 'poolguard' is the upstream"):
        start_rewriter(admin_database="poolguard")
    with pytest.raises(SystemExit):
        rewriter.main(["--upstream", cluster.server.dsn, "--pool", "alice/shop_a"])
    shop = rewriter.start(cluster.server.dsn_for("shop_a"), pool_size=1, isolate=False)
    try:
        assert shop.admin_database == "poolguard"
        assert shop.stats()["pools"][0]["database"] == "shop_a"
    finally:
        shop.stop()
