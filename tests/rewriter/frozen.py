"""A PostgreSQL server frozen for a moment: its postmaster stopped with SIGSTOP accepts TCP
connections (the kernel completes them) but answers none, so an upstream login hangs."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from poolguard.testing import PostgresServer


@contextlib.contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    with server.connect() as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    postmaster = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(postmaster, signal.SIGCONT)
