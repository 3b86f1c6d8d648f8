"""Server connections to the upstream PostgreSQL and the small pool that lends them out.

A Backend is an asyncio Protocol. While it is lent to a client session every byte it receives
goes straight to that session (the hot path); while idle it only watches for the server
reporting a parameter change or closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import _auth, _tls
from . import _protocol as p
from ._statements import BackendStatements

logger = logging.getLogger("poolguard.rewriter")

# Server messages are trusted, but a length this large means the stream is corrupt.
_MAX_SERVER_MESSAGE = 1 << 30


class UpstreamError(psycopg.OperationalError):
    """The upstream server refused or dropped a connection; the message says what to check."""

    __module__ = "poolguard.rewriter"

    #: The upstream's SQLSTATE when it refused with an ErrorResponse (28P01, 3D000, ...).
    refused_with: str | None = None


@dataclass(frozen=True)
class Upstream:
    """Where and as whom to connect. repr and describe() never include the password."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    # For a userlist SCRAM secret: the keys learned from a client's login, instead of a password.
    scram_keys: _auth.ScramKeys | None = field(default=None, repr=False)

    @classmethod
    def from_dsn(cls, dsn: str) -> Upstream:
        """From a libpq conninfo string or URL; missing parts fall back to PG* env variables."""
        try:
            info = conninfo_to_dict(dsn)
        except Exception as exc:
            raise ValueError(f"upstream_dsn is not a valid conninfo string or URL: {exc}") from None
        env = os.environ
        host = str(info.get("host") or env.get("PGHOST") or "localhost").split(",")[0]
        port = int(str(info.get("port") or env.get("PGPORT") or 5432).split(",")[0])
        user = str(info.get("user") or env.get("PGUSER") or getpass.getuser())
        password = info.get("password") or env.get("PGPASSWORD")
        timeout = float(info.get("connect_timeout") or 10)

        def opt(name: str, env_name: str) -> str | None:
            value = info.get(name) or env.get(env_name)
            return None if value is None else str(value)

        sslmode = _tls.check_sslmode(opt("sslmode", "PGSSLMODE") or "prefer")
        if host.startswith("/"):
            sslmode = "disable"  # libpq never uses TLS on a unix socket
        rootcert = opt("sslrootcert", "PGSSLROOTCERT")
        if sslmode in ("verify-ca", "verify-full") and rootcert is None:
            raise ValueError(
                f"sslmode={sslmode} needs sslrootcert=<file of trusted CA certificates> in "
                "upstream_dsn"
            )
        return cls(
            host=host,
            port=port,
            user=user,
            dbname=str(info.get("dbname") or env.get("PGDATABASE") or user),
            password=None if password is None else str(password),
            connect_timeout=timeout,
            sslmode=sslmode,
            sslrootcert=rootcert,
            sslcert=opt("sslcert", "PGSSLCERT"),
            sslkey=opt("sslkey", "PGSSLKEY"),
        )

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    async def open(
        self, factory: Callable[[], asyncio.Protocol], *, tls: bool = True
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        """Connect; with ``tls`` (not for a CancelRequest) as the DSN's sslmode asks."""
        loop = asyncio.get_running_loop()
        if self.host.startswith("/"):
            path = os.path.join(self.host, f".s.PGSQL.{self.port}")
            return await loop.create_unix_connection(factory, path)
        if not (tls and _tls.wants_tls(self.sslmode)):
            return await loop.create_connection(factory, self.host, self.port)
        # SSLRequest on a plain socket first; the handshake follows on the same socket.
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, _tls.SSL_REQUEST_MSG)
            answer = await loop.sock_recv(sock, 1)
            if answer == b"S":
                ctx = _tls.client_context(self.sslmode, self.sslrootcert, self.sslcert, self.sslkey)
                return await loop.create_connection(
                    factory, sock=sock, ssl=ctx, server_hostname=self.host
                )
            if answer != b"N":
                raise UpstreamError(
                    f"upstream {self.describe()} answered SSLRequest with {answer!r}"
                )
            if _tls.needs_tls(self.sslmode):
                raise UpstreamError(
                    f"upstream {self.describe()} does not accept TLS but the DSN says "
                    f"sslmode={self.sslmode}"
                )
            return await loop.create_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            raise


class Borrower:
    """Whoever waits for a backend and then receives its bytes (a client session). A base
    class, not a typing Protocol: in the compiled build a backend then calls its borrower's
    ``server_data`` and ``attach`` as C functions."""

    def attach(self, backend: Backend) -> None:
        """The backend the borrower waited for is now its own."""
        raise NotImplementedError

    def attach_failed(self, reason: str) -> None:
        """No backend will come: the upstream cannot be reached."""
        raise NotImplementedError

    def server_data(self, backend: Backend, buf: bytes) -> int:
        """Route the complete server messages at the start of ``buf``; returns bytes used."""
        raise NotImplementedError

    def server_lost(self, backend: Backend, exc: Exception | None) -> None:
        raise NotImplementedError

    def pause_client(self) -> None:
        raise NotImplementedError

    def resume_client(self) -> None:
        raise NotImplementedError


