"""Fault injection for the chaos tests: a private PostgreSQL that can be stopped and restarted
without changing its port or data, a PgBouncer that can be restarted, and the load.

The server runs as its own unprivileged user; this process stops it with the postmaster's
signals (SIGINT: fast shutdown, SIGQUIT: immediate) and starts it again from the command line
the postmaster recorded in ``postmaster.opts``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from polling import process_running
from poolguard.testing import PostgresServer

_SHUTDOWN = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class ServerControl:
    """Stop, start and freeze one PostgresServer without changing its port or data."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        with server.connect() as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        self.datadir = Path(row[0])
        owner = self.datadir.stat()
        self._user = {"user": owner.st_uid, "group": owner.st_gid} if os.geteuid() == 0 else {}
        self._argv = shlex.split((self.datadir / "postmaster.opts").read_text())
        self._popen: subprocess.Popen[bytes] | None = None

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        return None

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down (``fast`` or ``immediate``) and wait until it is gone."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        os.kill(pid, _SHUTDOWN[mode])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._popen is not None and self._popen.poll() is not None:
                break
            if not (self.datadir / "postmaster.pid").exists() and not process_running(pid):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"PostgreSQL (pid {pid}) did not stop in 30 s")
        self._popen = None

    def start(self) -> None:
        """Start the server again from its recorded command line; return once it answers."""
        log = open(self.datadir.parent / "restart.log", "ab")  # noqa: SIM115 - the server keeps it
        with log:
            self._popen = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.datadir.parent,
                start_new_session=True,
                **self._user,  # type: ignore[arg-type]
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.server.connect(connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def backend_pids(self, application_name: str) -> list[int]:
        with self.server.connect() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            ).fetchall()
        return [pid for (pid,) in rows]

    def close(self) -> None:
        """Stop a server this object started (the fixture that made the first one stops that)."""
        if self._popen is not None:
            self.stop("fast")


# --- the load every scenario runs, and what it saw --------------------------------------------

#: One query that reads everything a dirty return could leave behind.
CHECK_SQL = (
    "SELECT current_setting('statement_timeout'), current_setting('search_path'), "
    "coalesce(current_setting('app.tenant', true), ''), "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
)
#: Session state a transaction leaves behind on purpose (every ``dirty_every``-th one).
DIRTY = (
    "SET statement_timeout = '4321'",
    "SET search_path = pg_catalog, public",
    "SELECT pg_try_advisory_lock(42)",  # a blocking lock would hang a pool that leaks it
    "SELECT set_config('app.tenant', 'tenant-x', false)",
)


@dataclass
class Outcome:
    """What the callers saw during one scenario."""

    committed: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    dirty: list[tuple[Any, ...]] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    fault_window: tuple[float, float] = (0.0, 0.0)
    transactions: int = 0
    #: Callers still blocked 30 s after the load ended (a response lost to another process).
    hung: int = 0

    def recovery(self) -> float | None:
        """Seconds from the end of the fault to the first commit after it (None: never)."""
        after = [t for t in self.ok_times if t >= self.fault_window[1]]
        return min(after) - self.fault_window[1] if after else None


