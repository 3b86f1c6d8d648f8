"""One client's prepared statements and how its Parse/Bind/Describe/Close are rewritten.

A client's statement names are private to it; each maps to a pool-wide server statement
(``_statements.Registry``) that is parsed lazily on whichever backend the client holds when
it binds or describes it. Replies the client did not ask for (a lazy Parse, a Close of an
evicted statement) are hidden; replies the server is not asked for are synthesized in turn.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _compiled
from . import _protocol as p
from ._pool import Backend
from ._replies import BIND_UNNAMED_REPLY, QUERY_REPLY, Exchange, Pending
from ._sqltext import (
    deallocate_target,
    drops_all,
    ends_transaction,
    may_drop_statements,
    may_reset_settings,
)
from ._statements import Registry, Statement

# All or none of the hot path runs compiled (_compiled), so its choice says this module's too.
_COMPILED = _compiled.active

# PostgreSQL's own answers, given where the proxy knows them without asking the server.
_ABORTED = p.error_response(
    "25P02", "current transaction is aborted, commands ignored until end of transaction block"
)
_CHANGED = p.error_response("0A000", "cached plan must not change result type")


class Unnamed:
    """A client's unnamed statement: kept so it can be parsed again on another backend."""

    __slots__ = ("query", "types")

    def __init__(self, query: bytes, types: tuple[int, ...]) -> None:
        self.query = query
        self.types = types


