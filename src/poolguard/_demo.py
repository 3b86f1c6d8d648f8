"""``poolguard demo``: the problem and the fix, measured side by side on a real server.

With no DATABASE_URL it starts a private PostgreSQL with a small max_connections (as on a small
managed plan), then runs the same crowd of simulated users twice: each opening its own
connection per request, then all of them sharing one poolguard pool.  When PgBouncer is
installed, a second scene runs the prepared-statement trap through it.  Later scenes (leaks)
are added by the modules that own them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from . import testing
from ._budget import compute_budget, read_server_limits
from ._settings import redact_conninfo
from ._state import configure, reset
from ._trap import QUERIES, STATEMENTS, THREADS, run_workload

#: (title, scene(dsn, out) -> None), shown as "Scene <n>: <title>"; scenes owned by other
#: modules register here.
SCENES: list[tuple[str, Callable[[str, TextIO], None]]] = []


@dataclass
class Run(testing.Workload):
    """What one way of serving the crowd achieved, and how many server connections it took."""

    label: str = ""
    peak_connections: int = 0

    @property
    def first_error(self) -> str:
        return self.failures[0] if self.failures else ""


def _labelled(label: str, seen: testing.Workload, peak: Peak) -> Run:
    return Run(seen.ok, seen.failures, seen.latencies, seen.seconds, label, peak.connections)


@dataclass
class Peak:
    """The most client backends seen at once while a run went on."""

    connections: int = 0


@contextmanager
def _count_server_connections(dsn: str) -> Iterator[Peak]:
    """Sample the number of client backends while the block runs; keep the peak."""
    peak = Peak()
    stop = threading.Event()
    monitor = psycopg.connect(dsn, autocommit=True)

    def sample() -> None:
        while not stop.wait(0.02):
            row = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
            peak.connections = max(peak.connections, row[0] if row else 0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        monitor.close()


def crowd_scene(dsn: str, out: TextIO, *, users: int = 200, requests: int = 5) -> list[Run]:
    """Connect-per-request vs one poolguard pool, same users, same server."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        limits = read_server_limits(conn)
    processes = 2
    budget = compute_budget(limits, max_size=1, processes=processes)
    max_size = max(1, min(8, budget.per_process))

    def work(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_sleep(0.005)")
        conn.execute("SELECT count(*) FROM pg_class")

    def per_request() -> None:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            work(conn)

    def pooled() -> None:
        with pool.connection() as conn:
            work(conn)

    out.write(
        f"Scene 1: {users} concurrent users x {requests} requests, each a short transaction\n"
    )
    with _count_server_connections(dsn) as peak:
        seen = testing.run_users(users, requests, lambda user, i: per_request())
    raw = _labelled("connect per request", seen, peak)
    pool = configure(dsn, name="demo", max_size=max_size, min_size=max_size, timeout=60)
    pool.open()
    try:
        with _count_server_connections(dsn) as peak:
            seen = testing.run_users(users, requests, lambda user, i: pooled())
    finally:
        reset()
    guarded = _labelled(f"poolguard max_size={max_size}", seen, peak)
    _table(out, [raw, guarded])
    budget = compute_budget(limits, max_size=max_size, processes=processes)
    out.write(f"\nConnection math for {processes} processes like this one:\n")
    for line in budget.formula().splitlines():
        out.write(f"  {line}\n")
    return [raw, guarded]


def _table(out: TextIO, runs: list[Run]) -> None:
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("requests ok", lambda r: str(r.ok)),
        ("requests failed", lambda r: str(r.failed)),
        ("throughput (req/s)", lambda r: f"{r.throughput:.0f}"),
        ("latency p50 (ms)", lambda r: f"{r.percentile(0.50) * 1000:.1f}"),
        ("latency p99 (ms)", lambda r: f"{r.percentile(0.99) * 1000:.1f}"),
        ("peak server connections", lambda r: str(r.peak_connections)),
    ]
    width = max(24, *(len(r.label) + 2 for r in runs))
    out.write(" " * 26 + "".join(f"{r.label:>{width}}" for r in runs) + "\n")
    for title, cell in rows:
        out.write(f"  {title:<24}" + "".join(f"{cell(r):>{width}}" for r in runs) + "\n")
    for run in runs:
        if run.first_error:
            out.write(f"  first error ({run.label}): {run.first_error}\n")


