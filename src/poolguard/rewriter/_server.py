"""The proxy: listening socket, shared state of all sessions, admission to a pool (or the
admin console), cancel routing, start and stop (and of the sweep that retires idle and old
server connections). With several workers, one of them (see ``_fleet``)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import ssl
import stat
from collections.abc import Coroutine
from typing import cast

from . import _admin, _compiled
from . import _protocol as p
from ._auth import AuthError, ScramKeys, ScramVerifier
from ._fleet import PUBLISH_INTERVAL, Worker
from ._login import Login
from ._pool import Backend, BackendPool, Upstream
from ._pools import Pools
from ._reaper import Lifecycle, Reaper
from ._session import Session
from ._userlist import Credential

logger = logging.getLogger("poolguard.rewriter")


class Proxy:
    def __init__(
        self,
        upstream: Upstream,
        *,
        password: str,
        pool_size: int,
        max_prepared: int,
        max_message_size: int,
        cleanup_timeout: float,
        login_timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
        users: dict[str, Credential] | None = None,
        passthrough: bool = False,
        admins: frozenset[str] = frozenset(),
        pool_sizes: dict[tuple[str, str], int] | None = None,
        console: str = "poolguard",
        lifecycle: Lifecycle | None = None,
        worker: Worker | None = None,
    ) -> None:
        # Of a fleet of workers, this one holds its share of every pool's connections.
        self.worker = worker = worker or Worker()
        users = dict(users or {})
        # The upstream DSN's user logs in with the proxy's password (handle.dsn) whatever the
        # userlist says, and is always an admin of the console.
        users[upstream.user] = Credential(ScramVerifier.from_password(password), upstream.password)
        self.pools = Pools(
            upstream,
            users=users,
            passthrough=passthrough,
            admins=admins | {upstream.user},
            console=console,
            pool_size=worker.share(pool_size),
            sizes={pair: worker.share(size) for pair, size in (pool_sizes or {}).items()},
            max_prepared=max_prepared,
        )
        self.passthrough = passthrough
        # The upstream DSN's own pair: what start() checks, and the default before a login.
        self.pool: BackendPool = self.pools.default.pool
        self.registry = self.pools.default.registry
        self.reaper = Reaper(self.pools, lifecycle or Lifecycle())
        self.max_message_size = max_message_size
        self.cleanup_timeout = cleanup_timeout
        self.login_timeout = login_timeout
        self.tls = tls  # offered to clients that send SSLRequest
        self.server_params: dict[str, str] = {}
        self.sessions: dict[int, Session] = {}
        self._next_pid = 1
        self._admitting: set[asyncio.Task[None]] = set()
        # Cancels on their way (the loop keeps only weak references to tasks).
        self._cancelling: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._peer_server: asyncio.Server | None = None  # the worker's private socket
        self._publisher: asyncio.TimerHandle | None = None
        self.host = ""
        self.port = 0
        self.socket_path = ""

    async def start(self, host: str, port: int) -> None:
        """Check the upstream with one real connection, then listen."""
        first = await self.pool.connect()
        self.server_params = dict(first.params)
        self.pools.default.adopt(first)
        loop = asyncio.get_running_loop()
        if host.startswith("/"):
            # Clients on this socket are trusted without a password, so the folder must be one
            # only this user can enter; libpq finds the socket as host=<folder> port=<port>.
            port = port or 6432
            _check_private_dir(host)
            self.socket_path = os.path.join(host, f".s.PGSQL.{port}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            self._server = await loop.create_unix_server(
                lambda: _protocol(Session(self, trusted=True)), self.socket_path
            )
            self.host, self.port = host, port
        else:
            if not _is_loopback(host) and self.tls is None:
                logger.warning(
                    "rewriter listening on non-loopback address %s: clients authenticate with "
                    "SCRAM over plain TCP (no TLS)",
                    host,
                )
            self._server = await loop.create_server(
                lambda: _protocol(Session(self)),
                host,
                port,
                reuse_address=True,
                reuse_port=not self.worker.solo,  # the fleet's workers share the port
            )
            sock = self._server.sockets[0].getsockname()
            self.host, self.port = sock[0], sock[1]
        logger.info(
            "rewriter listening on %s:%d for upstream %s (pool_size=%d, hot path: %s)",
            self.host,
            self.port,
            self.pool.upstream.describe(),
            self.pool.size,
            _compiled.describe(),
        )
        if not self.worker.solo:
            # Peers pass cancels on here; the folder is private (see _fleet).
            self._peer_server = await loop.create_unix_server(
                lambda: _protocol(Session(self, trusted=True)),
                self.worker.socket_path(self.worker.index),
            )
            self._publish()
        self.reaper.start()

    async def stop(self) -> None:
        self.reaper.stop()
        if self._publisher is not None:
            self._publisher.cancel()
        for server in (self._server, self._peer_server):
            if server is not None:
                server.close()
        for task in list(self._admitting):
            task.cancel()
        for session in list(self.sessions.values()):
            if session.transport is not None:
                session.transport.close()
        lost = self.pools.close()
        if lost:
            await asyncio.wait(lost, timeout=2)
        for server in (self._server, self._peer_server):
            if server is not None:
                await server.wait_closed()
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        if not self.worker.solo:
            self.worker.leave()
        # Let transports run their connection_lost callbacks before the loop goes away.
        await asyncio.sleep(0)

    def credential(self, user: str) -> Credential | None:
        return self.pools.credential(user)

    def admit(self, session: Session, login: Login) -> None:
        keys = None
        cred = self.pools.credential(login.user)
        if cred is not None and login.client_key is not None:
            v = cred.verifier
            keys = ScramKeys(v.salt, v.iterations, login.client_key, v.server_key)
        user, dbname, password = login.user, login.dbname, login.password
        task = asyncio.get_running_loop().create_task(
            self._admit(session, user, dbname, password, keys)
        )
        self._admitting.add(task)
        task.add_done_callback(self._admitting.discard)

    async def _admit(
        self,
        session: Session,
        user: str,
        dbname: str,
        password: str | None,
        keys: ScramKeys | None,
    ) -> None:
        try:
            pair = await self.pools.admit(user, dbname, password=password, keys=keys)
        except AuthError as exc:
            logger.warning("client authentication failed for user %r: %s", user, exc)
            session.refused("28P01", f'password authentication failed for user "{user}"')
            return
        except p.Refused as exc:
            session.refused(exc.sqlstate, str(exc))
            return
        except Exception as exc:  # a bug must not leave the client hanging at login
            logger.exception("admitting a client of %s@%s failed", user, dbname)
            session.refused("08006", f"proxy could not admit the client: {exc}")
            return
        if pair is not None:
            session.admitted(pair)
            if session.pair is pair:
                pair.clients += 1  # until forget_session
        elif session.transport is not None and session.state == "admitting":
            transport, buf = session.hand_over()
            _admin.Console.take_over(transport, buf, self.stats, self.server_params)

    def stats(self) -> dict[str, list[dict[str, object]]]:
        """What the admin console's SHOW commands answer, as lists of rows."""
        if self.worker.solo:
            return self._own_rows()
        return _admin.merge([self._own_rows(), *self.worker.peer_rows()])

    def _own_rows(self) -> _admin.Stats:
        """This process's rows (of one worker, with several)."""
        now = asyncio.get_running_loop().time()
        return _admin.snapshot(self.pools, self.sessions.values(), now)

    def _publish(self) -> None:
        """This worker's rows for its peers' consoles, every PUBLISH_INTERVAL seconds."""
        try:
            self.worker.publish(self._own_rows())
        except OSError as exc:  # the peers' views lack this worker until the next try
            logger.warning("could not publish worker %d's admin rows: %s", self.worker.index, exc)
        loop = asyncio.get_running_loop()
        self._publisher = loop.call_later(PUBLISH_INTERVAL, self._publish)

    def register_session(self, session: Session) -> tuple[int, int]:
        """A (pid, key) pair for the client's BackendKeyData, used to route its cancels."""
        pid = self.worker.pid(self._next_pid)
        self._next_pid += 1
        self.sessions[pid] = session
        return pid, secrets.randbits(31)

    def forget_session(self, session: Session) -> None:
        if self.sessions.get(session.pid) is session:
            del self.sessions[session.pid]
            if session.pair is not None:
                session.pair.clients -= 1

    def cancel(self, pid: int, key: int) -> None:
        owner = self.worker.owner(pid)
        if owner != self.worker.index:
            self._in_background(self._pass_cancel(owner, pid, key))
            return
        session = self.sessions.get(pid)
        if session is None or session.key != key or session.backend is None:
            return  # like PostgreSQL: a cancel that matches nothing is silently dropped
        self.cancel_backend(session.backend)

    def cancel_backend(self, backend: Backend) -> None:
        self._in_background(self._send_cancel(backend.pid, backend.key))

    def _in_background(self, cancel: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(cancel)
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _send_cancel(self, pid: int, key: int) -> None:
        transport: asyncio.BaseTransport | None = None
        try:
            transport, _ = await asyncio.wait_for(
                self.pool.upstream.open(asyncio.Protocol, tls=False),
                self.pool.upstream.connect_timeout,
            )
            cast(asyncio.WriteTransport, transport).write(p.build_cancel(pid, key))
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("could not forward a cancel request upstream: %s", exc)
        finally:
            if transport is not None:
                transport.close()

    async def _pass_cancel(self, owner: int, pid: int, key: int) -> None:
        """A cancel for a client of another worker: to that worker's private socket."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_unix_connection(
                asyncio.Protocol, self.worker.socket_path(owner)
            )
        except OSError as exc:  # that worker is restarting: its clients are gone anyway
            logger.warning("could not pass a cancel request to worker %d: %s", owner, exc)
            return
        cast(asyncio.WriteTransport, transport).write(p.build_cancel(pid, key))
        transport.close()


def _protocol(session: Session) -> asyncio.BaseProtocol:
    """A session is an asyncio protocol without subclassing it (see Session)."""
    return cast(asyncio.BaseProtocol, session)


def _check_private_dir(path: str) -> None:
    """Create ``path`` with mode 0700, or accept it only if it already is private and ours."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(
            f"unix socket folder {path} must be a directory owned by this user with mode 0700 "
            "(clients there are trusted without a password): chmod 700 it or pick a new path"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
