"""workers=N: N rewriter processes on one port, as one proxy: one connection budget, cancels
that reach their client's worker, one admin view, a dead worker restarted."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polling import process_running, wait_for
from poolguard import rewriter
from poolguard._top_rewriter import RewriterWatch
from poolguard.rewriter import RewriterHandle
from poolguard.rewriter._admin import merge
from poolguard.rewriter._fleet import Worker
from poolguard.testing import free_port

WORKERS = 2


@pytest.fixture
def fleet(pg_dsn: str) -> Iterator[RewriterHandle]:
    handle = rewriter.start(pg_dsn, pool_size=4, workers=WORKERS)
    try:
        yield handle
    finally:
        handle.stop()


def _server_connections(pg_dsn: str) -> int:
    """Connections to this test's database other than the asking one."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def _connect_to_each_worker(handle: RewriterHandle, at_least: int) -> list[psycopg.Connection]:
    """Client connections until every worker has one (the kernel picks the worker)."""
    conns: list[psycopg.Connection] = []
    while len(conns) < at_least or {c.info.backend_pid % WORKERS for c in conns} != {0, 1}:
        assert len(conns) < 200, "the kernel gave every connection to one worker"
        conns.append(psycopg.connect(handle.dsn, autocommit=True))
    return conns


def test_the_workers_share_one_port_and_one_connection_budget(
    fleet: RewriterHandle, pg_dsn: str
) -> None:
    assert len(set(fleet.pids)) == WORKERS and os.getpid() not in fleet.pids
    conns = _connect_to_each_worker(fleet, at_least=16)
    errors: list[BaseException] = []
    most = 0

    def client(conn: psycopg.Connection, n: int) -> None:
        try:
            for i in range(5):
                with conn.transaction():
                    row = conn.execute("select %s::int, pg_sleep(0.02)", (n * 10 + i,)).fetchone()
                    assert row is not None and row[0] == n * 10 + i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c, n)) for n, c in enumerate(conns)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        most = max(most, _server_connections(pg_dsn))
        time.sleep(0.01)
    assert errors == []
    # Each worker holds 2 of the 4 server connections: together never more than pool_size.
    assert 2 <= most <= 4
    # One console answers for both workers (a peer's rows are at most half a second old).
    wait_for(
        "both workers' transactions in the console",
        lambda: fleet.stats()["stats"][0]["xact_count"] >= 5 * len(conns),
    )
    stats = fleet.stats()
    [pool] = stats["pools"]
    assert pool["pool_size"] == 4
    assert pool["cl_idle"] + pool["cl_active"] + pool["cl_waiting"] == len(conns)
    assert pool["sv_active"] + pool["sv_idle"] <= 4
    assert sorted(c["pid"] for c in stats["clients"]) == sorted(c.info.backend_pid for c in conns)
    for c in conns:
        c.close()


def test_top_shows_the_workers_as_one_rewriter(fleet: RewriterHandle) -> None:
    conns = _connect_to_each_worker(fleet, at_least=4)
    watch = RewriterWatch(psycopg.conninfo.make_conninfo(fleet.dsn, dbname=fleet.admin_database))

    def clients() -> int:
        [pool] = watch.sample()["pools"]
        return int(pool["clients_idle"] + pool["clients_active"] + pool["clients_waiting"])

    wait_for("every worker's clients in the one section", lambda: clients() == len(conns))
    [pool] = watch.sample()["pools"]
    assert pool["pool_size"] == 4
    for c in conns:
        c.close()


def test_a_cancel_reaches_the_worker_of_its_client(fleet: RewriterHandle) -> None:
    # A CancelRequest comes on a connection of its own, which the kernel gives to either worker:
    # over 16 cancels, some land on the worker that does not serve the client and must be
    # passed on (without that, about half of them would be lost).
    conns = _connect_to_each_worker(fleet, at_least=16)
    cancelled = 0
    for conn in conns:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        try:
            conn.execute("select pg_sleep(5)")
        except psycopg.errors.QueryCanceled:
            cancelled += 1
        finally:
            timer.join()
        assert conn.execute("select 1").fetchone() == (1,)  # the client carries on
        conn.close()
    assert cancelled == len(conns)


