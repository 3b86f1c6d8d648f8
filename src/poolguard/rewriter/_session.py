"""One client connection: login, then each request routed to a borrowed backend and each
server reply routed back, the backend returned to the pool when the transaction ends.

The jobs it delegates: ``_login`` (startup and SCRAM), ``_prepare`` (statement names),
``_replies`` (the reply queue), ``_params`` (per-client settings), ``_janitor`` (cleanup after
the client left).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from typing import Protocol, cast

from . import _auth, _compiled, _janitor
from . import _protocol as p
from ._login import Login
from ._params import TRACKED, apply_settings
from ._pins import Pins
from ._pool import Backend, BackendPool, Borrower
from ._pools import Pair
from ._prepare import ClientStatements
from ._replies import (
    DESCRIBE_PORTAL_REPLY,
    EXECUTE_REPLY,
    SYNC_ENDS,
    SYNC_REPLY,
    Exchange,
    Pending,
)
from ._sqltext import may_change_session_state, may_drop_statements
from ._statements import Registry
from ._userlist import Credential

# All or none of the hot path runs compiled (_compiled), so its choice says this module's too.
_COMPILED = _compiled.active

logger = logging.getLogger("poolguard.rewriter")

_UNPACK_I32 = struct.Struct("!i").unpack_from
_E, _Z, _S, _N, _A, _G = b"EZSNAG"  # server message types as ints
_OUT_OF_BAND = frozenset(b"SNAE")  # ParameterStatus, notices, notifications, errors
_BIND, _EXECUTE, _SYNC, _DESCRIBE, _PARSE = b"BESDP"  # client message types as ints
_PORTAL = ord("P")  # Describe's target: a portal
# Client messages that cannot be answered without a server connection (nor can a Parse of the
# unnamed statement).
_NEEDS_BACKEND = frozenset(b"BEDF")
_COPY_MSGS = (p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL)
_CACHED_PLAN = "cached plan must not change result type"
_WAIT_BUFFER = 256 * 1024
# ReadyForQuery's status byte as the one-byte bytes ``Exchange.status`` holds, without a slice.
_STATUS = tuple(bytes((i,)) for i in range(256))


class Host(Protocol):
    """What a session needs from the proxy that accepted it."""

    pool: BackendPool
    registry: Registry
    passthrough: bool
    server_params: dict[str, str]
    max_message_size: int
    cleanup_timeout: float
    login_timeout: float
    tls: ssl.SSLContext | None

    def register_session(self, session: Session) -> tuple[int, int]:
        """A (pid, key) pair for the client's BackendKeyData."""

    def credential(self, user: str) -> Credential | None: ...

    def admit(self, session: Session, login: Login) -> None:
        """Find the client's pool, then call ``session.admitted()`` or ``session.refused()``."""

    def forget_session(self, session: Session) -> None: ...

    def cancel(self, pid: int, key: int) -> None: ...


