"""Which prepared statement lives where: the pool-wide name map and the per-backend LRU.

Pure bookkeeping, no I/O. A client's statement name is private to that client; what the
server sees is one pool-wide name per (query text, parameter type OIDs), so clients that
prepare the same SQL share one server statement and a backend prepares it at most once.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

StatementKey = tuple[bytes, tuple[int, ...]]


class Statement:
    """One server-side prepared statement, shared by every client that prepared the same key."""

    __slots__ = ("__weakref__", "key", "name", "result", "stale", "verified")

    def __init__(self, key: StatementKey, name: bytes) -> None:
        self.key = key
        self.name = name
        # True once some backend accepted the Parse: a client's Parse of the same key can then
        # be answered without a round trip.
        self.verified = False
        # The RowDescription (or NoData) message of the first Parse: PostgreSQL fixes a
        # prepared statement's result type then, and so must every later backend's copy.
        self.result: bytes | None = None
        # The result type changed (DDL): every use answers 0A000, as PostgreSQL does for a
        # cached plan, so drivers prepare again (and get a fresh Statement).
        self.stale = False

    @property
    def query(self) -> bytes:
        return self.key[0]

    @property
    def param_types(self) -> tuple[int, ...]:
        return self.key[1]

    def __repr__(self) -> str:
        return f"<Statement {self.name.decode()} {self.query[:40]!r}>"


class Registry:
    """Pool-wide map from statement key to its current server-side Statement.

    Values are weak: a Statement no client names and no backend holds is forgotten, so the map
    stays as small as the live working set however many distinct queries clients prepare.
    """

    def __init__(self, prefix: bytes = b"poolguard_") -> None:
        self._by_key: weakref.WeakValueDictionary[StatementKey, Statement]
        self._by_key = weakref.WeakValueDictionary()
        self._prefix = prefix
        self._counter = itertools.count(1)

    def get(self, key: StatementKey) -> Statement:
        stmt = self._by_key.get(key)
        if stmt is None:
            stmt = Statement(key, self._prefix + str(next(self._counter)).encode())
            self._by_key[key] = stmt
        return stmt

    def retire(self, stmt: Statement) -> None:
        """Stop handing ``stmt`` out: the next Parse of its key gets a fresh server name.

        Used when the server says the statement's plan is unusable ("cached plan must not change
        result type"); clients that re-prepare then get a statement planned from scratch.
        """
        if self._by_key.get(stmt.key) is stmt:
            del self._by_key[stmt.key]

    def __len__(self) -> int:
        return len(self._by_key)


class BackendStatements:
    """The statements prepared on one server connection, least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lru: OrderedDict[bytes, Statement] = OrderedDict()

    def __contains__(self, stmt: Statement) -> bool:
        return self._lru.get(stmt.name) is stmt

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, stmt: Statement) -> bool:
        """Mark ``stmt`` used; False if it is not prepared on this backend."""
        if self._lru.get(stmt.name) is not stmt:
            return False
        self._lru.move_to_end(stmt.name)
        return True

    def add(self, stmt: Statement) -> list[Statement]:
        """Record ``stmt`` as prepared; returns the statements evicted to stay within capacity."""
        self._lru[stmt.name] = stmt
        self._lru.move_to_end(stmt.name)
        evicted = []
        while len(self._lru) > self.capacity:
            evicted.append(self._lru.popitem(last=False)[1])
        return evicted

    def discard(self, stmt: Statement) -> None:
        if self._lru.get(stmt.name) is stmt:
            del self._lru[stmt.name]

    def clear(self) -> None:
        self._lru.clear()
