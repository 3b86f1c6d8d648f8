"""Session state that ties a client to one server connection while it lasts.

LISTEN only delivers notifications to the connection that listens, and an SQL-level
``PREPARE name`` exists only there: a client that uses either keeps its server connection
(it is "pinned") until ``UNLISTEN *`` / ``DEALLOCATE`` / ``DISCARD ALL`` or its disconnect,
as Odyssey does, instead of losing notifications or statements at the next transaction.
"""

from __future__ import annotations

from . import _protocol as p
from ._pool import BackendPool
from ._sqltext import deallocate_target, drops_all, listens, sql_prepared_names, unlistens_all


class Pins:
    __slots__ = ("listening", "sql_prepared")

    def __init__(self) -> None:
        self.listening = False
        self.sql_prepared: set[bytes] = set()  # names of the client's SQL-level PREPAREs

    @property
    def pinned(self) -> bool:
        return self.listening or bool(self.sql_prepared)

    def update(self, sql: bytes, pool: BackendPool) -> bytes | None:
        """Track ``sql`` and keep ``pool.pinned`` counting pinned clients; or, if pinning this
        client would leave the others no server connection, the error to answer with."""
        was = self.pinned
        if not was and (listens(sql) or sql_prepared_names(sql)) and pool.pinned >= pool.size - 1:
            return p.error_response(
                "53300",
                "LISTEN and SQL-level PREPARE keep a server connection for this client until "
                f"it disconnects, and {pool.pinned} of the proxy's {pool.size} are kept so "
                "already (one stays for everyone else): raise pool_size, or run this on a "
                "direct connection to PostgreSQL",
            )
        self.track(sql)
        if self.pinned != was:
            pool.pinned += 1 if self.pinned else -1
        return None

    def track(self, sql: bytes) -> None:
        """Note what ``sql`` (already sent to the pinned connection) starts or ends.

        Pinning errs on the safe side (a LISTEN that fails still pins until disconnect);
        unpinning happens only for statements that cannot leave state behind."""
        if listens(sql):
            self.listening = True
        self.sql_prepared.update(sql_prepared_names(sql))
        if drops_all(sql):
            self.sql_prepared.clear()
            if b"discard" in sql.lower():  # DISCARD ALL also ends LISTEN; DEALLOCATE ALL not
                self.listening = False
        elif unlistens_all(sql):
            self.listening = False
        else:
            target = deallocate_target(sql)
            if target is not None:
                self.sql_prepared.discard(target)