class Session(Borrower):
    """An asyncio protocol (not a subclass of ``asyncio.Protocol``: the compiled build makes
    it an extension type, which cannot derive from a Python class)."""

    def __init__(self, proxy: Host, *, trusted: bool = False) -> None:
        self.proxy = proxy
        self.max_message_size = proxy.max_message_size
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "startup"
        self.login: Login | None = Login(
            lookup=proxy.credential,
            server_params=proxy.server_params,
            trusted=trusted,
            tls=proxy.tls is not None and not trusted,
            passthrough=proxy.passthrough,
        )
        # The client's (user, database) pool and its server settings, set once it is admitted.
        self.pair: Pair | None = None
        self.pool = proxy.pool
        self.server_params = proxy.server_params
        self.params: dict[str, str] = {}  # what the client believes the session settings are
        self.wanted: dict[str, str] = {}  # settings to re-apply on each backend
        self.ex = Exchange()
        self.prep = ClientStatements(proxy.registry, self.ex)
        self.backend: Backend | None = None
        self.waiting = False  # asked the pool for a backend, not attached yet
        self.wait_started = 0.0  # when it last started waiting (loop time)
        self.held = False  # waiting for the server's answer to a result-type check
        self.pins = Pins()
        self.pinned = False  # keeps its backend between transactions (LISTEN, SQL PREPARE)
        self.server_closing = False  # the server sent a FATAL error: the client has it
        self.paused = False  # stopped reading from the client while waiting
        self.throttled = False  # stopped reading from the client: the backend is not draining
        self.gone = False  # client disconnected; only cleaning the backend remains
        self.pid = 0
        self.key = 0
        self._cleanup_timer: asyncio.TimerHandle | None = None
        self._login_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Session pid={self.pid} state={self.state}>"

    # --- client side: asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass it
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        # Like the server's authentication_timeout: a client that does not finish logging in
        # (silent socket, half a startup packet, stopped at the password) is closed.
        self._login_timer = self.loop.call_later(self.proxy.login_timeout, self._login_expired)

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.state != "ready" and self.transport is not None:
            logger.info(
                "closing a client that did not log in within %.0f s", self.proxy.login_timeout
            )
            self._close()

    def data_received(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self.buf += data
        try:
            if self.state == "ready":
                self._client_messages()
            elif self.login is not None:
                self._login_messages()
            elif len(self.buf) > _WAIT_BUFFER:  # admitting: queries sent behind the password
                self._pause()
        except p.ProtocolError as exc:
            self._fatal(exc.sqlstate, f"protocol violation: {exc}")
        except p.Refused as exc:
            self._fatal(exc.sqlstate, str(exc))
        except _auth.AuthError as exc:
            user = self.login.user if self.login is not None else ""
            logger.warning("client authentication failed for user %r: %s", user, exc)
            self._fatal("28P01", f'password authentication failed for user "{user}"')
        self._flush()

    def eof_received(self) -> None:
        """The client half-closed: the transport closes, as for ``asyncio.Protocol``."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.transport = None
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.proxy.forget_session(self)
        if self.waiting:
            self.pool.cancel_wait(self)
            self.waiting = False
        if self.backend is not None:
            self._clean_backend()
        if self.pinned:
            self.pinned = False
            self.pool.pinned -= 1

    def pause_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    def pause_client(self) -> None:
        """The backend's transport is full: read nothing more from the client until it drains."""
        self.throttled = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.throttled:
            self.throttled = False
            if self.transport is not None and not self.paused:
                self.transport.resume_reading()

    # --- login --------------------------------------------------------------------------

    def _login_messages(self) -> None:
        login = self.login
        assert login is not None
        login.feed(self.buf, self.ex.client_out)
        if login.tls_requested:
            login.tls_requested = False
            self._start_tls()
            return
        if login.cancel is not None:
            self.proxy.cancel(*login.cancel)
            self._close()
            return
        if not login.done:
            return
        self.login = None
        self.wanted = login.wanted
        self.state = "admitting"  # the login timer runs on: admitting may log in upstream
        self.proxy.admit(self, login)

    def admitted(self, pair: Pair) -> None:
        """The proxy found (and if needed checked upstream) the client's pool."""
        if self.state != "admitting" or self.transport is None:
            return
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.pair, self.pool, self.server_params = pair, pair.pool, pair.server_params
        self.prep = ClientStatements(pair.registry, self.ex)
        self._send(p.AUTH_OK)
        self._logged_in()
        self._resume()  # queries sent right behind the password

    def hand_over(self) -> tuple[asyncio.Transport, bytearray]:
        """The client goes to another protocol (the admin console): what it was sent so far is
        flushed, and its transport and unread bytes are returned; this session is done."""
        assert self.transport is not None
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self._flush()
        transport, self.transport = self.transport, None
        if self.paused:  # it sent a lot while being admitted: the console reads on
            self.paused = False
            transport.resume_reading()
        buf, self.buf = self.buf, bytearray()
        self.state = "closed"
        return transport, buf

    def refused(self, sqlstate: str, message: str) -> None:
        if self.state == "admitting":
            self._fatal(sqlstate, message)
            self._flush()

    def _start_tls(self) -> None:
        transport, ctx = self.transport, self.proxy.tls
        assert transport is not None and ctx is not None
        self._flush()
        transport.write(b"S")
        loop = asyncio.get_running_loop()

        async def handshake() -> None:
            try:
                tls = await loop.start_tls(
                    transport, cast(asyncio.BaseProtocol, self), ctx, server_side=True,
                    ssl_handshake_timeout=self.proxy.login_timeout,
                )  # fmt: skip
            except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
                logger.info("TLS handshake with a client failed: %s", exc)
                transport.close()
                return
            if tls is None:  # the client went away during the handshake
                return
            self.transport = tls
            if self.buf and self.state != "closed":
                self.data_received(b"")

        self._tls_task = loop.create_task(handshake())

    def _logged_in(self) -> None:
        """Tell the client the session settings, its cancel key, and that it may send queries."""
        server_params = self.server_params
        self.params = {"user": self.pool.upstream.user}
        self.params.update(server_params)
        self.params.update(self.wanted)
        for name, value in self.params.items():
            if name != "user" and (name in server_params or name in self.wanted):
                self._send(p.parameter_status(name, value))
        self.pid, self.key = self.proxy.register_session(self)
        self._send(p.backend_key_data(self.pid, self.key))
        self._send(p.ready_for_query(b"I"))
        self.state = "ready"

    # --- client messages ----------------------------------------------------------------

    def _client_messages(self) -> None:
        """Route the complete messages at the start of ``buf``. One that has to wait (for a
        backend, or for the server's answer to a result-type check) stays in ``buf`` with all
        that follows it, and ``_resume`` routes them when the wait is over."""
        buf = self.buf
        if self.waiting or self.held:
            # Stop reading only if the client keeps sending: pausing costs two epoll calls,
            # and nearly every request waits briefly for a backend.
            if len(buf) > _WAIT_BUFFER:
                self._pause()
            return
        ex = self.ex
        # Most requests open with a message that needs a backend: ask for one first, so a
        # request that waits for it costs no parsing.
        if (
            self.backend is None
            and len(buf) > 5
            and (buf[0] in _NEEDS_BACKEND or (buf[0] == _PARSE and not buf[5]))
            and not ex.skipping
            and self._need_backend() is None
        ):
            return
        out, q = ex.server_out, ex.pending
        max_size = self.max_message_size
        pos = run = 0  # run: where the bytes passed on as they are, not yet queued, start
        n = len(buf)
        try:
            while n - pos >= 5:
                if _COMPILED:  # byte reads are C there; in Python one struct call is cheaper
                    size = (
                        buf[pos + 1] << 24 | buf[pos + 2] << 16 | buf[pos + 3] << 8 | buf[pos + 4]
                    )
                else:
                    size = _UNPACK_I32(buf, pos + 1)[0]
                if size < 4 or size > max_size:
                    p.check_length(size, max_size)  # raises, naming the limit
                end = pos + 1 + size
                if end > n:
                    break
                t = buf[pos]
                backend = self.backend
                if backend is not None and not ex.skipping:
                    # A prepared statement's round trip: its Execute, Sync and Describe of the
                    # unnamed portal go to the server as they came, one slice per run of them;
                    # its Bind is rewritten where it lies (below).
                    if t == _EXECUTE:
                        q.append(EXECUTE_REPLY)
                        pos = end
                        continue
                    if t == _SYNC:
                        q.append(SYNC_REPLY)
                        pos = end
                        continue
                    if (
                        t == _DESCRIBE
                        and size == 6
                        and buf[pos + 5] == _PORTAL
                        and not buf[pos + 6]
                    ):
                        q.append(DESCRIBE_PORTAL_REPLY)
                        pos = end
                        continue
                if run < pos:
                    out.append(buf[run:pos])
                run = pos
                if (
                    t == _BIND
                    and backend is not None
                    and not ex.skipping
                    and self.prep.bind_prepared(backend, buf, pos, end)
                ):
                    pos = run = end
                    continue
                if not self._handle(bytes(buf[pos : pos + 1]), bytes(buf[pos + 5 : end])):
                    break  # this message waits, and what follows it
                pos = run = end
        finally:
            if run < pos:
                out.append(buf[run:pos])
            del buf[:pos]

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def attach(self, backend: Backend) -> None:
        """Called by the pool when a backend frees up for this waiting session."""
        self.waiting = False
        if self.gone:
            self.pool.release(backend)
            return
        self.backend = backend
        apply_settings(backend, self.wanted, self.server_params, self.ex)
        self._resume()

    def _resume(self) -> None:
        """Route the messages that waited (for a backend, or for a check), then read on."""
        self.held = False
        if self.gone or self.state == "closed":
            return
        try:
            self._client_messages()
        except p.ProtocolError as exc:
            self._fatal(exc.sqlstate, f"protocol violation: {exc}")
        if self.paused and not (self.waiting or self.held):
            self.paused = False
            if self.transport is not None and not self.throttled:
                self.transport.resume_reading()
        self._flush()

    def attach_failed(self, reason: str) -> None:
        self.waiting = False
        self._fatal("08006", f"proxy could not get a server connection: {reason}")
        self._flush()

    def _need_backend(self) -> Backend | None:
        if self.backend is None:
            backend = self.pool.acquire(self)
            if backend is None:
                self.waiting = True
                self.wait_started = self.loop.time()
                return None
            self.backend = backend
            apply_settings(backend, self.wanted, self.server_params, self.ex)
        return self.backend

    def _handle(self, kind: bytes, body: bytes) -> bool:
        """Route one client message; False if it has to wait for a backend."""
        if kind == p.TERMINATE:
            self._close()
            return True
        ex = self.ex
        if ex.skipping and kind != p.SYNC:
            return True  # the server would discard it too, until Sync
        if kind == p.BIND:
            backend = self._need_backend()
            if backend is None:
                return False
            if not self.prep.bind(backend, body):
                self.held = True
                return False
            return True
        if kind == p.EXECUTE or kind == p.FUNCTION_CALL:
            if self._need_backend() is None:
                return False
            ends = b"CIsE" if kind == p.EXECUTE else SYNC_ENDS
            ex.to_server(p.frame(kind, body), Pending(ends, extended=kind == p.EXECUTE))
            return True
        if kind == p.SYNC:
            return self._sync()
        if kind == p.PARSE:
            msg = p.parse_parse(body)
            if self.prep.parse_without_server(msg, self.backend):
                return True
            backend = self._need_backend()
            if backend is None:
                return False
            refused = self._session_state(msg.query)
            if refused is not None:
                ex.probe(refused, None)
            else:
                self.prep.parse(backend, msg, body)
            return True
        if kind == p.DESCRIBE:
            backend = self._need_backend()
            if backend is None:
                return False
            if not self.prep.describe(backend, body):
                self.held = True
                return False
            return True
        if kind == p.CLOSE:
            self.prep.close(self.backend, body)
            return True
        if kind == p.FLUSH:
            if self.backend is not None:
                ex.to_server(p.FLUSH_MSG)
            return True
        if kind == p.QUERY:
            return self._query(body)
        if kind in _COPY_MSGS:
            if self.backend is not None:  # outside COPY the server ignores these as well
                ex.to_server(p.frame(kind, body))
                if kind != p.COPY_DATA:
                    ex.copy_ended()
            return True
        raise p.ProtocolError(f"unexpected message type {kind!r}")

    def _sync(self) -> bool:
        ex = self.ex
        ex.skipping = False
        if self.backend is None and not ex.pending:
            # Nothing was sent since the last ReadyForQuery: answer without taking a backend.
            self._send(p.ready_for_query(b"I"))
            return True
        ex.to_server(p.SYNC_MSG, Pending(SYNC_ENDS, extended=False, sync=True))
        return True

    def _query(self, body: bytes) -> bool:
        sql = p.query_text(body)
        # One search for the usual query: what drops statements changes session state too.
        stateful = may_change_session_state(sql)
        dropping = stateful and may_drop_statements(sql)
        if dropping and self.prep.deallocate_without_server(sql):
            return True
        backend = self._need_backend()
        if backend is None:
            return False
        refused = self._session_state(sql) if stateful else None
        if refused is not None:
            # Let the server raise it: it then aborts the transaction as any error would.
            self.ex.to_server(_raise(refused), Pending(SYNC_ENDS, extended=False))
            return True
        self.prep.query(backend, body, sql, dropping)
        return True

    def _session_state(self, sql: bytes) -> bytes | None:
        """Pin or unpin the client (see ``_pins``); the error to answer with if refused."""
        if not may_change_session_state(sql):
            return None
        refused = self.pins.update(sql, self.pool)
        self.pinned = self.pins.pinned
        return refused

    # --- server replies -----------------------------------------------------------------

    def server_data(self, backend: Backend, buf: bytes) -> int:
        """Route the complete server messages at the start of ``buf``; returns bytes used.

        Replies the client gets as they are go out as one slice per run of consecutive
        messages (usually the whole read), not one object per message.
        """
        pos, n = 0, len(buf)
        ex = self.ex
        q = ex.pending
        out = ex.client_out
        release = False
        run = 0  # start of the pass-through messages not yet queued for the client
        while n - pos >= 5:
            if _COMPILED:  # as in _client_messages
                size = buf[pos + 1] << 24 | buf[pos + 2] << 16 | buf[pos + 3] << 8 | buf[pos + 4]
            else:
                size = _UNPACK_I32(buf, pos + 1)[0]
            end = pos + 1 + size
            if end > n:
                break
            t = buf[pos]
            if t in _OUT_OF_BAND or not q:
                if run < pos:
                    out.append(buf[run:pos])
                run = end
                if t in (_S, _N, _A):
                    self._async_message(backend, t, bytes(buf[pos:end]))
                    pos = end
                    continue
                if not q:
                    if t == _E and self._server_closing(bytes(buf[pos:end])):
                        pos = end
                        continue
                    self._desync(backend, f"unexpected message {chr(t)!r} from server")
                    return n
                self._server_error(backend, q[0], bytes(buf[pos:end]))
                pos = end
                continue
            head = q[0]
            if head.hidden:
                if run < pos:
                    out.append(buf[run:pos])
                run = end
            if t == _G:
                head = q[0] = head.copy_started()
            if t in head.ends:
                q.popleft()
                if head.on_ok is not None:
                    head.on_ok(bytes(buf[pos:end]))
                if t == _Z:
                    ex.status = _STATUS[buf[pos + 5]]
                    if not head.hidden and ex.status == b"I" and not q:
                        release = not self.pinned
                if q and q[0].synth is not None:
                    if run < end:
                        out.append(buf[run:end])
                    run = end
                    ex.deliver_synth()
            pos = end
            if release:
                break
        if run < pos:
            out.append(buf[run:pos])
        if release or (self.gone and not q and ex.status == b"I"):
            # The backend goes to the next waiting client before this reply is written: the
            # server connections are the scarce resource, so its next requests go out first.
            if ex.server_out:
                self._flush()
            self._detach(backend)
            self._flush()
            return pos
        self._flush()
        if self.gone and not q:
            self._clean_backend()
        elif self.held and self.prep.checking is None:
            self._resume()
        return pos

    def _server_closing(self, msg: bytes) -> bool:
        """A FATAL error outside any request (57P01 at server shutdown, a terminated
        backend): passed on as it is, since the server closes the connection next."""
        severity = p.parse_error_fields(msg[5:]).get("V", "")
        if severity not in ("FATAL", "PANIC"):
            return False
        self.server_closing = True
        self.ex.client_out.append(msg)
        return True

    def _async_message(self, backend: Backend, t: int, msg: bytes) -> None:
        if t == _S:
            name, value = p.parse_parameter_status(msg[5:])
            backend.params[name] = value
            if self.params.get(name) == value:
                return
            self.params[name] = value
            if name in TRACKED:
                self.wanted[name] = value
        self.ex.client_out.append(msg)

    def _server_error(self, backend: Backend, head: Pending, msg: bytes) -> None:
        ex = self.ex
        fields = p.parse_error_fields(msg[5:])
        code = fields.get("C", "")
        if head.error is not None and code == "26000":
            msg = head.error
        if code == "0A000" and head.stmt is not None and _CACHED_PLAN in fields.get("M", ""):
            self.prep.plan_changed(backend, head.stmt)
        if fields.get("V") in ("FATAL", "PANIC"):
            self.server_closing = True
        if not head.extended:  # a simple Query or Sync: ReadyForQuery follows
            if head.hidden:  # the proxy's own SET or ROLLBACK: the client asked for neither
                if head.undo is not None:
                    head.undo()
            else:
                ex.client_out.append(msg)
            return
        ex.client_out.append(msg)
        ex.pending.popleft()
        if head.undo is not None:
            head.undo()
        ex.skip_to_sync()

    def _detach(self, backend: Backend) -> None:
        self.backend = None
        if self.throttled:  # the backend's backpressure paused the client
            self.resume_client()
        if self._cleanup_timer is not None:
            self._cleanup_timer.cancel()
            self._cleanup_timer = None
        self.pool.release(backend)

    def server_lost(self, backend: Backend, exc: Exception | None) -> None:
        self.backend = None
        self.ex.pending.clear()
        if self.gone:
            return
        if self.server_closing:  # the client has the server's own FATAL error already
            self._close()
        else:
            self._fatal("08006", "the server connection was lost; reconnect and retry")
        self._flush()

    def _desync(self, backend: Backend, what: str) -> None:
        logger.error("protocol desync with server pid=%d: %s", backend.pid, what)
        self.backend = None
        backend.owner = None
        backend.close()
        self._fatal("08P01", f"proxy lost track of the server protocol: {what}")
        self._flush()

    # --- cleanup after the client left --------------------------------------------------

    def _clean_backend(self) -> None:
        """Roll the backend back to idle, then return it to the pool (in ``server_data``); if
        that does not finish in time, the connection is closed."""
        backend = self.backend
        if backend is None or self._cleanup_timer is not None:
            return
        if backend.transport is not None:
            backend.transport.resume_reading()  # the client may have paused it; drain now
        pins = self.pins
        _janitor.queue_rollback(self.ex, unlisten=pins.listening, sql_prepared=pins.sql_prepared)
        self._flush()
        loop = asyncio.get_running_loop()
        self._cleanup_timer = loop.call_later(self.proxy.cleanup_timeout, self._cleanup_expired)

    def _cleanup_expired(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.owner = None
            backend.close("did not return to idle after its client disconnected")

    # --- output -------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.ex.client_out.append(data)

    def _flush(self) -> None:
        ex = self.ex
        # One write per side; a lone chunk (the usual request or reply) is written as it is.
        out = ex.server_out
        if out:
            if self.backend is not None:
                self.backend.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        out = ex.client_out
        if out:
            if self.transport is not None and not self.gone:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _fatal(self, sqlstate: str, message: str) -> None:
        self._send(p.error_response(sqlstate, message, severity="FATAL"))
        self._close()

    def _close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self.state = "closed"


def _raise(error: bytes) -> bytes:
    """A simple Query that makes the server raise ``error`` (an ErrorResponse message)."""
    fields = p.parse_error_fields(error[5:])
    message = fields["M"].replace("'", "''")
    sql = (
        "DO $poolguard$BEGIN RAISE EXCEPTION USING ERRCODE = '"
        + fields["C"]
        + "', MESSAGE = '"
        + message
        + "'; END$poolguard$"
    )
    return p.frame(p.QUERY, sql.encode() + b"\0")
