"""Retiring what has outlived its use: one periodic sweep per proxy closes server connections
idle longer than ``server_idle_timeout`` or older than ``server_lifetime`` (a busy one when its
client gives it back), and drops (user, database) pools left with no clients and no server
connections for ``pool_idle_timeout``.

The sweep, not the hot path, keeps the clocks: giving a connection back only stores
``idle_since = None`` (``BackendPool.release``), and the first sweep that finds it idle stamps
the time. So a connection is closed after at least ``server_idle_timeout`` of idleness, and
at most two sweep intervals later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass

from ._pool import Backend
from ._pools import Pair, Pools

logger = logging.getLogger("poolguard.rewriter")

#: A connection's lifetime is ``server_lifetime`` less a random share of up to this much, so
#: connections opened together (at start, after an outage) do not all reconnect together.
LIFETIME_JITTER = 0.1

#: The sweep runs this often at most; with smaller timeouts, a quarter of the smallest.
MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.01


@dataclass(frozen=True)
class Lifecycle:
    """The three timeouts, in seconds; 0 turns one off."""

    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    pool_idle_timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("server_idle_timeout", "server_lifetime", "pool_idle_timeout"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value < math.inf:
                raise ValueError(
                    f"{name} must be a number of seconds >= 0 (0 turns it off), got {value!r}"
                )

    def interval(self) -> float | None:
        """Seconds between sweeps, or None when every timeout is off (no sweep at all)."""
        limits = (self.server_idle_timeout, self.server_lifetime, self.pool_idle_timeout)
        on = [t for t in limits if t > 0]
        if not on:
            return None
        return min(MAX_INTERVAL, max(MIN_INTERVAL, min(on) / 4))


class Reaper:
    """The proxy's periodic sweep over its pools."""

    def __init__(self, pools: Pools, limits: Lifecycle) -> None:
        self.pools = pools
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        interval = self.limits.interval()
        if interval is None or self._timer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval, self._tick, interval)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self, interval: float) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self.sweep(loop.time())
        except Exception:  # a bug here must not end the sweeps for the proxy's whole life
            logger.exception("the server connection sweep failed")
        self._timer = loop.call_later(interval, self._tick, interval)

    def sweep(self, now: float) -> None:
        """Close and drop whatever is due at loop time ``now``."""
        limits = self.limits
        for pair in list(self.pools.pairs.values()):
            if limits.server_idle_timeout or limits.server_lifetime:
                self._servers(pair, now)
            if limits.pool_idle_timeout and pair is not self.pools.default:
                self._pair(pair, now)

    def _servers(self, pair: Pair, now: float) -> None:
        pool = pair.pool
        idle_timeout = self.limits.server_idle_timeout
        for backend in list(pool.idle):  # never in a transaction, never lent to a client
            if backend.idle_since is None:
                backend.idle_since = now
            if self._expired(backend, now):
                pair.closed_lifetime += 1
                logger.debug("closing server connection pid=%d: lifetime over", backend.pid)
                backend.close()
            elif idle_timeout and now - backend.idle_since >= idle_timeout:
                pair.closed_idle += 1
                logger.debug("closing server connection pid=%d: idle timeout", backend.pid)
                backend.close()
        if self.limits.server_lifetime:
            for backend in pool.members:
                busy = backend.owner is not None and not backend.retiring
                if busy and self._expired(backend, now):
                    # Closed by BackendPool.release when its client gives it back.
                    pair.closed_lifetime += 1
                    backend.retiring = True

    def _expired(self, backend: Backend, now: float) -> bool:
        lifetime = self.limits.server_lifetime
        if not lifetime:
            return False
        if backend.expires is None:
            share = 1.0 - LIFETIME_JITTER * random.random()
            backend.expires = backend.created + lifetime * share
        return now >= backend.expires

    def _pair(self, pair: Pair, now: float) -> None:
        pool = pair.pool
        if pair.clients or pair.admitting or pool.members or pool.connecting or pool.waiters:
            pair.empty_since = None
        elif pair.empty_since is None:
            pair.empty_since = now
        elif now - pair.empty_since >= self.limits.pool_idle_timeout:
            self.pools.drop(pair)
            logger.info(
                "dropped the pool of %s@%s: no clients or server connections for %g s",
                pair.user,
                pair.dbname,
                self.limits.pool_idle_timeout,
            )
