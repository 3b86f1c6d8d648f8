"""Checkout cost: poolguard vs psycopg_pool.ConnectionPool, with and without the context manager.

Run on demand:  python benchmarks/bench_pool.py [--rounds 7] [--ops 20000]
Both pools talk to the same server (DATABASE_URL, else a private one from poolguard.testing)
in the same run, interleaved round by round; the best round of each is compared, which is
the least noisy estimate on a shared machine.  Target (issue 10): ratio <= 1.05 for bare
getconn()/putconn() (the path Django and SQLAlchemy use) and for ``with connection()``.
"""

from __future__ import annotations

import sys
from typing import Any

import psycopg_pool
from _common import database, parse_args, per_op

import poolguard

TARGET = 1.05


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=20000, argv=argv)

    dsn, server = database()
    raw: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        dsn, min_size=2, max_size=4, kwargs={"prepare_threshold": None}, open=True
    )
    raw.wait()
    guarded = poolguard.configure(dsn, name="bench", min_size=2, max_size=4)
    guarded.open()

    def raw_checkout() -> None:
        with raw.connection():
            pass

    def guarded_checkout() -> None:
        with poolguard.connection("bench"):
            pass

    def raw_bare() -> None:
        raw.putconn(raw.getconn())

    def guarded_bare() -> None:
        guarded.putconn(guarded.getconn())

    def raw_select() -> None:
        with raw.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def guarded_select() -> None:
        with poolguard.connection("bench") as conn:
            conn.execute("SELECT 1").fetchone()

    # (label, psycopg_pool, poolguard, operations per round, counts toward the target)
    cases = [
        ("getconn+putconn", raw_bare, guarded_bare, args.ops, True),
        ("with connection()", raw_checkout, guarded_checkout, args.ops, True),
        ("checkout + SELECT 1", raw_select, guarded_select, max(1, args.ops // 10), False),
    ]
    worst = 0.0
    try:
        for label, raw_fn, guarded_fn, ops, target in cases:
            raw_best = guarded_best = float("inf")
            for _ in range(args.rounds):
                raw_best = min(raw_best, per_op(raw_fn, ops))
                guarded_best = min(guarded_best, per_op(guarded_fn, ops))
            ratio = guarded_best / raw_best
            worst = max(worst, ratio) if target else worst
            print(
                f"{label:22s} psycopg_pool {raw_best * 1e6:7.2f} us/op   "
                f"poolguard {guarded_best * 1e6:7.2f} us/op   ratio {ratio:.3f}"
            )
    finally:
        raw.close()
        poolguard.reset()
        if server:
            server.stop()
    verdict = "ok" if worst <= TARGET else "MISSED"
    print(f"worst checkout ratio {worst:.3f} (target <= {TARGET}): {verdict}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
