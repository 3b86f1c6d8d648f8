"""What a pool does when PostgreSQL has no connection slot left (SQLSTATE 53300).

A pool that meets a full server while growing should keep the connections it has, stop
asking for more for a while, say so once, and serve its callers from its queue: every
caller that waits gets a connection another caller returns.  psycopg_pool's own answer is to
retry the failed connection with exponential back-off for ``reconnect_timeout`` (five
minutes), logging a WARNING on every attempt.

This module holds the decisions, shared by the sync and async pools; the pools do the I/O
(``resize()`` and the wait) in ``GuardedPool._server_full`` and its async twin.  The refused
attempt itself becomes the back-off: it waits inside the pool's connect, so psycopg_pool never
sees the refusal, never logs it and never schedules its own retries; when the wait is over
the cap is lifted and the same attempt connects again.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Final

from ._budget import ServerLimits

logger = logging.getLogger("poolguard")

#: The first back-off, in seconds.  Slots on a full server come back when other processes'
#: idle connections time out or their requests end: seconds, not milliseconds, and each retry
#: costs the server a process fork.
FIRST_BACKOFF: Final = 5.0
#: Consecutive refusals double the back-off up to this: a pool stuck below its size tries its
#: full size again at least once a minute.
MAX_BACKOFF: Final = 60.0

# libpq gives no SQLSTATE for a refused connection (psycopg's error has sqlstate None), so the
# server's FATAL text is all there is.  PostgreSQL's 53300 messages: the server is full
# (postmaster and InitProcess), only reserved slots are left (wording changed in 16), and the
# per-role and per-database CONNECTION LIMIT.  A server running with translated messages
# (lc_messages) is not recognised: its refusals take psycopg_pool's ordinary retry path.
_TOO_MANY: Final = re.compile(
    r"sorry, too many clients already"
    r"|remaining connection slots are reserved"
    r"|too many connections for (?:role|database)"
)


def is_too_many_connections(exc: BaseException) -> bool:
    """Whether a connection attempt failed because the server had no slot (53300)."""
    return getattr(exc, "sqlstate", None) == "53300" or bool(_TOO_MANY.search(str(exc)))


def refusal_text(exc: BaseException) -> str:
    """The server's reason, from the last FATAL line of a refused connection."""
    lines = [line.strip() for line in str(exc).splitlines() if _TOO_MANY.search(line)]
    text = lines[-1] if lines else str(exc).strip()
    return text.split("FATAL:", 1)[-1].strip()


def limit_text(limits: ServerLimits | None) -> str:
    """The server's connection limit, with the figures when the budget check at open read them."""
    if limits is None:
        return "max_connections reached"
    reserved = limits.superuser_reserved_connections + limits.reserved_connections
    return f"max_connections={limits.max_connections}, {reserved} reserved"


@dataclass(frozen=True, slots=True)
class Step:
    """What a refused connection attempt does next: wait `delay` s, after capping at `cap`."""

    delay: float
    #: The new max_size, or None when another attempt's back-off is already running (then
    #: this attempt only waits for it to end).
    cap: int | None
    #: Which back-off this is; only its owner lifts the cap (see Backoff.lift).
    generation: int


class Backoff:
    """One pool's state while the server refuses it: the cap, the back-off, the one warning."""

    def __init__(self, name: str, max_size: int) -> None:
        self.name = name
        self.max_size = max_size
        #: The server's figures from the budget check at open, to name the limit.
        self.limits: ServerLimits | None = None
        #: The max_size in force while capped; None at full size.
        self.cap: int | None = None
        #: How many times the pool capped itself.
        self.caps = 0
        self._lock = threading.Lock()
        self._until = 0.0
        self._delay = 0.0
        self._generation = 0
        self._warned = False

    def refused(self, exc: BaseException, live: int, now: float) -> Step | None:
        """A connection attempt was refused with 53300 while `live` connections are open.

        Returns None when there is nothing to cap at (no connection to serve callers with):
        the attempt should fail as any failed connection does.
        """
        with self._lock:
            if now < self._until:  # another attempt's back-off is running: join it quietly
                return Step(self._until - now, None, self._generation)
            if live < 1:
                return None
            self._delay = delay = (
                min(MAX_BACKOFF, self._delay * 2) if self._delay else FIRST_BACKOFF
            )
            self._until = now + delay
            self._generation += 1
            step = Step(delay, min(live, self.max_size), self._generation)
            self.cap = step.cap
            self.caps += 1
            first, self._warned = not self._warned, True
        logger.log(
            logging.WARNING if first else logging.INFO,
            "pool %r: the server refused a new connection (%s; %s); capped at the %d "
            "connection(s) it has instead of max_size %d, serving callers from its queue, "
            "trying max_size %d again in %g s%s",
            self.name,
            refusal_text(exc),
            limit_text(self.limits),
            step.cap,
            self.max_size,
            self.max_size,
            delay,
            " (lower max_size x processes to fit: `poolguard doctor` shows the budget)"
            if first
            else "",
        )
        return step

    def lift(self, step: Step) -> bool:
        """The back-off of `step` is over: True if its owner should restore max_size now."""
        with self._lock:
            if step.cap is None or step.generation != self._generation or self.cap is None:
                return False
            self.cap = None
        logger.info("pool %r: back-off over, trying max_size %d again", self.name, self.max_size)
        return True

    def connected(self) -> None:
        """A new connection was opened: at full size, the next refusal starts a fresh back-off."""
        if self._delay and self.cap is None:
            with self._lock:
                if self.cap is None:
                    self._delay = 0.0
