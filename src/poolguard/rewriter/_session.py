"""One client connection: startup and authentication, then statement rewriting and reply routing.

Every request forwarded to (or answered for) the server gets a ``_Pending`` record in a FIFO,
in the order the client sent it. Server replies are matched against the head of that FIFO,
which is how the session knows which replies to hide (a lazy Parse it added), which to
synthesize (ParseComplete for a statement the backend already has) and when the backend can go
back to the pool: at ReadyForQuery 'I' with nothing outstanding.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import _auth
from . import _protocol as p
from ._statements import Statement, deallocate_target, drops_all, may_drop_statements

if TYPE_CHECKING:
    from ._pool import Backend
    from ._server import Proxy

logger = logging.getLogger("poolguard.rewriter")

_UNPACK_I32 = struct.Struct("!i").unpack_from
_E, _Z, _S, _N, _A, _G = b"EZSNAG"  # server message types as ints
_COPY_MSGS = (p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL)
# A Bind to this name always fails with 26000; it is how the proxy gets the server to raise an
# error at the right point of a pipeline with PostgreSQL's own transaction semantics.
_MISSING = b"poolguard: no such statement"
_PROBE = p.build_bind(b"", _MISSING, b"\0\0\0\0\0\0")
_CACHED_PLAN = "cached plan must not change result type"
_WAIT_BUFFER = 256 * 1024
_SYNC_ENDS = b"Z"  # ReadyForQuery completes a Sync, a simple Query or a FunctionCall
_RESERVED_STARTUP = {"user", "database", "replication", "options"}
# Settings the server reports with ParameterStatus that a client may change: each client's
# values are re-applied with SET whenever it gets a backend whose values differ.
_TRACKED = {
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "search_path",
    "default_transaction_read_only",
}


class _Pending:
    """One request awaiting server replies (or a synthesized reply awaiting its turn)."""

    __slots__ = (
        "copying",
        "ends",
        "error",
        "extended",
        "hidden",
        "on_ok",
        "stmt",
        "sync",
        "synth",
        "undo",
    )

    def __init__(
        self,
        ends: bytes,
        *,
        extended: bool = True,
        hidden: bool = False,
        stmt: Statement | None = None,
        error: bytes | None = None,
        undo: Callable[[], None] | None = None,
        on_ok: Callable[[], None] | None = None,
        synth: bytes | Callable[[], bytes] | None = None,
        sync: bool = False,
    ) -> None:
        self.ends = ends  # message types that complete this request
        self.extended = extended  # an error here makes the server skip to the next Sync
        self.hidden = hidden  # added by the proxy: only its errors reach the client
        self.stmt = stmt
        self.error = error  # replaces the server's 26000 error (a probe)
        self.undo = undo  # the request failed or was skipped: forget its effects
        self.on_ok = on_ok
        self.synth = synth  # reply to deliver when this reaches the head, no server involved
        self.sync = sync  # a Sync: where skipping after an error stops
        self.copying = False  # the server answered with CopyInResponse


class _Unnamed:
    """A client's unnamed statement: kept so it can be parsed again on another backend."""

    __slots__ = ("query", "types")

    def __init__(self, query: bytes, types: tuple[int, ...]) -> None:
        self.query = query
        self.types = types


