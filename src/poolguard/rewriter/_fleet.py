"""One proxy as several worker processes on one listening port (``workers=N``).

Each worker is a whole proxy on its own event loop, so a proxy is not limited to one core;
the kernel spreads client connections across them (SO_REUSEPORT). What they must agree on
lives here, as pure functions of (index, count, folder):

- the connection budget: each (user, database) pool's size is split between the workers, so
  together they never open more server connections than the size configured;
- cancel routing: the pid a client is given says which worker serves it, and a CancelRequest
  that reaches another worker is passed on to that one's private socket;
- the admin views: each worker publishes its rows to a file in the fleet's private folder
  every ``PUBLISH_INTERVAL`` seconds, and a console answers with its own live rows plus its
  peers' latest ones (``_admin.merge``).

The folder is created by the parent with mode 0700, so only this user reaches the workers'
private sockets, which trust their clients without a password (as a ``listen`` folder does).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

#: Seconds between a worker's publications of its admin rows.
PUBLISH_INTERVAL = 0.5
#: Rows older than this belong to a worker that stopped (or is restarting): left out.
STALE_AFTER = 5.0


@dataclass(frozen=True)
class Worker:
    """This process's place in the fleet; ``Worker()`` is a proxy of one process."""

    index: int = 0
    count: int = 1
    folder: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} is not in 0..{self.count - 1}")
        if self.count > 1 and not self.folder:
            raise ValueError("workers > 1 needs the fleet's private folder")

    @property
    def solo(self) -> bool:
        return self.count == 1

    def share(self, size: int) -> int:
        """This worker's part of a pool of ``size`` server connections; the parts add up to
        ``size`` and differ by at most one."""
        return size // self.count + (self.index < size % self.count)

    def pid(self, serial: int) -> int:
        """The ``serial``-th (from 1) client pid this worker gives out: unique in the fleet,
        and ``owner()`` finds the worker from it."""
        return self.index + self.count * serial

    def owner(self, pid: int) -> int:
        return pid % self.count

    def socket_path(self, index: int) -> str:
        """Worker ``index``'s private socket (libpq: host=<folder> port=<index + 1>)."""
        return os.path.join(self.folder, f".s.PGSQL.{index + 1}")

    def publish(self, rows: dict[str, Any]) -> None:
        """Replace this worker's published admin rows (atomically: readers never see half)."""
        path = self._rows_path(self.index)
        scratch = f"{path}.{os.getpid()}.tmp"
        with open(scratch, "w", encoding="utf-8") as f:
            json.dump(rows, f)
        os.replace(scratch, path)

    def peer_rows(self) -> list[dict[str, Any]]:
        """The other workers' latest published rows, those fresh enough to be alive."""
        found = []
        now = time.time()
        for index in range(self.count):
            if index == self.index:
                continue
            path = self._rows_path(index)
            with contextlib.suppress(OSError, ValueError):
                if now - os.stat(path).st_mtime > STALE_AFTER:
                    continue
                with open(path, encoding="utf-8") as f:
                    found.append(json.load(f))
        return found

    def leave(self) -> None:
        """At stop: remove this worker's socket and rows, and the folder once it is empty (the
        last worker to stop removes it, so it goes even when the parent was killed)."""
        for path in (self.socket_path(self.index), self._rows_path(self.index)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):  # not empty yet: a peer still runs
            os.rmdir(self.folder)

    def _rows_path(self, index: int) -> str:
        return os.path.join(self.folder, f"rows-{index}.json")


def check_workers(
    workers: object, sizes: dict[str, int], *, listen_folder: bool, isolate: bool
) -> None:
    """``workers`` checked against the pool sizes (each worker needs a connection of every
    pool), the listen address and ``isolate`` (each worker is a process)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if workers == 1:
        return
    if not isolate:
        raise ValueError("workers > 1 needs isolate=True: each worker is a process of its own")
    if listen_folder:
        raise ValueError(
            "workers > 1 needs listen=HOST:PORT (the workers share one TCP port); a unix "
            "socket folder is served by one process"
        )
    for name, size in sizes.items():
        if size < workers:
            raise ValueError(
                f"workers={workers} is more than {name}={size}: each worker holds part of "
                f"every pool, so lower workers or raise {name} to at least {workers}"
            )
