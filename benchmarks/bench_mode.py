"""Prepared statements when it is safe: mode="auto" vs mode="transaction" vs raw psycopg_pool.

Run on demand:  python benchmarks/bench_mode.py [--rounds 25] [--ops 400] [--scale 10]
One server (DATABASE_URL, else a private one), a pgbench_accounts table of ``--scale`` x
100,000 rows, one autocommit connection per pool, interleaved rounds (many short ones: on a
busy machine the best round of each is the one that ran undisturbed); the best are compared.

- "PK lookup": ``SELECT abalance FROM pgbench_accounts WHERE aid = %s`` with a random aid, a
  statement of its own as in ``pgbench -S`` (and Django's autocommit).
- "PK lookup in BEGIN/COMMIT": the same inside a transaction block: three round trips, of
  which prepared statements speed up one.
- "5-statement transaction": pgbench's TPC-B-like transaction (3 updates, a select, an insert)
  in a transaction block.

Baselines in the same run: poolguard in transaction mode (no prepared statements: what poolguard
did by default before auto) and psycopg_pool with psycopg's own defaults (prepare on the 5th
execution, no guard).  Target (issue 16): auto PK lookup >= 1.3x transaction mode.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
from _common import database, has_rows, parse_args, per_op

import poolguard

PK_LOOKUP = "SELECT abalance FROM pgbench_accounts WHERE aid = %s"
TPCB = (
    ("UPDATE pgbench_accounts SET abalance = abalance + %s WHERE aid = %s", "delta", "aid"),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = %s", "aid"),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + %s WHERE tid = %s", "delta", "tid"),
    ("UPDATE pgbench_branches SET bbalance = bbalance + %s WHERE bid = %s", "delta", "bid"),
    (
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
        "VALUES (%s, %s, %s, %s, CURRENT_TIMESTAMP)",
        "tid",
        "bid",
        "aid",
        "delta",
    ),
)


def _load(dsn: str, scale: int) -> None:
    """pgbench's four tables, filled server-side (generate_series), the same shape as pgbench -i."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if has_rows(conn, "pgbench_accounts", scale * 100_000):
            return
        for table in ("pgbench_history", "pgbench_tellers", "pgbench_accounts", "pgbench_branches"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(
            "CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88))"
        )
        conn.execute(
            "CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, "
            "filler char(84))"
        )
        conn.execute(
            "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, "
            "filler char(84))"
        )
        conn.execute(
            "CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, "
            "mtime timestamp, filler char(22))"
        )
        conn.execute(
            "INSERT INTO pgbench_branches SELECT b, 0, '' FROM generate_series(1, %s) b", (scale,)
        )
        conn.execute(
            "INSERT INTO pgbench_tellers SELECT t, (t - 1) / 10 + 1, 0, '' "
            "FROM generate_series(1, %s) t",
            (scale * 10,),
        )
        conn.execute(
            "INSERT INTO pgbench_accounts SELECT a, (a - 1) / 100000 + 1, 0, '' "
            "FROM generate_series(1, %s) a",
            (scale * 100_000,),
        )
        conn.execute("VACUUM ANALYZE")


def main(argv: list[str] | None = None) -> int:
    extra = argv if argv is not None else sys.argv[1:]
    scale = 10
    if "--scale" in extra:
        at = extra.index("--scale")
        scale = int(extra[at + 1])
        extra = extra[:at] + extra[at + 2 :]
    args = parse_args(__doc__, ops=400, argv=extra)
    dsn, server = database()
    _load(dsn, scale)
    accounts = scale * 100_000
    rnd = random.Random(1)

    def values() -> dict[str, int]:
        return {
            "aid": rnd.randint(1, accounts),
            "tid": rnd.randint(1, scale * 10),
            "bid": rnd.randint(1, scale),
            "delta": rnd.randint(-5000, 5000),
        }

    raw: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True
    )
    raw.wait()
    auto = poolguard.configure(dsn, name="auto", mode="auto", min_size=1, max_size=1)
    tx = poolguard.configure(dsn, name="transaction", mode="transaction", min_size=1, max_size=1)
    for pool in (auto, tx):
        pool.set_connect_kwargs({"autocommit": True})
        pool.open()

    def lookup(checkout: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with checkout() as conn:
                conn.execute(PK_LOOKUP, (rnd.randint(1, accounts),)).fetchone()

        return run

    def lookup_in_block(checkout: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with checkout() as conn, conn.transaction():
                conn.execute(PK_LOOKUP, (rnd.randint(1, accounts),)).fetchone()

        return run

    def tpcb(checkout: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            v = values()
            with checkout() as conn, conn.transaction():
                for sql, *names in TPCB:
                    conn.execute(sql, [v[n] for n in names])

        return run

    pools: dict[str, Callable[[], Any]] = {
        "psycopg_pool (psycopg defaults)": raw.connection,
        "poolguard mode=transaction": lambda: poolguard.connection("transaction"),
        "poolguard mode=auto": lambda: poolguard.connection("auto"),
    }
    print(f"route of mode=auto: {auto.route.describe() if auto.route else 'not decided'}")
    verdict = 0
    try:
        for label, make, ops in (
            ("PK lookup", lookup, args.ops),
            ("PK lookup in BEGIN/COMMIT", lookup_in_block, args.ops),
            ("5-statement transaction", tpcb, max(1, args.ops // 4)),
        ):
            best = dict.fromkeys(pools, float("inf"))
            runs = {name: make(checkout) for name, checkout in pools.items()}
            for fn in runs.values():  # warm up: past psycopg's prepare threshold
                for _ in range(10):
                    fn()
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    best[name] = min(best[name], per_op(fn, ops))
            base = best["poolguard mode=transaction"]
            print(f"{label}:")
            for name, seconds in best.items():
                print(f"  {name:34s} {seconds * 1e6:8.1f} us/op   speed-up {base / seconds:5.2f}x")
            ratio = base / best["poolguard mode=auto"]
            if label == "PK lookup":
                ok = ratio >= 1.3
                verdict |= 0 if ok else 1
                status = "ok" if ok else "MISSED"
                print(f"  auto vs transaction {ratio:.2f}x (target >= 1.3): {status}")
    finally:
        raw.close()
        poolguard.reset()
        if server:
            server.stop()
    return verdict


if __name__ == "__main__":
    sys.exit(main())
