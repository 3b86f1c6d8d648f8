"""Fault injection for the chaos tests: a private PostgreSQL that can be stopped, restarted
and frozen without changing its port or data.

The server runs as its own unprivileged user; this process stops it with the postmaster's
signals (SIGINT: fast shutdown, SIGQUIT: immediate) and starts it again from the command line
the postmaster recorded in ``postmaster.opts``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

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
            if not (self.datadir / "postmaster.pid").exists() and not _alive(pid):
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


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for its parent to reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Stop one backend process (SIGSTOP) for the block: a stalled server, as the client sees it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
