"""What a pool remembers while it cannot open connections: the reason, and when to retry.

A server that is down, restarting, unreachable or refusing the login makes every attempt fail.
psycopg_pool's own answer is to retry with exponential back-off (1, 2, 4 ... s for five
minutes) while callers wait out their timeout and are told the pool was exhausted.  Instead
the failed attempt itself waits a short, bounded delay and tries again (inside the pool's
connect, like the full-server back-off in _toomany), so the pool is back within a second of the
server; and a caller that times out meanwhile is told the server's reason (PoolConnectError),
not a count of busy connections.  The pools do the I/O and the logging; this is the state.
"""

from __future__ import annotations

import threading
from typing import Final

#: The first retry, in seconds: a restart's refusals last about a second.
FIRST_RETRY: Final = 0.1
#: Retries double up to this while the server does not answer or says it is starting or
#: shutting down (class 57); recovery after a restart is then at most this late.  A refused
#: connection costs the server nothing; an attempt it answers costs a process fork.
RETRY_CAP: Final = 1.0
#: The cap when the server answers with another refusal (wrong password, unknown database,
#: no free slot): retrying those every second only fills its log.
ANSWERED_RETRY_CAP: Final = 5.0


class Outage:
    """One pool's run of failed connection attempts, from the first failure to the next success."""

    __slots__ = ("_delay", "_lock", "reason", "since")

    def __init__(self) -> None:
        #: The last failed attempt's error; None while the pool connects fine.
        self.reason: BaseException | None = None
        #: monotonic() at the first failure of this outage.
        self.since = 0.0
        self._delay = 0.0
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, now: float) -> tuple[float, bool]:
        """An attempt failed: (seconds before the next one, whether this began the outage)."""
        sqlstate = getattr(exc, "sqlstate", None) or ""
        cap = RETRY_CAP if not sqlstate or sqlstate.startswith("57") else ANSWERED_RETRY_CAP
        with self._lock:
            first = self.reason is None
            if first:
                self.since, self._delay = now, FIRST_RETRY
            else:
                self._delay = min(cap, self._delay * 2)
            self.reason = exc
            return self._delay, first

    def connected(self, now: float) -> float | None:
        """An attempt succeeded: how long the outage lasted, or None if there was none."""
        if self.reason is None:  # the hot path: one attribute read
            return None
        with self._lock:
            if self.reason is None:
                return None
            self.reason = None
            return now - self.since