class Session(asyncio.Protocol):
    def __init__(self, proxy: Proxy, *, trusted: bool = False) -> None:
        self.proxy = proxy
        self.trusted = trusted  # on a unix socket in a private folder: no password asked
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "startup"
        self.scram: _auth.ScramServer | None = None
        self.params: dict[str, str] = {}  # what the client believes the session settings are
        self.wanted: dict[str, str] = {}  # settings to re-apply on each backend
        self.statements: dict[bytes, Statement] = {}
        self.unnamed: _Unnamed | None = None
        self.backend: Backend | None = None
        self.waiting = False  # asked the pool for a backend, not attached yet
        self.paused = False  # stopped reading from the client while waiting
        self.stalled: list[tuple[bytes, bytes]] = []
        self.pending: deque[_Pending] = deque()
        self.skipping = False  # the server is discarding messages until the next Sync
        self.status = b"I"
        self.client_out: list[bytes | bytearray] = []
        self.server_out: list[bytes] = []
        self.gone = False  # client disconnected; only cleaning the backend remains
        self.pid = 0
        self.key = 0
        self._cleanup_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Session pid={self.pid} state={self.state}>"

    # --- client side: asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass it
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self.buf += data
        try:
            if self.state == "ready":
                self._client_messages()
            else:
                self._startup_messages()
        except p.ProtocolError as exc:
            self._fatal(exc.sqlstate, f"protocol violation: {exc}")
        except _auth.AuthError as exc:
            user = self.params.get("user", "")
            logger.warning("client authentication failed for user %r: %s", user, exc)
            self._fatal("28P01", f'password authentication failed for user "{user}"')
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.transport = None
        self.proxy.forget_session(self)
        if self.waiting:
            self.proxy.pool.cancel_wait(self)
            self.waiting = False
        if self.backend is not None:
            self._clean_backend()

    def pause_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    def pause_client(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport is not None and not self.waiting:
            self.transport.resume_reading()

    # --- startup and authentication ----------------------------------------------------

    def _startup_messages(self) -> None:
        while self.state == "startup":
            got = p.read_startup(self.buf)
            if got is None:
                return
            body, used = got
            del self.buf[:used]
            startup = p.parse_startup(body)
            if startup.cancel is not None:
                self.proxy.cancel(*startup.cancel)
                self._close()
                return
            if startup.code in (p.SSL_REQUEST, p.GSSENC_REQUEST):
                self._send(b"N")  # no TLS here: the client may go on in plain text or give up
                continue
            self._begin_auth(startup.params)
        while self.state in ("auth", "auth2"):
            msg = p.next_message(self.buf, p.MAX_STARTUP_SIZE)
            if msg is None:
                return
            kind, body = msg
            if kind != b"p" or self.scram is None:
                raise p.ProtocolError(f"expected a password message, got {kind!r}")
            self._auth_message(body)
        if self.state == "ready" and self.buf:  # queries sent right behind the password
            self._client_messages()

    def _begin_auth(self, params: dict[str, str]) -> None:
        proxy = self.proxy
        up = proxy.pool.upstream
        user = params.get("user", "")
        database = params.get("database") or user
        self.params = {"user": user}
        if user != up.user:
            raise _auth.AuthError(f"user {user!r} is not the proxy's user {up.user!r}")
        if database != up.dbname:
            self._fatal(
                "3D000",
                f'database "{database}" is not served here: this proxy serves only '
                f'"{up.dbname}" (connect to it, or start another proxy)',
            )
            return
        if "replication" in params:
            self._fatal("0A000", "replication connections are not supported by the proxy")
            return
        canonical = {k.lower(): k for k in (*_TRACKED, *proxy.server_params)}
        self.wanted = {k: v for k, v in proxy.server_params.items() if k in _TRACKED}
        for name, value in params.items():
            name = canonical.get(name.lower(), name)
            if name in _RESERVED_STARTUP:
                if name == "options" and value.strip():
                    self._fatal(
                        "0A000",
                        "startup parameter 'options' is not supported by the proxy: "
                        "pass settings as separate startup parameters or use SET",
                    )
                    return
                continue
            if not name.replace("_", "").replace(".", "").isalnum():
                raise p.ProtocolError(f"invalid startup parameter name {name!r}")
            if name == "client_encoding" and value.lower().replace("-", "") in ("utf8", "unicode"):
                value = "UTF8"  # what the server would report back
            self.wanted[name] = value
        if self.trusted:
            self._send(p.AUTH_OK)
            self._logged_in()
            return
        self.scram = _auth.ScramServer(proxy.verifier)
        self._send(p.frame(b"R", struct.pack("!i", 10) + _auth.MECHANISM + b"\0\0"))
        self.state = "auth"

    def _auth_message(self, body: bytes) -> None:
        assert self.scram is not None
        if self.state == "auth":
            r = p.Reader(body)
            if r.cstring() != _auth.MECHANISM:
                raise _auth.AuthError("client chose an unsupported SASL mechanism")
            length = r.int32()
            data = r.rest()
            if length != len(data):
                raise p.ProtocolError("SASLInitialResponse length mismatch")
            reply = self.scram.first(data)
            self._send(p.frame(b"R", struct.pack("!i", 11) + reply))
            self.state = "auth2"
            return
        reply = self.scram.final(body)
        self._send(p.frame(b"R", struct.pack("!i", 12) + reply))
        self._send(p.AUTH_OK)
        self.scram = None
        self._logged_in()

    def _logged_in(self) -> None:
        """Tell the client the session settings, its cancel key, and that it may send queries."""
        self.params.update(self.proxy.server_params)
        self.params.update(self.wanted)
        for name, value in self.params.items():
            if name != "user" and (name in self.proxy.server_params or name in self.wanted):
                self._send(p.parameter_status(name, value))
        self.pid, self.key = self.proxy.register_session(self)
        self._send(p.backend_key_data(self.pid, self.key))
        self._send(p.ready_for_query(b"I"))
        self.state = "ready"

    # --- client messages ----------------------------------------------------------------

    def _client_messages(self) -> None:
        if self.waiting:
            # Buffer while waiting for a backend; stop reading only if the client keeps
            # sending (pausing costs two epoll calls, and nearly every request waits briefly).
            if len(self.buf) > _WAIT_BUFFER and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        msgs, used = p.split_messages(self.buf, self.proxy.max_message_size)
        del self.buf[:used]
        for i, (kind, body) in enumerate(msgs):
            if not self._handle(kind, body):
                self.stalled = msgs[i:]  # keep the rest in order until a backend is free
                return

    def attach(self, backend: Backend) -> None:
        """Called by the pool when a backend frees up for this waiting session."""
        self.waiting = False
        if self.gone:
            self.proxy.pool.release(backend)
            return
        self.backend = backend
        self._sync_settings(backend)
        stalled, self.stalled = self.stalled, []
        try:
            for i, (kind, body) in enumerate(stalled):
                if not self._handle(kind, body):
                    self.stalled = stalled[i:]
                    return
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            self._client_messages()
        except p.ProtocolError as exc:
            self._fatal(exc.sqlstate, f"protocol violation: {exc}")
        self._flush()

    def attach_failed(self, reason: str) -> None:
        self.waiting = False
        self._fatal("08006", f"proxy could not get a server connection: {reason}")
        self._flush()

    def _need_backend(self) -> Backend | None:
        if self.backend is None:
            backend = self.proxy.pool.acquire(self)
            if backend is None:
                self.waiting = True
                return None
            self.backend = backend
            self._sync_settings(backend)
        return self.backend

    def _sync_settings(self, backend: Backend) -> None:
        """Re-apply the client's settings where this backend's differ (one hidden SET each)."""
        if self.wanted.items() <= backend.params.items():  # the usual case, checked in C
            return
        for name, value in self.wanted.items():
            if backend.params.get(name) == value:
                continue
            sql = f"SET {name} TO '{value.replace(chr(39), chr(39) * 2)}'"
            self._to_server(p.frame(p.QUERY, sql.encode() + b"\0"))
            backend.params[name] = value
            backend.unnamed = None  # a simple Query drops the unnamed statement

            def failed(name: str = name, value: str = value) -> None:
                # PostgreSQL would have refused this at login; don't retry it on every backend.
                logger.warning("could not apply client setting %s=%r on the server", name, value)
                backend.params.pop(name, None)
                if self.wanted.get(name) == value:
                    del self.wanted[name]

            self.pending.append(_Pending(_SYNC_ENDS, extended=False, hidden=True, undo=failed))

    def _handle(self, kind: bytes, body: bytes) -> bool:
        """Route one client message; False if it has to wait for a backend."""
        if kind == p.TERMINATE:
            self._close()
            return True
        if self.skipping and kind != p.SYNC:
            return True  # the server would discard it too, until Sync
        if kind == p.BIND:
            return self._bind(body)
        if kind == p.EXECUTE or kind == p.FUNCTION_CALL:
            if self._need_backend() is None:
                return False
            self._to_server(p.frame(kind, body))
            ends = b"CIsE" if kind == p.EXECUTE else _SYNC_ENDS
            self.pending.append(_Pending(ends, extended=kind == p.EXECUTE))
            return True
        if kind == p.SYNC:
            return self._sync()
        if kind == p.PARSE:
            return self._parse(p.parse_parse(body))
        if kind == p.DESCRIBE:
            return self._describe(body)
        if kind == p.CLOSE:
            return self._close_message(body)
        if kind == p.FLUSH:
            if self.backend is not None:
                self._to_server(p.FLUSH_MSG)
            return True
        if kind == p.QUERY:
            return self._query(body)
        if kind in _COPY_MSGS:
            if self.backend is not None:  # outside COPY the server ignores these as well
                self._to_server(p.frame(kind, body))
                if kind != p.COPY_DATA:
                    self._copy_ended()
            return True
        raise p.ProtocolError(f"unexpected message type {kind!r}")

    def _sync(self) -> bool:
        self.skipping = False
        if self.backend is None and not self.pending:
            # Nothing was sent since the last ReadyForQuery: answer without taking a backend.
            self._send(p.ready_for_query(b"I"))
            return True
        self._to_server(p.SYNC_MSG)
        self.pending.append(_Pending(_SYNC_ENDS, extended=False, sync=True))
        return True

    def _parse(self, msg: p.Parse) -> bool:
        if msg.name == b"":
            return self._parse_unnamed(msg)
        if msg.name in self.statements:
            return self._probe(
                p.error_response("42P05", f'prepared statement "{_name(msg.name)}" already exists')
            )
        stmt = self.proxy.registry.get((msg.query, msg.param_types))
        name = msg.name
        self.statements[name] = stmt

        def undo() -> None:
            if self.statements.get(name) is stmt:
                del self.statements[name]

        if self.status != b"E":
            backend = self.backend
            if (backend is None and stmt.verified) or (
                backend is not None and backend.statements.touch(stmt)
            ):
                # Already valid here: answer in turn without asking the server.
                self._synth(p.PARSE_COMPLETE, undo)
                return True
        backend = self._need_backend()
        if backend is None:
            del self.statements[name]  # redone when the message is handled again
            return False
        if self.status == b"E":
            # PostgreSQL rejects Parse in a failed transaction; let the server say so.
            self._probe_on(backend, None, undo)
            return True
        if backend.statements.touch(stmt):
            self._synth(p.PARSE_COMPLETE, undo)
            return True
        self._prepare(backend, stmt, hidden=False, undo=undo)
        return True

    def _parse_unnamed(self, msg: p.Parse) -> bool:
        backend = self._need_backend()
        if backend is None:
            return False
        query = msg.query
        if may_drop_statements(query):
            target = deallocate_target(query)
            stmt = None if target is None else self.statements.pop(target, None)
            if stmt is not None:
                # Keep the shared server statement: DEALLOCATE a throwaway one instead, which
                # gives the client the same replies and tag.
                throwaway = self.proxy.registry.get((b"SELECT 1", ()))
                self._prepare(backend, throwaway, hidden=True)
                backend.statements.discard(throwaway)
                query = b'DEALLOCATE "' + throwaway.name + b'"'
            else:
                self._dropping(backend, query)
        u = _Unnamed(query, msg.param_types)
        self.unnamed = u
        backend.unnamed = u

        def undo() -> None:
            if self.unnamed is u:
                self.unnamed = None
            if backend.unnamed is u:
                backend.unnamed = None

        self._to_server(p.build_parse(b"", query, msg.param_types))
        self.pending.append(_Pending(b"1E", undo=undo))
        return True

    def _prepare(
        self,
        backend: Backend,
        stmt: Statement,
        *,
        hidden: bool,
        undo: Callable[[], None] | None = None,
    ) -> None:
        """Parse ``stmt`` on ``backend``, closing what the LRU evicts (those replies hidden)."""
        for old in backend.statements.add(stmt):
            self._to_server(p.build_target(p.CLOSE, b"S", old.name))
            self.pending.append(_Pending(b"3E", hidden=True))
        # Close first: if an earlier Close or DEALLOCATE of this name was skipped by an error,
        # the server may still hold it, and a Parse would then fail with 42P05.
        self._to_server(p.build_target(p.CLOSE, b"S", stmt.name))
        self.pending.append(_Pending(b"3E", hidden=True))
        self._to_server(p.build_parse(stmt.name, stmt.query, stmt.param_types))

        def failed() -> None:
            backend.statements.discard(stmt)
            if undo is not None:
                undo()

        def ok() -> None:
            stmt.verified = True

        self.pending.append(_Pending(b"1E", hidden=hidden, undo=failed, on_ok=ok))

    def _ensure(self, backend: Backend, name: bytes) -> tuple[bytes, Statement | None] | None:
        """The server-side name for a Bind/Describe of the client's ``name`` (and its Statement,
        None for the unnamed one), parsed on ``backend`` first if needed; None if the client
        has no such statement."""
        if name == b"":
            u = self.unnamed
            if u is None:
                return None
            if backend.unnamed is not u:
                backend.unnamed = u
                self._to_server(p.build_parse(b"", u.query, u.types))

                def undo() -> None:
                    if backend.unnamed is u:
                        backend.unnamed = None

                self.pending.append(_Pending(b"1E", hidden=True, undo=undo))
            return b"", None
        stmt = self.statements.get(name)
        if stmt is None:
            return None
        if not backend.statements.touch(stmt):
            self._prepare(backend, stmt, hidden=True)
        return stmt.name, stmt

    def _bind(self, body: bytes) -> bool:
        backend = self._need_backend()
        if backend is None:
            return False
        portal, name, rest_at = p.split_bind(body)
        target = self._ensure(backend, name)
        if target is None:
            return self._probe(_missing_error(name))
        self._to_server(p.build_bind(portal, target[0], body[rest_at:]))
        self.pending.append(_Pending(b"2E", stmt=target[1]))
        return True

    def _describe(self, body: bytes) -> bool:
        which, name = p.parse_target(body)
        backend = self._need_backend()
        if backend is None:
            return False
        if which == b"P":
            self._to_server(p.frame(p.DESCRIBE, body))
            self.pending.append(_Pending(b"TnE"))
            return True
        target = self._ensure(backend, name)
        if target is None:
            return self._probe(_missing_error(name))
        self._to_server(p.build_target(p.DESCRIBE, b"S", target[0]))
        self.pending.append(_Pending(b"TnE", stmt=target[1]))
        return True

    def _close_message(self, body: bytes) -> bool:
        which, name = p.parse_target(body)
        if which == b"P":
            if self.backend is None:  # no transaction, so no portal: nothing to close
                self._synth(p.CLOSE_COMPLETE, None)
            else:
                self._to_server(p.frame(p.CLOSE, body))
                self.pending.append(_Pending(b"3E"))
            return True
        # Statements stay prepared on the server for other clients; the client's name goes.
        if name == b"":
            u = self.unnamed
            self.unnamed = None

            def undo() -> None:
                if self.unnamed is None:
                    self.unnamed = u

        else:
            stmt = self.statements.pop(name, None)

            def undo() -> None:
                if stmt is not None:
                    self.statements.setdefault(name, stmt)

        self._synth(p.CLOSE_COMPLETE, undo)
        return True

    def _query(self, body: bytes) -> bool:
        sql = p.query_text(body)
        dropping = may_drop_statements(sql)
        if dropping:
            target = deallocate_target(sql)
            # In a failed transaction PostgreSQL refuses DEALLOCATE: the server will say so.
            if (
                target is not None
                and self.status != b"E"
                and self.statements.pop(target, None) is not None
            ):
                # The server statement stays for other clients; only the client's name goes.
                self._synth(p.command_complete(b"DEALLOCATE"), None)
                self._synth(lambda: p.ready_for_query(self.status), None)
                return True
        backend = self._need_backend()
        if backend is None:
            return False
        if dropping:
            self._dropping(backend, sql)
        # A simple Query drops the unnamed statement, on the server and so for the client.
        self.unnamed = None
        backend.unnamed = None
        self._to_server(p.frame(p.QUERY, body))
        self.pending.append(_Pending(_SYNC_ENDS, extended=False))
        return True

    def _dropping(self, backend: Backend, sql: bytes) -> None:
        """SQL that may drop prepared statements: forget what the backend holds (later uses
        re-prepare, so forgetting too much is safe) and, for a lone DEALLOCATE ALL or DISCARD
        ALL, the client's own names too."""
        backend.statements.clear()
        backend.unnamed = None
        if drops_all(sql):
            self.statements.clear()
            self.unnamed = None

    def _copy_ended(self) -> None:
        # Syncs sent while an extended-protocol COPY FROM STDIN ran were ignored by the server
        # (libpq sends one right after Execute), so no ReadyForQuery will answer them.
        q = self.pending
        if q and q[0].copying and q[0].extended:
            head = q.popleft()
            kept = [e for e in q if e.ends != _SYNC_ENDS or e.extended is not False]
            q.clear()
            q.append(head)
            q.extend(kept)

    def _probe(self, error: bytes) -> bool:
        backend = self._need_backend()
        if backend is None:
            return False
        self._probe_on(backend, error, None)
        return True

    def _probe_on(
        self, backend: Backend, error: bytes | None, undo: Callable[[], None] | None
    ) -> None:
        """Make the server fail here, so the error lands in pipeline order and aborts the
        transaction exactly as PostgreSQL would; its 26000 is replaced with ``error``."""
        self._to_server(_PROBE)
        self.pending.append(_Pending(b"2E", error=error, undo=undo))

    def _synth(self, reply: bytes | Callable[[], bytes], undo: Callable[[], None] | None) -> None:
        if not self.pending:
            self._send(reply if isinstance(reply, bytes) else reply())
        else:
            self.pending.append(_Pending(b"", synth=reply, undo=undo))

    # --- server replies -----------------------------------------------------------------

    def server_data(self, backend: Backend, buf: bytearray) -> int:
        """Route the complete server messages at the start of ``buf``; returns bytes used."""
        pos, n = 0, len(buf)
        q = self.pending
        out = self.client_out
        release = False
        while n - pos >= 5:
            end = pos + 1 + _UNPACK_I32(buf, pos + 1)[0]
            if end > n:
                break
            t = buf[pos]
            if t in (_S, _N, _A):
                self._async_message(backend, t, bytes(buf[pos:end]))
                pos = end
                continue
            if not q:
                self._desync(backend, f"unexpected message {chr(t)!r} from server")
                return n
            head = q[0]
            if t == _E:
                self._server_error(backend, head, bytes(buf[pos:end]))
            else:
                if not head.hidden:
                    out.append(buf[pos:end])
                if t == _G:
                    head.copying = True
                if t in head.ends:
                    q.popleft()
                    if head.on_ok is not None:
                        head.on_ok()
                    if t == _Z:
                        self.status = bytes(buf[pos + 5 : pos + 6])
                        if not head.hidden and self.status == b"I" and not q:
                            release = True
                    self._deliver_synth()
            pos = end
            if release:
                break
        self._flush()
        if release or (self.gone and not q and self.status == b"I"):
            self._detach(backend)
        elif self.gone and not q:
            self._clean_backend()
        return pos

    def _async_message(self, backend: Backend, t: int, msg: bytes) -> None:
        if t == _S:
            name, value = p.parse_parameter_status(msg[5:])
            backend.params[name] = value
            if self.params.get(name) == value:
                return
            self.params[name] = value
            if name in _TRACKED:
                self.wanted[name] = value
        self.client_out.append(msg)

    def _server_error(self, backend: Backend, head: _Pending, msg: bytes) -> None:
        q = self.pending
        fields = p.parse_error_fields(msg[5:])
        code = fields.get("C", "")
        if head.error is not None and code == "26000":
            msg = head.error
        if code == "0A000" and head.stmt is not None and _CACHED_PLAN in fields.get("M", ""):
            # The server statement is unusable now; the next Parse of this SQL gets a fresh one.
            self.proxy.registry.retire(head.stmt)
            backend.statements.discard(head.stmt)
        if not head.extended:  # a simple Query or Sync: ReadyForQuery follows
            if head.hidden:  # the proxy's own SET or ROLLBACK: the client asked for neither
                if head.undo is not None:
                    head.undo()
            else:
                self.client_out.append(msg)
            return
        self.client_out.append(msg)
        q.popleft()
        if head.undo is not None:
            head.undo()
        # The server now discards everything up to the next Sync.
        while q and not q[0].sync:
            skipped = q.popleft()
            if skipped.undo is not None:
                skipped.undo()
        if not q:
            self.skipping = True

    def _deliver_synth(self) -> None:
        q = self.pending
        while q and q[0].synth is not None:
            synth = q.popleft().synth
            assert synth is not None
            self.client_out.append(synth if isinstance(synth, bytes) else synth())

    def _detach(self, backend: Backend) -> None:
        self.backend = None
        self.resume_client()  # in case the backend's backpressure paused the client
        if self._cleanup_timer is not None:
            self._cleanup_timer.cancel()
            self._cleanup_timer = None
        self.proxy.pool.release(backend)

    def server_lost(self, backend: Backend, exc: Exception | None) -> None:
        self.backend = None
        self.pending.clear()
        if not self.gone:
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
        """Bring the backend back to idle with no transaction open, then return it to the pool.

        Replies still due are swallowed; a running COPY is failed; a Sync and ROLLBACK follow
        whatever was in flight. If that does not finish in time, the connection is closed.
        """
        backend = self.backend
        if backend is None or self._cleanup_timer is not None:
            return
        self.client_out.clear()
        if backend.transport is not None:
            backend.transport.resume_reading()  # the client may have paused it; drain now
        q = self.pending
        if q and q[0].copying:
            self._to_server(p.frame(p.COPY_FAIL, b"client disconnected\0"))
            self._copy_ended()
        self.skipping = False
        self._to_server(p.SYNC_MSG)
        self.pending.append(_Pending(_SYNC_ENDS, extended=False, hidden=True, sync=True))
        self._to_server(p.frame(p.QUERY, b"ROLLBACK\0"))
        self.pending.append(_Pending(_SYNC_ENDS, extended=False, hidden=True))
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
        self.client_out.append(data)

    def _to_server(self, data: bytes) -> None:
        self.server_out.append(data)

    def _flush(self) -> None:
        if self.server_out:
            if self.backend is not None:
                self.backend.write(b"".join(self.server_out))
            self.server_out.clear()
        if self.client_out:
            if self.transport is not None and not self.gone:
                self.transport.write(b"".join(self.client_out))
            self.client_out.clear()

    def _fatal(self, sqlstate: str, message: str) -> None:
        self._send(p.error_response(sqlstate, message, severity="FATAL"))
        self._close()

    def _close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self.state = "closed"


def _name(raw: bytes) -> str:
    return raw.decode(errors="replace")


def _missing_error(name: bytes) -> bytes:
    if name == b"":
        return p.error_response("26000", "unnamed prepared statement does not exist")
    return p.error_response("26000", f'prepared statement "{_name(name)}" does not exist')