def test_a_dead_worker_is_restarted_and_the_other_serves_meanwhile(
    fleet: RewriterHandle,
) -> None:
    conns = _connect_to_each_worker(fleet, at_least=2)
    survivor = next(c for c in conns if c.info.backend_pid % WORKERS == 0)
    victim_pid = fleet.pids[1]
    os.kill(victim_pid, signal.SIGKILL)
    # Until the kernel has closed its listening socket (a few ms after the process exited), it
    # may still give that socket a connection, which is then reset: the one loss SO_REUSEPORT
    # allows when a worker dies.
    wait_for("one listening socket left", lambda: _listeners(fleet.port) == 1)
    for _ in range(10):  # new clients reach the living worker; its clients go on
        with psycopg.connect(fleet.dsn, autocommit=True) as conn:
            assert conn.execute("select 2").fetchone() == (2,)
        assert survivor.execute("select 3").fetchone() == (3,)
    wait_for("the worker restarted", lambda: fleet.pids[1] != victim_pid)
    fresh = _connect_to_each_worker(fleet, at_least=1)  # the new worker takes clients again
    assert any(c.info.backend_pid % WORKERS == 1 for c in fresh)
    for c in conns + fresh:
        c.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, r"workers must be an integer >= 1, got 0"),
        ({"workers": 5}, r"workers=5 is more than pool_size=4: .* raise pool_size"),
        (
            {"workers": 2, "pool_sizes": {"app/shop": 1}},
            r"workers=2 is more than pool_sizes\['app/shop'\]=1",
        ),
        ({"workers": 2, "isolate": False}, r"workers > 1 needs isolate=True"),
    ],
)
def test_bad_workers_are_refused_before_anything_starts(
    kwargs: dict[str, object], message: str
) -> None:
    dsn = "postgresql://app:s3cr3t-pw@127.0.0.1:1/shop"  # never reached
    with pytest.raises(ValueError, match=message) as refused:
        rewriter.start(dsn, pool_size=4, **kwargs)  # type: ignore[arg-type]
    assert "s3cr3t" not in str(refused.value)


def test_workers_need_a_tcp_listen_address(tmp_path: object) -> None:
    folder = os.path.join(str(tmp_path), "sock")
    with pytest.raises(ValueError, match=r"workers > 1 needs listen=HOST:PORT"):
        rewriter.start("postgresql://app:pw@127.0.0.1:1/shop", listen=folder, workers=2)


def test_the_command_line_runs_workers_until_sigterm(pg_dsn: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolguard.rewriter", "--upstream", pg_dsn, "--listen",
         f"127.0.0.1:{port}", "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"with 2 workers \(pids (\d+) (\d+)\)", line)
        assert found, line
        pids = [int(pid) for pid in found.groups()]
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, host="127.0.0.1", port=port)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert str(psycopg.conninfo.conninfo_to_dict(pg_dsn)["password"]) not in line
        for pid in pids:  # the workers ended with it
            wait_for(f"worker {pid} gone", lambda pid=pid: not process_running(pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (each worker has one), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


# An app that starts two workers, says where, and waits to be killed.
_APP = (
    "import sys, time; from poolguard import rewriter; "
    "h = rewriter.start(sys.argv[1], pool_size=2, workers=2); "
    "print(h._runner.folder, *h.pids, flush=True); time.sleep(60)"
)


def test_the_workers_end_and_clean_up_when_their_app_is_killed(pg_dsn: str) -> None:
    with subprocess.Popen([sys.executable, "-c", _APP, pg_dsn], stdout=subprocess.PIPE) as app:
        assert app.stdout is not None
        folder, *pids = app.stdout.readline().decode().split()
        assert os.path.isdir(folder) and len(pids) == 2
        app.kill()  # no stop(), no cleanup in the app
    for pid in map(int, pids):
        wait_for(f"worker {pid} ended", lambda pid=pid: not process_running(pid))
    assert not os.path.exists(folder)  # the last worker to stop removed it


@given(st.integers(1, 1000), st.integers(1, 16), st.integers(1, 10**6))
def test_shares_add_up_and_pids_name_their_worker(size: int, count: int, serial: int) -> None:
    fleet = [Worker(index, count, "/fleet") for index in range(count)]
    shares = [w.share(size) for w in fleet]
    assert sum(shares) == size and max(shares) - min(shares) <= 1
    pids = [w.pid(serial) for w in fleet]
    assert len(set(pids)) == count and 0 < min(pids) < 2**31
    assert [fleet[0].owner(pid) for pid in pids] == list(range(count))


def test_one_view_of_several_workers() -> None:
    def rows(pool: dict[str, int], clients: list[int], servers: list[int]) -> dict[str, list]:
        pair = {"user": "app", "database": "shop"}
        return {
            "pools": [{**pair, **pool}],
            "clients": [{**pair, "pid": pid} for pid in clients],
            "servers": [{**pair, "pid": pid} for pid in servers],
            "stats": [{**pair, "xact_count": sum(clients)}],
        }

    own = rows({"cl_active": 1, "pool_size": 2, "maxwait_ms": 5}, [4, 2], [300])
    peer = rows({"cl_active": 2, "pool_size": 2, "maxwait_ms": 40}, [3], [100, 200])
    other = {"pools": [{"user": "u", "database": "d", "pool_size": 1}], "stats": []}
    merged = merge([own, peer, other])
    assert merged["pools"] == [
        {"user": "app", "database": "shop", "cl_active": 3, "pool_size": 4, "maxwait_ms": 40},
        {"user": "u", "database": "d", "pool_size": 1},
    ]
    assert [c["pid"] for c in merged["clients"]] == [2, 3, 4]
    assert [s["pid"] for s in merged["servers"]] == [100, 200, 300]
    assert merged["stats"] == [{"user": "app", "database": "shop", "xact_count": 9}]
    assert own["pools"][0]["cl_active"] == 1  # the worker's own rows are left as they were