def pgbouncer_scene(dsn: str, out: TextIO) -> None:
    """The prepared-statement trap through PgBouncer in transaction mode, then poolguard."""
    if testing.find_pgbouncer() is None:
        out.write(
            "  skipped: PgBouncer is not installed. To see this scene, install it (Debian and "
            "Ubuntu: apt-get install pgbouncer; macOS: brew install pgbouncer) and run "
            "`poolguard demo` again\n"
        )
        return
    upstream = _upstream(dsn)
    if upstream is None:
        out.write("  skipped: PgBouncer needs a TCP DSN with a password to reach the server\n")
        return
    bouncer = testing.start_pgbouncer(upstream)
    try:
        out.write(
            f"{_pgbouncer_version()} in transaction mode (default_pool_size="
            f"{bouncer.default_pool_size}) in front of the same server: {THREADS} threads x "
            f"{QUERIES} queries, {len(STATEMENTS)} distinct statements\n"
        )
        plain = psycopg_pool.ConnectionPool(
            bouncer.dsn, min_size=THREADS, max_size=THREADS, open=False
        )
        plain.open(wait=True)
        try:
            with _count_server_connections(dsn) as peak:
                result = run_workload(plain.connection)
        finally:
            plain.close()
        trapped = _labelled("psycopg_pool + psycopg defaults", result, peak)
        pool = configure(bouncer.url, name="demo-pgbouncer", max_size=THREADS)
        try:
            with _count_server_connections(dsn) as peak:
                result = run_workload(pool.connection)
        finally:
            reset()
        guarded = _labelled("poolguard defaults", result, peak)
    finally:
        bouncer.stop()
    _table(out, [trapped, guarded])
    out.write(
        "\npsycopg prepares a statement the 5th time a connection runs it (prepare_threshold=5);"
        "\nPgBouncer runs the next transaction on another server connection, where that name is"
        "\nmissing or taken.  poolguard's mode='transaction' sends no prepared statements.\n"
    )


def _upstream(dsn: str) -> testing.PostgresServer | None:
    """The server behind `dsn`, as start_pgbouncer() needs it (TCP and a password)."""
    params = conninfo_to_dict(dsn)
    host, password = str(params.get("host") or ""), params.get("password")
    if not host or host.startswith("/") or "," in host or not password:
        return None
    return testing.PostgresServer(
        host=host,
        port=int(params.get("port") or 5432),
        user=str(params.get("user") or ""),
        password=str(password),
        dbname=str(params.get("dbname") or ""),
    )


def _pgbouncer_version() -> str:
    binary = testing.find_pgbouncer()
    try:
        found = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found.splitlines()[0] if found.strip() else "PgBouncer"


def leak_scene(dsn: str, out: TextIO) -> None:
    from ._report import leak_scene as find_a_leak

    # The scene prints the finding itself; the console handler would print it twice.
    leaks = logging.getLogger("poolguard.leaks")
    leaks.propagate = False
    try:
        out.write(find_a_leak(dsn) + "\n")
    finally:
        leaks.propagate = True


SCENES.append(("a leaking handler, found and pinned to its line", leak_scene))
# Listed even without PgBouncer installed: the scene then says it was skipped and how to see it.
SCENES.append(("the prepared-statement trap behind PgBouncer (transaction mode)", pgbouncer_scene))


def run_demo(out: TextIO, *, users: int = 200, requests: int = 5) -> int:
    """Run every scene against DATABASE_URL, or a private server with max_connections=20."""
    dsn = os.environ.get("DATABASE_URL") or os.environ.get("POOLGUARD_DSN")
    server = None
    if not dsn:
        out.write("No DATABASE_URL: starting a private PostgreSQL with max_connections=20...\n")
        server = testing.start_postgres(max_connections=20)
        dsn = server.dsn
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        out.write(f"PostgreSQL {version[0] if version else '?'} at {redact_conninfo(dsn)}\n\n")
        crowd_scene(dsn, out, users=users, requests=requests)
        for number, (title, scene) in enumerate(SCENES, start=2):  # crowd_scene is 1
            out.write(f"\nScene {number}: {title}\n")
            scene(dsn, out)
    finally:
        if server is not None:
            server.stop()
    return 0
