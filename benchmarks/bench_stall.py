"""How long a caller is blocked when its PostgreSQL backend stalls (SIGSTOP for STALL seconds).

Run on demand:  python benchmarks/bench_stall.py [--stall 4]
Needs a private server from poolguard.testing (it freezes one backend process with SIGSTOP and
always sends SIGCONT).  Each row runs ``SELECT 1`` on a connection whose backend is frozen and
prints how long the call took and how it ended, for the ways one might bound it: nothing,
TCP keepalives + tcp_user_timeout, statement_timeout, a signal-handler deadline (sync), and
asyncio.timeout (async).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import psycopg

from poolguard.testing import start_postgres

DEADLINE = 1.0
TCP = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
       "keepalives_count": 1, "tcp_user_timeout": 1000}  # fmt: skip


class Deadline(Exception):
    pass


@contextlib.contextmanager
def frozen_for(pid: int, stall: float) -> Iterator[None]:
    """Stop ``pid`` now and resume it after ``stall`` s, or when the block ends: always."""
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(stall, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        yield
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)


def timed(run: Callable[[], Any]) -> str:
    """How long ``run()`` took, and how it ended."""
    started = time.monotonic()
    try:
        run()
        outcome = "returned"
    except BaseException as exc:
        outcome = type(exc).__name__
    return f"{time.monotonic() - started:6.2f} s  {outcome}"


def frozen_call(dsn: str, stall: float, kwargs: dict[str, Any], run: Callable[[Any], Any]) -> str:
    conn = psycopg.connect(dsn, autocommit=True, **kwargs)
    try:  # close(), not `with conn`: after a deadline the query is still in flight
        with frozen_for(conn.info.backend_pid, stall):
            return timed(lambda: run(conn))
    finally:
        conn.close()


def with_alarm(conn: Any) -> None:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Deadline

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE)
    try:
        conn.execute("SELECT 1")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def async_frozen(dsn: str, stall: float) -> str:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            with frozen_for(conn.info.backend_pid, stall):
                async with asyncio.timeout(DEADLINE):
                    await conn.execute("SELECT 1")
        finally:
            await conn.close()

    return timed(lambda: asyncio.run(main()))


def frozen_connect(server: Any, stall: float) -> str:
    """A new connection while the postmaster itself is frozen: connect_timeout bounds it."""
    with server.connect() as conn:
        datadir = conn.execute("SHOW data_directory").fetchone()[0]
    with open(os.path.join(datadir, "postmaster.pid")) as pidfile:
        pid = int(pidfile.readline())
    with frozen_for(pid, stall):
        return timed(lambda: psycopg.connect(server.dsn, connect_timeout=2).close())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stall", type=float, default=4.0, help="seconds the backend is frozen")
    stall = parser.parse_args(argv).stall
    server = start_postgres()
    try:
        dsn = server.dsn
        rows = {
            "nothing": frozen_call(dsn, stall, {}, lambda c: c.execute("SELECT 1")),
            "keepalives 1 s + tcp_user_timeout 1 s": frozen_call(
                dsn, stall, TCP, lambda c: c.execute("SELECT 1")
            ),
            "statement_timeout 1 s": frozen_call(
                dsn,
                stall,
                {"options": "-c statement_timeout=1000"},
                lambda c: c.execute("SELECT 1"),
            ),
            f"signal deadline {DEADLINE:g} s (sync)": frozen_call(dsn, stall, {}, with_alarm),
            f"asyncio.timeout({DEADLINE:g})": async_frozen(dsn, stall),
            "new connection, postmaster frozen, connect_timeout 2": frozen_connect(server, stall),
        }
    finally:
        server.stop()
    print(f"backend frozen for {stall:g} s; time until SELECT 1 came back, and how:")
    for name, row in rows.items():
        print(f"  {name:42} {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