class Backend:
    """One authenticated server connection: an asyncio protocol (not a subclass of
    ``asyncio.Protocol``, for the same reason as ``Session``)."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pid = 0
        self.key = 0
        self.params: dict[str, str] = {}
        # Settings the proxy SET for a client that the server does not report: the next
        # client that did not ask for them gets them RESET.
        self.extra: set[str] = set()
        self.statements = BackendStatements(pool.max_prepared)
        # The client's unnamed-statement record whose Parse this backend last ran, so a Bind of
        # the unnamed statement knows whether it must be parsed here again first.
        self.unnamed: object | None = None
        self.owner: Borrower | None = None
        self.closed = False
        # Close it when it is next given back: it is closed already, or past its lifetime.
        # One flag, so release() tests one attribute for both.
        self.retiring = False
        # Lifecycle, read and written by the periodic sweep (_reaper), never per transaction:
        # when the connection was opened (loop clock), when the sweep first saw it idle (None
        # again each time it is given back), and when its lifetime ends (jitter included).
        self.created = 0.0
        self.idle_since: float | None = None
        self.expires: float | None = None
        # Done once the transport is gone (a TLS close takes a round trip): stop() waits for it.
        self.lost: asyncio.Future[None] | None = None
        self._inbox: deque[tuple[bytes, bytes]] = deque()
        self._wakeup: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Backend pid={self.pid} {'busy' if self.owner else 'idle'}>"

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass it
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        self.created = loop.time()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        owner = self.owner
        if owner is not None:
            if buf:
                buf += data
                used = owner.server_data(self, bytes(buf))
                if used:
                    del buf[:used]
            else:
                # The usual case, whole messages in one read: routed without copying them
                # into the buffer first (only a partial tail is kept).
                used = owner.server_data(self, data)
                if used < len(data):
                    buf += memoryview(data)[used:]
            return
        buf += data
        try:
            msgs, used = p.split_messages(buf, _MAX_SERVER_MESSAGE)
        except p.ProtocolError as exc:
            self.close(f"corrupt stream from server: {exc}")
            return
        del buf[:used]
        if self._wakeup is not None:
            self._inbox.extend(msgs)
            if not self._wakeup.done():
                self._wakeup.set_result(None)
            return
        for kind, body in msgs:  # idle: parameter changes, notices, or a FATAL before closing
            if kind == b"S":
                name, value = p.parse_parameter_status(body)
                self.params[name] = value
            elif kind == b"E":
                msg = p.parse_error_fields(body).get("M", "")
                self.close(f"server sent an error on an idle connection: {msg}")

    def eof_received(self) -> None:
        """The server half-closed: the transport closes, as for ``asyncio.Protocol``."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.retiring = True
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        owner, self.owner = self.owner, None
        self.pool.forget(self)
        if owner is not None:
            owner.server_lost(self, exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_client()

    # --- helpers -----------------------------------------------------------------------

    def settings_reset(self) -> None:
        """RESET ALL or DISCARD ALL ran: what the proxy SET is back to the server's default."""
        for name in self.extra:
            self.params.pop(name, None)
        self.extra.clear()

    def write(self, data: bytes | bytearray) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, reason: str | None = None) -> None:
        if reason:
            logger.warning("closing server connection pid=%d: %s", self.pid, reason)
        self.retiring = True
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write(p.TERMINATE_MSG)
            self.transport.close()
        self.pool.forget(self)

    async def _next(self, timeout: float) -> tuple[bytes, bytes]:
        while not self._inbox:
            if self.closed:
                raise UpstreamError("the server closed the connection during startup")
            self._wakeup = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._wakeup, timeout)
        return self._inbox.popleft()

    async def startup(self, upstream: Upstream) -> None:
        """Authenticate and read up to the first ReadyForQuery."""
        self._wakeup = asyncio.get_running_loop().create_future()
        self.write(p.build_startup({"user": upstream.user, "database": upstream.dbname}))
        scram: _auth.ScramClient | None = None
        timeout = upstream.connect_timeout
        while True:
            kind, body = await self._next(timeout)
            if kind == b"R":
                scram = self._auth_step(upstream, body, scram)
            elif kind == b"S":
                name, value = p.parse_parameter_status(body)
                self.params[name] = value
            elif kind == b"K":
                self.pid, self.key = struct.unpack("!ii", body[:8])
            elif kind == b"Z":
                break
            elif kind == b"E":
                fields = p.parse_error_fields(body)
                refused = UpstreamError(
                    f"upstream {upstream.describe()} refused the connection: "
                    f"{fields.get('M', 'unknown error')} (SQLSTATE {fields.get('C', '?')})"
                )
                refused.refused_with = fields.get("C")
                raise refused
        self._wakeup = None
        if self._inbox:
            raise UpstreamError("unexpected data after ReadyForQuery during startup")

    def _auth_step(
        self, up: Upstream, body: bytes, scram: _auth.ScramClient | None
    ) -> _auth.ScramClient | None:
        code = struct.unpack_from("!i", body)[0]
        if code == 0:
            return scram
        if code in (3, 5, 10) and up.password is None and not (code == 10 and up.scram_keys):
            raise UpstreamError(
                f"upstream {up.describe()} asks for a password: put one in upstream_dsn "
                "or set PGPASSWORD"
            )
        assert up.password is not None or up.scram_keys is not None or code in (11, 12)
        if code == 3:  # cleartext
            self.write(p.frame(b"p", (up.password or "").encode() + b"\0"))
        elif code == 5:  # md5
            self.write(p.frame(b"p", _auth.md5_password(up.user, up.password or "", body[4:8])))
        elif code == 10:
            if _auth.MECHANISM not in body[4:].split(b"\0"):
                raise UpstreamError("upstream offers no SASL mechanism the proxy supports")
            scram = _auth.ScramClient(up.password or "", up.scram_keys)
            first = scram.first()
            payload = _auth.MECHANISM + b"\0" + struct.pack("!i", len(first)) + first
            self.write(p.frame(b"p", payload))
        elif code == 11 and scram is not None:
            self.write(p.frame(b"p", scram.final(body[4:])))
        elif code == 12 and scram is not None:
            scram.verify(body[4:])
        else:
            raise UpstreamError(f"upstream asked for an unsupported authentication method {code}")
        return scram


