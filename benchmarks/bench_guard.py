"""Cost of the session-state guard per execute: seen statements, and never-seen long ones.

Run on demand (not part of the test suite):  python benchmarks/bench_guard.py

The pool calls ``guard.observe(sql, in_transaction=...)`` before every execute. Timed in the
same run, best of several repeats:

- a statement already seen, with the guard off and on: one cached lookup (target: <= 1 us);
- a never-seen 100 KB INSERT with its values written into the text, the case of an
  application that builds SQL by formatting: the cheap pre-filter, no tokenizing (target:
  <= 20 us), against the tokenizer itself on the same text, and against the cost of building
  the text, a baseline that shows what "never seen" costs the application anyway;
- a never-seen 2.6 KB INSERT of the same kind, and a never-seen short SELECT.
"""

from __future__ import annotations

import random
import sys
import time
import timeit
import warnings

from poolguard._guard import SessionStateGuard
from poolguard._sqlstate_rules import _analyze_tokens

CLEAN = (
    "SELECT o.id, o.total, c.email FROM orders o JOIN customers c ON c.id = o.customer_id "
    "WHERE o.created_at > %s AND o.status = ANY(%s) ORDER BY o.created_at DESC LIMIT 50"
)
FLAGGED = "SET search_path = app, public"
NUMBER = 200_000
REPEAT = 7
# Inlined values mention SQL keywords (which must not matter inside literals); the
# "semicolons" variant also puts "; set ..." inside them, the worst case for the pre-filter.
WORDS = ["alpha", "beta", "set", "reset", "listen", "temp", "the", "quick", "fox,", "jumps"]


def ns_per_op(guard: SessionStateGuard, sql: str, method: str = "check") -> float:
    call = getattr(guard, method)
    call(sql, in_transaction=True)  # first sight: classify and cache
    timer = timeit.Timer(lambda: call(sql, in_transaction=True))
    return min(timer.repeat(repeat=REPEAT, number=NUMBER)) / NUMBER * 1e9


def insert_text(size: int, seed: int, *, semicolons: bool = False) -> str:
    """An INSERT with `size` characters of inlined rows, different for every seed."""
    rng = random.Random(seed)
    words = [w.replace(",", ";") for w in WORDS] if semicolons else WORDS
    rows: list[str] = []
    total = 0
    while total < size:
        note = " ".join(rng.choice(words) for _ in range(5)).replace("'", "''")
        row = f"({rng.randrange(10**9)}, '{note}', {rng.random():.6f}, now(), NULL, true)"
        rows.append(row)
        total += len(row) + 2
    return "INSERT INTO events (id, note, score, at, extra, flag) VALUES " + ", ".join(rows)


def unseen_us(guard: SessionStateGuard, texts: list[str]) -> float:
    """Best per-call time of observe() over texts it has never seen (one call each)."""
    best = float("inf")
    for text in texts:
        started = time.perf_counter()
        guard.observe(text, in_transaction=True)
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def main() -> int:
    guard = SessionStateGuard("warn")
    off = ns_per_op(SessionStateGuard("off"), CLEAN)
    on = ns_per_op(guard, CLEAN)
    observe = ns_per_op(guard, CLEAN, "observe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A flagged statement after its one warning: cached findings + the warned-set check.
        flagged = ns_per_op(SessionStateGuard("warn"), FLAGGED)
    print(f"guard off, seen statement:         {off:8.1f} ns/op")
    print(f"guard on,  seen clean statement:   {on:8.1f} ns/op")
    print(f"guard on,  observe() hook, clean:  {observe:8.1f} ns/op  (target <= 1000 ns)")
    print(f"guard on,  seen flagged statement: {flagged:8.1f} ns/op (already warned)")
    print(f"difference on - off (clean):       {on - off:8.1f} ns/op")

    big = [insert_text(100_000, seed) for seed in range(REPEAT)]
    started = time.perf_counter()
    insert_text(100_000, 999)
    build_us = (time.perf_counter() - started) * 1e6
    big_us = unseen_us(guard, big)
    started = time.perf_counter()
    _analyze_tokens(big[0])
    tokenize_us = (time.perf_counter() - started) * 1e6
    worst = [insert_text(100_000, 50 + seed, semicolons=True) for seed in range(REPEAT)]
    worst_us = unseen_us(guard, worst)
    mid_us = unseen_us(guard, [insert_text(2_600, 100 + seed) for seed in range(REPEAT)])
    short_us = unseen_us(guard, [f"{CLEAN} /* {seed} */" for seed in range(REPEAT)])
    short_plain_us = unseen_us(guard, [CLEAN.replace("50", str(seed)) for seed in range(REPEAT)])
    kb = len(big[0]) / 1000
    print(f"never-seen {kb:.0f} KB INSERT, observe(): {big_us:9.1f} us  (target <= 20 us)")
    ratio = tokenize_us / big_us
    print(f"  same text through the tokenizer:  {tokenize_us:9.1f} us  ({ratio:.0f}x)")
    print(f"  building that text in Python:     {build_us:9.1f} us  (baseline)")
    print(f"  with '; set ...' inside literals: {worst_us:9.1f} us")
    print(f"never-seen 2.6 KB INSERT, observe():{mid_us:9.1f} us")
    print(f"never-seen short SELECT, observe(): {short_plain_us:9.1f} us")
    print(f"  the same with a comment:          {short_us:9.1f} us (tokenized)")
    ok = big_us <= 20 and observe <= 1000
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