class ClientStatements:
    """The statement names one client has prepared, rewritten onto server statements."""

    __slots__ = ("checking", "ex", "named", "registry", "unnamed")

    def __init__(self, registry: Registry, ex: Exchange) -> None:
        self.registry = registry
        self.ex = ex
        self.named: dict[bytes, Statement] = {}
        self.unnamed: Unnamed | None = None
        # A statement whose result type is being compared on a new backend: the client's
        # requests wait until the server answers (see ``_ensure``).
        self.checking: Statement | None = None

    # --- Parse --------------------------------------------------------------------------

    def parse_without_server(self, msg: p.Parse, backend: Backend | None) -> bool:
        """Answer a named Parse in turn without the server if the statement is known valid
        (on ``backend``, or anywhere when there is none); False if the server is needed."""
        if msg.name == b"" or msg.name in self.named:
            return False
        if self.ex.status == b"E" and not ends_transaction(msg.query):
            return False
        stmt = self.registry.get((msg.query, msg.param_types))
        if (backend is None and stmt.verified) or (
            backend is not None and backend.statements.touch(stmt)
        ):
            self.named[msg.name] = stmt
            self.ex.synth(p.PARSE_COMPLETE, self._forget(msg.name, stmt))
            return True
        return False

    def parse(self, backend: Backend, msg: p.Parse, body: bytes) -> None:
        """``body`` is the message as the client sent it (passed on when nothing changes)."""
        if msg.name == b"":
            self._parse_unnamed(backend, msg, body)
            return
        if self.ex.status == b"E" and not ends_transaction(msg.query):
            # In a failed transaction PostgreSQL parses only what ends it (pgJDBC sends a
            # named Parse of ROLLBACK there); anything else gets 25P02 and aborts the pipeline.
            self.ex.probe(_ABORTED, None)
            return
        if msg.name in self.named:
            error = f'prepared statement "{_name(msg.name)}" already exists'
            self.ex.probe(p.error_response("42P05", error), None)
            return
        stmt = self.registry.get((msg.query, msg.param_types))
        self.named[msg.name] = stmt
        undo = self._forget(msg.name, stmt)
        if backend.statements.touch(stmt):
            self.ex.synth(p.PARSE_COMPLETE, undo)
        else:
            self.prepare(backend, stmt, hidden=False, undo=undo)

    def _forget(self, name: bytes, stmt: Statement) -> Callable[[], None]:
        def undo() -> None:
            if self.named.get(name) is stmt:
                del self.named[name]

        return undo

    def _parse_unnamed(self, backend: Backend, msg: p.Parse, body: bytes) -> None:
        query = msg.query
        if may_drop_statements(query):
            target = deallocate_target(query)
            stmt = None if target is None else self.named.pop(target, None)
            if stmt is not None:
                # Keep the shared server statement: DEALLOCATE a throwaway one instead, which
                # gives the client the same replies and tag.
                throwaway = self.registry.get((b"SELECT 1", ()))
                self.prepare(backend, throwaway, hidden=True)
                backend.statements.discard(throwaway)
                query = b'DEALLOCATE "' + throwaway.name + b'"'
            else:
                self.dropping(backend, query)
        if backend.extra and may_reset_settings(query):
            backend.settings_reset()
        u = Unnamed(query, msg.param_types)
        self.unnamed = u
        backend.unnamed = u

        def undo() -> None:
            if self.unnamed is u:
                self.unnamed = None
            if backend.unnamed is u:
                backend.unnamed = None

        if query is msg.query:
            data = p.frame(p.PARSE, body)
        else:
            data = p.build_parse(b"", query, msg.param_types)
        self.ex.to_server(data, Pending(b"1E", undo=undo))

    def prepare(
        self,
        backend: Backend,
        stmt: Statement,
        *,
        hidden: bool,
        undo: Callable[[], None] | None = None,
    ) -> None:
        """Parse ``stmt`` on ``backend``, closing what the LRU evicts (those replies hidden).

        The first Parse of a statement records its result type; a later one on another backend
        compares (``checking`` is set until the server answers, and the client waits).
        """
        ex = self.ex
        for old in backend.statements.add(stmt):
            ex.to_server(p.build_target(p.CLOSE, b"S", old.name), Pending(b"3E", hidden=True))
        # Close first: if an earlier Close or DEALLOCATE of this name was skipped by an error,
        # the server may still hold it, and a Parse would then fail with 42P05.
        ex.to_server(p.build_target(p.CLOSE, b"S", stmt.name), Pending(b"3E", hidden=True))

        def failed() -> None:
            backend.statements.discard(stmt)
            if undo is not None:
                undo()

        def ok(_: bytes) -> None:
            stmt.verified = True

        ex.to_server(
            p.build_parse(stmt.name, stmt.query, stmt.param_types),
            Pending(b"1E", hidden=hidden, undo=failed, on_ok=ok),
        )
        describe = p.build_target(p.DESCRIBE, b"S", stmt.name)
        if stmt.result is None:

            def record(result: bytes) -> None:
                if stmt.result is None:
                    stmt.result = result

            ex.to_server(describe, Pending(b"Tn", hidden=True, on_ok=record))
            return

        def skipped() -> None:
            if self.checking is stmt:
                self.checking = None

        def compare(result: bytes) -> None:
            skipped()
            if result != stmt.result:
                # DDL changed the result type since the statement was first prepared: this
                # copy must not serve clients that were told the old one.
                self.plan_changed(backend, stmt)
                ex.to_server(p.build_target(p.CLOSE, b"S", stmt.name), Pending(b"3E", hidden=True))

        ex.to_server(describe, Pending(b"Tn", hidden=True, on_ok=compare, undo=skipped))
        if hidden:  # a lazy Parse for a Bind or Describe: those wait for the answer
            self.checking = stmt
            ex.to_server(p.FLUSH_MSG)  # needed now, not at the client's Sync

    # --- Bind, Describe, Close ----------------------------------------------------------

    def _ensure(
        self, backend: Backend, name: bytes
    ) -> tuple[bytes, Statement | None] | bytes | None:
        """The server-side name for a Bind/Describe of the client's ``name`` (and its Statement,
        None for the unnamed one), parsed on ``backend`` first if needed; or the error to
        answer with; or None when the client must wait for a result-type check."""
        if name == b"":
            u = self.unnamed
            if u is None:
                return _missing_error(name)
            if backend.unnamed is not u:
                backend.unnamed = u

                def undo() -> None:
                    if backend.unnamed is u:
                        backend.unnamed = None

                self.ex.to_server(
                    p.build_parse(b"", u.query, u.types), Pending(b"1E", hidden=True, undo=undo)
                )
            return b"", None
        stmt = self.named.get(name)
        if stmt is None:
            return _missing_error(name)
        if stmt.stale:
            return _CHANGED
        if not backend.statements.touch(stmt):
            self.prepare(backend, stmt, hidden=True)
            if self.checking is stmt:
                return None
        return stmt.name, stmt

    def bind_prepared(self, backend: Backend, buf: bytearray, start: int, end: int) -> bool:
        """The usual Bind, handled where it lies in the client's buffer (``buf[start:end]``):
        a named statement already prepared on ``backend`` is bound under its server name, the
        unnamed one passed on if it was parsed on ``backend``.
        False, with nothing done, for any other case (``bind`` handles those)."""
        if _COMPILED:  # C loops there; in Python find() is faster
            portal_end = start + 5
            while portal_end < end and buf[portal_end]:
                portal_end += 1
            name_end = portal_end + 1
            while name_end < end and buf[name_end]:
                name_end += 1
            if name_end >= end:
                return False
        else:
            portal_end = buf.find(0, start + 5, end)
            name_end = buf.find(0, portal_end + 1, end) if portal_end >= 0 else -1
            if name_end < 0:
                return False
        ex = self.ex
        if name_end == portal_end + 1:  # the unnamed statement, parsed here last: as it came
            if self.unnamed is None or backend.unnamed is not self.unnamed:
                return False
            ex.server_out.append(buf[start:end])
            ex.pending.append(BIND_UNNAMED_REPLY)
            return True
        stmt = self.named.get(bytes(buf[portal_end + 1 : name_end]))
        if stmt is None or stmt.stale or not backend.statements.touch(stmt):
            return False
        length = end - start - 1 + len(stmt.name) - (name_end - portal_end - 1)
        ex.server_out.append(
            b"".join(
                (
                    p.BIND,
                    p.pack_length(length),
                    buf[start + 5 : portal_end + 1],
                    stmt.name,
                    buf[name_end:end],
                )
            )
        )
        ex.pending.append(Pending(b"2E", stmt=stmt))
        return True

    def bind(self, backend: Backend, body: bytes) -> bool:
        """Forward a Bind; False if the client must wait (and send it again)."""
        portal, name, rest_at = p.split_bind(body)
        target = self._ensure(backend, name)
        if target is None:
            return False
        if isinstance(target, bytes):
            self.ex.probe(target, None)
        else:
            self.ex.to_server(
                p.build_bind(portal, target[0], body[rest_at:]), Pending(b"2E", stmt=target[1])
            )
        return True

    def describe(self, backend: Backend, body: bytes) -> bool:
        """Forward a Describe; False if the client must wait (and send it again)."""
        which, name = p.parse_target(body)
        if which == b"P":
            self.ex.to_server(p.frame(p.DESCRIBE, body), Pending(b"TnE"))
            return True
        target = self._ensure(backend, name)
        if target is None:
            return False
        if isinstance(target, bytes):
            self.ex.probe(target, None)
        else:
            self.ex.to_server(
                p.build_target(p.DESCRIBE, b"S", target[0]), Pending(b"TnE", stmt=target[1])
            )
        return True

    def close(self, backend: Backend | None, body: bytes) -> None:
        which, name = p.parse_target(body)
        if which == b"P":
            if backend is None:  # no transaction, so no portal: nothing to close
                self.ex.synth(p.CLOSE_COMPLETE, None)
            else:
                self.ex.to_server(p.frame(p.CLOSE, body), Pending(b"3E"))
            return
        # Statements stay prepared on the server for other clients; the client's name goes.
        if name == b"":
            u = self.unnamed
            self.unnamed = None

            def undo() -> None:
                if self.unnamed is None:
                    self.unnamed = u

        else:
            stmt = self.named.pop(name, None)

            def undo() -> None:
                if stmt is not None:
                    self.named.setdefault(name, stmt)

        self.ex.synth(p.CLOSE_COMPLETE, undo)

    # --- simple Query -------------------------------------------------------------------

    def deallocate_without_server(self, sql: bytes) -> bool:
        """Answer a lone SQL ``DEALLOCATE name`` of a client statement without the server."""
        target = deallocate_target(sql)
        # In a failed transaction PostgreSQL refuses DEALLOCATE: the server will say so.
        if target is None or self.ex.status == b"E" or self.named.pop(target, None) is None:
            return False
        # The server statement stays for other clients; only the client's name goes.
        self.ex.synth(p.command_complete(b"DEALLOCATE"), None)
        self.ex.synth(lambda: p.ready_for_query(self.ex.status), None)
        return True

    def query(self, backend: Backend, body: bytes, sql: bytes, dropping: bool) -> None:
        if dropping:
            self.dropping(backend, sql)
        if backend.extra and may_reset_settings(sql):
            backend.settings_reset()
        # A simple Query drops the unnamed statement, on the server and so for the client.
        self.unnamed = None
        backend.unnamed = None
        self.ex.to_server(p.frame(p.QUERY, body), QUERY_REPLY)

    def dropping(self, backend: Backend, sql: bytes) -> None:
        """SQL that may drop prepared statements: forget what the backend holds (later uses
        re-prepare, so forgetting too much is safe) and, for a lone DEALLOCATE ALL or DISCARD
        ALL, the client's own names too."""
        backend.statements.clear()
        backend.unnamed = None
        if drops_all(sql):
            self.named.clear()
            self.unnamed = None

    def plan_changed(self, backend: Backend, stmt: Statement) -> None:
        """The server said the statement's plan is unusable ("cached plan must not change
        result type"): the next Parse of this SQL gets a fresh server statement."""
        stmt.stale = True
        self.registry.retire(stmt)
        backend.statements.discard(stmt)


def _name(raw: bytes) -> str:
    return raw.decode(errors="replace")


def _missing_error(name: bytes) -> bytes:
    if name == b"":
        return p.error_response("26000", "unnamed prepared statement does not exist")
    return p.error_response("26000", f'prepared statement "{_name(name)}" does not exist')
