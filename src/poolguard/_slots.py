"""Slots: the one connection budget of a pool name, shared by every flavor of that pool.

A name can be served by several pools at once (the sync pool, its asyncio twin, the asyncpg
pool of the SQLAlchemy adapter); each keeps its own idle connections, but every *server*
connection any of them opens takes one slot first and gives it back when it closes, so the
process never holds more than ``max_size`` sessions for the name.

A connect that finds no free slot queues (first come, first served; a thread waits on an
event, a coroutine on a future, so an event loop is never blocked) and, while it waits, asks the
other flavors of the name to give back one idle connection each.  Flavors also retire a
returned connection instead of keeping it while another flavor has callers waiting
(``pressure``), so a busy flavor cannot starve the others.  docs/architecture.md has the
picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections import deque
from time import monotonic
from typing import Protocol

# How often a waiting connect asks the other flavors again for an idle connection.
_ASK_EVERY = 0.05


class Member(Protocol):
    """What a pool flavor offers its slots (GuardedPool, AsyncGuardedPool, AsyncpgPool)."""

    def has_demand(self) -> bool:
        """Whether callers of this pool are waiting for a connection right now."""

    def release_idle(self) -> None:
        """Close one idle connection soon, if there is one; never blocks the caller."""

    def is_closed(self) -> bool: ...


class _Waiter:
    __slots__ = ("event", "future", "granted", "loop", "member")

    def __init__(
        self,
        member: Member,
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        self.member = member
        self.loop = loop
        self.future = future
        self.event = threading.Event() if future is None else None
        self.granted = False

    def grant(self) -> bool:
        """Hand this waiter a slot (lock held); False if it can no longer take it."""
        if self.event is not None:
            self.granted = True
            self.event.set()
            return True
        loop, future = self.loop, self.future
        if loop is None or future is None or loop.is_closed() or future.done():
            return False
        self.granted = True
        loop.call_soon_threadsafe(_resolve, future)
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Slots:
    """The server connections one pool name may hold open, across all its flavors."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.used = 0
        #: Connects waiting for a slot; read without the lock on the return path (hot).
        self.waiting = 0
        # Reentrant: give() also runs from a connection's __del__, which the garbage collector
        # may call in a thread that is inside one of these methods.
        self._lock = threading.RLock()
        self._queue: deque[_Waiter] = deque()
        self._members: weakref.WeakSet[Member] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<Slots {self.name!r} {self.used}/{self.limit}, {self.waiting} waiting>"

    def join(self, member: Member) -> None:
        """Add a pool flavor: it may be asked for idle connections from now on."""
        self._members.add(member)

    def free(self) -> int:
        return self.limit - self.used

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody queues for it."""
        with self._lock:
            if self.used < self.limit and not self._queue:
                self.used += 1
                return True
            return False

    def take(self, member: Member, timeout: float | None = None) -> bool:
        """Take a slot, waiting in this thread; False on timeout or when ``member`` closes."""
        with self._lock:
            if self.used < self.limit and not self._queue:
                self.used += 1
                return True
            waiter = _Waiter(member)
            self._enqueue(waiter)
        assert waiter.event is not None
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if waiter.event.wait(self._step(member, deadline)):
                return True
            if (outcome := self._give_up(waiter, deadline)) is not None:
                return outcome

    async def atake(self, member: Member, timeout: float | None = None) -> bool:
        """Take a slot without blocking the event loop; False on timeout or when closed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.used < self.limit and not self._queue:
                self.used += 1
                return True
            waiter = _Waiter(member, loop, future)
            self._enqueue(waiter)
        deadline = None if timeout is None else monotonic() + timeout
        try:
            while True:
                done, _ = await asyncio.wait((future,), timeout=self._step(member, deadline))
                if done:
                    return True
                if (outcome := self._give_up(waiter, deadline)) is not None:
                    return outcome
        except BaseException:  # cancelled: a slot granted meanwhile must not be lost
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._dequeue(waiter)
            if granted:
                self.give()
            raise

    def _step(self, member: Member, deadline: float | None) -> float:
        """Ask the other flavors for an idle connection; how long to wait before asking again."""
        self._ask_others(member)
        return _ASK_EVERY if deadline is None else max(0.0, min(_ASK_EVERY, deadline - monotonic()))

    def _give_up(self, waiter: _Waiter, deadline: float | None) -> bool | None:
        """After a wait without a slot: None to wait on; False when the waiter's pool closed or
        its time is up; True if a slot was granted at that very moment (the caller owns it)."""
        if not (waiter.member.is_closed() or (deadline is not None and monotonic() >= deadline)):
            return None
        with self._lock:
            if waiter.granted:
                return True
            self._dequeue(waiter)
            return False

    def give(self) -> None:
        """A connection closed: hand its slot to the first waiter that can use it."""
        with self._lock:
            for waiter in self._order():
                self._dequeue(waiter)
                if waiter.grant():
                    return
            self.used -= 1

    def pressure(self, member: Member) -> bool:
        """Whether another flavor has callers waiting for a slot: ``member`` should retire a
        returned connection rather than keep it idle."""
        if not self.waiting:
            return False
        return any(w.member is not member and w.member.has_demand() for w in list(self._queue))

    def _order(self) -> list[_Waiter]:
        # Waiters whose flavor has callers waiting first: a replacement connection that no
        # caller needs yet must not take the slot from one that a caller waits for.
        queue = list(self._queue)
        busy = [w for w in queue if w.member.has_demand()]
        return busy + [w for w in queue if w not in busy]

    def _enqueue(self, waiter: _Waiter) -> None:
        self._queue.append(waiter)
        self.waiting = len(self._queue)

    def _dequeue(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(waiter)
        self.waiting = len(self._queue)

    def _ask_others(self, member: Member) -> None:
        if not member.has_demand():
            return  # a replacement nobody waits for: take a slot only when one is free
        for other in list(self._members):
            if other is not member and not other.is_closed():
                other.release_idle()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's connections are not this process's sessions."""
        # Reentrant: give() also runs from a connection's __del__, which the garbage collector
        # may call in a thread that is inside one of these methods.
        self._lock = threading.RLock()
        self._queue.clear()
        self.waiting = 0
        self.used = 0
