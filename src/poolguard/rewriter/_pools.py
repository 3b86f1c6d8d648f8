"""One server-connection pool per (user, database) pair, and who may use which.

A client logs in to the proxy (``_login``); ``Pools.admit`` then finds its pair's pool, and the
first time a pair is used (or a passthrough client brings a new password) it logs in upstream
as that user to that database, so the upstream decides whether the database exists and, for
passthrough users, whether the password is right. Each pair has its own statement map: a
prepared statement is only valid for the user and database it was prepared by. A pair other
than the upstream DSN's own that has been left with nothing for a while is dropped (``_reaper``)
and made anew, with a new upstream check, by its next client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time

from . import _protocol as p
from ._auth import AuthError, ScramKeys
from ._pool import Backend, BackendPool, Upstream, UpstreamError
from ._statements import Registry
from ._userlist import Credential

logger = logging.getLogger("poolguard.rewriter")

#: The virtual database of the admin console (``SHOW POOLS`` and friends), and the name it
#: takes instead when the upstream DSN's own database is called that (so it stays reachable).
ADMIN_DATABASE = "poolguard"
ADMIN_DATABASE_ALT = "poolguard_admin"


def console_name(admin_database: str | None, upstream_dbname: str) -> str:
    """The admin console's database name; raises ValueError if it hides the upstream's."""
    if admin_database is None:
        return ADMIN_DATABASE if upstream_dbname != ADMIN_DATABASE else ADMIN_DATABASE_ALT
    if admin_database == upstream_dbname:
        raise ValueError(
            f"admin_database {admin_database!r} is the upstream DSN's own database: pick "
            "another name for the console"
        )
    return admin_database


#: A passthrough password the upstream accepted is taken as is for this many seconds; after
#: that the next login with it is tried upstream again, so a password changed or a role
#: dropped upstream stops working at the proxy too.
PASSTHROUGH_RECHECK = 60.0


class Pair:
    """The pool, statement map and server settings of one (user, database)."""

    def __init__(self, upstream: Upstream, *, size: int, max_prepared: int) -> None:
        self.user = upstream.user
        self.dbname = upstream.dbname
        self.pool = BackendPool(upstream, size=size, max_prepared=max_prepared)
        self.registry = Registry()
        self.server_params: dict[str, str] = {}
        self.checked = False  # an upstream login with the pool's credentials succeeded
        self.checked_at = 0.0  # when (time.monotonic())
        self.lock = asyncio.Lock()  # one upstream check at a time per pair
        # Who still needs the pair: logged-in clients (counted by the proxy) and logins being
        # admitted to it. A pair with neither and no server connections may be dropped.
        self.clients = 0
        self.admitting = 0
        self.empty_since: float | None = None  # when the sweep first found it unused
        # Server connections the sweep retired (SHOW STATS).
        self.closed_idle = 0
        self.closed_lifetime = 0

    def __repr__(self) -> str:
        return f"<Pair {self.user}@{self.dbname} size={self.pool.size}>"

    def adopt(self, backend: Backend) -> None:
        """Take the connection an upstream check opened into this pool (if there is room)."""
        self.server_params = dict(backend.params)
        self.checked = True
        self.checked_at = time.monotonic()
        pool = self.pool
        if backend.pool is not pool:  # opened by an upstream check's probe pool
            if len(pool.members) + pool.connecting >= pool.size or pool.closing:
                backend.close()
                return
            backend.pool = pool
            pool.members.add(backend)
        # Proxy.start opens its check connection in this pool itself: already a member, and
        # with pool_size=1 it is the one the pool may have.
        pool.release(backend)


class Pools:
    """Every pair's pool, created on first use, and the credentials clients log in with."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        users: dict[str, Credential],
        passthrough: bool,
        admins: frozenset[str],
        console: str,
        pool_size: int,
        sizes: dict[tuple[str, str], int],
        max_prepared: int,
    ) -> None:
        self.base = upstream
        self.users = users
        self.passthrough = passthrough
        self.admins = admins
        self.console = console
        self.pool_size = pool_size
        self.sizes = sizes
        self.max_prepared = max_prepared
        self.pairs: dict[tuple[str, str], Pair] = {}
        self.default = self._pair(upstream.user, upstream.dbname, upstream.password)

    def credential(self, user: str) -> Credential | None:
        return self.users.get(user)

    def _pair(self, user: str, dbname: str, password: str | None) -> Pair:
        pair = self.pairs.get((user, dbname))
        if pair is None:
            upstream = dataclasses.replace(self.base, user=user, dbname=dbname, password=password)
            size = self.sizes.get((user, dbname), self.pool_size)
            pair = Pair(upstream, size=size, max_prepared=self.max_prepared)
            self.pairs[(user, dbname)] = pair
        return pair

    async def admit(
        self, user: str, dbname: str, *, password: str | None, keys: ScramKeys | None
    ) -> Pair | None:
        """The pair a logged-in client uses, or None for the admin console.

        ``password`` is the cleartext password of a passthrough client, ``keys`` the SCRAM keys
        recovered from a client whose userlist entry is a SCRAM secret. Raises ``p.Refused``
        (with the upstream's SQLSTATE when it refused the login) or ``AuthError``.
        """
        cred = self.credential(user)
        if dbname == self.console:
            if cred is None or user not in self.admins:
                raise p.Refused(
                    "42501",
                    f'user "{user}" may not use the {self.console} console: list it in '
                    "admin_users (it also needs a password the proxy knows: the upstream DSN's "
                    "user or a userlist entry)",
                )
            return None
        if cred is None and (not self.passthrough or password is None):
            raise AuthError(f"user {user!r} is not in the userlist")
        pair = self._pair(user, dbname, None if cred is None else cred.password)
        # Counted until the caller has the pair (no await in between), so the sweep does not
        # drop it under a login waiting for its upstream check.
        pair.admitting += 1
        try:
            await self._admit(pair, cred, password, keys)
        finally:
            pair.admitting -= 1
        return pair

    async def _admit(
        self,
        pair: Pair,
        cred: Credential | None,
        password: str | None,
        keys: ScramKeys | None,
    ) -> None:
        user = pair.user
        if cred is None:
            assert password is not None
            async with pair.lock:
                known = pair.pool.upstream.password
                fresh = time.monotonic() - pair.checked_at < PASSTHROUGH_RECHECK
                if fresh and known is not None and hmac.compare_digest(known, password):
                    return
                # A new or changed password: the upstream is the judge.
                candidate = dataclasses.replace(pair.pool.upstream, password=password)
                await self._check(pair, candidate, passthrough=True)
            return
        async with pair.lock:
            if pair.checked:
                return
            candidate = pair.pool.upstream
            if cred.secret_only:
                if keys is None:  # a trusted (unix socket) client of a SCRAM-secret user
                    raise AuthError(f"user {user!r} has no password the proxy can use upstream")
                candidate = dataclasses.replace(candidate, scram_keys=keys)
            await self._check(pair, candidate, passthrough=False)

    async def _check(self, pair: Pair, candidate: Upstream, *, passthrough: bool) -> None:
        probe = BackendPool(candidate, size=1, max_prepared=self.max_prepared)
        try:
            backend = await probe.connect()
        except UpstreamError as exc:
            if not pair.checked and not pair.pool.members and pair.admitting == 1:
                # Never worked (no such database, say): forget it, so names clients make up do
                # not pile up pools. Not while other logins wait to check it themselves: one
                # that succeeds must join the listed pool, not a second one for the same pair.
                self.pairs.pop((pair.user, pair.dbname), None)
            code = exc.refused_with
            if passthrough and code in ("28P01", "28000"):
                raise AuthError(f"upstream refused the password: {exc}") from None
            logger.warning("%s", exc)
            # PostgreSQL's own answer (3D000 no such database, 28000 no such role, ...) tells the
            # client what to fix; a proxy-side fault is a connection failure.
            raise p.Refused(code or "08006", str(exc)) from None
        pair.pool.upstream = candidate
        pair.adopt(backend)

    def drop(self, pair: Pair) -> None:
        """Forget an unused pair (and its statement map); its next client makes a new one."""
        if self.pairs.get((pair.user, pair.dbname)) is pair and pair is not self.default:
            del self.pairs[(pair.user, pair.dbname)]
            pair.pool.close()

    def close(self) -> list[asyncio.Future[None]]:
        lost: list[asyncio.Future[None]] = []
        for pair in self.pairs.values():
            lost.extend(pair.pool.close())
        return lost