class BackendPool:
    """Lends backends to sessions: at most ``size`` connections, FIFO waiters, no awaits."""

    def __init__(self, upstream: Upstream, *, size: int, max_prepared: int) -> None:
        self.upstream = upstream
        self.size = size
        self.max_prepared = max_prepared
        self.idle: deque[Backend] = deque()
        self.waiters: deque[Borrower] = deque()
        self.members: set[Backend] = set()
        self.connecting = 0
        self.closing = False
        self.pinned = 0  # sessions keeping a backend between transactions (LISTEN, PREPARE)
        self.failing = False  # the last attempt to connect upstream failed
        # Server connections lent to a client and given back: one per client round trip that
        # ends outside a transaction (an autocommit statement, a transaction block, a
        # Parse/Sync), as PgBouncer's xact_count; a pinned client's pinned span counts once.
        self.served = 0

    async def connect(self) -> Backend:
        backend = Backend(self)
        try:
            await asyncio.wait_for(
                # A protocol without subclassing asyncio.Protocol (see Backend).
                self.upstream.open(lambda: cast(asyncio.Protocol, backend)),
                self.upstream.connect_timeout,
            )
            await backend.startup(self.upstream)
        except (
            OSError,
            ssl.SSLError,
            asyncio.TimeoutError,
            _auth.AuthError,
            UpstreamError,
        ) as exc:
            backend.close()
            if isinstance(exc, UpstreamError):
                raise
            what = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise UpstreamError(
                f"could not connect to upstream {self.upstream.describe()}: {what}"
            ) from None
        self.members.add(backend)
        return backend

    def acquire(self, session: Borrower) -> Backend | None:
        """An idle backend now, or None and ``session.attach()`` is called later."""
        while self.idle:
            # Most recently used first (as PgBouncer's default): under light load the same few
            # connections serve, and the rest stay idle long enough for server_idle_timeout.
            backend = self.idle.pop()
            if not backend.closed:
                backend.owner = session
                return backend
        self.waiters.append(session)
        if len(self.members) + self.connecting < self.size:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._grow())
        return None

    def cancel_wait(self, session: Borrower) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(session)

    def release(self, backend: Backend) -> None:
        if backend.owner is not None:
            self.served += 1
        backend.owner = None
        if backend.retiring or self.closing:
            backend.close()
            return
        if self.waiters:
            session = self.waiters.popleft()
            backend.owner = session
            session.attach(backend)
        else:
            backend.idle_since = None  # the sweep stamps it when it first sees it idle
            self.idle.append(backend)

    def forget(self, backend: Backend) -> None:
        self.members.discard(backend)
        with contextlib.suppress(ValueError):
            self.idle.remove(backend)
        # A waiter may be left without anyone connecting for it.
        if self.waiters and not self.closing and len(self.members) + self.connecting < self.size:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._grow())

    async def _grow(self) -> None:
        try:
            backend = await self.connect()
        except UpstreamError as exc:
            self.connecting -= 1
            # Once per outage (a restarting server refuses every attempt), not per attempt.
            logger.log(logging.DEBUG if self.failing else logging.ERROR, "%s", exc)
            self.failing = True
            if not self.members:
                # Nothing will ever serve the waiters: fail them rather than leave them hanging.
                waiters, self.waiters = self.waiters, deque()
                for session in waiters:
                    session.attach_failed(str(exc))
            return
        self.connecting -= 1
        if self.failing:
            self.failing = False
            logger.warning("upstream %s reachable again", self.upstream.describe())
        if self.closing:
            backend.close()
            return
        self.release(backend)

    def close(self) -> list[asyncio.Future[None]]:
        """Close every backend; returns what to await until their transports are gone."""
        self.closing = True
        lost = [b.lost for b in self.members if b.lost is not None]
        for backend in list(self.members):
            backend.close()
        self.idle.clear()
        return lost
