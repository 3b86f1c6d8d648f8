"""Cost per checkout of resetting the session on return: none, DISCARD ALL, asyncpg's reset.

Run on demand:  python benchmarks/bench_reset.py [--rounds 7] [--ops 3000]
One poolguard pool (max_size=1) on the same server (DATABASE_URL, else a private one from
poolguard.testing); each case is one checkout running ``SELECT 1`` (autocommit, so the return
path has no COMMIT of its own), interleaved round by round, best round of each.  "dirty" marks
the connection as carrying session state so the pool resets it on return; the reset statement
is swapped between cases.  The extra time over the clean case is what a reset costs.
"""

from __future__ import annotations

import sys

from _common import database, parse_args, per_op

import poolguard
from poolguard import _connection

# asyncpg's Connection.reset() for PostgreSQL 12+ (one simple-query round trip).
ASYNCPG_RESET = (
    b"SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL; "
    b"DEALLOCATE ALL; DISCARD TEMP; DISCARD SEQUENCES"
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=3000, argv=argv)
    dsn, server = database()
    poolguard.configure(dsn, name="bench", min_size=1, max_size=1, guard="off")

    def clean() -> None:
        with poolguard.connection("bench") as conn:
            conn.autocommit = True
            conn.execute("SELECT 1").fetchone()

    def dirty() -> None:
        with poolguard.connection("bench") as conn:
            conn.autocommit = True
            conn.execute("SELECT 1").fetchone()
            conn._pg_session_dirty = True  # type: ignore[attr-defined]

    cases = {"clean (no reset)": None, "DISCARD ALL": b"DISCARD ALL", "asyncpg's": ASYNCPG_RESET}
    best = dict.fromkeys(cases, float("inf"))
    try:
        for _ in range(args.rounds):
            for label, sql in cases.items():
                if sql is not None:
                    _connection._RESET_SQL = sql
                best[label] = min(best[label], per_op(dirty if sql else clean, args.ops))
    finally:
        poolguard.reset()
        if server is not None:
            server.stop()
    base = best["clean (no reset)"]
    for label, seconds in best.items():
        print(
            f"{label:18} {seconds * 1e6:8.1f} us/checkout  "
            f"(+{(seconds - base) * 1e6:6.1f} us, {seconds / base:.2f}x clean)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
