"""Checkout cost through a deep library stack: where-was-it-taken must not grow with depth.

Run on demand:  python benchmarks/bench_frames.py [--rounds 30] [--ops 3000]

Each checkout records the first frame outside poolguard, the drivers and the ORMs. An ORM
checkout starts 15-25 library frames below the application's line. Here the same
``getconn()/putconn()`` pair runs (interleaved round by round, best round of each, in this
thread's CPU time: the checkout does no I/O, and CPU time is what other processes on a
shared machine disturb least):

- from the application directly (2 frames: the app function, then the one calling the pool);
- through 23 frames of library code (functions compiled with a file name inside SQLAlchemy's
  package, which poolguard treats as library code): 25 frames;
- through the same 23 functions compiled as application code: the same calls, but the site
  is the first frame looked at, so this is the 25-frame stack without any walk;
- through the library frames with the jump cache off: every frame walked.

Target (issue 11): 25 frames <= 1.10x 2 frames. The 23 calls cost time of their own, whoever
owns them, so the ratio checked is against the same 25-frame stack compiled as app code (the
site found at the first frame). Also printed: against the 2-frame checkout plus the 23 calls
measured with a body that does nothing, which leaves in what a deeper stack costs the checkout
itself (the app-code stack pays it too).
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
APP_FILE = str(Path(__file__).with_name("_bench_frames_app.py"))


def through(frames: int, body: str, filename: str, **names: Any) -> Callable[[], Any]:
    """`frames` nested functions compiled as if they lived in `filename`; the innermost runs
    the statement `body` (for LIBRARY_FILE: library code calling the pool, as an ORM does)."""
    source = f"def f0():\n    {body}\n"
    for i in range(1, frames):
        source += f"def f{i}():\n    return f{i - 1}()\n"
    namespace: dict[str, Any] = dict(names)
    exec(compile(source, filename, "exec"), namespace)
    return namespace[f"f{frames - 1}"]  # type: ignore[no-any-return]


def per_op(fn: Callable[[], None], ops: int) -> float:
    """CPU seconds of this thread per call of ``fn``, over ``ops`` calls."""
    started = time.thread_time()
    for _ in range(ops):
        fn()
    return (time.thread_time() - started) / ops


class NoJumps(dict[Any, Any]):
    """Forgets every verdict: each checkout walks and judges every frame again."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, ops=3000, argv=argv)
    args.rounds = max(args.rounds, 30)
    dsn, server = database()
    pool = poolguard.configure(dsn, name="bench", min_size=1, max_size=1, guard="off")
    pool.open()
    body = "pool.putconn(pool.getconn())"

    def checkout() -> None:
        pool.putconn(pool.getconn())

    library = through(23, body, LIBRARY_FILE, pool=pool)
    app_code = through(23, body, APP_FILE, pool=pool)
    nothing = through(23, "pass", LIBRARY_FILE)

    def walking() -> None:
        verdicts, _ledger._verdicts = _ledger._verdicts, NoJumps()
        try:
            library()
        finally:
            _ledger._verdicts = verdicts

    cases: dict[str, Callable[[], None]] = {
        "2 frames": checkout,
        "25 frames, library": library,
        "25 frames, app code": app_code,
        "25 frames, library, cache off": walking,
        "2 frames, no checkout": lambda: None,
        "25 frames, no checkout": nothing,
    }
    try:
        held: list[Any] = []
        take = through(23, "held.append(pool.getconn())", LIBRARY_FILE, pool=pool, held=held)
        take()
        site = pool.checkouts()[0].site  # the app's line, through 23 library frames
        pool.putconn(held.pop())
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.rounds):
            for label, fn in cases.items():
                best[label] = min(best[label], per_op(fn, args.ops))
    finally:
        poolguard.reset()
        if server is not None:
            server.stop()
    for label, seconds in best.items():
        print(f"getconn()+putconn() through {label:30}: {seconds * 1e6:6.2f} us/op")
    print(f"site recorded through 23 library frames: {site}")
    calls = best["25 frames, no checkout"] - best["2 frames, no checkout"]
    same_stack = best["25 frames, library"] / best["25 frames, app code"]
    plus_calls = best["25 frames, library"] / (best["2 frames"] + calls)
    walked = best["25 frames, library, cache off"] / best["25 frames, app code"]
    print(f"25 library frames / the same stack found at once: {same_stack:.3f}")
    print(f"25 library frames / (2 frames + the 23 calls):     {plus_calls:.3f}")
    print(f"cache off (every frame walked) / found at once:   {walked:.3f}")
    ok = same_stack <= 1.10
    print(f"target <= 1.10: {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
