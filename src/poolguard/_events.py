"""Typed pool events and their delivery to the ``on_event`` callables, rate-limited.

A pool calls :meth:`Events.emit` at the points where it already decides something went wrong
(exhausted, leak, idle in transaction, server full, dirty return, connect refused).  With no
``on_event`` setting that is one attribute test.  Otherwise the first event of a kind within
``event_interval`` seconds is queued, the rest of that interval are only counted (the next
event delivered says how many were left out), and a daemon thread calls the hooks, so a slow
webhook never delays a caller and a failing one never raises into the pool.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

logger = logging.getLogger("poolguard")

EventKind = Literal[
    "exhausted",
    "leak",
    "idle_in_transaction",
    "server_full",
    "dirty_return",
    "discarded",
    "connection_refused",
]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)


@dataclass(frozen=True)
class PoolEvent:
    """Something a pool found wrong, for ``on_event`` hooks.  Never carries a password."""

    #: What happened: one of EVENT_KINDS.
    kind: EventKind
    #: The pool's name.
    pool: str
    #: One line for a human, the same words as the pool's log line or error.
    message: str
    #: The app's line involved: the oldest holder (exhausted), the taker (leak, idle in
    #: transaction, dirty return); None when no line applies.
    site: str | None = None
    #: Seconds the connection at ``site`` had been held, when that applies.
    age: float | None = None
    #: Wall-clock time (time.time()) when the pool found it.
    time: float = field(default_factory=time.time)
    #: Events of this kind and pool left out (rate limit) since the previous one delivered.
    suppressed: int = 0
    #: Figures particular to the kind (in_use, max_size, pending, backend_pid, ...).
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for webhooks)."""
        return {
            "kind": self.kind,
            "pool": self.pool,
            "message": self.message,
            "site": self.site,
            "age": self.age,
            "time": self.time,
            "suppressed": self.suppressed,
            "details": dict(self.details),
        }


Hook = Callable[[PoolEvent], object]


class Events:
    """One pool's event source: the hooks, the interval, and what the interval let through."""

    __slots__ = ("_last", "_lock", "_suppressed", "hooks", "interval", "pool")

    def __init__(self, pool: str, hooks: tuple[Hook, ...], interval: float) -> None:
        self.pool = pool
        self.hooks = hooks
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def emit(
        self,
        kind: EventKind,
        message: str,
        site: str | None = None,
        age: float | None = None,
        **details: Any,
    ) -> None:
        """Queue an event for the hooks unless one of this kind went out within the interval."""
        if not self.hooks:
            return
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        event = PoolEvent(
            kind,
            self.pool,
            message,
            site,
            age,
            suppressed=suppressed,
            details=MappingProxyType(details),
        )
        _outbox.put((self.hooks, event))
        _ensure_thread()


# Delivery: one daemon thread per process, started on the first event.
_outbox: queue.SimpleQueue[tuple[tuple[Hook, ...], PoolEvent] | None] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_thread_lock = threading.Lock()
_pending = 0
_idle = threading.Condition(_thread_lock)


def _ensure_thread() -> None:
    global _thread, _pending
    with _thread_lock:
        _pending += 1
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_deliver, name="poolguard-events", daemon=True)
            _thread.start()


def _deliver() -> None:
    global _pending
    while True:
        item = _outbox.get()
        if item is None:
            return
        hooks, event = item
        for hook in hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("pool %r: on_event hook %r failed", event.pool, hook)
        del item, hooks, event
        with _thread_lock:
            _pending -= 1
            _idle.notify_all()


def flush(timeout: float = 5.0) -> bool:
    """Wait until every queued event went to its hooks; False if ``timeout`` passed first."""
    with _thread_lock:
        return _idle.wait_for(lambda: _pending == 0, timeout)


def _after_fork_in_child() -> None:
    global _outbox, _thread, _thread_lock, _idle, _pending
    # The parent's thread does not exist here; its queue and lock may be mid-use.
    _outbox = queue.SimpleQueue()
    _thread = None
    _thread_lock = threading.Lock()
    _idle = threading.Condition(_thread_lock)
    _pending = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
# A short script's last events would die with the daemon thread: give them a moment at exit.
atexit.register(flush, 2.0)
