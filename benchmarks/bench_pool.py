"""Checkout cost: poolguard.connection() vs psycopg_pool.ConnectionPool.connection().

Run on demand:  python benchmarks/bench_pool.py [--rounds 7] [--ops 20000]
Both pools talk to the same server (DATABASE_URL, else a private one from poolguard.testing)
in the same run, interleaved round by round; the best round of each is compared, which is
the least noisy estimate on a shared machine.  Target (issue 2): ratio <= 1.10.
"""

from __future__ import annotations

import sys
from typing import Any

import psycopg_pool
from _common import database, parse_args, per_op

import poolguard


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

    def raw_select() -> None:
        with raw.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def guarded_select() -> None:
        with poolguard.connection("bench") as conn:
            conn.execute("SELECT 1").fetchone()

    cases = [
        ("checkout+return", raw_checkout, guarded_checkout, args.ops),
        ("checkout + SELECT 1", raw_select, guarded_select, max(1, args.ops // 10)),
    ]
    worst = 0.0
    try:
        for label, raw_fn, guarded_fn, ops in cases:
            raw_best = guarded_best = float("inf")
            for _ in range(args.rounds):
                raw_best = min(raw_best, per_op(raw_fn, ops))
                guarded_best = min(guarded_best, per_op(guarded_fn, ops))
            ratio = guarded_best / raw_best
            worst = max(worst, ratio) if label == "checkout+return" else worst
            print(
                f"{label:22s} psycopg_pool {raw_best * 1e6:7.2f} us/op   "
                f"poolguard {guarded_best * 1e6:7.2f} us/op   ratio {ratio:.3f}"
            )
    finally:
        raw.close()
        poolguard.reset()
        if server:
            server.stop()
    print(
        f"checkout+return ratio {worst:.3f} (target <= 1.10): {'ok' if worst <= 1.10 else 'MISSED'}"
    )
    return 0 if worst <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
