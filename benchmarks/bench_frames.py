"""Checkout cost through a deep library stack: where-was-it-taken must not grow with depth.

Run on demand:  python benchmarks/bench_frames.py [--rounds 7] [--ops 20000]

Each checkout records the first frame outside poolguard, the drivers and the ORMs. An ORM
checkout starts 15-25 library frames below the application's line. Here the same
``getconn()/putconn()`` pair runs from application code directly (2 frames: the app function
and the pool) and through 23 frames of library code (functions compiled with a file name
inside SQLAlchemy's package, which poolguard treats as library code), interleaved round by
round, best round of each, timed in this thread's CPU time (the checkout does no I/O, and
CPU time is what other processes on a shared machine disturb least). The 23 extra calls
cost time of their own, so the same two stacks
also run a call that does nothing, and that difference is taken off the deep checkout before
comparing. Target (issue 11): 25 frames <= 1.10x 2 frames.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy
from _common import database, parse_args

import poolguard
from poolguard import _ledger

LIBRARY_FILE = str(Path(sqlalchemy.__file__).parent / "orm" / "_bench_frames.py")


def through_library(frames: int, body: str, **names: Any) -> Callable[[], Any]:
    """`frames` nested functions whose code says it lives in SQLAlchemy; the innermost runs
    the statement `body` (library code calling the pool, as an ORM does)."""
    source = f"def lib0():\n    {body}\n"
    for i in range(1, frames):
        source += f"def lib{i}():\n    return lib{i - 1}()\n"
    namespace: dict[str, Any] = dict(names)
    exec(compile(source, LIBRARY_FILE, "exec"), namespace)
    return namespace[f"lib{frames - 1}"]  # type: ignore[no-any-return]


def per_op(fn: Callable[[], None], ops: int) -> float:
    """CPU seconds of this thread per call of ``fn``, over ``ops`` calls."""
    started = time.thread_time()
    for _ in range(ops):
        fn()
    return (time.thread_time() - started) / ops


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=20000, argv=argv)
    dsn, server = database()
    pool = poolguard.configure(dsn, name="bench", min_size=1, max_size=1, guard="off")
    pool.open()

    def checkout() -> None:
        pool.putconn(pool.getconn())

    deep = through_library(23, "pool.putconn(pool.getconn())", pool=pool)
    deep_nothing = through_library(23, "pass")
    sites = []

    def shallow_app() -> None:  # app -> pool: 2 frames
        checkout()

    def deep_app() -> None:  # app -> 23 library frames -> pool: 25 frames
        deep()

    def shallow_nothing() -> None:
        (lambda: None)()

    def deep_nothing_app() -> None:
        deep_nothing()

    class NoJumps(dict[Any, Any]):
        def __setitem__(self, key: Any, value: Any) -> None:
            pass

    def deep_walking() -> None:  # the same with the jump cache off: every checkout walks
        jumps, _ledger._skips = _ledger._skips, NoJumps()
        try:
            deep()
        finally:
            _ledger._skips = jumps

    cases = {
        "2 frames": shallow_app,
        "25 frames": deep_app,
        "25 frames, cache off": deep_walking,
        "2 frames, no checkout": shallow_nothing,
        "25 frames, no checkout": deep_nothing_app,
    }

    try:
        # The site recorded through 25 frames is the app's own line.
        held: list[Any] = []
        take = through_library(23, "held.append(pool.getconn())", pool=pool, held=held)
        take()
        sites.append(pool.checkouts()[0].site)
        pool.putconn(held.pop())
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.rounds):
            for label, fn in cases.items():
                best[label] = min(best[label], per_op(fn, args.ops))
    finally:
        poolguard.reset()
        if server is not None:
            server.stop()
    calls = best["25 frames, no checkout"] - best["2 frames, no checkout"]
    ratio = (best["25 frames"] - calls) / best["2 frames"]
    for label, seconds in best.items():
        print(f"getconn()+putconn() through {label:22}: {seconds * 1e6:6.2f} us/op")
    print(f"the 23 extra calls themselves: {calls * 1e6:.2f} us")
    print(f"sites recorded: {sites}")
    walking = (best["25 frames, cache off"] - calls) / best["2 frames"]
    print(f"the same without the jump cache (every frame walked): {walking:.3f}")
    verdict = "ok" if ratio <= 1.10 else "MISSED"
    print(f"(25 frames - the calls) / 2 frames: {ratio:.3f} (target <= 1.10): {verdict}")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
