"""Cost of the session-state guard per execute, for a statement it has already seen.

Run on demand (not part of the test suite):  python benchmarks/bench_guard.py

The pool calls ``guard.check(sql, in_transaction=...)`` before every execute; with the guard
off that call returns at once, with it on it is one cached lookup. Both are timed in the same
run, best of several repeats, and the difference is the guard's cost (target: <= 1 us).
"""

from __future__ import annotations

import timeit
import warnings

from poolguard._guard import SessionStateGuard

CLEAN = (
    "SELECT o.id, o.total, c.email FROM orders o JOIN customers c ON c.id = o.customer_id "
    "WHERE o.created_at > %s AND o.status = ANY(%s) ORDER BY o.created_at DESC LIMIT 50"
)
FLAGGED = "SET search_path = app, public"
NUMBER = 1_000_000
REPEAT = 7


def ns_per_op(guard: SessionStateGuard, sql: str, method: str = "check") -> float:
    call = getattr(guard, method)
    call(sql, in_transaction=True)  # first sight: tokenize and cache
    timer = timeit.Timer(lambda: call(sql, in_transaction=True))
    return min(timer.repeat(repeat=REPEAT, number=NUMBER)) / NUMBER * 1e9


def main() -> None:
    off = ns_per_op(SessionStateGuard("off"), CLEAN)
    on = ns_per_op(SessionStateGuard("warn"), CLEAN)
    # observe(): what the pool's execute hook calls (check + the leaves-session-state flag).
    observe = ns_per_op(SessionStateGuard("warn"), CLEAN, "observe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A flagged statement after its one warning: cached findings + the warned-set check.
        flagged = ns_per_op(SessionStateGuard("warn"), FLAGGED)
    print(f"guard off, seen statement:        {off:7.1f} ns/op")
    print(f"guard on,  seen clean statement:  {on:7.1f} ns/op")
    print(f"guard on,  observe() hook, clean: {observe:7.1f} ns/op")
    print(f"guard on,  seen flagged statement:{flagged:7.1f} ns/op (already warned)")
    print(f"difference on - off (clean):      {on - off:7.1f} ns/op  (target <= 1000 ns)")


if __name__ == "__main__":
    main()
