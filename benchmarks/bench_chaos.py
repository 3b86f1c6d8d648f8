"""The chaos scenarios of tests/chaos against poolguard and psycopg_pool, side by side.

Run on demand:  python benchmarks/bench_chaos.py [--seconds 4]
Starts a private PostgreSQL (synchronous_commit=on, so an immediate shutdown loses no
acknowledged commit) and a PgBouncer in front of it, then runs each scenario once per pool:
four threads commit one uniquely-identified row per transaction, every fifth transaction leaves
session state behind, and each checkout compares the session with a fresh one.  Prints, per
scenario and pool: transactions, errors, lost commits, dirty sessions seen, and the seconds
from the end of the fault to the next commit.  Nothing is asserted here: tests/chaos does that
for poolguard.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "chaos"))
from chaoshelpers import (
    BouncerControl,
    Outcome,
    ServerControl,
    cancel_queries,
    defaults,
    fill_server,
    lost_commits,
    run_load,
    terminate_backends,
)

import poolguard
from poolguard.testing import start_pgbouncer, start_postgres


def make_pool(
    kind: str, dsn: str, size: int, least: int, guard: str = "warn"
) -> tuple[Any, Callable[[], Any]]:
    """(pool, close) for ``kind``; ``pool.connection`` commits on success, rolls back on error."""
    if kind == "poolguard":
        mode = "session" if guard != "off" else "transaction"
        pool = poolguard.configure(
            dsn, mode=mode, guard=guard, min_size=least, max_size=size, timeout=3.0,
            connect_timeout=2,
        )  # fmt: skip
        pool.open()
        return pool, poolguard.reset
    raw: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        dsn, min_size=least, max_size=size, timeout=3.0, open=True,
        kwargs={"connect_timeout": 2, "prepare_threshold": None},
    )  # fmt: skip
    raw.wait(10)
    return raw, lambda: raw.close(timeout=2)


def _fork_child(kind: str, pool: Any, expected: Any, seconds: float, path: str) -> None:
    if kind == "poolguard":
        pool = poolguard.get_pool()
    outcome = run_load(pool.connection, expected=expected, workers=1, seconds=seconds)
    Path(path).write_text(f"{outcome.transactions - len(outcome.errors)}\n")


def fork_scenario(kind: str, pool: Any, expected: Any, seconds: float) -> tuple[Outcome, str]:
    fork = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        paths = [f"{folder}/child{i}" for i in range(4)]
        children = [
            fork.Process(target=_fork_child, args=(kind, pool, expected, seconds, p)) for p in paths
        ]
        for child in children:
            child.start()
        parent = run_load(pool.connection, expected=expected, workers=2, seconds=seconds)
        for child in children:
            child.join(seconds + 30)
            if child.is_alive():
                child.kill()
        served = [Path(p).read_text().strip() if Path(p).exists() else "none" for p in paths]
    return parent, "children committed " + "/".join(served)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="load per scenario")
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    args = parser.parse_args(argv)
    seconds = args.seconds
    logging.basicConfig(level=logging.CRITICAL)  # the figures are the output, not the logs
    server = start_postgres(max_connections=40, settings={"synchronous_commit": "on"})
    control = ServerControl(server)
    bouncer = start_pgbouncer(server, default_pool_size=4)
    bouncer_control = BouncerControl(bouncer.port)
    admin = server.dsn

    def outage() -> None:
        control.stop("fast")
        time.sleep(1.5)
        control.start()

    scenarios: list[tuple[str, dict[str, Any]]] = [
        ("restart fast", {"fault": lambda: control.restart("fast")}),
        ("restart immediate", {"fault": lambda: control.restart("immediate")}),
        ("terminate backends", {"fault": lambda db: terminate_backends(admin, db)}),
        # One connection when the server fills up: growing to four is refused for 2 s.
        ("server full 2 s", {"fault": lambda: fill_server(admin, 2.0), "min": 1}),
        ("server stopped 1.5 s", {"fault": outage}),
        ("cancels 1.5 s", {"fault": lambda db: cancel_queries(admin, db, 1.5), "work": True}),
        ("dirty returns, 1 connection", {"size": 1, "dirty_every": 2}),
        ("fork, 4 children", {"fork": True}),
        ("pgbouncer restart", {"fault": bouncer_control.restart, "bouncer": True}),
    ]
    rows = []
    try:
        for number, (name, spec) in enumerate(scenarios):
            if args.only not in name:
                continue
            for kind in ("poolguard", "psycopg_pool"):
                db = f"bench_{number}_{kind}"
                dsn = server.create_database(db)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("CREATE TABLE commits (id text PRIMARY KEY, worker int)")
                target = make_conninfo(bouncer.dsn, dbname=db) if spec.get("bouncer") else dsn
                size = spec.get("size", 4)
                guard = "off" if spec.get("bouncer") else "warn"
                pool, close = make_pool(kind, target, size, spec.get("min", size), guard)
                expected = defaults(dsn)
                fault = spec.get("fault")
                if fault is not None and len(inspect.signature(fault).parameters) == 1:
                    fault = (lambda f, d: lambda: f(d))(fault, db)
                note = ""
                try:
                    if spec.get("fork"):
                        outcome, note = fork_scenario(kind, pool, expected, seconds / 2)
                    else:
                        outcome = run_load(
                            pool.connection,
                            expected=expected,
                            seconds=seconds,
                            fault=fault,
                            fault_at=0.0 if "min" in spec else 1.0,
                            dirty_every=0 if spec.get("bouncer") else spec.get("dirty_every", 5),
                            work_sql="SELECT pg_sleep(0.005)" if spec.get("work") else None,
                        )
                finally:
                    close()
                    control.wait_ready()
                lost = len(lost_commits(dsn, outcome.committed))
                recovery = outcome.recovery() if fault is not None else None
                kinds = sorted({type(e).__name__ for e in outcome.errors})
                if outcome.hung:
                    note = f"{outcome.hung} caller(s) hung; {note}"
                rows.append(
                    (name, kind, outcome.transactions, len(outcome.errors), lost,
                     len(outcome.dirty), "-" if recovery is None else f"{recovery:.2f}",
                     ", ".join(kinds[:3]) + (f"; {note}" if note else ""))
                )  # fmt: skip
                print(*rows[-1], sep=" | ", flush=True)
    finally:
        bouncer_control.close()
        bouncer.stop()
        control.close()
        server.stop()
    print()
    print("| scenario | pool | transactions | errors | lost | dirty | recovery s | notes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
