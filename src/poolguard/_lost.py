"""Connections garbage-collected while checked out: queued by ``__del__``, freed by the watchdog.

``__del__`` may run in any thread, between any two bytecodes: it does no I/O and takes no lock,
it only resurrects the connection into a queue (SimpleQueue's put() is the one that is safe
there) and warns.  The watchdog thread takes it from the queue and asks its pool to close it and
free its slot.
"""

from __future__ import annotations

import queue
import sys
import warnings
from time import monotonic
from typing import Any

from ._errors import PoolGuardWarning


class ConnectionLeakWarning(PoolGuardWarning):
    """A checked-out connection was garbage-collected without being returned to its pool."""


ConnectionLeakWarning.__module__ = "poolguard"

_queue: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()


def adopt(pool: Any, conn: Any) -> bool:
    """From ``__del__``: queue ``conn`` if ``pool`` has it checked out; True if queued.

    The warning is issued here, in the thread that dropped the connection, so a test's
    ``-W error`` fails that very test.
    """
    if sys.is_finalizing():
        return False
    record = pool.ledger.record(id(conn))
    if record is None:
        return False
    _queue.put((pool, conn))  # resurrects it until the watchdog is done
    warnings.warn_explicit(
        f"connection taken at {record.site} was garbage-collected without being returned to "
        f"pool {pool.name!r} (held {monotonic() - record.taken_at:.2f} s); poolguard freed its "
        "slot",
        ConnectionLeakWarning,
        record.code.co_filename if record.code else "<unknown>",
        record.line,
    )
    return True


def next_lost(timeout: float) -> tuple[Any, Any] | None:
    """The next (pool, connection) to free, waiting up to ``timeout``; None if none came."""
    try:
        return _queue.get(timeout=timeout)
    except queue.Empty:
        return None


def empty() -> bool:
    return _queue.empty()


def after_fork_in_child() -> None:
    global _queue
    _queue = queue.SimpleQueue()
