"""Leak tracking cost: checkout+return with leak detection on vs off, and memory per checkout.

Run on demand:  python benchmarks/bench_leaks.py [--rounds 7] [--ops 20000]
"On" is every check enabled (leak threshold, reclaim, idle in transaction) with the watchdog
scanning every 10 ms while 6 other checkouts sit in the ledger; "off" sets every threshold
to 0.  Each round opens one pool, measures it and closes it, alternating, so the watchdog of
one never runs while the other is measured; the best round of each is compared.  Target
(issue 3): ratio <= 1.05.  Memory: tracemalloc over 40 checkouts held at once, poolguard and
plain psycopg_pool, after one warm-up round so that caches and reservoirs already exist.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import psycopg_pool
from _common import database, parse_args, per_op

import poolguard

ON = {
    "leak_threshold": 3600.0,
    "leak_reclaim_after": 7200.0,
    "idle_in_transaction_threshold": 3600.0,
    "watchdog_interval": 0.01,
}
OFF = {
    "leak_threshold": 0,
    "leak_reclaim_after": 0,
    "idle_in_transaction_threshold": 0,
    "watchdog_interval": 60,
}
HELD = 6


def measure(dsn: str, options: dict[str, Any], ops: int) -> float:
    """Best-effort timing of one pool's checkout+return, with HELD other checkouts out."""
    pool = poolguard.configure(dsn, name="bench", min_size=HELD + 2, max_size=HELD + 2, **options)
    pool.open()
    held = [pool.getconn() for _ in range(HELD)]

    def checkout() -> None:
        with pool.connection():
            pass

    per_op(checkout, 1000)  # warm-up
    try:
        return per_op(checkout, ops)
    finally:
        for conn in held:
            pool.putconn(conn)
        poolguard.reset()


def bytes_per_checkout(take: Callable[[], Any], give: Callable[[Any], None], n: int) -> float:
    for _ in range(2):  # the first round warms caches (code objects, reservoirs, dict sizes)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        conns = [take() for _ in range(n)]
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        for conn in conns:
            give(conn)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=20000, argv=argv)

    dsn, server = database()
    try:
        best = {"on": float("inf"), "off": float("inf")}
        for _ in range(args.rounds):
            for label, options in (("off", OFF), ("on", ON)):
                best[label] = min(best[label], measure(dsn, options, args.ops))
        ratio = best["on"] / best["off"]
        print(
            f"checkout+return   tracking off {best['off'] * 1e6:7.2f} us/op   "
            f"on {best['on'] * 1e6:7.2f} us/op   ratio {ratio:.3f}"
        )

        n = 40
        raw: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            dsn, min_size=n, max_size=n, kwargs={"prepare_threshold": None}, open=True
        )
        raw.wait()
        raw_bytes = bytes_per_checkout(raw.getconn, raw.putconn, n)
        raw.close()
        pool = poolguard.configure(dsn, name="mem", min_size=n, max_size=n, **ON)
        pool.open()
        pool._inner.wait()  # type: ignore[union-attr]
        guarded_bytes = bytes_per_checkout(pool.getconn, pool.putconn, n)
        poolguard.reset()
        print(
            f"memory per checkout held: psycopg_pool {raw_bytes:.0f} B, poolguard "
            f"{guarded_bytes:.0f} B (tracking adds {guarded_bytes - raw_bytes:.0f} B)"
        )
    finally:
        poolguard.reset()
        if server:
            server.stop()
    verdict = "ok" if ratio <= 1.05 else "MISSED"
    print(f"tracking on/off ratio {ratio:.3f} (target <= 1.05): {verdict}")
    return 0 if ratio <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