def defaults(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(CHECK_SQL).fetchone()
    assert row is not None
    return tuple(row)


def run_load(
    checkout: Callable[[], AbstractContextManager[Any]],
    *,
    expected: tuple[Any, ...],
    workers: int = 4,
    seconds: float = 4.0,
    fault: Callable[[], None] | None = None,
    fault_at: float = 1.0,
    after_fault: float = 3.0,
    dirty_every: int = 5,
    work_sql: str | None = None,
) -> Outcome:
    """``workers`` threads commit one uniquely-identified row per transaction for ``seconds``,
    checking at each checkout that the session looks like a fresh one; ``fault`` runs once in
    its own thread ``fault_at`` s in, and the load goes on until at least ``after_fault`` s
    after the fault is over.

    How long a fault takes depends on the machine (filling a server opens dozens of
    connections; a restart waits for the server): the load must outlast it by more than the
    recovery bound, or a slow machine ends the load before recovery can be seen.
    """
    out = Outcome()
    lock = threading.Lock()
    run = f"{os.getpid()}-{time.monotonic_ns()}"
    deadline = time.monotonic() + seconds
    fault_over = threading.Event()
    stopped = threading.Event()  # the load is over whatever the fault does

    def running() -> bool:
        if stopped.is_set():
            return False
        now = time.monotonic()
        if now < deadline:
            return True
        if fault is None:
            return False
        return not fault_over.is_set() or now < out.fault_window[1] + after_fault

    def worker(wid: int) -> None:
        i = 0
        while running():
            i += 1
            uid = f"{run}-{wid}-{i}"
            try:
                with checkout() as conn:
                    row = tuple(conn.execute(CHECK_SQL).fetchone())
                    if work_sql:
                        conn.execute(work_sql)
                    conn.execute("INSERT INTO commits VALUES (%s, %s)", (uid, wid))
                    if dirty_every and i % dirty_every == 0:
                        conn.execute(DIRTY[(i // dirty_every) % len(DIRTY)])
                with lock:
                    out.committed.add(uid)
                    out.ok_times.append(time.monotonic())
                    out.transactions += 1
                    if row != expected:
                        out.dirty.append(row)
            except Exception as exc:
                with lock:
                    out.errors.append(exc)
                    out.transactions += 1
                time.sleep(0.02)  # a caller that failed does not spin

    def inject() -> None:
        time.sleep(fault_at)
        started = time.monotonic()
        assert fault is not None
        try:
            fault()
        finally:
            out.fault_window = (started, time.monotonic())
            fault_over.set()

    # Daemon threads: a caller that never comes back is counted, not waited for forever.
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
    if fault is not None:
        threads.append(threading.Thread(target=inject, daemon=True))
    for thread in threads:
        thread.start()
    if fault is not None:
        threads[-1].join(seconds + 60)  # the fault itself: a server restart waits up to 30 s
    end = max(deadline, out.fault_window[1] + after_fault)
    for thread in threads:
        thread.join(max(0.0, end + 30 - time.monotonic()))
    out.hung = sum(thread.is_alive() for thread in threads)
    stopped.set()
    return out


def lost_commits(dsn: str, committed: set[str]) -> set[str]:
    """The ids a caller saw commit that are not in the table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        present = {uid for (uid,) in conn.execute("SELECT id FROM commits")}
    return committed - present


def terminate_backends(admin_dsn: str, dbname: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )


def cancel_queries(admin_dsn: str, dbname: str, seconds: float) -> None:
    """Cancel every running statement in ``dbname`` every 50 ms for ``seconds``."""
    deadline = time.monotonic() + seconds
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            conn.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                "AND state = 'active' AND pid <> pg_backend_pid()",
                (dbname,),
            )
            time.sleep(0.05)


def fill_server(admin_dsn: str, seconds: float) -> None:
    """Take every free connection slot of the server for ``seconds``."""
    held: list[psycopg.Connection[Any]] = []
    try:
        while True:
            try:
                held.append(psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5))
            except psycopg.OperationalError:
                break
        time.sleep(seconds)
    finally:
        for conn in held:
            conn.close()


class BouncerControl:
    """Restart a PgBouncer started by poolguard.testing on the same port and configuration."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.argv, self.pid = self._find()
        owner = Path(self.argv[-1]).stat()
        self._user = {"user": owner.st_uid, "group": owner.st_gid} if os.geteuid() == 0 else {}
        self._popen: subprocess.Popen[bytes] | None = None

    def _find(self) -> tuple[list[str], int]:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")[:-1]
                if argv and argv[0].endswith(b"pgbouncer") and len(argv) == 2:
                    ini = Path(argv[1].decode())
                    if f"listen_port = {self.port}\n" in ini.read_text():
                        return [a.decode() for a in argv], int(proc.name)
        raise AssertionError(f"no pgbouncer listening on port {self.port}")

    def restart(self) -> None:
        os.kill(self.pid, signal.SIGTERM)  # immediate shutdown: clients are disconnected
        deadline = time.monotonic() + 15
        while process_running(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **self._user,  # type: ignore[arg-type]
        )
        self.pid = self._popen.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise AssertionError("pgbouncer did not come back")

    def close(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()
            self._popen.wait(15)
